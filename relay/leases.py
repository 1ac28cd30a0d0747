"""Which shards this replica works on: heartbeat, shard leases, a fair share of them.

Each replica heartbeats in ``relay:replicas`` and holds ``ceil(shards / alive)`` shard leases
(``SET NX PX lease_ttl_s``, renewed every third of it by a compare-and-renew script). ``LeaseLoop``
runs that round and tells its ``ShardOwner`` (the forwarder) when a shard becomes ours
(``own``), stops being ours (``lose``), or is one too many (``hand_back``, then released as
``free:<id>`` if nothing of ours is left on the wire). It never looks into the owner's shards
beyond which indexes it holds, and does not import the forwarder.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Mapping
from typing import Protocol

import structlog

from relay import metrics
from relay.config import ForwarderSettings
from relay.errors import StoreUnavailable
from relay.link import Link

log = structlog.get_logger(__name__)


class ShardOwner(Protocol):
    """What the lease loop calls back into when shards come and go."""

    def own(self, index: int, *, dirty: bool) -> None:
        """Start working on a shard we now hold; ``dirty``: its previous holder did not hand it back."""

    def lose(self, index: int, reason: str) -> None:
        """Stop working on a shard at once: its lease is, or may soon be, someone else's."""

    async def hand_back(self, index: int) -> bool:
        """Stop working on a shard and let its work end; True when it may be released cleanly."""
        ...


class LeaseStore(Protocol):
    """The Redis side of the leases (``relay.store.Leases``, a part of ``DeliveryStore``)."""

    async def heartbeat(self, me: str, now_ms: int, dead_after_ms: int) -> int: ...
    async def renew(self, shard: int, me: str, ttl_ms: int) -> bool: ...
    async def acquire(self, shard: int, me: str, ttl_ms: int) -> str | None: ...
    async def release(self, shard: int, me: str, ttl_ms: int) -> None: ...
    async def leave(self, me: str) -> None: ...
    async def link_sync(self, me: str, state: str, reason: str, since: float) -> float | None: ...


class LeaseLoop:
    """The lease loop of one replica; ``owned`` is the owner's map of the shards it works on."""

    def __init__(
        self,
        cfg: ForwarderSettings,
        ds: LeaseStore,
        link: Link,
        me: str,
        total: int,
        owned: Mapping[int, object],
        owner: ShardOwner,
        *,
        stopping: asyncio.Event,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.ds = ds
        self.link = link
        self.me = me
        self.total = total
        self.owned = owned
        self.owner = owner
        self.stopping = stopping
        self.clock = clock
        self.ttl_ms = int(cfg.lease_ttl_s * 1000)

    async def run(self) -> None:
        """Hold a fair share of the shards: renew ours, take free ones, hand back extras.

        Failure policy: without Redis we cannot know whether we still own our shards: after 70 %
        of the lease TTL without a successful round, every shard is lost (work on it stops)
        before its lease can have expired, so no other replica ever overlaps with us.
        """
        interval = self.cfg.lease_ttl_s / 3
        renewed_at = time.monotonic()
        while not self.stopping.is_set():
            try:
                await self.round()
                await self.sync_link()
                renewed_at = time.monotonic()
            except StoreUnavailable as exc:
                metrics.REDIS_ERRORS.labels(op="lease").inc()
                log.warning("lease_round_failed", error=str(exc))
                if time.monotonic() - renewed_at > self.cfg.lease_ttl_s * 0.7:
                    for index in list(self.owned):
                        self.owner.lose(index, "redis unreachable")
            metrics.SHARDS_OWNED.set(len(self.owned))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), interval)

    async def round(self) -> None:
        """One round: heartbeat, renew (or lose) ours, acquire up to the fair share, hand back one extra."""
        alive = await self.ds.heartbeat(self.me, int(self.clock() * 1000), self.ttl_ms * 2)
        total = self.total
        fair = math.ceil(total / max(1, alive))
        for index in list(self.owned):
            if not await self.ds.renew(index, self.me, self.ttl_ms):
                self.owner.lose(index, "lease lost")
        # Start the scan at a replica-specific offset so replicas do not race for the same shard.
        offset = hash(self.me) % total
        for i in range(total):
            index = (offset + i) % total
            if len(self.owned) >= fair:
                break
            if index in self.owned:
                continue
            previous = await self.ds.acquire(index, self.me, self.ttl_ms)
            if previous is not None:
                self.owner.own(index, dirty=not previous.startswith("free:"))
        if len(self.owned) > fair:
            index = max(self.owned)
            if await self.owner.hand_back(index):
                await self.release(index)
                log.info("shard_released", shard=index, replica=self.me)

    async def sync_link(self) -> None:
        """Publish our link state for `relay status`; obey an operator's `relay link resume`."""
        link = self.link
        resume_at = await self.ds.link_sync(self.me, link.state, link.reason, link.since)
        if resume_at is not None and resume_at > link.since and link.awaiting_operator:
            await link.resume("operator resumed the link")

    async def release(self, index: int) -> None:
        """Hand a shard's lease back as ``free:<id>``: its next owner need not wait ``claim_idle_s``."""
        await self.ds.release(index, self.me, self.ttl_ms)

    async def leave(self) -> None:
        """Leave the live set of replicas (graceful stop): the others' fair share grows at once."""
        await self.ds.leave(self.me)
