"""The IOP link as a whole: up, down (probing), auth failed, or paused.

Every attempt passes through ``Link.slot()``. When the IOP as a whole fails, sending stops
everywhere and one probe goes out on a backoff; after a success the allowed concurrency doubles
per success up to the configured limit (a ramp, not a thundering herd).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Literal

import structlog

from relay import metrics

log = structlog.get_logger(__name__)
State = Literal["up", "down", "auth_failed", "paused", "unconfigured"]


class GaveUp(Exception):
    """``slot(give_up)`` stopped waiting for permission because ``give_up()`` became true."""


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
        self._cond = asyncio.Condition()
        metrics.set_link_state(self.state)

    def _set(self, state: State, reason: str = "") -> None:
        if state != self.state:
            log.warning("iop_link_state", state=state, previous=self.state, reason=reason)
            self.state, self.reason, self.since = state, reason, time.time()
            metrics.set_link_state(state)

    def _may_send(self) -> bool:
        if self.state == "up":
            return self.inflight < self.limit
        if self.state == "down":
            return not self._probing and time.monotonic() >= self._probe_at
        return False

    @contextlib.asynccontextmanager
    async def slot(self, give_up: Callable[[], bool] | None = None) -> AsyncIterator[bool]:
        """Wait for permission to send; yields True when this attempt is the link probe.

        ``give_up`` is checked whenever the wait is woken (see ``wake()``): when it is true the
        wait ends with ``GaveUp`` (a stopping relay must not sit behind a paused link).
        """
        async with self._cond:
            while not self._may_send():
                if give_up is not None and give_up():
                    self._cond.notify(1)  # pass on the wake-up this waiter will not use
                    raise GaveUp()
                if self.state == "down":
                    timeout = max(0.01, self._probe_at - time.monotonic())
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._cond.wait(), timeout)
                else:
                    await self._cond.wait()
            probe = self.state == "down"
            if probe:
                self._probing = True
            self.inflight += 1
        metrics.INFLIGHT.inc()
        try:
            yield probe
        finally:
            metrics.INFLIGHT.dec()
            async with self._cond:
                self.inflight -= 1
                if probe:
                    self._probing = False
                    if self.state == "down":
                        # Until the probe's outcome is reported (success() or failure(probe=True)),
                        # no other attempt may slip in as a second probe right away.
                        self._probe_at = time.monotonic() + self._probe_wait
                    self._cond.notify_all()
                else:
                    # One freed slot, one waiter: waking every waiter per attempt costs O(backlog).
                    self._cond.notify(1)

    async def success(self) -> None:
        """An attempt got an answer that says the IOP works (any non-link outcome counts)."""
        async with self._cond:
            self._failures = 0
            before = (self.state, self.limit)
            if self.state == "down":
                self._set("up", "probe succeeded")
                self.limit, self._ramp_ok = 1, 0
                self._probe_wait = self.probe_initial_s
            elif self.state == "up" and self.limit < self.concurrency:
                # Slow start: the limit doubles once a whole window of attempts has succeeded.
                self._ramp_ok += 1
                if self._ramp_ok >= self.limit:
                    self._ramp_ok = 0
                    self.limit = min(self.concurrency, self.limit * 2)
            if (self.state, self.limit) != before:
                self._cond.notify_all()

    async def failure(self, reason: str, *, probe: bool = False) -> None:
        """A link-level failure (refused, timeout, 5xx, 429); enough of them in a row take the link down.

        ``probe``: the attempt was the link probe (``slot()`` yielded True). While the link is down
        only a failed probe lengthens the wait before the next one: attempts that were already in
        flight when it went down fail too, and must not push the probe back towards probe_max_s.
        """
        async with self._cond:
            self._failures += 1
            if self.state == "down":
                if not probe:
                    self._cond.notify_all()
                    return
                self._probe_wait = min(self.probe_max_s, self._probe_wait * 2)
                self._probe_at = time.monotonic() + random.uniform(0.5, 1.0) * self._probe_wait
            elif self.state == "up" and self._failures >= self.failure_threshold:
                self._set("down", reason)
                self._probe_at = time.monotonic() + self._probe_wait
            self._cond.notify_all()

    async def wake(self) -> None:
        """Make every waiting ``slot()`` look at its ``give_up()`` again."""
        async with self._cond:
            self._cond.notify_all()

    async def auth_failed(self, reason: str) -> None:
        """401/403: stop sending until resume(); retrying with the same token cannot succeed."""
        async with self._cond:
            self._set("auth_failed", reason)
            self._cond.notify_all()

    async def pause(self, reason: str) -> None:
        """Stop sending (unregistered, operator) while events keep queueing."""
        async with self._cond:
            self._set("paused", reason)
            self._cond.notify_all()

    async def resume(self, reason: str = "resumed") -> None:
        """Back to sending, starting from a ramp of one."""
        async with self._cond:
            if self.state in ("auth_failed", "paused", "unconfigured"):
                self._set("up", reason)
                self.limit, self._ramp_ok = 1, 0
                self._failures = 0
            self._cond.notify_all()
