"""Link admission control: down after a threshold, one probe at a time on a backoff, ramp, auth pause."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest
from prometheus_client import REGISTRY

from relay.link import GaveUp, Link
from tests.waiting import stays_false, wait_until


def state(link: Link) -> str:
    """The link's state, read afresh (mypy would otherwise keep an earlier assert's narrowing)."""
    return link.state


def awaiting(link: Link) -> bool:
    """``link.awaiting_operator``, read afresh (as ``state``)."""
    return link.awaiting_operator


def gauge(state: str) -> float | None:
    return REGISTRY.get_sample_value("relay_iop_link_state", {"state": state})


async def attempt(link: Link, outcome: Callable[[bool], Awaitable[None]], hold: asyncio.Event | None = None) -> bool:
    """One attempt as the forwarder makes it: slot, (hold), then report the outcome."""
    async with link.slot() as probe:
        if hold is not None:
            await hold.wait()
    await outcome(probe)
    return probe


async def test_threshold_of_link_failures_takes_the_link_down() -> None:
    link = Link(concurrency=4, failure_threshold=3, probe_initial_s=0.05, probe_max_s=1.0)
    assert state(link) == "up" and gauge("up") == 1
    await link.failure("503")
    await link.failure("503")
    await link.success()  # any answer that is not a link failure resets the count
    await link.failure("503")
    await link.failure("503")
    assert state(link) == "up"
    await link.failure("connection refused")
    assert state(link) == "down" and link.reason == "connection refused"
    assert gauge("down") == 1 and gauge("up") == 0


async def test_down_link_sends_one_probe_at_a_time_on_a_backoff() -> None:
    link = Link(concurrency=8, failure_threshold=1, probe_initial_s=0.05, probe_max_s=5.0)
    await link.failure("refused")
    down_at = time.monotonic()
    inside = 0
    most = 0
    granted: list[tuple[float, bool]] = []

    async def worker() -> None:
        nonlocal inside, most
        for _ in range(2):
            async with link.slot() as probe:
                inside += 1
                most = max(most, inside)
                granted.append((time.monotonic(), probe))
                await asyncio.sleep(0.01)
                inside -= 1
            await link.failure("refused", probe=probe)

    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(2))), 10)
    assert most == 1  # never two probes at once
    assert all(probe for _, probe in granted)
    times = [t for t, _ in granted]
    assert times[0] - down_at >= 0.045  # the first probe waits probe_initial_s
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    # Each failed probe doubles the wait (jittered between half and all of it): 0.1, 0.2, 0.4.
    for i, gap in enumerate(gaps):
        assert gap >= 0.5 * 0.05 * 2 ** (i + 1), gaps
    assert gaps[-1] > gaps[0]
    assert state(link) == "down"


async def test_failures_of_attempts_already_in_flight_do_not_delay_the_probe() -> None:
    # 10 attempts in flight when the IOP dies: 3 take the link down, the other 7 fail a moment later.
    # Only probes say something new about the IOP; the stragglers must not push the probe back.
    link = Link(concurrency=10, failure_threshold=3, probe_initial_s=0.05, probe_max_s=30.0)
    hold = asyncio.Event()

    async def fail(probe: bool) -> None:
        await link.failure("refused", probe=probe)

    stragglers = [asyncio.create_task(attempt(link, fail, hold)) for _ in range(10)]
    await wait_until(lambda: link.inflight == 10)
    hold.set()
    assert not any(await asyncio.gather(*stragglers))
    assert state(link) == "down"
    down_since = time.monotonic()
    probe_task = asyncio.create_task(attempt(link, lambda probe: link.success()))
    assert await asyncio.wait_for(probe_task, 2.0) is True
    assert time.monotonic() - down_since < 1.0
    assert state(link) == "up"


async def test_probe_success_brings_the_link_up_with_a_ramp() -> None:
    link = Link(concurrency=6, failure_threshold=1, probe_initial_s=0.01, probe_max_s=1.0)
    await link.failure("refused")
    assert await attempt(link, lambda probe: link.success()) is True
    assert state(link) == "up" and link.limit == 1 and gauge("up") == 1

    # limit 1: a second attempt waits while one is in flight.
    hold = asyncio.Event()
    first = asyncio.create_task(attempt(link, lambda probe: link.success(), hold))
    await wait_until(lambda: link.inflight == 1)
    second_in = asyncio.Event()

    async def second_body() -> None:
        async with link.slot():
            second_in.set()
        await link.success()

    second = asyncio.create_task(second_body())
    await stays_false(second_in.is_set, 0.1)
    hold.set()
    await asyncio.wait_for(asyncio.gather(first, second), 2)
    # first success of window 1 → limit 2; then a window of 2 → 4; a window of 4 → 6 (capped).
    limits = [link.limit]
    for _ in range(8):
        await attempt(link, lambda probe: link.success())
        limits.append(link.limit)
    assert limits[0] == 2
    assert limits[2] == 4
    assert limits[6] == 6
    assert max(limits) == 6

    # The limit is really enforced at each step of the ramp.
    await link.failure("refused")
    await attempt(link, lambda probe: link.success())
    assert link.limit == 1
    holds = asyncio.Event()
    tasks = [asyncio.create_task(attempt(link, lambda probe: link.success(), holds)) for _ in range(5)]
    await wait_until(lambda: link.inflight == 1)
    await stays_false(lambda: link.inflight > 1, 0.05)
    holds.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 2)


@pytest.mark.parametrize("how", ["auth_failed", "unknown_receiver", "pause"])
async def test_auth_failure_blocks_every_slot_until_resume(how: str) -> None:
    link = Link(concurrency=4, failure_threshold=5, probe_initial_s=0.01, probe_max_s=1.0)
    if how == "auth_failed":
        await link.auth_failed("http 401: token refused")
        assert state(link) == "auth_failed" and gauge("auth_failed") == 1
    elif how == "unknown_receiver":
        await link.unknown_receiver("OCPI 4001 unknown receiver: FR*107")
        assert state(link) == "unknown_receiver" and gauge("unknown_receiver") == 1 and gauge("up") == 0
        assert link.reason == "OCPI 4001 unknown receiver: FR*107"
    else:
        await link.pause("unregistered")
        assert state(link) == "paused" and gauge("paused") == 1
    got = asyncio.Event()

    async def wants_to_send() -> None:
        async with link.slot():
            got.set()

    task = asyncio.create_task(wants_to_send())
    await stays_false(got.is_set, 0.3)  # no probing either: the same token cannot succeed
    assert link.inflight == 0
    # Failures and successes reported meanwhile do not reopen it.
    await link.failure("x")
    await link.success()
    assert state(link) == how.replace("pause", "paused")
    await stays_false(got.is_set, 0.05)
    await link.resume("operator")
    await asyncio.wait_for(task, 1)
    assert state(link) == "up" and link.limit == 1 and gauge("up") == 1 and gauge("auth_failed") == 0
    assert gauge("unknown_receiver") == 0


async def test_which_states_an_operator_resume_ends() -> None:
    """`relay link resume` ends auth_failed, unknown_receiver and paused; a down link probes by itself."""
    link = Link(concurrency=4, failure_threshold=1, probe_initial_s=0.01, probe_max_s=1.0)
    assert not awaiting(link)
    for stop in (link.auth_failed, link.unknown_receiver, link.pause):
        await stop("x")
        assert awaiting(link), state(link)
        await link.resume("operator")
        assert state(link) == "up" and not awaiting(link)
    await link.failure("refused")
    assert state(link) == "down" and not awaiting(link)
    await link.unknown_receiver("OCPI 4001")  # a probe answered 4001: stopped, no more probes
    assert state(link) == "unknown_receiver" and awaiting(link)


async def test_a_waiting_slot_gives_up_when_woken() -> None:
    link = Link(concurrency=4, failure_threshold=5, probe_initial_s=0.01, probe_max_s=1.0)
    await link.pause("unregistered")
    stopping = False

    async def wants_to_send() -> None:
        async with link.slot(lambda: stopping):
            raise AssertionError("admitted while paused")

    task = asyncio.create_task(wants_to_send())
    await stays_false(task.done, 0.05)
    stopping = True
    await link.wake()
    with pytest.raises(GaveUp):
        await asyncio.wait_for(task, 1)
    assert link.inflight == 0


async def test_a_freed_slot_goes_to_the_oldest_waiter_and_to_one_only() -> None:
    link = Link(concurrency=2, failure_threshold=5)
    assert link.try_acquire() is False and link.try_acquire() is False  # both slots taken, no probe
    assert link.try_acquire() is None
    order: list[int] = []

    async def waiter(n: int) -> None:
        probe = await link.acquire()
        order.append(n)
        link.release(probe)

    tasks = [asyncio.create_task(waiter(n)) for n in range(5)]
    await wait_until(lambda: len(link._waiters) == 5)
    assert link.try_acquire() is None  # a newcomer does not overtake the queue
    link.release(False)
    await wait_until(lambda: len(order) == 5)
    assert order == [0, 1, 2, 3, 4]
    assert link.inflight == 1  # the slot still held by the test
    link.release(False)
    await asyncio.gather(*tasks)
    assert link.inflight == 0


async def test_a_waiter_cancelled_after_it_was_granted_gives_the_slot_back() -> None:
    link = Link(concurrency=1, failure_threshold=5)
    assert link.try_acquire() is False
    first = asyncio.create_task(link.acquire())
    second = asyncio.create_task(link.acquire())
    await wait_until(lambda: len(link._waiters) == 2)
    link.release(False)  # granted to `first`, which is cancelled before it runs
    first.cancel()
    assert await asyncio.wait_for(second, 1) is False  # the slot moved on instead of leaking
    assert first.cancelled() and link.inflight == 1
    link.release(False)
    assert link.inflight == 0
