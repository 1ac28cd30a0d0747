"""GIREVE's side of the checklist tests (``tests/test_gireve_checklist_*.py``).

``gireve()`` runs a relay on the test Redis and registers it the way GIREVE does (Register – FromIOP): an
IOP-like peer (``HubPeer``) walks the relay's versions, version details and credentials with token A,
offering its own token and a HUB role (FR/107, the pre-production IOP, unless told otherwise). Its version
details point every Receiver, and the Tokens Sender that real-time authorisation calls, at a recording
``FakeIop`` under ``IOP_BASE`` (a decoy Locations SENDER endpoint too: the relay must push to the RECEIVER
one). A fake CSMS serves the webhook. ``Gireve`` talks as the CSMS (ingress) and as GIREVE (OCPI listener,
with GIREVE's routing headers), and reads what GIREVE received.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp

from relay.config import Settings
from relay.service import Relay
from relay.store import DeadLetter, DeliveryStore
from tests.conftest import example, gireve_location
from tests.csms_fake import Bench, CsmsFake, RecordingIop, RoamingPeer, fast_env, iop_token
from tests.fake_iop import FakeIop, Received, Reply, Script
from tests.ocpi_peer import ROUTING_HEADERS, running

# The lines of the brief's "GIREVE checklist (CPO side)", in its order.
CHECKLIST = (
    "T1", "T2", "T3", "T4", "T5", "T6", "C1", "C2", "C3", "C4", "L1", "L2", "L3", "L4", "L5",
    "S1", "S2", "S3", "S4", "S5", "F1", "F2", "F3", "K1", "K2", "K3",
)  # fmt: skip
IOP = ("FR", "107")  # GIREVE pre-production; production is FR/007
EMSP = ("NL", "TNM")  # an eMSP behind the IOP (tokens, commands)
AB1, AB2 = ("FR", "AB1"), ("FR", "AB2")
OPERATORS: list[dict[str, Any]] = [
    {"country_code": "FR", "party_id": "AB1", "emi3_id": "FR*AB1", "name": "Example CPO"},
    {"country_code": "FR", "party_id": "AB2", "emi3_id": "FR*AB2", "name": "Second CPO"},
]
IOP_BASE = "/iop/ocpi/2.2.1"  # where GIREVE's version details point the relay
TOKENS_SENDER = IOP_BASE + "/sender/tokens"
DECOY_SENDER = IOP_BASE + "/sender/locations"
RECEIVERS = ("locations", "sessions", "cdrs", "tariffs")
OCPI_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,4})?Z$")  # UTC with Z, within string(25)
UNHOSTED = "ZZ9"  # a party this relay does not host
REFS = {"location_id": "LOC1", "evse_uids": ["3256"]}  # LocationReferences of a real-time authorisation


def at_iop(module: str, *ids: str) -> str:
    """The path of an object at GIREVE's Receiver of a module (a CDR: the module's endpoint itself)."""
    return "/".join([IOP_BASE, module, *ids])


def routing(frm: tuple[str, str], to: tuple[str, str]) -> dict[str, str]:
    return {"OCPI-from-country-code": frm[0], "OCPI-from-party-id": frm[1],
            "OCPI-to-country-code": to[0], "OCPI-to-party-id": to[1]}  # fmt: skip


def routing_of(headers: dict[str, str]) -> tuple[tuple[str, str], tuple[str, str]]:
    """((from cc, from pid), (to cc, to pid)) of a request or answer; "" for an absent header."""
    h = {k.lower(): v for k, v in headers.items()}
    cc_f, pid_f, cc_t, pid_t = (h.get(name.lower(), "") for name in ROUTING_HEADERS)
    return (cc_f, pid_f), (cc_t, pid_t)


def has_routing(headers: dict[str, str]) -> bool:
    lowered = {k.lower() for k in headers}
    return bool(lowered & {h.lower() for h in ROUTING_HEADERS})


# -- objects as the CSMS sends them ---------------------------------------------------------------------


def location(location_id: str = "LOC1", party: str = "AB1", **changes: Any) -> dict[str, Any]:
    """examples/location.json for an operator: its ids, EVSE ids under its eMI3 id."""
    doc = gireve_location(location_id, party_id=party, **changes)
    for evse in doc["evses"]:
        evse["evse_id"] = evse["evse_id"].replace("FR*AB1*", f"FR*{party}*")
    return doc


def cdr_token(issuer: tuple[str, str] = EMSP, uid: str = "0102ABCD") -> dict[str, Any]:
    return {"country_code": issuer[0], "party_id": issuer[1], "uid": uid, "type": "RFID",
            "contract_id": f"{issuer[0]}-{issuer[1]}-C0001"}  # fmt: skip


def session(session_id: str = "S1", status: str = "ACTIVE", last_updated: str = "2026-03-09T10:17:09Z",
            party: str = "AB1", **changes: Any) -> dict[str, Any]:  # fmt: skip
    """A Session of a roaming charge (token of the eMSP NL/TNM) unless ``cdr_token`` says otherwise."""
    body = example("session_example_1_simple_start.json", country_code="FR", party_id=party, id=session_id,
                   status=status, last_updated=last_updated, cdr_token=cdr_token(), auth_method="COMMAND")  # fmt: skip
    body.update(changes)
    return body


def cdr(cdr_id: str = "CDR1", session_id: str = "S1", party: str = "AB1", **changes: Any) -> dict[str, Any]:
    body = example("cdr_example.json", country_code="FR", party_id=party, id=cdr_id, session_id=session_id,
                   cdr_token=cdr_token())  # fmt: skip
    body.update(changes)
    return body


def tariff(tariff_id: str = "T1", target: tuple[str, str] | None = None, price: float = 2.0,
           **changes: Any) -> dict[str, Any]:  # fmt: skip
    body = example("tariff_1_simple_2hour.json", country_code="FR", party_id="AB1", id=tariff_id,
                   start_date_time="2026-01-01T00:00:00Z", last_updated="2026-01-01T00:00:00Z")  # fmt: skip
    body["elements"][0]["price_components"][0]["price"] = price
    if target is not None:
        body["target_operator_country_code"], body["target_operator_party_id"] = target
    body.update(changes)
    return body


def start_session(response_url: str, **changes: Any) -> dict[str, Any]:
    """A START_SESSION as GIREVE sends it for an eMSP (None in ``changes`` leaves a field out)."""
    body = {"response_url": response_url, "token": iop_token("0102ABCD", "ALLOWED"), "location_id": "LOC1",
            "evse_uid": "3256", "connector_id": "1", "authorization_reference": "AUTH-REF-1", **changes}  # fmt: skip
    return {k: v for k, v in body.items() if v is not None}


# -- GIREVE ---------------------------------------------------------------------------------------------


def authorizing(allowed: str = "ALLOWED") -> Script:
    """GIREVE answering every real-time authorisation with an AuthorizationInfo (the eMSP's ``allowed``)."""

    def script(r: Received) -> Reply | None:
        if not r.path.startswith(TOKENS_SENDER + "/"):
            return None
        uid = r.path.removeprefix(TOKENS_SENDER + "/").removesuffix("/authorize")
        info = {"allowed": allowed, "token": iop_token(uid, "ALLOWED"), "location": REFS}
        return Reply(body=json.dumps({"status_code": 1000, "data": info, "timestamp": "2026-01-01T00:00:00Z"}).encode())

    return script


def asked(iop: FakeIop) -> list[Received]:
    """Real-time authorisations that reached GIREVE (arrived, answered or not)."""
    return [r for r in iop.arrived if r.path.startswith(TOKENS_SENDER + "/")]


class HubPeer(RoamingPeer):
    """GIREVE's registration side: announces ``IOP_BASE`` endpoints on the FakeIop, presents ``hub`` (the
    peer's own ``register``, whose offer carries ``hub_role(*hub)``)."""

    def __init__(self, iop: FakeIop, hub: tuple[str, str] = IOP) -> None:
        super().__init__(iop)
        self.hub = hub

    def endpoints(self) -> list[dict[str, str]]:
        origin = f"http://127.0.0.1:{self.iop.port}"
        eps = [{"identifier": "locations", "role": "SENDER", "url": origin + DECOY_SENDER}]
        eps += [{"identifier": m, "role": "RECEIVER", "url": origin + at_iop(m)} for m in RECEIVERS]
        eps.append({"identifier": "tokens", "role": "SENDER", "url": origin + TOKENS_SENDER})
        eps.append({"identifier": "credentials", "role": "SENDER", "url": self.endpoint("credentials")})
        return eps


class Gireve(Bench):
    """A relay registered by GIREVE; HTTP as the CSMS and as GIREVE; what GIREVE received."""

    iop: RecordingIop
    peer: HubPeer

    @property
    def hub(self) -> tuple[str, str]:
        return self.peer.hub

    async def send(self, method: str, path: str, body: Any = None, *, expect: int = 202,
                   headers: dict[str, str] | None = None) -> Any:  # fmt: skip
        """A call of the CSMS to the ingress that must be answered ``expect``; the decoded answer."""
        status, answer = await self.ingress(method, path, body, headers=headers)
        assert status == expect, (method, path, status, answer)
        return answer

    async def as_gireve(self, method: str, path: str, body: Any = None, *, to: tuple[str, str] = AB1,
                        frm: tuple[str, str] | None = None,
                        headers: dict[str, str] | None = None) -> tuple[int, Any, dict[str, str]]:  # fmt: skip
        """A call of GIREVE to the OCPI listener: its token, OCPI-from = GIREVE (or ``frm``), OCPI-to = ``to``."""
        return await self.ocpi(method, path, body, headers={**routing(frm or self.hub, to), **(headers or {})})

    def pushed(self, module: str, *ids: str) -> list[Received]:
        """Requests of the CSMS's objects that GIREVE took (answered with success), in the order it took them."""
        return self.iop.delivered(at_iop(module, *ids))

    def tried(self, module: str, *ids: str) -> list[Received]:
        """Every request of that path that reached GIREVE (answered), successes or not, in order."""
        path = at_iop(module, *ids)
        return [r for r in self.iop.received if r.path == path]

    async def drained(self) -> bool:
        assert self.relay.store is not None
        return sum((await self.relay.store.stream_lengths()).values()) == 0

    async def dead(self, module: str) -> list[DeadLetter]:
        assert self.relay.store is not None
        ds = DeliveryStore(self.relay.store)
        return [d for shard in range(self.relay.store.shards) for d in await ds.dead_letters(module, shard)]


def versions_url(relay: Relay) -> str:
    return f"{relay.settings.ocpi.public_url.rstrip('/')}/versions"


def new_token_a() -> str:
    return "token-a-" + secrets.token_hex(8)


@contextlib.asynccontextmanager
async def gireve(make_settings: Callable[..., Settings], *, hub: tuple[str, str] = IOP,
                 operators: list[dict[str, Any]] | None = None, **env: str) -> AsyncIterator[Gireve]:  # fmt: skip
    """Start GIREVE's fakes and the CSMS's, a relay hosting ``operators`` (FR/AB1 and FR/AB2), registered From IOP."""
    iop, csms = RecordingIop(), CsmsFake()
    await iop.start()
    await csms.start()
    peer = HubPeer(iop, hub)
    await peer.start()
    token_a = new_token_a()
    base = {**fast_env(csms, token_a), "RELAY_OPERATORS_JSON": json.dumps(operators or OPERATORS),
            "RELAY_FORWARDER_LINK_FAILURE_THRESHOLD": "50",
            "RELAY_FORWARDER_COMPACT": ""}  # each update followed (L3): compaction in test_compaction.py  # fmt: skip
    settings = make_settings(**{**base, **env})
    try:
        async with running(settings) as relay, aiohttp.ClientSession() as http:
            await peer.register(versions_url(relay), token_a)
            await relay._apply_registration()  # the watch loop would within a second: don't wait for it
            # A replica without a forwarder (some pull tests) is "disabled" whatever the registration.
            assert relay.link.state == ("up" if settings.forwarder.enabled else "disabled"), relay.link.state
            yield Gireve(relay, iop, peer, csms, http)
    finally:
        await csms.close()
        await peer.close()
        await iop.close()


@contextlib.asynccontextmanager
async def hub_peer(hub: tuple[str, str] = IOP) -> AsyncIterator[HubPeer]:
    """GIREVE's fakes alone, for tests that start (and restart) the relay themselves."""
    iop = RecordingIop()
    await iop.start()
    peer = HubPeer(iop, hub)
    await peer.start()
    try:
        yield peer
    finally:
        await peer.close()
        await iop.close()
