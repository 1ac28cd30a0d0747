"""The CSMS's token on the ingress: one check (``TokenCheck.refusal``) that every route under the ingress
prefix runs before anything else.

Not a middleware: an aiohttp middleware is one more coroutine layer on every request, and aiohttp adds a
layer of its own as soon as an application has one (two middlewares: ~17 k instructions, ~3.5 % of a
single PUT; bench/README.md). The hot handlers (events, batch) call ``refusal`` on their first line; the
others are wrapped by ``guard``. Either way the handler is registered through this object, and ``verify``
(the last step of ``create_app``) refuses to build an application with a route under the prefix whose
handler was not: a new route that forgets the token fails at start, not open.

Routes outside the prefix (/healthz, /readyz, /metrics) stay open, and so do requests that match no route
(they answer 404/405, whoever sends them).
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import hdrs, web

from relay.config import IngressSettings
from relay.errors import InvalidEvent, Problem
from relay.ingress.responses import refused

__all__ = ["TokenCheck", "authorised"]

_SCHEMES = frozenset({"bearer", "token"})
_Handler = TypeVar("_Handler", bound=Callable[..., Awaitable[Any]])


def authorised(header: str, tokens: tuple[bytes, ...]) -> bool:
    """An Authorization header that carries one of ``tokens``, compared in constant time.

    "Bearer x" as the issue asks, and OCPI's "Token x" so a CSMS's OCPI client works unchanged.
    """
    scheme, _, value = header.partition(" ")
    if not value or scheme.lower() not in _SCHEMES:
        return False
    try:
        given = value.strip().encode()
    except UnicodeEncodeError:  # bytes that were not UTF-8 (aiohttp keeps them as surrogates): no token of ours
        return False
    for token in tokens:
        if hmac.compare_digest(given, token):
            return True
    return False


class TokenCheck:
    """The one decision on the ingress token, and the list of handlers that make it."""

    def __init__(self, ingress: IngressSettings) -> None:
        self._ingress = ingress
        self._source: str | None = None  # the [ingress] token value _tokens were made from
        self._tokens: tuple[bytes, ...] = ()
        self._checked: set[Callable[..., Any]] = set()

    def tokens(self) -> tuple[bytes, ...]:
        """``[ingress] token``'s tokens (comma-separated: rotation), encoded once per value of the setting."""
        token = self._ingress.token
        if token is not self._source:
            self._tokens = tuple(t.encode() for t in self._ingress.tokens())
            self._source = token
        return self._tokens

    def refusal(self, request: web.Request) -> InvalidEvent | None:
        """None when the request carries one of the tokens; else the 401 to answer."""
        tokens = self._tokens if self._ingress.token is self._source else self.tokens()
        if authorised(request.headers.get(hdrs.AUTHORIZATION, ""), tokens):
            return None
        return InvalidEvent([Problem(field="Authorization", rule="auth", message="missing or wrong token")], 401)

    def checks(self, handler: _Handler) -> _Handler:
        """Register ``handler`` as one that returns ``refused(refusal(request))`` before anything else."""
        self._checked.add(handler)
        return handler

    def guard(self, handler: _Handler) -> _Handler:
        """``handler`` behind the check (one coroutine layer), for handlers that do not call it themselves."""

        async def guarded(request: web.Request) -> Any:
            denied = self.refusal(request)
            if denied is not None:
                return refused(denied)
            return await handler(request)

        return self.checks(guarded)  # type: ignore[return-value]  # same signature as handler

    def verify(self, app: web.Application, prefix: str) -> None:
        """Every route registered under ``prefix`` has a handler that checks the token; else RuntimeError."""
        under = prefix.rstrip("/") + "/"
        open_routes = [
            f"{route.method} {route.resource.canonical}"
            for route in app.router.routes()
            if route.resource is not None
            and route.resource.canonical.startswith(under)
            and route.handler not in self._checked
        ]
        if open_routes:
            raise RuntimeError(f"routes under {prefix} without the token check: {', '.join(open_routes)}")
