"""Shard readers: a shard's streams into its per-key queues, oldest first, within the buffer.

On taking a shard, its reader first takes back every pending entry (XAUTOCLAIM from ``0-0``, in
stream order), then reads new entries (XREADGROUP). Entries go into ``shard.queues``; a key whose
queue is new is handed to the worker pool through ``ready``. Room is reserved in the ``Buffer``
before every read. After a takeover from an owner that did not hand the shard back, the keys with
pending entries are held (queued, not handed out) until the old owner's requests cannot land any
more; every other key goes on at once (``Hold``, docs/delivery.md "Crash recovery and replicas").
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from relay import compaction, metrics
from relay.buffer import Buffer
from relay.config import MODULES, ForwarderSettings
from relay.errors import NoGroup, StoreUnavailable
from relay.shard import Abandon, QKey, Shard
from relay.store import DeliveryStore, Entry, Store, id_tuple
from relay.store import keys as K

log = structlog.get_logger(__name__)


@dataclass
class Hold:
    """Keys of a taken-over shard that wait until the old owner's requests cannot land (takeover hold)."""

    shard: Shard
    until: float  # epoch s: the hold ends then
    keys: set[QKey] = field(default_factory=set)
    timer: asyncio.TimerHandle | None = None


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
        *,
        attempt_s: float | None = None,
        clock: Callable[[], float] = time.time,
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
        # The longest one request to the IOP can last ([iop] connect_timeout_s + request_timeout_s):
        # a held key waits that long after the takeover. Not given: claim_idle_s, the older and
        # longer grace (config validation keeps it above the attempt deadline).
        self.hold_s = attempt_s if attempt_s is not None else cfg.claim_idle_s
        self.clock = clock
        self.holds: dict[int, Hold] = {}  # shard index → its takeover hold, while one is in force
        # shard index → (its Shard, suspect, hold until): the takeover decision of a recovery under way
        self._suspects: dict[int, tuple[Shard, bool, float]] = {}

    async def read_loop(self, shard: Shard) -> None:
        """Recover the shard, then read its streams into the key queues until it is gone.

        Failure policy: after a failed read the shard is recovered again (a read whose reply was
        lost left entries pending to us, never queued: reading on would send newer ones first).
        """
        streams = {K.stream_key(m, shard.index): shard.index for m in MODULES}
        cdr_stream = K.stream_key("cdrs", shard.index)
        without_cdrs = {s: i for s, i in streams.items() if s != cdr_stream}
        try:
            await self._loop(shard, streams, without_cdrs)
        finally:
            self._cancel_hold(shard)  # lost or stopping: held keys are dropped, still pending in Redis
            self._undecide(shard)

    async def _loop(self, shard: Shard, streams: dict[str, int], without_cdrs: dict[str, int]) -> None:
        delay = 0.1
        recovered = False
        while not shard.gone():
            try:
                if not recovered:
                    await self._recover(shard)
                    recovered, shard.dirty = True, False  # a later recovery holds nothing new
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

        Failure policy: pending entries were read by a replica (maybe us in an earlier life) that
        did not finish them. After a takeover from a replica that did not hand the shard back (or
        of a shard we lost with a request of ours cut on the wire), any of them may be on the wire
        still: their keys are held (``Hold``) until ``hold_s`` after now, when no request of the
        old owner can land any more; keys without a pending entry, and new entries of other keys,
        go on at once. A recovery retried after a Redis error keeps the first pass's decision and deadline
        (decided once per Shard object, before its first claim).
        """
        started = self.clock()
        streams = [K.stream_key(m, shard.index) for m in MODULES]
        index = shard.index
        # Decided once per Shard object, before its first claim: a claim whose reply was lost left the
        # old owner's entries pending to us, and a retried pass would count none of them as foreign.
        decided = self._suspects.get(index)
        if decided is None or decided[0] is not shard:
            foreign = 0
            for stream in streams:
                foreign += await self.ds.foreign_pending(stream, self.me)
            ours_cut = index in self.cut
            suspect = shard.dirty and bool(foreign or ours_cut)
            decided = self._suspects[index] = (shard, suspect, started + self.hold_s if suspect else 0.0)
            if suspect:
                log.info("takeover_hold_begins", shard=index, pending=foreign, own_cut=ours_cut,
                         wait_s=round(self.hold_s, 3))  # fmt: skip
        _, suspect, until = decided
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
                if suspect and entries:
                    # Every pending entry of a dirty takeover is the old owner's (its recovery
                    # claimed all older ones before it read anything), and any may be on the wire.
                    self._hold(shard, {(e.event.module, e.event.key) for e in entries}, until)
                self.feed(shard, entries)
                if start == "0-0" or not entries:
                    break
        self.cut.discard(index)
        self._undecide(shard)  # recovered: a later recovery of this shard holds nothing new
        hold = self.holds.get(index)
        if suspect and hold is not None and hold.shard is shard:
            with contextlib.suppress(StoreUnavailable):  # only `relay status` misses it
                fields = {K.key_field(m, k): hold.until for m, k in hold.keys}
                await self.ds.publish_holds(shard.index, fields, hold.until)
            log.info("takeover_hold", shard=shard.index, keys=len(hold.keys),
                     wait_s=round(max(0.0, hold.until - self.clock()), 3))  # fmt: skip

    def _undecide(self, shard: Shard) -> None:
        """Forget the takeover decision of this Shard object's recovery (done, or the shard gone)."""
        decided = self._suspects.get(shard.index)
        if decided is not None and decided[0] is shard:
            del self._suspects[shard.index]

    # -- the takeover hold ----------------------------------------------------------------------

    def _hold(self, shard: Shard, keys: set[QKey], until: float) -> None:
        """Hold these keys of a shard (not handed to the workers) until ``until`` (epoch s)."""
        hold = self.holds.get(shard.index)
        if hold is None or hold.shard is not shard:
            hold = self.holds[shard.index] = Hold(shard, until)
            # Requests of the old owner may be on the wire for this shard: counted as ours, a
            # hand-back or a stop during the hold does not release the lease as free: (whose next
            # owner would send the held keys at once), and losing the shard marks it cut.
            shard.sending += 1
        # A key with a queue that is not held already is being worked on: it cannot be (and, all
        # pending entries being claimed before anything is read, never needs to be) held.
        new = {k for k in keys - hold.keys if k not in shard.queues}
        hold.keys |= new
        metrics.TAKEOVER_HELD_KEYS.inc(len(new))
        if hold.timer is None or until > hold.until:
            if hold.timer is not None:
                hold.timer.cancel()
            hold.until = max(hold.until, until)
            loop = asyncio.get_running_loop()
            hold.timer = loop.call_later(max(0.0, hold.until - self.clock()), self._release, shard)

    def _release(self, shard: Shard) -> None:
        """The hold's end: its keys go to the workers (or are forgotten if the shard is gone)."""
        hold = self.holds.get(shard.index)
        if hold is None or hold.shard is not shard:
            return
        del self.holds[shard.index]
        shard.sending -= 1
        metrics.TAKEOVER_HELD_KEYS.dec(len(hold.keys))
        log.info("takeover_hold_ends", shard=shard.index, keys=len(hold.keys))
        for qkey in hold.keys:
            if shard.gone():
                self._forget(shard, qkey)
            elif shard.queues.get(qkey):
                self.ready(shard, qkey)

    def _cancel_hold(self, shard: Shard) -> None:
        """The shard is lost or the relay stops during a hold: its held keys are forgotten, not sent
        (their entries stay pending in Redis for the next owner) and give their buffer room back."""
        hold = self.holds.get(shard.index)
        if hold is None or hold.shard is not shard:
            return
        del self.holds[shard.index]
        if hold.timer is not None:
            hold.timer.cancel()
        # shard.sending stays raised (the Shard is being dropped): the forwarder's lose() and
        # hand_back() then treat the shard as cut, and whoever takes it next holds these keys too.
        metrics.TAKEOVER_HELD_KEYS.dec(len(hold.keys))
        log.info("takeover_hold_cancelled", shard=shard.index, keys=len(hold.keys))
        for qkey in hold.keys:
            self._forget(shard, qkey)

    def _forget(self, shard: Shard, qkey: QKey) -> None:
        q = shard.queues.pop(qkey, None)
        if q:  # squeezed while held: units and raw entries each leave their own count
            compaction.drop(q, self.buffer, qkey[0] == "cdrs")

    def held(self, shard: Shard, qkey: QKey) -> bool:
        """Whether a key of a shard waits in a takeover hold."""
        hold = self.holds.get(shard.index)
        return hold is not None and hold.shard is shard and qkey in hold.keys

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

        Failure policy: an entry not newer than the newest one queued for its key is already held
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
                if not (self.holds and self.held(shard, qkey)):
                    self.ready(shard, qkey)  # a new queue: nobody works on the key yet
                continue
            if q and id_tuple(entry.id) <= compaction.newest(q):
                held += 1
                held_cdrs += entry.event.module == "cdrs"
                continue
            q.append(entry)
        if held:
            self.buffer.free(held, held_cdrs)
