"""K3: Tokens pushed by the IOP (PUT/PATCH on the OCPI listener's Tokens Receiver) are kept, served back
(OCPI listener and ingress), handed to the CSMS webhook, and used by the offline authorisation (K1).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from relay.config import Settings
from tests.csms_fake import CSMS_TOKEN, Bench, bench, iop_token
from tests.ocpi_peer import running, token_header

PATH = "/tokens/NL/TNM/0102ABCD"
REFS = {"location_id": "LOC1"}


async def offline_decision(b: Bench, uid: str) -> dict[str, Any]:
    status, answer = await b.ingress("POST", f"/tokens/{uid}/authorize?type=RFID", REFS)
    assert status == 200, answer
    data: dict[str, Any] = answer["data"]
    return data


async def test_put_is_stored_served_and_handed_to_the_csms(make_settings: Callable[..., Settings]) -> None:
    async with bench(make_settings) as b:
        token = iop_token("0102ABCD", "ALLOWED_OFFLINE", last_updated="2026-03-01T10:00:00+02:00")
        ids = {"X-Request-ID": "iop-req-7", "X-Correlation-ID": "iop-corr-7",
               "OCPI-from-country-code": "NL", "OCPI-from-party-id": "TNM"}  # fmt: skip
        status, answer, headers = await b.ocpi("PUT", PATH + "?type=RFID", token, headers=ids)
        assert (status, answer["status_code"]) == (201, 1000), answer  # a new token: 201 Created
        assert (headers["X-Request-ID"], headers["X-Correlation-ID"]) == ("iop-req-7", "iop-corr-7")

        expected = {**token, "last_updated": "2026-03-01T08:00:00Z"}  # kept in UTC
        status, answer, _ = await b.ocpi("GET", PATH + "?type=RFID")
        assert (status, answer["data"]) == (200, expected), answer
        status, answer, _ = await b.ocpi("GET", PATH)  # type defaults to RFID
        assert answer["data"] == expected
        status, answer = await b.ingress("GET", "/tokens/NL/TNM/0102abcd?type=RFID")  # UIDs are case-insensitive
        assert (status, answer["data"]) == (200, expected), answer

        await b.csms.wait_for(lambda: len(b.csms.of_kind("token")) == 1)
        [post] = b.csms.of_kind("token")
        assert post.body == {"kind": "token", "token": expected}
        assert post.headers["Authorization"] == f"Bearer {CSMS_TOKEN}"
        assert post.headers["X-Correlation-ID"] == "iop-corr-7"

        # A second replica (same Redis) serves it too: stored in Redis, not in one process.
        async with running(b.relay.settings) as replica:
            url = f"http://127.0.0.1:{replica.ocpi_port}/ocpi/2.2.1{PATH}"
            async with b.http.get(url, headers={"Authorization": token_header(b.relay_token)}) as r:
                assert r.status == 200 and (await r.json())["data"] == expected


async def test_patch_merges_and_needs_a_prior_put(make_settings: Callable[..., Settings]) -> None:
    async with bench(make_settings) as b:
        await b.put_location()
        patch = {"valid": False, "last_updated": "2026-03-02T00:00:00Z"}
        status, answer, _ = await b.ocpi("PATCH", PATH + "?type=RFID", patch)
        assert (status, answer["status_code"]) == (200, 2004), answer  # in the OCPI layer: no HTTP error
        status, _, _ = await b.ocpi("GET", PATH)
        assert status == 404  # a GET of an unknown object may be a 404 (status_codes)

        token = await b.push_token("0102ABCD", "ALWAYS")
        await b.iop.down()
        assert (await offline_decision(b, "0102ABCD"))["allowed"] == "ALLOWED"

        status, answer, _ = await b.ocpi("PATCH", PATH + "?type=RFID", patch)
        assert (status, answer["status_code"]) == (200, 1000), answer
        merged = {**token, **patch}
        status, answer, _ = await b.ocpi("GET", PATH)
        assert answer["data"] == merged
        status, answer = await b.ingress("GET", "/tokens/NL/TNM/0102ABCD")
        assert answer["data"] == merged
        await b.csms.wait_for(lambda: len(b.csms.of_kind("token")) == 2)
        assert [p.body["token"] for p in b.csms.of_kind("token")] == [token, merged]
        decision = await offline_decision(b, "0102ABCD")  # now invalid: refused offline
        assert (decision["decided_by"], decision["allowed"]) == ("whitelist", "NOT_ALLOWED")

        status, _, _ = await b.ocpi("PATCH", PATH, {"valid": True, "whitelist": "NEVER",
                                                    "last_updated": "2026-03-03T00:00:00Z"})  # fmt: skip
        assert status == 200
        decision = await offline_decision(b, "0102ABCD")
        assert (decision["allowed"], decision["whitelist"]) == ("NOT_ALLOWED", "NEVER")
        status, _, _ = await b.ocpi("PATCH", PATH, {"whitelist": "ALLOWED_OFFLINE",
                                                    "last_updated": "2026-03-04T00:00:00Z"})  # fmt: skip
        assert (await offline_decision(b, "0102ABCD"))["allowed"] == "ALLOWED"


async def test_bad_tokens_are_refused_and_not_stored(make_settings: Callable[..., Settings]) -> None:
    async with bench(make_settings) as b:
        good = iop_token("0102ABCD")
        missing = {k: v for k, v in good.items() if k != "whitelist"}
        cases: list[tuple[str, str, Any]] = [
            ("PUT", PATH, missing),
            ("PUT", PATH, {**good, "whitelist": "SOMETIMES"}),
            ("PUT", PATH, {**good, "uid": "0102ABCE"}),  # body and URL differ
            ("PUT", "/tokens/NL/XXX/0102ABCD", good),
            ("PUT", PATH + "?type=APP_USER", good),
            ("PUT", PATH, {**good, "contract_id": "x" * 37}),
        ]
        for method, path, body in cases:  # JSON, authenticated, on a route that exists: HTTP 200, OCPI 2001
            status, answer, _ = await b.ocpi(method, path, body)
            assert (status, answer["status_code"]) == (200, 2001), (path, body, answer)
        for raw in (b'{"uid": ', b"not json"):  # not JSON: the transport layer's 400
            h = {"Authorization": token_header(b.relay_token), "Content-Type": "application/json"}
            for method in ("PUT", "PATCH"):
                async with b.http.request(method, b.ocpi_base + PATH, data=raw, headers=h) as r:
                    answer = await r.json()
                    assert (r.status, answer["status_code"]) == (400, 2001), (method, raw, answer)
        status, answer, _ = await b.ocpi("GET", PATH)
        assert (status, answer["status_code"]) == (404, 2004), answer

        await b.push_token("0102ABCD")
        for patch in ({"valid": False}, {"valid": "no", "last_updated": "2026-03-02T00:00:00Z"},
                      {"uid": "FFFFFFFF", "last_updated": "2026-03-02T00:00:00Z"}):  # fmt: skip
            status, answer, _ = await b.ocpi("PATCH", PATH, patch)
            assert (status, answer["status_code"]) == (200, 2001), (patch, answer)
        status, answer, _ = await b.ocpi("GET", PATH)
        assert answer["data"] == good  # unchanged

        # The IOP's token is required on the OCPI listener, the CSMS's on the ingress.
        async with b.http.put(b.ocpi_base + PATH, json=good) as r:
            assert r.status == 401
        status, answer = await b.ingress("GET", "/tokens/NL/TNM/0102ABCD", auth=False)
        assert status == 401, answer
        status, answer = await b.ingress("GET", "/tokens/NL/TNM/FFFFFFFF")
        assert status == 404, answer
        await b.csms.wait_for(lambda: len(b.csms.of_kind("token")) == 1)


async def test_token_types_are_distinct(make_settings: Callable[..., Settings]) -> None:
    async with bench(make_settings) as b:
        rfid = await b.push_token("0102ABCD", "ALWAYS")
        app = await b.push_token("0102ABCD", "NEVER", token_type="APP_USER")
        status, answer, _ = await b.ocpi("GET", PATH + "?type=APP_USER")
        assert answer["data"] == app
        status, answer = await b.ingress("GET", "/tokens/NL/TNM/0102ABCD?type=RFID")
        assert answer["data"] == rfid
        status, answer = await b.ingress("GET", "/tokens/NL/TNM/0102ABCD?type=AD_HOC_USER")
        assert status == 404


async def test_stored_even_when_the_csms_is_down(make_settings: Callable[..., Settings]) -> None:
    async with bench(make_settings) as b:
        await b.csms.down()
        token = await b.push_token("0102ABCD", "ALWAYS")  # answered 200 at once: the IOP is not held
        status, answer = await b.ingress("GET", "/tokens/NL/TNM/0102ABCD")
        assert (status, answer["data"]) == (200, token)
        assert b.csms.posts == []


async def test_tokens_without_a_webhook_are_only_stored(make_settings: Callable[..., Settings]) -> None:
    async with bench(make_settings, RELAY_CSMS_WEBHOOK_URL="") as b:
        token = await b.push_token("0102ABCD", "ALWAYS")
        status, answer = await b.ingress("GET", "/tokens/NL/TNM/0102ABCD")
        assert (status, answer["data"]) == (200, token)


async def test_put_answers_201_when_it_creates_and_200_when_it_replaces(make_settings: Callable[..., Settings]) -> None:
    """status_codes: HTTP 200 "when the object already existed and has successfully been updated", 201 "when
    the object has been newly created"."""
    async with bench(make_settings) as b:
        token = iop_token("0102ABCD", "ALWAYS")
        status, answer, _ = await b.ocpi("PUT", PATH, token)
        assert (status, answer["status_code"]) == (201, 1000), answer
        status, answer, _ = await b.ocpi("PUT", PATH, {**token, "valid": False, "last_updated": "2026-03-02T00:00:00Z"})
        assert (status, answer["status_code"]) == (200, 1000), answer
        status, answer, _ = await b.ocpi("PATCH", PATH, {"valid": True, "last_updated": "2026-03-03T00:00:00Z"})
        assert (status, answer["status_code"]) == (200, 1000), answer
        # Another type, or another issuer, of the same uid is another token: created.
        status, _, _ = await b.ocpi("PUT", PATH + "?type=APP_USER", {**token, "type": "APP_USER"})
        assert status == 201
        other_issuer = {**token, "country_code": "DE", "party_id": "ABC"}
        status, _, _ = await b.ocpi("PUT", "/tokens/DE/ABC/0102ABCD", other_issuer)
        assert status == 201


async def test_token_answers_carry_routing_headers(make_settings: Callable[..., Settings]) -> None:
    """TO = the requesting party (the request's OCPI-from), FROM = the party it addressed; on errors too."""
    async with bench(make_settings) as b:
        routed = {"OCPI-from-country-code": "NL", "OCPI-from-party-id": "TNM",
                  "OCPI-to-country-code": "FR", "OCPI-to-party-id": "AB1"}  # fmt: skip
        answers = [
            await b.ocpi("PUT", PATH, iop_token("0102ABCD"), headers=routed),
            await b.ocpi("GET", PATH, headers=routed),
            await b.ocpi("GET", "/tokens/NL/TNM/FFFFFFFF", headers=routed),  # 404
            await b.ocpi("PATCH", PATH, {"valid": "no"}, headers=routed),  # 2001
        ]
        assert [status for status, _, _ in answers] == [201, 200, 404, 200]
        for _, _, headers in answers:
            assert (headers["OCPI-to-country-code"], headers["OCPI-to-party-id"]) == ("NL", "TNM"), headers
            assert (headers["OCPI-from-country-code"], headers["OCPI-from-party-id"]) == ("FR", "AB1"), headers
        # Without routing headers: to the IOP as it registered (its HUB role), from the relay's operator.
        _, _, headers = await b.ocpi("GET", PATH)
        assert (headers["OCPI-to-country-code"], headers["OCPI-to-party-id"]) == ("FR", "107")
        assert (headers["OCPI-from-country-code"], headers["OCPI-from-party-id"]) == ("FR", "AB1")
        # Routing headers that are no CiString(2)/(3) are not echoed: the IOP stands in.
        odd = {"OCPI-from-country-code": "NLD", "OCPI-from-party-id": "T\tN"}
        _, _, headers = await b.ocpi("GET", PATH, headers=odd)
        assert (headers["OCPI-to-country-code"], headers["OCPI-to-party-id"]) == ("FR", "107")
