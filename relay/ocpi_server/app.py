"""create_ocpi_app(): authentication, envelope and request-id echo around the OCPI modules."""

from __future__ import annotations

import ssl
import uuid
from contextlib import suppress

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from relay import constants as K
from relay.commands import Commands
from relay.config import Settings
from relay.credentials import Registry
from relay.csms import CsmsClient
from relay.envelope import ocpi
from relay.errors import StoreError
from relay.ocpi_server import credentials, roaming, sender, versions
from relay.ocpi_server.auth import UnknownTokens, authenticate, presented_token
from relay.ocpi_server.keys import CONFIG_ROUTES, CORRELATION, REGISTRY, ROLE, SETTINGS, STATE, TOKEN_A_ROUTES
from relay.ocpi_server.routing import answer_headers
from relay.store import RoamingStore, StateReader

log = structlog.get_logger(__name__)
UNKNOWN = web.AppKey("ocpi_unknown_tokens", UnknownTokens)


@web.middleware
async def ocpi_envelope(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Authenticate, then answer in the OCPI envelope, echoing X-Request-ID and X-Correlation-ID (T5).

    An id that is not printable ASCII of at most 255 characters is replaced, not echoed nor sent on.
    """
    request_id = _usable(request.headers.get(K.H_REQUEST)) or uuid.uuid4().hex
    correlation_id = _usable(request.headers.get(K.H_CORRELATION)) or request_id
    structlog.contextvars.bind_contextvars(request_id=request_id, correlation_id=correlation_id)
    reset = CORRELATION.set(correlation_id)
    try:
        resp = await _dispatch(request, handler)
    finally:
        CORRELATION.reset(reset)
        structlog.contextvars.unbind_contextvars("request_id", "correlation_id")
    resp.headers[K.H_REQUEST] = request_id
    resp.headers[K.H_CORRELATION] = correlation_id
    return resp


def _usable(value: str | None) -> str | None:
    return value if value and K.header_value_ok(value) else None


async def _dispatch(request: web.Request, handler: Handler) -> web.StreamResponse:
    registry = request.app[REGISTRY]
    header, plain = request.headers.get("Authorization", ""), request.app[SETTINGS].ocpi.accept_plain_token
    role = authenticate(header, registry, accept_plain=plain)
    # This replica's view may be stale: a token A just made (or replaced) by `relay register
    # --from-iop`, the token B that `relay register --versions-url` hands the IOP (which calls
    # back at once), a token A another replica has just spent, a registration made elsewhere.
    # One-time tokens A are always checked against Redis before the answer; unknown (well-formed)
    # tokens at a bounded rate (UnknownTokens): a flood of wrong tokens must not become a flood of reads.
    if role == "token_a":
        with suppress(StoreError):
            await registry.refresh()
        role = authenticate(header, registry, accept_plain=plain)
    elif role is None and (token := presented_token(header)[0]):
        await request.app[UNKNOWN].refresh(registry, token)
        role = authenticate(header, registry, accept_plain=plain)
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else ""
    allowed = role == "registered" or (role == "token_a" and (request.method, route) in TOKEN_A_ROUTES)
    if not allowed:
        count = request.app[UNKNOWN].to_log()
        if count is not None:  # one line per interval, with the refusals it stands for
            log.info("ocpi_unauthorized", path=request.path, method=request.method, refused=count)
        return ocpi(401, 2000, message="Unauthorized: unknown or missing token")
    reset = ROLE.set(role)
    try:
        resp = await _handle(request, handler)
    finally:
        ROLE.reset(reset)
    if route and route not in CONFIG_ROUTES:  # a Functional Module's answer, errors included: routed (T3)
        resp.headers.update(answer_headers(request, request.app[SETTINGS], registry.registration))
    return resp


async def _handle(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return ocpi(exc.status, 2000 if exc.status < 500 else 3000, message=exc.reason)
    except RecursionError:  # msgspec decoding JSON nested deeper than the interpreter's recursion limit
        # Not JSON the relay can parse: still the transport layer (status_codes: 400 for invalid JSON).
        return ocpi(400, 2001, message="Invalid JSON: nested too deep")
    except StoreError as exc:
        # Redis unreachable: the IOP's request is fine and may be sent again shortly (not a 500: the
        # relay is not broken, only waiting for its store).
        log.warning("ocpi_store_unavailable", path=request.path, error=str(exc))
        return ocpi(503, 3000, message="Temporarily unavailable, try again", headers={"Retry-After": "1"})
    except Exception:
        log.exception("ocpi_handler_failed", path=request.path)
        return ocpi(500, 3000, message="Internal error")


def create_ocpi_app(
    settings: Settings,
    registry: Registry,
    state: StateReader,
    roaming_deps: tuple[Commands, RoamingStore, CsmsClient] | None = None,
) -> web.Application:
    """The application the IOP calls; the caller owns the registry and the runner."""
    app = web.Application(middlewares=[ocpi_envelope], client_max_size=1_048_576)
    app[SETTINGS] = settings
    app[REGISTRY] = registry
    app[UNKNOWN] = UnknownTokens()
    app[STATE] = state
    versions.setup(app)
    credentials.setup(app)
    if settings.state.enabled:
        sender.setup(app)
    if roaming_deps is not None:
        roaming.setup(app, *roaming_deps)
    return app


def server_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """TLS for the OCPI listener; a client CA makes client certificates mandatory (mTLS)."""
    if not settings.ocpi.tls_cert_file:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(settings.ocpi.tls_cert_file, settings.ocpi.tls_key_file)
    if settings.ocpi.tls_client_ca_file:
        ctx.load_verify_locations(settings.ocpi.tls_client_ca_file)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
