"""The coalesced pipeline's own connection (hiredis packs and parses): replies stay matched to their
commands through errors, a lost connection and a lost script cache; AUTH and SELECT are sent.

And the store's contract: every call raises the store's own errors (StoreUnavailable, NoGroup), never
redis-py's; the Lua scripts ship as package files and come back by themselves after NOSCRIPT."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from relay.config import Settings
from relay.errors import NoGroup, StoreError, StoreUnavailable
from relay.events import Event
from relay.ordering import shard_of
from relay.store import DeliveryStore, Entry, RegistrationStore, RoamingStore, StateReader, Store, connect, scripts
from relay.store import keys as K
from relay.store.registration import token_digest
from relay.validation import parse_target, validate
from tests.conftest import example, gireve_location


def admin_client(store: Store) -> Any:
    """A separate plain client to the same server (the suite's server listens on a unix socket)."""
    return aioredis.Redis.from_url(f"unix://{store.redis.connection_pool.connection_kwargs['path']}")


async def test_an_error_reply_fails_only_its_own_command(store: Store) -> None:
    await store.redis.set("plain", "1")
    # Issued together, so they share one pipeline: the WRONGTYPE in the middle must not shift replies.
    futures = [store.call("SET", "a", "x"), store.call("HGET", "plain", "f"), store.call("GET", "a")]
    results = await asyncio.gather(*futures, return_exceptions=True)
    assert results[0] == b"OK"
    assert isinstance(results[1], StoreUnavailable) and "WRONGTYPE" in str(results[1])
    assert results[2] == b"x"


async def test_a_command_that_cannot_be_sent_fails_its_batch_instead_of_hanging(store: Store) -> None:
    good, bad = store.call("SET", "a", "1"), store.call("SET", "b", None)  # None cannot be packed
    results = await asyncio.wait_for(asyncio.gather(good, bad, return_exceptions=True), 5)
    assert all(isinstance(r, StoreUnavailable) for r in results)
    assert await asyncio.wait_for(store.call("SET", "c", "1"), 5) == b"OK"  # the next batch goes out


async def test_a_connection_closed_by_redis_is_replaced(store: Store) -> None:
    assert await store.call("PING") == b"PONG"
    admin = admin_client(store)
    try:
        killed = await admin.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        assert killed >= 1
    finally:
        await admin.aclose()
    # At most the first command after the kill may fail (it answers 503 at the ingress); then the
    # pipeline has a new connection.
    outcomes = []
    for _ in range(3):
        try:
            outcomes.append(await store.call("PING"))
        except StoreUnavailable as exc:
            outcomes.append(exc)
    assert outcomes[1:] == [b"PONG", b"PONG"], outcomes


async def test_scripts_lost_by_redis_are_loaded_again(store: Store, settings: Settings) -> None:
    await store.redis.script_flush()
    session = example("session_example_2_short_finished.json", country_code="FR", party_id="AB1", id="S1")
    event = validate(parse_target("PUT", "sessions/FR/AB1/S1"), "PUT", msgspec.json.encode(session), settings).event
    assert await store.append(event)  # NOSCRIPT → scripts loaded again → the same command again
    assert await store.redis.xlen(K.stream_key("sessions", shard_of(event.key, store.shards))) == 1


async def test_auth_and_database_are_sent_on_the_pipeline_connection(store: Store, settings: Settings) -> None:
    path = store.redis.connection_pool.connection_kwargs["path"]
    admin = admin_client(store)
    await admin.config_set("requirepass", "s3cret-pw")
    try:
        s = Store(connect(f"unix://{path}?db=3&password=s3cret-pw", settings.redis), settings.redis)
        try:
            assert await s.call("SET", "in-db-3", "yes") == b"OK"
        finally:
            await s.close()
        await admin.execute_command("AUTH", "s3cret-pw")
        await admin.execute_command("SELECT", "3")
        assert await admin.get("in-db-3") == b"yes"
        wrong = Store(connect(f"unix://{path}?password=wrong", settings.redis), settings.redis)
        try:
            with pytest.raises(StoreUnavailable):
                await wrong.call("PING")
        finally:
            await wrong.close()
    finally:
        await admin.config_set("requirepass", "")
        await admin.aclose()


async def test_tls_urls_keep_redis_pys_pipeline(settings: Settings) -> None:
    # The raw connection speaks plain TCP or a unix socket only; rediss:// must not fall back to plain text.
    tls = Store(connect("rediss://127.0.0.1:6380/0", settings.redis), settings.redis)
    plain = Store(connect(settings.redis.url, settings.redis), settings.redis)
    try:
        assert tls._raw is None and plain._raw is not None
    finally:
        await tls.close()
        await plain.close()


# -- the error contract ------------------------------------------------------------------------------


def _closed_tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port  # nothing listens there now: connections are refused


@pytest.fixture(params=["unix", "tcp"])
async def down(request: pytest.FixtureRequest, settings: Settings, tmp_path: Path) -> AsyncIterator[Store]:
    """A Store pointed at a Redis that is not there (a socket file nobody serves, a refused port)."""
    url = f"unix://{tmp_path / 'gone.sock'}" if request.param == "unix" else f"redis://127.0.0.1:{_closed_tcp_port()}/0"
    s = Store(connect(url, settings.redis), settings.redis)
    yield s
    await s.close()


def _location(settings: Settings, location_id: str = "LOC1") -> Event:
    body = msgspec.json.encode(gireve_location(location_id))
    return validate(parse_target("PUT", f"locations/FR/AB1/{location_id}"), "PUT", body, settings).event


async def test_every_kind_of_store_call_raises_store_unavailable_when_redis_is_down(
    down: Store, settings: Settings
) -> None:
    ds = DeliveryStore(down)
    entry = Entry(K.stream_key("locations", 0), 0, "1-0", _location(settings))
    calls: dict[str, Callable[[], Awaitable[Any]]] = {
        "coalesced pipeline (append)": lambda: down.append(_location(settings)),
        "coalesced pipeline (finish)": lambda: ds.finish(entry),
        "pooled client (read_new)": lambda: ds.read_new({K.stream_key("locations", 0): 0}, "c", 10, None),
        "redis-py pipeline (ensure_groups)": down.ensure_groups,
        "redis-py transaction (registration)": lambda: RegistrationStore(down).save(b"{}", "digest"),
        "script (lease)": lambda: ds.acquire(0, "me", 1000),
        "script load": down.load_scripts,
        "state reader": lambda: StateReader(down).one("locations", "loc:FR:AB1:LOC1", "FR:AB1:LOC1"),
        "roaming": lambda: RoamingStore(down).token("RFID", "0102", "FR", "AB1"),
        "scan": ds.link_states,
    }
    for what, call in calls.items():
        with pytest.raises(StoreUnavailable) as caught:
            await asyncio.wait_for(call(), 10)
        assert not isinstance(caught.value, RedisError), what
        assert isinstance(caught.value, StoreError) and "redis" in str(caught.value), what
    assert await down.ping() is False
    assert await down.persistence() == {}


async def test_a_vanished_consumer_group_raises_nogroup(store: Store, settings: Settings) -> None:
    ds = DeliveryStore(store)
    event = _location(settings)
    shard = shard_of(event.key, store.shards)
    stream = K.stream_key("locations", shard)
    await store.append(event)
    await store.redis.xgroup_destroy(stream, K.GROUP)
    with pytest.raises(NoGroup):
        await ds.read_new({stream: shard}, "c", 10, None)
    with pytest.raises(NoGroup):
        await ds.claim(stream, shard, "c", "0-0", 10)
    await store.ensure_groups()  # the cure
    assert [e.event.id for e in await ds.read_new({stream: shard}, "c", 10, None)] == [event.id]


# -- the Lua scripts -----------------------------------------------------------------------------------


def test_every_lua_file_ships_with_the_package_and_is_used() -> None:
    shipped = {f.name for f in (resources.files("relay.store") / "lua").iterdir() if f.name.endswith(".lua")}
    assert shipped == {f"{s.name}.lua" for s in scripts.ALL} | {"gt.lua"}  # gt.lua: included, never run alone
    for name in ("finish", "dead_letter"):
        text = next(s for s in scripts.ALL if s.name == name).source
        assert "local function gt(a, b)" in text and "-- include:" not in text


async def test_scripts_are_loaded_under_the_sha_of_their_text(store: Store) -> None:
    await store.redis.script_flush()
    await store.load_scripts()
    await DeliveryStore(store).load_scripts()
    loaded = [*scripts.INGRESS, *scripts.DELIVERY]
    assert await store.redis.script_exists(*[s.sha for s in loaded]) == [True] * len(loaded)
    assert await store.redis.script_exists(scripts.WITHDRAW_TOKEN_A.sha) == [False]  # loaded when first run


async def test_delivery_scripts_lost_by_redis_are_loaded_again(store: Store, settings: Settings) -> None:
    ds = DeliveryStore(store)
    await ds.load_scripts()
    events = [_location(settings, f"LOC{i}") for i in range(3)]
    for ev in events:
        await store.append(ev)
    streams = {K.stream_key("locations", shard): shard for shard in range(store.shards)}
    got = {e.event.id: e for e in await ds.read_new(streams, "c", 10, None)}
    first, second, third = (got[ev.id] for ev in events)

    await store.redis.script_flush()
    assert await ds.finish(first) == 1  # the coalesced pipeline: NOSCRIPT → load → the same command again
    await store.redis.script_flush()
    assert await ds.dead_letter(second, b"\x80", park=True) is not None  # the pooled client's EVALSHA
    await store.redis.script_flush()
    assert await ds.acquire(0, "me", 10_000) == ""
    await store.redis.script_flush()
    [dead] = await ds.dead_letters("locations", second.shard)
    assert await ds.replay(dead) is not None
    assert await ds.parked(second.shard, "locations", second.event.key) is None  # replay unparked it
    await store.redis.script_flush()
    rs = RegistrationStore(store)
    await rs.set_token_a("A1")
    assert await rs.withdraw_token_a("A1", restore=token_digest("A0")) is True
    assert (await rs.load())[1] == token_digest("A0")  # tokens A are stored as digests
    assert await ds.finish(third) == 1
    assert (await store.stream_lengths())["locations"] == 1  # the replayed one


@pytest.mark.parametrize(
    ("url", "cluster"),
    [
        ("redis://127.0.0.1:1/0", False),
        ("redis://127.0.0.1:1", True),
        ("redis+sentinel://127.0.0.1:1/mymaster/0", False),
    ],
)
def test_no_client_retries_a_command(url: str, cluster: bool) -> None:
    """An XREADGROUP whose reply was lost and that the client sends again reads the next entries and leaves the
    first pending unseen: a later claim delivers them out of order (RedisCluster retries 10 times by default;
    found by the two-relay kill -9 test on a Cluster). Every client the store makes retries nothing."""
    from relay.config import RedisSettings

    client: Any = connect(url, RedisSettings(url=url, cluster=cluster))
    if cluster:
        assert client.retry.get_retries() == 0
    else:
        pool = client.connection_pool
        assert pool.connection_class(**pool.connection_kwargs).retry.get_retries() == 0
