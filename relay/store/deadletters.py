"""Dead letters: moving an entry to its module's dead-letter stream, listing, replaying and purging them.

A dead letter lives in ``relay:{rN}:dlq:<module>``, in its shard's slot: the move (XACK + XDEL +
XADD, and parking the key when asked) is one Lua script, and so is the replay (XADD back to the
end of the stream + XDEL + unpark).
"""

from __future__ import annotations

from typing import cast

from relay.config import MODULES
from relay.events import encode
from relay.store import keys as K
from relay.store import scripts
from relay.store.connection import Part, optional_text, pipelined, raises_store_errors
from relay.store.entries import DeadLetter, Entry, Rows, decode_dead_letter


@raises_store_errors
class DeadLetters(Part):
    """The dead-letter streams (part of DeliveryStore)."""

    async def dead_letter(self, entry: Entry, info: bytes, *, park: bool) -> str | None:
        """Move an entry to its dead-letter stream with the reason, ack it, maybe park its key."""
        ev = entry.event
        shard = entry.shard
        r = await scripts.run(
            self.redis,
            scripts.DEAD_LETTER,
            [entry.stream, K.dlq_key(ev.module, shard), K.session_done_key(shard), K.parked_key(shard)],
            [
                K.GROUP, entry.id, encode(ev), info,
                ev.key if ev.module == "sessions" else "", entry.after or "",
                K.key_field(ev.module, ev.key) if park else "", entry.origin or entry.id,
            ],
        )  # fmt: skip
        return optional_text(r)

    async def dead_letters(self, module: str, shard: int, start: str = "-", count: int = 100) -> list[DeadLetter]:
        """Dead letters of one module's shard, oldest first, from ``start`` (inclusive)."""
        rows = await self.redis.xrange(K.dlq_key(module, shard), min=start, count=count)
        return [decode_dead_letter(module, shard, sid, fields) for sid, fields in cast(Rows, rows)]

    async def replay(self, dead: DeadLetter) -> str | None:
        """Put a dead letter back at the end of its stream (new id) and unpark its key; None if gone."""
        ev = dead.event
        r = await scripts.run(
            self.redis,
            scripts.REPLAY,
            [K.dlq_key(dead.module, dead.shard), K.stream_key(dead.module, dead.shard), K.parked_key(dead.shard)],
            [dead.id, K.key_field(ev.module, ev.key)],
        )
        return optional_text(r)

    async def purge(self, dead: DeadLetter) -> bool:
        """Delete a dead letter for good."""
        return bool(await self.redis.xdel(K.dlq_key(dead.module, dead.shard), dead.id))

    async def dlq_lengths(self) -> dict[str, int]:
        """Dead letters per module."""
        n = self.store.shards
        res = await pipelined(
            self.redis, lambda pipe: [pipe.xlen(K.dlq_key(module, shard)) for module in MODULES for shard in range(n)]
        )
        return {m: sum(res[i * n : (i + 1) * n]) for i, m in enumerate(MODULES)}
