"""The state reader: objects' current state as the Sender interfaces and the roaming checks read it (never writes).

The state is written with its event by Store.commit (relay/store/lua/commit.lua): a hash per module
and shard (field ``CC:PID:ID[:TARGET]`` → ``<version>|<JSON>``) and a sorted set per operator of
object ids by last_updated, which orders the Sender lists.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

from redis.asyncio.client import Pipeline

from relay.ordering import shard_of
from relay.store import keys as K
from relay.store.connection import Part, pipelined, raises_store_errors, text


def split_state(raw: bytes | None) -> tuple[int, bytes | None]:
    """``b"3|{...}"`` → (3, b"{...}")."""
    if raw is None:
        return 0, None
    ver, _, doc = raw.partition(b"|")
    return int(ver), doc


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a Sender list: the total matching, and the documents in order."""

    total: int
    docs: list[tuple[str, bytes]]  # (state field, JSON document)


@raises_store_errors
class StateReader(Part):
    """Reads of the state store for the OCPI listener (never writes)."""

    async def page(self, module: str, operators: Sequence[tuple[str, str]], date_from_ms: int | None,
                   date_to_ms: int | None, offset: int, limit: int) -> Page:  # fmt: skip
        """Objects of these operators with date_from <= last_updated < date_to, by (last_updated, id)."""
        lo = str(date_from_ms) if date_from_ms is not None else "-inf"
        hi = f"({date_to_ms}" if date_to_ms is not None else "+inf"
        sources = [(cc, pid, shard) for cc, pid in operators for shard in range(self.store.shards)]

        def ranges(pipe: Pipeline) -> list[object]:
            queued: list[object] = []
            for cc, pid, shard in sources:
                idx = K.index_key(module, shard, cc, pid)
                queued.append(pipe.zcount(idx, lo, hi))
                queued.append(pipe.zrangebyscore(idx, lo, hi, start=0, num=offset + limit, withscores=True))
            return queued

        res = await pipelined(self.redis, ranges)
        total = sum(int(n) for n in res[0::2])
        merged: list[tuple[float, str, int]] = []
        for (cc, pid, shard), rows in zip(sources, res[1::2], strict=True):
            merged += [(score, K.state_field(cc, pid, text(member)), shard) for member, score in rows]
        merged.sort()
        chosen = merged[offset : offset + limit]
        if not chosen:
            return Page(total, [])
        raws = await pipelined(self.redis, lambda pipe: [pipe.hget(K.state_key(module, shard), fld)
                                                          for _, fld, shard in chosen])  # fmt: skip
        docs = [(fld, doc) for (_, fld, _), raw in zip(chosen, raws, strict=True) if (doc := split_state(raw)[1])]
        return Page(total, docs)

    async def one(self, module: str, key: str, fld: str) -> bytes | None:
        """One object's current document (the shard comes from its ordering key)."""
        raw = await self.redis.hget(K.state_key(module, shard_of(key, self.store.shards)), fld)
        return split_state(cast(bytes | None, raw))[1]  # the client never decodes: bytes
