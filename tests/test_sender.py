"""The Sender interfaces (L4, S5) as the IOP pulls them through the OCPI listener.

A relay runs in-process with two hosted operators (FR/AB1, FR/AB2) and is registered (FromIOP) by
an IOP-like peer; the peer then pulls with the token the relay gave it, as GIREVE does, following
the ``Link`` headers it is given. Objects go in through the CSMS-facing batch endpoint.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import aiohttp
import msgspec
import pytest

from relay.config import Settings
from relay.ordering import location_key
from relay.service import Relay
from relay.store import StateReader
from tests.conftest import AUTH, example, gireve_location
from tests.ocpi_peer import OcpiPeer, routes, running

PREFIX = "/ingress/2.2.1"
OPERATORS = [
    {"country_code": "FR", "party_id": "AB1", "emi3_id": "FR*AB1", "name": "First CPO"},
    {"country_code": "FR", "party_id": "AB2", "emi3_id": "FR*AB2", "name": "Second CPO"},
]
BASE_TIME = datetime(2024, 1, 1, tzinfo=UTC)
LINK = '<(?P<url>[^>]+)>; rel="next"'


def at(seconds: int) -> str:
    return (BASE_TIME + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


def location_of(party: str, location_id: str, last_updated: str) -> dict[str, Any]:
    """examples/location.json for an operator: ids, evse_ids with its eMI3 prefix, last_updated."""
    doc = gireve_location(location_id, party_id=party, last_updated=last_updated)
    for evse in doc["evses"]:
        evse["evse_id"] = evse["evse_id"].replace("FR*AB1*", f"FR*{party}*")
    return doc


def session_of(party: str, session_id: str, last_updated: str, **changes: Any) -> dict[str, Any]:
    return example("session_example_2_short_finished.json", country_code="FR", party_id=party, id=session_id,
                   last_updated=last_updated, **changes)  # fmt: skip


def cdr_of(party: str, cdr_id: str, last_updated: str, **changes: Any) -> dict[str, Any]:
    return example("cdr_example.json", country_code="FR", party_id=party, id=cdr_id, last_updated=last_updated,
                   **changes)  # fmt: skip


def tariff_of(tariff_id: str, last_updated: str, target: tuple[str, str] | None = None) -> dict[str, Any]:
    doc = example("tariff_1_simple_2hour.json", country_code="FR", party_id="AB1", id=tariff_id,
                  start_date_time="2024-01-01T00:00:00Z", last_updated=last_updated)  # fmt: skip
    if target is not None:
        doc["target_operator_country_code"], doc["target_operator_party_id"] = target
    return doc


def op(method: str, path: str, body: Any = None, query: dict[str, str] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"method": method, "path": PREFIX + path}
    if body is not None:
        out["body"] = body
    if query:
        out["query"] = query
    return out


def ms(stamp: str) -> int:
    return int(datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp() * 1000)


@dataclass
class Page:
    status: int
    body: dict[str, Any]
    headers: dict[str, str]

    @property
    def data(self) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = self.body["data"]
        return data

    @property
    def next(self) -> str | None:
        link = self.headers.get("Link")
        if link is None:
            return None
        m = re.fullmatch(LINK, link)
        assert m is not None, link
        return m.group("url")


class Iop:
    """The relay, the peer registered with it, and the calls the test makes on either side."""

    def __init__(self, relay: Relay, peer: OcpiPeer, http: aiohttp.ClientSession) -> None:
        self.relay = relay
        self.peer = peer
        self.http = http
        assert peer.relay_token is not None
        self.token = peer.relay_token
        self.base = routes(relay)["details"]  # {public_url}/2.2.1

    async def batch(self, ops: list[dict[str, Any]]) -> None:
        url = f"http://127.0.0.1:{self.relay.ingress_port}{PREFIX}/batch"
        async with self.http.post(url, json={"operations": ops}, headers=AUTH) as r:
            data = (await r.json())["data"]
            assert r.status == 200 and data["refused"] == 0, data

    async def get(self, url: str, to: tuple[str, str] | None = ("FR", "AB1"), **params: Any) -> Page:
        """GET as the IOP: its token, OCPI-from = the IOP, OCPI-to = the operator addressed (if any)."""
        headers = {"OCPI-from-country-code": "FR", "OCPI-from-party-id": "107"}
        if to is not None:
            headers.update({"OCPI-to-country-code": to[0], "OCPI-to-party-id": to[1]})
        if not url.startswith("http"):
            url = f"{self.base}/{url}"
        if params:
            url += "?" + urlencode(params)
        status, body, h = await self.peer.call("GET", url, self.token, headers=headers)
        return Page(status, body, h)

    async def crawl(self, url: str, to: tuple[str, str] | None = ("FR", "AB1"), **params: Any) -> list[Page]:
        """Follow the Link headers from a first GET to the last page."""
        pages = [await self.get(url, to, **params)]
        while (nxt := pages[-1].next) is not None:
            assert len(pages) < 50, "Link headers never end"
            pages.append(await self.get(nxt, to))
        for p in pages:
            assert p.status == 200 and p.body["status_code"] == 1000, p.body
        return pages


@contextlib.asynccontextmanager
async def pulling(settings: Settings, token_a: str, peer: OcpiPeer | None = None) -> AsyncIterator[Iop]:
    """A started relay registered (FromIOP, with ``token_a``) by an IOP-like peer that then pulls from it."""
    peer = peer or OcpiPeer()
    await peer.start()
    try:
        async with running(settings) as relay, aiohttp.ClientSession() as http:
            await peer.register(routes(relay)["versions"], token_a)
            yield Iop(relay, peer, http)
    finally:
        await peer.close()


@pytest.fixture
async def iop(make_settings: Callable[..., Settings]) -> AsyncIterator[Callable[..., Any]]:
    """iop(**env) → a started relay hosting OPERATORS, registered by a peer (forwarder off unless asked)."""
    async with contextlib.AsyncExitStack() as stack:

        async def make(**env: str) -> Iop:
            token_a = "token-a-" + secrets.token_hex(8)
            settings = make_settings(**{"RELAY_OCPI_TOKEN_A": token_a, "RELAY_OPERATORS_JSON": json.dumps(OPERATORS),
                                        "RELAY_FORWARDER_ENABLED": "false", **env})  # fmt: skip
            made: Iop = await stack.enter_async_context(pulling(settings, token_a))
            return made

        yield make


# -- Locations: 250 of FR/AB1, 7 of FR/AB2 ----------------------------------------------------------


def ab1_locations() -> list[dict[str, Any]]:
    """250 Locations; item i has last_updated BASE+i s and an id that does not follow that order."""
    return [location_of("AB1", f"L{(i * 37) % 250:03d}", at(i)) for i in range(250)]


def ab2_locations() -> list[dict[str, Any]]:
    """7 Locations with ties in last_updated: their order is by id. Interleaved with AB1's in time."""
    stamps = [at(10), at(10), at(10), at(10), at(200), at(200), at(200)]
    return [location_of("AB2", lid, s) for lid, s in zip(["Z", "A", "M", "B", "Y", "C", "N"], stamps, strict=True)]


async def load_locations(iop: Iop) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    ab1, ab2 = ab1_locations(), ab2_locations()
    ops = [op("PUT", f"/locations/FR/{d['party_id']}/{d['id']}", d) for d in ab1 + ab2]
    random.Random(5).shuffle(ops)  # stored in an order unrelated to last_updated
    await iop.batch(ops)
    return ab1, ab2


def ordered(docs: list[dict[str, Any]]) -> list[str]:
    """OCPI's page order as the relay promises it: last_updated, then id (with the operator in front)."""
    keyed = sorted(docs, key=lambda d: (ms(d["last_updated"]), f"{d['country_code']}:{d['party_id']}:{d['id']}"))
    return [f"{d['party_id']}/{d['id']}" for d in keyed]


def ids(pages: list[Page]) -> list[str]:
    return [f"{d['party_id']}/{d['id']}" for p in pages for d in p.data]


async def test_locations_paginate_with_link_total_and_limit(iop: Callable[..., Any]) -> None:
    env: Iop = await iop()
    ab1, ab2 = await load_locations(env)
    pages = await env.crawl("locations", limit=100)
    assert [len(p.data) for p in pages] == [100, 100, 50]
    assert ids(pages) == ordered(ab1)  # every one once, by last_updated then id, only FR/AB1's
    assert all(p.headers["X-Total-Count"] == "250" and p.headers["X-Limit"] == "100" for p in pages)
    assert pages[-1].next is None
    for n, p in enumerate(pages[:-1], start=1):
        url = urlsplit(p.next or "")
        assert f"{url.scheme}://{url.netloc}{url.path}" == f"{env.base}/locations"
        assert parse_qs(url.query) == {"offset": [str(100 * n)], "limit": ["100"]}
    # A page carries the documents as stored.
    assert pages[0].data[0] == ab1[0]
    # The IOP asking for more than the maximum gets the maximum, and says so.
    big = await env.get("locations", limit=1000)
    assert big.headers["X-Limit"] == "100" and len(big.data) == 100
    assert urlsplit(big.next or "").query == "offset=100&limit=100"
    # The default page is the maximum; a smaller limit is honoured (the IOP pulls CDRs 20 a page).
    assert (await env.get("locations")).headers["X-Limit"] == "100"
    small = await env.get("locations", offset=240, limit=20)
    assert small.headers["X-Limit"] == "20" and len(small.data) == 10 and small.next is None
    past = await env.get("locations", offset=300)
    assert past.data == [] and past.next is None and past.headers["X-Total-Count"] == "250"
    # limit=0 is the default page size (as if absent): not an empty page that a crawl could never leave.
    zero = await env.get("locations", limit=0)
    assert len(zero.data) == 100 and zero.headers["X-Limit"] == "100" and zero.headers["X-Total-Count"] == "250"
    assert urlsplit(zero.next or "").query == "offset=100&limit=100"
    assert ids([zero]) == ordered(ab1)[:100]
    # Without OCPI-to, every hosted operator's objects, merged in one order.
    everyone = await env.crawl("locations", to=None, limit=100)
    assert [len(p.data) for p in everyone] == [100, 100, 57]
    assert ids(everyone) == ordered(ab1 + ab2)
    assert everyone[0].headers["X-Total-Count"] == "257"


async def test_max_page_limit_is_configurable(iop: Callable[..., Any]) -> None:
    env: Iop = await iop(RELAY_STATE_MAX_PAGE_LIMIT="40")
    ab1, _ = await load_locations(env)
    pages = await env.crawl("locations", limit=100)
    assert [len(p.data) for p in pages] == [40] * 6 + [10]
    assert {p.headers["X-Limit"] for p in pages} == {"40"}
    assert ids(pages) == ordered(ab1)


async def test_date_from_inclusive_date_to_exclusive(iop: Callable[..., Any]) -> None:
    env: Iop = await iop()
    ab1, _ = await load_locations(env)
    pages = await env.crawl("locations", limit=30, date_from=at(50), date_to=at(120))
    assert [len(p.data) for p in pages] == [30, 30, 10]
    assert ids(pages) == ordered(ab1[50:120])
    assert {p.headers["X-Total-Count"] for p in pages} == {"70"}
    first_link = parse_qs(urlsplit(pages[0].next or "").query)
    assert first_link == {"offset": ["30"], "limit": ["30"], "date_from": [at(50)], "date_to": [at(120)]}
    only_from = await env.get("locations", date_from=at(249))
    assert ids([only_from]) == ["AB1/" + ab1[249]["id"]]
    only_to = await env.get("locations", date_to=at(1))
    assert ids([only_to]) == ["AB1/" + ab1[0]["id"]]
    assert (await env.get("locations", date_from=at(5), date_to=at(5))).data == []
    # A parameter the relay cannot read: the request reached the OCPI layer, so HTTP 200 with OCPI 2001.
    bad = await env.get("locations", date_from="yesterday")
    assert bad.status == 200 and bad.body["status_code"] == 2001 and "data" not in bad.body
    bad = await env.get("locations", limit="-1")
    assert bad.status == 200 and bad.body["status_code"] == 2001 and "data" not in bad.body


async def test_ocpi_to_selects_one_hosted_operator(iop: Callable[..., Any]) -> None:
    env: Iop = await iop()
    _, ab2 = await load_locations(env)
    pages = await env.crawl("locations", to=("FR", "AB2"))
    assert ids(pages) == ["AB2/A", "AB2/B", "AB2/M", "AB2/Z", "AB2/C", "AB2/N", "AB2/Y"]  # ties by id
    assert ids(pages) == ordered(ab2) and pages[0].headers["X-Total-Count"] == "7"
    # One Location of FR/AB2 is not served to a pull addressed to FR/AB1, and the other way round.
    assert (await env.get("locations/A", to=("FR", "AB1"))).body["status_code"] == 2003
    assert (await env.get("locations/A", to=("FR", "AB2"))).body["data"]["id"] == "A"
    # An operator not hosted here: not the hub's 4001 but 2001 (the OCPI-to-* parameter) in an HTTP 200 for
    # a list, and an unknown Location (404 / 2003, a GET of an object that does not exist) for one object.
    for path in ("locations", "sessions", "tariffs"):
        page = await env.get(path, to=("FR", "ZZZ"))
        assert (page.status, page.body["status_code"]) == (200, 2001) and "data" not in page.body, (path, page.body)
    page = await env.get("locations/A", to=("FR", "ZZZ"))
    assert (page.status, page.body["status_code"]) == (404, 2003) and "data" not in page.body, page.body


async def test_get_one_location_evse_connector(iop: Callable[..., Any]) -> None:
    env: Iop = await iop()
    loc = location_of("AB1", "LOC1", at(1))
    await env.batch(
        [
            op("PUT", "/locations/FR/AB1/LOC1", loc),
            op("PATCH", "/locations/FR/AB1/LOC1/3257/1", {"max_amperage": 10, "last_updated": at(2)}),
        ]
    )
    got = await env.get("locations/LOC1")
    assert got.status == 200 and got.body["status_code"] == 1000
    expected = json.loads(json.dumps(loc))
    expected["evses"][1]["connectors"][0].update(max_amperage=10, last_updated=at(2))
    expected["evses"][1]["last_updated"] = expected["last_updated"] = at(2)
    assert got.body["data"] == expected
    assert (await env.get("locations/LOC1/3257")).body["data"] == expected["evses"][1]
    assert (await env.get("locations/LOC1/3257/1")).body["data"] == expected["evses"][1]["connectors"][0]
    assert (await env.get("locations/LOC1/3256/2", to=None)).body["data"] == expected["evses"][0]["connectors"][1]
    for path in ("locations/NOPE", "locations/LOC1/0000", "locations/LOC1/3257/9", "locations/NOPE/3257/1"):
        page = await env.get(path)
        assert page.status == 404 and page.body["status_code"] == 2003, (path, page.body)
    # The same document the state store holds for it.
    assert env.relay.store is not None
    raw = await StateReader(env.relay.store).one("locations", location_key("FR", "AB1", "LOC1"), "FR:AB1:LOC1")
    assert raw is not None and msgspec.json.decode(raw) == expected


async def test_sender_answers_carry_routing_headers(iop: Callable[..., Any]) -> None:
    """transport_and_format, "Message Routing": TO = the requesting party (its OCPI-from), FROM = the party
    addressed (its OCPI-to), on every answer of a Functional Module, errors included."""
    env: Iop = await iop()
    await load_locations(env)

    def routing(page: Page) -> tuple[tuple[str, str], tuple[str, str]]:
        h = page.headers
        from_party = (h["OCPI-from-country-code"], h["OCPI-from-party-id"])
        return from_party, (h["OCPI-to-country-code"], h["OCPI-to-party-id"])

    iop_id = ("FR", "107")  # what Iop.get sends as OCPI-from
    assert routing(await env.get("locations", to=("FR", "AB2"))) == (("FR", "AB2"), iop_id)
    assert routing(await env.get("locations/A", to=("FR", "AB2"))) == (("FR", "AB2"), iop_id)
    assert routing(await env.get("locations/A", to=("FR", "AB1"))) == (("FR", "AB1"), iop_id)  # 404
    assert routing(await env.get("cdrs", to=("FR", "AB1"), limit="x")) == (("FR", "AB1"), iop_id)  # 2001
    # No OCPI-to (every operator's objects): from the relay's first operator; an operator not hosted: the same.
    assert routing(await env.get("locations", to=None)) == (("FR", "AB1"), iop_id)
    assert routing(await env.get("locations", to=("FR", "ZZZ"))) == (("FR", "AB1"), iop_id)
    # No OCPI-from either: to the IOP as the handshake named it (its HUB role), not [iop]'s configured party.
    status, _, headers = await env.peer.call("GET", f"{env.base}/locations", env.token)
    assert status == 200
    assert (headers["OCPI-to-country-code"], headers["OCPI-to-party-id"]) == ("FR", "107")
    assert (headers["OCPI-from-country-code"], headers["OCPI-from-party-id"]) == ("FR", "AB1")


async def test_routing_headers_without_ocpi_from_name_the_registered_hub(iop: Callable[..., Any]) -> None:
    env: Iop = await iop(RELAY_IOP_PARTY_ID="007")  # the registration's HUB role says FR/107
    status, _, headers = await env.peer.call("GET", f"{env.base}/tariffs", env.token)
    assert status == 200
    assert (headers["OCPI-to-country-code"], headers["OCPI-to-party-id"]) == ("FR", "107")
    # Version details and credentials are configuration modules: never routed.
    routed = {"OCPI-from-country-code": "FR", "OCPI-from-party-id": "107",
              "OCPI-to-country-code": "FR", "OCPI-to-party-id": "AB1"}  # fmt: skip
    for url in (env.base, f"{env.base}/credentials"):
        status, _, headers = await env.peer.call("GET", url, env.token, headers=routed)
        assert status == 200
        assert not {k.lower() for k in headers} & {k.lower() for k in routed}, headers


async def test_sender_lists_need_the_registered_token(iop: Callable[..., Any]) -> None:
    env: Iop = await iop()
    for token in ("wrong", env.peer.token_b):  # the token the IOP gave us is not the one it presents
        status, body, _ = await env.peer.call("GET", f"{env.base}/locations", token)
        assert status == 401 and body["status_code"] == 2000


async def test_version_details_announce_the_four_sender_endpoints(iop: Callable[..., Any]) -> None:
    env: Iop = await iop()
    details = await env.get(env.base, to=None)
    endpoints = {(e["identifier"], e["role"]): e["url"] for e in details.body["data"]["endpoints"]}
    for module in ("locations", "sessions", "cdrs", "tariffs"):
        assert endpoints[(module, "SENDER")] == f"{env.base}/{module}"
        page = await env.get(endpoints[(module, "SENDER")])  # usable as announced
        assert page.status == 200 and page.data == [] and page.headers["X-Total-Count"] == "0"


# -- Sessions, CDRs, Tariffs (S5) ---------------------------------------------------------------------


async def test_sessions_and_cdrs_paginate(iop: Callable[..., Any]) -> None:
    env: Iop = await iop()
    sessions = [session_of("AB1", f"S{i:02d}", at(100 - i)) for i in range(25)]
    cdrs = [cdr_of("AB1", f"C{i:02d}", at(i), session_id=f"S{i:02d}") for i in range(25)]
    others = [session_of("AB2", "S-OTHER", at(1)), cdr_of("AB2", "C-OTHER", at(1))]
    await env.batch(
        [op("PUT", f"/sessions/FR/AB1/{s['id']}", s) for s in sessions]
        + [op("POST", "/cdrs", c) for c in cdrs]
        + [op("PUT", "/sessions/FR/AB2/S-OTHER", others[0]), op("POST", "/cdrs", others[1])]
    )
    for module, docs in (("sessions", sessions), ("cdrs", cdrs)):
        pages = await env.crawl(module, limit=20)
        assert [len(p.data) for p in pages] == [20, 5], module
        assert [d["id"] for p in pages for d in p.data] == [
            d["id"] for d in sorted(docs, key=lambda d: d["last_updated"])
        ]
        assert {p.headers["X-Total-Count"] for p in pages} == {"25"} and {p.headers["X-Limit"] for p in pages} == {"20"}
        assert parse_qs(urlsplit(pages[0].next or "").query) == {"offset": ["20"], "limit": ["20"]}
        assert urlsplit(pages[0].next or "").path.endswith(f"/2.2.1/{module}")
        assert pages[0].data[0] == min(docs, key=lambda d: d["last_updated"])
    window = await env.get("sessions", date_from=at(80), date_to=at(90))
    assert sorted(d["id"] for d in window.data) == [f"S{i:02d}" for i in range(11, 21)]
    # A session PATCH moves it to the end of the order (a new last_updated).
    await env.batch([op("PATCH", "/sessions/FR/AB1/S24", {"kwh": 99.0, "last_updated": at(500)})])
    last = await env.get("sessions", offset=24)
    assert [(d["id"], d["kwh"]) for d in last.data] == [("S24", 99.0)]


async def test_tariff_variants_are_all_served(iop: Callable[..., Any]) -> None:
    env: Iop = await iop()
    default, targeted, other = tariff_of("T1", at(1)), tariff_of("T1", at(2), ("DE", "MP1")), tariff_of("T2", at(3))
    await env.batch([op("PUT", "/tariffs/FR/AB1/T1", default), op("PUT", "/tariffs/FR/AB1/T1", targeted),
                     op("PUT", "/tariffs/FR/AB1/T2", other)])  # fmt: skip
    page = await env.get("tariffs", limit=2)
    rest = await env.get(page.next or "")
    assert page.data + rest.data == [default, targeted, other]  # one tariff_id, two variants: both served
    assert page.headers["X-Total-Count"] == "3" and rest.next is None
    # A DELETE removes that tariff only. (Not one per-eMSP variant: GIREVE has no DELETE of a variant, the
    # ingress refuses it, rules.VARIANT_DELETE_PROBLEM.)
    await env.batch([op("DELETE", "/tariffs/FR/AB1/T2")])
    assert (await env.get("tariffs")).data == [default, targeted]


# -- timestamps without designator are UTC (OCPI types: DateTime) ---------------------------------


@pytest.fixture
def five_hours_west(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The process's local time zone is UTC-5 (a server not set to UTC): local time must not leak in."""
    monkeypatch.setenv("TZ", "XST+5")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


async def test_naive_timestamps_are_utc_in_index_and_filters(iop: Callable[..., Any], five_hours_west: None) -> None:
    assert time.timezone == 5 * 3600
    env: Iop = await iop()
    loc = location_of("AB1", "LOC1", "2024-03-01T12:00:00")
    await env.batch(
        [
            op("PUT", "/locations/FR/AB1/LOC1", loc),
            op("PATCH", "/locations/FR/AB1/LOC1", {"name": "n", "last_updated": "2024-03-01T13:00:00"}),
        ]
    )
    # The PATCH's naive stamp is indexed as UTC…
    aware = await env.get("locations", date_from="2024-03-01T13:00:00Z", date_to="2024-03-01T13:00:01Z")
    assert [d["id"] for d in aware.data] == ["LOC1"]
    # …and a naive filter means UTC too.
    naive = await env.get("locations", date_from="2024-03-01T13:00:00", date_to="2024-03-01T13:00:01")
    assert [d["id"] for d in naive.data] == ["LOC1"]
    assert (await env.get("locations", date_to="2024-03-01T13:00:00")).data == []
