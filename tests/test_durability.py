"""What a 202 waits for (issue 17 part 2): ``[redis] ack_fsync`` / ``ack_replicas`` / ``ack_timeout_ms``.

The policy is resolved against the server's persistence (relay.store.durability) and sent after every
coalesced batch that holds an ingress write. When it is not met in time the writes fail with NotDurable and
the ingress answers 503 + Retry-After; the CSMS sends the event again (stored once: idempotent ingress).
The failover tests with a real primary, replica and sentinels are in tests/test_ha.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer

from relay.config import RedisSettings, Settings
from relay.config_checks import config_warnings
from relay.errors import ConfigError, NotDurable
from relay.ingress import create_app
from relay.redis_url import sentinel_address
from relay.store import Store, connect
from relay.store import keys as K
from relay.store.durability import AckPolicy, resolve
from relay.typedefs import Health
from tests.conftest import AUTH, gireve_location

LOC = "/ingress/2.2.1/locations/FR/AB1/LOC1"
ALWAYS = {"appendonly": "yes", "appendfsync": "always"}
EVERYSEC = {"appendonly": "yes", "appendfsync": "everysec"}


# -- the policy ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("knobs", "persistence", "sentinel", "command"),
    [
        ({}, ALWAYS, False, None),  # the embedded default: the server fsyncs every write before its reply
        ({}, EVERYSEC, False, None),  # a plain URL: the server's own policy
        ({"ack_fsync": True}, EVERYSEC, False, ("WAITAOF", 1, 0, 1000)),
        ({"ack_fsync": True}, ALWAYS, False, None),  # already on disk: nothing to wait for
        ({}, EVERYSEC, True, ("WAIT", 1, 1000)),  # Sentinel: one replica's memory
        ({}, ALWAYS, True, ("WAIT", 1, 1000)),
        ({"ack_fsync": True}, ALWAYS, True, ("WAITAOF", 0, 1, 1000)),  # replicas' disks, the primary's is done
        ({"ack_fsync": True, "ack_replicas": 2, "ack_timeout_ms": 250}, EVERYSEC, False, ("WAITAOF", 1, 2, 250)),
        ({"ack_replicas": 0}, EVERYSEC, True, None),  # Sentinel, told not to wait
        ({"ack_fsync": False, "ack_replicas": 1}, ALWAYS, False, ("WAIT", 1, 1000)),
        ({"wait_replicas": 1}, EVERYSEC, False, ("WAIT", 1, 100)),  # the older names still mean what they meant
        ({"wait_replicas": 1, "ack_replicas": 2}, EVERYSEC, False, ("WAIT", 2, 1000)),  # the new name wins
        ({"ack_fsync": True}, {}, False, ("WAITAOF", 1, 0, 1000)),  # CONFIG refused: asked is asked
    ],
)
def test_policy_per_setting_and_server(
    knobs: dict[str, Any], persistence: dict[str, str], sentinel: bool, command: tuple[Any, ...] | None
) -> None:
    policy = resolve(RedisSettings(**knobs), persistence, sentinel=sentinel)
    assert policy.command == command
    assert policy.describe().startswith("202 after the event is")


def test_fsync_asked_of_a_server_without_an_append_only_file_is_refused() -> None:
    with pytest.raises(ValueError, match="appendonly no"):
        resolve(RedisSettings(ack_fsync=True), {"appendonly": "no"}, sentinel=False)
    # "auto" on such a server asks nothing of it (a warning at start says what a restart loses)
    assert resolve(RedisSettings(), {"appendonly": "no"}, sentinel=False).command is None


def test_a_reply_meets_the_policy_only_when_it_reaches_it() -> None:
    aof = AckPolicy(fsync=True, local=1, replicas=1)
    assert aof.met([1, 1]) and aof.met([1, 2])
    assert not aof.met([0, 1]) and not aof.met([1, 0])
    wait = AckPolicy(replicas=2)
    assert wait.met(2) and not wait.met(1)
    assert not wait.met(Exception("ERR WAIT cannot be used with replica instances"))


# -- the settings ------------------------------------------------------------------------------------------


def test_ack_settings_from_the_environment(make_settings: Callable[..., Settings]) -> None:
    s = make_settings(RELAY_REDIS_ACK_FSYNC="1", RELAY_REDIS_ACK_REPLICAS="2", RELAY_REDIS_ACK_TIMEOUT_MS="300")
    assert (s.redis.ack_fsync, s.redis.ack_replicas, s.redis.ack_timeout_ms) == (True, 2, 300)
    s = make_settings(RELAY_REDIS_ACK_FSYNC="false", RELAY_REDIS_ACK_REPLICAS="auto")
    assert (s.redis.ack_fsync, s.redis.ack_replicas) == (False, "auto")
    assert make_settings().redis.ack_fsync == "auto"
    for name, value in (("RELAY_REDIS_ACK_FSYNC", "maybe"), ("RELAY_REDIS_ACK_REPLICAS", "-1"),
                        ("RELAY_REDIS_ACK_REPLICAS", "many"), ("RELAY_REDIS_ACK_TIMEOUT_MS", "0")):  # fmt: skip
        with pytest.raises(ConfigError, match="ack_"):
            make_settings(**{name: value})


def test_sentinel_and_cluster_urls(make_settings: Callable[..., Settings]) -> None:
    url = "redis+sentinel://u:p%40ss@10.0.0.1:26379,10.0.0.2,[::1]:26380/mymaster/2"
    assert make_settings(RELAY_REDIS_URL=url).redis.url == url
    where = sentinel_address(url)
    assert where.sentinels == (("10.0.0.1", 26379), ("10.0.0.2", 26379), ("::1", 26380))
    assert (where.service, where.db, where.username, where.password, where.tls) == ("mymaster", 2, "u", "p@ss", False)
    assert sentinel_address("rediss+sentinel://h:1/m").tls
    for bad, why in (("redis+sentinel://h1:26379", "names the service"), ("redis+sentinel://h1:x/m", "host:port"),
                     ("redis+sentinel://h1/m/db", "not a number"), ("sentinel://h1/m", "must start with")):  # fmt: skip
        with pytest.raises(ConfigError, match=why):
            make_settings(RELAY_REDIS_URL=bad)
    assert make_settings(RELAY_REDIS_URL="redis://h:7000", RELAY_REDIS_CLUSTER="true").redis.cluster
    with pytest.raises(ConfigError, match="redis.cluster"):
        make_settings(RELAY_REDIS_CLUSTER="true")  # the session server's unix:// URL is no cluster seed


# -- on the real server ------------------------------------------------------------------------------------


async def _store(settings: Settings) -> Store:
    store = Store(connect(settings.redis.url, settings.redis), settings.redis)
    await store.load_scripts()
    await store.ensure_groups()
    await store.configure_ack(sentinel=store.sentinel)
    return store


@pytest.fixture
async def unreplicated(make_settings: Callable[..., Settings]) -> AsyncIterator[tuple[Settings, Store]]:
    """A store that asks for one replica of a server that has none."""
    settings = make_settings(RELAY_REDIS_ACK_REPLICAS="1", RELAY_REDIS_ACK_TIMEOUT_MS="50")
    store = await _store(settings)
    yield settings, store
    await store.close()


async def test_no_replica_in_time_is_503_with_retry_after(unreplicated: tuple[Settings, Store]) -> None:
    settings, store = unreplicated
    assert store.ack.command == ("WAIT", 1, 50)
    client = TestClient(TestServer(create_app(settings, store, Health(listeners_up=True))))
    await client.start_server()
    try:
        resp = await client.put(LOC, json=gireve_location(), headers=AUTH)
        body = await resp.json()
        assert resp.status == 503, body
        assert resp.headers.get("Retry-After")
        assert "not confirmed" in body["status_message"] and "send again" in body["status_message"]
        # Batch items get their own 503, never a 202 that the policy did not confirm.
        batch = {
            "operations": [{"method": "PUT", "path": LOC.removeprefix("/ingress/2.2.1"), "body": gireve_location()}]
        }
        resp = await client.post("/ingress/2.2.1/batch", json=batch, headers=AUTH)
        assert resp.status == 503, await resp.text()
    finally:
        await client.close()


async def test_not_durable_is_raised_by_the_store_and_only_for_writes(unreplicated: tuple[Settings, Store]) -> None:
    """The write was applied (a 503 never promises nothing was stored); reads in the same batch are unaffected."""
    _, store = unreplicated
    stream = K.stream_key("locations", 0)
    write = store.call("XADD", stream, "*", "e", b"x", durable=True)
    read = store.call("XLEN", stream)
    with pytest.raises(NotDurable, match="not confirmed"):
        await write
    assert await read == 1  # the read in the same pipeline sees the write and is not failed with it
    assert await store.redis.xlen(stream) == 1


async def test_fsync_asked_of_an_everysec_server_waits_for_the_disk(make_settings: Callable[..., Settings]) -> None:
    """The session server runs appendfsync everysec: WAITAOF 1 0 follows the commit, and the 202 comes after it."""
    settings = make_settings(RELAY_REDIS_ACK_FSYNC="true")
    store = await _store(settings)
    probe = aioredis.Redis.from_url(settings.redis.url)
    try:
        assert store.ack.command == ("WAITAOF", 1, 0, 1000)
        before = await _calls(probe, "waitaof")
        client = TestClient(TestServer(create_app(settings, store, Health(listeners_up=True))))
        await client.start_server()
        try:
            resp = await client.put(LOC, json=gireve_location(), headers=AUTH)
            assert resp.status == 202, await resp.text()
        finally:
            await client.close()
        assert await _calls(probe, "waitaof") == before + 1
    finally:
        await probe.aclose()
        await store.close()


async def _calls(client: aioredis.Redis, command: str) -> int:
    stats: dict[str, Any] = await client.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


def test_weak_high_availability_settings_are_warned(make_settings: Callable[..., Settings]) -> None:
    few = make_settings(RELAY_REDIS_URL="redis://h:7000", RELAY_REDIS_CLUSTER="true", RELAY_REDIS_SHARDS="4")
    assert [w.key for w in config_warnings(few) if w.key.startswith("redis.")] == ["redis.shards"]
    enough = make_settings(RELAY_REDIS_URL="redis://h:7000", RELAY_REDIS_CLUSTER="true", RELAY_REDIS_SHARDS="16")
    assert not [w for w in config_warnings(enough) if w.key.startswith("redis.")]
    url = "redis+sentinel://h1,h2,h3/mymaster"
    unwaited = make_settings(RELAY_REDIS_URL=url, RELAY_REDIS_ACK_REPLICAS="0")
    assert [w.key for w in config_warnings(unwaited) if w.key.startswith("redis.")] == ["redis.ack_replicas"]
    assert not [w for w in config_warnings(make_settings(RELAY_REDIS_URL=url)) if w.key.startswith("redis.")]


async def test_reads_and_acks_never_queue_behind_a_wait(make_settings: Callable[..., Settings]) -> None:
    """A WAIT can take up to ack_timeout_ms (a WAITAOF until the next fsync): the ingress writes wait on a lane of
    their own, and a read queued after one of them is answered while it still waits (the forwarder's acks and
    the state reads go on). Here WAIT 1 with no replica waits its whole 500 ms."""
    settings = make_settings(RELAY_REDIS_ACK_REPLICAS="1", RELAY_REDIS_ACK_TIMEOUT_MS="500")
    store = await _store(settings)
    try:
        stream = K.stream_key("locations", 0)
        write = store.call("XADD", stream, "*", "e", b"x", durable=True)
        read = store.call("HGET", K.parked_key(0), "nothing")
        assert await read is None
        assert not write.done()
        with pytest.raises(NotDurable):
            await write
    finally:
        await store.close()
