"""py-spy profiles of a server under load: record (``--format raw``) and summarise the collapsed stacks.

Summary: share of samples per package (by the file of the innermost Python frame: time in C
extensions such as msgspec or hiredis counts for the Python function that called them), the top
functions by self time, and the top functions by inclusive time.

Run on a saved profile: ``python -m bench._profile /tmp/relay-always-a.txt``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

from bench._common import pinned

_FRAME_RE = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")

# (label, substring of the frame's file path), first match wins.
_PACKAGES = (
    ("relay.store", "relay/store/"),
    ("relay.ingress", "relay/ingress/"),
    ("relay.validation/rules/models", "relay/validation.py"),
    ("relay.validation/rules/models", "relay/rules.py"),
    ("relay.validation/rules/models", "relay/models/"),
    ("relay.events/ordering", "relay/events.py"),
    ("relay.events/ordering", "relay/ordering.py"),
    ("relay (other)", "relay/"),
    ("redis-py", "/redis/"),
    ("hiredis", "/hiredis/"),
    ("aiohttp web/http", "/aiohttp/"),
    ("prometheus_client", "/prometheus_client/"),
    ("structlog", "/structlog/"),
    ("multidict/yarl", "/multidict/"),
    ("multidict/yarl", "/yarl/"),
    ("asyncio (loop, streams, futures)", "/asyncio/"),
    ("bench bare handler", "bench/bare.py"),
)


def py_spy() -> str | None:
    exe = Path(sys.executable).with_name("py-spy")
    return str(exe) if exe.exists() else shutil.which("py-spy")


def start_record(
    pid: int, out: Path, duration_s: int, cpus: set[int] | None, rate: int = 250
) -> subprocess.Popen[bytes]:
    """Sample ``pid`` for ``duration_s`` without stopping it; raw collapsed stacks to ``out``."""
    exe = py_spy()
    if exe is None:
        raise RuntimeError("py-spy is not installed (pip install py-spy)")
    argv = [exe, "record", "--pid", str(pid), "--duration", str(duration_s), "--rate", str(rate)]
    argv += ["--format", "raw", "--nonblocking", "--output", str(out)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=pinned(cpus))


def _split(frame: str) -> tuple[str, str]:
    m = _FRAME_RE.match(frame.strip())
    if m is None:
        return frame.strip(), ""
    return m.group("func"), m.group("file")


# Frames every sample goes through (the CLI, the event loop's driver): left out of the inclusive list.
_BOILERPLATE = (
    "click/",
    "asyncio/runners.py",
    "asyncio/base_events.py",
    "asyncio/events.py",
    "<string>",
    "relay/cli.py",
)


def _package(path: str) -> str:
    path = "/" + path  # py-spy names files relative to their sys.path entry: "redis/asyncio/connection.py"
    for label, needle in _PACKAGES:
        if needle in path:
            return label
    return "other"


def summarize(path: Path, top: int = 15) -> str:
    """Text summary of one raw (collapsed) py-spy profile."""
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    phases: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        frames = [_split(f) for f in stack.split(";")]
        frames = [(func, file) for func, file in frames if file]  # drop the process/thread pseudo-frames
        if not frames:
            continue
        total += count
        leaf_func, leaf_file = frames[-1]
        self_time[f"{leaf_func} ({_short(leaf_file)})"] += count
        packages[_package(leaf_file)] += count
        phases[_phase(frames)] += count
        for name in {f"{func} ({_short(file)})" for func, file in frames if not file.startswith(_BOILERPLATE)}:
            inclusive[name] += count
    if total == 0:
        return f"{path.name}: no samples"
    lines = [f"{path.name}: {total} samples (CPU-busy samples of the server's threads)"]
    lines.append("  by package (innermost Python frame):")
    lines += [f"    {100 * n / total:5.1f} %  {label}" for label, n in packages.most_common()]
    lines.append("  by phase of the request (any frame of the stack, first match in this order):")
    lines += [f"    {100 * n / total:5.1f} %  {label}" for label, n in phases.most_common()]
    lines.append(f"  top {top} by self time:")
    lines += [f"    {100 * n / total:5.1f} %  {name}" for name, n in self_time.most_common(top)]
    lines.append(f"  top {top} by inclusive time:")
    lines += [f"    {100 * n / total:5.1f} %  {name}" for name, n in inclusive.most_common(top)]
    return "\n".join(lines)


# Phases of a request, first match wins, by the functions and files anywhere in a sample's stack.
_PHASES: tuple[tuple[str, frozenset[str], tuple[str, ...]], ...] = (
    (
        "Redis client: pipeline pack/send/parse (Connection._flush, redis-py)",
        frozenset({"Connection._flush_loop", "Connection._flush", "Connection._execute", "RawPipe.execute"}),
        ("redis/",),
    ),
    (
        "validation: parse_target + msgspec decode + rules + Event (validate)",
        frozenset({"validate", "parse_target", "_batch_item"}),
        ("relay/validation.py", "relay/rules.py", "relay/models/"),
    ),
    (
        "HTTP response: build, encode, write (finish_response, json_response)",
        frozenset({"RequestHandler.finish_response", "json_response", "accepted", "_accepted"}),
        ("aiohttp/web_response.py", "aiohttp/http_writer.py"),
    ),
    (
        "HTTP request: socket read + parse (data_received, request.read)",
        frozenset({"RequestHandler.data_received", "_read_body"}),
        ("aiohttp/streams.py",),
    ),
    (
        "handler: auth, metrics, envelope, futures (handle_event/handle_batch rest)",
        frozenset({"handle_event", "handle_batch", "handle_single", "handle_coalesce", "Store.append"}),
        (),
    ),
    ("aiohttp: dispatch, routing, middleware, request objects", frozenset(), ("aiohttp/",)),
)


def _phase(frames: list[tuple[str, str]]) -> str:
    funcs = {func for func, _ in frames}
    for label, names, files in _PHASES:
        if funcs & names or (files and any(file.startswith(files) for _, file in frames)):
            return label
    return "event loop / asyncio (select, scheduling, futures)"


def _short(file: str) -> str:
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if marker in file:
            return file.split(marker, 1)[1]
    return file


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(summarize(Path(arg)))
