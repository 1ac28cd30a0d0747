"""Dead letters as a tool: select, show, replay onto the ordered path, purge.

Replay never regresses state: an event is skipped when its ordering key has had a newer update
delivered since it died (unless forced).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Literal

from relay import metrics
from relay.config import MODULES
from relay.store import DeadLetter, DeliveryStore, id_tuple

ReplayResult = Literal["replayed", "skipped_newer", "gone", "would_replay", "would_skip"]


@dataclass(frozen=True, slots=True)
class Filter:
    """Which dead letters an operator means; every given criterion must match."""

    module: str | None = None
    kind: str | None = None  # permanent | auth | transient | parked
    reason: str | None = None  # substring of the reason
    key: str | None = None  # exact ordering key, e.g. loc:FR:AB1:LOC1
    since: float | None = None  # dead at or after (epoch seconds)
    ids: frozenset[str] = frozenset()

    def matches(self, dead: DeadLetter) -> bool:
        """True if this dead letter is selected."""
        info = dead.info
        return (
            (not self.ids or dead.id in self.ids or dead.event.id in self.ids)
            and (self.module is None or dead.module == self.module)
            and (self.kind is None or info.get("kind") == self.kind)
            and (self.reason is None or self.reason.lower() in str(info.get("reason", "")).lower())
            and (self.key is None or dead.event.key == self.key)
            and (self.since is None or float(info.get("dead_at") or 0) >= self.since)
        )


async def select(ds: DeliveryStore, flt: Filter, page: int = 500) -> AsyncIterator[DeadLetter]:
    """Dead letters matching the filter, per module and shard in dead-letter order (= original order per key)."""
    for module in MODULES if flt.module is None else (flt.module,):
        for shard in range(ds.store.shards):
            start = "-"
            while True:
                rows = await ds.dead_letters(module, shard, start, page)
                for dead in rows:
                    if flt.matches(dead):
                        yield dead
                if len(rows) < page:
                    break
                ms, seq = id_tuple(rows[-1].id)
                start = f"{ms}-{seq + 1}"


async def find(ds: DeliveryStore, ident: str) -> DeadLetter | None:
    """A dead letter by its dead-letter id or its event id."""
    async for dead in select(ds, Filter(ids=frozenset({ident}))):
        return dead
    return None


async def replay_one(
    ds: DeliveryStore, dead: DeadLetter, *, force: bool = False, dry_run: bool = False
) -> ReplayResult:
    """Put one dead letter back on its key's ordered path, unless a newer update was delivered since.

    Failure policy: the guard compares stream ids of one stream (the event's original id and the
    id of the last delivered event of its key), so it is exact, not clock-based. ``force`` replays
    anyway, for an operator who knows the older state is what the IOP must have.
    """
    newer = await ds.last_delivered(dead.shard, dead.module, dead.event.key)
    stale = newer is not None and id_tuple(newer) > id_tuple(dead.stream_id)
    if dry_run:
        return "would_skip" if stale and not force else "would_replay"
    if stale and not force:
        return "skipped_newer"
    new_id = await ds.replay(dead)
    if new_id is None:
        return "gone"
    metrics.REPLAYED.labels(module=dead.module).inc()
    return "replayed"


async def replay_many(
    ds: DeliveryStore,
    chosen: list[DeadLetter],
    *,
    force: bool = False,
    dry_run: bool = False,
    progress: Callable[[DeadLetter, ReplayResult], None] | None = None,
) -> dict[str, int]:
    """Replay dead letters in the given (selection) order; returns counts per result."""
    counts: dict[str, int] = {}
    for dead in chosen:
        result = await replay_one(ds, dead, force=force, dry_run=dry_run)
        counts[result] = counts.get(result, 0) + 1
        if progress is not None:
            progress(dead, result)
    return counts


async def purge_many(
    ds: DeliveryStore, chosen: list[DeadLetter], *, dry_run: bool = False, progress: Callable[[], None] | None = None
) -> int:
    """Delete dead letters; returns how many were (or, dry, would be) deleted."""
    n = 0
    for dead in chosen:
        if dry_run or await ds.purge(dead):
            n += 1
        if progress is not None:
            progress()
    return n


def describe(dead: DeadLetter) -> dict[str, Any]:
    """A dead letter as plain data for `relay dlq show` and `--json`."""
    ev = dead.event
    body: Any = ev.body.decode("utf-8", "replace") if ev.body else None
    return {
        "dead_id": dead.id,
        "event_id": ev.id,
        "module": dead.module,
        "method": ev.method,
        "object": ev.object_ref(),
        "key": ev.key,
        "correlation_id": ev.correlation_id or ev.id,
        "received_at": _iso(ev.received_at),
        "stream_id": dead.stream_id,
        **{k: (_iso(v) if k.endswith("_at") and isinstance(v, int | float) else v) for k, v in dead.info.items()},
        "body": body,
    }


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
