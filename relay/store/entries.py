"""Stream entries and dead letters as the forwarder and the dead-letter tools hold them, decoded from replies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from relay.events import Event, decode
from relay.store import keys as K
from relay.store.connection import text

_E, _A, _O, _I, _S = (f.encode() for f in (K.ENTRY_FIELD, K.AFTER_FIELD, K.ORIGIN_FIELD, K.INFO_FIELD, K.SOURCE_FIELD))
_info_decoder = msgspec.msgpack.Decoder(dict[str, Any])

# Stream replies as the relay's client returns them: it never decodes (redis-py's annotations also
# allow str, for clients that do).
Fields = dict[bytes, bytes]
Rows = list[tuple[bytes, Fields]]  # XRANGE
PendingRows = list[tuple[bytes, Fields | None]]  # XREADGROUP, XAUTOCLAIM: None for an entry deleted while pending


@dataclass(slots=True)
class Entry:
    """One stream entry as the forwarder holds it."""

    stream: str
    shard: int
    id: str
    event: Event
    after: str | None = None  # a CDR waits until its session's done-watermark reaches this id
    origin: str | None = None  # a replayed entry: its id before it was dead-lettered


@dataclass(slots=True)
class DeadLetter:
    """A dead-letter entry with its envelope and the reason, as the CLI shows it."""

    module: str
    shard: int
    id: str
    stream_id: str
    event: Event
    info: dict[str, Any]
    after: str | None = None


def id_tuple(stream_id: str) -> tuple[int, int]:
    """``1700000000000-3`` → (1700000000000, 3), for ordering ids of one stream."""
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


def decode_entry(stream: str, shard: int, sid: bytes, fields: Fields) -> Entry:
    """An entry of a stream, from its id and fields as Redis returned them."""
    after = fields.get(_A)
    origin = fields.get(_O)
    return Entry(
        stream=stream,
        shard=shard,
        id=text(sid),
        event=decode(fields[_E]),
        after=after.decode() if after else None,
        origin=origin.decode() if origin else None,
    )


def decode_dead_letter(module: str, shard: int, sid: bytes, fields: Fields) -> DeadLetter:
    """An entry of a dead-letter stream, from its id and fields as Redis returned them."""
    return DeadLetter(
        module=module,
        shard=shard,
        id=text(sid),
        stream_id=text(fields[_S]),
        event=decode(fields[_E]),
        info=_info_decoder.decode(fields[_I]),
        after=text(fields[_A]) if _A in fields else None,
    )
