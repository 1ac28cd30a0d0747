"""Delivering one stream entry: attempts, retries, healing, the session wait, the ack or the dead letter.

``Delivery.attempt`` is one attempt (Link slot → OcpiClient → ``retry.classify``); the forwarder's
workers call it for a key's head entry and acknowledge a delivered one themselves. Everything
else about an entry is ``Delivery.complete``, which a key runner awaits: the parked check, a
CDR's wait for its session, retries with backoff (tenacity), the ack or dead letter written
through Redis blips. The decisions are ``relay.policy``'s; this module knows nothing of readers,
workers or key queues, only the ``Shard`` it works for (``shard.gone()``: stop, unacknowledged).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

import msgspec
import structlog
from tenacity import AsyncRetrying, RetryCallState, retry_if_result

from relay import metrics, outgoing, policy
from relay.compaction import Compacted, superseding
from relay.config import Settings
from relay.errors import StoreUnavailable
from relay.events import Event
from relay.link import Link
from relay.ocpi_client import NotConfigured, OcpiClient
from relay.policy import Attempts
from relay.retry import Kind, Outcome, classify
from relay.shard import Abandon, Shard
from relay.store import DeliveryStore, Entry, Store, id_tuple

log = structlog.get_logger(__name__)
_T = TypeVar("_T")
_info_encoder = msgspec.msgpack.Encoder()
_KIND_LABEL = {kind: kind.value for kind in Kind}  # a dict lookup, not an enum property call per event


class Planner(Protocol):
    """The queue of the key the caller holds (``relay.compaction.Plan``)."""

    def __call__(self, fold: bool, /) -> Entry:
        """Its head: the queue folded first (relay.compaction) when called with True."""

    async def split(self) -> Entry:
        """Its head unit replaced by the entries it stands for; the new head."""


def _log_attempt(ev: Event, attempts: Attempts, outcome: Outcome, request_id: str) -> None:
    """A failed attempt's line (a permanent one is logged once, as its dead letter: ``Delivery._dead``)."""
    if outcome.kind is Kind.PERMANENT:
        return
    if outcome.kind is not Kind.DELIVERED:
        log.warning(
            "delivery_failed", event_id=ev.id, module=ev.module, key=ev.key, attempt=attempts.count,
            outcome=outcome.kind.value, reason=outcome.reason, http_status=outcome.http_status,
            ocpi_code=outcome.ocpi_code, request_id=request_id, correlation_id=ev.correlation_id or ev.id,
        )  # fmt: skip
    else:
        log.debug("delivered", event_id=ev.id, module=ev.module, key=ev.key, attempt=attempts.count,
                  request_id=request_id, correlation_id=ev.correlation_id or ev.id)  # fmt: skip


class Delivery:
    """Delivers entries to the IOP for one replica (``me``); holds no state per entry or key."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        ds: DeliveryStore,
        client: OcpiClient,
        link: Link,
        *,
        me: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.cfg = settings.forwarder
        self.store = store
        self.ds = ds
        self.client = client
        self.link = link
        self.me = me
        self.clock = clock
        # Whether "delivered" debug lines are written (set once logging is configured, by the
        # forwarder's start): building the fields of a line that is then filtered out costs ~3.5 µs.
        self.debug = True

    def count_delivered(self, ev: Event) -> None:
        """Metrics of an event whose ack was written."""
        metrics.DELIVERED.inc(ev.module)
        metrics.DELIVERY_LATENCY.observe(max(0.0, self.clock() - ev.received_at), ev.module)

    def count_compacted(self, unit: Compacted) -> None:
        """Metrics of a compacted unit whose ack was written: one delivered, the others compacted."""
        self.count_delivered(unit.event)
        metrics.COMPACTED.add(unit.size - 1, unit.event.module)

    async def attempt(self, shard: Shard, entry: Entry, attempts: Attempts, plan: Planner | None = None) -> Outcome:
        """One attempt of an entry through the link; raises Abandon (or GaveUp) once the shard is gone.

        ``plan``: called once the link admitted the attempt, just before sending; returns the entry
        to send instead (a compacted unit standing for this one and later ones of its key, which the
        caller holds), or ``entry`` itself.

        Failure policy: the stored state a PUT needs being unavailable is a transient failure;
        an HTTP client error is classified like an answer (``classify(None, exc=exc)``), and a
        request the client refused to send (``unsent``) leaves the link as it is; a PATCH the IOP
        does not know is turned into a heal (``policy.heal_wanted``) when the object's state is
        stored; an IOP refusing the connection (401/403, OCPI 4001) stops the link
        (``policy.link_stop``) and the entry waits in it, not dead-lettered.
        """
        try:
            entry, wire = await self._wire(entry, attempts, plan)
        except StoreUnavailable as exc:
            # Without the stored state we cannot build the PUT the IOP needs: try again later.
            metrics.REDIS_ERRORS.labels(op="state").inc()
            return Outcome(Kind.TRANSIENT, f"state unavailable: {exc}")
        probe = self.link.try_acquire()
        if probe is None:
            probe = await self.link.acquire(shard.gone)
        try:
            if shard.gone():
                raise Abandon()
            planned = (entry.event, wire) if plan is None else await self._planned(plan, entry, wire, attempts)
            if isinstance(planned, Outcome):
                return planned
            ev, wire = planned
            now = self.clock()
            attempts.count += 1
            attempts.first_at = attempts.first_at or now
            attempts.last_at = now
            started = time.perf_counter()
            request_id = attempts.request_id = ""
            shard.sending += 1
            try:
                reply = await self.client.send(wire)
                request_id = attempts.request_id = reply.request_id
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
            outcome.unknown_object  # the attribute first: no call on the delivered path
            and policy.heal_wanted(
                outcome, wire.method, already_healed=attempts.heal, enabled=self.settings.state.heal_patches
            )
            and await self._healable(ev)
        ):
            attempts.heal = True
            metrics.HEALED.labels(module=ev.module).inc()
            outcome = policy.healing(outcome)
        attempts.last = outcome
        if outcome.kind is Kind.AUTH:
            await self._stop_link(outcome)
        elif outcome.link:
            await self.link.failure(outcome.reason, probe=probe)
        elif not outcome.unsent:  # a request the HTTP client refused says nothing about the IOP
            await self.link.success()
        if outcome.kind is not Kind.DELIVERED or self.debug:
            _log_attempt(ev, attempts, outcome, request_id)
        return outcome

    async def _wire(self, entry: Entry, attempts: Attempts, plan: Planner | None) -> tuple[Entry, Event]:
        """The entry to send and its wire form. A unit standing for others whose PUT of the current state
        finds no state is split first (``plan.split``): its entries go one by one. Raises StoreUnavailable."""
        while True:
            ev = entry.event
            if outgoing.as_is(self.settings, ev):
                return entry, ev
            if plan is None or not superseding(entry):
                return entry, await outgoing.prepare(self.store, self.settings, ev, heal=attempts.heal)
            wire = await outgoing.prepare_unit(self.store, self.settings, ev, heal=attempts.heal, unit=True)
            if wire is not None:
                return entry, wire
            entry = await plan.split()

    async def _planned(
        self, plan: Planner, entry: Entry, wire: Event, attempts: Attempts
    ) -> tuple[Event, Event] | Outcome:
        """(event, wire form) of what a plan chose to send: ``wire`` unchanged when it kept ``entry``.

        Failure policy: the stored state a PUT needs being unavailable is a transient failure."""
        unit = plan(True)
        if unit is entry:
            return entry.event, wire
        try:
            unit, out = await self._wire(unit, attempts, plan)
            return unit.event, out
        except StoreUnavailable as exc:
            metrics.REDIS_ERRORS.labels(op="state").inc()
            return Outcome(Kind.TRANSIENT, f"state unavailable: {exc}")

    async def _stop_link(self, outcome: Outcome) -> None:
        """The IOP refused the connection (``policy.link_stop``): stop the link in the state that says why."""
        stop = policy.link_stop(outcome)
        if stop == "unknown_receiver":
            await self.link.unknown_receiver(outcome.reason)
        elif stop == "auth_failed":
            await self.link.auth_failed(outcome.reason)

    async def complete(
        self, shard: Shard, entry: Entry, first: tuple[Outcome, Attempts] | None = None, *, acking: bool = False,
        plan: Planner | None = None,
    ) -> bool:  # fmt: skip
        """Work on an entry until it is done: delivered and acknowledged, or dead-lettered.

        ``first``: the attempt a worker already made (the key was not parked, no session wait);
        ``acking``: delivered by a worker whose ack failed, the ack to write again; ``plan``: a retry
        sends the key's queue folded (relay.compaction), and what was sent is then finished. Returns True
        when done, False if the shard was lost first; raises Abandon (or GaveUp) once it is gone.

        Failure policy: Redis unreachable for the checks before an attempt (parked, session
        watermark): nothing was sent or acknowledged, so the same entry goes again once Redis
        answers; nothing of the entry is acknowledged unless delivered or dead-lettered.
        """
        delay = 0.05
        while not shard.lost.is_set():
            try:
                if acking:
                    await self._ack(shard, entry)
                else:
                    made, first = first, None
                    await self._deliver(shard, entry, made, plan)
                return True
            except StoreUnavailable as exc:
                await self._redis_pause(shard, exc, delay)
                delay = min(delay * 2, 2.0)
        return False

    async def _deliver(
        self, shard: Shard, entry: Entry, first: tuple[Outcome, Attempts] | None, plan: Planner | None
    ) -> None:
        """Attempt until delivered or dead-lettered (parked keys and waiting CDRs first)."""
        ev = entry.event
        if first is None:
            dead_id = await self._parked_behind(shard, ev)
            if dead_id is not None and await self._dead(shard, entry, Attempts(), policy.parked_behind(dead_id),
                                                        parked_by=dead_id):  # fmt: skip
                return  # else unparked by a purge or a replay since the look: sent like any other
            if entry.after is not None:
                await self._wait_for_session(shard, entry)
            attempts = Attempts()
            outcome = await self._retrying(shard, entry, attempts, None, plan)
        else:
            outcome, attempts = first
            outcome = await self._retrying(shard, entry, attempts, outcome, plan)
        if plan is not None:
            entry = plan(False)  # what the last attempt sent: a unit if a plan folded the queue
        if outcome.kind is Kind.DELIVERED:
            await self._ack(shard, entry)
        else:
            await self._dead(shard, entry, attempts, outcome)

    async def _parked_behind(self, shard: Shard, ev: Event) -> str | None:
        """The dead letter the event's key is parked behind, if it is parked (checked in Redis)."""
        if not shard.parked or (fld := f"{ev.module}|{ev.key}") not in shard.parked:
            return None
        dead_id = await self.ds.parked(shard.index, ev.module, ev.key)
        if dead_id is None:
            shard.parked.discard(fld)  # unparked by a replay or a purge
        return dead_id

    async def _ack(self, shard: Shard, entry: Entry) -> None:
        if isinstance(entry, Compacted):
            await self._record(shard, functools.partial(self.ds.finish, entry, entry.folded_ids()))
            self.count_compacted(entry)
            return
        await self._record(shard, functools.partial(self.ds.finish, entry))
        self.count_delivered(entry.event)

    async def _record(self, shard: Shard, write: Callable[[], Awaitable[_T]]) -> _T:
        """Write an outcome (ack, dead letter) to Redis, retrying through a Redis blip or restart.

        Failure policy: the IOP already has the answer: giving up here would lose the shard and
        send the event (and every other in-flight one of the shard) again. Only the shard being
        gone ends the wait (Abandon), the entry still pending for its next owner.
        """
        delay = 0.05
        while True:
            try:
                return await write()
            except StoreUnavailable as exc:
                await self._redis_pause(shard, exc, delay)
                delay = min(delay * 2, 2.0)  # a restarted Redis's lost scripts: the store reloads them on NOSCRIPT

    async def _redis_pause(self, shard: Shard, exc: BaseException, delay: float) -> None:
        metrics.REDIS_ERRORS.labels(op="deliver").inc()
        log.warning("redis_deliver_failed", error=str(exc), retry_in_s=delay, shard=shard.index)
        await shard.sleep(delay)

    async def _retrying(
        self, shard: Shard, entry: Entry, attempts: Attempts, first: Outcome | None = None, plan: Planner | None = None
    ) -> Outcome:
        """Attempt until delivered or permanent (expired included); tenacity drives the retries.

        Failure policy: ``policy.retries`` says whether another attempt follows,
        ``policy.next_wait_s`` after how long, ``policy.expired`` when it stops (the last
        failure then becomes ``policy.expired_outcome``). A wait is cut short when the shard is
        gone (Abandon). ``first``: the outcome of an attempt already made (by a worker).
        """
        ev = entry.event
        cfg = self.cfg

        def wait(rs: RetryCallState) -> float:
            last: Outcome = rs.outcome.result() if rs.outcome else Outcome(Kind.TRANSIENT, "")
            return policy.next_wait_s(last, rs.attempt_number, cfg)

        def count_retry(rs: RetryCallState) -> None:
            last = rs.outcome.result() if rs.outcome else None
            if last is not None and policy.counts_as_retry(last):
                metrics.RETRIED.labels(module=ev.module).inc()

        if first is None:
            first = await self._attempt(shard, entry, attempts, plan)
        if policy.settled(first):
            return first  # the common case: no retry machinery at all
        made = [first]

        async def attempt() -> Outcome:
            # Tenacity's attempt 1 is the one already made: the same waits and stop rule as before.
            return made.pop() if made else await self._attempt(shard, entry, attempts, plan)

        retrying = AsyncRetrying(
            retry=retry_if_result(policy.retries),
            wait=wait,
            stop=lambda _: policy.expired(ev.received_at, self.clock(), cfg.max_age_s),
            sleep=shard.sleep,
            before_sleep=count_retry,
            retry_error_callback=lambda rs: rs.outcome.result() if rs.outcome else Outcome(Kind.TRANSIENT, "expired"),
            reraise=True,
        )
        outcome: Outcome = await retrying(attempt)
        return outcome if policy.settled(outcome) else policy.expired_outcome(outcome, cfg.max_age_s)

    def _attempt(self, shard: Shard, entry: Entry, attempts: Attempts, plan: Planner | None) -> Awaitable[Outcome]:
        """``attempt``, with a plan only when there is one (its three-argument form is the common call)."""
        return self.attempt(shard, entry, attempts) if plan is None else self.attempt(shard, entry, attempts, plan)

    async def _healable(self, event: Event) -> bool:
        """A heal needs the whole object: a PATCH the relay has no state for is a plain permanent failure."""
        try:
            return await outgoing.current(self.store, event) is not None
        except StoreUnavailable:
            return True  # decide on the next attempt, which rebuilds the body from the state

    async def _wait_for_session(self, shard: Shard, entry: Entry) -> None:
        """A CDR waits until every session update accepted before it is delivered or dead-lettered.

        Failure policy: order across streams: a CDR never overtakes an update of its session that
        was accepted before it; later updates do not hold it.
        """
        assert entry.after is not None
        target = id_tuple(entry.after)
        delay = 0.05
        while True:
            done, last = await self.ds.session_marks(shard.index, entry.event.key)
            if done is not None and id_tuple(done) >= target:
                return
            if done is None and last is None:
                # Forgotten when another CDR of the session (a credit CDR's original, say) was
                # delivered with no update after it: every update this CDR waits for was done.
                return
            await shard.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def _dead(
        self, shard: Shard, entry: Entry, attempts: Attempts, outcome: Outcome, *, parked_by: str = ""
    ) -> bool:
        """Dead-letter with the full reason; the key goes on with its next event, or parks.

        Failure policy: the dead letter (``policy.dead_letter_record``) is written, and the entry
        acknowledged, in one script that retries through Redis blips; ``policy.parks`` decides
        whether the key parks. ``parked_by``: written only if the key is still parked behind it;
        False (nothing written) when a purge or a replay unparked it meanwhile.
        """
        ev = entry.event
        park = policy.parks(outcome, ev.module, self.cfg)
        info = policy.dead_letter_record(outcome, attempts, self.clock(), self.me)
        raw = _info_encoder.encode(info)
        ids = entry.folded_ids() if isinstance(entry, Compacted) else ()
        dead_id = await self._record(
            shard, lambda: self.ds.dead_letter(entry, raw, park=park, superseded=ids, parked_by=parked_by)
        )
        if dead_id == self.ds.UNPARKED:
            shard.parked.discard(f"{ev.module}|{ev.key}")
            return False
        if isinstance(entry, Compacted):
            metrics.COMPACTED.add(entry.size - 1, ev.module)
        if park:
            # Even without a dead id: a retried script whose first run parked the key (reply lost)
            # finds nothing left to delete. A member too many costs one HGET, one too few sends.
            shard.parked.add(f"{ev.module}|{ev.key}")
        metrics.DEAD_LETTERED.labels(module=ev.module, kind=info["kind"]).inc()
        # The one line of a dead letter: the last attempt's fields (a permanent attempt logs no
        # delivery_failed of its own) and the dead letter's.
        log.warning("dead_lettered", event_id=ev.id, module=ev.module, key=ev.key, dead_id=dead_id,
                    kind=info["kind"], outcome=outcome.kind.value, attempts=attempts.count, reason=outcome.reason,
                    http_status=outcome.http_status, ocpi_code=outcome.ocpi_code, request_id=attempts.request_id,
                    parked=park, correlation_id=ev.correlation_id or ev.id)  # fmt: skip
        return True
