"""relay.timestamps: the one parser of OCPI DateTime strings, as each call site relies on it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from click.testing import CliRunner

from relay.cli import main
from relay.timestamps import epoch_ms, parse_datetime
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
