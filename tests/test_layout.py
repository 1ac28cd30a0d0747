"""The shape of the relay package, read from its source with ``ast`` (nothing is imported).

What counts, and why:

- **Redis**: only ``relay/store/`` talks to Redis, so no other module imports ``redis`` or ``hiredis``
  anywhere: at module level, inside a function, or under ``if TYPE_CHECKING:`` (a type of the client
  outside the store is already a leak of it).
- **Import cycles**: an edge ``a → b`` for every ``import`` / ``from … import`` of ``b`` in ``a``, at module
  level *and* inside functions: a function-level import that closes a loop is a cycle that only shows up
  later, at run time. Imports under ``if TYPE_CHECKING:`` are left out (never executed; they exist to name
  types). ``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg``. The
  implicit import of a parent package (``relay.ingress.app`` runs ``relay/ingress/__init__.py`` first) is
  not an edge: a package's ``__init__`` re-exporting its submodules is not a cycle.
- **Length**: a module of ``relay/`` has at most ``MAX_LINES`` lines, unless ``LONG_BY_DESIGN`` names it
  with a reason (an entry that is no longer needed fails too, so the list only shrinks).
- **Private names**: no module imports a ``_private`` name from another module, nor a ``_private``
  module from outside the package that holds it (``relay.store`` may import ``relay.store._legacy``).
- **Errors**: every exception class of ``relay/`` is defined in ``relay/errors.py`` or named in its
  docstring ("where the others live").
"""

from __future__ import annotations

import ast
import builtins
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

RELAY = Path(__file__).resolve().parents[1] / "relay"
STORE = "relay.store"
REDIS_PACKAGES = frozenset({"redis", "hiredis"})
MAX_LINES = 500
# module → why it may be longer than MAX_LINES. Empty: keep it so.
LONG_BY_DESIGN: dict[str, str] = {}


@dataclass(frozen=True)
class Import:
    """One imported module, or one name from a module: ``module`` is absolute, ``name`` "" for ``import x``."""

    module: str
    name: str
    line: int
    type_only: bool


@cache
def modules() -> dict[str, Path]:
    """Dotted name → file of every module of relay/ (a package is its ``__init__.py``)."""
    found: dict[str, Path] = {}
    for path in sorted(RELAY.rglob("*.py")):
        parts = path.relative_to(RELAY.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _is_package(module: str) -> bool:
    return modules()[module].name == "__init__.py"


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _absolute(module: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    package = module.split(".") if _is_package(module) else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imports(module: str) -> Iterator[Import]:
    """Every import statement of ``module``, wherever it is in the file."""
    tree = ast.parse(modules()[module].read_text(), filename=str(modules()[module]))

    def visit(node: ast.AST, type_only: bool) -> Iterator[Import]:
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(alias.name, "", node.lineno, type_only)
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(module, node)
            for alias in node.names:
                yield Import(source, alias.name, node.lineno, type_only)
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            for stmt in node.body:
                yield from visit(stmt, True)
            for stmt in node.orelse:
                yield from visit(stmt, type_only)
            return
        for child in ast.iter_child_nodes(node):
            yield from visit(child, type_only)

    yield from visit(tree, False)


def _target(imp: Import) -> str | None:
    """The module of relay/ an import runs, or None when it is outside relay/."""
    known = modules()
    if imp.name and f"{imp.module}.{imp.name}" in known:
        return f"{imp.module}.{imp.name}"
    parts = imp.module.split(".")
    while parts and ".".join(parts) not in known:
        parts.pop()  # ``import relay.x.y`` of a name that is not a module: its closest module
    return ".".join(parts) or None


def graph() -> dict[str, set[str]]:
    """module → the modules of relay/ it imports (run-time imports: module and function level)."""
    return {
        m: {t for imp in imports(m) if not imp.type_only and (t := _target(imp)) is not None and t != m}
        for m in modules()
    }


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            strong(v)
    return found


def _in_store(module: str) -> bool:
    return module == STORE or module.startswith(STORE + ".")


def test_only_the_store_imports_redis() -> None:
    offenders = [
        f"{m}:{imp.line} imports {imp.module}"
        for m in modules()
        if not _in_store(m)
        for imp in imports(m)
        if imp.module.split(".")[0] in REDIS_PACKAGES
    ]
    assert not offenders, "only relay/store/ may import redis or hiredis:\n" + "\n".join(offenders)


def test_the_import_graph_has_no_cycle() -> None:
    edges = graph()
    found = cycles(edges)
    detail = [" ↔ ".join(c) + "\n    " + "; ".join(f"{a} → {sorted(edges[a] & set(c))}" for a in c) for c in found]
    assert not found, "import cycles in relay/ (module- or function-level imports):\n" + "\n".join(detail)


def test_modules_are_short() -> None:
    lengths = {m: len(p.read_text().splitlines()) for m, p in modules().items()}
    too_long = [f"{m}: {n} lines" for m, n in sorted(lengths.items()) if n > MAX_LINES and m not in LONG_BY_DESIGN]
    stale = [m for m in LONG_BY_DESIGN if lengths.get(m, 0) <= MAX_LINES]
    assert not too_long, f"modules of relay/ longer than {MAX_LINES} lines:\n" + "\n".join(too_long)
    assert not stale, f"LONG_BY_DESIGN entries now within {MAX_LINES} lines (or gone): {stale}"


def _private(part: str) -> bool:
    return part.startswith("_") and not (part.startswith("__") and part.endswith("__"))


def test_no_private_name_is_imported_across_modules() -> None:
    offenders = []
    for m in modules():
        for imp in imports(m):
            if imp.module.split(".")[0] != "relay":
                continue
            if _private(imp.name):
                offenders.append(f"{m}:{imp.line} imports {imp.name} from {imp.module}")
            path = imp.module.split(".") + ([imp.name] if imp.name and f"{imp.module}.{imp.name}" in modules() else [])
            for i, part in enumerate(path):
                owner = ".".join(path[:i])  # the package that holds the private module
                if _private(part) and not (m == owner or m.startswith(owner + ".")):
                    offenders.append(f"{m}:{imp.line} imports the private module {'.'.join(path[: i + 1])}")
    assert not offenders, "private names imported from another module:\n" + "\n".join(offenders)


def _exception_classes() -> dict[str, str]:
    """Class name → module, for every class of relay/ that derives from an exception (as far as ast can tell)."""
    bases: dict[tuple[str, str], list[str]] = {}
    for m, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases[(m, node.name)] = [ast.unparse(b).rsplit(".", 1)[-1] for b in node.bases]

    def builtin_exception(name: str) -> bool:
        obj = getattr(builtins, name, None)
        return isinstance(obj, type) and issubclass(obj, BaseException)

    exceptions: set[str] = set()
    changed = True
    while changed:  # a class of relay/ deriving from an exception class of relay/ is one too
        changed = False
        for (_, name), names in bases.items():
            if name in exceptions:
                continue
            if any(b in exceptions or builtin_exception(b) or b.endswith(("Error", "Exception")) for b in names):
                exceptions.add(name)
                changed = True
    return {name: m for (m, name) in bases if name in exceptions}


def test_errors_module_holds_every_error_type_or_says_where_it_lives() -> None:
    errors = ast.parse((RELAY / "errors.py").read_text())
    docstring = ast.get_docstring(errors) or ""
    elsewhere = {name: m for name, m in _exception_classes().items() if m != "relay.errors"}
    missing = [f"{m}.{name}" for name, m in sorted(elsewhere.items()) if not re.search(rf"\b{name}\b", docstring)]
    assert not missing, f"exception classes neither in relay/errors.py nor named in its docstring: {missing}"
