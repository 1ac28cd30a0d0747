"""Recovery in seconds: after an unclean takeover only the keys whose events may still be on the wire wait.

A dead replica is played by hand: events are written to a shard's stream and read by a consumer
that never finishes them (``dead-replica``), and no lease is left, so the relay that starts takes
the shard over uncleanly. The keys with a pending entry are held (queued, not sent) until the
old owner's requests cannot land any more; every other key of the shard goes on at once.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import msgspec

from relay.buffer import Buffer
from relay.errors import StoreUnavailable
from relay.ordering import location_key, shard_of
from relay.reader import Reader
from relay.shard import QKey, Shard
from relay.store import keys as K
from relay.validation import parse_target, validate
from tests.conftest import gireve_location
from tests.ocpi_peer import cli
from tests.test_forwarder import Env, loc_of, make_env, until  # noqa: F401  (fixture)
from tests.test_leases import FakeLeases, FakeOwner, loop_of

DEAD = "dead-replica"
HOLD_S = "4"  # the attempt deadline: connect_timeout_s + request_timeout_s (claim_idle_s must exceed it)


def same_shard(n: int, shards: int = 4) -> tuple[int, list[str]]:
    """n Location ids whose ordering keys share a shard, and that shard."""
    by_shard: dict[int, list[str]] = {}
    i = 0
    while True:
        loc = f"K{i}"
        found = by_shard.setdefault(shard_of(location_key("FR", "AB1", loc), shards), [])
        found.append(loc)
        if len(found) == n:
            return shard_of(location_key("FR", "AB1", loc), shards), found
        i += 1


def qkey(loc: str) -> QKey:
    return ("locations", location_key("FR", "AB1", loc))


async def put(env: Env, loc: str, n: int) -> str:
    """Write an update straight to its stream, as the ingress would (no relay needs to run)."""
    body = msgspec.json.encode(gireve_location(loc, name=str(n)))
    target = parse_target("PUT", f"locations/FR/AB1/{loc}")
    return await env.store.append(validate(target, "PUT", body, env.settings).event)


async def dead_reads(env: Env, shard: int, count: int) -> list[str]:
    """The dead replica reads ``count`` entries of the shard's Location stream and never finishes them."""
    reply = await env.redis.xreadgroup(K.GROUP, DEAD, {K.stream_key("locations", shard): ">"}, count=count)
    return [sid.decode() for _, rows in reply for sid, _ in rows]


async def prepared(make_env: Callable[..., Any], **knobs: str) -> Env:  # noqa: F811
    # Compaction off: each update is a request of its own, so the IOP's log shows their order.
    knobs = {"RELAY_IOP_CONNECT_TIMEOUT_S": "1", "RELAY_IOP_REQUEST_TIMEOUT_S": "3",
             "RELAY_FORWARDER_CLAIM_IDLE_S": "30", "RELAY_FORWARDER_COMPACT": "", **knobs}  # fmt: skip
    env: Env = await make_env(start=False, **knobs)
    await env.store.load_scripts()
    await env.store.ensure_groups()
    return env


def first_at(env: Env, loc: str) -> float:
    return min(r.at for r in env.iop.arrived if loc_of(r) == loc)


async def test_after_an_unclean_takeover_only_keys_with_pending_entries_wait(make_env: Callable[..., Any]) -> None:  # noqa: F811
    env = await prepared(make_env)
    shard, (busy, old, free) = same_shard(3)
    await put(env, busy, 1)
    await put(env, old, 1)
    busy_id, old_id = await dead_reads(env, shard, 2)
    # Read 10 minutes ago: it may have waited in the dead replica's buffer or in retries since, and
    # been sent just before the crash. Its idle time says nothing about that: it waits all the same.
    await env.redis.xclaim(K.stream_key("locations", shard), K.GROUP, DEAD, 0, [old_id], idle=600_000)
    for loc, n in ((free, 1), (free, 2), (busy, 2), (old, 2)):
        await put(env, loc, n)

    before = time.time()
    await env.relay.start()
    fwd = env.relay.forwarder
    assert fwd is not None
    hold_s = fwd.reader.hold_s
    assert hold_s == float(HOLD_S)
    await env.iop.wait_for(lambda: env.seqs(free) == [1, 2], timeout=hold_s)
    # The key with nothing pending moved at once, well within the hold of the others.
    assert max(r.at for r in env.iop.arrived if loc_of(r) == free) - before < 1.0
    hold = fwd.reader.holds[shard]
    assert hold.keys == {qkey(busy), qkey(old)}
    assert before + hold_s <= hold.until < time.time() + hold_s
    assert env.seqs(busy) == [] and env.seqs(old) == []
    # What waits, and until when: in Redis for `relay status`, and as a metric.
    published = await env.ds.holds()
    until = round(hold.until, 3)
    assert published == {shard: {K.key_field(*qkey(busy)): until, K.key_field(*qkey(old)): until}}
    assert await env.metric("relay_takeover_held_keys") == 2
    result = await cli(env.settings, "status", "--json")
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)["holds"][str(shard)]
    assert shown["keys"] == 2 and 0 < shown["wait_s"] <= hold_s
    text = (await cli(env.settings, "status")).output
    assert f"held shard {shard}: 2 keys until" in text and qkey(busy)[1] in text
    await put(env, busy, 3)  # read during the hold: queued behind the held ones

    await env.iop.wait_for(lambda: env.seqs(busy) == [1, 2, 3] and env.seqs(old) == [1, 2], timeout=hold_s + 10)
    assert min(first_at(env, busy), first_at(env, old)) >= hold.until - 0.05
    assert shard not in fwd.reader.holds
    assert await env.metric("relay_takeover_held_keys") == 0
    assert busy_id and await env.redis.xpending(K.stream_key("locations", shard), K.GROUP) == {
        "pending": 0, "min": None, "max": None, "consumers": []
    }  # fmt: skip


async def test_a_shard_lost_during_the_hold_cancels_it_and_the_next_take_holds_again(
    make_env: Callable[..., Any],  # noqa: F811
) -> None:
    env = await prepared(make_env)
    shard, (busy, free) = same_shard(2)
    await put(env, busy, 1)
    await dead_reads(env, shard, 1)
    await put(env, busy, 2)
    await put(env, free, 1)
    await env.relay.start()
    fwd = env.relay.forwarder
    assert fwd is not None
    await env.iop.wait_for(lambda: env.seqs(free) == [1], timeout=2)
    first = fwd.reader.holds[shard]
    lost = first.shard
    assert lost.queues[qkey(busy)]

    fwd.lose(shard, "test: lease lost")
    await until(lambda: fwd.reader.holds.get(shard) is not first, timeout=2, what="the hold cancelled")
    assert qkey(busy) not in lost.queues  # forgotten (still pending in Redis), its buffer room given back
    assert env.seqs(busy) == []
    # Our lease loop takes the shard back: its entries are ours now, yet the old owner's request may
    # still land, so the lost hold counts as a cut request and the keys are held again.
    await until(lambda: shard in fwd.reader.holds and fwd.reader.holds[shard].shard is not lost, timeout=5)
    again = fwd.reader.holds[shard]
    assert again.keys == {qkey(busy)} and again.until >= first.until

    await env.iop.wait_for(lambda: env.seqs(busy) == [1, 2], timeout=float(HOLD_S) * 2 + 10)
    assert first_at(env, busy) >= again.until - 0.05
    assert await env.metric("relay_takeover_held_keys") == 0


async def test_the_hold_lasts_the_attempt_deadline_and_a_stop_cancels_it(make_env: Callable[..., Any]) -> None:  # noqa: F811
    """The reader alone, with the attempt deadline ([iop] connect + request timeout) as forwarder.py
    is to pass it: the held key is handed to the workers that long after the takeover, not
    claim_idle_s; the others at once."""
    env = await prepared(make_env)
    shard, (busy, free) = same_shard(2)
    await put(env, busy, 1)
    await dead_reads(env, shard, 1)
    await put(env, free, 1)
    iop = env.settings.iop
    deadline = iop.connect_timeout_s + iop.request_timeout_s
    assert deadline < env.settings.forwarder.claim_idle_s
    handed: list[tuple[QKey, float]] = []
    cfg = env.settings.forwarder
    reader = Reader(cfg, env.store, env.ds, "new-replica", Buffer(cfg.max_buffered, cfg.read_batch),
                    lambda _s, k: handed.append((k, time.time())), attempt_s=deadline)  # fmt: skip
    taken = Shard(index=shard, dirty=True, stopping=asyncio.Event())
    began = time.time()
    task = asyncio.create_task(reader.read_loop(taken))
    try:
        await until(lambda: len(handed) == 2, timeout=deadline + 5, what="both keys handed out")
    finally:
        taken.stopping.set()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    (k1, t1), (k2, t2) = handed
    assert k1 == qkey(free) and t1 - began < 0.5
    assert k2 == qkey(busy) and deadline <= t2 - began < deadline + 0.5

    # Stopping during a hold: nothing held is handed out, the room goes back, the shard counts as cut.
    stopped = Shard(index=shard, dirty=True, stopping=asyncio.Event())
    await env.redis.xgroup_setid(K.stream_key("locations", shard), K.GROUP, "0")  # all unread again
    await dead_reads(env, shard, 1)
    handed.clear()
    base = reader.buffer.held  # the first shard's entries, handed out above and never worked on
    task = asyncio.create_task(reader.read_loop(stopped))
    await until(lambda: shard in reader.holds, timeout=2, what="a hold")
    stopped.stopping.set()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert shard not in reader.holds and not stopped.queues.get(qkey(busy))
    assert stopped.sending == 1  # a stop or hand-back does not release the lease as free:
    assert qkey(busy) not in [k for k, _ in handed]
    assert reader.buffer.held == base


async def test_a_first_claim_whose_reply_was_lost_still_holds_the_old_owners_keys(
    make_env: Callable[..., Any],  # noqa: F811
) -> None:
    """The first XAUTOCLAIM ran but its reply was lost: the retried recovery finds nothing foreign pending
    (it is ours now), yet the old owner's request may be on the wire: the takeover decision stands."""
    env = await prepared(make_env)
    shard, (busy, free) = same_shard(2)
    await put(env, busy, 1)
    await dead_reads(env, shard, 1)
    await put(env, free, 1)
    real = env.ds.claim
    lost: list[int] = []

    async def reply_lost_once(stream: str, index: int, consumer: str, start: str, count: int) -> Any:
        got = await real(stream, index, consumer, start, count)
        if got[1] and not lost:
            lost.append(len(got[1]))
            raise StoreUnavailable("redis: TimeoutError: the reply was lost after XAUTOCLAIM ran")
        return got

    env.ds.claim = reply_lost_once  # type: ignore[method-assign, assignment]
    handed: list[QKey] = []
    cfg = env.settings.forwarder
    reader = Reader(cfg, env.store, env.ds, "new-replica", Buffer(cfg.max_buffered, cfg.read_batch),
                    lambda _s, k: handed.append(k), attempt_s=float(HOLD_S))  # fmt: skip
    taken = Shard(index=shard, dirty=True, stopping=asyncio.Event())
    task = asyncio.create_task(reader.read_loop(taken))
    try:
        await until(lambda: qkey(free) in handed, timeout=3, what="the free key handed out")
        assert lost == [1]
        assert qkey(busy) not in handed
        assert reader.holds[shard].keys == {qkey(busy)}
    finally:
        taken.stopping.set()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_dead_replicas_shards_move_within_a_short_round_of_its_lease_expiry(
    make_env: Callable[..., Any],  # noqa: F811
) -> None:
    """Its leases and its heartbeat (written in the same round) run out together in 1 s: the live
    replica, short of its share, asks every half second, so it holds all the shards within one short
    round of the expiry, not a third of the TTL (2 s here) or a TTL more (the heartbeat) later."""
    env = await prepared(make_env, RELAY_FORWARDER_LEASE_TTL_S="6")
    shard, (free,) = same_shard(1)
    await put(env, free, 1)
    now_ms = int(time.time() * 1000)
    await env.redis.zadd(K.REPLICAS_KEY, {DEAD: now_ms - 5000})  # its last round, 5 s ago
    for index in range(env.settings.redis.shards):
        await env.redis.set(K.lease_key(index), DEAD, px=1000)
    expiry = now_ms / 1000 + 1.0
    await env.relay.start()
    fwd = env.relay.forwarder
    assert fwd is not None
    await until(lambda: len(fwd.shards) == 4, timeout=5, what="every shard taken")
    taken = time.time()
    assert expiry <= taken < expiry + 0.5 + 0.2
    await env.iop.wait_for(lambda: env.seqs(free) == [1], timeout=2)
    assert first_at(env, free) < expiry + 0.5 + 0.3  # nothing of it was pending: no hold


async def test_a_lease_round_that_hangs_lets_every_shard_go_before_its_lease_can_expire() -> None:
    """The takeover hold counts on the old owner having stopped when its lease expired: a replica
    whose Redis calls hang (no error to react to) must still let its shards go at 70 % of the TTL."""
    ds, owner = FakeLeases(alive=1), FakeOwner()
    leases = loop_of(ds, owner, ttl_s=0.6)
    task = asyncio.create_task(leases.run())
    hang = asyncio.Event()
    try:
        await until(lambda: len(owner.shards) == 4, timeout=2, what="every shard")
        real = ds.heartbeat

        async def hangs(me: str, now_ms: int, dead_after_ms: int) -> int:
            await hang.wait()
            return await real(me, now_ms, dead_after_ms)

        ds.heartbeat = hangs  # type: ignore[method-assign]
        await until(lambda: not owner.shards, timeout=2, what="every shard let go")
        assert time.monotonic() - leases.renewed_at < 0.6  # before the lease could expire
        assert {reason for _, reason in owner.lost} == {"redis unreachable"}
    finally:
        leases.stopping.set()
        hang.set()
        await task
