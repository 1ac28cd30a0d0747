"""How many stream entries a replica holds in memory: at most ``forwarder.max_buffered``.

One ``Buffer`` is shared by every shard reader of a replica. A reader reserves its room *before*
it reads (a reader that counted after reading let every shard reader fill the same free room),
gives the reservation back when the read returns and counts what it actually got with ``add``;
an entry leaves with ``free`` when it is delivered, dead-lettered or dropped. CDRs, which may
wait for session updates still unread, never take more than half of it, counting the room
reserved for them by reads in flight. Entries folded into compacted units (``relay.compaction``) leave
``held`` for ``folded`` (an id each, not an entry), bounded by the forwarder; while the buffer is full a
reader first asks ``squeeze`` (the forwarder's folding of idle queues) for room. No I/O: tested alone
in ``tests/test_buffer.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Buffer:
    """Room for entries across all shard readers; ``held`` never exceeds ``limit`` (see ``reserve``)."""

    def __init__(self, limit: int, read_batch: int) -> None:
        self.limit = limit
        self.held = 0  # entries held in memory, plus the room reserved by reads in flight
        self.cdrs = 0  # of the entries held, CDRs (they may wait for session updates not read yet)
        self.cdrs_reading = 0  # room reserved for CDRs by reads in flight
        self.cdr_limit = max(1, limit // 2)
        # A reader waits for this much room: reading one entry per round trip as slots free up
        # would cost a Redis call per event.
        self.low_water = max(1, min(read_batch, limit // 8))
        self._room = asyncio.Event()
        self.units = 0  # compacted units in the queues (relay.compaction): not counted in held
        self.folded = 0  # entries the units stand for (an id each)
        # Called while a reader waits for room; returns how many entries it folded (0: nothing to do).
        self.squeeze: Callable[[], int] | None = None

    async def reserve(self, want: int) -> int:
        """Wait until at least ``low_water`` is free, then reserve up to ``want`` of it (returned).

        Reserving before the read (not counting after it) keeps several shard readers from each
        reading a full batch into the same free room: the buffer never exceeds ``limit``.
        """
        while self.limit - self.held < self.low_water:
            if self.squeeze is not None and self.squeeze():
                continue
            self._room.clear()
            await self._room.wait()
        n = min(want, self.limit - self.held)
        self.held += n
        return n

    def add(self, n: int, cdrs: int = 0) -> None:
        """Count ``n`` entries read (``cdrs`` of them CDRs), once their read's reservation was freed."""
        self.held += n
        self.cdrs += cdrs

    def free(self, n: int, cdrs: int = 0) -> None:
        """``n`` entries (``cdrs`` of them CDRs) or reserved slots leave; wakes the readers once
        ``low_water`` is free."""
        self.held -= n
        self.cdrs -= cdrs
        if self.limit - self.held >= self.low_water:
            self._room.set()

    def fold(self, n: int, units: int) -> None:
        """``n`` entries held were taken into compacted units (``units`` more of them, or fewer when units
        merged): they leave ``held`` for ``folded``."""
        self.folded += n
        self.units += units
        self.free(n)

    def unfold(self, n: int, units: int = 1) -> None:
        """Compacted units (``units``) standing for ``n`` entries were finished or dropped."""
        self.folded -= n
        self.units -= units

    def reserve_cdrs(self, per: int) -> int:
        """Room to read ``per`` CDRs now (returned, give it back with ``release_cdrs``), or 0.

        CDRs wait for their session's updates, which may still be unread in Redis: CDRs held or
        being read never fill more than half the buffer, or a CDR backlog would deadlock the readers.
        """
        room = per if self.cdrs + self.cdrs_reading + per <= self.cdr_limit else 0
        self.cdrs_reading += room
        return room

    def release_cdrs(self, room: int) -> None:
        """A read that had ``room`` for CDRs returned (what it read is counted by ``add``)."""
        self.cdrs_reading -= room
