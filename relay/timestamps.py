"""OCPI DateTime strings read as times: the relay's one parser of timestamps.

Three readers, from strict to lenient:

- :func:`ocpi_instant`: a stamp *written as OCPI writes it* (types.asciidoc, "DateTime": string(25), RFC 3339,
  UTC, ``Z`` or no designator, ``2015-06-29T20:39:09Z``, ``2016-12-29T17:45:09.2``), as an aware UTC datetime;
  ``None`` for anything else. The ingress's models decode every DateTime of a CSMS body (an :class:`Instant`
  field) with it.
- :func:`normalise`: a stamp any RFC 3339 ``date-time`` reader reads (section 5.6), rewritten as OCPI writes it:
  an offset (``+02:00``, ``-00:00``) converted to UTC with ``Z``, a fraction cut to what string(25) holds, a
  lower-case ``t``/``z`` and a space separator (RFC 3339's own note on "date-time": "applications ... may
  choose ... a space character") made ``T``/``Z``. What RFC 3339 does not read is no instant and is refused
  (``ValueError``): a date alone, no seconds, ISO 8601's basic (``20261126T100000Z``) and week forms, an offset
  without its colon (``+0200``), a leap second (``:60``, which no datetime holds), a calendar day that does not
  exist. The choice: OCPI names RFC 3339, so what RFC 3339 reads unambiguously as one instant is converted, and
  everything else is the CSMS's to fix.
- :func:`parse_datetime`: what :meth:`datetime.datetime.fromisoformat` of Python 3.11 reads once every ``Z`` is
  turned into ``+00:00``: OCPI's forms, offsets, but also a date alone (``2026-11-26``), a space instead of ``T``
  and the basic ISO forms (``20261126``). For what the relay reads from elsewhere (the IOP's ``date_from``, an
  operator's ``--since``, stored objects): callers decide what a stamp that is not one means for them (a 400,
  a usage error, 0 in an index); here it is a ``ValueError``.

A stamp without a designator is UTC, as OCPI says, never the server's local time.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

__all__ = ["NOT_OCPI_DATETIME", "Instant", "epoch_ms", "instant_hook", "normalise", "ocpi_instant", "parse_datetime"]

# OCPI's DateTime is a string(25): "YYYY-MM-DDTHH:MM:SS" (19) + "." + digits + "Z" (optional).
MAX_LENGTH = 25
_BASE = 19


class _InstantType(type):
    def __instancecheck__(cls, obj: object) -> bool:
        return isinstance(obj, datetime)


if TYPE_CHECKING:
    Instant = datetime
else:

    class Instant(metaclass=_InstantType):
        """An OCPI DateTime of a CSMS body: the type the models declare, not the type of the values.

        msgspec hands a field of a type it does not know to the decoder's hook (relay.models.common), which
        reads it with :func:`ocpi_instant`, instead of reading it with its own RFC 3339 parser (which also takes
        offsets, ``+00:00``, a space, a lower-case ``z`` and 30 fraction digits, and keeps no trace of which
        it saw). The values are plain aware UTC datetimes (so they encode, compare and copy as such): any
        datetime is an instance of this class, which is all msgspec checks of the hook's answer. Not a
        subclass of datetime: building one costs three times what ``datetime.fromisoformat`` does.
        """

        __slots__ = ()


_from_iso = datetime.fromisoformat
_SEPARATORS = "--T::"  # stamp[4:17:3] of "YYYY-MM-DDTHH:MM:SS"
NOT_OCPI_DATETIME = "Not a DateTime as OCPI writes it (UTC, string(25), `Z` or no designator)"
_JSON_NAMES: dict[type, str] = {
    type(None): "null", bool: "bool", int: "int", float: "float", list: "array", dict: "object"
}  # fmt: skip


def instant_hook(type_: type[Any], stamp: object) -> datetime:
    """msgspec's ``dec_hook`` for an :class:`Instant` field: :func:`ocpi_instant`, or a ValueError that msgspec
    reports with the field's path (``NOT_OCPI_DATETIME`` for a string not in OCPI's form, which the ingress
    rewrites and decodes again)."""
    # One function, the shape checked by hand (a regex costs twice as much), the common "…Z" first: it runs for
    # every DateTime the ingress decodes. fromisoformat alone also reads week dates, basic forms and offsets;
    # with the separators in place it checks the digits and the calendar.
    if type(stamp) is not str:
        if type_ is not Instant:
            raise NotImplementedError(f"no decoder for {type_!r}")
        raise ValueError(f"Expected `str` (an OCPI DateTime), got `{_JSON_NAMES.get(type(stamp), 'value')}`")
    if stamp[4:17:3] != _SEPARATORS:
        raise ValueError(NOT_OCPI_DATETIME)
    n = len(stamp)
    if n != 20 or stamp[19] != "Z":
        if not _BASE <= n <= MAX_LENGTH:
            raise ValueError(NOT_OCPI_DATETIME)
        if n > _BASE:
            frac = stamp[20:-1] if stamp[-1] == "Z" else stamp[20:]
            if stamp[19] != "." or not (frac.isdigit() and frac.isascii()):
                raise ValueError(NOT_OCPI_DATETIME)
    try:
        dt = _from_iso(stamp)
    except ValueError:
        raise ValueError(NOT_OCPI_DATETIME) from None
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)


def ocpi_instant(stamp: str) -> datetime | None:
    """``stamp`` as an aware UTC datetime if it is written exactly as OCPI writes a DateTime, else None.

    >>> ocpi_instant("2026-11-26T10:00:00Z").isoformat()
    '2026-11-26T10:00:00+00:00'
    >>> ocpi_instant("2026-11-26T10:00:00.12345").isoformat()  # no designator: UTC
    '2026-11-26T10:00:00.123450+00:00'
    >>> ocpi_instant("2026-11-26T12:00:00+02:00") is None  # an instant, but not written as OCPI writes it
    True
    """
    try:
        return instant_hook(Instant, stamp)
    except ValueError:
        return None


# RFC 3339 section 5.6 "date-time", with its note's space separator and lower-case t/z, and OCPI's missing
# designator (UTC). ASCII digits only: \d would take any Unicode digit.
_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]+))?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})?"
)


def normalise(stamp: str) -> str:
    """``stamp`` (RFC 3339 date-time, or OCPI's without designator) written as OCPI writes a DateTime.

    The instant is kept: an offset is subtracted (the result ends with ``Z``); a stamp without designator
    stays without; fraction digits beyond string(25) are cut (truncated, never rounded up into the next
    second). ValueError, with the reason, for what RFC 3339 does not read as an instant.

    >>> normalise("2026-01-01T10:00:00+02:00")
    '2026-01-01T08:00:00Z'
    >>> normalise("2026-01-01 10:00:00.123456789z")
    '2026-01-01T10:00:00.1234Z'
    """
    m = _RFC3339.fullmatch(stamp)
    if m is None:
        raise ValueError("not an RFC 3339 date-time (YYYY-MM-DDTHH:MM:SS[.fraction][Z|+HH:MM])")
    year, month, day, hour, minute, second = (int(x) for x in m.group(1, 2, 3, 4, 5, 6))
    try:
        at = datetime(year, month, day, hour, minute, second)  # naive: UTC, or the offset below
    except ValueError as exc:
        raise ValueError(f"no such date or time: {exc}") from None
    zone = m.group(8) or ""
    if zone not in ("", "Z", "z"):
        hours, minutes = int(zone[1:3]), int(zone[4:6])
        if hours > 23 or minutes > 59:
            raise ValueError(f"no such UTC offset: {zone}")
        offset = timedelta(hours=hours, minutes=minutes)
        try:
            at = at - offset if zone[0] == "+" else at + offset
        except OverflowError:
            raise ValueError("the instant in UTC is outside years 1 to 9999") from None
    suffix = "Z" if zone else ""
    frac = (m.group(7) or "")[: MAX_LENGTH - _BASE - 1 - len(suffix)]
    return (
        f"{at.year:04d}-{at.month:02d}-{at.day:02d}T{at.hour:02d}:{at.minute:02d}:{at.second:02d}"
        f"{'.' + frac if frac else ''}{suffix}"
    )


def parse_datetime(stamp: object) -> datetime:
    """``stamp`` (a str, or any JSON value, read as ``str(stamp)``) as an aware datetime; ValueError if not one.

    >>> parse_datetime("2026-11-26T10:00:00Z").isoformat()
    '2026-11-26T10:00:00+00:00'
    >>> parse_datetime("2026-11-26T10:00:00").isoformat()  # no designator: UTC
    '2026-11-26T10:00:00+00:00'
    """
    dt = datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)


def epoch_ms(stamp: object) -> int:
    """``parse_datetime(stamp)`` as whole milliseconds since the Unix epoch (truncated); ValueError if not one."""
    return int(parse_datetime(stamp).timestamp() * 1000)
