"""What reaches the IOP, end to end through the forwarder: PATCH healing (L5), Sessions PATCH→PUT (S2),
tariff variants (F2), Advenir anonymisation (S4), pushed and pulled.

A real relay runs in-process against the test Redis; a FakeIop (static [iop] url + token) records
and scripts the answers, or, where pulls are checked too, an IOP-like peer registers the relay and
receives its pushes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec
import pytest

from relay.config import MODULES, Settings
from relay.ordering import location_key, session_key, tariff_key
from relay.service import Relay
from relay.store import DeadLetter, DeliveryStore, StateReader
from tests.conftest import AUTH, gireve_location
from tests.fake_iop import FakeIop, Received, Reply
from tests.ocpi_peer import OcpiPeer, running
from tests.test_sender import OPERATORS, Iop, cdr_of, op, pulling, session_of, tariff_of
from tests.waiting import wait_until

FAST = {
    "RELAY_IOP_TOKEN": "iop-token",
    "RELAY_FORWARDER_COMPACT": "",  # each update followed to the IOP: compaction off (tests/test_compaction.py)
    "RELAY_FORWARDER_BACKOFF_INITIAL_S": "0.01",
    "RELAY_FORWARDER_BACKOFF_MAX_S": "0.05",
    "RELAY_FORWARDER_SHUTDOWN_TIMEOUT_S": "1",
}
LOC = "/ocpi/2.2.1/locations/FR/AB1/LOC1"
SES = "/ocpi/2.2.1/sessions/FR/AB1/S1"
ADVENIR = {"country_code": "$$", "party_id": "ADV", "uid": "12345671234567", "type": "RFID",
           "contract_id": "Gireve2Advenir"}  # fmt: skip  # GIREVE's cpo_sessions.md, verbatim


class Env:
    """One relay pushing to a FakeIop, and the CSMS's HTTP client."""

    def __init__(self, relay: Relay, iop: FakeIop, http: aiohttp.ClientSession) -> None:
        self.relay = relay
        self.iop = iop
        self.http = http

    async def send(self, method: str, path: str, body: Any = None, query: dict[str, str] | None = None) -> Any:
        url = f"http://127.0.0.1:{self.relay.ingress_port}/ingress/2.2.1{path}"
        async with self.http.request(method, url, json=body, headers=AUTH, params=query) as r:
            text = await r.text()
            assert r.status == 202, text
            return msgspec.json.decode(text)["data"]

    async def state(self, module: str, key: str, fld: str) -> Any:
        assert self.relay.store is not None
        raw = await StateReader(self.relay.store).one(module, key, fld)
        return None if raw is None else msgspec.json.decode(raw)

    async def metric(self, name: str, **labels: str) -> float:
        async with self.http.get(f"http://127.0.0.1:{self.relay.ingress_port}/metrics") as r:
            text = await r.text()
        want = name + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
        return next((float(line.split()[-1]) for line in text.splitlines() if line.startswith(want + " ")), 0.0)

    async def dead(self, module: str) -> list[DeadLetter]:
        assert self.relay.store is not None
        ds = DeliveryStore(self.relay.store)
        return [d for shard in range(self.relay.store.shards) for d in await ds.dead_letters(module, shard)]

    async def drained(self) -> bool:
        assert self.relay.store is not None
        return sum((await self.relay.store.stream_lengths()).values()) == 0

    def at(self, *paths: str) -> list[Received]:
        """Requests of these paths, as answered, in order."""
        return [r for r in self.iop.received if r.path in paths]


@pytest.fixture
async def make_env(make_settings: Callable[..., Settings]) -> AsyncIterator[Callable[..., Any]]:
    async with contextlib.AsyncExitStack() as stack:
        http = await stack.enter_async_context(aiohttp.ClientSession())

        async def make(**env: str) -> Env:
            iop = FakeIop()
            await iop.start()
            stack.push_async_callback(iop.close)
            relay = await stack.enter_async_context(running(make_settings(**{"RELAY_IOP_URL": iop.url, **FAST,
                                                                             **env})))  # fmt: skip
            return Env(relay, iop, http)

        yield make


def once(path: str, method: str, reply: Reply) -> Callable[[Received], Reply | None]:
    """Answer the first ``method`` on ``path`` with ``reply``, everything else with success."""
    done: list[bool] = []

    def script(r: Received) -> Reply | None:
        if r.path == path and r.method == method and not done:
            done.append(True)
            return reply
        return None

    return script


# -- L5: PATCH healing ------------------------------------------------------------------------------


async def test_patch_answered_2003_is_healed_by_a_put_of_the_location_in_its_order_slot(
    make_env: Callable[..., Any],
) -> None:
    env: Env = await make_env()
    await env.send("PUT", "/locations/FR/AB1/LOC1", gireve_location("LOC1"))
    await env.iop.wait_for(lambda: len(env.iop.delivered(LOC)) == 1)
    healed = await env.metric("relay_patches_healed_total", module="locations")
    release = asyncio.Event()
    env.iop.script = once(LOC + "/3256", "PATCH", Reply(status=404, ocpi=2003, hold=release))
    await env.send(
        "PATCH", "/locations/FR/AB1/LOC1/3256", {"status": "CHARGING", "last_updated": "2024-01-01T00:01:00Z"}
    )
    await env.iop.wait_for(lambda: len(env.iop.arrived) == 2)
    # Later events of the Location, accepted while the IOP thinks about the PATCH: they must wait.
    await env.send(
        "PATCH", "/locations/FR/AB1/LOC1/3257/1", {"max_amperage": 8, "last_updated": "2024-01-01T00:02:00Z"}
    )
    await env.send("PATCH", "/locations/FR/AB1/LOC1", {"name": "After", "last_updated": "2024-01-01T00:03:00Z"})
    release.set()
    await env.iop.wait_for(lambda: len(env.iop.received) == 5)
    got = [(r.method, r.path) for r in env.iop.received]
    assert got == [("PUT", LOC), ("PATCH", LOC + "/3256"), ("PUT", LOC), ("PATCH", LOC + "/3257/1"), ("PATCH", LOC)]
    heal = env.iop.received[2]
    # The whole current Location from the state store, sent to the Location's own path.
    current = await env.state("locations", location_key("FR", "AB1", "LOC1"), "FR:AB1:LOC1")
    assert heal.json() == current
    assert current["evses"][0]["status"] == "CHARGING" and current["name"] == "After"
    assert heal.headers["OCPI-from-party-id"] == "AB1" and heal.headers["Content-Type"] == "application/json"
    assert heal.headers["X-Correlation-ID"] == env.iop.received[1].headers["X-Correlation-ID"]  # the same event
    assert await env.metric("relay_patches_healed_total", module="locations") == healed + 1
    await wait_until(env.drained, what="streams drained")
    assert await env.dead("locations") == []


async def test_patch_answered_http_404_without_ocpi_body_is_healed(make_env: Callable[..., Any]) -> None:
    env: Env = await make_env(RELAY_STATE_SESSIONS_PATCH_TO_PUT="false")
    not_found = Reply(status=404, ocpi=None, body=b"<html><body>Not Found</body></html>")
    await env.send("PUT", "/locations/FR/AB1/LOC1", gireve_location("LOC1"))
    await env.send("PUT", "/sessions/FR/AB1/S1", session_of("AB1", "S1", "2024-01-01T00:00:00Z"))
    await env.iop.wait_for(lambda: len(env.iop.delivered()) == 2)
    before = {m: await env.metric("relay_patches_healed_total", module=m) for m in ("locations", "sessions")}
    scripts = [once(LOC + "/3256/2", "PATCH", not_found), once(SES, "PATCH", not_found)]
    env.iop.script = lambda r: scripts[0](r) or scripts[1](r)
    await env.send(
        "PATCH", "/locations/FR/AB1/LOC1/3256/2", {"max_amperage": 6, "last_updated": "2024-01-01T00:01:00Z"}
    )
    await env.send("PATCH", "/sessions/FR/AB1/S1", {"kwh": 3.5, "last_updated": "2024-01-01T00:01:00Z"})
    await env.iop.wait_for(lambda: len(env.iop.received) == 6)
    assert [(r.method, r.path) for r in env.at(LOC, LOC + "/3256/2")] == [
        ("PUT", LOC), ("PATCH", LOC + "/3256/2"), ("PUT", LOC)
    ]  # fmt: skip
    assert [r.method for r in env.at(SES)] == ["PUT", "PATCH", "PUT"]
    loc_state = await env.state("locations", location_key("FR", "AB1", "LOC1"), "FR:AB1:LOC1")
    assert env.at(LOC)[-1].json() == loc_state and loc_state["evses"][0]["connectors"][1]["max_amperage"] == 6
    assert env.at(SES)[-1].json() == await env.state("sessions", session_key("FR", "AB1", "S1"), "FR:AB1:S1")
    assert env.at(SES)[-1].json()["kwh"] == 3.5
    for m in ("locations", "sessions"):
        assert await env.metric("relay_patches_healed_total", module=m) == before[m] + 1
    await wait_until(env.drained, what="streams drained")


async def test_no_healing_when_turned_off(make_env: Callable[..., Any]) -> None:
    env: Env = await make_env(RELAY_STATE_HEAL_PATCHES="false")
    await env.send("PUT", "/locations/FR/AB1/LOC1", gireve_location("LOC1"))
    await env.iop.wait_for(lambda: len(env.iop.delivered(LOC)) == 1)
    env.iop.script = lambda r: Reply(status=404, ocpi=2003) if r.method == "PATCH" else None
    await env.send(
        "PATCH", "/locations/FR/AB1/LOC1/3256", {"status": "BLOCKED", "last_updated": "2024-01-01T00:01:00Z"}
    )
    await wait_until(lambda: len(env.iop.received) == 2)
    await wait_until(env.drained, what="dead-lettered")
    [dead] = await env.dead("locations")
    assert dead.info["unknown_object"] is True and dead.info["ocpi_code"] == 2003
    assert [r.method for r in env.iop.received] == ["PUT", "PATCH"]  # no PUT followed


async def test_a_put_answered_2003_is_not_healed(make_env: Callable[..., Any]) -> None:
    env: Env = await make_env()
    healed = await env.metric("relay_patches_healed_total", module="locations")
    env.iop.script = lambda r: Reply(status=404, ocpi=2003)
    await env.send("PUT", "/locations/FR/AB1/LOC1", gireve_location("LOC1"))
    await wait_until(env.drained, what="dead-lettered")
    assert [r.method for r in env.iop.received] == ["PUT"]
    assert len(await env.dead("locations")) == 1
    assert await env.metric("relay_patches_healed_total", module="locations") == healed


async def test_patch_of_a_never_seen_object_is_forwarded_as_sent(make_env: Callable[..., Any]) -> None:
    env: Env = await make_env()
    body = {"status": "BLOCKED", "last_updated": "2024-01-01T00:01:00Z"}
    data = await env.send("PATCH", "/locations/FR/AB1/NEW/3256", body)
    assert data["unknown_object"] is True
    await env.iop.wait_for(lambda: len(env.iop.delivered()) == 1)
    [got] = env.iop.received
    assert (got.method, got.path, got.json()) == ("PATCH", "/ocpi/2.2.1/locations/FR/AB1/NEW/3256", body)
    assert await env.state("locations", location_key("FR", "AB1", "NEW"), "FR:AB1:NEW") is None
    # The IOP does not know it either: there is no state to heal with, so it ends as a dead letter.
    env.iop.script = lambda r: Reply(status=404, ocpi=2003)
    await env.send("PATCH", "/locations/FR/AB1/NEW2", {"name": "x", "last_updated": "2024-01-01T00:01:00Z"})
    await wait_until(env.drained, what="dead-lettered")
    [dead] = await env.dead("locations")
    assert dead.info["unknown_object"] is True and dead.event.method == "PATCH"
    assert {r.method for r in env.iop.received} == {"PATCH"}  # never a PUT made up from nothing


# -- S2: Sessions PATCH → PUT ------------------------------------------------------------------------


def period(start: str, kwh: float) -> dict[str, Any]:
    return {"start_date_time": start, "dimensions": [{"type": "ENERGY", "volume": kwh}]}


@pytest.mark.parametrize("to_put", [True, False])
async def test_session_patch_reaches_the_iop_as_a_put_of_the_merged_session(
    make_env: Callable[..., Any], to_put: bool
) -> None:
    env: Env = await make_env(**({} if to_put else {"RELAY_STATE_SESSIONS_PATCH_TO_PUT": "false"}))
    assert env.relay.settings.state.sessions_patch_to_put is to_put  # on by default
    put = session_of("AB1", "S1", "2024-01-01T00:00:00Z", status="ACTIVE")
    patch = {"charging_periods": [period("2024-01-01T00:05:00Z", 2.5)], "kwh": 44.5, "status": "COMPLETED",
             "last_updated": "2024-01-01T00:06:00Z"}  # fmt: skip
    await env.send("PUT", "/sessions/FR/AB1/S1", put)
    await env.send("PATCH", "/sessions/FR/AB1/S1", patch)
    await env.iop.wait_for(lambda: len(env.iop.delivered(SES)) == 2)
    first, second = env.at(SES)
    assert (first.method, first.json()) == ("PUT", put)
    merged = {**put, **patch, "charging_periods": put["charging_periods"] + patch["charging_periods"]}
    if to_put:
        assert (second.method, second.json()) == ("PUT", merged)
    else:
        assert (second.method, second.json()) == ("PATCH", patch)
    assert await env.state("sessions", session_key("FR", "AB1", "S1"), "FR:AB1:S1") == merged


# -- F2: tariff variants -----------------------------------------------------------------------------


async def test_two_variants_of_one_tariff_id_are_both_delivered(make_env: Callable[..., Any]) -> None:
    env: Env = await make_env()
    default, targeted = tariff_of("T1", "2024-01-01T00:00:00Z"), tariff_of("T1", "2024-01-01T00:00:01Z", ("DE", "MP1"))
    targeted["elements"][0]["price_components"][0]["price"] = 0.5
    await env.send("PUT", "/tariffs/FR/AB1/T1", default)
    await env.send("PUT", "/tariffs/FR/AB1/T1", targeted)
    await env.iop.wait_for(lambda: len(env.iop.delivered()) == 2)
    assert sorted((r.method, r.path) for r in env.iop.received) == [("PUT", "/ocpi/2.2.1/tariffs/FR/AB1/T1")] * 2
    assert sorted((r.json() for r in env.iop.received), key=lambda d: "target_operator_party_id" in d) == [
        default, targeted
    ]  # fmt: skip
    # A variant is retired with a PUT that ends it (its DELETE is refused at the ingress, F1): the
    # variant's PUT reaches the IOP with its target, and the default tariff is untouched.
    retired = {**targeted, "end_date_time": "2024-06-01T00:00:00Z", "last_updated": "2024-01-01T00:00:02Z"}
    await env.send("PUT", "/tariffs/FR/AB1/T1", retired)
    await env.iop.wait_for(lambda: len(env.iop.delivered()) == 3)
    assert env.iop.received[-1].method == "PUT" and env.iop.received[-1].json() == retired
    assert await env.state("tariffs", tariff_key("FR", "AB1", "T1", "DE", "MP1"), "FR:AB1:T1:DE:MP1") == retired
    assert await env.state("tariffs", tariff_key("FR", "AB1", "T1", None, None), "FR:AB1:T1:*") == default


# -- S4: Advenir --------------------------------------------------------------------------------------


def token(party: str, uid: str) -> dict[str, Any]:
    return {"country_code": "FR" if party != "TST" else "NL", "party_id": party, "uid": uid, "type": "RFID",
            "contract_id": f"FR-{party}-C{uid}"}  # fmt: skip


class SplitPeer(OcpiPeer):
    """Registers the relay and pulls from it, but announces a FakeIop's module receivers for the pushes."""

    def __init__(self, receivers: FakeIop) -> None:
        super().__init__()
        self.receivers = receivers

    def endpoints(self) -> list[dict[str, str]]:
        eps = [{"identifier": m, "role": "RECEIVER", "url": f"{self.receivers.url}/{m}"} for m in MODULES]
        return [*eps, {"identifier": "credentials", "role": "SENDER", "url": self.endpoint("credentials")}]


@dataclass
class Pushed:
    iop: Iop
    receivers: FakeIop


@pytest.fixture
async def advenir_iop(make_settings: Callable[..., Settings]) -> AsyncIterator[Pushed]:
    """FR/AB1 with advenir on (its own tokens are local), FR/AB2 with it off; forwarder on, pulls allowed."""
    operators = [dict(OPERATORS[0], advenir=True), OPERATORS[1]]
    token_a = "token-a-" + secrets.token_hex(8)
    # Compaction off: every push is its own request, and the test counts them.
    settings = make_settings(RELAY_OCPI_TOKEN_A=token_a, RELAY_OPERATORS_JSON=json.dumps(operators),
                             RELAY_FORWARDER_BACKOFF_INITIAL_S="0.01", RELAY_FORWARDER_BACKOFF_MAX_S="0.05",
                             RELAY_FORWARDER_SHUTDOWN_TIMEOUT_S="1",
                             RELAY_FORWARDER_COMPACT="")  # fmt: skip
    receivers = FakeIop()
    await receivers.start()
    try:
        async with pulling(settings, token_a, SplitPeer(receivers)) as iop:
            yield Pushed(iop, receivers)
    finally:
        await receivers.close()


def masked(doc: dict[str, Any]) -> dict[str, Any]:
    return {**doc, "cdr_token": ADVENIR}


async def test_advenir_replaces_exactly_the_cdr_token_of_local_charges_pushed_and_pulled(
    advenir_iop: Pushed,
) -> None:
    iop, receivers = advenir_iop.iop, advenir_iop.receivers
    t0 = "2024-01-01T00:00:00Z"
    local = session_of("AB1", "S-LOCAL", t0, cdr_token=token("AB1", "AA11BB22"))
    roaming = session_of("AB1", "S-ROAM", "2024-01-01T00:00:01Z", cdr_token=token("TST", "CC33DD44"))
    other = session_of("AB2", "S-AB2", t0, cdr_token=token("AB2", "EE55FF66"))
    local_cdr = cdr_of("AB1", "C-LOCAL", t0, session_id="S-LOCAL", cdr_token=token("AB1", "AA11BB22"))
    roaming_cdr = cdr_of("AB1", "C-ROAM", "2024-01-01T00:00:01Z", session_id="S-ROAM",
                         cdr_token=token("TST", "CC33DD44"))  # fmt: skip
    other_cdr = cdr_of("AB2", "C-AB2", t0, session_id="S-AB2", cdr_token=token("AB2", "EE55FF66"))
    patch = {"kwh": 50.0, "last_updated": "2024-01-01T00:00:02Z"}
    await iop.batch(
        [
            op("PUT", "/sessions/FR/AB1/S-LOCAL", local),
            op("PUT", "/sessions/FR/AB1/S-ROAM", roaming),
            op("PUT", "/sessions/FR/AB2/S-AB2", other),
            op("PATCH", "/sessions/FR/AB1/S-LOCAL", patch),
            op("POST", "/cdrs", local_cdr),
            op("POST", "/cdrs", roaming_cdr),
            op("POST", "/cdrs", other_cdr),
        ]
    )

    def pushed() -> list[tuple[str, str, Any]]:
        return [(r.method, r.path.removeprefix("/ocpi/2.2.1/"), r.json()) for r in receivers.received]

    await receivers.wait_for(lambda: len(receivers.delivered()) == 7)
    by_path: dict[str, list[tuple[str, Any]]] = {}
    for method, path, body in pushed():
        by_path.setdefault(path, []).append((method, body))
    # Pushed: the local charge's Session (PUT, then the PATCH as a PUT of the merged session) and CDR
    # carry GIREVE's token and nothing else changes; the roaming charge and FR/AB2 go as they came.
    assert by_path["sessions/FR/AB1/S-LOCAL"] == [("PUT", masked(local)), ("PUT", masked({**local, **patch}))]
    assert by_path["sessions/FR/AB1/S-ROAM"] == [("PUT", roaming)]
    assert by_path["sessions/FR/AB2/S-AB2"] == [("PUT", other)]
    assert sorted(by_path["cdrs"], key=lambda x: x[1]["id"]) == [
        ("POST", other_cdr), ("POST", masked(local_cdr)), ("POST", roaming_cdr)
    ]  # fmt: skip
    # Pulled: the same view.
    sessions = {d["id"]: d for d in (await iop.get("sessions", to=None)).data}
    assert sessions == {"S-LOCAL": masked({**local, **patch}), "S-ROAM": roaming, "S-AB2": other}
    cdrs = {d["id"]: d for d in (await iop.get("cdrs", to=None)).data}
    assert cdrs == {"C-LOCAL": masked(local_cdr), "C-ROAM": roaming_cdr, "C-AB2": other_cdr}
    assert [d["cdr_token"] for d in (await iop.get("sessions", to=("FR", "AB1"))).data] == [
        roaming["cdr_token"],
        ADVENIR,
    ]
    # The state store keeps the real token (so a later PUT or heal is built from the truth).
    assert iop.relay.store is not None
    raw = await StateReader(iop.relay.store).one("sessions", session_key("FR", "AB1", "S-LOCAL"), "FR:AB1:S-LOCAL")
    assert raw is not None and msgspec.json.decode(raw)["cdr_token"] == local["cdr_token"]
    # The local charge's real token never left through either interface.
    pulled = [(await iop.get(m, to=None)).data for m in ("sessions", "cdrs")]
    assert "AA11BB22" not in json.dumps([pushed(), pulled])


async def test_advenir_local_issuers_and_configured_values(make_settings: Callable[..., Settings]) -> None:
    operators = [dict(OPERATORS[0], advenir=True, advenir_local_issuers=["FR:XYZ"])]
    token_a = "token-a-" + secrets.token_hex(8)
    settings = make_settings(
        RELAY_OCPI_TOKEN_A=token_a,
        RELAY_OPERATORS_JSON=json.dumps(operators),
        RELAY_ADVENIR_CONTRACT_ID="Confirmed-At-Onboarding",
        RELAY_FORWARDER_ENABLED="false",
    )
    async with pulling(settings, token_a) as iop:
        xyz = {**token("AB1", "11112222"), "party_id": "XYZ"}
        await iop.batch(
            [
                op("PUT", "/sessions/FR/AB1/S1", session_of("AB1", "S1", "2024-01-01T00:00:00Z", cdr_token=xyz)),
                op(
                    "PUT",
                    "/sessions/FR/AB1/S2",
                    session_of("AB1", "S2", "2024-01-01T00:00:01Z", cdr_token=token("AB1", "33334444")),
                ),
            ]
        )
        got = [d["cdr_token"] for d in (await iop.get("sessions")).data]
        # Only the configured issuer is "local" now; the operator's own tokens are roaming-like.
        assert got == [{**ADVENIR, "contract_id": "Confirmed-At-Onboarding"}, token("AB1", "33334444")]
