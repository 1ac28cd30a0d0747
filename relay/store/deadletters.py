"""Dead letters: moving an entry to its module's dead-letter stream, listing, replaying and purging them.

A dead letter lives in ``relay:{rN}:dlq:<module>``, in its shard's slot: the move (XACK + XDEL +
XADD, and parking the key when asked) is one Lua script, and so is the replay (the guard against a
newer event of the key, XADD back to the end of the stream + XDEL + unpark + the superseded dead
letters' XDEL), and so is the purge (XDEL + unpark when it parked its key).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

from relay.config import MODULES, STATEFUL_MODULES
from relay.events import Event, encode
from relay.store import keys as K
from relay.store import scripts
from relay.store.connection import Part, optional_text, pipelined, raises_store_errors, text
from relay.store.entries import DeadLetter, Entry, Rows, decode_dead_letter


@dataclass(frozen=True, slots=True)
class Requeue:
    """What replay.lua did: ``result`` replayed | gone | newer | would_replay.

    ``newer`` says which ("delivered" or "queued"); a replay says whether it unparked the key and how
    superseded dead letters it deleted."""

    result: str
    stream_id: str | None = None
    newer: str | None = None
    unparked: bool = False
    superseded: frozenset[str] = frozenset()  # ids of the superseded dead letters it deleted


@raises_store_errors
class DeadLetters(Part):
    """The dead-letter streams (part of DeliveryStore)."""

    async def dead_letter(
        self, entry: Entry, info: bytes, *, park: bool, superseded: Sequence[str] = (), parked_by: str = ""
    ) -> str | None:
        """Move an entry to its dead-letter stream with the reason, ack it, maybe park its key.

        ``superseded``: a compacted unit's other entries, acked and deleted in the same script
        (compact_dead.lua runs dead_letter.lua after them). ``parked_by``: the dead letter the key was
        seen parked behind; if a purge or a replay unparked it since, nothing is written and UNPARKED is
        returned (the entry is to be sent)."""
        ev = entry.event
        shard = entry.shard
        fld = K.key_field(ev.module, ev.key)
        r = await scripts.run(
            self.redis,
            scripts.COMPACT_DEAD if superseded else scripts.DEAD_LETTER,
            [entry.stream, K.dlq_key(ev.module, shard), K.session_done_key(shard), K.parked_key(shard),
             K.dead_last_key(shard)],
            [
                K.GROUP, entry.id, encode(ev), info,
                ev.key if ev.module == "sessions" else "", entry.after or "",
                fld if park else "", entry.origin or entry.id,
                fld if ev.module in STATEFUL_MODULES else "", parked_by, fld, *superseded,
            ],
        )  # fmt: skip
        return optional_text(r)

    UNPARKED = "unparked"  # dead_letter()'s answer when the key was unparked meanwhile

    async def dead_letters(self, module: str, shard: int, start: str = "-", count: int = 100) -> list[DeadLetter]:
        """Dead letters of one module's shard, oldest first, from ``start`` (inclusive)."""
        rows = await self.redis.xrange(K.dlq_key(module, shard), min=start, count=count)
        return [decode_dead_letter(module, shard, sid, fields) for sid, fields in cast(Rows, rows)]

    async def replay(
        self,
        dead: DeadLetter,
        *,
        event: Event | None = None,
        guard: bool = False,
        dry_run: bool = False,
        supersedes: Sequence[DeadLetter] = (),
        state_field: str = "",
    ) -> Requeue:
        """Put a dead letter back at the end of its stream (new id) and unpark its key, in one script.

        ``event``: the envelope to queue instead of the stored one (a replay from state); ``guard``: not
        if a newer event of the key (by original stream ids) was delivered or is still queued (accepted
        after the key's last delivered or dead-lettered one); ``state_field``: a replay from state, the
        object's field in its state hash: the guard is waived when the object has a stored state (the
        replay sends it, at the end of the stream: never older); ``supersedes``: older dead letters of the
        same key, deleted with the replay; ``dry_run``: decide only.
        """
        ev = dead.event
        shard = dead.shard
        fld = K.key_field(ev.module, ev.key)
        if ev.module == "sessions":
            accepted, accepted_field = K.session_last_key(shard), ev.key
        else:
            accepted, accepted_field = K.accepted_key(shard), fld if ev.module in STATEFUL_MODULES else ""
        r = await scripts.run(
            self.redis,
            scripts.REPLAY,
            [K.dlq_key(dead.module, shard), K.stream_key(dead.module, shard), K.parked_key(shard),
             K.delivered_key(shard), K.dead_last_key(shard), accepted, K.state_key(ev.module, shard)],
            [dead.id, fld, encode(event) if event is not None else "", "1" if guard else "", accepted_field,
             "1" if dry_run else "", state_field, *(d.id for d in supersedes)],
        )  # fmt: skip
        result = text(r[0])
        if result == "replayed":
            return Requeue(result, text(r[1]), unparked=bool(r[2]), superseded=frozenset(map(text, r[3])))
        return Requeue(result, newer=text(r[1]) if result == "newer" else None)

    async def purge(self, dead: DeadLetter) -> tuple[bool, bool]:
        """Delete a dead letter for good, and unpark its key if it is the one that parked it (one script).

        Returns (deleted, unparked)."""
        r = await scripts.run(
            self.redis,
            scripts.PURGE,
            [K.dlq_key(dead.module, dead.shard), K.parked_key(dead.shard)],
            [dead.id, K.key_field(dead.event.module, dead.event.key)],
        )
        return bool(r[0]), bool(r[1])

    async def dlq_lengths(self) -> dict[str, int]:
        """Dead letters per module."""
        n = self.store.shards
        res = await pipelined(
            self.redis, lambda pipe: [pipe.xlen(K.dlq_key(module, shard)) for module in MODULES for shard in range(n)]
        )
        return {m: sum(res[i * n : (i + 1) * n]) for i, m in enumerate(MODULES)}
