"""What the forwarder sends for an event: the CSMS's operation, or the form the IOP needs.

- a Session PATCH becomes a PUT of the merged session (S2: GIREVE has no PATCH Sessions);
- a PATCH the IOP rejected as "unknown object" is healed with a PUT of the whole object (L5);
- a replayed dead letter flagged ``from_state`` is a PUT of the object's current state, in its key's
  order slot (an object with no state any more, deleted, goes as it was);
- a non-roaming Session or CDR of an Advenir operator carries GIREVE's anonymous CdrToken (S4).
"""

from __future__ import annotations

from typing import Any

import msgspec

from relay import advenir
from relay.config import Settings
from relay.events import Event
from relay.state import state_field
from relay.store import Store


async def current(store: Store, event: Event) -> bytes | None:
    """The stored current state of the event's whole object (Location, Session…), if any."""
    fld, _ = state_field(event)
    _, doc = await store.read_state(event.module, event.key, fld)
    return doc


def _as_put(event: Event, doc: bytes) -> Event:
    """A PUT of the whole object at its top-level path (a Location, not one of its EVSEs)."""
    return msgspec.structs.replace(event, method="PUT", body=doc, evse_uid=None, connector_id=None)


def as_is(settings: Settings, event: Event) -> bool:
    """True when the event goes on the wire unchanged (most events): no need to await prepare()."""
    if event.from_state or (event.method == "PATCH" and settings.state.enabled):
        return False
    return event.module not in ("sessions", "cdrs") or not _has_advenir(settings, event)


async def prepare(store: Store, settings: Settings, event: Event, *, heal: bool) -> Event:
    """The event as it goes on the wire for this attempt."""
    out = await prepare_unit(store, settings, event, heal=heal, unit=False)
    assert out is not None  # only a unit finds no state
    return out


async def prepare_unit(store: Store, settings: Settings, event: Event, *, heal: bool, unit: bool) -> Event | None:
    """``prepare``; ``unit``: the event stands for superseded entries too (a compacted run): None instead
    of the event as it came when its object has no state, whose entries then go one by one
    (``relay.compaction.Plan.split``), none of them acknowledged unsent."""
    out = event
    if event.from_state and settings.state.enabled:
        if (doc := await current(store, event)) is not None:
            out = _as_put(event, doc)
        elif unit:
            return None
    elif event.method == "PATCH" and settings.state.enabled:
        want_put = heal or (event.module == "sessions" and settings.state.sessions_patch_to_put)
        if want_put and (doc := await current(store, event)) is not None:
            out = _as_put(event, doc)
    if out.module in ("sessions", "cdrs") and out.body and _has_advenir(settings, out):
        body: dict[str, Any] = msgspec.json.decode(out.body)
        masked = advenir.anonymise(settings, out.country_code, out.party_id, body)
        if masked is not body:
            out = msgspec.structs.replace(out, body=msgspec.json.encode(masked))
    return out


def _has_advenir(settings: Settings, event: Event) -> bool:
    op = settings.operator(event.country_code, event.party_id)
    return op is not None and op.advenir
