"""Ordering keys: which events share one order, computed once at the ingress and stored in the envelope."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from relay.config import Settings
from relay.errors import InvalidEvent
from relay.events import decode
from relay.ingress import create_app
from relay.ordering import location_key, session_key, shard_of, tariff_key
from relay.store import Store, connect
from relay.store import keys as K
from relay.typedefs import Health
from relay.validation import parse_target, validate
from tests.conftest import AUTH, example, gireve_location

STAMP = "2024-06-01T12:00:00Z"


def enc(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def key_of(settings: Settings, method: str, path: str, doc: Any = None, query: dict[str, str] | None = None) -> str:
    raw = b"" if doc is None else enc(doc)
    return validate(parse_target(method, path, query), method, raw, settings).event.key  # type: ignore[arg-type]


# --- the pure functions -------------------------------------------------------------------------------------


def test_keys_include_the_owning_operator_and_ignore_its_case() -> None:
    assert location_key("fr", "ab1", "L1") == location_key("FR", "AB1", "L1") == "loc:FR:AB1:L1"
    assert location_key("FR", "AB1", "L1") != location_key("FR", "AB2", "L1")
    assert location_key("FR", "AB1", "L1") != location_key("BE", "AB1", "L1")
    assert session_key("FR", "AB1", "S1") != session_key("FR", "XY1", "S1")
    assert tariff_key("FR", "AB1", "T1", None, None) != tariff_key("BE", "AB1", "T1", None, None)


def test_object_ids_stay_case_sensitive() -> None:
    # OCPI object ids are compared as sent; only the CiString operator ids are upper-cased
    assert location_key("FR", "AB1", "loc1") != location_key("FR", "AB1", "LOC1")


def test_modules_do_not_share_keys() -> None:
    keys = {location_key("FR", "AB1", "X"), session_key("FR", "AB1", "X"), tariff_key("FR", "AB1", "X", None, None)}
    assert len(keys) == 3


def test_tariff_variants_are_distinct_keys() -> None:
    default = tariff_key("FR", "AB1", "T1", None, None)
    nl = tariff_key("FR", "AB1", "T1", "NL", "TNM")
    de = tariff_key("FR", "AB1", "T1", "DE", "TNM")
    nl2 = tariff_key("FR", "AB1", "T1", "NL", "XYZ")
    assert len({default, nl, de, nl2}) == 4
    assert tariff_key("FR", "AB1", "T1", "nl", "tnm") == nl
    # half a target is no target (the pair rule refuses it before a key is made)
    assert tariff_key("FR", "AB1", "T1", "NL", None) == default


def test_shard_is_stable_and_in_range() -> None:
    keys = [location_key("FR", "AB1", f"L{i}") for i in range(500)]
    for shards in (1, 4, 7, 64):
        got = [shard_of(k, shards) for k in keys]
        assert all(0 <= s < shards for s in got)
        assert got == [shard_of(k, shards) for k in keys]
    assert len({shard_of(k, 4) for k in keys}) == 4  # keys spread over every shard
    # the function is fixed across processes and releases: a change would split an object's order on upgrade
    assert shard_of("loc:FR:AB1:LOC1", 4) == 3
    assert shard_of("ses:FR:AB1:S1", 16) == 6


# --- what validation puts in the Event ----------------------------------------------------------------------


def test_location_evse_and_connector_share_the_location_key(settings: Settings) -> None:
    loc = gireve_location()
    evse = loc["evses"][0]
    conn = evse["connectors"][0]
    keys = {
        key_of(settings, "PUT", "locations/FR/AB1/LOC1", loc),
        key_of(settings, "PATCH", "locations/FR/AB1/LOC1", {"name": "x", "last_updated": STAMP}),
        key_of(settings, "PUT", "locations/FR/AB1/LOC1/3256", evse),
        key_of(settings, "PATCH", "locations/FR/AB1/LOC1/3256", {"status": "CHARGING", "last_updated": STAMP}),
        key_of(settings, "PUT", "locations/FR/AB1/LOC1/3256/1", conn),
        key_of(settings, "PATCH", "locations/FR/AB1/LOC1/3257/1", {"tariff_ids": ["1"], "last_updated": STAMP}),
        key_of(settings, "PATCH", "locations/fr/ab1/LOC1/3256", {"status": "AVAILABLE", "last_updated": STAMP}),
    }
    assert keys == {"loc:FR:AB1:LOC1"}
    assert key_of(settings, "PUT", "locations/FR/AB1/LOC2", gireve_location("LOC2")) == "loc:FR:AB1:LOC2"


def test_session_updates_and_its_cdr_share_one_key(settings: Settings) -> None:
    session = example("session_example_2_short_finished.json", country_code="FR", party_id="AB1", id="S1")
    cdr = example("cdr_example.json", country_code="FR", party_id="AB1", id="C1", session_id="S1")
    keys = {
        key_of(settings, "PUT", "sessions/FR/AB1/S1", session),
        key_of(settings, "PATCH", "sessions/FR/AB1/S1", {"kwh": 1, "last_updated": STAMP}),
        key_of(settings, "POST", "cdrs", cdr),
    }
    assert keys == {session_key("FR", "AB1", "S1")}
    assert key_of(settings, "POST", "cdrs", {**cdr, "session_id": "S2"}) == session_key("FR", "AB1", "S2")


def test_tariff_variant_key_comes_from_the_body(settings: Settings) -> None:
    base = example("tariff_1_simple_2hour.json", country_code="FR", party_id="AB1", id="T1", start_date_time=STAMP)
    variant = {**base, "target_operator_country_code": "NL", "target_operator_party_id": "TNM"}
    put_default = key_of(settings, "PUT", "tariffs/FR/AB1/T1", base)
    put_variant = key_of(settings, "PUT", "tariffs/FR/AB1/T1", variant)
    assert put_default != put_variant
    assert key_of(settings, "DELETE", "tariffs/FR/AB1/T1") == put_default
    # A variant is retired with a PUT carrying end_date_time, never deleted (GIREVE F1: its DELETE
    # could not be told from the default tariff's): the query that would name it is refused.
    query = {"target_operator_country_code": "NL", "target_operator_party_id": "TNM"}
    with pytest.raises(InvalidEvent) as refused:
        key_of(settings, "DELETE", "tariffs/FR/AB1/T1", None, query)
    assert any(p.rule == "gireve.F1.variant_delete" for p in refused.value.problems)


@pytest.mark.parametrize("shards", ["1", "3", "8"])
async def test_one_key_lands_in_one_stream(make_settings: Callable[..., Settings], shards: str) -> None:
    """Over HTTP: every update of LOC1 (location, EVSE, connector) is in the stream of shard_of(key)."""
    settings = make_settings(RELAY_REDIS_SHARDS=shards)
    store = Store(connect(settings.redis.url, settings.redis), settings.redis)
    await store.load_scripts()
    client: TestClient[Any, Any] = TestClient(TestServer(create_app(settings, store, Health(listeners_up=True))))
    await client.start_server()
    try:
        loc = gireve_location()
        sends = [
            ("PUT", "LOC1", loc),
            ("PATCH", "LOC1/3256", {"status": "CHARGING", "last_updated": STAMP}),
            ("PATCH", "LOC1/3256/2", {"tariff_ids": ["11"], "last_updated": STAMP}),
            ("PUT", "LOC1/3257", {**loc["evses"][1], "last_updated": STAMP}),  # a change: not a duplicate
        ]
        sends += [("PUT", f"L{i}", gireve_location(f"L{i}")) for i in range(12)]
        for method, tail, doc in sends:
            resp = await client.request(method, f"/ingress/2.2.1/locations/FR/AB1/{tail}", data=enc(doc), headers=AUTH)
            assert resp.status == 202, await resp.text()
        want = shard_of("loc:FR:AB1:LOC1", int(shards))
        for shard in range(int(shards)):
            rows: Any = await store.redis.xrange(K.stream_key("locations", shard))
            evs = [decode(f[b"e"]) for _, f in rows]
            assert all(shard_of(ev.key, int(shards)) == shard for ev in evs)
            loc1 = [(ev.method, ev.evse_uid, ev.connector_id) for ev in evs if ev.key == "loc:FR:AB1:LOC1"]
            if shard == want:
                assert loc1 == [
                    ("PUT", None, None),
                    ("PATCH", "3256", None),
                    ("PATCH", "3256", "2"),
                    ("PUT", "3257", None),
                ]
            else:
                assert loc1 == []
    finally:
        await client.close()
        await store.close()


async def test_cdr_waits_for_its_sessions_last_accepted_update(ingress: TestClient[Any, Any], store: Store) -> None:
    """The CDR's entry names the stream id of its session's last update accepted before it (S3)."""
    session = example("session_example_2_short_finished.json", country_code="FR", party_id="AB1", id="S1")
    for method, doc in [("PUT", session), ("PATCH", {"kwh": 50, "last_updated": STAMP})]:
        resp = await ingress.request(method, "/ingress/2.2.1/sessions/FR/AB1/S1", data=enc(doc), headers=AUTH)
        assert resp.status == 202
    cdr = example("cdr_example.json", country_code="FR", party_id="AB1", id="C1", session_id="S1")
    resp = await ingress.post("/ingress/2.2.1/cdrs", data=enc(cdr), headers=AUTH)
    assert resp.status == 202
    lone = example("cdr_example.json", country_code="FR", party_id="AB1", id="C2", session_id="S-unknown")
    resp = await ingress.post("/ingress/2.2.1/cdrs", data=enc(lone), headers=AUTH)
    assert resp.status == 202
    key = session_key("FR", "AB1", "S1")
    shard = shard_of(key, store.shards)
    sessions: Any = await store.redis.xrange(K.stream_key("sessions", shard))
    assert [decode(f[b"e"]).method for _, f in sessions] == ["PUT", "PATCH"]
    last_session_id = sessions[-1][0]
    cdrs: Any = await store.redis.xrange(K.stream_key("cdrs", shard))
    [(_, fields)] = [(sid, f) for sid, f in cdrs if decode(f[b"e"]).key == key]
    assert fields[b"a"] == last_session_id
    other: Any = await store.redis.xrange(
        K.stream_key("cdrs", shard_of(session_key("FR", "AB1", "S-unknown"), store.shards))
    )
    [(_, lone_fields)] = [(sid, f) for sid, f in other if decode(f[b"e"]).object_id == "C2"]
    assert b"a" not in lone_fields  # no session accepted before it: nothing to wait for
