"""Commands Receiver (K2) and Tokens Receiver (K3) on the OCPI listener."""

from __future__ import annotations

import asyncio
from datetime import UTC
from typing import Any

import msgspec
import structlog
from aiohttp import web

from relay import constants as K
from relay import metrics
from relay.commands import Commands
from relay.config import Settings
from relay.csms import CsmsClient, CsmsUnavailable
from relay.envelope import ocpi
from relay.models.tokens import Token, TokenPatch
from relay.ocpi_server.keys import CORRELATION, REGISTRY, SETTINGS
from relay.ocpi_server.versions import announce
from relay.store import RoamingStore

log = structlog.get_logger(__name__)
COMMANDS = web.AppKey("ocpi_commands", Commands)
ROAMING = web.AppKey("ocpi_roaming", RoamingStore)
CSMS = web.AppKey("ocpi_csms", CsmsClient)
_notifications: set[asyncio.Task[None]] = set()


def _addressed(request: web.Request, settings: Settings) -> tuple[str, str] | None:
    """The hosted operator a request is for: OCPI-to-*, or the only one hosted when they are absent."""
    cc, pid = request.headers.get(K.H_TO_CC), request.headers.get(K.H_TO_PID)
    if cc and pid:
        op = settings.operator(cc, pid)
        return (op.country_code, op.party_id) if op else None
    if len(settings.operators) == 1:
        return settings.operators[0].country_code, settings.operators[0].party_id
    return None


async def post_command(request: web.Request) -> web.Response:
    """POST commands/{command}: answered with a CommandResponse once the CSMS has said yes or no."""
    operator = _addressed(request, request.app[SETTINGS])
    if operator is None:
        # Not 4001 ("Unknown receiver"): 4xxx are a hub's codes for its own routing errors (status_codes,
        # "4xxx: Hub errors"), and the relay is a platform. The OCPI-to-* headers are the request's
        # parameter naming the receiver, absent or naming no hosted operator: 2001 "Invalid or missing
        # parameters", in an HTTP 200 (the request reached the OCPI layer).
        return ocpi(200, 2001, message="OCPI-to-*: name an operator hosted here")
    # The correlation id the answer echoes (the request id when the IOP sent none) also goes with the result.
    correlation_id = CORRELATION.get()  # as the middleware answers it: a value our headers can carry
    origins = request.app[REGISTRY].directory.origins()  # where the hub's token may go: the response_url too
    reply = await request.app[COMMANDS].receive(request.match_info["command"], await request.read(), operator,
                                                correlation_id, origins=origins)  # fmt: skip
    return ocpi(reply.status, reply.code, reply.data, reply.message)


def _token_ref(request: web.Request) -> tuple[str, str, str, str]:
    m = request.match_info
    return m["country_code"].upper(), m["party_id"].upper(), m["uid"], request.query.get("type", "RFID")


async def get_token(request: web.Request) -> web.Response:
    """GET tokens/{cc}/{pid}/{uid}?type=: the token as the IOP last sent it."""
    cc, pid, uid, kind = _token_ref(request)
    doc = await request.app[ROAMING].token(kind, uid, cc, pid)
    if doc is None:  # status_codes: "In case of a GET request, when the resource does NOT exist ... 404"
        return ocpi(404, 2004, message="Unknown token")
    return ocpi(200, 1000, msgspec.json.decode(doc))


async def put_token(request: web.Request) -> web.Response:
    """PUT (whole token) or PATCH (fields + last_updated) from the IOP; stored, then handed to the CSMS.

    Refusals of a JSON body are HTTP 200 with an OCPI 2xxx code (the request reached the OCPI layer:
    status_codes.asciidoc); a body that is not JSON is HTTP 400. A PUT that creates the token answers
    201 Created, one that replaces it 200 (status_codes: "HTTP 201 - Created when the object has been newly
    created in the server system").
    """
    cc, pid, uid, kind = _token_ref(request)
    roaming = request.app[ROAMING]
    raw = await request.read()
    try:
        if request.method == "PUT":
            token = msgspec.json.decode(raw, type=Token)
            existed: bool | None = None  # read once the token is known to be valid
        else:
            patch = msgspec.json.decode(raw, type=TokenPatch)
            current = await roaming.token(kind, uid, cc, pid)
            if current is None:
                # Only a GET of an unknown object may be a 404 (status_codes); a PATCH is answered in the OCPI layer.
                return ocpi(200, 2004, message="Unknown token: PUT it first")
            merged: dict[str, Any] = {**msgspec.json.decode(current), **msgspec.to_builtins(patch)}
            token = msgspec.convert(merged, Token, strict=False)
            existed = True
    except msgspec.ValidationError as exc:  # JSON, but not a Token (a subclass of DecodeError: caught first)
        return ocpi(200, 2001, message=f"invalid token: {exc}")
    except msgspec.DecodeError as exc:  # not JSON: the transport layer's 400
        return ocpi(400, 2001, message=f"invalid token: {exc}")
    if (token.country_code.upper(), token.party_id.upper(), token.uid, token.type) != (cc, pid, uid, kind):
        # transport_and_format, "Errors": an object id that differs from the URL's is answered 2001.
        return ocpi(200, 2001, message="token ids differ from the URL")
    token = msgspec.structs.replace(token, last_updated=token.last_updated.astimezone(UTC))
    doc = msgspec.json.encode(token)
    if existed is None:  # a PUT. Read before the write: two PUTs of a new token at once may both answer 201
        existed = await roaming.token(kind, uid, cc, pid) is not None
    await roaming.put_token(kind, uid, cc, pid, doc)
    metrics.TOKENS_RECEIVED.labels(method=request.method).inc()
    _notify(request.app[CSMS], token, CORRELATION.get())
    return ocpi(200 if existed else 201, 1000)


def _notify(csms: CsmsClient, token: Token, correlation_id: str) -> None:
    """Hand the token to the CSMS without holding the IOP's request (it is stored either way)."""
    if not csms.configured:
        return

    async def send() -> None:
        try:
            await csms.post({"kind": "token", "token": msgspec.to_builtins(token)}, correlation_id)
        except CsmsUnavailable as exc:
            log.warning("csms_token_notification_failed", error=str(exc), hint="the CSMS can GET it from the ingress")

    task = asyncio.create_task(send())
    _notifications.add(task)
    task.add_done_callback(_notifications.discard)


def setup(app: web.Application, commands: Commands, roaming: RoamingStore, csms: CsmsClient) -> None:
    """Routes and version-details entries of the two Receiver interfaces."""
    app[COMMANDS], app[ROAMING], app[CSMS] = commands, roaming, csms
    app.router.add_post("/ocpi/2.2.1/commands/{command}", post_command)
    path = "/ocpi/2.2.1/tokens/{country_code}/{party_id}/{uid}"
    app.router.add_get(path, get_token)
    app.router.add_put(path, put_token)
    app.router.add_patch(path, put_token)
    announce(app, "commands", "RECEIVER", "/commands")
    announce(app, "tokens", "RECEIVER", "/tokens")
