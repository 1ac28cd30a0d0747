"""``relay doctor``: passes on a correct set-up (a relay registered with the IOP-like peer), and names the problem
on each broken one: Redis down, AOF off / eviction on / CONFIG refused, the IOP refusing the token, the IOP
unreachable or silent, public_url http or unreachable or not the relay, a certificate expired or mismatched or
expiring, clock skew, duplicate eMI3 ids, an invalid configuration."""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
import ipaddress
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
from click.testing import Result
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from relay.config import Settings
from relay.doctor import CERT_WARN_DAYS, CLOCK_FAIL_S, CLOCK_WARN_S, check_certificate, check_operators
from relay.doctor_checks import tail
from relay.service import Relay
from tests.fake_iop import FakeIop, Received, Reply
from tests.loopback import free_port
from tests.ocpi_peer import OcpiPeer, b64, cli, routes, running
from tests.topologies import ValkeyCluster, ValkeyProcess

RANK = {"fail": 3, "warn": 2, "ok": 1, "skip": 0}


async def doctor(settings: Settings, *args: str, **env: str) -> tuple[Result, dict[str, Any]]:
    res = await cli(settings, "doctor", "--json", "--timeout", "3", *args, **env)
    assert res.exit_code in (0, 1, 2), res.output
    return res, json.loads(res.stdout)


def status(data: dict[str, Any], name: str) -> str:
    """The worst result of the rows of one check."""
    rows: list[str] = [c["status"] for c in data["checks"] if c["check"] == name]
    assert rows, f"no {name} row in {[c['check'] for c in data['checks']]}"
    return max(rows, key=RANK.__getitem__)


def said(data: dict[str, Any], name: str) -> str:
    return " | ".join(f"{c['found']} → {c['hint']}" for c in data["checks"] if c["check"] == name)


def failed(data: dict[str, Any]) -> set[str]:
    return {c["check"] for c in data["checks"] if c["status"] == "fail"}


@pytest.fixture
async def peer() -> AsyncIterator[OcpiPeer]:
    p = OcpiPeer()
    await p.start()
    yield p
    await p.close()


@pytest.fixture
def token_a() -> str:
    return "token-a-" + secrets.token_hex(8)


@pytest.fixture
async def relay(make_settings: Callable[..., Settings], token_a: str) -> AsyncIterator[Relay]:
    """A relay whose OCPI listener answers on loopback (its public_url, http with allow_insecure_urls)."""
    async with running(make_settings(RELAY_OCPI_TOKEN_A=token_a)) as r:
        yield r


@pytest.fixture
async def live(relay: Relay, peer: OcpiPeer, token_a: str) -> Relay:
    """The relay, registered with the IOP-like peer (Register – FromIOP, as GIREVE does)."""
    await peer.register(routes(relay)["versions"], token_a)
    return relay


# -- a correct set-up --------------------------------------------------------------------------------


async def test_passes_on_a_registered_relay(live: Relay, peer: OcpiPeer) -> None:
    before = len(peer.seen)
    res, data = await doctor(live.settings)
    assert res.exit_code == 0 and data["ok"] and not failed(data), res.output
    assert status(data, "config") == "ok"
    assert status(data, "redis") == "ok"
    assert status(data, "eviction") == "ok" and "noeviction" in said(data, "eviction")
    assert status(data, "persistence") == "warn" and "everysec" in said(data, "persistence")  # the suite's server
    assert status(data, "durability") == "ok" and "202 after" in said(data, "durability")
    assert status(data, "registration") == "ok" and "registered (from iop)" in said(data, "registration")
    assert status(data, "public_url") == "warn"  # http, allowed by allow_insecure_urls
    assert status(data, "public_versions") == "ok" and "relay's OCPI listener" in said(data, "public_versions")
    assert status(data, "iop_versions") == "ok" and "2.2.1 offered" in said(data, "iop_versions")
    assert tail(peer.token_b) in said(data, "iop_versions")
    assert status(data, "clock") == "ok"
    assert status(data, "certificate") == "skip"
    assert status(data, "operators") == "warn" and "FR*AB1" in said(data, "operators")  # the example operator
    # The IOP was called as the relay calls it: its token base64-encoded, request ids, no routing headers (T3).
    [call] = peer.seen[before:]
    assert call.headers["Authorization"] == f"Token {b64(peer.token_b)}"
    assert call.headers["X-Request-ID"] and call.headers["X-Correlation-ID"]
    assert not any(h.lower().startswith("ocpi-") for h in call.headers)
    # No secret in the output: the token the relay sends (nor its base64), the token it accepts, the ingress's.
    for secret in (peer.token_b, b64(peer.token_b), peer.relay_token or "-", "test-ingress-token"):
        assert secret not in res.output
    text = await cli(live.settings, "doctor")
    assert text.exit_code == 0, text.output
    assert "config: " in text.stderr and "(RELAY_CONFIG)" in text.stderr  # the file used, as the other verbs say
    lines = text.stdout.splitlines()
    assert lines[0].startswith("ok    config") and lines[-1].startswith("0 failed, ")
    assert any(line.startswith("warn  persistence") for line in lines)
    assert any(line.strip().startswith("→ appendfsync always") for line in lines)  # the hint under the warning


async def test_invalid_configuration_exits_2(live: Relay) -> None:
    res, data = await doctor(live.settings, RELAY_INGRESS_TOKEN="")
    assert res.exit_code == 2 and not data["ok"]
    [row] = data["checks"]
    assert row["check"] == "config" and row["status"] == "fail" and "ingress.token" in row["found"]


async def test_registration_none_then_pending(relay: Relay) -> None:
    res, data = await doctor(relay.settings)
    assert res.exit_code == 1 and failed(data) == {"registration"}, res.output
    assert said(data, "registration").startswith("none: ") and "relay register --from-iop" in said(data, "registration")
    assert status(data, "iop_versions") == "skip"
    made = await cli(relay.settings, "register", "--from-iop", "--json")
    assert made.exit_code == 0, made.output
    res, data = await doctor(relay.settings)
    assert res.exit_code == 0 and status(data, "registration") == "warn", res.output
    assert "pending: a token A waits" in said(data, "registration")
    assert json.loads(made.stdout)["token_a"] not in res.output


# -- Redis ------------------------------------------------------------------------------------------


async def test_redis_down(live: Relay, tmp_path: Path) -> None:
    res, data = await doctor(live.settings, RELAY_REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")
    assert res.exit_code == 1 and failed(data) == {"redis"}, res.output
    assert "does not answer" in said(data, "redis") and "Connect call failed" in said(data, "redis")
    assert status(data, "registration") == "skip" and status(data, "iop_versions") == "skip"
    # The embedded default: no relay running on the data directory; doctor starts none.
    res, data = await doctor(live.settings, RELAY_REDIS_URL="", RELAY_STORAGE_DIR=str(tmp_path / "nothing"))
    assert res.exit_code == 1 and failed(data) == {"redis"}, res.output
    assert "no relay is running on data dir" in said(data, "redis")
    assert not (tmp_path / "nothing").exists()


async def test_aof_off_eviction_on_and_config_refused(relay: Relay, peer: OcpiPeer, tmp_path: Path) -> None:
    server = ValkeyProcess(tmp_path / "valkey", ["appendonly no", "maxmemory-policy allkeys-lru"])
    await server.start()
    try:
        # No registration on that server: the static [iop] url and token (the peer's 2.2.1 details).
        env = {"RELAY_REDIS_URL": server.url, "RELAY_IOP_URL": f"{peer.base}/2.2.1", "RELAY_IOP_TOKEN": peer.token_b}
        res, data = await doctor(relay.settings, **env)
        assert res.exit_code == 1 and failed(data) == {"persistence", "eviction"}, res.output
        assert "appendonly no" in said(data, "persistence") and "appendonly yes" in said(data, "persistence")
        assert "maxmemory-policy allkeys-lru" in said(data, "eviction")
        assert status(data, "registration") == "ok" and "static" in said(data, "registration")
        assert status(data, "iop_versions") == "ok"

        client = server.client()
        try:
            await client.config_set("appendonly", "yes")
            await client.config_set("maxmemory-policy", "noeviction")
            res, data = await doctor(relay.settings, **env)
            assert res.exit_code == 0 and not failed(data), res.output
            assert status(data, "eviction") == "ok"
            # A managed Redis that refuses CONFIG: warnings, with INFO's word on the append-only file.
            await client.acl_setuser("default", enabled=True, nopass=True, commands=["-config"])
        finally:
            await client.aclose()
        res, data = await doctor(relay.settings, **env)
        assert res.exit_code == 0 and not failed(data), res.output
        assert status(data, "persistence") == "warn" and "CONFIG refused" in said(data, "persistence")
        assert "append-only file on" in said(data, "persistence")
        assert status(data, "eviction") == "warn"
    finally:
        server.kill()


async def test_every_primary_of_a_cluster_is_checked(relay: Relay, peer: OcpiPeer, tmp_path: Path) -> None:
    cluster = ValkeyCluster(tmp_path / "cluster")
    try:
        await cluster.start()
        client = cluster.nodes[2].client()
        try:
            await client.config_set("maxmemory-policy", "volatile-lru")  # one primary of three
        finally:
            await client.aclose()
        env = {"RELAY_REDIS_URL": cluster.url, "RELAY_REDIS_CLUSTER": "true", "RELAY_REDIS_SHARDS": "16",
               "RELAY_IOP_URL": f"{peer.base}/2.2.1", "RELAY_IOP_TOKEN": peer.token_b}  # fmt: skip
        res, data = await doctor(relay.settings, **env)
        assert res.exit_code == 1 and failed(data) == {"eviction"}, res.output
        assert "maxmemory-policy volatile-lru" in said(data, "eviction")
        assert status(data, "persistence") == "warn" and "everysec" in said(data, "persistence")
    finally:
        cluster.stop()


# -- the IOP ----------------------------------------------------------------------------------------


async def test_iop_refuses_the_token(live: Relay, peer: OcpiPeer) -> None:
    peer.accepted.discard(peer.token_b)  # the hub forgot the token it gave at registration
    res, data = await doctor(live.settings)
    assert res.exit_code == 1 and failed(data) == {"iop_versions"}, res.output
    found = said(data, "iop_versions")
    assert "HTTP 401" in found and f"the registration's token {tail(peer.token_b)}" in found
    assert "relay register --from-iop" in found
    assert peer.token_b not in res.output and b64(peer.token_b) not in res.output
    assert status(data, "clock") == "ok"  # a 401 has a Date too


async def test_iop_unreachable(live: Relay, peer: OcpiPeer) -> None:
    await peer.close()
    peer._runner = None  # closed here, not again by the fixture
    res, data = await doctor(live.settings)
    assert res.exit_code == 1 and failed(data) == {"iop_versions"}, res.output
    assert "cannot connect" in said(data, "iop_versions") and peer.versions_url in said(data, "iop_versions")
    assert status(data, "clock") == "skip"


async def test_a_silent_iop_does_not_hang_it(relay: Relay, iop: FakeIop) -> None:
    held = asyncio.Event()
    iop.script = lambda _: Reply(hold=held)
    try:
        started = time.monotonic()
        res = await cli(relay.settings, "doctor", "--json", "--timeout", "0.5", RELAY_IOP_URL=iop.url,
                        RELAY_IOP_TOKEN="iop-token-" + secrets.token_hex(8))  # fmt: skip
        elapsed = time.monotonic() - started
        data = json.loads(res.stdout)
        assert res.exit_code == 1 and failed(data) == {"iop_versions"}, res.output
        assert "no answer within 0.5 s" in said(data, "iop_versions")
        assert elapsed < 5, elapsed
    finally:
        held.set()


async def test_clock_skew_against_the_iop_date(relay: Relay, iop: FakeIop) -> None:
    token = "iop-token-" + secrets.token_hex(8)
    env = {"RELAY_IOP_URL": iop.url, "RELAY_IOP_TOKEN": token}
    skew = {"s": 0.0}

    def dated(_: Received) -> Reply:
        return Reply(headers={"Date": email.utils.formatdate(time.time() + skew["s"], usegmt=True)})

    iop.script = dated
    res, data = await doctor(relay.settings, **env)
    assert res.exit_code == 0 and status(data, "clock") == "ok", res.output
    assert status(data, "config") == "warn" and "iop.url" in said(data, "config")  # plain http: a weak setting
    [req] = iop.received
    assert req.headers["Authorization"] == f"Token {b64(token)}" and req.headers["X-Request-ID"]
    skew["s"] = -120  # the IOP's clock two minutes behind ours: ours is ahead
    res, data = await doctor(relay.settings, **env)
    assert res.exit_code == 1 and failed(data) == {"clock"}, res.output
    assert "ahead of the IOP's Date header (more than 60 s)" in said(data, "clock")
    skew["s"] = 10
    res, data = await doctor(relay.settings, **env)
    assert res.exit_code == 0 and status(data, "clock") == "warn", res.output
    assert "behind the IOP's Date header (more than 5 s)" in said(data, "clock")


async def test_a_date_without_a_zone_is_gmt_not_the_hosts_time(
    relay: Relay, iop: FakeIop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``-0000`` (RFC 5322: no zone information) parses as a naive datetime: read as GMT, as HTTP dates are,
    never as the host's local time (here nine hours off)."""
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    try:
        iop.script = lambda _: Reply(headers={"Date": email.utils.formatdate(time.time()).replace("+0000", "-0000")})
        res, data = await doctor(relay.settings, RELAY_IOP_URL=iop.url, RELAY_IOP_TOKEN="iop-token-0123456789")
        assert status(data, "clock") == "ok", res.output
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


# -- the public URL -----------------------------------------------------------------------------------


async def test_public_url_http_unreachable_or_not_the_relay(live: Relay, peer: OcpiPeer) -> None:
    res, data = await doctor(live.settings, RELAY_OCPI_ALLOW_INSECURE_URLS="false")
    assert res.exit_code == 1 and failed(data) == {"public_url"}, res.output
    assert "only https" in said(data, "public_url")
    res, data = await doctor(live.settings, RELAY_OCPI_PUBLIC_URL=f"http://127.0.0.1:{free_port()}/ocpi")
    assert res.exit_code == 1 and failed(data) == {"public_versions"}, res.output
    assert "cannot connect" in said(data, "public_versions") and "[ocpi] listen" in said(data, "public_versions")
    # Something answers, but not the relay (the peer's own 401, without our request id echoed).
    res, data = await doctor(live.settings, RELAY_OCPI_PUBLIC_URL=peer.base)
    assert res.exit_code == 1 and failed(data) == {"public_versions"}, res.output
    assert "HTTP 401, OCPI 2000" in said(data, "public_versions") and "not the relay's" in said(data, "public_versions")
    res, data = await doctor(live.settings, RELAY_OCPI_PUBLIC_URL="")
    assert res.exit_code == 1 and failed(data) == {"public_url"} and "unset" in said(data, "public_url")


# -- certificates ------------------------------------------------------------------------------------


def certificate(d: Path, name: str, *, start_days: float = -1, end_days: float = 365,
                key: ec.EllipticCurvePrivateKey | None = None, host: str = "127.0.0.1") -> tuple[str, str]:  # fmt: skip
    """A self-signed certificate for ``host`` valid from now + start_days to now + end_days; (cert, key) paths."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    try:
        alt: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        alt = x509.DNSName(host)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + dt.timedelta(days=start_days))
        .not_valid_after(now + dt.timedelta(days=end_days))
        .add_extension(x509.SubjectAlternativeName([alt]), critical=False)
        .sign(key, hashes.SHA256())
    )
    (d / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / f"{name}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption()))  # fmt: skip
    return str(d / f"{name}.pem"), str(d / f"{name}.key")


async def test_certificate_expired_mismatched_or_expiring(live: Relay, tmp_path: Path) -> None:
    good = certificate(tmp_path, "good")
    expired = certificate(tmp_path, "expired", start_days=-400, end_days=-2)
    soon = certificate(tmp_path, "soon", end_days=10)
    other_key = certificate(tmp_path, "other")[1]

    async def run(cert: str, key: str) -> tuple[Result, dict[str, Any]]:
        return await doctor(live.settings, RELAY_OCPI_TLS_CERT_FILE=cert, RELAY_OCPI_TLS_KEY_FILE=key)

    res, data = await run(*good)
    assert res.exit_code == 0 and status(data, "certificate") == "ok", res.output
    assert "CN=127.0.0.1" in said(data, "certificate") and "(364 days)" in said(data, "certificate")
    res, data = await run(*expired)
    assert res.exit_code == 1 and failed(data) == {"certificate"}, res.output
    assert "expired on" in said(data, "certificate") and "renew" in said(data, "certificate")
    res, data = await run(good[0], other_key)
    assert res.exit_code == 1 and failed(data) == {"certificate"}, res.output
    assert f"does not match its key {other_key}" in said(data, "certificate")
    res, data = await run(*soon)
    assert res.exit_code == 0 and status(data, "certificate") == "warn", res.output
    assert "expires within 30 days" in said(data, "certificate")
    res, data = await run(str(tmp_path / "missing.pem"), good[1])
    assert res.exit_code == 1 and "cannot read" in said(data, "certificate"), res.output


async def test_passes_with_tls_on_the_listener_and_warns_under_mtls(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    leaf = ca.issue_cert("127.0.0.1")
    for pem in leaf.cert_chain_pems:
        pem.write_to_path(str(tmp_path / "server.pem"), append=True)
    leaf.private_key_pem.write_to_path(str(tmp_path / "server.key"))
    tls = {
        "RELAY_OCPI_TLS_CERT_FILE": str(tmp_path / "server.pem"),
        "RELAY_OCPI_TLS_KEY_FILE": str(tmp_path / "server.key"),
    }
    trust = {"SSL_CERT_FILE": str(tmp_path / "ca.pem")}  # doctor trusts what OpenSSL's default paths say
    async with running(make_settings(**tls)) as relay:
        assert relay.settings.ocpi.public_url.startswith("https://127.0.0.1:")
        res, data = await doctor(relay.settings, **tls, **trust)
        assert not failed(data) - {"registration"}, res.output  # not registered: the only failure
        assert status(data, "public_versions") == "ok" and "relay's OCPI listener" in said(data, "public_versions")
        assert status(data, "public_certificate") == "ok"
        assert status(data, "certificate") == "ok" and "127.0.0.1" in said(data, "certificate")
        res, data = await doctor(relay.settings, **tls)  # the system's trust store does not know the test CA
        assert "public_versions" in failed(data) and "not trusted" in said(data, "public_versions")
    ca.cert_pem.write_to_path(str(tmp_path / "clients.pem"))
    mtls = {**tls, "RELAY_OCPI_TLS_CLIENT_CA_FILE": str(tmp_path / "clients.pem")}
    async with running(make_settings(**mtls)) as relay:
        res, data = await doctor(relay.settings, **mtls, **trust)
        assert status(data, "public_versions") == "warn", res.output
        assert "asks for a client certificate" in said(data, "public_versions")


def test_certificate_names_and_dates(tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    cert, key = certificate(tmp_path, "named", host="ocpi.cpo.example")
    assert [c.status for c in check_certificate("certificate", cert, key, now, "ocpi.cpo.example")] == ["ok"]
    [ok, names] = check_certificate("certificate", cert, key, now, "other.cpo.example")
    assert ok.status == "ok" and names.status == "warn" and "do not cover other.cpo.example" in names.found
    wildcard = certificate(tmp_path, "wild", host="*.cpo.example")
    assert [c.status for c in check_certificate("certificate", *wildcard, now, "ocpi.cpo.example")] == ["ok"]
    assert check_certificate("certificate", *wildcard, now, "a.b.cpo.example")[-1].status == "warn"
    later = certificate(tmp_path, "later", start_days=2)
    [row] = check_certificate("certificate", *later, now)
    assert row.status == "fail" and "not valid before" in row.found
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    [row] = check_certificate("certificate", str(tmp_path / "junk.pem"), key, now)
    assert row.status == "fail" and "no PEM certificate" in row.found


# -- operators ---------------------------------------------------------------------------------------


def test_operators_with_their_emi3_ids(make_settings: Callable[..., Settings]) -> None:
    ops = [
        {"country_code": "FR", "party_id": "AB1", "name": "One", "emi3_id": "FR*XYZ"},
        {"country_code": "FR", "party_id": "AB2", "name": "Two", "emi3_id": "FRXYZ"},  # the same id, unstarred
        {"country_code": "FR", "party_id": "AB3", "name": "Three", "emi3_id": "DE*AB3"},
        {"country_code": "FR", "party_id": "AB4", "name": "Four"},  # default: FR*AB4
    ]
    rows = check_operators(make_settings(RELAY_OPERATORS_JSON=json.dumps(ops)))
    assert rows[0].status == "ok" and "FR/AB4 'Four' (eMI3 FR*AB4)" in rows[0].found
    assert [(r.status, r.found.split(":")[0]) for r in rows[1:]] == [
        ("fail", "FR/AB2 and FR/AB1 share the eMI3 id FRXYZ"),
        ("warn", "FR/AB3"),
    ]


def test_help_states_the_thresholds() -> None:
    from relay.cli_doctor import doctor as verb

    assert (CLOCK_WARN_S, CLOCK_FAIL_S, CERT_WARN_DAYS) == (5.0, 60.0, 30)
    assert verb.help is not None and "warn above 5 s, FAIL above 60 s" in verb.help and "within 30 days" in verb.help
