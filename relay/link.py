"""The IOP link as a whole: up, down (probing), auth failed, unknown receiver, paused, or disabled.

Every attempt passes through ``Link.acquire()``/``release()`` (or ``Link.slot()``). When the IOP
as a whole fails, sending stops everywhere and one probe goes out on a backoff; after a success the
allowed concurrency doubles per success up to the configured limit (a ramp, not a thundering herd).

Waiting attempts queue first in, first out and a freed slot is handed to exactly one of them,
already taken: with thousands of keys waiting, waking them all on every release made the cost per
delivered event grow with the backlog, and a woken waiter racing a newcomer for the slot wasted
a turn of the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Callable

import structlog

from relay import metrics
from relay.errors import RelayError
from relay.states import STOPPED, LinkState

log = structlog.get_logger(__name__)
State = LinkState  # the names: relay.states


class GaveUp(RelayError):
    """``acquire(give_up)`` stopped waiting for permission because ``give_up()`` became true."""


class _Waiter:
    __slots__ = ("future", "give_up")

    def __init__(self, future: asyncio.Future[bool], give_up: Callable[[], bool] | None) -> None:
        self.future = future
        self.give_up = give_up


class Link:
    """Admission control for attempts towards the IOP."""

    def __init__(
        self, concurrency: int, failure_threshold: int, probe_initial_s: float = 1.0, probe_max_s: float = 60.0
    ) -> None:
        self.concurrency = concurrency
        self.failure_threshold = failure_threshold
        self.probe_initial_s = probe_initial_s
        self.probe_max_s = probe_max_s
        self.state: State = "up"
        self.reason = ""
        self.since = time.time()
        self.limit = concurrency
        self.inflight = 0
        self._failures = 0
        self._probe_wait = probe_initial_s
        self._probe_at = 0.0
        self._probing = False
        self._ramp_ok = 0
        self._waiters: deque[_Waiter] = deque()
        self._timer: asyncio.TimerHandle | None = None
        # Set on every state change: the lease loop publishes the new state for `relay status` at once.
        self.changed = asyncio.Event()
        metrics.set_link_state(self.state)
        metrics.INFLIGHT.set_function(lambda: self.inflight)

    def _set(self, state: State, reason: str = "") -> None:
        if state != self.state:
            log.warning("iop_link_state", state=state, previous=self.state, reason=reason)
            self.state, self.reason, self.since = state, reason, time.time()
            metrics.set_link_state(state)
            self.changed.set()

    def _may_send(self) -> bool:
        if self.state == "up":
            return self.inflight < self.limit
        if self.state == "down":
            return not self._probing and time.monotonic() >= self._probe_at
        return False

    def _take(self) -> bool:
        probe = self.state == "down"
        if probe:
            self._probing = True
        self.inflight += 1
        return probe

    def _wake(self) -> None:
        """Hand free slots to the oldest waiters; while down, arm a timer for the next probe."""
        while self._waiters and self._may_send():
            w = self._waiters.popleft()
            if not w.future.done():  # a cancelled waiter is skipped
                w.future.set_result(self._take())
        if self._waiters and self.state == "down" and not self._probing and self._timer is None:
            delay = max(0.01, self._probe_at - time.monotonic())
            self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._wake()

    def _rearm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._wake()

    def try_acquire(self) -> bool | None:
        """A slot right away if one is free and nobody queues (True: it is the probe); else None."""
        if self.state == "up" and self.inflight < self.limit and not self._waiters:
            self.inflight += 1  # the per-event path: _may_send() and _take() for the common case
            return False
        if not self._waiters and self._may_send():
            return self._take()
        return None

    async def acquire(self, give_up: Callable[[], bool] | None = None) -> bool:
        """Queue for a slot (FIFO); True when this attempt is the link probe. Pair with release().

        ``give_up`` is checked when the wait starts and whenever ``wake()`` is called: when it is
        true the wait ends with ``GaveUp`` (a stopping relay must not sit behind a paused link).
        """
        probe = self.try_acquire()
        if probe is not None:
            return probe
        if give_up is not None and give_up():
            raise GaveUp()
        w = _Waiter(asyncio.get_running_loop().create_future(), give_up)
        self._waiters.append(w)
        self._wake()  # arms the probe timer while down
        try:
            return await w.future
        except asyncio.CancelledError:
            if w.future.done() and not w.future.cancelled() and w.future.exception() is None:
                self.release(w.future.result())  # granted, then cancelled before it could run
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(w)
            raise

    def release(self, probe: bool) -> None:
        """Give back a slot taken with try_acquire() or acquire()."""
        self.inflight -= 1
        if not probe and not self._waiters:
            return  # nobody to hand the slot to: _wake() would do nothing
        if probe:
            self._probing = False
            if self.state == "down":
                # Until the probe's outcome is reported (success() or failure(probe=True)),
                # no other attempt may slip in as a second probe right away.
                self._probe_at = time.monotonic() + self._probe_wait
        self._wake()

    @contextlib.asynccontextmanager
    async def slot(self, give_up: Callable[[], bool] | None = None) -> AsyncIterator[bool]:
        """``acquire()``/``release()`` as a context manager; yields True for the link probe."""
        probe = await self.acquire(give_up)
        try:
            yield probe
        finally:
            self.release(probe)

    async def success(self) -> None:
        """An attempt got an answer that says the IOP works (any non-link outcome counts)."""
        self._failures = 0
        if self.state == "up" and self.limit >= self.concurrency:
            return
        if self.state == "down":
            self._set("up", "probe succeeded")
            self.limit, self._ramp_ok = 1, 0
            self._probe_wait = self.probe_initial_s
            self._rearm()
        elif self.state == "up" and self.limit < self.concurrency:
            # Slow start: the limit doubles once a whole window of attempts has succeeded.
            self._ramp_ok += 1
            if self._ramp_ok >= self.limit:
                self._ramp_ok = 0
                self.limit = min(self.concurrency, self.limit * 2)
                self._wake()

    async def failure(self, reason: str, *, probe: bool = False) -> None:
        """A link-level failure (refused, timeout, 5xx, 429); enough of them in a row take the link down.

        ``probe``: the attempt was the link probe (``acquire()`` returned True). While the link is
        down only a failed probe lengthens the wait before the next one: attempts that were already
        in flight when it went down fail too, and must not push the probe back towards probe_max_s.
        """
        self._failures += 1
        if self.state == "down":
            if not probe:
                return
            self._probe_wait = min(self.probe_max_s, self._probe_wait * 2)
            self._probe_at = time.monotonic() + random.uniform(0.5, 1.0) * self._probe_wait
            self._rearm()
        elif self.state == "up" and self._failures >= self.failure_threshold:
            self._set("down", reason)
            self._probe_at = time.monotonic() + self._probe_wait
            self._rearm()

    async def wake(self) -> None:
        """Make every waiter look at its ``give_up()`` again; those that give up raise GaveUp."""
        for w in list(self._waiters):
            if w.give_up is not None and w.give_up() and not w.future.done():
                self._waiters.remove(w)
                w.future.set_exception(GaveUp())
        self._wake()

    async def auth_failed(self, reason: str) -> None:
        """401/403: stop sending until resume(); retrying with the same token cannot succeed."""
        self._set("auth_failed", reason)
        self._rearm()

    async def unknown_receiver(self, reason: str) -> None:
        """OCPI 4001: the hub does not know the party our OCPI-to-* headers name; stop sending until resume()."""
        self._set("unknown_receiver", reason)
        self._rearm()

    @property
    def awaiting_operator(self) -> bool:
        """True in a state that an operator's ``relay link resume`` ends (what the lease loop asks before resuming)."""
        return self.state in STOPPED

    async def pause(self, reason: str) -> None:
        """Stop sending (unregistered, operator) while events keep queueing."""
        self._set("paused", reason)
        self._rearm()

    async def disable(self, reason: str) -> None:
        """This replica runs no forwarder: nothing is ever sent through this link."""
        self._set("disabled", reason)
        self._rearm()

    async def resume(self, reason: str = "resumed") -> None:
        """Back to sending, starting from a ramp of one (a disabled link stays disabled)."""
        if self.state in STOPPED:
            self._set("up", reason)
            self.limit, self._ramp_ok = 1, 0
            self._failures = 0
        self._rearm()
