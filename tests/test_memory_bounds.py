"""Memory bounds (issue 16 part 3): Redis's maxmemory, dead consumers, memory gauges.

- The embedded server runs with ``maxmemory`` (``[storage] max_memory_mib``) and ``noeviction``. Full, it
  refuses writes: the ingress and the OCPI listener answer 503 + Retry-After with nothing stored, and the
  CSMS's retry once room is back succeeds. The replicas keep their heartbeat and leases meanwhile (they
  deliver, which is what frees room).
- Each restart of a replica leaves a consumer in every group: those of replicas no longer alive that hold no
  pending entry are removed (at start and every minute); a live one, or one holding entries, is kept.
- ``relay_redis_used_memory_bytes``, ``relay_redis_maxmemory_bytes``, ``relay_redis_aof_size_bytes`` on the
  gauge loop.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import REGISTRY
from redis.exceptions import OutOfMemoryError

from relay.config import Settings
from relay.embedded_redis import EmbeddedRedis
from relay.ingress import create_app
from relay.service import Relay, _cancel
from relay.store import DeliveryStore, Store, connect, keys
from relay.store.registration import RegistrationStore, token_digest
from relay.typedefs import Health
from tests.conftest import AUTH, example, gireve_location
from tests.csms_fake import bench, iop_token
from tests.waiting import wait_until

P = "/ingress/2.2.1"
LOC = f"{P}/locations/FR/AB1/LOC1"
SES = f"{P}/sessions/FR/AB1/S1"
SMALL_MIB = 8


def enc(doc: Any) -> bytes:
    return msgspec.json.encode(doc)


@pytest.fixture
async def small() -> AsyncIterator[EmbeddedRedis]:
    """An embedded server of its own with a small maxmemory (the session's server has none)."""
    with tempfile.TemporaryDirectory(prefix="relay-m-", dir="/tmp") as d:
        server = EmbeddedRedis(Path(d) / "r", fsync="everysec", max_memory_mib=SMALL_MIB)
        await server.start()
        try:
            yield server
        finally:
            await server.stop()


@pytest.fixture
async def raw(small: EmbeddedRedis) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(small.url)
    yield client
    await client.aclose()


async def fill(raw: aioredis.Redis) -> int:
    """Write filler until Redis refuses even a small write (OOM); returns how many chunks it took.

    Smaller and smaller chunks: a large write is refused while the room left is still the size of its argument.
    """
    n = 0
    for size in (131_072, 4096, 64):
        while True:
            try:
                await raw.set(f"filler:{n}", b"x" * size)
            except OutOfMemoryError:
                break
            n += 1
    # Refused means used memory is just past the limit (by a few hundred bytes): lower the limit a little
    # under it, so that a buffer the server frees meanwhile does not let a write in by chance.
    used = int((await raw.info("memory"))["used_memory"])
    await raw.config_set("maxmemory", used - 65_536)
    return n


async def free(raw: aioredis.Redis) -> None:
    names = [k async for k in raw.scan_iter(match="filler:*")]
    await raw.delete(*names)


def full_refusals() -> float:
    return REGISTRY.get_sample_value("relay_ingress_store_full_total") or 0.0


async def snapshot(raw: aioredis.Redis) -> dict[bytes, Any]:
    """Every relay key and its content (streams by length and last id), to show that nothing changed."""
    out: dict[bytes, Any] = {}
    async for k in raw.scan_iter(match="relay:*"):
        kind = await raw.type(k)
        if kind == b"stream":
            out[k] = (await raw.xlen(k), await raw.xrevrange(k, count=1))
        elif kind == b"hash":
            out[k] = await raw.hgetall(k)
        elif kind == b"zset":
            out[k] = await raw.zrange(k, 0, -1, withscores=True)
        else:
            out[k] = await raw.dump(k)
    return out


# -- maxmemory ----------------------------------------------------------------------------------------------


async def test_the_embedded_server_runs_with_maxmemory_and_noeviction(small: EmbeddedRedis,
                                                                      raw: aioredis.Redis) -> None:  # fmt: skip
    conf: dict[Any, Any] = await raw.config_get("maxmemory*")
    assert int(conf["maxmemory"]) == SMALL_MIB * 1024 * 1024
    assert conf["maxmemory-policy"] == "noeviction"
    assert "--maxmemory" in EmbeddedRedis("/tmp/x", max_memory_mib=1024)._argv()
    assert Settings().storage.max_memory_mib == 1024  # the default: 1 GiB


async def test_full_redis_is_503_with_nothing_stored_and_the_retry_succeeds(
    make_settings: Callable[..., Settings], small: EmbeddedRedis, raw: aioredis.Redis
) -> None:
    settings = make_settings(RELAY_REDIS_URL=small.url)
    store = Store(connect(small.url, settings.redis), settings.redis)
    await store.load_scripts()
    await store.ensure_groups()
    client = TestClient(TestServer(create_app(settings, store, Health(listeners_up=True))))
    await client.start_server()
    try:
        session = example("session_example_1_simple_start.json", country_code="FR", party_id="AB1", id="S1")
        assert (await client.put(LOC, data=enc(gireve_location()), headers=AUTH)).status == 202
        assert (await client.put(SES, data=enc(session), headers=AUTH)).status == 202
        assert await fill(raw) > 0
        before, refusals = await snapshot(raw), full_refusals()

        newer = enc(gireve_location(last_updated="2026-12-01T10:00:00Z"))
        keyed = {**AUTH, "Idempotency-Key": "retry-me"}
        patch = enc({"kwh": 1.5, "last_updated": "2024-03-05T17:30:00Z"})
        cdr = enc(example("cdr_example.json", country_code="FR", party_id="AB1"))
        batch = enc({"operations": [{"method": "PUT", "path": LOC, "body": gireve_location(name="other")}]})
        answers = [
            await client.put(LOC, data=newer, headers=keyed),  # an unconditional PUT, with a key
            await client.patch(SES, data=patch, headers=AUTH),  # a merge (compare-and-set)
            await client.post(f"{P}/cdrs", data=cdr, headers=AUTH),
            await client.post(f"{P}/batch", data=batch, headers=AUTH),
        ]
        for resp in answers:
            assert resp.status == 503, await resp.text()
            assert resp.headers["Retry-After"] == "5"
            assert "full" in (await resp.json())["status_message"]
        assert full_refusals() == refusals + 4  # the batch's item too
        assert await snapshot(raw) == before  # nothing half-stored: no entry, no state, no key's answer

        await free(raw)

        async def retried() -> bool:  # the CSMS's retry, same key and body, once room is back
            resp = await client.put(LOC, data=newer, headers=keyed)
            return resp.status == 202

        await wait_until(retried, 5, "the retry is accepted")
        assert (await store.stream_lengths())["locations"] == 2
        resp = await client.put(LOC, data=newer, headers=keyed)
        assert (await resp.json())["data"]["replayed"] is True  # stored once
        assert (await client.patch(SES, data=patch, headers=AUTH)).status == 202
    finally:
        await client.close()
        await store.close()


async def test_replicas_keep_their_heartbeat_and_leases_when_full(
    make_settings: Callable[..., Settings], small: EmbeddedRedis, raw: aioredis.Redis
) -> None:
    settings = make_settings(RELAY_REDIS_URL=small.url)
    store = Store(connect(small.url, settings.redis), settings.redis)
    try:
        ds = DeliveryStore(store)
        await fill(raw)
        with pytest.raises(OutOfMemoryError):
            await raw.zadd("probe", {"a": 1})  # Redis is refusing writes
        assert await ds.heartbeat("r1", 1_000_000, 30_000) == 1
        assert await ds.acquire(0, "r1", 15_000) == ""  # taken although Redis is full
        assert await ds.renew(0, "r1", 15_000)
        await ds.release(0, "r1", 15_000)
        assert await raw.get(keys.lease_key(0)) == b"free:r1"
    finally:
        await store.close()


async def test_a_stopped_link_can_be_resumed_when_full(
    make_settings: Callable[..., Settings], small: EmbeddedRedis, raw: aioredis.Redis
) -> None:
    # `relay link resume` (request_resume) and the replica's read of it (link_sync, whose own publish is
    # refused at maxmemory) both work while Redis refuses writes: delivering is what frees room.
    settings = make_settings(RELAY_REDIS_URL=small.url)
    store = Store(connect(small.url, settings.redis), settings.redis)
    try:
        ds = DeliveryStore(store)
        await fill(raw)
        with pytest.raises(OutOfMemoryError):
            await raw.zadd("probe", {"a": 1})
        await ds.request_resume(1234.5)
        assert await ds.link_sync("r1", "paused", "auth", 1000.0) == 1234.5
    finally:
        await store.close()


async def test_the_registration_writes_work_when_full(
    make_settings: Callable[..., Settings], small: EmbeddedRedis, raw: aioredis.Redis
) -> None:
    settings = make_settings(RELAY_REDIS_URL=small.url)
    store = Store(connect(small.url, settings.redis), settings.redis)
    try:
        rs = RegistrationStore(store)
        await fill(raw)
        with pytest.raises(OutOfMemoryError):
            await raw.zadd("probe", {"a": 1})
        await rs.set_token_a("tokA")
        assert await rs.claim_token_a("tokA", configured=False) == 2
        await rs.release_token_a("tokA", pending=True)  # the handshake failed: the token works again
        assert (await rs.load())[1] == token_digest("tokA")
        assert await rs.claim_token_a("tokA", configured=False) == 2
        await rs.save(b'{"r":1}', token_digest("tokA"))
        assert await rs.withdraw_token_a("nope") is False
        reg, pending, used = await rs.load()
        assert reg == b'{"r":1}' and pending is None and used == {token_digest("tokA")}
    finally:
        await store.close()


async def test_the_ocpi_listener_is_503_when_full(make_settings: Callable[..., Settings], small: EmbeddedRedis,
                                                  raw: aioredis.Redis) -> None:  # fmt: skip
    async with bench(make_settings, RELAY_REDIS_URL=small.url) as b:
        await fill(raw)
        path = "/tokens/NL/TNM/0102ABCD?type=RFID"
        status, answer, resp_headers = await b.ocpi("PUT", path, iop_token("0102ABCD", "ALLOWED"))
        assert status == 503, answer
        assert answer["status_code"] == 3000 and resp_headers["Retry-After"] == "1"
        status, _ = await b.ingress("PUT", "/locations/FR/AB1/LOC9", gireve_location("LOC9"))
        assert status == 503
        await free(raw)

        async def taken() -> bool:
            status, _, _ = await b.ocpi("PUT", path, iop_token("0102ABCD", "ALLOWED"))
            return status in (200, 201)

        await wait_until(taken, 5, "the token is taken once room is back")


# -- dead consumers -------------------------------------------------------------------------------------------


async def consumers(raw: aioredis.Redis, stream: str) -> dict[str, int]:
    return {c["name"].decode(): int(c["pending"]) for c in await raw.xinfo_consumers(stream, keys.GROUP)}


async def test_dead_consumers_without_pending_entries_are_removed(settings: Settings, store: Store,
                                                                  redis_url: str) -> None:  # fmt: skip
    raw = aioredis.Redis.from_url(redis_url)
    stream = keys.stream_key("locations", 0)
    try:
        for n in range(2):
            await raw.xadd(stream, {"e": f"x{n}"})
        read: Any = await raw.xreadgroup(keys.GROUP, "dead-holding", {stream: ">"}, count=1)
        held = read[0][1][0][0]
        read = await raw.xreadgroup(keys.GROUP, "dead-idle", {stream: ">"}, count=1)
        done = read[0][1][0][0]
        await raw.xack(stream, keys.GROUP, done)
        await raw.xgroup_createconsumer(stream, keys.GROUP, "live-idle")
        ds = DeliveryStore(store)
        await ds.heartbeat("live-idle", 10**13, 30_000)
        before = REGISTRY.get_sample_value("relay_consumers_removed_total") or 0.0

        relay = Relay(settings)
        relay.store = store
        assert await relay.reap_consumers() == [f"{stream}/dead-idle"]
        assert await consumers(raw, stream) == {"dead-holding": 1, "live-idle": 0}
        assert REGISTRY.get_sample_value("relay_consumers_removed_total") == before + 1

        await raw.xack(stream, keys.GROUP, held)  # its entry done (e.g. taken over and delivered)
        assert await relay.reap_consumers() == [f"{stream}/dead-holding"]
        assert await consumers(raw, stream) == {"live-idle": 0}
    finally:
        await raw.aclose()


async def test_the_gauge_loop_removes_them_at_start(settings: Settings, store: Store, redis_url: str) -> None:
    raw = aioredis.Redis.from_url(redis_url)
    stream = keys.stream_key("sessions", 1)
    relay = Relay(settings)
    relay.store = store
    try:
        await raw.xgroup_createconsumer(stream, keys.GROUP, "gone-before-restart")
        task = asyncio.create_task(relay._gauge_loop(interval_s=0.05))

        async def removed() -> bool:
            return "gone-before-restart" not in await consumers(raw, stream)

        await wait_until(removed, 3, "the dead consumer removed")
        await _cancel(task)  # redis-py can swallow one cancel in mid-command (relay.service._cancel)
    finally:
        await raw.aclose()


# -- gauges ---------------------------------------------------------------------------------------------------


async def test_memory_and_aof_gauges(make_settings: Callable[..., Settings], small: EmbeddedRedis,
                                     raw: aioredis.Redis) -> None:  # fmt: skip
    settings = make_settings(RELAY_REDIS_URL=small.url)
    store = Store(connect(small.url, settings.redis), settings.redis)
    relay = Relay(settings)
    relay.store = store
    try:
        await raw.set("some", b"y" * 500_000)
        assert await relay.update_gauges()
        info_mem, info_aof = await raw.info("memory"), await raw.info("persistence")
        used = REGISTRY.get_sample_value("relay_redis_used_memory_bytes")
        assert used is not None and 500_000 < used and abs(used - info_mem["used_memory"]) < 200_000
        assert REGISTRY.get_sample_value("relay_redis_maxmemory_bytes") == SMALL_MIB * 1024 * 1024
        aof = REGISTRY.get_sample_value("relay_redis_aof_size_bytes")
        assert aof is not None and aof >= 500_000 and aof == info_aof["aof_current_size"]
    finally:
        await store.close()
