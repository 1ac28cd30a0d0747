"""Delivery latency: from the ingress's 202 to the receiver getting the event, at a steady rate.

The relay (``python -m relay serve``, the shipped config, forwarder concurrency 64, log level warning)
runs on the bench's embedded Redis (relay.embedded_redis.EmbeddedRedis: unix socket, AOF with
``--fsync``, ``always`` by default as shipped). A receiver process (``--role receiver``, below) stands
in for the IOP: it records each request's arrival (wall clock, ``time.time()``, the same clock in
every process) and X-Correlation-ID, then answers 200 + OCPI 1000 after ``--delay-ms`` (20 ms). The
load generator, in the bench's own process, sends ``--rate`` (1,000) Location PUTs a second for
``--duration`` (20 s) on a fixed schedule (open loop: a slow answer does not slow the sending), each
with its own X-Correlation-ID (the relay forwards it) and its own ``name`` (an identical PUT would be
stored once), spread over ``--keys`` (1,000) Locations, so
each object is updated about once a second. The first ``--warmup`` seconds (2) are left out.

Latency of an event = the receiver's arrival time - the time its 202 was read by the load generator
(it can be slightly negative: the forwarder may have sent it before the 202 was read). The target
(issue 16): p99 at most 50 ms above the receiver's 20 ms answer time, i.e. <= 70 ms. The check
column also needs every accepted event delivered exactly once and in order per Location.

Usage: python bench/latency.py [--rate 1000] [--duration 20] [--keys 1000] [--delay-ms 20] [--fsync always]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python bench/latency.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp
import msgspec
from aiohttp import web

from bench._common import LOCATION_PATH, REPO, TOKEN, clean_env, free_port, location_template, python, start_server
from relay.embedded_redis import EmbeddedRedis

CONFIG = REPO / "config" / "relay.toml"
HERE = Path(__file__).resolve()
OCPI_OK = b'{"status_code":1000,"status_message":"Success","timestamp":"2026-01-01T00:00:00Z"}'
TARGET_ABOVE_MS = 50.0


# -- the receiver (its own process) ------------------------------------------------------------------


async def receive(port: int, delay_s: float) -> None:
    """Record (path, X-Correlation-ID, arrival) of each request; answer after ``delay_s``."""
    records: list[tuple[str, str, float]] = []

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        now = time.time()
        path = request.raw_path
        if path == "/healthz":
            return web.Response(body=b'{"status":"ok"}', content_type="application/json")
        if path == "/_lat/dump":
            return web.Response(body=msgspec.json.encode(records), content_type="application/json")
        if path == "/_lat/count":
            return web.Response(body=str(len(records)).encode(), content_type="text/plain")
        await request.read()
        records.append((path, request.headers.get("X-Correlation-ID", ""), now))
        await asyncio.sleep(delay_s)
        return web.Response(body=OCPI_OK, content_type="application/json")

    server = web.Server(handle, access_log=None)
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(server, "127.0.0.1", port, backlog=1024, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    srv.close()
    await server.shutdown(1.0)


# -- the load ----------------------------------------------------------------------------------------


class Sent(msgspec.Struct):
    seq: int
    loc: str
    due: float  # monotonic, scheduled
    sent_at: float  # wall clock, request started
    acked_at: float  # wall clock, 202 read (0: not accepted)


async def load(base: str, rate: float, duration: float, keys: int) -> list[Sent]:
    """Open-loop PUTs: event i is due at start + i / rate, whatever the answers to the others."""
    head, tail = location_template()
    # Each update of a Location differs (its name carries the sequence number): an identical PUT of an
    # object is stored once (the ingress answers a duplicate without a new event).
    mark = b'"name":"'
    assert mark in tail, "examples/location.json has a name after its id"
    pre, post = tail.split(mark, 1)
    post = post.split(b'"', 1)[1]
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    out: list[Sent] = []

    async def one(session: aiohttp.ClientSession, seq: int, due: float) -> None:
        loc = f"LAT{seq % keys}"
        rec = Sent(seq, loc, due, time.time(), 0.0)
        try:
            body = head + loc.encode() + pre + mark + f"lat {seq}".encode() + b'"' + post
            async with session.put(base + LOCATION_PATH + loc, data=body,
                                   headers={**headers, "X-Correlation-ID": f"lat-{seq}"}) as resp:  # fmt: skip
                await resp.read()
                if resp.status == 202:
                    rec.acked_at = time.time()
        except (aiohttp.ClientError, TimeoutError):
            pass
        out.append(rec)

    connector = aiohttp.TCPConnector(limit=256)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
        tasks: list[asyncio.Task[None]] = []
        start = time.monotonic()
        n = int(rate * duration)
        for seq in range(n):
            due = start + seq / rate
            if (wait := due - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            tasks.append(asyncio.create_task(one(session, seq, due)))
        await asyncio.gather(*tasks)
    return out


def _pct(values: list[float], p: float) -> float:
    return values[min(len(values) - 1, int(len(values) * p))] if values else float("nan")


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as r:
        body: bytes = r.read()
        return body


async def bench(args: argparse.Namespace, workdir: Path) -> int:
    redis_server = EmbeddedRedis(workdir / "redis", fsync=args.fsync)
    await redis_server.start()
    servers = []
    try:
        rport = free_port()
        receiver = start_server(
            "receiver", [python(), str(HERE), "--role", "receiver", "--port", str(rport),
                         "--delay-ms", str(args.delay_ms)],
            clean_env(), rport, workdir / "receiver.log", None,
        )  # fmt: skip
        servers.append(receiver)
        port = free_port()
        env = clean_env(
            RELAY_REDIS_URL=redis_server.url, RELAY_IOP_URL=f"http://127.0.0.1:{rport}/ocpi/2.2.1",
            RELAY_IOP_TOKEN="bench-iop-token", RELAY_INGRESS_TOKEN=TOKEN, RELAY_INGRESS_LISTEN=f"127.0.0.1:{port}",
            RELAY_OCPI_LISTEN="127.0.0.1:0", RELAY_LOG_LEVEL="warning", RELAY_FORWARDER_CONCURRENCY="64",
            RELAY_STORAGE_DIR=str(workdir / "relay-data"), RELAY_LOOP=args.loop,
        )  # fmt: skip
        relay = start_server("relay", [python(), "-m", "relay", "serve", "--config", str(CONFIG)], env, port,
                             workdir / "relay.log", None)  # fmt: skip
        servers.append(relay)
        base = f"http://127.0.0.1:{port}"
        t0 = time.monotonic()
        sent = await load(base, args.rate, args.duration, args.keys)
        load_s = time.monotonic() - t0
        accepted = [s for s in sent if s.acked_at]
        for _ in range(300):  # up to 60 s for the backlog, if any, to reach the receiver
            if int(_get(f"http://127.0.0.1:{rport}/_lat/count")) >= len(accepted):
                break
            await asyncio.sleep(0.2)
        await asyncio.sleep(0.5)  # duplicates, if any, arrive too
        records: list[tuple[str, str, float]] = msgspec.json.decode(_get(f"http://127.0.0.1:{rport}/_lat/dump"))
    finally:
        for srv in reversed(servers):
            srv.stop()
        await redis_server.stop()
    failed = report(args, sent, records, load_s)
    if failed:
        for srv in servers:
            print(f"--- {srv.name} log (end) ---\n{srv.log_tail()}", file=sys.stderr)
    return failed


def report(args: argparse.Namespace, sent: list[Sent], records: list[tuple[str, str, float]], load_s: float) -> int:
    arrived: dict[int, list[float]] = defaultdict(list)
    order: dict[str, list[int]] = defaultdict(list)
    for path, corr, at in records:
        if corr.startswith("lat-"):
            seq = int(corr[4:])
            arrived[seq].append(at)
            order[path].append(seq)
    accepted = [s for s in sent if s.acked_at]
    missing = [s.seq for s in accepted if s.seq not in arrived]
    dups = sum(len(v) - 1 for v in arrived.values() if len(v) > 1)
    disorder = sum(1 for seqs in order.values() for a, b in zip(seqs, seqs[1:], strict=False) if b < a)
    start = min(s.due for s in sent)
    measured = [s for s in accepted if s.due - start >= args.warmup and s.seq in arrived]
    lat = sorted((arrived[s.seq][0] - s.acked_at) * 1000 for s in measured)
    ingress = sorted((s.acked_at - s.sent_at) * 1000 for s in measured)
    target = args.delay_ms + TARGET_ABOVE_MS
    p99 = _pct(lat, 0.99)
    ok = not missing and not dups and not disorder and len(accepted) == len(sent)
    check = "ok" if ok else f"FAIL (missing {len(missing)}, duplicates {dups}, out of order {disorder}, " \
        f"refused {len(sent) - len(accepted)})"  # fmt: skip
    print()
    print(f"relay delivery latency: {args.rate:.0f} events/s for {args.duration:.0f} s over {args.keys} Locations, "
          f"receiver answers in {args.delay_ms:.0f} ms, fsync {args.fsync}, loop {args.loop}, "
          f"{os.cpu_count()} CPUs (shared, unpinned)")  # fmt: skip
    head = (f"{'events':>7} {'rate/s':>7} {'202 p50':>8} {'202 p99':>8} {'lat p50':>8} {'lat p90':>8} "
            f"{'lat p99':>8} {'lat max':>8} {'target p99':>11} {'result':>7}  check")  # fmt: skip
    print(head)
    print("-" * len(head))
    verdict = "MEETS" if p99 <= target else "MISSES"
    print(f"{len(measured):>7} {len(sent) / load_s:>7.0f} {_pct(ingress, 0.5):>8.1f} {_pct(ingress, 0.99):>8.1f} "
          f"{_pct(lat, 0.5):>8.1f} {_pct(lat, 0.9):>8.1f} {p99:>8.1f} {lat[-1] if lat else 0:>8.1f} "
          f"{'<= ' + format(target, '.0f'):>11} {verdict:>7}  {check}")  # fmt: skip
    print(f"  ms; lat = receiver arrival - 202 read by the client (the first {args.warmup:.0f} s left out); "
          f"202 = request sent -> 202 read")  # fmt: skip
    return 0 if ok else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=1000.0, help="events per second (default 1000)")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of load (default 20)")
    p.add_argument("--warmup", type=float, default=2.0, help="first seconds left out of the figures (default 2)")
    p.add_argument("--keys", type=int, default=1000, help="distinct Locations (default 1000)")
    p.add_argument("--delay-ms", type=float, default=20.0, help="the receiver's answer time (default 20)")
    p.add_argument("--fsync", choices=["always", "everysec"], default="always", help="embedded Redis appendfsync")
    p.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio", help="the relay's event loop")
    p.add_argument("--role", choices=["bench", "receiver"], default="bench", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role == "receiver":
        asyncio.run(receive(args.port, args.delay_ms / 1000))
        return 0
    with tempfile.TemporaryDirectory(prefix="relay-lat-", dir="/tmp") as tmp:  # short path: unix socket
        with contextlib.suppress(KeyboardInterrupt):
            return asyncio.run(bench(args, Path(tmp)))
    return 130


if __name__ == "__main__":
    sys.exit(main())
