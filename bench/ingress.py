"""Ingress throughput: the relay beside bare aiohttp+Redis handlers, per AOF durability mode and event loop.

Runs, for each durability mode of the embedded server (AOF appendfsync everysec and always):

  (a) relay, single requests: PUT /ingress/2.2.1/locations/FR/AB1/{id}, 1.3 KB GIREVE-valid Location
      (examples/location.json, compact), a different id per request, Bearer token;
  (b) relay, POST /ingress/2.2.1/batch with --batch-size Location PUTs per request (events/s);
  (c) bare aiohttp handler, one awaited XADD per request (same body, no validation);
  (d) bare aiohttp handler, XADDs of concurrent requests coalesced into one pipeline per round trip;
  (e) bare aiohttp handler doing the work the relay must do and nothing more (bench/bare.py --mode
      commit): the ingress's msgspec decode into relay.models.Location, the event envelope, and the
      relay's Store.commit (the _COMMIT script with the state write, coalesced per round trip);
  (f) the same handler as (e), POST /batch (decode of the batch, then Store.commit_many);

and prints one table with events/s, the ratios and the targets: (a) >= 80 % of (d) (issue 3),
(a) >= 85 % of (e) and (b) >= 85 % of (f), batch >= 40 k events/s.

--loop asyncio|uvloop|both: the event loop of every server under test (the relay through RELAY_LOOP,
the bare handlers through their --loop, both chosen by relay.cli.choose_loop); the loop a server
really ran on is read from its memory map and checked (a wrong one fails the run's check).

Method: every server runs in its own process pinned to --server-cpu; the load generator (wrk, one
thread, --connections keep-alive connections; bench/loadgen.py if wrk is missing) is pinned to
--load-cpu; the Redis server (relay.embedded_redis.EmbeddedRedis, unix socket, AOF) is pinned to
the server CPU by default (--redis-cpu). Each run: FLUSHALL, start the server, warm up, count the
stream entries, measure, wait until writes stop, count again: the check column compares the stored
entries with the acknowledged events (a 202 must mean stored; requests cut off in flight when the
generator stops may be stored without their 202 being read, at most one per connection).

Usage: python bench/ingress.py [--duration 10] [--fsync both|always|everysec] [--loop asyncio|uvloop|both]
       [--only abcdef] [--repeat N] [--profile DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import importlib.util
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

if __package__ in (None, ""):  # run as a script: python bench/ingress.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp
import redis
import structlog

from bench._common import (
    REPO,
    TOKEN,
    Server,
    busy_cpu_seconds,
    clean_env,
    cpu_seconds,
    free_port,
    location_body,
    pin_process,
    python,
    reset_redis,
    settled_entries,
    speed_probe,
    start_server,
)
from bench._load import LoadResult, PythonLoad, Wrk
from bench._profile import start_record, summarize
from relay.embedded_redis import EmbeddedRedis

Fsync = Literal["everysec", "always"]
RUNS: dict[str, tuple[str, str]] = {
    # key: (label, load kind)
    "a": ("(a) relay PUT /locations (single)", "single"),
    "b": ("(b) relay POST /batch", "batch"),
    "c": ("(c) bare aiohttp, 1 XADD/request", "single"),
    "d": ("(d) bare aiohttp, coalesced XADDs", "single"),
    "e": ("(e) bare decode + _COMMIT (single)", "single"),
    "f": ("(f) bare decode + _COMMIT, /batch", "batch"),
}
BARE_MODES = {"c": "single", "d": "coalesce", "e": "commit", "f": "commit"}
LOOPS = ("asyncio", "uvloop")
TARGET_RATIO = 0.80  # (a)/(d)
TARGET_SAME_WORK = 0.85  # (a)/(e) and (b)/(f): the relay against a handler doing only the work it must do
TARGET_BATCH = 40_000
NOISE = 0.15  # busy CPU (fraction of a core) outside the measured processes that marks a run as disturbed


class Load(Protocol):
    name: str

    def run(self, url: str, kind: str, duration_s: int, tag: str) -> LoadResult: ...


@dataclass
class Row:
    fsync: str
    loop: str  # the event loop asked for: asyncio | uvloop
    loop_seen: str  # the one the server process ran on (read from its memory map)
    key: str
    label: str
    result: LoadResult
    stored: int
    in_flight_bound: int
    server_cpu: float  # fraction of one core during the measurement
    redis_cpu: float
    gen_cpu: float
    other_cpu: float  # the rest of the machine's busy time (kernel softirq, and any other process: noise)
    probe_s: float = 0.0  # speed_probe() on the server CPU just before the run (lower = faster machine)
    speed: float = 1.0  # fastest probe of the whole bench / this run's probe (1.00 = as fast as it got)
    attempts: int = 1  # runs made (a disturbed run is made again, the least disturbed one is kept)
    rates: list[float] = field(default_factory=list)  # with --repeat: events/s of every repetition
    group_failed: bool = False  # with --repeat: a repetition failed its check

    @property
    def rate(self) -> float:
        return self.result.events / self.result.seconds if self.result.seconds else 0.0

    @property
    def req_rate(self) -> float:
        return (self.result.ok_requests + self.result.other) / self.result.seconds if self.result.seconds else 0.0

    def us_per_event(self, cpu: float) -> float:
        """CPU microseconds per acknowledged event, from a fraction of a core."""
        return cpu * 1e6 / self.rate if self.rate else 0.0

    @property
    def check(self) -> str:
        if self.loop_seen != self.loop:
            return f"FAIL: ran on {self.loop_seen}, not {self.loop}"
        extra = self.stored - self.result.events
        if extra < 0:
            return f"FAIL: {-extra} acknowledged, not stored"
        if extra > self.in_flight_bound:
            return f"FAIL: {extra} stored, not acknowledged"
        return "ok" if extra == 0 else f"ok (+{extra} in flight)"

    @property
    def noisy(self) -> bool:
        return self.other_cpu > NOISE

    @property
    def failed(self) -> bool:
        return self.group_failed or self.check.startswith("FAIL")


def median_rows(rows: list[Row]) -> list[Row]:
    """One row per (fsync, loop, run): the repetition with the median events/s, carrying every repetition's rate."""
    groups: dict[tuple[str, str, str], list[Row]] = {}
    for r in rows:
        groups.setdefault((r.fsync, r.loop, r.key), []).append(r)
    out = []
    for group in groups.values():
        ranked = sorted(group, key=lambda r: r.rate)
        mid = ranked[(len(ranked) - 1) // 2]
        mid.rates = [r.rate for r in group]
        mid.group_failed = any(r.check.startswith("FAIL") for r in group)
        out.append(mid)
    return out


STATE = {"enabled": "true"}  # --state off: the relay without its state store (issue 6's "before" figure)


def server_argv(
    key: str, redis_url: str, port: int, data_dir: Path, relay_src: str | None = None, loop: str = "asyncio"
) -> tuple[list[str], dict[str, str]]:
    if key in ("a", "b"):
        env = clean_env(
            RELAY_LOOP=loop,
            RELAY_STATE_ENABLED=STATE["enabled"],
            RELAY_REDIS_URL=redis_url,
            RELAY_INGRESS_LISTEN=f"127.0.0.1:{port}",
            RELAY_INGRESS_TOKEN=TOKEN,
            RELAY_OCPI_LISTEN="127.0.0.1:0",
            RELAY_LOG_LEVEL="warning",
            RELAY_FORWARDER_ENABLED="false",
            RELAY_STORAGE_DIR=str(data_dir / "relay-data"),
        )
        config = REPO / "config" / "relay.toml"
        if relay_src:  # a private copy of the relay package (experiments): it must win over the repository's
            src = Path(relay_src).resolve()
            if (src / "config" / "relay.toml").exists():
                config = src / "config" / "relay.toml"  # the copy's own config: code and file must agree
            boot = (
                "import sys; sys.path.insert(0, sys.argv.pop(1)); from relay.cli import main; main(prog_name='relay')"
            )
            return [python(), "-c", boot, str(src), "serve", "--config", str(config)], env
        return [python(), "-m", "relay", "serve", "--config", str(config)], env
    mode = BARE_MODES[key]
    argv = [
        python(),
        "-m",
        "bench.bare",
        "--mode",
        mode,
        "--redis",
        redis_url,
        "--port",
        str(port),
        "--loop",
        loop,
    ]
    return argv, clean_env()


def loop_of(pid: int) -> str:
    """The event loop a server runs on: uvloop if its extension is mapped in the process, else asyncio.

    relay.cli.choose_loop imports uvloop only when it is chosen, and nothing else in the relay or the
    bare handlers imports it: mapped means used.
    """
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return "?"
    return "uvloop" if "/uvloop/" in maps else "asyncio"


def wait_quiet(max_wait_s: float, window_s: float = 0.5) -> None:
    """Start a measurement only when nothing else keeps the machine busy (up to max_wait_s)."""
    deadline = time.monotonic() + max_wait_s
    while time.monotonic() < deadline:
        m0 = busy_cpu_seconds()
        time.sleep(window_s)
        if (busy_cpu_seconds() - m0) / window_s < NOISE:
            return
    print(f"  the machine is still busy after {max_wait_s:.0f} s: measuring anyway", file=sys.stderr, flush=True)


def smoke(url: str, key: str) -> None:
    """One request before the load: a refused body would make the whole run meaningless."""

    async def go() -> tuple[int, str]:
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
        async with aiohttp.ClientSession() as s:
            path = "/ingress/2.2.1/locations/FR/AB1/SMOKE1"
            async with s.put(url + path, data=location_body("SMOKE1"), headers=headers) as resp:
                return resp.status, await resp.text()

    status, text = asyncio.run(go())
    if status != 202:
        raise RuntimeError(f"run {key}: smoke PUT answered {status}: {text[:500]}")


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path, load: Load) -> None:
        self.args = args
        self.workdir = workdir
        self.load = load
        self.server_cpus = {args.server_cpu}
        self.load_cpus = {args.load_cpu}
        self.redis_cpus: set[int] | None = {
            "server": self.server_cpus,
            "load": self.load_cpus,
            "float": None,
        }[args.redis_cpu]
        self.profiles: list[Path] = []
        self.redis_version = "?"

    def run_mode(self, fsync: Fsync) -> list[Row]:
        server = EmbeddedRedis(self.workdir / f"redis-{fsync}", fsync=fsync)
        asyncio.run(server.start())
        try:
            assert server.proc is not None
            redis_pid = server.proc.pid
            if self.redis_cpus is not None:
                pin_process(redis_pid, self.redis_cpus)
            client = redis.Redis.from_url(server.url)
            info = client.info("server")
            self.redis_version = (
                f"{info.get('server_name', 'redis')} {info.get('valkey_version', info['redis_version'])}"
            )
            if self.args.aof_rewrite == "off":
                client.config_set("auto-aof-rewrite-percentage", 0)
            actual = client.config_get("appendfsync")["appendfsync"]
            assert actual == fsync, f"embedded server runs appendfsync {actual}, wanted {fsync}"
            rows = []
            # a(asyncio) a(uvloop) b(asyncio) ... then again: both loops of a run are measured side by side
            plan = [(k, loop) for _ in range(self.args.repeat) for k in self.args.only for loop in self.args.loops]
            for key, loop in plan:
                row = self.run_one(fsync, key, loop, client, server.url, redis_pid)
                print(_row_line(row), file=sys.stderr, flush=True)
                for attempt in range(2, self.args.retry_noisy + 2):
                    if not row.noisy:
                        break
                    print(f"  disturbed by other processes: run {key} again ({attempt})", file=sys.stderr, flush=True)
                    again = self.run_one(fsync, key, loop, client, server.url, redis_pid)
                    print(_row_line(again), file=sys.stderr, flush=True)
                    if again.other_cpu < row.other_cpu:
                        row = again
                    row.attempts = attempt
                rows.append(row)
            client.close()
            return rows
        finally:
            asyncio.run(server.stop())

    def run_one(self, fsync: Fsync, key: str, loop: str, client: redis.Redis, redis_url: str, redis_pid: int) -> Row:
        label, kind = RUNS[key]
        reset_redis(client)
        port = free_port()
        argv, env = server_argv(key, redis_url, port, self.workdir, self.args.relay_src, loop)
        log = self.workdir / f"server-{fsync}-{loop}-{key}.log"
        srv: Server = start_server(label, argv, env, port, log, self.server_cpus)
        url = f"http://127.0.0.1:{port}"
        try:
            smoke(url, key)
            loop_seen = loop_of(srv.pid)
            wait_quiet(self.args.quiet_wait)
            probe = speed_probe(self.server_cpus)
            self.load.run(url, kind, self.args.warmup, "W")
            before = settled_entries(client, srv.pid)
            profiler = None
            if self.args.profile is not None and key in self.args.profile_runs:
                out = Path(self.args.profile) / f"{'relay' if key in 'ab' else 'bare'}-{fsync}-{loop}-{key}.txt"
                out.parent.mkdir(parents=True, exist_ok=True)
                profiler = start_record(srv.pid, out, self.args.duration, self.load_cpus)
                if out not in self.profiles:  # a disturbed run made again overwrites its profile
                    self.profiles.append(out)
                time.sleep(0.3)  # py-spy attaches
            t0 = time.monotonic()
            s0, r0, m0 = cpu_seconds(srv.pid), cpu_seconds(redis_pid), busy_cpu_seconds()
            result = self.load.run(url, kind, self.args.duration, "M")
            s1, r1, m1 = cpu_seconds(srv.pid), cpu_seconds(redis_pid), busy_cpu_seconds()
            wall = time.monotonic() - t0
            if profiler is not None:
                profiler.wait(60)
            after = settled_entries(client, srv.pid)
            if srv.proc.poll() is not None:
                raise RuntimeError(f"{label} died during the run:\n{srv.log_tail()}")
        finally:
            srv.stop()
        bound = self.args.connections * (self.args.batch_size if kind == "batch" else 1)
        return Row(
            fsync=fsync,
            loop=loop,
            loop_seen=loop_seen,
            key=key,
            label=label,
            result=result,
            stored=after - before,
            in_flight_bound=bound,
            server_cpu=(s1 - s0) / wall,
            redis_cpu=(r1 - r0) / wall,
            gen_cpu=result.gen_cpu_s / wall,
            other_cpu=((m1 - m0) - (s1 - s0) - (r1 - r0) - result.gen_cpu_s) / wall,
            probe_s=probe,
        )


def _row_line(r: Row) -> str:
    res = r.result
    marks = (" *" if r.noisy else "") + (f" [least disturbed of {r.attempts}]" if r.attempts > 1 else "")
    if len(r.rates) > 1:
        marks += f" [median of {len(r.rates)}: {min(r.rates):,.0f}-{max(r.rates):,.0f}]"
    if r.group_failed and not r.check.startswith("FAIL"):
        marks += " [FAIL in another repetition]"
    return (
        f"{r.fsync:<9} {r.loop:<7} {r.label:<37} {r.rate:>9,.0f} {r.req_rate:>8,.0f} "
        f"{res.p50_ms:>7.1f} {res.p99_ms:>7.1f} "
        f"{100 * r.server_cpu:>5.0f}% {100 * r.redis_cpu:>5.0f}% {100 * r.gen_cpu:>5.0f}% {100 * r.other_cpu:>5.0f}% "
        f"{r.us_per_event(r.server_cpu):>6.0f} {r.us_per_event(r.redis_cpu):>6.0f} {r.speed:>5.2f} "
        f"{res.events:>10,} {r.stored:>10,} {res.other + res.errors:>6,}  {r.check}{marks}"
    )


def _loop_name(loop: str) -> str:
    if loop == "asyncio":
        return "asyncio (standard)"
    return f"uvloop {importlib.metadata.version('uvloop')}"


def _header(args: argparse.Namespace, load: Load, redis_version: str) -> str:
    import aiohttp as _aiohttp
    import hiredis
    import msgspec

    body = len(location_body("M1-1"))
    redis_where = {
        "server": f"pinned to CPU {args.server_cpu} with the server",
        "load": f"pinned to CPU {args.load_cpu}",
    }
    lines = [
        "relay ingress benchmark (bench/ingress.py)",
        f"  machine: {os.cpu_count()} CPUs, {platform.machine()}, Linux {platform.release()}; Python "
        f"{platform.python_version()}, aiohttp {_aiohttp.__version__}, redis-py {redis.__version__} "
        f"(hiredis {hiredis.__version__}), msgspec {msgspec.__version__}, {redis_version}",
        f"  server (relay / bare handler): one process pinned to CPU {args.server_cpu}; event loop "
        f"{' and '.join(_loop_name(loop) for loop in args.loops)} (relay: RELAY_LOOP, bare: --loop; loop column)",
        f"  Redis: embedded server (relay.embedded_redis), unix socket, AOF on, "
        f"{redis_where.get(args.redis_cpu, 'floating (not pinned)')}; auto AOF rewrite {args.aof_rewrite}",
        f"  load: {load.name} pinned to CPU {args.load_cpu}, {args.connections} keep-alive connections, "
        f"warm-up {args.warmup} s, measured {args.duration} s; PUT body {body} B (examples/location.json), "
        f"batch {args.batch_size} PUTs/request"
        + (f"; every run repeated {args.repeat}x (median shown)" if args.repeat > 1 else ""),
    ]
    if isinstance(load, PythonLoad):
        lines.append(
            "  NOTE: wrk is not installed; the Python aiohttp load generator saturates its core near 8 k req/s,"
            " so single-request numbers are a floor, not the servers' capacity (apt-get install wrk)."
        )
    if args.relay_src:
        lines.append(f"  NOTE: relay code from {args.relay_src} (not the repository's)")
    if args.state == "off" and set(args.only) & {"e", "f"}:
        lines.append("  NOTE: --state off: the relay appends without its state; (e) and (f) still commit the state")
    if args.profile:
        lines.append(
            f"  NOTE: py-spy sampled runs {','.join(args.profile_runs)} (on the load CPU): slightly lower numbers"
        )
    lines.append(
        "  srvCPU/redis/load: CPU of the server process, the Redis server and the load generator (100 % = one core);"
        " srv us/rds us: CPU microseconds per acknowledged event in the server and in Redis"
    )
    lines.append(
        "  speed: a fixed CPU loop timed on the server CPU before the run, relative to the fastest of the bench"
        " (this virtual machine's speed varies: compare rows measured at similar speed)"
    )
    lines.append(
        f"  other: busy CPU outside server, Redis and load generator (softirq, other processes); '*' marks > "
        f"{100 * NOISE:.0f} % of a core: something else ran on the machine, that row is disturbed"
    )
    lines.append(
        "  check: stream entries added during the measurement vs events acknowledged (202 / batch 'accepted');"
        " '+N in flight' = stored for requests cut off when the load stopped"
    )
    return "\n".join(lines)


def _cpu_per_event(r: Row) -> float:
    """Server + Redis CPU microseconds per acknowledged event (the core they share)."""
    return r.us_per_event(r.server_cpu) + r.us_per_event(r.redis_cpu)


def _ratio(by: dict[str, Row], num: str, den: str, target: float | None = None) -> str | None:
    """Throughput ratio, then the same ratio from CPU per event (steadier when the machine is shared)."""
    if num not in by or den not in by or not by[den].rate:
        return None
    ratio = by[num].rate / by[den].rate
    text = f"({num})/({den}) = {100 * ratio:.0f} %"
    if target is not None:
        text += f" (target >= {100 * target:.0f} %: {'PASS' if ratio >= target else 'MISS'})"
    if _cpu_per_event(by[num]):
        text += f" [by CPU/event {100 * _cpu_per_event(by[den]) / _cpu_per_event(by[num]):.0f} %]"
    return text


def _table(rows: list[Row]) -> str:
    head = (
        f"{'fsync':<9} {'loop':<7} {'run':<37} {'events/s':>9} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'srvCPU':>6} {'redis':>6} {'load':>6} {'other':>6} {'srv us':>6} {'rds us':>6} {'speed':>5} "
        f"{'acked':>10} {'stored':>10} {'non2xx':>6}  check"
    )
    out = [head, "-" * len(head)]
    modes = list(dict.fromkeys(r.fsync for r in rows))
    loops = list(dict.fromkeys(r.loop for r in rows))
    for mode in modes:
        for loop in loops:
            out += [_row_line(r) for r in rows if r.fsync == mode and r.loop == loop]
        out.append("")
    out.append("ratios and targets:")
    for mode in modes:
        for loop in loops:
            by = {r.key: r for r in rows if r.fsync == mode and r.loop == loop}
            parts = [f"  {mode:<9} {loop:<7}"]
            parts += [
                x
                for x in (
                    _ratio(by, "a", "d", TARGET_RATIO),
                    _ratio(by, "a", "e", TARGET_SAME_WORK),
                    _ratio(by, "b", "f", TARGET_SAME_WORK),
                    _ratio(by, "c", "d"),
                )
                if x is not None
            ]
            if "b" in by:
                ok = "PASS" if by["b"].rate >= TARGET_BATCH else "MISS"
                parts.append(f"batch = {by['b'].rate:,.0f} events/s (target >= {TARGET_BATCH:,}: {ok})")
            out.append("   ".join(parts).rstrip())
    return "\n".join(out + _comparisons(rows, modes, loops))


def _comparisons(rows: list[Row], modes: list[str], loops: list[str]) -> list[str]:
    """uvloop against asyncio, and appendfsync always against everysec, run by run."""
    out = []
    if len(loops) > 1:
        for mode in modes:
            gain = []
            for key in RUNS:
                aio = [r for r in rows if r.key == key and r.fsync == mode and r.loop == "asyncio"]
                uv = [r for r in rows if r.key == key and r.fsync == mode and r.loop == "uvloop"]
                if aio and uv and aio[0].rate:
                    gain.append(f"{key}: {100 * (uv[0].rate / aio[0].rate - 1):+.0f} %")
            out.append(f"  {mode:<9} uvloop vs asyncio (throughput gained): " + ", ".join(gain))
    if "everysec" in modes and "always" in modes:
        for loop in loops:
            cost = []
            for key in RUNS:
                ev = [r for r in rows if r.key == key and r.fsync == "everysec" and r.loop == loop]
                al = [r for r in rows if r.key == key and r.fsync == "always" and r.loop == loop]
                if ev and al and ev[0].rate:
                    cost.append(f"{key}: {100 * (1 - al[0].rate / ev[0].rate):+.0f} %")
            out.append(f"  {loop:<7} cost of appendfsync always vs everysec (throughput lost): " + ", ".join(cost))
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=int, default=10, help="measured seconds per run (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up seconds per run (default 2)")
    p.add_argument("--fsync", choices=["both", "always", "everysec"], default="both")
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=200, help="operations per batch request (default 200)")
    p.add_argument("--only", default="abcdef", help="runs to do, e.g. 'ade' (default abcdef)")
    p.add_argument("--state", choices=["on", "off"], default="on", help="the relay's state store (default on)")
    p.add_argument("--server-cpu", type=int, default=0)
    p.add_argument("--load-cpu", type=int, default=1)
    p.add_argument("--redis-cpu", choices=["server", "float", "load"], default="server")
    p.add_argument("--aof-rewrite", choices=["off", "default"], default="off", help="auto AOF rewrite during runs")
    p.add_argument("--loadgen", choices=["auto", "wrk", "python"], default="auto")
    p.add_argument("--profile", metavar="DIR", help="py-spy record the server during the measured runs into DIR")
    p.add_argument("--profile-runs", default="ab", help="runs to profile with --profile (default ab)")
    p.add_argument("--repeat", type=int, default=1, help="repetitions of every run; the table shows medians")
    p.add_argument("--retry-noisy", type=int, default=2, help="extra runs for a disturbed run (default 2)")
    p.add_argument("--quiet-wait", type=float, default=30, help="seconds to wait for an idle machine before a run")
    p.add_argument(
        "--loop",
        choices=["asyncio", "uvloop", "both"],
        default="asyncio",
        help="event loop of every server under test; both: each run on each loop, side by side (default asyncio)",
    )
    p.add_argument("--relay-src", metavar="DIR", help="run the relay package found in DIR (a patched copy) instead")
    args = p.parse_args(argv)
    args.only = [k for k in args.only if k in RUNS]
    if not args.only:
        p.error(f"--only: give some of {', '.join(RUNS)}")
    args.loops = list(LOOPS) if args.loop == "both" else [args.loop]
    if "uvloop" in args.loops and importlib.util.find_spec("uvloop") is None:
        p.error("--loop uvloop: uvloop is not installed (pip install -e '.[speed]')")
    if len(os.sched_getaffinity(0)) < 2 and args.server_cpu == args.load_cpu:
        print("warning: server and load generator share one CPU", file=sys.stderr)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    STATE["enabled"] = "true" if args.state == "on" else "false"
    # The embedded server's start/stop lines go to stderr with the progress lines; stdout is the report.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    modes: list[Fsync] = ["everysec", "always"] if args.fsync == "both" else [args.fsync]
    with tempfile.TemporaryDirectory(prefix="relay-bench-", dir="/tmp") as tmp:  # short path: unix socket
        workdir = Path(tmp)
        load: Load
        if args.loadgen == "wrk" or (args.loadgen == "auto" and Wrk.available()):
            wrk = Wrk(workdir, args.connections, args.batch_size, {args.load_cpu})
            wrk.name = f"{Wrk.version()} (1 thread)"
            load = wrk
        else:
            if args.loadgen == "auto":
                print("NOTE: wrk not found; falling back to the Python aiohttp load generator", file=sys.stderr)
            load = PythonLoad(args.connections, args.batch_size, {args.load_cpu})
        bench = Bench(args, workdir, load)
        rows: list[Row] = []
        t0 = time.monotonic()
        for mode in modes:
            rows += bench.run_mode(mode)
        fastest = min((r.probe_s for r in rows if r.probe_s), default=0.0)
        for r in rows:
            r.speed = fastest / r.probe_s if r.probe_s else 1.0
        if args.repeat > 1:
            rows = median_rows(rows)
        print()
        print(_header(args, load, bench.redis_version))
        print(f"  total bench time {time.monotonic() - t0:.0f} s")
        print()
        print(_table(rows))
        for prof in bench.profiles:
            print()
            print(summarize(prof))
    return 1 if any(r.failed for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
