"""Retention (relay/retention.py): old markers, session watermarks and Session/CDR states are forgotten after
their window and kept before it; a field written during a sweep, a waiting CDR's watermarks, the markers of a
key with a dead letter and the shards of other replicas are left alone."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from relay import metrics
from relay.config import Settings
from relay.events import Event, encode
from relay.retention import Sweeper
from relay.service import Relay
from relay.store import Store, keys
from tests.waiting import wait_until

NOW = 1_800_000_000.0  # the sweeper's clock (s)
DAY_MS = 86_400_000
OLD = f"{int(NOW * 1000) - 8 * DAY_MS}-0"  # past the 7 days of markers_s
RECENT = f"{int(NOW * 1000) - 6 * DAY_MS}-0"  # within them
OLDER = f"{int(NOW * 1000) - 9 * DAY_MS}-5"


@pytest.fixture
async def r(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


def sweeper(settings: Settings, store: Store, owned: tuple[int, ...] = (0, 1, 2, 3)) -> Sweeper:
    return Sweeper(settings, store, lambda: owned, clock=lambda: NOW)


def removed(what: str) -> float:
    return float(metrics.RETENTION_REMOVED.labels(what=what)._value.get())


def text(raw: Any) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


async def fields(r: aioredis.Redis, key: str) -> dict[str, str]:
    return {text(k): text(v) for k, v in (await r.hgetall(key)).items()}


async def test_markers_are_forgotten_after_the_window_and_kept_within_it(
    settings: Settings, store: Store, r: aioredis.Redis
) -> None:
    assert settings.retention.markers_s == 7 * 86400  # the default the ids above are placed around
    for key_of in (keys.delivered_key, keys.accepted_key, keys.dead_last_key):
        await r.hset(key_of(2), mapping={"cdrs|cdr:FR:AB1:old": OLD, "cdrs|cdr:FR:AB1:new": RECENT})
    before = {what: removed(what) for what in ("delivered", "accepted", "dead_last")}
    got = await sweeper(settings, store).sweep()
    for what, key_of in (("delivered", keys.delivered_key), ("accepted", keys.accepted_key),
                         ("dead_last", keys.dead_last_key)):  # fmt: skip
        assert await fields(r, key_of(2)) == {"cdrs|cdr:FR:AB1:new": RECENT}, what
        assert got[what] == 1
        assert removed(what) == before[what] + 1


async def test_a_field_written_during_the_sweep_is_kept(
    settings: Settings, store: Store, r: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = keys.delivered_key(0)
    await r.hset(key, mapping={"cdrs|a": OLD, "cdrs|b": OLD})
    sw = sweeper(settings, store, (0,))
    scan = sw.store.redis.hscan
    newer = f"{int(NOW * 1000)}-0"

    async def hscan_then_write(name: str, cursor: int = 0, **kw: Any) -> Any:
        page = await scan(name, cursor, **kw)
        if name == key:  # a newer event of "cdrs|a" is delivered between the read and the delete
            await r.hset(key, "cdrs|a", newer)
        return page

    monkeypatch.setattr(sw.store.redis, "hscan", hscan_then_write)
    await sw.sweep()
    assert await fields(r, key) == {"cdrs|a": newer}


async def test_the_markers_of_a_key_with_a_dead_letter_are_kept(
    settings: Settings, store: Store, r: aioredis.Redis
) -> None:
    loc = "loc:FR:AB1:L1"
    ev = Event(id="x", module="locations", method="PUT", country_code="FR", party_id="AB1", object_id="L1",
               key=loc, correlation_id="c", received_at=NOW, body=b"{}")  # fmt: skip
    await r.xadd(keys.dlq_key("locations", 1), {"e": encode(ev), "i": b"", "s": OLDER})
    for key_of in (keys.delivered_key, keys.accepted_key, keys.dead_last_key):
        await r.hset(key_of(1), mapping={f"locations|{loc}": OLD, "locations|loc:FR:AB1:L2": OLD})
    await sweeper(settings, store).sweep()
    for key_of in (keys.delivered_key, keys.accepted_key, keys.dead_last_key):
        assert await fields(r, key_of(1)) == {f"locations|{loc}": OLD}  # its replay guard still compares


async def test_session_watermarks_go_only_when_nothing_of_the_session_is_undelivered(
    settings: Settings, store: Store, r: aioredis.Redis
) -> None:
    last, done = keys.session_last_key(3), keys.session_done_key(3)
    await r.hset(last, mapping={
        "ses:FR:AB1:over": OLDER,  # delivered, no CDR ever came: forgotten
        "ses:FR:AB1:waiting": OLD,  # its last update is not delivered: a CDR waits for it
        "ses:FR:AB1:never": OLD,  # not even one update delivered
        "ses:FR:AB1:recent": RECENT,  # within the window
    })  # fmt: skip
    await r.hset(done, mapping={
        "ses:FR:AB1:over": OLD, "ses:FR:AB1:waiting": OLDER, "ses:FR:AB1:recent": RECENT,
        "ses:FR:AB1:orphan": OLD,  # no session-last any more: nothing can wait on it
    })  # fmt: skip
    before = removed("session_watermarks")
    got = await sweeper(settings, store).sweep()
    assert await fields(r, last) == {"ses:FR:AB1:waiting": OLD, "ses:FR:AB1:never": OLD, "ses:FR:AB1:recent": RECENT}
    assert await fields(r, done) == {"ses:FR:AB1:waiting": OLDER, "ses:FR:AB1:recent": RECENT}
    assert got["session_watermarks"] == 2 and removed("session_watermarks") == before + 2


async def put_state(r: aioredis.Redis, module: str, shard: int, member: str, updated_ms: int) -> None:
    await r.hset(keys.state_key(module, shard), keys.state_field("FR", "AB1", member), "1|{}")
    await r.zadd(keys.index_key(module, shard, "FR", "AB1"), {member: updated_ms})


async def state(r: aioredis.Redis, module: str, shard: int) -> tuple[set[str], set[str]]:
    hashed = {text(k) for k in await r.hkeys(keys.state_key(module, shard))}
    indexed = {text(m) for m in await r.zrange(keys.index_key(module, shard, "FR", "AB1"), 0, -1)}
    return hashed, indexed


async def test_sessions_and_cdrs_leave_the_state_after_their_window_locations_and_tariffs_never(
    settings: Settings, store: Store, r: aioredis.Redis
) -> None:
    assert settings.retention.sessions_s == 60 * 86400
    old, recent = int(NOW * 1000) - 61 * DAY_MS, int(NOW * 1000) - 59 * DAY_MS
    for module in ("sessions", "cdrs", "locations", "tariffs"):
        await put_state(r, module, 0, "old", old)
        await put_state(r, module, 0, "recent", recent)
    await put_state(r, "sessions", 0, "queued", old)  # an update of it is still undelivered
    await r.hset(keys.session_last_key(0), "ses:FR:AB1:queued", RECENT)
    await r.hset(keys.session_done_key(0), "ses:FR:AB1:queued", OLD)
    before = removed("sessions"), removed("cdrs")
    got = await sweeper(settings, store).sweep()
    assert await state(r, "sessions", 0) == ({"FR:AB1:recent", "FR:AB1:queued"}, {"recent", "queued"})
    assert await state(r, "cdrs", 0) == ({"FR:AB1:recent"}, {"recent"})
    for module in ("locations", "tariffs"):
        assert await state(r, module, 0) == ({"FR:AB1:old", "FR:AB1:recent"}, {"old", "recent"})
    assert (got["sessions"], got["cdrs"]) == (1, 1)
    assert (removed("sessions"), removed("cdrs")) == (before[0] + 1, before[1] + 1)


async def test_a_state_updated_during_the_sweep_is_kept_and_paging_passes_the_kept_ones(
    make_settings: Callable[..., Settings], store: Store, r: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(RELAY_RETENTION_BATCH="2")  # several pages, with kept members at their head
    old = int(NOW * 1000) - 61 * DAY_MS
    for i in range(9):
        await put_state(r, "sessions", 0, f"s{i}", old + i // 2)  # pairs of equal scores: ties across pages
    for waiting in ("s0", "s3", "s4"):  # an update still undelivered: kept, page after page
        await r.hset(keys.session_last_key(0), f"ses:FR:AB1:{waiting}", RECENT)
    sw = sweeper(settings, store, (0,))
    zrange = sw.store.redis.zrangebyscore
    updated = int(NOW * 1000)

    async def read_then_update(name: str, *a: Any, **kw: Any) -> Any:
        rows = await zrange(name, *a, **kw)
        if any(row[0] == b"s1" for row in rows):  # s1 updated by the CSMS between the read and the delete
            await r.zadd(name, {"s1": updated})
        return rows

    monkeypatch.setattr(sw.store.redis, "zrangebyscore", read_then_update)
    got = await sw.sweep()
    assert got["sessions"] == 5  # s2, s5, s6, s7, s8
    assert await state(r, "sessions", 0) == ({"FR:AB1:s0", "FR:AB1:s1", "FR:AB1:s3", "FR:AB1:s4"},
                                             {"s0", "s1", "s3", "s4"})  # fmt: skip


async def test_only_the_shards_this_replica_owns_are_swept(settings: Settings, store: Store, r: aioredis.Redis) -> None:
    for shard in range(4):
        await r.hset(keys.delivered_key(shard), "cdrs|x", OLD)
        await r.hset(keys.session_last_key(shard), "ses:FR:AB1:s", OLD)
        await r.hset(keys.session_done_key(shard), "ses:FR:AB1:s", OLD)
        await put_state(r, "cdrs", shard, "c", int(NOW * 1000) - 61 * DAY_MS)
    await sweeper(settings, store, owned=(1, 3)).sweep()
    for shard in range(4):
        kept = shard in (0, 2)
        assert bool(await r.hlen(keys.delivered_key(shard))) is kept
        assert bool(await r.hlen(keys.session_last_key(shard))) is kept
        assert bool(await r.hlen(keys.session_done_key(shard))) is kept
        assert bool(await r.zcard(keys.index_key("cdrs", shard, "FR", "AB1"))) is kept


async def test_zero_keeps_everything(make_settings: Callable[..., Settings], store: Store, r: aioredis.Redis) -> None:
    settings = make_settings(RELAY_RETENTION_MARKERS_S="0", RELAY_RETENTION_SESSIONS_S="0")
    await r.hset(keys.delivered_key(0), "cdrs|x", OLD)
    await put_state(r, "cdrs", 0, "c", 0)
    sw = sweeper(settings, store)
    assert not sw.enabled
    assert sum((await sw.sweep()).values()) == 0
    assert await r.hlen(keys.delivered_key(0)) == 1 and await r.hlen(keys.state_key("cdrs", 0)) == 1


async def test_the_relay_sweeps_the_shards_its_lease_loop_holds(
    make_settings: Callable[..., Settings], r: aioredis.Redis
) -> None:
    settings = make_settings(RELAY_RETENTION_SWEEP_INTERVAL_S="1", RELAY_RETENTION_MARKERS_S="60")
    await r.hset(keys.delivered_key(2), mapping={"cdrs|old": "1000-0", "cdrs|new": "99999999999999-0"})
    relay = Relay(settings)
    await relay.start()
    try:

        async def swept() -> bool:
            return await r.hlen(keys.delivered_key(2)) == 1

        await wait_until(swept, 10, "the relay's sweeper forgets the old marker")
    finally:
        await relay.stop()
    assert await fields(r, keys.delivered_key(2)) == {"cdrs|new": "99999999999999-0"}
