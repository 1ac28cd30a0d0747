"""The GIREVE checklist as tests (``tests/test_gireve_checklist_*.py``) and as a page (``docs/gireve.md``).

Read with ``ast`` and as text, nothing runs: every line of the brief's checklist has tests named after it
(``test_T1_…``), and no checklist test names a line that does not exist; docs/gireve.md has a section per
line, in order, that says how the relay meets it (a module or a setting) and names each of that line's
tests; it names no test that does not exist (a deeper one is written ``tests/<module>.py::<test>``) and
no setting that ``config/relay.toml`` lacks.
"""

from __future__ import annotations

import ast
import re
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

from tests.gireve_support import CHECKLIST

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
DOC = REPO / "docs" / "gireve.md"
LINE_TEST = re.compile(r"test_([A-Z]\d)_\w+")
SECTION = re.compile(r"^### ([A-Z]\d) ", re.M)
HEADING = re.compile(r"^#{1,3} ", re.M)
DEEPER = re.compile(r"tests/(test_\w+\.py)::(test_\w+)")
SETTING = re.compile(r"`\[(\[?)(\w+)\]?\] (\w+)")


@cache
def defined_tests(path: Path) -> frozenset[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    functions = (n for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef))
    return frozenset(n.name for n in functions if n.name.startswith("test_"))


def checklist_tests() -> dict[str, set[str]]:
    """Line id → the checklist tests named after it ("" for a test named after none)."""
    by_line: dict[str, set[str]] = {}
    for path in sorted(TESTS.glob("test_gireve_checklist_*.py")):
        for name in defined_tests(path):
            m = LINE_TEST.fullmatch(name)
            by_line.setdefault(m.group(1) if m else "", set()).add(name)
    return by_line


def sections() -> dict[str, str]:
    """docs/gireve.md's text of each line's section ("### T1 …" up to the next heading)."""
    text = DOC.read_text()
    found: dict[str, str] = {}
    for m in SECTION.finditer(text):
        nxt = HEADING.search(text, m.end())
        found[m.group(1)] = text[m.start() : nxt.start() if nxt else len(text)]
    return found


def test_every_line_of_the_checklist_has_tests_named_after_it() -> None:
    found = checklist_tests()
    assert "" not in found, f"checklist tests named after no line: {sorted(found[''])}"
    assert set(found) <= set(CHECKLIST), f"tests named after lines the checklist lacks: {set(found) - set(CHECKLIST)}"
    assert [line for line in CHECKLIST if line not in found] == [], "lines without a test"


def test_docs_gireve_says_for_every_line_how_and_which_tests_show_it() -> None:
    found, tests = sections(), checklist_tests()
    assert list(found) == list(CHECKLIST), "one section per line, in the checklist's order"
    for line, text in found.items():
        assert "relay/" in text or SETTING.search(text), f"{line}: say how (a module of relay/ or a setting)"
        missing = sorted(name for name in tests.get(line, set()) if name not in text)
        assert not missing, f"{line}: its section does not name {missing}"
    assert "## Choices the guide leaves to the CPO" in DOC.read_text()


def test_docs_gireve_names_only_tests_and_settings_that_exist() -> None:
    text = DOC.read_text()
    named = set(LINE_TEST.findall(text))
    assert named <= set(CHECKLIST)
    ours = {name for names in checklist_tests().values() for name in names}
    for m in re.finditer(r"\btest_[A-Z]\d_\w+", text):
        assert m.group(0) in ours, f"docs/gireve.md names {m.group(0)}, which does not exist"
    for module, name in DEEPER.findall(text):
        path = TESTS / module
        assert path.is_file() and name in defined_tests(path), f"docs/gireve.md names tests/{module}::{name}"
    config: dict[str, Any] = tomllib.loads((REPO / "config" / "relay.toml").read_text())
    for array, section, key in SETTING.findall(text):
        table = config[section][0] if array else config.get(section, {})
        assert key in table, f"docs/gireve.md names [{array}{section}] {key}, not in config/relay.toml"
