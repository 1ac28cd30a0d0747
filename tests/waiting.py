"""The polling helpers of the tests: wait until a condition holds, or fail saying what was awaited."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import Callable
from typing import Any


async def wait_until(
    cond: Callable[[], Any],
    timeout: float = 10.0,
    what: str | Callable[[], str] = "condition",
    *,
    changed: asyncio.Event | None = None,
) -> None:
    """Poll a sync or async condition until it is truthy; fail with ``what`` after ``timeout`` seconds.

    With ``changed``, the condition is checked again as soon as that event is set (and at least every 0.2 s).
    """
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        got = cond()
        if inspect.isawaitable(got):
            got = await got
        if got:
            return
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"{what() if callable(what) else what}: not met within {timeout}s")
        if changed is not None:
            changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), min(left, 0.2))
        else:
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 2, 0.1)


def wait_until_sync(cond: Callable[[], bool], timeout: float, what: Callable[[], str]) -> None:
    """wait_until for code with no event loop (a subprocess's log): poll ``cond`` with a deadline."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{what()}: not met within {timeout}s"
        time.sleep(0.05)


async def stays_false(cond: Callable[[], bool], seconds: float) -> None:
    """Assert that cond() does not become true for a while ("nothing happens" checks)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert not cond()
        await asyncio.sleep(0.01)
