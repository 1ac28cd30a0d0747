"""Recovery after kill -9: how soon delivery resumes when a relay dies under steady load and is restarted.

A relay (``python -m relay serve``, the shipped config: lease_ttl_s 15, claim_idle_s 120, [iop]
connect 5 + request 30 s) delivers a steady load to an in-process receiver (200 + OCPI 1000 after
``--iop-latency-ms``, so that requests are in flight when the relay dies; 100 ms with the default
concurrency of 64 is ~640 requests/s, twice the load, so the backlog of the outage drains before
the held keys are released). The
load is a CSMS: ``--keys`` Locations, each updated in order (update n+1 only after n got its 202),
``--rate`` updates/s in all; refused or unanswered updates are sent again. After ``--warmup`` s the
relay gets SIGKILL and is started again at once (a supervisor's restart, a new replica id); the load
goes on through it. Measured from the kill:

- **takeover**: when the new process holds every shard (each lease seen with a new holder);
- **keys with nothing in flight**: the first delivery after the kill of a key that had no pending
  entry at the kill (target: lease_ttl_s + 1 s);
- **held keys**: the first delivery of a key that had one (pending to the dead process: maybe on the
  wire); they wait until its requests cannot land any more;
- **all delivered**: every update accepted before the kill delivered and acknowledged (left its
  stream; an update the dead process had on the wire reached the receiver anyway) (target: 50 s
  with the defaults).

Then the load stops, the backlog drains, and the check needs every accepted update delivered, in
order per Location (re-sends of one update collapsed), nothing left in the streams.

Usage: python bench/recovery.py [--keys 2000] [--rate 300] [--iop-latency-ms 100] [--warmup 10] [--after 150]
       [--claim-idle-s S]...
The keys with entries in flight are held for the attempt deadline ([iop] connect_timeout_s +
request_timeout_s, 35 s shipped) from the takeover; ``--claim-idle-s`` only changes the setting (it must
exceed that deadline), for comparisons with the old whole-shard wait.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python bench/recovery.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp
import msgspec
import redis
from aiohttp import web

from bench._common import REPO, TOKEN, Server, clean_env, free_port, location_template, python, start_server
from relay.config import MODULES, load
from relay.embedded_redis import EmbeddedRedis
from relay.store import keys as K
from relay.store.entries import decode_entry

CONFIG = REPO / "config" / "relay.toml"
LOC_PATH = "/ingress/2.2.1/locations/FR/AB1/"
IOP_PREFIX = "/ocpi/2.2.1"
OK = b'{"status_code":1000,"status_message":"Success","timestamp":"2026-01-01T00:00:00Z"}'


# -- the receiver (the IOP) and the load (the CSMS), each on its own thread and event loop ----------


@dataclass
class Log:
    """What both sides saw: (monotonic time, location, update number)."""

    arrived: list[tuple[float, str, int]] = field(default_factory=list)
    accepted: list[tuple[float, str, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class Receiver(threading.Thread):
    def __init__(self, log: Log, latency_s: float) -> None:
        super().__init__(daemon=True)
        self.log = log
        self.latency_s = latency_s
        self.port = free_port()
        self.ready = threading.Event()

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        await request.read()
        at = time.monotonic()  # when it came in; applied (logged, in that order) when answered
        if self.latency_s:
            await asyncio.sleep(self.latency_s)  # a request whose sender died meanwhile is applied all the same
        loc = request.path.rstrip("/").rsplit("/", 1)[-1]
        corr = request.headers.get("X-Correlation-ID", "")
        if ":" in corr:
            with self.log.lock:
                self.log.arrived.append((at, loc, int(corr.rsplit(":", 1)[1])))
        return web.Response(body=OK, content_type="application/json")

    def run(self) -> None:
        async def serve() -> None:
            server = web.Server(self.handle, access_log=None)
            runner = web.ServerRunner(server)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            self.ready.set()
            await asyncio.Event().wait()

        asyncio.run(serve())


class Load(threading.Thread):
    """``keys`` Locations updated in order, ``rate`` updates/s over ``conns`` connections."""

    def __init__(self, log: Log, port: int, keys: int, rate: float, conns: int = 16) -> None:
        super().__init__(daemon=True)
        self.log, self.port, self.keys, self.rate, self.conns = log, port, keys, rate, conns
        self.stop = threading.Event()

    async def worker(self, http: aiohttp.ClientSession, w: int) -> None:
        head, tail = location_template()
        base = msgspec.json.decode(head + b"X" + tail)
        mine = [f"R{k}" for k in range(w, self.keys, self.conns)]
        nxt = dict.fromkeys(mine, 1)
        period = self.conns / self.rate
        i = 0
        due = time.monotonic()
        while not self.stop.is_set():
            loc = mine[i % len(mine)]
            n = nxt[loc]
            headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json",
                       "X-Correlation-ID": f"{loc}:{n}"}  # fmt: skip
            url = f"http://127.0.0.1:{self.port}{LOC_PATH}{loc}"
            try:
                # Each update a different object state: the ingress stores an identical resend only once.
                base["id"], base["name"] = loc, f"{loc} update {n}"
                async with http.put(url, data=msgspec.json.encode(base), headers=headers) as r:
                    await r.read()
                    ok = r.status == 202
            except (aiohttp.ClientError, OSError, TimeoutError):
                ok = False
            if ok:
                with self.log.lock:
                    self.log.accepted.append((time.monotonic(), loc, n))
                nxt[loc] = n + 1
                i += 1
                due += period
                await asyncio.sleep(max(0.0, due - time.monotonic()))
            else:  # the relay is down or restarting: the same update again soon
                due = time.monotonic()
                await asyncio.sleep(0.05)

    def run(self) -> None:
        async def go() -> None:
            timeout = aiohttp.ClientTimeout(total=10)
            async with aiohttp.ClientSession(timeout=timeout) as http:
                await asyncio.gather(*(self.worker(http, w) for w in range(self.conns)))

        asyncio.run(go())


# -- the relay --------------------------------------------------------------------------------------


def start_relay(redis_url: str, iop_url: str, port: int, workdir: Path, claim_idle_s: float | None, n: int) -> Server:
    env = clean_env(
        RELAY_REDIS_URL=redis_url,
        RELAY_IOP_URL=iop_url,
        RELAY_IOP_TOKEN="bench-iop-token",
        RELAY_INGRESS_TOKEN=TOKEN,
        RELAY_INGRESS_LISTEN=f"127.0.0.1:{port}",
        RELAY_OCPI_LISTEN="127.0.0.1:0",
        RELAY_STORAGE_DIR=str(workdir / "relay-data"),
        # Every update its own request, so the receiver's log can prove each was delivered in order
        # (compaction would fold a key's backlog into its latest state: bench/compaction.py).
        RELAY_FORWARDER_COMPACT="",
    )
    if claim_idle_s is not None:
        env["RELAY_FORWARDER_CLAIM_IDLE_S"] = str(claim_idle_s)
    argv = [python(), "-m", "relay", "serve", "--config", str(CONFIG)]
    return start_server(f"relay-{n}", argv, env, port, workdir / f"relay-{n}.log", None)


def pending_keys(client: redis.Redis, shards: int) -> set[str]:
    """Locations with an entry pending (read by a relay, not finished) right now."""
    out: set[str] = set()
    for shard in range(shards):
        for module in MODULES:
            stream = K.stream_key(module, shard)
            for row in client.xpending_range(stream, K.GROUP, min="-", max="+", count=100_000):
                sid = row["message_id"]
                rows: list[tuple[bytes, dict[bytes, bytes]]] = client.xrange(stream, sid, sid)  # type: ignore[assignment]
                for rid, fields in rows:
                    if fields:
                        out.add(decode_entry(stream, shard, rid, fields).event.object_id)
    return out


def acked_before(client: redis.Redis, shards: int, epoch_ms: int) -> bool:
    """Whether every entry written before ``epoch_ms`` left its stream (delivered and acknowledged)."""
    for shard in range(shards):
        for module in MODULES:
            rows: list[tuple[bytes, object]] = client.xrange(K.stream_key(module, shard), count=1)  # type: ignore[assignment]
            if rows and int(rows[0][0].split(b"-")[0]) < epoch_ms:
                return False
    return True


def queued(client: redis.Redis, shards: int) -> int:
    return sum(int(client.xlen(K.stream_key(m, s))) for m in MODULES for s in range(shards))


@dataclass
class Result:
    label: str
    hold_s: float
    accepted_before: int = 0
    pending_keys: int = 0
    held_keys: int = 0
    restart_s: float = 0.0
    takeover_s: float = 0.0
    free_s: float = 0.0
    held_s: float = 0.0
    all_s: float = 0.0
    accepted: int = 0
    delivered: int = 0
    duplicates: int = 0
    problems: list[str] = field(default_factory=list)


def first_after(log: Log, t: float, keep: set[str] | None, inside: bool) -> float | None:
    with log.lock:
        rows = list(log.arrived)
    ats = [at for at, loc, _ in rows if at > t and (keep is None or (loc in keep) == inside)]
    return min(ats) if ats else None


def all_delivered(log: Log, until: float) -> bool:
    with log.lock:
        wanted = {(loc, n) for at, loc, n in log.accepted if at <= until}
        got = {(loc, n) for _, loc, n in log.arrived}
    return wanted <= got


def run(args: argparse.Namespace, workdir: Path, claim_idle_s: float | None) -> Result:
    settings = load(CONFIG, env={"RELAY_INGRESS_TOKEN": TOKEN})
    shards = settings.redis.shards
    hold_s = settings.iop.connect_timeout_s + settings.iop.request_timeout_s  # the takeover hold (reader.py)
    label = "shipped config" if claim_idle_s is None else f"claim_idle_s={claim_idle_s:g}"
    res = Result(label, hold_s)
    server = EmbeddedRedis(workdir / "redis", fsync="everysec")
    asyncio.run(server.start())
    client = redis.Redis.from_url(server.url)
    log = Log()
    receiver = Receiver(log, args.iop_latency_ms / 1000)
    receiver.start()
    receiver.ready.wait(10)
    iop_url = f"http://127.0.0.1:{receiver.port}{IOP_PREFIX}"
    port = free_port()
    relay = start_relay(server.url, iop_url, port, workdir, claim_idle_s, 1)
    load_thread = Load(log, port, args.keys, args.rate)
    try:
        load_thread.start()
        time.sleep(args.warmup)
        relay.proc.send_signal(signal.SIGKILL)
        relay.proc.wait()
        t_kill = time.monotonic()
        with log.lock:
            res.accepted_before = len(log.accepted)
        leases = [client.get(K.lease_key(s)) for s in range(shards)]  # the dead process's
        t_epoch_ms = int(time.time() * 1000)
        taken: dict[int, float] = {}
        busy = pending_keys(client, shards)
        res.pending_keys = len(busy)
        relay = start_relay(server.url, iop_url, port, workdir, claim_idle_s, 2)
        res.restart_s = time.monotonic() - t_kill
        deadline = t_kill + args.after
        firsts: dict[str, float | None] = {}
        while time.monotonic() < deadline:
            held = sum(int(client.hlen(K.holds_key(s))) for s in range(shards))
            res.held_keys = max(res.held_keys, held)
            now = time.monotonic()
            for index in range(shards):
                if index not in taken and client.get(K.lease_key(index)) not in (None, leases[index]):
                    taken[index] = now - t_kill
            if not res.all_s and all_delivered(log, t_kill) and acked_before(client, shards, t_epoch_ms):
                res.all_s = now - t_kill
            for name, keep, inside in (("free_s", busy, False), ("held_s", busy, True)):
                if firsts.get(name) is None:
                    firsts[name] = first_after(log, t_kill, keep, inside)
            seen = firsts["free_s"] is not None and (firsts["held_s"] is not None or not busy)
            if res.all_s and seen and now - t_kill > res.all_s + 5:
                break
            time.sleep(0.2)
        load_thread.stop.set()
        load_thread.join(15)
        for name, at in firsts.items():
            setattr(res, name, round(at - t_kill, 2) if at is not None else float("nan"))
        res.takeover_s = round(max(taken.values()), 2) if len(taken) == shards else float("nan")
        drain = time.monotonic() + max(30.0, hold_s + 20)
        while time.monotonic() < drain and (queued(client, shards) or not all_delivered(log, time.monotonic())):
            time.sleep(0.2)
        check(log, res)
        if queued(client, shards):
            res.problems.append(f"{queued(client, shards)} left in the streams")
    finally:
        load_thread.stop.set()
        relay.stop()
        client.close()
        asyncio.run(server.stop())
    return res


def check(log: Log, res: Result) -> None:
    per_key: dict[str, list[int]] = defaultdict(list)
    with log.lock:
        accepted = {(loc, n) for _, loc, n in log.accepted}
        for _, loc, n in log.arrived:
            per_key[loc].append(n)
    res.accepted = len(accepted)
    seen = {(loc, n) for loc, ns in per_key.items() for n in ns}
    res.delivered = len(seen & accepted)
    res.duplicates = sum(len(ns) for ns in per_key.values()) - len(seen)
    if missing := len(accepted - seen):
        res.problems.append(f"{missing} accepted, not delivered")
    disorder = 0
    for ns in per_key.values():
        collapsed = [n for i, n in enumerate(ns) if i == 0 or n != ns[i - 1]]
        disorder += sum(1 for a, b in zip(collapsed, collapsed[1:], strict=False) if b < a)
    if disorder:
        res.problems.append(f"{disorder} out of order")


def table(results: list[Result], ttl: float) -> str:
    head = (f"{'run':<26} {'hold':>5} {'pending':>7} {'held':>5} {'restart':>7} {'takeover':>8} "
            f"{'free keys':>9} {'held keys':>9} {'all pre-kill':>12} {'accepted':>8} {'dup':>4} check")  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in results:
        ok = "ok" if not r.problems else "; ".join(r.problems)
        lines.append(
            f"{r.label:<26} {r.hold_s:>4g}s {r.pending_keys:>7} {r.held_keys:>5} {r.restart_s:>6.1f}s "
            f"{r.takeover_s:>7}s {r.free_s:>8}s {r.held_s:>8}s {r.all_s:>11.1f}s {r.accepted:>8} {r.duplicates:>4} {ok}"
        )
    lines.append(f"targets (from the kill): free keys <= lease_ttl_s + 1 = {ttl + 1:g} s; all pre-kill <= 50 s")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=300.0, help="updates/s offered")
    parser.add_argument("--iop-latency-ms", type=float, default=100.0, help="the receiver's answer time")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds of load before the kill")
    parser.add_argument("--after", type=float, default=150.0, help="at most this long after the kill")
    parser.add_argument("--claim-idle-s", type=float, action="append", default=None,
                        help="run (again) with this claim_idle_s; default: the shipped config only")  # fmt: skip
    args = parser.parse_args()
    ttl = load(CONFIG, env={"RELAY_INGRESS_TOKEN": TOKEN}).forwarder.lease_ttl_s
    results = []
    for claim in [None, *(args.claim_idle_s or [])]:
        with tempfile.TemporaryDirectory(prefix="relay-recovery-") as tmp:
            results.append(run(args, Path(tmp), claim))
            print(table(results[-1:], ttl).splitlines()[2], flush=True)
    print(f"\n{os.cpu_count()} CPUs, {args.keys} keys, {args.rate:g} updates/s, kill after {args.warmup:g} s\n")
    print(table(results, ttl))
    return 0 if all(not r.problems for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
