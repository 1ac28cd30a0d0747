"""The event envelope: what the ingress stores in a stream and the forwarder delivers.

Encoded once with msgpack (array-like, so field names cost nothing per entry). The CSMS's body is
kept as the exact bytes it sent, after validation, so delivery forwards what the CSMS meant.
"""

from __future__ import annotations

import os
import re
import time
from typing import Literal
from urllib.parse import quote

import msgspec

from relay.config import Module

Method = Literal["PUT", "PATCH", "POST", "DELETE"]


class Event(msgspec.Struct, array_like=True, kw_only=True, frozen=True):
    """One CSMS operation accepted for delivery to the IOP."""

    id: str
    module: Module
    method: Method
    country_code: str
    party_id: str
    object_id: str
    evse_uid: str | None = None
    connector_id: str | None = None
    key: str
    correlation_id: str
    received_at: float
    body: bytes = b""
    url: str | None = None  # an absolute target (a command's response_url) instead of the module endpoint
    # Send the object's current state, a PUT of the whole object, instead of this operation
    # (relay.outgoing.prepare): a dead letter replayed by ``relay dlq replay``, a compacted run
    # (relay.compaction). Last, with a default: envelopes stored before it existed still decode.
    from_state: bool = False
    # A PATCH accepted for an object (or EVSE/Connector) the state store does not hold: stored and
    # forwarded, the state unchanged. A PUT of the current state does not carry it, so compaction
    # never folds it into one (relay.compaction). With a default: older envelopes still decode.
    stateless: bool = False

    def _ids(self) -> str:
        """The ids below the module endpoint, as they are (not encoded), or "" for CDRs and results."""
        if self.module in ("cdrs", "commands"):
            return ""  # CDRs are POSTed to the endpoint itself; results go to their response_url
        parts = [self.country_code, self.party_id, self.object_id]
        if self.evse_uid is not None:
            parts.append(self.evse_uid)
            if self.connector_id is not None:
                parts.append(self.connector_id)
        return "/".join(parts)

    def url_path(self) -> str:
        """Path below the module endpoint of the IOP's Receiver interface, each id one percent-encoded
        segment (an id may hold "?", "#", "%"…). ValueError for an id that cannot be a segment ("", ".",
        ".."): it would address another object; the ingress refuses such ids."""
        ids = self._ids()
        if not ids:
            return ""
        if _ENCODE(ids) is None:  # the common case: nothing to encode
            return "/" + ids
        segments = ids.split("/")  # no id holds "/": ids come from path segments or are refused
        for seg in segments:
            if seg in _NOT_SEGMENTS:
                raise ValueError(f"{seg!r} cannot be sent as an id in a URL path")
        return "/" + "/".join(quote(seg, safe="") for seg in segments)

    def object_ref(self) -> str:
        """The object this event updates, finer than its ordering key (an EVSE of a Location…)."""
        return f"{self.module}/{self._ids() or self.object_id}"


_ENCODE = re.compile(r"[^A-Za-z0-9_~*/-]").search  # "." too: "." and ".." segments take the long way
_NOT_SEGMENTS = frozenset({"", ".", ".."})


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Event)


def encode(event: Event) -> bytes:
    """Envelope → bytes for the stream entry."""
    return _encoder.encode(event)


def decode(raw: bytes) -> Event:
    """Stream entry bytes → envelope."""
    return _decoder.decode(raw)


def new_event_id() -> str:
    """A sortable, unique id: milliseconds then 64 random bits, 28 hex characters."""
    return f"{time.time_ns() // 1_000_000:012x}{os.urandom(8).hex()}"
