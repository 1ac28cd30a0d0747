"""Idempotent ingress (issue 16 part 4): a request the CSMS retries is stored once.

- ``Idempotency-Key``: the first answer is kept for ``[ingress] idempotency_window_s``; a retry with the key and
  the same body gets it back and stores nothing; the key with another body is 422; malformed keys are 422.
- Without a key: a PUT/PATCH that leaves the object as it is (a retry whose first attempt was applied) is 202
  ``"duplicate": true`` with nothing stored.
- A Session PATCH adds its ``charging_periods`` by ``start_date_time``: a retried PATCH never adds them twice,
  neither in the stored state nor in the PUT the IOP gets.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp
import msgspec
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import REGISTRY

from relay.config import Settings
from relay.ingress import create_app
from relay.service import Relay
from relay.store import Store, connect
from relay.typedefs import Health
from tests.conftest import AUTH, example, gireve_location
from tests.fake_iop import FakeIop
from tests.waiting import wait_until

P = "/ingress/2.2.1"
LOC = f"{P}/locations/FR/AB1/LOC1"
SES = f"{P}/sessions/FR/AB1/S1"


def enc(doc: Any) -> bytes:
    return msgspec.json.encode(doc)


def session(**changes: Any) -> dict[str, Any]:
    doc = example("session_example_1_simple_start.json", country_code="FR", party_id="AB1", id="S1")
    doc.update(changes)
    return doc


def period(start: str, kwh: float) -> dict[str, Any]:
    return {"start_date_time": start, "dimensions": [{"type": "ENERGY", "volume": kwh}]}


def patch(start: str, kwh: float, updated: str) -> dict[str, Any]:
    return {"kwh": kwh, "charging_periods": [period(start, kwh)], "last_updated": updated}


async def client_for(settings: Settings) -> tuple[TestClient[Any, Any], Store]:
    store = Store(connect(settings.redis.url, settings.redis), settings.redis)
    await store.load_scripts()
    await store.ensure_groups()
    client = TestClient(TestServer(create_app(settings, store, Health(listeners_up=True))))
    await client.start_server()
    return client, store


@pytest.fixture
async def pair(settings: Settings) -> Any:
    client, store = await client_for(settings)
    yield client, store
    await client.close()
    await store.close()


async def stored(store: Store, module: str) -> int:
    return (await store.stream_lengths())[module]


async def state_of(store: Store, module: str, key: str, field: str) -> dict[str, Any]:
    _, raw = await store.read_state(module, key, field)
    assert raw is not None
    doc: dict[str, Any] = msgspec.json.decode(raw)
    return doc


def not_stored_again(module: str, kind: str) -> float:
    labels = {"module": module, "kind": kind}
    return REGISTRY.get_sample_value("relay_events_not_stored_again_total", labels) or 0.0


# -- Idempotency-Key ------------------------------------------------------------------------------------------


async def test_a_retry_with_the_key_gets_the_first_answer_and_stores_once(pair: Any) -> None:
    client, store = pair
    before = not_stored_again("locations", "idempotency_key")
    headers = {**AUTH, "Idempotency-Key": "csms-outbox-42"}
    first = await client.put(LOC, data=enc(gireve_location()), headers=headers)
    assert first.status == 202
    data = (await first.json())["data"]
    # The CSMS got a 503 (or nothing) although Redis applied the write: it sends again, same key, same body.
    again = await client.put(LOC, data=enc(gireve_location()), headers=headers)
    assert again.status == 202
    replay = (await again.json())["data"]
    assert replay["event_id"] == data["event_id"] and replay["replayed"] is True
    assert "duplicate" not in replay
    assert await stored(store, "locations") == 1
    assert not_stored_again("locations", "idempotency_key") == before + 1


async def test_a_patch_retried_with_its_key_is_merged_once(pair: Any) -> None:
    client, store = pair
    assert (await client.put(SES, data=enc(session()), headers=AUTH)).status == 202
    headers = {**AUTH, "Idempotency-Key": "p-1"}
    body = enc(patch("2024-03-05T17:02:11Z", 6.8, "2024-03-05T17:20:05Z"))
    first = await client.patch(SES, data=body, headers=headers)
    again = await client.patch(SES, data=body, headers=headers)
    assert first.status == again.status == 202
    assert (await again.json())["data"]["event_id"] == (await first.json())["data"]["event_id"]
    assert await stored(store, "sessions") == 2  # the PUT and one PATCH
    doc = await state_of(store, "sessions", "ses:FR:AB1:S1", "FR:AB1:S1")
    assert len(doc["charging_periods"]) == 1


async def test_the_same_key_with_another_body_is_refused(pair: Any) -> None:
    client, store = pair
    headers = {**AUTH, "Idempotency-Key": "k-1"}
    assert (await client.put(LOC, data=enc(gireve_location()), headers=headers)).status == 202
    other = gireve_location(last_updated="2026-12-01T10:00:00Z")
    resp = await client.put(LOC, data=enc(other), headers=headers)
    assert resp.status == 422
    body = await resp.json()
    assert body["errors"][0]["field"] == "Idempotency-Key" and body["errors"][0]["rule"] == "idempotency"
    assert await stored(store, "locations") == 1
    # without the key, the new version is stored as usual
    assert (await client.put(LOC, data=enc(other), headers=AUTH)).status == 202
    assert await stored(store, "locations") == 2


async def test_the_key_is_per_operator_and_route(pair: Any) -> None:
    client, store = pair
    headers = {**AUTH, "Idempotency-Key": "same"}
    for loc in ("LOC1", "LOC2"):
        resp = await client.put(f"{P}/locations/FR/AB1/{loc}", data=enc(gireve_location(loc)), headers=headers)
        assert resp.status == 202
        assert "replayed" not in (await resp.json())["data"]
    assert await stored(store, "locations") == 2


@pytest.mark.parametrize("key", ["", "x" * 256, "tab\there", "é"])
async def test_a_malformed_key_is_refused_and_nothing_stored(pair: Any, key: str) -> None:
    client, store = pair
    resp = await client.put(LOC, data=enc(gireve_location()), headers={**AUTH, "Idempotency-Key": key})
    assert resp.status == 422
    assert (await resp.json())["errors"][0]["field"] == "Idempotency-Key"
    assert await stored(store, "locations") == 0


async def test_a_key_of_255_characters_is_taken(pair: Any) -> None:
    client, store = pair
    resp = await client.put(LOC, data=enc(gireve_location()), headers={**AUTH, "Idempotency-Key": "k" * 255})
    assert resp.status == 202
    assert await stored(store, "locations") == 1


async def test_the_window_expires(make_settings: Callable[..., Settings], redis_url: str) -> None:
    client, store = await client_for(make_settings(RELAY_INGRESS_IDEMPOTENCY_WINDOW_S="2"))
    raw = aioredis.Redis.from_url(redis_url)
    try:
        headers = {**AUTH, "Idempotency-Key": "short"}
        assert (await client.put(LOC, data=enc(gireve_location()), headers=headers)).status == 202
        keys = [k async for k in raw.scan_iter(match="relay:*:idem:*")]
        assert len(keys) == 1 and 0 <= await raw.ttl(keys[0]) <= 2  # -1: no expiry
        other = enc(gireve_location(last_updated="2026-12-01T10:00:00Z"))
        assert (await client.put(LOC, data=other, headers=headers)).status == 422  # within the window

        async def gone() -> bool:
            return not await raw.exists(keys[0])

        await wait_until(gone, 5, "the key expired")
        resp = await client.put(LOC, data=other, headers=headers)  # past the window: a new request
        assert resp.status == 202 and "replayed" not in (await resp.json())["data"]
        assert await stored(store, "locations") == 2
    finally:
        await raw.aclose()
        await client.close()
        await store.close()


async def test_the_default_window_is_a_day(pair: Any, redis_url: str) -> None:
    client, _ = pair
    assert (await client.put(LOC, data=enc(gireve_location()), headers={**AUTH, "Idempotency-Key": "d"})).status == 202
    raw = aioredis.Redis.from_url(redis_url)
    try:
        keys = [k async for k in raw.scan_iter(match="relay:*:idem:*")]
        assert len(keys) == 1 and 86_000 < await raw.ttl(keys[0]) <= 86_400
    finally:
        await raw.aclose()


async def test_concurrent_retries_with_one_key_store_once(pair: Any) -> None:
    client, store = pair
    assert (await client.put(SES, data=enc(session()), headers=AUTH)).status == 202
    headers = {**AUTH, "Idempotency-Key": "burst"}
    body = enc(patch("2024-03-05T17:02:11Z", 6.8, "2024-03-05T17:20:05Z"))
    answers = await asyncio.gather(*(client.patch(SES, data=body, headers=headers) for _ in range(8)))
    assert {r.status for r in answers} == {202}
    ids = {(await r.json())["data"]["event_id"] for r in answers}
    assert len(ids) == 1
    assert await stored(store, "sessions") == 2


# -- without a key: the stored state tells a retry -------------------------------------------------------------


async def test_a_retried_put_is_a_duplicate_and_stores_nothing(pair: Any) -> None:
    client, store = pair
    before = not_stored_again("locations", "same_state")
    assert (await client.put(LOC, data=enc(gireve_location()), headers=AUTH)).status == 202
    resp = await client.put(LOC, data=enc(gireve_location()), headers=AUTH)
    assert resp.status == 202
    assert (await resp.json())["data"]["duplicate"] is True
    assert await stored(store, "locations") == 1
    assert not_stored_again("locations", "same_state") == before + 1
    # a new version (another last_updated) is stored
    newer = await client.put(LOC, data=enc(gireve_location(last_updated="2026-12-01T10:00:00Z")), headers=AUTH)
    assert newer.status == 202 and "duplicate" not in (await newer.json())["data"]
    assert await stored(store, "locations") == 2


async def test_a_resend_header_stores_an_unchanged_put_and_patch(pair: Any) -> None:
    # A CPO re-pushing its inventory to repair the IOP (or re-sending a PUT after a dead letter) says so.
    client, store = pair
    assert (await client.put(LOC, data=enc(gireve_location()), headers=AUTH)).status == 202
    for value in ("true", "1"):
        resp = await client.put(LOC, data=enc(gireve_location()), headers={**AUTH, "X-Relay-Resend": value})
        assert resp.status == 202 and "duplicate" not in (await resp.json())["data"]
    assert await stored(store, "locations") == 3
    assert (await client.put(SES, data=enc(session()), headers=AUTH)).status == 202
    same = {"kwh": session()["kwh"], "last_updated": session()["last_updated"]}
    assert (await (await client.patch(SES, data=enc(same), headers=AUTH)).json())["data"]["duplicate"] is True
    resp = await client.patch(SES, data=enc(same), headers={**AUTH, "X-Relay-Resend": "true"})
    assert resp.status == 202 and "duplicate" not in (await resp.json())["data"]
    assert await stored(store, "sessions") == 2


@pytest.mark.parametrize("value", ["yes", "false", "0", ""])
async def test_a_malformed_resend_header_is_refused_and_nothing_stored(pair: Any, value: str) -> None:
    client, store = pair
    resp = await client.put(LOC, data=enc(gireve_location()), headers={**AUTH, "X-Relay-Resend": value})
    assert resp.status == 422 and "X-Relay-Resend" in await resp.text()
    assert await stored(store, "locations") == 0


async def test_a_retried_cdr_is_stored_once(pair: Any) -> None:
    client, store = pair
    cdr = example("cdr_example.json", country_code="FR", party_id="AB1")
    first = await client.post(f"{P}/cdrs", data=enc(cdr), headers=AUTH)
    assert first.status == 202, await first.text()
    again = await client.post(f"{P}/cdrs", data=enc(cdr), headers=AUTH)
    assert again.status == 202 and (await again.json())["data"]["duplicate"] is True
    assert await stored(store, "cdrs") == 1


async def test_a_duplicate_answered_with_a_key_is_replayed_as_one(pair: Any) -> None:
    client, store = pair
    assert (await client.put(LOC, data=enc(gireve_location()), headers=AUTH)).status == 202
    headers = {**AUTH, "Idempotency-Key": "late"}
    first = await client.put(LOC, data=enc(gireve_location()), headers=headers)
    assert (await first.json())["data"]["duplicate"] is True
    again = await client.put(LOC, data=enc(gireve_location()), headers=headers)
    data = (await again.json())["data"]
    assert data["duplicate"] is True and data["replayed"] is True
    assert data["event_id"] == (await first.json())["data"]["event_id"]
    assert await stored(store, "locations") == 1


async def test_batch_items_that_change_nothing_are_duplicates(pair: Any) -> None:
    client, store = pair
    op = {"method": "PUT", "path": f"{P}/locations/FR/AB1/LOC1", "body": gireve_location()}
    for expected in (None, True):
        resp = await client.post(f"{P}/batch", data=enc({"operations": [op]}), headers=AUTH)
        assert resp.status == 200
        assert (await resp.json())["data"]["results"][0].get("duplicate") is expected
    assert await stored(store, "locations") == 1


# -- Session charging_periods ----------------------------------------------------------------------------------


async def test_a_retried_session_patch_does_not_add_its_periods_twice(pair: Any) -> None:
    client, store = pair
    assert (await client.put(SES, data=enc(session()), headers=AUTH)).status == 202
    first = enc(patch("2024-03-05T17:02:11Z", 6.8, "2024-03-05T17:20:05Z"))
    assert (await client.patch(SES, data=first, headers=AUTH)).status == 202
    # the CSMS got a 503 after Redis applied it: it sends the same PATCH again, without a key
    again = await client.patch(SES, data=first, headers=AUTH)
    assert again.status == 202 and (await again.json())["data"]["duplicate"] is True
    assert await stored(store, "sessions") == 2
    # the next period is added; resending a period with a known start replaces it (same instant, other form)
    second = enc(patch("2024-03-05T17:10:00Z", 9.1, "2024-03-05T17:25:00Z"))
    assert (await client.patch(SES, data=second, headers=AUTH)).status == 202
    assert (await client.patch(SES, data=second, headers=AUTH)).status == 202
    doc = await state_of(store, "sessions", "ses:FR:AB1:S1", "FR:AB1:S1")
    assert [p["start_date_time"] for p in doc["charging_periods"]] == ["2024-03-05T17:02:11Z", "2024-03-05T17:10:00Z"]
    assert await stored(store, "sessions") == 3


async def test_the_iop_gets_each_period_once(make_settings: Callable[..., Settings]) -> None:
    iop = FakeIop()
    await iop.start()
    relay = Relay(make_settings(RELAY_IOP_URL=iop.url, RELAY_IOP_TOKEN="tok-b"))
    await relay.start()
    try:
        base = f"http://127.0.0.1:{relay.ingress_port}{SES}"
        body = enc(patch("2024-03-05T17:02:11Z", 6.8, "2024-03-05T17:20:05Z"))
        async with aiohttp.ClientSession() as http:
            async with http.put(base, data=enc(session()), headers=AUTH) as resp:
                assert resp.status == 202
            await iop.wait_for(lambda: any(r.ok for r in iop.received))
            for _ in range(2):  # the retry of a PATCH whose first answer the CSMS did not get
                async with http.patch(base, data=body, headers=AUTH) as resp:
                    assert resp.status == 202
        await iop.wait_for(lambda: len([r for r in iop.received if r.ok]) == 2)
        store = relay.store
        assert store is not None

        async def drained() -> bool:
            return (await store.stream_lengths())["sessions"] == 0

        await wait_until(drained, 5, "the sessions stream drained")
        sent = [r for r in iop.received if r.ok]
        assert len(sent) == 2  # the PUT, then the PATCH once (as a PUT of the session: GIREVE has no PATCH)
        assert sent[1].method == "PUT"
        assert [p["start_date_time"] for p in sent[1].json()["charging_periods"]] == ["2024-03-05T17:02:11Z"]
    finally:
        await relay.stop()
        await iop.close()
