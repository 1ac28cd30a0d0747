"""Message routing on the OCPI listener: the OCPI-from/OCPI-to headers of the relay's answers.

OCPI 2.2.1 (transport_and_format, "Message Routing Headers"): the four headers "SHALL be implemented for
any request/response to/from a Functional Module", and a response goes back with TO = the requesting
party, FROM = the receiving party ("Direct response | Requesting-party | Receiving-party"). They are
never sent on the configuration modules (versions, credentials: "routing headers SHALL NOT be used with
these modules"; GIREVE: mandatory except for credentials).
"""

from __future__ import annotations

import re

from aiohttp import web

from relay import constants as K
from relay.config import Settings
from relay.credentials import Registration

# CiString(2) and CiString(3) (OCPI types); anything else in a request header is not echoed back.
_COUNTRY = re.compile(r"[A-Za-z]{2}")
_PARTY = re.compile(r"[A-Za-z0-9]{3}")


def answering_party(request: web.Request, settings: Settings) -> tuple[str, str] | None:
    """FROM of the answer: the hosted operator the request addressed (OCPI-to-*), else the relay's own
    first operator. A request addressed to an operator not hosted here is answered by the platform's
    default operator too: the relay never claims an identity it does not host."""
    cc, pid = request.headers.get(K.H_TO_CC), request.headers.get(K.H_TO_PID)
    op = settings.operator(cc, pid) if cc and pid else None
    if op is None and settings.operators:
        op = settings.operators[0]
    return op.key if op is not None else None


def hub_identity(settings: Settings, registration: Registration | None) -> tuple[str, str]:
    """The IOP as the handshake named it (``Registration.hub_party``: the same party the OCPI-to-* of our
    requests names), else ``[iop]`` country_code/party_id."""
    configured = (settings.iop.country_code, settings.iop.party_id)
    found = registration.hub_party(configured) if registration is not None else None
    return found or configured


def requesting_party(request: web.Request, settings: Settings, registration: Registration | None) -> tuple[str, str]:
    """TO of the answer: the request's OCPI-from-* when well formed, else the IOP itself."""
    cc, pid = request.headers.get(K.H_FROM_CC, ""), request.headers.get(K.H_FROM_PID, "")
    if _COUNTRY.fullmatch(cc) and _PARTY.fullmatch(pid):
        return cc.upper(), pid.upper()
    return hub_identity(settings, registration)


def answer_headers(request: web.Request, settings: Settings, registration: Registration | None) -> dict[str, str]:
    """OCPI-from-* and OCPI-to-* for the answer to a Functional Module request."""
    to_cc, to_pid = requesting_party(request, settings, registration)
    headers = {K.H_TO_CC: to_cc, K.H_TO_PID: to_pid}
    answering = answering_party(request, settings)
    if answering is not None:
        headers[K.H_FROM_CC], headers[K.H_FROM_PID] = answering
    return headers
