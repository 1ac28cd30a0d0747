"""GIREVE checklist, credentials (C1–C4), at the wire: GIREVE's Register and Unregister – FromIOP, the
Register – ToIOP of other hubs, and re-registration instead of a credentials update.

GIREVE is an IOP-like peer (``tests.gireve_support.HubPeer``) that records what the relay asks of it, and
a FakeIop behind its version details that records the pushes. docs/gireve.md says how the relay meets
each line; ``tests/test_credentials.py`` covers the same ground in more depth (failed handshakes, logs).
"""

from __future__ import annotations

import json
from collections.abc import Callable

from relay.config import Settings
from tests.fake_iop import Received
from tests.gireve_support import (
    AB1,
    IOP,
    OPERATORS,
    at_iop,
    gireve,
    has_routing,
    hub_peer,
    location,
    new_token_a,
    versions_url,
)
from tests.ocpi_peer import cli, put_location, routes, running, token_header, until_pending
from tests.waiting import wait_until

FAST = {
    "RELAY_OPERATORS_JSON": json.dumps(OPERATORS),
    "RELAY_FORWARDER_BACKOFF_INITIAL_S": "0.01",
    "RELAY_FORWARDER_BACKOFF_MAX_S": "0.05",
    "RELAY_FORWARDER_SHUTDOWN_TIMEOUT_S": "0.5",
}
LOC1 = at_iop("locations", *AB1, "LOC1")


def names(received: list[Received]) -> list[str]:
    """Names of FR/AB1's LOC1 as GIREVE took them, in order."""
    return [r.json()["name"] for r in received if r.path == LOC1 and r.ok]


# -- C1 -------------------------------------------------------------------------------------------------


async def test_C1_register_from_iop_then_only_the_new_token_opens_the_listener(
    make_settings: Callable[..., Settings],
) -> None:
    a = new_token_a()
    async with hub_peer() as peer, running(make_settings(RELAY_OCPI_TOKEN_A=a, **FAST)) as relay:
        r = routes(relay)
        # Token A opens the registration, nothing else.
        status, _, _ = await peer.call("GET", f"{r['details']}/locations", a)
        assert status == 401
        answer = await peer.register(r["versions"], a)

        # Before answering, the relay fetched GIREVE's versions and details with the token GIREVE offered (B).
        assert [(s.method, s.path, s.token) for s in peer.seen] == [
            ("GET", "/ocpi/versions", peer.token_b),
            ("GET", "/ocpi/2.2.1", peer.token_b),
        ]
        # Its answer: a fresh token C, its versions URL, a CPO role per hosted operator.
        c = answer["data"]["token"]
        assert c not in (a, peer.token_b) and len(c) >= 32
        assert answer["data"]["url"] == r["versions"]
        assert sorted((x["role"], x["country_code"], x["party_id"]) for x in answer["data"]["roles"]) == [
            ("CPO", "FR", "AB1"), ("CPO", "FR", "AB2")
        ]  # fmt: skip
        # From now on only C: A is spent on every route, C opens the modules.
        for url in (r["versions"], r["details"], r["credentials"]):
            assert (await peer.call("GET", url, a))[0] == 401
            assert (await peer.call("GET", url, c))[0] == 200
        status, answer, _ = await peer.call("GET", f"{r['details']}/locations", c)
        assert (status, answer["status_code"]) == (200, 1000)
        # And the relay uses GIREVE's endpoints and token B.
        await relay._apply_registration()
        await put_location(relay, "v1")
        await peer.iop.wait_for(lambda: names(peer.iop.received) == ["v1"])
        assert peer.iop.received[0].headers["Authorization"] == token_header(peer.token_b)


async def test_C1_tokens_and_endpoints_survive_a_restart(make_settings: Callable[..., Settings]) -> None:
    a = new_token_a()
    settings = make_settings(RELAY_OCPI_TOKEN_A=a, **FAST)
    async with hub_peer() as peer:
        async with running(settings) as relay:
            await peer.register(versions_url(relay), a)
        c = peer.relay_token
        assert c is not None
        async with running(make_settings(RELAY_OCPI_TOKEN_A=a, **FAST)) as relay:
            r = routes(relay)
            assert (await peer.call("GET", r["credentials"], c))[0] == 200
            assert (await peer.call("GET", r["versions"], a))[0] == 401  # a token A stays spent
            await put_location(relay, "after-restart")
            await peer.iop.wait_for(lambda: names(peer.iop.received) == ["after-restart"])
            assert peer.iop.received[0].headers["Authorization"] == token_header(peer.token_b)


# -- C2 -------------------------------------------------------------------------------------------------


async def test_C2_unregister_from_iop_stops_forwarding_keeps_queueing_and_resumes_on_a_new_registration(
    make_settings: Callable[..., Settings],
) -> None:
    async with gireve(make_settings) as g:
        assert g.relay.store is not None
        await g.send("PUT", "/locations/FR/AB1/LOC1", location(name="v1"))
        await g.iop.wait_for(lambda: names(g.iop.received) == ["v1"])
        old_c = g.relay_token

        status, answer, headers = await g.ocpi("DELETE", "/credentials")  # GIREVE's Unregister – FromIOP
        assert (status, answer["status_code"]) == (200, 1000)
        assert not has_routing(headers)
        assert (await g.ocpi("GET", "/credentials"))[0] == 401

        for name in ("v2", "v3"):  # the ingress keeps accepting; nothing goes out
            await g.send("PUT", "/locations/FR/AB1/LOC1", location(name=name))
        await until_pending(g.relay.store, 2)
        await wait_until(lambda: g.relay.link.state == "paused", what="delivery paused")
        assert len(g.iop.received) == 1

        res = await cli(g.relay.settings, "register", "--from-iop", "--json")
        assert res.exit_code == 0, res.output
        new_b = g.peer.new_token_b()
        await g.peer.register(versions_url(g.relay), json.loads(res.stdout)["token_a"])
        assert g.relay_token != old_c
        await g.iop.wait_for(lambda: names(g.iop.received) == ["v1", "v2", "v3"])
        assert [r.headers["Authorization"] for r in g.iop.received[1:]] == [token_header(new_b)] * 2


# -- C3 -------------------------------------------------------------------------------------------------


async def test_C3_register_to_iop_for_hubs_that_expect_the_cpo_to_start(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(**FAST)
    async with hub_peer() as peer, running(settings) as relay:
        res = await cli(settings, "register", "--versions-url", peer.versions_url, "--token-a", peer.token_a)
        assert res.exit_code == 0, res.output
        # The relay discovered the hub with its token A, then POSTed its credentials; no routing headers.
        assert [(s.method, s.path, s.token) for s in peer.seen[:3]] == [
            ("GET", "/ocpi/versions", peer.token_a),
            ("GET", "/ocpi/2.2.1", peer.token_a),
            ("POST", "/ocpi/2.2.1/credentials", peer.token_a),
        ]
        assert not any(has_routing(s.headers) for s in peer.seen)
        offered = peer.offered
        assert offered is not None and offered["url"] == routes(relay)["versions"]
        # The hub called the relay back with the offered token while its POST was open: it worked.
        assert peer.callback is not None and peer.callback[0] == 200
        # From now on: the hub's token towards the hub, the offered one accepted by the listener.
        assert (await peer.call("GET", routes(relay)["credentials"], offered["token"]))[0] == 200
        await wait_until(lambda: relay.link.state == "up", what="the relay follows the new registration")
        await put_location(relay, "v1")
        await peer.iop.wait_for(lambda: names(peer.iop.received) == ["v1"])
        pushed = peer.iop.received[0]
        assert pushed.headers["Authorization"] == token_header(peer.token_c)
        assert (pushed.headers["OCPI-to-country-code"], pushed.headers["OCPI-to-party-id"]) == IOP


# -- C4 -------------------------------------------------------------------------------------------------


async def test_C4_gireve_registers_again_instead_of_updating_and_everything_is_replaced(
    make_settings: Callable[..., Settings],
) -> None:
    async with gireve(make_settings) as g, hub_peer() as second:
        await g.send("PUT", "/locations/FR/AB1/LOC1", location(name="v1"))
        await g.iop.wait_for(lambda: names(g.iop.received) == ["v1"])
        first_c = g.relay_token

        # GIREVE has no credentials update: a new Register – FromIOP, still registered, from new endpoints.
        res = await cli(g.relay.settings, "register", "--from-iop", "--json")
        assert res.exit_code == 0, res.output
        await second.register(versions_url(g.relay), json.loads(res.stdout)["token_a"])
        second_c = second.relay_token
        assert second_c is not None and second_c != first_c
        assert (await second.call("GET", routes(g.relay)["credentials"], first_c))[0] == 401
        assert (await second.call("GET", routes(g.relay)["credentials"], second_c))[0] == 200

        await g.send("PUT", "/locations/FR/AB1/LOC1", location(name="v2"))
        await second.iop.wait_for(lambda: names(second.iop.received) == ["v2"])
        assert second.iop.received[0].headers["Authorization"] == token_header(second.token_b)
        assert names(g.iop.received) == ["v1"]  # nothing more to the old endpoints
        # The relay never tried a credentials update (PUT) on GIREVE.
        assert not [s for s in g.peer.seen + second.seen if s.method == "PUT"]
