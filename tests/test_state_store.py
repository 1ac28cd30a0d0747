"""The state store through Redis: what the ingress keeps of each object, atomically with the stream entry.

Events go in through the real ingress routes (single and batch); the state is read back with
StateReader.one (what the Sender interfaces serve) and compared with a reference merge computed
here, independently of relay.state. Atomicity is shown three ways: Redis MONITOR sees one EVALSHA
per event with every write inside it; a compare-and-set conflict stores neither the stream entry
nor the state; and two writers racing on one Location lose no update and store each event once.
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer

from relay.config import Settings
from relay.errors import InvalidEvent
from relay.events import Method, decode
from relay.ingest import Ingest
from relay.ingress import create_app
from relay.ordering import location_key, session_key, shard_of, tariff_key
from relay.store import Conflict, StateReader, StateWrite, Store
from relay.store import keys as K
from relay.typedefs import Health
from relay.validation import Accepted, parse_target, validate
from tests.conftest import AUTH, example, gireve_location

Client = TestClient[Any, Any]
PREFIX = "/ingress/2.2.1"


def stamp(minute: int) -> str:
    return f"2024-01-01T00:{minute:02d}:00Z"


def ms(value: str) -> int:
    dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return int((dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp() * 1000)


async def send(client: Client, method: str, path: str, body: Any = None, *, status: int = 202,
               query: dict[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
    resp = await client.request(method, PREFIX + path, json=body, headers=AUTH, params=query)
    text = await resp.text()
    assert resp.status == status, text
    answer: dict[str, Any] = msgspec.json.decode(text)
    return answer


async def metric(client: Client, name: str, **labels: str) -> float:
    resp = await client.get("/metrics")
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    for line in (await resp.text()).splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    return 0.0


def connector(cid: str, at: str, **changes: Any) -> dict[str, Any]:
    doc = {"id": cid, "standard": "IEC_62196_T2", "format": "SOCKET", "power_type": "AC_3_PHASE",
           "max_voltage": 230, "max_amperage": 32, "tariff_ids": ["11"], "last_updated": at}  # fmt: skip
    return {**doc, **changes}


def evse(uid: str, at: str, connectors: list[dict[str, Any]] | None = None, **changes: Any) -> dict[str, Any]:
    doc = {"uid": uid, "evse_id": f"FR*AB1*E{uid}", "status": "AVAILABLE", "capabilities": ["RFID_READER"],
           "connectors": connectors or [connector("1", at)], "last_updated": at}  # fmt: skip
    return {**doc, **changes}


class RefLocation:
    """A reference Location written from OCPI's text, not from relay.state."""

    def __init__(self) -> None:
        self.doc: dict[str, Any] = {}

    @staticmethod
    def _bump(parent: dict[str, Any], at: str) -> None:
        if ms(at) > ms(parent["last_updated"]):
            parent["last_updated"] = at

    def _evse(self, uid: str) -> dict[str, Any]:
        found: dict[str, Any] = next(e for e in self.doc["evses"] if e["uid"] == uid)
        return found

    @staticmethod
    def _patch_evse(target: dict[str, Any], patch: dict[str, Any]) -> None:
        for key, value in patch.items():
            if key != "connectors":
                target[key] = copy.deepcopy(value)
                continue
            for c in value:
                same = [x for x in target["connectors"] if x["id"] == c["id"]]
                if same:
                    same[0].update(copy.deepcopy(c))
                else:
                    target["connectors"].append(copy.deepcopy(c))

    def put(self, body: dict[str, Any]) -> None:
        self.doc = copy.deepcopy(body)

    def patch(self, body: dict[str, Any]) -> None:
        for key, value in body.items():
            if key != "evses":
                self.doc[key] = copy.deepcopy(value)
                continue
            for e in value:
                same = [x for x in self.doc["evses"] if x["uid"] == e["uid"]]
                if same:
                    self._patch_evse(same[0], e)
                else:
                    self.doc["evses"].append(copy.deepcopy(e))

    def put_evse(self, uid: str, body: dict[str, Any]) -> None:
        idx = [i for i, x in enumerate(self.doc["evses"]) if x["uid"] == uid]
        if idx:
            self.doc["evses"][idx[0]] = copy.deepcopy(body)
        else:
            self.doc["evses"].append(copy.deepcopy(body))
        self._bump(self.doc, body["last_updated"])

    def patch_evse(self, uid: str, body: dict[str, Any]) -> None:
        self._patch_evse(self._evse(uid), body)
        self._bump(self.doc, body["last_updated"])

    def put_connector(self, uid: str, cid: str, body: dict[str, Any]) -> None:
        e = self._evse(uid)
        idx = [i for i, x in enumerate(e["connectors"]) if x["id"] == cid]
        if idx:
            e["connectors"][idx[0]] = copy.deepcopy(body)
        else:
            e["connectors"].append(copy.deepcopy(body))
        self._bump(e, body["last_updated"])
        self._bump(self.doc, body["last_updated"])

    def patch_connector(self, uid: str, cid: str, body: dict[str, Any]) -> None:
        e = self._evse(uid)
        next(x for x in e["connectors"] if x["id"] == cid).update(copy.deepcopy(body))
        self._bump(e, body["last_updated"])
        self._bump(self.doc, body["last_updated"])


async def stored(store: Store, module: str, key: str, fld: str) -> Any:
    raw = await StateReader(store).one(module, key, fld)
    return None if raw is None else msgspec.json.decode(raw)


async def score(store: Store, module: str, key: str, member: str, cc: str = "FR", pid: str = "AB1") -> float | None:
    idx = K.index_key(module, shard_of(key, store.shards), cc, pid)
    value: float | None = await store.redis.zscore(idx, member)
    return value


async def entries(store: Store, module: str, key: str) -> list[Any]:
    """The stream entries of one ordering key (decoded events), in stream order."""
    rows: Any = await store.redis.xrange(K.stream_key(module, shard_of(key, store.shards)))
    return [ev for ev in (decode(f[b"e"]) for _, f in rows) if ev.key == key]


# -- 1. a sequence of PUTs and PATCHes equals the reference merge ---------------------------------


async def test_location_sequence_matches_reference_merge(ingress: Client, store: Store) -> None:
    ref = RefLocation()
    key, fld = location_key("FR", "AB1", "LOC1"), "FR:AB1:LOC1"
    base = "/locations/FR/AB1/LOC1"

    async def step(method: str, path: str, body: dict[str, Any], apply: Callable[[], None]) -> None:
        await send(ingress, method, base + path, body)
        apply()
        assert await stored(store, "locations", key, fld) == ref.doc, f"after {method} {path or '/'}"
        assert await score(store, "locations", key, "LOC1") == ms(ref.doc["last_updated"])

    put = gireve_location("LOC1", last_updated=stamp(1))
    await step("PUT", "", put, lambda: ref.put(put))
    p2 = {"name": "Renamed", "facilities": ["CAFE"], "last_updated": stamp(2)}
    await step("PATCH", "", p2, lambda: ref.patch(p2))
    # A Location PATCH naming a known EVSE (merged by uid, its connectors by id) and a new one (added).
    known = {**put["evses"][0], "status": "CHARGING", "connectors": [{**put["evses"][0]["connectors"][0],
                                                                      "max_amperage": 63}]}  # fmt: skip
    p3 = {"evses": [known, evse("4000", stamp(3))], "last_updated": stamp(3)}
    await step("PATCH", "", p3, lambda: ref.patch(p3))
    e4 = evse("4001", stamp(4))
    await step("PUT", "/4001", e4, lambda: ref.put_evse("4001", e4))
    e5 = {"status": "OUTOFORDER", "last_updated": stamp(5)}
    await step("PATCH", "/3257", e5, lambda: ref.patch_evse("3257", e5))
    c6 = connector("3", stamp(6))
    await step("PUT", "/3256/3", c6, lambda: ref.put_connector("3256", "3", c6))
    c7 = {"max_amperage": 10, "last_updated": stamp(7)}
    await step("PATCH", "/3256/2", c7, lambda: ref.patch_connector("3256", "2", c7))
    e8 = evse("4000", stamp(8), status="BLOCKED")  # PUT of a known EVSE replaces it whole
    await step("PUT", "/4000", e8, lambda: ref.put_evse("4000", e8))
    c9 = {"tariff_ids": ["99"], "last_updated": "2016-01-01T00:00:00Z"}  # older: parents keep their stamp
    await step("PATCH", "/3257/1", c9, lambda: ref.patch_connector("3257", "1", c9))

    final = ref.doc
    assert final["name"] == "Renamed" and final["last_updated"] == stamp(8)
    assert [e["uid"] for e in final["evses"]] == ["3256", "3257", "4000", "4001"]
    assert [c["id"] for c in final["evses"][0]["connectors"]] == ["1", "2", "3"]
    assert final["evses"][0]["connectors"][0]["max_amperage"] == 63
    assert final["evses"][1]["last_updated"] == stamp(5)
    # Every event is in the stream once, in order; a PUT then replaces everything again.
    assert [(e.method, e.evse_uid, e.connector_id) for e in await entries(store, "locations", key)] == [
        ("PUT", None, None), ("PATCH", None, None), ("PATCH", None, None), ("PUT", "4001", None),
        ("PATCH", "3257", None), ("PUT", "3256", "3"), ("PATCH", "3256", "2"), ("PUT", "4000", None),
        ("PATCH", "3257", "1"),
    ]  # fmt: skip
    again = gireve_location("LOC1", name="Fresh", last_updated=stamp(10))
    await step("PUT", "", again, lambda: ref.put(again))
    assert len(ref.doc["evses"]) == 2


async def test_session_sequence_matches_reference_merge(ingress: Client, store: Store) -> None:
    key, fld = session_key("FR", "AB1", "S1"), "FR:AB1:S1"
    put = example("session_example_2_short_finished.json", country_code="FR", party_id="AB1", id="S1",
                  status="ACTIVE", last_updated=stamp(1))  # fmt: skip
    ref = copy.deepcopy(put)
    await send(ingress, "PUT", "/sessions/FR/AB1/S1", put)
    patches: list[dict[str, Any]] = [
        {"charging_periods": [{"start_date_time": stamp(2), "dimensions": [{"type": "ENERGY", "volume": 1.5}]}],
         "kwh": 43.0, "last_updated": stamp(2)},
        {"status": "COMPLETED", "total_cost": {"excl_vat": 9.0, "incl_vat": 9.9}, "last_updated": stamp(3)},
        {"charging_periods": [{"start_date_time": stamp(4), "dimensions": [{"type": "TIME", "volume": 0.5}]}],
         "last_updated": stamp(4)},
        {"charging_periods": [], "kwh": 44.0, "last_updated": stamp(5)},  # empty list: periods unchanged
    ]  # fmt: skip
    for p in patches:
        await send(ingress, "PATCH", "/sessions/FR/AB1/S1", p)
        for k, v in p.items():
            if k == "charging_periods":
                ref[k] = ref[k] + v
            else:
                ref[k] = v
        assert await stored(store, "sessions", key, fld) == ref
    assert len(ref["charging_periods"]) == 5 and ref["status"] == "COMPLETED"
    assert await score(store, "sessions", key, "S1") == ms(stamp(5))


async def test_patch_of_an_unknown_object_is_accepted_flagged_and_stores_no_state(
    ingress: Client, store: Store
) -> None:
    before = await metric(ingress, "relay_events_unknown_object_total", module="locations")
    key = location_key("FR", "AB1", "NEVER")
    answer = await send(ingress, "PATCH", "/locations/FR/AB1/NEVER/3256", {"status": "BLOCKED",
                                                                          "last_updated": stamp(1)})  # fmt: skip
    assert answer["data"]["unknown_object"] is True
    assert await metric(ingress, "relay_events_unknown_object_total", module="locations") == before + 1
    [ev] = await entries(store, "locations", key)  # queued for the IOP all the same
    assert ev.method == "PATCH" and ev.id == answer["data"]["event_id"]
    assert await stored(store, "locations", key, "FR:AB1:NEVER") is None
    assert await store.redis.zcard(K.index_key("locations", shard_of(key, store.shards), "FR", "AB1")) == 0

    # A known Location, an EVSE it does not have: flagged, and the Location is left as it was.
    await send(ingress, "PUT", "/locations/FR/AB1/LOC1", gireve_location("LOC1"))
    key1 = location_key("FR", "AB1", "LOC1")
    version_before = await store.read_state("locations", key1, "FR:AB1:LOC1")
    answer = await send(ingress, "PATCH", "/locations/FR/AB1/LOC1/0000", {"status": "BLOCKED",
                                                                         "last_updated": stamp(2)})  # fmt: skip
    assert answer["data"]["unknown_object"] is True
    assert await store.read_state("locations", key1, "FR:AB1:LOC1") == version_before
    assert await metric(ingress, "relay_events_unknown_object_total", module="locations") == before + 2

    # Sessions alike; a known object's PATCH is not flagged.
    s_before = await metric(ingress, "relay_events_unknown_object_total", module="sessions")
    answer = await send(ingress, "PATCH", "/sessions/FR/AB1/S9", {"kwh": 1.0, "last_updated": stamp(3)})
    assert answer["data"]["unknown_object"] is True
    assert await stored(store, "sessions", session_key("FR", "AB1", "S9"), "FR:AB1:S9") is None
    assert await metric(ingress, "relay_events_unknown_object_total", module="sessions") == s_before + 1
    answer = await send(ingress, "PATCH", "/locations/FR/AB1/LOC1/3256", {"status": "BLOCKED",
                                                                         "last_updated": stamp(4)})  # fmt: skip
    assert "unknown_object" not in answer["data"]


async def test_batch_path_keeps_the_same_state(ingress: Client, store: Store) -> None:
    ops = [
        {"method": "PUT", "path": f"{PREFIX}/locations/FR/AB1/B1", "body": gireve_location("B1")},
        {"method": "PATCH", "path": f"{PREFIX}/locations/FR/AB1/B1/3256",
         "body": {"status": "CHARGING", "last_updated": stamp(1)}},
        {"method": "PUT", "path": f"{PREFIX}/locations/FR/AB1/B2", "body": gireve_location("B2")},
        {"method": "PATCH", "path": f"{PREFIX}/locations/FR/AB1/B3", "body": {"name": "x", "last_updated": stamp(2)}},
        {"method": "PATCH", "path": f"{PREFIX}/locations/FR/AB1/B1", "body": {"name": "B1!", "last_updated": stamp(3)}},
    ]  # fmt: skip
    resp = await ingress.post(PREFIX + "/batch", json={"operations": ops}, headers=AUTH)
    data = (await resp.json())["data"]
    assert resp.status == 200 and data["accepted"] == 5, data
    assert [r.get("unknown_object") for r in data["results"]] == [None, None, None, True, None]
    b1 = await stored(store, "locations", location_key("FR", "AB1", "B1"), "FR:AB1:B1")
    expected = gireve_location("B1", name="B1!", last_updated=stamp(3))
    expected["evses"][0] = {**expected["evses"][0], "status": "CHARGING", "last_updated": stamp(1)}
    assert b1 == expected
    assert await stored(store, "locations", location_key("FR", "AB1", "B2"), "FR:AB1:B2") == gireve_location("B2")
    assert await stored(store, "locations", location_key("FR", "AB1", "B3"), "FR:AB1:B3") is None
    assert [e.method for e in await entries(store, "locations", location_key("FR", "AB1", "B1"))] == [
        "PUT", "PATCH", "PATCH"
    ]  # fmt: skip


# -- tariffs (F2, F3) ------------------------------------------------------------------------------


def tariff(target: tuple[str, str] | None = None, price: float = 2.0, **changes: Any) -> dict[str, Any]:
    doc = example("tariff_1_simple_2hour.json", country_code="FR", party_id="AB1", id="T1",
                  start_date_time="2024-01-01T00:00:00Z", **changes)  # fmt: skip
    doc["elements"][0]["price_components"][0]["price"] = price
    if target:
        doc["target_operator_country_code"], doc["target_operator_party_id"] = target
    return doc


def tariff_rules(answer: dict[str, Any]) -> list[str]:
    return [w["rule"] for w in answer["data"].get("warnings") or []]


@pytest.fixture
async def tariff_ingress(make_settings: Callable[..., Settings], store: Store) -> AsyncIterator[Callable[..., Any]]:
    """Ingress servers with a given [state] tariffs_immutable, on the test's store."""
    clients: list[Client] = []

    async def make(mode: str) -> Client:
        settings = make_settings(RELAY_STATE_TARIFFS_IMMUTABLE=mode)
        client = TestClient(TestServer(create_app(settings, store, Health(listeners_up=True))))
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for c in clients:
        await c.close()


async def test_tariff_variants_are_distinct_and_a_variant_is_retired_not_deleted(ingress: Client, store: Store) -> None:
    default_key = tariff_key("FR", "AB1", "T1", None, None)
    target_key = tariff_key("FR", "AB1", "T1", "DE", "MP1")
    await send(ingress, "PUT", "/tariffs/FR/AB1/T1", tariff())
    # A different price for eMSP DE/MP1 is another object, not a change of the default tariff.
    answer = await send(ingress, "PUT", "/tariffs/FR/AB1/T1", tariff(("DE", "MP1"), price=1.0))
    assert "gireve.F3.tariff_immutable" not in tariff_rules(answer)
    assert await stored(store, "tariffs", default_key, "FR:AB1:T1:*") == tariff()
    assert await stored(store, "tariffs", target_key, "FR:AB1:T1:DE:MP1") == tariff(("DE", "MP1"), price=1.0)
    # F1: GIREVE cannot tell a DELETE of the variant from one of the default tariff: refused, nothing changes.
    answer = await send(ingress, "DELETE", "/tariffs/FR/AB1/T1", status=422,
                        query={"target_operator_country_code": "DE", "target_operator_party_id": "MP1"})  # fmt: skip
    assert [(e["field"], e["rule"]) for e in answer["errors"]] == [
        ("query.target_operator_country_code", "gireve.F1.variant_delete")
    ]
    assert "end_date_time" in answer["errors"][0]["message"]
    assert await stored(store, "tariffs", target_key, "FR:AB1:T1:DE:MP1") == tariff(("DE", "MP1"), price=1.0)
    assert [e.method for e in await entries(store, "tariffs", target_key)] == ["PUT"]
    # The way to retire it: a PUT of the variant ending now (end_date_time may change without a warning, F3).
    retired = tariff(("DE", "MP1"), price=1.0, end_date_time="2024-06-01T00:00:00Z")
    answer = await send(ingress, "PUT", "/tariffs/FR/AB1/T1", retired)
    assert tariff_rules(answer) == []
    assert await stored(store, "tariffs", target_key, "FR:AB1:T1:DE:MP1") == retired
    # A DELETE without a variant deletes the default tariff, and only it.
    await send(ingress, "DELETE", "/tariffs/FR/AB1/T1")
    assert await stored(store, "tariffs", default_key, "FR:AB1:T1:*") is None
    assert await score(store, "tariffs", default_key, "T1:*") is None
    assert await stored(store, "tariffs", target_key, "FR:AB1:T1:DE:MP1") == retired
    assert await score(store, "tariffs", target_key, "T1:DE:MP1") is not None


async def test_tariff_price_change_refused_under_reject(tariff_ingress: Callable[..., Any], store: Store) -> None:
    client: Client = await tariff_ingress("reject")
    key = tariff_key("FR", "AB1", "T1", None, None)
    await send(client, "PUT", "/tariffs/FR/AB1/T1", tariff())
    answer = await send(client, "PUT", "/tariffs/FR/AB1/T1", tariff(price=3.0), status=409)
    assert answer["errors"][0]["rule"] == "gireve.F3.tariff_immutable"
    assert answer["errors"][0]["field"] == "$.elements"
    assert await stored(store, "tariffs", key, "FR:AB1:T1:*") == tariff()  # nothing stored…
    assert len(await entries(store, "tariffs", key)) == 1  # …and nothing queued
    # Text and end_date_time may change, without a warning.
    alt = tariff(tariff_alt_text=[{"language": "fr", "text": "2 EUR/h"}], end_date_time="2030-01-01T00:00:00Z")
    answer = await send(client, "PUT", "/tariffs/FR/AB1/T1", alt)
    assert "gireve.F3.tariff_immutable" not in tariff_rules(answer)
    assert await stored(store, "tariffs", key, "FR:AB1:T1:*") == alt
    # A price change of the targeted variant is refused too; its first PUT is not a change.
    await send(client, "PUT", "/tariffs/FR/AB1/T1", tariff(("DE", "MP1"), price=1.0))
    await send(client, "PUT", "/tariffs/FR/AB1/T1", tariff(("DE", "MP1"), price=1.5), status=409)


async def test_tariff_price_change_warned_under_warn_and_unchecked_under_off(
    tariff_ingress: Callable[..., Any], store: Store
) -> None:
    warn: Client = await tariff_ingress("warn")
    key = tariff_key("FR", "AB1", "T1", None, None)
    assert tariff_rules(await send(warn, "PUT", "/tariffs/FR/AB1/T1", tariff())) == []
    answer = await send(warn, "PUT", "/tariffs/FR/AB1/T1", tariff(price=3.0))
    assert tariff_rules(answer) == ["gireve.F3.tariff_immutable"]
    assert await stored(store, "tariffs", key, "FR:AB1:T1:*") == tariff(price=3.0)
    assert await metric(warn, "relay_events_warnings_total", module="tariffs", rule="gireve.F3.tariff_immutable") >= 1
    answer = await send(warn, "PUT", "/tariffs/FR/AB1/T1", tariff(price=3.0, end_date_time="2031-01-01T00:00:00Z"))
    assert tariff_rules(answer) == []
    off: Client = await tariff_ingress("off")
    assert tariff_rules(await send(off, "PUT", "/tariffs/FR/AB1/T1", tariff(price=4.0))) == []
    assert await stored(store, "tariffs", key, "FR:AB1:T1:*") == tariff(price=4.0)


# -- 7. atomicity ----------------------------------------------------------------------------------


async def test_each_event_is_one_script_with_every_write_inside(ingress: Client, store: Store,
                                                                settings: Settings) -> None:  # fmt: skip
    await send(ingress, "PUT", "/locations/FR/AB1/LOC1", gireve_location("LOC1"))
    spy: Any = aioredis.Redis.from_url(settings.redis.url)
    marker = f"end-of-test-{time.monotonic_ns()}"
    seen: list[tuple[str, str]] = []
    try:
        async with spy.monitor() as mon:

            async def collect() -> None:
                async for cmd in mon.listen():
                    if marker in cmd["command"]:
                        return
                    seen.append((cmd["client_type"], cmd["command"].split(" ", 1)[0].upper()))

            task = asyncio.ensure_future(collect())
            await send(ingress, "PATCH", "/locations/FR/AB1/LOC1/3256", {"status": "BLOCKED",
                                                                       "last_updated": stamp(1)})  # fmt: skip
            await send(
                ingress,
                "PUT",
                "/sessions/FR/AB1/S1",
                example("session_example_2_short_finished.json", country_code="FR", party_id="AB1", id="S1"),
            )
            await store.redis.echo(marker)
            await asyncio.wait_for(task, 10)
    finally:
        await spy.aclose()
    writes = {"XADD", "HSET", "ZADD", "HDEL", "ZREM", "DEL", "SET"}
    outside = [c for t, c in seen if t != "lua" and c in writes]
    assert outside == [], f"writes outside a script: {seen}"
    top = [c for t, c in seen if t != "lua" and c not in ("CLIENT", "HELLO", "PING")]
    assert top == ["HGET", "EVALSHA", "EVALSHA"], seen  # the merge reads, then one script per event
    first = seen.index(next(s for s in seen if s[1] == "EVALSHA"))
    inside = [c for _, c in seen[first + 1 : first + 6]]
    assert inside[:2] == ["HGET", "XADD"] and "HSET" in inside and "ZADD" in inside, seen


def _accepted(settings: Settings, method: Method, path: str, body: Any) -> Accepted:
    return validate(parse_target(method, path), method, msgspec.json.encode(body), settings)


async def test_a_cas_conflict_stores_neither_entry_nor_state(store: Store, settings: Settings) -> None:
    acc = _accepted(settings, "PUT", "locations/FR/AB1/LOC1", gireve_location("LOC1"))
    ev = acc.event
    await store.commit(ev, StateWrite("put", "FR:AB1:LOC1", "LOC1", "FR", "AB1", ev.body, 1))
    before = await store.read_state("locations", ev.key, "FR:AB1:LOC1")
    assert before[0] == 1
    patch = _accepted(settings, "PATCH", "locations/FR/AB1/LOC1", {"name": "lost", "last_updated": stamp(1)}).event
    with pytest.raises(Conflict):
        await store.commit(patch, StateWrite("cas", "FR:AB1:LOC1", "LOC1", "FR", "AB1", b'{"name":"lost"}', 2,
                                             expected=0))  # fmt: skip
    assert await store.read_state("locations", ev.key, "FR:AB1:LOC1") == before
    assert [e.id for e in await entries(store, "locations", ev.key)] == [ev.id]


class RacingStore(Store):
    """A Store whose first reads of one field are held until every racer has read (both see one version)."""

    def __init__(self, base: Store, racers: int, stale: tuple[int, bytes | None] | None = None) -> None:
        super().__init__(base.redis, base.settings)
        self.base = base
        self.gate = asyncio.Barrier(racers)
        self.first_reads = racers
        self.stale = stale
        self.reads = 0

    def call(self, *args: Any, durable: bool = False) -> asyncio.Future[Any]:
        # the base store's pipeline and connection; this one never opens its own
        return self.base.call(*args, durable=durable)

    async def read_state(self, module: str, key: str, field: str) -> tuple[int, bytes | None]:
        self.reads += 1
        if self.stale is not None:
            stale, self.stale = self.stale, None
            return stale
        got = await super().read_state(module, key, field)
        if self.first_reads > 0:
            self.first_reads -= 1
            await self.gate.wait()
        return got


async def test_two_racing_patches_both_land_and_each_event_is_stored_once(store: Store, settings: Settings) -> None:
    put = _accepted(settings, "PUT", "locations/FR/AB1/LOC1", gireve_location("LOC1"))
    await Ingest(store, settings).one(put)
    racing = RacingStore(store, racers=2)
    ingest = Ingest(racing, settings)
    a = _accepted(settings, "PATCH", "locations/FR/AB1/LOC1", {"name": "from A", "last_updated": stamp(1)})
    b = _accepted(settings, "PATCH", "locations/FR/AB1/LOC1/3257", {"status": "CHARGING", "last_updated": stamp(2)})
    done = await asyncio.wait_for(asyncio.gather(ingest.one(a), ingest.one(b)), 10)
    assert racing.reads == 3  # both read version 1; the loser read again after its conflict
    doc = await stored(store, "locations", put.event.key, "FR:AB1:LOC1")
    assert doc["name"] == "from A" and doc["evses"][1]["status"] == "CHARGING"  # no lost update
    assert (await store.read_state("locations", put.event.key, "FR:AB1:LOC1"))[0] == 3
    ids = [e.id for e in await entries(store, "locations", put.event.key)]
    assert ids[0] == put.event.id and sorted(ids[1:]) == sorted([a.event.id, b.event.id])  # each once
    # The state is the reference merge in the order the stream (and so the IOP) has the events.
    ref = RefLocation()
    ref.put(gireve_location("LOC1"))
    for event_id in ids[1:]:
        if event_id == a.event.id:
            ref.patch({"name": "from A", "last_updated": stamp(1)})
        else:
            ref.patch_evse("3257", {"status": "CHARGING", "last_updated": stamp(2)})
    assert doc == ref.doc
    assert len({d.stream_id for d in done}) == 2 and not any(d.unknown_object for d in done)


async def test_a_stale_never_seen_read_does_not_lose_the_patch(store: Store, settings: Settings) -> None:
    # The read says "no such Location" (another writer's PUT landed right after it): the PATCH must
    # not be stored as "unknown, nothing to merge" over the Location that now exists.
    put = _accepted(settings, "PUT", "locations/FR/AB1/LOC1", gireve_location("LOC1"))
    await Ingest(store, settings).one(put)
    ingest = Ingest(RacingStore(store, racers=1, stale=(0, None)), settings)
    patch = _accepted(settings, "PATCH", "locations/FR/AB1/LOC1", {"name": "kept", "last_updated": stamp(1)})
    done = await ingest.one(patch)
    assert not done.unknown_object
    doc = await stored(store, "locations", put.event.key, "FR:AB1:LOC1")
    assert doc["name"] == "kept"
    assert [e.id for e in await entries(store, "locations", put.event.key)] == [put.event.id, patch.event.id]


async def test_a_stale_read_cannot_slip_a_tariff_price_change_past_reject(
    make_settings: Callable[..., Settings], store: Store
) -> None:
    settings = make_settings(RELAY_STATE_TARIFFS_IMMUTABLE="reject")
    first = _accepted(settings, "PUT", "tariffs/FR/AB1/T1", tariff())
    await Ingest(store, settings).one(first)
    # The read misses the variant another writer has just stored: the write must not go through blind.
    ingest = Ingest(RacingStore(store, racers=1, stale=(0, None)), settings)
    with pytest.raises(InvalidEvent) as refused:
        await ingest.one(_accepted(settings, "PUT", "tariffs/FR/AB1/T1", tariff(price=9.0)))
    assert refused.value.status == 409
    assert await stored(store, "tariffs", first.event.key, "FR:AB1:T1:*") == tariff()
    assert len(await entries(store, "tariffs", first.event.key)) == 1
