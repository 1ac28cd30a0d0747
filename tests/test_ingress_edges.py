"""Edge input on the ingress (issue 14): values bound for a header, ids bound for a URL path, malformed
Authorization headers, JSON nested too deep, chunked bodies over the limit. Each is refused with a clear 4xx,
never a 500, and nothing is stored.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer

from relay import events
from relay.config import Settings
from relay.ingress import create_app
from relay.json_depth import MAX_JSON_DEPTH
from relay.store import Store, connect
from relay.typedefs import Health
from tests.conftest import AUTH, gireve_location
from tests.ocpi_peer import running
from tests.raw_http import chunked_without_end, raw_request

LIMIT = 4096
PATH = "/ingress/2.2.1/locations/FR/AB1/LOC1"


@pytest.fixture
async def app(make_settings: Callable[..., Settings]) -> AsyncIterator[tuple[TestClient[Any, Any], Store]]:
    settings = make_settings(RELAY_INGRESS_MAX_BODY_BYTES=str(LIMIT))
    store = Store(connect(settings.redis.url, settings.redis), settings.redis)
    await store.load_scripts()
    await store.ensure_groups()
    client = TestClient(TestServer(create_app(settings, store, Health(listeners_up=True))))
    await client.start_server()
    yield client, store
    await client.close()
    await store.close()


def url(client: TestClient[Any, Any], path: str = PATH) -> str:
    return str(client.make_url(path))


async def stored(store: Store) -> int:
    return sum((await store.stream_lengths()).values())


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


def batch_of(*items: dict[str, Any]) -> dict[str, Any]:
    return {"operations": [{"method": "PUT", "path": PATH, "body": gireve_location("LOC1"), **i} for i in items]}


# -- values bound for a header (finding 4) ---------------------------------------------------------------

BAD_CORRELATION = [
    ("CR LF", "corr\r\nX-Injected: 1"),
    ("NUL", "a\x00b"),
    ("DEL", "a\x7fb"),
    ("non-ascii", "corrélation"),
    ("256 characters", "c" * 256),
]


@pytest.mark.parametrize("value", [v for _, v in BAD_CORRELATION], ids=[n for n, _ in BAD_CORRELATION])
async def test_a_batch_correlation_id_that_no_header_can_carry_is_422(
    app: tuple[TestClient[Any, Any], Store], value: str
) -> None:
    client, store = app
    async with client.post("/ingress/2.2.1/batch", json=batch_of({"correlation_id": value}, {}), headers=AUTH) as r:
        answer = await r.json()
    assert r.status == 200, answer
    first, second = answer["data"]["results"]
    assert first["status"] == 422, first
    assert first["errors"][0]["field"] == "X-Correlation-ID" and "printable ASCII" in first["errors"][0]["message"]
    assert second["status"] == 202
    assert await stored(store) == 1


@pytest.mark.parametrize("value", ["corrélation".encode(), b"\xff\xfe", b"c" * 256], ids=["utf-8", "not utf-8", "long"])
async def test_a_correlation_id_header_that_cannot_be_sent_on_is_422(
    app: tuple[TestClient[Any, Any], Store], value: bytes
) -> None:
    client, store = app
    headers = [(b"Authorization", AUTH["Authorization"].encode()), (b"Content-Type", b"application/json"),
               (b"X-Correlation-ID", value)]  # fmt: skip
    status, answer = await raw_request(url(client), "PUT", headers, msgspec.json.encode(gireve_location("LOC1")))
    assert status == 422, answer
    assert answer["errors"][0]["field"] == "X-Correlation-ID"
    assert await stored(store) == 0


async def test_a_printable_correlation_id_of_255_characters_is_kept(app: tuple[TestClient[Any, Any], Store]) -> None:
    client, store = app
    value = ("".join(chr(c) for c in range(0x21, 0x7F)) + " ")[:255] * 3  # every printable character
    value = value[:255]
    async with client.put(PATH, json=gireve_location("LOC1"), headers={**AUTH, "X-Correlation-ID": value}) as r:
        assert r.status == 202, await r.text()
    [(_, raw)] = await store.peek("locations", 10)
    assert events.decode(raw).correlation_id == value


# -- ids bound for a URL path (finding 5) ------------------------------------------------------------------


@pytest.mark.parametrize("oid", [".", ".."])
async def test_dot_segments_are_no_ids(app: tuple[TestClient[Any, Any], Store], oid: str) -> None:
    client, store = app
    path = f"/ingress/2.2.1/locations/FR/AB1/{oid}"
    batch = {"operations": [
        {"method": "PUT", "path": path, "body": gireve_location(oid)},
        {"method": "PATCH", "path": f"{PATH}/{oid}", "body": {"last_updated": "2026-01-01T00:00:00Z"}},
        {"method": "PATCH", "path": f"{PATH}/3256/{oid}", "body": {"last_updated": "2026-01-01T00:00:00Z"}},
    ]}  # fmt: skip
    async with client.post("/ingress/2.2.1/batch", json=batch, headers=AUTH) as r:
        answer = await r.json()
    assert [x["status"] for x in answer["data"]["results"]] == [422, 422, 422], answer
    assert {x["errors"][0]["rule"] for x in answer["data"]["results"]} == {"ocpi.id"}
    encoded = oid.replace(".", "%2E")
    for target in (f"/ingress/2.2.1/locations/FR/AB1/{encoded}", f"{PATH}/{encoded}"):
        status, answer = await raw_request(url(client, target), "PUT",
                                           [(b"Authorization", AUTH["Authorization"].encode())], b"{}")  # fmt: skip
        assert 400 <= status < 500, (target, answer)
    assert await stored(store) == 0


async def test_an_id_with_a_trailing_newline_is_no_id(app: tuple[TestClient[Any, Any], Store]) -> None:
    client, store = app
    batch = {"operations": [{"method": "PUT", "path": f"{PATH}\n", "body": gireve_location("LOC1\n")}]}
    async with client.post("/ingress/2.2.1/batch", json=batch, headers=AUTH) as r:
        [result] = (await r.json())["data"]["results"]
    assert result["status"] == 422 and result["errors"][0]["rule"] == "ocpi.id", result
    assert await stored(store) == 0


async def test_ids_with_query_and_fragment_characters_are_taken_whole(app: tuple[TestClient[Any, Any], Store]) -> None:
    client, store = app
    for oid, escaped in (("LOCX?a=1", "LOCX%3Fa%3D1"), ("LOCY#frag", "LOCY%23frag")):
        async with client.put(f"/ingress/2.2.1/locations/FR/AB1/{escaped}", json=gireve_location(oid),
                              headers=AUTH) as r:  # fmt: skip
            assert r.status == 202, await r.text()
    assert await stored(store) == 2


# -- Authorization (finding 6) -------------------------------------------------------------------------------

BAD_AUTHORIZATION = [b"Bearer \xff\xfe", "Bearer é".encode(), b"Token \xff", b"\xff\xfe", b"Bearer " + b"x" * 5000]


@pytest.mark.parametrize("header", BAD_AUTHORIZATION)
async def test_a_malformed_authorization_header_is_401_never_500(
    app: tuple[TestClient[Any, Any], Store], header: bytes
) -> None:
    client, store = app
    for path in (PATH, "/ingress/2.2.1/batch"):
        method = "POST" if path.endswith("batch") else "PUT"
        status, answer = await raw_request(url(client, path), method, [(b"Authorization", header)], b"{}")
        assert status == 401, (path, answer)
        assert answer["errors"][0]["field"] == "Authorization"
    assert await stored(store) == 0


# -- JSON nested too deep, chunked bodies (finding 7) ---------------------------------------------------------


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 1000])
async def test_json_nested_too_deep_is_400(app: tuple[TestClient[Any, Any], Store], depth: int) -> None:
    client, store = app
    deep = b"[" * depth + b"]" * depth
    body = msgspec.json.encode(gireve_location("LOC1"))[:-1] + b', "x_vendor": ' + deep + b"}"
    async with client.put(PATH, data=body, headers={**AUTH, "Content-Type": "application/json"}) as r:
        answer = await r.json()
        assert r.status == 400, answer
        assert answer["errors"][0]["rule"] == "json"
    assert await stored(store) == 0


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 1000, 100_000])
async def test_json_nested_too_deep_in_a_batch_is_400(app: tuple[TestClient[Any, Any], Store], depth: int) -> None:
    client, store = app
    deep = b"[" * depth + b"]" * depth
    item = msgspec.json.encode(gireve_location("LOC1"))[:-1] + b', "x_vendor": ' + deep + b"}"
    body = b'{"operations": [{"method": "PUT", "path": "' + PATH.encode() + b'", "body": ' + item + b"}]}"
    headers = {**AUTH, "Content-Type": "application/json"}
    async with client.post("/ingress/2.2.1/batch", data=body, headers=headers) as r:
        answer = await r.json()
    if r.status == 200:  # the batch itself decodes: the item is refused
        [result] = answer["data"]["results"]
        assert result["status"] == 400 and result["errors"][0]["rule"] == "json", result
    else:
        assert r.status == 400 and answer["errors"][0]["rule"] == "json", answer
    assert await stored(store) == 0


async def test_nesting_up_to_the_cap_is_accepted(app: tuple[TestClient[Any, Any], Store]) -> None:
    client, store = app
    body = gireve_location("LOC1", x_vendor=nested(MAX_JSON_DEPTH - 1))  # the Location itself is one level
    async with client.put(PATH, json=body, headers=AUTH) as r:
        assert r.status == 202, await r.text()
    assert await stored(store) == 1


async def test_a_chunked_body_over_the_limit_is_413_as_soon_as_it_is(app: tuple[TestClient[Any, Any], Store]) -> None:
    client, store = app
    headers = [(b"Authorization", AUTH["Authorization"].encode()), (b"Content-Type", b"application/json")]
    chunks = [b" " * 1024] * (LIMIT // 1024 + 2)  # just over the limit, and the body does not end
    answer = await chunked_without_end(url(client), "PUT", headers, chunks)
    assert answer is not None, "the relay kept reading past the limit"
    status, body = answer
    assert status == 413, body
    assert body["errors"][0]["rule"] == "size"
    assert await stored(store) == 0


async def test_a_chunked_body_within_the_limit_is_read(app: tuple[TestClient[Any, Any], Store]) -> None:
    client, store = app
    raw = msgspec.json.encode(gireve_location("LOC1"))

    async def gen() -> AsyncIterator[bytes]:
        for i in range(0, len(raw), 100):
            yield raw[i : i + 100]

    async with client.put(PATH, data=gen(), headers={**AUTH, "Content-Type": "application/json"}) as r:
        assert r.status == 202, await r.text()
    assert await stored(store) == 1


# -- the roaming routes ---------------------------------------------------------------------------------------


async def test_roaming_routes_refuse_deep_json_and_odd_correlation_ids(make_settings: Callable[..., Settings]) -> None:
    async with running(make_settings(RELAY_FORWARDER_ENABLED="false")) as relay:
        base = f"http://127.0.0.1:{relay.ingress_port}/ingress/2.2.1"
        auth = (b"Authorization", AUTH["Authorization"].encode())
        ctype = (b"Content-Type", b"application/json")
        deep = b"[" * 1000 + b"]" * 1000
        refs = b'{"location_id": "LOC1", "x": ' + deep + b"}"
        status, answer = await raw_request(f"{base}/tokens/0102ABCD/authorize?type=RFID", "POST", [auth, ctype], refs)
        assert status == 400, answer
        result = b'{"result": "ACCEPTED", "x": ' + deep + b"}"
        status, answer = await raw_request(f"{base}/commands/nope/result", "POST", [auth, ctype], result)
        assert 400 <= status < 500, answer
        refs = json.dumps({"location_id": "LOC1"}).encode()
        status, answer = await raw_request(f"{base}/tokens/0102ABCD/authorize?type=RFID", "POST",
                                           [auth, ctype, (b"X-Correlation-ID", b"a\xffb")], refs)  # fmt: skip
        assert status == 422, answer
        assert answer["errors"][0]["field"] == "X-Correlation-ID"


# -- numbers JSON carries but Python cannot read (found by the hostile suite at 40,000 requests) ----------


async def test_a_number_out_of_range_is_a_refusal_not_a_500(app: tuple[TestClient[Any, Any], Store]) -> None:
    client, store = app
    patch = b'{"name":"p","last_updated":"2026-03-01T00:00:00Z","x":1e999999}'
    r = await client.patch(PATH, data=patch, headers={**AUTH, "Content-Type": "application/json"})
    assert r.status == 422, await r.text()
    assert (await r.json())["errors"][0]["field"] == "body"
    assert await stored(store) == 0
    # Stored by a PUT (the typed decode skips an unknown field): a later PATCH is refused, not a 500,
    # and a PUT of the whole object heals it.
    put = gireve_location("LOC1")
    body = msgspec.json.encode(put)[:-1] + b',"x":1e999999}'
    assert (await client.put(PATH, data=body, headers={**AUTH, "Content-Type": "application/json"})).status == 202
    good = json.dumps({"name": "p", "last_updated": "2026-03-01T00:00:00Z"})
    r = await client.patch(PATH, data=good, headers={**AUTH, "Content-Type": "application/json"})
    assert r.status == 422, await r.text()
    assert (await r.json())["errors"][0]["field"] == "state"
    assert (await client.put(PATH, json=put, headers=AUTH)).status == 202
    r = await client.patch(PATH, data=good, headers={**AUTH, "Content-Type": "application/json"})
    assert r.status == 202, await r.text()
