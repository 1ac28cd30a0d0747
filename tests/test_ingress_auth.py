"""The ingress token check: which routes need the CSMS's token, and what a refusal looks like."""

from __future__ import annotations

from typing import Any, cast

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from relay.config import Settings
from relay.ingress import create_app
from relay.ingress.auth import TokenCheck, authorised
from relay.ingress.roaming import RoamingDeps
from relay.store import Store
from relay.typedefs import Health
from tests.conftest import AUTH

P = "/ingress/2.2.1"
# Every route under the prefix, the roaming ones included (their handlers are never reached here).
PROTECTED = [
    ("PUT", f"{P}/locations/FR/AB1/LOC1"),
    ("GET", f"{P}/locations/FR/AB1/LOC1"),  # the catch-all takes every method: the token first, then 405
    ("POST", f"{P}/batch"),
    ("GET", f"{P}/batch"),
    ("POST", f"{P}/tokens/0102ABCD/authorize"),
    ("GET", f"{P}/tokens/FR/AB1/0102ABCD"),
    ("POST", f"{P}/commands/c1/result"),
    ("GET", f"{P}/"),
]
OPEN = [("GET", "/healthz", 200), ("GET", "/readyz", 200), ("GET", "/metrics", 200),
        ("POST", "/healthz", 405), ("GET", "/nowhere", 404), ("GET", P, 404)]  # fmt: skip


@pytest.fixture
async def client(settings: Settings, store: Store) -> Any:
    unused = cast(Any, None)
    app = create_app(settings, store, Health(listeners_up=True), RoamingDeps(unused, unused, unused))
    async with TestClient(TestServer(app)) as c:
        yield c


async def refused_auth(c: TestClient[Any, Any]) -> float:
    text = await (await c.get("/metrics")).text()
    line = 'relay_events_refused_total{module="unknown",operator="",reason="auth",status="401"} '
    return next((float(x.removeprefix(line)) for x in text.splitlines() if x.startswith(line)), 0.0)


@pytest.mark.parametrize("header", [None, "Bearer wrong", "Basic test-ingress-token"])
async def test_every_route_under_the_prefix_needs_the_token(client: TestClient[Any, Any], header: str | None) -> None:
    headers = {} if header is None else {"Authorization": header}
    for method, path in PROTECTED:
        resp = await client.request(method, path, data=b"{}", headers=headers)
        answer = await resp.json()
        assert resp.status == 401, (method, path, answer)
        assert resp.content_type == "application/json" and "WWW-Authenticate" not in resp.headers
        assert answer["status_code"] == 2001
        assert answer["status_message"] == "Authorization: missing or wrong token"
        assert answer["errors"] == [{"field": "Authorization", "rule": "auth", "message": "missing or wrong token"}]


async def test_health_metrics_and_unknown_routes_need_no_token(client: TestClient[Any, Any]) -> None:
    for method, path, status in OPEN:
        resp = await client.request(method, path)
        assert resp.status == status, (method, path, await resp.text())


async def test_with_the_token_the_route_answers(client: TestClient[Any, Any]) -> None:
    resp = await client.get(f"{P}/locations/FR/AB1/LOC1", headers=AUTH)
    assert resp.status == 405, await resp.text()  # past the token: the route's own answer


async def test_only_the_event_route_counts_a_401_as_a_refused_event(client: TestClient[Any, Any]) -> None:
    before = await refused_auth(client)
    for method, path in PROTECTED:
        assert (await client.request(method, path, data=b"{}")).status == 401
    # What the catch-all event route took: both locations requests, GET batch and the bare prefix.
    # POST batch and the roaming routes are not single events: not counted.
    assert await refused_auth(client) - before == 4


async def test_unrouted_requests_answer_in_the_json_shape_of_refusals(client: TestClient[Any, Any]) -> None:
    for method, path, status, reason in [("GET", "/nowhere", 404, "Not Found"),
                                         ("POST", "/healthz", 405, "Method Not Allowed")]:  # fmt: skip
        resp = await client.request(method, path)
        assert (resp.status, resp.content_type) == (status, "application/json")
        answer = await resp.json()
        assert answer["status_code"] == 2001
        assert answer["errors"] == [{"field": "url", "rule": "route", "message": reason}]


def test_a_route_under_the_prefix_that_skips_the_check_stops_the_app(settings: Settings) -> None:
    check = TokenCheck(settings.ingress)

    async def handler(_: web.Request) -> web.Response:
        return web.Response()

    async def unchecked(_: web.Request) -> web.Response:
        return web.Response()

    app = web.Application()
    app.router.add_get(f"{P}/checked", check.checks(handler))
    app.router.add_get(f"{P}/guarded", check.guard(unchecked))
    app.router.add_get("/open", unchecked)  # outside the prefix: open by design
    check.verify(app, P)
    app.router.add_get(f"{P}/forgotten", unchecked)
    with pytest.raises(RuntimeError, match="forgotten"):
        check.verify(app, P)


def test_tokens_follow_the_setting(settings: Settings) -> None:
    check = TokenCheck(settings.ingress)
    assert check.tokens() == (b"test-ingress-token",)
    settings.ingress.token = "a, b"
    assert check.tokens() == (b"a", b"b")
    assert authorised("Bearer b", check.tokens()) and authorised("token a", check.tokens())
    assert not authorised("Bearer a, b", check.tokens()) and not authorised("Bearer", check.tokens())
