"""K1: real-time authorisation from the CSMS through the relay to the IOP, and the offline whitelist decision.

The CSMS calls ``POST /ingress/2.2.1/tokens/{uid}/authorize?type=…`` with LocationReferences; the
relay checks the input, POSTs ``{tokens SENDER}/{UID}/authorize?type=…`` to the IOP (a FakeIop
announced by a registered peer) and answers with who decided and what. When the IOP cannot answer
(down, slower than ``iop.authorize_timeout_s``, 5xx, OCPI 3xxx, 401, 4001), the whitelist of tokens the
IOP pushed earlier decides. A token the IOP pushed with whitelist ALWAYS is decided from that copy without
asking (mod_tokens: "realtime authorization is not possible/allowed").
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import msgspec
import pytest

from relay.authorize import check_uid
from relay.config import Settings
from relay.errors import InvalidEvent
from relay.models.tokens import AuthorizationInfo, AuthorizedToken
from tests.csms_fake import IOP_TOKENS, Bench, bench, iop_token
from tests.fake_iop import Received, Reply
from tests.ocpi_peer import token_header

TWO_OPERATORS = json.dumps(
    [
        {"country_code": "FR", "party_id": "AB1", "emi3_id": "FR*AB1", "name": "Example CPO"},
        {"country_code": "FR", "party_id": "AB2", "emi3_id": "FR*AB2", "name": "Second CPO"},
    ]
)
REFS = {"location_id": "LOC1", "evse_uids": ["3256"]}


def authorization_info(uid: str, allowed: str, reference: str = "AUTH-REF-1") -> dict[str, Any]:
    return {
        "allowed": allowed,
        "token": iop_token(uid, "NEVER"),
        "location": REFS,
        "authorization_reference": reference,
    }


def answering(infos: dict[str, dict[str, Any]], unknown: Reply | None = None) -> Callable[[Received], Reply | None]:
    """An eMSP behind the IOP: an AuthorizationInfo per known UID, OCPI 2004 (HTTP 404) otherwise."""

    def script(r: Received) -> Reply | None:
        if not r.path.startswith(IOP_TOKENS + "/") or not r.path.endswith("/authorize"):
            return None
        uid = r.path.removeprefix(IOP_TOKENS + "/").removesuffix("/authorize")
        if uid in infos:
            body = {"status_code": 1000, "data": infos[uid], "timestamp": "2026-01-01T00:00:00Z"}
            return Reply(body=json.dumps(body).encode())
        return unknown or Reply(status=404, ocpi=2004)

    return script


def asked(b: Bench) -> list[Received]:
    """Authorisation requests that reached the IOP (arrived, answered or not)."""
    return [r for r in b.iop.arrived if r.path.startswith(IOP_TOKENS + "/")]


def queries(b: Bench) -> list[tuple[str, str]]:
    return [q for q in b.iop.queries if q[0].startswith(IOP_TOKENS + "/")]


async def authorize(b: Bench, uid: str, body: Any = REFS, token_type: str = "RFID",
                    headers: dict[str, str] | None = None) -> tuple[int, Any]:  # fmt: skip
    return await b.ingress("POST", f"/tokens/{uid}/authorize?type={token_type}", body, headers=headers)


# -- round trip through the IOP ----------------------------------------------------------------------


@pytest.mark.parametrize("allowed", ["ALLOWED", "BLOCKED"])
async def test_round_trip_through_the_iop(make_settings: Callable[..., Settings], allowed: str) -> None:
    async with bench(make_settings) as b:
        await b.put_location()
        b.iop.script = answering({"0A1B2C3D": authorization_info("0A1B2C3D", allowed)})

        status, answer = await authorize(b, "0a1b2c3d", headers={"X-Correlation-ID": "csms-corr-1"})

        assert status == 200 and answer["status_code"] == 1000, answer
        data = answer["data"]
        assert (data["decided_by"], data["allowed"], data["iop_error"]) == ("iop", allowed, None)
        assert data["authorization"]["authorization_reference"] == "AUTH-REF-1"
        assert data["authorization"]["token"]["uid"] == "0A1B2C3D"
        assert data["authorization"]["location"] == REFS

        [sent] = asked(b)
        assert (sent.method, sent.path) == ("POST", f"{IOP_TOKENS}/0A1B2C3D/authorize")  # upper case on the wire
        assert queries(b) == [(sent.path, "type=RFID")]
        assert sent.json() == REFS
        h = sent.headers
        assert h["Authorization"] == token_header(b.peer.token_b)  # T1: the token the IOP gave us
        assert h["X-Request-ID"] and h["X-Correlation-ID"] == "csms-corr-1"  # T2
        assert (h["OCPI-from-country-code"], h["OCPI-from-party-id"]) == ("FR", "AB1")  # T3: location's owner
        assert (h["OCPI-to-country-code"], h["OCPI-to-party-id"]) == ("FR", "107")


async def test_unknown_token_is_the_iops_decision(make_settings: Callable[..., Settings]) -> None:
    async with bench(make_settings) as b:
        await b.put_location()
        # Known to the relay as ALLOWED (real-time allowed too), the IOP is reachable and says 2004: it decides.
        await b.push_token("0102ABCD", "ALLOWED")
        b.iop.script = answering({})

        status, answer = await authorize(b, "0102ABCD")

        assert status == 200, answer
        data = answer["data"]
        assert (data["decided_by"], data["allowed"], data["ocpi_code"]) == ("iop", "NOT_ALLOWED", 2004)
        assert data["iop_error"] is None
        assert len(asked(b)) == 1
        # Without a request id from the CSMS, the correlation id is the request's own.
        h = asked(b)[0].headers
        assert h["X-Correlation-ID"] == h["X-Request-ID"]


async def test_other_token_types_pass_unchanged(make_settings: Callable[..., Settings]) -> None:
    async with bench(make_settings) as b:
        await b.put_location()
        info = authorization_info("app-user-7", "ALLOWED")
        info["token"] = iop_token("app-user-7", "NEVER", token_type="APP_USER")
        b.iop.script = answering({"app-user-7": info})

        status, answer = await authorize(b, "app-user-7", token_type="APP_USER")

        assert status == 200 and answer["data"]["decided_by"] == "iop", answer
        assert answer["data"]["allowed"] == "ALLOWED"
        assert queries(b) == [(f"{IOP_TOKENS}/app-user-7/authorize", "type=APP_USER")]


# -- refused before anything is sent -----------------------------------------------------------------


async def test_bad_uids_are_refused_before_sending(make_settings: Callable[..., Settings]) -> None:
    async with bench(make_settings) as b:
        await b.put_location()
        for uid in ("0102ABC", "0102ABCDE", "0102ABCDEF01234", "0102ABCG", "0102ABCDEF012Z", "01-02-AB"):
            status, answer = await authorize(b, uid)
            assert status == 422, (uid, answer)
            assert answer["errors"][0]["field"] == "url.token_uid", answer
            assert answer["errors"][0]["rule"] == "gireve.K1.rfid_uid", answer
        status, answer = await authorize(b, "0102ABCD", token_type="BADGE")
        assert status == 422 and answer["errors"][0]["field"] == "query.type", answer
        status, answer = await authorize(b, "x" * 37, token_type="APP_USER")
        assert status == 422, answer
        assert asked(b) == []


@pytest.mark.parametrize("uid", ["0102ABCD\n", "0102abcdef0123\n", " 0102ABCD"])
def test_a_uid_with_anything_around_it_is_no_rfid_uid(uid: str) -> None:
    # One rule with the Session and CDR cdr_token check (rules.is_rfid_uid): a whole-string match.
    with pytest.raises(InvalidEvent):
        check_uid(uid, "RFID")
    assert check_uid("0102abcd", "RFID") == "0102ABCD"


async def test_missing_or_unknown_location_is_refused_before_sending(make_settings: Callable[..., Settings]) -> None:
    async with bench(make_settings) as b:
        await b.put_location()
        bodies: list[Any] = [{}, {"evse_uids": ["3256"]}, {"location_id": ""}, {"location_id": 7}, None, []]
        for body in bodies:
            status, answer = await authorize(b, "0102ABCD", body)
            assert status == 422, (body, answer)
            assert answer["errors"][0]["field"] == "$.location_id", answer
        status, answer = await b.ingress("POST", "/tokens/0102ABCD/authorize?type=RFID", raw=b"{not json")
        assert status == 422, answer
        status, answer = await authorize(b, "0102ABCD", {"location_id": "NOWHERE"})
        assert status == 422 and answer["errors"][0]["rule"] == "gireve.K1.location", answer
        assert "NOWHERE" in answer["status_message"]
        assert asked(b) == []


async def test_the_ingress_token_is_required(make_settings: Callable[..., Settings]) -> None:
    async with bench(make_settings) as b:
        await b.put_location()
        b.iop.script = answering({"0102ABCD": authorization_info("0102ABCD", "ALLOWED")})
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            status, answer = await b.ingress("POST", "/tokens/0102ABCD/authorize", REFS, auth=False, headers=headers)
            assert status == 401, answer
        assert asked(b) == []


async def test_a_location_under_two_operators_needs_ocpi_from(make_settings: Callable[..., Settings]) -> None:
    async with bench(make_settings, RELAY_OPERATORS_JSON=TWO_OPERATORS) as b:
        await b.put_location("LOC1", party_id="AB1")
        await b.put_location("LOC1", party_id="AB2")
        await b.put_location("LOC2", party_id="AB2")
        b.iop.script = answering({"0102ABCD": authorization_info("0102ABCD", "ALLOWED")})

        status, answer = await authorize(b, "0102ABCD")
        assert status == 422 and answer["errors"][0]["field"] == "OCPI-from-party-id", answer
        status, answer = await authorize(b, "0102ABCD", headers={"OCPI-from-country-code": "FR",
                                                                 "OCPI-from-party-id": "ZZ9"})  # fmt: skip
        assert status == 404, answer
        status, answer = await authorize(
            b,
            "0102ABCD",
            {"location_id": "LOC2"},
            headers={"OCPI-from-country-code": "FR", "OCPI-from-party-id": "AB1"},
        )
        assert status == 422, answer  # AB1 has no LOC2
        assert asked(b) == []

        status, answer = await authorize(b, "0102ABCD", headers={"OCPI-from-country-code": "fr",
                                                                 "OCPI-from-party-id": "ab2"})  # fmt: skip
        assert status == 200 and answer["data"]["decided_by"] == "iop", answer
        status, answer = await authorize(b, "0102ABCD", {"location_id": "LOC2"})  # one owner: no header needed
        assert status == 200 and answer["data"]["decided_by"] == "iop", answer
        froms = [(r.headers["OCPI-from-country-code"], r.headers["OCPI-from-party-id"]) for r in asked(b)]
        assert froms == [("FR", "AB2"), ("FR", "AB2")]


async def test_without_state_the_owner_comes_from_the_headers(make_settings: Callable[..., Settings]) -> None:
    """[state] enabled = false: the relay cannot know locations; one operator or OCPI-from-* names the owner."""
    async with bench(make_settings, RELAY_STATE_ENABLED="false", RELAY_OPERATORS_JSON=TWO_OPERATORS) as b:
        b.iop.script = answering({"0102ABCD": authorization_info("0102ABCD", "ALLOWED")})
        status, answer = await authorize(b, "0102ABCD")
        assert status == 422 and answer["errors"][0]["field"] == "OCPI-from-party-id", answer
        status, answer = await authorize(b, "0102ABCD", headers={"OCPI-from-country-code": "FR",
                                                                 "OCPI-from-party-id": "AB2"})  # fmt: skip
        assert status == 200 and answer["data"]["allowed"] == "ALLOWED", answer
        assert [r.headers["OCPI-from-party-id"] for r in asked(b)] == ["AB2"]


# -- the IOP cannot answer: the whitelist decides ----------------------------------------------------

WHITELIST = {
    # uid as pushed (lower case for one: UIDs are case-insensitive) → (whitelist, valid, expected)
    "0a0a0a0a": ("ALWAYS", True, "ALLOWED"),
    "0B0B0B0B": ("ALLOWED", True, "ALLOWED"),
    "0C0C0C0C0C0C0C": ("ALLOWED_OFFLINE", True, "ALLOWED"),
    "0D0D0D0D": ("NEVER", True, "NOT_ALLOWED"),
    "0E0E0E0E": ("ALWAYS", False, "NOT_ALLOWED"),
}


async def _push_whitelist(b: Bench) -> None:
    for uid, (whitelist, valid, _) in WHITELIST.items():
        await b.push_token(uid, whitelist, valid=valid)


async def _check_offline(b: Bench, error_has: str) -> None:
    for uid, (whitelist, _, expected) in WHITELIST.items():
        status, answer = await authorize(b, uid.upper())
        assert status == 200, answer
        data = answer["data"]
        assert (data["decided_by"], data["allowed"]) == ("whitelist", expected), (uid, data)
        assert data["whitelist"] == whitelist
        if whitelist == "ALWAYS":  # never asked: no IOP error to report
            assert data["iop_error"] is None and data["reason"].startswith("whitelist ALWAYS"), data
        else:
            assert error_has in data["iop_error"], data
        assert data["authorization"]["token"]["uid"] == uid
    status, answer = await authorize(b, "0F0F0F0F")
    data = answer["data"]
    assert (status, data["decided_by"], data["allowed"]) == (200, "none", "NOT_ALLOWED"), answer
    assert error_has in data["iop_error"], data


async def test_iop_down_whitelist_decides(make_settings: Callable[..., Settings]) -> None:
    async with bench(make_settings) as b:
        await b.put_location()
        await _push_whitelist(b)
        await b.iop.down()
        await _check_offline(b, "connection")


async def test_iop_slow_whitelist_decides_within_the_deadline(make_settings: Callable[..., Settings]) -> None:
    async with bench(make_settings, RELAY_IOP_AUTHORIZE_TIMEOUT_S="0.3") as b:
        await b.put_location()
        await _push_whitelist(b)
        release = asyncio.Event()
        # Authorisations are answered only when released: far beyond the deadline.
        b.iop.script = lambda r: Reply(hold=release) if r.path.startswith(IOP_TOKENS) else None
        try:
            started = time.monotonic()
            status, answer = await authorize(b, "0B0B0B0B")  # ALLOWED: real-time first, the whitelist after
            elapsed = time.monotonic() - started
            assert status == 200 and answer["data"]["decided_by"] == "whitelist", answer
            assert answer["data"]["allowed"] == "ALLOWED" and answer["data"]["iop_error"] == "timeout"
            assert 0.3 <= elapsed < 1.5, elapsed
            assert len(asked(b)) == 1  # it did ask
            await _check_offline(b, "timeout")
        finally:
            release.set()


@pytest.mark.parametrize(
    ("reply", "error_has"),
    [
        (Reply(status=503, ocpi=None), "http 503"),
        (Reply(status=200, ocpi=3000), "OCPI 3000"),
        (Reply(status=401, ocpi=2000), "http 401"),
        (Reply(status=200, ocpi=1000), "unusable AuthorizationInfo"),  # success without data
        # The hub could not route the request (not the eMSP's answer): the whitelist decides, not "iop".
        (Reply(status=200, ocpi=4001), "OCPI 4001 unknown receiver"),
    ],
    ids=["5xx", "ocpi-3xxx", "401", "no-data", "ocpi-4001"],
)
async def test_iop_errors_whitelist_decides(make_settings: Callable[..., Settings], reply: Reply,
                                            error_has: str) -> None:  # fmt: skip
    async with bench(make_settings) as b:
        await b.put_location()
        await _push_whitelist(b)
        b.iop.script = answering({}, unknown=reply)
        await _check_offline(b, error_has)


def test_authorization_info_model_takes_the_iops_answer() -> None:
    """The fake's AuthorizationInfo is a valid one (else the round-trip tests would test the fallback)."""
    info = msgspec.convert(authorization_info("0A1B2C3D", "ALLOWED"), AuthorizationInfo)
    assert info.allowed == "ALLOWED" and info.location is not None and info.location.evse_uids == ["3256"]


# -- whitelist ALWAYS: no real-time authorisation --------------------------------------------------------


@pytest.mark.parametrize(("valid", "expected"), [(True, "ALLOWED"), (False, "NOT_ALLOWED")])
async def test_a_token_whitelisted_always_is_decided_without_the_iop(make_settings: Callable[..., Settings],
                                                                     valid: bool, expected: str) -> None:  # fmt: skip
    async with bench(make_settings) as b:
        await b.put_location()
        await b.push_token("0A1B2C3D", "ALWAYS", valid=valid)
        # Reachable and answering: still not asked (mod_tokens, WhitelistType ALWAYS: "realtime
        # authorization is not possible/allowed. CPO shall always allow any use of this Token").
        b.iop.script = answering({"0A1B2C3D": authorization_info("0A1B2C3D", "BLOCKED")})

        status, answer = await authorize(b, "0a1b2c3d")

        assert status == 200, answer
        data = answer["data"]
        assert (data["decided_by"], data["allowed"], data["whitelist"]) == ("whitelist", expected, "ALWAYS"), data
        assert data["iop_error"] is None and data["reason"].startswith("whitelist ALWAYS"), data
        assert data["authorization"]["token"]["uid"] == "0A1B2C3D"
        assert asked(b) == []


async def test_the_newest_copy_of_a_uid_decides_whether_to_ask(make_settings: Callable[..., Settings]) -> None:
    """Two eMSPs pushed the same uid: the most recently updated token is the one whose whitelist counts."""
    async with bench(make_settings) as b:
        await b.put_location()
        await b.push_token("0A1B2C3D", "ALWAYS", party_id="OLD", last_updated="2020-01-01T00:00:00Z")
        await b.push_token("0A1B2C3D", "NEVER", party_id="NEW", last_updated="2025-01-01T00:00:00Z")
        b.iop.script = answering({"0A1B2C3D": authorization_info("0A1B2C3D", "BLOCKED")})
        status, answer = await authorize(b, "0A1B2C3D")
        assert status == 200 and answer["data"]["decided_by"] == "iop", answer
        assert answer["data"]["allowed"] == "BLOCKED" and len(asked(b)) == 1


# -- the IOP's AuthorizationInfo, read leniently about optional Token fields ---------------------------------

# (id, changes to the Token inside the answer)
LENIENT: list[tuple[str, dict[str, Any]]] = [
    ("optional fields left out", {"visual_number": None, "group_id": None, "language": None}),
    ("unknown fields", {"eco_friendly": True, "extensions": {"gireve": {"a": 1}}}),
    ("a language of three letters", {"language": "fra"}),
    ("a profile type of a later version", {"default_profile_type": "ECO"}),
    ("an energy contract without supplier_name", {"energy_contract": {"contract_id": "C1"}}),
    ("a visual number longer than 64", {"visual_number": "V" * 80}),
    ("a group id longer than 36", {"group_id": "G" * 40}),
]


@pytest.mark.parametrize("changes", [c for _, c in LENIENT], ids=[i for i, _ in LENIENT])
async def test_optional_token_fields_never_make_the_answer_unusable(make_settings: Callable[..., Settings],
                                                                    changes: dict[str, Any]) -> None:  # fmt: skip
    async with bench(make_settings) as b:
        await b.put_location()
        info = authorization_info("0A1B2C3D", "ALLOWED")
        token = info["token"]
        for name, value in changes.items():
            if value is None:
                token.pop(name, None)
            else:
                token[name] = value
        b.iop.script = answering({"0A1B2C3D": info})

        status, answer = await authorize(b, "0A1B2C3D")

        assert status == 200, answer
        data = answer["data"]
        assert (data["decided_by"], data["allowed"], data["iop_error"]) == ("iop", "ALLOWED", None), data
        sent = data["authorization"]["token"]
        for name, value in changes.items():
            if name in AuthorizedToken.__struct_fields__:
                assert sent.get(name) == value, name  # passed to the CSMS as the eMSP sent it
            else:
                assert name not in sent  # unknown fields are dropped, as everywhere


@pytest.mark.parametrize("missing", ["country_code", "party_id", "uid", "type", "contract_id", "issuer", "valid",
                                     "whitelist", "last_updated"])  # fmt: skip
def test_a_required_token_field_is_still_required(missing: str) -> None:
    """mod_tokens' required fields (Card. 1): without one the answer is no AuthorizationInfo."""
    info = authorization_info("0A1B2C3D", "ALLOWED")
    del info["token"][missing]
    with pytest.raises(msgspec.ValidationError, match=missing):
        msgspec.convert(info, AuthorizationInfo)
