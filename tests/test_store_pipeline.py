"""The coalesced pipeline's own connection (hiredis packs and parses): replies stay matched to their
commands through errors, a lost connection and a lost script cache; AUTH and SELECT are sent."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis

from relay.store import keys as K
from relay.config import Settings
from relay.errors import StoreUnavailable
from relay.ordering import shard_of
from relay.store import Store, connect
from relay.validation import parse_target, validate
from tests.conftest import example


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
