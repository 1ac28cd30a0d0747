"""A scripted roaming charge, end to end, as the README walks through it.

The IOP (FakeIop, registered From IOP) starts a charge on the CPO's station with START_SESSION; the
CSMS (CsmsFake) accepts it, reports the CommandResult, PUTs the Session (PENDING, then ACTIVE),
PATCHes it with meter values; the IOP stops it with STOP_SESSION; the CSMS reports that result, PUTs
the COMPLETED Session and POSTs the CDR. Everything reaches the IOP: CommandResults at their
response_url, the Session's updates in the CSMS's order (the PATCH as a PUT of the merged session,
``sessions_patch_to_put``), the CDR only after the Session's last update — even though the IOP is
slow on one Session update and refuses another once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from relay.config import Settings
from tests.conftest import example
from tests.csms_fake import Bench, bench, iop_token
from tests.fake_iop import Received, Reply
from tests.ocpi_peer import token_header

TO_AB1 = {"OCPI-from-country-code": "NL", "OCPI-from-party-id": "TNM",
          "OCPI-to-country-code": "FR", "OCPI-to-party-id": "AB1"}  # fmt: skip
SESSION = "/ocpi/2.2.1/sessions/FR/AB1/S1"
CDRS = "/ocpi/2.2.1/cdrs"
TOKEN = iop_token("0102ABCD", "ALLOWED")
CDR_TOKEN = {k: TOKEN[k] for k in ("country_code", "party_id", "uid", "type", "contract_id")}


def session(status: str, last_updated: str, **changes: Any) -> dict[str, Any]:
    return example("session_example_1_simple_start.json", country_code="FR", party_id="AB1", id="S1",
                   status=status, cdr_token=CDR_TOKEN, auth_method="COMMAND",
                   authorization_reference="AUTH-REF-9", last_updated=last_updated, **changes)  # fmt: skip


def cdr() -> dict[str, Any]:
    return example("cdr_example.json", country_code="FR", party_id="AB1", id="CDR1", session_id="S1",
                   cdr_token=CDR_TOKEN, authorization_reference="AUTH-REF-9")  # fmt: skip


async def iop_command(b: Bench, name: str, body: dict[str, Any], n: int) -> str:
    """The IOP sends a command; returns the command id the CSMS got."""
    ids = {"X-Request-ID": f"iop-req-{n}", "X-Correlation-ID": f"iop-corr-{n}"}
    status, answer, headers = await b.ocpi("POST", f"/commands/{name}", body, headers={**TO_AB1, **ids})
    assert (status, answer["data"]) == (200, {"result": "ACCEPTED", "timeout": 120}), answer
    assert (headers["X-Request-ID"], headers["X-Correlation-ID"]) == (ids["X-Request-ID"], ids["X-Correlation-ID"])
    # The answer is routed back: to the eMSP that asked, from the operator it addressed.
    assert (headers["OCPI-to-country-code"], headers["OCPI-to-party-id"]) == ("NL", "TNM")
    assert (headers["OCPI-from-country-code"], headers["OCPI-from-party-id"]) == ("FR", "AB1")
    post = b.csms.of_kind("command")[-1]
    assert post.body["command"] == name and post.body["request"] == body
    command_id: str = post.body["command_id"]
    return command_id


async def csms(b: Bench, method: str, path: str, body: Any) -> None:
    status, answer = await b.ingress(method, path, body, headers={"X-Correlation-ID": "charge-S1"})
    assert status == 202, (path, answer)


async def test_a_roaming_charge_end_to_end(make_settings: Callable[..., Settings]) -> None:
    async with bench(make_settings) as b:
        slow = {"PENDING": 0.2, "COMPLETED": 0.2}  # the IOP takes its time on these updates
        refuse = {"ACTIVE": 1}  # and answers 503 once on this one

        def iop(r: Received) -> Reply | None:
            if r.path != SESSION:
                return None
            status = r.json()["status"]
            if refuse.get(status):
                refuse[status] -= 1
                return Reply(status=503, ocpi=None)
            return Reply(delay_s=slow.pop(status, 0.0))

        b.iop.script = iop

        # 0. The CSMS publishes the station (examples/location.json); the relay knows it and pushes it.
        await b.put_location("LOC1")

        # 1. The driver's app (eMSP, through the IOP) starts a charge: START_SESSION → CSMS → ACCEPTED.
        # It names neither EVSE nor connector (both optional in OCPI 2.2.1, and an eMSP on GIREVE in
        # OCPI 2.1.1 cannot send connector_id): the CSMS gets it as it came and picks them itself.
        start_url = b.response_url("START_SESSION")
        start = {"response_url": start_url, "token": TOKEN, "location_id": "LOC1",
                 "authorization_reference": "AUTH-REF-9"}  # fmt: skip
        start_id = await iop_command(b, "START_SESSION", start, 1)

        # 2. The charge point started: the CSMS reports the result, then the Session and its progress.
        await csms(b, "POST", f"/commands/{start_id}/result", {"result": "ACCEPTED"})
        await csms(b, "PUT", "/sessions/FR/AB1/S1", session("PENDING", "2026-03-09T10:17:09Z"))
        await csms(b, "PUT", "/sessions/FR/AB1/S1", session("ACTIVE", "2026-03-09T10:18:00Z"))
        patch = example("session_patch_example_charging_period.json", last_updated="2026-03-09T10:30:00Z")
        await csms(b, "PATCH", "/sessions/FR/AB1/S1", patch)
        await b.iop.wait_for(lambda: len(b.iop.delivered(SESSION)) == 3)

        # 3. The driver stops: STOP_SESSION → CSMS → result; the Session ends and its CDR follows at once.
        stop_url = b.response_url("STOP_SESSION")
        stop_id = await iop_command(b, "STOP_SESSION", {"response_url": stop_url, "session_id": "S1"}, 2)
        await csms(b, "POST", f"/commands/{stop_id}/result", {"result": "ACCEPTED"})
        await csms(b, "PUT", "/sessions/FR/AB1/S1", session("COMPLETED", "2026-03-09T11:00:00Z", kwh=15.0,
                                                            end_date_time="2026-03-09T11:00:00Z"))  # fmt: skip
        await csms(b, "POST", "/cdrs", cdr())

        await b.iop.wait_for(lambda: len(b.iop.delivered(CDRS)) == 1
                             and len(b.iop.delivered(start_url.split(str(b.iop.port))[1])) == 1
                             and len(b.iop.delivered(stop_url.split(str(b.iop.port))[1])) == 1)  # fmt: skip

        # What the IOP took, in the order it took it.
        ok = b.iop.delivered()
        ops = [(r.method, r.path) for r in ok]
        results = [r for r in ok if "/commands/" in r.path]
        assert [(r.path, r.json()) for r in results] == [
            (start_url.split(str(b.iop.port))[1], {"result": "ACCEPTED"}),
            (stop_url.split(str(b.iop.port))[1], {"result": "ACCEPTED"}),
        ]
        assert [r.headers["X-Correlation-ID"] for r in results] == ["iop-corr-1", "iop-corr-2"]

        updates = [r for r in ok if r.path == SESSION]
        assert [r.method for r in updates] == ["PUT"] * 4  # the PATCH went as a PUT of the merged session
        assert [r.json()["status"] for r in updates] == ["PENDING", "ACTIVE", "ACTIVE", "COMPLETED"]
        merged = updates[2].json()
        assert merged["kwh"] == patch["kwh"] and merged["charging_periods"] == patch["charging_periods"]
        assert (merged["id"], merged["cdr_token"], merged["authorization_reference"]) == ("S1", CDR_TOKEN, "AUTH-REF-9")
        # The refused ACTIVE was retried before anything later of the Session went out.
        tried = [r.json()["status"] for r in b.iop.received if r.path == SESSION]
        assert tried == ["PENDING", "ACTIVE", "ACTIVE", "ACTIVE", "COMPLETED"]

        [cdr_post] = [r for r in ok if r.path == CDRS]
        assert cdr_post.method == "POST" and cdr_post.json()["session_id"] == "S1"
        assert ops.index(("POST", CDRS)) > ops.index(("PUT", SESSION)) + 3  # after the Session's last update
        assert cdr_post.at >= updates[-1].answered_at  # not even sent before the COMPLETED was taken
        assert ops[0] == ("PUT", "/ocpi/2.2.1/locations/FR/AB1/LOC1")

        for r in ok:  # T1–T3 on every delivery; the CSMS's correlation id on its own events
            assert r.headers["Authorization"] == token_header(b.peer.token_b)
            assert (r.headers["OCPI-from-country-code"], r.headers["OCPI-from-party-id"]) == ("FR", "AB1")
            assert (r.headers["OCPI-to-country-code"], r.headers["OCPI-to-party-id"]) == ("FR", "107")
            if r.path in (SESSION, CDRS):
                assert r.headers["X-Correlation-ID"] == "charge-S1"

        # The IOP can also pull the Session (Sessions Sender): as the CSMS last described it.
        status, answer, _ = await b.ocpi("GET", "/sessions", headers=TO_AB1)
        assert status == 200, answer
        assert [(s["id"], s["status"]) for s in answer["data"]] == [("S1", "COMPLETED")]
