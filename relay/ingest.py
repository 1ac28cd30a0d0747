"""Accepting an event: its stream entry and its object's current state in one atomic step.

A PUT of a whole object (and a CDR) is written as it came, unconditionally. A PATCH, or a PUT of
an EVSE or Connector, is merged into the stored object: read, merge (relay.state), then a
compare-and-set that fails if another writer got in between, in which case we read again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import msgspec
import structlog

from relay import metrics, state
from relay.config import Settings
from relay.errors import InvalidEvent, Problem, StoreUnavailable
from relay.events import Event
from relay.state import state_field
from relay.store import Conflict, StateWrite, Store
from relay.timestamps import epoch_ms
from relay.validation import Accepted

log = structlog.get_logger(__name__)
_MAX_CAS = 8
# Fields of a Tariff that may change on a known variant; anything else is a price change (F3).
_TARIFF_MUTABLE = frozenset({"tariff_alt_text", "tariff_alt_url", "end_date_time", "last_updated"})


class Ingested(msgspec.Struct):
    """The stream id of an accepted event, and what the state step noticed (a Struct: built per event)."""

    stream_id: str
    unknown_object: bool = False
    warnings: Sequence[Problem] = ()


def _ms(stamp: Any) -> int:
    """An OCPI DateTime as epoch ms for the index (no designator: UTC); 0 when it is not one."""
    try:
        return epoch_ms(stamp)
    except ValueError:
        return 0


def _needs_merge(event: Event) -> bool:
    return event.method == "PATCH" or (event.module == "locations" and event.evse_uid is not None)


def _tariff_changes(current: bytes | None, new: bytes) -> list[str]:
    if current is None:
        return []
    old: dict[str, Any] = msgspec.json.decode(current)
    nxt: dict[str, Any] = msgspec.json.decode(new)
    keys = (old.keys() | nxt.keys()) - _TARIFF_MUTABLE
    return sorted(k for k in keys if old.get(k) != nxt.get(k))


class Ingest:
    """The ingress's write path (single events and batches)."""

    def __init__(self, store: Store, settings: Settings) -> None:
        self.store = store
        self.settings = settings
        self.enabled = settings.state.enabled

    def unconditional(self, acc: Accepted) -> StateWrite | None:
        """The state write of an event that needs no read first (a PUT of a whole object but a Tariff under
        ``tariffs_immutable``, a DELETE), for ``store.commit(acc.event, write)``; None: ``one()`` decides.

        The ingress's single route commits it itself: one coroutine layer less on the common PUT.
        """
        ev = acc.event
        if not self.enabled:
            return None
        if ev.method == "DELETE":
            fld, member = state_field(ev)
            return StateWrite("del", fld, member, ev.country_code, ev.party_id)
        if _needs_merge(ev) or (ev.module == "tariffs" and self.settings.state.tariffs_immutable != "off"):
            return None
        fld, member = state_field(ev)
        return StateWrite("put", fld, member, ev.country_code, ev.party_id, ev.body, acc.updated_ms)

    async def one(self, acc: Accepted) -> Ingested:
        """Store one event (and its state). Raises StoreUnavailable, or InvalidEvent (tariff change refused)."""
        ev = acc.event
        w = self.unconditional(acc)
        if w is not None:
            return Ingested(await self.store.commit(ev, w))
        if not self.enabled:
            return Ingested(await self.store.append(ev))
        fld, member = state_field(ev)
        if ev.module == "tariffs":  # a PUT under tariffs_immutable (the rest is unconditional)
            return await self._tariff(acc, fld, member)
        return await self._merge(acc, fld, member)

    async def _merge(self, acc: Accepted, fld: str, member: str) -> Ingested:
        ev = acc.event
        body: dict[str, Any] = _document(
            ev.body, "body", "the body holds a value JSON can carry but Python cannot read"
        )
        for _ in range(_MAX_CAS):
            version, raw = await self.store.read_state(ev.module, ev.key, fld)
            current = (
                _document(raw, "state", "the stored object cannot be read; send a PUT of the whole object")
                if raw is not None
                else None
            )
            change = state.apply(ev.module, current, body, ev.method, ev.evse_uid, ev.connector_id)
            if change.doc is None:
                # Nothing to merge into (no object, or no such EVSE/Connector): the state stays as it is,
                # unless the object appeared since our read (then the 'none' write conflicts: merge again).
                w = StateWrite("none", fld, member, ev.country_code, ev.party_id, expected=version)
            else:
                doc = msgspec.json.encode(change.doc)
                w = StateWrite("cas", fld, member, ev.country_code, ev.party_id, doc,
                               _ms(change.doc.get("last_updated")), expected=version)  # fmt: skip
            try:
                stream_id = await self.store.commit(ev, w)
            except Conflict:
                metrics.STATE_CONFLICTS.inc()
                continue
            if change.doc is None:
                # Never seen: accepted and forwarded all the same, but flagged (the IOP may not know it either).
                metrics.UNKNOWN_OBJECT.labels(module=ev.module).inc()
                log.warning("patch_for_unknown_object", event_id=ev.id, module=ev.module, key=ev.key,
                            object=ev.object_ref())  # fmt: skip
            return Ingested(stream_id, unknown_object=change.doc is None)
        raise StoreUnavailable(f"state of {ev.object_ref()} kept changing; send again")

    async def _tariff(self, acc: Accepted, fld: str, member: str) -> Ingested:
        ev = acc.event
        for _ in range(_MAX_CAS):
            version, raw = await self.store.read_state(ev.module, ev.key, fld)
            changed = _tariff_changes(raw, ev.body)
            warnings: list[Problem] = []
            if changed:
                problem = Problem(
                    field=f"$.{changed[0]}",
                    rule="gireve.F3.tariff_immutable",
                    message=f"changes {', '.join(changed)} of an existing tariff; GIREVE expects a new tariff_id",
                )
                if self.settings.state.tariffs_immutable == "reject":
                    raise InvalidEvent([problem], status=409)
                warnings.append(problem)
            # Always compare-and-set (version 0: "still absent"): the check above was made on this read.
            w = StateWrite("cas", fld, member, ev.country_code, ev.party_id, ev.body, acc.updated_ms, expected=version)
            try:
                return Ingested(await self.store.commit(ev, w), warnings=warnings)
            except Conflict:
                metrics.STATE_CONFLICTS.inc()
                continue
        raise StoreUnavailable(f"state of {ev.object_ref()} kept changing; send again")

    async def many(self, accs: list[Accepted]) -> list[Ingested | StoreUnavailable | InvalidEvent]:
        """A batch: plain writes in one pipeline; keys that need a merge in order, key by key."""
        out: list[Ingested | StoreUnavailable | InvalidEvent | None] = [None] * len(accs)
        if not self.enabled:
            for i, r in enumerate(await self.store.append_many([a.event for a in accs])):
                out[i] = r if isinstance(r, StoreUnavailable) else Ingested(r)
            return [r for r in out if r is not None]
        # Keys with an item that needs a read (merge, tariff check) go key by key, in order; the others in one
        # pipeline, in the batch's order (which keeps each key's order).
        slow_keys = {acc.event.key for acc in accs if self._slow(acc)}
        simple: Sequence[int] = range(len(accs))
        slow: list[list[int]] = []
        if slow_keys:
            chains: dict[str, list[int]] = {}
            plain: list[int] = []
            for i, acc in enumerate(accs):
                if acc.event.key in slow_keys:
                    chains.setdefault(acc.event.key, []).append(i)
                else:
                    plain.append(i)
            simple, slow = plain, list(chains.values())
        writes = []
        for i in simple:
            ev = accs[i].event
            fld, member = state_field(ev)
            mode = "del" if ev.method == "DELETE" else "put"
            w = StateWrite(mode, fld, member, ev.country_code, ev.party_id, ev.body, accs[i].updated_ms)
            writes.append((ev, w))
        if slow:
            done, chained = await asyncio.gather(self.store.commit_many(writes), self._chains(accs, slow))
        else:
            done, chained = await self.store.commit_many(writes), []
        for i, r in zip(simple, done, strict=True):
            out[i] = r if isinstance(r, StoreUnavailable) else Ingested(r)
        for i, r2 in chained:
            out[i] = r2
        return [r for r in out if r is not None]

    def _slow(self, acc: Accepted) -> bool:
        ev = acc.event
        return _needs_merge(ev) or (ev.module == "tariffs" and ev.method == "PUT"
                                    and self.settings.state.tariffs_immutable != "off")  # fmt: skip

    async def _chains(self, accs: list[Accepted], chains: list[list[int]]) -> list[tuple[int, Any]]:
        async def run(idx: list[int]) -> list[tuple[int, Any]]:
            res: list[tuple[int, Any]] = []
            for i in idx:  # one key: strictly in order, and stop at the first failure to keep order
                try:
                    res.append((i, await self.one(accs[i])))
                except (StoreUnavailable, InvalidEvent) as exc:
                    res.append((i, exc))
                    failed = StoreUnavailable("an earlier operation of this object was not stored")
                    res += [(j, failed) for j in idx[idx.index(i) + 1 :]]
                    break
            return res

        parts = await asyncio.gather(*(run(c) for c in chains))
        return [x for part in parts for x in part]


def _document(raw: bytes, where: str, message: str) -> dict[str, Any]:
    """A JSON object decoded untyped for a merge; a number out of range (e.g. 1e999999, which the typed
    decode skips in an unknown field) is a refusal (422), not a 500."""
    try:
        doc: dict[str, Any] = msgspec.json.decode(raw)
    except (msgspec.DecodeError, ValueError) as exc:
        raise InvalidEvent([Problem(field=where, rule="json", message=f"{message}: {exc}")]) from exc
    return doc
