"""Shard readers: a shard's streams into its per-key queues, oldest first, within the buffer.

On taking a shard, its reader first takes back every pending entry (XAUTOCLAIM from ``0-0``, in
stream order; after a takeover grace if the shard was not handed back cleanly), then reads new
entries (XREADGROUP). Entries go into ``shard.queues``; a key whose queue is new is handed to
the worker pool through ``ready``. Room is reserved in the ``Buffer`` before every read.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable

import structlog

from relay import metrics
from relay.buffer import Buffer
from relay.config import MODULES, ForwarderSettings
from relay.errors import NoGroup, StoreUnavailable
from relay.shard import Abandon, QKey, Shard
from relay.store import DeliveryStore, Entry, Store, id_tuple
from relay.store import keys as K

log = structlog.get_logger(__name__)


class Reader:
    """Reads the shards this replica owns (``read_loop``: one task per shard) into their key queues."""

    def __init__(
        self,
        cfg: ForwarderSettings,
        store: Store,
        ds: DeliveryStore,
        me: str,
        buffer: Buffer,
        ready: Callable[[Shard, QKey], None],
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.ds = ds
        self.me = me
        self.buffer = buffer
        self.ready = ready  # hands a key with a new queue (nobody works on it yet) to the workers
        # Shards we stopped working on with a request of ours cut on the wire: the IOP may still
        # apply it. If we take such a shard back, its pending entries are ours, not "foreign", but
        # the takeover grace applies all the same before they are sent again.
        self.cut: set[int] = set()

    async def read_loop(self, shard: Shard) -> None:
        """Recover the shard, then read its streams into the key queues until it is gone.

        Failure policy: after a failed read the shard is recovered again (a read whose reply was
        lost left entries pending to us, never queued: reading on would send newer ones first).
        """
        streams = {K.stream_key(m, shard.index): shard.index for m in MODULES}
        cdr_stream = K.stream_key("cdrs", shard.index)
        without_cdrs = {s: i for s, i in streams.items() if s != cdr_stream}
        delay = 0.1
        recovered = False
        while not shard.gone():
            try:
                if not recovered:
                    await self._recover(shard)
                    recovered, shard.dirty = True, False  # the takeover grace is behind us
                    continue
                entries = await self._read(streams, without_cdrs, self.cfg.read_batch, None)
                if not entries:
                    # Nothing new: wait for the next entry holding room for one per stream, not for a
                    # batch: a reader blocked on a quiet shard would keep that room from busy ones.
                    entries = await self._read(streams, without_cdrs, len(streams), 1000)
                delay = 0.1
            except Abandon:
                return
            except StoreUnavailable as exc:
                recovered = False
                await self._redis_trouble(exc, delay)
                delay = min(delay * 2, 5.0)
                continue
            self.feed(shard, entries)

    async def _recover(self, shard: Shard) -> None:
        """Take back every pending entry of the shard, oldest first, before reading new ones.

        Failure policy: pending entries were read by a replica (maybe us in an earlier life)
        that did not finish them. After a takeover from a replica that did not hand the shard
        back, we first wait ``claim_idle_s`` (longer than any attempt can last) so an attempt of
        the old owner still in flight cannot land after our resend of a later event.
        """
        streams = [K.stream_key(m, shard.index) for m in MODULES]
        foreign = 0
        for stream in streams:
            foreign += await self.ds.foreign_pending(stream, self.me)
        ours_cut = shard.index in self.cut
        if shard.dirty and (foreign or ours_cut):
            log.info("takeover_grace", shard=shard.index, pending=foreign, own_cut=ours_cut,
                     wait_s=self.cfg.claim_idle_s)  # fmt: skip
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(shard.lost.wait(), self.cfg.claim_idle_s)
            if shard.lost.is_set():
                raise Abandon("lease lost during takeover grace")
        self.cut.discard(shard.index)
        shard.parked |= await self.ds.parked_fields(shard.index)  # |=: a runner may have parked meanwhile
        buffer = self.buffer
        for stream in streams:
            start = "0-0"
            while True:
                count = await buffer.reserve(self.cfg.read_batch)
                try:
                    start, entries = await self.ds.claim(stream, shard.index, self.me, start, count)
                finally:
                    buffer.free(count)
                self.feed(shard, entries)
                if start == "0-0" or not entries:
                    break

    async def _read(
        self, streams: dict[str, int], without_cdrs: dict[str, int], want: int, block_ms: int | None
    ) -> list[Entry]:
        """Read new entries into reserved room; the caller feeds them (no await in between)."""
        buffer = self.buffer
        count = await buffer.reserve(want)
        # XREADGROUP's COUNT applies to each stream: split the reserved room between them. (With
        # less room than streams, which only a max_buffered under 40 allows, one entry per stream
        # may exceed it by a few.)
        per = max(1, count // len(streams))
        cdr_room = buffer.reserve_cdrs(per)
        names = streams if cdr_room else without_cdrs
        try:
            return await self.ds.read_new(names, self.me, per if cdr_room else max(1, count // len(names)), block_ms)
        finally:
            buffer.release_cdrs(cdr_room)
            buffer.free(count)

    async def _redis_trouble(self, exc: StoreUnavailable, delay: float) -> None:
        metrics.REDIS_ERRORS.labels(op="read").inc()
        if isinstance(exc, NoGroup):
            # Redis restarted without our groups (or someone deleted a stream): recreate them and
            # read from the start; entries already delivered were deleted, so nothing repeats.
            log.warning("nogroup_recreating_groups")
            with contextlib.suppress(StoreUnavailable):
                await self.store.ensure_groups()
                await self.store.load_scripts()
                await self.ds.load_scripts()
            return
        log.warning("redis_read_failed", error=str(exc), retry_in_s=delay)
        await asyncio.sleep(delay)

    def feed(self, shard: Shard, entries: list[Entry]) -> None:
        """Queue entries just read (their read's reservation already freed) and count them in the
        buffer; a key whose queue is new goes to ``ready``.

        Failure policy: an entry not newer than the last one queued for its key is already held
        (a consumer group recreated after NOGROUP hands its stream out again from 0): queued
        twice, the key would go back to an older update, so it is not queued again.
        """
        if not entries:
            return
        self.buffer.add(len(entries), sum(1 for e in entries if e.event.module == "cdrs"))
        held = held_cdrs = 0
        for entry in entries:
            qkey = (entry.event.module, entry.event.key)
            q = shard.queues.get(qkey)
            if q is None:
                shard.queues[qkey] = deque((entry,))
                self.ready(shard, qkey)  # a new queue: nobody works on the key yet
                continue
            if q and id_tuple(entry.id) <= id_tuple(q[-1].id):
                held += 1
                held_cdrs += entry.event.module == "cdrs"
                continue
            q.append(entry)
        if held:
            self.buffer.free(held, held_cdrs)
