"""Leases and replicas: which replica serves which shard, who is alive, and each replica's link state.

A shard's lease is a string with an expiry (``relay:{rN}:lease``) holding its owner's replica id,
or ``free:<id>`` after a clean hand-back; taking, renewing and releasing it are Lua scripts so the
check and the write are one step. Replicas heartbeat into a sorted set (the fair share of shards
is computed from it) and publish their link state for ``relay status``.
"""

from __future__ import annotations

from redis.asyncio.client import Pipeline
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
        """Record this replica as alive; returns how many replicas are alive."""
        res = await pipelined(
            self.redis,
            lambda pipe: [
                pipe.zadd(K.REPLICAS_KEY, {me: now_ms}),
                pipe.zremrangebyscore(K.REPLICAS_KEY, 0, now_ms - dead_after_ms),
                pipe.zcard(K.REPLICAS_KEY),
            ],
        )
        return int(res[2])

    async def leave(self, me: str) -> None:
        """Remove this replica from the live set (graceful stop)."""
        await self.redis.zrem(K.REPLICAS_KEY, me)

    async def link_sync(self, me: str, state: str, reason: str, since: float) -> float | None:
        """Publish a replica's link state; returns when an operator last asked to resume, if ever."""

        fields: dict[EncodableT, EncodableT] = {k: v for k, v in K.link_fields(state, reason, since).items()}

        def queue(pipe: Pipeline) -> list[object]:
            return [
                pipe.hset(K.link_key(me), mapping=fields),
                pipe.expire(K.link_key(me), LINK_TTL_S),
                pipe.hget(K.LINK_KEY, K.RESUME_FIELD),
            ]

        res = await pipelined(self.redis, queue)
        return float(res[2]) if res[2] is not None else None

    async def request_resume(self, now: float) -> None:
        """Ask every replica to resume a paused or auth-failed link."""
        await self.redis.hset(K.LINK_KEY, K.RESUME_FIELD, now)

    async def link_states(self) -> dict[str, dict[str, str]]:
        """Link state as each live replica last published it."""
        out: dict[str, dict[str, str]] = {}
        async for key in self.redis.scan_iter(match=K.LINK_KEY_PATTERN, count=100):
            raw = await self.redis.hgetall(key)
            out[K.replica_of_link_key(text(key))] = {text(k): text(v) for k, v in raw.items()}
        return out
