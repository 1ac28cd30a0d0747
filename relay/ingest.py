"""Accepting an event: its stream entry and its object's current state in one atomic step.

A PUT of a whole object (and a CDR) is written as it came, unconditionally. A PATCH, or a PUT of
an EVSE or Connector, is merged into the stored object: read, merge (relay.state), then a
compare-and-set that fails if another writer got in between, in which case we read again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from collections.abc import Sequence
from typing import Any

import msgspec
import structlog

from relay import metrics, state
from relay.config import Settings
from relay.errors import InvalidEvent, Problem, Replayed, StoreUnavailable
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
    """The stream id of an accepted event, and what the state step noticed (a Struct: built per event).

    ``duplicate``: the object already was this document (a retried PUT or PATCH), nothing stored
    (``stream_id`` ""). ``replayed``: the answer kept for the request's Idempotency-Key, nothing stored;
    ``event_id``, ``warnings``, ``unknown_object`` and ``duplicate`` are then the first request's.
    """

    stream_id: str
    unknown_object: bool = False
    warnings: Sequence[Problem] = ()
    duplicate: bool = False
    replayed: bool = False
    event_id: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class Idempotency:
    """A request's Idempotency-Key: its scope (operator, route and key, digested), its body's digest, how long."""

    scope: str
    body: str
    ttl_s: int


def idempotency(key: str, country_code: str, party_id: str, route: str, body: bytes, ttl_s: int) -> Idempotency:
    """The Idempotency-Key ``key`` of a request on ``route`` ("METHOD path") for one operator."""
    scope = f"{country_code.upper()}:{party_id.upper()}\n{route}\n{key}".encode()
    return Idempotency(hashlib.sha256(scope).hexdigest()[:40], hashlib.sha256(body).hexdigest()[:40], ttl_s)


class _Answer(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What is kept for an Idempotency-Key: the body's digest and the 202's data."""

    b: str
    event_id: str
    warnings: list[Problem] | None = None
    unknown_object: bool = False


_answer_decoder = msgspec.json.Decoder(_Answer)
KEY_REUSED = "already used with another body within the idempotency window; use a new key for a new request"


def _replayed(stored: bytes, idem: Idempotency) -> Ingested:
    """The first request's answer (commit.lua kept ``a`` or ``d`` + _Answer); 422 for another body."""
    answer = _answer_decoder.decode(stored[1:])
    if answer.b != idem.body:
        raise InvalidEvent([Problem(field="Idempotency-Key", rule="idempotency", message=KEY_REUSED)])
    return Ingested("", answer.unknown_object, answer.warnings or (), duplicate=stored[:1] == b"d", replayed=True,
                    event_id=answer.event_id)  # fmt: skip


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

    async def one(self, acc: Accepted, idem: Idempotency | None = None, *, resend: bool = False) -> Ingested:
        """Store one event (and its state). Raises StoreUnavailable, or InvalidEvent (tariff change refused, an
        Idempotency-Key used before with another body). ``resend``: stored even if it changes nothing."""
        ev = acc.event
        w = self.unconditional(acc)
        if w is not None:
            return await self.commit(acc, w, idem, resend=resend)
        if not self.enabled:
            if idem is None:
                return Ingested(await self.store.append(ev))
            fld, member = state_field(ev)  # 'keep': the stream entry and the key's answer, no state
            keep = StateWrite("keep", fld, member, ev.country_code, ev.party_id)
            return await self.commit(acc, keep, idem, resend=resend)
        fld, member = state_field(ev)
        if ev.module == "tariffs":  # a PUT under tariffs_immutable (the rest is unconditional)
            return await self._tariff(acc, fld, member, idem, resend)
        return await self._merge(acc, fld, member, idem, resend)

    async def commit(
        self, acc: Accepted, w: StateWrite, idem: Idempotency | None = None,
        warnings: Sequence[Problem] = (), unknown: bool = False, resend: bool = False,
    ) -> Ingested:  # fmt: skip
        """``store.commit()``: with an Idempotency-Key, the answer is kept with the write (or the kept one returned);
        ``resend`` (X-Relay-Resend): stored even when it leaves the object as it is."""
        if resend:
            w = dataclasses.replace(w, resend=True)
        if idem is not None:
            found = [*acc.warnings, *warnings]
            answer = msgspec.json.encode(_Answer(b=idem.body, event_id=acc.event.id, warnings=found or None,
                                                 unknown_object=unknown))  # fmt: skip
            w = dataclasses.replace(w, idem=idem.scope, answer=answer, idem_ttl_s=idem.ttl_s)
        try:
            stream_id = await self.store.commit(acc.event, w)
        except Replayed as exc:
            assert idem is not None  # only a write with a key is answered so
            done = _replayed(exc.answer, idem)  # a 422 (another body) writes nothing
            await self.store.confirm_replay(acc.event, w)
            return done
        return Ingested(stream_id, unknown, warnings, duplicate=not stream_id)

    async def _merge(
        self, acc: Accepted, fld: str, member: str, idem: Idempotency | None, resend: bool = False
    ) -> Ingested:
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
                # A merge that changes nothing (a retried PATCH) sends the stored bytes: commit.lua sees the
                # object already is this document and stores nothing (a duplicate).
                doc = raw if raw is not None and change.doc == current else msgspec.json.encode(change.doc)
                w = StateWrite("cas", fld, member, ev.country_code, ev.party_id, doc,
                               _ms(change.doc.get("last_updated")), expected=version)  # fmt: skip
            # Not in the state: flagged on the envelope, no PUT of the current state may stand for it.
            stored = acc if change.doc is not None else _stateless(acc)
            try:
                done = await self.commit(stored, w, idem, unknown=change.doc is None, resend=resend)
            except Conflict:
                metrics.STATE_CONFLICTS.inc()
                continue
            if done.replayed:
                return done
            if change.doc is None:
                # Never seen: accepted and forwarded all the same, but flagged (the IOP may not know it either).
                metrics.UNKNOWN_OBJECT.labels(module=ev.module).inc()
                log.warning("patch_for_unknown_object", event_id=ev.id, module=ev.module, key=ev.key,
                            object=ev.object_ref())  # fmt: skip
            return done
        raise StoreUnavailable(f"state of {ev.object_ref()} kept changing; send again")

    async def _tariff(
        self, acc: Accepted, fld: str, member: str, idem: Idempotency | None, resend: bool = False
    ) -> Ingested:
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
                return await self.commit(acc, w, idem, warnings, resend=resend)
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
            out[i] = r if isinstance(r, StoreUnavailable) else Ingested(r, duplicate=not r)
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


def _stateless(acc: Accepted) -> Accepted:
    """The event flagged ``stateless``: accepted with its state unchanged (an object the relay does not hold)."""
    return msgspec.structs.replace(acc, event=msgspec.structs.replace(acc.event, stateless=True))


def _document(raw: bytes, where: str, message: str) -> dict[str, Any]:
    """A JSON object decoded untyped for a merge; a number out of range (e.g. 1e999999, which the typed
    decode skips in an unknown field) is a refusal (422), not a 500."""
    try:
        doc: dict[str, Any] = msgspec.json.decode(raw)
    except (msgspec.DecodeError, ValueError) as exc:
        raise InvalidEvent([Problem(field=where, rule="json", message=f"{message}: {exc}")]) from exc
    return doc
