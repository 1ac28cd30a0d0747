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

SHORT_ROUND_S = 0.5  # the lease round's period while we hold fewer shards than our fair share


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
        self.fair = 0  # our fair share of the shards, as of the last round
        self.renewed_at = time.monotonic()  # start of the last round whose renewals all answered
        # The hand-back in progress (its own task: it may wait ``shutdown_timeout_s`` for an attempt on
        # the wire, while the rounds must go on renewing the other shards on schedule) and its shard.
        self._handing: asyncio.Task[None] | None = None
        self._handing_index: int | None = None

    async def run(self) -> None:
        """Hold a fair share of the shards: renew ours, take free ones, hand back extras.

        Failure policy: without Redis we cannot know whether we still own our shards: after 70 %
        of the lease TTL without a successful round, every shard is lost (work on it stops)
        before its lease can have expired, so no other replica ever overlaps with us.
        """
        interval = self.cfg.lease_ttl_s / 3
        self.renewed_at = time.monotonic()
        watchdog = asyncio.create_task(self._watchdog(), name="relay-lease-watchdog")
        publisher = asyncio.create_task(self._publish_link_changes(), name="relay-link-publisher")
        try:
            await self._rounds(interval)
        finally:
            for task in (watchdog, publisher):
                task.cancel()
            await asyncio.gather(watchdog, publisher, return_exceptions=True)
            await self.handed_back()

    async def _publish_link_changes(self) -> None:
        """Publish the link state as soon as it changes (`relay status` shows it within a second), not only
        at the next round (a third of the lease TTL later); the rounds publish it too, in case one is lost."""
        changed = self.link.changed
        while not self.stopping.is_set():
            await changed.wait()
            changed.clear()
            if self.stopping.is_set():
                return  # stop() removes what we published; do not write it back
            try:
                await self.sync_link()
            except StoreUnavailable as exc:
                metrics.REDIS_ERRORS.labels(op="lease").inc()
                log.debug("link_publish_failed", error=str(exc))

    async def _rounds(self, interval: float) -> None:
        while not self.stopping.is_set():
            wait = interval
            try:
                await self.round()
                if len(self.owned) < self.fair:
                    # Short of our share: a lease of a dead replica expires within the TTL; try
                    # again soon so its shards move within a fraction of a second of the expiry,
                    # not a third of the TTL later (docs/delivery.md "Crash recovery and replicas").
                    wait = min(interval, SHORT_ROUND_S)
                await self.sync_link()
            except StoreUnavailable as exc:
                metrics.REDIS_ERRORS.labels(op="lease").inc()
                log.warning("lease_round_failed", error=str(exc))
                if time.monotonic() - self.renewed_at > self.cfg.lease_ttl_s * 0.7:
                    for index in list(self.owned):
                        self.owner.lose(index, "redis unreachable")
            metrics.SHARDS_OWNED.set(len(self.owned))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), wait)

    async def _watchdog(self) -> None:
        """Let every shard go 70 % of the TTL after the start of the last round that renewed them,
        however long a round takes (Redis calls that hang until their socket timeout, a slow
        hand-back): checked only after a failed round, the rule could fire after our leases expired,
        and a new owner's takeover hold counts on us having stopped by then."""
        limit = self.cfg.lease_ttl_s * 0.7
        while not self.stopping.is_set():
            left = self.renewed_at + limit - time.monotonic()
            if left <= 0:
                for index in list(self.owned):
                    self.owner.lose(index, "redis unreachable")  # no renewal answered in time
                left = 0.05
            await asyncio.sleep(left)

    async def round(self) -> None:
        """One round: heartbeat, renew (or lose) ours, acquire up to the fair share, hand back one extra
        (in a task of its own, one at a time: the next rounds renew the other shards meanwhile)."""
        started = time.monotonic()  # no later than the renewals: our leases last a TTL from it
        # A replica silent for a lease TTL is dead: its leases (renewed in the round of its last
        # heartbeat) expire with it, and the survivors' fair share grows at the same moment.
        alive = await self.ds.heartbeat(self.me, int(self.clock() * 1000), self.ttl_ms)
        total = self.total
        fair = self.fair = math.ceil(total / max(1, alive))
        for index in list(self.owned):
            if not await self.ds.renew(index, self.me, self.ttl_ms):
                self.owner.lose(index, "lease lost")
        self.renewed_at = started
        # Start the scan at a replica-specific offset so replicas do not race for the same shard.
        offset = hash(self.me) % total
        for i in range(total):
            index = (offset + i) % total
            if len(self.owned) >= fair:
                break
            if index in self.owned or index == self._handing_index:
                continue  # ours, or being handed back (still our lease until released)
            previous = await self.ds.acquire(index, self.me, self.ttl_ms)
            if previous is not None:
                self.owner.own(index, dirty=not previous.startswith("free:"))
        if len(self.owned) > fair and self._handing is None:
            index = self._handing_index = max(self.owned)
            self._handing = asyncio.create_task(self._hand_back(index), name=f"relay-hand-back-{index}")

    async def _hand_back(self, index: int) -> None:
        """Hand one shard back, and release its lease if nothing of ours is left on the wire.

        Failure policy: a release refused by an unreachable Redis leaves the lease to expire (the next
        owner then waits ``claim_idle_s``, as after a takeover)."""
        try:
            if await self.owner.hand_back(index):
                await self.release(index)
                log.info("shard_released", shard=index, replica=self.me)
        except StoreUnavailable as exc:
            metrics.REDIS_ERRORS.labels(op="lease").inc()
            log.warning("shard_release_failed", shard=index, error=str(exc))
        finally:
            self._handing = None
            self._handing_index = None

    async def handed_back(self) -> None:
        """Wait for the hand-back in progress, if any, to end."""
        if self._handing is not None:
            await asyncio.shield(self._handing)

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
