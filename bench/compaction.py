"""Compaction of a backlog: EVSE status PATCHes piled up while the IOP is down, drained when it comes back.

  1. the relay (``python -m relay serve``, compaction on: the shipped config) and the receiver start; 1,000
     Locations x 10 EVSEs are PUT and delivered;
  2. the IOP goes down (the receiver stops listening and cuts its connections: connection refused);
  3. --events (1,000,000) EVSE status PATCHes, round-robin over the 10,000 EVSEs, are accepted through the
     ingress (POST /batch, 1,000 operations each, one sender per slice of the Locations so each Location's
     PATCHes stay in order); Redis used memory and the relay's RSS are sampled throughout;
  4. the IOP comes back: requests to drain (target <= one per EVSE, 10,000), time to drain (IOP back ->
     streams empty, nothing pending), and the check: the receiver's final status of every EVSE (its PUTs
     and PATCHes applied in the order it took them) equals the relay's stored state, nothing dead-lettered.

The receiver is bench/receiver.py's, keeping the state instead of a log (``--role receiver``: a control
port that stays up, an IOP port that can go down). The relay probes the IOP at most every 2 s
(``forwarder.probe_max_s``) so the bench does not wait up to the shipped 60 s for the probe.

Usage: python bench/compaction.py [--events 1000000] [--senders 4] [--batch 1000] [--relay-env K=V ...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: python bench/compaction.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp
import msgspec
import redis
from aiohttp import web

from bench._common import BATCH_PATH, REPO, TOKEN, Server, clean_env, free_port, python, start_server
from bench.receiver import OCPI_OK, Receiver
from relay.config import MODULES
from relay.embedded_redis import EmbeddedRedis
from relay.ordering import location_key, shard_of
from relay.store import keys as K

CONFIG = REPO / "config" / "relay.toml"
LOCATIONS, EVSES = 1000, 10
STATUSES = ("AVAILABLE", "CHARGING", "BLOCKED", "OUTOFORDER", "RESERVED", "INOPERATIVE")
IOP_PREFIX = "/ocpi/2.2.1/locations/FR/AB1/"
_JSON = "application/json"


# -- the receiver: state per EVSE, an IOP port that goes down and comes back -------------------------


class StateReceiver(Receiver):
    """bench/receiver.py's receiver applying what it takes: (location, evse uid) → status."""

    def __init__(self) -> None:
        super().__init__()
        self.status: dict[str, str] = {}  # "LOC/UID" → status
        self.count = 0
        self.down = False

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if self.down:  # a keep-alive connection opened before the IOP went down: cut it
            if request.transport is not None:
                request.transport.close()
            return web.Response(status=503)
        body = await request.read()
        self.count += 1
        ids = request.raw_path.removeprefix(IOP_PREFIX).split("/")
        doc: dict[str, Any] = msgspec.json.decode(body) if body else {}
        if request.method == "PUT" and len(ids) == 1:
            for evse in doc.get("evses") or []:
                self.status[f"{ids[0]}/{evse['uid']}"] = evse["status"]
        elif len(ids) == 2 and "status" in doc:
            self.status[f"{ids[0]}/{ids[1]}"] = doc["status"]
        return web.Response(body=OCPI_OK, content_type=_JSON)


async def serve_receiver(control_port: int, iop_port: int) -> None:
    receiver = StateReceiver()
    loop = asyncio.get_running_loop()
    iop = web.Server(receiver.handle, access_log=None)
    sites: list[asyncio.base_events.Server] = []

    async def up() -> None:
        receiver.down = False
        sites.append(await loop.create_server(iop, "127.0.0.1", iop_port, backlog=1024, reuse_address=True))

    async def control(request: web.BaseRequest) -> web.StreamResponse:
        if request.raw_path == "/_bench/down":
            receiver.down = True
            while sites:
                sites.pop().close()
        elif request.raw_path == "/_bench/up":
            await up()
        elif request.raw_path == "/_bench/state":
            return web.Response(body=msgspec.json.encode({"count": receiver.count, "status": receiver.status}))
        return web.Response(body=b'{"status":"ok"}', content_type=_JSON)

    await up()
    ctl = await loop.create_server(web.Server(control, access_log=None), "127.0.0.1", control_port)
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.Event().wait()
    ctl.close()


def receiver_call(port: int, what: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_bench/{what}", timeout=60) as resp:
        return msgspec.json.decode(resp.read())


# -- load ----------------------------------------------------------------------------------------------


def location_doc(i: int) -> dict[str, Any]:
    data: dict[str, Any] = msgspec.json.decode((REPO / "examples" / "location.json").read_bytes())
    first = data["evses"][0]
    data["id"] = f"L{i}"
    data["evses"] = [
        {**first, "uid": f"E{j}", "evse_id": f"FR*AB1*E{i:05d}{j:02d}", "status": "AVAILABLE"} for j in range(EVSES)
    ]
    return data


def stamp(n: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(1_780_000_000 + n))


@dataclass
class Load:
    accepted: int = 0
    refused: int = 0
    seconds: float = 0.0


async def send_batches(base: str, ops_of: list[list[dict[str, Any]]], senders: int) -> Load:
    """Each sender posts its own batches one after the other (a Location's operations stay in order)."""
    load = Load()
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": _JSON}
    timeout = aiohttp.ClientTimeout(total=600)
    t0 = time.monotonic()
    async with aiohttp.ClientSession(timeout=timeout) as http:

        async def sender(batches: list[list[dict[str, Any]]]) -> None:
            for ops in batches:
                data = msgspec.json.encode({"operations": ops})
                async with http.post(base + BATCH_PATH, data=data, headers=headers) as resp:
                    answer = msgspec.json.decode(await resp.read())
                ok = answer.get("data", {}).get("accepted", 0) if resp.status == 200 else 0
                load.accepted += ok
                load.refused += len(ops) - ok

        slices: list[list[list[dict[str, Any]]]] = [[] for _ in range(senders)]
        for i, ops in enumerate(ops_of):
            slices[i % senders].append(ops)
        await asyncio.gather(*(sender(s) for s in slices))
    load.seconds = time.monotonic() - t0
    return load


def status_batches(events: int, senders: int, batch: int) -> list[list[dict[str, Any]]]:
    """Event n: EVSE n % 10 000; sender s owns the Locations l with l % senders == s; batches per sender."""
    per_sender: list[list[dict[str, Any]]] = [[] for _ in range(senders)]
    evses = LOCATIONS * EVSES
    for n in range(events):
        k = n % evses
        loc, evse = k // EVSES, k % EVSES
        op = {
            "method": "PATCH",
            "path": f"/ingress/2.2.1/locations/FR/AB1/L{loc}/E{evse}",
            "body": {"status": STATUSES[(n // evses + loc + evse) % len(STATUSES)], "last_updated": stamp(n)},
        }
        per_sender[loc % senders].append(op)
    out: list[list[dict[str, Any]]] = []
    chunks = [[ops[i : i + batch] for i in range(0, len(ops), batch)] for ops in per_sender]
    for r in range(max(len(c) for c in chunks)):  # interleave the senders' batches: out[i] goes to sender i % senders
        out += [c[r] if r < len(c) else [] for c in chunks]
    return out


# -- samplers ------------------------------------------------------------------------------------------


@dataclass
class Peaks:
    rss_kb: int = 0
    redis_bytes: int = 0
    samples: list[tuple[float, int, int]] = field(default_factory=list)


class Sampler:
    """The relay's VmRSS and Redis used_memory every half second, in a thread."""

    def __init__(self, pid: int, client: redis.Redis) -> None:
        self.pid, self.client = pid, client
        self.peaks = Peaks()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = rss_kb(self.pid)
            used = int(self.client.info("memory")["used_memory"])
            self.peaks.rss_kb = max(self.peaks.rss_kb, rss)
            self.peaks.redis_bytes = max(self.peaks.redis_bytes, used)
            self.peaks.samples.append((time.monotonic(), rss, used))
            self._stop.wait(0.5)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def rss_kb(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def backlog(client: redis.Redis, shards: int) -> tuple[int, int, int]:
    """(entries left in the streams, pending, dead letters)."""
    entries = pending = dead = 0
    for m in MODULES:
        for s in range(shards):
            entries += int(client.xlen(K.stream_key(m, s)))
            with contextlib.suppress(redis.ResponseError):
                pending += int(client.xpending(K.stream_key(m, s), K.GROUP)["pending"])
            dead += int(client.xlen(K.dlq_key(m, s)))
    return entries, pending, dead


def relay_statuses(client: redis.Redis, shards: int) -> dict[str, str]:
    out: dict[str, str] = {}
    for i in range(LOCATIONS):
        shard = shard_of(location_key("FR", "AB1", f"L{i}"), shards)
        raw: Any = client.hget(K.state_key("locations", shard), f"FR:AB1:L{i}")
        doc = msgspec.json.decode(raw.partition(b"|")[2]) if raw else {}
        for evse in doc.get("evses") or []:
            out[f"L{i}/{evse['uid']}"] = evse["status"]
    return out


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.split()[-1])
    return 0.0


# -- the run -------------------------------------------------------------------------------------------


def wait(cond: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(0.2)


def run(args: argparse.Namespace, workdir: Path) -> int:
    server = EmbeddedRedis(workdir / "redis", fsync="everysec")
    asyncio.run(server.start())
    procs: list[Server] = []
    try:
        client = redis.Redis.from_url(server.url)
        client.config_set("auto-aof-rewrite-percentage", 0)
        ctl, iop = free_port(), free_port()
        argv = [python(), "-m", "bench.compaction", "--role", "receiver", "--control-port", str(ctl),
                "--iop-port", str(iop)]  # fmt: skip
        procs.append(start_server("receiver", argv, clean_env(), ctl, workdir / "receiver.log", None))
        port = free_port()
        env = clean_env(
            RELAY_REDIS_URL=server.url, RELAY_IOP_URL=f"http://127.0.0.1:{iop}/ocpi/2.2.1", RELAY_IOP_TOKEN="bench",
            RELAY_INGRESS_TOKEN=TOKEN, RELAY_INGRESS_LISTEN=f"127.0.0.1:{port}", RELAY_OCPI_LISTEN="127.0.0.1:0",
            RELAY_LOG_LEVEL="warning", RELAY_STORAGE_DIR=str(workdir / "relay-data"),
            RELAY_FORWARDER_PROBE_MAX_S="2", RELAY_INGRESS_MAX_BATCH_ITEMS=str(max(5000, args.batch)),
        )  # fmt: skip
        env.update(kv.split("=", 1) for kv in args.relay_env)
        relay = start_server("relay", [python(), "-m", "relay", "serve", "--config", str(CONFIG)], env, port,
                             workdir / "relay.log", None)  # fmt: skip
        procs.append(relay)
        base = f"http://127.0.0.1:{port}"
        shards = int(client.hget(K.META_KEY, K.SHARDS_FIELD) or 4)

        # 1. the Locations, delivered
        puts = [[{"method": "PUT", "path": f"/ingress/2.2.1/locations/FR/AB1/L{i}", "body": location_doc(i)}
                 for i in range(j, min(j + 100, LOCATIONS))] for j in range(0, LOCATIONS, 100)]  # fmt: skip
        loaded = asyncio.run(send_batches(base, puts, 1))
        assert loaded.accepted == LOCATIONS, loaded
        wait(lambda: backlog(client, shards)[0] == 0, 120, "Locations delivered")
        # 2. the IOP down
        receiver_call(ctl, "down")
        before = receiver_call(ctl, "state")["count"]
        # 3. the backlog
        batches = status_batches(args.events, args.senders, args.batch)
        with Sampler(relay.pid, client) as sampler:
            load = asyncio.run(send_batches(base, batches, args.senders))
            time.sleep(args.idle)
            held = backlog(client, shards)
            # 4. the IOP back
            receiver_call(ctl, "up")
            up_at = time.monotonic()
            wait(lambda: backlog(client, shards)[:2] == (0, 0), args.drain_timeout, "backlog drained")
            drain_s = time.monotonic() - up_at
        state = receiver_call(ctl, "state")
        requests = state["count"] - before
        theirs: dict[str, str] = state["status"]
        mine = relay_statuses(client, shards)
        wrong = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
        dead = backlog(client, shards)[2]
        compacted = metric(port, "relay_compacted_total")
        peaks = sampler.peaks
        ok = not wrong and not dead and load.refused == 0 and len(mine) == LOCATIONS * EVSES
        print(report(args, load, held, requests, drain_s, compacted, peaks, wrong, dead, len(mine)))
        return 0 if ok else 1
    finally:
        for p in reversed(procs):
            p.stop()
        asyncio.run(server.stop())


def report(args: argparse.Namespace, load: Load, held: tuple[int, int, int], requests: int, drain_s: float,
           compacted: float, peaks: Peaks, wrong: list[str], dead: int, objects: int) -> str:  # fmt: skip
    target = LOCATIONS * EVSES
    check = "ok: every EVSE's status at the IOP equals the relay's" if not wrong else (
        f"FAIL: {len(wrong)} EVSEs differ, e.g. {wrong[:3]}")  # fmt: skip
    rows = [
        ("events accepted (EVSE status PATCHes)", f"{load.accepted:,} in {load.seconds:.1f} s "
         f"({load.accepted / load.seconds:,.0f}/s), refused {load.refused:,}"),
        ("EVSEs / Locations", f"{LOCATIONS * EVSES:,} / {LOCATIONS:,}"),
        ("backlog when the IOP came back", f"{held[0]:,} entries in the streams, {held[1]:,} read (pending)"),
        ("IOP requests to drain", f"{requests:,} (target <= {target:,}: {'PASS' if requests <= target else 'MISS'})"),
        ("entries compacted (relay_compacted_total)", f"{compacted:,.0f}"),
        ("time to drain (IOP back -> streams empty)", f"{drain_s:.1f} s"),
        ("Redis used memory, peak", f"{peaks.redis_bytes / 2**20:,.0f} MiB"),
        ("relay RSS, peak (backlog and drain)", f"{peaks.rss_kb / 1024:,.0f} MB"),
        ("final state", f"{check}; {objects:,} EVSEs compared; dead letters {dead}"),
    ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    head = f"compaction benchmark (bench/compaction.py): --events {args.events:,}, {args.senders} senders, " \
        f"batches of {args.batch}" + (f", relay env {' '.join(args.relay_env)}" if args.relay_env else "")  # fmt: skip
    return "\n".join([head, "-" * len(head), *(f"{k:<{width}}  {v}" for k, v in rows)])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", type=int, default=1_000_000, help="EVSE status PATCHes while the IOP is down")
    p.add_argument("--senders", type=int, default=4, help="concurrent batch senders (each owns a slice of Locations)")
    p.add_argument("--batch", type=int, default=1000, help="operations per POST /batch")
    p.add_argument("--idle", type=float, default=3.0, help="seconds the IOP stays down after the last 202")
    p.add_argument("--drain-timeout", type=float, default=900.0)
    p.add_argument("--relay-env", action="append", default=[], metavar="K=V", help="extra env for the relay")
    p.add_argument("--role", choices=["bench", "receiver"], default="bench", help=argparse.SUPPRESS)
    p.add_argument("--control-port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--iop-port", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.role == "receiver":
        asyncio.run(serve_receiver(args.control_port, args.iop_port))
        return 0
    with tempfile.TemporaryDirectory(prefix="relay-cmp-", dir="/tmp") as tmp:  # short path: unix socket
        return run(args, Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
