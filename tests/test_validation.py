"""validation.py and rules.py as pure functions: no server, no Redis."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import msgspec
import pytest

from relay import models, rules
from relay.config import Operator, Settings
from relay.errors import InvalidEvent
from relay.models.common import BusinessDetails, decoder
from relay.validation import Target, decode_problem, parse_target, validate
from tests.conftest import example, gireve_location

OP = Operator(country_code="FR", party_id="AB1", emi3_id="FR*AB1", name="Example CPO")
STAMP = "2024-06-01T12:00:00Z"


def enc(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def refusal(fn: Callable[[], object]) -> InvalidEvent:
    with pytest.raises(InvalidEvent) as info:
        fn()
    return info.value


def fields(exc: InvalidEvent) -> list[tuple[str, str]]:
    return [(p.field, p.rule) for p in exc.problems]


# --- parse_target -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("PUT", "locations/FR/AB1/LOC1", Target("locations", "FR", "AB1", "LOC1")),
        ("PATCH", "/locations/FR/AB1/LOC1/3256/", Target("locations", "FR", "AB1", "LOC1", "3256")),
        ("PATCH", "locations/FR/AB1/LOC1/3256/1", Target("locations", "FR", "AB1", "LOC1", "3256", "1")),
        ("PUT", "sessions/FR/AB1/S1", Target("sessions", "FR", "AB1", "S1")),
        ("POST", "cdrs", Target("cdrs")),
        ("DELETE", "tariffs/FR/AB1/T1", Target("tariffs", "FR", "AB1", "T1")),
    ],
)
def test_parse_target(method: str, path: str, expected: Target) -> None:
    assert parse_target(method, path) == expected


def test_parse_target_reads_the_tariff_variant_from_the_query() -> None:
    t = parse_target(
        "DELETE", "tariffs/FR/AB1/T1", {"target_operator_country_code": "NL", "target_operator_party_id": "TNM"}
    )
    assert (t.target_country, t.target_party) == ("NL", "TNM")


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("PUT", "", 404),
        ("PUT", "tokens/FR/AB1/X", 404),
        ("PUT", "locations/FR/AB1", 404),
        ("PUT", "locations/FR/AB1/L/E/C/X", 404),
        ("PUT", "sessions/FR/AB1/S1/extra", 404),
        ("POST", "cdrs/FR", 404),
        ("POST", "locations/FR/AB1/LOC1", 405),
        ("DELETE", "locations/FR/AB1/LOC1", 405),
        ("PATCH", "tariffs/FR/AB1/T1", 405),
        ("PUT", "cdrs", 405),
        ("GET", "sessions/FR/AB1/S1", 405),
    ],
)
def test_parse_target_refuses_routes_and_methods(method: str, path: str, status: int) -> None:
    exc = refusal(lambda: parse_target(method, path))
    assert exc.status == status
    assert fields(exc) == [("url" if status == 404 else "method", "route")]


# --- decode_problem -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "status", "field", "rule"),
    [
        (b"{", 400, "$", "json"),
        (b'{"name": "\xff"}', 400, "$", "json"),
        (b"[]", 422, "$", "ocpi.type"),
        (b'{"name": 1}', 422, "$.name", "ocpi.type"),
        (b"{}", 422, "$.name", "ocpi.required"),
        (b'{"name": "x", "logo": {"url": "https://x.example/l.png"}}', 422, "$.logo.category", "ocpi.required"),
    ],
)
def test_decode_problem(raw: bytes, status: int, field: str, rule: str) -> None:
    with pytest.raises((msgspec.DecodeError, UnicodeDecodeError)) as info:
        msgspec.json.decode(raw, type=BusinessDetails)
    assert isinstance(info.value, msgspec.DecodeError | UnicodeDecodeError)
    exc = decode_problem(info.value)
    assert exc.status == status
    assert fields(exc) == [(field, rule)]


# --- validate ------------------------------------------------------------------------------------------------


def test_validate_builds_the_event(settings: Settings) -> None:
    raw = enc(gireve_location())
    acc = validate(parse_target("PUT", "locations/fr/ab1/LOC1"), "PUT", raw, settings, correlation_id="c-1")
    ev = acc.event
    # owner ids are normalised to the configured operator's spelling
    assert (ev.module, ev.method, ev.country_code, ev.party_id, ev.object_id) == (
        "locations",
        "PUT",
        "FR",
        "AB1",
        "LOC1",
    )
    assert (ev.key, ev.correlation_id, ev.body) == ("loc:FR:AB1:LOC1", "c-1", raw)
    assert [w.rule for w in acc.warnings] == ["gireve.L2.tariff_ids_per_evse"]


def test_validate_cdr_takes_owner_and_id_from_the_body(settings: Settings) -> None:
    doc = example("cdr_example.json", country_code="fr", party_id="ab1", id="CDR9", session_id="S9")
    ev = validate(parse_target("POST", "cdrs"), "POST", enc(doc), settings).event
    assert (ev.country_code, ev.party_id, ev.object_id, ev.key) == ("FR", "AB1", "CDR9", "ses:FR:AB1:S9")
    assert ev.url_path() == ""


def test_validate_delete_keeps_no_body(settings: Settings) -> None:
    target = parse_target("DELETE", "tariffs/FR/AB1/T1")
    ev = validate(target, "DELETE", b"ignored", settings).event
    assert (ev.method, ev.body, ev.key) == ("DELETE", b"", "tar:FR:AB1:T1:*")


def test_validate_unknown_operator_is_404_before_rules(settings: Settings) -> None:
    doc = gireve_location(country_code="DE")
    exc = refusal(lambda: validate(parse_target("PUT", "locations/DE/AB1/LOC1"), "PUT", enc(doc), settings))
    assert exc.status == 404
    assert fields(exc) == [("url.party_id", "operator")]


def test_validate_strict_and_warn_differ_only_on_gireve_rules(make_settings: Callable[..., Settings]) -> None:
    doc = gireve_location()
    del doc["owner"]
    target = parse_target("PUT", "locations/FR/AB1/LOC1")
    strict = refusal(lambda: validate(target, "PUT", enc(doc), make_settings()))
    assert fields(strict) == [("$.owner.name", "gireve.L2.owner_name")]
    acc = validate(target, "PUT", enc(doc), make_settings(RELAY_INGRESS_PROFILE="warn"))
    assert [(w.field, w.rule) for w in acc.warnings] == [
        ("$.owner.name", "gireve.L2.owner_name"),
        ("$.evses[0].connectors[1].tariff_ids", "gireve.L2.tariff_ids_per_evse"),
    ]


def test_validate_session_patch_without_ids_in_body(settings: Settings) -> None:
    acc = validate(
        parse_target("PATCH", "sessions/FR/AB1/S1"), "PATCH", enc({"kwh": 2, "last_updated": STAMP}), settings
    )
    assert acc.event.key == "ses:FR:AB1:S1"
    assert acc.warnings == []


# --- rules on decoded models --------------------------------------------------------------------------------


def _location(**changes: Any) -> models.Location:
    return decoder(models.Location).decode(enc(gireve_location(**changes)))


def test_evse_id_prefixes() -> None:
    assert OP.evse_id_prefixes() == ("FR*AB1*E", "FRAB1E")
    compact = Operator(country_code="FR", party_id="AB1", emi3_id="FRAB1", name="x")
    assert compact.evse_id_prefixes() == ("FR*AB1*E", "FRAB1E")
    default = Operator(country_code="FR", party_id="AB1", name="x")  # emi3_id left out: country_code*party_id
    assert (default.emi3_id, default.evse_id_prefixes()) == ("FR*AB1", ("FR*AB1*E", "FRAB1E"))


@pytest.mark.parametrize(
    ("evse_id", "ok"),
    [
        ("FR*AB1*E041503001", True),
        ("FRAB1E041503001", True),
        ("fr*ab1*e1", True),
        ("FR*AB2*E1", False),
        ("FR*AB1E1", False),
        ("FRAB1*E1", False),
        ("BE*AB1*E1", False),
        ("FR*AB", False),
        ("FR*AB1*X1", False),  # eMI3: the E of an EVSE id
        ("FR*AB1*E", False),  # and at least one character after it
        ("FRAB1E", False),
    ],
)
def test_evse_id_prefix_rule(evse_id: str, ok: bool) -> None:
    evse = decoder(models.Evse).decode(enc({**gireve_location()["evses"][0], "evse_id": evse_id}))
    problems = rules.check_evse(evse, "$", OP)
    assert (problems == []) is ok, problems
    if not ok:
        assert [(p.field, p.rule) for p in problems] == [("$.evse_id", "gireve.L2.evse_id_prefix")]


def test_location_rules_pass_on_the_repo_example() -> None:
    assert rules.check_location(_location(), OP) == []


def test_location_without_evses_has_no_evse_rules() -> None:
    loc = _location(evses=None)
    assert rules.check_location(loc, OP) == []
    assert rules.location_warnings(loc) == []


def test_partial_location_checks_only_what_is_sent() -> None:
    patch = decoder(models.LocationPatch).decode(enc({"name": "x", "last_updated": STAMP}))
    assert rules.check_location(patch, OP, partial=True) == []
    patch = decoder(models.LocationPatch).decode(enc({"operator": {"name": "Op"}, "last_updated": STAMP}))
    assert rules.check_location(patch, OP, partial=True) == []
    # a PATCH that carries whole EVSEs has them checked as whole objects
    evse = {**gireve_location()["evses"][0]}
    del evse["capabilities"]
    patch = decoder(models.LocationPatch).decode(enc({"evses": [evse], "last_updated": STAMP}))
    assert [(p.field, p.rule) for p in rules.check_location(patch, OP, partial=True)] == [
        ("$.evses[0].capabilities", "gireve.L2.capabilities")
    ]


def test_partial_evse_does_not_need_evse_id() -> None:
    patch = decoder(models.EvsePatch).decode(enc({"status": "CHARGING", "last_updated": STAMP}))
    assert rules.check_evse(patch, "$", OP, partial=True) == []
    assert rules.location_warnings(patch) == []


def test_tariff_mismatch_warnings_name_each_differing_connector() -> None:
    doc = gireve_location()["evses"][0]
    doc["connectors"] = [
        {**doc["connectors"][0], "id": str(i), "tariff_ids": t} for i, t in enumerate([["A"], ["A"], ["B"], None])
    ]
    evse = decoder(models.Evse).decode(enc(doc))
    assert [w.field for w in rules.tariff_mismatch_warnings(evse, "$.evses[0]")] == [
        "$.evses[0].connectors[2].tariff_ids",
        "$.evses[0].connectors[3].tariff_ids",
    ]


# Variants of the rules added with GIREVE qualification (empty lists, the E of an EVSE id): (evse, its first connector).
_NEWER_VARIANTS: dict[str, Callable[[dict[str, Any], dict[str, Any]], None]] = {
    "empty capabilities": lambda evse, conn: evse.update(capabilities=[]),
    "empty tariff_ids": lambda evse, conn: conn.update(tariff_ids=[]),
    "removed, empty lists": lambda evse, conn: evse.update(status="REMOVED", capabilities=[],
                                                           connectors=[{**conn, "tariff_ids": []}]),
    "evse_id without E": lambda evse, conn: evse.update(evse_id="FR*AB1*041503001"),
    "evse_id of the prefix alone": lambda evse, conn: evse.update(evse_id="FR*AB1*E"),
    # passes, by the slow path (shorter than the starred prefix, which the fast path asks for)
    "short compact evse_id": lambda evse, conn: evse.update(evse_id="FRAB1E1"),
}  # fmt: skip


def _variant(change: str) -> models.Location:
    """The example Location broken (or not) in one way, for the whole-Location fast path."""
    doc = gireve_location()
    evse, conn = doc["evses"][0], doc["evses"][0]["connectors"][0]
    if change == "no owner":
        del doc["owner"]
    elif change == "no evses":
        del doc["evses"]
    elif change == "empty evses":
        doc["evses"] = []
    elif change == "foreign evse_id":
        evse["evse_id"] = "FR*XYZ*E1"
    elif change == "lower-case evse_id":
        evse["evse_id"] = evse["evse_id"].lower()  # passes, by the slow path's case-insensitive test
    elif change == "no evse_id":
        del evse["evse_id"]
    elif change == "no capabilities":
        del evse["capabilities"]
    elif change == "no tariff_ids":
        del conn["tariff_ids"]
    elif change == "same tariff_ids":
        for c in evse["connectors"]:
            c["tariff_ids"] = conn["tariff_ids"]
    elif change == "three differing":
        evse["connectors"] = [{**conn, "id": str(i), "tariff_ids": [f"T{i}"]} for i in range(3)]
    elif change in _NEWER_VARIANTS:
        _NEWER_VARIANTS[change](evse, conn)
    return decoder(models.Location).decode(enc(doc))


@pytest.mark.parametrize(
    "change",
    ["none", "no owner", "no evses", "empty evses", "foreign evse_id", "lower-case evse_id", "no evse_id",
     "no capabilities", "no tariff_ids", "same tariff_ids", "three differing", "empty capabilities",
     "empty tariff_ids", "removed, empty lists", "evse_id without E", "evse_id of the prefix alone",
     "short compact evse_id"],
)  # fmt: skip
def test_check_whole_location_is_check_location_and_location_warnings(change: str) -> None:
    loc = _variant(change)
    assert rules.check_whole_location(loc, OP) == (rules.check_location(loc, OP), rules.location_warnings(loc))


@pytest.mark.parametrize(
    ("cc", "pid", "problem"),
    [
        (None, None, None),
        ("NL", "TNM", None),
        ("NL", None, "$.target_operator_party_id"),
        (None, "TNM", "$.target_operator_country_code"),
    ],
)
def test_tariff_target_pair(cc: str | None, pid: str | None, problem: str | None) -> None:
    doc = example("tariff_1_simple_2hour.json", target_operator_country_code=cc, target_operator_party_id=pid)
    tariff = decoder(models.Tariff).decode(enc(doc))
    assert [p.field for p in rules.check_tariff_target(tariff)] == ([problem] if problem else [])


def test_tariff_start_date_time() -> None:
    doc = example("tariff_1_simple_2hour.json")
    assert [p.rule for p in rules.check_tariff(decoder(models.Tariff).decode(enc(doc)))] == [
        "gireve.F2.start_date_time"
    ]
    doc["start_date_time"] = STAMP
    assert rules.check_tariff(decoder(models.Tariff).decode(enc(doc))) == []
