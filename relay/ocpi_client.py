"""One HTTP client towards the IOP: URL, method, and the OCPI headers T1–T3 on every attempt."""

from __future__ import annotations

import asyncio
import base64
import os
import ssl
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import quote, urljoin

import aiohttp
from multidict import CIMultiDictProxy

from relay import constants as K
from relay import urls
from relay.config import IopSettings
from relay.errors import RelayError
from relay.events import Event

_MAX_REDIRECTS = 3
_REDIRECTS = (301, 302, 307, 308)


class IopDirectory(Protocol):
    """Where the IOP's module endpoints are and which token to send (config now, the handshake later)."""

    def endpoint(self, module: str, role: str = "RECEIVER") -> str | None:
        """Endpoint URL of a module in a role, or None when the IOP has not announced it."""

    def token(self) -> str | None:
        """The plain token to present to the IOP, or None when there is none."""

    def origins(self) -> frozenset[str]:
        """The origins (``urls.origin``) the token may be sent to: the IOP's own, and any configured."""

    def iop_party(self) -> tuple[str, str]:
        """T3: (country_code, party_id) of the IOP operator, for the OCPI-to-* headers of every request."""


class StaticDirectory:
    """Endpoints ``{[iop] url}/{module}``, ``[iop] token`` and the IOP's ``[iop]`` country/party from config."""

    def __init__(self, settings: IopSettings) -> None:
        self._url = settings.url.rstrip("/")
        self._token = settings.token or None
        self._party = (settings.country_code, settings.party_id)

    def endpoint(self, module: str, role: str = "RECEIVER") -> str | None:
        return f"{self._url}/{module}" if self._url else None

    def token(self) -> str | None:
        return self._token

    def origins(self) -> frozenset[str]:
        found = urls.origin_or_none(self._url) if self._url else None
        return frozenset([found] if found else [])

    def iop_party(self) -> tuple[str, str]:
        return self._party


@dataclass(frozen=True, slots=True)
class Reply:
    """What came back from one attempt (no exception: those are raised)."""

    status: int
    headers: CIMultiDictProxy[str]
    body: bytes
    request_id: str


def new_request_id() -> str:
    """T2: a fresh X-Request-ID, 32 random hex digits (uuid4().hex's shape, at a quarter of its cost)."""
    return os.urandom(16).hex()


def authorization(token: str) -> str:
    """T1: OCPI 2.2.1 sends the token base64-encoded."""
    return "Token " + base64.b64encode(token.encode()).decode()


def ssl_context(settings: IopSettings) -> ssl.SSLContext | None:
    """Default verification, an extra CA if given, and a client certificate for mTLS."""
    if not (settings.tls_ca_file or settings.tls_cert_file):
        return None
    ctx = ssl.create_default_context(cafile=settings.tls_ca_file or None)
    if settings.tls_cert_file:
        ctx.load_cert_chain(settings.tls_cert_file, settings.tls_key_file or None)
    return ctx


class NotConfigured(RelayError):
    """No endpoint or token for this module yet: the event waits, nothing is attempted."""


class OriginRefused(RelayError, ValueError):
    """An event's own URL (a command's response_url) is not on an origin the IOP's token may go to.

    A ValueError: ``retry.classify`` makes a request the client refuses to send permanent (a dead
    letter, retrying cannot help) and leaves the link alone.
    """


class OcpiClient:
    """Sends events to the IOP through one pooled ClientSession."""

    def __init__(self, settings: IopSettings, directory: IopDirectory, *, pool: int = 128) -> None:
        self.settings = settings
        self.directory = directory
        self._pool = pool
        self._session: aiohttp.ClientSession | None = None
        self._auth_cache: tuple[str, str] | None = None

    async def start(self) -> None:
        """Open the connection pool."""
        timeout = aiohttp.ClientTimeout(
            total=self.settings.connect_timeout_s + self.settings.request_timeout_s,
            sock_connect=self.settings.connect_timeout_s,
            sock_read=self.settings.request_timeout_s,
        )
        connector = aiohttp.TCPConnector(limit=self._pool, ssl=ssl_context(self.settings) or True)
        # Answers are read with a cap (urls.read_capped), compressed ones inflated within the same cap.
        self._session = aiohttp.ClientSession(timeout=timeout, connector=connector, auto_decompress=False,
                                              headers={"Accept-Encoding": urls.ACCEPT_ENCODING})  # fmt: skip

    async def close(self) -> None:
        """Close the pool (in-flight requests must be finished or cancelled first)."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _auth(self) -> str:
        token = self.directory.token()
        if token is None:
            raise NotConfigured("no IOP token")
        if self._auth_cache is None or self._auth_cache[0] != token:
            self._auth_cache = (token, authorization(token))
        return self._auth_cache[1]

    def headers(self, event: Event, request_id: str) -> dict[str, str]:
        """T1 token, T2 request and correlation ids, T3 routing headers (OCPI-to-*: the IOP as the
        handshake names it, ``IopDirectory.iop_party``)."""
        to_cc, to_pid = self.directory.iop_party()
        headers = {
            "Authorization": self._auth(),
            K.H_REQUEST: request_id,
            K.H_CORRELATION: event.correlation_id or event.id,
            K.H_FROM_CC: event.country_code,
            K.H_FROM_PID: event.party_id,
            K.H_TO_CC: to_cc,
            K.H_TO_PID: to_pid,
        }
        if event.method != "DELETE":
            headers["Content-Type"] = "application/json"
        return headers

    def url(self, event: Event) -> str:
        """The Receiver URL of the event's object at the IOP (or the absolute URL it carries).

        An absolute URL (a command's response_url) must be on an origin the token may go to (checked
        when the command came in, and again here: the hub's origins may have changed since); else
        OriginRefused.
        """
        if event.url is not None:
            if urls.origin_or_none(event.url) not in self.directory.origins():
                raise OriginRefused("the event's URL is not on an origin of the IOP")
            return event.url
        endpoint = self.directory.endpoint(event.module)
        if endpoint is None:
            raise NotConfigured(f"no IOP endpoint for {event.module}")
        return endpoint.rstrip("/") + event.url_path()

    async def send(self, event: Event) -> Reply:
        """One attempt with a fresh X-Request-ID. Raises aiohttp/timeout errors, or NotConfigured."""
        url = self.url(event)
        request_id = new_request_id()
        headers = self.headers(event, request_id)
        data = event.body if event.method != "DELETE" else None
        assert self._session is not None, "start() first"
        # The first request without _exchange()'s extra coroutine layer, which every resumption of
        # the request passes through: this is the per-event path. Redirects go on in _exchange().
        async with self._session.request(event.method, url, data=data, headers=headers, allow_redirects=False) as resp:
            body = await urls.read_capped(resp, self.settings.max_response_bytes)
            location = resp.headers.get("Location")
            if not (resp.status in _REDIRECTS and location and _same_origin(url, location)):
                return Reply(resp.status, resp.headers, body, request_id)
        return await self._exchange(event.method, urljoin(url, location), data, headers, request_id, redirects=1)

    async def authorize(self, uid: str, token_type: str, body: bytes, owner: tuple[str, str], correlation_id: str,
                        timeout_s: float) -> Reply:  # fmt: skip
        """K1: POST {tokens endpoint}/{uid}/authorize?type=… to the IOP's Tokens Sender interface."""
        endpoint = self.directory.endpoint("tokens", "SENDER")
        if endpoint is None:
            raise NotConfigured("no IOP endpoint for tokens")
        request_id = new_request_id()
        to_cc, to_pid = self.directory.iop_party()
        headers = {
            "Authorization": self._auth(),
            K.H_REQUEST: request_id,
            K.H_CORRELATION: correlation_id or request_id,
            K.H_FROM_CC: owner[0],
            K.H_FROM_PID: owner[1],
            K.H_TO_CC: to_cc,
            K.H_TO_PID: to_pid,
            "Content-Type": "application/json",
        }
        url = f"{endpoint.rstrip('/')}/{quote(uid, safe='')}/authorize?type={quote(token_type)}"
        return await asyncio.wait_for(self._exchange("POST", url, body, headers, request_id), timeout_s)

    async def _exchange(self, method: str, url: str, data: bytes | None, headers: dict[str, str],
                        request_id: str, redirects: int = 0) -> Reply:  # fmt: skip
        assert self._session is not None, "start() first"
        # Redirects are followed by hand: aiohttp would turn a PUT into a GET on 301/302, and
        # real receivers redirect to the same path with a trailing slash.
        while True:
            async with self._session.request(method, url, data=data, headers=headers, allow_redirects=False) as resp:
                body = await urls.read_capped(resp, self.settings.max_response_bytes)
                location = resp.headers.get("Location")
                if (
                    resp.status in _REDIRECTS
                    and location
                    and _same_origin(url, location)
                    and redirects < _MAX_REDIRECTS
                ):
                    url = urljoin(url, location)
                    redirects += 1
                    continue
                return Reply(resp.status, resp.headers, body, request_id)


def _same_origin(a: str, b: str) -> bool:
    """Only follow a redirect that stays on the origin called (never leak the token elsewhere)."""
    target = urls.origin_or_none(urljoin(a, b))
    return target is not None and target == urls.origin_or_none(a)
