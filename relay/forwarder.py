"""The delivery engine: shard leases, consumer-group readers, workers and key runners, order per object.

Data path: shard streams → per-key queues (bounded) → a fixed pool of workers → Link slot →
OcpiClient → classify → ack; a key that needs more than one delivered attempt (retries, dead
letters, a CDR waiting for its session, a parked key) gets a runner task of its own until its head
entry is done. See docs/delivery.md for the design and its guarantees.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import os
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
import structlog
from redis.exceptions import RedisError
from tenacity import AsyncRetrying, RetryCallState, retry_if_result

from relay import logs, metrics, outgoing
from relay.config import MODULES, Settings
from relay.errors import StoreUnavailable
from relay.events import Event
from relay.link import GaveUp, Link
from relay.ocpi_client import NotConfigured, OcpiClient
from relay.retry import Kind, Outcome, backoff_s, classify
from relay.store import DeliveryStore, Entry, Store, id_tuple, is_nogroup
from relay.store import keys as K

log = structlog.get_logger(__name__)
_T = TypeVar("_T")
_info_encoder = msgspec.msgpack.Encoder()


class Abandon(Exception):
    """Stop working on an entry without acknowledging it (stopping, or the shard lease was lost)."""


@dataclass
class _Shard:
    """What this replica holds for one shard it owns."""

    index: int
    dirty: bool  # taken over from a replica that did not hand it back cleanly
    queues: dict[tuple[str, str], deque[Entry]] = field(default_factory=dict)
    runners: dict[tuple[str, str], asyncio.Task[None]] = field(default_factory=dict)
    reader: asyncio.Task[None] | None = None
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    sending: int = 0  # requests of this shard on the wire right now
    # Keys of this shard held by a worker's attempt or by an acknowledgement in flight (the keys
    # held by a runner task are in ``runners``).
    active: int = 0
    # module|key fields parked in Redis, loaded when the shard is taken: the common case (nothing
    # parked) then costs no Redis read per event. A replay unparks in Redis only; a stale member
    # is checked against Redis before it is believed.
    parked: set[str] = field(default_factory=set)


@dataclass(slots=True)
class _Attempts:
    count: int = 0
    first_at: float = 0.0
    last_at: float = 0.0
    last: Outcome | None = None
    heal: bool = False  # the IOP did not know the object: send a PUT of the whole object next


_HEALING = "healing: the IOP does not know the object; a PUT of the whole object follows"


_KIND_LABEL = {kind: kind.value for kind in Kind}  # a dict lookup, not an enum property call per event


def _log_attempt(ev: Event, attempts: _Attempts, outcome: Outcome, request_id: str) -> None:
    if outcome.kind is not Kind.DELIVERED:
        log.warning(
            "delivery_failed", event_id=ev.id, module=ev.module, key=ev.key, attempt=attempts.count,
            outcome=outcome.kind.value, reason=outcome.reason, http_status=outcome.http_status,
            ocpi_code=outcome.ocpi_code, request_id=request_id, correlation_id=ev.correlation_id or ev.id,
        )  # fmt: skip
    else:
        log.debug("delivered", event_id=ev.id, module=ev.module, key=ev.key, attempt=attempts.count,
                  request_id=request_id, correlation_id=ev.correlation_id or ev.id)  # fmt: skip


def default_replica_id() -> str:
    """Unique per process: a restarted process is a new consumer (its predecessor's work is reclaimed)."""
    return f"{socket.gethostname()}-{os.getpid()}-{os.urandom(3).hex()}"


class Forwarder:
    """Delivers every stream entry of the shards this replica owns, in order per ordering key."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        client: OcpiClient,
        link: Link,
        *,
        replica_id: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.cfg = settings.forwarder
        self.store = store
        self.ds = DeliveryStore(store)
        self.client = client
        self.link = link
        self.me = replica_id or default_replica_id()
        self.clock = clock
        self.shards: dict[int, _Shard] = {}
        self._buffered = 0  # entries held in memory, plus the room reserved by reads in flight
        self._cdrs = 0  # of which CDRs (they may wait for session updates not read yet)
        self._cdrs_reading = 0  # room reserved for CDRs by reads in flight
        self._cdr_limit = max(1, self.cfg.max_buffered // 2)
        self._room = asyncio.Event()
        # A reader waits for this much room: reading one entry per round trip as slots free up
        # would cost a Redis call per event.
        self._low_water = max(1, min(self.cfg.read_batch, self.cfg.max_buffered // 8))
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._ttl_ms = int(self.cfg.lease_ttl_s * 1000)
        # Whether "delivered" debug lines are written (set once logging is configured, in start()):
        # building the fields of a line that is then filtered out costs ~3.5 µs per event.
        self._debug = True
        # Keys with entries and nobody working on them, for the workers. A key with a queue in
        # shard.queues is in exactly one place: here, a worker's attempt, an ack in flight, or a
        # runner task. Never two: that is what keeps one event per key in flight.
        self._ready: deque[tuple[_Shard, tuple[str, str]]] = deque()
        self._idle: deque[asyncio.Future[None]] = deque()  # one per worker waiting for a ready key
        self._workers: set[asyncio.Task[None]] = set()
        self._working: dict[asyncio.Task[None], _Shard] = {}  # worker → shard of its attempt on the wire
        # Shards we stopped working on with a request of ours cut on the wire: the IOP may still
        # apply it. If we take such a shard back, its pending entries are ours, not "foreign", but
        # the takeover grace applies all the same before they are sent again.
        self._cut: set[int] = set()

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load scripts and start the lease loop (which starts shard readers)."""
        await self.ds.load_scripts()
        self._debug = logs.debug_enabled()
        for _ in range(self.cfg.concurrency):
            self._spawn_worker()
        self._tasks.append(asyncio.create_task(self._lease_loop(), name="relay-leases"))
        log.info("forwarder_started", replica=self.me, concurrency=self.cfg.concurrency)

    async def stop(self) -> None:
        """Stop reading, let in-flight attempts finish within the deadline, hand shards back.

        Failure policy: nothing is acknowledged that was not delivered or dead-lettered; events
        waiting in a backoff or in memory stay pending in Redis and the next owner resumes them.
        """
        self._stopping.set()
        await self.link.wake()  # attempts waiting behind a paused or down link give up now
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        readers = [s.reader for s in self.shards.values() if s.reader is not None]
        for r in readers:
            r.cancel()
        self._wake_idle()  # idle workers leave; busy ones end their attempt first
        shards = list(self.shards.values())
        busy = [r for s in shards for r in s.runners.values()] + list(self._workers)
        deadline = time.monotonic() + self.cfg.shutdown_timeout_s
        if busy:
            await asyncio.wait(busy, timeout=self.cfg.shutdown_timeout_s)
        await self._settle(shards, deadline)  # acknowledgements still in flight
        cut = {s.index for s in shards if s.sending}
        left = [r for s in shards for r in s.runners.values()] + list(self._workers)
        for r in left:
            r.cancel()
        await asyncio.gather(*left, *readers, return_exceptions=True)
        for index in list(self.shards):
            if index in cut:
                # A request was cut short on the wire: the IOP may still apply it. Not handing the
                # shard back cleanly makes the next owner wait claim_idle_s before resending.
                log.warning("shard_not_released", shard=index, reason="attempt cut short at shutdown")
                continue
            with contextlib.suppress(RedisError, OSError):
                await self.ds.release(index, self.me, self._ttl_ms)
        self.shards.clear()
        with contextlib.suppress(RedisError, OSError):
            await self.ds.leave(self.me)
        metrics.SHARDS_OWNED.set(0)
        log.info("forwarder_stopped", replica=self.me)

    # -- leases ---------------------------------------------------------------------------------

    async def _lease_loop(self) -> None:
        """Hold a fair share of the shards: renew ours, take free ones, hand back extras."""
        interval = self.cfg.lease_ttl_s / 3
        renewed_at = time.monotonic()
        while not self._stopping.is_set():
            try:
                await self._lease_round()
                await self._sync_link()
                renewed_at = time.monotonic()
            except (RedisError, OSError) as exc:
                metrics.REDIS_ERRORS.labels(op="lease").inc()
                log.warning("lease_round_failed", error=str(exc))
                # Without Redis we cannot know whether we still own our shards: stop working on
                # them before the leases can have expired, so no other replica overlaps with us.
                if time.monotonic() - renewed_at > self.cfg.lease_ttl_s * 0.7:
                    for index in list(self.shards):
                        self._lose(index, "redis unreachable")
            metrics.SHARDS_OWNED.set(len(self.shards))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), interval)

    async def _sync_link(self) -> None:
        """Publish our link state for `relay status`; obey an operator's `relay link resume`."""
        resume_at = await self.ds.link_sync(self.me, self.link.state, self.link.reason, self.link.since)
        if resume_at is not None and resume_at > self.link.since and self.link.state in ("auth_failed", "paused"):
            await self.link.resume("operator resumed the link")

    async def _lease_round(self) -> None:
        alive = await self.ds.heartbeat(self.me, int(self.clock() * 1000), self._ttl_ms * 2)
        total = self.store.shards
        fair = math.ceil(total / max(1, alive))
        for index in list(self.shards):
            if not await self.ds.renew(index, self.me, self._ttl_ms):
                self._lose(index, "lease lost")
        # Start the scan at a replica-specific offset so replicas do not race for the same shard.
        offset = hash(self.me) % total
        for i in range(total):
            index = (offset + i) % total
            if len(self.shards) >= fair:
                break
            if index in self.shards:
                continue
            previous = await self.ds.acquire(index, self.me, self._ttl_ms)
            if previous is not None:
                self._own(index, dirty=not previous.startswith("free:"))
        if len(self.shards) > fair:
            await self._hand_back(max(self.shards))

    def _own(self, index: int, *, dirty: bool) -> None:
        shard = _Shard(index=index, dirty=dirty)
        self.shards[index] = shard
        shard.reader = asyncio.create_task(self._read_loop(shard), name=f"relay-shard-{index}")
        log.info("shard_acquired", shard=index, replica=self.me, takeover=dirty)

    def _lose(self, index: int, reason: str) -> None:
        shard = self.shards.pop(index, None)
        if shard is None:
            return
        shard.lost.set()
        if shard.reader is not None:
            shard.reader.cancel()
        if shard.sending:
            self._cut.add(index)
        for r in shard.runners.values():
            r.cancel()
        self._cut_workers(shard)
        log.warning("shard_lost", shard=index, reason=reason)

    async def _hand_back(self, index: int) -> None:
        """Rebalance: stop the shard, wait for its in-flight attempts, then release it cleanly."""
        shard = self.shards.pop(index)
        shard.lost.set()
        await self.link.wake()  # its attempts waiting behind a paused or down link give up now
        if shard.reader is not None:
            shard.reader.cancel()
        await self._settle([shard], time.monotonic() + self.cfg.shutdown_timeout_s)
        if shard.sending:
            # An attempt is still on the wire: let the lease expire instead, so the next owner
            # waits claim_idle_s (longer than any attempt) before resending after it.
            self._cut.add(index)
            for r in shard.runners.values():
                r.cancel()
            self._cut_workers(shard)
            log.warning("shard_not_released", shard=index, reason="attempt still in flight")
            return
        await self.ds.release(index, self.me, self._ttl_ms)
        log.info("shard_released", shard=index, replica=self.me)

    # -- reading --------------------------------------------------------------------------------

    async def _reserve(self, want: int) -> int:
        """Wait for buffer room and reserve up to ``want`` entries of it before reading.

        Reserving before the read (not counting after it) keeps several shard readers from each
        reading a full batch into the same free room: the buffer never exceeds max_buffered.
        """
        while self.cfg.max_buffered - self._buffered < self._low_water:
            self._room.clear()
            await self._room.wait()
        n = min(want, self.cfg.max_buffered - self._buffered)
        self._buffered += n
        return n

    def _free(self, n: int, cdrs: int = 0) -> None:
        self._buffered -= n
        self._cdrs -= cdrs
        if self.cfg.max_buffered - self._buffered >= self._low_water:
            self._room.set()

    async def _recover(self, shard: _Shard) -> None:
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
        ours_cut = shard.index in self._cut
        if shard.dirty and (foreign or ours_cut):
            log.info("takeover_grace", shard=shard.index, pending=foreign, own_cut=ours_cut,
                     wait_s=self.cfg.claim_idle_s)  # fmt: skip
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(shard.lost.wait(), self.cfg.claim_idle_s)
            if shard.lost.is_set():
                raise Abandon("lease lost during takeover grace")
        self._cut.discard(shard.index)
        shard.parked |= await self.ds.parked_fields(shard.index)  # |=: a runner may have parked meanwhile
        for stream in streams:
            start = "0-0"
            while True:
                count = await self._reserve(self.cfg.read_batch)
                try:
                    start, entries = await self.ds.claim(stream, shard.index, self.me, start, count)
                finally:
                    self._free(count)
                self._feed(shard, entries)
                if start == "0-0" or not entries:
                    break

    async def _read_loop(self, shard: _Shard) -> None:
        streams = {K.stream_key(m, shard.index): shard.index for m in MODULES}
        cdr_stream = K.stream_key("cdrs", shard.index)
        without_cdrs = {s: i for s, i in streams.items() if s != cdr_stream}
        delay = 0.1
        recovered = False
        while not self._stopping.is_set() and not shard.lost.is_set():
            try:
                if not recovered:
                    # First, and again after any failed read: a read whose reply was lost left its
                    # entries pending to us but never queued; reading on would send newer ones first.
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
            except (RedisError, OSError) as exc:
                recovered = False
                await self._redis_trouble(exc, delay)
                delay = min(delay * 2, 5.0)
                continue
            self._feed(shard, entries)

    async def _read(
        self, streams: dict[str, int], without_cdrs: dict[str, int], want: int, block_ms: int | None
    ) -> list[Entry]:
        """Read new entries into reserved room; the caller feeds them (no await in between)."""
        count = await self._reserve(want)
        # XREADGROUP's COUNT applies to each stream: split the reserved room between them. (With
        # less room than streams, which only a max_buffered under 40 allows, one entry per stream
        # may exceed it by a few.)
        per = max(1, count // len(streams))
        # CDRs wait for their session's updates, which may still be unread in Redis: never let them
        # (held or being read) fill more than half the buffer, or a CDR backlog would deadlock the readers.
        cdr_room = per if self._cdrs + self._cdrs_reading + per <= self._cdr_limit else 0
        names = streams if cdr_room else without_cdrs
        self._cdrs_reading += cdr_room
        try:
            return await self.ds.read_new(names, self.me, per if cdr_room else max(1, count // len(names)), block_ms)
        finally:
            self._cdrs_reading -= cdr_room
            self._free(count)

    async def _redis_trouble(self, exc: BaseException, delay: float) -> None:
        metrics.REDIS_ERRORS.labels(op="read").inc()
        if is_nogroup(exc):
            # Redis restarted without our groups (or someone deleted a stream): recreate them and
            # read from the start; entries already delivered were deleted, so nothing repeats.
            log.warning("nogroup_recreating_groups")
            with contextlib.suppress(RedisError, OSError):
                await self.store.ensure_groups()
                await self.store.load_scripts()
                await self.ds.load_scripts()
            return
        log.warning("redis_read_failed", error=str(exc), retry_in_s=delay)
        await asyncio.sleep(delay)

    def _feed(self, shard: _Shard, entries: list[Entry]) -> None:
        if not entries:
            return
        self._buffered += len(entries)
        self._cdrs += sum(1 for e in entries if e.event.module == "cdrs")
        held = held_cdrs = 0
        for entry in entries:
            qkey = (entry.event.module, entry.event.key)
            q = shard.queues.get(qkey)
            if q is None:
                shard.queues[qkey] = deque((entry,))
                self._push_ready(shard, qkey)  # a new queue: nobody works on the key yet
                continue
            if q and id_tuple(entry.id) <= id_tuple(q[-1].id):
                # Already held in memory: a consumer group recreated after NOGROUP hands out its
                # stream again from 0. Queued twice, the key would go back to an older update.
                held += 1
                held_cdrs += entry.event.module == "cdrs"
                continue
            q.append(entry)
        if held:
            self._free(held, held_cdrs)

    # -- workers and key runners ----------------------------------------------------------------

    def _push_ready(self, shard: _Shard, qkey: tuple[str, str]) -> None:
        """Hand a key with entries and nobody working on it to the workers (wakes one)."""
        self._ready.append((shard, qkey))
        while self._idle:
            waiter = self._idle.popleft()
            if not waiter.done():
                waiter.set_result(None)
                break

    def _wake_idle(self) -> None:
        while self._idle:
            waiter = self._idle.popleft()
            if not waiter.done():
                waiter.set_result(None)

    def _spawn_worker(self) -> None:
        task = asyncio.create_task(self._worker(), name="relay-worker")
        self._workers.add(task)
        task.add_done_callback(self._workers.discard)

    def _cut_workers(self, shard: _Shard) -> None:
        """Cut the attempts workers have on the wire for a shard we no longer own, as its runners
        are cut; a new worker takes the place of each one."""
        for task, on in list(self._working.items()):
            if on is shard:
                del self._working[task]
                task.cancel()
                if not self._stopping.is_set():
                    self._spawn_worker()

    def _drop(self, shard: _Shard, qkey: tuple[str, str]) -> None:
        """Forget a key's entries without acknowledging them (stopping, or the shard is no longer
        ours): they stay pending in Redis and the shard's next owner sends them again."""
        q = shard.queues.pop(qkey, None)
        if q:
            left = len(q)
            self._free(left, left * (qkey[0] == "cdrs"))
            q.clear()

    def _gone(self, shard: _Shard) -> bool:
        """Whether work on this shard must stop: the shard is no longer ours, or the relay is stopping."""
        return shard.lost.is_set() or self._stopping.is_set()

    async def _settle(self, shards: list[_Shard], deadline: float) -> None:
        """Wait, until the deadline, for the attempts, acks and key runners of these shards to end."""
        while any(s.active or s.runners for s in shards) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)  # only when stopping or handing a shard back

    async def _worker(self) -> None:
        """Make the first attempt of ready keys' head entries: the common case, with no task per key.

        Delivered: the ack goes out and the worker takes the next key; the key stays held (none
        of its later entries is sent) until the ack's callback has seen it written. Anything
        else (a failed attempt, a CDR with a session to wait for, a parked key) goes to a runner
        task for the key, which retries, dead-letters and parks as before.
        """
        loop = asyncio.get_running_loop()
        me = asyncio.current_task()
        assert me is not None
        ready = self._ready
        while not self._stopping.is_set():
            if not ready:
                waiter: asyncio.Future[None] = loop.create_future()
                self._idle.append(waiter)
                await waiter
                continue
            shard, qkey = ready.popleft()
            held = False  # whether this worker counts in shard.active for the key
            try:
                q = shard.queues.get(qkey)
                if not q:
                    continue
                if self._gone(shard):
                    self._drop(shard, qkey)
                    continue
                entry = q[0]
                if entry.after is not None or (shard.parked and f"{qkey[0]}|{qkey[1]}" in shard.parked):
                    self._run_slow(shard, qkey)
                    continue
                attempts = _Attempts()
                shard.active += 1
                held = True
                self._working[me] = shard
                try:
                    outcome = await self._attempt(shard, entry, attempts)
                finally:
                    # Before anything below can call _lose(): it would cancel this worker.
                    self._working.pop(me, None)
                if outcome.kind is Kind.DELIVERED:
                    # Acknowledged even if the shard is lost meanwhile: the IOP has the event.
                    self.ds.finish(entry).add_done_callback(functools.partial(self._acked, shard, qkey, entry))
                    continue  # the key, and its place in shard.active, pass to the ack's callback
                shard.active -= 1
                held = False
                if self._gone(shard):
                    self._drop(shard, qkey)
                else:
                    self._run_slow(shard, qkey, (outcome, attempts))
            except asyncio.CancelledError:
                shard.active -= held
                if me.cancelling():  # this worker cut (shard lost) or stopped
                    self._drop(shard, qkey)
                    raise
                # One a library let out: a bug. Dropping the key while the shard is still ours
                # could send its later entries first, and ending would shrink the pool.
                self._failed(shard, qkey, "worker failure")
            except Exception as exc:
                shard.active -= held
                if isinstance(exc, Abandon | GaveUp):
                    self._drop(shard, qkey)
                else:
                    self._failed(shard, qkey, "worker failure")

    def _failed(self, shard: _Shard, qkey: tuple[str, str], reason: str) -> None:
        """A bug while working on a key: lose the shard, whose next owner sends the key's entries
        again in order, rather than leave the key with nobody working on it."""
        log.exception("key_runner_failed", key=qkey[1], module=qkey[0], reason=reason)
        self._lose(shard.index, reason)
        self._drop(shard, qkey)

    def _acked(self, shard: _Shard, qkey: tuple[str, str], entry: Entry, ack: asyncio.Future[Any]) -> None:
        """Done-callback of a worker's ack: only now may the key's next entry go out."""
        shard.active -= 1
        try:
            q = shard.queues.get(qkey)
            if not q or q[0] is not entry:
                return
            if ack.cancelled() or ack.exception() is not None:
                # Delivered but not recorded: a runner writes the ack again before the key goes on.
                if self._gone(shard):
                    self._drop(shard, qkey)
                else:
                    metrics.REDIS_ERRORS.labels(op="deliver").inc()
                    error = "cancelled" if ack.cancelled() else str(ack.exception())
                    log.warning("ack_failed", shard=shard.index, module=qkey[0], key=qkey[1], error=error)
                    self._run_slow(shard, qkey, acking=True)
                return
            self._count_delivered(entry.event)
            q.popleft()
            self._free(1, qkey[0] == "cdrs")
            if not q:
                del shard.queues[qkey]
            elif self._gone(shard):
                self._drop(shard, qkey)
            else:
                self._push_ready(shard, qkey)
        except Exception:
            self._failed(shard, qkey, "ack callback failure")

    def _count_delivered(self, ev: Event) -> None:
        metrics.DELIVERED.inc(ev.module)
        metrics.DELIVERY_LATENCY.observe(max(0.0, self.clock() - ev.received_at), ev.module)

    def _run_slow(
        self, shard: _Shard, qkey: tuple[str, str], first: tuple[Outcome, _Attempts] | None = None,
        *, acking: bool = False,
    ) -> None:  # fmt: skip
        task = asyncio.create_task(self._run_key(shard, qkey, first, acking=acking))
        shard.runners[qkey] = task
        task.add_done_callback(functools.partial(self._runner_done, shard, qkey))

    def _runner_done(self, shard: _Shard, qkey: tuple[str, str], task: asyncio.Task[None]) -> None:
        """A runner cancelled before its first step (its shard lost in the same turn of the loop)
        never ran its own clean-up: forget its key here, or its entries would hold buffer room for good."""
        if shard.runners.get(qkey) is task:
            del shard.runners[qkey]
            self._drop(shard, qkey)

    async def _run_key(
        self, shard: _Shard, qkey: tuple[str, str], first: tuple[Outcome, _Attempts] | None = None,
        *, acking: bool = False,
    ) -> None:  # fmt: skip
        """A key's head entry until delivered or dead-lettered, then the key goes back to the
        workers. ``first``: the attempt a worker already made; ``acking``: delivered, the ack to
        write again. A retrying key holds only itself."""
        q = shard.queues.get(qkey)  # None only if the key was dropped before this runner started
        cdr = int(qkey[0] == "cdrs")
        delay = 0.05
        handed = False
        try:
            while q and not shard.lost.is_set():
                try:
                    if acking:
                        await self._record(shard, functools.partial(self.ds.finish, q[0]))
                        self._count_delivered(q[0].event)
                    else:
                        made, first = first, None
                        await self._deliver(shard, q[0], made)
                except (RedisError, OSError, StoreUnavailable) as exc:
                    # Redis unreachable for the checks before an attempt (parked, session watermark):
                    # nothing was sent or acknowledged; go again with the same entry once it answers.
                    await self._redis_pause(shard, exc, delay)
                    delay = min(delay * 2, 2.0)
                    continue
                q.popleft()
                self._free(1, cdr)
                break
            if q and not self._gone(shard):
                self._push_ready(shard, qkey)
                handed = True
        except (Abandon, GaveUp):
            pass
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if me is not None and not me.cancelling():  # not our cancel: one a library let out
                self._failed(shard, qkey, "runner failure")
        except Exception:
            # A bug or Redis failure while finishing: the entry stays pending and is retried
            # after the shard is recovered; never acknowledged by accident.
            self._failed(shard, qkey, "runner failure")
        finally:
            shard.runners.pop(qkey, None)
            if not handed:
                self._drop(shard, qkey)

    async def _deliver(self, shard: _Shard, entry: Entry, first: tuple[Outcome, _Attempts] | None = None) -> None:
        """Attempt until delivered or dead-lettered; raises Abandon when told to stop.

        ``first``: the outcome of the attempt a worker made (the key was not parked, no session wait).
        """
        ev = entry.event
        if first is None:
            parked = None
            if shard.parked and (fld := f"{ev.module}|{ev.key}") in shard.parked:
                parked = await self.ds.parked(shard.index, ev.module, ev.key)
                if parked is None:
                    shard.parked.discard(fld)  # unparked by a replay or a purge
            if parked is not None:
                why = Outcome(Kind.PERMANENT, f"parked behind dead letter {parked}")
                await self._dead(shard, entry, _Attempts(), why, park=False)
                return
            if entry.after is not None:
                await self._wait_for_session(shard, entry)
            attempts = _Attempts()
            outcome = await self._retrying(shard, entry, attempts)
        else:
            outcome, attempts = first
            outcome = await self._retrying(shard, entry, attempts, outcome)
        if outcome.kind is Kind.DELIVERED:
            await self._record(shard, lambda: self.ds.finish(entry))
            self._count_delivered(ev)
            return
        park = self.cfg.on_permanent == "park" or ev.module in self.cfg.park_modules
        await self._dead(shard, entry, attempts, outcome, park=park and outcome.kind is Kind.PERMANENT)

    async def _record(self, shard: _Shard, write: Callable[[], Awaitable[_T]]) -> _T:
        """Write an outcome (ack, dead letter) to Redis, retrying through a Redis blip or restart.

        The IOP already has the answer: giving up here would lose the shard and send the event
        (and every other in-flight one of the shard) again.
        """
        delay = 0.05
        while True:
            try:
                return await write()
            except (RedisError, OSError, StoreUnavailable) as exc:
                await self._redis_pause(shard, exc, delay)
                delay = min(delay * 2, 2.0)
                with contextlib.suppress(RedisError, OSError):
                    await self.ds.load_scripts()  # a restarted Redis has lost its scripts (NOSCRIPT)

    async def _redis_pause(self, shard: _Shard, exc: BaseException, delay: float) -> None:
        metrics.REDIS_ERRORS.labels(op="deliver").inc()
        log.warning("redis_deliver_failed", error=str(exc), retry_in_s=delay, shard=shard.index)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._interrupted(shard), delay)
        if self._gone(shard):
            raise Abandon()

    async def _retrying(
        self, shard: _Shard, entry: Entry, attempts: _Attempts, first: Outcome | None = None
    ) -> Outcome:
        """Tenacity drives the retries: full-jitter exponential backoff, Retry-After as a floor.

        ``first``: the outcome of an attempt already made (by a worker)."""
        ev = entry.event

        def wait(rs: RetryCallState) -> float:
            last: Outcome = rs.outcome.result() if rs.outcome else Outcome(Kind.TRANSIENT, "")
            if last.kind is Kind.AUTH or last.reason == _HEALING:
                return 0.0  # AUTH: the next attempt waits in Link.slot() until the link is resumed
            return backoff_s(rs.attempt_number, self.cfg.backoff_initial_s, self.cfg.backoff_max_s, last.retry_after_s)

        def expired(_: RetryCallState) -> bool:
            return bool(self.cfg.max_age_s) and self.clock() - ev.received_at > self.cfg.max_age_s

        async def sleep(seconds: float) -> None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._interrupted(shard), seconds)
            if self._gone(shard):
                raise Abandon()

        def count_retry(rs: RetryCallState) -> None:
            last = rs.outcome.result() if rs.outcome else None
            if last is not None and last.kind is Kind.TRANSIENT and last.reason != _HEALING:
                metrics.RETRIED.labels(module=ev.module).inc()

        if first is None:
            first = await self._attempt(shard, entry, attempts)
        if first.kind is Kind.DELIVERED or first.kind is Kind.PERMANENT:
            return first  # the common case: no retry machinery at all
        made = [first]

        async def attempt() -> Outcome:
            # Tenacity's attempt 1 is the one already made: the same waits and stop rule as before.
            return made.pop() if made else await self._attempt(shard, entry, attempts)

        retrying = AsyncRetrying(
            retry=retry_if_result(lambda o: o.kind in (Kind.TRANSIENT, Kind.AUTH)),
            wait=wait,
            stop=expired,
            sleep=sleep,
            before_sleep=count_retry,
            retry_error_callback=lambda rs: rs.outcome.result() if rs.outcome else Outcome(Kind.TRANSIENT, "expired"),
            reraise=True,
        )
        outcome: Outcome = await retrying(attempt)
        if outcome.kind is not Kind.DELIVERED and outcome.kind is not Kind.PERMANENT:
            return Outcome(Kind.PERMANENT, f"expired after {self.cfg.max_age_s}s: {outcome.reason}",
                           http_status=outcome.http_status, ocpi_code=outcome.ocpi_code,
                           ocpi_message=outcome.ocpi_message)  # fmt: skip
        return outcome

    async def _interrupted(self, shard: _Shard) -> None:
        stop = asyncio.ensure_future(self._stopping.wait())
        lost = asyncio.ensure_future(shard.lost.wait())
        try:
            await asyncio.wait({stop, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            lost.cancel()

    async def _attempt(self, shard: _Shard, entry: Entry, attempts: _Attempts) -> Outcome:
        ev = entry.event
        try:
            if outgoing.as_is(self.settings, ev):
                wire = ev
            else:
                wire = await outgoing.prepare(self.store, self.settings, ev, heal=attempts.heal)
        except (RedisError, OSError, StoreUnavailable) as exc:
            # Without the stored state we cannot build the PUT the IOP needs: try again later.
            metrics.REDIS_ERRORS.labels(op="state").inc()
            return Outcome(Kind.TRANSIENT, f"state unavailable: {exc}")
        probe = self.link.try_acquire()
        if probe is None:
            probe = await self.link.acquire(lambda: self._gone(shard))
        try:
            if self._gone(shard):
                raise Abandon()
            now = self.clock()
            attempts.count += 1
            attempts.first_at = attempts.first_at or now
            attempts.last_at = now
            started = time.perf_counter()
            request_id = ""
            shard.sending += 1
            try:
                reply = await self.client.send(wire)
                request_id = reply.request_id
                outcome = classify(reply.status, reply.headers, reply.body)
            except NotConfigured as exc:
                await self.link.pause(str(exc))
                outcome = Outcome(Kind.AUTH, str(exc))
            except (TimeoutError, OSError, Exception) as exc:
                outcome = classify(None, exc=exc)
            finally:
                shard.sending -= 1
            metrics.IOP_REQUEST.observe(time.perf_counter() - started, ev.module)
        finally:
            self.link.release(probe)
        metrics.DELIVERIES.inc(ev.module, _KIND_LABEL[outcome.kind])
        if (
            outcome.unknown_object
            and wire.method == "PATCH"
            and not attempts.heal
            and self.settings.state.heal_patches
            and await self._healable(ev)
        ):
            attempts.heal = True
            metrics.HEALED.labels(module=ev.module).inc()
            outcome = Outcome(Kind.TRANSIENT, _HEALING, http_status=outcome.http_status, ocpi_code=outcome.ocpi_code,
                              ocpi_message=outcome.ocpi_message)  # fmt: skip
        attempts.last = outcome
        if outcome.kind is Kind.AUTH:
            if outcome.http_status is not None:
                await self.link.auth_failed(outcome.reason)
        elif outcome.link:
            await self.link.failure(outcome.reason, probe=probe)
        else:
            await self.link.success()
        if outcome.kind is not Kind.DELIVERED or self._debug:
            _log_attempt(ev, attempts, outcome, request_id)
        return outcome

    async def _healable(self, event: Event) -> bool:
        """A heal needs the whole object: a PATCH the relay has no state for is a plain permanent failure."""
        try:
            return await outgoing.current(self.store, event) is not None
        except (RedisError, OSError, StoreUnavailable):
            return True  # decide on the next attempt, which rebuilds the body from the state

    async def _wait_for_session(self, shard: _Shard, entry: Entry) -> None:
        """A CDR waits until every session update accepted before it is delivered or dead-lettered."""
        assert entry.after is not None
        target = id_tuple(entry.after)
        delay = 0.05
        while True:
            done = await self.ds.session_done(shard.index, entry.event.key)
            if done is not None and id_tuple(done) >= target:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._interrupted(shard), delay)
            if self._gone(shard):
                raise Abandon()
            delay = min(delay * 2, 1.0)

    async def _dead(self, shard: _Shard, entry: Entry, attempts: _Attempts, outcome: Outcome, *, park: bool) -> None:
        """Dead-letter with the full reason; the key goes on with its next event (or parks)."""
        ev = entry.event
        info: dict[str, Any] = {
            "kind": "parked" if outcome.reason.startswith("parked") else outcome.kind.value,
            "reason": outcome.reason,
            "http_status": outcome.http_status,
            "ocpi_code": outcome.ocpi_code,
            "ocpi_message": outcome.ocpi_message,
            "attempts": attempts.count,
            "first_attempt_at": attempts.first_at or None,
            "last_attempt_at": attempts.last_at or None,
            "dead_at": self.clock(),
            "unknown_object": outcome.unknown_object,
            "replica": self.me,
        }
        dead_id = await self._record(shard, lambda: self.ds.dead_letter(entry, _info_encoder.encode(info), park=park))
        if park:
            # Even without a dead id: a retried script whose first run parked the key (reply lost)
            # finds nothing left to delete. A member too many costs one HGET, one too few sends.
            shard.parked.add(f"{ev.module}|{ev.key}")
        metrics.DEAD_LETTERED.labels(module=ev.module, kind=info["kind"]).inc()
        log.warning("dead_lettered", event_id=ev.id, module=ev.module, key=ev.key, dead_id=dead_id,
                    reason=outcome.reason, attempts=attempts.count, parked=park,
                    correlation_id=ev.correlation_id or ev.id)  # fmt: skip
