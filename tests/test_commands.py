"""K2: commands from the IOP to the CSMS, and the CSMS's CommandResults back to the IOP's response_url.

The IOP POSTs ``/ocpi/2.2.1/commands/{command}`` on the OCPI listener; the relay validates it, hands
it to the CSMS webhook (``CsmsFake``) and answers with a CommandResponse. The CSMS later POSTs the
CommandResult to ``/ingress/2.2.1/commands/{command_id}/result``; it is delivered to the
``response_url`` (on the FakeIop) with the store-and-forward guarantees of every event, or TIMEOUT
is delivered when no result came in time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from relay.commands import Commands
from relay.config import Settings
from relay.errors import StoreUnavailable
from relay.events import Event
from relay.store import DeliveryStore, RoamingStore, StateReader
from tests.csms_fake import CSMS_TOKEN, Bench, CsmsPost, bench, iop_token
from tests.fake_iop import Received, Reply
from tests.ocpi_peer import token_header
from tests.waiting import wait_until

TO_AB1 = {"OCPI-from-country-code": "NL", "OCPI-from-party-id": "TNM",
          "OCPI-to-country-code": "FR", "OCPI-to-party-id": "AB1"}  # fmt: skip


def start_session(b: Bench, **changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "response_url": b.response_url("START_SESSION"),
        "token": iop_token("0102ABCD", "ALLOWED"),
        "location_id": "LOC1",
        "evse_uid": "3256",
        "connector_id": "1",
        "authorization_reference": "AUTH-REF-9",
    }
    body.update(changes)
    return {k: v for k, v in body.items() if v is not None}


async def command(b: Bench, name: str, body: Any, request_id: str = "iop-req-1",
                  correlation_id: str = "iop-corr-1", **headers: str) -> tuple[int, Any, dict[str, str]]:  # fmt: skip
    h = {**TO_AB1, "X-Request-ID": request_id, "X-Correlation-ID": correlation_id, **headers}
    return await b.ocpi("POST", f"/commands/{name}", body, headers=h)


async def post_result(b: Bench, command_id: str, result: Any) -> tuple[int, Any]:
    return await b.ingress("POST", f"/commands/{command_id}/result", result)


def at(b: Bench, url: str) -> list[Received]:
    """What the IOP took at this response_url."""
    path = url.split(str(b.iop.port), 1)[1]
    return b.iop.delivered(path)


# -- START_SESSION ------------------------------------------------------------------------------------


async def test_start_session_reaches_the_csms_and_the_result_the_iop(make_settings: Callable[..., Settings]) -> None:
    async with bench(make_settings) as b:
        await b.put_location()
        body = start_session(b)

        status, answer, headers = await command(b, "START_SESSION", body)

        assert (status, answer["status_code"]) == (200, 1000), answer
        assert answer["data"] == {"result": "ACCEPTED", "timeout": 120}  # csms.command_result_timeout_s
        assert (headers["X-Request-ID"], headers["X-Correlation-ID"]) == ("iop-req-1", "iop-corr-1")  # T5
        [post] = b.csms.posts
        assert post.body["kind"] == "command" and post.body["command"] == "START_SESSION"
        assert (post.body["country_code"], post.body["party_id"]) == ("FR", "AB1")
        assert post.body["request"] == body
        assert post.headers["Authorization"] == f"Bearer {CSMS_TOKEN}"
        assert post.headers["X-Correlation-ID"] == "iop-corr-1"
        command_id = post.body["command_id"]

        status, accepted = await post_result(b, command_id, {"result": "ACCEPTED"})
        assert status == 202 and accepted["data"]["command_id"] == command_id, accepted

        await b.iop.wait_for(lambda: len(at(b, body["response_url"])) == 1)
        [sent] = at(b, body["response_url"])
        assert sent.method == "POST" and sent.json() == {"result": "ACCEPTED"}
        h = sent.headers
        assert h["Authorization"] == token_header(b.peer.token_b)
        assert (h["OCPI-from-country-code"], h["OCPI-from-party-id"]) == ("FR", "AB1")
        assert (h["OCPI-to-country-code"], h["OCPI-to-party-id"]) == ("FR", "107")
        assert h["X-Correlation-ID"] == "iop-corr-1" and h["X-Request-ID"] not in ("", "iop-req-1")

        # One result per command: a second one, or one for an unknown command, is refused.
        status, answer = await post_result(b, command_id, {"result": "FAILED"})
        assert status == 409, answer
        status, answer = await post_result(b, "no-such-command", {"result": "ACCEPTED"})
        assert status == 404, answer
        assert len([r for r in b.iop.received if "/commands/" in r.path]) == 1


async def test_start_session_refusals(make_settings: Callable[..., Settings]) -> None:
    """A command that is JSON reached the OCPI layer: refused in an HTTP 200 with the OCPI code (status_codes:
    "an HTTP error status code MUST NOT be returned"); only a body that is not JSON is HTTP 400."""
    async with bench(make_settings) as b:
        await b.put_location()
        cases: list[tuple[Any, int]] = [
            (start_session(b, location_id="NOWHERE"), 2003),  # status_codes' own example of 2003
            (start_session(b, response_url=None), 2001),
            (start_session(b, response_url="ftp://iop.example/x"), 2001),
            (start_session(b, token={"uid": "0102ABCD"}), 2001),
            ([1, 2], 2001),
        ]
        for body, code in cases:
            status, answer, headers = await command(b, "START_SESSION", body)
            assert (status, answer["status_code"]) == (200, code), (body, answer)
            assert "data" not in answer and answer["status_message"], answer
            assert headers["X-Request-ID"] == "iop-req-1"
            # Routed like any answer of a Functional Module: to the eMSP that asked, from the operator it addressed.
            assert (headers["OCPI-to-country-code"], headers["OCPI-to-party-id"]) == ("NL", "TNM")
            assert (headers["OCPI-from-country-code"], headers["OCPI-from-party-id"]) == ("FR", "AB1")
        h = {"Authorization": token_header(b.relay_token), "Content-Type": "application/json", **TO_AB1}
        async with b.http.post(f"{b.ocpi_base}/commands/START_SESSION", data=b'{"response_url": ', headers=h) as r:
            answer = await r.json()
            assert (r.status, answer["status_code"]) == (400, 2001), answer  # not JSON: the transport layer
        # A command for an operator this relay does not host: 2001 (the OCPI-to-* parameter), not the
        # hub's 4001; answered from the relay's own operator.
        status, answer, headers = await command(b, "START_SESSION", start_session(b), **{"OCPI-to-party-id": "ZZ9"})
        assert (status, answer["status_code"]) == (200, 2001), answer
        assert "OCPI-to" in answer["status_message"]
        assert (headers["OCPI-from-country-code"], headers["OCPI-from-party-id"]) == ("FR", "AB1")
        assert (headers["OCPI-to-country-code"], headers["OCPI-to-party-id"]) == ("NL", "TNM")
        assert b.csms.posts == []


async def test_start_session_without_connector_or_evse_goes_to_the_csms_as_it_came(
    make_settings: Callable[..., Settings],
) -> None:
    """OCPI 2.2.1: evse_uid and connector_id are optional; an eMSP on GIREVE in OCPI 2.1.1 cannot send connector_id."""
    async with bench(make_settings) as b:
        await b.put_location()
        urls = []
        for changes in ({"connector_id": None}, {"connector_id": None, "evse_uid": None}):
            body = start_session(b, **changes)
            status, answer, _ = await command(b, "START_SESSION", body)
            assert (status, answer["status_code"]) == (200, 1000), (changes, answer)
            assert answer["data"] == {"result": "ACCEPTED", "timeout": 120}
            post = b.csms.posts[-1]
            assert post.body["request"] == body  # no connector_id / evse_uid made up: the CSMS picks them
            assert "connector_id" not in post.body["request"]
            status, _ = await post_result(b, post.body["command_id"], {"result": "ACCEPTED"})
            assert status == 202
            urls.append(body["response_url"])
        await b.iop.wait_for(lambda: all(len(at(b, url)) == 1 for url in urls))  # both results delivered
        assert len(b.csms.posts) == 2
        # The unknown location is still refused without them.
        status, answer, _ = await command(b, "START_SESSION", start_session(b, connector_id=None, evse_uid=None,
                                                                            location_id="NOWHERE"))  # fmt: skip
        assert (status, answer["status_code"]) == (200, 2003), answer
        assert len(b.csms.posts) == 2


async def test_command_answers_carry_routing_headers(make_settings: Callable[..., Settings]) -> None:
    """transport_and_format, "Message Routing": a response goes TO the requesting party, FROM the receiving one."""
    async with bench(make_settings) as b:
        url = b.response_url("STOP_SESSION")
        _, _, headers = await command(b, "STOP_SESSION", {"response_url": url, "session_id": "S1"})
        assert (headers["OCPI-from-country-code"], headers["OCPI-from-party-id"]) == ("FR", "AB1")
        assert (headers["OCPI-to-country-code"], headers["OCPI-to-party-id"]) == ("NL", "TNM")
        # Lower-case ids (CiString) are answered in upper case.
        lower = {"OCPI-from-country-code": "nl", "OCPI-from-party-id": "tnm",
                 "OCPI-to-country-code": "fr", "OCPI-to-party-id": "ab1"}  # fmt: skip
        status, _, headers = await command(b, "STOP_SESSION", {"response_url": url, "session_id": "S2"}, **lower)
        assert status == 200
        assert (headers["OCPI-from-country-code"], headers["OCPI-from-party-id"]) == ("FR", "AB1")
        assert (headers["OCPI-to-country-code"], headers["OCPI-to-party-id"]) == ("NL", "TNM")
        # No routing headers in the request: from the relay's (only) operator, to the IOP as it registered (HUB role).
        h = {"Authorization": token_header(b.relay_token), "Content-Type": "application/json"}
        async with b.http.post(f"{b.ocpi_base}/commands/STOP_SESSION", json={"response_url": url, "session_id": "S3"},
                               headers=h) as r:  # fmt: skip
            assert r.status == 200, await r.text()
            assert (r.headers["OCPI-from-country-code"], r.headers["OCPI-from-party-id"]) == ("FR", "AB1")
            assert (r.headers["OCPI-to-country-code"], r.headers["OCPI-to-party-id"]) == ("FR", "107")


@pytest.mark.parametrize("csms_fault", ["rejects", "down", "slow", "5xx", "garbage"])
async def test_start_session_rejected_when_the_csms_does_not_accept(make_settings: Callable[..., Settings],
                                                                    csms_fault: str) -> None:  # fmt: skip
    async with bench(make_settings, RELAY_CSMS_TIMEOUT_S="0.3") as b:
        await b.put_location()
        release = asyncio.Event()
        if csms_fault == "rejects":
            b.csms.result, b.csms.message = "REJECTED", "EVSE out of order"
        elif csms_fault == "down":
            await b.csms.down()
        elif csms_fault == "slow":
            b.csms.hold = release
        elif csms_fault == "5xx":
            b.csms.status = 500
        else:
            b.csms.answer = lambda _: {"result": "MAYBE"}
        try:
            status, answer, _ = await command(b, "START_SESSION", start_session(b))
        finally:
            release.set()
        assert (status, answer["status_code"]) == (200, 1000), answer
        assert answer["data"]["result"] == "REJECTED", answer
        if csms_fault == "rejects":
            assert answer["data"]["message"] == [{"language": "en", "text": "EVSE out of order"}]
            [post] = b.csms.posts
            # A rejected command awaits no result: nothing to deliver, no TIMEOUT later.
            status, _ = await post_result(b, post.body["command_id"], {"result": "ACCEPTED"})
            assert status == 404
        assert b.relay.commands is not None and await b.relay.commands.expire() == 0


# -- STOP_SESSION and the commands GIREVE does not use ------------------------------------------------


async def test_stop_session(make_settings: Callable[..., Settings]) -> None:
    async with bench(make_settings) as b:
        url = b.response_url("STOP_SESSION")
        status, answer, headers = await command(
            b,
            "STOP_SESSION",
            {"response_url": url, "session_id": "S1"},
            request_id="iop-req-2",
            correlation_id="iop-corr-2",
        )
        assert (status, answer["data"]) == (200, {"result": "ACCEPTED", "timeout": 120}), answer
        assert (headers["X-Request-ID"], headers["X-Correlation-ID"]) == ("iop-req-2", "iop-corr-2")
        [post] = b.csms.posts
        assert post.body["command"] == "STOP_SESSION"
        assert post.body["request"] == {"response_url": url, "session_id": "S1"}
        status, _ = await post_result(b, post.body["command_id"], {"result": "ACCEPTED"})
        assert status == 202
        await b.iop.wait_for(lambda: len(at(b, url)) == 1)
        assert at(b, url)[0].headers["X-Correlation-ID"] == "iop-corr-2"

        status, answer, _ = await command(b, "STOP_SESSION", {"response_url": url})  # no session_id
        assert (status, answer["status_code"]) == (200, 2001), answer
        b.csms.result = "UNKNOWN_SESSION"
        status, answer, _ = await command(b, "STOP_SESSION", {"response_url": url, "session_id": "S404"})
        assert answer["data"]["result"] == "UNKNOWN_SESSION", answer
        await b.csms.down()
        status, answer, _ = await command(b, "STOP_SESSION", {"response_url": url, "session_id": "S1"})
        assert answer["data"]["result"] == "REJECTED", answer


def other_commands(b: Bench) -> dict[str, dict[str, Any]]:
    token = iop_token("0102ABCD", "ALLOWED")
    return {
        "RESERVE_NOW": {"response_url": b.response_url("RESERVE_NOW"), "token": token, "location_id": "LOC1",
                        "expiry_date": "2030-01-01T00:00:00Z", "reservation_id": "R1"},
        "CANCEL_RESERVATION": {"response_url": b.response_url("CANCEL_RESERVATION"), "reservation_id": "R1"},
        "UNLOCK_CONNECTOR": {"response_url": b.response_url("UNLOCK_CONNECTOR"), "location_id": "LOC1",
                             "evse_uid": "3256", "connector_id": "1"},
    }  # fmt: skip


async def test_commands_gireve_does_not_use_are_not_supported(make_settings: Callable[..., Settings]) -> None:
    async with bench(make_settings) as b:
        await b.put_location()
        for name, body in other_commands(b).items():
            status, answer, _ = await command(b, name, body)
            assert (status, answer["data"]["result"]) == (200, "NOT_SUPPORTED"), (name, answer)
        assert b.csms.posts == []


async def test_unlock_connector_passes_when_the_csms_handles_it(make_settings: Callable[..., Settings]) -> None:
    async with bench(make_settings, RELAY_CSMS_COMMANDS="START_SESSION,STOP_SESSION,UNLOCK_CONNECTOR") as b:
        bodies = other_commands(b)
        status, answer, _ = await command(b, "UNLOCK_CONNECTOR", bodies["UNLOCK_CONNECTOR"])
        assert (status, answer["data"]["result"]) == (200, "ACCEPTED"), answer
        [post] = b.csms.posts
        assert post.body["command"] == "UNLOCK_CONNECTOR" and post.body["request"] == bodies["UNLOCK_CONNECTOR"]
        status, _ = await post_result(b, post.body["command_id"], {"result": "ACCEPTED"})
        assert status == 202
        await b.iop.wait_for(lambda: len(at(b, bodies["UNLOCK_CONNECTOR"]["response_url"])) == 1)
        status, answer, _ = await command(b, "RESERVE_NOW", bodies["RESERVE_NOW"])
        assert answer["data"]["result"] == "NOT_SUPPORTED"
        status, answer, _ = await command(b, "UNLOCK_CONNECTOR", {"location_id": "LOC1"})  # no response_url
        assert (status, answer["status_code"]) == (200, 2001), answer
        assert len(b.csms.posts) == 1  # RESERVE_NOW and the bad UNLOCK_CONNECTOR never reached it


async def test_without_a_webhook_everything_is_not_supported(make_settings: Callable[..., Settings]) -> None:
    async with bench(make_settings, RELAY_CSMS_WEBHOOK_URL="") as b:
        await b.put_location()
        status, answer, _ = await command(b, "START_SESSION", start_session(b))
        assert (status, answer["data"]["result"]) == (200, "NOT_SUPPORTED"), answer
        assert b.csms.posts == []


# -- CommandResult delivery -----------------------------------------------------------------------


async def accepted_start(b: Bench) -> tuple[str, str]:
    """A START_SESSION the CSMS accepted: (command_id, response_url)."""
    body = start_session(b)
    status, answer, _ = await command(b, "START_SESSION", body)
    assert answer["data"]["result"] == "ACCEPTED", answer
    return b.csms.posts[-1].body["command_id"], body["response_url"]


async def test_result_posted_while_the_iop_is_down_is_delivered_once_back(
    make_settings: Callable[..., Settings],
) -> None:
    async with bench(make_settings) as b:
        await b.put_location()
        await b.iop.wait_for(lambda: len(b.iop.received) == 1)  # the Location went through
        command_id, url = await accepted_start(b)
        await b.iop.down()

        status, _ = await post_result(b, command_id, {"result": "ACCEPTED"})
        assert status == 202
        await wait_until(lambda: b.relay.link.state != "up", 10, "link down")  # the forwarder tries, and fails

        failures = {"left": 2}

        def flaky(r: Received) -> Reply | None:  # back, but answering 503 twice first
            if failures["left"]:
                failures["left"] -= 1
                return Reply(status=503, ocpi=None)
            return None

        b.iop.script = flaky
        await b.iop.start()
        await b.iop.wait_for(lambda: len(at(b, url)) == 1)
        tries = [r for r in b.iop.received if url.endswith(r.path)]
        assert [r.reply.status for r in tries if r.reply] == [503, 503, 200]
        assert len({r.headers["X-Request-ID"] for r in tries}) == 3  # T2: fresh per attempt
        assert {r.headers["X-Correlation-ID"] for r in tries} == {"iop-corr-1"}  # T2: same for the event
        assert all(r.json() == {"result": "ACCEPTED"} for r in tries)


async def test_timeout_is_posted_after_the_deadline(make_settings: Callable[..., Settings]) -> None:
    async with bench(make_settings, RELAY_CSMS_COMMAND_RESULT_TIMEOUT_S="1", RELAY_CSMS_TIMEOUT_S="0.5") as b:
        await b.put_location()
        body = start_session(b)
        sent_at = time.monotonic()
        status, answer, _ = await command(b, "START_SESSION", body)
        assert answer["data"] == {"result": "ACCEPTED", "timeout": 1}, answer
        command_id = b.csms.posts[-1].body["command_id"]

        await b.iop.wait_for(lambda: len(at(b, body["response_url"])) == 1, timeout=5)
        assert time.monotonic() - sent_at >= 1.0
        [sent] = at(b, body["response_url"])
        assert sent.json() == {"result": "TIMEOUT"}
        assert sent.headers["X-Correlation-ID"] == "iop-corr-1"

        status, answer = await post_result(b, command_id, {"result": "ACCEPTED"})  # too late
        assert status == 409, answer
        assert b.relay.commands is not None and await b.relay.commands.expire() == 0  # TIMEOUT only once
        assert len(at(b, body["response_url"])) == 1


async def test_a_result_in_time_cancels_the_timeout(make_settings: Callable[..., Settings]) -> None:
    async with bench(make_settings, RELAY_CSMS_COMMAND_RESULT_TIMEOUT_S="1", RELAY_CSMS_TIMEOUT_S="0.5") as b:
        await b.put_location()
        command_id, url = await accepted_start(b)
        assert b.relay.store is not None
        roaming = RoamingStore(b.relay.store)
        far = int((time.time() + 3600) * 1000)
        assert await roaming.overdue(far) == [command_id]  # awaited, with a deadline
        assert (await post_result(b, command_id, {"result": "EVSE_OCCUPIED"}))[0] == 202
        assert await roaming.overdue(far) == []  # settled: no TIMEOUT will follow
        await b.iop.wait_for(lambda: len(at(b, url)) == 1)
        assert [r.json() for r in at(b, url)] == [{"result": "EVSE_OCCUPIED"}]


async def test_bad_results_are_refused(make_settings: Callable[..., Settings]) -> None:
    async with bench(make_settings) as b:
        await b.put_location()
        command_id, url = await accepted_start(b)
        for body in ({"result": "MAYBE"}, {}, {"result": "ACCEPTED", "message": "not a list"}):
            status, answer = await post_result(b, command_id, body)
            assert status == 422, (body, answer)
        status, answer = await b.ingress("POST", f"/commands/{command_id}/result", raw=b"{oops")
        assert status == 422, answer
        status, answer = await b.ingress("POST", f"/commands/{command_id}/result", {"result": "ACCEPTED"}, auth=False)
        assert status == 401, answer
        # None of those used up the command: the real result still goes through.
        assert (await post_result(b, command_id, {"result": "ACCEPTED"}))[0] == 202
        await b.iop.wait_for(lambda: len(at(b, url)) == 1)


async def test_a_result_the_iop_refuses_is_dead_lettered(make_settings: Callable[..., Settings]) -> None:
    async with bench(make_settings) as b:
        await b.put_location()
        command_id, url = await accepted_start(b)
        b.iop.script = lambda r: Reply(status=400, ocpi=2001) if url.endswith(r.path) else None
        assert (await post_result(b, command_id, {"result": "ACCEPTED"}))[0] == 202
        assert b.relay.store is not None
        ds = DeliveryStore(b.relay.store)

        async def dead_lettered() -> bool:
            return (await ds.dlq_lengths())["commands"] == 1

        await wait_until(dead_lettered, 10, "the result dead-lettered")
        assert len([r for r in b.iop.received if url.endswith(r.path)]) == 1  # permanent: not retried


# -- robustness ---------------------------------------------------------------------------------------


async def test_a_result_posted_before_the_csms_answers_is_not_lost(make_settings: Callable[..., Settings]) -> None:
    """A fast CSMS may post the CommandResult before it has answered the webhook call."""
    async with bench(make_settings) as b:
        await b.put_location()
        early: list[tuple[int, Any]] = []

        async def result_first(post: CsmsPost) -> None:
            early.append(await post_result(b, post.body["command_id"], {"result": "ACCEPTED"}))

        b.csms.before_answer = result_first
        body = start_session(b)
        status, answer, _ = await command(b, "START_SESSION", body)
        assert answer["data"]["result"] == "ACCEPTED", answer
        assert [s for s, _ in early] == [202], early
        await b.iop.wait_for(lambda: len(at(b, body["response_url"])) == 1)
        assert b.relay.commands is not None and await b.relay.commands.expire() == 0


async def test_a_rejected_or_failed_command_leaves_nothing_awaited(make_settings: Callable[..., Settings]) -> None:
    async with bench(make_settings, RELAY_CSMS_COMMAND_RESULT_TIMEOUT_S="1", RELAY_CSMS_TIMEOUT_S="0.5") as b:
        await b.put_location()
        assert b.relay.store is not None
        roaming = RoamingStore(b.relay.store)
        far = int((time.time() + 3600) * 1000)
        b.csms.result = "REJECTED"
        await command(b, "START_SESSION", start_session(b))
        await b.csms.down()
        await command(b, "START_SESSION", start_session(b))
        assert await roaming.overdue(far) == []
        rejected_id = b.csms.posts[0].body["command_id"]
        assert await roaming.command(rejected_id) is None
        assert (await post_result(b, rejected_id, {"result": "ACCEPTED"}))[0] == 404


async def test_connector_id_needs_evse_uid(make_settings: Callable[..., Settings]) -> None:
    """OCPI: StartSession.evse_uid is required when connector_id is set."""
    async with bench(make_settings) as b:
        await b.put_location()
        status, answer, _ = await command(b, "START_SESSION", start_session(b, evse_uid=None))
        assert (status, answer["status_code"]) == (200, 2001), answer
        assert "evse_uid" in answer["status_message"]
        assert b.csms.posts == []


async def test_unknown_commands_do_not_make_metric_labels(make_settings: Callable[..., Settings]) -> None:
    async with bench(make_settings) as b:
        status, answer, _ = await command(b, "SELF_DESTRUCT_4242", {"response_url": b.response_url("X")})
        assert (status, answer["data"]["result"]) == (200, "NOT_SUPPORTED"), answer
        async with b.http.get(f"http://127.0.0.1:{b.relay.ingress_port}/metrics") as r:
            text = await r.text()
        assert "relay_commands_total" in text and "SELF_DESTRUCT_4242" not in text


async def test_a_result_redis_did_not_take_can_be_sent_again(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    async with bench(make_settings) as b:
        await b.put_location()
        command_id, url = await accepted_start(b)
        store = b.relay.store
        assert store is not None
        real_append = store.append
        failures = {"left": 1}

        async def flaky_append(event: Event) -> str:
            if event.module == "commands" and failures["left"]:
                failures["left"] -= 1
                raise StoreUnavailable("redis gone")
            return await real_append(event)

        monkeypatch.setattr(store, "append", flaky_append)
        status, answer = await post_result(b, command_id, {"result": "ACCEPTED"})
        assert status == 503, answer
        status, answer = await post_result(b, command_id, {"result": "ACCEPTED"})  # the CSMS sends it again
        assert status == 202, answer
        await b.iop.wait_for(lambda: len(at(b, url)) == 1)


async def test_redis_errors_answer_503_on_the_ingress(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    async with bench(make_settings) as b:
        await b.put_location()
        command_id, _ = await accepted_start(b)

        async def broken(*_: Any, **__: Any) -> Any:
            raise StoreUnavailable("redis: ConnectionError: redis gone")  # what the store raises, never redis-py's

        monkeypatch.setattr(RoamingStore, "command", broken)
        monkeypatch.setattr(RoamingStore, "token", broken)
        monkeypatch.setattr(StateReader, "one", broken)
        status, answer = await post_result(b, command_id, {"result": "ACCEPTED"})
        assert status == 503, answer
        status, answer = await b.ingress("GET", "/tokens/NL/TNM/0102ABCD")
        assert status == 503, answer
        status, answer = await b.ingress("POST", "/tokens/0102ABCD/authorize", {"location_id": "LOC1"})
        assert status == 503, answer


async def test_a_poisoned_command_does_not_stop_timeouts(make_settings: Callable[..., Settings]) -> None:
    async with bench(make_settings, RELAY_CSMS_COMMAND_RESULT_TIMEOUT_S="1", RELAY_CSMS_TIMEOUT_S="0.5") as b:
        await b.put_location()
        assert b.relay.store is not None
        # A command record this version cannot read (older format, say), already overdue.
        await RoamingStore(b.relay.store).put_command("poisoned", b'{"id": 1}', due_ms=1, ttl_s=60)
        _, url = await accepted_start(b)
        await b.iop.wait_for(lambda: len(at(b, url)) == 1, timeout=5)
        assert at(b, url)[0].json() == {"result": "TIMEOUT"}


async def test_the_timeout_loop_outlives_an_unexpected_error(
    make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    async with bench(make_settings, RELAY_CSMS_COMMAND_RESULT_TIMEOUT_S="1", RELAY_CSMS_TIMEOUT_S="0.5") as b:
        await b.put_location()
        real_expire = Commands.expire
        calls = {"n": 0}

        async def expire_failing_once(self: Commands) -> int:
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("something unexpected")
            return await real_expire(self)

        monkeypatch.setattr(Commands, "expire", expire_failing_once)
        _, url = await accepted_start(b)
        await b.iop.wait_for(lambda: len(at(b, url)) == 1, timeout=5)
        assert at(b, url)[0].json() == {"result": "TIMEOUT"} and calls["n"] >= 2


async def test_the_result_carries_the_correlation_id_the_answer_echoed(make_settings: Callable[..., Settings]) -> None:
    """An IOP request without X-Correlation-ID: the answer echoes its X-Request-ID as both; so does the result."""
    async with bench(make_settings) as b:
        url = b.response_url("STOP_SESSION")
        h = {**TO_AB1, "X-Request-ID": "iop-req-only"}
        status, answer, headers = await b.ocpi("POST", "/commands/STOP_SESSION",
                                               {"response_url": url, "session_id": "S1"}, headers=h)  # fmt: skip
        assert status == 200 and headers["X-Correlation-ID"] == "iop-req-only", answer
        assert b.csms.posts[0].headers["X-Correlation-ID"] == "iop-req-only"
        assert (await post_result(b, b.csms.posts[0].body["command_id"], {"result": "ACCEPTED"}))[0] == 202
        await b.iop.wait_for(lambda: len(at(b, url)) == 1)
        assert at(b, url)[0].headers["X-Correlation-ID"] == "iop-req-only"
