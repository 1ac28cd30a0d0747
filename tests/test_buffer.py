"""The read buffer's accounting alone (relay.buffer, no Redis): room reserved before reads, the
low-water mark, the CDR half."""

from __future__ import annotations

import asyncio

import pytest

from relay.buffer import Buffer
from tests.waiting import wait_until

# (max_buffered, read_batch, low water: max(1, min(read_batch, max // 8)), CDR limit: max(1, max // 2))
SIZES = [
    (2048, 256, 256, 1024),
    (1000, 100, 100, 500),
    (40, 32, 5, 20),
    (24, 16, 3, 12),
    (6, 3, 1, 3),
    (1, 1, 1, 1),
]


@pytest.mark.parametrize(("limit", "batch", "low_water", "cdr_limit"), SIZES)
def test_low_water_and_cdr_limit(limit: int, batch: int, low_water: int, cdr_limit: int) -> None:
    b = Buffer(limit, batch)
    assert (b.low_water, b.cdr_limit, b.held, b.cdrs) == (low_water, cdr_limit, 0, 0)


async def test_reserve_takes_what_is_free_up_to_want() -> None:
    b = Buffer(40, 32)
    assert await b.reserve(32) == 32
    assert b.held == 32
    assert await b.reserve(32) == 8  # free room (8) is above the low water (5): take it
    assert b.held == 40
    b.free(40)
    assert b.held == 0


async def test_reserve_waits_for_the_low_water_mark() -> None:
    b = Buffer(40, 32)
    b.add(37)  # 3 free: under the low water (5)
    waiting = asyncio.create_task(b.reserve(32))
    await asyncio.sleep(0)
    b.free(1)  # 4 free: still under
    await asyncio.sleep(0)
    assert not waiting.done()
    b.free(1)  # 5 free
    assert await asyncio.wait_for(waiting, 1) == 5
    assert b.held == 40


async def test_readers_reserving_together_never_exceed_the_limit() -> None:
    b = Buffer(40, 32)
    readers = [asyncio.create_task(b.reserve(32)) for _ in range(4)]
    await wait_until(lambda: b.held == 40, 1, "the room reserved")
    done = [r for r in readers if r.done()]
    assert sum(r.result() for r in done) == 40 == b.held
    waiting = [r for r in readers if not r.done()]
    assert waiting
    b.free(40)  # a read returns: its reservation goes back
    await wait_until(lambda: b.held == 40, 1, "the waiting readers' reservations")
    assert b.held <= 40
    for r in waiting:
        r.cancel()


def test_entries_read_are_counted_and_freed_with_their_cdrs() -> None:
    b = Buffer(100, 10)
    b.add(10, cdrs=4)
    assert (b.held, b.cdrs) == (10, 4)
    b.free(1, cdrs=1)  # a CDR delivered
    b.free(1)  # a location delivered
    assert (b.held, b.cdrs) == (8, 3)
    b.free(8, cdrs=3)  # a shard lost: its keys dropped
    assert (b.held, b.cdrs) == (0, 0)


def test_cdrs_held_or_being_read_stay_within_half() -> None:
    b = Buffer(40, 32)  # CDR limit 20
    first = b.reserve_cdrs(8)
    assert first == 8 and b.cdrs_reading == 8
    second = b.reserve_cdrs(8)
    assert second == 8  # 16 of 20
    assert b.reserve_cdrs(8) == 0  # 24 would exceed half: this read skips the CDR stream
    b.release_cdrs(first)
    b.add(8, cdrs=8)  # what the first read got, now held
    assert b.reserve_cdrs(4) == 4  # 8 held + 8 reading + 4 = 20
    assert b.reserve_cdrs(1) == 0
    b.release_cdrs(second)
    b.release_cdrs(4)
    b.free(8, cdrs=8)
    assert (b.cdrs, b.cdrs_reading) == (0, 0)
    assert b.reserve_cdrs(20) == 20
