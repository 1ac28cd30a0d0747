"""RetentionStore: the Redis side of the retention sweeper (relay/retention.py).

Every value of the marker hashes (delivered, accepted, dead-last, session-last, session-done) is a stream id
``<ms>-<seq>`` whose ms part is when its event was accepted: a field whose id is older than a window can be
found by reading the hash (HSCAN, in batches) and forgotten without any TTL support (no HEXPIRE: an external
Redis may be 7.0). Each batch is deleted by a compare-and-delete script (a field is deleted only if it still
holds the id seen; nothing written since is lost). Sessions and CDRs leave the state by their index's score
(last_updated, ms), the state field and the index member in one script.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import cast

import msgspec

from relay.config import MODULES
from relay.events import decode
from relay.store import keys as K
from relay.store import scripts
from relay.store.connection import Part, raises_store_errors, text
from relay.store.entries import Rows

_ENVELOPE = K.ENTRY_FIELD.encode()
# Marker hashes swept by age, as (what the metric calls them, key of a shard). Accepted first: its field is
# kept while above the key's delivered and dead-last ones (still queued), which must not be gone before it.
MARKERS = (("accepted", K.accepted_key), ("delivered", K.delivered_key), ("dead_last", K.dead_last_key))


def id_ms(value: bytes) -> int | None:
    """The ms part of a stream id (``b"1700000000000-3"`` → 1700000000000); None if it is not one."""
    head = value.partition(b"-")[0]
    return int(head) if head.isdigit() else None


def _pairs(found: dict[bytes, bytes], cutoff_ms: int, keep: frozenset[str]) -> list[bytes]:
    """Fields of one HSCAN page older than the cutoff and not kept, flattened as field, id seen, …"""
    out: list[bytes] = []
    for fld, value in found.items():
        ms = id_ms(value)
        if ms is not None and ms < cutoff_ms and fld.decode() not in keep:
            out += (fld, value)
    return out


@raises_store_errors
class RetentionStore(Part):
    """Forgetting what is older than a window, one shard at a time (the shards this replica owns)."""

    async def load_scripts(self) -> None:
        """Register the retention scripts (a NOSCRIPT later loads them again by itself)."""
        await scripts.load(self.redis, scripts.RETENTION)

    async def dead_letter_fields(self, shard: int, count: int = 500) -> frozenset[str]:
        """Every ``module|key`` and ``key`` that has a dead letter in this shard: their markers are kept (the
        replay guard of a dead letter compares its id with them, however old it is)."""
        out: set[str] = set()
        for module in MODULES:
            start = "-"
            while True:
                rows = cast(Rows, await self.redis.xrange(K.dlq_key(module, shard), min=start, count=count))
                for _, fields in rows:
                    try:
                        ev = decode(fields[_ENVELOPE])
                    except (KeyError, msgspec.DecodeError):
                        continue  # no key to keep: such a dead letter cannot be replayed either
                    out.update((K.key_field(ev.module, ev.key), ev.key))
                if len(rows) < count:
                    break
                start = "(" + text(rows[-1][0])
        return frozenset(out)

    async def _scan(self, key: str, count: int) -> AsyncIterator[dict[bytes, bytes]]:
        """HSCAN pages of a hash, one at a time (the caller deletes from a page before the next is read: Redis
        allows it, and every field there from the first page to the last is still returned once at least)."""
        cursor = 0
        while True:
            cursor, found = await self.redis.hscan(key, cursor, count=count)
            if found:
                yield cast(dict[bytes, bytes], found)
            if cursor == 0:
                return

    async def trim_markers(self, shard: int, cutoff_ms: int, keep: frozenset[str], count: int) -> dict[str, int]:
        """Forget delivered / accepted / dead-last fields older than ``cutoff_ms`` (not those in ``keep``, nor the
        accepted id of a key whose newest event is still queued)."""
        removed: dict[str, int] = {}
        for what, key_of in MARKERS:
            key = key_of(shard)
            # An accepted id above the key's delivered and dead-last ones is an event still queued: kept.
            hashes = [key, K.delivered_key(shard), K.dead_last_key(shard)] if what == "accepted" else [key]
            n = 0
            async for page in self._scan(key, count):
                if args := _pairs(page, cutoff_ms, keep):
                    n += int(await scripts.run(self.redis, scripts.TRIM_MARKERS, hashes, args))
            removed[what] = n
        return removed

    async def trim_watermarks(self, shard: int, cutoff_ms: int, keep: frozenset[str], count: int) -> int:
        """Forget session-last + session-done of sessions with nothing undelivered whose last update is older
        than ``cutoff_ms``; then session-done fields left without a session-last. Returns sessions forgotten."""
        keys = [K.session_last_key(shard), K.session_done_key(shard)]
        n = 0
        for mode, key in (("last", keys[0]), ("done", keys[1])):
            async for page in self._scan(key, count):
                if args := _pairs(page, cutoff_ms, keep):
                    n += int(await scripts.run(self.redis, scripts.TRIM_WATERMARKS, keys, [mode, *args]))
        return n

    async def trim_state(
        self,
        shard: int,
        module: str,
        operators: Sequence[tuple[str, str]],
        cutoff_ms: int,
        keep: frozenset[str],
        count: int,
    ) -> int:
        """Forget Sessions or CDRs of these operators whose last_updated is older than ``cutoff_ms``; a Session
        whose key is in ``keep`` (it has a dead letter, replayed from its state) is kept. Returns how many."""
        n = 0
        for cc, pid in operators:
            idx = K.index_key(module, shard, cc, pid)
            keys = [idx, K.state_key(module, shard), K.session_last_key(shard), K.session_done_key(shard)]
            prefix = f"ses:{cc}:{pid}:" if module == "sessions" else ""
            # Pages by a score cursor: the members kept in place at the cursor's score are passed by counting
            # them (one changed between two pages may be skipped: kept until the next sweep, never deleted).
            low, passed = "-inf", 0
            while True:
                rows = cast(list[tuple[bytes, float]], await self.redis.zrangebyscore(
                    idx, low, f"({cutoff_ms}", start=passed, num=count, withscores=True))  # fmt: skip
                args: list[str | float] = []
                for member, score in rows:
                    m = text(member)
                    if not (prefix and prefix + m in keep):
                        args += (m, score)
                left: set[str] = set()  # forgotten, or moved since the read: no longer at the seen score
                if args:
                    r = await scripts.run(self.redis, scripts.TRIM_STATE, keys, [f"{cc}:{pid}:", prefix, *args])
                    n += len(r[0])
                    left = {text(m) for m in (*r[0], *r[1])}
                if len(rows) < count:
                    break
                last = rows[-1][1]
                at_last = sum(1 for member, score in rows if score == last and text(member) not in left)
                if str(last) == low:
                    passed += at_last
                else:
                    low, passed = str(last), at_last
        return n
