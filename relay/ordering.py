"""Ordering keys and shards: which events must reach the IOP one after the other.

Pure functions, computed once at ingress and stored in the envelope.
"""

from __future__ import annotations

import zlib


def location_key(country_code: str, party_id: str, location_id: str) -> str:
    """A Location, its EVSEs and its Connectors share one order."""
    return f"loc:{country_code.upper()}:{party_id.upper()}:{location_id}"


def session_key(country_code: str, party_id: str, session_id: str) -> str:
    """A Session's PUTs and PATCHes share one order; its CDR carries the same key."""
    return f"ses:{country_code.upper()}:{party_id.upper()}:{session_id}"


def cdr_key(country_code: str, party_id: str, cdr_id: str) -> str:
    """A CDR without a session_id has no session to follow: it is ordered on its own."""
    return f"cdr:{country_code.upper()}:{party_id.upper()}:{cdr_id}"


def tariff_key(
    country_code: str, party_id: str, tariff_id: str, target_country: str | None, target_party: str | None
) -> str:
    """GIREVE's per-eMSP variants of one tariff_id are distinct objects, each with its own order."""
    target = f"{target_country.upper()}:{target_party.upper()}" if target_country and target_party else "*"
    return f"tar:{country_code.upper()}:{party_id.upper()}:{tariff_id}:{target}"


def shard_of(key: str, shards: int) -> int:
    """Stable shard of a key: all events of one key land in one stream of each module."""
    return zlib.crc32(key.encode()) % shards
