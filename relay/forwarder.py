"""The delivery engine: the shards we own, the worker pool and key runners, start and stop.

Data path: shard streams → (``reader.Reader``) per-key queues, bounded by ``buffer.Buffer`` → a
fixed pool of workers → ``delivery.Delivery.attempt`` (Link slot → OcpiClient → classify) → ack;
a key that needs more than one delivered attempt (retries, dead letters, a CDR waiting for its
session, a parked key) gets a runner task of its own, which awaits ``Delivery.complete`` for its
head entry. The lease loop (``leases.LeaseLoop``) decides which shards are ours and calls
``own``/``lose``/``hand_back``. The parts do not import this module. See docs/delivery.md for
the design and its guarantees.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import structlog

from relay import compaction, logs, metrics
from relay.buffer import Buffer
from relay.compaction import Compacted
from relay.config import Settings
from relay.delivery import Delivery
from relay.errors import StoreUnavailable
from relay.leases import LeaseLoop
from relay.link import GaveUp, Link
from relay.ocpi_client import OcpiClient
from relay.policy import Attempts
from relay.reader import Reader
from relay.retry import Kind, Outcome
from relay.shard import Abandon, QKey, Shard
from relay.store import DeliveryStore, Entry, Store

log = structlog.get_logger(__name__)


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
        self.shards: dict[int, Shard] = {}  # the one map of shards we work on (the lease loop reads it)
        self.buffer = Buffer(self.cfg.max_buffered, self.cfg.read_batch)
        self.delivery = Delivery(settings, store, self.ds, client, link, me=self.me, clock=clock)
        # A takeover holds only the keys the old owner had pending, until its attempts cannot land.
        attempt_s = settings.iop.connect_timeout_s + settings.iop.request_timeout_s
        self.reader = Reader(self.cfg, store, self.ds, self.me, self.buffer, self._push_ready, attempt_s=attempt_s)
        self._stopping = asyncio.Event()
        self.leases = LeaseLoop(
            self.cfg, self.ds, link, self.me, store.shards, self.shards, self, stopping=self._stopping, clock=clock
        )
        self._tasks: list[asyncio.Task[None]] = []
        # Keys with entries and nobody working on them, for the workers. A key with a queue in
        # shard.queues is in exactly one place: here, a worker's attempt, an ack in flight, or a
        # runner task. Never two: that is what keeps one event per key in flight.
        self._ready: deque[tuple[Shard, QKey]] = deque()
        self._idle: deque[asyncio.Future[None]] = deque()  # one per worker waiting for a ready key
        self._workers: set[asyncio.Task[None]] = set()
        self._working: dict[asyncio.Task[None], Shard] = {}  # worker → shard of its attempt on the wire
        # Compaction (relay.compaction): the modules it applies to; folding idle queues while the buffer is full.
        self.compact = compaction.modules(self.cfg.compact)
        self._state = settings.state.enabled
        if self.compact:
            self.buffer.squeeze = self._squeeze

    @property
    def pool_size(self) -> int:
        """Workers in the pool (``forwarder.concurrency`` while running: a cut worker is replaced)."""
        return len(self._workers)

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load scripts, start the workers and the lease loop (which starts shard readers)."""
        await self.ds.load_scripts()
        self.delivery.debug = logs.debug_enabled()
        for _ in range(self.cfg.concurrency):
            self._spawn_worker()
        self._tasks.append(asyncio.create_task(self.leases.run(), name="relay-leases"))
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
            if index in cut:  # the IOP may still apply it: the next owner must wait claim_idle_s
                log.warning("shard_not_released", shard=index, reason="attempt cut short at shutdown")
                continue
            with contextlib.suppress(StoreUnavailable):
                await self.leases.release(index)
        self.shards.clear()
        with contextlib.suppress(StoreUnavailable):
            await self.leases.leave()
        metrics.SHARDS_OWNED.set(0)
        log.info("forwarder_stopped", replica=self.me)

    # -- shards come and go (called by the lease loop) ------------------------------------------

    def own(self, index: int, *, dirty: bool) -> None:
        """Start working on a shard whose lease we now hold: its reader recovers, then reads."""
        shard = Shard(index=index, dirty=dirty, stopping=self._stopping)
        self.shards[index] = shard
        shard.reader = asyncio.create_task(self.reader.read_loop(shard), name=f"relay-shard-{index}")
        log.info("shard_acquired", shard=index, replica=self.me, takeover=dirty)

    def lose(self, index: int, reason: str) -> None:
        """Stop working on a shard at once: its reader, runners and workers' attempts are cut.

        Failure policy: its entries stay pending for the next owner (an ack already queued still
        lands: the IOP has the event); taking it back after a cut request waits ``claim_idle_s``.
        """
        shard = self.shards.pop(index, None)
        if shard is None:
            return
        shard.lost.set()
        if shard.reader is not None:
            shard.reader.cancel()
        self._cut_off(shard)
        self._unready(shard)
        log.warning("shard_lost", shard=index, reason=reason)

    def _unready(self, shard: Shard) -> None:
        """A lost shard's keys leave the ready FIFO (in place: the workers hold it), their queues dropped."""
        stale = [qkey for s, qkey in self._ready if s is shard]
        if stale:
            keep = [item for item in self._ready if item[0] is not shard]
            self._ready.clear()
            self._ready.extend(keep)
            for qkey in stale:
                self._drop(shard, qkey)

    async def hand_back(self, index: int) -> bool:
        """Rebalance: stop the shard, wait for its in-flight attempts; True when it may be released.

        Failure policy: an attempt still on the wire after ``shutdown_timeout_s`` is cut and the
        shard is not released cleanly: the lease expires, so the next owner waits
        ``claim_idle_s`` (longer than any attempt) before resending after it.
        """
        shard = self.shards.pop(index)
        shard.lost.set()
        await self.link.wake()  # its attempts waiting behind a paused or down link give up now
        if shard.reader is not None:
            shard.reader.cancel()
        await self._settle([shard], time.monotonic() + self.cfg.shutdown_timeout_s)
        if not shard.sending:
            return True
        self._cut_off(shard)
        log.warning("shard_not_released", shard=index, reason="attempt still in flight")
        return False

    # -- workers and key runners ----------------------------------------------------------------

    def _push_ready(self, shard: Shard, qkey: QKey) -> None:
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

    def _cut_off(self, shard: Shard) -> None:
        """Cut the runners of a shard we no longer own and the workers' attempts on it (a new worker
        takes the place of each one); a request cut on the wire is remembered for the takeover grace."""
        if shard.sending:
            self.reader.cut.add(shard.index)
        for r in shard.runners.values():
            r.cancel()
        for task, on in list(self._working.items()):
            if on is shard:
                del self._working[task]
                task.cancel()
                if not self._stopping.is_set():
                    self._spawn_worker()

    def _drop(self, shard: Shard, qkey: QKey) -> None:
        """Forget a key's entries without acknowledging them (stopping, or the shard is no longer
        ours): they stay pending in Redis and the shard's next owner sends them again."""
        q = shard.queues.pop(qkey, None)
        if q:
            compaction.drop(q, self.buffer, qkey[0] == "cdrs")
            q.clear()

    async def _settle(self, shards: list[Shard], deadline: float) -> None:
        """Wait, until the deadline, for the attempts, acks and key runners of these shards to end."""
        while any(s.active or s.runners for s in shards) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)  # only when stopping or handing a shard back

    async def _worker(self) -> None:
        """Make the first attempt of ready keys' head entries: the common case, with no task per key.

        Failure policy: delivered: the ack goes out and the worker takes the next key; the key
        stays held (none of its later entries is sent) until the ack's callback has seen it
        written. Anything else (a failed attempt, a CDR with a session to wait for, a parked
        key) goes to a runner task for the key, which retries, dead-letters and parks.
        """
        loop = asyncio.get_running_loop()
        me = asyncio.current_task()
        assert me is not None
        ready = self._ready
        delivery = self.delivery
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
                if shard.gone():
                    self._drop(shard, qkey)
                    continue
                entry = q[0]
                if entry.after is not None or (shard.parked and f"{qkey[0]}|{qkey[1]}" in shard.parked):
                    self.start_runner(shard, qkey)
                    continue
                attempts = Attempts()
                shard.active += 1
                held = True
                self._working[me] = shard
                plan = compaction.Plan(q, self.buffer, self.ds, state=self._state) if qkey[0] in self.compact else None
                try:
                    if plan is None:
                        outcome = await delivery.attempt(shard, entry, attempts)
                    else:
                        outcome = await delivery.attempt(shard, entry, attempts, plan)
                finally:
                    # Before anything below can call lose(): it would cancel this worker.
                    self._working.pop(me, None)
                entry = q[0]  # what was sent: a compacted unit if the plan folded the queue
                if outcome.kind is Kind.DELIVERED:
                    # Acknowledged even if the shard is lost meanwhile: the IOP has the event.
                    ack = (
                        self.ds.finish(entry, entry.folded_ids())
                        if isinstance(entry, Compacted)
                        else self.ds.finish(entry)
                    )
                    ack.add_done_callback(functools.partial(self._acked, shard, qkey, entry))
                    continue  # the key, and its place in shard.active, pass to the ack's callback
                shard.active -= 1
                held = False
                if shard.gone():
                    self._drop(shard, qkey)
                else:
                    self.start_runner(shard, qkey, (outcome, attempts))
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

    def _pop(self, q: deque[Entry], qkey: QKey) -> None:
        """The head of a key's queue is done (delivered or dead-lettered): it leaves the buffer."""
        head = q.popleft()
        if isinstance(head, Compacted):
            self.buffer.unfold(head.size)
        else:
            self.buffer.free(1, qkey[0] == "cdrs")

    def _squeeze(self) -> int:
        """The buffer is full and the link not up: fold the queues (whole for keys waiting in ready, behind
        the head for held ones), so that the backlog goes on being read and folded while the IOP is away."""
        if self.link.state == "up":
            return 0  # draining: the workers' plans compact what is queued
        idle = {(id(shard), qkey) for shard, qkey in self._ready if not shard.gone()}
        limits = (self.cfg.compact_max_folded, 8 * self.cfg.max_buffered)
        return compaction.squeeze(self.shards.values(), idle, self.compact, self.buffer, limits, state=self._state)

    def _failed(self, shard: Shard, qkey: QKey, reason: str) -> None:
        """A bug while working on a key: lose the shard, whose next owner sends the key's entries
        again in order, rather than leave the key with nobody working on it."""
        log.exception("key_runner_failed", key=qkey[1], module=qkey[0], reason=reason)
        self.lose(shard.index, reason)
        self._drop(shard, qkey)

    def _acked(self, shard: Shard, qkey: QKey, entry: Entry, ack: asyncio.Future[Any]) -> None:
        """Done-callback of a worker's ack: only now may the key's next entry go out.

        Failure policy: an ack that failed (Redis unreachable) is written again by a runner
        before anything else of the key is sent.
        """
        shard.active -= 1
        try:
            q = shard.queues.get(qkey)
            if not q or q[0] is not entry:
                return
            if ack.cancelled() or ack.exception() is not None:
                # Delivered but not recorded: a runner writes the ack again before the key goes on.
                if shard.gone():
                    self._drop(shard, qkey)
                else:
                    metrics.REDIS_ERRORS.labels(op="deliver").inc()
                    error = "cancelled" if ack.cancelled() else str(ack.exception())
                    log.warning("ack_failed", shard=shard.index, module=qkey[0], key=qkey[1], error=error)
                    self.start_runner(shard, qkey, acking=True)
                return
            if isinstance(entry, Compacted):
                self.delivery.count_compacted(entry)
            else:
                self.delivery.count_delivered(entry.event)
            self._pop(q, qkey)
            if not q:
                del shard.queues[qkey]
            elif shard.gone():
                self._drop(shard, qkey)
            else:
                self._push_ready(shard, qkey)
        except Exception:
            self._failed(shard, qkey, "ack callback failure")

    def start_runner(
        self, shard: Shard, qkey: QKey, first: tuple[Outcome, Attempts] | None = None, *, acking: bool = False
    ) -> None:
        """Give a key the caller holds (a key is in one place at a time) to a runner task of its own."""
        task = asyncio.create_task(self._run_key(shard, qkey, first, acking=acking))
        shard.runners[qkey] = task
        task.add_done_callback(functools.partial(self._runner_done, shard, qkey))

    def _runner_done(self, shard: Shard, qkey: QKey, task: asyncio.Task[None]) -> None:
        """A runner cancelled before its first step (its shard lost in the same turn of the loop)
        never ran its own clean-up: forget its key here, or its entries would hold buffer room for good."""
        if shard.runners.get(qkey) is task:
            del shard.runners[qkey]
            self._drop(shard, qkey)

    async def _run_key(
        self, shard: Shard, qkey: QKey, first: tuple[Outcome, Attempts] | None = None, *, acking: bool = False
    ) -> None:
        """A key's head entry until delivered or dead-lettered, then the key goes back to the
        workers. ``first``: the attempt a worker already made; ``acking``: delivered, the ack to
        write again. A retrying key holds only itself.

        Failure policy: a bug or an unexpected error loses the shard (``_failed``): the entry
        stays pending and is retried after the shard is recovered, never acknowledged by accident.
        """
        q = shard.queues.get(qkey)  # None only if the key was dropped before this runner started
        handed = False
        try:
            folds = q is not None and qkey[0] in self.compact and not acking
            plan = compaction.Plan(q, self.buffer, self.ds, state=self._state) if q is not None and folds else None
            if q and await self.delivery.complete(shard, q[0], first, acking=acking, plan=plan):
                self._pop(q, qkey)
            if q and not shard.gone():
                self._push_ready(shard, qkey)
                handed = True
        except (Abandon, GaveUp):
            pass
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if me is not None and not me.cancelling():  # not our cancel: one a library let out
                self._failed(shard, qkey, "runner failure")
        except Exception:
            self._failed(shard, qkey, "runner failure")
        finally:
            shard.runners.pop(qkey, None)
            if not handed:
                self._drop(shard, qkey)
