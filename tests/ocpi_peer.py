"""An IOP-like OCPI 2.2.1 peer on loopback for the credentials handshakes, and helpers around a running relay.

The peer serves versions and version details (RECEIVER endpoints for locations, sessions, cdrs and
tariffs, and a credentials endpoint), accepts only ``Token <base64>`` of the tokens it knows, and
records every request it gets. It plays both sides of the handshake:

- Register – FromIOP (what GIREVE does): ``register()`` walks the relay's versions, details and
  credentials with token A, offering ``token_b``; the relay must come back for our versions and
  details with ``token_b`` before it answers with its token C.
- Register – ToIOP: its credentials POST handler takes the relay's credentials (token B), calls
  the relay's versions with that token while the POST is still open (like a hub checking the
  caller), and answers with ``token_c``.

Module receivers answer 200 / OCPI 1000 and record what arrives. Knobs, all off by default: ``hub`` (the
party of its HUB role, FR/107 as GIREVE's pre-production), ``routing`` (answer OCPI 4001 to a module request
whose OCPI-to-* is not ``hub``, as a hub does), ``versions`` (the versions it lists), ``missing`` (endpoint
identifiers left out of its 2.2.1 details), ``refuse_code`` (the OCPI code of a refused POST).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import json
import logging
import secrets
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import structlog
from aiohttp import web
from click.testing import CliRunner, Result

from relay.cli import main
from relay.config import MODULES, Settings
from relay.service import Relay
from relay.store import Store
from relay.store import keys as K
from tests.conftest import AUTH, REPO, TOKEN, gireve_location
from tests.waiting import wait_until

VERSION = "2.2.1"
ROUTING_HEADERS = ("OCPI-from-country-code", "OCPI-from-party-id", "OCPI-to-country-code", "OCPI-to-party-id")


def b64(token: str) -> str:
    return base64.b64encode(token.encode()).decode()


def token_header(token: str) -> str:
    """How OCPI 2.2.1 presents a token."""
    return "Token " + b64(token)


def envelope(data: Any = None, code: int = 1000, message: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"status_code": code, "timestamp": "2026-01-01T00:00:00Z"}
    if data is not None:
        out["data"] = data
    if message:
        out["status_message"] = message
    return out


@dataclass
class Seen:
    """One request as the peer saw it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    token: str | None  # the decoded token it carried, or None
    authorized: bool
    at: float

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


def _decode_token(header: str) -> str | None:
    scheme, _, value = header.partition(" ")
    if scheme != "Token" or not value:
        return None
    try:
        return base64.b64decode(value, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None


class OcpiPeer:
    """The IOP stand-in. ``accepted`` is the set of tokens it takes (in their base64 form only)."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None, *, call_back: bool = True,
                 client_ssl: ssl.SSLContext | None = None) -> None:  # fmt: skip
        self.ssl = ssl_context  # TLS of our listener
        self.client_ssl = client_ssl  # TLS of our calls to the relay (trust, client certificate)
        self.port = 0
        self.token_a = "peer-a-" + secrets.token_hex(8)  # handed to the relay for Register – ToIOP
        self.token_b = "peer-b-" + secrets.token_hex(8)  # presented to the relay in Register – FromIOP
        self.token_c = "peer-c-" + secrets.token_hex(8)  # answered to the relay's POST in Register – ToIOP
        self.accepted: set[str] = {self.token_a, self.token_b}
        self.seen: list[Seen] = []
        self.changed = asyncio.Event()
        self.call_back = call_back
        self.refuse_post = False  # answer the relay's credentials POST with an OCPI error
        self.refuse_code = 3001  # ... this one
        self.hub = ("FR", "107")  # the party of its HUB role, in every credentials object it hands over
        self.routing = False  # answer 4001 to module requests whose OCPI-to-* is not self.hub
        self.versions = ["2.1.1", VERSION]
        self.missing: set[str] = set()  # identifiers left out of the 2.2.1 details
        self.offered: dict[str, Any] | None = None  # the relay's credentials from its POST (ToIOP)
        self.callback: tuple[int, Any] | None = None  # (HTTP status, body) of our call back during that POST
        self.relay_token: str | None = None  # the token the relay gave us (FromIOP answer)
        self.relay_credentials: dict[str, Any] | None = None
        self._runner: web.AppRunner | None = None
        self._http: aiohttp.ClientSession | None = None

    # -- addresses -----------------------------------------------------------------------------------

    @property
    def base(self) -> str:
        return f"{'https' if self.ssl else 'http'}://127.0.0.1:{self.port}/ocpi"

    @property
    def versions_url(self) -> str:
        return f"{self.base}/versions"

    def endpoint(self, identifier: str) -> str:
        return f"{self.base}/{VERSION}/{identifier}"

    def endpoints(self) -> list[dict[str, str]]:
        # A SENDER entry of locations first: the relay must push to the RECEIVER one.
        eps = [{"identifier": "locations", "role": "SENDER", "url": f"{self.base}/{VERSION}/sender/locations"}]
        eps += [{"identifier": m, "role": "RECEIVER", "url": self.endpoint(m)} for m in MODULES]
        eps.append({"identifier": "credentials", "role": "SENDER", "url": self.endpoint("credentials")})
        return [e for e in eps if e["identifier"] not in self.missing]

    def offer(self, token: str) -> dict[str, Any]:
        """Its credentials object, carrying ``token``."""
        return {"token": token, "url": self.versions_url, "roles": [hub_role(*self.hub)]}

    # -- serving -------------------------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.ssl)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self._http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=10), connector=aiohttp.TCPConnector(ssl=self.client_ssl or True)
        )

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        token = _decode_token(request.headers.get("Authorization", ""))
        ok = token is not None and token in self.accepted
        seen = Seen(request.method, request.path, dict(request.headers), await request.read(), token, ok, time.time())
        self.seen.append(seen)
        self.changed.set()
        if not ok:
            return web.json_response(envelope(code=2000, message="unknown token"), status=401)
        path, method = request.path, request.method
        if path == "/ocpi/versions" and method == "GET":
            listed = [{"version": v, "url": f"{self.base}/{v}"} for v in self.versions]
            return web.json_response(envelope(listed))
        if path == f"/ocpi/{VERSION}" and method == "GET":
            return web.json_response(envelope({"version": VERSION, "endpoints": self.endpoints()}))
        if path == f"/ocpi/{VERSION}/credentials":
            assert token is not None
            if method == "POST":
                return await self._credentials_post(seen, token)
            if method == "DELETE":
                self.accepted.discard(token)
                return web.json_response(envelope())
        if any(path.startswith(f"/ocpi/{VERSION}/{m}/") for m in MODULES):
            to = (request.headers.get("OCPI-to-country-code"), request.headers.get("OCPI-to-party-id"))
            if self.routing and to != self.hub:
                return web.json_response(envelope(code=4001, message=f"Unknown receiver {to[0]}*{to[1]}"))
            return web.json_response(envelope())
        return web.json_response(envelope(code=2000, message="no such route"), status=404)

    async def _credentials_post(self, seen: Seen, token: str) -> web.Response:
        """Register – ToIOP from our side: the relay offers its credentials; we answer with ours."""
        if token != self.token_a:
            return web.json_response(envelope(code=2000, message="POST credentials needs token A"), status=405)
        self.offered = seen.json()
        if self.refuse_post:
            return web.json_response(envelope(code=self.refuse_code, message="cannot use your API"), status=400)
        assert self.offered is not None and self._http is not None
        if self.call_back:
            # Like a hub that checks the caller before answering: GET its versions with the new token.
            headers = {"Authorization": token_header(self.offered["token"])}
            async with self._http.get(self.offered["url"], headers=headers) as resp:
                self.callback = (resp.status, await resp.json())
        self.accepted.discard(self.token_a)
        self.accepted.add(self.token_c)
        return web.json_response(envelope(self.offer(self.token_c)))

    # -- what arrived ----------------------------------------------------------------------------------

    def module_requests(self, module: str | None = None) -> list[Seen]:
        mods = MODULES if module is None else (module,)
        return [s for s in self.seen if any(s.path.startswith(f"/ocpi/{VERSION}/{m}/") for m in mods)]

    def location_names(self, location_id: str = "LOC1") -> list[str]:
        """Names of a Location as PUT to our receiver, in arrival order (accepted requests only)."""
        path = f"/ocpi/{VERSION}/locations/FR/AB1/{location_id}"
        return [s.json()["name"] for s in self.seen if s.path == path and s.method == "PUT" and s.authorized]

    async def wait_for(self, cond: Callable[[], bool], timeout: float = 10.0) -> None:
        await wait_until(
            cond, timeout, lambda: f"condition on the peer (saw {[s.path for s in self.seen]})", changed=self.changed
        )

    # -- acting as the IOP towards the relay -----------------------------------------------------------

    def new_token_b(self) -> str:
        """A fresh token to offer in the next Register – FromIOP (the old one stays accepted)."""
        self.token_b = "peer-b-" + secrets.token_hex(8)
        self.accepted.add(self.token_b)
        return self.token_b

    async def call(
        self, method: str, url: str, token: str | None = None, *, plain: bool = False, body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any, dict[str, str]]:  # fmt: skip
        """One request to the relay: (status, decoded JSON body, response headers)."""
        assert self._http is not None
        h = dict(headers or {})
        if token is not None:
            h["Authorization"] = f"Token {token}" if plain else token_header(token)
        data = json.dumps(body).encode() if body is not None else None
        if data is not None:
            h["Content-Type"] = "application/json"
        async with self._http.request(method, url, data=data, headers=h) as resp:
            raw = await resp.read()
            return resp.status, json.loads(raw) if raw else None, dict(resp.headers)

    async def register(self, versions_url: str, token_a: str) -> dict[str, Any]:
        """Register – FromIOP, as GIREVE does it; returns the relay's answer to the POST."""
        status, answer, _ = await self.call("GET", versions_url, token_a)
        assert status == 200 and answer["status_code"] == 1000, answer
        version_url = next(v["url"] for v in answer["data"] if v["version"] == VERSION)
        status, answer, _ = await self.call("GET", version_url, token_a)
        assert status == 200 and answer["status_code"] == 1000, answer
        cred_url = next(e["url"] for e in answer["data"]["endpoints"] if e["identifier"] == "credentials")
        status, answer, _ = await self.call("POST", cred_url, token_a, body=self.offer(self.token_b))
        assert status == 200 and answer["status_code"] == 1000, answer
        self.relay_credentials = answer["data"]
        self.relay_token = answer["data"]["token"]
        return dict(answer)


def hub_role(country_code: str = "FR", party_id: str = "107") -> dict[str, Any]:
    return {"role": "HUB", "party_id": party_id, "country_code": country_code, "business_details": {"name": "GIREVE"}}


def hub_ssl(ca: Any, *, require_client_cert: bool = False) -> ssl.SSLContext:
    """Server side TLS for a peer, with a certificate for 127.0.0.1 from a trustme CA."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    if require_client_cert:
        ca.configure_trust(ctx)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


# -- a relay in-process, and the things tests do to it ---------------------------------------------------


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Relay]:
    relay = Relay(settings)
    await relay.start()
    try:
        yield relay
    finally:
        await stop(relay)


async def stop(relay: Relay, timeout: float = 15.0) -> None:
    """relay.stop(), failing loudly with every task's stack if it does not return in time."""
    task = asyncio.ensure_future(relay.stop())
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if done:
        task.result()
        return
    out = io.StringIO()
    for t in asyncio.all_tasks():
        if t is not asyncio.current_task():
            t.print_stack(limit=8, file=out)
    raise AssertionError(f"relay.stop() did not return within {timeout}s; tasks:\n{out.getvalue()}")


def ocpi_base(relay: Relay) -> str:
    return relay.settings.ocpi.public_url.rstrip("/")


def routes(relay: Relay) -> dict[str, str]:
    base = ocpi_base(relay)
    return {
        "versions": f"{base}/versions",
        "details": f"{base}/{VERSION}",
        "credentials": f"{base}/{VERSION}/credentials",
    }


async def put_location(relay: Relay, name: str, location_id: str = "LOC1") -> None:
    url = f"http://127.0.0.1:{relay.ingress_port}/ingress/2.2.1/locations/FR/AB1/{location_id}"
    body = gireve_location(location_id, name=name)
    async with aiohttp.ClientSession() as http, http.put(url, json=body, headers=AUTH) as r:
        assert r.status == 202, await r.text()


async def delete_tariff(relay: Relay, tariff_id: str = "T1") -> None:
    url = f"http://127.0.0.1:{relay.ingress_port}/ingress/2.2.1/tariffs/FR/AB1/{tariff_id}"
    async with aiohttp.ClientSession() as http, http.delete(url, headers=AUTH) as r:
        assert r.status == 202, await r.text()


async def cli(settings: Settings, *args: str, **env: str) -> Result:
    """Run the CLI in a thread (it runs its own event loop) against the test Redis."""
    base = {
        "RELAY_REDIS_URL": settings.redis.url,
        "RELAY_INGRESS_TOKEN": TOKEN,
        "RELAY_CONFIG": str(REPO / "config" / "relay.toml"),
        "RELAY_OPERATORS_JSON": json.dumps([{"country_code": o.country_code, "party_id": o.party_id,
                                             "emi3_id": o.emi3_id, "name": o.name} for o in settings.operators]),
        "RELAY_OCPI_PUBLIC_URL": settings.ocpi.public_url,
        "RELAY_OCPI_ALLOW_INSECURE_URLS": str(settings.ocpi.allow_insecure_urls).lower(),
    }  # fmt: skip
    base.update(env)
    return await asyncio.to_thread(CliRunner().invoke, main, list(args), env=base)


async def pending(store: Store, module: str = "locations") -> int:
    """Entries the forwarder has read and not yet acknowledged (held in memory, waiting to be sent)."""
    total = 0
    for shard in range(store.shards):
        info = await store.redis.xpending(K.stream_key(module, shard), K.GROUP)
        total += int(info["pending"])
    return total


async def until_pending(store: Store, n: int, module: str = "locations", timeout: float = 10.0) -> None:
    """Wait until the forwarder holds exactly n unacknowledged entries of a module."""

    async def check() -> bool:
        return await pending(store, module) == n

    await wait_until(check, timeout, what=f"{n} {module} entries pending")


@contextlib.contextmanager
def captured_logs() -> Iterator[io.StringIO]:
    """Everything the relay logs, as rendered (after redaction), structlog and stdlib alike.

    conftest configures structlog once with cache_logger_on_first_use: loggers already used keep a
    reference to the processor list, so the renderer is wrapped in that same list, in place.
    """
    out = io.StringIO()
    procs: list[Any] = structlog.get_config()["processors"]
    renderer = procs[-1]

    def tee(logger: Any, name: str, event_dict: Any) -> Any:
        rendered = renderer(logger, name, event_dict)
        out.write(str(rendered) + "\n")
        return rendered

    handler = logging.StreamHandler(out)
    root = logging.getLogger()
    procs[-1] = tee
    root.addHandler(handler)
    try:
        yield out
    finally:
        procs[-1] = renderer
        root.removeHandler(handler)
