"""TLS and mTLS (T4) with trustme certificates: on the OCPI listener, and towards the IOP."""

from __future__ import annotations

import secrets
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import trustme
from prometheus_client import REGISTRY

from relay.config import Settings
from tests.ocpi_peer import (
    OcpiPeer,
    captured_logs,
    hub_role,
    hub_ssl,
    put_location,
    routes,
    running,
    token_header,
)
from tests.waiting import wait_until

FAST = {
    "RELAY_FORWARDER_BACKOFF_INITIAL_S": "0.01",
    "RELAY_FORWARDER_BACKOFF_MAX_S": "0.05",
    "RELAY_FORWARDER_PROBE_MAX_S": "0.1",
    "RELAY_FORWARDER_SHUTDOWN_TIMEOUT_S": "0.5",
}


@dataclass
class Pki:
    ca: trustme.CA
    ca_file: str
    server_cert: str  # for 127.0.0.1, chain included
    server_key: str
    client_ca: trustme.CA  # a second CA, for client certificates
    client_ca_file: str
    client: trustme.LeafCert
    client_cert: str
    client_key: str


def _write(leaf: trustme.LeafCert, cert: Path, key: Path) -> tuple[str, str]:
    for pem in leaf.cert_chain_pems:
        pem.write_to_path(str(cert), append=True)
    leaf.private_key_pem.write_to_path(str(key))
    return str(cert), str(key)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca, client_ca = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    client_ca.cert_pem.write_to_path(str(d / "client-ca.pem"))
    server_cert, server_key = _write(ca.issue_cert("127.0.0.1"), d / "server.pem", d / "server.key")
    client = client_ca.issue_cert("relay-client.example")
    client_cert, client_key = _write(client, d / "client.pem", d / "client.key")
    return Pki(ca, str(d / "ca.pem"), server_cert, server_key, client_ca, str(d / "client-ca.pem"), client,
               client_cert, client_key)  # fmt: skip


def trusting(ca: trustme.CA, cert: trustme.LeafCert | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    if cert is not None:
        cert.configure_cert(ctx)
    return ctx


async def get(url: str, token: str, ctx: ssl.SSLContext | bool) -> int:
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as http,
        http.get(url, headers={"Authorization": token_header(token)}) as resp,
    ):
        await resp.read()
        return resp.status


# -- the OCPI listener --------------------------------------------------------------------------------


async def test_listener_serves_https(make_settings: Callable[..., Settings], pki: Pki) -> None:
    a = "token-a-" + secrets.token_hex(8)
    settings = make_settings(RELAY_OCPI_TOKEN_A=a, RELAY_OCPI_TLS_CERT_FILE=pki.server_cert,
                             RELAY_OCPI_TLS_KEY_FILE=pki.server_key, **FAST)  # fmt: skip
    peer = OcpiPeer(client_ssl=trusting(pki.ca))
    await peer.start()
    try:
        async with running(settings) as relay:
            r = routes(relay)
            assert r["versions"].startswith(f"https://127.0.0.1:{relay.ocpi_port}/")
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await get(r["versions"], a, True)  # the system trust store does not know the test CA
            with pytest.raises(aiohttp.ClientError):
                await get(r["versions"].replace("https://", "http://"), a, True)
            # The whole Register – FromIOP over https; the relay announces https URLs.
            answer = await peer.register(r["versions"], a)
            assert answer["data"]["url"] == r["versions"]
            await put_location(relay, "v1")
            await peer.wait_for(lambda: peer.location_names() == ["v1"])
    finally:
        await peer.close()


async def test_listener_mtls_requires_a_client_certificate(make_settings: Callable[..., Settings], pki: Pki) -> None:
    a = "token-a-" + secrets.token_hex(8)
    settings = make_settings(RELAY_OCPI_TOKEN_A=a, RELAY_OCPI_TLS_CERT_FILE=pki.server_cert,
                             RELAY_OCPI_TLS_KEY_FILE=pki.server_key, RELAY_OCPI_TLS_CLIENT_CA_FILE=pki.client_ca_file,
                             **FAST)  # fmt: skip
    async with running(settings) as relay:
        url = routes(relay)["versions"]
        # Refused in the TLS handshake: no HTTP answer at all (a 401 would mean it got through).
        with pytest.raises(aiohttp.ClientError):
            await get(url, a, trusting(pki.ca))
        stranger = pki.ca.issue_cert("stranger.example")  # valid, but not from the client CA
        with pytest.raises(aiohttp.ClientError):
            await get(url, a, trusting(pki.ca, stranger))
        assert await get(url, a, trusting(pki.ca, pki.client)) == 200
        assert await get(url, "wrong", trusting(pki.ca, pki.client)) == 401  # the token is still checked


# -- towards the IOP ----------------------------------------------------------------------------------


async def test_handshake_and_delivery_to_an_https_iop(make_settings: Callable[..., Settings], pki: Pki) -> None:
    a = "token-a-" + secrets.token_hex(8)
    peer = OcpiPeer(hub_ssl(pki.ca))
    await peer.start()
    try:
        assert peer.versions_url.startswith("https://")
        offer = {"token": peer.token_b, "url": peer.versions_url, "roles": [hub_role()]}
        # Without the CA the relay cannot verify the IOP: the registration fails, nothing stored; the
        # reason is in the log, the caller gets a generic answer.
        with captured_logs() as logs:
            async with running(make_settings(RELAY_OCPI_TOKEN_A=a, **FAST)) as relay:
                status, answer, _ = await peer.call("POST", routes(relay)["credentials"], a, body=offer)
                assert status == 200 and answer["status_code"] == 3001, answer
                assert "certificate" not in answer["status_message"].lower()
        assert "CERTIFICATE_VERIFY_FAILED" in logs.getvalue()
        # With RELAY_IOP_TLS_CA_FILE it is reached: handshake, then delivery.
        async with running(make_settings(RELAY_OCPI_TOKEN_A=a, RELAY_IOP_TLS_CA_FILE=pki.ca_file, **FAST)) as relay:
            await peer.register(routes(relay)["versions"], a)
            await put_location(relay, "v1")
            await peer.wait_for(lambda: peer.location_names() == ["v1"])
            assert peer.module_requests()[0].headers["Authorization"] == token_header(peer.token_b)
    finally:
        await peer.close()


def transient_attempts() -> float:
    return (
        REGISTRY.get_sample_value("relay_delivery_attempts_total", {"module": "locations", "outcome": "transient"})
        or 0.0
    )


async def test_client_certificate_towards_an_mtls_iop(make_settings: Callable[..., Settings], pki: Pki) -> None:
    peer = OcpiPeer(hub_ssl(pki.ca, require_client_cert=True))
    await peer.start()
    env = {"RELAY_IOP_URL": f"{peer.base}/2.2.1", "RELAY_IOP_TOKEN": peer.token_b, "RELAY_IOP_TLS_CA_FILE": pki.ca_file,
           **FAST}  # fmt: skip
    try:
        # The peer trusts client certificates of its own CA: one is issued for the relay.
        client_cert, client_key = _write(pki.ca.issue_cert("relay.cpo.example"),
                                         Path(pki.ca_file).with_name("relay.pem"),
                                         Path(pki.ca_file).with_name("relay.key"))  # fmt: skip
        before = transient_attempts()
        async with running(make_settings(**env)) as relay:
            assert relay.store is not None
            await put_location(relay, "v1")
            # Without a client certificate: transient failures, retried, the event kept.
            await wait_until(lambda: transient_attempts() >= before + 2, what="retried transient failures")
            assert peer.seen == []  # nothing got past the TLS handshake
            assert (await relay.store.stream_lengths())["locations"] == 1
        async with running(make_settings(RELAY_IOP_TLS_CERT_FILE=client_cert, RELAY_IOP_TLS_KEY_FILE=client_key,
                                         **env)) as relay:  # fmt: skip
            await peer.wait_for(lambda: peer.location_names() == ["v1"])
            assert peer.module_requests()[0].headers["Authorization"] == token_header(peer.token_b)
    finally:
        await peer.close()
