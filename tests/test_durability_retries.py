"""Found in review of issue 17 (what a 202 means): a 202 answered *without a write* (an Idempotency-Key replay, or the
same-state duplicate) on another connection than the first write.

WAIT / WAITAOF count the writes of their own connection (the client's last write offset). The first request
was stored but not confirmed (503: its replica lags); the CSMS sends it again and the retry lands on another
worker or replica (another connection), where commit.lua answers from the kept answer (or "dup") and writes
nothing: ``WAIT 1`` there has nothing of its own to wait for and returns at once, so the retry gets a 202 for
an event no replica has. A failover now loses an event that was answered 202.

Real servers: a primary and a replica (tests/topologies.ValkeyProcess); the replica is stopped with SIGSTOP
(it stays connected: the primary still counts it, it acknowledges nothing).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from relay.config import Settings
from relay.ingress import create_app
from relay.store import Store, connect
from relay.typedefs import Health
from tests.conftest import AUTH, gireve_location
from tests.topologies import HOST, ValkeyProcess
from tests.waiting import wait_until

LOC = "/ingress/2.2.1/locations/FR/AB1/LOC1"


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[ValkeyProcess, ValkeyProcess]]:
    primary = ValkeyProcess(tmp_path / "primary", ["repl-diskless-sync-delay 0"])
    replica = ValkeyProcess(tmp_path / "replica", ["repl-diskless-sync-delay 0"])
    try:
        await primary.start()
        replica.config.append(f"replicaof {HOST} {primary.port}")
        await replica.start()
        client = replica.client(decode_responses=True)
        try:

            async def in_sync() -> bool:
                return bool((await client.info("replication")).get("master_link_status") == "up")

            await wait_until(in_sync, 10, "the replica in sync with its primary")
        finally:
            await client.aclose()
        yield primary, replica
    finally:
        if replica.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(replica.proc.pid, signal.SIGCONT)
        replica.kill()
        primary.kill()


async def _relay(settings: Settings) -> tuple[Store, TestClient[Any, Any]]:
    store = Store(connect(settings.redis.url, settings.redis), settings.redis)
    await store.load_scripts()
    await store.ensure_groups()
    await store.configure_ack(sentinel=False)
    client = TestClient(TestServer(create_app(settings, store, Health(listeners_up=True))))
    await client.start_server()
    return store, client


@pytest.mark.parametrize("idempotency_key", [True, False], ids=["idempotency-key-replay", "same-state-duplicate"])
async def test_a_retry_answered_without_a_write_is_not_202_before_the_first_write_is_replicated(
    pair: tuple[ValkeyProcess, ValkeyProcess], make_settings: Callable[..., Settings], idempotency_key: bool
) -> None:
    primary, replica = pair
    settings = make_settings(
        RELAY_REDIS_URL=primary.url, RELAY_REDIS_ACK_REPLICAS="1", RELAY_REDIS_ACK_TIMEOUT_MS="200"
    )
    one, client_one = await _relay(settings)  # worker 1
    two, client_two = await _relay(settings)  # worker 2 (its own connections)
    try:
        assert one.ack.command == ("WAIT", 1, 200)
        headers = {**AUTH, "Idempotency-Key": "csms-outbox-7"} if idempotency_key else AUTH
        # Control: with the replica up, a write is confirmed.
        warm = await client_one.put(LOC.replace("LOC1", "LOC0"), json=gireve_location(id="LOC0"), headers=AUTH)
        assert warm.status == 202, await warm.text()
        assert replica.proc is not None
        os.kill(replica.proc.pid, signal.SIGSTOP)  # the replica lags: nothing it has not acknowledged is on it
        first = await client_one.put(LOC, json=gireve_location(), headers=headers)
        assert first.status == 503, await first.text()  # stored on the primary, not confirmed: correct
        again = await client_two.put(LOC, json=gireve_location(), headers=headers)  # the CSMS's retry, worker 2
        body = await again.text()
        assert again.status == 503, (
            f"the retry got {again.status} {body} while the replica still has not the event (SIGSTOPped): "
            "a failover now loses an event answered 202"
        )
    finally:
        await client_one.close()
        await client_two.close()
        await one.close()
        await two.close()
