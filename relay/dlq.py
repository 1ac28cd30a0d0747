"""Dead letters as a tool: select, show, replay onto the ordered path, purge.

A replay never leaves the IOP on older state than the relay's (docs/delivery.md, "Replaying dead letters"):

- a dead letter of an object with state (Location and its parts, Session, Tariff variant) is replayed
  from state: what goes on the wire, in the key's order slot, is a PUT of the object's current state
  (``Event.from_state``, built by relay.outgoing at send time); an object with no state any more goes
  as it was. A CDR or a command result is immutable and goes as it was;
- a replay from state (the object has a stored state) is never skipped as older: it goes to the end of
  the stream and sends the current state, so it cannot roll the IOP back, even behind a newer partial
  update (a status PATCH) that does not carry the dead letter's change;
- a replay that sends the old event as it was (state store off, or an object with no state) is skipped
  when a newer event of its key was delivered or is still queued (original stream ids, decided in the
  replay script itself, so nothing can slip in between): there the skip prevents a rollback. A CDR or
  a command result is never skipped (immutable, never older);
- several dead letters of one key replay as one, the newest, when it is replayed from state (the current
  state carries every older one's change): the older ones leave the DLQ as superseded. With the state
  store off each is replayed as it was, in order (the newest alone would drop an older one's change).

``force`` replays each selected dead letter itself, as it was, in order, with no guard.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from relay import metrics
from relay.config import MODULES, STATEFUL_MODULES
from relay.state import state_field
from relay.store import DeadLetter, DeliveryStore, id_tuple
from relay.timestamps import parse_datetime

ReplayResult = Literal[
    "replayed", "skipped_newer", "superseded", "gone", "would_replay", "would_skip", "would_supersede"
]


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


def parse_since(value: str) -> float:
    """``90s``, ``15m``, ``2h``, ``7d`` ago, or an ISO date/time (UTC), as epoch seconds; ValueError if neither."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if value and value[-1] in units and value[:-1].replace(".", "", 1).isdigit():
        return time.time() - float(value[:-1]) * units[value[-1]]
    return parse_datetime(value).timestamp()


_STREAM_ID = re.compile(r"^[0-9]{1,20}-[0-9]{1,20}$")


# Where a paged listing stopped: the last dead letter's module, shard and id (select's ``after``).
Position = tuple[str, int, str]


async def select(
    ds: DeliveryStore, flt: Filter, page: int = 500, after: Position | None = None
) -> AsyncIterator[DeadLetter]:
    """Dead letters matching the filter, per module and shard in dead-letter order (= original order per key);
    ``after``: only those that come after that position in this order (the next page of a listing)."""
    for module in MODULES if flt.module is None else (flt.module,):
        if after is not None and MODULES.index(module) < MODULES.index(after[0]):
            continue
        for shard in range(ds.store.shards):
            start = "-"
            if after is not None and module == after[0]:
                if shard < after[1]:
                    continue
                if shard == after[1]:
                    ms, seq = id_tuple(after[2])
                    start = f"{ms}-{seq + 1}"
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
    """A dead letter by its dead-letter id (one XRANGE per module and shard) or its event id (a scan)."""
    if _STREAM_ID.match(ident):
        ms, seq = id_tuple(ident)
        if ms < 2**64 and seq < 2**64:
            for module in MODULES:
                for shard in range(ds.store.shards):
                    rows = await ds.dead_letters(module, shard, ident, 1)
                    if rows and rows[0].id == ident:
                        return rows[0]
        return None  # an event id never has the shape of a stream id (relay.events: hex)
    async for dead in select(ds, Filter(ids=frozenset({ident}))):
        return dead
    return None


@dataclass(frozen=True, slots=True)
class Replay:
    """What a replay did to one dead letter (``relay dlq replay --json`` prints one per dead letter)."""

    result: ReplayResult
    from_state: bool = False  # queued to send the object's current state
    unparked: bool = False  # its key was parked, and no longer is
    newer: str | None = None  # skipped: "delivered" or "queued"
    by: str | None = None  # superseded (or would be): the dead letter replayed in its place


async def replay_one(
    ds: DeliveryStore, dead: DeadLetter, *, force: bool = False, dry_run: bool = False, from_state: bool = False
) -> ReplayResult:
    """Replay one dead letter (see the module's docstring); ``from_state``: the state store is on."""
    return (await _replay(ds, dead, [], force=force, dry_run=dry_run, from_state=from_state))[0].result


async def _replay(
    ds: DeliveryStore, dead: DeadLetter, older: list[DeadLetter], *, force: bool, dry_run: bool, from_state: bool
) -> tuple[Replay, frozenset[str]]:
    """Replay ``dead``, superseding ``older`` (dead letters of its key, older than it) if it goes; also
    returns the ids of the superseded dead letters deleted.

    Failure policy: the guard compares original stream ids of one stream (exact, not clock-based)
    inside the replay script; ``force`` replays anyway, as it was, for an operator who knows the
    older state is what the IOP must have.
    """
    state = from_state and not force and dead.module in STATEFUL_MODULES
    event = None
    if state:
        event = msgspec.structs.replace(dead.event, from_state=True)
    elif dead.event.from_state:  # a replay from state that died again, now forced: as it was
        event = msgspec.structs.replace(dead.event, from_state=False)
    # No guard for a CDR or a command result (immutable: never older); a replay from state skips it
    # when the object has a stored state (the script decides, with the rest of the guard).
    guard = not force and dead.module in STATEFUL_MODULES
    fld = state_field(dead.event)[0] if state else ""
    done = await ds.replay(dead, event=event, guard=guard, dry_run=dry_run, supersedes=older, state_field=fld)
    if done.result == "newer":
        return Replay("would_skip" if dry_run else "skipped_newer", newer=done.newer), frozenset()
    if done.result == "would_replay":
        return Replay("would_replay", from_state=state), frozenset()
    if done.result == "gone":
        return Replay("gone"), frozenset()
    metrics.REPLAYED.labels(module=dead.module).inc()
    return Replay("replayed", from_state=state, unparked=done.unparked), done.superseded


def _by_key(chosen: list[DeadLetter], each: bool) -> list[list[DeadLetter]]:
    """The selection as groups replayed as one: per key of an object with state, its dead letters oldest
    first (the newest replays); alone otherwise (``each``: forced or the state store off; a CDR, a command
    result). In selection order."""
    groups: dict[tuple[str, int, str], list[DeadLetter]] = {}
    for dead in chosen:
        one = each or dead.module not in STATEFUL_MODULES
        groups.setdefault((dead.module, dead.shard, dead.id if one else dead.event.key), []).append(dead)
    return [sorted(g, key=lambda d: id_tuple(d.stream_id)) for g in groups.values()]


async def replay_many(
    ds: DeliveryStore,
    chosen: list[DeadLetter],
    *,
    force: bool = False,
    dry_run: bool = False,
    from_state: bool = False,
    progress: Callable[[DeadLetter, Replay], None] | None = None,
) -> dict[str, int]:
    """Replay a selection (see the module's docstring); returns counts per result.

    Several dead letters of one key: the newest is replayed and the older ones are deleted as
    superseded in the same script; if it is skipped, so are they (they are older still); if it is
    gone (replayed or purged meanwhile), the next newest takes its place.
    """
    counts: dict[str, int] = {}

    def count(dead: DeadLetter, rep: Replay) -> None:
        counts[rep.result] = counts.get(rep.result, 0) + 1
        if progress is not None:
            progress(dead, rep)

    for group in _by_key(chosen, force or not from_state):
        while group:
            dead, older = group[-1], group[:-1]
            rep, superseded = await _replay(ds, dead, older, force=force, dry_run=dry_run, from_state=from_state)
            count(dead, rep)
            if rep.result == "gone":
                group = older
                continue
            for old in older:
                if rep.result == "replayed":
                    count(old, Replay("superseded", by=dead.id) if old.id in superseded else Replay("gone"))
                elif rep.result == "would_replay":
                    count(old, Replay("would_supersede", by=dead.id))
                else:
                    count(old, Replay(rep.result, newer=rep.newer))
            break
    return counts


@dataclass(frozen=True, slots=True)
class Purge:
    """What a purge did to one dead letter."""

    deleted: bool
    unparked: bool  # it had parked its key, which is parked no longer (or, dry, would be unparked)


async def purge_many(
    ds: DeliveryStore,
    chosen: list[DeadLetter],
    *,
    dry_run: bool = False,
    progress: Callable[[DeadLetter, Purge], None] | None = None,
) -> int:
    """Delete dead letters (a dead letter that parked its key unparks it, in the same script); returns how
    many were (or, dry, would be) deleted."""
    n = 0
    for dead in chosen:
        if dry_run:
            done = Purge(True, await ds.parked(dead.shard, dead.event.module, dead.event.key) == dead.id)
        else:
            done = Purge(*await ds.purge(dead))
        n += done.deleted
        if progress is not None:
            progress(dead, done)
    return n


def outcome_row(dead: DeadLetter, **fields: Any) -> dict[str, Any]:
    """One dead letter's outcome (``relay dlq replay|purge --json``'s lines, the admin API's ``results``): its ids,
    then ``fields`` (``result``…) without those that are None or False."""
    ev = dead.event
    row = {"dead_id": dead.id, "event_id": ev.id, "module": dead.module, "object": ev.object_ref(), "key": ev.key}
    return {**row, **{k: v for k, v in fields.items() if v not in (None, False)}}


def replay_fields(rep: Replay) -> dict[str, Any]:
    """A replay's outcome as ``outcome_row`` fields."""
    return {"result": rep.result, "from_state": rep.from_state, "unparked": rep.unparked, "newer": rep.newer,
            "superseded_by": rep.by}  # fmt: skip


def purge_fields(done: Purge, dry_run: bool) -> dict[str, Any]:
    """A purge's outcome as ``outcome_row`` fields."""
    return {"result": ("would_purge" if dry_run else "purged") if done.deleted else "gone", "unparked": done.unparked}


def replay_summary(selected: int, counts: dict[str, int], unparked: int) -> dict[str, int]:
    """The summary of a replay (the CLI's last line): selected, then replay_many's counts, then unparked."""
    return {"selected": selected, **counts, **({"unparked": unparked} if unparked else {})}


def purge_summary(selected: int, deleted: int, unparked: int, dry_run: bool) -> dict[str, int]:
    """The summary of a purge: selected, purged (or would_purge), unparked (or would_unpark) when any."""
    out = {"selected": selected, "would_purge" if dry_run else "purged": deleted}
    if unparked:
        out["would_unpark" if dry_run else "unparked"] = unparked
    return out


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
