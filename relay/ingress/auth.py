"""The CSMS's token on the ingress: one aiohttp middleware for every route under the ingress prefix.

Routes outside the prefix (/healthz, /readyz, /metrics) stay open, and so do requests that match no route
(they answer 404/405 as before, whoever sends them).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from relay.errors import InvalidEvent, Problem
from relay.ingress.responses import refused
from relay.typedefs import SETTINGS

__all__ = ["authorised", "token_required"]


def authorised(request: web.Request, tokens: tuple[str, ...]) -> bool:
    """The request carries one of ``tokens``, compared in constant time.

    "Bearer x" as the issue asks, and OCPI's "Token x" so a CSMS's OCPI client works unchanged.
    """
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() not in {"bearer", "token"} or not value:
        return False
    given = value.strip().encode()
    return any(hmac.compare_digest(given, t.encode()) for t in tokens)


def token_required(prefix: str, on_refused: Callable[[web.Request, InvalidEvent], None] | None = None) -> Middleware:
    """A middleware: a route registered under ``prefix`` answers 401 without one of ``[ingress] token``'s tokens.

    The tokens are read from the app's settings on each request. ``on_refused(request, error)`` is called
    for each 401, before it is answered (the event route counts it in its metrics).
    """
    under = prefix.rstrip("/") + "/"

    @web.middleware
    async def check_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        resource = request.match_info.route.resource  # None when no route matched: 404/405 as before
        if resource is None or not resource.canonical.startswith(under):
            return await handler(request)
        if not authorised(request, request.app[SETTINGS].ingress.tokens()):
            exc = InvalidEvent([Problem(field="Authorization", rule="auth", message="missing or wrong token")], 401)
            if on_refused is not None:
                on_refused(request, exc)
            return refused(exc)
        return await handler(request)

    return check_token
