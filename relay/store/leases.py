"""Leases and replicas: which replica serves which shard, who is alive, and each replica's link state.

A shard's lease is a string with an expiry (``relay:{rN}:lease``) holding its owner's replica id,
or ``free:<id>`` after a clean hand-back; taking, renewing and releasing it are Lua scripts so the
check and the write are one step. Replicas heartbeat into a sorted set (the fair share of shards
is computed from it) and publish their link state for ``relay status``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from redis.asyncio.client import Pipeline
from redis.exceptions import OutOfMemoryError, ResponseError
from redis.typing import EncodableT

from relay.store import keys as K
from relay.store import scripts
from relay.store.connection import Part, optional_text, pipelined, raises_store_errors, text

LINK_TTL_S = 60  # a replica's published link state outlives it by this much


@raises_store_errors
class Leases(Part):
    """Shard leases, the live-replica set and link states (part of DeliveryStore)."""

    async def acquire(self, shard: int, me: str, ttl_ms: int) -> str | None:
        """Take or keep a shard lease; returns the previous holder ('' none, 'self', 'free:x') or None."""
        return optional_text(await scripts.run(self.redis, scripts.LEASE_ACQUIRE, [K.lease_key(shard)], [me, ttl_ms]))

    async def renew(self, shard: int, me: str, ttl_ms: int) -> bool:
        """Extend a lease this replica holds; False if it was lost."""
        return bool(await scripts.run(self.redis, scripts.LEASE_RENEW, [K.lease_key(shard)], [me, ttl_ms]))

    async def release(self, shard: int, me: str, ttl_ms: int) -> None:
        """Hand a shard back cleanly: the next owner need not wait for our in-flight attempts."""
        await scripts.run(self.redis, scripts.LEASE_RELEASE, [K.lease_key(shard)], [me, ttl_ms])

    async def heartbeat(self, me: str, now_ms: int, dead_after_ms: int) -> int:
        """Record this replica as alive; returns how many replicas are alive (also at Redis's maxmemory)."""
        return int(await scripts.run(self.redis, scripts.HEARTBEAT, [K.REPLICAS_KEY], [me, now_ms, dead_after_ms]))

    async def alive(self) -> list[str]:
        """The replicas in the heartbeat set (alive, or dead too recently for a heartbeat to have dropped them)."""
        return [text(m) for m in await self.redis.zrange(K.REPLICAS_KEY, 0, -1)]

    async def reap_consumers(self, streams: Sequence[str], alive: Iterable[str]) -> list[str]:
        """Remove, from each stream's group, the consumers not in ``alive`` that hold no pending entry (each
        restart of a replica leaves one). One holding entries is kept (reap_consumers.lua checks and removes in
        one step). Returns ``stream/consumer`` of each removed; a stream without its group is skipped."""
        live = sorted(set(alive))
        removed: list[str] = []
        for stream in streams:
            try:
                names = await scripts.run(self.redis, scripts.REAP_CONSUMERS, [stream], [K.GROUP, *live])
            except ResponseError as exc:
                if "NOGROUP" in str(exc) or "no such key" in str(exc):
                    continue
                raise
            removed += [f"{stream}/{text(n)}" for n in names]
        return removed

    async def leave(self, me: str) -> None:
        """Remove this replica from the live set and its published link state (graceful stop): `relay status`
        stops listing it at once."""
        await pipelined(self.redis, lambda pipe: [pipe.zrem(K.REPLICAS_KEY, me), pipe.delete(K.link_key(me))])

    async def link_sync(self, me: str, state: str, reason: str, since: float) -> float | None:
        """Publish a replica's link state; returns when an operator last asked to resume, if ever."""

        fields: dict[EncodableT, EncodableT] = {k: v for k, v in K.link_fields(state, reason, since).items()}

        def queue(pipe: Pipeline) -> list[object]:
            return [
                pipe.hset(K.link_key(me), mapping=fields),
                pipe.expire(K.link_key(me), LINK_TTL_S),
                pipe.hget(K.LINK_KEY, K.RESUME_FIELD),
            ]

        # At Redis's maxmemory the publish (an HSET) is refused: the resume request is read all the same,
        # or a stopped link could not be resumed until room is back (which needs it resumed).
        res = await pipelined(self.redis, queue, raise_on_error=False)
        for r in res:
            if isinstance(r, Exception) and not isinstance(r, OutOfMemoryError):
                raise r
        resume = res[2]
        if isinstance(resume, Exception):
            raise resume
        return float(resume) if resume is not None else None

    async def request_resume(self, now: float) -> None:
        """Ask every replica to resume a paused or auth-failed link (allowed at Redis's maxmemory)."""
        await scripts.run(self.redis, scripts.RESUME, [K.LINK_KEY], [K.RESUME_FIELD, repr(now)])

    async def link_states(self) -> dict[str, dict[str, str]]:
        """Link state as each live replica last published it.

        The live replicas from their heartbeats, then their link hashes in one pipeline: never a SCAN, which
        would walk every key of the database (millions of idempotency keys) on each `relay status` or poll
        of GET /admin/status."""
        replicas = await self.alive()
        raws = await pipelined(self.redis, lambda pipe: [pipe.hgetall(K.link_key(r)) for r in replicas])
        return {r: {text(k): text(v) for k, v in raw.items()} for r, raw in zip(replicas, raws, strict=True) if raw}
