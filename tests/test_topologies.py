"""The Sentinel and Cluster topologies of tests/topologies.py, checked with redis-py's own clients."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.crc import key_slot
from redis.exceptions import ClusterCrossSlotError, MovedError, RedisClusterException

from tests.topologies import SentinelSet, ValkeyCluster, sentinel_set_fixture, valkey_cluster_fixture

__all__ = ["sentinel_set_fixture", "valkey_cluster_fixture"]  # the fixtures, taken by name
from tests.waiting import wait_until

FAILOVER_TIMEOUT = 15.0
KEY0, KEY1 = "relay:{r0}:x", "relay:{r1}:x"


async def test_write_through_sentinel_survives_failover(sentinel_set: SentinelSet) -> None:
    sentinel = Sentinel(sentinel_set.sentinel_addresses, socket_timeout=2.0)
    master = sentinel.master_for("mymaster", socket_timeout=2.0, decode_responses=True)
    try:
        assert await sentinel.discover_master("mymaster") == sentinel_set.primary.address
        assert await sentinel_set.primary_address() == sentinel_set.primary.address
        assert await master.set("relay:k", "before") is True
        assert await master.wait(1, 2000) == 1  # on the replica too before the primary dies

        killed = sentinel_set.kill_primary()
        took = await sentinel_set.wait_failover(FAILOVER_TIMEOUT)
        assert took < FAILOVER_TIMEOUT
        new = await sentinel_set.primary_address()
        assert new != killed.address
        assert new == sentinel_set.primary.address

        async def read() -> bool:
            # The client's connection to the killed primary fails once; its next one goes where Sentinel says.
            try:
                value = await master.get("relay:k")
            except (aioredis.ConnectionError, aioredis.TimeoutError):
                return False
            return bool(value == "before")

        await wait_until(read, 5.0, "the write read back through Sentinel.master_for after the failover")
        assert await master.set("relay:k", "after") is True
        direct = sentinel_set.primary.client(decode_responses=True)
        try:
            assert await direct.get("relay:k") == "after"
        finally:
            await direct.aclose()
    finally:
        await master.aclose()
        await sentinel.aclose()


async def test_cluster_keys_land_on_their_slots(valkey_cluster: ValkeyCluster) -> None:
    owners = [valkey_cluster.node_for_key(KEY0), valkey_cluster.node_for_key(KEY1)]
    assert owners[0] is not owners[1]  # {r0} → slot 2121, {r1} → slot 6248
    for key, owner in zip((KEY0, KEY1), owners, strict=True):
        lo, hi = valkey_cluster.slot_ranges[valkey_cluster.nodes.index(owner)]
        assert lo <= key_slot(key.encode()) <= hi

    cluster = RedisCluster.from_url(valkey_cluster.url, decode_responses=True)
    try:
        assert await cluster.set(KEY0, "zero") is True
        assert await cluster.set(KEY1, "one") is True
        assert [await cluster.get(KEY0), await cluster.get(KEY1)] == ["zero", "one"]
        for node in valkey_cluster.nodes:
            direct = node.client(decode_responses=True)
            try:
                for key, value, owner in zip((KEY0, KEY1), ("zero", "one"), owners, strict=True):
                    if node is owner:
                        assert await direct.get(key) == value
                    else:
                        with pytest.raises(MovedError, match=f"{key_slot(key.encode())} 127.0.0.1:{owner.port}"):
                            await direct.get(key)
            finally:
                await direct.aclose()
    finally:
        await cluster.aclose()


SCRIPT = """
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[1])
return redis.call('MGET', KEYS[1], KEYS[2])
"""


async def test_cluster_evalsha_two_keys_one_hash_tag(valkey_cluster: ValkeyCluster) -> None:
    a, b = "relay:{r0}:a", "relay:{r0}:b"
    cluster = RedisCluster.from_url(valkey_cluster.url, decode_responses=True)
    try:
        sha = await cluster.script_load(SCRIPT)  # on every primary
        assert await cluster.evalsha(sha, 2, a, b, "v") == ["v", "v"]
        assert [await cluster.get(a), await cluster.get(b)] == ["v", "v"]
        # Two hash tags: redis-py refuses before sending; the server itself would answer CROSSSLOT.
        with pytest.raises(RedisClusterException, match="same key slot"):
            await cluster.evalsha(sha, 2, a, "relay:{r1}:b", "v")
    finally:
        await cluster.aclose()
    direct = valkey_cluster.node_for_key(a).client()
    try:
        with pytest.raises(ClusterCrossSlotError):
            await direct.evalsha(sha, 2, a, "relay:{r1}:b", "v")
    finally:
        await direct.aclose()
