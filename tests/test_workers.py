"""``relay serve --workers N``: N processes on the same ports, supervised by a parent (relay.supervisor).

The relay runs as ``python -m relay serve --workers 2`` with the shipped config, fixed free ports and its
embedded server (run by the parent) in a temporary data directory; the fake IOP runs in the test process.
Which worker took a connection is read from /proc: the accepted socket is in that worker's descriptors.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from click.testing import CliRunner
from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge, Histogram, Info, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from relay import worker_metrics
from relay.cli import main
from relay.metrics import HotCounter, HotHistogram
from relay.store import keys as K
from relay.supervisor import CrashBudget
from tests.conftest import REPO, TOKEN, gireve_location
from tests.fake_iop import FakeIop, Reply
from tests.loopback import free_port
from tests.waiting import wait_until

SHIPPED = REPO / "config" / "relay.toml"
SHARDS = 4
LOC_PREFIX = "/ocpi/2.2.1/locations/FR/AB1/"
# Short leases and grace, so that a killed worker's shards are taken over in seconds (as tests/test_crash.py).
FAST = {
    "RELAY_FORWARDER_COMPACT": "",
    "RELAY_IOP_REQUEST_TIMEOUT_S": "2",
    "RELAY_IOP_CONNECT_TIMEOUT_S": "0.5",
    "RELAY_FORWARDER_CLAIM_IDLE_S": "3",
    "RELAY_FORWARDER_LEASE_TTL_S": "1.5",
    "RELAY_FORWARDER_BACKOFF_INITIAL_S": "0.01",
    "RELAY_FORWARDER_BACKOFF_MAX_S": "0.2",
    "RELAY_FORWARDER_SHUTDOWN_TIMEOUT_S": "2",
    "RELAY_INGRESS_SHUTDOWN_TIMEOUT_S": "2",
    "RELAY_OCPI_SHUTDOWN_TIMEOUT_S": "2",
}
STOP_S = 2 + 2 + 2 + 5  # relay.supervisor.stop_timeout_s with the timeouts above


def alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def children(pid: int) -> list[tuple[int, bytes]]:
    """(pid, command line) of the live children of ``pid``."""
    out = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with suppress(OSError):
                stat = (proc / "stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid and alive(int(proc.name)):
                    out.append((int(proc.name), (proc / "cmdline").read_bytes()))
    return out


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    with suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(int(target[8:-1]))
    return inodes


def accepted_by(server_port: int, client_port: int, pids: list[int]) -> int | None:
    """Which of ``pids`` holds the server side of the loopback connection from ``client_port``."""
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        cols = line.split()
        local, remote = cols[1], cols[2]
        if int(local.split(":")[1], 16) == server_port and int(remote.split(":")[1], 16) == client_port:
            inode = int(cols[9])
    if inode is None:
        return None
    return next((pid for pid in pids if inode in socket_inodes(pid)), None)


async def request_on_new_connection(
    port: int, method: str, path: str, body: bytes, pids: list[int]
) -> tuple[int, int | None]:
    """One request on a connection of its own: (status, pid of the worker that accepted the connection)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        writer.write(head.encode() + body)
        await writer.drain()
        raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        status = int(raw.split(b" ", 2)[1])
        length = next(int(h.split(b":", 1)[1]) for h in raw.split(b"\r\n") if h.lower().startswith(b"content-length:"))
        await reader.readexactly(length)
        owner = accepted_by(port, writer.get_extra_info("sockname")[1], pids)  # the connection is still open
        return status, owner
    finally:
        writer.close()
        with suppress(OSError):
            await writer.wait_closed()


@dataclass
class Supervised:
    """One ``relay serve --workers N`` process tree (the parent, its workers, its embedded server)."""

    top: Path
    iop: FakeIop
    ingress_port: int = field(default_factory=free_port)
    ocpi_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def data_dir(self) -> Path:
        return self.top / "data"

    @property
    def log_path(self) -> Path:
        return self.top / "relay.log"

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.ingress_port}"

    def start(self, workers: int = 2, **extra: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        env.update(
            RELAY_STORAGE_DIR=str(self.data_dir),
            RELAY_STORAGE_DURABILITY="everysec",
            RELAY_REDIS_URL="",
            RELAY_INGRESS_LISTEN=f"127.0.0.1:{self.ingress_port}",
            RELAY_OCPI_LISTEN=f"127.0.0.1:{self.ocpi_port}",
            RELAY_INGRESS_TOKEN=TOKEN,
            RELAY_IOP_URL=self.iop.url,
            RELAY_IOP_TOKEN="workers-iop-token",
            RELAY_LOG_LEVEL="info",
            **FAST,
        )
        env.update(extra)
        self.env = env
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "relay", "serve", "--workers", str(workers), "--config", str(SHIPPED)],
                env=env,
                cwd=self.top,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def worker_pids(self) -> list[int]:
        return sorted(pid for pid, cmd in children(self.pid) if b"--worker-index" in cmd)

    def redis_pid(self) -> int:
        return int((self.data_dir / "redis.pid").read_text())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log().splitlines():
            with suppress(ValueError):
                doc = json.loads(line)
                if isinstance(doc, dict):
                    out.append(doc)
        return out

    def ready_pids(self) -> set[int]:
        """Workers the parent has seen ready, still alive."""
        return {e["pid"] for e in self.log_events() if e.get("event") == "worker_ready" and alive(e["pid"])}

    async def ready(self, workers: int = 2, timeout_s: float = 30.0) -> list[int]:
        def up() -> bool:
            assert self.proc is not None
            assert self.proc.poll() is None, f"the parent exited with {self.proc.returncode}:\n{self.log()}"
            return len(self.ready_pids()) == workers and set(self.worker_pids()) == self.ready_pids()

        await wait_until(up, timeout_s, lambda: f"{workers} workers ready; the log:\n{self.log()[-6000:]}")
        return self.worker_pids()

    async def wait_exit(self, timeout_s: float) -> int:
        assert self.proc is not None
        proc = self.proc
        await wait_until(lambda: proc.poll() is not None, timeout_s, lambda: f"the parent to exit:\n{self.log()}")
        return proc.returncode

    def redis(self) -> Any:
        return aioredis.Redis.from_url(f"unix://{self.data_dir / 'redis.sock'}")

    def kill_all(self) -> None:
        """Whatever is left (a failed test): the tree, and any server of the data directory."""
        pids = [self.pid, *(pid for pid, _ in children(self.pid))] if self.proc is not None else []
        with suppress(OSError, ValueError):
            pids.append(self.redis_pid())
        for pid in pids:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(10)


@pytest.fixture
async def tree() -> AsyncIterator[Supervised]:
    top = Path(tempfile.mkdtemp(prefix="relay-w-", dir="/tmp"))  # short: unix socket paths are limited
    iop = FakeIop()
    await iop.start()
    srv = Supervised(top, iop)
    yield srv
    srv.kill_all()
    await iop.close()
    shutil.rmtree(top, ignore_errors=True)


def location_body(loc: str) -> bytes:
    return json.dumps(gireve_location(loc)).encode()


async def lease_holders(redis: Any) -> list[str]:
    return [(v or b"").decode() for v in [await redis.get(K.lease_key(s)) for s in range(SHARDS)]]


async def split(redis: Any, pids: list[int]) -> bool:
    """Each worker (replica id host-pid-random) holds the lease of half of the shards."""
    holders = await lease_holders(redis)
    by_pid = [int(h.split("-")[-2]) if h.count("-") >= 2 else 0 for h in holders]
    return sorted(by_pid) == sorted(pids * (SHARDS // 2))


async def drained(redis: Any) -> bool:
    return all([await redis.xlen(K.stream_key("locations", s)) == 0 for s in range(SHARDS)])


def delivered(iop: FakeIop) -> set[str]:
    return {r.path.removeprefix(LOC_PREFIX) for r in iop.received if r.ok and r.path.startswith(LOC_PREFIX)}


@pytest.mark.slow
async def test_two_workers_share_both_ports_and_split_the_shards(tree: Supervised) -> None:
    tree.start()
    pids = await tree.ready()
    assert len(pids) == 2
    # The ingress: new connections land on both workers, and each answers 202 after its durable write.
    owners = []
    for i in range(40):
        path = f"/ingress/2.2.1/locations/FR/AB1/W{i:02d}"
        status, owner = await request_on_new_connection(
            tree.ingress_port, "PUT", path, location_body(f"W{i:02d}"), pids
        )
        assert status == 202
        owners.append(owner)
    assert set(owners) == set(pids), owners
    # The OCPI listener too (no token: 401 from whichever worker took it).
    ocpi_owners = set()
    for _ in range(20):
        status, owner = await request_on_new_connection(tree.ocpi_port, "GET", "/ocpi/versions", b"", pids)
        assert status == 401
        ocpi_owners.add(owner)
    assert ocpi_owners == set(pids)
    # Each worker is a replica with its own id (host-pid-random) and half of the shards' leases.
    redis = tree.redis()
    try:
        await wait_until(lambda: split(redis, pids), 15, lambda: "the shards split between the two workers")
        assert len(set(await lease_holders(redis))) == 2
    finally:
        await redis.aclose()
    await tree.iop.wait_for(lambda: delivered(tree.iop) >= {f"W{i:02d}" for i in range(40)}, timeout=20)
    # /healthz and /readyz answer for the worker that took the connection; every worker's line names it.
    async with aiohttp.ClientSession() as http, http.get(f"{tree.base}/readyz") as r:
        assert r.status == 200 and (await r.json())["ready"] is True
    by_worker = {e["worker"] for e in tree.log_events() if e.get("event") == "relay_started"}
    assert by_worker == {0, 1}


@pytest.mark.slow
async def test_a_killed_worker_is_restarted_and_no_accepted_event_is_lost(tree: Supervised) -> None:
    tree.iop.script = lambda _: Reply(delay_s=0.3)  # the victim dies with requests in flight, entries pending
    tree.start()
    pids = await tree.ready()
    accepted: list[str] = []
    stop = asyncio.Event()

    async def lane(n: int) -> None:
        i = 0
        while not stop.is_set():
            loc = f"K{n}-{i:04d}"
            i += 1
            with suppress(OSError, asyncio.IncompleteReadError, TimeoutError):  # the killed worker's connections
                status, _ = await request_on_new_connection(
                    tree.ingress_port, "PUT", f"/ingress/2.2.1/locations/FR/AB1/{loc}", location_body(loc), []
                )
                if status == 202:
                    accepted.append(loc)
            await asyncio.sleep(0.01)

    redis = tree.redis()
    try:
        await wait_until(lambda: split(redis, pids), 15, "the shards split between the two workers")
    finally:
        await redis.aclose()
    lanes = [asyncio.create_task(lane(n)) for n in range(4)]
    await wait_until(lambda: len(accepted) >= 60, 20, "events accepted before the kill")
    victim, survivor = pids
    os.kill(victim, signal.SIGKILL)
    killed_at = len(accepted)
    after = await tree.ready(timeout_s=20)  # a new worker in the slot, ready
    assert survivor in after and victim not in after
    await wait_until(lambda: len(accepted) >= killed_at + 60, 20, "events accepted after the restart")
    stop.set()
    await asyncio.gather(*lanes)
    assert tree.proc is not None and tree.proc.poll() is None
    await tree.iop.wait_for(lambda: delivered(tree.iop) >= set(accepted), timeout=30)
    # The dead replica's leases expire, the others take its shards and resend what it had read and not
    # acknowledged (the fake IOP took it, the worker died before its ack): every stream ends up empty.
    redis = tree.redis()
    try:
        await wait_until(lambda: drained(redis), 30, lambda: f"streams drained; the log:\n{tree.log()[-4000:]}")
    finally:
        await redis.aclose()
    events = tree.log_events()
    assert any(e.get("event") == "worker_exited" and e.get("returncode") == -9 for e in events)
    sent = Counter(r.path.removeprefix(LOC_PREFIX) for r in tree.iop.arrived)
    resent = [loc for loc in accepted if sent[loc] > 1]
    assert resent, "the killed worker had requests in flight: they are sent again after the takeover"
    print(f"accepted {len(accepted)}, sent again after the takeover: {len(resent)}")


@pytest.mark.slow
async def test_sigterm_to_the_parent_stops_everything_and_frees_the_data_dir(tree: Supervised) -> None:
    tree.start()
    pids = await tree.ready()
    redis_pid = tree.redis_pid()
    started = time.monotonic()
    assert tree.proc is not None
    tree.proc.send_signal(signal.SIGTERM)
    assert await tree.wait_exit(STOP_S + 15) == 0, tree.log()
    assert time.monotonic() - started < STOP_S
    assert not any(alive(pid) for pid in [*pids, redis_pid])
    events = [e.get("event") for e in tree.log_events()]
    # The workers stopped gracefully, then the server: last.
    assert events.count("relay_stopped") == 2
    assert events.index("embedded_redis_stopped") > max(i for i, e in enumerate(events) if e == "worker_stopped")
    assert "Traceback" not in tree.log()
    # The lock is free: a relay (one process) starts on the same data directory and ports.
    tree.start(workers=1)
    async with aiohttp.ClientSession() as http:

        async def ready() -> bool:
            assert tree.proc is not None and tree.proc.poll() is None, tree.log()
            with suppress(aiohttp.ClientError):
                async with http.get(f"{tree.base}/readyz") as r:
                    return r.status == 200
            return False

        await wait_until(ready, 30, lambda: f"a new relay on the data dir:\n{tree.log()[-4000:]}")
    assert [pid for pid, cmd in children(tree.pid) if b"--worker-index" in cmd] == []  # no parent: one process
    one = list(text_string_to_metric_families(await scrape(tree.base)))  # its own registry, as before: no label
    assert one and not [s for f in one for s in f.samples if "worker" in s.labels or f.name.startswith("relay_worker")]
    tree.proc.send_signal(signal.SIGTERM)
    assert await tree.wait_exit(STOP_S) == 0


@pytest.mark.slow
async def test_kill_9_of_the_parent_leaves_no_process_behind(tree: Supervised) -> None:
    tree.start()
    pids = await tree.ready()
    redis_pid = tree.redis_pid()
    assert tree.proc is not None
    tree.proc.kill()
    tree.proc.wait()
    # PR_SET_PDEATHSIG: the workers stop (gracefully, SIGTERM) and so does the server.
    await wait_until(lambda: not any(alive(pid) for pid in [*pids, redis_pid]), STOP_S, "no process left")
    events = [e for e in tree.log_events() if e.get("event") == "relay_stopped"]
    assert {e["worker"] for e in events} == {0, 1}
    # Nor the metrics sockets' directory: the last worker out removes it.
    started = next(e for e in tree.log_events() if e.get("event") == "supervisor_started")
    assert socket_dir(Path(started["metrics_dir"])) is None, tree.log()[-5000:]


@pytest.mark.slow
async def test_the_parent_restarts_the_embedded_server_and_the_workers_store_again(tree: Supervised) -> None:
    tree.start()
    pids = await tree.ready()
    redis_pid = tree.redis_pid()
    os.kill(redis_pid, signal.SIGKILL)

    def restarted() -> bool:
        with suppress(OSError, ValueError):
            return tree.redis_pid() != redis_pid and alive(tree.redis_pid())
        return False

    await wait_until(restarted, 15, lambda: f"a new embedded server; the log:\n{tree.log()[-4000:]}")
    stored: set[int | None] = set()

    async def both_store() -> bool:  # every worker reconnects to the new server (its AOF kept everything)
        with suppress(OSError, asyncio.IncompleteReadError):
            loc = f"R{len(stored)}-{time.monotonic_ns()}"
            path = f"/ingress/2.2.1/locations/FR/AB1/{loc}"
            status, owner = await request_on_new_connection(tree.ingress_port, "PUT", path, location_body(loc), pids)
            if status == 202:
                stored.add(owner)
        return stored == set(pids)

    await wait_until(both_store, 20, lambda: f"202 from both workers; the log:\n{tree.log()[-4000:]}")
    assert tree.worker_pids() == pids  # the workers were not restarted
    events = [e for e in tree.log_events() if e.get("event", "").startswith("embedded_redis_")]
    assert [e["event"] for e in events if "worker" not in e] == [
        "embedded_redis_started", "embedded_redis_exited", "embedded_redis_started", "embedded_redis_restarted"
    ]  # fmt: skip
    assert not [e for e in events if "worker" in e]  # the workers neither start nor watch a server


@pytest.mark.slow
async def test_a_worker_that_cannot_start_stops_everything_with_its_exit_code(tree: Supervised) -> None:
    with socket.socket() as taken:  # the ingress port held by a socket without SO_REUSEPORT
        taken.bind(("127.0.0.1", tree.ingress_port))
        taken.listen()
        tree.start()
        assert await tree.wait_exit(30) == 1, tree.log()
    lines = [line for line in tree.log().splitlines() if line.strip() and not line.startswith("{")]
    assert any(line.startswith("cannot start: Address already in use") for line in lines), lines
    assert lines[-1].startswith("cannot start: worker "), lines
    assert lines[-1].endswith("exited with code 1 while starting"), lines
    assert not (tree.data_dir / "redis.pid").exists() or not alive(tree.redis_pid())


def test_workers_below_one_or_a_port_0_are_refused_with_exit_2() -> None:
    env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("RELAY_")}
    env.update(RELAY_INGRESS_TOKEN=TOKEN, RELAY_INGRESS_LISTEN="127.0.0.1:8780", RELAY_OCPI_LISTEN="127.0.0.1:8781")
    runner = CliRunner()
    for args, extra in ((["--workers", "0"], {}), (["--workers", "-2"], {}), ([], {"RELAY_WORKERS": "0"})):
        result = runner.invoke(main, ["serve", *args, "--config", str(SHIPPED)], env={**env, **extra})
        assert result.exit_code == 2, result.output
        assert "--workers" in result.output and "x>=1" in result.output, result.output
    result = runner.invoke(
        main, ["serve", "--workers", "2", "--config", str(SHIPPED)], env={**env, "RELAY_OCPI_LISTEN": "127.0.0.1:0"}
    )
    assert result.exit_code == 2, result.output
    assert "ocpi.listen: port 0 cannot be shared by --workers 2" in result.output
    assert "ingress.listen" not in result.output


def test_the_crash_budget_backs_off_then_gives_up() -> None:
    now = [0.0]
    budget = CrashBudget(limit=5, window_s=60, backoff_max_s=10, clock=lambda: now[0])
    assert [budget.crashed() for _ in range(5)] == [0.0, 0.5, 1.0, 2.0, 4.0]
    assert budget.crashed() is None  # a sixth exit within the minute
    now[0] = 61.0  # the window slides: a worker that crashes now and then is restarted again
    assert budget.crashed() == 0.0
    assert CrashBudget(limit=10, backoff_max_s=3, clock=lambda: 0.0).crashed() == 0.0
    capped = CrashBudget(limit=10, backoff_max_s=3, clock=lambda: 0.0)
    assert [capped.crashed() for _ in range(6)] == [0.0, 0.5, 1.0, 2.0, 3.0, 3.0]


# -- /metrics for every worker (relay.worker_metrics) ---------------------------------------------------------


def one_workers_registry(n: int) -> CollectorRegistry:
    """What a worker's registry holds: the hot collectors, prometheus_client's kinds, n events of each."""
    reg = CollectorRegistry()
    hot = HotCounter("relay_events_accepted_total", "Events durably accepted", ["module", "operator"], registry=reg)
    lat = HotHistogram("relay_delivery_latency_seconds", "Latency", ["module"], buckets=(0.1, 1), registry=reg)
    plain = PromCounter("relay_delivery_retries", "Retries", ["module"], registry=reg)
    rtt = Histogram("relay_redis_roundtrip_seconds", "PING", buckets=(0.01, 0.1), registry=reg)
    depth = Gauge("relay_queue_depth", 'Undelivered "events"\nfrom Redis', ["module"], registry=reg)
    Info("relay_build", "Version", registry=reg).info({"version": "0.1.0"})
    HotCounter("relay_events_warnings_total", "Warnings (none yet: HELP and TYPE only)", ["rule"], registry=reg)
    for i in range(n):
        hot.inc("locations", "FR/AB1")
        lat.observe(0.05 * (i + 1), "locations")
        plain.labels("locations").inc()
        rtt.observe(0.001)
    depth.labels("locations").set(7)  # from Redis: the same in every worker
    return reg


def samples_of(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}  # fmt: skip


def test_merged_metrics_keep_every_sample_of_every_worker_with_its_label() -> None:
    texts = {i: generate_latest(one_workers_registry(i + 2)).decode() for i in range(3)}
    merged = worker_metrics.render(worker_metrics.merge({i: worker_metrics.parse(t) for i, t in texts.items()}))
    text = merged.decode()
    got = samples_of(text)  # prometheus_client's parser reads it back: a valid exposition
    want = {
        (name, labels | {("worker", str(i))}): v
        for i, t in texts.items()
        for (name, labels), v in samples_of(t).items()
    }
    assert got == want
    names = {name for name, _ in got}
    for suffix in ("_total", "_created", "_bucket", "_sum", "_count"):
        assert any(n.endswith(suffix) for n in names), suffix
    assert {"relay_events_accepted_total", "relay_events_accepted_created", "relay_delivery_latency_seconds_bucket",
            "relay_delivery_latency_seconds_sum", "relay_delivery_latency_seconds_count",
            "relay_delivery_latency_seconds_created", "relay_delivery_retries_total", "relay_delivery_retries_created",
            "relay_redis_roundtrip_seconds_bucket", "relay_build_info", "relay_queue_depth"} <= names  # fmt: skip
    assert got[("relay_events_accepted_total", frozenset({("module", "locations"), ("operator", "FR/AB1"),
                                                          ("worker", "2")}))] == 4  # fmt: skip
    assert got[("relay_delivery_latency_seconds_bucket", frozenset({("module", "locations"), ("le", "+Inf"),
                                                                    ("worker", "1")}))] == 3  # fmt: skip
    # HELP and TYPE once per family, as one worker writes them (types, and the escaped help, kept).
    helps = [line.split()[2] for line in text.splitlines() if line.startswith("# HELP ")]
    types = [" ".join(line.split()[2:]) for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(helps) == len(set(helps)) and len(types) == len(set(types))
    assert types == [" ".join(line.split()[2:]) for line in texts[0].splitlines() if line.startswith("# TYPE ")]
    assert '# HELP relay_queue_depth Undelivered "events"\\nfrom Redis' in text
    assert "# TYPE relay_events_warnings_total counter" in text  # a family without samples yet keeps its header
    # The label goes on every sample line.
    assert all('worker="' in line for line in text.splitlines() if line and not line.startswith("#"))


def socket_dir(path: Path) -> tuple[int, list[str]] | None:
    """The mode and the entries of the workers' metrics directory, None when it is gone."""
    if not path.exists():
        return None
    return path.stat().st_mode & 0o777, sorted(p.name for p in path.iterdir())


async def scrape(base: str) -> str:
    """GET /metrics on a connection of its own (whichever worker the kernel gives it to)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        async with http.get(f"{base}/metrics", timeout=aiohttp.ClientTimeout(total=10)) as r:
            assert r.status == 200 and r.content_type == "text/plain"
            return await r.text()


def accepted_by_worker(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "relay_events_accepted_total":
                out[s.labels["worker"]] = out.get(s.labels["worker"], 0.0) + s.value
    return out


def scrape_errors(text: str) -> float:
    [value] = [s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "relay_worker_scrape_errors"]  # fmt: skip
    assert "worker" not in [s.labels for f in text_string_to_metric_families(text) for s in f.samples
                            if s.name == "relay_worker_scrape_errors"][0]  # fmt: skip
    return value


@pytest.mark.slow
async def test_metrics_of_any_worker_answer_for_every_worker(tree: Supervised) -> None:
    tree.start()
    pids = await tree.ready()
    started = next(e for e in tree.log_events() if e.get("event") == "supervisor_started")
    sockets = Path(started["metrics_dir"])
    assert socket_dir(sockets) == (0o700, ["worker-0.sock", "worker-1.sock"])
    owners: list[int | None] = []
    for i in range(30):
        path = f"/ingress/2.2.1/locations/FR/AB1/M{i:02d}"
        status, owner = await request_on_new_connection(
            tree.ingress_port, "PUT", path, location_body(f"M{i:02d}"), pids
        )
        assert status == 202
        owners.append(owner)
    assert set(owners) == set(pids), owners  # both workers accepted some
    # One scrape: both workers' counters, labelled, summing to the 202s; any later scrape says the same.
    totals = []
    for _ in range(8):
        text = await scrape(tree.base)
        by_worker = accepted_by_worker(text)
        assert set(by_worker) == {"0", "1"} and all(v > 0 for v in by_worker.values()), by_worker
        assert sum(by_worker.values()) == 30, by_worker
        assert scrape_errors(text) == 0
        totals.append(by_worker)
        families = list(text_string_to_metric_families(text))  # a valid exposition, each family once
        assert len({f.name for f in families}) == len(families)
        names = {s.name for f in families for s in f.samples}
        assert {"relay_events_accepted_created", "relay_delivery_latency_seconds_bucket",
                "relay_delivery_latency_seconds_sum", "relay_delivery_latency_seconds_count",
                "relay_delivery_attempts_total", "process_cpu_seconds_total"} <= names  # fmt: skip
        depth = {s.labels["worker"] for f in families for s in f.samples
                 if s.name == "relay_queue_depth" and s.labels["module"] == "locations"}  # fmt: skip
        assert depth == {"0", "1"}  # a gauge from Redis: once per worker (max over them, never sum)
    assert all(t == totals[0] for t in totals), totals
    # A worker that does not answer (stopped) is left out and counted; the other answers alone.
    victim, survivor = pids
    os.kill(victim, signal.SIGSTOP)
    try:
        text = ""
        for _ in range(20):  # a connection the kernel queues on the stopped worker gets no answer: another
            with suppress(TimeoutError, aiohttp.ClientError):
                async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
                    async with http.get(f"{tree.base}/metrics", timeout=aiohttp.ClientTimeout(total=3)) as r:
                        text = await r.text()
                        break
        assert text, "no worker answered /metrics"
        assert scrape_errors(text) == 1
        index = {e["pid"]: e["worker"] for e in tree.log_events() if e.get("event") == "worker_started"}
        assert set(accepted_by_worker(text)) == {str(index[survivor])}
    finally:
        os.kill(victim, signal.SIGCONT)
    # After SIGTERM the directory is gone with the workers.
    assert tree.proc is not None
    tree.proc.send_signal(signal.SIGTERM)
    assert await tree.wait_exit(STOP_S + 15) == 0, tree.log()
    assert socket_dir(sockets) is None
