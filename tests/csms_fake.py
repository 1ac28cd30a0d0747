"""A fake CSMS webhook on loopback, and the roaming bench the K1–K3 tests share.

``CsmsFake`` is what a CSMS team would write against ``[csms] webhook_url``: it records every POST
the relay makes (commands and tokens from the IOP) and answers commands with a scripted
CommandResponse-like ``{"result": …}``. It can be slow (``delay_s``, or ``hold`` until released)
or down (``down()``: connections refused until ``start()``).

``bench()`` runs a real relay against the test Redis, registered by an IOP-like peer (Register –
FromIOP) whose version details point every module, including the Tokens SENDER interface used by
real-time authorisation, at a ``FakeIop`` that records what the relay sends. The bench talks to the
relay as the CSMS (ingress, bearer token) and as the IOP (OCPI listener, the token the relay issued).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from relay.config import MODULES, Settings
from relay.service import Relay
from tests.conftest import AUTH, gireve_location
from tests.fake_iop import FakeIop
from tests.loopback import LoopbackServer
from tests.ocpi_peer import VERSION, OcpiPeer, running, token_header
from tests.waiting import wait_until

CSMS_TOKEN = "csms-webhook-secret"
IOP_TOKENS = "/ocpi/2.2.1/tokens"  # the fake IOP's Tokens SENDER endpoint (POST {uid}/authorize)


@dataclass
class CsmsPost:
    """One webhook call as the CSMS saw it."""

    headers: dict[str, str]
    body: dict[str, Any]
    at: float

    @property
    def kind(self) -> str:
        return str(self.body.get("kind"))


class CsmsFake(LoopbackServer):
    """The CSMS's webhook. ``answer(post)`` scripts the reply to a command (default: ``result``)."""

    shutdown_timeout = 0.2

    def __init__(self) -> None:
        super().__init__()
        self.posts: list[CsmsPost] = []
        self.result = "ACCEPTED"
        self.message: str | None = None
        self.status = 200
        self.delay_s = 0.0
        self.hold: asyncio.Event | None = None
        self.answer: Callable[[CsmsPost], dict[str, Any] | None] = lambda _: None
        # Awaited before answering: a CSMS that does something first (posts the result, say).
        self.before_answer: Callable[[CsmsPost], Awaitable[None]] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/csms/ocpi-webhook"

    async def _handle(self, request: web.Request) -> web.Response:
        post = CsmsPost(dict(request.headers), await request.json(), time.time())
        self.posts.append(post)
        self.changed.set()
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.hold is not None:
            await self.hold.wait()
        if self.before_answer is not None:
            await self.before_answer(post)
        if self.status // 100 != 2:
            return web.json_response({"error": "scripted failure"}, status=self.status)
        scripted = self.answer(post)
        if scripted is not None:
            return web.json_response(scripted)
        if post.kind == "command":
            reply: dict[str, Any] = {"result": self.result}
            if self.message:
                reply["message"] = self.message
            return web.json_response(reply)
        return web.json_response({})

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/csms/ocpi-webhook", self._handle)

    async def close(self) -> None:
        if self.hold is not None:
            self.hold.set()
        await super().close()

    def of_kind(self, kind: str) -> list[CsmsPost]:
        return [p for p in self.posts if p.kind == kind]

    async def wait_for(self, cond: Callable[[], bool], timeout: float = 10.0) -> None:
        await wait_until(
            cond, timeout, lambda: f"condition on the fake CSMS ({len(self.posts)} posts)", changed=self.changed
        )


class RecordingIop(FakeIop):
    """A FakeIop that also keeps each request's query string (in arrival order)."""

    def __init__(self) -> None:
        super().__init__()
        self.queries: list[tuple[str, str]] = []

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.queries.append((request.path, request.query_string))
        return await super()._handle(request)


class RoamingPeer(OcpiPeer):
    """An OcpiPeer whose version details point the relay at a FakeIop, Tokens SENDER included."""

    def __init__(self, iop: FakeIop) -> None:
        super().__init__()
        self.iop = iop

    def endpoints(self) -> list[dict[str, str]]:
        eps = [{"identifier": m, "role": "RECEIVER", "url": f"{self.iop.url}/{m}"} for m in MODULES]
        eps.append({"identifier": "tokens", "role": "SENDER", "url": f"http://127.0.0.1:{self.iop.port}{IOP_TOKENS}"})
        eps.append({"identifier": "credentials", "role": "SENDER", "url": self.endpoint("credentials")})
        return eps


def fast_env(csms: CsmsFake, token_a: str) -> dict[str, str]:
    return {
        "RELAY_FORWARDER_COMPACT": "",  # each update followed to the IOP: compaction off (test_compaction.py)
        "RELAY_OCPI_TOKEN_A": token_a,
        "RELAY_CSMS_WEBHOOK_URL": csms.url,
        "RELAY_CSMS_TOKEN": CSMS_TOKEN,
        "RELAY_CSMS_TIMEOUT_S": "2",
        "RELAY_IOP_AUTHORIZE_TIMEOUT_S": "0.5",
        "RELAY_IOP_REQUEST_TIMEOUT_S": "2",
        "RELAY_IOP_CONNECT_TIMEOUT_S": "0.5",
        "RELAY_FORWARDER_BACKOFF_INITIAL_S": "0.01",
        "RELAY_FORWARDER_BACKOFF_MAX_S": "0.1",
        "RELAY_FORWARDER_PROBE_MAX_S": "0.2",
        "RELAY_FORWARDER_CLAIM_IDLE_S": "5",
        "RELAY_FORWARDER_SHUTDOWN_TIMEOUT_S": "0.5",
        "RELAY_OCPI_SHUTDOWN_TIMEOUT_S": "0.5",
        "RELAY_INGRESS_SHUTDOWN_TIMEOUT_S": "0.5",
    }


class Bench:
    """A registered relay, its fake IOP, the fake CSMS, and HTTP as either side."""

    def __init__(self, relay: Relay, iop: RecordingIop, peer: RoamingPeer, csms: CsmsFake,
                 http: aiohttp.ClientSession) -> None:  # fmt: skip
        self.relay, self.iop, self.peer, self.csms, self.http = relay, iop, peer, csms, http

    @property
    def ingress_base(self) -> str:
        return f"http://127.0.0.1:{self.relay.ingress_port}/ingress/2.2.1"

    @property
    def ocpi_base(self) -> str:
        return f"{self.relay.settings.ocpi.public_url.rstrip('/')}/{VERSION}"

    @property
    def relay_token(self) -> str:
        assert self.peer.relay_token is not None
        return self.peer.relay_token

    async def ingress(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
                      headers: dict[str, str] | None = None, auth: bool = True) -> tuple[int, Any]:  # fmt: skip
        """A call of the CSMS to the ingress: (status, decoded body)."""
        h = {**(AUTH if auth else {}), **(headers or {})}
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        if data is not None:
            h.setdefault("Content-Type", "application/json")
        async with self.http.request(method, self.ingress_base + path, data=data, headers=h) as r:
            text = await r.read()
            return r.status, json.loads(text) if text else None

    async def ocpi(self, method: str, path: str, body: Any = None, *,
                   headers: dict[str, str] | None = None) -> tuple[int, Any, dict[str, str]]:  # fmt: skip
        """A call of the IOP to the OCPI listener with the token the relay gave it."""
        h = {"Authorization": token_header(self.relay_token), **(headers or {})}
        data = json.dumps(body).encode() if body is not None else None
        if data is not None:
            h["Content-Type"] = "application/json"
        async with self.http.request(method, self.ocpi_base + path, data=data, headers=h) as r:
            text = await r.read()
            return r.status, json.loads(text) if text else None, dict(r.headers)

    async def put_location(self, location_id: str = "LOC1", country_code: str = "FR", party_id: str = "AB1",
                           **changes: Any) -> None:  # fmt: skip
        """The CSMS PUTs a Location (examples/location.json); the relay then knows it."""
        body = gireve_location(location_id, country_code=country_code, party_id=party_id, **changes)
        if party_id != "AB1":
            for evse in body["evses"]:
                evse["evse_id"] = evse["evse_id"].replace("FR*AB1*", f"{country_code}*{party_id}*")
        status, answer = await self.ingress("PUT", f"/locations/{country_code}/{party_id}/{location_id}", body)
        assert status == 202, answer

    async def push_token(self, uid: str, whitelist: str = "ALWAYS", *, token_type: str = "RFID",
                         country_code: str = "NL", party_id: str = "TNM",
                         **changes: Any) -> dict[str, Any]:  # fmt: skip
        """The IOP PUTs a Token on the Tokens Receiver; answered 201 (new) or 200 (replaced), OCPI 1000."""
        token = iop_token(uid, whitelist, token_type=token_type, country_code=country_code, party_id=party_id,
                          **changes)  # fmt: skip
        status, answer, _ = await self.ocpi("PUT", f"/tokens/{country_code}/{party_id}/{uid}?type={token_type}", token)
        assert status in (200, 201) and answer["status_code"] == 1000, answer
        return token

    def response_url(self, command: str) -> str:
        """A unique response_url on the fake IOP, as an eMSP would give it."""
        return f"http://127.0.0.1:{self.iop.port}/ocpi/emsp/2.2.1/commands/{command}/{secrets.token_hex(6)}"


def iop_token(uid: str, whitelist: str = "ALWAYS", *, token_type: str = "RFID", country_code: str = "NL",
              party_id: str = "TNM", **changes: Any) -> dict[str, Any]:  # fmt: skip
    """A Token as an eMSP pushes it (OCPI's token_put_example, with the given ids and whitelist)."""
    token: dict[str, Any] = {
        "country_code": country_code, "party_id": party_id, "uid": uid, "type": token_type,
        "contract_id": "NL8ACC12E46L89", "visual_number": "DF000-2001-8999-1", "issuer": "TheNewMotion",
        "group_id": "DF000-2001-8999", "valid": True, "whitelist": whitelist, "last_updated": "2015-06-29T22:39:09Z",
    }  # fmt: skip
    token.update(changes)
    return token


@contextlib.asynccontextmanager
async def bench(make_settings: Callable[..., Settings], **env: str) -> AsyncIterator[Bench]:
    """Start the fakes, a relay (env overrides on top of fast defaults), and register it From IOP."""
    iop, csms = RecordingIop(), CsmsFake()
    await iop.start()
    await csms.start()
    peer = RoamingPeer(iop)
    await peer.start()
    token_a = "token-a-" + secrets.token_hex(8)
    settings = make_settings(**{**fast_env(csms, token_a), **env})
    try:
        async with running(settings) as relay, aiohttp.ClientSession() as http:
            await peer.register(f"{relay.settings.ocpi.public_url.rstrip('/')}/versions", token_a)
            # The relay follows a new registration within a second (its watch loop); don't wait for it.
            await relay._apply_registration()
            assert relay.link.state == "up", relay.link.state
            yield Bench(relay, iop, peer, csms, http)
    finally:
        await csms.close()
        await peer.close()
        await iop.close()
