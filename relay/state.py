"""Current object state: how a PUT or PATCH changes the object the relay keeps (pure functions).

OCPI's rules: a PUT replaces; a PATCH replaces the fields it names. Beyond the letter of OCPI, as
the receivers GIREVE talks to behave: EVSEs and Connectors named in a PATCH are merged into the
existing ones by ``uid`` / ``id``; a Session PATCH *adds* its ``charging_periods`` (by ``start_date_time``: a
period already there is replaced, not added twice); a change to an
EVSE or Connector moves the ``last_updated`` of its parents.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from relay.events import Event
from relay.store import keys as K
from relay.timestamps import parse_datetime

Doc = dict[str, Any]


def state_field(event: Event) -> tuple[str, str]:
    """(hash field, index member) of the event's object: ``CC:PID:ID[:TARGET]`` and ``ID[:TARGET]``."""
    member = K.state_member(event.module, event.object_id, event.key)
    return K.state_field(event.country_code, event.party_id, member), member


@dataclass(frozen=True, slots=True)
class Change:
    """The new whole object (None: no state to keep) and whether the event named an unknown object."""

    doc: Doc | None
    unknown: bool = False


def _merge_list(current: list[Any], patch: list[Any], ident: str, nested: tuple[str, str] | None) -> list[Any]:
    out = [dict(x) for x in current]
    index = {x.get(ident): i for i, x in enumerate(out)}
    for item in patch:
        i = index.get(item.get(ident))
        if i is None:
            index[item.get(ident)] = len(out)
            out.append(item)
        else:
            out[i] = merge(out[i], item, nested)
    return out


def merge(current: Doc, patch: Doc, nested: tuple[str, str] | None = None) -> Doc:
    """Fields of ``patch`` replace those of ``current``; ``nested=(field, id)`` lists merge by id."""
    out = dict(current)
    for key, value in patch.items():
        if nested is not None and key == nested[0] and isinstance(value, list):
            deeper = ("connectors", "id") if nested[0] == "evses" else None
            out[key] = _merge_list(out.get(key) or [], value, nested[1], deeper)
        else:
            out[key] = value
    return out


def _later(a: Any, b: Any) -> Any:
    """The later of two OCPI DateTime strings (parents never go back in time)."""
    try:
        da, db = parse_datetime(a), parse_datetime(b)
    except ValueError:
        return b
    return a if da > db else b


def _find(items: list[Doc], ident: str, value: str) -> int | None:
    return next((i for i, x in enumerate(items) if str(x.get(ident)) == value), None)


def location(current: Doc | None, body: Doc, method: str, evse_uid: str | None, connector_id: str | None) -> Change:
    """A Location, EVSE or Connector PUT/PATCH applied to the stored Location."""
    if evse_uid is None:
        if method == "PUT":
            return Change(body)
        if current is None:
            return Change(None, unknown=True)
        return Change(merge(current, body, ("evses", "uid")))
    if current is None:
        return Change(None, unknown=True)
    loc = dict(current)
    evses = [dict(e) for e in loc.get("evses") or []]
    i = _find(evses, "uid", evse_uid)
    stamp = body.get("last_updated")
    if connector_id is None:
        if i is None:
            if method == "PATCH":
                return Change(None, unknown=True)
            evses.append(body)
        else:
            evses[i] = body if method == "PUT" else merge(evses[i], body, ("connectors", "id"))
    else:
        if i is None:
            return Change(None, unknown=True)
        evse = evses[i]
        conns = [dict(c) for c in evse.get("connectors") or []]
        j = _find(conns, "id", connector_id)
        if j is None:
            if method == "PATCH":
                return Change(None, unknown=True)
            conns.append(body)
        else:
            conns[j] = body if method == "PUT" else merge(conns[j], body)
        evse["connectors"] = conns
        if stamp is not None:
            evse["last_updated"] = _later(evse.get("last_updated"), stamp)
        evses[i] = evse
    loc["evses"] = evses
    if stamp is not None:
        loc["last_updated"] = _later(loc.get("last_updated"), stamp)
    return Change(loc)


def _period_start(period: Any) -> Any:
    """A ChargingPeriod's ``start_date_time`` as an instant (the string itself when it is no DateTime)."""
    start = period.get("start_date_time") if isinstance(period, dict) else None
    try:
        return parse_datetime(start)
    except (ValueError, TypeError):
        return start


def add_periods(current: list[Any], added: list[Any]) -> list[Any]:
    """OCPI's "add all the ChargingPeriods" of a Session PATCH, by ``start_date_time``: a period whose start
    is already there replaces it (a retried PATCH does not add its periods twice), the others are appended."""
    out = list(current)
    index = {_period_start(p): i for i, p in enumerate(out)}
    for period in added:
        start = _period_start(period)
        i = index.get(start) if start is not None else None
        if i is None:
            if start is not None:
                index[start] = len(out)
            out.append(period)
        else:
            out[i] = period
    return out


def session(current: Doc | None, body: Doc, method: str) -> Change:
    """A Session PUT replaces; a PATCH replaces fields and adds ``charging_periods`` (by start_date_time)."""
    if method == "PUT":
        return Change(body)
    if current is None:
        return Change(None, unknown=True)
    out = dict(current)
    for key, value in body.items():
        if key == "charging_periods":
            if value:
                out[key] = add_periods(out.get(key) or [], value)
        else:
            out[key] = value
    return Change(out)


def apply(module: str, current: Doc | None, body: Doc | None, method: str,
          evse_uid: str | None = None, connector_id: str | None = None) -> Change:  # fmt: skip
    """Dispatch by module: the object after this event. DELETE (tariffs) leaves no state."""
    if method == "DELETE" or body is None:
        return Change(None)
    if module == "locations":
        return location(current, body, method, evse_uid, connector_id)
    if module == "sessions":
        return session(current, body, method)
    return Change(body)  # CDRs are POSTed once; Tariffs are PUT whole
