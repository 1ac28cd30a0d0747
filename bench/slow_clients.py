"""The ingress's latency while 1,000 idle and slow clients hold the OCPI listener (issue 14, finding 1).

One relay (``python -m relay serve``, embedded Redis, forwarder off) pinned to --server-cpu; wrk (or
bench/loadgen.py) pinned to --load-cpu sends Location PUTs to the ingress over --connections keep-alive
connections, twice, in one run of the script:

  (a) the ingress alone;
  (b) the same load while --attackers clients (a process of their own, pinned to the load CPU too)
      hold the OCPI listener: half connect and send nothing, half send half a request header and then
      one more header byte every second. When the relay closes one (a cap, the header timeout), it
      connects again after --reconnect-s. They connect from --sources loopback addresses
      (127.0.0.2, 127.0.0.3, ...), so that the per-address cap alone does not stop them.

The table gives the ingress's PUTs/s, p50 and p99 (wrk's), the relay's CPU, and what the OCPI listener
did meanwhile (connections held, closed by reason, failed accepts; from the relay's /metrics).

Usage: python bench/slow_clients.py [--duration 10] [--attackers 1000] [--connections 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import resource
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python bench/slow_clients.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import (
    REPO,
    TOKEN,
    busy_cpu_seconds,
    clean_env,
    cpu_seconds,
    free_port,
    pinned,
    python,
    start_server,
)
from bench._load import LoadResult, PythonLoad, Wrk

HALF_HEADER = b"GET /ocpi/versions HTTP/1.1\r\nHost: relay\r\nX-Slow: "
NOFILE_WANTED = 8192  # descriptors the attacker process needs (1,000 sockets and the reconnects' churn)


def raise_nofile(wanted: int = NOFILE_WANTED) -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE towards ``wanted`` (up to the hard limit); (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return soft, hard


# -- the attackers (python bench/slow_clients.py --attack PORT ...) ------------------------------------------


@dataclass
class AttackStats:
    connects: int = 0  # connections the relay accepted at the TCP level (then kept or closed)
    failed: int = 0  # connects that failed or timed out
    closed_by_server: int = 0
    open: int = 0
    samples: list[int] = field(default_factory=list)  # connections open, every 0.5 s
    seconds: float = 0.0


async def _client(port: int, source: str, slow: bool, reconnect_s: float, st: AttackStats, stop: asyncio.Event) -> None:
    await asyncio.sleep(random.random() * 0.5)  # spread the first connects
    while not stop.is_set():
        try:
            opening = asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
            reader, writer = await asyncio.wait_for(opening, 5)
        except (OSError, TimeoutError):
            st.failed += 1
            await asyncio.sleep(reconnect_s)
            continue
        st.connects += 1
        st.open += 1
        try:
            if slow:
                writer.write(HALF_HEADER)
            while not stop.is_set():
                try:
                    data = await asyncio.wait_for(reader.read(4096), 1.0)
                except TimeoutError:
                    if slow:
                        writer.write(b"a")  # one more byte of a header that never ends
                    continue
                if not data:
                    st.closed_by_server += 1
                    break
        except OSError:
            st.closed_by_server += 1
        finally:
            st.open -= 1
            writer.transport.abort()
        await asyncio.sleep(reconnect_s)


async def attack(port: int, n: int, sources: int, reconnect_s: float, seconds: float) -> AttackStats:
    st, stop = AttackStats(), asyncio.Event()
    addresses = [f"127.0.0.{2 + i}" for i in range(sources)]
    tasks = [asyncio.create_task(_client(port, addresses[i % sources], i % 2 == 1, reconnect_s, st, stop))
             for i in range(n)]  # fmt: skip
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    started = time.monotonic()
    while not stop.is_set() and time.monotonic() - started < seconds:
        await asyncio.sleep(0.5)
        st.samples.append(st.open)
    stop.set()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    st.seconds = time.monotonic() - started
    return st


# -- the orchestration ---------------------------------------------------------------------------------------


def relay_metrics(port: int) -> dict[str, float]:
    """The relay's relay_connections_* and process_open_fds samples, by their full name with labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith(("relay_connections_open", "relay_connections_closed_total", "process_open_fds")):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def closed_delta(before: dict[str, float], after: dict[str, float], listener: str) -> dict[str, int]:
    prefix = f'relay_connections_closed_total{{listener="{listener}",reason="'
    return {k[len(prefix) : -2]: int(v - before.get(k, 0.0)) for k, v in after.items()
            if k.startswith(prefix) and v - before.get(k, 0.0)}  # fmt: skip


@dataclass
class Row:
    label: str
    result: LoadResult
    cpu: dict[str, float]  # fraction of one core: relay, redis, wrk, attackers, other (the rest of the machine)
    ocpi_open: float = 0.0
    closed: dict[str, int] = field(default_factory=dict)
    open_fds: float = 0.0
    attack: AttackStats | None = None

    @property
    def rate(self) -> float:
        return self.result.ok_requests / self.result.seconds if self.result.seconds else 0.0

    @property
    def us_per_put(self) -> float:
        """Relay CPU microseconds per PUT answered: what the attackers cost, less moved by the machine's noise."""
        return self.cpu.get("relay", 0.0) * 1e6 / self.rate if self.rate else 0.0


def children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def measure(label: str, load: Wrk | PythonLoad, url: str, pids: dict[str, int], port: int, duration: int) -> Row:
    """One wrk run against the ingress, with every process's CPU and the OCPI listener's metrics around it."""
    m0, t0, busy0 = relay_metrics(port), time.monotonic(), busy_cpu_seconds()
    c0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    result = load.run(url, "single", duration, "M")
    wall = time.monotonic() - t0
    cpu = {name: (cpu_seconds(pid) - c0[name]) / wall for name, pid in pids.items()}
    cpu["wrk"] = result.gen_cpu_s / wall
    cpu["other"] = max(0.0, (busy_cpu_seconds() - busy0) / wall - sum(cpu.values()))
    m1 = relay_metrics(port)
    return Row(label, result, cpu, m1.get('relay_connections_open{listener="ocpi"}', 0.0),
               closed_delta(m0, m1, "ocpi"), m1.get("process_open_fds", 0.0))  # fmt: skip


def wait_for_ocpi_open(port: int, wanted: float, timeout_s: float) -> float:
    """Until the OCPI listener holds ``wanted`` connections (or timeout_s): how many it holds."""
    deadline, held = time.monotonic() + timeout_s, 0.0
    while time.monotonic() < deadline:
        held = relay_metrics(port).get('relay_connections_open{listener="ocpi"}', 0.0)
        if held >= wanted:
            break
        time.sleep(0.25)
    return held


def wait_ocpi_empty(port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and relay_metrics(port).get('relay_connections_open{listener="ocpi"}', 0.0):
        time.sleep(0.25)


def start_attackers(args: argparse.Namespace, ocpi_port: int) -> subprocess.Popen[bytes]:
    argv = [python(), str(Path(__file__).resolve()), "--attack", str(ocpi_port), "--attackers", str(args.attackers),
            "--sources", str(args.sources), "--reconnect-s", str(args.reconnect_s),
            "--attack-seconds", str(args.settle + args.duration + 30)]  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.PIPE, env=clean_env(), preexec_fn=pinned({args.load_cpu}))


def stop_attackers(attacker: subprocess.Popen[bytes]) -> AttackStats:
    attacker.send_signal(signal.SIGTERM)
    out, _ = attacker.communicate(timeout=60)
    return AttackStats(**json.loads(out.decode().strip().splitlines()[-1]))


def run(args: argparse.Namespace) -> list[Row]:
    """(a) then (b), --repeat times, against one relay."""
    load: Wrk | PythonLoad
    workdir = Path(tempfile.mkdtemp(prefix="relay-slow-"))
    if Wrk.available() and args.loadgen != "python":
        load = Wrk(workdir, args.connections, 1, {args.load_cpu})
    else:
        load = PythonLoad(args.connections, 1, {args.load_cpu})
    port, ocpi_port = free_port(), free_port()
    env = clean_env(
        RELAY_LOOP=args.loop,
        RELAY_INGRESS_LISTEN=f"127.0.0.1:{port}",
        RELAY_INGRESS_TOKEN=TOKEN,
        RELAY_OCPI_LISTEN=f"127.0.0.1:{ocpi_port}",
        RELAY_LOG_LEVEL="warning",
        RELAY_FORWARDER_ENABLED="false",
        RELAY_STORAGE_DIR=str(workdir / "relay-data"),
        RELAY_STORAGE_DURABILITY=args.fsync,
    )
    argv = [python(), "-m", "relay", "serve", "--config", str(REPO / "config" / "relay.toml")]
    srv = start_server("relay", argv, env, port, workdir / "relay.log", {args.server_cpu})
    url = f"http://127.0.0.1:{port}"
    pids = {"relay": srv.pid}
    for child in children(srv.pid)[:1]:  # the embedded Redis
        pids["redis"] = child
    attacker: subprocess.Popen[bytes] | None = None
    rows: list[Row] = []
    try:
        load.run(url, "single", args.warmup, "W")
        for i in range(args.repeat):
            tag = f" #{i + 1}" if args.repeat > 1 else ""
            rows.append(measure(f"(a) ingress alone{tag}", load, url, pids, port, args.duration))
            attacker = start_attackers(args, ocpi_port)
            held = wait_for_ocpi_open(port, min(args.attackers, 512), args.settle)
            print(f"  OCPI listener holds {held:.0f} attackers' connections: measuring", file=sys.stderr, flush=True)
            label = f"(b) + {args.attackers:,} idle/slow on OCPI{tag}"
            row = measure(label, load, url, {**pids, "attackers": attacker.pid}, port, args.duration)
            row.attack = stop_attackers(attacker)
            attacker = None
            rows.append(row)
            wait_ocpi_empty(port, 30)  # the attackers' connections close with their process
        return rows
    finally:
        if attacker is not None and attacker.poll() is None:
            attacker.kill()
        srv.stop()
        log_tail = srv.log_tail(1500)
        if "Traceback" in log_tail or "accept_failed" in log_tail:
            print(f"relay log (tail):\n{log_tail}", file=sys.stderr)
        subprocess.run(["rm", "-rf", str(workdir)], check=False)


def _median(values: list[float]) -> float:
    ranked = sorted(values)
    return ranked[(len(ranked) - 1) // 2] if ranked else 0.0


def table(args: argparse.Namespace, rows: list[Row], load_name: str) -> str:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lines = [
        f"slow clients on the OCPI listener vs the ingress: {platform.node()}, python {platform.python_version()}, "
        f"loop {args.loop}, fsync {args.fsync}",
        f"  relay pinned to CPU {args.server_cpu} (with its embedded Redis); {load_name} ({args.connections} "
        f"connections, PUT /locations) and the attackers pinned to CPU {args.load_cpu}; {args.duration} s per run; "
        f"RLIMIT_NOFILE of the bench {soft}/{hard} (the relay raises its soft limit to the hard one)",
        "  CPU columns: share of one core during the run; 'other' = the rest of the machine's busy time (noise); "
        "us/PUT = relay CPU per PUT answered",
        "",
        f"{'run':<38} {'PUT/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'err':>4} {'relay':>6} {'us/PUT':>7} {'redis':>6} "
        f"{'wrk':>5} {'attack':>6} {'other':>6} {'OCPI open':>9} {'fds':>5}",
    ]
    for r in rows:
        c = r.cpu
        lines.append(
            f"{r.label:<38} {r.rate:>7,.0f} {r.result.p50_ms:>7.2f} {r.result.p99_ms:>7.2f} "
            f"{r.result.errors + r.result.other:>4} {c.get('relay', 0):>6.0%} {r.us_per_put:>7.0f} "
            f"{c.get('redis', 0):>6.0%} {c.get('wrk', 0):>5.0%} {c.get('attackers', 0):>6.0%} "
            f"{c.get('other', 0):>6.0%} {r.ocpi_open:>9.0f} {r.open_fds:>5.0f}"
        )
    a = [r for r in rows if r.label.startswith("(a)")]
    b = [r for r in rows if r.label.startswith("(b)")]
    if a and b:
        pa, pb = _median([r.result.p99_ms for r in a]), _median([r.result.p99_ms for r in b])
        qa, qb = _median([r.result.p50_ms for r in a]), _median([r.result.p50_ms for r in b])
        ra, rb = _median([r.rate for r in a]), _median([r.rate for r in b])
        ua, ub = _median([r.us_per_put for r in a]), _median([r.us_per_put for r in b])
        which = "medians" if len(a) > 1 else "one run each"
        lines += [
            "",
            f"  ({which}) p99 (a) {pa:.2f} ms, (b) {pb:.2f} ms: {pb / pa:.2f}x; p50 {qa:.2f} -> {qb:.2f} ms; "
            f"PUT/s (b)/(a) {rb / ra:.0%}; relay CPU per PUT {ua:.0f} -> {ub:.0f} us",
        ]
        closed: dict[str, int] = {}
        for r in b:
            for k, v in r.closed.items():
                closed[k] = closed.get(k, 0) + v
        lines.append("  during (b) the OCPI listener closed: "
                     + (", ".join(f"{k} {v:,}" for k, v in sorted(closed.items())) or "none"))  # fmt: skip
        for r in b:
            if r.attack is None:
                continue
            st = r.attack
            mean = sum(st.samples) / len(st.samples) if st.samples else 0.0
            lines.append(
                f"  attackers over {st.seconds:.0f} s: {st.connects:,} connections made, {st.closed_by_server:,} "
                f"closed by the relay, {st.failed:,} connects failed; connected: mean {mean:,.0f}, "
                f"max {max(st.samples, default=0):,} (beyond the OCPI cap they wait in the kernel's accept queue)"
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=int, default=10, help="measured seconds per run (default 10)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--settle", type=float, default=15.0, help="longest wait for the attackers to fill the listener")
    p.add_argument("--connections", type=int, default=16, help="ingress load: keep-alive connections (default 16)")
    p.add_argument("--attackers", type=int, default=1000)
    p.add_argument("--sources", type=int, default=16, help="loopback source addresses of the attackers")
    p.add_argument("--reconnect-s", type=float, default=0.25, help="attacker's pause before connecting again")
    p.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    p.add_argument("--fsync", choices=["always", "everysec"], default="everysec")
    p.add_argument("--server-cpu", type=int, default=0)
    p.add_argument("--load-cpu", type=int, default=1)
    p.add_argument("--loadgen", choices=["auto", "python"], default="auto")
    p.add_argument("--repeat", type=int, default=3, help="(a) then (b), this many times; medians (default 3)")
    p.add_argument("--attack", type=int, metavar="PORT", help=argparse.SUPPRESS)  # the attacker process
    p.add_argument("--attack-seconds", type=float, default=60.0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_nofile()
    if args.attack is not None:
        st = asyncio.run(attack(args.attack, args.attackers, args.sources, args.reconnect_s, args.attack_seconds))
        print(json.dumps(st.__dict__))
        return 0
    rows = run(args)
    print(table(args, rows, "wrk" if Wrk.available() and args.loadgen != "python" else "python-aiohttp"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
