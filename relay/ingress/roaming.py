"""Ingress routes of roaming charges: real-time authorisation (K1), command results (K2), tokens (K3)."""

from __future__ import annotations

from dataclasses import dataclass

import msgspec
from aiohttp import web
from aiohttp.typedefs import Handler

from relay import constants as K
from relay.authorize import Authorizer
from relay.commands import Commands
from relay.envelope import OCPI_OK, ocpi
from relay.errors import InvalidEvent, Problem, StoreError, StoreUnavailable
from relay.ingress.auth import TokenCheck
from relay.ingress.responses import accepted, refused, unavailable
from relay.store import RoamingStore
from relay.validation import CORRELATION_PROBLEM, too_deep_problem


@dataclass(frozen=True, slots=True)
class RoamingDeps:
    """What the roaming routes need; absent when the relay runs without them (tests of the ingress alone)."""

    authorizer: Authorizer
    commands: Commands
    roaming: RoamingStore


DEPS = web.AppKey("roaming_deps", RoamingDeps)


def _guarded(handler: Handler, check: TokenCheck) -> Handler:
    """The token first, as on every ingress route; then Redis unreachable → 503, not a bare 500, and an
    HTTP error aiohttp raises (a body over the size limit) in the JSON shape of refusals."""

    async def guarded(request: web.Request) -> web.StreamResponse:
        denied = check.refusal(request)
        if denied is not None:
            return refused(denied)
        try:
            return await handler(request)
        except StoreError:
            return unavailable("Redis unavailable, send again")
        except RecursionError:  # msgspec decoding JSON nested deeper than the interpreter's recursion limit
            return refused(too_deep_problem())
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return refused(InvalidEvent([Problem(field="url", rule="route", message=exc.reason)], exc.status))

    return check.checks(guarded)


async def authorize(request: web.Request) -> web.Response:
    """POST tokens/{token_uid}/authorize?type=RFID with LocationReferences → the decision (200)."""
    named = None
    cc, pid = request.headers.get(K.H_FROM_CC), request.headers.get(K.H_FROM_PID)
    if cc and pid:
        named = (cc.upper(), pid.upper())
    correlation_id = request.headers.get(K.H_CORRELATION, "")  # sent on to the IOP
    try:
        if correlation_id and not K.header_value_ok(correlation_id):
            raise InvalidEvent([CORRELATION_PROBLEM])
        decision = await request.app[DEPS].authorizer.authorize(
            request.match_info["uid"], request.query.get("type", "RFID"), await request.read(), named, correlation_id,
        )  # fmt: skip
    except InvalidEvent as exc:
        return refused(exc)
    data = {"decided_by": decision.decided_by, "allowed": decision.allowed,
            "authorization": decision.authorization, "iop_error": decision.iop_error, **decision.extra}  # fmt: skip
    return ocpi(200, OCPI_OK, data)


async def command_result(request: web.Request) -> web.Response:
    """POST commands/{command_id}/result with a CommandResult → 202, delivered to the IOP's response_url."""
    try:
        await request.app[DEPS].commands.result(request.match_info["command_id"], await request.read())
    except InvalidEvent as exc:
        return refused(exc)
    except StoreUnavailable:
        return unavailable("result not stored: Redis unavailable, send again")
    return accepted({"command_id": request.match_info["command_id"]})


async def get_token(request: web.Request) -> web.Response:
    """GET tokens/{cc}/{pid}/{uid}?type=: a token the IOP pushed (K3), for the CSMS."""
    m = request.match_info
    doc = await request.app[DEPS].roaming.token(request.query.get("type", "RFID"), m["uid"], m["cc"], m["pid"])
    if doc is None:
        return refused(InvalidEvent([Problem(field="url.uid", rule="token", message="unknown token")], 404))
    return ocpi(200, OCPI_OK, msgspec.json.decode(doc))


def setup(app: web.Application, prefix: str, deps: RoamingDeps, check: TokenCheck) -> None:
    """Routes, registered before the catch-all event route, each behind the ingress token."""
    app[DEPS] = deps
    app.router.add_post(prefix + "/tokens/{uid}/authorize", _guarded(authorize, check))
    app.router.add_get(prefix + "/tokens/{cc}/{pid}/{uid}", _guarded(get_token, check))
    app.router.add_post(prefix + "/commands/{command_id}/result", _guarded(command_result, check))
