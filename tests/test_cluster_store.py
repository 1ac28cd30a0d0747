"""The store on a real three-primary Valkey Cluster (issue 17): the coalesced pipeline split per node,
redirections followed, the ack policy confirmed on each node that took a write, and the scripts in one slot.
The two-relay kill -9 test is in tests/test_ha.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from relay.config import RedisSettings
from relay.errors import NotDurable, StoreUnavailable
from relay.store import RegistrationStore, RoamingStore, Store, connect
from relay.store import keys as K
from tests.topologies import ValkeyCluster, valkey_cluster_fixture

__all__ = ["valkey_cluster_fixture"]

SHARDS = 16


async def _store(cluster: ValkeyCluster, **knobs: Any) -> Store:
    settings = RedisSettings(url=cluster.url, cluster=True, shards=SHARDS, **knobs)
    store = Store(connect(settings.url, settings), settings)
    await store.load_scripts()
    await store.ensure_groups()
    await store.configure_ack(sentinel=False)
    return store


@pytest.fixture
async def store(valkey_cluster: ValkeyCluster) -> AsyncIterator[Store]:
    s = await _store(valkey_cluster, ack_fsync=True)
    yield s
    await s.close()


async def _waitaof_calls(node: Any) -> int:
    client: aioredis.Redis = node.client()
    try:
        stats: dict[str, Any] = await client.info("commandstats")
        return int(stats.get("cmdstat_waitaof", {}).get("calls", 0))
    finally:
        await client.aclose()


async def test_a_batch_over_every_shard_lands_on_each_owner_and_is_confirmed_there(
    store: Store, valkey_cluster: ValkeyCluster
) -> None:
    assert store.cluster and store.ack.command == ("WAITAOF", 1, 0, 1000)
    before = [await _waitaof_calls(n) for n in valkey_cluster.nodes]
    futures = [store.call("XADD", K.stream_key("locations", s), "*", "e", b"x", durable=True) for s in range(SHARDS)]
    futures += [store.call("HGET", K.parked_key(s), "nothing") for s in range(SHARDS)]
    replies = [await f for f in futures]
    assert all(isinstance(r, bytes) for r in replies[:SHARDS]) and replies[SHARDS:] == [None] * SHARDS
    for shard in range(SHARDS):  # each on the node that owns its slot, nowhere else
        owner = valkey_cluster.node_for_key(K.stream_key("locations", shard))
        client: aioredis.Redis = owner.client()
        try:
            assert await client.xlen(K.stream_key("locations", shard)) == 1
        finally:
            await client.aclose()
    after = [await _waitaof_calls(n) for n in valkey_cluster.nodes]
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)  # every node confirmed its own


async def test_a_stale_slot_map_is_followed_through_moved(store: Store, valkey_cluster: ValkeyCluster) -> None:
    """The slot map says node A owns shard 0's slot while node B does: B answers MOVED, the store asks the
    cluster again and sends the command where it belongs (once: the MOVED reply means it did nothing)."""
    cluster: Any = store.redis  # typed as Redis by the store (relay.store.connection.connect)
    assert isinstance(cluster, RedisCluster)
    stream = K.stream_key("locations", 0)
    owner = valkey_cluster.node_for_key(stream)
    slot = cluster.keyslot(stream)
    wrong = next(n for n in cluster.get_primaries() if n.port != owner.port)
    cluster.nodes_manager.slots_cache[slot] = [wrong]
    assert await store.call("XADD", stream, "*", "e", b"x", durable=True)
    assert cluster.nodes_manager.get_node_from_slot(slot).port == owner.port  # the map was refreshed
    assert await cluster.xlen(stream) == 1


async def test_writes_to_a_dead_node_fail_alone(store: Store, valkey_cluster: ValkeyCluster) -> None:
    """A node down: its shards' writes fail with a store error (the ingress answers 503), the others succeed."""
    dead = valkey_cluster.kill_node(2)
    results = []
    for shard in range(SHARDS):
        stream = K.stream_key("locations", shard)
        on_dead = valkey_cluster.node_for_key(stream) is dead
        try:
            results.append((on_dead, bool(await store.call("XADD", stream, "*", "e", b"x"))))
        except StoreUnavailable as exc:  # the ingress answers 503
            assert not isinstance(exc, NotDurable)
            results.append((on_dead, False))
    assert any(on_dead for on_dead, _ in results) and any(not on_dead for on_dead, _ in results)
    assert all(ok != on_dead for on_dead, ok in results), results


async def test_registration_scripts_and_command_transactions_stay_in_one_slot(store: Store) -> None:
    """The keys a script or a MULTI touches together share {g}: no CROSSSLOT on a Cluster."""
    assert len({K.REGISTRATION_KEY, K.TOKEN_A_KEY, K.TOKEN_A_USED_KEY, K.COMMANDS_DUE_KEY, K.command_key("c1")}) == 5
    cluster: Any = store.redis
    assert len({cluster.keyslot(k) for k in (K.REGISTRATION_KEY, K.TOKEN_A_KEY, K.TOKEN_A_USED_KEY,
                                             K.COMMANDS_DUE_KEY, K.command_key("c1"))}) == 1  # fmt: skip
    rs = RegistrationStore(store)
    await rs.set_token_a("token-a-secret")
    await rs.save(b'{"registered": true}', "0" * 64)
    reg, _, used = await rs.load()
    assert reg == b'{"registered": true}' and "0" * 64 in used
    roaming = RoamingStore(store)
    await roaming.put_command("c1", b"{}", 10, 60)
    assert await roaming.command("c1") == b"{}" and await roaming.overdue(100) == ["c1"]
    await roaming.forget_command("c1")
    assert await roaming.command("c1") is None and await roaming.overdue(100) == []
