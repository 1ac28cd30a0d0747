"""DeliveryStore: what the forwarder and the dead-letter tools do in Redis.

Reading (XREADGROUP, XAUTOCLAIM of a taken-over shard), finishing a delivered entry (finish.lua:
XACK + XDEL + its watermarks, coalesced with other commands into one pipeline), the watermarks a
key waits on (parked, session-done, delivered) and the queue gauges. Leases and replicas
(leases.py) and dead letters (deadletters.py) are parts of the same facade.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, cast

from redis.typing import EncodableT

from relay.config import MODULES
from relay.store import keys as K
from relay.store import scripts
from relay.store.connection import Connection, optional_text, pipelined, raises_store_errors, text
from relay.store.deadletters import DeadLetters
from relay.store.entries import Entry, PendingRows, decode_entry, id_tuple
from relay.store.leases import Leases

_Streams = list[tuple[bytes, PendingRows]]  # XREADGROUP's reply: per stream, its name and entries


@raises_store_errors
class DeliveryStore(Leases, DeadLetters):
    """Redis operations of the forwarder and the dead-letter tools, on top of Store's connection."""

    def __init__(self, store: Connection) -> None:
        super().__init__(store)
        self._finish_keys: dict[int, tuple[str, str, str]] = {}  # per shard: built once, used per event

    async def load_scripts(self) -> None:
        """Register the delivery scripts at start (a NOSCRIPT later loads them again by itself)."""
        await scripts.load(self.redis, scripts.DELIVERY)

    # -- reading ------------------------------------------------------------------------------

    async def read_new(self, streams: dict[str, int], consumer: str, count: int, block_ms: int | None) -> list[Entry]:
        """XREADGROUP ``>`` over several streams (stream → shard), up to ``count`` from each.

        Blocks up to block_ms for the first entry (None: returns at once)."""
        resp = await self.redis.xreadgroup(K.GROUP, consumer, {s: ">" for s in streams}, count=count, block=block_ms)
        out: list[Entry] = []
        for stream, rows in cast(_Streams | None, resp) or []:
            name = text(stream)
            out += [decode_entry(name, streams[name], sid, fields) for sid, fields in rows if fields]
        return out

    async def claim(self, stream: str, shard: int, consumer: str, start: str, count: int) -> tuple[str, list[Entry]]:
        """XAUTOCLAIM every pending entry of a stream (we own its shard), in stream order."""
        res = await self.redis.xautoclaim(stream, K.GROUP, consumer, 0, start_id=start, count=count)
        nxt, rows = text(res[0]), cast(PendingRows, res[1])  # [next start, entries(, ids deleted meanwhile)]
        return nxt, [decode_entry(stream, shard, sid, fields) for sid, fields in rows if fields]

    async def entries(self, stream: str, shard: int, ids: Sequence[str]) -> list[Entry]:
        """The entries of ``stream`` with these ids still in it, in the order given (XRANGE of each id,
        pipelined a thousand at a time): a compacted unit's run read again (relay.compaction)."""
        out: list[Entry] = []
        for i in range(0, len(ids), 1000):
            part = ids[i : i + 1000]

            def queue(pipe: Any, part: Sequence[str] = part) -> list[object]:
                return [pipe.xrange(stream, min=x, max=x) for x in part]

            res = await pipelined(self.redis, queue)
            out += [decode_entry(stream, shard, sid, fields) for rows in res for sid, fields in rows]
        return out

    async def foreign_pending(self, stream: str, consumer: str) -> int:
        """Pending entries of a stream held by other consumers (a dead or departed replica)."""
        info: dict[str, Any] = await self.redis.xpending(stream, K.GROUP)
        return sum(int(c["pending"]) for c in info.get("consumers", []) if text(c["name"]) != consumer)

    async def publish_holds(self, shard: int, holds: dict[str, float], until: float) -> None:
        """Publish a shard's takeover holds (module|key → end, epoch s) for `relay status`; gone at ``until``."""
        key = K.holds_key(shard)
        mapping: dict[EncodableT, EncodableT] = {k: round(v, 3) for k, v in holds.items()}
        at_ms = int(until * 1000) + 1
        await pipelined(
            self.redis,
            lambda pipe: [pipe.delete(key), pipe.hset(key, mapping=mapping), pipe.pexpireat(key, at_ms)],
            transaction=True,
        )

    async def holds(self) -> dict[int, dict[str, float]]:
        """Per shard, its published takeover holds (module|key → end, epoch s); shards without any left out."""
        keys = [K.holds_key(shard) for shard in range(self.store.shards)]
        res = await pipelined(self.redis, lambda pipe: [pipe.hgetall(key) for key in keys])
        return {i: {text(k): float(v) for k, v in raw.items()} for i, raw in enumerate(res) if raw}

    # -- finishing ----------------------------------------------------------------------------

    def finish(self, entry: Entry, superseded: Sequence[str] = ()) -> asyncio.Future[Any]:
        """Ack + delete a delivered entry and advance its watermarks, in one script (coalesced).

        ``superseded``: a compacted unit's (relay.compaction) other entries, acked and deleted with it."""
        ev = entry.event
        keys = self._finish_keys.get(entry.shard)
        if keys is None:
            shard = entry.shard
            keys = self._finish_keys[shard] = (
                K.delivered_key(shard), K.session_done_key(shard), K.session_last_key(shard)
            )  # fmt: skip
        return self.store.call(
            "EVALSHA", scripts.FINISH.sha, 4, entry.stream, *keys,
            K.GROUP, entry.id, K.key_field(ev.module, ev.key),
            ev.key if ev.module == "sessions" else "",
            ev.key if ev.module == "cdrs" else "",
            entry.after or "",
            entry.origin or entry.id, *superseded,
        )  # fmt: skip

    # -- what a key waits on ------------------------------------------------------------------

    async def parked_fields(self, shard: int) -> set[str]:
        """Every parked ``module|key`` of a shard."""
        return {text(k) for k in await self.redis.hkeys(K.parked_key(shard))}

    async def parked(self, shard: int, module: str, key: str) -> str | None:
        """The dead-letter id that parked this key, if it is parked (coalesced with other commands)."""
        return optional_text(await self.store.call("HGET", K.parked_key(shard), K.key_field(module, key)))

    async def session_done(self, shard: int, key: str) -> str | None:
        """Stream id of the last delivered or dead-lettered update of a session."""
        return optional_text(await self.store.call("HGET", K.session_done_key(shard), key))

    async def session_marks(self, shard: int, key: str) -> tuple[str | None, str | None]:
        """A session's done-watermark and its last accepted update, read in that order (coalesced).

        Both are gone once a CDR of the session was delivered with no update after it (finish.lua);
        read in this order, (None, None) can only mean that: every update of the session is done.
        """
        done, last = await asyncio.gather(
            self.store.call("HGET", K.session_done_key(shard), key),
            self.store.call("HGET", K.session_last_key(shard), key),
        )
        return optional_text(done), optional_text(last)

    async def last_delivered(self, shard: int, module: str, key: str) -> str | None:
        """Stream id of the newest delivered event of an ordering key (the replay guard)."""
        return optional_text(await self.redis.hget(K.delivered_key(shard), K.key_field(module, key)))

    # -- gauges -------------------------------------------------------------------------------

    async def oldest(self) -> dict[str, float | None]:
        """Per module, the ingress time (epoch ms from the stream id) of the oldest undelivered event."""
        n = self.store.shards
        streams = [K.stream_key(module, shard) for module in MODULES for shard in range(n)]
        res = await pipelined(self.redis, lambda pipe: [pipe.xrange(stream, count=1) for stream in streams])
        out: dict[str, float | None] = {}
        for i, module in enumerate(MODULES):
            firsts = [id_tuple(text(rows[0][0]))[0] for rows in res[i * n : (i + 1) * n] if rows]
            out[module] = min(firsts) / 1000 if firsts else None
        return out

    async def unreadable_shards(self) -> dict[str, list[int]]:
        """Per module, the shards whose stream or consumer group is missing (the ingress cannot append
        there, or the forwarder cannot read: Redis lost its data, or someone deleted the key). /readyz."""
        n = self.store.shards
        streams = [K.stream_key(module, shard) for module in MODULES for shard in range(n)]
        res = await pipelined(self.redis, lambda pipe: [pipe.xinfo_groups(s) for s in streams], raise_on_error=False)
        group = K.GROUP.encode()
        out: dict[str, list[int]] = {}
        for i, module in enumerate(MODULES):
            out[module] = []
            for shard, reply in enumerate(res[i * n : (i + 1) * n]):
                if isinstance(reply, Exception):
                    if "no such key" not in str(reply).lower():
                        raise reply
                    out[module].append(shard)
                elif not any(g.get("name") in (group, K.GROUP) for g in reply):
                    out[module].append(shard)
        return out

    async def shard_gauges(self) -> dict[tuple[str, int], tuple[int, float | None, int]]:
        """Per (module, shard): entries queued, the oldest one's ingress time (epoch s) or None, dead letters
        (one pipeline; `relay status` and GET /admin/status)."""
        pairs = [(module, shard) for module in MODULES for shard in range(self.store.shards)]

        def queue(pipe: Any) -> list[object]:
            out: list[object] = []
            for module, shard in pairs:
                out += [pipe.xlen(K.stream_key(module, shard)), pipe.xrange(K.stream_key(module, shard), count=1),
                        pipe.xlen(K.dlq_key(module, shard))]  # fmt: skip
            return out

        res = await pipelined(self.redis, queue)
        return {
            pair: (
                int(res[3 * i]),
                id_tuple(text(first[0][0]))[0] / 1000 if (first := res[3 * i + 1]) else None,
                int(res[3 * i + 2]),
            )  # fmt: skip
            for i, pair in enumerate(pairs)
        }

    async def parked_sample(self, first: int) -> dict[int, tuple[int, dict[str, str]]]:
        """Per shard with parked keys: how many, and up to about ``first`` of them (``module|key`` → the dead
        letter that parked it; one HSCAN page, so a shard with thousands costs no more than one with ten)."""
        n = self.store.shards

        def queue(pipe: Any) -> list[object]:
            return [c for shard in range(n) for c in (pipe.hlen(K.parked_key(shard)),
                                                        pipe.hscan(K.parked_key(shard), 0, count=first))]  # fmt: skip

        res = await pipelined(self.redis, queue)
        out: dict[int, tuple[int, dict[str, str]]] = {}
        for shard in range(n):
            count, (_, fields) = int(res[2 * shard]), res[2 * shard + 1]
            if count:
                out[shard] = (count, {text(k): text(v) for k, v in fields.items()})
        return out
