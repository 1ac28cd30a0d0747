"""What scaling out and waiting for durability cost: --workers, WAITAOF/WAIT, and memory per queued event.

  A. ingress, one PUT per request (bench/ingress.py's run (a): a GIREVE-valid Location, a new id per
     request) and, unless --no-batch, POST /batch of --batch-size PUTs (its run (b)), on the relay's own
     embedded server (the shipped config: appendfsync always), for
       1. ``relay serve`` (one process),  2. ``relay serve --workers 1``,  3. ``relay serve --workers 2``
     (the workers share the ingress port with SO_REUSEPORT: the kernel spreads wrk's connections);
  B. forwarding: --fwd-events Location PUTs over --fwd-keys Locations accepted through the ingress
     (POST /batch, in rounds so each Location's PUTs stay in order) while nothing listens on the IOP port,
     then bench/receiver.py starts on that port and the backlog drains (compaction off,
     RELAY_FORWARDER_COMPACT=""); events/s = events / (last - first request at the receiver), as in
     bench/forward.py; for the same three ways of serving. The receiver starts once every process holds
     its fair share of the shard leases (a first worker takes them all, then hands some back);
  C. what a 202 waits for, on an external Valkey primary (tests/topologies.py's ValkeyProcess, appendfsync
     everysec, over TCP) with a single relay process: 1. defaults (ack_fsync auto: nothing waited),
     2. RELAY_REDIS_ACK_FSYNC=true (WAITAOF 1 0), then with one replica (replicaof, appendonly yes)
     3. RELAY_REDIS_ACK_REPLICAS=1 (WAIT 1), 4. both (WAITAOF 1 1); the A.1 row is repeated as reference;
  D. Redis used_memory per queued event: 1,000 Locations x 10 EVSEs PUT, then --mem-events EVSE status
     PATCHes (bench/compaction.py's load) while the IOP is absent, compaction off; (used_memory after -
     before) / events.

Method. Nothing is pinned by default: on a 2-core machine --workers 2, its Redis and the load generator
have to share both cores, and pinning the relay to one core would measure nothing (--load-cpu N pins wrk
in A and C and the receiver in B to CPU N; the relay and Redis always float). The CPU columns say where
the time went: relay (all its processes; per process in ``procs``), redis (the primary, and the replica
under ``repl``), load (wrk), other (the rest of the machine's busy time: kernel work such as loopback
softirq and fsync, and other jobs; '*' above 15 % of a core). ``--workers 1`` is the single process of
``relay serve`` (no supervising parent, relay/cli.py): its rows say how much two runs of the same thing differ. Each
A/C row: a fresh relay, a smoke PUT, wait (up to --quiet-wait s) for an idle machine, warm up
(--warmup), count the stream entries, CONFIG RESETSTAT, measure (--duration), count again. Check column:
entries stored during the measurement >= events acknowledged (a 202 means stored), and at most the
requests cut off in flight more. ``waits/ev``: WAIT / WAITAOF calls the server saw per acknowledged event
(INFO commandstats): the relay sends one per pipelined batch, not per event. ``202 waits for`` is
relay.store.durability's description of the policy those settings resolve to on that server.

Usage: python bench/ha.py [--duration 8] [--only ABCD] [--no-batch] [--fwd-events 30000] [--mem-events 200000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import math
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python bench/ha.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp
import msgspec
import redis
import structlog

from bench._common import (
    BATCH_PATH,
    ID_MARK,
    LOCATION_PATH,
    REPO,
    TOKEN,
    Server,
    busy_cpu_seconds,
    clean_env,
    cpu_seconds,
    free_port,
    location_template,
    python,
    reset_redis,
    settled_entries,
    start_server,
)
from bench._load import LoadResult, Wrk
from bench.compaction import location_doc, send_batches, status_batches
from bench.forward import Receiver, check_records, stream_state
from bench.forward import Workload as FwdWork
from bench.ingress import NOISE, smoke, wait_quiet
from relay.config import load as load_settings
from relay.store import durability
from relay.store import keys as K
from tests.topologies import ValkeyProcess

CONFIG = REPO / "config" / "relay.toml"
IOP_PREFIX = "/ocpi/2.2.1"
CONNECTIONS = 64
SERVES: dict[str, tuple[str, int | None]] = {  # key: (label, --workers)
    "1": ("relay serve", None),
    "2": ("relay serve --workers 1", 1),
    "3": ("relay serve --workers 2", 2),
}


# -- processes --------------------------------------------------------------------------------------


def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        out.setdefault(ppid, []).append(int(entry))
    return out


def descendants(pid: int) -> list[int]:
    """pid and every process below it."""
    kids, out, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def is_redis(pid: int) -> bool:
    name = comm(pid)
    return "valkey" in name or "redis-server" in name


def listeners(port: int) -> int:
    """Sockets listening on 127.0.0.1:port (one per worker with SO_REUSEPORT)."""
    n = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        cols = line.split()
        if cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
            n += 1
    return n


@dataclass
class Relay:
    """``python -m relay serve [--workers N]``: the process tree, its ports, its Redis."""

    server: Server
    workers: int | None
    storage: Path
    ocpi_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    def relay_pids(self) -> list[int]:
        """The relay's Python processes (the supervising parent first, then its workers), not its Redis."""
        return [p for p in descendants(self.server.pid) if not is_redis(p)]

    def worker_pids(self) -> list[int]:
        pids = self.relay_pids()
        return pids[1:] if self.workers and self.workers > 1 else pids

    def embedded_pid(self) -> int | None:
        return next((p for p in descendants(self.server.pid) if is_redis(p)), None)

    def embedded_client(self) -> redis.Redis:
        return redis.Redis(unix_socket_path=str(self.storage / "redis.sock"))

    def stop(self) -> None:
        self.server.stop(timeout_s=40)


def start_relay(workdir: Path, tag: str, workers: int | None, env_extra: Mapping[str, str]) -> Relay:
    port, ocpi = free_port(), free_port()
    storage = workdir / tag
    env = clean_env(
        RELAY_LOOP="asyncio",  # as bench/ingress.py and bench/forward.py (default): comparable with them
        RELAY_INGRESS_LISTEN=f"127.0.0.1:{port}",
        RELAY_INGRESS_TOKEN=TOKEN,
        RELAY_OCPI_LISTEN=f"127.0.0.1:{ocpi}",  # a fixed port: --workers > 1 refuses port 0
        RELAY_LOG_LEVEL="warning",
        RELAY_STORAGE_DIR=str(storage),
        RELAY_FORWARDER_ENABLED="false",
    )
    env.update(env_extra)
    argv = [python(), "-m", "relay", "serve", "--config", str(CONFIG)]
    if workers is not None:
        argv += ["--workers", str(workers)]
    srv = start_server(f"relay-{tag}", argv, env, port, workdir / f"relay-{tag}.log", None, timeout_s=60)
    relay = Relay(srv, workers, storage, ocpi)
    want = workers or 1
    deadline = time.monotonic() + 60
    while listeners(port) < want or listeners(ocpi) < want:  # every worker listening, not just the first
        if srv.proc.poll() is not None or time.monotonic() > deadline:
            relay.stop()
            raise RuntimeError(f"relay-{tag}: {listeners(port)} of {want} workers listening:\n{srv.log_tail()}")
        time.sleep(0.05)
    return relay


@contextlib.contextmanager
def running(relay: Relay) -> Iterator[Relay]:
    try:
        yield relay
    finally:
        relay.stop()


class Cpu:
    """CPU seconds of named groups of processes, and of the whole machine, over a window."""

    def __init__(self, groups: Mapping[str, list[int]]) -> None:
        self.groups = {k: list(v) for k, v in groups.items()}
        self.t0 = time.monotonic()
        self.start = {p: cpu_seconds(p) for pids in self.groups.values() for p in pids}
        self.busy0 = busy_cpu_seconds()
        self.used: dict[int, float] = {}
        self.wall = 0.0
        self.busy = 0.0

    def stop(self) -> Cpu:
        self.wall = time.monotonic() - self.t0
        self.used = {p: cpu_seconds(p) - s for p, s in self.start.items()}
        self.busy = busy_cpu_seconds() - self.busy0
        return self

    def share(self, group: str) -> float:
        """Fraction of one core."""
        return sum(self.used.get(p, 0.0) for p in self.groups.get(group, [])) / self.wall if self.wall else 0.0

    def each(self, group: str) -> list[float]:
        return [self.used.get(p, 0.0) / self.wall for p in self.groups.get(group, [])] if self.wall else []

    def other(self, extra_s: float = 0.0) -> float:
        """The machine's busy time outside the groups (and ``extra_s``, e.g. a reaped load generator)."""
        ours = sum(self.used.values()) + extra_s
        return max(0.0, self.busy - ours) / self.wall if self.wall else 0.0


# -- A and C: ingress ---------------------------------------------------------------------------------


@dataclass
class IngressRow:
    section: str
    label: str
    waits_for: str
    kind: str
    result: LoadResult
    stored: int
    bound: int
    relay_cpu: float
    procs: list[float]
    redis_cpu: float
    replica_cpu: float
    gen_cpu: float
    other_cpu: float
    waits: dict[str, int] = field(default_factory=dict)  # WAIT / WAITAOF calls during the measurement
    note: str = ""

    @property
    def rate(self) -> float:
        return self.result.events / self.result.seconds if self.result.seconds else 0.0

    @property
    def check(self) -> str:
        extra = self.stored - self.result.events
        if extra < 0:
            return f"FAIL: {-extra} acknowledged, not stored"
        if extra > self.bound:
            return f"FAIL: {extra} stored, not acknowledged"
        return "ok" if extra == 0 else f"ok (+{extra} in flight)"

    @property
    def failed(self) -> bool:
        return self.check.startswith("FAIL")


def waits_for(env: Mapping[str, str], client: redis.Redis, *, embedded: bool) -> tuple[str, tuple[Any, ...] | None]:
    """What the relay's policy resolves to for these settings on this server (relay.store.durability)."""
    settings = load_settings(CONFIG, env={"RELAY_INGRESS_TOKEN": TOKEN, **env})
    conf: dict[Any, Any] = client.config_get("append*")
    persistence = {_text(k): _text(v) for k, v in conf.items()}
    policy = durability.resolve(settings.redis, persistence, sentinel=False)
    cmd = policy.command
    where = f"{'embedded' if embedded else 'primary'} appendfsync {persistence.get('appendfsync')}"
    return f"{' '.join(str(c) for c in cmd[:-1]) if cmd else 'no wait'} ({where})", cmd


def probe_wait(client: redis.Redis, cmd: tuple[Any, ...], n: int = 5) -> str:
    """The server alone: SET + the policy's command, one at a time, ``n`` times; median latency and last reply."""
    times, reply = [], None
    for i in range(n):
        t0 = time.perf_counter()
        with client.pipeline(transaction=False) as pipe:
            pipe.set("bench:probe", i)
            pipe.execute_command(*cmd)  # type: ignore[no-untyped-call]
            reply = pipe.execute()[-1]
        times.append(1000 * (time.perf_counter() - t0))
    times.sort()
    return f"server alone, SET + {' '.join(map(str, cmd))}: p50 {times[n // 2]:.1f} ms, reply {reply}"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def wait_calls(client: redis.Redis) -> dict[str, int]:
    stats: dict[str, Any] = client.info("commandstats")
    return {
        k.removeprefix("cmdstat_"): int(v["calls"])
        for k, v in stats.items()
        if isinstance(v, dict) and k in ("cmdstat_wait", "cmdstat_waitaof")
    }


@dataclass
class Bench:
    args: argparse.Namespace
    workdir: Path
    load: Wrk
    ingress_rows: list[IngressRow] = field(default_factory=list)
    fwd_rows: list[FwdRow] = field(default_factory=list)
    mem: MemRow | None = None
    redis_version: str = "?"

    def measure(
        self,
        section: str,
        label: str,
        relay: Relay,
        client: redis.Redis,
        kind: str,
        redis_pids: tuple[int | None, int | None],
        waits: tuple[str, tuple[Any, ...] | None],
    ) -> IngressRow:
        a = self.args
        smoke(relay.url, label)
        wait_quiet(a.quiet_wait)
        self.load.run(relay.url, kind, a.warmup, "W")
        before = settled_entries(client, None, quiet_s=0.3)
        client.config_resetstat()
        primary, replica = redis_pids
        groups = {
            "relay": relay.relay_pids(),
            "workers": relay.worker_pids(),
            "redis": [primary] if primary else [],
            "replica": [replica] if replica else [],
        }
        cpu = Cpu(groups)
        result = self.load.run(relay.url, kind, a.duration, "M")
        cpu.stop()
        after = settled_entries(client, None, quiet_s=0.3)
        if relay.server.proc.poll() is not None:
            raise RuntimeError(f"{label}: the relay died during the run:\n{relay.server.log_tail()}")
        row = IngressRow(
            section=section,
            label=label + (" /batch" if kind == "batch" else ""),
            waits_for=waits[0],
            kind=kind,
            result=result,
            stored=after - before,
            bound=CONNECTIONS * (a.batch_size if kind == "batch" else 1),
            relay_cpu=cpu.share("relay"),
            procs=cpu.each("workers"),
            redis_cpu=cpu.share("redis"),
            replica_cpu=cpu.share("replica"),
            gen_cpu=result.gen_cpu_s / cpu.wall,
            other_cpu=cpu.other(result.gen_cpu_s),
            waits=wait_calls(client),
            note=probe_wait(client, waits[1]) if waits[1] else "",
        )
        print(_ingress_line(row), file=sys.stderr, flush=True)
        self.ingress_rows.append(row)
        return row

    # A ----------------------------------------------------------------------------------------------

    def section_a(self) -> None:
        kinds = ["single"] + ([] if self.args.no_batch else ["batch"])
        for key, (label, workers) in SERVES.items():
            relay = start_relay(self.workdir, f"a{key}", workers, {})
            with running(relay):
                client = relay.embedded_client()
                info = client.info("server")
                self.redis_version = f"{info.get('server_name', 'redis')} {info.get('valkey_version', '?')}"
                waits = waits_for({}, client, embedded=True)
                for kind in kinds:
                    self.measure("A", f"A.{key} {label}", relay, client, kind, (relay.embedded_pid(), None), waits)
                client.close()

    # C ----------------------------------------------------------------------------------------------

    def section_c(self) -> None:
        base = self.workdir / "c"
        primary = ValkeyProcess(base / "primary", ["repl-diskless-sync-delay 0"], appendfsync="everysec")
        replica: ValkeyProcess | None = None
        asyncio.run(primary.start())
        try:
            client = redis.Redis.from_url(primary.url)
            client.config_set("auto-aof-rewrite-percentage", 0)
            plan: list[tuple[str, str, dict[str, str], bool]] = [
                ("1", "defaults (ack auto)", {}, False),
                ("2", "ACK_FSYNC=true", {"RELAY_REDIS_ACK_FSYNC": "true"}, False),
                ("3", "ACK_REPLICAS=1", {"RELAY_REDIS_ACK_REPLICAS": "1"}, True),
                ("4", "ACK_FSYNC=true + ACK_REPLICAS=1",
                 {"RELAY_REDIS_ACK_FSYNC": "true", "RELAY_REDIS_ACK_REPLICAS": "1"}, True),
            ]  # fmt: skip
            for key, label, env, with_replica in plan:
                if with_replica and replica is None:
                    replica = ValkeyProcess(
                        base / "replica",
                        ["repl-diskless-sync-delay 0", f"replicaof 127.0.0.1 {primary.port}"],
                        appendfsync="everysec",
                    )
                    asyncio.run(replica.start())
                    wait_replica(replica)
                reset_redis(client)
                env = {"RELAY_REDIS_URL": primary.url, **env}
                waits = waits_for(env, client, embedded=False)
                relay = start_relay(self.workdir, f"c{key}", None, env)
                with running(relay):
                    pids = (
                        primary.proc.pid if primary.proc else None,
                        replica.proc.pid if replica and replica.proc else None,
                    )
                    row = self.measure("C", f"C.{key} {label}", relay, client, "single", pids, waits)
                if replica is not None:
                    row.note = f"replica {replica_state(replica)}; {row.note}"
            client.close()
        finally:
            if replica is not None:
                replica.stop()
            primary.stop()

    # B ----------------------------------------------------------------------------------------------

    def section_b(self) -> None:
        for key, (label, workers) in SERVES.items():
            self.fwd_rows.append(self.forward_one(f"B.{key} {label}", f"b{key}", workers))
            print(_fwd_line(self.fwd_rows[-1]), file=sys.stderr, flush=True)

    def forward_one(self, label: str, tag: str, workers: int | None) -> FwdRow:
        a = self.args
        keys = min(a.fwd_keys, a.fwd_events)
        work = FwdWork("K", keys, max(1, a.fwd_events // keys))
        iop_port = free_port()  # nobody listens there until the receiver starts: connection refused
        env = {
            "RELAY_FORWARDER_ENABLED": "true",
            "RELAY_IOP_URL": f"http://127.0.0.1:{iop_port}{IOP_PREFIX}",
            "RELAY_IOP_TOKEN": "bench-iop-token",
            "RELAY_FORWARDER_CONCURRENCY": str(CONNECTIONS),
            "RELAY_FORWARDER_COMPACT": "",  # every event sent: the cost per event (bench/forward.py does the same)
            "RELAY_FORWARDER_PROBE_MAX_S": "1",  # the relay finds the IOP back within a second
        }
        started = time.monotonic()
        relay = start_relay(self.workdir, tag, workers, env)
        row = FwdRow(label=label, events=work.events, keys=keys)
        receiver: Server | None = None
        with running(relay):
            client = relay.embedded_client()
            shards = int(client.hget(K.META_KEY, K.SHARDS_FIELD) or 4)
            t0 = time.monotonic()
            accepted, refused = asyncio.run(post_rounds(relay.url, work, a.fwd_batch, a.fwd_senders))
            row.accept_s = time.monotonic() - t0
            row.accepted, row.refused = accepted, refused
            held = stream_state(client, shards)
            row.backlog = held.entries
            # A worker starting first takes every shard, then hands back one per lease round (lease_ttl_s / 3)
            # as the others claim their share: drain only once the shards are spread, as they are in steady state.
            row.leases, settled = wait_leases(client, shards, workers or 1, a.lease_wait)
            row.lease_note = f"shards spread {'' if settled else 'NOT '}after {time.monotonic() - started:.1f} s"
            wait_quiet(a.quiet_wait)
            port_cpus = {a.load_cpu} if a.load_cpu is not None else None
            argv = [python(), "-m", "bench.receiver", "--port", str(iop_port)]
            receiver = start_server(
                "receiver", argv, clean_env(), iop_port, self.workdir / f"recv-{tag}.log", port_cpus
            )
            try:
                rcv = Receiver(receiver)
                while rcv.stats().count == 0:  # the relay probes the IOP at most every second
                    if relay.server.proc.poll() is not None:
                        raise RuntimeError(f"{label}: the relay died:\n{relay.server.log_tail()}")
                    time.sleep(0.01)
                groups = {
                    "relay": relay.relay_pids(),
                    "workers": relay.worker_pids(),
                    "redis": [relay.embedded_pid() or 0],
                    "receiver": [receiver.pid],
                }
                cpu = Cpu(groups)
                error = ""
                try:
                    wait_count(rcv, work.events, relay)
                except RuntimeError as exc:
                    error = str(exc)
                drained_at = wait_empty(client, shards, 0.0 if error else 30.0)
                cpu.stop()
                st = rcv.stats()
                row.seconds = st.last - st.first
                row.drain_s = drained_at - st.first if not error else 0.0
                row.check = check_records(rcv.dump(), work)
                row.check.state = stream_state(client, shards)
                row.check.error = error
                row.relay_cpu, row.procs = cpu.share("relay"), cpu.each("workers")
                row.relay_cpu_s = cpu.share("relay") * cpu.wall
                row.redis_cpu, row.recv_cpu, row.other_cpu = cpu.share("redis"), cpu.share("receiver"), cpu.other()
            finally:
                receiver.stop()
                client.close()
        return row

    # D ----------------------------------------------------------------------------------------------

    def section_d(self) -> None:
        a = self.args
        env = {
            "RELAY_FORWARDER_ENABLED": "true",
            "RELAY_IOP_URL": f"http://127.0.0.1:{free_port()}{IOP_PREFIX}",  # absent for the whole run
            "RELAY_IOP_TOKEN": "bench-iop-token",
            "RELAY_FORWARDER_COMPACT": "",
        }
        relay = start_relay(self.workdir, "d", None, env)
        with running(relay):
            client = relay.embedded_client()
            shards = int(client.hget(K.META_KEY, K.SHARDS_FIELD) or 4)
            puts = [[{"method": "PUT", "path": f"{LOCATION_PATH}L{i}", "body": location_doc(i)}
                     for i in range(j, min(j + 100, 1000))] for j in range(0, 1000, 100)]  # fmt: skip
            first = asyncio.run(send_batches(relay.url, puts, 1))
            if first.accepted != 1000:
                raise RuntimeError(f"D: {first.accepted} of 1000 Location PUTs accepted:\n{relay.server.log_tail()}")
            time.sleep(1.0)  # the forwarder has read what it may hold (max_buffered) and tried the absent IOP
            used0, entries0 = used_memory(client), stream_state(client, shards).entries
            batches = status_batches(a.mem_events, 4, 1000)
            loaded = asyncio.run(send_batches(relay.url, batches, 4))
            time.sleep(1.0)
            used1, entries1 = used_memory(client), stream_state(client, shards).entries
            info = client.info("memory")
            self.mem = MemRow(
                events=loaded.accepted,
                refused=loaded.refused,
                seconds=loaded.seconds,
                used0=used0,
                used1=used1,
                entries=entries1 - entries0,
                rss_mb=rss_kb(relay.server.pid) / 1024,
                frag=float(info.get("mem_fragmentation_ratio", 0.0)),
            )
            client.close()
        print(_mem_lines(self.mem), file=sys.stderr, flush=True)


# -- B helpers --------------------------------------------------------------------------------------


@dataclass
class FwdRow:
    label: str
    events: int
    keys: int
    accepted: int = 0
    refused: int = 0
    accept_s: float = 0.0
    backlog: int = 0
    leases: str = ""
    lease_note: str = ""
    seconds: float = 0.0  # first -> last request at the receiver
    drain_s: float = 0.0  # first request -> streams empty
    relay_cpu: float = 0.0
    relay_cpu_s: float = 0.0
    procs: list[float] = field(default_factory=list)
    redis_cpu: float = 0.0
    recv_cpu: float = 0.0
    other_cpu: float = 0.0
    check: Any = None  # bench.forward.Check

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds and not self.failed else 0.0

    @property
    def check_text(self) -> str:
        text: str = self.check.text() if self.check is not None else "FAIL: not run"
        if self.refused or self.backlog != self.events:
            text = f"FAIL: {self.refused} refused at the ingress, {self.backlog:,} stored of {self.events:,}; " + text
        return text

    @property
    def failed(self) -> bool:
        return self.check_text.startswith("FAIL")


def _round_template(r: int) -> tuple[bytes, bytes]:
    """examples/location.json with ``last_updated`` = round r, split around its id: each round's PUT of a
    Location is a new document (the relay stores nothing for a PUT of the document it already holds)."""
    data = msgspec.json.decode((REPO / "examples" / "location.json").read_bytes())
    data["id"] = ID_MARK
    data["last_updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(1_750_000_000 + r))
    head, tail = msgspec.json.encode(data).split(ID_MARK.encode())
    return head, tail


def _fwd_ops(work: FwdWork) -> Iterator[list[dict[str, Any]]]:
    """Round r: the r-th PUT of every Location, in seq order (seq = r * keys + k; X-Correlation-ID = seq)."""
    for r in range(work.per_key):
        head, tail = _round_template(r)
        ops = []
        for k in range(work.keys):
            seq = r * work.keys + k
            loc = work.loc_id(seq)
            body = msgspec.Raw(head + loc.encode() + tail)
            ops.append({"method": "PUT", "path": LOCATION_PATH + loc, "body": body, "correlation_id": str(seq)})
        yield ops


async def _post_all(
    http: aiohttp.ClientSession, base: str, ops: list[dict[str, Any]], batch: int, senders: int
) -> tuple[int, int]:
    """One round: its batches, ``senders`` in flight; (accepted, refused)."""
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    queue = [ops[i : i + batch] for i in range(0, len(ops), batch)]

    async def sender() -> tuple[int, int]:
        ok = bad = 0
        while queue:
            chunk = queue.pop(0)
            data = msgspec.json.encode({"operations": chunk})
            async with http.post(base + BATCH_PATH, data=data, headers=headers) as resp:
                answer = msgspec.json.decode(await resp.read())
            n = answer.get("data", {}).get("accepted", 0) if resp.status == 200 else 0
            ok, bad = ok + n, bad + len(chunk) - n
        return ok, bad

    results = await asyncio.gather(*(sender() for _ in range(senders)))
    return sum(r[0] for r in results), sum(r[1] for r in results)


async def post_rounds(base: str, work: FwdWork, batch: int, senders: int) -> tuple[int, int]:
    """POST /batch round by round: a round ends before the next starts, so each Location's PUTs stay in order."""
    accepted = refused = 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as http:
        for ops in _fwd_ops(work):
            ok, bad = await _post_all(http, base, ops, batch, senders)
            accepted, refused = accepted + ok, refused + bad
    return accepted, refused


def wait_leases(client: redis.Redis, shards: int, replicas: int, timeout_s: float) -> tuple[str, bool]:
    """Until each of ``replicas`` processes holds its fair share of the shard leases (or ``timeout_s``)."""
    fair = math.ceil(shards / replicas)
    deadline = time.monotonic() + timeout_s
    while True:
        owners: Counter[bytes] = Counter()
        for s in range(shards):
            owner: Any = client.get(K.lease_key(s))
            if owner:
                owners[owner] += 1
        text = "+".join(str(n) for n in sorted(owners.values(), reverse=True)) or "none"
        spread = len(owners) == min(replicas, shards) and max(owners.values(), default=0) <= fair
        if spread or time.monotonic() > deadline:
            return text, spread
        time.sleep(0.1)


def wait_count(rcv: Receiver, n: int, relay: Relay, stall_s: float = 30.0) -> None:
    last, changed = -1, time.monotonic()
    while True:
        count = rcv.stats().count
        if count >= n:
            return
        if count != last:
            last, changed = count, time.monotonic()
        elif time.monotonic() - changed > stall_s:
            raise RuntimeError(f"no delivery for {stall_s:.0f} s: {count} of {n} requests")
        if relay.server.proc.poll() is not None:
            raise RuntimeError(f"the relay exited with {relay.server.proc.returncode} after {count} of {n}")
        time.sleep(0.05)


def wait_empty(client: redis.Redis, shards: int, stall_s: float) -> float:
    """Monotonic time when no entry is left in the streams and nothing is pending (or progress stopped)."""
    last: tuple[int, int] | None = None
    changed = time.monotonic()
    while True:
        st = stream_state(client, shards)
        now = time.monotonic()
        if st.entries == 0 and st.pending == 0:
            return now
        if (st.entries, st.pending) != last:
            last, changed = (st.entries, st.pending), now
        elif now - changed >= stall_s:
            return now
        time.sleep(0.02)


# -- C helpers --------------------------------------------------------------------------------------


def wait_replica(replica: ValkeyProcess, timeout_s: float = 30.0) -> None:
    client = redis.Redis(host="127.0.0.1", port=replica.port)
    deadline = time.monotonic() + timeout_s
    try:
        while client.info("replication").get("master_link_status") != "up":
            if time.monotonic() > deadline:
                raise RuntimeError(f"replica not in sync within {timeout_s:.0f} s")
            time.sleep(0.05)
    finally:
        client.close()


def replica_state(replica: ValkeyProcess) -> str:
    client = redis.Redis(host="127.0.0.1", port=replica.port)
    try:
        info = client.info("replication")
        aof = client.config_get("appendonly").get("appendonly")
        return f"link {info.get('master_link_status')}, appendonly {aof}"
    finally:
        client.close()


# -- D helpers --------------------------------------------------------------------------------------


@dataclass
class MemRow:
    events: int
    refused: int
    seconds: float
    used0: int
    used1: int
    entries: int
    rss_mb: float
    frag: float

    @property
    def per_event(self) -> float:
        return (self.used1 - self.used0) / self.events if self.events else 0.0


def used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def rss_kb(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


# -- report -----------------------------------------------------------------------------------------


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _procs(xs: list[float]) -> str:
    return "+".join(f"{100 * x:.0f}" for x in xs) if len(xs) > 1 else "-"


def _waits(row: IngressRow) -> str:
    if not row.waits or not row.result.events:
        return "-"
    return ", ".join(f"{k.upper()} {n / row.result.events:.3f}" for k, n in row.waits.items())


_INGRESS_HEAD = (
    f"{'run':<42} {'202 waits for':<38} {'events/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'relay':>5} {'procs':>7} "
    f"{'redis':>5} {'repl':>5} {'load':>5} {'other':>6} {'waits/ev':>14} "
    f"{'acked':>9} {'stored':>9} {'non2xx':>6}  check"
)


def _ingress_line(r: IngressRow) -> str:
    res = r.result
    other = _pct(r.other_cpu) + ("*" if r.other_cpu > NOISE else " ")
    return (
        f"{r.label:<42} {r.waits_for:<38} {r.rate:>8,.0f} {res.p50_ms:>7.1f} {res.p99_ms:>7.1f} "
        f"{_pct(r.relay_cpu):>5} {_procs(r.procs):>7} {_pct(r.redis_cpu):>5} "
        f"{_pct(r.replica_cpu) if r.replica_cpu else '-':>5} {_pct(r.gen_cpu):>5} {other:>6} {_waits(r):>14} "
        f"{res.events:>9,} {r.stored:>9,} {res.other + res.errors:>6,}  {r.check}"
        + (f"\n{'':<4}{r.note}" if r.note else "")
    )


_FWD_HEAD = (
    f"{'run':<30} {'events':>7} {'keys':>6} {'accept/s':>8} {'shards':>6} {'events/s':>8} {'time s':>6} "
    f"{'drain s':>7} {'relay':>5} {'procs':>7} {'redis':>5} {'recv':>5} {'other':>6} {'us/ev':>5}  check"
)


def _fwd_line(r: FwdRow) -> str:
    accept = r.accepted / r.accept_s if r.accept_s else 0.0
    us = 1e6 * r.relay_cpu_s / r.events if r.events else 0.0
    other = _pct(r.other_cpu) + ("*" if r.other_cpu > NOISE else " ")
    rate = "FAILED" if r.failed else f"{r.rate:,.0f}"
    return (
        f"{r.label:<30} {r.events:>7,} {r.keys:>6,} {accept:>8,.0f} {r.leases:>6} {rate:>8} {r.seconds:>6.2f} "
        f"{r.drain_s:>7.2f} {_pct(r.relay_cpu):>5} {_procs(r.procs):>7} {_pct(r.redis_cpu):>5} {_pct(r.recv_cpu):>5} "
        f"{other:>6} {us:>5.0f}  {r.check_text}"
    )


def _mem_lines(m: MemRow) -> str:
    mib = 1024 * 1024
    check = "ok" if m.refused == 0 and m.entries == m.events else f"FAIL: {m.refused} refused, {m.entries} entries"
    return "\n".join(
        [
            f"  EVSE status PATCHes queued (IOP absent, compaction off): {m.events:,} accepted in {m.seconds:.1f} s "
            f"({m.events / m.seconds if m.seconds else 0:,.0f}/s), stream entries added {m.entries:,}: {check}",
            f"  Redis used_memory {m.used0 / mib:,.1f} -> {m.used1 / mib:,.1f} MiB: "
            f"{m.per_event:,.0f} bytes per queued event "
            f"({1024 * mib / m.per_event if m.per_event else 0:,.0f} events per GiB); "
            f"fragmentation ratio {m.frag:.2f}; relay RSS {m.rss_mb:.0f} MB",
        ]
    )


def report(b: Bench, total_s: float) -> str:
    a = b.args
    head, tail = location_template()
    pin = f"wrk and the receiver pinned to CPU {a.load_cpu}" if a.load_cpu is not None else "nothing pinned"
    out = [
        "relay HA benchmark (bench/ha.py)",
        f"  machine: {os.cpu_count()} CPUs, {platform.machine()}, Linux {platform.release()}; Python "
        f"{platform.python_version()}; {b.redis_version}; {b.load.name}, {CONNECTIONS} connections; {pin} "
        "(relay processes and Redis float over every CPU); asyncio loop",
        f"  PUT body {len(head) + len(tail) + 6} B (examples/location.json); batch {a.batch_size} PUTs/request; "
        f"warm-up {a.warmup} s, measured {a.duration} s per row; total {total_s:.0f} s",
        "  relay/redis/repl/load/recv/other: CPU as a share of one core (200% = the whole machine); procs: per worker;"
        " other: the rest of the machine (kernel, other jobs; '*' > 15 % of a core: disturbed)",
    ]
    a_rows = [r for r in b.ingress_rows if r.section == "A"]
    c_rows = [r for r in b.ingress_rows if r.section == "C"]
    if a_rows:
        out += ["", "A. ingress on the embedded server (shipped config)", _INGRESS_HEAD, "-" * len(_INGRESS_HEAD)]
        out += [_ingress_line(r) for r in a_rows]
        single = {r.label: r for r in a_rows if r.kind == "single"}
        one, two = single.get("A.1 relay serve"), single.get("A.3 relay serve --workers 2")
        if one and two and one.rate:
            out.append(f"  --workers 2 / one process (single PUT): {two.rate / one.rate:.2f}x")
    if b.fwd_rows:
        out += ["", "B. forwarding a backlog (accepted while the IOP was absent, compaction off)", _FWD_HEAD,
                "-" * len(_FWD_HEAD)]  # fmt: skip
        out += [_fwd_line(r) for r in b.fwd_rows]
        out += [f"  {r.label.split()[0]}: {r.lease_note}" for r in b.fwd_rows if r.lease_note]
        out.append("  events/s = events / (last - first request at the receiver); drain = first request -> streams"
                   " empty; shards = shard leases per process; us/ev = relay CPU per event")  # fmt: skip
    if c_rows:
        out += ["", "C. what a 202 waits for: external Valkey primary (TCP, appendfsync everysec), one relay process",
                _INGRESS_HEAD, "-" * len(_INGRESS_HEAD)]  # fmt: skip
        out += [_ingress_line(r) for r in c_rows]
        ref = next((r for r in a_rows if r.label == "A.1 relay serve"), None)
        if ref is not None:
            out.append(_ingress_line(dataclasses.replace(ref, label="ref: A.1 embedded, unix socket")))
        base = c_rows[0].rate if c_rows and c_rows[0].rate else 0.0
        if base:
            out.append(
                "  throughput vs C.1: " + ", ".join(f"{r.label.split()[0]} {r.rate / base:.2f}x" for r in c_rows)
            )
    if b.mem is not None:
        out += ["", "D. Redis memory per queued event (one relay process, embedded server)", _mem_lines(b.mem)]
    return "\n".join(out)


# -- main -------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=int, default=8, help="measured seconds per A/C row (default 8)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up seconds per A/C row (default 2)")
    p.add_argument("--only", default="ABCD", help="sections to run (default ABCD)")
    p.add_argument("--no-batch", action="store_true", help="A: skip the POST /batch rows")
    p.add_argument("--batch-size", type=int, default=200, help="A: PUTs per batch request (default 200)")
    p.add_argument("--fwd-events", type=int, default=30_000, help="B: backlogged events (default 30000)")
    p.add_argument("--fwd-keys", type=int, default=10_000, help="B: distinct Locations (default 10000)")
    p.add_argument("--fwd-batch", type=int, default=1000, help="B: operations per batch while accepting")
    p.add_argument("--fwd-senders", type=int, default=4, help="B: batches in flight while accepting")
    p.add_argument("--lease-wait", type=float, default=45.0, help="B: longest wait for the shards to spread")
    p.add_argument("--mem-events", type=int, default=200_000, help="D: EVSE status PATCHes queued (default 200000)")
    p.add_argument("--load-cpu", type=int, help="pin wrk (A, C) and the receiver (B) to this CPU (default: float)")
    p.add_argument("--quiet-wait", type=float, default=5.0, help="seconds to wait for an idle machine before a row")
    args = p.parse_args(argv)
    args.only = args.only.upper()
    if not set(args.only) & set("ABCD"):
        p.error("--only: give some of A, B, C, D")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    if not Wrk.available() and set(args.only) & set("AC"):
        print("wrk is needed for A and C (apt-get install wrk)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="relay-ha-", dir="/tmp") as tmp:  # short path: unix sockets
        workdir = Path(tmp)
        load = Wrk(workdir, CONNECTIONS, args.batch_size, {args.load_cpu} if args.load_cpu is not None else None)
        load.name = f"{Wrk.version()} (1 thread)"
        bench = Bench(args, workdir, load)
        t0 = time.monotonic()
        sections: dict[str, Callable[[], None]] = {
            "A": bench.section_a,
            "B": bench.section_b,
            "C": bench.section_c,
            "D": bench.section_d,
        }
        for name, run in sections.items():
            if name in args.only:
                print(f"-- section {name}", file=sys.stderr, flush=True)
                run()
        print()
        print(report(bench, time.monotonic() - t0))
    failed = any(r.failed for r in bench.ingress_rows) or any(r.failed for r in bench.fwd_rows)
    if bench.mem is not None and (bench.mem.refused or bench.mem.entries != bench.mem.events):
        failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
