"""The OCPI listener the IOP calls: token authentication on every route, the envelope and id echo (T5)."""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from relay.config import Settings
from relay.service import Relay
from relay.store import RegistrationStore
from tests.ocpi_peer import OcpiPeer, b64, hub_role, routes, running

TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?Z$")


@dataclass
class Registered:
    relay: Relay
    peer: OcpiPeer
    a: str
    c: str
    r: dict[str, str]


@pytest.fixture
async def registered(make_settings: Callable[..., Settings]) -> AsyncIterator[Registered]:
    """A relay registered (FromIOP) with a peer."""
    a = "token-a-" + secrets.token_hex(8)
    peer = OcpiPeer()
    await peer.start()
    try:
        async with running(make_settings(RELAY_OCPI_TOKEN_A=a)) as relay:
            r = routes(relay)
            await peer.register(r["versions"], a)
            assert peer.relay_token is not None
            yield Registered(relay, peer, a, peer.relay_token, r)
    finally:
        await peer.close()


async def request(method: str, url: str, authorization: str | None, body: bytes | None = None,
                  headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any], dict[str, str]]:  # fmt: skip
    h = dict(headers or {})
    if authorization is not None:
        h["Authorization"] = authorization
    if body is not None:
        h["Content-Type"] = "application/json"
    async with aiohttp.ClientSession() as http, http.request(method, url, data=body, headers=h) as resp:
        raw = await resp.read()
        answer = json.loads(raw) if raw else {}
        return resp.status, answer, dict(resp.headers)


def assert_envelope(status: int, answer: dict[str, Any], headers: dict[str, str]) -> None:
    assert headers.get("Content-Type", "").startswith("application/json"), headers
    assert isinstance(answer.get("status_code"), int), answer
    assert isinstance(answer.get("timestamp"), str) and TIMESTAMP.match(answer["timestamp"]), answer
    if status >= 300:  # an HTTP error always carries an OCPI error code
        assert answer["status_code"] >= 2000, answer
    if answer["status_code"] >= 2000:  # in an HTTP error, or in a 200 (an error of the OCPI layer)
        assert status in (200, 400, 401, 404, 405) and isinstance(answer.get("status_message"), str), answer


def every_route(r: dict[str, str], offer: bytes) -> list[tuple[str, str, bytes | None]]:
    return [
        ("GET", r["versions"], None),
        ("GET", r["details"], None),
        ("GET", r["credentials"], None),
        ("POST", r["credentials"], offer),
        ("PUT", r["credentials"], offer),
        ("DELETE", r["credentials"], None),
    ]


async def test_wrong_or_missing_token_on_every_route(registered: Registered) -> None:
    reg, peer = registered, registered.peer
    assert reg.relay.store is not None
    rs = RegistrationStore(reg.relay.store)
    before = await rs.load()
    seen_before = len(peer.seen)
    offer = json.dumps({"token": peer.new_token_b(), "url": peer.versions_url, "roles": [hub_role()]}).encode()
    bad = [
        None,  # no Authorization at all
        "",
        "Token",
        "Token " + b64("wrong"),
        "Token wrong-plain-token",
        "Bearer " + reg.c,  # right token, wrong scheme
        "Basic " + b64(reg.c),
        "Token " + b64(reg.c)[:-2],  # truncated
        "Token " + b64(reg.c + "x"),
        "Token " + b64(reg.a),  # the spent token A
        "Token " + b64(peer.token_b),  # what the relay sends to the peer is not accepted from it
    ]
    for authorization in bad:
        for method, url, body in every_route(reg.r, offer):
            status, answer, headers = await request(method, url, authorization, body, {"X-Request-ID": "rq-1"})
            assert status == 401, (authorization, method, url, answer)
            assert_envelope(status, answer, headers)
            assert headers["X-Request-ID"] == "rq-1"
    # Nothing changed: the registration, the spent token A, and the peer was never called.
    assert await rs.load() == before
    assert len(peer.seen) == seen_before
    for method, url, body in every_route(reg.r, offer)[:3]:
        status, _, _ = await request(method, url, "Token " + b64(reg.c), body)
        assert status == 200, (method, url)


async def test_token_a_may_only_register(make_settings: Callable[..., Settings]) -> None:
    a = "token-a-" + secrets.token_hex(8)
    async with running(make_settings(RELAY_OCPI_TOKEN_A=a)) as relay:
        assert relay.store is not None
        r = routes(relay)
        auth = "Token " + b64(a)
        for url in (r["versions"], r["details"]):
            status, answer, headers = await request("GET", url, auth)
            assert status == 200
            assert_envelope(status, answer, headers)
        offer = json.dumps({"token": "t", "url": "http://127.0.0.1:1/v", "roles": [hub_role()]}).encode()
        for method, body in (("GET", None), ("PUT", offer), ("DELETE", None)):
            status, answer, headers = await request(method, r["credentials"], auth, body)
            assert status == 401, (method, answer)
            assert_envelope(status, answer, headers)
        raw, _, used = await RegistrationStore(relay.store).load()
        assert raw is None and used == set()


async def test_versions_and_details_announce_the_public_url(make_settings: Callable[..., Settings]) -> None:
    a = "token-a-" + secrets.token_hex(8)
    public = "https://ocpi.cpo.example/ocpi"
    async with running(make_settings(RELAY_OCPI_TOKEN_A=a, RELAY_OCPI_PUBLIC_URL=public + "/")) as relay:
        local = f"http://127.0.0.1:{relay.ocpi_port}/ocpi"
        auth = "Token " + b64(a)
        status, answer, _ = await request("GET", f"{local}/versions", auth)
        assert status == 200 and answer["data"] == [{"version": "2.2.1", "url": f"{public}/2.2.1"}]
        status, answer, _ = await request("GET", f"{local}/2.2.1", auth)
        assert status == 200 and answer["data"]["version"] == "2.2.1"
        eps = {(e["identifier"], e["role"]): e["url"] for e in answer["data"]["endpoints"]}
        assert eps[("credentials", "SENDER")] == f"{public}/2.2.1/credentials"
        assert all(url.startswith(public + "/2.2.1/") for url in eps.values())


async def test_plain_token_accepted_by_default(registered: Registered) -> None:
    status, answer, _ = await request("GET", registered.r["credentials"], "Token " + registered.c)
    assert status == 200 and answer["data"]["token"] == registered.c


async def test_plain_token_refused_when_disabled(make_settings: Callable[..., Settings]) -> None:
    a = "token-a-" + secrets.token_hex(8)
    peer = OcpiPeer()
    await peer.start()
    try:
        async with running(make_settings(RELAY_OCPI_TOKEN_A=a, RELAY_OCPI_ACCEPT_PLAIN_TOKEN="false")) as relay:
            r = routes(relay)
            status, answer, headers = await request("GET", r["versions"], "Token " + a)
            assert status == 401
            assert_envelope(status, answer, headers)
            await peer.register(r["versions"], a)  # base64, as 2.2.1 says
            c = peer.relay_token
            assert c is not None
            status, _, _ = await request("GET", r["credentials"], "Token " + c)
            assert status == 401
            status, _, _ = await request("GET", r["credentials"], "Token " + b64(c))
            assert status == 200
    finally:
        await peer.close()


async def test_every_answer_echoes_ids_and_carries_an_envelope(registered: Registered) -> None:
    r, c = registered.r, "Token " + b64(registered.c)
    base = r["versions"].rsplit("/", 1)[0]
    cases: list[tuple[str, str, str | None, bytes | None, int]] = [
        ("GET", r["versions"], c, None, 200),
        ("GET", r["details"], c, None, 200),
        ("GET", r["credentials"], c, None, 200),
        ("POST", r["credentials"], c, b"{}", 405),  # registered: OCPI says 405
        ("PUT", r["credentials"], c, b"{not json", 400),
        ("PATCH", r["credentials"], c, b"{}", 405),
        ("GET", f"{base}/2.2.1/nosuchmodule", c, None, 404),
        ("GET", f"{base}/2.2.1/nosuchmodule", None, None, 401),
        ("GET", r["versions"], "Token " + b64("nope"), None, 401),
    ]
    for i, (method, url, auth, body, expected) in enumerate(cases):
        ids = {"X-Request-ID": f"req-{i}", "X-Correlation-ID": f"corr-{i}"}
        status, answer, headers = await request(method, url, auth, body, ids)
        assert status == expected, (method, url, answer)
        assert_envelope(status, answer, headers)
        assert headers["X-Request-ID"] == f"req-{i}" and headers["X-Correlation-ID"] == f"corr-{i}", headers
        if status == 200:
            assert "data" in answer
    # Without ids from the caller, the answer still carries them.
    status, answer, headers = await request("GET", r["versions"], c)
    assert status == 200 and headers.get("X-Request-ID") and headers.get("X-Correlation-ID")
    # The registration survived all that.
    status, answer, _ = await request("GET", r["credentials"], c)
    assert status == 200 and answer["data"]["token"] == registered.c


ROUTING = {"ocpi-from-country-code", "ocpi-from-party-id", "ocpi-to-country-code", "ocpi-to-party-id"}


async def test_routing_headers_on_module_answers_only(registered: Registered) -> None:
    """Answers of Functional Modules carry OCPI-from/OCPI-to (TO = the requester, FROM = the party it
    addressed), errors after authentication included; versions and credentials never do (OCPI: "routing
    headers SHALL NOT be used with these modules"; GIREVE: mandatory except for credentials)."""
    r, c = registered.r, "Token " + b64(registered.c)
    routed = {"OCPI-from-country-code": "FR", "OCPI-from-party-id": "107",
              "OCPI-to-country-code": "FR", "OCPI-to-party-id": "AB1"}  # fmt: skip
    for method, url, body in (("GET", r["versions"], None), ("GET", r["details"], None),
                              ("GET", r["credentials"], None), ("POST", r["credentials"], b"{}"),
                              ("PUT", r["credentials"], b"{oops")):  # fmt: skip
        status, answer, headers = await request(method, url, c, body, routed)
        assert not {k.lower() for k in headers} & ROUTING, (method, url, status, headers)
    for url, expected in ((f"{r['details']}/locations", 200), (f"{r['details']}/locations/NOPE", 404),
                          (f"{r['details']}/sessions?offset=x", 200)):  # fmt: skip
        status, answer, headers = await request("GET", url, c, None, routed)
        assert status == expected, (url, answer)
        assert_envelope(status, answer, headers)
        assert (headers["OCPI-from-country-code"], headers["OCPI-from-party-id"]) == ("FR", "AB1"), headers
        assert (headers["OCPI-to-country-code"], headers["OCPI-to-party-id"]) == ("FR", "107"), headers
    # Refused before authentication, or no module at all: nobody to route to.
    for url, auth in ((f"{r['details']}/locations", None), (f"{r['details']}/nosuchmodule", c)):
        status, _, headers = await request("GET", url, auth, None, routed)
        assert status in (401, 404) and not {k.lower() for k in headers} & ROUTING, headers


async def test_registration_refusals_in_the_ocpi_layer_are_http_200(make_settings: Callable[..., Settings]) -> None:
    """A registration whose body is JSON and whose token A is good reached the OCPI layer: no HTTP error
    (status_codes), 2001 for a body that is no credentials object, 3001 for a handshake that failed
    (credentials.asciidoc, "Errors during registration"); not JSON at all is the transport's 400."""
    a = "token-a-" + secrets.token_hex(8)
    async with running(make_settings(RELAY_OCPI_TOKEN_A=a)) as relay:
        r, auth = routes(relay), "Token " + b64(a)
        for body in (b"{}", b"[]", b'{"token": "t", "url": 5, "roles": []}'):
            status, answer, headers = await request("POST", r["credentials"], auth, body)
            assert (status, answer["status_code"]) == (200, 2001), (body, answer)
            assert_envelope(status, answer, headers)
        status, answer, _ = await request("POST", r["credentials"], auth, b"{not json")
        assert (status, answer["status_code"]) == (400, 2001), answer
        offer = json.dumps({"token": "t", "url": "http://127.0.0.1:1/ocpi/versions", "roles": [hub_role()]}).encode()
        status, answer, headers = await request("POST", r["credentials"], auth, offer)
        assert (status, answer["status_code"]) == (200, 3001), answer
        assert_envelope(status, answer, headers)
        assert relay.registry is not None and relay.registry.registration is None
        # None of those spent the token A.
        status, _, _ = await request("GET", r["versions"], auth)
        assert status == 200
