"""GIREVE checklist, Locations (L1–L5), at the wire.

The CSMS sends Locations, EVSEs and Connectors to the ingress; GIREVE (``tests.gireve_support``) records
what reaches the Receiver endpoint its version details announced, pulls from the relay's Sender
interface, and answers PATCHes of objects it does not know. docs/gireve.md says how the relay meets each
line and which deeper tests back these up.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

from relay.config import Settings
from relay.timestamps import parse_datetime
from tests.fake_iop import Received, Reply
from tests.gireve_support import (
    AB1,
    DECOY_SENDER,
    IOP,
    IOP_BASE,
    OCPI_TIME,
    OPERATORS,
    Gireve,
    at_iop,
    gireve,
    location,
    routing,
)
from tests.ocpi_peer import cli
from tests.waiting import wait_until

LOC1 = at_iop("locations", *AB1, "LOC1")


def names(g: Gireve, location_id: str = "LOC1") -> list[str]:
    return [r.json()["name"] for r in g.pushed("locations", *AB1, location_id)]


def problems(answer: dict[str, Any]) -> set[tuple[str, str]]:
    return {(p["field"], p["rule"]) for p in answer.get("errors") or []}


def fields(answer: dict[str, Any]) -> set[str]:
    return {p["field"] for p in answer.get("errors") or []}


# -- L1 -------------------------------------------------------------------------------------------------


async def test_L1_put_and_patch_of_location_evse_and_connector_reach_the_receiver_gireve_announced(
    make_settings: Callable[..., Settings],
) -> None:
    async with gireve(make_settings) as g:
        loc = location()
        evse = dict(loc["evses"][0], last_updated="2026-03-09T10:02:00Z")
        connector = dict(evse["connectors"][0], last_updated="2026-03-09T10:04:00Z")
        ops = [
            ("PUT", "/locations/FR/AB1/LOC1", loc),
            ("PATCH", "/locations/FR/AB1/LOC1", {"name": "Renamed", "last_updated": "2026-03-09T10:01:00Z"}),
            ("PUT", "/locations/FR/AB1/LOC1/3256", evse),
            ("PATCH", "/locations/FR/AB1/LOC1/3256", {"status": "CHARGING", "last_updated": "2026-03-09T10:03:00Z"}),
            ("PUT", "/locations/FR/AB1/LOC1/3256/1", connector),
            ("PATCH", "/locations/FR/AB1/LOC1/3256/1", {"max_amperage": 32, "last_updated": "2026-03-09T10:05:00Z"}),
        ]
        for method, path, body in ops:
            await g.send(method, path, body)
        await g.iop.wait_for(lambda: len(g.iop.delivered()) == len(ops))
        assert [(r.method, r.path, r.json()) for r in g.iop.received] == [(m, IOP_BASE + p, b) for m, p, b in ops]
        assert not [r for r in g.iop.received if r.path.startswith(DECOY_SENDER)]  # the RECEIVER endpoint only


async def test_L1_timestamps_reach_gireve_in_utc_with_z(make_settings: Callable[..., Settings]) -> None:
    """OCPI DateTimes are UTC: a stamp with an offset is converted, an over-long fraction trimmed (string(25))."""
    async with gireve(make_settings) as g:
        loc = location(last_updated="2026-03-09T12:17:09.123456+02:00")
        loc["evses"][0]["last_updated"] = "2026-03-09T11:17:09+01:00"
        await g.send("PUT", "/locations/FR/AB1/LOC1", loc)
        await g.send("PATCH", "/locations/FR/AB1/LOC1/3257", {"status": "AVAILABLE",
                                                              "last_updated": "2026-03-09T05:20:00-05:00"})  # fmt: skip
        await g.iop.wait_for(lambda: len(g.iop.delivered()) == 2)
        put, patch = (r.json() for r in g.iop.received)
        assert_utc(put["last_updated"], datetime(2026, 3, 9, 10, 17, 9, 123000, tzinfo=UTC))
        assert_utc(put["evses"][0]["last_updated"], datetime(2026, 3, 9, 10, 17, 9, tzinfo=UTC))
        assert_utc(patch["last_updated"], datetime(2026, 3, 9, 10, 20, tzinfo=UTC))
        _, pulled, _ = await g.as_gireve("GET", "/locations/LOC1")  # as stored: the same
        assert_utc(pulled["data"]["last_updated"], datetime(2026, 3, 9, 10, 20, tzinfo=UTC))  # moved by its EVSE
        assert_utc(pulled["data"]["evses"][0]["last_updated"], datetime(2026, 3, 9, 10, 17, 9, tzinfo=UTC))
        assert_utc(pulled["data"]["evses"][1]["last_updated"], datetime(2026, 3, 9, 10, 20, tzinfo=UTC))


def assert_utc(stamp: str, expected: datetime) -> None:
    """Written in UTC with Z within string(25), and the same instant (a trimmed fraction: to the millisecond)."""
    assert OCPI_TIME.match(stamp), stamp
    assert timedelta(0) <= parse_datetime(stamp) - expected < timedelta(milliseconds=1), stamp


# -- L2 -------------------------------------------------------------------------------------------------


def _without(doc: dict[str, Any], *path: str | int) -> dict[str, Any]:
    inner: Any = doc
    for step in path[:-1]:
        inner = inner[step]
    del inner[path[-1]]
    return doc


async def test_L2_what_gireve_requires_is_refused_at_the_ingress_and_never_sent(
    make_settings: Callable[..., Settings],
) -> None:
    async with gireve(make_settings) as g:
        wrong_prefix = location()
        wrong_prefix["evses"][0]["evse_id"] = "FR*XY9*E041503001"
        cases = [
            (_without(location(), "owner"), "$.owner.name"),
            (_without(location(), "operator"), "$.operator.name"),
            (_without(location(), "evses", 0, "capabilities"), "$.evses[0].capabilities"),
            (_without(location(), "evses", 0, "connectors", 1, "tariff_ids"), "$.evses[0].connectors[1].tariff_ids"),
            (_without(location(), "evses", 1, "evse_id"), "$.evses[1].evse_id"),
            (wrong_prefix, "$.evses[0].evse_id"),
        ]
        for body, field in cases:
            answer = await g.send("PUT", "/locations/FR/AB1/LOC1", body, expect=422)
            assert field in fields(answer) and all(r.startswith("gireve.L2") for _, r in problems(answer)), answer
        evse = _without(location()["evses"][0], "capabilities")
        answer = await g.send("PUT", "/locations/FR/AB1/LOC1/3256", evse, expect=422)
        assert fields(answer) == {"$.capabilities"}, answer
        # evse_id may be left out of a REMOVED EVSE only.
        removed = _without(location(), "evses", 1, "evse_id")
        removed["evses"][1]["status"] = "REMOVED"
        await g.send("PUT", "/locations/FR/AB1/LOC1", removed)
        await g.iop.wait_for(lambda: len(g.iop.delivered()) == 1)
        assert [r.json() for r in g.iop.received] == [removed]  # nothing refused went out


async def test_L2_evse_id_has_the_emi3_evse_part(make_settings: Callable[..., Settings]) -> None:
    async with gireve(make_settings) as g:
        for evse_id, expect in [("FR*AB1*041503001", 422), ("FRAB1041503001", 422), ("FR*AB1*E041503001", 202),
                                ("FRAB1E041503001", 202)]:  # fmt: skip
            body = location()
            body["evses"][0]["evse_id"] = evse_id
            answer = await g.send("PUT", "/locations/FR/AB1/LOC1", body, expect=expect)
            assert expect == 202 or fields(answer) == {"$.evses[0].evse_id"}, (evse_id, answer)


async def test_L2_empty_capabilities_or_tariff_ids_are_refused(make_settings: Callable[..., Settings]) -> None:
    async with gireve(make_settings) as g:
        no_capabilities, no_tariffs = location(), location()
        no_capabilities["evses"][0]["capabilities"] = []
        no_tariffs["evses"][1]["connectors"][0]["tariff_ids"] = []
        for body, field in [(no_capabilities, "$.evses[0].capabilities"),
                            (no_tariffs, "$.evses[1].connectors[0].tariff_ids")]:  # fmt: skip
            answer = await g.send("PUT", "/locations/FR/AB1/LOC1", body, expect=422)
            assert field in fields(answer), answer
        patch = {"capabilities": [], "last_updated": "2026-03-09T10:00:00Z"}
        await g.send("PATCH", "/locations/FR/AB1/LOC1/3256", patch, expect=422)
        assert g.iop.received == []


async def test_L2_each_operator_is_held_to_its_own_emi3_id(make_settings: Callable[..., Settings]) -> None:
    third = {"country_code": "FR", "party_id": "AB3", "emi3_id": "FR*XYZ", "name": "eMI3 id not its party id"}
    async with gireve(make_settings, operators=[*OPERATORS, third]) as g:
        theirs = location("LOC2", party="AB2")
        assert theirs["evses"][0]["evse_id"] == "FR*AB2*E041503001"
        await g.send("PUT", "/locations/FR/AB2/LOC2", theirs)
        theirs["evses"][1]["evse_id"] = "FRAB2E041503002"
        await g.send("PUT", "/locations/FR/AB2/LOC2", theirs)
        ours = location("LOC2", party="AB1")  # FR*AB1*… EVSE ids under FR/AB2
        answer = await g.send("PUT", "/locations/FR/AB2/LOC2", dict(ours, party_id="AB2"), expect=422)
        assert fields(answer) == {"$.evses[0].evse_id", "$.evses[1].evse_id"}, answer
        # FR/AB3's eMI3 id is FR*XYZ ([[operators]] emi3_id): its EVSE ids begin with that, not with FR*AB3.
        answer = await g.send("PUT", "/locations/FR/AB3/LOC3", location("LOC3", party="AB3"), expect=422)
        assert fields(answer) == {"$.evses[0].evse_id", "$.evses[1].evse_id"}, answer
        await g.send(
            "PUT", "/locations/FR/AB3/LOC3", location("LOC3", party="AB3", evses=location("LOC3", party="XYZ")["evses"])
        )
        await g.iop.wait_for(lambda: len(g.iop.delivered()) == 3)


async def test_L2_connectors_with_different_tariff_ids_are_sent_with_a_warning(
    make_settings: Callable[..., Settings],
) -> None:
    async with gireve(make_settings) as g:
        body = location()
        assert [c["tariff_ids"] for c in body["evses"][0]["connectors"]] == [["11"], ["13"]]
        answer = await g.send("PUT", "/locations/FR/AB1/LOC1", body)  # strict profile: a warning, not a refusal
        assert [(w["field"], w["rule"]) for w in answer["data"]["warnings"]] == [
            ("$.evses[0].connectors[1].tariff_ids", "gireve.L2.tariff_ids_per_evse")
        ]
        await g.iop.wait_for(lambda: len(g.iop.delivered()) == 1)
        assert g.iop.received[0].json() == body


async def test_L2_the_warn_profile_sends_with_warnings(make_settings: Callable[..., Settings]) -> None:
    async with gireve(make_settings, RELAY_INGRESS_PROFILE="warn") as g:
        body = _without(location(), "owner")
        answer = await g.send("PUT", "/locations/FR/AB1/LOC1", body)
        assert "$.owner.name" in {w["field"] for w in answer["data"]["warnings"]}, answer
        await g.iop.wait_for(lambda: len(g.iop.delivered()) == 1)


# -- L3 -------------------------------------------------------------------------------------------------


async def test_L3_fifo_per_location_retried_on_timeouts_and_any_failure(make_settings: Callable[..., Settings]) -> None:
    async with gireve(make_settings, RELAY_IOP_REQUEST_TIMEOUT_S="0.4") as g:
        failing = {  # one failure of each kind, on the first attempt of each update
            "2": Reply(status=503, ocpi=None, delay_s=1.0),  # answered after the relay's 0.4 s timeout
            "3": Reply(status=503, ocpi=None),
            "4": Reply(status=200, ocpi=3001),
            "5": Reply(status=429, ocpi=None, headers={"Retry-After": "0"}),
            "6": Reply(status=500, ocpi=None, body=b"<html>oops</html>"),
            "7": Reply(status=400, ocpi=3000),
        }

        def script(r: Received) -> Reply | None:
            return failing.pop(r.json()["name"], None) if r.path == LOC1 else None

        g.iop.script = script
        for n in range(1, 8):
            await g.send("PUT", "/locations/FR/AB1/LOC1", location(name=str(n)))
            await g.send("PUT", "/locations/FR/AB1/LOC2", location("LOC2", name=str(n)))
        await g.iop.wait_for(lambda: len(names(g)) == 7 and len(names(g, "LOC2")) == 7)
        assert names(g) == [str(n) for n in range(1, 8)] and names(g, "LOC2") == [str(n) for n in range(1, 8)]
        tried = [r.json()["name"] for r in g.iop.arrived if r.path == LOC1]
        assert sorted(tried) == tried and set(tried) == {str(n) for n in range(1, 8)}  # in order, each again
        assert all(tried.count(str(n)) >= 2 for n in range(2, 8)), tried  # until it was taken
        first, second = [r for r in g.iop.arrived if r.path == LOC1][1:3]
        await g.iop.wait_for(lambda: first.reply is not None)
        assert second.at < first.answered_at  # the relay gave up on the slow attempt and sent it again


async def test_L3_with_park_an_update_gireve_refuses_keeps_the_later_ones_and_the_replay_sends_the_current_state(
    make_settings: Callable[..., Settings],
) -> None:
    async with gireve(make_settings, RELAY_FORWARDER_ON_PERMANENT="park") as g:
        refusing = [True]
        g.iop.script = lambda r: Reply(status=400, ocpi=2001) if refusing[0] and r.json()["name"] == "2" else None
        for n in range(1, 5):
            await g.send("PUT", "/locations/FR/AB1/LOC1", location(name=str(n)))

        async def three_kept() -> bool:
            return len(await g.dead("locations")) == 3

        await wait_until(three_kept, what="the refused update and the two behind it kept")
        assert names(g) == ["1"] and [r.json()["name"] for r in g.iop.received] == ["1", "2"]
        # GIREVE's problem is fixed; the operator replays the refused update: GIREVE gets the Location as
        # the relay holds it now ("4"), in the key's order slot, not "2" and then every step after it.
        refusing[0] = False
        dead = {json.loads(d.event.body)["name"]: d.id for d in await g.dead("locations")}
        res = await cli(g.relay.settings, "dlq", "replay", dead["2"])
        assert res.exit_code == 0, res.output
        await g.iop.wait_for(lambda: names(g) == ["1", "4"])
        # The updates parked behind it replay as one, the newest ("3" superseded): never older than "4".
        res = await cli(g.relay.settings, "dlq", "replay", "--all", "--yes")
        assert res.exit_code == 0 and "skipped" not in res.output, res.output  # "3" and "4" are newer than "2"
        assert json.loads(res.stdout.strip().splitlines()[-1]) == {"selected": 2, "replayed": 1, "superseded": 1}
        await g.iop.wait_for(lambda: names(g) == ["1", "4", "4"], timeout=5)
        await wait_until(g.drained, what="nothing left")
        assert await g.dead("locations") == []


# -- L4 -------------------------------------------------------------------------------------------------


async def test_L4_gireve_pulls_the_locations_page_by_page(make_settings: Callable[..., Settings]) -> None:
    async with gireve(make_settings, RELAY_FORWARDER_ENABLED="false") as g:
        for n in range(1, 6):
            await g.send(
                "PUT", f"/locations/FR/AB1/LOC{n}", location(f"LOC{n}", last_updated=f"2026-03-0{n}T10:00:00Z")
            )
        await g.send("PUT", "/locations/FR/AB2/LOC9", location("LOC9", party="AB2"))  # another operator's
        status, page, headers = await g.as_gireve("GET", "/locations?limit=2")
        assert (status, page["status_code"], headers["X-Total-Count"], headers["X-Limit"]) == (200, 1000, "5", "2")
        ids = [d["id"] for d in page["data"]]
        while "Link" in headers:
            url, rel = headers["Link"].split(";", 1)
            assert rel.strip() == 'rel="next"', headers["Link"]
            query = parse_qs(urlsplit(url.strip("<>")).query)
            assert query["limit"] == ["2"] and query["offset"] == [str(len(ids))]
            status, page, headers = await g.peer.call("GET", url.strip("<>"), g.relay_token, headers=routing(IOP, AB1))
            ids += [d["id"] for d in page["data"]]
        assert ids == ["LOC1", "LOC2", "LOC3", "LOC4", "LOC5"]  # by last_updated, each once
        dates = "date_from=2026-03-02T10:00:00Z&date_to=2026-03-04T10:00:00Z"  # from inclusive, to exclusive
        _, page, headers = await g.as_gireve("GET", f"/locations?{dates}")
        assert [d["id"] for d in page["data"]] == ["LOC2", "LOC3"] and headers["X-Total-Count"] == "2"
        _, page, headers = await g.as_gireve("GET", "/locations?limit=1000&offset=3")
        assert headers["X-Limit"] == "100" and [d["id"] for d in page["data"]] == ["LOC4", "LOC5"]


async def test_L4_gireve_gets_one_location_evse_or_connector_as_the_csms_last_sent_it(
    make_settings: Callable[..., Settings],
) -> None:
    async with gireve(make_settings, RELAY_FORWARDER_ENABLED="false") as g:
        await g.send("PUT", "/locations/FR/AB1/LOC1", location())
        await g.send(
            "PATCH", "/locations/FR/AB1/LOC1/3256", {"status": "CHARGING", "last_updated": "2026-03-09T10:00:00Z"}
        )
        await g.send("PATCH", "/locations/FR/AB1/LOC1/3256/2", {"max_amperage": 32,
                                                                "last_updated": "2026-03-09T10:01:00Z"})  # fmt: skip
        _, whole, _ = await g.as_gireve("GET", "/locations/LOC1")
        _, evse, _ = await g.as_gireve("GET", "/locations/LOC1/3256")
        _, connector, _ = await g.as_gireve("GET", "/locations/LOC1/3256/2")
        assert whole["data"]["id"] == "LOC1" and whole["data"]["evses"][0] == evse["data"]
        assert (evse["data"]["uid"], evse["data"]["status"]) == ("3256", "CHARGING")
        assert evse["data"]["connectors"][1] == connector["data"]
        assert (connector["data"]["id"], connector["data"]["max_amperage"]) == ("2", 32)
        for path in ("/locations/LOC2", "/locations/LOC1/9999", "/locations/LOC1/3256/9"):
            status, answer, _ = await g.as_gireve("GET", path)
            assert status in (200, 404) and 2000 <= answer["status_code"] < 3000, (path, answer)


# -- L5 -------------------------------------------------------------------------------------------------


async def heal_case(g: Gireve, refusal: Reply) -> list[Received]:
    """GIREVE refuses the first PATCH of EVSE 3256 with ``refusal``; what it received for LOC1, in order."""
    await g.send("PUT", "/locations/FR/AB1/LOC1", location())
    await g.iop.wait_for(lambda: len(g.iop.delivered()) == 1)
    release = asyncio.Event()
    held = Reply(status=refusal.status, ocpi=refusal.ocpi, body=refusal.body, hold=release)
    g.iop.script = lambda r: held if r.method == "PATCH" and r.path == LOC1 + "/3256" and not release.is_set() else None
    await g.send("PATCH", "/locations/FR/AB1/LOC1/3256", {"status": "CHARGING", "last_updated": "2026-03-09T10:00:00Z"})
    await g.iop.wait_for(lambda: len(g.iop.arrived) == 2)
    await g.send("PATCH", "/locations/FR/AB1/LOC1", {"name": "After", "last_updated": "2026-03-09T10:01:00Z"})
    release.set()
    await g.iop.wait_for(lambda: len(g.iop.received) == 4)
    return g.iop.received


async def test_L5_a_patch_gireve_does_not_know_is_healed_with_a_put_of_the_whole_object(
    make_settings: Callable[..., Settings],
) -> None:
    async with gireve(make_settings) as g:
        got = await heal_case(g, Reply(status=200, ocpi=2003))  # OCPI 2003: unknown location
        assert [(r.method, r.path) for r in got] == [("PUT", LOC1), ("PATCH", LOC1 + "/3256"), ("PUT", LOC1),
                                                     ("PATCH", LOC1)]  # fmt: skip
        heal = got[2].json()  # the whole current Location, the refused PATCH merged in, before the next update
        assert heal["id"] == "LOC1" and [e["uid"] for e in heal["evses"]] == ["3256", "3257"]
        assert heal["evses"][0]["status"] == "CHARGING"
        _, pulled, _ = await g.as_gireve("GET", "/locations/LOC1")
        assert heal == pulled["data"]
        assert await g.dead("locations") == []


async def test_L5_a_404_whose_ocpi_body_says_the_object_is_unknown_is_healed(
    make_settings: Callable[..., Settings],
) -> None:
    async with gireve(make_settings) as g:
        body = json.dumps(
            {"status_code": 2001, "status_message": "Unknown location", "timestamp": "2026-03-09T10:00:00Z"}
        )
        got = await heal_case(g, Reply(status=404, ocpi=None, body=body.encode()))
        assert [(r.method, r.path) for r in got] == [("PUT", LOC1), ("PATCH", LOC1 + "/3256"), ("PUT", LOC1),
                                                     ("PATCH", LOC1)]  # fmt: skip
        assert got[2].json()["evses"][0]["status"] == "CHARGING"
        assert await g.dead("locations") == []
