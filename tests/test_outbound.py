"""Outbound requests (issue 14, findings 2 and 3): where the hub's token goes, how much of an answer is read,
which URLs the credentials handshake calls, and that a token A opens one registration only.

Finding 2: a command's response_url on another origin than the hub's is refused when the command comes in
(and a result already queued for one is dead-lettered, never sent); answers are read with a cap and
inflated within it; redirects to another origin are not followed (the hub's answers, the webhook's).
Finding 3: handshake URLs must be https and public unless ``[ocpi] allow_insecure_urls``; the caller
gets a generic error, the log the reason; two concurrent registrations with one token A make one token C.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import secrets
import socket
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult

from relay import urls
from relay.config import CsmsSettings, IopSettings, Settings
from relay.credentials import digest
from relay.csms import CsmsClient, CsmsUnavailable
from relay.errors import ConfigError
from relay.ocpi_client import OcpiClient, StaticDirectory
from relay.retry import Kind, classify
from relay.store import DeliveryStore, RegistrationStore
from tests.csms_fake import bench
from tests.fake_iop import FakeIop, Reply
from tests.loopback import LoopbackServer
from tests.ocpi_peer import OcpiPeer, captured_logs, hub_role, routes, running, token_header
from tests.test_commands import at, command, post_result, start_session
from tests.test_ocpi_client import TOKEN, event
from tests.waiting import wait_until

FAST = {
    "RELAY_FORWARDER_BACKOFF_INITIAL_S": "0.01",
    "RELAY_FORWARDER_BACKOFF_MAX_S": "0.05",
    "RELAY_FORWARDER_SHUTDOWN_TIMEOUT_S": "0.5",
}
BOMB = gzip.compress(b" " * 50_000_000, 9)  # ~50 KB on the wire, 50 MB inflated
CAP = 1_048_576


@pytest.fixture
async def elsewhere() -> AsyncIterator[FakeIop]:
    """Another origin on loopback (another port): not the hub's."""
    fake = FakeIop()
    await fake.start()
    yield fake
    await fake.close()


def origin_of(fake: FakeIop) -> str:
    return f"http://127.0.0.1:{fake.port}"


# -- finding 2: the hub's token goes to the hub's origins only ------------------------------------------


async def test_a_response_url_on_another_origin_is_refused_at_command_time(
    make_settings: Callable[..., Settings], elsewhere: FakeIop
) -> None:
    async with bench(make_settings) as b:
        await b.put_location()
        body = start_session(b, response_url=f"{origin_of(elsewhere)}/ocpi/emsp/2.2.1/commands/START_SESSION/x1")
        with captured_logs() as logs:
            status, answer, _ = await command(b, "START_SESSION", body)
        # As every invalid command; the HTTP status is the OCPI listener's (400, or 200: "reached the OCPI layer").
        assert status == 200 and answer["status_code"] == 2001, answer
        assert "origin" in answer["status_message"]
        assert "command_response_url_refused" in logs.getvalue()
        assert b.csms.of_kind("command") == []  # never handed to the CSMS: no result, no TIMEOUT to send
        # The hub's own origin still works, and the result goes there with the hub's token.
        status, answer, _ = await command(b, "START_SESSION", ok_body := start_session(b))
        assert (status, answer["data"]["result"]) == (200, "ACCEPTED"), answer
        assert (await post_result(b, b.csms.posts[-1].body["command_id"], {"result": "ACCEPTED"}))[0] == 202
        await b.iop.wait_for(lambda: len(at(b, ok_body["response_url"])) == 1)
        assert elsewhere.arrived == []


async def test_a_configured_origin_may_receive_results(
    make_settings: Callable[..., Settings], elsewhere: FakeIop
) -> None:
    async with bench(make_settings, RELAY_OCPI_COMMAND_RESPONSE_ORIGINS=origin_of(elsewhere)) as b:
        await b.put_location()
        url = f"{origin_of(elsewhere)}/ocpi/emsp/2.2.1/commands/START_SESSION/x2"
        status, answer, _ = await command(b, "START_SESSION", start_session(b, response_url=url))
        assert (status, answer["data"]["result"]) == (200, "ACCEPTED"), answer
        assert (await post_result(b, b.csms.posts[-1].body["command_id"], {"result": "ACCEPTED"}))[0] == 202
        await elsewhere.wait_for(lambda: len(elsewhere.delivered("/ocpi/emsp/2.2.1/commands/START_SESSION/x2")) == 1)
        assert elsewhere.received[0].headers["Authorization"] == token_header(b.peer.token_b)


async def test_a_result_queued_for_another_origin_is_dead_lettered_unsent(
    make_settings: Callable[..., Settings], elsewhere: FakeIop
) -> None:
    """A command accepted when its origin was allowed (before this check, or before the hub changed): the
    client checks again before each attempt, and the result becomes a dead letter, not a request."""
    async with bench(make_settings) as b:
        await b.put_location()
        url = f"{origin_of(elsewhere)}/ocpi/emsp/2.2.1/commands/START_SESSION/x3"
        assert b.relay.commands is not None
        allowed_then = frozenset({urls.origin(url)})
        reply = await b.relay.commands.receive("START_SESSION", json.dumps(start_session(b, response_url=url)).encode(),
                                               ("FR", "AB1"), "corr-x3", origins=allowed_then)  # fmt: skip
        assert reply.data is not None and reply.data.result == "ACCEPTED"
        assert (await post_result(b, b.csms.posts[-1].body["command_id"], {"result": "ACCEPTED"}))[0] == 202
        assert b.relay.store is not None
        ds = DeliveryStore(b.relay.store)

        async def dead_lettered() -> bool:
            return (await ds.dlq_lengths())["commands"] == 1

        await wait_until(dead_lettered, 10, "the result dead-lettered")
        assert elsewhere.arrived == []
        assert b.relay.link.state == "up"  # not a link failure


@pytest.fixture
async def client(iop: FakeIop) -> AsyncIterator[OcpiClient]:
    settings = IopSettings(url=iop.url, token=TOKEN, connect_timeout_s=1, request_timeout_s=5)
    c = OcpiClient(settings, StaticDirectory(settings))
    await c.start()
    yield c
    await c.close()


async def test_a_compressed_answer_is_inflated_within_the_cap(iop: FakeIop, client: OcpiClient) -> None:
    small = json.dumps({"status_code": 1000, "timestamp": "2026-01-01T00:00:00Z"}).encode()
    iop.script = lambda _: Reply(body=gzip.compress(small), headers={"Content-Encoding": "gzip"})
    reply = await client.send(event("locations", "PUT", "LOC1"))
    assert reply.body == small and classify(reply.status, reply.headers, reply.body).kind is Kind.DELIVERED
    assert iop.received[0].headers["Accept-Encoding"] == urls.ACCEPT_ENCODING
    iop.script = lambda _: Reply(body=zlib.compress(small), headers={"Content-Encoding": "deflate"})
    assert (await client.send(event("locations", "PUT", "LOC1"))).body == small


async def test_a_gzip_bomb_from_the_iop_is_not_inflated(iop: FakeIop, client: OcpiClient) -> None:
    iop.script = lambda _: Reply(body=BOMB, headers={"Content-Encoding": "gzip"})
    with pytest.raises(urls.ResponseTooLarge) as refused:
        await client.send(event("locations", "PUT", "LOC1"))
    # The forwarder classifies it like a broken answer: transient, the event is kept.
    assert classify(None, exc=refused.value).kind is Kind.TRANSIENT


async def test_a_huge_answer_from_the_iop_is_not_read(iop: FakeIop, client: OcpiClient) -> None:
    iop.script = lambda _: Reply(body=b"x" * (CAP + 1))
    with pytest.raises(urls.ResponseTooLarge):
        await client.send(event("locations", "PUT", "LOC1"))


class Streaming(LoopbackServer):
    """Answers a chunked body (no Content-Length) of ``size`` bytes, gzip-encoded if asked."""

    def __init__(self, size: int, *, encoding: str | None = None) -> None:
        super().__init__()
        self.size, self.encoding, self.requests = size, encoding, 0

    def add_routes(self, app: web.Application) -> None:
        app.router.add_route("*", "/{tail:.*}", self._handle)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.requests += 1
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        if self.encoding:
            resp.headers["Content-Encoding"] = self.encoding
        await resp.prepare(request)
        data = BOMB if self.encoding else b"y" * self.size
        with contextlib.suppress(ConnectionError):  # the client hangs up: expected
            for i in range(0, len(data), 65_536):
                await resp.write(data[i : i + 65_536])
            await resp.write_eof()
        return resp

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/ocpi/2.2.1"


@pytest.mark.parametrize("encoding", [None, "gzip"])
async def test_a_chunked_answer_is_cut_at_the_cap(encoding: str | None) -> None:
    server = Streaming(8 * CAP, encoding=encoding)
    await server.start()
    settings = IopSettings(url=server.url, token=TOKEN, connect_timeout_s=1, request_timeout_s=5)
    c = OcpiClient(settings, StaticDirectory(settings))
    await c.start()
    try:
        with pytest.raises(urls.ResponseTooLarge):
            await c.send(event("locations", "PUT", "LOC1"))
    finally:
        await c.close()
        await server.close()


# -- the CSMS webhook: capped, no redirects ---------------------------------------------------------


class Webhook(LoopbackServer):
    def __init__(self, answer: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> None:
        super().__init__()
        self.answer = answer

    def add_routes(self, app: web.Application) -> None:
        app.router.add_route("*", "/{tail:.*}", self.answer)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"


async def _csms_post(hook: Webhook) -> dict[str, Any]:
    csms = CsmsClient(CsmsSettings(webhook_url=hook.url, token="csms-secret"))
    await csms.start()
    try:
        return await csms.post({"kind": "command"})
    finally:
        await csms.close()


async def test_the_webhook_answer_is_capped(elsewhere: FakeIop) -> None:
    async def bomb(request: web.Request) -> web.StreamResponse:
        return web.Response(body=BOMB, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})

    hook = Webhook(bomb)
    await hook.start()
    try:
        with pytest.raises(CsmsUnavailable, match="cap"):
            await _csms_post(hook)
    finally:
        await hook.close()


async def test_the_webhook_redirects_are_not_followed(elsewhere: FakeIop) -> None:
    async def redirect(request: web.Request) -> web.StreamResponse:
        return web.Response(status=307, headers={"Location": f"{origin_of(elsewhere)}/steal"})

    hook = Webhook(redirect)
    await hook.start()
    try:
        with pytest.raises(CsmsUnavailable, match="307"):
            await _csms_post(hook)
        assert elsewhere.arrived == []  # the CSMS's bearer token stayed with the CSMS
    finally:
        await hook.close()


# -- finding 3: the handshake's URLs, its errors, and token A -------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://iop.example/ocpi/versions",  # not https
        "https://127.0.0.1/ocpi/versions",
        "https://10.1.2.3/ocpi/versions",
        "https://192.168.0.10/ocpi/versions",
        "https://169.254.169.254/latest/meta-data",  # cloud metadata
        "https://100.64.0.1/ocpi/versions",  # shared address space
        "https://[::1]/ocpi/versions",
        "https://[::ffff:127.0.0.1]/ocpi/versions",
        "https://[fd00::1]/ocpi/versions",
        "https://224.0.0.1/ocpi/versions",
        "https://0.0.0.0/ocpi/versions",
        "https://localhost/ocpi/versions",
        "https://api.localhost./ocpi/versions",
        "https://user:pw@iop.example/ocpi/versions",
        "https://iop example/ocpi/versions",
        "ftp://iop.example/ocpi/versions",
        "/ocpi/versions",
    ],
)
def test_handshake_urls_must_be_https_and_public(url: str) -> None:
    with pytest.raises(urls.UrlRefused):
        urls.check_handshake_url(url, allow_insecure=False)


def test_public_handshake_urls_pass_and_insecure_ones_when_allowed() -> None:
    for url in ("https://iop.gireve.com/ocpi/versions", "https://8.8.8.8:8443/x", "https://[2001:4860::8888]/x"):
        urls.check_handshake_url(url, allow_insecure=False)
    for url in ("http://127.0.0.1:8080/ocpi/versions", "http://localhost/x", "https://10.0.0.1/x"):
        urls.check_handshake_url(url, allow_insecure=True)
    with pytest.raises(urls.UrlRefused):  # still a URL
        urls.check_handshake_url("http://user@127.0.0.1/", allow_insecure=True)


def test_decoding_is_bounded_and_strict() -> None:
    data = b'{"status_code": 1000}'
    raw = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    assert urls.decode(raw.compress(data) + raw.flush(), "deflate", CAP) == data  # raw deflate, as some send it
    assert urls.decode(gzip.compress(data) + gzip.compress(data), "gzip", CAP) == data * 2  # two members
    assert urls.decode(data, "identity", CAP) == data
    with pytest.raises(urls.ResponseTooLarge):
        urls.decode(gzip.compress(b"x" * 2048), "gzip", 1024)
    with pytest.raises(urls.ResponseTooLarge):  # the members together count
        urls.decode(gzip.compress(b"x" * 600) * 2, "gzip", 1024)
    for bad, coding in (
        (gzip.compress(data)[:-9], "gzip"),
        (b"not gzip", "gzip"),
        (data, "br"),
        (data, "gzip, gzip, gzip"),
    ):
        with pytest.raises(aiohttp.ClientPayloadError):
            urls.decode(bad, coding, CAP)


def test_origins_compare_scheme_host_and_port() -> None:
    assert (
        urls.origin("https://IOP.example/ocpi/x")
        == urls.origin("https://iop.example:443/y")
        == "https://iop.example:443"
    )
    assert urls.origin("http://iop.example/") != urls.origin("https://iop.example/")
    assert urls.origin("https://iop.example:8443/") != urls.origin("https://iop.example/")
    assert urls.origin("http://[::1]:80/") == "http://[::1]:80"
    assert urls.parse_origin("https://hub.example/") == "https://hub.example:443"
    with pytest.raises(urls.UrlRefused):
        urls.parse_origin("https://hub.example/path")


class _FixedResolver(AbstractResolver):
    def __init__(self, *addresses: str) -> None:
        self.addresses = addresses

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
                      ) -> list[ResolveResult]:  # fmt: skip
        return [ResolveResult(hostname=host, host=a, port=port, family=socket.AF_INET, proto=0, flags=0)
                for a in self.addresses]  # fmt: skip

    async def close(self) -> None:
        pass


async def test_names_that_resolve_to_private_addresses_are_refused_when_connecting(elsewhere: FakeIop) -> None:
    """DNS rebinding: the name passed the URL check; what it resolves to is checked at connection time."""
    guard = urls.PublicResolver(_FixedResolver("127.0.0.1", "10.0.0.7"))
    with pytest.raises(OSError, match="no public address"):
        await guard.resolve("iop.example", 443)
    assert [r["host"] for r in await urls.PublicResolver(_FixedResolver("10.0.0.7", "8.8.8.8")).resolve("x", 1)] == [
        "8.8.8.8"
    ]
    connector = aiohttp.TCPConnector(resolver=guard)
    async with aiohttp.ClientSession(connector=connector) as http:
        with pytest.raises(aiohttp.ClientConnectorError):
            await http.get(f"http://iop.example:{elsewhere.port}/ocpi/versions")
    assert elsewhere.arrived == []


@pytest.fixture
async def peer() -> AsyncIterator[OcpiPeer]:
    p = OcpiPeer()
    await p.start()
    yield p
    await p.close()


async def test_loopback_handshake_urls_are_refused_unless_allowed(
    make_settings: Callable[..., Settings], peer: OcpiPeer
) -> None:
    a = "token-a-" + secrets.token_hex(8)
    settings = make_settings(RELAY_OCPI_TOKEN_A=a, RELAY_OCPI_ALLOW_INSECURE_URLS="false", **FAST)
    assert settings.ocpi.allow_insecure_urls is False
    with captured_logs() as logs:
        async with running(settings) as relay:
            offer = {"token": peer.token_b, "url": peer.versions_url, "roles": [hub_role()]}
            status, body, _ = await peer.call("POST", routes(relay)["credentials"], a, body=offer)
            assert status == 200 and body["status_code"] == 3001, body
            assert body["status_message"] == "Unable to use the client's API"
            assert relay.registry is not None and relay.registry.registration is None
    assert peer.seen == []  # never called: token B stayed home
    assert "only https" in logs.getvalue()


async def test_handshake_errors_are_generic_for_the_caller_and_detailed_in_the_log(
    make_settings: Callable[..., Settings], peer: OcpiPeer
) -> None:
    a = "token-a-" + secrets.token_hex(8)
    with captured_logs() as logs:
        async with running(make_settings(RELAY_OCPI_TOKEN_A=a, **FAST)) as relay:
            r = routes(relay)
            answers = []
            for url in ("http://127.0.0.1:1/ocpi/versions", f"{peer.base}/nowhere", f"{peer.base}/2.2.1/locations/x"):
                offer = {"token": peer.token_b, "url": url, "roles": [hub_role()]}
                status, body, _ = await peer.call("POST", r["credentials"], a, body=offer)
                assert status == 200 and body["status_code"] == 3001, body
                answers.append(body["status_message"])
    assert answers == ["Unable to use the client's API"] * 3
    text = logs.getvalue()
    assert "Connect call failed" in text or "Cannot connect" in text
    assert "HTTP 404" in text


async def test_handshake_redirects_are_not_followed(make_settings: Callable[..., Settings], elsewhere: FakeIop) -> None:
    async def redirect(request: web.Request) -> web.StreamResponse:
        return web.Response(status=302, headers={"Location": f"{origin_of(elsewhere)}/ocpi/versions"})

    hub = Webhook(redirect)
    await hub.start()
    a = "token-a-" + secrets.token_hex(8)
    try:
        async with running(make_settings(RELAY_OCPI_TOKEN_A=a, **FAST)) as relay:
            offer = {"token": "hub-token-b", "url": f"http://127.0.0.1:{hub.port}/ocpi/versions", "roles": [hub_role()]}
            async with aiohttp.ClientSession() as http:
                async with http.post(routes(relay)["credentials"], json=offer,
                                     headers={"Authorization": token_header(a)}) as resp:  # fmt: skip
                    body = await resp.json()
            assert resp.status == 200 and body["status_code"] == 3001, body
        assert elsewhere.arrived == []
    finally:
        await hub.close()


async def test_a_handshake_answer_is_read_with_a_cap(make_settings: Callable[..., Settings]) -> None:
    async def bomb(request: web.Request) -> web.StreamResponse:
        return web.Response(body=BOMB, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"})

    hub = Webhook(bomb)
    await hub.start()
    a = "token-a-" + secrets.token_hex(8)
    try:
        with captured_logs() as logs:
            async with running(make_settings(RELAY_OCPI_TOKEN_A=a, **FAST)) as relay:
                offer = {"token": "b", "url": f"http://127.0.0.1:{hub.port}/ocpi/versions", "roles": [hub_role()]}
                async with aiohttp.ClientSession() as http:
                    async with http.post(routes(relay)["credentials"], json=offer,
                                         headers={"Authorization": token_header(a)}) as resp:  # fmt: skip
                        assert resp.status == 200 and (await resp.json())["status_code"] == 3001
        assert "ResponseTooLarge" in logs.getvalue()
    finally:
        await hub.close()


class SlowPeer(OcpiPeer):
    """Holds its versions answer until ``gate`` is set, so that two registrations overlap."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.versions_calls = 0

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/ocpi/versions":
            self.versions_calls += 1
            self.changed.set()
            await self.gate.wait()
        return await super()._handle(request)


async def test_concurrent_registrations_with_one_token_a_make_one_token_c(
    make_settings: Callable[..., Settings],
) -> None:
    peer = SlowPeer()
    await peer.start()
    a = "token-a-" + secrets.token_hex(8)
    try:
        async with running(make_settings(RELAY_OCPI_TOKEN_A=a, **FAST)) as relay:
            cred = routes(relay)["credentials"]

            async def register() -> tuple[int, Any]:
                offer = {"token": peer.new_token_b(), "url": peer.versions_url, "roles": [hub_role()]}
                status, body, _ = await peer.call("POST", cred, a, body=offer)
                return status, body

            first = asyncio.ensure_future(register())
            second = asyncio.ensure_future(register())
            await peer.wait_for(lambda: peer.versions_calls >= 1)
            # The second is refused while the first waits at the gate (today's code: it reaches the peer too).
            await wait_until(lambda: first.done() or second.done(), 5, "one registration answered")
            peer.gate.set()
            results = await asyncio.gather(first, second)
            statuses = sorted(s for s, _ in results)
            assert statuses == [200, 401], results
            [(_, won)] = [r for r in results if r[0] == 200]
            assert peer.versions_calls == 1
            assert relay.registry is not None
            await relay.registry.refresh()
            reg = relay.registry.registration
            assert reg is not None and reg.incoming_token == digest(won["data"]["token"])
            # The loser's token A is spent: it opens nothing, not even the versions.
            status, _, _ = await peer.call("GET", routes(relay)["versions"], a)
            assert status == 401
    finally:
        await peer.close()


async def test_a_failed_handshake_gives_the_token_a_back(
    make_settings: Callable[..., Settings], peer: OcpiPeer
) -> None:
    """Decided: the token A is spent when the registration starts, and given back if the handshake fails
    before anything is stored, so that the hub may retry with it (the pending token A as well)."""
    async with running(make_settings(**FAST)) as relay:
        assert relay.registry is not None and relay.store is not None
        a = "pending-a-" + secrets.token_hex(8)
        await RegistrationStore(relay.store).set_token_a(a)
        offer = {"token": "not-known-to-the-peer", "url": peer.versions_url, "roles": [hub_role()]}
        status, body, _ = await peer.call("POST", routes(relay)["credentials"], a, body=offer)
        assert status == 200 and body["status_code"] == 3001, body
        assert (await RegistrationStore(relay.store).load())[1] == digest(a)  # stored as its digest
        await peer.register(routes(relay)["versions"], a)
        assert (await RegistrationStore(relay.store).load())[1] is None


def test_the_settings(make_settings: Callable[..., Settings]) -> None:
    s = make_settings(RELAY_OCPI_ALLOW_INSECURE_URLS="false")
    assert (s.ocpi.allow_insecure_urls, s.ocpi.command_response_origins, s.iop.max_response_bytes) == (
        False, [], 1_048_576,
    )  # fmt: skip
    s = make_settings(RELAY_OCPI_COMMAND_RESPONSE_ORIGINS="https://a.example,https://b.example:8443")
    assert s.ocpi.command_response_origins == ["https://a.example", "https://b.example:8443"]
    with pytest.raises(ConfigError, match="command_response_origins"):
        make_settings(RELAY_OCPI_COMMAND_RESPONSE_ORIGINS="https://a.example/callbacks")
