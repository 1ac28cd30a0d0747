"""GIREVE qualification rules on what the CSMS sends (docs/validation.md): DateTimes in OCPI's form, eMI3 EVSE
ids, non-empty capabilities and tariff_ids, RFID UIDs of cdr_tokens, CDR ids and Credit CDRs (S3).

Most tests call ``validate`` (pure); the end-to-end ones run a relay against a FakeIop and check what is
stored and what the IOP receives.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp
import msgspec
import pytest

from relay import rules
from relay.config import Settings
from relay.errors import InvalidEvent
from relay.ordering import location_key, session_key
from relay.service import Relay
from relay.store import StateReader, Store
from relay.validation import Accepted, parse_target, validate
from tests.conftest import AUTH, example, gireve_location
from tests.fake_iop import FakeIop
from tests.ocpi_peer import running
from tests.waiting import stays_false

STAMP = "2026-01-01T10:00:00Z"
OPERATOR = {"country_code": "FR", "party_id": "AB1", "name": "Example CPO"}


def accept(settings: Settings, method: str, path: str, doc: Any, query: dict[str, str] | None = None) -> Accepted:
    raw = json.dumps(doc).encode()
    return validate(parse_target(method, path, query), method, raw, settings)  # type: ignore[arg-type]


def refuse(settings: Settings, method: str, path: str, doc: Any) -> list[tuple[str, str]]:
    with pytest.raises(InvalidEvent) as info:
        accept(settings, method, path, doc)
    assert info.value.status == 422
    return [(p.field, p.rule) for p in info.value.problems]


def stored(acc: Accepted) -> Any:
    """The body as it is stored and forwarded."""
    return msgspec.json.decode(acc.event.body)


def at(doc: Any, path: str) -> Any:
    """``$.a[0].b`` in a decoded document."""
    for part in path.removeprefix("$.").replace("[", ".").replace("]", "").split("."):
        doc = doc[int(part)] if part.isdigit() else doc[part]
    return doc


def put_at(doc: Any, path: str, value: Any) -> Any:
    parts = path.removeprefix("$.").replace("[", ".").replace("]", "").split(".")
    target = at(doc, "$." + ".".join(parts[:-1])) if len(parts) > 1 else doc
    last = parts[-1]
    target[int(last) if last.isdigit() else last] = value
    return doc


def session(**changes: Any) -> dict[str, Any]:
    return example("session_example_2_short_finished.json", **{"id": "S1", **changes})


def cdr(**changes: Any) -> dict[str, Any]:
    return example("cdr_example.json", **{"id": "CDR1", "session_id": "S1", **changes})


def tariff(**changes: Any) -> dict[str, Any]:
    return example("tariff_1_simple_2hour.json", **{"id": "T1", "country_code": "FR", "party_id": "AB1",
                                                     "start_date_time": STAMP, **changes})  # fmt: skip


# --- 5. DateTimes ----------------------------------------------------------------------------------------------------


def test_an_offset_is_converted_to_utc_before_anything_is_stored(settings: Settings, capfd: Any) -> None:
    acc = accept(settings, "PUT", "locations/FR/AB1/LOC1", gireve_location(last_updated="2026-01-01T10:00:00+02:00"))
    assert stored(acc)["last_updated"] == "2026-01-01T08:00:00Z"
    assert acc.updated_ms == int(datetime(2026, 1, 1, 8, tzinfo=UTC).timestamp() * 1000)  # the state index's score
    [warning] = [w for w in acc.warnings if w.rule == "ocpi.datetime_rewritten"]
    assert warning.field == "$.last_updated"
    assert "'2026-01-01T10:00:00+02:00'" in warning.message and "'2026-01-01T08:00:00Z'" in warning.message
    err = capfd.readouterr().err
    assert "datetime_rewritten" in err and "$.last_updated" in err and acc.event.id in err


# Every DateTime of every module (the plan of each model is read from its types: tests/test_models.py).
EVERY_DATETIME = [
    ("PUT", "locations/FR/AB1/LOC1", lambda: example("location_example.json", id="LOC1"),
     ["$.last_updated", "$.evses[0].last_updated", "$.evses[0].status_schedule[0].period_begin",
      "$.evses[0].status_schedule[0].period_end", "$.evses[1].connectors[0].last_updated",
      "$.opening_times.exceptional_closings[0].period_begin", "$.opening_times.exceptional_closings[0].period_end"]),
    ("PUT", "locations/FR/AB1/LOC1/LYPD-01", lambda: example("location_example.json")["evses"][0],
     ["$.last_updated", "$.status_schedule[0].period_begin", "$.connectors[1].last_updated"]),
    ("PATCH", "locations/FR/AB1/LOC1/3256/1", lambda: {"tariff_ids": ["12"], "last_updated": STAMP},
     ["$.last_updated"]),
    ("PUT", "sessions/FR/AB1/S1", session,
     ["$.start_date_time", "$.end_date_time", "$.last_updated", "$.charging_periods[2].start_date_time"]),
    ("PATCH", "sessions/FR/AB1/S1", lambda: {"end_date_time": STAMP, "last_updated": STAMP,
                                            "charging_periods": [session()["charging_periods"][0]]},
     ["$.end_date_time", "$.last_updated", "$.charging_periods[0].start_date_time"]),
    ("POST", "cdrs", cdr,
     ["$.start_date_time", "$.end_date_time", "$.last_updated", "$.charging_periods[0].start_date_time",
      "$.tariffs[0].start_date_time", "$.tariffs[0].last_updated"]),
    ("PUT", "tariffs/FR/AB1/T1", lambda: tariff(end_date_time=STAMP),
     ["$.start_date_time", "$.end_date_time", "$.last_updated"]),
]  # fmt: skip


@pytest.mark.parametrize(("method", "path", "make", "fields"), EVERY_DATETIME, ids=[c[1] for c in EVERY_DATETIME])
def test_every_datetime_field_is_rewritten(
    settings: Settings, method: str, path: str, make: Callable[[], Any], fields: list[str]
) -> None:
    doc = make()
    for f in fields:
        put_at(doc, f, "2026-01-01T10:00:00.123456789-01:30")
    acc = accept(settings, method, path, doc)
    body = stored(acc)
    assert [at(body, f) for f in fields] == ["2026-01-01T11:30:00.1234Z"] * len(fields)
    assert sorted(w.field for w in acc.warnings if w.rule == "ocpi.datetime_rewritten") == sorted(fields)


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        ("2026-01-01T10:00:00+02:00", "2026-01-01T08:00:00Z"),
        ("2026-01-01T00:30:00+01:00", "2025-12-31T23:30:00Z"),  # the date moves too
        ("2026-01-01T10:00:00+00:00", "2026-01-01T10:00:00Z"),  # "+00:00 is not the same as UTC" (types.asciidoc)
        ("2026-01-01T10:00:00-00:00", "2026-01-01T10:00:00Z"),
        ("2026-01-01T10:00:00." + "1" * 30 + "Z", "2026-01-01T10:00:00.1111Z"),  # 25 characters
        ("2026-01-01T10:00:00.999999999Z", "2026-01-01T10:00:00.9999Z"),  # truncated, never into the next second
        ("2026-01-01T10:00:00.1234567", "2026-01-01T10:00:00.12345"),  # no designator: still 25, still UTC
        ("2026-01-01 10:00:00Z", "2026-01-01T10:00:00Z"),  # RFC 3339 5.6's note allows the space
        ("2026-01-01t10:00:00z", "2026-01-01T10:00:00Z"),
    ],
)
def test_what_rfc3339_reads_is_written_as_ocpi_writes_it(settings: Settings, sent: str, kept: str) -> None:
    acc = accept(settings, "PUT", "sessions/FR/AB1/S1", session(last_updated=sent))
    assert stored(acc)["last_updated"] == kept


@pytest.mark.parametrize(
    "sent",
    ["2026-01-01", "2026-01-01T10:00Z", "20260101T100000Z", "2026-W01-4T10:00:00Z", "2026-01-01T10:00:00+0200",
     "2026-01-01T10:00:60Z", "2026-02-30T10:00:00Z", "2026-01-01T10:00:00+24:00", "0001-01-01T00:30:00+01:00",
     "yesterday", ""],
)  # fmt: skip
def test_what_is_no_instant_is_refused_naming_the_field(settings: Settings, sent: str) -> None:
    assert refuse(settings, "PUT", "sessions/FR/AB1/S1", session(end_date_time=sent)) == [
        ("$.end_date_time", "ocpi.datetime")
    ]


def test_every_unreadable_datetime_is_named_at_once_and_none_is_rewritten(settings: Settings) -> None:
    doc = session(start_date_time="2026-01-01", last_updated="2026-01-01T10:00:00+02:00")
    doc["charging_periods"][1]["start_date_time"] = "2026-01-01T10:00:00+0200"
    assert refuse(settings, "PUT", "sessions/FR/AB1/S1", doc) == [
        ("$.start_date_time", "ocpi.datetime"),
        ("$.charging_periods[1].start_date_time", "ocpi.datetime"),
    ]


def test_a_rewritten_body_keeps_every_other_value(settings: Settings) -> None:
    doc = gireve_location(last_updated="2026-01-01T10:00:00+02:00")
    doc["x_vendor"] = {"last_updated": "not ours to read", "n": [1, 2.5, None, True]}
    doc["evses"][0]["x_note"] = "2026-01-01T10:00:00+02:00"  # an unknown field is no DateTime of the model
    body = stored(accept(settings, "PUT", "locations/FR/AB1/LOC1", doc))
    assert body == {**doc, "last_updated": "2026-01-01T08:00:00Z"}


def test_a_conforming_body_is_stored_byte_for_byte(settings: Settings) -> None:
    raw = b'{ "kwh": 12.50, "last_updated": "2026-01-01T10:00:00.1234Z" }'
    acc = validate(parse_target("PATCH", "sessions/FR/AB1/S1"), "PATCH", raw, settings)
    assert acc.event.body == raw and acc.warnings == []


def test_another_rule_broken_after_the_rewrite_is_still_named(settings: Settings) -> None:
    assert refuse(settings, "PUT", "sessions/FR/AB1/S1", session(last_updated="2026-01-01T10:00:00+02:00",
                                                                 kwh="lots")) == [("$.kwh", "ocpi.type")]  # fmt: skip


async def test_the_batch_route_rewrites_as_the_single_one(ingress: Any, store: Store) -> None:
    doc = session(last_updated="2026-01-01T10:00:00+02:00")
    ops = [
        {"method": "PUT", "path": "/ingress/2.2.1/sessions/FR/AB1/S1", "body": doc},
        {
            "method": "PUT",
            "path": "/ingress/2.2.1/sessions/FR/AB1/S2",
            "body": {**doc, "id": "S2", "last_updated": "2026-01-01"},
        },
    ]
    resp = await ingress.post("/ingress/2.2.1/batch", json={"operations": ops}, headers=AUTH)
    results = (await resp.json())["data"]["results"]
    assert [r["status"] for r in results] == [202, 422]
    assert [(w["field"], w["rule"]) for w in results[0]["warnings"]] == [("$.last_updated", "ocpi.datetime_rewritten")]
    assert [(e["field"], e["rule"]) for e in results[1]["errors"]] == [("$.last_updated", "ocpi.datetime")]
    raw = await StateReader(store).one("sessions", session_key("FR", "AB1", "S1"), "FR:AB1:S1")
    assert raw is not None and msgspec.json.decode(raw)["last_updated"] == "2026-01-01T08:00:00Z"


# --- 6. eMI3 EVSE ids --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("evse_id", "ok"),
    [("FR*AB1*E1", True), ("FRAB1E1", True), ("FR*AB1*EABCDEFG*1", True), ("fr*ab1*e1", True),
     ("FR*AB1*X1", False), ("FR*AB1*1", False), ("FR*AB1*E", False), ("FRAB1E", False), ("FRAB1X1", False),
     ("FR*AB1E1", False)],
)  # fmt: skip
def test_an_evse_id_is_the_operator_id_then_e_then_the_outlet(settings: Settings, evse_id: str, ok: bool) -> None:
    doc = gireve_location()
    doc["evses"][1]["evse_id"] = evse_id
    if ok:
        accept(settings, "PUT", "locations/FR/AB1/LOC1", doc)
    else:
        assert refuse(settings, "PUT", "locations/FR/AB1/LOC1", doc) == [
            ("$.evses[1].evse_id", "gireve.L2.evse_id_prefix")
        ]


def test_an_operator_may_have_an_emi3_id_of_its_own(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(RELAY_OPERATORS_JSON=json.dumps([{**OPERATOR, "emi3_id": "FR*XYZ"}]))
    doc = gireve_location()
    for i, evse in enumerate(doc["evses"]):
        evse["evse_id"] = f"FR*XYZ*E{i}" if i else f"FRXYZE{i}"
    accept(settings, "PUT", "locations/FR/AB1/LOC1", doc)
    doc["evses"][0]["evse_id"] = "FR*AB1*E1"  # the OCPI ids are no longer the prefix
    with pytest.raises(InvalidEvent) as info:
        accept(settings, "PUT", "locations/FR/AB1/LOC1", doc)
    assert "FR*XYZ*E… or FRXYZE…" in info.value.problems[0].message


# --- 7. capabilities and tariff_ids ------------------------------------------------------------------------------


def test_empty_capabilities_and_tariff_ids_are_refused_as_absent_ones_are(settings: Settings) -> None:
    doc = gireve_location()
    doc["evses"][0]["capabilities"] = []
    doc["evses"][1]["connectors"][0]["tariff_ids"] = []
    assert refuse(settings, "PUT", "locations/FR/AB1/LOC1", doc) == [
        ("$.evses[0].capabilities", "gireve.L2.capabilities"),
        ("$.evses[1].connectors[0].tariff_ids", "gireve.L2.tariff_ids"),
    ]


def test_a_removed_evse_may_have_empty_lists_but_not_absent_ones(settings: Settings) -> None:
    doc = gireve_location()
    evse = doc["evses"][1]
    evse.update(status="REMOVED", capabilities=[])
    evse["connectors"][0]["tariff_ids"] = []
    accept(settings, "PUT", "locations/FR/AB1/LOC1", doc)
    del evse["capabilities"]
    assert refuse(settings, "PUT", "locations/FR/AB1/LOC1", doc) == [
        ("$.evses[1].capabilities", "gireve.L2.capabilities")
    ]


@pytest.mark.parametrize(
    ("path", "doc", "problem"),
    [
        ("locations/FR/AB1/LOC1/3256", {"capabilities": [], "last_updated": STAMP},
         ("$.capabilities", "gireve.L2.capabilities")),
        ("locations/FR/AB1/LOC1/3256/1", {"tariff_ids": [], "last_updated": STAMP},
         ("$.tariff_ids", "gireve.L2.tariff_ids")),
        ("locations/FR/AB1/LOC1/3256", {"status": "REMOVED", "capabilities": [], "last_updated": STAMP}, None),
        ("locations/FR/AB1/LOC1/3256", {"status": "CHARGING", "last_updated": STAMP}, None),
    ],
)  # fmt: skip
def test_a_patch_is_checked_on_the_lists_it_sends(
    settings: Settings, path: str, doc: dict[str, Any], problem: tuple[str, str] | None
) -> None:
    if problem is None:
        accept(settings, "PATCH", path, doc)
    else:
        assert refuse(settings, "PATCH", path, doc) == [problem]


def test_empty_lists_are_warnings_under_the_warn_profile(make_settings: Callable[..., Settings]) -> None:
    doc = gireve_location()
    doc["evses"][0]["capabilities"] = []
    acc = accept(make_settings(RELAY_INGRESS_PROFILE="warn"), "PUT", "locations/FR/AB1/LOC1", doc)
    assert ("$.evses[0].capabilities", "gireve.L2.capabilities") in [(w.field, w.rule) for w in acc.warnings]


# --- 7. RFID UIDs of cdr_tokens ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uid", "ok"),
    [("0102ABCD", True), ("0102abcd", True), ("04A2C5F21B6E80", True), ("0102ABC", False), ("0102ABCDE", False),
     ("0102ABCG", False), ("0102ABCD\n", False), ("04A2C5F21B6E8000", False), ("", False), ("０102ABCD", False)],
)  # fmt: skip
def test_is_rfid_uid(uid: str, ok: bool) -> None:
    assert rules.is_rfid_uid(uid) is ok


def _token(uid: str, token_type: str = "RFID", issuer: tuple[str, str] = ("DE", "EMP")) -> dict[str, Any]:
    return {"country_code": issuer[0], "party_id": issuer[1], "uid": uid, "type": token_type,
            "contract_id": "DE-EMP-C12345678-X"}  # fmt: skip


@pytest.mark.parametrize(
    ("method", "path", "make"),
    [("PUT", "sessions/FR/AB1/S1", lambda t: session(cdr_token=t)),
     ("PATCH", "sessions/FR/AB1/S1", lambda t: {"cdr_token": t, "last_updated": STAMP}),
     ("POST", "cdrs", lambda t: cdr(cdr_token=t))],
)  # fmt: skip
def test_the_uid_of_an_rfid_cdr_token_is_8_or_14_hex(
    make_settings: Callable[..., Settings], method: str, path: str, make: Callable[[Any], Any]
) -> None:
    settings = make_settings()
    assert refuse(settings, method, path, make(_token("DE-EMP-CARD-1"))) == [("$.cdr_token.uid", "gireve.K1.rfid_uid")]
    accept(settings, method, path, make(_token("0102abcd")))
    accept(settings, method, path, make(_token("DE-EMP-APP-1", "APP_USER")))  # only RFID UIDs have a format
    warned = accept(make_settings(RELAY_INGRESS_PROFILE="warn"), method, path, make(_token("12345")))
    assert ("$.cdr_token.uid", "gireve.K1.rfid_uid") in [(w.field, w.rule) for w in warned.warnings]


def test_a_token_advenir_replaces_is_not_checked(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(RELAY_OPERATORS_JSON=json.dumps([{**OPERATOR, "advenir": True}]))
    local = _token("LOCAL-BADGE-42", issuer=("FR", "AB1"))  # the operator's own card: anonymised before the IOP
    accept(settings, "PUT", "sessions/FR/AB1/S1", session(cdr_token=local))
    roaming = _token("LOCAL-BADGE-42")  # an eMSP's: the IOP gets it as it is
    assert refuse(settings, "PUT", "sessions/FR/AB1/S1", session(cdr_token=roaming)) == [
        ("$.cdr_token.uid", "gireve.K1.rfid_uid")
    ]


# --- 7. CDR ids and Credit CDRs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"id": "C" * 36}, None),
        ({"id": "C" * 37}, ("$.id", "ocpi.cdr_id")),
        ({"id": "C" * 39}, ("$.id", "ocpi.cdr_id")),
        ({"id": "C" * 39, "credit": False}, ("$.id", "ocpi.cdr_id")),
        ({"id": "C" * 36 + "-CR", "credit": True, "credit_reference_id": "C" * 36}, None),
        ({"id": "CDR1-CR", "credit": True}, ("$.credit_reference_id", "ocpi.credit_reference_id")),
        ({"id": "CDR1-CR", "credit": True, "credit_reference_id": None}, ("$.credit_reference_id",
                                                                           "ocpi.credit_reference_id")),
        ({"id": "CDR1", "credit": True, "credit_reference_id": "cdr1"}, ("$.id", "ocpi.credit_cdr_id")),
    ],
)  # fmt: skip
def test_cdr_id_and_credit_rules(make_settings: Callable[..., Settings], changes: dict[str, Any],
                                 problem: tuple[str, str] | None) -> None:  # fmt: skip
    for profile in ("strict", "warn"):  # OCPI's rules: no profile softens them
        settings = make_settings(RELAY_INGRESS_PROFILE=profile)
        if problem is None:
            accept(settings, "POST", "cdrs", cdr(**changes))
        else:
            assert refuse(settings, "POST", "cdrs", cdr(**changes)) == [problem]


# --- end to end: what is stored and what the IOP gets ------------------------------------------------------------


@pytest.fixture
async def relay_and_iop(make_settings: Callable[..., Settings]) -> AsyncIterator[tuple[Relay, FakeIop, str]]:
    iop = FakeIop()
    await iop.start()
    fast = {"RELAY_IOP_URL": iop.url, "RELAY_IOP_TOKEN": "iop-token", "RELAY_FORWARDER_BACKOFF_INITIAL_S": "0.01",
            "RELAY_FORWARDER_BACKOFF_MAX_S": "0.05", "RELAY_FORWARDER_SHUTDOWN_TIMEOUT_S": "1"}  # fmt: skip
    try:
        async with running(make_settings(**fast)) as relay:
            yield relay, iop, f"http://127.0.0.1:{relay.ingress_port}/ingress/2.2.1"
    finally:
        await iop.close()


async def _send(base: str, method: str, path: str, body: Any, status: int = 202) -> Any:
    async with aiohttp.ClientSession() as http, http.request(method, base + path, json=body, headers=AUTH) as r:
        answer = msgspec.json.decode(await r.read())
        assert r.status == status, answer
        return answer


async def _state(relay: Relay, module: str, key: str, fld: str) -> Any:
    assert relay.store is not None
    raw = await StateReader(relay.store).one(module, key, fld)
    return None if raw is None else msgspec.json.decode(raw)


async def test_rewritten_datetimes_are_what_is_stored_and_what_the_iop_gets(
    relay_and_iop: tuple[Relay, FakeIop, str],
) -> None:
    relay, iop, base = relay_and_iop
    doc = gireve_location(last_updated="2026-01-01T12:00:00+02:00")
    doc["evses"][0]["last_updated"] = "2026-01-01 09:00:00.123456789Z"
    answer = await _send(base, "PUT", "/locations/FR/AB1/LOC1", doc)
    assert sorted(w["field"] for w in answer["data"]["warnings"] if w["rule"] == "ocpi.datetime_rewritten") == [
        "$.evses[0].last_updated", "$.last_updated"
    ]  # fmt: skip
    patch = {"status": "CHARGING", "last_updated": "2026-01-01T11:00:00+01:00"}
    await _send(base, "PATCH", "/locations/FR/AB1/LOC1/3256", patch)
    await iop.wait_for(lambda: len(iop.delivered()) == 2)
    put, sent = (r.json() for r in iop.delivered())
    assert (put["last_updated"], put["evses"][0]["last_updated"]) == (
        "2026-01-01T10:00:00Z",
        "2026-01-01T09:00:00.1234Z",
    )
    assert sent["last_updated"] == "2026-01-01T10:00:00Z"
    state = await _state(relay, "locations", location_key("FR", "AB1", "LOC1"), "FR:AB1:LOC1")
    assert (state["last_updated"], state["evses"][0]["last_updated"]) == ("2026-01-01T10:00:00Z",) * 2
    assert state["evses"][0]["status"] == "CHARGING"


async def test_a_credit_cdr_is_accepted_stored_and_forwarded(relay_and_iop: tuple[Relay, FakeIop, str]) -> None:
    """S3: "Credit CDRs pass" (GIREVE's cpo_cdrs.md asks CPOs to send them), after the CDR they credit."""
    relay, iop, base = relay_and_iop
    original = cdr(id="CDR-20240305-0042")
    credit = cdr(id="CDR-20240305-0042-CR", credit=True, credit_reference_id="CDR-20240305-0042",
                 total_cost={"excl_vat": -17.6, "incl_vat": -21.12}, last_updated="2024-03-06T09:00:00Z")  # fmt: skip
    await _send(base, "POST", "/cdrs", original)
    answer = await _send(base, "POST", "/cdrs", credit)
    assert answer["data"]["warnings"] is None
    await iop.wait_for(lambda: len(iop.delivered()) == 2)
    assert [(r.method, r.path) for r in iop.delivered()] == [("POST", "/ocpi/2.2.1/cdrs")] * 2
    assert [r.json() for r in iop.delivered()] == [original, credit]  # in order: one key, the session's
    key = session_key("FR", "AB1", "S1")
    assert await _state(relay, "cdrs", key, "FR:AB1:CDR-20240305-0042-CR") == credit
    assert await _state(relay, "cdrs", key, "FR:AB1:CDR-20240305-0042") == original
    # An invalid one is refused, and nothing of it is stored or sent.
    bad = {**credit, "id": "CDR-20240305-0042-CR2"}
    del bad["credit_reference_id"]
    answer = await _send(base, "POST", "/cdrs", bad, status=422)
    assert [(e["field"], e["rule"]) for e in answer["errors"]] == [
        ("$.credit_reference_id", "ocpi.credit_reference_id")
    ]
    assert await _state(relay, "cdrs", key, "FR:AB1:CDR-20240305-0042-CR2") is None
    await stays_false(lambda: len(iop.received) > 2, 0.3)


# -- every typed problem in one answer (issue 18) -----------------------------------------------------------------


def test_every_type_problem_of_a_body_is_named_in_one_answer(settings: Settings) -> None:
    """msgspec's decoder stops at the first error; the 422 names all of them, each at its path."""
    loc = gireve_location()
    loc["name"] = 42
    del loc["coordinates"]["latitude"]
    loc["evses"][0]["status"] = "SLEEPING"
    loc["evses"][0]["connectors"][0]["max_voltage"] = "230"
    loc["publish"] = "yes"
    assert refuse(settings, "PUT", "locations/FR/AB1/LOC1", loc) == [  # in the model's field order
        ("$.publish", "ocpi.type"),
        ("$.name", "ocpi.type"),
        ("$.coordinates.latitude", "ocpi.required"),
        ("$.evses[0].status", "ocpi.type"),
        ("$.evses[0].connectors[0].max_voltage", "ocpi.type"),
    ]


def test_a_body_with_very_many_problems_gets_the_first_fifty(settings: Settings) -> None:
    loc = gireve_location()
    evse = loc["evses"][0]
    loc["evses"] = [dict(evse, status=i) for i in range(200)]
    problems = refuse(settings, "PUT", "locations/FR/AB1/LOC1", loc)
    assert len(problems) == 50 and problems[0] == ("$.evses[0].status", "ocpi.type")


def test_a_patch_names_every_wrong_type_and_asks_for_nothing_absent(settings: Settings) -> None:
    patch = {"status": 1, "floor_level": 2, "last_updated": "2026-01-01T00:00:00Z"}
    assert refuse(settings, "PATCH", "locations/FR/AB1/LOC1/3256", patch) == [
        ("$.status", "ocpi.type"),
        ("$.floor_level", "ocpi.type"),
    ]
