"""OcpiClient against the fake IOP: URLs, methods, T1–T3 headers, redirects."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any

import pytest

from relay.config import IopSettings, Settings
from relay.credentials import BusinessDetails, CredentialsRole, Directory, Endpoint, Registration
from relay.events import Event, Method, new_event_id
from relay.ocpi_client import NotConfigured, OcpiClient, StaticDirectory, authorization
from relay.retry import Kind, classify
from tests.fake_iop import FakeIop, Received, Reply

TOKEN = "b7c3-token/with+odd=chars"


def event(module: Any, method: Method, object_id: str, *, evse: str | None = None, conn: str | None = None,
          body: bytes = b'{"x": 1}', correlation: str = "") -> Event:  # fmt: skip
    return Event(
        id=new_event_id(),
        module=module,
        method=method,
        country_code="FR",
        party_id="AB1",
        object_id=object_id,
        evse_uid=evse,
        connector_id=conn,
        key=f"k:{object_id}",
        correlation_id=correlation,
        received_at=0.0,
        body=body if method != "DELETE" else b"",
    )


@pytest.fixture
async def client(iop: FakeIop) -> AsyncIterator[OcpiClient]:
    settings = IopSettings(url=iop.url + "/", token=TOKEN, connect_timeout_s=1, request_timeout_s=2)
    c = OcpiClient(settings, StaticDirectory(settings))
    await c.start()
    yield c
    await c.close()


URLS = [
    ("location", event("locations", "PUT", "LOC1"), "PUT", "/ocpi/2.2.1/locations/FR/AB1/LOC1"),
    ("evse", event("locations", "PATCH", "LOC1", evse="3256"), "PATCH", "/ocpi/2.2.1/locations/FR/AB1/LOC1/3256"),
    (
        "connector",
        event("locations", "PUT", "LOC1", evse="3256", conn="1"),
        "PUT",
        "/ocpi/2.2.1/locations/FR/AB1/LOC1/3256/1",
    ),  # fmt: skip
    ("session", event("sessions", "PUT", "S1"), "PUT", "/ocpi/2.2.1/sessions/FR/AB1/S1"),
    ("session patch", event("sessions", "PATCH", "S1"), "PATCH", "/ocpi/2.2.1/sessions/FR/AB1/S1"),
    ("cdr", event("cdrs", "POST", "CDR1"), "POST", "/ocpi/2.2.1/cdrs"),
    ("tariff", event("tariffs", "PUT", "T1"), "PUT", "/ocpi/2.2.1/tariffs/FR/AB1/T1"),
    ("tariff delete", event("tariffs", "DELETE", "T1"), "DELETE", "/ocpi/2.2.1/tariffs/FR/AB1/T1"),
]


@pytest.mark.parametrize(("ev", "method", "path"), [u[1:] for u in URLS], ids=[u[0] for u in URLS])
async def test_url_method_and_body(iop: FakeIop, client: OcpiClient, ev: Event, method: str, path: str) -> None:
    reply = await client.send(ev)
    assert reply.status == 200
    assert classify(reply.status, reply.headers, reply.body).kind is Kind.DELIVERED
    [got] = iop.received
    assert (got.method, got.path) == (method, path)
    if method == "DELETE":
        assert got.body == b""
        assert "Content-Type" not in got.headers
    else:
        assert got.body == ev.body
        assert got.headers["Content-Type"] == "application/json"


def _check_headers(got: Received, ev: Event) -> None:
    assert got.headers["Authorization"] == "Token " + base64.b64encode(TOKEN.encode()).decode()
    assert got.headers["X-Correlation-ID"] == (ev.correlation_id or ev.id)
    assert got.headers["OCPI-from-country-code"] == "FR"
    assert got.headers["OCPI-from-party-id"] == "AB1"
    assert got.headers["OCPI-to-country-code"] == "FR"
    assert got.headers["OCPI-to-party-id"] == "107"


async def test_headers_t1_t2_t3(iop: FakeIop, client: OcpiClient) -> None:
    with_corr = event("locations", "PUT", "LOC1", correlation="csms-corr-9")
    without = event("locations", "PUT", "LOC2")
    replies = [await client.send(with_corr), await client.send(with_corr), await client.send(without)]
    assert [r.status for r in replies] == [200, 200, 200]
    _check_headers(iop.received[0], with_corr)
    _check_headers(iop.received[1], with_corr)
    _check_headers(iop.received[2], without)
    request_ids = [r.headers["X-Request-ID"] for r in iop.received]
    assert len(set(request_ids)) == 3  # fresh on every attempt, even of the same event
    assert request_ids == [r.request_id for r in replies]


def test_authorization_is_base64_of_the_token() -> None:
    assert authorization("abc") == "Token YWJj"
    assert base64.b64decode(authorization(TOKEN).removeprefix("Token ")).decode() == TOKEN


@pytest.mark.parametrize(("status", "method"), [(307, "PUT"), (308, "PATCH"), (301, "PUT"), (308, "POST")])
async def test_redirect_to_trailing_slash_keeps_method_and_body(
    iop: FakeIop, client: OcpiClient, status: int, method: Method
) -> None:
    def script(r: Received) -> Reply | None:
        if not r.path.endswith("/"):
            return Reply(status=status, ocpi=None, headers={"Location": r.path + "/"})
        return None

    iop.script = script
    ev = event("cdrs" if method == "POST" else "locations", method, "LOC1", evse="3256" if method == "PATCH" else None)
    reply = await client.send(ev)
    assert reply.status == 200
    first, second = iop.received
    assert first.reply is not None and first.reply.status == status
    assert second.path == first.path + "/"
    assert second.method == first.method == method
    assert second.body == first.body == ev.body
    assert second.headers["Authorization"] == first.headers["Authorization"]
    assert second.headers["X-Request-ID"] == first.headers["X-Request-ID"]  # one attempt


async def test_redirect_to_another_origin_is_not_followed(iop: FakeIop, client: OcpiClient) -> None:
    elsewhere = FakeIop()
    await elsewhere.start()
    try:
        iop.script = lambda r: Reply(status=307, ocpi=None, headers={"Location": elsewhere.url + "/locations/x"})
        reply = await client.send(event("locations", "PUT", "LOC1"))
        assert reply.status == 307
        assert len(iop.received) == 1
        assert elsewhere.arrived == []  # the token never leaves the IOP's origin
        out = classify(reply.status, reply.headers, reply.body)
        assert out.kind is Kind.PERMANENT and "redirect" in out.reason
    finally:
        await elsewhere.close()


async def test_redirect_loop_is_bounded(iop: FakeIop, client: OcpiClient) -> None:
    iop.script = lambda r: Reply(status=307, ocpi=None, headers={"Location": r.path + "/"})
    reply = await client.send(event("locations", "PUT", "LOC1"))
    assert reply.status == 307
    assert 2 <= len(iop.received) <= 5


async def test_not_configured_without_url_or_token() -> None:
    for settings in (IopSettings(url="", token="t"), IopSettings(url="http://127.0.0.1:9/ocpi", token="")):
        c = OcpiClient(settings, StaticDirectory(settings))
        await c.start()
        try:
            with pytest.raises(NotConfigured):
                await c.send(event("locations", "PUT", "LOC1"))
        finally:
            await c.close()


ODD_IDS = ["LOCX?a=1", "LOCY#frag", "a b", "100%", "%2F", "L.1", "é", "..x"]


@pytest.mark.parametrize("odd", ODD_IDS)
async def test_each_id_is_one_percent_encoded_segment(iop: FakeIop, client: OcpiClient, odd: str) -> None:
    ev = event("locations", "PATCH", odd, evse=odd, conn=odd)
    reply = await client.send(ev)
    assert reply.status == 200
    [got] = iop.received
    assert got.path == f"/ocpi/2.2.1/locations/FR/AB1/{odd}/{odd}/{odd}"  # as the receiver decodes it


@pytest.mark.parametrize("dots", [".", ".."])
async def test_an_id_that_is_a_dot_segment_is_never_sent(iop: FakeIop, client: OcpiClient, dots: str) -> None:
    for ev in (event("locations", "PUT", dots), event("locations", "PATCH", "LOC1", evse=dots)):
        with pytest.raises(ValueError, match="cannot be sent"):
            await client.send(ev)
    assert iop.received == []


# -- T3: OCPI-to-* is the IOP as the handshake names it --------------------------------------------


def registered(iop: FakeIop, roles: list[CredentialsRole]) -> Registration:
    eps = [Endpoint(identifier=m, role="RECEIVER", url=f"{iop.url}/{m}") for m in ("locations", "sessions")]
    eps.append(Endpoint(identifier="tokens", role="SENDER", url=f"{iop.url}/tokens"))
    return Registration(state="registered", direction="from_iop", incoming_token="0" * 64, outgoing_token=TOKEN,
                        versions_url=f"{iop.url}/versions", version_url=iop.url, endpoints=eps, roles=roles,
                        registered_at=0.0, updated_at=0.0)  # fmt: skip


def role(kind: str, country_code: str, party_id: str) -> CredentialsRole:
    return CredentialsRole(role=kind, business_details=BusinessDetails(name="GIREVE"), party_id=party_id,
                           country_code=country_code)  # fmt: skip


# (id, the IOP's roles, OCPI-to-* sent) with [iop] FR/107, as the shipped config (GIREVE's pre-production)
PARTIES = [
    ("HUB role of production", [role("HUB", "FR", "007")], ("FR", "007")),
    ("lower case ids", [role("HUB", "fr", "007")], ("FR", "007")),
    ("several HUB roles: the configured one", [role("HUB", "FR", "007"), role("HUB", "FR", "107")], ("FR", "107")),
    ("several HUB roles, none configured: the first", [role("HUB", "FR", "007"), role("HUB", "DE", "HUB")],
     ("FR", "007")),
    ("a HUB role among others", [role("EMSP", "NL", "TNM"), role("HUB", "FR", "007")], ("FR", "007")),
    ("its only role, not HUB", [role("EMSP", "NL", "TNM")], ("NL", "TNM")),
    ("several roles, no HUB: [iop]", [role("EMSP", "NL", "TNM"), role("CPO", "NL", "TNM")], ("FR", "107")),
    ("no role: [iop]", [], ("FR", "107")),
    ("ids that are no CiStrings never reach a header", [role("HUB", "FR", "0\r\nX")], ("FR", "107")),
]  # fmt: skip


@pytest.mark.parametrize(("roles", "want"), [p[1:] for p in PARTIES], ids=[p[0] for p in PARTIES])
async def test_ocpi_to_follows_the_registration(iop: FakeIop, roles: list[CredentialsRole],
                                                want: tuple[str, str]) -> None:  # fmt: skip
    settings = Settings(iop=IopSettings(country_code="FR", party_id="107", connect_timeout_s=1, request_timeout_s=2))
    directory = Directory(settings)
    directory.registration = registered(iop, roles)
    c = OcpiClient(settings.iop, directory)
    await c.start()
    try:
        assert (await c.send(event("locations", "PUT", "LOC1"))).status == 200
        reply = await c.authorize("0102ABCD", "RFID", b'{"location_id": "LOC1"}', ("FR", "AB1"), "", 2.0)
        assert reply.status == 200
    finally:
        await c.close()
    for got in iop.received:
        assert (got.headers["OCPI-to-country-code"], got.headers["OCPI-to-party-id"]) == want, got.path
        assert (got.headers["OCPI-from-country-code"], got.headers["OCPI-from-party-id"]) == ("FR", "AB1")
    assert [r.path for r in iop.received] == ["/ocpi/2.2.1/locations/FR/AB1/LOC1",
                                               "/ocpi/2.2.1/tokens/0102ABCD/authorize"]  # fmt: skip


async def test_ocpi_to_changes_with_the_registration(iop: FakeIop) -> None:
    settings = Settings(iop=IopSettings(url=iop.url, token=TOKEN, connect_timeout_s=1, request_timeout_s=2))
    directory = Directory(settings)
    c = OcpiClient(settings.iop, directory)
    await c.start()
    try:
        for reg in (None, registered(iop, [role("HUB", "FR", "007")]), registered(iop, [role("HUB", "FR", "107")])):
            directory.registration = reg
            await c.send(event("locations", "PUT", "LOC1"))
    finally:
        await c.close()
    sent = [(r.headers["OCPI-to-country-code"], r.headers["OCPI-to-party-id"]) for r in iop.received]
    assert sent == [("FR", "107"), ("FR", "007"), ("FR", "107")]  # static [iop] first, then each handshake's
