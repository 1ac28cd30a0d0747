"""OCPI DateTime strings read as times: the relay's one parser of timestamps.

What it accepts is what :meth:`datetime.datetime.fromisoformat` of Python 3.11 reads once every ``Z`` is
turned into ``+00:00``: OCPI's ``2026-11-26T10:00:00Z`` and ``2026-11-26T10:00:00.123+01:00``, but also a
date alone (``2026-11-26``), a space instead of ``T`` and the basic ISO forms (``20261126``). A stamp
without a designator is UTC, as OCPI says, never the server's local time. Callers decide what a stamp
that is not one means for them (a 400, a usage error, 0 in an index); here it is a ``ValueError``.
"""

from __future__ import annotations

from datetime import UTC, datetime

__all__ = ["epoch_ms", "parse_datetime"]


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
