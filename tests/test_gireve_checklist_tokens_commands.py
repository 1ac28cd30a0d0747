"""GIREVE checklist, Tokens and Commands (K1–K3), at the wire.

Real-time authorisation: the CSMS asks the relay on the ingress, the relay asks GIREVE's Tokens Sender
(``tests.gireve_support.TOKENS_SENDER``). Commands and tokens: GIREVE calls the relay's OCPI listener for
an eMSP (OCPI-from NL/TNM, OCPI-to the CPO), the relay hands them to the fake CSMS's webhook, and the CSMS's
CommandResult goes back to the command's ``response_url`` on GIREVE. docs/gireve.md says how the relay
meets each line and which deeper tests back these up.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from relay.config import Settings
from tests.csms_fake import iop_token
from tests.fake_iop import Received, Reply
from tests.gireve_support import (
    AB1,
    EMSP,
    IOP,
    REFS,
    TOKENS_SENDER,
    Gireve,
    asked,
    authorizing,
    gireve,
    routing_of,
    start_session,
)

IDS = {"X-Request-ID": "gireve-req-1", "X-Correlation-ID": "gireve-corr-1"}
TOKEN_PATH = "/tokens/NL/TNM/0102ABCD?type=RFID"


async def authorize(g: Gireve, uid: str, body: Any = REFS, expect: int = 200) -> Any:
    return await g.send("POST", f"/tokens/{uid}/authorize?type=RFID", body, expect=expect)


async def command(g: Gireve, name: str, body: dict[str, Any]) -> dict[str, Any]:
    """GIREVE sends an eMSP's command to FR/AB1; the CommandResponse (HTTP 200, OCPI 1000, ids echoed)."""
    status, answer, headers = await g.as_gireve("POST", f"/commands/{name}", body, frm=EMSP, headers=IDS)
    assert (status, answer["status_code"]) == (200, 1000), answer
    assert (headers["X-Request-ID"], headers["X-Correlation-ID"]) == (IDS["X-Request-ID"], IDS["X-Correlation-ID"])
    data: dict[str, Any] = answer["data"]
    return data


def path_of(g: Gireve, url: str) -> str:
    return url.split(str(g.iop.port), 1)[1]


# -- K1 -------------------------------------------------------------------------------------------------


async def test_K1_the_csms_asks_the_relay_and_the_relay_asks_gireve_in_real_time(
    make_settings: Callable[..., Settings],
) -> None:
    async with gireve(make_settings) as g:
        await g.put_location()
        g.iop.script = authorizing("ALLOWED")
        answer = await g.send("POST", "/tokens/0a1b2c3d/authorize?type=RFID", REFS,
                              headers={"X-Correlation-ID": "badge-7"}, expect=200)  # fmt: skip
        data = answer["data"]
        assert (data["decided_by"], data["allowed"]) == ("iop", "ALLOWED"), data
        assert data["authorization"]["token"]["uid"] == "0A1B2C3D"  # GIREVE's AuthorizationInfo, handed back
        [sent] = asked(g.iop)
        assert (sent.method, sent.path, sent.json()) == ("POST", f"{TOKENS_SENDER}/0A1B2C3D/authorize", REFS)
        assert (sent.path, "type=RFID") in g.iop.queries
        assert routing_of(sent.headers) == (AB1, IOP)  # from the location's operator
        assert sent.headers["X-Correlation-ID"] == "badge-7"


async def test_K1_location_references_with_a_known_location_are_required(
    make_settings: Callable[..., Settings],
) -> None:
    async with gireve(make_settings) as g:
        await g.put_location()
        g.iop.script = authorizing()
        for body in [{}, {"evse_uids": ["3256"]}, {"location_id": ""}, {"location_id": "NOWHERE"}]:
            answer = await authorize(g, "0102ABCD", body, expect=422)
            assert answer["status_code"] >= 2000, (body, answer)
        assert asked(g.iop) == []
        assert (await authorize(g, "0102ABCD", {"location_id": "LOC1"}))["data"][
            "decided_by"
        ] == "iop"  # EVSEs: optional


async def test_K1_rfid_uids_are_8_or_14_hex_characters_and_others_are_refused_before_sending(
    make_settings: Callable[..., Settings],
) -> None:
    async with gireve(make_settings) as g:
        await g.put_location()
        g.iop.script = authorizing()
        for uid in ("0102ABC", "0102ABCD1", "0102ABCDEF", "04A2C5F21B6E8", "04A2C5F21B6E801", "0102ABCG"):
            answer = await authorize(g, uid, expect=422)
            assert [(p["field"], p["rule"]) for p in answer["errors"]] == [("url.token_uid", "gireve.K1.rfid_uid")]
        assert asked(g.iop) == []
        for uid in ("0102abcd", "04a2c5f21b6e80"):
            assert (await authorize(g, uid))["data"]["decided_by"] == "iop"
        sent = [r.path.removeprefix(TOKENS_SENDER) for r in asked(g.iop)]
        assert sent == ["/0102ABCD/authorize", "/04A2C5F21B6E80/authorize"]  # upper case on the wire


async def test_K1_a_token_whitelisted_always_is_answered_without_asking_gireve(
    make_settings: Callable[..., Settings],
) -> None:
    async with gireve(make_settings) as g:
        await g.put_location()
        g.iop.script = authorizing()
        await g.push_token("0102ABCD", "ALWAYS")
        await g.push_token("0A0B0C0D", "ALLOWED")
        data = (await authorize(g, "0102ABCD"))["data"]
        assert (data["decided_by"], data["allowed"]) == ("whitelist", "ALLOWED"), data
        assert asked(g.iop) == []
        assert (await authorize(g, "0A0B0C0D"))["data"]["decided_by"] == "iop"  # ALLOWED: GIREVE is asked
        assert len(asked(g.iop)) == 1


# -- K2 -------------------------------------------------------------------------------------------------


async def test_K2_start_session_goes_to_the_csms_and_its_result_to_the_response_url_with_retries(
    make_settings: Callable[..., Settings],
) -> None:
    async with gireve(make_settings) as g:
        await g.put_location()
        url = g.response_url("START_SESSION")
        refused: list[Received] = []

        def script(r: Received) -> Reply | None:
            if r.path == path_of(g, url) and not refused:
                refused.append(r)
                return Reply(status=503, ocpi=None)  # GIREVE down for a moment when the result comes
            return None

        g.iop.script = script
        body = start_session(url)
        assert await command(g, "START_SESSION", body) == {"result": "ACCEPTED", "timeout": 120}
        [handed] = g.csms.of_kind("command")
        assert (handed.body["command"], handed.body["request"]) == ("START_SESSION", body)
        assert (handed.body["country_code"], handed.body["party_id"]) == AB1
        await g.send("POST", f"/commands/{handed.body['command_id']}/result", {"result": "ACCEPTED"})
        await g.iop.wait_for(lambda: len(g.iop.delivered(path_of(g, url))) == 1)
        tried = [r for r in g.iop.received if r.path == path_of(g, url)]
        assert [(r.method, r.json()) for r in tried] == [("POST", {"result": "ACCEPTED"})] * 2
        assert {r.headers["X-Correlation-ID"] for r in tried} == {IDS["X-Correlation-ID"]}
        assert routing_of(tried[1].headers) == (AB1, IOP)


async def test_K2_start_session_without_connector_or_evse_is_accepted_and_handed_to_the_csms(
    make_settings: Callable[..., Settings],
) -> None:
    """eMSPs behind GIREVE on OCPI 2.1.1 cannot send connector_id: GIREVE forwards their START_SESSION without it."""
    async with gireve(make_settings) as g:
        await g.put_location()
        body = start_session(g.response_url("START_SESSION"), evse_uid=None, connector_id=None)
        assert (await command(g, "START_SESSION", body))["result"] == "ACCEPTED"
        [handed] = g.csms.of_kind("command")
        assert handed.body["request"] == body


async def test_K2_stop_session_goes_to_the_csms_and_its_result_to_the_response_url(
    make_settings: Callable[..., Settings],
) -> None:
    async with gireve(make_settings) as g:
        url = g.response_url("STOP_SESSION")
        body = {"response_url": url, "session_id": "S1"}
        assert (await command(g, "STOP_SESSION", body))["result"] == "ACCEPTED"
        [handed] = g.csms.of_kind("command")
        assert (handed.body["command"], handed.body["request"]) == ("STOP_SESSION", body)
        await g.send("POST", f"/commands/{handed.body['command_id']}/result", {"result": "FAILED"})
        await g.iop.wait_for(lambda: [r.json() for r in g.iop.delivered(path_of(g, url))] == [{"result": "FAILED"}])


async def test_K2_commands_gireve_does_not_use_are_not_supported_unless_the_csms_handles_them(
    make_settings: Callable[..., Settings],
) -> None:
    unlock: dict[str, Any] = {"location_id": "LOC1", "evse_uid": "3256", "connector_id": "1"}
    others: dict[str, dict[str, Any]] = {
        "RESERVE_NOW": {
            "token": iop_token("0102ABCD"),
            "expiry_date": "2026-03-09T11:00:00Z",
            "reservation_id": "R1",
            "location_id": "LOC1",
        },  # fmt: skip
        "CANCEL_RESERVATION": {"reservation_id": "R1"},
        "UNLOCK_CONNECTOR": unlock,
    }
    async with gireve(make_settings) as g:
        await g.put_location()
        for name, body in others.items():
            data = await command(g, name, {"response_url": g.response_url(name), **body})
            assert data["result"] == "NOT_SUPPORTED", (name, data)
        assert g.csms.posts == []  # the CSMS never saw them
    async with gireve(make_settings, RELAY_CSMS_COMMANDS="START_SESSION,STOP_SESSION,UNLOCK_CONNECTOR") as g:
        await g.put_location()
        data = await command(g, "UNLOCK_CONNECTOR", {"response_url": g.response_url("UNLOCK_CONNECTOR"), **unlock})
        assert data["result"] == "ACCEPTED"
        assert [p.body["command"] for p in g.csms.of_kind("command")] == ["UNLOCK_CONNECTOR"]


# -- K3 -------------------------------------------------------------------------------------------------


async def test_K3_tokens_gireve_pushes_are_kept_and_handed_to_the_csms(make_settings: Callable[..., Settings]) -> None:
    async with gireve(make_settings) as g:
        token = iop_token("0102ABCD", "ALLOWED")
        status, answer, _ = await g.as_gireve("PUT", TOKEN_PATH, token, frm=EMSP)
        assert status in (200, 201) and answer["status_code"] == 1000, answer
        await g.csms.wait_for(lambda: len(g.csms.of_kind("token")) == 1)
        handed = g.csms.of_kind("token")[0].body["token"]
        assert {k: handed[k] for k in ("uid", "type", "contract_id", "whitelist")} == {
            "uid": "0102ABCD", "type": "RFID", "contract_id": token["contract_id"], "whitelist": "ALLOWED"
        }  # fmt: skip

        patch = {"whitelist": "NEVER", "last_updated": "2026-03-09T10:00:00Z"}
        status, answer, _ = await g.as_gireve("PATCH", TOKEN_PATH, patch, frm=EMSP)
        assert (status, answer["status_code"]) == (200, 1000), answer
        await g.csms.wait_for(lambda: len(g.csms.of_kind("token")) == 2)
        assert g.csms.of_kind("token")[1].body["token"]["whitelist"] == "NEVER"

        # Kept: GIREVE and the CSMS read back the merged token.
        _, from_listener, _ = await g.as_gireve("GET", TOKEN_PATH, frm=EMSP)
        from_ingress = await g.send("GET", TOKEN_PATH, expect=200)
        for kept in (from_listener["data"], from_ingress["data"]):
            assert (kept["uid"], kept["whitelist"], kept["contract_id"]) == ("0102ABCD", "NEVER", token["contract_id"])
