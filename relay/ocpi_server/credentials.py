"""The credentials module (C1, C2, C4): the IOP registers, updates and unregisters here."""

from __future__ import annotations

import msgspec
import structlog
from aiohttp import web

from relay.credentials import Credentials, HandshakeError, Registration, accept_from_iop, our_credentials
from relay.envelope import ocpi
from relay.ocpi_server.auth import presented_token
from relay.ocpi_server.keys import REGISTRY, ROLE, SETTINGS
from relay.ocpi_server.versions import announce

log = structlog.get_logger(__name__)
_decode = msgspec.json.Decoder(Credentials).decode


async def get_credentials(request: web.Request) -> web.Response:
    """Our credentials, with the token the IOP uses towards us."""
    reg = request.app[REGISTRY].registration
    assert reg is not None  # only the registered token reaches here
    return ocpi(200, 1000, our_credentials(request.app[SETTINGS], reg.incoming_token))


async def _register(request: web.Request) -> web.Response:
    try:
        offered = _decode(await request.read())
    except msgspec.DecodeError as exc:
        return ocpi(400, 2001, message=f"Invalid credentials object: {exc}")
    registry = request.app[REGISTRY]
    try:
        reg: Registration = await accept_from_iop(request.app[SETTINGS], offered)
    except HandshakeError as exc:
        log.warning("registration_failed", error=str(exc), versions_url=offered.url)
        return ocpi(400, 3001, message=f"Unable to use the client's API: {exc}")
    used_a = _presented_token_a(request) if ROLE.get() == "token_a" else None
    await registry.save(reg, used_token_a=used_a)
    return ocpi(200, 1000, our_credentials(request.app[SETTINGS], reg.incoming_token))


def _presented_token_a(request: web.Request) -> str | None:
    """The token A that opened this registration, so that it can be retired."""
    registry = request.app[REGISTRY]
    header = request.headers.get("Authorization", "")
    raw, decoded = presented_token(header)
    for candidate in registry.token_a_candidates():
        if candidate in (raw, decoded):
            return candidate
    return None


async def post_credentials(request: web.Request) -> web.Response:
    """Register – FromIOP with token A; a registered peer must use PUT (OCPI: 405)."""
    if ROLE.get() == "registered":
        return ocpi(405, 2000, message="Already registered: use PUT to update, or DELETE then register again")
    return await _register(request)


async def put_credentials(request: web.Request) -> web.Response:
    """Update: the same handshake as a registration, with a fresh token for the peer."""
    return await _register(request)


async def delete_credentials(request: web.Request) -> web.Response:
    """Unregister – FromIOP: delivery stops, queueing goes on."""
    await request.app[REGISTRY].unregister()
    return ocpi(200, 1000)


def setup(app: web.Application) -> None:
    """Routes and the version-details entry."""
    path = "/ocpi/2.2.1/credentials"
    app.router.add_get(path, get_credentials)
    app.router.add_post(path, post_credentials)
    app.router.add_put(path, put_credentials)
    app.router.add_delete(path, delete_credentials)
    announce(app, "credentials", "SENDER", "/credentials")
