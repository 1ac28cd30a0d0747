"""The OpenAPI 3.1 document of the ingress: what a CSMS (or a back office) may call, and the webhook the relay calls.

Built, not written: the operations come from the ingress's route table (``create_app``'s routes; its catch-all
event route expanded by asking ``relay.validation.parse_target`` which modules, methods and levels it takes), the
bodies from the msgspec models (``msgspec.json.schema_components``). A route the table has and this module cannot
describe raises :class:`UndocumentedRoute`, so a new route fails the tests (tests/test_openapi.py) until it is
described here. relay.ingress.app hands the table over (:class:`Ingress`): this module does not import it.

Served at ``GET /ingress/openapi.json`` without a token: it describes the API and holds no data (no
configuration, no operator, no token), the same text is in the repository (``docs/openapi.json``), and tools
(Swagger UI, code generators, schemathesis) fetch it before they have any token. Regenerate the copy with
``relay openapi > docs/openapi.json``; a test fails when it is out of date.

The admin routes (``relay.ingress.admin.ADMIN_OPERATIONS``, with a token of their own) are included when that
module exists.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any

import msgspec
from aiohttp import web

from relay import __version__
from relay.envelope import OCPI_CLIENT_ERROR, OCPI_OK, OCPI_SERVER_ERROR
from relay.models.tokens import CommandResult, LocationReferences, StartSession, StopSession
from relay.openapi.operations import Builder
from relay.openapi.parts import (
    ADMIN_UNROUTED,
    EVENT_ROUTE,
    OBJECTS,
    OPENAPI_PATH,
    UNROUTED,
    Ingress,
    Schemas,
    UndocumentedRoute,
    admin_error,
    batch_types,
)
from relay.openapi.shapes import (
    AuthorizationAnswer,
    CommandNotification,
    CommandVerdict,
    EventAnswer,
    Refusal,
    ResultAnswer,
    TokenAnswer,
    TokenNotification,
    Unavailable,
    batch_answer,
)
from relay.validation import DECODERS

__all__ = ["OPENAPI_PATH", "Ingress", "UndocumentedRoute", "admin_operations", "build", "document_bytes", "routes"]


def routes(app: web.Application) -> tuple[tuple[str, str], ...]:
    """(method, canonical path) of every route of ``app`` (HEAD routes that aiohttp adds to GETs left out)."""
    return tuple(
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None and route.method != "HEAD"
    )


def admin_operations() -> list[Any] | None:
    """``relay.ingress.admin.ADMIN_OPERATIONS``, or None when that module does not exist (yet)."""
    try:
        admin = importlib.import_module("relay.ingress.admin")
    except ModuleNotFoundError as exc:
        if exc.name != "relay.ingress.admin":
            raise
        return None
    return list(admin.ADMIN_OPERATIONS)


def _all_types(ingress: Ingress, admin: list[Any] | None) -> list[Any]:
    types: list[Any] = [d.type for d in DECODERS.values()]
    types += [*batch_types(ingress), batch_answer(ingress.item_result), EventAnswer, Refusal, Unavailable]
    types += [AuthorizationAnswer, LocationReferences, ResultAnswer, CommandResult, TokenAnswer]
    types += [CommandNotification, CommandVerdict, TokenNotification, StartSession, StopSession]
    for op in admin or ():
        types += [t for t in (op.query, op.body, op.response, admin_error(op)) if t is not None]
    return types


def build(ingress: Ingress, admin: list[Any] | None = None) -> dict[str, Any]:
    """The document of this ingress and these admin operations (``admin_operations()``)."""
    s = Schemas(_all_types(ingress, admin))
    b = Builder(s, ingress)
    prefix = ingress.prefix
    known: dict[tuple[str, str], Callable[[], dict[str, Any]]] = {
        ("POST", prefix + "/batch"): b.batch,
        ("POST", prefix + "/tokens/{uid}/authorize"): b.authorize,
        ("GET", prefix + "/tokens/{cc}/{pid}/{uid}"): b.get_token,
        ("POST", prefix + "/commands/{command_id}/result"): b.command_result,
        ("GET", "/healthz"): b.healthz,
        ("GET", "/readyz"): b.readyz,
        ("GET", "/metrics"): b.metrics,
        ("GET", OPENAPI_PATH): b.openapi,
    }
    admin_ops = {(str(op.method).upper(), str(op.path)): op for op in admin or ()}
    paths: dict[str, dict[str, Any]] = {}
    for method, path in ingress.routes:
        if (method, path) == ("*", prefix + EVENT_ROUTE):
            for p, ops in b.events().items():
                paths.setdefault(p, {}).update(ops)
        elif method == "*" and path in (UNROUTED, ADMIN_UNROUTED):
            continue
        elif (method, path) in known:
            paths.setdefault(path, {})[method.lower()] = known[method, path]()
        elif (method, path) not in admin_ops:
            raise UndocumentedRoute(f"{method} {path}: describe it in relay.openapi")
    for (method, path), op in admin_ops.items():
        paths.setdefault(path, {})[method.lower()] = b.admin(op)
    schemes: dict[str, Any] = {
        "ingressToken": {
            "type": "http",
            "scheme": "bearer",
            "description": "`[ingress] token` "
            "(RELAY_INGRESS_TOKEN; comma-separated to rotate). OCPI's `Token <token>` works too.",
        },
        "csmsToken": {
            "type": "http",
            "scheme": "bearer",
            "description": "`[csms] token`: what the relay sends to the CSMS webhook.",
        },
    }
    if admin is not None:
        schemes["adminToken"] = {
            "type": "http",
            "scheme": "bearer",
            "description": "RELAY_ADMIN_TOKEN: the admin routes' own token (not the ingress token).",
        }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "relay ingress",
            "version": __version__,
            "summary": "OCPI 2.2.1 store-and-forward sidecar: what the CSMS calls, and the webhook it serves.",
            "description": _DESCRIPTION.replace("{prefix}", prefix),
        },
        "servers": [{"url": "http://127.0.0.1:8780", "description": "`[ingress] listen` (default)"}],
        "security": [{"ingressToken": []}],
        "tags": [
            {"name": n}
            for n in (
                *OBJECTS,
                "batch",
                "tokens",
                "commands",
                "operations",
                *(("admin",) if admin is not None else ()),
                "webhook",
            )
        ],
        "paths": dict(sorted(paths.items())),
        "webhooks": b.webhooks(),
        "components": {"schemas": dict(sorted(s.components.items())), "securitySchemes": schemes},
    }


_DESCRIPTION = f"""\
The CSMS calls the relay exactly as it would call an OCPI 2.2.1 Receiver, under `{{prefix}}/`. Each event is
validated (OCPI 2.2.1 and GIREVE's rules), written durably to Redis, answered `202`, and delivered to GIREVE's IOP
in order per object, with retries and a dead-letter stream.

Answers use the OCPI envelope (`status_code` {OCPI_OK} accepted, {OCPI_CLIENT_ERROR} refused, {OCPI_SERVER_ERROR}
unavailable). A refusal stores nothing and lists every problem in `errors`: `field` (a JSON path such as
`$.evses[0].capabilities`, `url.<id>`, `query.<name>` or a header name), `rule` (`ocpi.type`, `ocpi.required`,
`ocpi.datetime`, `ocpi.url_id`, `ocpi.id`, `gireve.*`, `operator`, `header`, `idempotency`, `size`, `json`, `auth`,
`route`…) and `message`. The ingress does not read `Content-Type`: every body is read as JSON (no 415).

Retries: a 503, a timeout or a dropped connection may have stored the event. Send the same request again:
with an `Idempotency-Key` it is stored once; without one, a PUT, PATCH or CDR POST that leaves the stored object
as it is answers `202` with `duplicate: true` and stores nothing.

An unknown route answers 404, a known path with another method 405, in the shape of a refusal.
"""


@functools.lru_cache(maxsize=8)
def document_bytes(ingress: Ingress) -> bytes:
    """The document as it is served and kept in docs/openapi.json: indented, keys in a stable order; once per
    route table."""
    return msgspec.json.format(msgspec.json.encode(build(ingress, admin_operations())), indent=2) + b"\n"
