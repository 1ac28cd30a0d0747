"""kill -9 at random moments while events flow and the IOP fails at random: nothing lost, order kept.

The relay runs as ``python -m relay serve`` (one or two processes) against the session's embedded
Redis; the fake IOP and a CSMS-like producer run in the test process. The producer sends numbered
updates of ~30 Locations through the ingress, one key at a time in order; only 202s count as
accepted. At the end the fake IOP's log must show, per Location: every accepted update taken with
success, the taken sequence numbers increasing (re-sends of one event collapsed), and few duplicates.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from relay.config import MODULES
from relay.store import keys as K
from tests.conftest import AUTH, REPO, TOKEN, example, gireve_location
from tests.fake_iop import FakeIop, random_faults
from tests.loopback import free_port
from tests.waiting import wait_until

pytestmark = pytest.mark.slow

KEYS = 30
SHARDS = 4
CONCURRENCY = 16
LOC_PREFIX = "/ocpi/2.2.1/locations/FR/AB1/"
SES_PREFIX = "/ocpi/2.2.1/sessions/FR/AB1/"
# Small timeouts so that a takeover (lease expiry + claim grace) takes seconds, not minutes.
TIMEOUTS = {
    # Every accepted update must reach the IOP here: compaction off. tests/test_compaction.py runs the same
    # producer, faults and kills with compaction on (the last update of every object, order, CDR rule).
    "RELAY_FORWARDER_COMPACT": "",
    "RELAY_IOP_REQUEST_TIMEOUT_S": "2",
    "RELAY_IOP_CONNECT_TIMEOUT_S": "0.5",
    "RELAY_FORWARDER_CLAIM_IDLE_S": "3",
    "RELAY_FORWARDER_LEASE_TTL_S": "1.5",
    "RELAY_FORWARDER_BACKOFF_INITIAL_S": "0.01",
    "RELAY_FORWARDER_BACKOFF_MAX_S": "0.2",
    "RELAY_FORWARDER_PROBE_MAX_S": "0.5",
    "RELAY_FORWARDER_SHUTDOWN_TIMEOUT_S": "3",
    "RELAY_FORWARDER_CONCURRENCY": str(CONCURRENCY),
}


@dataclass
class Proc:
    """One ``relay serve`` process slot; start() after a kill gives a new process (new replica id)."""

    name: str
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    starts: int = 0

    def start(self) -> None:
        self.port = free_port()
        env = {**self.env, "RELAY_INGRESS_LISTEN": f"127.0.0.1:{self.port}"}
        with self.log_path.open("ab") as log:
            log.write(f"\n=== start {self.starts} port {self.port}\n".encode())
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "relay", "serve", "--config", str(REPO / "config" / "relay.toml")],
                env=env,
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        self.starts += 1

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def replica_prefix(self) -> str:
        assert self.proc is not None
        return f"{socket.gethostname()}-{self.proc.pid}-"

    async def ready(self, http: aiohttp.ClientSession, timeout: float = 30.0) -> None:
        async def up() -> bool:
            assert self.proc is not None and self.proc.poll() is None, f"{self.name} exited:\n{self.log()}"
            with suppress(aiohttp.ClientError, OSError):
                async with http.get(f"http://127.0.0.1:{self.port}/healthz") as r:
                    return r.status == 200
            return False

        await wait_until(up, timeout, lambda: f"{self.name} up; its log:\n{self.log()}")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


class Producer:
    """The CSMS: per Location, numbered updates one after the other through any live ingress; and
    sessions, each with three updates then its CDR, one after the other on a few lanes."""

    def __init__(self, procs: list[Proc], http: aiohttp.ClientSession, seed: int) -> None:
        self.procs = procs
        self.http = http
        self.rng = random.Random(seed)
        self.accepted: dict[str, list[int]] = {f"C{i:02d}": [] for i in range(KEYS)}
        # session id → (accepted update numbers, CDR accepted)
        self.sessions: dict[str, tuple[list[int], bool]] = {}
        self.unknown = 0  # sent, no answer (relay killed meanwhile): maybe stored, maybe not
        self.stop = asyncio.Event()

    async def _send(self, method: str, path: str, body: dict[str, Any]) -> bool:
        """One operation through a live ingress; True only for a 202."""
        live = [p for p in self.procs if p.alive]
        while not live:
            if self.stop.is_set():
                return False
            await asyncio.sleep(0.05)
            live = [p for p in self.procs if p.alive]
        url = f"http://127.0.0.1:{self.rng.choice(live).port}/ingress/2.2.1{path}"
        try:
            async with self.http.request(method, url, json=body, headers=AUTH) as r:
                await r.read()
                if r.status == 202:
                    return True
                assert r.status >= 500, f"{method} {path}: {r.status}"  # never refused as invalid
        except (aiohttp.ClientError, OSError, TimeoutError):
            await asyncio.sleep(0.05)
        self.unknown += 1
        return False

    async def _location(self, loc: str) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            if await self._send("PUT", f"/locations/FR/AB1/{loc}", gireve_location(loc, name=str(n))):
                self.accepted[loc].append(n)
            await asyncio.sleep(0.03)  # ~30 updates/s per Location

    async def _sessions(self, lane: int) -> None:
        j = 0
        while not self.stop.is_set():
            j += 1
            sid = f"L{lane}S{j}"
            updates = []
            for k in (1, 2, 3):
                if await self._send("PUT", f"/sessions/FR/AB1/{sid}", session_body(sid, k)):
                    updates.append(k)
            cdr = await self._send("POST", "/cdrs", cdr_body(sid))
            self.sessions[sid] = (updates, cdr)
            await asyncio.sleep(0.03)

    async def run(self) -> None:
        lanes = [self._sessions(lane) for lane in range(3)]
        await asyncio.gather(*(self._location(loc) for loc in self.accepted), *lanes)

    @property
    def total(self) -> int:
        return sum(len(v) for v in self.accepted.values())


def session_body(sid: str, kwh: int) -> dict[str, Any]:
    return example("session_example_2_short_finished.json", country_code="FR", party_id="AB1", id=sid, kwh=kwh)


def cdr_body(sid: str) -> dict[str, Any]:
    return example("cdr_example.json", country_code="FR", party_id="AB1", id=f"CDR-{sid}", session_id=sid)


def check_sessions(iop: FakeIop, producer: Producer) -> int:
    """Every accepted session update and CDR delivered; a CDR never before its session's updates."""
    taken: dict[str, dict[int, float]] = {}  # session → update → first success answered at
    order: dict[str, list[int]] = {}
    for r in iop.received:
        if r.ok and r.path.startswith(SES_PREFIX):
            sid, kwh = r.path.removeprefix(SES_PREFIX), int(r.json()["kwh"])
            taken.setdefault(sid, {}).setdefault(kwh, r.answered_at)
            order.setdefault(sid, []).append(kwh)
    cdr_first: dict[str, float] = {}  # session → first arrival of its CDR at the IOP
    for r in iop.arrived:
        if r.path == "/ocpi/2.2.1/cdrs":
            cdr_first.setdefault(r.json()["session_id"], r.at)
    cdr_ok = {r.json()["session_id"] for r in iop.received if r.ok and r.path == "/ocpi/2.2.1/cdrs"}
    checked = 0
    for sid, (updates, cdr) in producer.sessions.items():
        missing = set(updates) - set(taken.get(sid, {}))
        assert not missing, f"{sid}: accepted updates never delivered: {missing}"
        seqs = order.get(sid, [])
        collapsed = [n for i, n in enumerate(seqs) if i == 0 or n != seqs[i - 1]]
        assert collapsed == sorted(set(collapsed)), f"{sid}: order violated: {seqs}"
        if cdr:
            assert sid in cdr_ok, f"{sid}: accepted CDR never delivered"
            late = [k for k in updates if taken[sid][k] > cdr_first[sid]]
            assert not late, f"{sid}: CDR sent before its update(s) {late} were taken"
            checked += 1
    return checked


class Tally:
    """Per Location, the sequence numbers the IOP answered with success, in the order it took them.

    Incremental: the fake's log grows to thousands of requests and is checked after each one.
    """

    def __init__(self, iop: FakeIop) -> None:
        self.iop = iop
        self.seen = 0
        self.seqs: dict[str, list[int]] = {}
        self.sets: dict[str, set[int]] = {}

    def update(self) -> None:
        new = self.iop.received[self.seen :]
        self.seen += len(new)
        for r in new:
            if r.ok and r.path.startswith(LOC_PREFIX):
                loc, n = r.path.removeprefix(LOC_PREFIX), int(r.json()["name"])
                self.seqs.setdefault(loc, []).append(n)
                self.sets.setdefault(loc, set()).add(n)

    def all_delivered(self, producer: Producer) -> bool:
        self.update()
        return all(set(seqs) <= self.sets.get(loc, set()) for loc, seqs in producer.accepted.items())


async def drained(redis: Any) -> bool:
    for m in MODULES:
        for s in range(SHARDS):
            if await redis.xlen(K.stream_key(m, s)):
                return False
    return True


async def dead_letters(redis: Any) -> int:
    return sum([await redis.xlen(K.dlq_key(m, s)) for m in MODULES for s in range(SHARDS)])


async def lease_holders(redis: Any) -> list[str]:
    return [(v or b"").decode() for v in [await redis.get(K.lease_key(s)) for s in range(SHARDS)]]


def check(iop: FakeIop, producer: Producer, kills: int) -> dict[str, int]:
    tally = Tally(iop)
    tally.update()
    got = tally.seqs
    dups_total = 0
    for loc, accepted in producer.accepted.items():
        seqs = got.get(loc, [])
        missing = set(accepted) - set(seqs)
        assert not missing, f"{loc}: accepted but never delivered: {sorted(missing)[:10]}"
        collapsed = [n for i, n in enumerate(seqs) if i == 0 or n != seqs[i - 1]]
        violations = [(a, b) for a, b in zip(collapsed, collapsed[1:], strict=False) if b <= a]
        assert not violations, f"{loc}: order violated at {violations[:5]} in {seqs}"
        dups = len(seqs) - len(set(seqs))
        # At most the one event of this key in flight (sent, not yet acknowledged) at each kill.
        assert dups <= kills, f"{loc}: {dups} duplicates after {kills} kills: {seqs}"
        dups_total += dups
    assert dups_total <= min(KEYS, CONCURRENCY * 2) * kills
    return {"accepted": producer.total, "duplicates": dups_total, "requests": len(iop.received)}


@dataclass
class World:
    iop: FakeIop
    redis: Any
    http: aiohttp.ClientSession
    env: dict[str, str]
    tmp: Path
    procs: list[Proc] = field(default_factory=list)

    def proc(self, name: str) -> Proc:
        p = Proc(name, self.env, self.tmp / f"{name}.log")
        self.procs.append(p)
        return p


@pytest.fixture
async def world(redis_url: str, tmp_path: Path) -> AsyncIterator[World]:
    iop = FakeIop()
    await iop.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env.update(
        RELAY_REDIS_URL=redis_url,
        RELAY_INGRESS_TOKEN=TOKEN,
        RELAY_IOP_URL=iop.url,
        RELAY_IOP_TOKEN="crash-iop-token",
        RELAY_OCPI_LISTEN="127.0.0.1:0",
        RELAY_LOG_LEVEL="warning",
        RELAY_STORAGE_DIR=str(tmp_path / "data"),
        **TIMEOUTS,
    )
    redis: Any = aioredis.Redis.from_url(redis_url)
    http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
    w = World(iop, redis, http, env, tmp_path)
    yield w
    for p in w.procs:
        p.stop()
    await http.close()
    await redis.aclose()
    await iop.close()


async def requests_since(iop: FakeIop, n: int, timeout: float) -> None:
    """Wait until the IOP has answered n more requests (a random moment measured in events)."""
    start = len(iop.received)
    await iop.wait_for(lambda: len(iop.received) >= start + n, timeout=timeout)


async def finish(w: World, producer: Producer, run: asyncio.Task[None], kills: int) -> dict[str, int]:
    producer.stop.set()
    await asyncio.wait_for(run, 10)
    assert producer.total > 500, producer.total  # enough events flowed to mean something
    try:
        tally = Tally(w.iop)
        await w.iop.wait_for(lambda: tally.all_delivered(producer), timeout=40)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{await diagnose(w, producer)}") from None
    try:
        await wait_until(lambda: drained(w.redis), 20, "streams drained")  # sessions and CDRs too
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{await diagnose(w, producer)}") from None
    assert await dead_letters(w.redis) == 0  # transient faults only: nothing dead-lettered
    stats = check(w.iop, producer, kills)
    stats["sessions_with_cdr"] = check_sessions(w.iop, producer)
    assert stats["sessions_with_cdr"] >= 20
    return stats


async def diagnose(w: World, producer: Producer) -> str:
    tally = Tally(w.iop)
    tally.update()
    got = tally.seqs
    missing = {loc: sorted(set(acc) - set(got.get(loc, ())))[:5] for loc, acc in producer.accepted.items()}
    missing = {k: v for k, v in missing.items() if v}
    lines = [f"missing (first 5 per key): {missing}"]
    for m in MODULES:
        for s in range(SHARDS):
            stream = K.stream_key(m, s)
            pending = await w.redis.xpending(stream, K.GROUP)
            lines.append(f"{stream}: len={await w.redis.xlen(stream)} pending={pending}")
    lines.append(f"leases: {await lease_holders(w.redis)}")
    lines += [f"--- {p.name} (alive={p.alive}):\n{p.log()[-3000:]}" for p in w.procs]
    return "\n".join(lines)


async def test_kill_9_single_relay_at_random_moments(world: World) -> None:
    w = world
    rng = random.Random(20261126)
    w.iop.script = random_faults(0.25, seed=3)
    relay = w.proc("solo")
    relay.start()
    await relay.ready(w.http)
    producer = Producer([relay], w.http, seed=1)
    run = asyncio.create_task(producer.run())
    kills = 0
    started = time.monotonic()
    for _ in range(4):
        # A random moment: after some tens to hundreds of IOP answers (takeover grace included).
        await requests_since(w.iop, rng.randint(40, 250), timeout=20)
        relay.kill()
        kills += 1
        relay.start()
        await relay.ready(w.http)
        if time.monotonic() - started > 35:
            break
    stats = await finish(w, producer, run, kills)
    print(f"single relay: {kills} kills, {stats}, unknown={producer.unknown}, {time.monotonic() - started:.1f}s")


async def test_kill_9_one_of_two_relays_survivor_takes_over(world: World) -> None:
    w = world
    rng = random.Random(7)
    w.iop.script = random_faults(0.25, seed=4)
    a, b = w.proc("a"), w.proc("b")
    a.start()
    b.start()
    await a.ready(w.http)
    await b.ready(w.http)

    async def both_hold_shards() -> bool:
        holders = await lease_holders(w.redis)
        return any(h.startswith(a.replica_prefix) for h in holders) and any(
            h.startswith(b.replica_prefix) for h in holders
        )

    async def a_holds_all() -> bool:
        return all(h.startswith(a.replica_prefix) for h in await lease_holders(w.redis))

    producer = Producer([a, b], w.http, seed=2)
    run = asyncio.create_task(producer.run())
    kills = 0
    started = time.monotonic()
    for _ in range(3):
        await wait_until(both_hold_shards, 15, "both replicas holding shards")
        await requests_since(w.iop, rng.randint(40, 200), timeout=20)
        b.kill()
        kills += 1
        killed_at = time.monotonic()
        # The survivor takes the dead replica's shards once its heartbeat and leases expire, then
        # waits the claim grace before resending its pending entries.
        await wait_until(a_holds_all, 15, "survivor holding every shard")
        took_over_s = time.monotonic() - killed_at
        assert took_over_s < 8, took_over_s  # heartbeat expiry (2 TTL = 3 s) + a lease round or two
        await requests_since(w.iop, 30, timeout=20)  # the survivor delivers, the old shards included
        b.start()
        await b.ready(w.http)
        if time.monotonic() - started > 40:
            break
    stats = await finish(w, producer, run, kills)
    print(f"two relays: {kills} kills of one, {stats}, {time.monotonic() - started:.1f}s")
    assert a.alive and a.starts == 1  # the survivor was never restarted
