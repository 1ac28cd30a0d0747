"""The merge rules of the state store (relay.state), as pure functions: no Redis, no HTTP.

OCPI: a PUT replaces, a PATCH replaces the fields it names. As the receivers GIREVE talks to do:
EVSEs and Connectors named in a PATCH are merged by ``uid`` / ``id``, a Session PATCH appends its
``charging_periods``, and a child's ``last_updated`` moves its parents' (never backwards).
"""

from __future__ import annotations

import copy
from typing import Any

import msgspec
import pytest

from relay.config import Settings
from relay.events import Event, Method
from relay.state import Change, apply, location, merge, session, state_field
from relay.validation import parse_target, validate
from tests.conftest import example, gireve_location

T0 = "2015-06-29T20:39:09Z"  # examples/location.json's last_updated


def conn(cid: str, stamp: str = "2020-01-01T00:00:00Z", **changes: Any) -> dict[str, Any]:
    doc = {
        "id": cid,
        "standard": "IEC_62196_T2",
        "format": "SOCKET",
        "power_type": "AC_3_PHASE",
        "max_voltage": 230,
        "max_amperage": 32,
        "tariff_ids": ["11"],
        "last_updated": stamp,
    }
    doc.update(changes)
    return doc


def evse(uid: str, stamp: str = "2020-01-01T00:00:00Z", **changes: Any) -> dict[str, Any]:
    doc = {
        "uid": uid,
        "evse_id": f"FR*AB1*E{uid}",
        "status": "AVAILABLE",
        "capabilities": ["RFID_READER"],
        "connectors": [conn("1", stamp)],
        "last_updated": stamp,
    }
    doc.update(changes)
    return doc


def evse_of(loc: dict[str, Any], uid: str) -> dict[str, Any]:
    found: dict[str, Any] = next(e for e in loc["evses"] if e["uid"] == uid)
    return found


def conn_of(loc: dict[str, Any], uid: str, cid: str) -> dict[str, Any]:
    found: dict[str, Any] = next(c for c in evse_of(loc, uid)["connectors"] if c["id"] == cid)
    return found


def doc_of(change: Change) -> dict[str, Any]:
    assert change.doc is not None and not change.unknown, change
    return change.doc


# -- Locations -----------------------------------------------------------------------------------


def test_location_put_replaces_whatever_was_there() -> None:
    old = gireve_location(name="old", facilities=["CAFE"])
    new = gireve_location(name="new")
    assert doc_of(location(old, new, "PUT", None, None)) == new
    assert doc_of(location(None, new, "PUT", None, None)) == new  # a PUT creates


def test_location_patch_replaces_named_fields_only() -> None:
    cur = gireve_location()
    patch = {"name": "Renamed", "publish": False, "last_updated": "2021-01-01T00:00:00Z"}
    out = doc_of(location(cur, patch, "PATCH", None, None))
    assert out == {**cur, **patch}


def test_location_patch_merges_evses_by_uid_and_connectors_by_id() -> None:
    cur = gireve_location()
    stamp = "2021-02-02T00:00:00Z"
    patch = {
        "evses": [
            # known EVSE: status changes, connector 2 changes one field, connector 3 is new
            {"uid": "3256", "status": "CHARGING", "connectors": [{"id": "2", "max_amperage": 63}, conn("3", stamp)]},
            evse("9999", stamp),  # new EVSE: appended
        ],
        "last_updated": stamp,
    }
    out = doc_of(location(cur, patch, "PATCH", None, None))
    assert [e["uid"] for e in out["evses"]] == ["3256", "3257", "9999"]
    e = evse_of(out, "3256")
    assert e["status"] == "CHARGING" and e["evse_id"] == "FR*AB1*E041503001"  # untouched fields stay
    assert [c["id"] for c in e["connectors"]] == ["1", "2", "3"]
    assert conn_of(out, "3256", "1") == cur["evses"][0]["connectors"][0]
    assert conn_of(out, "3256", "2") == {**cur["evses"][0]["connectors"][1], "max_amperage": 63}
    assert conn_of(out, "3256", "3") == conn("3", stamp)
    assert evse_of(out, "3257") == cur["evses"][1]
    assert evse_of(out, "9999") == evse("9999", stamp)
    assert out["last_updated"] == stamp


def test_evse_put_adds_or_replaces_and_moves_the_location() -> None:
    cur = gireve_location()
    stamp = "2021-03-03T00:00:00Z"
    added = doc_of(location(cur, evse("4000", stamp), "PUT", "4000", None))
    assert [e["uid"] for e in added["evses"]] == ["3256", "3257", "4000"]
    assert added["last_updated"] == stamp
    replaced = doc_of(location(cur, evse("3257", stamp, status="BLOCKED"), "PUT", "3257", None))
    assert evse_of(replaced, "3257") == evse("3257", stamp, status="BLOCKED")  # replaced, not merged
    assert len(replaced["evses"]) == 2 and replaced["last_updated"] == stamp


def test_evse_patch_merges_fields_and_connectors() -> None:
    cur = gireve_location()
    stamp = "2021-04-04T00:00:00Z"
    patch = {"status": "OUTOFORDER", "connectors": [{"id": "1", "max_voltage": 400}], "last_updated": stamp}
    out = doc_of(location(cur, patch, "PATCH", "3256", None))
    e = evse_of(out, "3256")
    assert e["status"] == "OUTOFORDER" and e["last_updated"] == stamp
    assert conn_of(out, "3256", "1") == {**cur["evses"][0]["connectors"][0], "max_voltage": 400}
    assert conn_of(out, "3256", "2") == cur["evses"][0]["connectors"][1]
    assert out["last_updated"] == stamp
    assert evse_of(out, "3257") == cur["evses"][1]


def test_connector_put_and_patch_move_evse_and_location() -> None:
    cur = gireve_location()
    s1, s2 = "2021-05-05T00:00:00Z", "2021-06-06T00:00:00Z"
    put = doc_of(location(cur, conn("7", s1), "PUT", "3257", "7"))
    assert [c["id"] for c in evse_of(put, "3257")["connectors"]] == ["1", "7"]
    assert evse_of(put, "3257")["last_updated"] == s1 and put["last_updated"] == s1
    assert evse_of(put, "3256")["last_updated"] == cur["evses"][0]["last_updated"]  # the sibling stays
    patched = doc_of(location(put, {"max_amperage": 10, "last_updated": s2}, "PATCH", "3257", "7"))
    assert conn_of(patched, "3257", "7") == conn("7", s2, max_amperage=10)
    assert evse_of(patched, "3257")["last_updated"] == s2 and patched["last_updated"] == s2


def test_a_child_with_an_older_stamp_does_not_move_its_parents_back() -> None:
    cur = gireve_location()  # location and EVSE 3257 at T0
    old = "2015-01-01T00:00:00Z"
    out = doc_of(location(cur, {"status": "BLOCKED", "last_updated": old}, "PATCH", "3257", None))
    assert evse_of(out, "3257")["last_updated"] == old  # the EVSE itself takes what it was sent
    assert out["last_updated"] == T0


def test_timestamps_without_designator_are_utc_when_comparing() -> None:
    # OCPI: no designator means UTC. A naive stamp must still compare with an aware one.
    cur = gireve_location(last_updated="2021-01-01T12:00:00Z")
    out = doc_of(location(cur, {"status": "BLOCKED", "last_updated": "2020-01-01T00:00:00"}, "PATCH", "3257", None))
    assert out["last_updated"] == "2021-01-01T12:00:00Z"
    out = doc_of(location(cur, {"status": "BLOCKED", "last_updated": "2022-01-01T00:00:00"}, "PATCH", "3257", None))
    assert out["last_updated"] == "2022-01-01T00:00:00"


@pytest.mark.parametrize(
    ("current", "method", "evse_uid", "connector_id"),
    [
        (None, "PATCH", None, None),  # a Location never seen
        (None, "PUT", "3256", None),  # an EVSE of a Location never seen
        (None, "PATCH", "3256", "1"),
        ("loc", "PATCH", "0000", None),  # an EVSE never seen
        ("loc", "PUT", "0000", "1"),  # a Connector of an EVSE never seen
        ("loc", "PATCH", "3256", "9"),  # a Connector never seen
    ],
)
def test_unknown_objects_leave_no_state(current: str | None, method: str, evse_uid: str | None,
                                        connector_id: str | None) -> None:  # fmt: skip
    cur = gireve_location() if current else None
    before = copy.deepcopy(cur)
    change = location(cur, {"status": "BLOCKED", "last_updated": "2021-01-01T00:00:00Z"}, method, evse_uid,
                      connector_id)  # fmt: skip
    assert change == Change(None, unknown=True)
    assert cur == before


def test_merges_never_change_their_inputs() -> None:
    cur = gireve_location()
    frozen = copy.deepcopy(cur)
    patch = {"evses": [{"uid": "3256", "connectors": [{"id": "1", "max_voltage": 1}]}], "last_updated": T0}
    frozen_patch = copy.deepcopy(patch)
    location(cur, patch, "PATCH", None, None)
    location(cur, {"status": "BLOCKED", "last_updated": T0}, "PATCH", "3256", None)
    location(cur, {"max_voltage": 2, "last_updated": T0}, "PATCH", "3256", "2")
    location(cur, conn("5"), "PUT", "3256", "5")
    assert cur == frozen and patch == frozen_patch


def test_merge_without_nesting_replaces_lists() -> None:
    assert merge({"a": [1, 2], "b": 1}, {"a": [3]}) == {"a": [3], "b": 1}


# -- Sessions ------------------------------------------------------------------------------------


def _period(start: str, kwh: float) -> dict[str, Any]:
    return {"start_date_time": start, "dimensions": [{"type": "ENERGY", "volume": kwh}]}


def test_session_put_replaces_and_patch_appends_charging_periods() -> None:
    cur = example("session_example_2_short_finished.json")
    assert doc_of(session({"id": "x"}, cur, "PUT")) == cur
    p1 = _period("2015-06-29T23:55:00Z", 1.5)
    out = doc_of(session(cur, {"charging_periods": [p1], "kwh": 50.0, "last_updated": "2015-06-30T00:00:00Z"},
                         "PATCH"))  # fmt: skip
    assert out["charging_periods"] == [*cur["charging_periods"], p1]
    assert out["kwh"] == 50.0 and out["last_updated"] == "2015-06-30T00:00:00Z"
    assert {k: v for k, v in out.items() if k not in ("charging_periods", "kwh", "last_updated")} == {
        k: v for k, v in cur.items() if k not in ("charging_periods", "kwh", "last_updated")
    }
    # An empty or omitted list changes nothing (OCPI mod_sessions PATCH).
    same = doc_of(session(out, {"charging_periods": [], "last_updated": "2015-06-30T00:01:00Z"}, "PATCH"))
    assert same["charging_periods"] == out["charging_periods"]
    first = doc_of(session({**cur, "charging_periods": None}, {"charging_periods": [p1], "last_updated": T0},
                           "PATCH"))  # fmt: skip
    assert first["charging_periods"] == [p1]


def test_session_patch_of_an_unknown_session() -> None:
    assert session(None, {"kwh": 1.0, "last_updated": T0}, "PATCH") == Change(None, unknown=True)


# -- dispatch ------------------------------------------------------------------------------------


def test_apply_dispatches_by_module() -> None:
    tariff = example("tariff_1_simple_2hour.json")
    cdr = example("cdr_example.json")
    assert apply("tariffs", {"old": 1}, tariff, "PUT") == Change(tariff)
    assert apply("cdrs", None, cdr, "POST") == Change(cdr)
    assert apply("tariffs", tariff, None, "DELETE") == Change(None)
    assert apply("sessions", None, {"kwh": 1, "last_updated": T0}, "PATCH").unknown
    assert apply("locations", gireve_location(), {"status": "BLOCKED", "last_updated": T0}, "PATCH", "3256").doc


# -- where an object lives -----------------------------------------------------------------------


def _event(settings: Settings, method: Method, path: str, body: dict[str, Any] | None = None,
           query: dict[str, str] | None = None) -> Event:  # fmt: skip
    raw = msgspec.json.encode(body) if body is not None else b""
    return validate(parse_target(method, path, query), method, raw, settings).event


def test_state_field_names_the_whole_object_and_each_tariff_variant(settings: Settings) -> None:
    loc = gireve_location()
    assert state_field(_event(settings, "PUT", "locations/FR/AB1/LOC1", loc)) == ("FR:AB1:LOC1", "LOC1")
    # an EVSE or Connector event updates its Location's state
    assert state_field(_event(settings, "PATCH", "locations/FR/AB1/LOC1/3256/1", {"last_updated": T0})) == (
        "FR:AB1:LOC1",
        "LOC1",
    )
    tariff = example("tariff_1_simple_2hour.json", country_code="FR", party_id="AB1", id="T1", start_date_time=T0)
    default = state_field(_event(settings, "PUT", "tariffs/FR/AB1/T1", tariff))
    targeted = state_field(
        _event(settings, "PUT", "tariffs/FR/AB1/T1",
               {**tariff, "target_operator_country_code": "DE", "target_operator_party_id": "MP1"})
    )  # fmt: skip
    deleted = state_field(_event(settings, "DELETE", "tariffs/FR/AB1/T1"))  # a DELETE names the default (F1)
    assert default == deleted == ("FR:AB1:T1:*", "T1:*")
    assert targeted == ("FR:AB1:T1:DE:MP1", "T1:DE:MP1")
    cdr = example("cdr_example.json", country_code="FR", party_id="AB1", id="C1")
    assert state_field(_event(settings, "POST", "cdrs", cdr)) == ("FR:AB1:C1", "C1")
