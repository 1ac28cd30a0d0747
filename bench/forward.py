"""Forwarder throughput and memory: the relay delivering a prefilled backlog beside a bare aiohttp client.

Runs, against one receiver (bench/receiver.py: 200 + OCPI 1000, records (path, X-Correlation-ID)):

  (a) relay, backlog of --events Location PUTs over 10 000 distinct ordering keys (5 per key for 50 k);
  (b) relay, the same number of events over 100 hot keys (500 per key for 50 k);
  (c) a bare aiohttp client: the same PUTs (same URLs, bodies and OCPI headers), 64 in flight, one
      ClientSession, no Redis, no ordering;
  (d) ratios (a)/(c) and (b)/(c); target (a)/(c) >= 75 %;
  (e) the relay's RSS with a 1 M event backlog while the IOP is down (nothing listens on its port):
      the forwarder must hold at most forwarder.max_buffered entries; target RSS < 150 MB.

Method: the backlog is written before the relay starts (round-robin over the keys, so consecutive
events belong to different keys); (a)/(b) prefill through relay.validation.validate (once per key)
and Store.append_many, (e) through raw pipelined XADDs of the same envelopes. The relay runs as
``python -m relay serve`` (forwarder concurrency 64, log level warning) on the bench's embedded
Redis (relay.embedded_redis.EmbeddedRedis, unix socket, AOF everysec). Events/s = events / (last -
first request at the receiver). The check column needs: every event delivered, no duplicate, in
order per key, and (relay) the streams empty with nothing pending and no dead letter (acks
included). The receiver is pinned to --receiver-cpu, the relay and the bare client to --relay-cpu,
and Redis (all its threads) to the receiver's CPU (--redis-cpu): the relay's core is the relay's
alone, as the bare client's is. A floating Redis (--redis-cpu float) lands on the relay's core part of
the time and takes its share there. The relay and the bare client run on the same event loop,
--loop asyncio (default) or uvloop (the speed extra; ``relay serve`` takes it whenever it is installed).

Usage: python bench/forward.py [--events 50000] [--quick] [--repeat 1] [--loop asyncio|uvloop] [--profile DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python bench/forward.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp
import hiredis
import msgspec
import redis

from bench._common import (
    REPO,
    TOKEN,
    Server,
    clean_env,
    cpu_seconds,
    free_port,
    location_template,
    pin_process,
    pinned,
    python,
    reset_redis,
    start_server,
)
from bench._profile import py_spy
from relay import constants as H
from relay.cli import choose_loop
from relay.config import MODULES, Settings, load
from relay.embedded_redis import EmbeddedRedis
from relay.events import Event, encode, new_event_id
from relay.ocpi_client import authorization
from relay.ordering import shard_of
from relay.store import Store, connect
from relay.store import keys as K
from relay.validation import Target, validate

CONFIG = REPO / "config" / "relay.toml"
IOP_TOKEN = "bench-iop-token"
IOP_PREFIX = "/ocpi/2.2.1"
CONCURRENCY = 64
TARGET_RATIO = 0.75
TARGET_RSS_MB = 150.0
KEYS_MANY = 10_000
KEYS_HOT = 100
_CLK_TCK = os.sysconf("SC_CLK_TCK")
SHARES = ("sender", "redis", "receiver", "others")


# -- the events -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """``keys`` Locations ``{tag}{k}``, ``per_key`` PUTs each, in round-robin order; seq = position."""

    tag: str
    keys: int
    per_key: int

    @property
    def events(self) -> int:
        return self.keys * self.per_key

    def loc_id(self, seq: int) -> str:
        return f"{self.tag}{seq % self.keys}"

    def envelopes(self, settings: Settings) -> Iterator[Event]:
        """The events as the ingress would store them: validated once per key, then one envelope per PUT."""
        head, tail = location_template()
        templates = []
        for k in range(self.keys):
            loc = f"{self.tag}{k}"
            target = Target(module="locations", country_code="FR", party_id="AB1", object_id=loc)
            templates.append(validate(target, "PUT", head + loc.encode() + tail, settings).event)
        seq = 0
        for _ in range(self.per_key):
            for tpl in templates:
                now = time.time()
                yield msgspec.structs.replace(tpl, id=new_event_id(), correlation_id=str(seq), received_at=now)
                seq += 1


def relay_settings() -> Settings:
    return load(CONFIG, env={"RELAY_INGRESS_TOKEN": TOKEN})


async def _prefill_store(url: str, settings: Settings, work: Workload, chunk: int = 5000) -> None:
    store = Store(connect(url, settings.redis), settings.redis)
    try:
        await store.load_scripts()
        await store.ensure_groups()
        batch: list[Event] = []
        for ev in work.envelopes(settings):
            batch.append(ev)
            if len(batch) == chunk:
                await _append(store, batch)
                batch = []
        if batch:
            await _append(store, batch)
    finally:
        await store.close()


async def _append(store: Store, batch: list[Event]) -> None:
    failed = [r for r in await store.append_many(batch) if not isinstance(r, str)]
    if failed:
        raise RuntimeError(f"prefill: {len(failed)} appends failed: {failed[0]}")


def prefill_store(url: str, settings: Settings, work: Workload) -> None:
    """Through the relay's own write path: validate + Store.append_many (pipelined)."""
    asyncio.run(_prefill_store(url, settings, work))


def prefill_raw(sock_path: str, settings: Settings, work: Workload, chunk: int = 4000) -> None:
    """The same envelopes as raw pipelined XADDs on the unix socket (hiredis packs and parses): fast for 1 M."""
    asyncio.run(_ensure_groups(f"unix://{sock_path}", settings))
    shards = settings.redis.shards
    # XADD {stream} * e {payload}, in RESP: the prefix depends on the shard only.
    heads = [_resp_head(K.stream_key("locations", s).encode(), K.ENTRY_FIELD.encode()) for s in range(shards)]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(sock_path)
        reader = hiredis.Reader()
        parts: list[bytes] = []
        for ev in work.envelopes(settings):
            payload = encode(ev)
            parts.append(b"%s$%d\r\n%s\r\n" % (heads[shard_of(ev.key, shards)], len(payload), payload))
            if len(parts) == chunk:
                _send(s, reader, parts)
                parts = []
        if parts:
            _send(s, reader, parts)


def _resp_head(stream: bytes, field_name: bytes) -> bytes:
    return b"*5\r\n$4\r\nXADD\r\n$%d\r\n%s\r\n$1\r\n*\r\n$%d\r\n%s\r\n" % (
        len(stream),
        stream,
        len(field_name),
        field_name,
    )


def _send(s: socket.socket, reader: hiredis.Reader, parts: list[bytes]) -> None:
    s.sendall(b"".join(parts))
    got = 0
    while got < len(parts):
        data = s.recv(1 << 16)
        if not data:
            raise RuntimeError("prefill: Redis closed the connection")
        reader.feed(data)
        while (reply := reader.gets()) is not False:
            if isinstance(reply, Exception):
                raise RuntimeError(f"prefill: XADD failed: {reply}")
            got += 1


async def _ensure_groups(url: str, settings: Settings) -> None:
    store = Store(connect(url, settings.redis), settings.redis)
    try:
        await store.ensure_groups()
    finally:
        await store.close()


# -- Redis state ------------------------------------------------------------------------------------


@dataclass
class StreamState:
    entries: int  # left in the module streams
    pending: int  # read by a consumer, not acknowledged
    dead: int  # dead letters


def stream_state(client: redis.Redis, shards: int) -> StreamState:
    with client.pipeline(transaction=False) as pipe:
        for module in MODULES:
            for s in range(shards):
                pipe.xlen(K.stream_key(module, s))
                pipe.xpending(K.stream_key(module, s), K.GROUP)
                pipe.xlen(K.dlq_key(module, s))
        res: list[Any] = pipe.execute()
    entries = sum(int(r) for r in res[0::3])
    pending = sum(int(r["pending"]) for r in res[1::3])
    dead = sum(int(r) for r in res[2::3])
    return StreamState(entries, pending, dead)


def redis_calls(client: redis.Redis) -> dict[str, int]:
    """Calls per command since CONFIG RESETSTAT (the bench's own polling included: a few per second)."""
    stats: dict[str, Any] = client.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items() if isinstance(v, dict)}


# -- the receiver -----------------------------------------------------------------------------------


class ReceiverStats(msgspec.Struct):
    count: int
    first: float
    last: float


@dataclass
class Receiver:
    server: Server

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    @property
    def iop_url(self) -> str:
        return self.base + IOP_PREFIX

    def _call(self, path: str, method: str = "GET") -> bytes:
        req = urllib.request.Request(self.base + path, method=method, data=b"" if method == "POST" else None)
        with urllib.request.urlopen(req, timeout=30) as resp:
            body: bytes = resp.read()
            return body

    def reset(self) -> None:
        self._call("/_bench/reset", "POST")

    def stats(self) -> ReceiverStats:
        return msgspec.json.decode(self._call("/_bench/stats"), type=ReceiverStats)

    def dump(self) -> list[tuple[str, str]]:
        return msgspec.json.decode(self._call("/_bench/dump"), type=list[tuple[str, str]])


@dataclass
class Check:
    requests: int = 0
    delivered: int = 0  # distinct events seen
    duplicates: int = 0
    out_of_order: int = 0  # an event of a key arriving after a later one of the same key (or at the wrong URL)
    missing: int = 0
    errors: int = 0  # non-200 answers seen by the bare client
    error: str = ""  # the run did not complete
    state: StreamState | None = None  # relay runs only

    def problems(self) -> list[str]:
        out = [self.error] if self.error else []
        if self.missing:
            out.append(f"{self.missing} missing")
        if self.duplicates:
            out.append(f"{self.duplicates} duplicates")
        if self.out_of_order:
            out.append(f"{self.out_of_order} out of order")
        if self.errors:
            out.append(f"{self.errors} non-200 answers")
        if self.state is not None and not self.error:
            if self.state.entries:
                out.append(f"{self.state.entries} left in streams")
            if self.state.pending:
                out.append(f"{self.state.pending} pending")
            if self.state.dead:
                out.append(f"{self.state.dead} dead letters")
        return out

    def text(self) -> str:
        problems = self.problems()
        if problems:
            return "FAIL: " + ", ".join(problems)
        return "ok: all delivered, in order" + (", streams empty" if self.state is not None else "")


def check_records(records: list[tuple[str, str]], work: Workload) -> Check:
    chk = Check(requests=len(records))
    seen: set[int] = set()
    newest: dict[str, int] = {}
    suffix = f"{IOP_PREFIX}/locations/FR/AB1/"
    for path, corr in records:
        seq = int(corr) if corr.isdigit() else -1
        if seq in seen:
            chk.duplicates += 1
            continue
        seen.add(seq)
        if not 0 <= seq < work.events or not path.endswith(suffix + work.loc_id(seq)):
            chk.out_of_order += 1
            continue
        if seq < newest.get(path, -1):
            chk.out_of_order += 1
        newest[path] = max(seq, newest.get(path, -1))
    chk.delivered = len(seen)
    chk.missing = work.events - sum(1 for s in seen if 0 <= s < work.events)
    return chk


# -- processes --------------------------------------------------------------------------------------


def rss_kb(pid: int, field_name: str = "VmRSS") -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class RssSampler:
    """VmRSS of a process every ``interval_s`` in a thread; ``peak_kb`` is the highest sample."""

    def __init__(self, pid: int, interval_s: float = 0.05) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, rss_kb(self.pid))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kb = max(self.peak_kb, rss_kb(self.pid))


def relay_env(redis_url: str, iop_url: str, port: int, data_dir: Path) -> dict[str, str]:
    return clean_env(
        RELAY_REDIS_URL=redis_url,
        RELAY_IOP_URL=iop_url,
        RELAY_IOP_TOKEN=IOP_TOKEN,
        RELAY_INGRESS_TOKEN=TOKEN,
        RELAY_INGRESS_LISTEN=f"127.0.0.1:{port}",
        RELAY_OCPI_LISTEN="127.0.0.1:0",
        RELAY_LOG_LEVEL="warning",
        RELAY_FORWARDER_CONCURRENCY=str(CONCURRENCY),
        # The per-event cost is what this measures: with compaction (on by default) a backlog of
        # the hot keys of run (b) would be folded into fewer requests (see bench/compaction.py).
        RELAY_FORWARDER_COMPACT="",
        RELAY_STORAGE_DIR=str(data_dir),
    )


def start_relay(ctx: Ctx, iop_url: str, tag: str) -> Server:
    port = free_port()
    env = relay_env(ctx.server.url, iop_url, port, ctx.workdir / "relay-data")
    env["RELAY_LOOP"] = ctx.args.loop  # relay serve would take uvloop whenever it is installed
    env.update(kv.split("=", 1) for kv in ctx.args.relay_env)
    argv = [python(), "-m", "relay", "serve", "--config", str(CONFIG)]
    if ctx.args.relay_src:  # a private copy of the relay package (experiments): it must win over the repo's
        src = Path(ctx.args.relay_src).resolve()
        config = src / "config" / "relay.toml"  # the copy's own config, if any: code and file must agree
        boot = "import sys; sys.path.insert(0, sys.argv.pop(1)); from relay.cli import main; main(prog_name='relay')"
        argv = [python(), "-c", boot, str(src), "serve", "--config", str(config if config.exists() else CONFIG)]
    return start_server(f"relay-{tag}", argv, env, port, ctx.workdir / f"relay-{tag}.log", {ctx.args.relay_cpu})


def stop_process(srv: Server, timeout_s: float, keep_log: str | None = None) -> float:
    """SIGTERM, wait up to timeout_s, then SIGKILL; returns how long the graceful stop took."""
    t0 = time.monotonic()
    try:
        return _stop(srv, timeout_s, t0)
    finally:
        if keep_log:
            Path(keep_log).mkdir(parents=True, exist_ok=True)
            shutil.copy(srv.log_path, Path(keep_log) / srv.log_path.name)


def _stop(srv: Server, timeout_s: float, t0: float) -> float:
    if srv.proc.poll() is None:
        srv.proc.send_signal(signal.SIGTERM)
        try:
            srv.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            srv.proc.kill()
            srv.proc.wait()
    return time.monotonic() - t0


def busy_seconds() -> float:
    """CPU time spent by the whole machine (all CPUs, everything but idle and iowait) so far."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / _CLK_TCK


class CpuWindow:
    """CPU seconds of the sender, Redis, the receiver and everything else on the machine over one run."""

    def __init__(self, ctx: Ctx, sender: int | None) -> None:
        self.pids = {"sender": sender, "redis": ctx.redis_pid, "receiver": ctx.receiver.server.pid}
        self.t0 = time.monotonic()
        self.start = {k: cpu_seconds(p) if p else 0.0 for k, p in self.pids.items()}
        self.busy0 = busy_seconds()
        self.self0 = _own_cpu()
        self.used: dict[str, float] = {}
        self.wall = 0.0

    def stop(self, sender_cpu_s: float | None = None) -> None:
        """``sender_cpu_s``: the sender's CPU when it is a child that already exited (reaped)."""
        self.wall = time.monotonic() - self.t0
        self.used = {k: (cpu_seconds(p) if p else 0.0) - self.start[k] for k, p in self.pids.items()}
        if sender_cpu_s is not None:
            self.used["sender"] = sender_cpu_s
        ours = sum(self.used.values()) + _own_cpu() - self.self0
        self.used["others"] = max(0.0, busy_seconds() - self.busy0 - ours)

    def share(self, name: str) -> float:
        """Fraction of one core."""
        return self.used.get(name, 0.0) / self.wall if self.wall else 0.0


def wait_quiet(max_wait_s: float, threshold: float = 0.15) -> float:
    """Wait (up to max_wait_s) until the machine's other processes use less than ``threshold`` of a
    core over one second; returns the last measured share (the bench's own servers are idle then)."""
    deadline = time.monotonic() + max_wait_s
    while True:
        b0 = busy_seconds()
        time.sleep(1.0)
        share = busy_seconds() - b0
        if share < threshold or time.monotonic() >= deadline:
            return share
        time.sleep(1.0)


def _own_cpu() -> float:
    """This process (every thread) and its reaped children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class Profiler:
    """py-spy record of one process (raw collapsed stacks), stopped with SIGINT when the run ends."""

    def __init__(self, pid: int, out: Path, rate: int) -> None:
        exe = py_spy()
        if exe is None:
            raise RuntimeError("py-spy is not installed (pip install py-spy)")
        argv = [exe, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw", "--output", str(out)]
        self.out = out
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# -- runs -------------------------------------------------------------------------------------------


@dataclass
class Ctx:
    args: argparse.Namespace
    workdir: Path
    server: EmbeddedRedis
    client: redis.Redis
    receiver: Receiver
    settings: Settings
    redis_pid: int
    profiles: list[Path] = field(default_factory=list)


@dataclass
class Run:
    key: str
    label: str
    work: Workload
    seconds: float = 0.0  # first -> last request at the receiver
    drain_s: float = 0.0  # first request -> streams empty (relay only)
    cpu_s: float = 0.0  # CPU of the relay / bare client while it worked
    cpu: CpuWindow | None = None
    rss_peak_mb: float = 0.0
    rss_end_mb: float = 0.0
    redis_calls: dict[str, int] = field(default_factory=dict)  # commands the relay sent, by name
    check: Check = field(default_factory=Check)

    @property
    def rate(self) -> float:
        if self.check.error:
            return 0.0
        return self.work.events / self.seconds if self.seconds else 0.0

    @property
    def failed(self) -> bool:
        return bool(self.check.problems())


def wait_delivered(ctx: Ctx, n: int, proc: subprocess.Popen[bytes], stall_s: float = 30.0) -> ReceiverStats:
    """Poll the receiver until it has seen ``n`` requests; fail if nothing arrives for ``stall_s``."""
    last_count, last_change = -1, time.monotonic()
    while True:
        st = ctx.receiver.stats()
        if st.count >= n:
            return st
        now = time.monotonic()
        if st.count != last_count:
            last_count, last_change = st.count, now
        elif now - last_change > stall_s:
            raise RuntimeError(f"no delivery for {stall_s:.0f}s: {st.count} of {n} requests")
        if proc.poll() is not None:
            raise RuntimeError(f"the sender exited with {proc.returncode} after {st.count} of {n} requests")
        time.sleep(0.1)


def wait_drained(ctx: Ctx, stall_s: float = 30.0) -> tuple[float, StreamState]:
    """Until no entry is left in the streams (acks done), or no progress for ``stall_s``: (monotonic time, state)."""
    last, last_change = None, time.monotonic()
    while True:
        state = stream_state(ctx.client, ctx.settings.redis.shards)
        now = time.monotonic()
        if state.entries == 0 and state.pending == 0:
            return now, state
        if (state.entries, state.pending) != last:
            last, last_change = (state.entries, state.pending), now
        elif now - last_change >= stall_s:
            return now, state
        time.sleep(0.02)


def run_relay(ctx: Ctx, key: str, label: str, work: Workload) -> Run:
    run = Run(key, label, work)
    reset_redis(ctx.client)
    prefill_store(ctx.server.url, ctx.settings, work)
    assert stream_state(ctx.client, ctx.settings.redis.shards).entries == work.events
    ctx.receiver.reset()
    wait_quiet(ctx.args.wait_quiet)
    ctx.client.config_resetstat()
    srv = start_relay(ctx, ctx.receiver.iop_url, key)
    try:
        profiler = None
        if ctx.args.profile:
            out = Path(ctx.args.profile) / f"relay-{key}-{work.keys}keys.txt"
            out.parent.mkdir(parents=True, exist_ok=True)
            profiler = Profiler(srv.pid, out, ctx.args.profile_rate)
            ctx.profiles.append(out)
        cpu = CpuWindow(ctx, srv.pid)
        with RssSampler(srv.pid) as rss:
            try:
                wait_delivered(ctx, work.events, srv.proc)
            except RuntimeError as exc:  # stalled or died: report it in the table, go on with the other runs
                run.check.error = f"{exc}; relay log: {_log_gist(srv.log_tail(20_000))}"
            drained_at, _ = wait_drained(ctx, stall_s=0.0 if run.check.error else 30.0)
            cpu.stop()
            run.redis_calls = redis_calls(ctx.client)
            run.rss_end_mb = rss_kb(srv.pid) / 1024
        if profiler is not None:
            profiler.stop()
        run.rss_peak_mb = max(rss.peak_kb, rss_kb(srv.pid, "VmHWM")) / 1024
        if srv.proc.poll() is not None:
            raise RuntimeError(f"relay died during the run:\n{srv.log_tail()}")
    finally:
        stop_process(srv, 15, ctx.args.logs)
    st = ctx.receiver.stats()
    run.seconds = st.last - st.first
    run.drain_s = 0.0 if run.check.error else drained_at - st.first
    run.cpu, run.cpu_s = cpu, cpu.used["sender"]
    error = run.check.error
    run.check = check_records(ctx.receiver.dump(), work)
    run.check.state = stream_state(ctx.client, ctx.settings.redis.shards)
    run.check.error = error
    return run


def _log_gist(text: str) -> str:
    """The most frequent error/warning event of a relay log (JSON lines), with its count."""
    seen: Counter[str] = Counter()
    for line in text.splitlines():
        try:
            rec = msgspec.json.decode(line)
        except msgspec.DecodeError:
            continue
        if isinstance(rec, dict) and rec.get("level") in ("error", "warning"):
            exc = str(rec.get("exception", "")).strip().splitlines()
            seen[f"{rec.get('event')}" + (f" ({exc[-1][:120]})" if exc else "")] += 1
    if not seen:
        return text.strip().splitlines()[-1][:200] if text.strip() else "(empty)"
    event, n = seen.most_common(1)[0]
    return f"{n} x {event}"


def run_bare(ctx: Ctx, work: Workload) -> Run:
    run = Run("c", f"(c) bare aiohttp client, {CONCURRENCY} in flight", work)
    ctx.receiver.reset()
    wait_quiet(ctx.args.wait_quiet)
    argv = [python(), str(Path(__file__).resolve()), "--role", "bare", "--iop-url", ctx.receiver.iop_url]
    argv += ["--bare-keys", str(work.keys), "--bare-per-key", str(work.per_key), "--bare-tag", work.tag]
    if ctx.args.bare_uvloop:
        argv += ["--bare-uvloop", str(Path(ctx.args.bare_uvloop).resolve())]
        run.label = f"(c) bare client, uvloop, {CONCURRENCY} in flight"
    elif ctx.args.loop == "uvloop":
        argv += ["--loop", "uvloop"]
        run.label = f"(c) bare client, uvloop, {CONCURRENCY} in flight"
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(
            argv,
            env=clean_env(),
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=pinned({ctx.args.relay_cpu}),
        )
        cpu = CpuWindow(ctx, None)
        profiler = None
        if ctx.args.profile:
            prof_out = Path(ctx.args.profile) / f"bare-{work.keys}keys.txt"
            prof_out.parent.mkdir(parents=True, exist_ok=True)
            profiler = Profiler(proc.pid, prof_out, ctx.args.profile_rate)
            ctx.profiles.append(prof_out)
        try:
            wait_delivered(ctx, work.events, proc)
            code = proc.wait(60)
            if profiler is not None:
                profiler.proc.wait(30)  # py-spy ends with its target
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        out.seek(0)
        text = out.read().decode(errors="replace")
    if code != 0 or "BARE_RESULT" not in text:
        raise RuntimeError(f"bare client failed ({code}):\n{text[-2000:]}")
    result = msgspec.json.decode(text.split("BARE_RESULT", 1)[1].strip().splitlines()[0], type=BareResult)
    st = ctx.receiver.stats()
    run.seconds = st.last - st.first
    cpu.stop(sender_cpu_s=result.total_cpu_s)
    run.cpu, run.cpu_s = cpu, result.cpu_s
    run.rss_peak_mb = run.rss_end_mb = result.rss_peak_kb / 1024
    run.check = check_records(ctx.receiver.dump(), work)
    run.check.errors = result.errors
    return run


@dataclass
class Backlog:
    events: int
    prefill_s: float
    idle_s: float
    rss_peak_mb: float
    rss_end_mb: float
    held: int  # entries read by the relay and not acknowledged (what it holds in memory)
    left: int  # entries still in the streams
    max_buffered: int
    stop_s: float

    @property
    def failed(self) -> bool:
        return self.rss_peak_mb >= TARGET_RSS_MB or self.held > self.max_buffered or self.left != self.events


def run_backlog(ctx: Ctx) -> Backlog:
    """(e): a backlog of --backlog events, the IOP down (nothing listens), RSS over --idle seconds."""
    work = Workload("Z", KEYS_MANY, max(1, ctx.args.backlog // KEYS_MANY))
    reset_redis(ctx.client)
    t0 = time.monotonic()
    prefill_raw(str(ctx.server.socket), ctx.settings, work)
    prefill_s = time.monotonic() - t0
    assert stream_state(ctx.client, ctx.settings.redis.shards).entries == work.events
    dead_url = f"http://127.0.0.1:{free_port()}{IOP_PREFIX}"  # connection refused
    srv = start_relay(ctx, dead_url, "e")
    try:
        with RssSampler(srv.pid) as rss:
            time.sleep(ctx.args.idle)
            state = stream_state(ctx.client, ctx.settings.redis.shards)
            end_kb = rss_kb(srv.pid)
        peak_kb = max(rss.peak_kb, rss_kb(srv.pid, "VmHWM"))
        if srv.proc.poll() is not None:
            raise RuntimeError(f"relay died during the backlog run:\n{srv.log_tail()}")
    finally:
        stop_s = stop_process(srv, 20, ctx.args.logs)
    return Backlog(
        events=work.events,
        prefill_s=prefill_s,
        idle_s=ctx.args.idle,
        rss_peak_mb=peak_kb / 1024,
        rss_end_mb=end_kb / 1024,
        held=state.pending,
        left=state.entries,
        max_buffered=ctx.settings.forwarder.max_buffered,
        stop_s=stop_s,
    )


# -- the bare client (runs in its own process) ------------------------------------------------------


class BareResult(msgspec.Struct):
    requests: int
    errors: int
    cpu_s: float  # while sending
    total_cpu_s: float  # the whole process
    rss_peak_kb: int


async def bare_client(iop_url: str, work: Workload, progress: Callable[[int], None] | None = None) -> BareResult:
    """The same PUTs as the relay sends (URL, body, OCPI headers, fresh X-Request-ID), 64 in flight.

    ``progress``: called with the number of answers so far after each one (bench/instructions.py)."""
    head, tail = location_template()
    bodies = [head + f"{work.tag}{k}".encode() + tail for k in range(work.keys)]
    urls = [f"{iop_url}/locations/FR/AB1/{work.tag}{k}" for k in range(work.keys)]
    requests = [(urls[seq % work.keys], bodies[seq % work.keys], str(seq)) for seq in range(work.events)]
    auth = authorization(IOP_TOKEN)
    pending = iter(requests)
    errors = answered = 0
    timeout = aiohttp.ClientTimeout(total=35, sock_connect=5, sock_read=30)  # the relay's defaults
    connector = aiohttp.TCPConnector(limit=CONCURRENCY * 2)

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal errors, answered
        for url, body, corr in pending:
            headers = {
                "Authorization": auth,
                H.H_REQUEST: uuid.uuid4().hex,
                H.H_CORRELATION: corr,
                H.H_FROM_CC: "FR",
                H.H_FROM_PID: "AB1",
                H.H_TO_CC: "FR",
                H.H_TO_PID: "107",
                "Content-Type": "application/json",
            }
            async with session.request("PUT", url, data=body, headers=headers, allow_redirects=False) as resp:
                await resp.read()
                errors += resp.status != 200
            if progress is not None:
                answered += 1
                progress(answered)

    cpu0 = time.process_time()
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(CONCURRENCY)))
    cpu = time.process_time() - cpu0
    total = time.process_time()
    return BareResult(work.events, errors, cpu, total, rss_kb(os.getpid(), "VmHWM"))


# -- profiles -------------------------------------------------------------------------------------

# (label, regex on the file of the innermost Python frame), first match wins.
_BUCKETS = [
    (label, re.compile(r"(^|/)" + rx))
    for label, rx in (
        ("relay.forwarder", r"relay/forwarder\.py"),
        ("relay.link", r"relay/link\.py"),
        ("relay.ocpi_client", r"relay/ocpi_client\.py"),
        ("relay.retry (classify)", r"relay/retry\.py"),
        ("relay.store", r"relay/store/"),
        ("relay (other)", r"relay/"),
        ("tenacity", r"tenacity/"),
        ("aiohttp client/http", r"aiohttp/"),
        ("multidict/yarl", r"(multidict|yarl)/"),
        ("redis-py", r"redis/"),
        ("prometheus_client", r"prometheus_client/"),
        ("structlog", r"structlog/"),
        ("uuid", r"uuid\.py"),
        ("contextlib", r"contextlib\.py"),
        ("asyncio", r"asyncio/"),
    )
]
# Inclusive time of the stages of one delivery (any frame of the stack matches).
_STAGES = (
    ("XREADGROUP + decode + feed (readers)", ("Forwarder._read_loop",)),
    ("fast-lane workers (_worker)", ("Forwarder._worker",)),
    ("ack callbacks (_acked)", ("Forwarder._acked",)),
    ("per-key runner overall (_run_key)", ("Forwarder._run_key",)),
    ("  parked() check", ("DeliveryStore.parked",)),
    ("  tenacity AsyncRetrying (incl. the attempt)", ("AsyncRetrying.__call__",)),
    ("    _attempt", ("Forwarder._attempt",)),
    (
        "      Link.slot enter/exit",
        ("_AsyncGeneratorContextManager.__aenter__", "_AsyncGeneratorContextManager.__aexit__"),
    ),
    ("      OcpiClient.send (HTTP request + response)", ("OcpiClient.send",)),
    ("      classify", ("classify",)),
    ("      Link.success/failure", ("Link.success", "Link.failure")),
    ("      prometheus labels()/observe/inc", ("MetricWrapperBase.labels", "Histogram.observe", "Counter.inc")),
    ("  finish (ack future)", ("DeliveryStore.finish",)),
    ("  _free (room Condition)", ("Forwarder._free",)),
    ("Store flush loop (coalesced pipelines)", ("Connection._flush_loop",)),
)


def profile_breakdown(path: Path) -> str:
    """Where the relay's CPU goes, by package of the innermost frame and by delivery stage (inclusive)."""
    buckets: Counter[str] = Counter()
    stages: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        frames = [f for f in stack.split(";") if "(" in f]
        if not frames:
            continue
        count = int(count_s)
        total += count
        leaf_file = frames[-1].rsplit("(", 1)[1]
        buckets[next((label for label, rx in _BUCKETS if rx.search(leaf_file)), "other (stdlib, C)")] += count
        funcs = {f.split(" (", 1)[0].strip() for f in frames}
        for label, names in _STAGES:
            if any(n in funcs for n in names):
                stages[label] += count
    if not total:
        return f"{path}: no samples"
    out = [f"{path.name}: {total} samples; by package of the innermost Python frame:"]
    out += [f"    {100 * n / total:5.1f} %  {label}" for label, n in buckets.most_common()]
    out.append("  by stage (inclusive):")
    out += [f"    {100 * stages[label] / total:5.1f} %  {label}" for label, _ in _STAGES]
    return "\n".join(out)


# -- report -----------------------------------------------------------------------------------------


def _median(runs: list[Run]) -> Run:
    ordered = sorted(runs, key=lambda r: r.rate)
    return ordered[len(ordered) // 2]


def _row(r: Run) -> str:
    w = r.work
    done = r.check.delivered if r.check.error else w.events
    us_per_ev = 1e6 * r.cpu_s / done if done else 0.0
    drain = f"{r.drain_s:7.2f}" if r.drain_s else f"{'-':>7}"
    rate = "FAILED" if r.check.error else f"{r.rate:,.0f}"
    shares = "".join(f" {100 * r.cpu.share(k):>5.0f}%" if r.cpu else f" {'-':>6}" for k in SHARES)
    return (
        f"{r.label:<38} {w.events:>8,} {w.keys:>6,} {w.per_key:>4} {rate:>9} {r.seconds:>7.2f} {drain} "
        f"{us_per_ev:>7.0f}{shares} {r.rss_peak_mb:>6.0f} {r.rss_end_mb:>5.0f}  {r.check.text()}"
    )


def _header(ctx: Ctx) -> str:
    a = ctx.args
    info = ctx.client.info("server")
    server = f"{info.get('server_name', 'redis')} {info.get('valkey_version', info.get('redis_version'))}"
    fw = ctx.settings.forwarder
    head, tail = location_template()
    body = len(head) + len(tail) + 3
    return "\n".join(
        [
            "relay forwarder benchmark (bench/forward.py)",
            f"  machine: {os.cpu_count()} CPUs, {platform.machine()}, Linux {platform.release()}; Python "
            f"{platform.python_version()}, aiohttp {aiohttp.__version__}, redis-py {redis.__version__}, "
            f"msgspec {msgspec.__version__}, {server}",
            f"  receiver: bench/receiver.py (aiohttp low-level server, 200 + OCPI 1000) pinned to CPU "
            f"{a.receiver_cpu}; relay (python -m relay serve) and bare client pinned to CPU {a.relay_cpu}; "
            "embedded Redis (unix socket, AOF everysec, auto-rewrite off) "
            + ("floating" if a.redis_cpu == "float" else f"pinned to CPU {redis_cpu(a)}"),
            f"  relay: forwarder concurrency {CONCURRENCY}, read_batch {fw.read_batch}, max_buffered "
            f"{fw.max_buffered}, {ctx.settings.redis.shards} shards, log level warning, {a.loop} event loop (--loop)",
            f"  events: Location PUT, body ~{body} B (examples/location.json), prefilled round-robin over the keys "
            "before the relay starts; events/s = events / (last - first request at the receiver); "
            f"median of {a.repeat} run(s)",
            "  columns: drain = first request -> streams empty; CPU us/ev = CPU of the relay (bare client: while "
            "sending) per event; CPU/redis/recv/others = CPU of the relay or bare client, Redis, the receiver and "
            "every other process of the machine, as a share of one core over the run (others > 0: the machine "
            "was not quiet, throughput is lower than it would be); RSS MB = peak (VmHWM, VmRSS samples) and at "
            "the end of the run",
        ]
        + ([f"  NOTE: relay code from {a.relay_src} (not the repository's)"] if a.relay_src else [])
        + ([f"  NOTE: relay environment overrides: {' '.join(a.relay_env)}"] if a.relay_env else [])
        + (
            ["  NOTE: py-spy sampled the senders (relay, bare client): lower numbers than unprofiled runs"]
            if a.profile
            else []
        )
    )


def _calls_line(r: Run, top: int = 6) -> str:
    n = r.work.events
    busiest = sorted(r.redis_calls.items(), key=lambda kv: -kv[1])[:top]
    total = sum(r.redis_calls.values())
    parts = ", ".join(f"{name} {calls / n:.3f}" for name, calls in busiest)
    return f"  {r.label}: {total / n:.3f} in all; {parts}"


def report(ctx: Ctx, rows: dict[str, list[Run]], backlog: Backlog | None) -> str:
    head = (
        f"{'run':<38} {'events':>8} {'keys':>6} {'/key':>4} {'events/s':>9} {'time s':>7} {'drain s':>7} "
        f"{'CPU us/ev':>7} {'CPU':>6} {'redis':>6} {'recv':>6} {'others':>6} {'RSS pk':>6} {'end':>5}  check"
    )
    out = [_header(ctx), "", head, "-" * len(head)]
    med = {k: _median(v) for k, v in rows.items() if v}
    for k in "abc":
        if k in med:
            out.append(_row(med[k]))
            if len(rows[k]) > 1:
                out.append(f"{'':<38} runs: " + ", ".join(f"{r.rate:,.0f}" for r in rows[k]) + " events/s")
    calls = [_calls_line(med[k]) for k in "ab" if k in med and med[k].redis_calls]
    if calls:
        out += ["", "Redis commands sent per delivered event (CONFIG RESETSTAT .. drained; the bench polls a few/s):"]
        out += calls
    out += ["", "ratios and targets:"]
    if "c" in med and med["c"].rate:
        for k, target in (("a", TARGET_RATIO), ("b", None)):
            if k in med and med[k].check.error:
                out.append(f"  (d) ({k})/(c) = n/a: run ({k}) failed" + (" (target >= 75 %: MISS)" if target else ""))
            elif k in med:
                ratio = med[k].rate / med["c"].rate
                verdict = (
                    f" (target >= {100 * target:.0f} %: {'PASS' if ratio >= target else 'MISS'})" if target else ""
                )
                out.append(f"  (d) ({k})/(c) = {100 * ratio:.0f} %{verdict}")
                pairs = [(r, c) for r, c in zip(rows[k], rows["c"], strict=False) if r.rate and c.rate]
                if len(pairs) > 1:  # each repeat runs (a), (b), (c) one after the other: same machine weather
                    each = ", ".join(f"{100 * r.rate / c.rate:.0f} %" for r, c in pairs)
                    out.append(f"      repeat by repeat: {each}")
    if "a" in med:
        verdict = "PASS" if med["a"].rss_peak_mb < TARGET_RSS_MB else "MISS"
        peak, end = med["a"].rss_peak_mb, med["a"].rss_end_mb
        out.append(
            f"  relay RSS in (a): peak {peak:.0f} MB, after the run {end:.0f} MB "
            f"(target < {TARGET_RSS_MB:.0f} MB: {verdict})"
        )
    if backlog is not None:
        b = backlog
        verdict = "PASS" if b.rss_peak_mb < TARGET_RSS_MB else "MISS"
        held = "ok" if b.held <= b.max_buffered else "EXCEEDS max_buffered"
        out.append(
            f"  (e) backlog {b.events:,} events (prefilled in {b.prefill_s:.1f} s, {b.events / b.prefill_s:,.0f}/s), "
            f"IOP down (connection refused) for {b.idle_s:.0f} s: relay RSS peak {b.rss_peak_mb:.0f} MB, "
            f"end {b.rss_end_mb:.0f} MB (target < {TARGET_RSS_MB:.0f} MB: {verdict})"
        )
        out.append(
            f"      entries read and held by the relay {b.held:,} (max_buffered {b.max_buffered:,}: {held}); "
            f"left in streams {b.left:,} of {b.events:,}; graceful stop (SIGTERM) took {b.stop_s:.1f} s"
        )
    return "\n".join(out)


# -- main -------------------------------------------------------------------------------------------


def redis_cpu(args: argparse.Namespace) -> int:
    return int(args.receiver_cpu if args.redis_cpu == "receiver" else args.redis_cpu)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, help="events per run of (a), (b), (c) (default 50000; --quick 20000)")
    p.add_argument("--quick", action="store_true", help="smaller runs: 20 k events, 200 k backlog, 6 s idle")
    p.add_argument("--backlog", type=int, help="events backlogged for (e) (default 1000000; --quick 200000)")
    p.add_argument("--idle", type=float, help="seconds the relay faces the down IOP in (e) (default 12)")
    p.add_argument("--only", default="abce", help="runs to do (default abce; the ratios need c)")
    p.add_argument("--repeat", type=int, default=1, help="runs of (a), (b), (c) each; the median is shown")
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=30.0,
        metavar="S",
        help="before each run, wait up to S seconds for other processes to leave the CPUs idle (default 30)",
    )
    p.add_argument("--receiver-cpu", type=int, default=0)
    p.add_argument("--relay-cpu", type=int, default=1)
    p.add_argument(
        "--redis-cpu",
        default="receiver",
        help="where Redis runs: 'receiver' (its CPU, default: the relay's core is the relay's alone, as the "
        "bare client's is), 'float', or a CPU number",
    )
    p.add_argument("--profile", metavar="DIR", help="py-spy record the relay in (a), (b) and the bare client in (c)")
    p.add_argument("--profile-rate", type=int, default=200)
    p.add_argument("--logs", metavar="DIR", help="keep the relay's logs in DIR")
    p.add_argument(
        "--loop",
        choices=["asyncio", "uvloop"],
        default="asyncio",
        help="event loop of the relay (RELAY_LOOP) and of the bare client (default asyncio; uvloop: the speed extra)",
    )
    p.add_argument("--bare-uvloop", metavar="DIR", help="run the bare client on uvloop, imported from DIR")
    p.add_argument("--relay-env", action="append", default=[], metavar="K=V", help="extra env for the relay (tuning)")
    p.add_argument("--relay-src", metavar="DIR", help="run the relay package found in DIR (a patched copy) instead")
    p.add_argument("--role", choices=["bench", "bare"], default="bench", help=argparse.SUPPRESS)
    p.add_argument("--iop-url", help=argparse.SUPPRESS)
    p.add_argument("--bare-keys", type=int, help=argparse.SUPPRESS)
    p.add_argument("--bare-per-key", type=int, help=argparse.SUPPRESS)
    p.add_argument("--bare-tag", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.events = args.events or (20_000 if args.quick else 50_000)
    args.backlog = args.backlog or (200_000 if args.quick else 1_000_000)
    args.idle = args.idle or (6.0 if args.quick else 12.0)
    return args


def bench(args: argparse.Namespace, workdir: Path) -> int:
    settings = relay_settings()
    server = EmbeddedRedis(workdir / "redis", fsync="everysec")
    asyncio.run(server.start())
    receiver_srv: Server | None = None
    try:
        assert server.proc is not None
        client = redis.Redis.from_url(server.url)
        client.config_set("auto-aof-rewrite-percentage", 0)
        if args.redis_cpu != "float":
            pin_process(server.proc.pid, {redis_cpu(args)})
        port = free_port()
        argv = [python(), "-m", "bench.receiver", "--port", str(port)]
        receiver_srv = start_server("receiver", argv, clean_env(), port, workdir / "receiver.log", {args.receiver_cpu})
        ctx = Ctx(args, workdir, server, client, Receiver(receiver_srv), settings, server.proc.pid)
        per_many = max(1, args.events // KEYS_MANY)
        per_hot = max(1, args.events // KEYS_HOT)
        plan = {
            "a": ("(a) relay, 10 000 keys", Workload("K", KEYS_MANY, per_many)),
            "b": ("(b) relay, 100 hot keys", Workload("H", KEYS_HOT, per_hot)),
        }
        rows: dict[str, list[Run]] = {k: [] for k in "abc"}
        t0 = time.monotonic()
        for _ in range(args.repeat):
            for key in "abc":
                if key not in args.only:
                    continue
                if key == "c":
                    rows[key].append(run_bare(ctx, Workload("K", KEYS_MANY, per_many)))
                else:
                    label, work = plan[key]
                    rows[key].append(run_relay(ctx, key, label, work))
                print(_row(rows[key][-1]), file=sys.stderr, flush=True)
                if rows[key][-1].redis_calls:
                    print(_calls_line(rows[key][-1]), file=sys.stderr, flush=True)
        backlog = run_backlog(ctx) if "e" in args.only else None
        print()
        print(report(ctx, rows, backlog))
        print(f"  total bench time {time.monotonic() - t0:.0f} s")
        for prof in ctx.profiles:
            print()
            print(profile_breakdown(prof))
            print(f"  (top functions: python -m bench._profile {prof})")
        client.close()
        failed = any(r.failed for v in rows.values() for r in v) or (backlog is not None and backlog.failed)
        return 1 if failed else 0
    finally:
        if receiver_srv is not None:
            receiver_srv.stop()
        asyncio.run(server.stop())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role == "bare":
        work = Workload(args.bare_tag, args.bare_keys, args.bare_per_key)
        if args.bare_uvloop:  # a directory holding the uvloop package (not a dependency of the project)
            sys.path.insert(0, args.bare_uvloop)
            uvloop = importlib.import_module("uvloop")
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                result = runner.run(bare_client(args.iop_url, work))
        elif args.loop == "uvloop":
            with asyncio.Runner(loop_factory=choose_loop("uvloop")[1]) as runner:
                result = runner.run(bare_client(args.iop_url, work))
        else:
            result = asyncio.run(bare_client(args.iop_url, work))
        print("BARE_RESULT " + msgspec.json.encode(result).decode(), flush=True)
        return 0
    if len(os.sched_getaffinity(0)) < 2 or args.relay_cpu == args.receiver_cpu:
        print("warning: relay and receiver share one CPU", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="relay-fwd-", dir="/tmp") as tmp:  # short path: unix socket
        with contextlib.suppress(KeyboardInterrupt):
            return bench(args, Path(tmp))
    return 130


if __name__ == "__main__":
    sys.exit(main())
