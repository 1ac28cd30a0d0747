"""GIREVE checklist, transport and security (T1–T6), at the wire.

Each test runs a relay registered by GIREVE (``tests.gireve_support``: an IOP-like peer that registers the
relay From IOP and records, on a FakeIop, everything the relay sends) and checks the rule on what GIREVE
received or on what the relay answered GIREVE. docs/gireve.md says how the relay meets each line.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme

from relay.config import Settings
from tests.conftest import AUTH
from tests.csms_fake import iop_token
from tests.fake_iop import Received, Reply
from tests.gireve_support import (
    AB1,
    AB2,
    EMSP,
    IOP,
    IOP_BASE,
    OCPI_TIME,
    REFS,
    TOKENS_SENDER,
    UNHOSTED,
    Gireve,
    at_iop,
    authorizing,
    cdr,
    gireve,
    has_routing,
    location,
    routing,
    routing_of,
    session,
    start_session,
    tariff,
    versions_url,
)
from tests.ocpi_peer import OcpiPeer, cli, hub_ssl, put_location, routes, running, token_header


async def every_kind_of_request(g: Gireve) -> None:
    """The CSMS makes the relay send GIREVE one request of each kind: pushes of every module, a
    real-time authorisation, a CommandResult; returns once GIREVE took them all."""
    g.iop.script = authorizing()
    await g.put_location()
    await g.send("PUT", "/sessions/FR/AB1/S1", session())
    await g.send("POST", "/cdrs", cdr())
    await g.send("PUT", "/tariffs/FR/AB1/T1", tariff())
    await g.send("DELETE", "/tariffs/FR/AB1/T1")
    answer = await g.send("POST", "/tokens/0a1b2c3d/authorize?type=RFID", REFS, expect=200)
    assert answer["data"]["decided_by"] == "iop", answer
    response_url = g.response_url("START_SESSION")
    status, answer, _ = await g.as_gireve("POST", "/commands/START_SESSION", start_session(response_url), frm=EMSP)
    assert status == 200 and answer["data"]["result"] == "ACCEPTED", answer
    await g.send("POST", f"/commands/{g.csms.of_kind('command')[-1].body['command_id']}/result", {"result": "ACCEPTED"})
    # location, session, CDR, tariff PUT and DELETE, the authorisation, the CommandResult
    await g.iop.wait_for(lambda: len(g.iop.delivered()) == 7)


def kind(r: Received) -> str:
    """What a request GIREVE received is: a push of a module, a real-time authorisation, a CommandResult."""
    if r.path.startswith(TOKENS_SENDER + "/"):
        return "authorize"
    if r.path.startswith(IOP_BASE + "/"):
        return r.path.removeprefix(IOP_BASE + "/").split("/")[0]
    return "command result"


# -- T1 -------------------------------------------------------------------------------------------------


async def test_T1_every_request_to_the_iop_carries_its_token_base64_encoded(
    make_settings: Callable[..., Settings],
) -> None:
    async with gireve(make_settings) as g:
        await every_kind_of_request(g)
        kinds = {kind(r) for r in g.iop.received}
        assert kinds == {"locations", "sessions", "cdrs", "tariffs", "authorize", "command result"}, kinds
        for r in g.iop.received:
            assert r.headers["Authorization"] == token_header(g.peer.token_b), (r.method, r.path)
            assert r.headers["Authorization"] != f"Token {g.peer.token_b}"


# -- T2 -------------------------------------------------------------------------------------------------


async def test_T2_a_fresh_request_id_on_every_attempt_and_one_correlation_id_per_event(
    make_settings: Callable[..., Settings],
) -> None:
    async with gireve(make_settings) as g:
        refusals = {"LOC1": 2, "LOC2": 1}

        def script(r: Received) -> Reply | None:
            loc = r.path.rsplit("/", 1)[1]
            if refusals.get(loc):
                refusals[loc] -= 1
                return Reply(status=503, ocpi=None)
            return None

        g.iop.script = script
        await g.send("PUT", "/locations/FR/AB1/LOC1", location("LOC1"), headers={"X-Correlation-ID": "csms-corr-7"})
        await g.send("PUT", "/locations/FR/AB1/LOC2", location("LOC2"))
        await g.iop.wait_for(lambda: all(len(g.pushed("locations", *AB1, loc)) == 1 for loc in ("LOC1", "LOC2")))
        first, second = g.tried("locations", *AB1, "LOC1"), g.tried("locations", *AB1, "LOC2")
        assert (len(first), len(second)) == (3, 2)
        # Every request, the handshake's too (versions and details of GIREVE), with its own X-Request-ID.
        handshake = [s.headers for s in g.peer.seen]
        assert len(handshake) == 2 and all(h.get("X-Correlation-ID") for h in handshake)
        request_ids = [r.headers["X-Request-ID"] for r in g.iop.received] + [h["X-Request-ID"] for h in handshake]
        assert all(request_ids) and len(set(request_ids)) == len(request_ids)  # new on every attempt
        assert {r.headers["X-Correlation-ID"] for r in first} == {"csms-corr-7"}  # the CSMS's, on each attempt
        [own] = {r.headers["X-Correlation-ID"] for r in second}  # one of the relay's, the same on each attempt
        assert own and own != "csms-corr-7"


# -- T3 -------------------------------------------------------------------------------------------------


async def test_T3_ocpi_from_is_the_objects_operator_and_ocpi_to_the_iop(make_settings: Callable[..., Settings]) -> None:
    async with gireve(make_settings) as g:
        await g.send("PUT", "/locations/FR/AB1/LOC1", location("LOC1"))
        await g.send("PUT", "/locations/FR/AB2/LOC9", location("LOC9", party="AB2"))
        await g.send("PUT", "/sessions/FR/AB2/S2", session("S2", party="AB2"))
        await g.send("POST", "/cdrs", cdr("CDR2", "S2", party="AB2"))
        await g.iop.wait_for(lambda: len(g.iop.delivered()) == 4)
        owners = [(r.path.removeprefix("/iop/ocpi/2.2.1/"), routing_of(r.headers)) for r in g.iop.received]
        assert sorted(owners) == [
            ("cdrs", (AB2, IOP)),
            ("locations/FR/AB1/LOC1", (AB1, IOP)),
            ("locations/FR/AB2/LOC9", (AB2, IOP)),
            ("sessions/FR/AB2/S2", (AB2, IOP)),
        ]


async def test_T3_ocpi_to_is_the_hub_that_the_handshake_names(make_settings: Callable[..., Settings]) -> None:
    """Production GIREVE presents FR/007 in the handshake; [iop] is left at its pre-production FR/107."""
    async with gireve(make_settings, hub=("FR", "007")) as g:
        assert (g.relay.settings.iop.country_code, g.relay.settings.iop.party_id) == IOP
        await every_kind_of_request(g)
        for r in g.iop.received:
            assert routing_of(r.headers)[1] == ("FR", "007"), (r.method, r.path, r.headers)


async def test_T3_no_routing_headers_on_versions_and_credentials_calls(make_settings: Callable[..., Settings]) -> None:
    async with gireve(make_settings) as g:
        # Register – FromIOP: the relay fetched GIREVE's versions and details.
        fetched = [(s.method, s.path) for s in g.peer.seen]
        assert fetched == [("GET", "/ocpi/versions"), ("GET", "/ocpi/2.2.1")]
        res = await cli(g.relay.settings, "unregister", "--yes")  # tells GIREVE: DELETE credentials
        assert res.exit_code == 0, res.output
        assert [(s.method, s.path) for s in g.peer.seen][2:] == [("DELETE", "/ocpi/2.2.1/credentials")]
        for s in g.peer.seen:
            assert s.authorized and not has_routing(s.headers), (s.method, s.path, s.headers)


# -- T4 -------------------------------------------------------------------------------------------------


async def test_T4_the_ocpi_listener_is_apart_from_the_ingress_and_takes_only_the_iops_token(
    make_settings: Callable[..., Settings],
) -> None:
    async with gireve(make_settings) as g:
        assert g.relay.ocpi_port != g.relay.ingress_port
        listener = f"{g.ocpi_base}/locations"
        ingress = f"{g.ingress_base}/locations/FR/AB1/LOC1"
        iop_auth = {"Authorization": token_header(g.relay_token), **routing(IOP, AB1)}
        for url, headers, expected in [
            (listener, iop_auth, 200),
            (listener, {}, 401),
            (listener, AUTH, 401),  # the CSMS's bearer token opens nothing on the listener
            (listener, {"Authorization": f"Token {g.relay_token}x"}, 401),
            (ingress, iop_auth, 401),  # and GIREVE's token nothing on the ingress
        ]:
            method = "GET" if url == listener else "PUT"
            body = None if method == "GET" else location("LOC1")
            async with g.http.request(method, url, json=body, headers=headers) as r:
                assert r.status == expected, (method, url, headers, await r.text())


def _pem(leaf: trustme.LeafCert, d: Path, name: str) -> tuple[str, str]:
    cert, key = d / f"{name}.pem", d / f"{name}.key"
    for pem in leaf.cert_chain_pems:
        pem.write_to_path(str(cert), append=True)
    leaf.private_key_pem.write_to_path(str(key))
    return str(cert), str(key)


async def test_T4_https_with_client_certificates_both_ways(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    # GIREVE's side trusts `ca` (its server and the relay's client certificate); the relay's listener
    # trusts client certificates of `relay_clients_ca` only.
    ca, relay_clients_ca = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    relay_clients_ca.cert_pem.write_to_path(str(tmp_path / "clients-ca.pem"))
    listener_cert, listener_key = _pem(ca.issue_cert("127.0.0.1"), tmp_path, "listener")
    relay_cert, relay_key = _pem(ca.issue_cert("relay.cpo.example"), tmp_path, "relay-client")
    gireve_client = relay_clients_ca.issue_cert("iop.gireve.example")
    to_relay = ssl.create_default_context()
    ca.configure_trust(to_relay)
    gireve_client.configure_cert(to_relay)
    peer = OcpiPeer(hub_ssl(ca, require_client_cert=True), client_ssl=to_relay)
    await peer.start()
    a = "token-a-t4"
    settings = make_settings(
        RELAY_OCPI_TOKEN_A=a, RELAY_OCPI_TLS_CERT_FILE=listener_cert, RELAY_OCPI_TLS_KEY_FILE=listener_key,
        RELAY_OCPI_TLS_CLIENT_CA_FILE=str(tmp_path / "clients-ca.pem"), RELAY_IOP_TLS_CA_FILE=str(tmp_path / "ca.pem"),
        RELAY_IOP_TLS_CERT_FILE=relay_cert, RELAY_IOP_TLS_KEY_FILE=relay_key,
        RELAY_FORWARDER_BACKOFF_INITIAL_S="0.01", RELAY_FORWARDER_BACKOFF_MAX_S="0.05",
    )  # fmt: skip
    try:
        async with running(settings) as relay:
            url = routes(relay)["versions"]
            assert url.startswith("https://")
            no_cert = ssl.create_default_context()
            ca.configure_trust(no_cert)
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=no_cert)) as http:
                with pytest.raises(aiohttp.ClientError):  # refused in the TLS handshake, before any HTTP
                    await http.get(url, headers={"Authorization": token_header(a)})
            await peer.register(url, a)  # GIREVE → relay over mTLS; relay → GIREVE (versions, details) over mTLS
            await relay._apply_registration()
            await put_location(relay, "v1")
            await peer.wait_for(lambda: peer.location_names() == ["v1"])  # a push over mTLS
            assert peer.versions_url.startswith("https://")
    finally:
        await peer.close()


async def test_T4_handshake_urls_must_be_https(make_settings: Callable[..., Settings]) -> None:
    peer = OcpiPeer()  # http://127.0.0.1
    await peer.start()
    a = "token-a-t4-http"
    try:
        async with running(make_settings(RELAY_OCPI_TOKEN_A=a, RELAY_OCPI_ALLOW_INSECURE_URLS="false")) as relay:
            offer = {"token": peer.token_b, "url": peer.versions_url, "roles": []}
            status, answer, _ = await peer.call("POST", routes(relay)["credentials"], a, body=offer)
            assert answer["status_code"] == 3001, (status, answer)
            assert peer.seen == []  # the relay never called the http URL it was given
    finally:
        await peer.close()


async def test_T4_register_from_iop_refuses_to_hand_out_an_http_versions_url(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(RELAY_OCPI_PUBLIC_URL="http://ocpi.cpo.example/ocpi")
    res = await cli(settings, "register", "--from-iop", RELAY_OCPI_ALLOW_INSECURE_URLS="false")
    assert res.exit_code != 0 and "token A" not in res.output, res.output
    assert "versions URL: http://" not in res.output
    res = await cli(settings, "register", "--from-iop", RELAY_OCPI_PUBLIC_URL="https://ocpi.cpo.example/ocpi",
                    RELAY_OCPI_ALLOW_INSECURE_URLS="false")  # fmt: skip
    assert res.exit_code == 0 and "versions URL: https://ocpi.cpo.example/ocpi/versions" in res.output, res.output
    res = await cli(settings, "register", "--from-iop")  # http, allowed (RELAY_OCPI_ALLOW_INSECURE_URLS=true)
    assert res.exit_code == 0 and "versions URL: http://ocpi.cpo.example/ocpi/versions" in res.output, res.output


# -- T5 -------------------------------------------------------------------------------------------------


def _ids(n: int) -> dict[str, str]:
    return {"X-Request-ID": f"gireve-req-{n}", "X-Correlation-ID": f"gireve-corr-{n}"}


async def test_T5_every_answer_echoes_gireves_ids_in_the_ocpi_envelope(make_settings: Callable[..., Settings]) -> None:
    async with gireve(make_settings) as g:
        await g.put_location()
        base, token_path = g.ocpi_base, "/tokens/NL/TNM/0102ABCD?type=RFID"
        start = start_session(g.response_url("START_SESSION"))
        calls: list[tuple[str, str, Any, dict[str, str]]] = [
            ("GET", versions_url(g.relay), None, {}),
            ("GET", base, None, {}),
            ("GET", f"{base}/credentials", None, {}),
            ("GET", f"{base}/locations?limit=1", None, routing(IOP, AB1)),
            ("GET", f"{base}/locations/LOC1/3256", None, routing(IOP, AB1)),
            ("GET", f"{base}/locations/NOWHERE", None, routing(IOP, AB1)),
            ("PUT", base + token_path, iop_token("0102ABCD"), routing(EMSP, AB1)),
            ("GET", base + token_path, None, routing(EMSP, AB1)),
            ("POST", f"{base}/commands/START_SESSION", start, routing(EMSP, AB1)),
            ("GET", f"{base}/no/such/route", None, routing(IOP, AB1)),
        ]
        for n, (method, url, body, headers) in enumerate(calls):
            ids = _ids(n)
            status, answer, got = await g.peer.call(method, url, g.relay_token, body=body, headers={**headers, **ids})
            what = (method, url, status, answer)
            assert (got["X-Request-ID"], got["X-Correlation-ID"]) == (ids["X-Request-ID"], ids["X-Correlation-ID"])
            assert isinstance(answer["status_code"], int) and OCPI_TIME.match(answer["timestamp"]), what
            assert set(answer) <= {"data", "status_code", "status_message", "timestamp"}, what
            if method == "GET" and answer["status_code"] == 1000:
                assert "data" in answer, what
        # Refused for its token: answered in the envelope as well, the ids echoed.
        status, answer, got = await g.peer.call("GET", f"{base}/locations", "wrong", headers=_ids(99))
        assert (status, answer["status_code"], got["X-Request-ID"], got["X-Correlation-ID"]) == (
            401, 2000, "gireve-req-99", "gireve-corr-99")  # fmt: skip


async def test_T5_answers_to_module_requests_carry_routing_headers_back_to_the_requester(
    make_settings: Callable[..., Settings],
) -> None:
    async with gireve(make_settings) as g:
        await g.put_location()
        base = g.ocpi_base
        start = start_session(g.response_url("START_SESSION"))
        for method, url, body, frm in [
            ("GET", f"{base}/locations", None, IOP),
            ("GET", f"{base}/locations/LOC1", None, IOP),
            ("PUT", f"{base}/tokens/NL/TNM/0102ABCD?type=RFID", iop_token("0102ABCD"), EMSP),
            ("POST", f"{base}/commands/START_SESSION", start, EMSP),
        ]:
            _, answer, got = await g.peer.call(method, url, g.relay_token, body=body, headers=routing(frm, AB1))
            # FROM: the operator answering (the request's OCPI-to); TO: the requesting party (its OCPI-from).
            assert routing_of(got) == (AB1, frm), (method, url, answer, got)
        for url in (versions_url(g.relay), base, f"{base}/credentials"):
            _, _, got = await g.peer.call("GET", url, g.relay_token, headers=routing(IOP, AB1))
            assert not has_routing(got), (url, got)


async def test_T5_ocpi_errors_are_http_200_with_a_2xxx_status_code(make_settings: Callable[..., Settings]) -> None:
    async with gireve(make_settings) as g:
        await g.put_location()
        start = {"token": iop_token("0102ABCD", "ALLOWED"), "location_id": "LOC1"}  # no response_url
        wrong_uid = iop_token("FFFFFFFF")
        for method, path, body, frm in [
            ("POST", "/commands/START_SESSION", start, EMSP),
            ("PUT", "/tokens/NL/TNM/0102ABCD?type=RFID", wrong_uid, EMSP),  # ids differ from the URL
            ("PATCH", "/tokens/NL/TNM/01020304?type=RFID", {"valid": False, "last_updated": "2026-01-01T00:00:00Z"},
             EMSP),  # never PUT
            ("GET", "/locations?offset=minus-one", None, IOP),
        ]:  # fmt: skip
            status, answer, _ = await g.as_gireve(method, path, body, frm=frm)
            assert status == 200 and 2000 <= answer["status_code"] < 3000, (method, path, status, answer)
        status, answer, _ = await g.as_gireve("GET", "/locations/NOWHERE")
        assert status in (200, 404) and 2000 <= answer["status_code"] < 3000, answer  # an unknown object may be 404


# -- T6 -------------------------------------------------------------------------------------------------


async def test_T6_several_operators_share_one_connection_and_unhosted_ones_are_refused_at_the_ingress(
    make_settings: Callable[..., Settings],
) -> None:
    async with gireve(make_settings) as g:
        assert [(o.country_code, o.party_id) for o in g.relay.settings.operators] == [AB1, AB2]
        await g.send("PUT", "/locations/FR/AB1/LOC1", location("LOC1"))
        await g.send("PUT", "/locations/FR/AB2/LOC2", location("LOC2", party="AB2"))
        for method, path, body in [
            ("PUT", f"/locations/FR/{UNHOSTED}/LOC3", location("LOC3", party=UNHOSTED)),
            ("PUT", f"/sessions/FR/{UNHOSTED}/S3", session("S3", party=UNHOSTED)),
            ("POST", "/cdrs", cdr("CDR3", "S3", party=UNHOSTED)),
            ("PUT", f"/tariffs/FR/{UNHOSTED}/T3", dict(tariff("T3"), party_id=UNHOSTED)),
        ]:
            answer = await g.send(method, path, body, expect=404)
            assert UNHOSTED in json.dumps(answer), answer
        await g.iop.wait_for(lambda: len(g.iop.delivered()) == 2)
        assert sorted(r.path for r in g.iop.received) == [at_iop("locations", *AB1, "LOC1"),
                                                          at_iop("locations", *AB2, "LOC2")]  # fmt: skip
        # One connection: both operators' pushes carry the one token of the one registration.
        assert {r.headers["Authorization"] for r in g.iop.received} == {token_header(g.peer.token_b)}
        assert await g.drained()


async def test_T6_gireve_addressing_an_unhosted_operator_gets_an_ocpi_2xxx_not_4001(
    make_settings: Callable[..., Settings],
) -> None:
    async with gireve(make_settings) as g:
        await g.put_location()
        nobody = ("FR", UNHOSTED)
        start = start_session(g.response_url("START_SESSION"))
        for method, path, body in [("GET", "/locations", None), ("GET", "/sessions", None),
                                   ("POST", "/commands/START_SESSION", start)]:  # fmt: skip
            status, answer, _ = await g.as_gireve(method, path, body, to=nobody)
            assert status == 200 and 2000 <= answer["status_code"] < 3000, (method, path, status, answer)
        status, answer, _ = await g.as_gireve("GET", "/locations/LOC1", to=nobody)
        assert status in (200, 404) and 2000 <= answer["status_code"] < 3000, answer
        assert g.csms.of_kind("command") == []  # nothing handed to the CSMS for an operator it does not run
