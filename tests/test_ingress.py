"""The ingress over real HTTP and a real Redis: spec examples, every refusal rule, batch, correlation ids.

What is checked each time is what the CSMS relies on: the HTTP status, the field path and rule named in
the answer, and what did (or did not) land in the module's Redis stream.
"""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer

from relay import constants as H
from relay.config import MODULES, Settings
from relay.errors import Problem
from relay.events import Event, decode
from relay.ingress import create_app
from relay.ingress.responses import accepted, accepted_event
from relay.ordering import cdr_key, location_key, session_key, shard_of, tariff_key
from relay.store import Store, connect
from relay.store import keys as K
from relay.typedefs import Health
from tests.conftest import AUTH, SPEC_DIR, TOKEN, example, gireve_location, needs_spec_examples

P = "/ingress/2.2.1"
LOC = f"{P}/locations/FR/AB1/LOC1"
Client = TestClient[Any, Any]
ClientFactory = Callable[[Settings], Awaitable[tuple[Client, Store]]]

# Every operator the spec examples are issued by, plus the shipped FR/AB1.
SPEC_OPERATORS = [
    {"country_code": cc, "party_id": pid, "emi3_id": f"{cc}*{pid}", "name": f"{cc} {pid}"}
    for cc, pid in [
        ("FR", "AB1"),
        ("BE", "BEC"),
        ("SE", "EVC"),
        ("NL", "ALF"),
        ("NL", "ALL"),
        ("DE", "ALL"),
        ("NL", "STK"),
    ]
]


# --- helpers -----------------------------------------------------------------------------------------------


@pytest.fixture
async def client_for(redis_url: str) -> AsyncIterator[ClientFactory]:
    """Build an ingress (server + client + store) from any Settings; all are closed at the end."""
    made: list[tuple[Client, Store]] = []

    async def make(settings: Settings) -> tuple[Client, Store]:
        store = Store(connect(settings.redis.url, settings.redis), settings.redis)
        await store.load_scripts()
        await store.ensure_groups()
        client: Client = TestClient(TestServer(create_app(settings, store, Health(listeners_up=True))))
        await client.start_server()
        made.append((client, store))
        return client, store

    yield make
    for client, store in made:
        await client.close()
        await store.close()


@pytest.fixture
async def warn_client(make_settings: Callable[..., Settings], client_for: ClientFactory) -> tuple[Client, Store]:
    return await client_for(make_settings(RELAY_INGRESS_PROFILE="warn"))


async def entries(store: Store, module: str) -> list[tuple[int, str, dict[bytes, bytes]]]:
    """(shard, stream id, fields) of every entry of a module, shard by shard."""
    out: list[tuple[int, str, dict[bytes, bytes]]] = []
    for shard in range(store.shards):
        rows: Any = await store.redis.xrange(K.stream_key(module, shard))
        out += [(shard, sid.decode(), fields) for sid, fields in rows]
    return out


async def events(store: Store, module: str) -> list[Event]:
    return [decode(fields[K.ENTRY_FIELD.encode()]) for _, _, fields in await entries(store, module)]


async def assert_nothing_stored(store: Store) -> None:
    assert await store.stream_lengths() == dict.fromkeys(MODULES, 0)


def enc(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def edit(doc: dict[str, Any], path: str, value: Any = ...) -> dict[str, Any]:
    """A deep copy of doc with the dotted path (``evses.0.connectors.1.tariff_ids``) set, or deleted if no value."""
    doc = copy.deepcopy(doc)
    *parents, last = path.split(".")
    node: Any = doc
    for step in parents:
        node = node[int(step)] if isinstance(node, list) else node[step]
    key: Any = int(last) if isinstance(node, list) else last
    if value is ...:
        del node[key]
    else:
        node[key] = value
    return doc


def gireve_evse() -> dict[str, Any]:
    evse: dict[str, Any] = gireve_location()["evses"][0]
    return evse


def gireve_connector() -> dict[str, Any]:
    conn: dict[str, Any] = gireve_evse()["connectors"][0]
    return conn


def fr_session(session_id: str = "S1") -> dict[str, Any]:
    return example("session_example_2_short_finished.json", country_code="FR", party_id="AB1", id=session_id)


def fr_cdr(cdr_id: str = "CDR1", session_id: str | None = "S1") -> dict[str, Any]:
    doc = example("cdr_example.json", country_code="FR", party_id="AB1", id=cdr_id)
    if session_id is not None:
        doc["session_id"] = session_id
    return doc


def fr_tariff(tariff_id: str = "T1", **changes: Any) -> dict[str, Any]:
    doc = example("tariff_1_simple_2hour.json", country_code="FR", party_id="AB1", id=tariff_id)
    doc["start_date_time"] = "2024-01-01T00:00:00Z"
    doc.update(changes)
    return doc


STAMP = "2024-06-01T12:00:00Z"


async def send(client: Client, method: str, path: str, body: bytes = b"", **headers: str) -> tuple[int, Any]:
    resp = await client.request(method, path, data=body, headers={**AUTH, **headers})
    text = await resp.text()
    assert resp.status < 500, text
    return resp.status, json.loads(text) if text else None


def problems(answer: Any) -> list[tuple[str, str]]:
    return [(p["field"], p["rule"]) for p in answer["errors"]]


# --- 1. every spec example of a pushed object passes the ingress under "warn" -------------------------------
# (from the reference copy of the spec, see tests/conftest.py: skipped in a clone on its own)

# file -> (method, path below the prefix, module, ordering key). PATCH examples get a route of their level.
SPEC_EXAMPLES: dict[str, tuple[str, str, str, str]] = {
    "location_example.json": ("PUT", "locations/BE/BEC/LOC1", "locations", location_key("BE", "BEC", "LOC1")),
    "location_example_parking_garage_opening_hours.json": (
        "PUT",
        "locations/SE/EVC/cbb0df21-d17d-40ba-a4aa-dc588c8f98cb",
        "locations",
        location_key("SE", "EVC", "cbb0df21-d17d-40ba-a4aa-dc588c8f98cb"),
    ),
    "location_example_uc2_destination_charger.json": (
        "PUT",
        "locations/NL/ALF/3e7b39c2-10d0-4138-a8b3-8509a25f9920",
        "locations",
        location_key("NL", "ALF", "3e7b39c2-10d0-4138-a8b3-8509a25f9920"),
    ),
    "location_example_uc3_destination_charger_not_published.json": (
        "PUT",
        "locations/NL/ALF/3e7b39c2-10d0-4138-a8b3-8509a25f9920",
        "locations",
        location_key("NL", "ALF", "3e7b39c2-10d0-4138-a8b3-8509a25f9920"),
    ),
    "location_example_uc4_limited_visibility.json": (
        "PUT",
        "locations/NL/ALL/f76c2e0c-a6ef-4f67-bf23-6a187e5ca0e0",
        "locations",
        location_key("NL", "ALL", "f76c2e0c-a6ef-4f67-bf23-6a187e5ca0e0"),
    ),
    "location_example_uc5_home_charge_point.json": (
        "PUT",
        "locations/DE/ALL/a5295927-09b9-4a71-b4b9-a5fffdfa0b77",
        "locations",
        location_key("DE", "ALL", "a5295927-09b9-4a71-b4b9-a5fffdfa0b77"),
    ),
    "location_patch_example_location.json": (
        "PATCH",
        "locations/BE/BEC/LOC1",
        "locations",
        location_key("BE", "BEC", "LOC1"),
    ),
    "location_patch_example_remove_evse.json": (
        "PATCH",
        "locations/BE/BEC/LOC1/3256",
        "locations",
        location_key("BE", "BEC", "LOC1"),
    ),
    "location_patch_example_status.json": (
        "PATCH",
        "locations/BE/BEC/LOC1/3255",
        "locations",
        location_key("BE", "BEC", "LOC1"),
    ),
    "location_patch_example_tariff.json": (
        "PATCH",
        "locations/BE/BEC/LOC1/3255/2",
        "locations",
        location_key("BE", "BEC", "LOC1"),
    ),
    "session_example_1_simple_start.json": ("PUT", "sessions/NL/STK/101", "sessions", session_key("NL", "STK", "101")),
    "session_example_2_short_finished.json": (
        "PUT",
        "sessions/BE/BEC/101",
        "sessions",
        session_key("BE", "BEC", "101"),
    ),
    "session_patch_example_charging_period.json": (
        "PATCH",
        "sessions/BE/BEC/101",
        "sessions",
        session_key("BE", "BEC", "101"),
    ),
    "session_patch_example_total_cost.json": (
        "PATCH",
        "sessions/BE/BEC/101",
        "sessions",
        session_key("BE", "BEC", "101"),
    ),
    # The spec's CDR example has no session_id: it is ordered on its own key.
    "cdr_example.json": ("POST", "cdrs", "cdrs", cdr_key("BE", "BEC", "12345")),
}
_TARIFF_FILES = sorted(p.name for p in SPEC_DIR.glob("tariff*.json") if p.name != "tariff_put_example.json")
for _name in _TARIFF_FILES:
    _tid = msgspec.json.decode((SPEC_DIR / _name).read_bytes())["id"]
    SPEC_EXAMPLES[_name] = ("PUT", f"tariffs/DE/ALL/{_tid}", "tariffs", tariff_key("DE", "ALL", _tid, None, None))

# Examples that break the spec's own object tables; the models follow the tables (see tests/test_models.py),
# so the ingress refuses them, naming the field, even under "warn".
SPEC_INVALID: dict[str, tuple[str, str, str, str]] = {
    "tariff_put_example.json": ("PUT", "tariffs/DE/ALL/12", "$.last_updated", "ocpi.required"),
    "location_put_example_add_evse.json": (
        "PUT",
        "locations/BE/BEC/LOC1/3256",
        "$.connectors[0].power_type",
        "ocpi.required",
    ),
}


@needs_spec_examples
def test_every_pushed_spec_example_is_classified() -> None:
    """A new example file of a pushed object must not slip past the ingress tests unnoticed."""
    pushed = {
        p.name
        for p in SPEC_DIR.glob("*.json")
        if p.name.startswith(("location_example", "location_patch", "location_put", "session_", "cdr_", "tariff"))
    }
    assert len(pushed) >= 30
    assert pushed == set(SPEC_EXAMPLES) | set(SPEC_INVALID)


@needs_spec_examples
@pytest.mark.parametrize("name", sorted(SPEC_EXAMPLES))
async def test_spec_example_passes_ingress_under_warn(
    name: str, make_settings: Callable[..., Settings], client_for: ClientFactory
) -> None:
    method, path, module, key = SPEC_EXAMPLES[name]
    settings = make_settings(RELAY_INGRESS_PROFILE="warn", RELAY_OPERATORS_JSON=json.dumps(SPEC_OPERATORS))
    client, store = await client_for(settings)
    raw = (SPEC_DIR / name).read_bytes()
    status, answer = await send(client, method, f"{P}/{path}", raw, **{H.H_CORRELATION: f"corr-{name}"})
    assert status == 202, answer
    assert answer["status_code"] == 1000
    rows = await entries(store, module)
    assert len(rows) == 1, rows
    shard, _, fields = rows[0]
    ev = decode(fields[b"e"])
    assert ev.id == answer["data"]["event_id"]
    assert (ev.module, ev.method, ev.key) == (module, method, key)
    assert shard == shard_of(key, store.shards)
    assert ev.body == raw  # the CSMS's exact bytes travel on
    assert ev.correlation_id == f"corr-{name}"
    assert sum((await store.stream_lengths()).values()) == 1
    if name.startswith("tariff") and b"start_date_time" not in raw:
        # GIREVE's F2 rule: under "warn" the example passes, with the warning
        assert ("$.start_date_time", "gireve.F2.start_date_time") in [
            (w["field"], w["rule"]) for w in answer["data"]["warnings"]
        ]


@needs_spec_examples
@pytest.mark.parametrize("name", sorted(SPEC_INVALID))
async def test_spec_examples_that_break_the_tables_are_refused(
    name: str, make_settings: Callable[..., Settings], client_for: ClientFactory
) -> None:
    method, path, field, rule = SPEC_INVALID[name]
    settings = make_settings(RELAY_INGRESS_PROFILE="warn", RELAY_OPERATORS_JSON=json.dumps(SPEC_OPERATORS))
    client, store = await client_for(settings)
    status, answer = await send(client, method, f"{P}/{path}", (SPEC_DIR / name).read_bytes())
    assert status == 422
    assert (field, rule) in problems(answer)
    await assert_nothing_stored(store)


async def test_repo_example_location_is_accepted_under_strict(ingress: Client, store: Store) -> None:
    status, answer = await send(ingress, "PUT", LOC, enc(gireve_location()))
    assert status == 202, answer
    # examples/location.json has two connectors with different tariff_ids on EVSE 3256: a warning, not a refusal
    assert [(w["field"], w["rule"]) for w in answer["data"]["warnings"]] == [
        ("$.evses[0].connectors[1].tariff_ids", "gireve.L2.tariff_ids_per_evse")
    ]
    assert [ev.key for ev in await events(store, "locations")] == ["loc:FR:AB1:LOC1"]


# --- 2. each validation rule: refused with field path and rule, nothing stored -----------------------------

Body = Callable[[], bytes]


def loc_with(path: str, value: Any = ...) -> Body:
    return lambda: enc(edit(gireve_location(), path, value))


STRICT_REFUSALS: list[tuple[str, str, str, Body, int, str, str]] = [
    # (case, method, path, body, status, field, rule)
    ("malformed json", "PUT", LOC, lambda: b'{"id": "LOC1",', 400, "$", "json"),
    ("empty body", "PUT", LOC, lambda: b"", 400, "$", "json"),
    ("not utf-8", "PUT", LOC, lambda: b'{"id": "\xff"}', 400, "$", "json"),
    ("array instead of object", "PUT", LOC, lambda: b"[1, 2]", 422, "$", "ocpi.type"),
    (
        "number for a string",
        "PUT",
        LOC,
        loc_with("coordinates.latitude", 51.0),
        422,
        "$.coordinates.latitude",
        "ocpi.type",
    ),
    (
        "string for an int",
        "PUT",
        LOC,
        loc_with("evses.0.connectors.0.max_voltage", "220"),
        422,
        "$.evses[0].connectors[0].max_voltage",
        "ocpi.type",
    ),
    ("unknown enum value", "PUT", LOC, loc_with("parking_type", "ROOFTOP"), 422, "$.parking_type", "ocpi.type"),
    ("string too long", "PUT", LOC, loc_with("name", "x" * 256), 422, "$.name", "ocpi.type"),
    ("bad DateTime", "PUT", LOC, loc_with("last_updated", "yesterday"), 422, "$.last_updated", "ocpi.datetime"),
    ("null for a required field", "PUT", LOC, loc_with("address", None), 422, "$.address", "ocpi.type"),
    ("missing required field", "PUT", LOC, loc_with("address"), 422, "$.address", "ocpi.required"),
    ("missing nested field", "PUT", LOC, loc_with("evses.0.status"), 422, "$.evses[0].status", "ocpi.required"),
    (
        "EVSE without connectors",
        "PUT",
        LOC,
        loc_with("evses.0.connectors", []),
        422,
        "$.evses[0].connectors",
        "ocpi.type",
    ),
    ("URL id != body id", "PUT", f"{P}/locations/FR/AB1/LOC2", loc_with("id", "LOC1"), 422, "$.id", "ocpi.url_id"),
    ("URL party != body party", "PUT", LOC, loc_with("party_id", "AB2"), 422, "$.party_id", "ocpi.url_id"),
    ("URL country != body country", "PUT", LOC, loc_with("country_code", "BE"), 422, "$.country_code", "ocpi.url_id"),
    (
        "URL id too long",
        "PUT",
        f"{P}/locations/FR/AB1/{'L' * 37}",
        loc_with("id", "LOC1"),
        422,
        "url.object_id",
        "ocpi.id",
    ),
    (
        "URL id with a space",
        "PUT",
        f"{P}/locations/FR/AB1/LOC%201",
        loc_with("id", "LOC 1"),
        422,
        "url.object_id",
        "ocpi.id",
    ),
    ("URL evse uid != body uid", "PUT", f"{LOC}/9999", lambda: enc(gireve_evse()), 422, "$.uid", "ocpi.url_id"),
    (
        "URL connector id != body id",
        "PUT",
        f"{LOC}/3256/7",
        lambda: enc(gireve_connector()),
        422,
        "$.id",
        "ocpi.url_id",
    ),
    (
        "URL session id != body id",
        "PUT",
        f"{P}/sessions/FR/AB1/S2",
        lambda: enc(fr_session("S1")),
        422,
        "$.id",
        "ocpi.url_id",
    ),
    (
        "URL tariff id != body id",
        "PUT",
        f"{P}/tariffs/FR/AB1/T2",
        lambda: enc(fr_tariff("T1")),
        422,
        "$.id",
        "ocpi.url_id",
    ),
    # T6: operators that are not hosted here
    (
        "unknown operator (location)",
        "PUT",
        f"{P}/locations/FR/XYZ/LOC1",
        loc_with("party_id", "XYZ"),
        404,
        "url.party_id",
        "operator",
    ),
    (
        "unknown operator (session)",
        "PUT",
        f"{P}/sessions/DE/AB1/S1",
        lambda: enc(edit(fr_session(), "country_code", "DE")),
        404,
        "url.party_id",
        "operator",
    ),
    (
        "unknown operator (CDR body)",
        "POST",
        f"{P}/cdrs",
        lambda: enc(edit(fr_cdr(), "party_id", "XYZ")),
        404,
        "$.party_id",
        "operator",
    ),
    # GIREVE L2 under strict
    ("owner.name", "PUT", LOC, loc_with("owner"), 422, "$.owner.name", "gireve.L2.owner_name"),
    ("operator.name", "PUT", LOC, loc_with("operator"), 422, "$.operator.name", "gireve.L2.operator_name"),
    (
        "evses.capabilities",
        "PUT",
        LOC,
        loc_with("evses.0.capabilities"),
        422,
        "$.evses[0].capabilities",
        "gireve.L2.capabilities",
    ),
    (
        "connectors.tariff_ids",
        "PUT",
        LOC,
        loc_with("evses.1.connectors.0.tariff_ids"),
        422,
        "$.evses[1].connectors[0].tariff_ids",
        "gireve.L2.tariff_ids",
    ),
    ("evse_id missing", "PUT", LOC, loc_with("evses.1.evse_id"), 422, "$.evses[1].evse_id", "gireve.L2.evse_id"),
    (
        "evse_id of another operator",
        "PUT",
        LOC,
        loc_with("evses.1.evse_id", "FR*XY1*E041503002"),
        422,
        "$.evses[1].evse_id",
        "gireve.L2.evse_id_prefix",
    ),
    (
        "compact evse_id of another operator",
        "PUT",
        LOC,
        loc_with("evses.1.evse_id", "BEAB1E041503002"),
        422,
        "$.evses[1].evse_id",
        "gireve.L2.evse_id_prefix",
    ),
    (
        "EVSE PUT: evse_id prefix",
        "PUT",
        f"{LOC}/3256",
        lambda: enc(edit(gireve_evse(), "evse_id", "DE*AB1*E1")),
        422,
        "$.evse_id",
        "gireve.L2.evse_id_prefix",
    ),
    (
        "EVSE PUT: capabilities",
        "PUT",
        f"{LOC}/3256",
        lambda: enc(edit(gireve_evse(), "capabilities")),
        422,
        "$.capabilities",
        "gireve.L2.capabilities",
    ),
    (
        "Connector PUT: tariff_ids",
        "PUT",
        f"{LOC}/3256/1",
        lambda: enc(edit(gireve_connector(), "tariff_ids")),
        422,
        "$.tariff_ids",
        "gireve.L2.tariff_ids",
    ),
    (
        "EVSE PATCH: evse_id prefix",
        "PATCH",
        f"{LOC}/3256",
        lambda: enc({"evse_id": "NL*AB1*E1", "last_updated": STAMP}),
        422,
        "$.evse_id",
        "gireve.L2.evse_id_prefix",
    ),
    (
        "Location PATCH: owner without name",
        "PATCH",
        LOC,
        lambda: enc({"owner": {"website": "https://x.example"}, "last_updated": STAMP}),
        422,
        "$.owner.name",
        "ocpi.required",
    ),
    # GIREVE F2
    (
        "tariff start_date_time",
        "PUT",
        f"{P}/tariffs/FR/AB1/T1",
        lambda: enc(edit(fr_tariff(), "start_date_time")),
        422,
        "$.start_date_time",
        "gireve.F2.start_date_time",
    ),
    (
        "tariff target country without party",
        "PUT",
        f"{P}/tariffs/FR/AB1/T1",
        lambda: enc(fr_tariff(target_operator_country_code="NL")),
        422,
        "$.target_operator_party_id",
        "gireve.F2.target_operator_pair",
    ),
    (
        "tariff target party without country",
        "PUT",
        f"{P}/tariffs/FR/AB1/T1",
        lambda: enc(fr_tariff(target_operator_party_id="TNM")),
        422,
        "$.target_operator_country_code",
        "gireve.F2.target_operator_pair",
    ),
    # PATCH bodies must carry last_updated
    (
        "Location PATCH without last_updated",
        "PATCH",
        LOC,
        lambda: enc({"name": "x"}),
        422,
        "$.last_updated",
        "ocpi.required",
    ),
    (
        "EVSE PATCH without last_updated",
        "PATCH",
        f"{LOC}/3256",
        lambda: enc({"status": "CHARGING"}),
        422,
        "$.last_updated",
        "ocpi.required",
    ),
    (
        "Connector PATCH without last_updated",
        "PATCH",
        f"{LOC}/3256/1",
        lambda: enc({"tariff_ids": ["1"]}),
        422,
        "$.last_updated",
        "ocpi.required",
    ),
    (
        "Session PATCH without last_updated",
        "PATCH",
        f"{P}/sessions/FR/AB1/S1",
        lambda: enc({"kwh": 1.5}),
        422,
        "$.last_updated",
        "ocpi.required",
    ),
    # routes and methods
    ("POST on a location", "POST", LOC, loc_with("id", "LOC1"), 405, "method", "route"),
    ("GET on a location", "GET", LOC, lambda: b"", 405, "method", "route"),
    ("DELETE on a location", "DELETE", LOC, lambda: b"", 405, "method", "route"),
    ("PUT on cdrs", "PUT", f"{P}/cdrs", lambda: enc(fr_cdr()), 405, "method", "route"),
    ("DELETE on a session", "DELETE", f"{P}/sessions/FR/AB1/S1", lambda: b"", 405, "method", "route"),
    (
        "PATCH on a tariff",
        "PATCH",
        f"{P}/tariffs/FR/AB1/T1",
        lambda: enc({"last_updated": STAMP}),
        405,
        "method",
        "route",
    ),
    ("unknown module", "PUT", f"{P}/tokens/FR/AB1/T1", lambda: b"{}", 404, "url", "route"),
    ("too few ids", "PUT", f"{P}/locations/FR/AB1", loc_with("id", "LOC1"), 404, "url", "route"),
    ("too many ids", "PUT", f"{LOC}/3256/1/extra", lambda: b"{}", 404, "url", "route"),
    ("CDR with ids", "POST", f"{P}/cdrs/FR/AB1/CDR1", lambda: enc(fr_cdr()), 404, "url", "route"),
    ("outside the prefix", "PUT", "/ingress/2.1.1/locations/FR/AB1/LOC1", loc_with("id", "LOC1"), 404, "url", "route"),
    ("nothing there", "GET", "/nope", lambda: b"", 404, "url", "route"),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "field", "rule"),
    [case[1:] for case in STRICT_REFUSALS],
    ids=[case[0] for case in STRICT_REFUSALS],
)
async def test_refused_with_field_and_rule_and_nothing_stored(
    ingress: Client, store: Store, method: str, path: str, body: Body, status: int, field: str, rule: str
) -> None:
    got, answer = await send(ingress, method, path, body())
    assert got == status, answer
    assert (field, rule) in problems(answer), answer
    assert answer["status_code"] == 2001
    assert answer["status_message"]  # a human-readable first reason
    await assert_nothing_stored(store)


# Under "warn" the GIREVE L2/F2 rules (except the target pair) accept the event and report warnings.
WARN_ACCEPTS: list[tuple[str, str, Body, str, str, str]] = [
    # (case, path, body, module, field, rule)
    ("owner.name", LOC, loc_with("owner"), "locations", "$.owner.name", "gireve.L2.owner_name"),
    ("operator.name", LOC, loc_with("operator"), "locations", "$.operator.name", "gireve.L2.operator_name"),
    (
        "capabilities",
        LOC,
        loc_with("evses.0.capabilities"),
        "locations",
        "$.evses[0].capabilities",
        "gireve.L2.capabilities",
    ),
    (
        "tariff_ids",
        LOC,
        loc_with("evses.1.connectors.0.tariff_ids"),
        "locations",
        "$.evses[1].connectors[0].tariff_ids",
        "gireve.L2.tariff_ids",
    ),
    ("evse_id missing", LOC, loc_with("evses.1.evse_id"), "locations", "$.evses[1].evse_id", "gireve.L2.evse_id"),
    (
        "evse_id prefix",
        LOC,
        loc_with("evses.1.evse_id", "FR*XY1*E041503002"),
        "locations",
        "$.evses[1].evse_id",
        "gireve.L2.evse_id_prefix",
    ),
    (
        "tariff start_date_time",
        f"{P}/tariffs/FR/AB1/T1",
        lambda: enc(edit(fr_tariff(), "start_date_time")),
        "tariffs",
        "$.start_date_time",
        "gireve.F2.start_date_time",
    ),
]


@pytest.mark.parametrize(
    ("path", "body", "module", "field", "rule"), [c[1:] for c in WARN_ACCEPTS], ids=[c[0] for c in WARN_ACCEPTS]
)
async def test_gireve_rules_warn_under_warn_profile(
    warn_client: tuple[Client, Store], path: str, body: Body, module: str, field: str, rule: str
) -> None:
    client, store = warn_client
    status, answer = await send(client, "PUT", path, body())
    assert status == 202, answer
    assert (field, rule) in [(w["field"], w["rule"]) for w in answer["data"]["warnings"]]
    assert [ev.id for ev in await events(store, module)] == [answer["data"]["event_id"]]


async def test_target_operator_pair_is_refused_even_under_warn(warn_client: tuple[Client, Store]) -> None:
    client, store = warn_client
    status, answer = await send(client, "PUT", f"{P}/tariffs/FR/AB1/T1", enc(fr_tariff(target_operator_party_id="TNM")))
    assert status == 422
    assert problems(answer) == [("$.target_operator_country_code", "gireve.F2.target_operator_pair")]
    await assert_nothing_stored(store)


async def test_ocpi_rules_are_not_softened_by_warn(warn_client: tuple[Client, Store]) -> None:
    client, store = warn_client
    for path, body, status in [
        (LOC, enc(edit(gireve_location(), "address")), 422),
        (f"{P}/locations/FR/AB1/LOC2", enc(gireve_location()), 422),
        (f"{P}/locations/FR/XYZ/LOC1", enc(gireve_location(party_id="XYZ")), 404),
        (LOC, b"{", 400),
    ]:
        got, answer = await send(client, "PUT", path, body)
        assert got == status, answer
    await assert_nothing_stored(store)


async def test_strict_reports_every_problem_at_once(ingress: Client, store: Store) -> None:
    doc = edit(edit(edit(gireve_location(), "owner"), "evses.0.capabilities"), "evses.1.evse_id", "XX*AB1*E1")
    status, answer = await send(ingress, "PUT", LOC, enc(doc))
    assert status == 422
    assert set(problems(answer)) == {
        ("$.owner.name", "gireve.L2.owner_name"),
        ("$.evses[0].capabilities", "gireve.L2.capabilities"),
        ("$.evses[1].evse_id", "gireve.L2.evse_id_prefix"),
    }
    await assert_nothing_stored(store)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (LOC, loc_with("evses.1.evse_id", "FRAB1E041503002")),  # compact eMI3 form
        (LOC, loc_with("evses.1.evse_id", "fr*ab1*e041503002")),  # CiString: case does not matter
        (LOC, lambda: enc(edit(edit(gireve_location(), "evses.1.evse_id"), "evses.1.status", "REMOVED"))),
        (f"{P}/locations/fr/ab1/LOC1", loc_with("id", "LOC1")),  # URL ids are CiStrings too
        (f"{LOC}/3256", lambda: enc(gireve_evse())),
        (f"{LOC}/3256/1", lambda: enc(gireve_connector())),
        (
            f"{P}/tariffs/FR/AB1/T1",
            lambda: enc(fr_tariff(target_operator_country_code="NL", target_operator_party_id="TNM")),
        ),
    ],
    ids=[
        "compact evse_id",
        "lower-case evse_id",
        "REMOVED without evse_id",
        "lower-case URL",
        "EVSE PUT",
        "Connector PUT",
        "tariff variant",
    ],
)
async def test_gireve_valid_variants_pass_strict(ingress: Client, store: Store, path: str, body: Body) -> None:
    status, answer = await send(ingress, "PUT", path, body())
    assert status == 202, answer
    assert sum((await store.stream_lengths()).values()) == 1


async def test_patches_skip_rules_on_absent_fields(ingress: Client, store: Store) -> None:
    """A status PATCH need not repeat evse_id, capabilities or owner: partial bodies are checked as partial."""
    for path, body in [
        (f"{LOC}/3256", {"status": "REMOVED", "last_updated": STAMP}),
        (f"{LOC}/3256", {"status": "CHARGING", "last_updated": STAMP}),
        (f"{LOC}/3256/1", {"max_amperage": 32, "last_updated": STAMP}),
        (LOC, {"name": "Renamed", "last_updated": STAMP}),
        (f"{P}/sessions/FR/AB1/S1", {"kwh": 3.5, "last_updated": STAMP}),
    ]:
        status, answer = await send(ingress, "PATCH", path, enc(body))
        assert status == 202, (path, answer)
    lengths = await store.stream_lengths()
    assert (lengths["locations"], lengths["sessions"]) == (4, 1)


async def test_tariff_ids_differing_per_evse_is_a_warning(ingress: Client, store: Store) -> None:
    evse = gireve_evse()
    evse["connectors"][1]["tariff_ids"] = evse["connectors"][0]["tariff_ids"]
    status, answer = await send(ingress, "PUT", f"{LOC}/3256", enc(evse))
    assert status == 202
    assert answer["data"].get("warnings") is None  # same tariff_ids: no warning
    evse["connectors"][1]["tariff_ids"] = ["99"]
    status, answer = await send(ingress, "PUT", f"{LOC}/3256", enc(evse))
    assert status == 202
    assert [(w["field"], w["rule"]) for w in answer["data"]["warnings"]] == [
        ("$.connectors[1].tariff_ids", "gireve.L2.tariff_ids_per_evse")
    ]
    assert (await store.stream_lengths())["locations"] == 2


async def test_tariff_delete_is_accepted_without_body(ingress: Client, store: Store) -> None:
    status, answer = await send(ingress, "DELETE", f"{P}/tariffs/FR/AB1/T1")
    assert status == 202, answer
    [ev] = await events(store, "tariffs")
    assert (ev.method, ev.key, ev.body) == ("DELETE", "tar:FR:AB1:T1:*", b"")


@pytest.mark.parametrize(
    "query",
    ["target_operator_country_code=NL&target_operator_party_id=TNM", "target_operator_party_id=TNM",
     "target_operator_country_code="],
)  # fmt: skip
async def test_tariff_delete_of_a_variant_is_refused_with_the_way_to_retire_it(
    ingress: Client, store: Store, query: str
) -> None:
    """F1: on the wire it would be DELETE /tariffs/FR/AB1/T1, which GIREVE takes for the default tariff."""
    status, answer = await send(ingress, "DELETE", f"{P}/tariffs/FR/AB1/T1?{query}")
    assert status == 422, answer
    assert problems(answer) == [("query.target_operator_country_code", "gireve.F1.variant_delete")]
    assert "PUT" in answer["errors"][0]["message"] and "end_date_time" in answer["errors"][0]["message"]
    assert await events(store, "tariffs") == []


# --- auth and size ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Bearer wrong",
        "Token wrong",
        f"Basic {TOKEN}",
        TOKEN,
        f"Bearer {TOKEN}x",
        f"Bearer {TOKEN[:-1]}",
    ],
)
async def test_missing_or_wrong_token_is_401(ingress: Client, store: Store, header: str | None) -> None:
    headers = {} if header is None else {"Authorization": header}
    batch = enc({"operations": [op("PUT", "locations/FR/AB1/LOC1", gireve_location())]})
    for method, path, body in [("PUT", LOC, enc(gireve_location())), ("POST", f"{P}/batch", batch)]:
        resp = await ingress.request(method, path, data=body, headers=headers)
        answer = await resp.json()
        assert resp.status == 401, answer
        assert problems(answer) == [("Authorization", "auth")]
    await assert_nothing_stored(store)


@pytest.mark.parametrize("scheme", ["Bearer", "Token", "bearer", "TOKEN"])
async def test_bearer_and_token_schemes_are_accepted(ingress: Client, store: Store, scheme: str) -> None:
    resp = await ingress.put(LOC, data=enc(gireve_location()), headers={"Authorization": f"{scheme} {TOKEN}"})
    assert resp.status == 202, await resp.text()
    assert (await store.stream_lengths())["locations"] == 1


async def test_token_rotation_accepts_each_listed_token(
    make_settings: Callable[..., Settings], client_for: ClientFactory
) -> None:
    client, store = await client_for(make_settings(RELAY_INGRESS_TOKEN="old-token, new-token"))
    tokens = [("old-token", 202), ("new-token", 202), ("old-token, new-token", 401), ("other", 401)]
    for i, (token, status) in enumerate(tokens):
        doc = gireve_location(name=f"v{i}")  # another version each time: the same one again would be a duplicate
        resp = await client.put(LOC, data=enc(doc), headers={"Authorization": f"Bearer {token}"})
        assert resp.status == status, token
    assert (await store.stream_lengths())["locations"] == 2


async def test_oversize_body_is_413(make_settings: Callable[..., Settings], client_for: ClientFactory) -> None:
    client, store = await client_for(make_settings(RELAY_INGRESS_MAX_BODY_BYTES="2048"))
    small = enc(gireve_location())
    assert len(small) < 2048
    big = enc(gireve_location(padding="x" * 3000))  # unknown fields are allowed, so only the size is wrong

    async def chunks(data: bytes) -> AsyncIterator[bytes]:
        for i in range(0, len(data), 512):
            yield data[i : i + 512]

    # with Content-Length, without it (chunked), and far beyond the server's absolute limit
    for data in (big, chunks(big), chunks(enc(gireve_location(padding="x" * 200_000)))):
        resp = await client.put(LOC, data=data, headers=AUTH)
        answer = await resp.json()
        assert resp.status == 413, answer
        assert problems(answer) == [("body", "size")]
    await assert_nothing_stored(store)
    resp = await client.put(LOC, data=small, headers=AUTH)
    assert resp.status == 202
    # the batch endpoint takes 64 times the single limit, not more
    item = op("PUT", "locations/FR/AB1/LOC1", gireve_location())
    n = 64 * 2048 // (len(enc(item)) + 2)
    resp = await client.post(f"{P}/batch", data=enc({"operations": [item] * n}), headers=AUTH)
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["data"]["accepted"] == n
    resp = await client.post(f"{P}/batch", data=enc({"operations": [item] * (n + 2)}), headers=AUTH)
    assert resp.status == 413
    # the batch's items are the stored Location again: accepted as duplicates, nothing more stored
    assert (await store.stream_lengths())["locations"] == 1


GARBAGE = [
    b"null",
    b"true",
    b'"a string"',
    b"1e999",
    b"[" * 2000 + b"]" * 2000,
    b'{"country_code": {"$ne": 1}}',
    b"\x00\x01\x02",
    b'{"id": "LOC1"}' * 3,
    b'{"evses": [null]}',
]


@pytest.mark.parametrize("body", GARBAGE, ids=range(len(GARBAGE)))
async def test_garbage_is_never_a_5xx(ingress: Client, store: Store, body: bytes) -> None:
    for method, path in [
        ("PUT", LOC),
        ("PATCH", LOC),
        ("PUT", f"{LOC}/3256"),
        ("PATCH", f"{LOC}/3256/1"),
        ("PUT", f"{P}/sessions/FR/AB1/S1"),
        ("PATCH", f"{P}/sessions/FR/AB1/S1"),
        ("POST", f"{P}/cdrs"),
        ("PUT", f"{P}/tariffs/FR/AB1/T1"),
        ("POST", f"{P}/batch"),
    ]:
        status, answer = await send(ingress, method, path, body)
        assert status in (400, 422), (method, path, answer)
        assert answer["errors"]
    await assert_nothing_stored(store)


async def test_health_endpoints(ingress: Client) -> None:
    resp = await ingress.get("/healthz")
    assert resp.status == 200
    resp = await ingress.get("/readyz")
    body = await resp.json()
    assert resp.status == 200, body
    assert (body["ready"], body["redis"]) == (True, "ok")


# --- 3. batch -----------------------------------------------------------------------------------------------


def op(method: str, path: str, body: Any = None, correlation_id: str = "") -> dict[str, Any]:
    item: dict[str, Any] = {"method": method, "path": path, "correlation_id": correlation_id}
    if body is not None:
        item["body"] = body
    return item


async def test_batch_mixed_items(ingress: Client, store: Store) -> None:
    ops = [
        op("PUT", f"{P}/locations/FR/AB1/LOC1", gireve_location(), "c0"),  # 0 ok
        op("PATCH", "locations/FR/AB1/LOC1/3256", {"status": "CHARGING", "last_updated": STAMP}, "c1"),  # 1 ok
        op("PUT", "locations/FR/XYZ/LOC9", gireve_location("LOC9", party_id="XYZ")),  # 2 unknown operator
        op("PATCH", "locations/FR/AB1/LOC1", {"name": "x"}),  # 3 no last_updated
        op("PATCH", f"{P}/locations/FR/AB1/LOC1/3256/1", {"tariff_ids": ["12"], "last_updated": STAMP}, "c4"),  # 4 ok
        op("POST", "locations/FR/AB1/LOC1", gireve_location()),  # 5 wrong method
        op("PUT", "sessions/FR/AB1/S1", fr_session()),  # 6 ok
        op("POST", "cdrs", fr_cdr()),  # 7 ok
        op("PUT", "tokens/FR/AB1/X", {}),  # 8 unknown route
        op("PATCH", "locations/FR/AB1/LOC1/3256", {"status": "AVAILABLE", "last_updated": STAMP}, "c9"),  # 9 ok
        op("PUT", "tariffs/FR/AB1/T1", edit(fr_tariff(), "start_date_time")),  # 10 strict F2
        op("DELETE", "tariffs/FR/AB1/T1"),  # 11 ok
        op("PUT", "locations/FR/AB1/LOC1"),  # 12 no body
        op("PUT", "locations/FR/AB1/LOC1", edit(gireve_location(), "coordinates.latitude", 1)),  # 13 wrong type
    ]
    resp = await ingress.post(f"{P}/batch", data=enc({"operations": ops}), headers=AUTH)
    answer = await resp.json()
    assert resp.status == 200, answer
    results = answer["data"]["results"]
    assert [r["index"] for r in results] == list(range(len(ops)))
    assert [r["status"] for r in results] == [202, 202, 404, 422, 202, 405, 202, 202, 404, 202, 422, 202, 400, 422]
    assert (answer["data"]["accepted"], answer["data"]["refused"]) == (7, 7)
    assert ("$.last_updated", "ocpi.required") in problems(results[3])
    assert ("$.start_date_time", "gireve.F2.start_date_time") in problems(results[10])
    assert ("$.coordinates.latitude", "ocpi.type") in problems(results[13])
    assert all("event_id" not in r for r in results if r["status"] != 202)
    # only good items are stored, and the items of one key keep their batch order
    lengths = await store.stream_lengths()
    assert lengths == {"locations": 4, "sessions": 1, "cdrs": 1, "tariffs": 1, "commands": 0}
    locs = [ev for ev in await events(store, "locations") if ev.key == "loc:FR:AB1:LOC1"]
    assert [ev.id for ev in locs] == [results[i]["event_id"] for i in (0, 1, 4, 9)]
    assert [(ev.method, ev.evse_uid, ev.connector_id, ev.correlation_id) for ev in locs] == [
        ("PUT", None, None, "c0"),
        ("PATCH", "3256", None, "c1"),
        ("PATCH", "3256", "1", "c4"),
        ("PATCH", "3256", None, "c9"),
    ]
    assert msgspec.json.decode(locs[1].body) == {"status": "CHARGING", "last_updated": STAMP}


async def test_batch_keeps_the_order_of_many_updates_of_one_key(ingress: Client, store: Store) -> None:
    statuses = ["AVAILABLE", "CHARGING", "BLOCKED", "OUTOFORDER"]
    ops = [
        op(
            "PATCH",
            f"locations/FR/AB1/LOC1/{3256 + i % 2}",
            {"status": statuses[i % 4], "last_updated": STAMP},
            f"c{i}",
        )
        for i in range(200)
    ]
    ops += [op("PUT", f"locations/FR/AB1/L{i}", gireve_location(f"L{i}")) for i in range(20)]  # other keys in between
    resp = await ingress.post(f"{P}/batch", data=enc({"operations": ops}), headers=AUTH)
    answer = await resp.json()
    assert answer["data"]["accepted"] == 220, answer
    loc1 = [ev for ev in await events(store, "locations") if ev.key == "loc:FR:AB1:LOC1"]
    assert [ev.correlation_id for ev in loc1] == [f"c{i}" for i in range(200)]


@pytest.mark.parametrize(
    ("body", "status", "field", "rule"),
    [
        (b"not json", 400, "$", "json"),
        (b"{}", 422, "$.operations", "ocpi.required"),
        (b'{"operations": {}}', 422, "$.operations", "ocpi.type"),
        (
            b'{"operations": [{"method": "GET", "path": "locations/FR/AB1/LOC1"}]}',
            422,
            "$.operations[0].method",
            "ocpi.type",
        ),
        (b'{"operations": [{"method": "PUT"}]}', 422, "$.operations[0].path", "ocpi.required"),
        (b'{"operations": [], "extra": 1}', 422, "$", "ocpi.type"),
    ],
)
async def test_batch_envelope_errors(
    ingress: Client, store: Store, body: bytes, status: int, field: str, rule: str
) -> None:
    got, answer = await send(ingress, "POST", f"{P}/batch", body)
    assert got == status, answer
    assert (field, rule) in problems(answer)
    await assert_nothing_stored(store)


async def test_batch_item_limit(make_settings: Callable[..., Settings], client_for: ClientFactory) -> None:
    client, store = await client_for(make_settings(RELAY_INGRESS_MAX_BATCH_ITEMS="2"))
    ops = [op("PUT", "locations/FR/AB1/LOC1", gireve_location())] * 3
    status, answer = await send(client, "POST", f"{P}/batch", enc({"operations": ops}))
    assert status == 413
    assert problems(answer) == [("$.operations", "size")]
    await assert_nothing_stored(store)
    status, answer = await send(client, "POST", f"{P}/batch", enc({"operations": ops[:2]}))
    assert (status, answer["data"]["accepted"]) == (200, 2)


async def test_batch_warnings_per_item(warn_client: tuple[Client, Store]) -> None:
    client, store = warn_client
    ops = [
        op("PUT", "locations/FR/AB1/LOC1", edit(gireve_location(), "owner")),
        op("PUT", "tariffs/FR/AB1/T1", fr_tariff()),
    ]
    status, answer = await send(client, "POST", f"{P}/batch", enc({"operations": ops}))
    assert status == 200
    first, second = answer["data"]["results"]
    assert ("$.owner.name", "gireve.L2.owner_name") in [(w["field"], w["rule"]) for w in first["warnings"]]
    assert "warnings" not in second
    assert sum((await store.stream_lengths()).values()) == 2


# --- 4. correlation ids -------------------------------------------------------------------------------------


async def test_correlation_id_is_kept_in_the_envelope(ingress: Client, store: Store) -> None:
    status, answer = await send(ingress, "PUT", LOC, enc(gireve_location()), **{H.H_CORRELATION: "csms-corr-42"})
    assert status == 202
    status, _ = await send(ingress, "PUT", f"{P}/sessions/FR/AB1/S1", enc(fr_session()), **{H.H_CORRELATION: "csms-s1"})
    assert status == 202
    status, _ = await send(ingress, "PUT", f"{P}/locations/FR/AB1/LOC2", enc(gireve_location("LOC2")))
    assert status == 202
    by_key = {ev.key: ev for module in ("locations", "sessions") for ev in await events(store, module)}
    assert by_key["loc:FR:AB1:LOC1"].correlation_id == "csms-corr-42"
    assert by_key["loc:FR:AB1:LOC1"].id == answer["data"]["event_id"]
    assert by_key["ses:FR:AB1:S1"].correlation_id == "csms-s1"
    assert by_key["loc:FR:AB1:LOC2"].correlation_id == ""  # none sent: the forwarder makes one per event


async def test_envelope_fields(ingress: Client, store: Store) -> None:
    raw = enc({"status": "CHARGING", "last_updated": STAMP})
    status, answer = await send(ingress, "PATCH", f"{LOC}/3256", raw)
    assert status == 202
    [ev] = await events(store, "locations")
    assert (ev.module, ev.method, ev.country_code, ev.party_id, ev.object_id, ev.evse_uid, ev.connector_id) == (
        "locations",
        "PATCH",
        "FR",
        "AB1",
        "LOC1",
        "3256",
        None,
    )
    assert ev.body == raw
    assert ev.url_path() == "/FR/AB1/LOC1/3256"
    assert len(ev.id) == 28 and ev.id == answer["data"]["event_id"]
    assert ev.received_at > 0


@pytest.mark.parametrize("unknown_object", [False, True])
@pytest.mark.parametrize("warnings", [None, [Problem(field="$.a", rule="r", message='say "x"')]])
def test_the_pre_encoded_answer_is_the_envelope_byte_for_byte(warnings: list[Problem] | None,
                                                               unknown_object: bool) -> None:  # fmt: skip
    data: dict[str, Any] = {"event_id": "01a2431c802275736b1bed96628f", "warnings": warnings}
    if unknown_object:
        data["unknown_object"] = True
    fast = accepted_event("01a2431c802275736b1bed96628f", warnings, unknown_object)
    slow = accepted(data)
    assert (fast.status, fast.content_type) == (slow.status, slow.content_type) == (202, "application/json")
    assert isinstance(fast.body, bytes) and isinstance(slow.body, bytes)
    stamp = b'"timestamp":"'
    assert fast.body.split(stamp)[0] == slow.body.split(stamp)[0]
    assert fast.body.split(stamp)[1][21:] == slow.body.split(stamp)[1][21:]  # after the (second-precision) stamp
