"""High availability (issue 17): the relay on Valkey Sentinel and on Valkey Cluster, real servers only.

- Sentinel: a primary, two replicas and three sentinels (tests/topologies.py). Under steady ingress load with
  ``ack_replicas = 1`` the primary is killed with SIGKILL; the sentinels promote a replica and the relay
  follows it without a restart. Every update answered 202 reaches the IOP, in order per object, duplicates
  within the at-least-once bound; the time from the kill to the first 202 again and to delivery resuming is
  printed. (Two replicas: with one, the promoted node has no replica left and ``ack_replicas = 1`` is 503
  until an operator brings one back, which is what it promises.)
- Cluster: three primaries, 16 shards, two relay processes. A shard's keys share a slot (one node), the
  shards spread over the three nodes, and a kill -9 of one relay during load loses nothing.

The relays run as ``python -m relay serve`` processes (tests/test_crash.py's Proc and Producer); the fake IOP
runs in the test process.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.crc import key_slot

from relay.config import MODULES
from relay.store import keys as K
from tests.conftest import TOKEN
from tests.fake_iop import FakeIop
from tests.test_crash import LOC_PREFIX, TIMEOUTS, Producer, Tally, World, check, check_sessions, requests_since
from tests.topologies import SentinelSet, ValkeyCluster, sentinel_set_fixture, valkey_cluster_fixture
from tests.waiting import wait_until

__all__ = ["sentinel_set_fixture", "valkey_cluster_fixture"]

pytestmark = pytest.mark.slow

CLUSTER_SHARDS = 16


def relay_env(url: str, iop: FakeIop, tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env.update(
        RELAY_REDIS_URL=url,
        RELAY_INGRESS_TOKEN=TOKEN,
        RELAY_IOP_URL=iop.url,
        RELAY_IOP_TOKEN="ha-iop-token",
        RELAY_OCPI_LISTEN="127.0.0.1:0",
        RELAY_LOG_LEVEL="warning",
        RELAY_STORAGE_DIR=str(tmp / "data"),
        **TIMEOUTS,
        **extra,
    )
    return env


async def drained(redis: Any, shards: int) -> bool:
    for m in MODULES:
        for s in range(shards):
            if await redis.xlen(K.stream_key(m, s)):
                return False
    return True


async def dead_letters(redis: Any, shards: int) -> int:
    return sum([await redis.xlen(K.dlq_key(m, s)) for m in MODULES for s in range(shards)])


class TimedProducer(Producer):
    """The test_crash producer, remembering when each request that got a 202 was sent (and for a Location
    update, its number)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sent_at: list[tuple[float, str, str]] = []  # (sent at, path, Location "name")

    async def _send(self, method: str, path: str, body: dict[str, Any]) -> bool:
        sent = time.time()
        ok = await super()._send(method, path, body)
        if ok:
            self.sent_at.append((sent, path, str(body.get("name", ""))))
        return ok

    def first_sent_after(self, at: float) -> float | None:
        return min((t for t, _, _ in self.sent_at if t > at), default=None)

    def locations_sent_after(self, at: float) -> set[tuple[str, str]]:
        """(Location id, update number) of the updates sent after ``at`` and accepted."""
        return {(p.rsplit("/", 1)[1], n) for t, p, n in self.sent_at if t > at and p.startswith("/locations/")}


@pytest.mark.parametrize("sentinel_set", [{"replicas": 2, "down_after_ms": 5000}], indirect=True)
async def test_sentinel_failover_under_load_loses_nothing(
    sentinel_set: SentinelSet, iop: FakeIop, tmp_path: Path
) -> None:
    env = relay_env(sentinel_set.url, iop, tmp_path, RELAY_REDIS_ACK_REPLICAS="1")
    sentinel = Sentinel(sentinel_set.sentinel_addresses, socket_timeout=2)
    redis: Any = sentinel.master_for("mymaster")
    http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
    w = World(iop, redis, http, env, tmp_path)
    relay = w.proc("relay")
    try:
        relay.start()
        await relay.ready(http)
        producer = TimedProducer([relay], http, seed=17)
        run = asyncio.create_task(producer.run())
        await iop.wait_for(lambda: len(iop.received) >= 300, timeout=30)
        killed_at = time.time()
        sentinel_set.kill_primary()
        failover_s = await sentinel_set.wait_failover(timeout=40)
        await wait_until(lambda: producer.first_sent_after(killed_at) is not None, 30, "a 202 for a request sent "
                         "after the kill")  # fmt: skip
        first_202 = (producer.first_sent_after(killed_at) or 0.0) - killed_at

        def resumed() -> float | None:
            """When the IOP first took a Location update that was sent after the kill."""
            after = producer.locations_sent_after(killed_at)
            for r in iop.received:
                if (
                    r.ok
                    and r.path.startswith(LOC_PREFIX)
                    and (r.path.removeprefix(LOC_PREFIX), r.json()["name"]) in after
                ):
                    return r.answered_at
            return None

        await wait_until(lambda: resumed() is not None, 30, "delivery resuming after the failover")
        delivery_s = (resumed() or 0.0) - killed_at
        await requests_since(iop, 200, timeout=30)  # steady load on the new primary
        producer.stop.set()
        await asyncio.wait_for(run, 15)
        tally = Tally(iop)
        await iop.wait_for(lambda: tally.all_delivered(producer), timeout=60)
        await wait_until(lambda: drained(redis, 4), 30, "streams drained")
        assert await dead_letters(redis, 4) == 0
        stats = check(iop, producer, kills=1)
        stats["sessions_with_cdr"] = check_sessions(iop, producer)
        assert relay.alive, relay.log()  # followed the failover without a restart
        print(f"\nsentinel failover: promoted in {failover_s:.1f} s, first 202 again {first_202:.1f} s after "
              f"the kill, delivery resumed {delivery_s:.1f} s after it; {stats}")  # fmt: skip
        assert first_202 <= 15 and delivery_s <= 15, (first_202, delivery_s)
    finally:
        relay.stop()
        await http.close()
        await redis.aclose()
        await sentinel.aclose()


async def test_cluster_two_relays_kill_9_of_one_loses_nothing(
    valkey_cluster: ValkeyCluster, iop: FakeIop, tmp_path: Path
) -> None:
    env = relay_env(valkey_cluster.url, iop, tmp_path, RELAY_REDIS_CLUSTER="true",
                    RELAY_REDIS_SHARDS=str(CLUSTER_SHARDS))  # fmt: skip
    # A shard lives on one node: its streams, state, markers and lease share the slot of {rN}.
    homes = []
    for shard in range(CLUSTER_SHARDS):
        names = [K.stream_key(m, shard) for m in MODULES] + [K.dlq_key(m, shard) for m in MODULES]
        names += [K.lease_key(shard), K.delivered_key(shard), K.state_key("locations", shard), K.parked_key(shard)]
        assert len({key_slot(n.encode()) for n in names}) == 1, shard
        homes.append(valkey_cluster.node_for_key(names[0]).port)
    assert len(set(homes)) == 3  # 16 shards spread over the three primaries
    redis: Any = RedisCluster.from_url(valkey_cluster.url)
    http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
    w = World(iop, redis, http, env, tmp_path)
    a, b = w.proc("a"), w.proc("b")
    try:
        a.start()
        b.start()
        await a.ready(http)
        await b.ready(http)
        producer = Producer([a, b], http, seed=29)
        run = asyncio.create_task(producer.run())
        await iop.wait_for(lambda: len(iop.received) >= 300, timeout=30)
        b.kill()
        await iop.wait_for(lambda: len(iop.received) >= 600, timeout=40)  # the survivor takes b's shards
        b.start()
        await b.ready(http)
        await requests_since(iop, 100, timeout=30)  # both relays again, under load
        producer.stop.set()
        await asyncio.wait_for(run, 15)
        tally = Tally(iop)
        await iop.wait_for(lambda: tally.all_delivered(producer), timeout=60)
        await wait_until(lambda: drained(redis, CLUSTER_SHARDS), 30, "streams drained")
        assert await dead_letters(redis, CLUSTER_SHARDS) == 0
        stats = check(iop, producer, kills=1)
        stats["sessions_with_cdr"] = check_sessions(iop, producer)
        assert stats["sessions_with_cdr"] >= 5
        # Every node held some of the events: the streams of all three nodes were written.
        written = set()
        for s in range(CLUSTER_SHARDS):
            info = await redis.xinfo_stream(K.stream_key("locations", s))
            if info.get("entries-added", info.get(b"entries-added", 0)):
                written.add(valkey_cluster.node_for_key(K.stream_key("locations", s)).port)
        assert len(written) == 3, written
        print(f"\ncluster, two relays, one killed: {stats}")
    finally:
        for p in w.procs:
            p.stop()
        await http.close()
        await redis.aclose()
