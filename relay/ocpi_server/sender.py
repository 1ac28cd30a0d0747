"""Sender interfaces (L4, S5): the IOP pulls Locations, Sessions, CDRs and Tariffs from the relay.

Answered from the state the CSMS sent, filtered by the operator(s) named in the routing headers,
paginated as OCPI says (``date_from``, ``date_to``, ``offset``, ``limit``, ``Link``,
``X-Total-Count``, ``X-Limit``), ordered by ``last_updated`` then id so that pages are stable.

A request the relay cannot serve (a query parameter it cannot read, an OCPI-to-* naming no hosted
operator) is answered HTTP 200 with OCPI 2001: it has reached the OCPI layer, where "an HTTP error
status code MUST NOT be returned" (status_codes.asciidoc). Only the GET of one object that does not
exist is a 404 (2003), as status_codes allows for a GET ("the server SHOULD return a HTTP 404").
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

import msgspec
from aiohttp import web

from relay import advenir
from relay import constants as K
from relay.config import Settings
from relay.credentials import VERSION, public_base
from relay.envelope import now_iso, ocpi
from relay.errors import RelayError
from relay.ocpi_server.keys import SETTINGS, STATE
from relay.ocpi_server.versions import announce
from relay.ordering import location_key
from relay.store.keys import state_field
from relay.timestamps import epoch_ms

MODULES = ("locations", "sessions", "cdrs", "tariffs")


class BadRequest(RelayError):
    """A query parameter OCPI defines was unusable."""


def _operators(request: web.Request, settings: Settings) -> list[tuple[str, str]] | None:
    """The hosted operator(s) the request is for: the OCPI-to headers, or all when they are absent."""
    cc, pid = request.headers.get(K.H_TO_CC), request.headers.get(K.H_TO_PID)
    if cc and pid:
        op = settings.operator(cc, pid)
        return [(op.country_code, op.party_id)] if op is not None else None
    return [(o.country_code, o.party_id) for o in settings.operators]


def _ms(value: str | None, name: str) -> int | None:
    if not value:
        return None
    try:
        return epoch_ms(value)  # OCPI: a DateTime without designator is UTC (not the server's local time)
    except ValueError:
        raise BadRequest(f"{name}: not an OCPI DateTime") from None


MAX_QUERY_INT = 2**31 - 1  # offset and limit: beyond it no page exists, and Redis refuses 2^63 and more


def _int(value: str | None, name: str, default: int) -> int:
    """A non-negative integer in ASCII digits (not "²", "١", "+1", "1_000"), at most MAX_QUERY_INT."""
    if value is None or value == "":
        return default
    if not (value.isascii() and value.isdigit()) or len(value) > 10 or int(value) > MAX_QUERY_INT:
        raise BadRequest(f"{name}: not an integer from 0 to {MAX_QUERY_INT}")
    return int(value)


def _masked(settings: Settings, module: str, fld: str, doc: bytes) -> bytes:
    """Sessions and CDRs of Advenir operators go through the same anonymisation as pushes (S4)."""
    if module not in ("sessions", "cdrs"):
        return doc
    cc, pid, _ = fld.split(":", 2)
    op = settings.operator(cc, pid)
    if op is None or not op.advenir:
        return doc
    body: dict[str, Any] = msgspec.json.decode(doc)
    return msgspec.json.encode(advenir.anonymise(settings, cc, pid, body))


def _unknown_receiver() -> web.Response:
    # Not 4001 ("Unknown receiver"): 4xxx are a hub's codes for its own routing errors (status_codes,
    # "4xxx: Hub errors"), and the relay is a platform. The OCPI-to-* headers are a parameter of the
    # request, and they name no operator hosted here: 2001 "Invalid or missing parameters".
    return ocpi(200, 2001, message="OCPI-to-*: not an operator hosted here")


async def list_objects(request: web.Request) -> web.Response:
    """GET {module}?date_from&date_to&offset&limit."""
    settings = request.app[SETTINGS]
    module = request.match_info["module"]
    operators = _operators(request, settings)
    if operators is None:
        return _unknown_receiver()
    q = request.query
    try:
        date_from, date_to = _ms(q.get("date_from"), "date_from"), _ms(q.get("date_to"), "date_to")
        offset = _int(q.get("offset"), "offset", 0)
        # limit=0 is the default page, like an absent limit: a page of nothing would lead nowhere (no Link to
        # follow), and OCPI lets the server return fewer objects than asked, never asks for none.
        limit = min(_int(q.get("limit"), "limit", 0) or settings.state.max_page_limit, settings.state.max_page_limit)
    except BadRequest as exc:
        return ocpi(200, 2001, message=str(exc))
    page = await request.app[STATE].page(module, operators, date_from, date_to, offset, limit)
    docs = [_masked(settings, module, fld, doc) for fld, doc in page.docs]
    # The documents are stored as JSON: splice them in rather than decode and encode each.
    body = b'{"data":[' + b",".join(docs) + b'],"status_code":1000,"timestamp":"' + now_iso().encode() + b'"}'
    headers = {"X-Total-Count": str(page.total), "X-Limit": str(limit)}
    if offset + limit < page.total:
        params = {k: v for k, v in q.items() if k in ("date_from", "date_to")}
        params.update(offset=str(offset + limit), limit=str(limit))
        url = f"{public_base(settings)}/{VERSION}/{module}?{urlencode(params)}"
        headers["Link"] = f'<{url}>; rel="next"'
    return web.Response(body=body, content_type="application/json", headers=headers)


async def get_location(request: web.Request) -> web.Response:
    """GET locations/{location_id}[/{evse_uid}[/{connector_id}]] of the operator(s) addressed."""
    settings = request.app[SETTINGS]
    operators = _operators(request, settings)
    if operators is None:  # no such Location for the party addressed: a GET of an object that does not exist
        return ocpi(404, 2003, message="Unknown location: the OCPI-to operator is not hosted here")
    loc_id = request.match_info["location_id"]
    evse_uid, connector_id = request.match_info.get("evse_uid"), request.match_info.get("connector_id")
    for cc, pid in operators:
        doc = await request.app[STATE].one("locations", location_key(cc, pid, loc_id), state_field(cc, pid, loc_id))
        if doc is None:
            continue
        found: Any = msgspec.json.decode(doc)
        if evse_uid is not None:
            found = next((e for e in found.get("evses") or [] if str(e.get("uid")) == evse_uid), None)
        if found is not None and connector_id is not None:
            found = next((c for c in found.get("connectors") or [] if str(c.get("id")) == connector_id), None)
        if found is not None:
            return ocpi(200, 1000, found)
    return ocpi(404, 2003, message="Unknown location" if evse_uid is None else "Unknown EVSE or connector")


def setup(app: web.Application) -> None:
    """Routes of the four Sender interfaces and their version-details entries."""
    base = f"/ocpi/{VERSION}"
    app.router.add_get(base + "/{module:locations|sessions|cdrs|tariffs}", list_objects)
    app.router.add_get(base + "/{module:locations|sessions|cdrs|tariffs}/", list_objects)  # as in OCPI's examples
    app.router.add_get(base + "/locations/{location_id}", get_location)
    app.router.add_get(base + "/locations/{location_id}/{evse_uid}", get_location)
    app.router.add_get(base + "/locations/{location_id}/{evse_uid}/{connector_id}", get_location)
    for module in MODULES:
        announce(app, module, "SENDER", f"/{module}")
