"""What a replica holds for one shard it owns, and how work on it stops.

A ``Shard`` is created when the lease loop hands the shard to the forwarder and dropped when it
is lost, handed back or the relay stops. ``gone()`` is the one "must work on it stop?" check of
the readers, workers, key runners and deliveries; ``sleep()`` is their interruptible wait.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass, field

from relay.errors import RelayError
from relay.store import Entry

QKey = tuple[str, str]  # (module, ordering key): one queue of a shard


class Abandon(RelayError):
    """Stop working on an entry without acknowledging it (stopping, or the shard lease was lost)."""


@dataclass
class Shard:
    """What this replica holds for one shard it owns."""

    index: int
    dirty: bool  # taken over from a replica that did not hand it back cleanly
    stopping: asyncio.Event  # the forwarder's: set when the relay stops
    queues: dict[QKey, deque[Entry]] = field(default_factory=dict)
    runners: dict[QKey, asyncio.Task[None]] = field(default_factory=dict)
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

    def gone(self) -> bool:
        """Whether work on this shard must stop: it is no longer ours, or the relay is stopping."""
        return self.lost.is_set() or self.stopping.is_set()

    async def interrupted(self) -> None:
        """Returns when the shard is lost or the relay stops."""
        stop = asyncio.ensure_future(self.stopping.wait())
        lost = asyncio.ensure_future(self.lost.wait())
        try:
            await asyncio.wait({stop, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            lost.cancel()

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds``, cut short when the shard is gone, and then raise Abandon."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.interrupted(), seconds)
        if self.gone():
            raise Abandon()
