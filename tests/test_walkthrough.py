"""The README's "Trying it", run as a newcomer runs it, answers what the README shows.

A copy of the clone's config/ and examples/ in a fresh directory (the data directory lands beside them, as
in a clone), the relay started with the README's first command (its ports moved to free ones), then every
command of the section's shell block, in order, through a shell, with `relay` on the PATH. Each `# …` line
under a command is a line it prints (stdout and stderr as a terminal shows them): it must match, "…"
standing for any text (timestamps, ids).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.loopback import free_port
from tests.waiting import wait_until_sync

README = REPO / "README.md"
SERVE = "RELAY_INGRESS_TOKEN=dev-token relay serve --config config/relay.toml"


@dataclass
class Step:
    command: str
    shown: list[str] = field(default_factory=list)


def trying_it(readme: str) -> list[Step]:
    """The commands of the "Trying it" section's shell block, each with the output lines shown under it."""
    section = readme.split("\n## Trying it\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```sh\n", 1)[1].split("\n```", 1)[0]
    steps: list[Step] = []
    lines = iter(block.splitlines())
    for line in lines:
        if not line.strip():
            continue
        if line.startswith("#"):
            assert steps, f"output before any command: {line}"
            assert line == "#" or line.startswith("# "), line
            steps[-1].shown.append(line[2:])
            continue
        command = line
        while command.endswith("\\"):
            command += "\n" + next(lines)  # the shell joins them
        steps.append(Step(re.sub(r"\s{2,}#\s.*$", "", command).rstrip()))  # a trailing comment is not run
    return steps


def pattern(shown: str) -> re.Pattern[str]:
    """A shown line as a pattern: "…" stands for any text."""
    return re.compile(".*?".join(re.escape(part) for part in shown.split("…")))


@pytest.fixture
def clone() -> Iterator[Path]:
    top = Path(tempfile.mkdtemp(prefix="relay-w-", dir="/tmp"))  # short: the embedded server's socket path
    try:
        shutil.copytree(REPO / "config", top / "config")
        shutil.copytree(REPO / "examples", top / "examples")
        bin_dir = top / "bin"  # `relay` as the README types it: this interpreter's package
        bin_dir.mkdir()
        (bin_dir / "relay").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m relay "$@"\n')
        (bin_dir / "relay").chmod(0o755)
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_the_readme_walkthrough_answers_what_the_readme_shows(clone: Path) -> None:
    readme = README.read_text()
    assert SERVE in readme.split("\n## ", 1)[0], "the README's first command starts the relay this way"
    steps = trying_it(readme)
    assert [s.command.split()[0] for s in steps] == ["curl", "relay", "relay"], steps
    assert all(s.shown for s in steps), "each command shows what it prints"

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env["PATH"] = f"{clone / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
    served = {**env, "RELAY_INGRESS_LISTEN": f"127.0.0.1:{port}", "RELAY_OCPI_LISTEN": "127.0.0.1:0"}
    log = clone / "serve.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(["sh", "-c", f"exec env {SERVE}"], cwd=clone, env=served, stdin=subprocess.DEVNULL,
                                stdout=sink, stderr=sink)  # fmt: skip
    try:
        wait_until_sync(lambda: '"relay_started"' in log.read_text() or proc.poll() is not None, 30, log.read_text)
        assert proc.poll() is None, log.read_text()
        printed: list[list[str]] = []
        for step in steps:
            command = step.command.replace("127.0.0.1:8780", f"127.0.0.1:{port}")
            out = subprocess.run(["bash", "-c", command], cwd=clone, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, timeout=60, check=False)  # fmt: skip
            assert out.returncode == 0, (step.command, out.stdout)
            printed.append([line for line in out.stdout.splitlines() if line.strip()])
            assert len(printed[-1]) == len(step.shown), (step.command, printed[-1], step.shown)
            for shown, line in zip(step.shown, printed[-1], strict=True):
                assert pattern(shown).fullmatch(line), f"{step.command}\nREADME: {shown}\nprinted: {line}"
        # The key fields, beyond the shapes: the 202's warning and event id, and the event as the CSMS sent it.
        answer = json.loads(printed[0][0])
        assert answer["status_code"] == 1000 and answer["status_message"] == "Accepted"
        assert [w["rule"] for w in answer["data"]["warnings"]] == ["gireve.L2.tariff_ids_per_evse"]
        event_id = answer["data"]["event_id"]
        assert printed[1][1].endswith(f" event_id={event_id}")
        assert json.loads(printed[1][2]) == json.loads((clone / "examples" / "location.json").read_text())
        entry = json.loads(printed[2][-1])
        assert entry["event"]["id"] == event_id and entry["event"]["body"] == json.loads(printed[1][2])
        assert re.fullmatch(r"relay:\{r[0-3]\}:locations", entry["stream"])
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()
    assert (clone / "data").is_dir()  # the config's "../data": beside config/, as in a clone
