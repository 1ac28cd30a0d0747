"""Redis memory with retention: after N delivered Sessions and CDRs (each its own object), and after a sweep.

Without retention every delivered object leaves a field behind for ever (the ``delivered`` marker of each
Session and CDR, the watermarks of sessions that never get a CDR, the Session and CDR state and its index);
with it, a sweep once the windows have passed brings Redis's used memory back near where it started.

Method: an embedded Redis (relay.embedded_redis, unix socket, AOF everysec, no maxmemory), the receiver
(bench/receiver.py) as the IOP, and ``relay serve`` with its own sweeper off ([retention] windows 0: the
bench sweeps itself, once, when it chooses). The load goes through the ingress like bench/loadgen.py's
(aiohttp, keep-alive connections, ``POST /batch``), but with --events/2 Session PUTs (distinct ids) and
--events/2 CDR POSTs (distinct ids): CDR i names session i for even i (its delivery forgets the session's
watermarks, finish.lua), none for odd i (those sessions never get a CDR: their watermarks stay). Then:

  1. used_memory before the load (relay started: streams and groups exist);
  2. used_memory once every event is delivered (the receiver has them all, every stream empty);
  3. used_memory after a sweep of every shard (relay.retention.Sweeper, the relay's own code) with
     markers_s = 1, sessions_s = 0 (markers and watermarks only), run 2 s after the last event;
  4. used_memory after a second sweep with sessions_s = 1 too (the Session and CDR states).

Prints a table (MiB, and bytes per event left behind) and the fields per hash before and after the sweep.
"Flat": (4) within 10 % of (1)'s used memory, or 1 MiB, whichever is larger.

Usage: python bench/memory.py [--events 1000000] [--batch 2000] [--connections 4]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python bench/memory.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp
import msgspec
import redis

from bench._common import BATCH_PATH, PREFIX, REPO, TOKEN, Server, clean_env, free_port, python, start_server
from bench._common import stream_entries as count_entries
from relay.config import load
from relay.embedded_redis import EmbeddedRedis
from relay.retention import Sweeper
from relay.store import Store, connect
from relay.store import keys as K

CONFIG = REPO / "config" / "relay.toml"
DATA = REPO / "tests" / "data"
IOP_TOKEN = "bench-iop-token"
MIB = 1024 * 1024


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def templates() -> tuple[dict[str, object], dict[str, object]]:
    """The test data's finished Session and CDR of FR/AB1 (they pass GIREVE's rules), last_updated now."""
    session = msgspec.json.decode((DATA / "session_example_2_short_finished.json").read_bytes())
    cdr = msgspec.json.decode((DATA / "cdr_example.json").read_bytes())
    session["last_updated"] = cdr["last_updated"] = _now()
    return session, cdr


def batches(events: int, size: int) -> list[bytes]:
    """The load as /batch bodies: session i, then CDR i, for i < events / 2."""
    session, cdr = templates()
    ops: list[dict[str, object]] = []
    for i in range(events // 2):
        sid = f"S{i}"
        ops.append({"method": "PUT", "path": f"{PREFIX}/sessions/FR/AB1/{sid}", "body": {**session, "id": sid}})
        body = {**cdr, "id": f"C{i}"}
        if i % 2 == 0:
            body["session_id"] = sid
        ops.append({"method": "POST", "path": f"{PREFIX}/cdrs", "body": body})
    return [msgspec.json.encode({"operations": ops[i : i + size]}) for i in range(0, len(ops), size)]


async def send(url: str, bodies: list[bytes], connections: int) -> tuple[int, int]:
    """POST every batch, ``connections`` at a time; returns (accepted, refused) items."""
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for b in bodies:
        queue.put_nowait(b)
    totals = Counter[str]()
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}

    async def worker(http: aiohttp.ClientSession) -> None:
        while not queue.empty():
            body = queue.get_nowait()
            async with http.post(url + BATCH_PATH, data=body, headers=headers) as resp:
                reply = msgspec.json.decode(await resp.read())
                if resp.status != 200:
                    raise RuntimeError(f"batch answered {resp.status}: {reply}")
                for item in reply["data"]["results"]:
                    totals["ok" if 200 <= item.get("status", 0) < 300 else "refused"] += 1
                    if totals["refused"] == 1 and not 200 <= item.get("status", 0) < 300:
                        print(f"  refused: {item}", file=sys.stderr)

    async with aiohttp.ClientSession() as http:
        await asyncio.gather(*(worker(http) for _ in range(connections)))
    return totals["ok"], totals["refused"]


def used(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def fields(client: redis.Redis, shards: int) -> dict[str, int]:
    """Fields (members) per kind over every shard."""
    out = Counter[str]()
    for shard in range(shards):
        for name, key in (("delivered", K.delivered_key(shard)), ("session-last", K.session_last_key(shard)),
                          ("session-done", K.session_done_key(shard)), ("accepted", K.accepted_key(shard)),
                          ("dead-last", K.dead_last_key(shard)), ("state:sessions", K.state_key("sessions", shard)),
                          ("state:cdrs", K.state_key("cdrs", shard))):  # fmt: skip
            out[name] += int(client.hlen(key))
        for module in ("sessions", "cdrs"):
            out[f"idx:{module}"] += int(client.zcard(K.index_key(module, shard, "FR", "AB1")))
    return dict(out)


def wait_delivered(client: redis.Redis, receiver: Server, events: int, stall_s: float = 60.0) -> float:
    """Until the receiver has seen ``events`` requests and every stream is empty; returns the seconds."""
    t0 = time.monotonic()
    last, moved = -1, time.monotonic()
    url = f"http://127.0.0.1:{receiver.port}/_bench/stats"
    while True:
        with urllib.request.urlopen(url, timeout=10) as resp:
            seen = int(msgspec.json.decode(resp.read())["count"])
        if seen >= events and count_entries(client) == 0:
            return time.monotonic() - t0
        if seen != last:
            last, moved = seen, time.monotonic()
        elif time.monotonic() - moved > stall_s:
            raise RuntimeError(f"delivery stalled at {seen}/{events}")
        time.sleep(0.5)


async def sweep(url: str, shards: int, markers_s: int, sessions_s: int) -> tuple[Counter[str], float]:
    """One sweep of every shard with these windows (the relay's own Sweeper)."""
    env = {"RELAY_REDIS_URL": url, "RELAY_INGRESS_TOKEN": TOKEN, "RELAY_REDIS_SHARDS": str(shards),
           "RELAY_RETENTION_MARKERS_S": str(markers_s), "RELAY_RETENTION_SESSIONS_S": str(sessions_s)}  # fmt: skip
    settings = load(CONFIG, env=env)
    store = Store(connect(url, settings.redis), settings.redis)
    try:
        t0 = time.monotonic()
        got = await Sweeper(settings, store, lambda: range(shards)).sweep()
        return got, time.monotonic() - t0
    finally:
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=2000, help="operations per POST /batch (<= 5000)")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--shards", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="relay-mem-", dir="/tmp") as tmp:
        run(args, Path(tmp))


def run(args: argparse.Namespace, work: Path) -> None:
    server = EmbeddedRedis(work / "redis", fsync="everysec")
    asyncio.run(server.start())
    client = redis.Redis.from_url(server.url)
    procs: list[Server] = []
    try:
        rport, port = free_port(), free_port()
        receiver = start_server("receiver", [python(), "-m", "bench.receiver", "--port", str(rport)],
                                clean_env(), rport, work / "receiver.log", None)  # fmt: skip
        procs.append(receiver)
        env = clean_env(
            RELAY_REDIS_URL=server.url, RELAY_REDIS_SHARDS=str(args.shards),
            RELAY_IOP_URL=f"http://127.0.0.1:{rport}/ocpi/2.2.1", RELAY_IOP_TOKEN=IOP_TOKEN,
            RELAY_INGRESS_TOKEN=TOKEN, RELAY_INGRESS_LISTEN=f"127.0.0.1:{port}", RELAY_OCPI_LISTEN="127.0.0.1:0",
            RELAY_LOG_LEVEL="warning", RELAY_STORAGE_DIR=str(work / "relay-data"),
            RELAY_RETENTION_MARKERS_S="0", RELAY_RETENTION_SESSIONS_S="0",  # the bench sweeps, once
        )  # fmt: skip
        relay = start_server("relay", [python(), "-m", "relay", "serve", "--config", str(CONFIG)], env, port,
                             work / "relay.log", None)  # fmt: skip
        procs.append(relay)
        time.sleep(1.0)
        start = used(client)
        bodies = batches(args.events, args.batch)
        t0 = time.monotonic()
        ok, refused = asyncio.run(send(f"http://127.0.0.1:{port}", bodies, args.connections))
        load_s = time.monotonic() - t0
        print(f"load: {ok} accepted, {refused} refused in {load_s:.1f} s ({ok / load_s:,.0f} events/s)")
        deliver_s = wait_delivered(client, receiver, ok)
        print(f"delivered in {deliver_s:.1f} s after the load")
        after_delivery, kept = used(client), fields(client, args.shards)
        time.sleep(2.0)  # past the 1 s windows
        # First the markers and watermarks only (what each delivered object left behind besides its state),
        # then the Sessions and CDRs too.
        got, markers_s = asyncio.run(sweep(server.url, args.shards, 1, 0))
        after_markers = used(client)
        more, state_s = asyncio.run(sweep(server.url, args.shards, 1, 1))
        got.update(more)
        after_sweep, left = used(client), fields(client, args.shards)
        rows = [("before the load", start),
                ("after delivery (every event delivered, streams empty)", after_delivery),
                (f"after a sweep of the markers and watermarks ({markers_s:.1f} s)", after_markers),
                (f"after a sweep of the Session and CDR states too ({state_s:.1f} s)", after_sweep)]  # fmt: skip
        report(args.events, ok, rows, kept, left, got)
    finally:
        for p in reversed(procs):
            p.stop()
        client.close()
        asyncio.run(server.stop())


def report(events: int, ok: int, rows: list[tuple[str, int]], kept: dict[str, int], left: dict[str, int],
           got: Counter[str]) -> None:  # fmt: skip
    start, swept = rows[0][1], rows[-1][1]
    print()
    print(f"| Redis used_memory, {events:,} events ({ok // 2:,} Sessions + {ok - ok // 2:,} CDRs) | MiB | "
          "bytes per event above the start |")  # fmt: skip
    print("|---|---:|---:|")
    for name, mem in rows:
        per = f"{(mem - start) / max(ok, 1):.1f}" if name != rows[0][0] else ""
        print(f"| {name} | {mem / MIB:.1f} | {per} |")
    print()
    print("| hash / index | fields after delivery | after the sweeps |")
    print("|---|---:|---:|")
    for name in kept:
        print(f"| {name} | {kept[name]:,} | {left[name]:,} |")
    print()
    print("removed by the sweeps: " + ", ".join(f"{k}={v:,}" for k, v in sorted(got.items())))
    flat = swept - start <= max(0.1 * start, MIB)
    print(f"flat: {'yes' if flat else 'NO'} ({(swept - start) / MIB:+.2f} MiB against the start)")


if __name__ == "__main__":
    main()
