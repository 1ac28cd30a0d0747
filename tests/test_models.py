"""The OCPI 2.2.1 models against every spec example of their kind, our own fixtures, and broken input.

The spec's examples come from the reference copy of the spec: ``$RELAY_REFERENCE_DIR/ocpi-2.2.1/examples``
(the variable names the directory holding ``ocpi-2.2.1/``), else ``<repo>/../shared/reference``. A clone on
its own has neither: the tests of the spec's examples are skipped (pytest says why), unless
``RELAY_REFERENCE_DIR`` is set, when a wrong path fails them. Everything else, the broken-input tests
included, runs on the project's own objects in ``tests/data``, named after the spec example each stands in for.
"""

from __future__ import annotations

import datetime
from typing import Any, NamedTuple

import msgspec
import pytest

from relay.models import (
    Cdr,
    Connector,
    ConnectorPatch,
    Evse,
    EvsePatch,
    Location,
    LocationPatch,
    Session,
    SessionPatch,
    Tariff,
)
from relay.models.common import (
    INSTANT,
    DisplayText,
    EnergyMix,
    GeoLocation,
    decoder,
    instant_plan,
)
from relay.models.locations import Hours, RegularHours
from relay.models.tariffs import TariffRestrictions
from relay.timestamps import NOT_OCPI_DATETIME
from tests.conftest import DATA, SPEC_DIR, needs_spec_examples


class Example(NamedTuple):
    """How to read one example file."""

    type: type[msgspec.Struct]
    wrapper: str | None = None  # the file nests the object under this single key, e.g. {"energy_mix": {...}}


# Every example of the modules the relay carries, by file name (our fixtures in tests/data use the same names).
# The PATCH URLs in mod_locations.asciidoc tell which level each location_patch_* example addresses.
EXAMPLES: dict[str, Example] = {
    "cdr_example.json": Example(Cdr),
    "location_example.json": Example(Location),
    "location_example_parking_garage_opening_hours.json": Example(Location),
    "location_example_uc2_destination_charger.json": Example(Location),
    "location_example_uc3_destination_charger_not_published.json": Example(Location),
    "location_example_uc4_limited_visibility.json": Example(Location),
    "location_example_uc5_home_charge_point.json": Example(Location),
    "location_energymix_example_complete.json": Example(EnergyMix, "energy_mix"),
    "location_energymix_example_energy_provider.json": Example(EnergyMix, "energy_mix"),
    "location_energymix_example_simple.json": Example(EnergyMix, "energy_mix"),
    "location_hours_247_open_exception_closing.json": Example(Hours),
    "location_hours_opening_hours_with_exceptional_closing.json": Example(Hours),
    "location_hours_opening_hours_with_exceptional_opening.json": Example(Hours),
    "location_regularhours_example.json": Example(Hours, "opening_times"),
    "location_patch_example_location.json": Example(LocationPatch),  # PATCH .../locations/NL/TNM/1012
    "location_patch_example_remove_evse.json": Example(EvsePatch),  # PATCH .../1012/3256
    "location_patch_example_status.json": Example(EvsePatch),  # PATCH .../1012/3255
    "location_patch_example_tariff.json": Example(ConnectorPatch),  # PATCH .../1012/3255/2
    "session_example_1_simple_start.json": Example(Session),
    "session_example_2_short_finished.json": Example(Session),
    "session_patch_example_charging_period.json": Example(SessionPatch),
    "session_patch_example_total_cost.json": Example(SessionPatch),
    "tariff_1_simple_2hour.json": Example(Tariff),
    "tariff_2_alt_text.json": Example(Tariff),
    "tariff_3_alt_url.json": Example(Tariff),
    "tariff_4_complex.json": Example(Tariff),
    "tariff_5_free_of_charge.json": Example(Tariff),
    "tariff_6_025kwh_start_max_price.json": Example(Tariff),
    "tariff_8_simple_025kwh.json": Example(Tariff),
    "tariff_9_025kwh_start.json": Example(Tariff),
    "tariff_10_025kwh_parking_start.json": Example(Tariff),
    "tariff_11_not_possible_alt_text.json": Example(Tariff),
    "tariff_12_025kwh_min_price.json": Example(Tariff),
    "tariff_13_simple_3hour_5parking.json": Example(Tariff),
    "tariff_14_step_size.json": Example(Tariff),
    "tariff_15_reservation_5_euro_per_hour.json": Example(Tariff),
    "tariff_16_reservation_2_euro_fee_5_euro_per_hour.json": Example(Tariff),
    "tariff_17_reservation_with_expire_fee.json": Example(Tariff),
    "tariff_18_reservation_with_expire_time.json": Example(Tariff),
    "tariffrestriction_example_max_duration.json": Example(Tariff),
    "tariffrestriction_example_max_power.json": Example(Tariff),
    "type_displaytext_example.json": Example(DisplayText),
}

# Examples that contradict the spec's own object tables, where the table is the intent: the models
# follow the table and these examples must keep failing, with this error.
INVALID_EXAMPLES: dict[str, tuple[type[msgspec.Struct], str]] = {
    # Tariff.last_updated has cardinality 1; the PUT example omits it. OCPI treated the same omission in
    # another tariff example as an example bug (ocpi/ocpi#300).
    "tariff_put_example.json": (Tariff, "Object missing required field `last_updated`"),
    # The "add an EVSE" text says to send the full object "including all its required fields", yet its
    # connector lacks power_type, max_voltage, max_amperage and last_updated, "floor" is no EVSE field
    # (floor_level is) and physical_reference is a number where the table says string(16).
    "location_put_example_add_evse.json": (Evse, "Object missing required field `power_type` - at `$.connectors[0]`"),
}

# Files of the modules the relay carries must be classified above; other modules' examples are not ours.
IN_SCOPE_PREFIXES = ("location", "session", "cdr", "tariff", "type_")
OUT_OF_SCOPE_PREFIXES = ("credentials_", "token_", "transport_and_format_", "version_details_", "versions_")

PATCH_TYPES: tuple[type[msgspec.Struct], ...] = (LocationPatch, EvsePatch, ConnectorPatch, SessionPatch)


def _read(name: str) -> bytes:
    """One of the spec's examples."""
    return (SPEC_DIR / name).read_bytes()


def _unwrap(raw: bytes, wrapper: str | None) -> bytes:
    if wrapper is None:
        return raw
    outer = msgspec.json.decode(raw, type=dict[str, msgspec.Raw])
    assert list(outer) == [wrapper]
    return bytes(outer[wrapper])


def _example_json(name: str) -> dict[str, Any]:
    """One of our fixtures (tests/data) as plain JSON, to be broken by a negative test."""
    doc = msgspec.json.decode((DATA / name).read_bytes())
    assert isinstance(doc, dict)
    return doc


def _set(doc: Any, path: list[str | int], value: Any) -> None:
    for step in path[:-1]:
        doc = doc[step]
    doc[path[-1]] = value


def _json_path(path: list[str | int]) -> str:
    return "$" + "".join(f"[{step}]" if isinstance(step, int) else f".{step}" for step in path)


def _decode(doc: Any, type_: type[msgspec.Struct]) -> msgspec.Struct:
    return decoder(type_).decode(msgspec.json.encode(doc))


def _assert_round_trips(raw: bytes, example: Example) -> None:
    raw = _unwrap(raw, example.wrapper)
    obj = decoder(example.type).decode(raw)
    encoded = msgspec.json.encode(obj)
    assert decoder(example.type).decode(encoded) == obj
    # Unknown fields are ignored, so a misspelt field name would drop data silently: the re-encoded
    # JSON must carry every value of the example (numbers compare equal whether int or float).
    assert msgspec.json.decode(encoded) == msgspec.json.decode(raw)


# --- the spec's examples -------------------------------------------------------------------------------------------


@needs_spec_examples
def test_examples_dir_exists() -> None:
    assert SPEC_DIR.is_dir(), f"OCPI examples not found at {SPEC_DIR} (set RELAY_REFERENCE_DIR)"


@needs_spec_examples
def test_every_example_is_classified() -> None:
    names = sorted(p.name for p in SPEC_DIR.glob("*.json"))
    assert names, f"no examples in {SPEC_DIR}"
    unclassified = [
        n for n in names if n not in EXAMPLES and n not in INVALID_EXAMPLES and not n.startswith(OUT_OF_SCOPE_PREFIXES)
    ]
    assert not unclassified, f"map {unclassified} to a model in EXAMPLES (or INVALID_EXAMPLES, with a reason)"
    assert all(n.startswith(IN_SCOPE_PREFIXES) for n in [*EXAMPLES, *INVALID_EXAMPLES])
    missing = sorted(n for n in [*EXAMPLES, *INVALID_EXAMPLES] if n not in names)
    assert not missing, f"{missing} are mapped but no longer in the reference"


@needs_spec_examples
@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_decodes_and_round_trips(name: str) -> None:
    _assert_round_trips(_read(name), EXAMPLES[name])


@needs_spec_examples
@pytest.mark.parametrize("name", sorted(INVALID_EXAMPLES))
def test_example_contradicting_its_table_is_refused(name: str) -> None:
    type_, message = INVALID_EXAMPLES[name]
    with pytest.raises(msgspec.ValidationError) as exc:
        decoder(type_).decode(_read(name))
    assert str(exc.value) == message


# --- our fixtures --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(p.name for p in DATA.glob("*.json")))
def test_fixture_decodes_and_round_trips(name: str) -> None:
    assert name in EXAMPLES, f"{name}: name a fixture after the spec example it stands in for"
    _assert_round_trips((DATA / name).read_bytes(), EXAMPLES[name])


# --- refused input: each error names the field path ----------------------------------------------------------------


def _refused(doc: Any, type_: type[msgspec.Struct]) -> str:
    with pytest.raises(msgspec.ValidationError) as exc:
        _decode(doc, type_)
    return str(exc.value)


def test_wrong_enum_value() -> None:
    loc = _example_json("location_example.json")
    loc["evses"][0]["status"] = "BROKEN"
    assert _refused(loc, Location) == "Invalid enum value 'BROKEN' - at `$.evses[0].status`"


def test_wrong_enum_value_in_a_patch() -> None:
    patch = {"status": "available", "last_updated": "2019-06-24T12:39:09Z"}  # enums are case sensitive
    assert _refused(patch, EvsePatch) == "Invalid enum value 'available' - at `$.status`"


def test_wrong_enum_value_deep_in_a_cdr() -> None:
    cdr = _example_json("cdr_example.json")
    cdr["tariffs"][0]["elements"][0]["price_components"][0]["type"] = "KWH"
    assert _refused(cdr, Cdr) == "Invalid enum value 'KWH' - at `$.tariffs[0].elements[0].price_components[0].type`"


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (["country_code"], "BEL", "Expected `str` of length <= 2 - at `$.country_code`"),
        (["party_id"], "BECH", "Expected `str` of length <= 3 - at `$.party_id`"),
        (["id"], "L" * 37, "Expected `str` of length <= 36 - at `$.id`"),
        (["evses", 0, "evse_id"], "E" * 49, "Expected `str` of length <= 48 - at `$.evses[0].evse_id`"),
        (
            ["evses", 0, "connectors", 1, "tariff_ids", 0],
            "T" * 37,
            "Expected `str` of length <= 36 - at `$.evses[0].connectors[1].tariff_ids[0]`",
        ),
        (["address"], "a" * 256, "Expected `str` of length <= 255 - at `$.address`"),
        (["operator", "name"], "n" * 101, "Expected `str` of length <= 100 - at `$.operator.name`"),
    ],
)
def test_too_long_string(path: list[str | int], value: str, message: str) -> None:
    loc = _example_json("location_example.json")
    _set(loc, path, value)
    assert _refused(loc, Location) == message


def test_lengths_at_the_limit_are_accepted() -> None:
    loc = _example_json("location_example.json")
    loc["id"] = "L" * 36
    loc["address"] = "a" * 255
    assert _decode(loc, Location) == decoder(Location).decode(msgspec.json.encode(loc))


def test_missing_required_field() -> None:
    loc = _example_json("location_example.json")
    del loc["id"]
    assert _refused(loc, Location) == "Object missing required field `id`"


def test_missing_required_nested_field() -> None:
    loc = _example_json("location_example.json")
    del loc["evses"][1]["connectors"][0]["max_amperage"]
    assert _refused(loc, Location) == "Object missing required field `max_amperage` - at `$.evses[1].connectors[0]`"


def test_missing_required_field_in_session_and_cdr() -> None:
    session = _example_json("session_example_1_simple_start.json")
    del session["cdr_token"]["contract_id"]
    assert _refused(session, Session) == "Object missing required field `contract_id` - at `$.cdr_token`"
    cdr = _example_json("cdr_example.json")
    del cdr["cdr_location"]["evse_id"]
    assert _refused(cdr, Cdr) == "Object missing required field `evse_id` - at `$.cdr_location`"


@pytest.mark.parametrize(
    ("type_", "name", "path"),
    [
        (Location, "location_example.json", ["evses", 0, "connectors"]),
        (Tariff, "tariff_1_simple_2hour.json", ["elements"]),
        (Tariff, "tariff_1_simple_2hour.json", ["elements", 0, "price_components"]),
        (Cdr, "cdr_example.json", ["charging_periods"]),
        (Cdr, "cdr_example.json", ["charging_periods", 0, "dimensions"]),
        (Session, "session_example_2_short_finished.json", ["charging_periods", 1, "dimensions"]),
    ],
)
def test_empty_one_or_more_list(type_: type[msgspec.Struct], name: str, path: list[str | int]) -> None:
    doc = _example_json(name)
    _set(doc, path, [])
    assert _refused(doc, type_) == f"Expected `array` of length >= 1 - at `{_json_path(path)}`"


# Every DateTime field is an Instant: only OCPI's own form decodes. The ingress rewrites the RFC 3339 forms it can
# convert before decoding (tests/test_validation.py); anything else names the field.
@pytest.mark.parametrize(
    "value",
    ["2015-06-29 20:39", "2015-02-30T10:00:00Z", "yesterday", "", "2015-06-29T25:00:00Z", "2015-06-29T22:39:09+02:00",
     "2015-06-29T20:39:09+00:00", "2015-06-29 20:39:09Z", "2015-06-29T20:39:09z", "2015-06-29T20:39:09.12345Z",
     "2015-06-29T20:39:09.Z", "2015-W27-1T20:39:09", "2015-06-29T20:39:9Z", "２015-06-29T20:39:09Z"],
)  # fmt: skip
def test_bad_datetime(value: str) -> None:
    loc = _example_json("location_example.json")
    loc["last_updated"] = value
    assert _refused(loc, Location) == f"{NOT_OCPI_DATETIME} - at `$.last_updated`"


def test_bad_datetime_nested() -> None:
    session = _example_json("session_example_2_short_finished.json")
    session["charging_periods"][2]["start_date_time"] = "29/06/2015"
    assert _refused(session, Session) == f"{NOT_OCPI_DATETIME} - at `$.charging_periods[2].start_date_time`"


@pytest.mark.parametrize(("value", "name"), [(None, "null"), (1435610349, "int"), ({}, "object"), ([], "array")])
def test_datetime_of_another_json_type(value: Any, name: str) -> None:
    loc = _example_json("location_example.json")
    loc["evses"][0]["last_updated"] = value
    assert _refused(loc, Location) == f"Expected `str` (an OCPI DateTime), got `{name}` - at `$.evses[0].last_updated`"


def test_the_plan_of_datetimes_names_every_datetime_field() -> None:
    """The slow path rewrites the fields this plan names: read from the types, it names all of them."""
    plan = instant_plan(Cdr)
    assert plan["start_date_time"] == plan["end_date_time"] == plan["last_updated"] == INSTANT
    assert plan["charging_periods"] == {"start_date_time": INSTANT}
    assert plan["tariffs"] == {"start_date_time": INSTANT, "end_date_time": INSTANT, "last_updated": INSTANT}
    assert "cdr_token" not in plan
    loc = instant_plan(Location)
    assert loc["evses"]["status_schedule"] == {"period_begin": INSTANT, "period_end": INSTANT}
    assert loc["evses"]["connectors"] == {"last_updated": INSTANT}
    assert loc["opening_times"] == {
        "exceptional_openings": {"period_begin": INSTANT, "period_end": INSTANT},
        "exceptional_closings": {"period_begin": INSTANT, "period_end": INSTANT},
    }
    assert instant_plan(SessionPatch)["charging_periods"] == {"start_date_time": INSTANT}


@pytest.mark.parametrize("type_", PATCH_TYPES)
def test_patch_without_last_updated(type_: type[msgspec.Struct]) -> None:
    assert _refused({}, type_) == "Object missing required field `last_updated`"


@needs_spec_examples
@pytest.mark.parametrize("name", sorted(n for n, e in EXAMPLES.items() if e.type in PATCH_TYPES))
def test_patch_example_without_last_updated(name: str) -> None:
    doc = msgspec.json.decode(_read(name))
    del doc["last_updated"]
    assert _refused(doc, EXAMPLES[name].type) == "Object missing required field `last_updated`"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("latitude", "51.04"),  # fewer than 5 decimals
        ("latitude", "151.047599"),  # 3 integer digits
        ("latitude", "51,047599"),  # decimal comma
        ("latitude", "51.047599x"),  # the pattern must cover the whole string
        ("latitude", " 51.047599"),
        ("longitude", "1003.729944"),
        ("longitude", "3.72994412"),  # more than 7 decimals
    ],
)
def test_bad_coordinates(field: str, value: str) -> None:
    loc = _example_json("location_example.json")
    loc["coordinates"][field] = value
    message = _refused(loc, Location)
    assert message.startswith("Expected `str`")
    assert message.endswith(f" - at `$.coordinates.{field}`")


@pytest.mark.parametrize(
    ("lat", "lon"),
    [
        ("0.12345", "7.12345"),
        ("-1.1234567", "123.1234567"),
        # 11 and 12 characters: past string(10)/string(11), but what the spec's regex (and its advice of
        # 7 decimals) allows for negative coordinates.
        ("-33.8688197", "-122.4194155"),
    ],
)
def test_good_coordinates(lat: str, lon: str) -> None:
    assert _decode({"latitude": lat, "longitude": lon}, GeoLocation) == GeoLocation(latitude=lat, longitude=lon)


def test_bad_coordinates_in_cdr_and_evse() -> None:
    cdr = _example_json("cdr_example.json")
    cdr["cdr_location"]["coordinates"]["latitude"] = "3.7"
    assert _refused(cdr, Cdr).endswith(" - at `$.cdr_location.coordinates.latitude`")
    loc = _example_json("location_example.json")
    loc["evses"][0]["coordinates"] = {"latitude": "51.047599", "longitude": "3"}
    assert _refused(loc, Location).endswith(" - at `$.evses[0].coordinates.longitude`")


@pytest.mark.parametrize("value", ["24:00", "7:00", "07:60", "07:00:00", "0700"])
def test_bad_time_of_day(value: str) -> None:
    hours = _example_json("location_hours_opening_hours_with_exceptional_closing.json")
    hours["regular_hours"][1]["period_end"] = value
    assert _refused(hours, Hours).endswith(" - at `$.regular_hours[1].period_end`")
    restrictions = {"start_time": value}
    assert _refused(restrictions, TariffRestrictions).endswith(" - at `$.start_time`")


@pytest.mark.parametrize("value", ["2015-13-01", "2015-12-32", "15-12-24", "2015-12-24T00:00:00Z", "3015-12-24"])
def test_bad_tariff_date(value: str) -> None:
    tariff = _example_json("tariff_4_complex.json")
    tariff["elements"][1]["restrictions"]["start_date"] = value
    assert _refused(tariff, Tariff).endswith(" - at `$.elements[1].restrictions.start_date`")


@pytest.mark.parametrize("weekday", [0, 8])
def test_weekday_out_of_range(weekday: int) -> None:
    message = _refused({"weekday": weekday, "period_begin": "08:00", "period_end": "20:00"}, RegularHours)
    assert message.endswith(" - at `$.weekday`")


def test_wrong_json_type() -> None:
    session = _example_json("session_example_1_simple_start.json")
    session["kwh"] = "12.5"
    assert _refused(session, Session) == "Expected `float`, got `str` - at `$.kwh`"
    loc = _example_json("location_example.json")
    loc["evses"][0]["connectors"][0]["max_voltage"] = 220.5
    assert _refused(loc, Location) == "Expected `int`, got `float` - at `$.evses[0].connectors[0].max_voltage`"


# --- PATCH bodies --------------------------------------------------------------------------------------------------


def test_patch_keeps_absent_fields_unset_and_does_not_send_them() -> None:
    patch = decoder(LocationPatch).decode((DATA / "location_patch_example_location.json").read_bytes())
    assert patch.name == "Parking Part-Dieu Villette (P2)"
    assert patch.address is msgspec.UNSET
    assert patch.evses is msgspec.UNSET
    assert msgspec.json.encode(patch) == (
        b'{"name":"Parking Part-Dieu Villette (P2)","last_updated":"2024-03-06T07:15:00Z"}'
    )


def test_patch_nested_objects_are_whole_objects() -> None:
    evse = _example_json("location_example.json")["evses"][0]
    patch = {"evses": [evse], "last_updated": "2019-06-24T12:39:09Z"}
    decoded = _decode(patch, LocationPatch)
    assert isinstance(decoded, LocationPatch)
    assert isinstance(decoded.evses, list)
    assert isinstance(decoded.evses[0], Evse)
    del evse["status"]
    assert _refused(patch, LocationPatch) == "Object missing required field `status` - at `$.evses[0]`"


@pytest.mark.parametrize(
    ("type_", "fields", "message"),
    [
        (EvsePatch, {"connectors": []}, "Expected `array` of length >= 1 - at `$.connectors`"),
        (ConnectorPatch, {"tariff_ids": ["x" * 37]}, "Expected `str` of length <= 36 - at `$.tariff_ids[0]`"),
        (SessionPatch, {"kwh": 1.5, "status": "DONE"}, "Invalid enum value 'DONE' - at `$.status`"),
        (LocationPatch, {"coordinates": {"latitude": "1", "longitude": "2"}}, "at `$.coordinates.latitude`"),
    ],
)
def test_patch_fields_are_validated(type_: type[msgspec.Struct], fields: dict[str, Any], message: str) -> None:
    patch = {**fields, "last_updated": "2019-06-24T12:39:09Z"}
    assert _refused(patch, type_).endswith(message)


def test_patch_refuses_null() -> None:
    # A PATCH cannot remove information in OCPI; null is refused rather than guessed at.
    patch = {"name": None, "last_updated": "2019-06-24T12:39:09Z"}
    assert _refused(patch, LocationPatch) == "Expected `str`, got `null` - at `$.name`"


def test_session_patch_charging_periods() -> None:
    patch = decoder(SessionPatch).decode((DATA / "session_patch_example_charging_period.json").read_bytes())
    assert isinstance(patch.charging_periods, list)
    assert patch.charging_periods[0].dimensions[0].volume == 6.8
    assert patch.status is msgspec.UNSET


# --- lenient where OCPI asks for it --------------------------------------------------------------------------------


def test_unknown_fields_are_ignored() -> None:
    loc = _example_json("location_example.json")
    loc["x_vendor"] = {"anything": [1, 2]}
    loc["evses"][0]["connectors"][0]["x_vendor"] = True
    decoded = _decode(loc, Location)
    assert isinstance(decoded, Location)
    assert b"x_vendor" not in msgspec.json.encode(decoded)


def test_optional_fields_may_be_null() -> None:
    session = _example_json("session_example_1_simple_start.json")
    session["end_date_time"] = None
    session["total_cost"] = None
    decoded = _decode(session, Session)
    assert isinstance(decoded, Session)
    assert decoded.end_date_time is None
    assert decoded.total_cost is None


def test_gireve_tariff_target_fields() -> None:
    tariff = _example_json("tariff_1_simple_2hour.json")
    tariff["target_operator_country_code"] = "NL"
    tariff["target_operator_party_id"] = "MP2"
    decoded = _decode(tariff, Tariff)
    assert isinstance(decoded, Tariff)
    assert (decoded.target_operator_country_code, decoded.target_operator_party_id) == ("NL", "MP2")
    assert b'"target_operator_party_id":"MP2"' in msgspec.json.encode(decoded)
    tariff["target_operator_party_id"] = "MP22"
    assert _refused(tariff, Tariff) == "Expected `str` of length <= 3 - at `$.target_operator_party_id`"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2015-06-29T20:39:09Z", datetime.datetime(2015, 6, 29, 20, 39, 9, tzinfo=datetime.UTC)),
        ("2015-06-29T20:39:09", datetime.datetime(2015, 6, 29, 20, 39, 9, tzinfo=datetime.UTC)),  # no zone: UTC
        ("2016-12-29T17:45:09.2", datetime.datetime(2016, 12, 29, 17, 45, 9, 200000, tzinfo=datetime.UTC)),
        ("2018-01-01T01:08:01.123Z", datetime.datetime(2018, 1, 1, 1, 8, 1, 123000, tzinfo=datetime.UTC)),
        ("2018-01-01T01:08:01.1234Z", datetime.datetime(2018, 1, 1, 1, 8, 1, 123400, tzinfo=datetime.UTC)),  # 25
        ("2018-01-01T01:08:01.12345", datetime.datetime(2018, 1, 1, 1, 8, 1, 123450, tzinfo=datetime.UTC)),  # 25
    ],
)
def test_datetimes_become_aware_utc(value: str, expected: datetime.datetime) -> None:
    patch = _decode({"last_updated": value, "end_date_time": value}, SessionPatch)
    assert isinstance(patch, SessionPatch)
    assert patch.last_updated == expected
    assert patch.last_updated.tzinfo is datetime.UTC
    assert patch.end_date_time == expected
    hours = _decode(
        {"twentyfourseven": True, "exceptional_closings": [{"period_begin": value, "period_end": value}]}, Hours
    )
    assert isinstance(hours, Hours)
    assert hours.exceptional_closings is not None
    assert hours.exceptional_closings[0].period_begin.tzinfo is datetime.UTC
    # Naive and aware timestamps would not compare; normalised ones do.
    assert patch.last_updated <= hours.exceptional_closings[0].period_end


def test_connector_put_body() -> None:
    connector = _example_json("location_example.json")["evses"][0]["connectors"][0]
    decoded = _decode(connector, Connector)
    assert isinstance(decoded, Connector)
    assert decoded.tariff_ids == ["11"]
    assert decoded.max_electric_power is None
