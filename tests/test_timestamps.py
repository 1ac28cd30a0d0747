"""relay.timestamps: the one parser of OCPI DateTime strings, as each call site relies on it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from click.testing import CliRunner

from relay.cli import main
from relay.timestamps import Instant, epoch_ms, instant_hook, normalise, ocpi_instant, parse_datetime
from tests.conftest import REPO

CET = timezone(timedelta(hours=1))

PARSED = [
    # OCPI's forms: Z, fractions, an offset
    ("2026-11-26T10:00:00Z", datetime(2026, 11, 26, 10, tzinfo=UTC)),
    ("2026-11-26T10:00:00.123Z", datetime(2026, 11, 26, 10, 0, 0, 123000, tzinfo=UTC)),
    ("2026-11-26T10:00:00+01:00", datetime(2026, 11, 26, 10, tzinfo=CET)),
    ("2026-11-26T10:00:00-00:30", datetime(2026, 11, 26, 10, tzinfo=timezone(timedelta(minutes=-30)))),
    # no designator: UTC, never local time
    ("2026-11-26T10:00:00", datetime(2026, 11, 26, 10, tzinfo=UTC)),
    # what fromisoformat reads beyond OCPI, kept as the four former copies had it
    ("2026-11-26", datetime(2026, 11, 26, tzinfo=UTC)),
    ("2026-11-26 10:00:00Z", datetime(2026, 11, 26, 10, tzinfo=UTC)),
    ("20261126T100000Z", datetime(2026, 11, 26, 10, tzinfo=UTC)),
    ("2026-11-26T10:00:00.123456789Z", datetime(2026, 11, 26, 10, 0, 0, 123456, tzinfo=UTC)),
    # any JSON value is read as str(value) (the state merge passes body fields as they came)
    (20261126, datetime(2026, 11, 26, tzinfo=UTC)),
]

REFUSED = [
    "",
    "yesterday",
    "2026-11-26T10:00:00z",  # only an upper-case Z stands for +00:00
    "2026-11-26T10:00:00ZZ",
    "2026-13-01T00:00:00Z",
    "2026-11-26T25:00:00Z",
    "10:00:00",
    None,
    True,
    1795687200000,  # epoch ms are not a DateTime
]


@pytest.mark.parametrize(("stamp", "expected"), PARSED, ids=[repr(s) for s, _ in PARSED])
def test_parse_datetime_reads_it_as_an_aware_datetime(stamp: object, expected: datetime) -> None:
    got = parse_datetime(stamp)
    assert got == expected and got.tzinfo is not None
    assert got.utcoffset() == expected.utcoffset()  # the offset given is kept, not converted


@pytest.mark.parametrize("stamp", REFUSED, ids=repr)
def test_parse_datetime_refuses_what_is_not_one_with_value_error(stamp: object) -> None:
    with pytest.raises(ValueError):
        parse_datetime(stamp)
    with pytest.raises(ValueError):
        epoch_ms(stamp)


EPOCH_MS = [
    ("1970-01-01T00:00:00Z", 0),
    ("2026-11-26T10:00:00Z", 1_795_687_200_000),
    ("2026-11-26T10:00:00", 1_795_687_200_000),  # no designator: UTC
    ("2026-11-26T11:00:00+01:00", 1_795_687_200_000),
    ("2026-11-26T10:00:00.123Z", 1_795_687_200_123),
    ("2026-11-26T10:00:00.1239Z", 1_795_687_200_123),  # truncated, not rounded
    ("2026-11-26", 1_795_651_200_000),
]


@pytest.mark.parametrize(("stamp", "expected"), EPOCH_MS, ids=[s for s, _ in EPOCH_MS])
def test_epoch_ms_is_whole_milliseconds_since_the_epoch(stamp: str, expected: int) -> None:
    assert epoch_ms(stamp) == expected
    assert isinstance(epoch_ms(stamp), int)


@pytest.mark.parametrize("since", ["bogus", "2026-11-26T10:00:00z", "2h30m"])
def test_dlq_since_that_is_not_a_time_is_a_usage_error(since: str) -> None:
    env = {"RELAY_CONFIG": str(REPO / "config" / "relay.toml"), "RELAY_REDIS_URL": "redis://127.0.0.1:1/0"}
    result = CliRunner().invoke(main, ["dlq", "list", "--since", since], env=env)
    assert result.exit_code == 2, result.output
    assert "use e.g. 30m, 2h, 7d or 2026-11-26T10:00:00Z" in result.output


# --- OCPI's own form: ocpi_instant (the models' reader) and normalise (the ingress's rewrite) --------------------

OCPI_FORM = [
    ("2015-06-29T20:39:09Z", datetime(2015, 6, 29, 20, 39, 9, tzinfo=UTC)),
    ("2015-06-29T20:39:09", datetime(2015, 6, 29, 20, 39, 9, tzinfo=UTC)),
    ("2016-12-29T17:45:09.2Z", datetime(2016, 12, 29, 17, 45, 9, 200000, tzinfo=UTC)),
    ("2016-12-29T17:45:09.2", datetime(2016, 12, 29, 17, 45, 9, 200000, tzinfo=UTC)),
    ("2018-01-01T01:08:01.1234Z", datetime(2018, 1, 1, 1, 8, 1, 123400, tzinfo=UTC)),  # 25 characters
    ("2018-01-01T01:08:01.12345", datetime(2018, 1, 1, 1, 8, 1, 123450, tzinfo=UTC)),  # 25 characters
]

NOT_OCPI_FORM = [
    "2018-01-01T01:08:01.12345Z",  # 26 characters
    "2018-01-01T01:08:01.123456",
    "2015-06-29T20:39:09+00:00",  # "+00:00 is not the same as UTC" (types.asciidoc)
    "2015-06-29T22:39:09+02:00",
    "2015-06-29 20:39:09Z",
    "2015-06-29t20:39:09Z",
    "2015-06-29T20:39:09z",
    "2015-06-29T20:39:09.Z",
    "2015-06-29T20:39:09.",
    "2015-06-29T20:39:09.1a",
    "2015-06-29T20:39:09.²",
    "2015-W27-1T20:39:09",  # fromisoformat reads a week date
    "2015-06-29T203909.0Z",
    "2015-02-29T20:39:09Z",  # no such day
    "2015-06-29T24:00:00Z",
    "２015-06-29T20:39:09Z",
    "2015-06-29",
    "",
]


@pytest.mark.parametrize(("stamp", "expected"), OCPI_FORM, ids=[s for s, _ in OCPI_FORM])
def test_ocpi_instant_reads_ocpi_s_form_as_aware_utc(stamp: str, expected: datetime) -> None:
    got = ocpi_instant(stamp)
    assert got == expected and got is not None and got.tzinfo is UTC
    assert isinstance(got, Instant) and type(got) is datetime  # a plain datetime: the models' Instant fields hold it
    assert normalise(stamp) == stamp  # already in OCPI's form: nothing to rewrite


@pytest.mark.parametrize("stamp", NOT_OCPI_FORM, ids=repr)
def test_ocpi_instant_refuses_any_other_form(stamp: str) -> None:
    assert ocpi_instant(stamp) is None
    with pytest.raises(ValueError, match="OCPI writes it"):
        instant_hook(Instant, stamp)


@pytest.mark.parametrize(("value", "name"), [(None, "null"), (1, "int"), (1.5, "float"), ([], "array"), ({}, "object")])
def test_instant_hook_names_the_json_type_of_a_non_string(value: object, name: str) -> None:
    with pytest.raises(ValueError, match=f"got `{name}`"):
        instant_hook(Instant, value)


NORMALISED = [
    ("2026-01-01T10:00:00+02:00", "2026-01-01T08:00:00Z"),
    ("2026-01-01T01:00:00+05:30", "2025-12-31T19:30:00Z"),
    ("2026-12-31T23:00:00-01:30", "2027-01-01T00:30:00Z"),
    ("2026-01-01T10:00:00+00:00", "2026-01-01T10:00:00Z"),
    ("2026-01-01T10:00:00-00:00", "2026-01-01T10:00:00Z"),  # RFC 3339 4.3: UTC, local offset unknown
    ("2026-01-01T10:00:00.5+01:00", "2026-01-01T09:00:00.5Z"),  # the fraction kept as it was
    ("2026-01-01T10:00:00." + "9" * 30 + "Z", "2026-01-01T10:00:00.9999Z"),  # cut, never rounded up
    ("2026-01-01T10:00:00." + "9" * 30, "2026-01-01T10:00:00.99999"),  # no designator: 5 digits fit
    ("2026-01-01 10:00:00Z", "2026-01-01T10:00:00Z"),
    ("2026-01-01 10:00:00", "2026-01-01T10:00:00"),  # no designator stays none (UTC all the same)
    ("2026-01-01t10:00:00z", "2026-01-01T10:00:00Z"),
]


@pytest.mark.parametrize(("sent", "kept"), NORMALISED, ids=[s for s, _ in NORMALISED])
def test_normalise_writes_an_rfc3339_instant_as_ocpi_does(sent: str, kept: str) -> None:
    assert normalise(sent) == kept
    assert len(kept) <= 25 and ocpi_instant(kept) is not None
    assert normalise(kept) == kept


@pytest.mark.parametrize(
    ("sent", "why"),
    [("2026-01-01", "not an RFC 3339"), ("2026-01-01T10:00Z", "not an RFC 3339"), ("20260101T100000Z", "not an RFC"),
     ("2026-01-01T10:00:00+0200", "not an RFC 3339"), ("2026-01-01T10:00:00+02", "not an RFC 3339"),
     ("2026-01-01T10:00:60Z", "no such date or time"), ("2026-02-30T10:00:00Z", "no such date or time"),
     ("2026-01-01T10:00:00+24:00", "no such UTC offset"), ("0001-01-01T00:30:00+01:00", "outside years"),
     ("9999-12-31T23:30:00-01:00", "outside years"), ("２026-01-01T10:00:00Z", "not an RFC 3339")],
)  # fmt: skip
def test_normalise_refuses_what_rfc3339_does_not_read_as_an_instant(sent: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        normalise(sent)
