"""Compaction of backlogs: several undelivered updates of one key sent as one request.

When a key's queue holds more than one entry of a compacted module (``[forwarder] compact``), runs of
its entries are folded into *units* (``Compacted``): the newest entry of the run, whose request
carries the combined effect of the run, and the ids of the entries it supersedes, which the same
Lua script that records its delivery (finish.lua) or its dead letter (compact_dead.lua)
acknowledges and deletes. The rules (pure functions, tested alone in ``tests/test_compaction.py``):

- **Locations, dynamic**: PATCHes of an EVSE whose fields are only ``status`` / ``last_updated``, and
  of a Connector whose fields are only ``tariff_ids`` / ``last_updated`` (GIREVE's dynamic
  attributes, integrated in real time) fold per path: their bodies merged in order into one PATCH.
  PATCHes of different paths commute, so a run of them becomes one unit per path, in the order the
  paths first appear (the head's path first). Consecutive identical statuses collapse with the rest.
- **Locations, static; Sessions**: a run of any other updates becomes one PUT of the current stored
  object (``Event.from_state``), read when the request is built, after every entry of the run was
  read from the stream: it includes them all (and maybe later ones, sent again after it: an update
  the IOP already has). Only with the state store on.
  A replayed dead letter (``from_state``) is such an update whatever its body; an update the state does
  not hold (``Event.stateless``: a PATCH of an unknown object, EVSE or Connector) is a barrier. A run
  whose PUT finds no state when it is built is split back into its entries, read again from the stream
  and sent one by one (``Plan.split``): nothing is acknowledged that was not sent.
- **Tariffs**: a run of PUTs and DELETEs is its newest one (a PUT replaces the whole object).
- Anything else is a barrier no run crosses; CDRs and CommandResults are never compacted.

Where it runs (``relay.forwarder``): a worker folds the head run of the key it holds just before
sending (after its link slot), and while the buffer is full and the link is not up (the IOP away,
refused, paused) the idle keys' queues are folded (``squeeze``) so that a backlog behind a down IOP
is read and folded instead of waiting in Redis.
Units leave the buffer's ``held`` (``Buffer.units`` counts them, at most 8 x ``max_buffered``); a
unit holds its superseded ids packed (16 bytes each), ``Buffer.folded`` counts the entries they stand
for (at most ``compact_max_folded``).
"""

from __future__ import annotations

from array import array
from collections import deque
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from relay.buffer import Buffer
from relay.config import Module
from relay.events import Event
from relay.shard import Abandon, QKey, Shard
from relay.store import DeliveryStore, Entry, id_tuple

# Fields whose changes GIREVE integrates in real time (cpo_locations.md, "Static and dynamic attributes").
EVSE_DYNAMIC = frozenset({"status", "last_updated"})
CONNECTOR_DYNAMIC = frozenset({"tariff_ids", "last_updated"})
NEVER: frozenset[str] = frozenset({"cdrs", "commands"})

Path = tuple[str | None, str | None]  # (evse_uid, connector_id) of a dynamic PATCH
_DYN, _STATE, _LAST, _NONE = "dynamic", "state", "last", ""
_STATEFUL = frozenset({"locations", "sessions"})  # a run of them is sent as a PUT of the current state
_decode = msgspec.json.Decoder().decode
_encode = msgspec.json.Encoder().encode


def _ids() -> array[int]:
    return array("Q")


@dataclass(slots=True)
class Compacted(Entry):
    """A unit: the newest entry of a run (``id``; ``origin``: the newest original id, the delivered
    marker) with the request that carries the run's effect (``event``), and the ids it supersedes."""

    folded: array[int] = field(default_factory=_ids)  # superseded ids, packed (ms, seq) pairs
    kind: str = _NONE
    path: Path = (None, None)
    body: dict[str, Any] | None = None  # a dynamic unit: its merged PATCH body

    @property
    def size(self) -> int:
        """Entries it stands for: itself and those it supersedes."""
        return 1 + len(self.folded) // 2

    def folded_ids(self) -> list[str]:
        f = self.folded
        return [f"{f[i]}-{f[i + 1]}" for i in range(0, len(f), 2)]


def size(entry: Entry) -> int:
    """Entries an item of a queue stands for."""
    return entry.size if isinstance(entry, Compacted) else 1


def _dynamic_body(ev: Event) -> dict[str, Any] | None:
    """The decoded body of a Location PATCH that changes dynamic fields only, else None."""
    if ev.method != "PATCH" or ev.evse_uid is None:
        return None
    allowed = EVSE_DYNAMIC if ev.connector_id is None else CONNECTOR_DYNAMIC
    try:
        body = _decode(ev.body)
    except (msgspec.DecodeError, ValueError):
        return None
    if not isinstance(body, dict) or not body or not body.keys() <= allowed:
        return None
    return body


def kind_of(entry: Entry, state: bool) -> tuple[str, Path, dict[str, Any] | None]:
    """How an entry compacts: (kind, path of a dynamic PATCH, its body); kind "" for a barrier."""
    if isinstance(entry, Compacted):
        return entry.kind, entry.path, entry.body
    ev = entry.event
    if entry.after is not None or ev.module in NEVER:
        return _NONE, (None, None), None
    if ev.module in _STATEFUL:
        # A replayed dead letter (from_state) is a PUT of the current state, whatever its body: a state
        # entry. An update the state does not hold (stateless: an unknown object, EVSE or Connector) is
        # not in the PUT of the current state: a barrier, unless its body merges as a dynamic PATCH.
        if ev.from_state:
            return (_STATE if state else _NONE), (None, None), None
        body = _dynamic_body(ev) if ev.module == "locations" else None
        if body is not None:
            return _DYN, (ev.evse_uid, ev.connector_id), body
        return (_STATE if state and not ev.stateless else _NONE), (None, None), None
    if ev.module == "tariffs":
        return _LAST, (None, None), None
    return _NONE, (None, None), None


def describe(event: Event, modules: Iterable[str], state: bool = True) -> str:
    """``relay peek``'s word for an entry: how it would compact with its key's neighbours, or ""."""
    if event.module not in modules:
        return ""
    return kind_of(Entry("", 0, "0-0", event), state)[0]


def _marker(a: Entry, b: Entry) -> str | None:
    """The newest original id of two (the delivered marker), as a unit's ``origin`` (None: b's own id)."""
    oa, ob = a.origin or a.id, b.origin or b.id
    newest = oa if id_tuple(oa) > id_tuple(ob) else ob
    return None if newest == b.id else newest


def _folded(a: Entry, b: Entry) -> array[int]:
    out = array("Q", a.folded) if isinstance(a, Compacted) else array("Q")
    out.extend(id_tuple(a.id))
    if isinstance(b, Compacted):
        out.extend(b.folded)
    return out


Body = dict[str, Any] | None


def _merge(a: Entry, b: Entry, kind: str, path: Path, body: Body, newer: Body) -> Compacted:
    """``b`` (newer) superseding ``a``: one unit of ``kind``."""
    ev = b.event
    merged: dict[str, Any] | None = None
    if kind == _DYN:
        merged = {**(body or {}), **(newer or {})}
        ev = msgspec.structs.replace(ev, body=_encode(merged))
    elif kind == _STATE and not ev.from_state:
        ev = msgspec.structs.replace(ev, from_state=True)
    return Compacted(b.stream, b.shard, b.id, ev, None, _marker(a, b), _folded(a, b), kind, path, merged)


def _unit(item: Entry, kind: str, path: Path, body: Body) -> Compacted:
    """An entry as a unit of its own (the same request): it leaves the buffer's ``held`` for ``units``."""
    if isinstance(item, Compacted):
        return item
    return Compacted(item.stream, item.shard, item.id, item.event, None, item.origin, array("Q"), kind, path, body)


def fold(items: Sequence[Entry], *, state: bool) -> list[Entry] | None:
    """The items of one key's queue (oldest first) with their runs folded, or None if nothing changes.

    Every entry that may compact comes out as a unit (``Compacted``), alone or standing for several:
    a unit costs the buffer nothing (``Buffer.units`` bounds them), so a backlog keeps being read while
    the IOP is away. Barriers stay as they are."""
    out: list[Entry] = []
    run: dict[Path, Compacted] = {}  # a dynamic run: path → its unit so far
    group: Compacted | None = None  # a state or last run so far
    changed = False
    for item in items:
        kind, path, body = kind_of(item, state)
        changed = changed or (bool(kind) and not isinstance(item, Compacted))
        if kind == _DYN:
            if group is not None:
                out.append(group)
                group = None
            prev = run.get(path)
            if prev is None:
                run[path] = _unit(item, kind, path, body)
            else:
                run[path] = _merge(prev, item, kind, path, prev.body, body)
        elif kind:
            if run:
                out += run.values()
                run = {}
            if group is None or group.kind != kind:
                if group is not None:
                    out.append(group)
                group = _unit(item, kind, path, None)
            else:
                group = _merge(group, item, kind, path, None, None)
                changed = True
        else:
            if run:
                out += run.values()
                run = {}
            if group is not None:
                out.append(group)
                group = None
            out.append(item)
    out += run.values()
    if group is not None:
        out.append(group)
    return out if changed or len(out) < len(items) else None


def _raw(items: Iterable[Entry]) -> int:
    return sum(1 for e in items if not isinstance(e, Compacted))


def _units(items: Iterable[Entry]) -> int:
    return sum(1 for e in items if isinstance(e, Compacted))


def head_run(items: Sequence[Entry], state: bool) -> int:
    """How many items, from the head, make its run (items of the head's kind; dynamic PATCHes of any path):
    what is folded into the request sent now. 0 when the head is a barrier."""
    first = kind_of(items[0], state)[0] if items else _NONE
    if not first:
        return 0
    n = 1
    while n < len(items) and kind_of(items[n], state)[0] == first:
        n += 1
    return n


def fold_queue(
    q: deque[Entry], buffer: Buffer, *, state: bool, keep_head: bool = False, head_only: bool = False
) -> int:
    """Fold a key's queue in place (``keep_head``: not its head, which may be on the wire; ``head_only``: only
    the head's run, the request sent now); the entries taken into units move from ``buffer.held`` to
    ``buffer.folded``. Returns how many moved.

    ``head_only`` is the senders' fold (``Plan``): with the link up, folding the whole queue turned every
    compactable entry behind the head into a unit, out of ``held``, so the reader read on and the backlog of
    a key whose runs do not merge (PUTs between status PATCHes) came into memory whole, with no bound (only
    ``squeeze``, while the link is not up, keeps units within its limits)."""
    items = list(q)[1:] if keep_head else list(q)
    rest: list[Entry] = []
    if head_only:
        n = head_run(items, state)
        if n < 2:
            return 0
        items, rest = items[:n], items[n:]
    if not items:
        return 0
    folded = fold(items, state=state)
    if folded is None:
        return 0
    moved = _raw(items) - _raw(folded)
    head = q[0] if keep_head else None
    q.clear()
    if head is not None:
        q.append(head)
    q.extend(folded)
    q.extend(rest)
    buffer.fold(moved, _units(folded) - _units(items))
    return moved


def drop(q: Collection[Entry], buffer: Buffer, cdrs: bool) -> None:
    """A key's queue leaves the buffer unfinished (dropped, forgotten; ``cdrs``: a CDR queue): its raw
    entries are freed from ``held``, its units from ``units`` and ``folded``."""
    sizes = [e.size for e in q if isinstance(e, Compacted)]
    left = len(q) - len(sizes)
    buffer.free(left, left * cdrs)
    buffer.unfold(sum(sizes), len(sizes))


def newest(q: deque[Entry]) -> tuple[int, int]:
    """The newest stream id in a key's queue (not empty). Entries are queued oldest first, but a folded
    dynamic run ends with one unit per path in the order the paths first appeared: the newest is then
    one of the trailing dynamic units (only those are scanned)."""
    top = id_tuple(q[-1].id)
    for item in reversed(q):
        if not (isinstance(item, Compacted) and item.kind == _DYN):
            break
        top = max(top, id_tuple(item.id))
    return top


def superseding(entry: Entry) -> bool:
    """Whether an entry is a state unit standing for others: sent only as a PUT of the current state."""
    return isinstance(entry, Compacted) and entry.kind == _STATE and len(entry.folded) > 0


class Plan:
    """The queue of a key its holder sends from (``Delivery.attempt(plan=)``): called with True just
    before sending, it folds the head's run (``head_run``: the rest stays in ``held``) and returns the head;
    ``split`` replaces a head unit whose PUT of the current state finds no state with the entries it stands for."""

    __slots__ = ("buffer", "ds", "q", "state")

    def __init__(self, q: deque[Entry], buffer: Buffer, ds: DeliveryStore, *, state: bool) -> None:
        self.q, self.buffer, self.ds, self.state = q, buffer, ds, state

    def __call__(self, fold: bool) -> Entry:
        q = self.q
        if fold and len(q) > 1:
            fold_queue(q, self.buffer, state=self.state, head_only=True)
        return q[0]

    async def split(self) -> Entry:
        """The head unit's entries read again from the stream, in place of it, each a barrier sent as it
        came (never acknowledge what was not sent); ids no longer in the stream are acknowledged with the
        last of them. Returns the new head. Raises StoreUnavailable, or Abandon if the queue was dropped."""
        unit = self.q[0]
        if not superseding(unit):
            return unit
        assert isinstance(unit, Compacted)
        ids = [*unit.folded_ids(), unit.id]
        found = await self.ds.entries(unit.stream, unit.shard, ids)
        if not self.q or self.q[0] is not unit:  # dropped meanwhile: the shard is gone
            raise Abandon()
        parts = [Compacted(e.stream, e.shard, e.id, e.event, e.after, e.origin) for e in found]
        gone = set(ids) - {e.id for e in found}
        if not parts:  # every entry deleted: the newest as it came, standing for them
            parts = [Compacted(unit.stream, unit.shard, unit.id, msgspec.structs.replace(unit.event, from_state=False),
                               None, unit.origin)]  # fmt: skip
            gone.discard(unit.id)
        for x in sorted(gone, key=id_tuple):
            parts[-1].folded.extend(id_tuple(x))
        self.q.popleft()
        self.q.extendleft(reversed(parts))
        self.buffer.unfold(0, 1 - len(parts))
        return parts[0]


def squeeze(
    shards: Iterable[Shard], idle: set[tuple[int, QKey]], modules: frozenset[str], buffer: Buffer,
    limits: tuple[int, int], *, state: bool,
) -> int:  # fmt: skip
    """Fold the queues of every shard while the buffer is full: whole queues of the keys nobody holds
    (``idle``: ``(id(shard), qkey)`` of the keys waiting for a worker, by shard object: a shard taken back
    is another object), the others behind their head, until ``limits`` (entries folded, units) are
    reached. Returns the entries taken out of ``held``."""
    moved = 0
    max_folded, max_units = limits
    for shard in shards:
        if shard.gone():
            continue
        for qkey, q in shard.queues.items():
            if buffer.folded >= max_folded or buffer.units >= max_units:
                return moved
            if qkey[0] not in modules:
                continue
            whole = (id(shard), qkey) in idle and qkey not in shard.runners
            if not whole and len(q) < 2:
                continue
            moved += fold_queue(q, buffer, state=state, keep_head=not whole)
    return moved


def modules(compact: Iterable[Module]) -> frozenset[str]:
    """The compacted modules of ``[forwarder] compact`` (CDRs and CommandResults never are)."""
    return frozenset(compact) - NEVER
