"""The credentials module (C1, C2, C4): the IOP registers, updates and unregisters here.

A registration with a token A spends that token as it starts (``Registry.claim_token_a``, one Lua
script): of two concurrent POSTs with one token A, one goes on and the other is answered 401 like
any unknown token, so only one token C is ever made. If the handshake then fails before anything is
stored (the peer's API unusable, a URL the outbound policy refuses, the request cancelled), the
token A is given back: the hub may retry with it, as GIREVE does. Once the handshake has succeeded
the token A stays spent, even if storing the registration fails (Redis down: make a new token A).
A failed handshake is answered with a generic 3001; the reason goes to the log only (it would
otherwise tell whoever holds a token A what the relay can reach).

HTTP statuses: a registration whose body is JSON and whose token is good has reached the OCPI layer,
where "an HTTP error status code MUST NOT be returned" (status_codes.asciidoc): a credentials object
that is not one is 200 / 2001, a failed handshake 200 / 3001 (credentials.asciidoc, "Errors during
registration": the server "should add the status code 3001 in the response to the POST"). HTTP errors
stay for what credentials.asciidoc asks (405 for a POST of a registered peer), a body that is not JSON
(400) and an unknown or spent token (401). No OCPI-from/OCPI-to on these answers (a configuration module).
"""

from __future__ import annotations

from contextlib import suppress

import msgspec
import structlog
from aiohttp import web

from relay.credentials import (
    Credentials,
    HandshakeError,
    Registration,
    Registry,
    TokenAClaim,
    accept_from_iop,
    our_credentials,
)
from relay.envelope import ocpi
from relay.errors import StoreError
from relay.ocpi_server.auth import presented_token
from relay.ocpi_server.keys import REGISTRY, ROLE, SETTINGS
from relay.ocpi_server.versions import announce

log = structlog.get_logger(__name__)
_decode = msgspec.json.Decoder(Credentials).decode


async def get_credentials(request: web.Request) -> web.Response:
    """Our credentials, with the token the IOP uses towards us: the one it presented (only the registered
    token reaches here, and Redis keeps only its digest)."""
    registry = request.app[REGISTRY]
    raw, decoded = presented_token(request.headers.get("Authorization", ""))
    token = decoded if decoded is not None and registry.role_of(decoded) == "registered" else raw
    return ocpi(200, 1000, our_credentials(request.app[SETTINGS], token))


async def _register(request: web.Request) -> web.Response:
    try:
        offered = _decode(await request.read())
    except msgspec.ValidationError as exc:  # JSON, but no Credentials object (a subclass of DecodeError)
        return ocpi(200, 2001, message=f"Invalid credentials object: {exc}")
    except msgspec.DecodeError as exc:  # not JSON: the transport layer's 400
        return ocpi(400, 2001, message=f"Invalid credentials object: {exc}")
    registry = request.app[REGISTRY]
    claim: TokenAClaim | None = None
    if ROLE.get() == "token_a":
        token_a = _presented_token_a(request)
        claim = await registry.claim_token_a(token_a) if token_a is not None else None
        if claim is None:
            log.info("registration_token_a_spent", hint="another registration used this token A first")
            return ocpi(401, 2000, message="Unauthorized: unknown or missing token")
    try:
        reg: Registration = await accept_from_iop(request.app[SETTINGS], offered)
    except HandshakeError as exc:
        log.warning("registration_failed", error=str(exc), versions_url=offered.url)
        await _give_back(registry, claim)
        return ocpi(200, exc.ocpi_code, message=exc.public)  # 3001, 3002 or 3003; the details stay in the log
    except BaseException:
        await _give_back(registry, claim)
        raise
    await registry.save(reg)  # the token A, if any, was spent by the claim: it stays spent from here on
    return ocpi(200, 1000, our_credentials(request.app[SETTINGS], reg.incoming_token))


async def _give_back(registry: Registry, claim: TokenAClaim | None) -> None:
    """Nothing was stored: the token A opens a registration again (best effort: Redis may be the problem)."""
    if claim is not None:
        with suppress(StoreError):
            await registry.release_token_a(claim)


def _presented_token_a(request: web.Request) -> str | None:
    """The token A that opened this registration, so that it can be retired."""
    registry = request.app[REGISTRY]
    header = request.headers.get("Authorization", "")
    raw, decoded = presented_token(header)
    return next((t for t in (decoded, raw) if t and registry.is_token_a(t)), None)


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
