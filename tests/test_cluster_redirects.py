"""Found in review of issue 17 (Cluster): the coalesced pipeline's ASK path, on a real three-primary Valkey Cluster.

A slot is put in migration by hand (CLUSTER SETSLOT … MIGRATING / IMPORTING): a command on a key the source
node does not hold is answered ``-ASK slot host:port`` and relay.store.pipes.NodePipes sends it to the target
after ASKING.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.crc import key_slot

from relay.config import RedisSettings
from relay.errors import NotDurable, StoreUnavailable
from relay.store import Store, connect
from relay.store import keys as K
from tests.topologies import ValkeyCluster, ValkeyProcess, valkey_cluster_fixture

__all__ = ["valkey_cluster_fixture"]

SHARDS = 16


async def _cmd(node: ValkeyProcess, *args: Any) -> Any:
    client = node.client()
    try:
        return await client.execute_command(*args)  # type: ignore[no-untyped-call]
    finally:
        await client.aclose()


async def _calls(node: ValkeyProcess, command: str) -> int:
    client = node.client()
    try:
        stats: dict[str, Any] = await client.info("commandstats")
        return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))
    finally:
        await client.aclose()


async def _migrating(cluster: ValkeyCluster, shard: int) -> tuple[str, ValkeyProcess, ValkeyProcess]:
    """Put the slot of ``shard`` in migration from its owner to another node; (stream, source, target)."""
    stream = K.stream_key("locations", shard)
    source = cluster.node_for_key(stream)
    target = next(n for n in cluster.nodes if n is not source)
    slot = key_slot(stream.encode())
    source_id = (await _cmd(source, "CLUSTER", "MYID")).decode()
    target_id = (await _cmd(target, "CLUSTER", "MYID")).decode()
    assert await _cmd(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
    assert await _cmd(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
    return stream, source, target


@pytest.fixture
async def store(valkey_cluster: ValkeyCluster) -> AsyncIterator[Store]:
    # One replica asked of primaries that have none: WAIT 1 answers 0 after 50 ms, so every durable write
    # must fail with NotDurable. Nothing in this cluster can confirm a write.
    settings = RedisSettings(url=valkey_cluster.url, cluster=True, shards=SHARDS, ack_replicas=1, ack_timeout_ms=50)
    s = Store(connect(settings.url, settings), settings)
    await s.load_scripts()
    await s.configure_ack(sentinel=False)
    assert s.ack.command == ("WAIT", 1, 50)
    yield s
    await s.close()


async def test_a_durable_write_followed_through_ask_is_confirmed_on_the_target(
    store: Store, valkey_cluster: ValkeyCluster
) -> None:
    """Control first: a write to a slot not migrating is refused (no replica): NotDurable. Then the same write
    to a migrating slot, answered ASK by the source and stored on the target, must be refused too: the target
    never got a WAIT after it, so nothing confirms it."""
    with pytest.raises(NotDurable):
        await store.call("XADD", K.stream_key("locations", 1), "*", "e", b"x", durable=True)
    stream, _source, target = await _migrating(valkey_cluster, 0)
    waits_before = await _calls(target, "wait")
    try:
        reply = await store.call("XADD", stream, "*", "e", b"x", durable=True)
    except NotDurable:
        return
    waits_after = await _calls(target, "wait")
    pytest.fail(
        f"a durable write followed through ASK was answered {reply!r} (a 202) with no WAIT on the node that "
        f"took it (WAIT calls on the target: {waits_before} → {waits_after}); policy WAIT 1 cannot be met here"
    )


async def test_an_ask_target_that_does_not_answer_fails_only_its_own_command(
    store: Store, valkey_cluster: ValkeyCluster
) -> None:
    """NodePipes' docstring: "A broken connection fails that node's commands only". A read on a healthy node in
    the same batch as a command redirected by ASK to a node that is down must still get its reply."""
    stream, source, target = await _migrating(valkey_cluster, 0)
    other_shard = next(
        s for s in range(1, SHARDS) if valkey_cluster.node_for_key(K.stream_key("locations", s)) not in (source, target)
    )
    target.kill()
    redirected = store.call("XLEN", stream)  # ASK → target (dead)
    healthy = store.call("HGET", K.parked_key(other_shard), "nothing")  # a third node, alive
    with pytest.raises(StoreUnavailable):
        await redirected
    assert await healthy is None  # fails: the ASK's ConnectionRefusedError failed the whole batch


@pytest.mark.parametrize("valkey_cluster", [{"appendfsync": "always"}], indirect=True)
async def test_ack_fsync_is_resolved_against_every_primary_not_one(valkey_cluster: ValkeyCluster) -> None:
    """``ack_fsync = true``: "the event is on the primary's disk before 202" (docs/operations.md). configure_ack()
    reads ``appendfsync`` with CONFIG GET, which RedisCluster sends to one node (its default node). When that
    node runs ``always`` and another ``everysec``, the policy becomes "nothing to wait for" and the everysec
    node's writes get their 202 without any WAITAOF: in its page cache only."""
    settings = RedisSettings(url=valkey_cluster.url, cluster=True, shards=SHARDS, ack_fsync=True)
    store = Store(connect(settings.url, settings), settings)
    try:
        await store.load_scripts()
        cluster: Any = store.redis
        await cluster.initialize()
        default = cluster.get_default_node()
        lax = next(n for n in valkey_cluster.nodes if n.port != default.port)
        assert await _cmd(lax, "CONFIG", "SET", "appendfsync", "everysec")
        await store.configure_ack(sentinel=False)
        shard = next(s for s in range(SHARDS) if valkey_cluster.node_for_key(K.stream_key("locations", s)) is lax)
        before = await _calls(lax, "waitaof")
        try:
            await store.call("XADD", K.stream_key("locations", shard), "*", "e", b"x", durable=True)
        except NotDurable:
            return
        after = await _calls(lax, "waitaof")
        assert after > before, (
            f"policy {store.ack.describe()!r} ({store.ack.command}) resolved from one node; a durable write to an "
            f"'appendfsync everysec' primary was answered without WAITAOF ({before} → {after} calls)"
        )
    finally:
        await store.close()


@pytest.mark.parametrize("valkey_cluster", [{"appendfsync": "always"}], indirect=True)
async def test_ack_fsync_refused_at_start_when_any_primary_has_no_aof(valkey_cluster: ValkeyCluster) -> None:
    """Docs: "needs appendonly yes, refused at start otherwise"; a primary other than the one CONFIG GET asks
    running ``appendonly no`` is not seen, and its shards answer 503 for every write forever instead."""
    settings = RedisSettings(url=valkey_cluster.url, cluster=True, shards=SHARDS, ack_fsync=True)
    store = Store(connect(settings.url, settings), settings)
    try:
        cluster: Any = store.redis
        await cluster.initialize()
        default = cluster.get_default_node()
        lax = next(n for n in valkey_cluster.nodes if n.port != default.port)
        assert await _cmd(lax, "CONFIG", "SET", "appendonly", "no")
        with pytest.raises(ValueError, match="appendonly no"):
            await store.configure_ack(sentinel=False)
    finally:
        await store.close()
