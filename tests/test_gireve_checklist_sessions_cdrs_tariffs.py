"""GIREVE checklist, Sessions, CDRs and Tariffs (S1–S5, F1–F3), at the wire.

The CSMS sends Sessions, CDRs and Tariffs to the ingress; GIREVE (``tests.gireve_support``) records what
reaches its Receivers, and pulls from the relay's Sender interfaces. docs/gireve.md says how the relay
meets each line and which deeper tests back these up.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from relay.config import Settings
from tests.fake_iop import Received, Reply
from tests.gireve_support import (
    AB1,
    AB2,
    IOP,
    OPERATORS,
    Gireve,
    at_iop,
    cdr,
    cdr_token,
    gireve,
    routing,
    session,
    tariff,
)
from tests.waiting import wait_until

SES1 = at_iop("sessions", *AB1, "S1")
CDRS = at_iop("cdrs")
T1 = at_iop("tariffs", *AB1, "T1")
ADVENIR = {"country_code": "$$", "party_id": "ADV", "uid": "12345671234567", "type": "RFID",
           "contract_id": "Gireve2Advenir"}  # fmt: skip  # GIREVE's cpo_sessions.md and cpo_cdrs.md


def statuses(g: Gireve, session_id: str = "S1") -> list[str]:
    return [r.json()["status"] for r in g.pushed("sessions", *AB1, session_id)]


def warnings(answer: dict[str, Any]) -> list[str]:
    return [w["rule"] for w in answer["data"].get("warnings") or []]


async def pages(g: Gireve, path: str) -> list[tuple[dict[str, Any], dict[str, str]]]:
    """GIREVE's pull of a Sender list: the first page, then each ``Link`` until there is none."""
    status, page, headers = await g.as_gireve("GET", path, frm=IOP)
    assert status == 200 and page["status_code"] == 1000, page
    got = [(page, headers)]
    while "Link" in headers:
        assert len(got) < 20, headers
        url = headers["Link"].split(";", 1)[0].strip("<>")
        _, page, headers = await g.peer.call("GET", url, g.relay_token, headers=routing(IOP, AB1))
        got.append((page, headers))
    return got


# -- S1 -------------------------------------------------------------------------------------------------


async def test_S1_session_puts_are_stored_and_forwarded_in_order_per_session(
    make_settings: Callable[..., Settings],
) -> None:
    async with gireve(make_settings) as g:
        await g.iop.down()  # GIREVE unreachable: connections refused
        for n, status in enumerate(["PENDING", "ACTIVE", "COMPLETED"]):
            await g.send("PUT", "/sessions/FR/AB1/S1", session(status=status, last_updated=f"2026-03-09T10:0{n}:00Z"))
        await g.send("PUT", "/sessions/FR/AB1/S2", session("S2", status="PENDING"))
        await wait_until(lambda: g.relay.link.state == "down", 20, "attempts refused until the link is down")
        await g.iop.start()
        await g.iop.wait_for(lambda: len(statuses(g)) == 3 and len(statuses(g, "S2")) == 1)
        assert statuses(g) == ["PENDING", "ACTIVE", "COMPLETED"]
        assert [(r.method, r.path) for r in g.tried("sessions", *AB1, "S1")] == [("PUT", SES1)] * 3
        assert await g.drained()


# -- S2 -------------------------------------------------------------------------------------------------


async def test_S2_a_session_patch_reaches_gireve_as_a_put_of_the_merged_session(
    make_settings: Callable[..., Settings],
) -> None:
    async with gireve(make_settings) as g:
        assert g.relay.settings.state.sessions_patch_to_put  # the default
        first = session()
        patch = {"kwh": 6.8, "status": "ACTIVE", "last_updated": "2026-03-09T10:30:00Z"}
        await g.send("PUT", "/sessions/FR/AB1/S1", first)
        await g.send("PATCH", "/sessions/FR/AB1/S1", patch)
        await g.iop.wait_for(lambda: len(g.iop.delivered()) == 2)
        assert [r.method for r in g.iop.received] == ["PUT", "PUT"]
        assert g.iop.received[1].json() == {**first, **patch}


async def test_S2_with_sessions_patch_to_put_off_the_patch_goes_as_sent(make_settings: Callable[..., Settings]) -> None:
    async with gireve(make_settings, RELAY_STATE_SESSIONS_PATCH_TO_PUT="false") as g:
        patch = {"kwh": 6.8, "last_updated": "2026-03-09T10:30:00Z"}
        await g.send("PUT", "/sessions/FR/AB1/S1", session())
        await g.send("PATCH", "/sessions/FR/AB1/S1", patch)
        await g.iop.wait_for(lambda: len(g.iop.delivered()) == 2)
        assert [(r.method, r.path) for r in g.iop.received] == [("PUT", SES1), ("PATCH", SES1)]
        assert g.iop.received[1].json() == patch


# -- S3 -------------------------------------------------------------------------------------------------


async def test_S3_a_cdr_goes_after_its_sessions_last_update_and_is_retried_in_place(
    make_settings: Callable[..., Settings],
) -> None:
    async with gireve(make_settings) as g:
        release, refused = asyncio.Event(), list[Received]()

        def script(r: Received) -> Reply | None:
            body = r.json()
            if r.path == SES1 and body["status"] == "COMPLETED":
                return Reply(hold=release)  # GIREVE takes its time on the session's last update
            if r.path == CDRS and body["id"] == "CDR1" and not refused:
                refused.append(r)
                return Reply(status=503, ocpi=None)  # and refuses the CDR once
            return None

        g.iop.script = script
        await g.send("PUT", "/sessions/FR/AB1/S1", session(status="ACTIVE"))
        await g.send("PUT", "/sessions/FR/AB1/S1", session(status="COMPLETED", last_updated="2026-03-09T11:00:00Z"))
        await g.send("POST", "/cdrs", cdr("CDR1", "S1"))  # at once, as GIREVE wants
        await g.send("PUT", "/sessions/FR/AB1/S2", session("S2", status="COMPLETED"))
        await g.send("POST", "/cdrs", cdr("CDR2", "S2"))  # another session's CDR does not wait for S1
        await g.iop.wait_for(lambda: [r.json()["id"] for r in g.pushed("cdrs")] == ["CDR2"])
        assert not [r for r in g.iop.arrived if r.path == CDRS and r.json()["id"] == "CDR1"]
        release.set()
        await g.iop.wait_for(lambda: len(g.pushed("cdrs")) == 2)
        [completed] = [r for r in g.iop.received if r.path == SES1 and r.json()["status"] == "COMPLETED"]
        assert refused[0].at >= completed.answered_at  # not even tried before the session's last update was taken
        cdr1 = g.pushed("cdrs")[1]
        assert (cdr1.method, cdr1.json()["id"]) == ("POST", "CDR1")


async def test_S3_a_credit_cdr_passes_in_order(make_settings: Callable[..., Settings]) -> None:
    """A CDR, its Credit CDR and the corrected CDR, queued together (GIREVE unreachable), all go, in order."""
    async with gireve(make_settings) as g:
        await g.iop.down()
        await g.send("PUT", "/sessions/FR/AB1/S1", session(status="COMPLETED"))
        await g.send("POST", "/cdrs", cdr("CDR1"))
        await g.send("POST", "/cdrs", cdr("CDR1-CREDIT", credit=True, credit_reference_id="CDR1"))
        await g.send("POST", "/cdrs", cdr("CDR1-FIXED"))
        await g.iop.start()
        await g.iop.wait_for(lambda: len(g.pushed("cdrs")) == 3, timeout=5)
        sent = [r.json() for r in g.pushed("cdrs")]
        assert [c["id"] for c in sent] == ["CDR1", "CDR1-CREDIT", "CDR1-FIXED"]
        assert (sent[1]["credit"], sent[1]["credit_reference_id"]) == (True, "CDR1")


async def test_S3_a_credit_cdr_without_credit_reference_id_is_refused(make_settings: Callable[..., Settings]) -> None:
    async with gireve(make_settings) as g:
        answer = await g.send("POST", "/cdrs", cdr("CDR1-CREDIT", credit=True), expect=422)
        assert "$.credit_reference_id" in {p["field"] for p in answer["errors"]}, answer
        await g.send("POST", "/cdrs", cdr("CDR2", "S2"))
        await g.iop.wait_for(lambda: len(g.iop.delivered()) == 1)
        assert [r.json()["id"] for r in g.iop.received] == ["CDR2"]


# -- S4 -------------------------------------------------------------------------------------------------


async def test_S4_advenir_sends_non_roaming_sessions_and_cdrs_with_gireves_anonymous_token(
    make_settings: Callable[..., Settings],
) -> None:
    operators = [dict(OPERATORS[0], advenir=True), OPERATORS[1]]  # FR/AB1 takes part in Advenir, FR/AB2 does not
    async with gireve(make_settings, operators=operators) as g:
        local, roaming = cdr_token(AB1, "AA11BB22"), cdr_token()  # issued by the CPO itself / by an eMSP
        await g.send("PUT", "/sessions/FR/AB1/S-LOCAL", session("S-LOCAL", cdr_token=local))
        await g.send("PUT", "/sessions/FR/AB1/S-ROAM", session("S-ROAM", cdr_token=roaming))
        await g.send("PUT", "/sessions/FR/AB2/S-AB2", session("S-AB2", party="AB2", cdr_token=cdr_token(AB2)))
        await g.send("POST", "/cdrs", cdr("C-LOCAL", "S-LOCAL", cdr_token=local))
        await g.send("POST", "/cdrs", cdr("C-ROAM", "S-ROAM", cdr_token=roaming))
        await g.iop.wait_for(lambda: len(g.iop.delivered()) == 5)
        tokens = {r.json()["id"]: r.json()["cdr_token"] for r in g.iop.received}
        assert tokens == {"S-LOCAL": ADVENIR, "C-LOCAL": ADVENIR, "S-ROAM": roaming, "C-ROAM": roaming,
                          "S-AB2": cdr_token(AB2)}  # fmt: skip
        # Pulled: the same view; the relay keeps the real token for the CSMS.
        _, page, _ = await g.as_gireve("GET", "/sessions")
        assert {s["id"]: s["cdr_token"] for s in page["data"]} == {"S-LOCAL": ADVENIR, "S-ROAM": roaming}


# -- S5 -------------------------------------------------------------------------------------------------


async def test_S5_gireve_pulls_sessions_cdrs_and_tariffs_page_by_page(make_settings: Callable[..., Settings]) -> None:
    async with gireve(make_settings, RELAY_FORWARDER_ENABLED="false") as g:
        ops: list[dict[str, Any]] = []
        for n in range(3):
            ops.append({"method": "PUT", "path": f"/ingress/2.2.1/sessions/FR/AB1/S{n}",
                        "body": session(f"S{n}", last_updated=f"2026-03-09T10:0{n}:00Z")})  # fmt: skip
        for n in range(25):
            body = cdr(f"CDR{n:02d}", f"S{n % 3}", last_updated=f"2026-03-09T11:{n:02d}:00Z")
            ops.append({"method": "POST", "path": "/ingress/2.2.1/cdrs", "body": body})
        for body in (tariff("T1"), tariff("T1", target=("DE", "MP1"), price=0.5), tariff("T2")):
            ops.append({"method": "PUT", "path": f"/ingress/2.2.1/tariffs/FR/AB1/{body['id']}", "body": body})
        answer = await g.send("POST", "/batch", {"operations": ops}, expect=200)
        assert answer["data"]["refused"] == 0, answer

        sessions = await pages(g, "/sessions?limit=2")
        assert [len(p["data"]) for p, _ in sessions] == [2, 1]
        assert [h["X-Total-Count"] for _, h in sessions] == ["3", "3"]
        cdrs = await pages(g, "/cdrs?limit=20")  # GIREVE pulls CDRs 20 a page
        assert [(len(p["data"]), h["X-Limit"], h["X-Total-Count"]) for p, h in cdrs] == [(20, "20", "25"),
                                                                                          (5, "20", "25")]  # fmt: skip
        assert [c["id"] for p, _ in cdrs for c in p["data"]] == [f"CDR{n:02d}" for n in range(25)]
        [(page, _)] = await pages(g, "/tariffs")
        variants = sorted((t["id"], t.get("target_operator_party_id") or "") for t in page["data"])
        assert variants == [("T1", ""), ("T1", "MP1"), ("T2", "")]


# -- F1 -------------------------------------------------------------------------------------------------


async def test_F1_tariff_put_and_delete_are_stored_and_forwarded_in_order(
    make_settings: Callable[..., Settings],
) -> None:
    async with gireve(make_settings) as g:
        refused: list[Received] = []

        def script(r: Received) -> Reply | None:
            if r.path == T1 and not refused:
                refused.append(r)
                return Reply(status=503, ocpi=None)
            return None

        g.iop.script = script
        first, renamed = tariff("T1"), tariff("T1", tariff_alt_text=[{"language": "en", "text": "2 EUR/h"}])
        await g.send("PUT", "/tariffs/FR/AB1/T1", first)
        await g.send("PUT", "/tariffs/FR/AB1/T1", renamed)
        await g.send("DELETE", "/tariffs/FR/AB1/T1")
        await g.iop.wait_for(lambda: len(g.pushed("tariffs", *AB1, "T1")) == 3)
        assert [(r.method, r.json()) for r in g.pushed("tariffs", *AB1, "T1")] == [
            ("PUT", first), ("PUT", renamed), ("DELETE", None)
        ]  # fmt: skip
        assert [r.method for r in g.tried("tariffs", *AB1, "T1")] == ["PUT", "PUT", "PUT", "DELETE"]


async def test_F1_delete_of_a_per_emsp_variant_is_refused_pointing_to_a_put_with_end_date_time(
    make_settings: Callable[..., Settings],
) -> None:
    async with gireve(make_settings) as g:
        await g.send("PUT", "/tariffs/FR/AB1/T1", tariff("T1", target=("DE", "MP1")))
        query = "target_operator_country_code=DE&target_operator_party_id=MP1"
        status, answer = await g.ingress("DELETE", f"/tariffs/FR/AB1/T1?{query}")
        assert 400 <= status < 500 and "end_date_time" in json.dumps(answer) and "PUT" in json.dumps(answer), answer
        await g.send("PUT", "/tariffs/FR/AB1/T2", tariff("T2"))
        await g.iop.wait_for(lambda: len(g.iop.delivered()) == 2)
        assert [r.method for r in g.iop.received] == ["PUT", "PUT"]


# -- F2 -------------------------------------------------------------------------------------------------


async def test_F2_start_date_time_is_required(make_settings: Callable[..., Settings]) -> None:
    async with gireve(make_settings) as g:
        body = tariff("T1")
        del body["start_date_time"]
        answer = await g.send("PUT", "/tariffs/FR/AB1/T1", body, expect=422)
        assert [(p["field"], p["rule"]) for p in answer["errors"]] == [
            ("$.start_date_time", "gireve.F2.start_date_time")
        ]
        await g.send("PUT", "/tariffs/FR/AB1/T2", tariff("T2"))
        await g.iop.wait_for(lambda: len(g.iop.delivered()) == 1)
        assert [r.path for r in g.iop.received] == [at_iop("tariffs", *AB1, "T2")]


async def test_F2_target_operator_fields_come_both_or_neither_whatever_the_profile(
    make_settings: Callable[..., Settings],
) -> None:
    async with gireve(make_settings, RELAY_INGRESS_PROFILE="warn") as g:
        for present, missing in [("target_operator_country_code", "$.target_operator_party_id"),
                                 ("target_operator_party_id", "$.target_operator_country_code")]:  # fmt: skip
            body = dict(tariff("T1"), **{present: "DE" if "country" in present else "MP1"})
            answer = await g.send("PUT", "/tariffs/FR/AB1/T1", body, expect=422)
            assert [p["field"] for p in answer["errors"]] == [missing], answer
        assert g.iop.received == []


async def test_F2_per_emsp_variants_of_one_tariff_id_are_distinct_and_all_delivered(
    make_settings: Callable[..., Settings],
) -> None:
    async with gireve(make_settings) as g:
        variants = [tariff("T1", price=0.8), tariff("T1", target=("DE", "MP1"), price=0.5),
                    tariff("T1", target=("NL", "MP2"), price=0.1)]  # fmt: skip  # GIREVE's own example
        for body in variants:
            answer = await g.send("PUT", "/tariffs/FR/AB1/T1", body)
            assert warnings(answer) == [], answer  # other prices of other variants: no immutability warning
        await g.iop.wait_for(lambda: len(g.pushed("tariffs", *AB1, "T1")) == 3)
        got = sorted((r.json() for r in g.iop.received), key=lambda t: t.get("target_operator_party_id") or "")
        assert got == variants  # each as sent, none merged into another (distinct objects: in any order)


# -- F3 -------------------------------------------------------------------------------------------------


async def test_F3_a_price_change_is_flagged_and_by_default_sent_with_a_warning(
    make_settings: Callable[..., Settings],
) -> None:
    async with gireve(make_settings) as g:
        assert g.relay.settings.state.tariffs_immutable == "warn"
        assert warnings(await g.send("PUT", "/tariffs/FR/AB1/T1", tariff("T1", price=2.0))) == []
        assert warnings(await g.send("PUT", "/tariffs/FR/AB1/T1", tariff("T1", price=2.5))) == [
            "gireve.F3.tariff_immutable"
        ]
        text_and_end = tariff("T1", price=2.5, tariff_alt_text=[{"language": "fr", "text": "2,50 EUR/h"}],
                              end_date_time="2026-12-31T23:59:59Z")  # fmt: skip
        assert warnings(await g.send("PUT", "/tariffs/FR/AB1/T1", text_and_end)) == []
        await g.iop.wait_for(lambda: len(g.iop.delivered()) == 3)


async def test_F3_under_reject_a_price_change_is_refused_and_never_sent(make_settings: Callable[..., Settings]) -> None:
    async with gireve(make_settings, RELAY_STATE_TARIFFS_IMMUTABLE="reject") as g:
        await g.send("PUT", "/tariffs/FR/AB1/T1", tariff("T1", price=2.0))
        answer = await g.send("PUT", "/tariffs/FR/AB1/T1", tariff("T1", price=2.5), expect=409)
        assert [p["rule"] for p in answer["errors"]] == ["gireve.F3.tariff_immutable"], answer
        text_and_end = tariff("T1", price=2.0, tariff_alt_text=[{"language": "fr", "text": "2 EUR/h"}],
                              end_date_time="2026-12-31T23:59:59Z")  # fmt: skip
        await g.send("PUT", "/tariffs/FR/AB1/T1", text_and_end)
        await g.iop.wait_for(lambda: len(g.iop.delivered()) == 2)
        assert [r.json()["elements"][0]["price_components"][0]["price"] for r in g.iop.received] == [2.0, 2.0]
        await wait_until(g.drained, what="nothing left")
