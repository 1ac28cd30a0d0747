# ruff: noqa: F811  (pytest fixtures imported from the feature's own test modules)
"""Found in review of issue 18's admin API: hostile inputs that must get a 4xx, not a 503/500."""

from __future__ import annotations

import time
from typing import Any

import pytest
import redis.asyncio as aioredis

from tests.test_admin import Admin, admin, problem  # noqa: F401  (the fixture)


@pytest.mark.parametrize(
    "after",
    [
        "locations:0:18446744073709551615-18446744073709551615",  # seq + 1 overflows a stream id
        "locations:0:99999999999999999999-0",  # ms above 2**64 - 1
        "locations:0:18446744073709551616-0",
    ],
)
async def test_after_cursor_out_of_range_is_a_400(admin: Admin, after: str) -> None:
    # The cursor regex takes up to 20 digits per part; Redis refuses ids above 2**64-1 ("Invalid stream ID"),
    # which the store translates into StoreUnavailable: the back office gets "503 Redis unavailable, try again"
    # with Retry-After: 1 and retries forever.
    answer = await admin.call("GET", "/admin/dead-letters", params={"after": after})
    problem(answer, 400, "after")


async def _scans(r: Any) -> int:
    stats = await r.info("commandstats")
    return int(stats.get("cmdstat_scan", {}).get("calls", 0))


async def test_admin_status_does_not_scan_the_whole_keyspace(admin: Admin) -> None:
    # Idempotency keys are one Redis key each (relay:{rN}:idem:…, kept 24 h): a CSMS sending 100 events/s with a
    # key leaves ~8.6 M keys. /admin/status (relay.status.collect → Leases.link_states) finds the replicas' link
    # hashes with SCAN MATCH relay:link:* COUNT 100 over the whole keyspace: ~keys/100 round trips per call, on
    # the serving process, every time a back office polls it. The live replicas are in a sorted set already.
    r: Any = aioredis.Redis.from_url(admin.settings.redis.url)
    try:
        for start in range(0, 50_000, 5_000):
            async with r.pipeline(transaction=False) as pipe:
                for i in range(start, start + 5_000):
                    pipe.set(f"relay:{{r{i % 4}}}:idem:FR/AB1 PUT /x/{i}", b"x")
                await pipe.execute()
        before = await _scans(r)
        await admin.get("/admin/status")
        assert await _scans(r) - before <= 5, "SCAN calls for one GET /admin/status"
    finally:
        await r.aclose()


async def test_show_by_dead_id_does_not_read_the_whole_dlq(admin: Admin) -> None:
    # GET /admin/dead-letters/{id} (relay.dlq.find) pages through every dead letter of every module and shard,
    # 500 full envelopes (bodies up to max_body_bytes) per XRANGE, in the serving process, until it meets the id.
    # A dead-letter id is a stream id: XRANGE dlq id id COUNT 1 on each (module, shard) finds it in 5 × shards calls.
    admin.refuse.add("x")
    await admin.put("LOC1", "x")
    [row] = await admin.dead(1)
    r: Any = aioredis.Redis.from_url(admin.settings.redis.url)
    try:
        key = [k for k in await r.keys("relay:*dlq*") if await r.xlen(k)][0]
        [(_, fields)] = await r.xrange(key, count=1)
        for _ in range(10):
            async with r.pipeline(transaction=False) as pipe:
                for _i in range(2_000):
                    pipe.xadd(key, fields)
                await pipe.execute()
        [(last, _)] = await r.xrevrange(key, count=1)
        await r.config_resetstat()
        t = time.perf_counter()
        shown = await admin.get(f"/admin/dead-letters/{last.decode()}")
        took = time.perf_counter() - t
        calls = int((await r.info("commandstats")).get("cmdstat_xrange", {}).get("calls", 0))
        print(f"show of the last of 20 001 dead letters: {took:.2f} s, {calls} XRANGE")
        assert shown["dead_id"] == last.decode()
        assert calls <= 5 * admin.settings.redis.shards, calls
    finally:
        await r.aclose()
