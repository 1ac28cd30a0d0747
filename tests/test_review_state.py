"""Bugs found in the second review of "Deliver state, not history" (issue 16), each reproduced against the
real embedded server (and the fake IOP where the forwarder is involved):

- a backlog drained with the link up never holds more compacted units than the bound (the senders fold the
  head's run only);
- retention keeps the ``accepted`` marker of a key whose newest event is still queued (else a replay of an
  older dead letter would roll the hub back), and forgets it with the delivered one;
- an event seen parked just before a purge or a replay unparked its key is sent, not dead-lettered as
  "parked behind" a dead letter that is gone (dead_letter.lua checks the parking in the same script).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import msgspec

from relay.config import Settings
from relay.dlq import replay_one
from relay.events import Event
from relay.forwarder import Forwarder
from relay.ordering import shard_of
from relay.retention import Sweeper
from relay.store import DeliveryStore, Store, connect
from relay.store import keys as K
from tests.conftest import gireve_location
from tests.fake_iop import Reply
from tests.test_compaction import QUICK, STATUSES, location, stamp
from tests.test_forwarder import Env, make_env  # noqa: F401  (make_env: the fixture)
from tests.waiting import wait_until

# -- memory: a backlog drained with the link up stays within the buffer's bounds -------------------


async def test_a_backlog_drained_with_the_link_up_never_holds_more_units_than_the_bound(
    make_env: Callable[..., Any],  # noqa: F811
) -> None:
    # A Location whose CSMS alternates full PUTs and status PATCHes: runs of one entry each (a static
    # change is never merged into a dynamic one). Accepted while no forwarder runs, then drained by
    # one whose buffer holds 16 entries, against an IOP answering in 5 ms. Before the fix, every
    # attempt folded the key's whole queue into units (each one entry) that left the buffer's `held`,
    # the reader refilled it, and the whole backlog came into memory: units grew with the backlog.
    one = {"RELAY_REDIS_SHARDS": "1", **QUICK}  # one shard reader: a 16-entry buffer is not shared
    intake: Env = await make_env(RELAY_FORWARDER_ENABLED="false", **one)
    n = 400
    for i in range(1, n + 1):
        if i % 2:
            await intake.send("PUT", "/locations/FR/AB1/M1", location("M1", 2) | {"name": str(i),
                                                                               "last_updated": stamp(i)})  # fmt: skip
        else:
            await intake.send("PATCH", "/locations/FR/AB1/M1/E0",
                              {"status": STATUSES[i % len(STATUSES)], "last_updated": stamp(i)})  # fmt: skip
    await intake.relay.stop()
    intake.iop.script = lambda r: Reply(delay_s=0.005)
    env: Env = await make_env(iop=intake.iop, RELAY_FORWARDER_MAX_BUFFERED="16", RELAY_FORWARDER_READ_BATCH="8",
                              **one)  # fmt: skip
    fwd = env.relay.forwarder
    assert isinstance(fwd, Forwarder)
    most = 0

    async def sample() -> None:
        nonlocal most
        while True:
            most = max(most, fwd.buffer.units)
            await asyncio.sleep(0.002)

    sampler = asyncio.create_task(sample())
    try:
        await wait_until(env.all_streams_empty, 60, lambda: f"backlog drained ({len(env.iop.received)} requests)")
    finally:
        sampler.cancel()
    assert most <= 8 * 16, most  # the documented bound of units (8 x max_buffered)


# -- retention: the accepted marker of a key whose newest event is still queued ---------------------


def _loc_event(n: int) -> Event:
    return Event(id=f"ev{n}", module="locations", method="PUT", country_code="FR", party_id="AB1", object_id="R1",
                 key="loc:FR:AB1:R1", correlation_id=f"c{n}", received_at=time.time(),
                 body=msgspec.json.encode(gireve_location("R1", name=str(n))))  # fmt: skip


async def test_retention_keeps_the_accepted_marker_of_a_key_with_an_event_still_queued(
    make_settings: Callable[..., Settings],
) -> None:
    # State store off: a replay goes as it was, and only the guard keeps it from rolling the IOP back.
    # v1 and v2 of a Location wait (the IOP away longer than markers_s); a sweep finds no dead letter of
    # the key. Before the fix it forgot the key's `accepted` (v2, queued); then v1 dies, and its replay,
    # seeing nothing newer, went to the end of the stream behind v2: the IOP ended on v1.
    settings = make_settings(RELAY_STATE_ENABLED="false")
    store = Store(connect(settings.redis.url, settings.redis), settings.redis)
    try:
        await store.load_scripts()
        await store.ensure_groups()
        ds = DeliveryStore(store)
        await ds.load_scripts()
        await store.append(_loc_event(1))
        await store.append(_loc_event(2))
        later = time.time() + settings.retention.markers_s + 86400  # the backlog is older than the window
        owned = tuple(range(store.shards))
        await Sweeper(settings, store, lambda: owned, clock=lambda: later).sweep()

        shard = shard_of("loc:FR:AB1:R1", store.shards)
        stream = K.stream_key("locations", shard)
        v1, v2 = await ds.read_new({stream: shard}, "c", 10, None)
        info = msgspec.msgpack.encode({"kind": "permanent", "reason": "OCPI 2001"})
        assert await ds.dead_letter(v1, info, park=False)
        [dead] = await ds.dead_letters("locations", shard)
        assert await replay_one(ds, dead, from_state=False) == "skipped_newer"  # v2 is still queued
        assert [e.id for e in await ds.entries(stream, shard, [v2.id])] == [v2.id]
        assert await store.redis.xlen(stream) == 1  # nothing queued behind v2
    finally:
        await store.close()


async def test_retention_forgets_the_accepted_marker_with_the_delivered_one_in_one_sweep(
    settings: Settings, store: Store
) -> None:
    # The fix's other side: a key whose newest event was delivered long ago loses all its markers in one
    # sweep (the accepted marker is looked at before the delivered one it is compared with is gone).
    old = f"{int(time.time() * 1000) - 8 * 86_400_000}-0"
    field = "locations|loc:FR:AB1:R2"
    await store.redis.hset(K.accepted_key(1), field, old)
    await store.redis.hset(K.delivered_key(1), field, old)
    await Sweeper(settings, store, lambda: (1,)).sweep()
    assert not await store.redis.hexists(K.accepted_key(1), field)
    assert not await store.redis.hexists(K.delivered_key(1), field)


# -- a race between the forwarder and `relay dlq purge` (fix needs relay/delivery.py: see the report) -----


async def test_an_event_checked_as_parked_just_before_its_key_is_unparked_is_still_sent(
    make_env: Callable[..., Any],  # noqa: F811
) -> None:
    # The runner reads "parked behind X", the operator's purge of X unparks the key, then the runner writes
    # the event's dead letter as "parked behind X": the key flows again but that event waits in the DLQ
    # (a static change the IOP never gets while the key's later status PATCHes go through).
    env: Env = await make_env(RELAY_FORWARDER_ON_PERMANENT="park")
    env.iop.script = lambda r: Reply(status=200, ocpi=2001) if r.json().get("name") == "1" else None
    await env.put_loc("K1", 1)
    await wait_until(lambda: _dead_count(env, 1), 20, "the parking dead letter")
    [parking] = await env.dead()
    fwd = env.relay.forwarder
    assert isinstance(fwd, Forwarder)
    ds, check = fwd.delivery.ds, fwd.delivery.ds.parked

    async def parked_then_purged(shard: int, module: str, key: str) -> str | None:
        found = await check(shard, module, key)
        if found == parking.id:
            await ds.purge(parking)  # `relay dlq purge` lands between the check and the dead letter
        return found

    ds.parked = parked_then_purged  # type: ignore[method-assign]
    await env.put_loc("K1", 2)
    await env.iop.wait_for(lambda: [r.json()["name"] for r in env.iop.delivered()] == ["2"], 5)


async def _dead_count(env: Env, n: int) -> bool:
    return len(await env.dead()) == n
