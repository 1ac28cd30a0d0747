"""Compaction of backlogs (relay.compaction): the pure folding rules, then end to end against the real
Redis and the fake IOP taken down while updates pile up and brought back.

End to end, every test also checks that the IOP's final state (the requests it took, applied in the
order it took them, with the relay's own merge rules) equals the relay's stored state.
"""

from __future__ import annotations

import asyncio
import copy
from collections import deque
from collections.abc import Callable
from typing import Any

import msgspec
import pytest

from relay import compaction, metrics, state
from relay.buffer import Buffer
from relay.compaction import Compacted, fold
from relay.events import Event
from relay.forwarder import Forwarder
from relay.ordering import location_key, session_key, tariff_key
from relay.shard import Shard
from relay.state import state_field
from relay.store import Entry
from relay.store import keys as K
from tests.conftest import gireve_location
from tests.fake_iop import Reply
from tests.test_crash import world  # noqa: F401  (the fixture)
from tests.test_forwarder import Env, fr_cdr, fr_session, make_env  # noqa: F401  (make_env: the fixture)
from tests.waiting import stays_false, wait_until

LOC_PREFIX = "/ocpi/2.2.1/locations/FR/AB1/"
SES_PREFIX = "/ocpi/2.2.1/sessions/FR/AB1/"
# The link goes down at the first refused connection and probes every half second at most.
QUICK = {
    "RELAY_FORWARDER_LINK_FAILURE_THRESHOLD": "1",
    "RELAY_FORWARDER_PROBE_MAX_S": "0.5",
    "RELAY_FORWARDER_COMPACT": "locations,sessions,tariffs",
}  # the default (tests.test_forwarder's FAST: off)
STATUSES = ["AVAILABLE", "CHARGING", "BLOCKED", "OUTOFORDER", "RESERVED"]


# -- the pure rules ------------------------------------------------------------------------------

_seq = iter(range(1, 1_000_000))


def entry(module: str = "locations", method: str = "PATCH", evse: str | None = "E1", conn: str | None = None,
          body: dict[str, Any] | None = None, key: str = "loc:FR:AB1:L1") -> Entry:  # fmt: skip
    n = next(_seq)
    ev = Event(id=f"ev{n}", module=module, method=method, country_code="FR", party_id="AB1",  # type: ignore[arg-type]
               object_id="L1", evse_uid=evse, connector_id=conn, key=key, correlation_id=f"c{n}",
               received_at=0.0, body=msgspec.json.encode(body if body is not None else {}))  # fmt: skip
    return Entry(f"relay:{{r0}}:{module}", 0, f"1000-{n}", ev)


def status(evse: str, value: str, stamp: int = 0) -> Entry:
    return entry(evse=evse, body={"status": value, "last_updated": f"2026-03-09T10:00:{stamp:02d}Z"})


def body(e: Entry) -> Any:
    return msgspec.json.decode(e.event.body)


def test_status_patches_fold_per_evse_head_path_first_latest_status() -> None:
    items = [status("E2", "CHARGING", 1), status("E1", "BLOCKED", 2), status("E2", "AVAILABLE", 3),
             status("E1", "CHARGING", 4), status("E3", "RESERVED", 5), status("E2", "AVAILABLE", 6)]  # fmt: skip
    out = fold(items, state=True)
    assert out is not None
    assert [e.event.evse_uid for e in out] == ["E2", "E1", "E3"]
    assert [body(e)["status"] for e in out] == ["AVAILABLE", "CHARGING", "RESERVED"]
    assert body(out[0])["last_updated"] == "2026-03-09T10:00:06Z"
    e2 = out[0]
    assert isinstance(e2, Compacted) and e2.id == items[5].id and e2.size == 3
    assert e2.folded_ids() == [items[0].id, items[2].id]
    assert out[2].event is items[4].event and compaction.size(out[2]) == 1  # alone on its path: as it came
    assert sum(compaction.size(e) for e in out) == len(items)


def test_a_static_change_is_a_barrier_and_a_connector_tariff_change_is_dynamic() -> None:
    tariffs = entry(evse="E1", conn="1", body={"tariff_ids": ["T2"], "last_updated": "2026-03-09T10:00:00Z"})
    tariffs2 = entry(evse="E1", conn="1", body={"tariff_ids": ["T3"], "last_updated": "2026-03-09T10:00:01Z"})
    put = entry(method="PUT", evse=None, body={"id": "L1"})
    static = entry(evse="E1", body={"status": "AVAILABLE", "capabilities": []})  # a static field: a barrier
    items = [status("E1", "CHARGING"), status("E1", "BLOCKED"), put, status("E1", "AVAILABLE"), tariffs, tariffs2,
             static, status("E1", "CHARGING")]  # fmt: skip
    out = fold(items, state=True)
    assert out is not None
    assert [(e.event.method, e.event.evse_uid, e.event.connector_id) for e in out] == [
        ("PATCH", "E1", None), ("PUT", None, None), ("PATCH", "E1", None), ("PATCH", "E1", "1"),
        ("PATCH", "E1", None), ("PATCH", "E1", None)]  # fmt: skip
    assert body(out[0])["status"] == "BLOCKED" and body(out[3])["tariff_ids"] == ["T3"]
    # Alone between dynamic runs, sent as they came; no dynamic run crosses them.
    assert out[1].event is put.event and out[4].event is static.event
    assert [compaction.size(e) for e in out] == [2, 1, 1, 2, 1, 1]
    # A run of static changes: one PUT of the current state (from_state), standing for all of them.
    runs = fold([put, static, entry(method="PUT", evse="E9", body={"uid": "E9"})], state=True)
    assert runs is not None and len(runs) == 1 and runs[0].event.from_state and compaction.size(runs[0]) == 3
    assert fold([put, static], state=False) is None  # no state store: no PUT of the current state, barriers


def test_sessions_tariffs_and_never_cdrs() -> None:
    sk = session_key("FR", "AB1", "S1")
    ses = [
        entry("sessions", "PUT", None, body={"kwh": 1}, key=sk),
        entry("sessions", "PATCH", None, body={"kwh": 2}, key=sk),
    ]
    out = fold(ses, state=True)
    assert out is not None and len(out) == 1 and out[0].event.from_state and out[0].id == ses[1].id
    tk = tariff_key("FR", "AB1", "T1", None, None)
    tar = [entry("tariffs", "PUT", None, body={"v": 1}, key=tk), entry("tariffs", "DELETE", None, key=tk),
           entry("tariffs", "PUT", None, body={"v": 3}, key=tk)]  # fmt: skip
    out = fold(tar, state=True)
    assert out is not None and len(out) == 1 and body(out[0]) == {"v": 3} and not out[0].event.from_state
    cdrs = [
        entry("cdrs", "POST", None, body={"id": "C1"}, key=sk),
        entry("cdrs", "POST", None, body={"id": "C2"}, key=sk),
    ]
    assert fold(cdrs, state=True) is None
    assert compaction.modules(["locations", "cdrs", "commands"]) == frozenset({"locations"})


async def test_folding_a_queue_moves_entries_from_held_to_folded() -> None:
    buf = Buffer(100, 10)
    items = [status("E1", s) for s in STATUSES]
    buf.add(len(items))
    q = deque(items)
    head = q[0]
    assert compaction.fold_queue(q, buf, state=True, keep_head=True) == 4
    assert q[0] is head and len(q) == 2 and buf.held == 1 and buf.folded == 4 and buf.units == 1
    assert compaction.fold_queue(q, buf, state=True, keep_head=True) == 0  # nothing more to fold
    assert compaction.fold_queue(q, buf, state=True) == 1
    assert len(q) == 1 and buf.held == 0 and buf.folded == 5 and compaction.size(q[0]) == 5 and buf.units == 1
    buf.unfold(compaction.size(q[0]))
    assert (buf.units, buf.folded) == (0, 0)


# -- end to end ------------------------------------------------------------------------------------


def location(loc: str, evses: int) -> dict[str, Any]:
    """The example Location with ``evses`` EVSEs (uids E0, E1, …)."""
    doc = gireve_location(loc)
    first = doc["evses"][0]
    doc["evses"] = []
    for i in range(evses):
        e = copy.deepcopy(first)
        e["uid"], e["evse_id"], e["status"] = f"E{i}", f"FR*AB1*E0415030{i:02d}", "AVAILABLE"
        doc["evses"].append(e)
    return doc


def stamp(n: int) -> str:
    return f"2026-03-09T{10 + n // 3600:02d}:{n // 60 % 60:02d}:{n % 60:02d}Z"


def iop_documents(env: Env, prefix: str, module: str) -> dict[str, dict[str, Any] | None]:
    """Object id → the object as the IOP holds it: the requests it took, in order, merged like the relay."""
    docs: dict[str, dict[str, Any] | None] = {}
    for r in env.iop.delivered():
        if not r.path.startswith(prefix):
            continue
        ids = r.path.removeprefix(prefix).split("/")
        evse, conn = (ids[1] if len(ids) > 1 else None), (ids[2] if len(ids) > 2 else None)
        docs[ids[0]] = state.apply(module, docs.get(ids[0]), r.json(), r.method, evse, conn).doc
    return docs


async def relay_document(env: Env, module: str, key: str, object_id: str) -> Any:
    ev = Event(id="x", module=module, method="PUT", country_code="FR", party_id="AB1", object_id=object_id,  # type: ignore[arg-type]
               key=key, correlation_id="x", received_at=0.0)  # fmt: skip
    _, raw = await env.store.read_state(module, key, state_field(ev)[0])
    return msgspec.json.decode(raw) if raw else None


async def same_final_state(env: Env, loc: str) -> None:
    mine = await relay_document(env, "locations", location_key("FR", "AB1", loc), loc)
    theirs = iop_documents(env, LOC_PREFIX, "locations")[loc]
    assert theirs is not None
    assert [(e["uid"], e["status"]) for e in theirs["evses"]] == [(e["uid"], e["status"]) for e in mine["evses"]]
    assert theirs == mine


def compacted(module: str) -> float:
    """relay_compacted_total of a module in this process (the metric is the process's: compare to a baseline)."""
    return metrics.COMPACTED.value(module)


async def outage(env: Env, send: Callable[[], Any]) -> int:
    """Take the IOP down, run ``send`` (the CSMS's updates), wait for the link to be down, bring the IOP
    back; returns how many requests had arrived before it came back."""
    await env.iop.down()
    await send()
    await wait_until(lambda: env.relay.link.state == "down", 10, "link down")
    before = len(env.iop.arrived)
    await env.iop.start()
    return before


async def test_status_backlog_over_several_evses_drains_in_one_request_per_evse(make_env: Callable[..., Any]) -> None:  # noqa: F811
    env: Env = await make_env(**QUICK)
    evses, rounds = 6, 8
    base = compacted("locations")
    await env.send("PUT", "/locations/FR/AB1/L1", location("L1", evses))
    await env.iop.wait_for(lambda: len(env.iop.delivered()) == 1)

    async def statuses() -> None:
        n = 0
        for r in range(rounds):
            for i in range(evses):
                n += 1
                await env.send("PATCH", f"/locations/FR/AB1/L1/E{i}",
                               {"status": STATUSES[(r + i) % len(STATUSES)], "last_updated": stamp(n)})  # fmt: skip

    before = await outage(env, statuses)
    await wait_until(env.all_streams_empty, 20, "backlog drained")
    after = [r for r in env.iop.received[before:] if r.ok]
    assert all(r.method == "PATCH" for r in after)
    # One request per EVSE (the head that was retrying when the IOP came back included).
    assert len(after) == evses, [r.path for r in after]
    assert {r.path for r in after} == {f"{LOC_PREFIX}L1/E{i}" for i in range(evses)}
    await same_final_state(env, "L1")
    assert await env.metric("relay_compacted_total", module="locations") == compacted("locations")  # exported
    delivered_patches = len([r for r in env.iop.delivered() if r.method == "PATCH"])
    assert (
        compacted("locations") - base == evses * rounds - delivered_patches
    )  # every PATCH: delivered or counted as compacted
    assert await env.dead() == []


async def test_identical_statuses_collapse(make_env: Callable[..., Any]) -> None:  # noqa: F811
    env: Env = await make_env(**QUICK)
    await env.send("PUT", "/locations/FR/AB1/L2", location("L2", 1))
    base = compacted("locations")
    await env.iop.wait_for(lambda: len(env.iop.delivered()) == 1)

    async def repeats() -> None:
        for n, value in enumerate(["CHARGING"] * 6 + ["AVAILABLE"] * 6, start=1):
            await env.send("PATCH", "/locations/FR/AB1/L2/E0", {"status": value, "last_updated": stamp(n)})

    before = await outage(env, repeats)
    await wait_until(env.all_streams_empty, 20, "backlog drained")
    after = [r for r in env.iop.received[before:] if r.ok]
    assert len(after) == 1 and after[-1].json() == {"status": "AVAILABLE", "last_updated": stamp(12)}
    await same_final_state(env, "L2")
    assert compacted("locations") - base == 12 - (len(env.iop.delivered()) - 1)


async def test_a_put_in_the_middle_is_a_barrier_order_kept(make_env: Callable[..., Any]) -> None:  # noqa: F811
    env: Env = await make_env(**QUICK)
    await env.send("PUT", "/locations/FR/AB1/L3", location("L3", 2))
    await env.iop.wait_for(lambda: len(env.iop.delivered()) == 1)

    async def updates() -> None:
        for n in range(1, 5):
            await env.send("PATCH", "/locations/FR/AB1/L3/E0", {"status": STATUSES[n], "last_updated": stamp(n)})
        renamed = location("L3", 2) | {"name": "Renamed", "last_updated": stamp(10)}
        renamed["evses"][0]["status"] = "OUTOFORDER"
        await env.send("PUT", "/locations/FR/AB1/L3", renamed)
        for n in range(11, 15):
            await env.send("PATCH", "/locations/FR/AB1/L3/E1", {"status": STATUSES[n % 5], "last_updated": stamp(n)})
        await env.send("PATCH", "/locations/FR/AB1/L3/E0", {"status": "CHARGING", "last_updated": stamp(15)})

    before = await outage(env, updates)
    await wait_until(env.all_streams_empty, 20, "backlog drained")
    after = [r for r in env.iop.received[before:] if r.ok]
    kinds = [(r.method, r.path.removeprefix(LOC_PREFIX)) for r in after]
    put_at = kinds.index(("PUT", "L3"))
    assert set(kinds[:put_at]) == {("PATCH", "L3/E0")}  # the PATCHes before the PUT, before it
    assert kinds[put_at + 1 :] == [("PATCH", "L3/E1"), ("PATCH", "L3/E0")]  # after it: one per EVSE
    assert after[put_at].json()["name"] == "Renamed"
    assert after[-1].json()["status"] == "CHARGING" and after[-2].json()["status"] == STATUSES[14 % 5]
    await same_final_state(env, "L3")


async def test_sessions_compact_to_a_put_of_the_current_state_and_the_cdr_waits(make_env: Callable[..., Any]) -> None:  # noqa: F811
    env: Env = await make_env(**QUICK)
    cdr_path = "/ocpi/2.2.1/cdrs"
    base = compacted("sessions")
    await env.send("PUT", "/locations/FR/AB1/L4", location("L4", 1))
    await env.iop.wait_for(lambda: len(env.iop.delivered()) == 1)

    async def session_then_cdr() -> None:
        await env.send("PUT", "/sessions/FR/AB1/S1", fr_session("S1", kwh=1.0, status="ACTIVE"))
        for n in range(2, 7):
            await env.send("PATCH", "/sessions/FR/AB1/S1", {"kwh": float(n), "last_updated": stamp(n)})
        await env.send("PATCH", "/sessions/FR/AB1/S1", {"status": "COMPLETED", "last_updated": stamp(9)})
        await env.send("POST", "/cdrs", fr_cdr("CDR1", "S1"))

    gate = asyncio.Event()
    before = await outage(env, session_then_cdr)
    # The compacted session update is held at the IOP: the CDR must not go before it is answered.
    env.iop.script = lambda r: Reply(hold=gate) if r.path.startswith(SES_PREFIX) and not gate.is_set() else None
    await env.iop.wait_for(lambda: any(r.path.startswith(SES_PREFIX) for r in env.iop.arrived[before:]))
    await stays_false(lambda: any(r.path == cdr_path for r in env.iop.arrived[before:]), 0.3)
    gate.set()
    await wait_until(env.all_streams_empty, 20, "backlog drained")
    sessions = [r for r in env.iop.received[before:] if r.ok and r.path.startswith(SES_PREFIX)]
    assert len(sessions) == 1 and all(r.method == "PUT" for r in sessions)
    assert sessions[-1].json()["kwh"] == 6.0 and sessions[-1].json()["status"] == "COMPLETED"
    [cdr] = [r for r in env.iop.received if r.path == cdr_path]
    assert cdr.at >= sessions[-1].answered_at
    mine = await relay_document(env, "sessions", session_key("FR", "AB1", "S1"), "S1")
    assert iop_documents(env, SES_PREFIX, "sessions")["S1"] == mine
    assert compacted("sessions") - base == 7 - len(sessions)


async def test_compaction_off_for_a_module_sends_every_update(make_env: Callable[..., Any]) -> None:  # noqa: F811
    env: Env = await make_env(**{**QUICK, "RELAY_FORWARDER_COMPACT": "sessions"})
    await env.send("PUT", "/locations/FR/AB1/L5", location("L5", 2))
    base = compacted("locations")
    await env.iop.wait_for(lambda: len(env.iop.delivered()) == 1)

    async def statuses() -> None:
        for n in range(1, 11):
            await env.send(
                "PATCH", f"/locations/FR/AB1/L5/E{n % 2}", {"status": STATUSES[n % 5], "last_updated": stamp(n)}
            )

    await outage(env, statuses)
    await wait_until(env.all_streams_empty, 20, "backlog drained")
    patches = [r for r in env.iop.delivered() if r.method == "PATCH"]
    assert [r.json()["last_updated"] for r in patches] == [stamp(n) for n in range(1, 11)]
    assert compacted("locations") == base
    await same_final_state(env, "L5")


async def test_a_compacted_request_refused_is_one_dead_letter_standing_for_the_run(
    make_env: Callable[..., Any],  # noqa: F811
) -> None:
    env: Env = await make_env(**QUICK)
    await env.send("PUT", "/locations/FR/AB1/L6", location("L6", 1))
    await env.iop.wait_for(lambda: len(env.iop.delivered()) == 1)

    async def statuses() -> None:
        for n in range(1, 6):
            await env.send("PATCH", "/locations/FR/AB1/L6/E0", {"status": STATUSES[n % 5], "last_updated": stamp(n)})

    before = await outage(env, statuses)
    env.iop.script = lambda r: Reply(status=200, ocpi=2001) if r.method == "PATCH" else None
    await wait_until(env.all_streams_empty, 20, "backlog drained")
    refused = [r for r in env.iop.received[before:] if r.method == "PATCH"]
    dead = await env.dead()
    assert len(dead) == len(refused) == 1  # one dead letter standing for the whole run
    assert msgspec.json.decode(dead[-1].event.body) == {"status": STATUSES[0], "last_updated": stamp(5)}
    assert await env.stream_len() == 0


async def test_a_patch_the_state_does_not_hold_is_a_barrier(make_env: Callable[..., Any]) -> None:  # noqa: F811
    """An EVSE the stored Location lacks: its PATCH is not in the PUT of the current state, so it is sent."""
    env: Env = await make_env(**QUICK)
    await env.send("PUT", "/locations/FR/AB1/L7", location("L7", 1))
    await env.iop.wait_for(lambda: len(env.iop.delivered()) == 1)

    async def updates() -> None:
        await env.send("PATCH", "/locations/FR/AB1/L7", {"name": "A", "last_updated": stamp(1)})
        await env.send("PATCH", "/locations/FR/AB1/L7/E9", {"floor_level": "2", "last_updated": stamp(2)})
        await env.send("PATCH", "/locations/FR/AB1/L7", {"name": "B", "last_updated": stamp(3)})

    before = await outage(env, updates)
    await wait_until(env.all_streams_empty, 20, "backlog drained")
    after = [r for r in env.iop.received[before:] if r.ok]
    assert any(r.path == LOC_PREFIX + "L7/E9" and r.json()["floor_level"] == "2" for r in after), [
        (r.method, r.path) for r in after]  # fmt: skip
    assert after[-1].path == LOC_PREFIX + "L7" and after[-1].json()["name"] == "B"


async def test_a_state_unit_that_finds_no_state_sends_its_entries_one_by_one(
    make_env: Callable[..., Any],  # noqa: F811
) -> None:
    env: Env = await make_env(**QUICK)
    await env.send("PUT", "/locations/FR/AB1/L8", location("L8", 1))
    await env.iop.wait_for(lambda: len(env.iop.delivered()) == 1)
    key = location_key("FR", "AB1", "L8")

    async def updates() -> None:
        await env.send("PATCH", "/locations/FR/AB1/L8", {"name": "A", "last_updated": stamp(1)})
        await env.send("PATCH", "/locations/FR/AB1/L8", {"name": "B", "last_updated": stamp(2)})
        await env.send("PATCH", "/locations/FR/AB1/L8", {"name": "C", "last_updated": stamp(3)})
        ev = Event(id="x", module="locations", method="PUT", country_code="FR", party_id="AB1", object_id="L8",
                   key=key, correlation_id="x", received_at=0.0)  # fmt: skip
        for shard in range(env.settings.redis.shards):  # the state is gone (trimmed, say) before the IOP is back
            await env.redis.hdel(K.state_key("locations", shard), state_field(ev)[0])

    before = await outage(env, updates)
    await wait_until(env.all_streams_empty, 20, "backlog drained")
    names = [r.json().get("name") for r in env.iop.received[before:] if r.ok and r.path == LOC_PREFIX + "L8"]
    assert names[-3:] == ["A", "B", "C"], names
    assert await env.dead() == []


async def test_a_replayed_dead_letter_stays_a_put_of_the_state_before_a_status_patch(
    make_env: Callable[..., Any],  # noqa: F811
) -> None:
    env: Env = await make_env(**QUICK)
    await env.send("PUT", "/locations/FR/AB1/L10", location("L10", 1))
    await env.iop.wait_for(lambda: len(env.iop.delivered()) == 1)
    key = location_key("FR", "AB1", "L10")

    async def updates() -> None:
        # A status PATCH replayed from the dead letters (from_state: a PUT of the current state), then a new one.
        replayed = Event(id="r1", module="locations", method="PATCH", country_code="FR", party_id="AB1",
                         object_id="L10", evse_uid="E0", key=key, correlation_id="r1", received_at=0.0,
                         body=msgspec.json.encode({"status": "BLOCKED", "last_updated": stamp(1)}),
                         from_state=True)  # fmt: skip
        await env.store.append(replayed)
        await env.send("PATCH", "/locations/FR/AB1/L10/E0", {"status": "CHARGING", "last_updated": stamp(2)})

    before = await outage(env, updates)
    await wait_until(env.all_streams_empty, 20, "backlog drained")
    after = [(r.method, r.path) for r in env.iop.received[before:] if r.ok]
    assert ("PUT", LOC_PREFIX + "L10") in after, after
    assert after[-1] == ("PATCH", LOC_PREFIX + "L10/E0"), after
    await same_final_state(env, "L10")


def test_a_from_state_entry_is_a_state_entry_or_a_barrier() -> None:
    replayed = status("E1", "BLOCKED", 1)
    replayed.event = msgspec.structs.replace(replayed.event, from_state=True)
    later = status("E1", "CHARGING", 2)
    assert compaction.kind_of(replayed, True)[0] == "state" and compaction.kind_of(replayed, False)[0] == ""
    out = fold([replayed, later], state=True)
    assert out is not None and [(e.id, e.event.from_state) for e in out] == [(replayed.id, True), (later.id, False)]
    unknown = entry(evse="E9", body={"floor_level": "2"})
    unknown.event = msgspec.structs.replace(unknown.event, stateless=True)
    assert compaction.kind_of(unknown, True)[0] == ""


async def test_a_shard_taken_back_never_has_the_head_in_flight_folded(make_env: Callable[..., Any]) -> None:  # noqa: F811
    """Ready keys are the lost shard object's, not its index's: after the same index is taken back, a key
    whose head is on the wire is folded behind its head only, and the lost shard's keys left ready."""
    env: Env = await make_env(**QUICK)
    live = env.relay.forwarder
    assert live is not None
    fwd = Forwarder(env.settings, env.store, live.client, live.link)  # not started: no workers, no leases
    fwd.link.state = "down"
    key = location_key("FR", "AB1", "L1")
    qkey = ("locations", key)
    stopping = asyncio.Event()
    old = Shard(index=0, dirty=False, stopping=stopping)
    fwd.shards[0] = old
    old.queues[qkey] = deque([status("E1", "CHARGING")])
    fwd.buffer.add(1)
    fwd._push_ready(old, qkey)
    fwd.lose(0, "test")
    assert not fwd._ready and fwd.buffer.held == 0  # its keys left ready, their room given back
    new = Shard(index=0, dirty=False, stopping=stopping)
    fwd.shards[0] = new
    items = [status("E1", s, n) for n, s in enumerate(STATUSES)]
    new.queues[qkey] = q = deque(items)
    fwd.buffer.add(len(items))
    fwd._ready.append((old, qkey))  # a stale item of the lost shard, whatever put it there
    assert fwd._squeeze() == len(items) - 1
    assert q[0] is items[0] and len(q) == 2  # the head, on the wire, is kept as it is
    fwd._drop(new, qkey)
    assert (fwd.buffer.held, fwd.buffer.units, fwd.buffer.folded) == (0, 0, 0)


def test_peek_words() -> None:
    patch = status("E1", "CHARGING").event
    assert compaction.describe(patch, {"locations"}) == "dynamic"
    assert compaction.describe(patch, set()) == ""
    assert compaction.describe(entry("cdrs", "POST", None, body={"id": "C"}).event, {"locations", "cdrs"}) == ""


@pytest.mark.parametrize("value", ["", "locations,tariffs", '["sessions"]'])
def test_compact_setting_env_override(make_settings: Callable[..., Any], value: str) -> None:
    settings = make_settings(RELAY_FORWARDER_COMPACT=value)
    assert settings.forwarder.compact == ([] if not value else msgspec.json.decode(value) if value.startswith("[")
                                          else value.split(","))  # fmt: skip


def test_cdrs_cannot_be_compacted(make_settings: Callable[..., Any]) -> None:
    from relay.errors import ConfigError

    with pytest.raises(ConfigError, match="forwarder.compact: cdrs"):
        make_settings(RELAY_FORWARDER_COMPACT="locations,cdrs")


async def test_relay_peek_shows_what_may_compact(make_env: Callable[..., Any]) -> None:  # noqa: F811
    from click.testing import CliRunner

    from relay.cli import main
    from tests.conftest import REPO, TOKEN

    env: Env = await make_env(**QUICK)
    await env.iop.down()
    await env.send("PUT", "/locations/FR/AB1/L7", location("L7", 1))
    await env.send("PATCH", "/locations/FR/AB1/L7/E0", {"status": "CHARGING", "last_updated": stamp(1)})
    await env.send("POST", "/cdrs", fr_cdr("CDR7", "S7"))
    cli_env = {"RELAY_REDIS_URL": env.settings.redis.url, "RELAY_INGRESS_TOKEN": TOKEN,
               "RELAY_CONFIG": str(REPO / "config" / "relay.toml")}  # fmt: skip
    runner = CliRunner()
    res = await asyncio.to_thread(runner.invoke, main, ["peek", "locations"], env=cli_env)
    assert res.exit_code == 0, res.output
    lines = [line for line in res.stdout.splitlines() if not line.startswith("  ")]  # each entry's body is indented
    assert " compact=state event_id=" in lines[0] and " PUT locations/FR/AB1/L7 " in lines[0]
    assert " compact=dynamic event_id=" in lines[1] and " PATCH locations/FR/AB1/L7/E0 " in lines[1]
    assert lines[-1] == "# 2 of 2 shown may be compacted with their key's others (compaction on)"
    res = await asyncio.to_thread(runner.invoke, main, ["peek", "cdrs"], env=cli_env)
    assert "compact=" not in res.output and res.stdout.splitlines()[-1].endswith("(compaction off)")
    off = {**cli_env, "RELAY_FORWARDER_COMPACT": "sessions"}
    res = await asyncio.to_thread(runner.invoke, main, ["peek", "locations"], env=off)
    assert "compact=" not in res.output and "(compaction off)" in res.output


# -- kill -9 with compaction on ------------------------------------------------------------------------


def compacted_locations_check(iop: Any, producer: Any, kills: int) -> tuple[int, int]:
    """Per Location: what the IOP took goes forward only (re-sends collapsed), and ends with the last
    update accepted; returns (accepted, taken) over all Locations."""
    taken_total = 0
    for loc, accepted in producer.accepted.items():
        seqs = [int(r.json()["name"]) for r in iop.received if r.ok and r.path == LOC_PREFIX + loc]
        taken_total += len(seqs)
        collapsed = [n for i, n in enumerate(seqs) if i == 0 or n != seqs[i - 1]]
        assert collapsed == sorted(set(collapsed)), f"{loc}: order violated: {seqs}"
        if accepted:
            assert seqs and seqs[-1] >= accepted[-1], f"{loc}: last accepted {accepted[-1]} never taken: {seqs[-5:]}"
        # No bound on repeats here, unlike tests.test_crash: a PUT of the current state may carry updates
        # accepted after its run, and those updates then send that same state again (harmless).
    return producer.total, taken_total


def compacted_sessions_check(iop: Any, producer: Any) -> int:
    """Per session: its last accepted update taken, in order, and its CDR not sent before that."""
    taken: dict[str, list[tuple[int, float]]] = {}
    for r in iop.received:
        if r.ok and r.path.startswith(SES_PREFIX):
            taken.setdefault(r.path.removeprefix(SES_PREFIX), []).append((int(r.json()["kwh"]), r.answered_at))
    cdr_first: dict[str, float] = {}
    for r in iop.arrived:
        if r.path == "/ocpi/2.2.1/cdrs":
            cdr_first.setdefault(r.json()["session_id"], r.at)
    checked = 0
    for sid, (updates, cdr) in producer.sessions.items():
        if not updates:
            continue
        got = taken.get(sid, [])
        kwhs = [k for k, _ in got]
        # >=: an update sent while the relay was killed may be stored (and delivered) though its 202 was lost.
        assert max(kwhs, default=0) >= max(updates), f"{sid}: last update {max(updates)} never taken: {kwhs}"
        collapsed = [n for i, n in enumerate(kwhs) if i == 0 or n != kwhs[i - 1]]
        assert collapsed == sorted(set(collapsed)), f"{sid}: order violated: {kwhs}"
        if cdr:
            last_taken = min(at for k, at in got if k >= max(updates))
            assert sid in cdr_first and cdr_first[sid] >= last_taken, f"{sid}: CDR before its last update"
            checked += 1
    return checked


@pytest.mark.slow
async def test_kill_9_at_random_moments_with_compaction_on(world: Any) -> None:  # noqa: F811
    import random
    import time

    from tests.fake_iop import random_faults
    from tests.test_crash import Producer, dead_letters, drained, requests_since

    w = world
    w.env["RELAY_FORWARDER_COMPACT"] = "locations,sessions,tariffs"  # tests.test_crash runs with it off
    rng = random.Random(20261205)
    w.iop.script = random_faults(0.35, seed=5)
    relay = w.proc("solo")
    relay.start()
    await relay.ready(w.http)
    producer = Producer([relay], w.http, seed=2)
    run = asyncio.create_task(producer.run())
    kills = 0
    started = time.monotonic()
    for _ in range(4):
        await requests_since(w.iop, rng.randint(40, 250), timeout=20)
        relay.kill()
        kills += 1
        relay.start()
        await relay.ready(w.http)
        if time.monotonic() - started > 35:
            break
    producer.stop.set()
    await asyncio.wait_for(run, 10)
    assert producer.total > 500, producer.total
    await wait_until(lambda: drained(w.redis), 60, "streams drained")
    assert await dead_letters(w.redis) == 0
    accepted, taken = compacted_locations_check(w.iop, producer, kills)
    assert compacted_sessions_check(w.iop, producer) >= 20
    print(f"kill -9 with compaction: {kills} kills, {accepted} Location updates accepted, {taken} taken")


@pytest.mark.slow
async def test_kill_9_one_of_two_relays_with_compaction_on(world: Any) -> None:  # noqa: F811
    import random
    import time

    from tests.fake_iop import random_faults
    from tests.test_crash import Producer, dead_letters, drained, lease_holders, requests_since

    w = world
    w.env["RELAY_FORWARDER_COMPACT"] = "locations,sessions,tariffs"
    rng = random.Random(77)
    w.iop.script = random_faults(0.35, seed=6)
    a, b = w.proc("a"), w.proc("b")
    a.start()
    b.start()
    await a.ready(w.http)
    await b.ready(w.http)

    async def both_hold_shards() -> bool:
        holders = await lease_holders(w.redis)
        return any(h.startswith(a.replica_prefix) for h in holders) and any(
            h.startswith(b.replica_prefix) for h in holders
        )

    producer = Producer([a, b], w.http, seed=3)
    run = asyncio.create_task(producer.run())
    kills = 0
    started = time.monotonic()
    for _ in range(3):
        await wait_until(both_hold_shards, 15, "both replicas holding shards")
        await requests_since(w.iop, rng.randint(20, 100), timeout=20)
        b.kill()
        kills += 1
        await requests_since(w.iop, 10, timeout=30)  # the survivor goes on, the dead one's shards included
        b.start()
        await b.ready(w.http)
        if time.monotonic() - started > 40:
            break
    producer.stop.set()
    await asyncio.wait_for(run, 10)
    await wait_until(lambda: drained(w.redis), 60, "streams drained")
    assert await dead_letters(w.redis) == 0
    accepted, taken = compacted_locations_check(w.iop, producer, kills)
    assert compacted_sessions_check(w.iop, producer) >= 20
    assert a.alive and a.starts == 1
    print(f"two relays, compaction on: {kills} kills, {accepted} Location updates accepted, {taken} taken")
