"""Instructions per delivered event: the relay's forwarder beside the bare aiohttp client, under callgrind.

On a shared VM the wall-clock ratio of bench/forward.py moves by tens of points from one run to the
next (the neighbours' load changes the CPU under both runs). The number of instructions a run
executes does not: it repeats within about 1 %. This script counts them for the same work as
bench/forward.py's (a) and (c), on a smaller backlog:

  (a) the relay (``relay.service.Relay``, the code ``relay serve`` runs, with its GC tuning) in a
      process of its own, delivering a prefilled backlog of ``--keys`` Locations × ``--per-key`` PUTs;
  (c) the bare client of bench/forward.py (``bare_client``): the same PUTs, 64 in flight.

Each runs under ``valgrind --tool=callgrind --instr-atstart=no``; instrumentation is switched on
(``callgrind_control -i on``) once 15 % of the events are delivered and off at 90 %, so start-up,
warm-up and shutdown are not counted. The receiver (bench/receiver.py) and Redis run natively.
Under valgrind both senders are ~50× slower; Redis and the receiver are not, so both always have
their 64 requests in flight: the count is what one event costs the sender's CPU, not a throughput.

A run can still count a few % more when the machine disturbs the receiver or Redis (fewer requests
in flight, so less work shared per turn of the event loop): ``--repeat N`` keeps each role's lowest.

Needs valgrind (``apt-get install valgrind``). Takes 2–3 minutes per repeat.

Usage: python bench/instructions.py [--keys 2000] [--per-key 3] [--repeat 1]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python bench/instructions.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis

from bench._common import Server, clean_env, free_port, python, start_server
from bench.forward import (
    CONCURRENCY,
    CONFIG,
    IOP_PREFIX,
    TARGET_RATIO,
    Workload,
    _prefill_store,
    bare_client,
    relay_env,
)
from relay.config import Settings, load
from relay.embedded_redis import EmbeddedRedis

START, STOP = 0.15, 0.90  # the share of delivered events between which instructions are counted


def _callgrind(on: bool) -> None:
    subprocess.run(["callgrind_control", "-i", "on" if on else "off", str(os.getpid())], capture_output=True)


class Window:
    """Switches counting on and off as the delivered count crosses START and STOP of ``total``."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.first = self.last = -1

    def update(self, done: int) -> None:
        if self.first < 0 and done >= self.total * START:
            _callgrind(True)
            self.first = done
        elif self.first >= 0 and self.last < 0 and done >= self.total * STOP:
            _callgrind(False)
            self.last = done
            print(f"EVENTS {self.last - self.first}", flush=True)


async def relay_role(redis_url: str, iop_url: str, work: Workload, data_dir: str) -> None:
    """Deliver the prefilled backlog with the relay, counting the middle of it."""
    from relay import metrics
    from relay.logs import configure_logging
    from relay.service import Relay, tune_gc

    settings = load(CONFIG, env=relay_env(redis_url, iop_url, free_port(), Path(data_dir)))
    configure_logging("warning")
    relay = Relay(settings)
    tune_gc()
    window = Window(work.events)
    await relay.start()
    try:
        while window.last < 0:
            await asyncio.sleep(0.02)  # the relay delivers; this only watches its own counter
            window.update(int(metrics.DELIVERED.value("locations")))
    finally:
        await relay.stop()


def run_counted(label: str, argv: list[str], workdir: Path) -> tuple[int, int]:
    """Run one role under callgrind; (events counted, instructions counted)."""
    out_file = workdir / f"callgrind.{label}.out"
    cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out_file}", *argv]
    done = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), timeout=3600)
    text = done.stdout + done.stderr
    events = re.search(r"EVENTS (\d+)", text)
    collected = re.search(r"Collected : (\d+)", text)
    if done.returncode != 0 or events is None or collected is None:
        raise RuntimeError(f"{label} failed ({done.returncode}):\n{text[-3000:]}")
    return int(events.group(1)), int(collected.group(1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keys", type=int, default=2000)
    p.add_argument("--per-key", type=int, default=3)
    p.add_argument("--repeat", type=int, default=1, help="runs of each role; the lowest count per event is kept")
    p.add_argument("--receiver-cpu", type=int, default=0)
    p.add_argument("--role", choices=["relay", "bare"], help=argparse.SUPPRESS)
    p.add_argument("--redis-url", help=argparse.SUPPRESS)
    p.add_argument("--iop-url", help=argparse.SUPPRESS)
    p.add_argument("--data-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    work = Workload("I", args.keys, args.per_key)
    if args.role == "relay":
        asyncio.run(relay_role(args.redis_url, args.iop_url, work, args.data_dir))
        return 0
    if args.role == "bare":
        window = Window(work.events)
        asyncio.run(bare_client(args.iop_url, work, progress=window.update))
        return 0
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="relay-ins-", dir="/tmp") as tmp:
        return measure(args, work, Path(tmp))


def _reset(redis_url: str, settings: Settings, work: Workload) -> None:
    """An empty database and the same backlog again for the next repeat."""
    client = redis.Redis.from_url(redis_url)
    try:
        client.flushall()
    finally:
        client.close()
    asyncio.run(_prefill_store(redis_url, settings, work))


def measure(args: argparse.Namespace, work: Workload, workdir: Path) -> int:
    server = EmbeddedRedis(workdir / "redis", fsync="everysec")
    asyncio.run(server.start())
    receiver: Server | None = None
    try:
        port = free_port()
        receiver = start_server("receiver", [python(), "-m", "bench.receiver", "--port", str(port)], clean_env(),
                                port, workdir / "receiver.log", {args.receiver_cpu})  # fmt: skip
        iop_url = f"http://127.0.0.1:{port}{IOP_PREFIX}"
        settings = load(CONFIG, env=relay_env(server.url, iop_url, 0, workdir / "data"))
        asyncio.run(_prefill_store(server.url, settings, work))
        me = [python(), str(Path(__file__).resolve()), "--keys", str(args.keys), "--per-key", str(args.per_key)]
        relay_argv = [*me, "--role", "relay", "--redis-url", server.url, "--iop-url", iop_url,
                      "--data-dir", str(workdir / "data")]  # fmt: skip
        t0 = time.monotonic()
        relays: list[tuple[int, int]] = []
        bares: list[tuple[int, int]] = []
        for n in range(args.repeat):
            if n:
                _reset(server.url, settings, work)
            relays.append(run_counted("relay", relay_argv, workdir))
            bares.append(run_counted("bare", [*me, "--role", "bare", "--iop-url", iop_url], workdir))
            print(f"  run {n + 1}: relay {relays[-1][1] / relays[-1][0]:,.0f}, bare {bares[-1][1] / bares[-1][0]:,.0f} "
                  "instructions per event", file=sys.stderr, flush=True)  # fmt: skip
        relay = min(relays, key=lambda r: r[1] / r[0])
        bare = min(bares, key=lambda r: r[1] / r[0])
    finally:
        if receiver is not None:
            receiver.stop()
        asyncio.run(server.stop())
    per_relay, per_bare = relay[1] / relay[0], bare[1] / bare[0]
    ratio = per_bare / per_relay
    print("instructions per delivered event (bench/instructions.py, callgrind; the middle 75 % of each run"
          + (f"; lowest of {args.repeat} runs)" if args.repeat > 1 else ")"))  # fmt: skip
    print(f"  events: Location PUT, {args.keys} keys x {args.per_key}, {CONCURRENCY} in flight, receiver on CPU "
          f"{args.receiver_cpu}")  # fmt: skip
    print()
    print(f"{'run':40} {'events':>8} {'instructions':>15} {'per event':>10}")
    print(f"{'(a) relay, prefilled backlog':40} {relay[0]:>8,} {relay[1]:>15,} {per_relay:>10,.0f}")
    print(f"{'(c) bare aiohttp client':40} {bare[0]:>8,} {bare[1]:>15,} {per_bare:>10,.0f}")
    verdict = "met" if ratio >= TARGET_RATIO else "missed"
    print(f"  (c)/(a) = {ratio:.0%}: the relay's cost per event is {1 / ratio:.2f}x the bare client's")
    print(f"  forward.py's target (>= {TARGET_RATIO:.0%} of the bare client), counted in instructions: {verdict}")
    print(f"  total {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
