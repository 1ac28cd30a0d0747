"""Edge input on the OCPI listener (issue 14): malformed Authorization headers, unknown tokens in bulk,
the Sender lists' query parameters, JSON nested too deep. Each is refused with an OCPI 2xxx, never a 500:
in a 401 (token) or a 400 (not JSON the relay can parse), else in an HTTP 200 (the request reached the
OCPI layer: status_codes.asciidoc); unknown tokens cost Redis reads and log lines at a bounded rate only.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from relay.config import Settings
from relay.embedded_redis import EmbeddedRedis
from relay.service import Relay
from relay.store import RegistrationStore
from tests.csms_fake import bench, iop_token
from tests.ocpi_peer import OcpiPeer, captured_logs, routes, running, token_header
from tests.raw_http import raw_request

DEEP = b"[" * 1000 + b"]" * 1000


@dataclass
class Registered:
    relay: Relay
    peer: OcpiPeer
    c: str
    r: dict[str, str]


@pytest.fixture
async def registered(make_settings: Callable[..., Settings]) -> AsyncIterator[Registered]:
    """A relay (with its Sender interfaces) registered FromIOP by a peer."""
    a = "token-a-" + secrets.token_hex(8)
    peer = OcpiPeer()
    await peer.start()
    try:
        async with running(make_settings(RELAY_OCPI_TOKEN_A=a, RELAY_FORWARDER_ENABLED="false")) as relay:
            r = routes(relay)
            await peer.register(r["versions"], a)
            assert peer.relay_token is not None
            yield Registered(relay, peer, peer.relay_token, r)
    finally:
        await peer.close()


# -- Authorization -------------------------------------------------------------------------------------------

BAD_AUTHORIZATION = [
    ("non-ascii plain token", "Token é".encode()),
    ("base64 of non-ascii", b"Token w6k="),
    ("bytes that are not utf-8", b"Token \xff\xfe"),
    ("base64 of bytes that are not utf-8", b"Token //4="),
    ("wrong scheme, not utf-8", b"Bearer \xff\xfe"),
    ("very long", b"Token " + b"A" * 6000),
]


@pytest.mark.parametrize("header", [h for _, h in BAD_AUTHORIZATION], ids=[n for n, _ in BAD_AUTHORIZATION])
async def test_a_malformed_authorization_header_is_401_never_500(registered: Registered, header: bytes) -> None:
    for url in (registered.r["versions"], registered.r["details"] + "/locations"):
        status, answer = await raw_request(url, "GET", [(b"Authorization", header), (b"X-Request-ID", b"rq-9")])
        assert status == 401, answer
        assert answer["status_code"] == 2000, answer


@pytest.mark.parametrize("value", [b"\xff\xfe", "é".encode(), b"a" * 300], ids=["not utf-8", "non-ascii", "long"])
async def test_odd_request_ids_are_not_echoed_as_they_are(registered: Registered, value: bytes) -> None:
    auth = token_header(registered.c).encode()
    headers = [(b"Authorization", auth), (b"X-Request-ID", value), (b"X-Correlation-ID", value)]
    status, answer = await raw_request(registered.r["versions"], "GET", headers)
    assert status == 200, answer
    assert answer["status_code"] == 1000


async def test_unknown_tokens_cost_redis_reads_and_log_lines_at_a_bounded_rate(registered: Registered) -> None:
    registry = registered.relay.registry
    assert registry is not None
    loads = 0
    load = registry.store.load

    async def counted() -> Any:
        nonlocal loads
        loads += 1
        return await load()

    registry.store.load = counted  # type: ignore[method-assign]
    n = 300
    with captured_logs() as logs:
        started = time.monotonic()
        for i in range(0, n, 50):
            answers = await asyncio.gather(*(
                registered.peer.call("GET", registered.r["versions"], f"unknown-{i + j}") for j in range(50)
            ))  # fmt: skip
            assert {a[0] for a in answers} == {401}
        elapsed = time.monotonic() - started
    # Unknown tokens: one read per 0.2 s at most (each request waits for the next); the relay's own
    # registration watch reads once a second besides.
    assert loads <= 6 * elapsed + 4, (loads, elapsed)
    assert loads < n / 10, loads
    lines = [line for line in logs.getvalue().splitlines() if "ocpi_unauthorized" in line]
    assert 1 <= len(lines) <= elapsed / 10 + 2, lines
    assert "unknown-" not in logs.getvalue()  # the tokens themselves are never logged
    # The registered token still works, and so does a token the relay learns about only from Redis.
    status, _, _ = await registered.peer.call("GET", registered.r["versions"], registered.c)
    assert status == 200


async def test_a_token_made_right_after_an_unknown_one_is_not_refused_for_being_early(registered: Registered) -> None:
    assert registered.relay.store is not None
    versions = registered.r["versions"]
    for i in range(3):
        status, _, _ = await registered.peer.call("GET", versions, f"unknown-{i}")
        assert status == 401
        token_a = f"token-a-new-{i}-" + secrets.token_hex(4)
        await RegistrationStore(registered.relay.store).set_token_a(token_a)  # what `relay register --from-iop` does
        status, answer, _ = await registered.peer.call("GET", versions, token_a)
        assert status == 200, answer


# -- query parameters ----------------------------------------------------------------------------------------

BAD_PARAMS = [
    {"offset": "²"},
    {"limit": "²"},
    {"offset": "١"},  # an Arabic-Indic digit: str.isdigit() says yes
    {"offset": str(2**63)},
    {"offset": str(2**31)},
    {"limit": str(2**64)},
    {"offset": "-1"},
    {"offset": "+1"},
    {"offset": " 1"},
    {"offset": "1_000"},
    {"limit": "1e3"},
    {"date_from": "²⁰²⁴-01-01T00:00:00Z"},
]


@pytest.mark.parametrize("params", BAD_PARAMS, ids=[next(iter(p.items()))[0] + "=" + repr(next(iter(p.values())))
                                                     for p in BAD_PARAMS])  # fmt: skip
async def test_sender_query_parameters_are_parsed_strictly(registered: Registered, params: dict[str, str]) -> None:
    url = registered.r["details"] + "/locations"
    status, answer, _ = await registered.peer.call("GET", f"{url}?{urlencode(params)}", registered.c)
    assert status == 200, answer  # valid, authenticated, on an existing resource: no HTTP error (status_codes)
    assert answer["status_code"] == 2001 and "data" not in answer, answer


async def test_sender_query_parameters_in_range_are_served(registered: Registered) -> None:
    url = registered.r["details"] + "/locations"
    for query in ("offset=0&limit=5", f"offset={2**31 - 1}", "offset=007", "limit=0"):
        status, answer, _ = await registered.peer.call("GET", f"{url}?{query}", registered.c)
        assert (status, answer["status_code"]) == (200, 1000), (query, answer)


# -- JSON nested too deep ------------------------------------------------------------------------------------


async def test_json_nested_too_deep_is_2001(registered: Registered) -> None:
    auth = (b"Authorization", token_header(registered.c).encode())
    ctype = (b"Content-Type", b"application/json")
    token_url = registered.r["details"] + "/tokens/NL/TNM/0102ABCD?type=RFID"
    bodies = [  # (…, HTTP status): 400 when the decoder had to give up on the nesting (not JSON it can read)
        ("PUT", token_url, b'{"x": ' + DEEP + b"}", 400),
        ("PATCH", token_url, b'{"x": ' + DEEP + b"}", 400),
        # The decoder sees a list where a role object must be before it goes deep: JSON, not a Credentials
        # object, refused in the OCPI layer.
        ("PUT", registered.r["credentials"], b'{"roles": ' + DEEP + b"}", 200),
        ("PUT", registered.r["credentials"], b'{"x": ' + DEEP + b"}", 400),
    ]
    for method, url, body, expected in bodies:
        status, answer = await raw_request(url, method, [auth, ctype], body)
        assert status == expected, (method, url, answer)
        assert answer["status_code"] == 2001, (method, url, answer)
    status, _, _ = await registered.peer.call("GET", registered.r["versions"], registered.c)
    assert status == 200  # still registered: nothing was replaced


async def test_an_odd_correlation_id_is_not_sent_on_to_the_csms(make_settings: Callable[..., Settings]) -> None:
    async with bench(make_settings) as b:
        token = iop_token("0102ABCD", "ALLOWED")
        url = f"{b.ocpi_base}/tokens/NL/TNM/0102ABCD?type=RFID"
        headers = [(b"Authorization", token_header(b.relay_token).encode()), (b"Content-Type", b"application/json"),
                   (b"X-Request-ID", b"iop-req-1"), (b"X-Correlation-ID", b"corr-\xff\xfe")]  # fmt: skip
        status, answer = await raw_request(url, "PUT", headers, json.dumps(token).encode())
        assert (status, answer["status_code"]) == (201, 1000), answer  # a new token
        await b.csms.wait_for(lambda: len(b.csms.of_kind("token")) == 1)
        [post] = b.csms.of_kind("token")
        assert post.headers["X-Correlation-ID"] == "iop-req-1"  # the request id stands in for it


# -- the store away --------------------------------------------------------------------------------------


async def test_redis_unreachable_is_a_503_to_try_again_never_a_500(make_settings: Callable[..., Settings]) -> None:
    """The IOP's request is fine, the relay's store is not there: 503 + Retry-After + OCPI 3000 (the IOP
    tries again), and the listener answers normally again once Redis is back."""
    with tempfile.TemporaryDirectory(prefix="oe-", dir="/tmp") as d:
        server = EmbeddedRedis(Path(d) / "r")
        await server.start()
        a = "token-a-" + secrets.token_hex(8)
        peer = OcpiPeer()
        await peer.start()
        try:
            settings = make_settings(RELAY_OCPI_TOKEN_A=a, RELAY_FORWARDER_ENABLED="false", RELAY_REDIS_URL=server.url)
            async with running(settings) as relay:
                r = routes(relay)
                await peer.register(r["versions"], a)
                assert peer.relay_token is not None
                url = r["details"] + "/locations"
                await server.stop()
                with captured_logs() as logs:
                    status, answer, headers = await peer.call("GET", url, peer.relay_token)
                assert status == 503, answer
                assert answer["status_code"] == 3000 and headers.get("Retry-After") == "1", (answer, headers)
                assert "ocpi_handler_failed" not in logs.getvalue()
                await server.start()
                status, answer, _ = await peer.call("GET", url, peer.relay_token)
                assert status == 200 and answer["status_code"] == 1000, answer
        finally:
            await peer.close()
            await server.stop()
