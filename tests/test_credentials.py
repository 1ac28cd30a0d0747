"""The credentials handshakes (C1–C4) end to end: a relay in-process, an IOP-like peer on loopback, the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import pytest
from prometheus_client import REGISTRY

from relay.config import Settings
from relay.credentials import (
    Credentials,
    HandshakeError,
    Registration,
    accept_from_iop,
    digest,
    registration_codec,
)
from relay.service import Relay, _cancel
from relay.store import DeliveryStore, RegistrationStore
from tests.ocpi_peer import (
    ROUTING_HEADERS,
    OcpiPeer,
    b64,
    captured_logs,
    cli,
    delete_tariff,
    hub_role,
    put_location,
    routes,
    running,
    token_header,
    until_pending,
)
from tests.waiting import stays_false, wait_until

OPERATORS = json.dumps(
    [
        {"country_code": "FR", "party_id": "AB1", "emi3_id": "FR*AB1", "name": "Example CPO"},
        {"country_code": "FR", "party_id": "AB2", "emi3_id": "FR*AB2", "name": "Second CPO"},
    ]
)
FAST = {
    "RELAY_FORWARDER_COMPACT": "",  # each update held then followed to the IOP: compaction off (test_compaction.py)
    "RELAY_FORWARDER_BACKOFF_INITIAL_S": "0.01",
    "RELAY_FORWARDER_BACKOFF_MAX_S": "0.05",
    "RELAY_OPERATORS_JSON": OPERATORS,
    "RELAY_FORWARDER_SHUTDOWN_TIMEOUT_S": "0.5",
}


@pytest.fixture
async def peer() -> AsyncIterator[OcpiPeer]:
    p = OcpiPeer()
    await p.start()
    yield p
    await p.close()


def token_a() -> str:
    return "token-a-" + secrets.token_hex(8)


async def stored(relay: Relay) -> Registration | None:
    assert relay.store is not None
    raw, _, _ = await RegistrationStore(relay.store).load()
    return registration_codec[1].decode(raw) if raw else None


async def status_json(settings: Settings) -> dict[str, Any]:
    res = await cli(settings, "status", "--json")
    assert res.exit_code == 0, res.output
    out: dict[str, Any] = json.loads(res.stdout)
    return out


def assert_no_secrets(logs: io.StringIO, *tokens: str) -> None:
    text = logs.getvalue()
    assert re.search(r"\] registered\s.*direction=", text), "log capture missed the relay: check would be vacuous"
    for t in tokens:
        assert t not in text, f"a token appears in the logs: {t[:6]}…"
        assert b64(t) not in text, f"a token appears base64-encoded in the logs: {t[:6]}…"


def assert_no_routing_headers(headers: dict[str, str]) -> None:
    """T3: neither OCPI-from-* nor OCPI-to-* on versions and credentials calls."""
    lowered = {k.lower() for k in headers}
    assert not lowered & {h.lower() for h in ROUTING_HEADERS}, headers


# -- 1. Register – FromIOP ---------------------------------------------------------------------------


async def test_register_from_iop(make_settings: Callable[..., Settings], peer: OcpiPeer) -> None:
    a = token_a()
    settings = make_settings(RELAY_OCPI_TOKEN_A=a, **FAST)
    with captured_logs() as logs:
        async with running(settings) as relay:
            assert relay.store is not None
            r = routes(relay)
            # Accepted before any registration: held, not sent, in the order given.
            for name in ("v1", "v2", "v3"):
                await put_location(relay, name)
            await until_pending(relay.store, 3)
            assert relay.link.state == "paused" and peer.module_requests() == []

            answer = await peer.register(r["versions"], a)
            c = peer.relay_token
            b = peer.token_b
            assert c and c not in (a, b)
            data = answer["data"]
            assert data["url"] == r["versions"]
            roles = sorted((x["country_code"], x["party_id"], x["role"], x["business_details"]["name"])
                           for x in data["roles"])  # fmt: skip
            assert roles == [("FR", "AB1", "CPO", "Example CPO"), ("FR", "AB2", "CPO", "Second CPO")]

            # The relay came for our versions and details with B, base64-encoded, without routing headers.
            fetched = [s for s in peer.seen if s.path in ("/ocpi/versions", "/ocpi/2.2.1")]
            assert [(s.method, s.path) for s in fetched] == [("GET", "/ocpi/versions"), ("GET", "/ocpi/2.2.1")]
            for s in fetched:
                assert s.headers["Authorization"] == token_header(b)
                assert s.headers.get("X-Request-ID")
                assert_no_routing_headers(s.headers)

            # A is spent everywhere; C opens every route.
            offer = {"token": "x", "url": peer.versions_url, "roles": [hub_role()]}
            for method, url in [("GET", r["versions"]), ("GET", r["details"]), ("POST", r["credentials"]),
                                ("GET", r["credentials"]), ("PUT", r["credentials"]),
                                ("DELETE", r["credentials"])]:  # fmt: skip
                status, body, _ = await peer.call(method, url, a, body=offer if method in ("POST", "PUT") else None)
                assert status == 401, (method, url, body)
            for url in (r["versions"], r["details"]):
                status, body, _ = await peer.call("GET", url, c)
                assert status == 200 and body["status_code"] == 1000
            status, body, _ = await peer.call("GET", r["credentials"], c)
            assert status == 200 and body["data"]["token"] == c and body["data"]["url"] == r["versions"]

            # The handshake's endpoints and token are stored, and the forwarder uses them.
            reg = await stored(relay)
            assert reg is not None and reg.state == "registered" and reg.direction == "from_iop"
            # only the digest of the token the IOP presents is stored; the one the relay sends is in clear
            assert (reg.incoming_token, reg.outgoing_token, reg.versions_url) == (digest(c), b, peer.versions_url)
            assert reg.receiver("locations") == peer.endpoint("locations")

            await put_location(relay, "v4")
            await delete_tariff(relay)
            await peer.wait_for(lambda: peer.location_names() == ["v1", "v2", "v3", "v4"]
                                and len(peer.module_requests("tariffs")) == 1)  # fmt: skip
            [tariff] = peer.module_requests("tariffs")
            assert (tariff.method, tariff.path) == ("DELETE", "/ocpi/2.2.1/tariffs/FR/AB1/T1")
            for s in peer.module_requests():
                assert s.authorized and s.headers["Authorization"] == token_header(b)
                assert (s.headers["OCPI-to-country-code"], s.headers["OCPI-to-party-id"]) == ("FR", "107")
                assert (s.headers["OCPI-from-country-code"], s.headers["OCPI-from-party-id"]) == ("FR", "AB1")
            assert not any("/sender/" in s.path for s in peer.seen)
    assert_no_secrets(logs, a, b, c)


async def test_failed_from_iop_registration_stores_nothing(
    make_settings: Callable[..., Settings], peer: OcpiPeer
) -> None:
    a = token_a()
    async with running(make_settings(RELAY_OCPI_TOKEN_A=a, **FAST)) as relay:
        r = routes(relay)
        # A token B that the peer does not take: the relay cannot use the peer's API.
        offer = {"token": "not-known-to-the-peer", "url": peer.versions_url, "roles": [hub_role()]}
        status, body, _ = await peer.call("POST", r["credentials"], a, body=offer)
        # The HTTP status is the OCPI listener's choice (400 before, 200 once "reached the OCPI layer").
        assert status == 200 and body["status_code"] == 3001, body
        assert [s.authorized for s in peer.seen] == [False]
        assert await stored(relay) is None
        # Unreachable versions URL: the same.
        offer["url"] = "http://127.0.0.1:1/ocpi/versions"
        status, body, _ = await peer.call("POST", r["credentials"], a, body=offer)
        assert status == 200 and body["status_code"] == 3001, body
        # A is not spent by a failed attempt.
        await peer.register(r["versions"], a)
        assert (await stored(relay)) is not None


# -- 2. relay register --from-iop ---------------------------------------------------------------------


async def test_cli_register_from_iop(make_settings: Callable[..., Settings], peer: OcpiPeer) -> None:
    settings = make_settings(**FAST)
    async with running(settings) as relay:
        r = routes(relay)
        # The plain form first; a second run replaces its token A.
        res = await cli(settings, "register", "--from-iop")
        assert res.exit_code == 0, res.output
        lines = dict(line.split(":", 1) for line in res.stdout.splitlines() if line.startswith(("versions", "token")))
        assert lines["versions URL"].strip() == r["versions"]
        first_a = lines["token A"].strip()
        res = await cli(settings, "register", "--from-iop", "--json")
        assert res.exit_code == 0, res.output
        out = json.loads(res.stdout)
        assert out["versions_url"] == r["versions"]
        a = out["token_a"]
        assert a != first_a and len(a) >= 32
        status, _, _ = await peer.call("GET", r["versions"], first_a)
        assert status == 401

        # The printed A works at once against the running relay (no wait for its Redis poll).
        await peer.register(out["versions_url"], a)
        status, _, _ = await peer.call("GET", r["versions"], a)
        assert status == 401

        res = await cli(settings, "status")
        assert res.exit_code == 0, res.output
        assert re.search(r"^connection: registered since \d{4}-\d\d-\d\dT", res.stdout, re.M), res.stdout
        assert f"IOP versions: {peer.versions_url}" in res.stdout
        assert re.search(rf"^\s+locations\s+RECEIVER\s+{re.escape(peer.endpoint('locations'))}$", res.stdout, re.M)
        data = await status_json(settings)
        conn = data["connection"]
        assert (conn["state"], conn["direction"], conn["versions_url"]) == ("registered", "from_iop", peer.versions_url)
        assert {"identifier": "locations", "role": "RECEIVER", "url": peer.endpoint("locations")} in conn["endpoints"]

        await put_location(relay, "v1")
        await peer.wait_for(lambda: peer.location_names() == ["v1"])
        assert peer.module_requests()[0].headers["Authorization"] == token_header(peer.token_b)


# -- 3. Register – ToIOP ------------------------------------------------------------------------------


async def test_register_to_iop(make_settings: Callable[..., Settings], peer: OcpiPeer) -> None:
    settings = make_settings(**FAST)
    with captured_logs() as logs:
        async with running(settings) as relay:
            r = routes(relay)
            res = await cli(settings, "register", "--versions-url", peer.versions_url, "--token-a", peer.token_a,
                            "--json")  # fmt: skip
            assert res.exit_code == 0, res.output
            expected = {"registered": True, "versions_url": peer.versions_url, "endpoints": len(peer.endpoints())}
            assert json.loads(res.stdout) == expected

            # The relay discovered with A, then POSTed its credentials with A, no routing headers.
            calls = [(s.method, s.path) for s in peer.seen]
            assert calls == [("GET", "/ocpi/versions"), ("GET", "/ocpi/2.2.1"), ("POST", "/ocpi/2.2.1/credentials")]
            for s in peer.seen:
                assert s.headers["Authorization"] == token_header(peer.token_a)
                assert_no_routing_headers(s.headers)
            offered = peer.offered
            assert offered is not None
            b = offered["token"]
            assert b and b != peer.token_a and offered["url"] == r["versions"]
            assert sorted((x["party_id"], x["role"]) for x in offered["roles"]) == [("AB1", "CPO"), ("AB2", "CPO")]
            # The peer called the relay back with B while its POST was open: B already worked.
            assert peer.callback is not None
            cb_status, cb_body = peer.callback
            assert cb_status == 200 and cb_body["data"] == [{"version": "2.2.1", "url": r["details"]}]

            # From now on: C towards the peer, B accepted on the listener.
            await put_location(relay, "v1")
            await peer.wait_for(lambda: peer.location_names() == ["v1"])
            assert peer.module_requests()[0].headers["Authorization"] == token_header(peer.token_c)
            status, body, _ = await peer.call("GET", r["credentials"], b)
            assert status == 200 and body["data"]["token"] == b
            status, body, _ = await peer.call("POST", r["credentials"], b, body=body["data"])
            assert status == 405, body  # B is the registered token now, not a token A
            reg = await stored(relay)
            assert reg is not None and reg.direction == "to_iop"
            assert (reg.incoming_token, reg.outgoing_token) == (digest(b), peer.token_c)
    assert_no_secrets(logs, peer.token_a, b, peer.token_c)


async def test_failed_to_iop_registration_leaves_no_token_behind(
    make_settings: Callable[..., Settings], peer: OcpiPeer
) -> None:
    settings = make_settings(**FAST)
    async with running(settings) as relay:
        r = routes(relay)
        res = await cli(settings, "register", "--from-iop", "--json")
        pending_a = json.loads(res.stdout)["token_a"]
        peer.refuse_post = True
        res = await cli(settings, "register", "--versions-url", peer.versions_url, "--token-a", peer.token_a)
        assert res.exit_code == 1 and "registration failed" in res.output
        assert peer.offered is not None
        b = peer.offered["token"]
        assert await stored(relay) is None
        # The B the peer was offered must not open a Register – FromIOP later; the pending A still does.
        status, _, _ = await peer.call("GET", r["versions"], b)
        assert status == 401
        status, _, _ = await peer.call("GET", r["versions"], pending_a)
        assert status == 200


# -- 4. Restart ---------------------------------------------------------------------------------------


async def test_restart_keeps_the_registration(make_settings: Callable[..., Settings], peer: OcpiPeer) -> None:
    a = token_a()
    env = {"RELAY_OCPI_TOKEN_A": a, **FAST}
    async with running(make_settings(**env)) as relay:
        await peer.register(routes(relay)["versions"], a)
        await put_location(relay, "v1")
        await peer.wait_for(lambda: peer.location_names() == ["v1"])
    c = peer.relay_token
    assert c is not None
    async with running(make_settings(**env)) as relay:
        r = routes(relay)
        status, body, _ = await peer.call("GET", r["credentials"], c)
        assert status == 200 and body["data"]["token"] == c
        status, _, _ = await peer.call("GET", r["versions"], a)
        assert status == 401  # the configured A stays spent across restarts
        await put_location(relay, "v2")
        await peer.wait_for(lambda: peer.location_names() == ["v1", "v2"])
        assert peer.module_requests()[-1].headers["Authorization"] == token_header(peer.token_b)


# -- 5. Unregister ------------------------------------------------------------------------------------


async def test_unregister_from_iop_queues_then_new_registration_delivers(
    make_settings: Callable[..., Settings], peer: OcpiPeer
) -> None:
    a = token_a()
    settings = make_settings(RELAY_OCPI_TOKEN_A=a, **FAST)
    async with running(settings) as relay:
        assert relay.store is not None
        r = routes(relay)
        await peer.register(r["versions"], a)
        c = peer.relay_token
        assert c is not None
        await put_location(relay, "v1")
        await peer.wait_for(lambda: peer.location_names() == ["v1"])

        status, body, _ = await peer.call("DELETE", r["credentials"], c)
        assert status == 200 and body["status_code"] == 1000
        status, _, _ = await peer.call("GET", r["credentials"], c)
        assert status == 401

        for name in ("v2", "v3", "v4"):
            await put_location(relay, name)
        # The forwarder has read all three and holds them: had it been allowed to send, it would have.
        await until_pending(relay.store, 3)
        await wait_until(lambda: relay.link.state == "paused", what="link paused")
        assert len(peer.module_requests()) == 1
        data = await status_json(settings)
        assert data["connection"]["state"] == "unregistered"
        assert data["modules"]["locations"]["queued"] == 3

        res = await cli(settings, "register", "--from-iop", "--json")
        assert res.exit_code == 0, res.output
        a2 = json.loads(res.stdout)["token_a"]
        b2 = peer.new_token_b()
        await peer.register(r["versions"], a2)
        await peer.wait_for(lambda: peer.location_names() == ["v1", "v2", "v3", "v4"])
        assert [s.headers["Authorization"] for s in peer.module_requests()[1:]] == [token_header(b2)] * 3
        await until_pending(relay.store, 0)


async def test_cli_unregister_tells_the_iop(make_settings: Callable[..., Settings], peer: OcpiPeer) -> None:
    a = token_a()
    settings = make_settings(RELAY_OCPI_TOKEN_A=a, **FAST)
    async with running(settings) as relay:
        assert relay.store is not None
        r = routes(relay)
        await peer.register(r["versions"], a)
        c = peer.relay_token
        assert c is not None
        res = await cli(settings, "unregister", input="n\n")
        assert res.exit_code == 1 and (await stored(relay)).state == "registered"  # type: ignore[union-attr]

        res = await cli(settings, "unregister", "--yes")
        assert res.exit_code == 0, res.output
        [delete] = [s for s in peer.seen if s.method == "DELETE"]
        assert delete.path == "/ocpi/2.2.1/credentials" and delete.authorized
        assert delete.headers["Authorization"] == token_header(peer.token_b)
        assert_no_routing_headers(delete.headers)
        assert (await status_json(settings))["connection"]["state"] == "unregistered"

        async def c_refused() -> bool:
            return (await peer.call("GET", r["credentials"], c))[0] == 401

        await wait_until(c_refused, what="the running relay refuses C")
        await put_location(relay, "v1")
        await until_pending(relay.store, 1)
        await wait_until(lambda: relay.link.state == "paused", what="link paused")
        assert peer.module_requests() == []
        res = await cli(settings, "unregister", "--yes")
        assert res.exit_code == 1 and "not registered" in res.output


# -- 6. Re-registration (C4) --------------------------------------------------------------------------


async def test_reregistration_replaces_tokens_and_endpoints(make_settings: Callable[..., Settings]) -> None:
    a = token_a()
    settings = make_settings(RELAY_OCPI_TOKEN_A=a, **FAST)
    first, second = OcpiPeer(), OcpiPeer()
    await first.start()
    await second.start()
    try:
        with captured_logs() as logs:
            async with running(settings) as relay:
                r = routes(relay)
                await first.register(r["versions"], a)
                c1 = first.relay_token
                assert c1 is not None
                await put_location(relay, "v1")
                await first.wait_for(lambda: first.location_names() == ["v1"])

                # GIREVE has no update: it registers again with a new token A while still registered.
                res = await cli(settings, "register", "--from-iop", "--json")
                a2 = json.loads(res.stdout)["token_a"]
                await second.register(r["versions"], a2)
                c2 = second.relay_token
                assert c2 is not None and c2 != c1
                assert (await peer_status(second, r["credentials"], c1)) == 401
                assert (await peer_status(second, r["credentials"], c2)) == 200
                await put_location(relay, "v2")
                await second.wait_for(lambda: second.location_names() == ["v2"])
                assert second.module_requests()[0].headers["Authorization"] == token_header(second.token_b)
                assert first.location_names() == ["v1"]

                # POST with the registered token: 405, nothing changes.
                before = await stored(relay)
                offer = {"token": "other", "url": second.versions_url, "roles": [hub_role()]}
                status, body, _ = await second.call("POST", r["credentials"], c2, body=offer)
                assert status == 405 and isinstance(body["status_code"], int) and body["timestamp"]
                assert await stored(relay) == before

                # PUT is still served: new token both ways.
                b3 = second.new_token_b()
                offer = {"token": b3, "url": second.versions_url, "roles": [hub_role()]}
                status, body, _ = await second.call("PUT", r["credentials"], c2, body=offer)
                assert status == 200 and body["status_code"] == 1000
                c3 = body["data"]["token"]
                assert c3 not in (c1, c2)
                assert (await peer_status(second, r["credentials"], c2)) == 401
                assert (await peer_status(second, r["credentials"], c3)) == 200
                await put_location(relay, "v3")
                await second.wait_for(lambda: second.location_names() == ["v2", "v3"])
                assert second.module_requests()[-1].headers["Authorization"] == token_header(b3)
        assert_no_secrets(logs, a, a2, c1, c2, c3, first.token_b, b3)
    finally:
        await first.close()
        await second.close()


async def test_stop_outlasts_a_swallowed_cancellation() -> None:
    """redis-py can swallow a CancelledError mid-command; Relay.stop() must still end its loops."""

    async def loop_that_swallows_once() -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()  # stands for a Redis call that eats the cancellation
        await asyncio.Event().wait()  # then goes on as if nothing happened

    task = asyncio.create_task(loop_that_swallows_once())
    await asyncio.sleep(0)
    await asyncio.wait_for(_cancel(task), 2)
    assert task.cancelled()


async def test_reregistration_resumes_a_link_stopped_by_401(
    make_settings: Callable[..., Settings], peer: OcpiPeer
) -> None:
    """The IOP forgets our token (401 on delivery): the link stops, events wait; GIREVE registers again."""
    a = token_a()
    settings = make_settings(RELAY_OCPI_TOKEN_A=a, **FAST)
    async with running(settings) as relay:
        assert relay.store is not None
        r = routes(relay)
        await peer.register(r["versions"], a)
        old_b = peer.token_b
        peer.accepted.discard(old_b)
        await put_location(relay, "v1")
        await wait_until(lambda: relay.link.state == "auth_failed", what="link stopped by the 401")
        await put_location(relay, "v2")
        await until_pending(relay.store, 2)
        refused = [s for s in peer.module_requests() if not s.authorized]
        assert len(refused) == 1 and peer.location_names() == []

        res = await cli(settings, "register", "--from-iop", "--json")
        b2 = peer.new_token_b()
        await peer.register(r["versions"], json.loads(res.stdout)["token_a"])
        await peer.wait_for(lambda: peer.location_names() == ["v1", "v2"])
        accepted = [s for s in peer.module_requests() if s.authorized]
        assert [s.headers["Authorization"] for s in accepted] == [token_header(b2)] * 2


async def test_stop_is_prompt_while_unregistered_with_a_backlog(make_settings: Callable[..., Settings]) -> None:
    relay = Relay(make_settings(**{**FAST, "RELAY_FORWARDER_SHUTDOWN_TIMEOUT_S": "3"}))
    await relay.start()
    try:
        assert relay.store is not None
        await put_location(relay, "v1")
        await until_pending(relay.store, 1)
    finally:
        started = time.monotonic()
        await relay.stop()
    assert time.monotonic() - started < 1.5


async def peer_status(peer: OcpiPeer, url: str, token: str) -> int:
    return (await peer.call("GET", url, token))[0]


# -- 7. The IOP's identity (T3): OCPI-to-* from the handshake --------------------------------------------


async def test_ocpi_to_is_the_hub_role_of_the_handshake(make_settings: Callable[..., Settings],
                                                        peer: OcpiPeer) -> None:  # fmt: skip
    """GIREVE's production presents HUB FR/007 while [iop] says FR/107 (the shipped default): the relay
    addresses FR/007, says that [iop] differs, and still does after a restart (the roles are stored)."""
    a = token_a()
    env = {"RELAY_OCPI_TOKEN_A": a, **FAST}
    settings = make_settings(**env)
    assert (settings.iop.country_code, settings.iop.party_id) == ("FR", "107")
    peer.hub, peer.routing = ("FR", "007"), True  # like a hub: 4001 for any other OCPI-to-*
    with captured_logs() as logs:
        async with running(settings) as relay:
            assert relay.store is not None
            await peer.register(routes(relay)["versions"], a)
            await put_location(relay, "v1")
            await peer.wait_for(lambda: len(peer.module_requests()) == 1)
            await until_pending(relay.store, 0)
            assert (await DeliveryStore(relay.store).dlq_lengths())["locations"] == 0
            conn = (await status_json(settings))["connection"]
            assert (conn["iop_party"], conn["configured_iop_party"]) == ("FR/007", "FR/107")
            res = await cli(settings, "status")
            assert "IOP party:    FR/007 (OCPI-to-*; differs from [iop] FR/107)" in res.stdout, res.stdout
    assert re.search(r"iop_party_differs\s.*configured=FR/107.*handshake=FR/007", logs.getvalue()), logs.getvalue()
    async with running(make_settings(**env)) as relay:
        assert relay.store is not None
        await put_location(relay, "v2")
        await peer.wait_for(lambda: len(peer.module_requests()) == 2)
        await until_pending(relay.store, 0)
    for s in peer.module_requests():
        assert (s.headers["OCPI-to-country-code"], s.headers["OCPI-to-party-id"]) == ("FR", "007"), s.path
    assert peer.location_names() == ["v1", "v2"]


def link_gauge(state: str) -> float | None:
    return REGISTRY.get_sample_value("relay_iop_link_state", {"state": state})


def sent_to(peer: OcpiPeer, party_id: str) -> list[str]:
    """Names of the Locations PUT to the peer with OCPI-to-party-id ``party_id``, in arrival order."""
    return [s.json()["name"] for s in peer.module_requests("locations") if s.headers["OCPI-to-party-id"] == party_id]


async def stop_on_4001(relay: Relay, peer: OcpiPeer, a: str) -> None:
    """Registered as FR/107, then the IOP routes to FR/007 only: three events, one request answered 4001."""
    assert relay.store is not None
    await peer.register(routes(relay)["versions"], a)
    peer.hub, peer.routing = ("FR", "007"), True
    for name in ("v1", "v2", "v3"):
        await put_location(relay, name)
    await wait_until(lambda: relay.link.state == "unknown_receiver", what="link stopped by OCPI 4001")
    assert relay.link.reason == "OCPI 4001 unknown receiver: Unknown receiver FR*107"
    assert link_gauge("unknown_receiver") == 1 and link_gauge("up") == 0
    await until_pending(relay.store, 3)  # held in order, none dead-lettered
    await stays_false(lambda: len(peer.module_requests()) > 1, 0.3)  # no retries burned on a party unknown to the IOP
    assert (await DeliveryStore(relay.store).dlq_lengths())["locations"] == 0


async def test_ocpi_4001_stops_the_link_until_a_new_registration(make_settings: Callable[..., Settings],
                                                                 peer: OcpiPeer) -> None:  # fmt: skip
    a = token_a()
    settings = make_settings(RELAY_OCPI_TOKEN_A=a, **FAST)
    async with running(settings) as relay:
        await stop_on_4001(relay, peer, a)
        res = await cli(settings, "register", "--from-iop", "--json")
        peer.new_token_b()
        await peer.register(routes(relay)["versions"], json.loads(res.stdout)["token_a"])  # now as FR/007
        await peer.wait_for(lambda: sent_to(peer, "007") == ["v1", "v2", "v3"])
        assert sent_to(peer, "107") == ["v1"] and relay.link.state == "up" and link_gauge("unknown_receiver") == 0


async def test_ocpi_4001_stops_the_link_until_relay_link_resume(make_settings: Callable[..., Settings],
                                                                peer: OcpiPeer) -> None:  # fmt: skip
    a = token_a()
    settings = make_settings(RELAY_OCPI_TOKEN_A=a, RELAY_FORWARDER_LEASE_TTL_S="1.5", **FAST)
    async with running(settings) as relay:
        await stop_on_4001(relay, peer, a)
        peer.routing = False  # the IOP fixed its routing: nothing to change on the relay's side
        res = await cli(settings, "link", "resume")
        assert res.exit_code == 0, res.output
        await peer.wait_for(lambda: sent_to(peer, "107") == ["v1", "v1", "v2", "v3"], timeout=5)


# -- 8. 3002 / 3003 in the handshake -----------------------------------------------------------------------

# (id, what the peer does, kind, OCPI code, what the peer may be told)
HANDSHAKE_ERRORS: list[tuple[str, Callable[[OcpiPeer], None], str, int, str]] = [
    ("no 2.2.1", lambda p: setattr(p, "versions", ["2.0", "2.1.1"]), "unsupported_version", 3002,
     "Unsupported version: the relay speaks OCPI 2.2.1 only"),
    ("no sessions receiver", lambda p: p.missing.add("sessions"), "no_matching_endpoints", 3003,
     "No matching endpoints: the relay needs sessions RECEIVER"),
    ("no cdrs nor tariffs receiver", lambda p: p.missing.update({"cdrs", "tariffs"}), "no_matching_endpoints", 3003,
     "No matching endpoints: the relay needs cdrs RECEIVER, tariffs RECEIVER"),
    ("its API unusable", lambda p: p.accepted.clear(), "unusable", 3001, "Unable to use the client's API"),
]  # fmt: skip


@pytest.mark.parametrize(("change", "kind", "code", "public"), [e[1:] for e in HANDSHAKE_ERRORS],
                         ids=[e[0] for e in HANDSHAKE_ERRORS])  # fmt: skip
async def test_from_iop_handshake_errors_carry_their_ocpi_code(
    make_settings: Callable[..., Settings], peer: OcpiPeer, change: Callable[[OcpiPeer], None], kind: str,
    code: int, public: str,
) -> None:  # fmt: skip
    change(peer)
    offered = msgspec.convert(peer.offer(peer.token_b), Credentials)
    with pytest.raises(HandshakeError) as info:
        await accept_from_iop(make_settings(**FAST), offered)
    assert (info.value.kind, info.value.ocpi_code, info.value.public) == (kind, code, public)
    assert f"OCPI {code}" in str(info.value) or code == 3001


@pytest.mark.parametrize(("change", "code"), [(HANDSHAKE_ERRORS[0][1], 3002), (HANDSHAKE_ERRORS[1][1], 3003)],
                         ids=["3002", "3003"])  # fmt: skip
async def test_from_iop_post_is_answered_3002_or_3003(
    make_settings: Callable[..., Settings], peer: OcpiPeer, change: Callable[[OcpiPeer], None], code: int
) -> None:
    a = token_a()
    async with running(make_settings(RELAY_OCPI_TOKEN_A=a, **FAST)) as relay:
        change(peer)
        status, body, _ = await peer.call("POST", routes(relay)["credentials"], a, body=peer.offer(peer.token_b))
        assert body["status_code"] == code, (status, body)
        assert await stored(relay) is None


@pytest.mark.parametrize(
    ("change", "said"),
    [(HANDSHAKE_ERRORS[0][1], "(unsupported version, OCPI 3002)"),
     (HANDSHAKE_ERRORS[1][1], "(no matching endpoints, OCPI 3003)")],
    ids=["3002", "3003"],
)  # fmt: skip
async def test_to_iop_does_not_post_without_a_version_or_endpoints(
    make_settings: Callable[..., Settings], peer: OcpiPeer, change: Callable[[OcpiPeer], None], said: str
) -> None:
    """credentials.asciidoc: a Sender that cannot find the endpoints it expects does not POST its credentials."""
    settings = make_settings(**FAST)
    change(peer)
    res = await cli(settings, "register", "--versions-url", peer.versions_url, "--token-a", peer.token_a)
    assert res.exit_code == 1, res.output
    assert f"registration failed {said}" in res.stderr, res.stderr
    assert [s.method for s in peer.seen if s.method == "POST"] == [] and peer.offered is None


@pytest.mark.parametrize(("code", "said"), [(3002, "unsupported version"), (3003, "no matching endpoints"),
                                            (3001, "unusable")])  # fmt: skip
async def test_to_iop_reports_the_hubs_refusal(make_settings: Callable[..., Settings], peer: OcpiPeer, code: int,
                                               said: str) -> None:  # fmt: skip
    peer.refuse_post, peer.refuse_code = True, code
    res = await cli(make_settings(**FAST), "register", "--versions-url", peer.versions_url, "--token-a", peer.token_a)
    assert res.exit_code == 1, res.output
    assert f"registration failed ({said}, OCPI {code})" in res.stderr, res.stderr
    assert f"the peer refused the registration: HTTP 400, OCPI {code} cannot use your API" in res.stderr
