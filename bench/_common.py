"""Helpers of the ingress benchmark: bodies, CPU pinning, CPU accounting, subprocess servers, Redis counts."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec
import redis

REPO = Path(__file__).resolve().parents[1]
PREFIX = "/ingress/2.2.1"
LOCATION_PATH = f"{PREFIX}/locations/FR/AB1/"
BATCH_PATH = f"{PREFIX}/batch"
TOKEN = "bench-ingress-token"
ID_MARK = "@@ID@@"
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def location_template() -> tuple[bytes, bytes]:
    """examples/location.json, compact (~1.3 KB), split around its ``id`` value: body = head + id + tail."""
    data = msgspec.json.decode((REPO / "examples" / "location.json").read_bytes())
    data["id"] = ID_MARK
    head, tail = msgspec.json.encode(data).split(ID_MARK.encode())
    return head, tail


def location_body(location_id: str) -> bytes:
    head, tail = location_template()
    return head + location_id.encode() + tail


def batch_body(size: int, tag: str = "B") -> bytes:
    """One POST /batch body with ``size`` Location PUTs (distinct ids)."""
    head, tail = location_template()
    ops = []
    for i in range(size):
        loc_id = f"{tag}{i}"
        ops.append(
            {
                "method": "PUT",
                "path": LOCATION_PATH + loc_id,
                "body": msgspec.Raw(head + loc_id.encode() + tail),
                "correlation_id": f"bench-{i}",
            }
        )
    return msgspec.json.encode({"operations": ops})


# -- CPUs -----------------------------------------------------------------------------------------


def pin_process(pid: int, cpus: set[int]) -> None:
    """Pin every thread of a running process (os.sched_setaffinity(pid) alone moves only its main thread)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except ProcessLookupError:  # a thread that just ended
            continue


def pinned(cpus: set[int] | None) -> Callable[[], None] | None:
    """A preexec_fn that pins the child (and every thread it will start) before exec."""
    if cpus is None:
        return None

    def _pin() -> None:  # runs in the child between fork and exec
        os.sched_setaffinity(0, cpus)

    return _pin


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime (fields 14 and 15 of stat)


def busy_cpu_seconds() -> float:
    """CPU time spent by the whole machine so far (all CPUs, everything but idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / _CLK_TCK  # user nice system idle iowait irq softirq steal


def speed_probe(cpus: set[int], rounds: int = 5) -> float:
    """Seconds for a fixed pure-Python loop on ``cpus`` (best of ``rounds``): the machine's speed right now.

    On a shared virtual machine the same loop can take twice as long from one minute to the next;
    comparing probes tells whether two runs were measured on an equally fast machine.
    """
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        best = float("inf")
        for _ in range(rounds):
            t0 = time.perf_counter()
            x = 0
            for i in range(200_000):
                x += i * i
            best = min(best, time.perf_counter() - t0)
        return best
    finally:
        os.sched_setaffinity(0, before)


# -- subprocess servers ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Server:
    """An HTTP server under test, in its own process, pinned to the server CPU."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_server(
    name: str,
    argv: Sequence[str],
    env: Mapping[str, str],
    port: int,
    log_path: Path,
    cpus: set[int] | None,
    timeout_s: float = 30.0,
) -> Server:
    """Start a server process and wait until GET /healthz answers 200."""
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            list(argv),
            env=dict(env),
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=pinned(cpus),
        )
    server = Server(name, proc, port, log_path)
    deadline = time.monotonic() + timeout_s
    url = f"http://127.0.0.1:{port}/healthz"
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return server
        except (OSError, urllib.error.URLError):
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"{name} did not answer {url} within {timeout_s}s:\n{server.log_tail()}")
        time.sleep(0.05)


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without any RELAY_* variable (a developer's shell must not change the bench)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


def python() -> str:
    return sys.executable


# -- Redis ----------------------------------------------------------------------------------------


def stream_entries(client: redis.Redis) -> int:
    """Entries in every stream of the database (relay shards and the bare handlers' stream alike)."""
    total = 0
    for key in client.scan_iter(count=1000, _type="STREAM"):
        total += int(client.xlen(key))
    return total


def settled_entries(client: redis.Redis, pid: int | None = None, quiet_s: float = 0.25, timeout_s: float = 60.0) -> int:
    """Stream entries once the server is done with the requests in flight when the load stopped.

    Settled = no new entry and (given the server's pid) under 5 % of a core used by it during
    ``quiet_s``, twice in a row: a relay still parsing the replies of a large pipeline writes
    nothing for a while but is not done.
    """
    last, cpu = stream_entries(client), cpu_seconds(pid) if pid else 0.0
    calm = 0
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and calm < 2:
        time.sleep(quiet_s)
        now, cpu_now = stream_entries(client), cpu_seconds(pid) if pid else 0.0
        calm = calm + 1 if now == last and cpu_now - cpu < 0.05 * quiet_s else 0
        last, cpu = now, cpu_now
    return last


def reset_redis(client: redis.Redis) -> None:
    """FLUSHALL, then rewrite the AOF so it does not grow from run to run; wait for the rewrite."""
    client.flushall()
    client.bgrewriteaof()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        info = client.info("persistence")
        if not info.get("aof_rewrite_in_progress") and not info.get("aof_rewrite_scheduled"):
            return
        time.sleep(0.05)
    raise RuntimeError("AOF rewrite did not finish within 30s")
