"""Every row of the delivery policy: ``classify`` and ``backoff_s`` (pure, no I/O)."""

from __future__ import annotations

import json
import random
import socket
import time
from email.utils import formatdate

import aiohttp
import pytest
from aiohttp.client_reqrep import ConnectionKey

from relay import retry
from relay.retry import Kind, backoff_s, classify, retry_after


def ocpi(code: int, message: str = "msg") -> bytes:
    return json.dumps({"status_code": code, "status_message": message, "timestamp": "2026-01-01T00:00:00Z"}).encode()


# (id, http status, body, kind, link, ocpi code kept, unknown_object)
ROWS: list[tuple[str, int, bytes | None, Kind, bool, int | None, bool]] = [
    ("200 ocpi 1000", 200, ocpi(1000), Kind.DELIVERED, False, 1000, False),
    ("201 ocpi 1000", 201, ocpi(1000), Kind.DELIVERED, False, 1000, False),
    ("200 ocpi 1999", 200, ocpi(1999), Kind.DELIVERED, False, 1999, False),
    ("200 ocpi 2000", 200, ocpi(2000), Kind.PERMANENT, False, 2000, False),
    ("200 ocpi 2001", 200, ocpi(2001), Kind.PERMANENT, False, 2001, False),
    ("400 ocpi 2001", 400, ocpi(2001), Kind.PERMANENT, False, 2001, False),
    # L5, decided: an HTTP 404 says the object addressed is not there; any 2xxx beside it only says the
    # client is at fault (receivers pick 2000, 2001 or a 29xx): an unknown object, healed for a PATCH.
    ("404 ocpi 2000 unknown object", 404, ocpi(2000), Kind.PERMANENT, False, 2000, True),
    ("404 ocpi 2001 unknown object", 404, ocpi(2001), Kind.PERMANENT, False, 2001, True),
    ("404 ocpi 2002", 404, ocpi(2002), Kind.PERMANENT, False, 2002, True),
    ("404 ocpi 2901 custom client error", 404, ocpi(2901), Kind.PERMANENT, False, 2901, True),
    ("200 ocpi 2003 unknown location", 200, ocpi(2003), Kind.PERMANENT, False, 2003, True),
    ("400 ocpi 2003 unknown location", 400, ocpi(2003), Kind.PERMANENT, False, 2003, True),
    ("404 ocpi 2003 unknown location", 404, ocpi(2003), Kind.PERMANENT, False, 2003, True),
    # Without a 404, 2001 and others name a fault in the data: not healed (a message is never read).
    ("400 ocpi 2000", 400, ocpi(2000), Kind.PERMANENT, False, 2000, False),
    ("422 ocpi 2001", 422, ocpi(2001), Kind.PERMANENT, False, 2001, False),
    # A 404 with a non-2xxx code is that code's row: server and hub errors are no unknown object.
    ("404 ocpi 3000", 404, ocpi(3000), Kind.TRANSIENT, False, 3000, False),
    ("404 ocpi 4002", 404, ocpi(4002), Kind.TRANSIENT, False, 4002, False),
    ("404 ocpi 1000", 404, ocpi(1000), Kind.TRANSIENT, False, 1000, False),
    ("200 ocpi 3000", 200, ocpi(3000), Kind.TRANSIENT, False, 3000, False),
    ("200 ocpi 3001", 200, ocpi(3001), Kind.TRANSIENT, False, 3001, False),
    ("500 ocpi 3000", 500, ocpi(3000), Kind.TRANSIENT, True, 3000, False),
    ("503 ocpi 3002", 503, ocpi(3002), Kind.TRANSIENT, True, 3002, False),
    # OCPI 4001: the connection is wrong (our OCPI-to-* party), not the event: auth, the link stops.
    ("200 ocpi 4001 unknown receiver", 200, ocpi(4001), Kind.AUTH, False, 4001, False),
    ("400 ocpi 4001 unknown receiver", 400, ocpi(4001), Kind.AUTH, False, 4001, False),
    ("404 ocpi 4001 unknown receiver", 404, ocpi(4001), Kind.AUTH, False, 4001, False),
    ("200 ocpi 4000 hub error", 200, ocpi(4000), Kind.TRANSIENT, True, 4000, False),
    ("200 ocpi 4002", 200, ocpi(4002), Kind.TRANSIENT, False, 4002, False),
    ("200 ocpi 4003", 200, ocpi(4003), Kind.TRANSIENT, False, 4003, False),
    ("500 no body", 500, None, Kind.TRANSIENT, True, None, False),
    ("502 html", 502, b"<html>bad gateway</html>", Kind.TRANSIENT, True, None, False),
    ("503 empty", 503, b"", Kind.TRANSIENT, True, None, False),
    ("504", 504, None, Kind.TRANSIENT, True, None, False),
    ("408", 408, None, Kind.TRANSIENT, False, None, False),
    ("425", 425, None, Kind.TRANSIENT, False, None, False),
    ("429", 429, None, Kind.TRANSIENT, True, None, False),
    ("429 with ocpi body", 429, ocpi(3000), Kind.TRANSIENT, True, 3000, False),
    ("401", 401, None, Kind.AUTH, False, None, False),
    ("401 with ocpi body", 401, ocpi(2000), Kind.AUTH, False, None, False),
    ("403", 403, b"Forbidden", Kind.AUTH, False, None, False),
    # Documented decision: a 2xx without an OCPI envelope is delivered (GIREVE: "retry until 2xx").
    ("200 empty", 200, b"", Kind.DELIVERED, False, None, False),
    ("200 no body", 200, None, Kind.DELIVERED, False, None, False),
    ("200 not json", 200, b"OK", Kind.DELIVERED, False, None, False),
    ("204", 204, None, Kind.DELIVERED, False, None, False),
    ("200 json not ocpi", 200, b'{"result": "fine"}', Kind.DELIVERED, False, None, False),
    ("200 status_code not an int", 200, b'{"status_code": "1000"}', Kind.DELIVERED, False, None, False),
    (
        "422 detail body",
        422,
        b'{"detail": [{"loc": ["body", "evses"], "msg": "field required"}]}',
        Kind.PERMANENT,
        False,
        None,
        False,
    ),  # fmt: skip
    ("400 html", 400, b"<html>Bad Request</html>", Kind.PERMANENT, False, None, False),
    ("404 no body: unknown object", 404, None, Kind.PERMANENT, False, None, True),
    ("302 left over", 302, None, Kind.PERMANENT, False, None, False),
]


@pytest.mark.parametrize(("status", "body", "kind", "link", "code", "unknown"), [r[1:] for r in ROWS],
                         ids=[r[0] for r in ROWS])  # fmt: skip
def test_classify_rows(
    status: int, body: bytes | None, kind: Kind, link: bool, code: int | None, unknown: bool
) -> None:
    out = classify(status, {}, body)
    assert out.kind is kind, out
    assert out.link is link, out
    assert out.http_status == status
    assert out.ocpi_code == code
    assert out.unknown_object is unknown
    assert out.unknown_receiver is (code == 4001)
    assert out.reason


def test_4001_keeps_the_hubs_message_and_is_no_link_failure() -> None:
    out = classify(200, {}, ocpi(4001, "Unknown receiver FR*107"))
    assert out.kind is Kind.AUTH and out.unknown_receiver
    assert (out.http_status, out.ocpi_code, out.ocpi_message) == (200, 4001, "Unknown receiver FR*107")
    assert out.reason == "OCPI 4001 unknown receiver: Unknown receiver FR*107"
    assert not out.link and not out.unknown_object  # stops the link by itself (policy.link_stop), no dead letter


@pytest.mark.parametrize("status", [200, 400])
def test_permanent_keeps_code_and_message(status: int) -> None:
    out = classify(status, {}, ocpi(2001, "Invalid or missing parameters: evses[0].uid"))
    assert out.kind is Kind.PERMANENT
    assert (out.http_status, out.ocpi_code) == (status, 2001)
    assert out.ocpi_message == "Invalid or missing parameters: evses[0].uid"
    assert "2001" in out.reason and "evses[0].uid" in out.reason


def test_non_ocpi_4xx_body_is_in_the_reason() -> None:
    body = b'{"detail": [{"loc": ["body", "evses"], "msg": "field required"}]}'
    out = classify(422, {}, body)
    assert out.kind is Kind.PERMANENT
    assert "422" in out.reason and "field required" in out.reason and "evses" in out.reason
    assert out.ocpi_code is None


def test_3xxx_in_5xx_keeps_the_ocpi_code_and_message() -> None:
    out = classify(500, {}, ocpi(3000, "backend down"))
    assert out.kind is Kind.TRANSIENT and out.link
    assert (out.ocpi_code, out.ocpi_message) == (3000, "backend down")


@pytest.mark.parametrize(
    ("status", "body"),
    [(429, None), (503, None), (200, ocpi(3000)), (408, None), (200, ocpi(4002))],
    ids=["429", "503", "200+3000", "408", "200+4002"],
)
def test_retry_after_seconds(status: int, body: bytes | None) -> None:
    out = classify(status, {"Retry-After": "7"}, body)
    assert out.kind is Kind.TRANSIENT
    assert out.retry_after_s == 7.0


def test_retry_after_http_date() -> None:
    out = classify(429, {"Retry-After": formatdate(time.time() + 120, usegmt=True)})
    assert out.kind is Kind.TRANSIENT and out.link
    assert out.retry_after_s is not None and 115 <= out.retry_after_s <= 121


def test_retry_after_forms() -> None:
    now = 1_750_000_000.0
    assert retry_after({"Retry-After": " 3 "}, now) == 3.0
    assert retry_after({"Retry-After": formatdate(now + 30, usegmt=True)}, now) == pytest.approx(30, abs=1)
    assert retry_after({"Retry-After": formatdate(now - 30, usegmt=True)}, now) == 0.0  # in the past: now
    assert retry_after({"Retry-After": "soon"}, now) is None
    assert retry_after({}, now) is None
    assert classify(503, {}).retry_after_s is None


def _connector_error(os_error: OSError) -> aiohttp.ClientConnectorError:
    key = ConnectionKey("iop.example", 443, True, True, None, None, None)
    return aiohttp.ClientConnectorError(key, os_error)


EXCEPTIONS: list[tuple[str, BaseException]] = [
    ("asyncio timeout", TimeoutError()),
    ("builtin timeout", TimeoutError()),
    ("server timeout", aiohttp.ServerTimeoutError("read timed out")),
    ("connection refused", ConnectionRefusedError(111, "Connection refused")),
    ("connector refused", _connector_error(ConnectionRefusedError(111, "Connection refused"))),
    ("dns", _connector_error(socket.gaierror(-2, "Name or service not known"))),
    ("server disconnected", aiohttp.ServerDisconnectedError()),
    ("payload", aiohttp.ClientPayloadError("Response payload is not completed")),
    ("reset", ConnectionResetError(104, "Connection reset by peer")),
    ("unknown client error", aiohttp.ClientError("odd")),
]


@pytest.mark.parametrize("exc", [e for _, e in EXCEPTIONS], ids=[n for n, _ in EXCEPTIONS])
def test_exceptions_are_transient_link_failures(exc: BaseException) -> None:
    out = classify(None, exc=exc)
    assert out.kind is Kind.TRANSIENT
    assert out.link is True and out.unsent is False
    assert out.http_status is None


# The HTTP library refusing to build the request (a header value with a control character, a URL it
# cannot parse): nothing reached the IOP, and retrying the same event cannot succeed.
REFUSED: list[tuple[str, BaseException]] = [
    ("header with a control character", ValueError("Forbidden control character detected in headers.")),
    ("header not encodable", UnicodeEncodeError("utf-8", "\udcff", 0, 1, "surrogates not allowed")),
    ("invalid url", aiohttp.InvalidURL("http://[::1/x")),
    ("id that cannot be a path segment", ValueError("'..' cannot be a URL path segment")),
]


@pytest.mark.parametrize("exc", [e for _, e in REFUSED], ids=[n for n, _ in REFUSED])
def test_a_request_the_client_refuses_is_permanent_and_not_a_link_failure(exc: BaseException) -> None:
    out = classify(None, exc=exc)
    assert out.kind is Kind.PERMANENT
    assert out.link is False and out.unsent is True
    assert out.http_status is None
    assert "refused by the HTTP client" in out.reason and str(exc) in out.reason


async def test_dns_error_from_a_real_lookup_is_transient() -> None:
    # PITFALLS 3: DNS failures must be retried like any connection error.
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientConnectorError) as info:
            async with http.get("http://relay-test.invalid/", timeout=aiohttp.ClientTimeout(total=5)):
                pass
    out = classify(None, exc=info.value)
    assert out.kind is Kind.TRANSIENT and out.link


async def test_connection_refused_from_a_real_connect_is_transient() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        async with aiohttp.ClientSession() as http:
            with pytest.raises(aiohttp.ClientConnectorError) as info:
                async with http.get(f"http://127.0.0.1:{port}/"):
                    pass
    out = classify(None, exc=info.value)
    assert out.kind is Kind.TRANSIENT and out.link and "connection" in out.reason


# -- backoff ------------------------------------------------------------------------------------


@pytest.mark.parametrize("attempt", [1, 2, 3, 5, 8, 20])
def test_backoff_full_jitter_within_cap(attempt: int) -> None:
    rng = random.Random(attempt)
    initial, cap_max = 0.5, 10.0
    cap = min(cap_max, initial * 2 ** (attempt - 1))
    waits = [backoff_s(attempt, initial, cap_max, rng=rng) for _ in range(400)]
    assert all(0 <= w <= cap for w in waits)
    # Full jitter: spread over the whole [0, cap] range, not bunched near the cap or near zero.
    assert min(waits) < cap * 0.1
    assert max(waits) > cap * 0.9
    assert 0.35 * cap < sum(waits) / len(waits) < 0.65 * cap


def test_backoff_cap_grows_exponentially_then_stops() -> None:
    def largest(attempt: int) -> float:
        rng = random.Random(7)
        return max(backoff_s(attempt, 1.0, 30.0, rng=rng) for _ in range(300))

    tops = [largest(a) for a in (1, 2, 3, 4, 5, 6, 7, 12)]
    assert tops[0] <= 1.0 and tops[1] <= 2.0 and tops[2] <= 4.0 and tops[3] <= 8.0 and tops[4] <= 16.0
    assert tops[1] > 1.5 and tops[2] > 3.0 and tops[3] > 6.0 and tops[4] > 12.0
    assert all(25.0 < t <= 30.0 for t in tops[5:])  # capped at max_s


def test_backoff_floor_is_honoured() -> None:
    rng = random.Random(3)
    for attempt in range(1, 10):
        assert backoff_s(attempt, 0.01, 0.2, floor_s=1.0, rng=rng) >= 1.0
    # A Retry-After longer than the cap still wins: the IOP said when.
    assert backoff_s(30, 0.01, 0.2, floor_s=5.0, rng=rng) == 5.0
    # A floor of 0 (Retry-After: 0) leaves the jitter alone.
    assert backoff_s(1, 0.01, 0.2, floor_s=0.0, rng=rng) <= 0.01


def test_backoff_is_deterministic_with_a_seeded_rng() -> None:
    a = [backoff_s(n, 1, 60, rng=random.Random(42)) for n in range(1, 8)]
    b = [backoff_s(n, 1, 60, rng=random.Random(42)) for n in range(1, 8)]
    assert a == b


def test_delivered_outcomes_are_shared_and_the_cache_stays_bounded() -> None:
    body = b'{"status_code": 1000, "status_message": "Success", "timestamp": "2026-01-01T00:00:00Z"}'
    first, again = classify(200, {}, body), classify(200, {"Retry-After": "5"}, body)
    assert first is again and first.kind is Kind.DELIVERED and first.ocpi_message == "Success"
    assert first.retry_after_s is None  # a delivered outcome carries no wait
    for n in range(600):  # a receiver that stamps every answer differently
        msg = f'{{"status_code": 1000, "status_message": "ok {n}"}}'.encode()
        out = classify(201, {}, msg)
        assert out.kind is Kind.DELIVERED and out.ocpi_message == f"ok {n}" and out.http_status == 201
    assert len(retry._delivered) <= 256
