"""Replaying dead letters from state (issue 16): a replay never leaves the IOP on older state than the relay's.

End to end: a real relay (tests/test_forwarder.py's ``make_env``), the fake IOP, and ``relay dlq`` run as
the operator runs it. Locations carry a sequence number in their ``name``; the fake refuses the names
a test lists (OCPI 2001, permanent: a dead letter). Updates meant to die one by one are sent one after
the other's dead letter is written: queued together, the forwarder's compaction would send them as one.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import msgspec
from click.testing import CliRunner, Result

from relay import outgoing
from relay.cli import main
from relay.events import Event, decode
from relay.ordering import location_key, shard_of
from tests.conftest import REPO, TOKEN, gireve_location
from tests.fake_iop import Received, Reply
from tests.test_forwarder import LOC_PREFIX, Env, fr_cdr, fr_session, loc_of, make_env, seq  # noqa: F401  (fixture)
from tests.waiting import stays_false, wait_until

REFUSED = Reply(status=200, ocpi=2001)
EVSE = "3256"  # the first EVSE of examples/location.json


async def cli(env: Env, *args: str) -> Result:
    """``relay <args>`` against the env's Redis, as an operator runs it."""
    base = {
        "RELAY_REDIS_URL": env.settings.redis.url,
        "RELAY_INGRESS_TOKEN": TOKEN,
        "RELAY_CONFIG": str(REPO / "config" / "relay.toml"),
        "RELAY_STATE_ENABLED": "true" if env.settings.state.enabled else "false",
    }
    return await asyncio.to_thread(CliRunner().invoke, main, list(args), env=base)


def summary(res: Result) -> dict[str, Any]:
    assert res.exit_code == 0, res.output
    out: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def refuse(env: Env, names: set[str]) -> None:
    """The fake IOP refuses Location bodies with these names (permanent: dead-lettered)."""

    def script(r: Received) -> Reply | None:
        body = r.json()
        return REFUSED if isinstance(body, dict) and body.get("name") in names else None

    env.iop.script = script


async def dead_ids(env: Env, module: str = "locations", n: int | None = None) -> list[str]:
    """Dead-letter ids of a module, oldest first (waiting until there are ``n``)."""
    found: list[str] = []

    async def enough() -> bool:
        nonlocal found
        found = [d.id for d in sorted(await env.dead(module), key=lambda d: d.id)]
        return n is None or len(found) == n

    await wait_until(enough, 20, lambda: f"{n} dead letters in {module} (have {len(found)})")
    return found


def names(env: Env, loc: str) -> list[str]:
    """Names of a Location in the requests the IOP took, in order."""
    return [r.json()["name"] for r in env.iop.delivered(LOC_PREFIX + loc)]


# -- the three scenarios -----------------------------------------------------------------------------


async def test_a_replay_as_it_was_of_v1_while_v2_is_queued_is_skipped_and_the_iop_ends_on_v2(
    make_env: Callable[..., Any],  # noqa: F811
) -> None:
    # (a) state store off: v1 would go as it was. v1 dead; v2 accepted while the IOP is down (queued);
    # replaying v1 must not put v1 after v2.
    env: Env = await make_env(RELAY_STATE_ENABLED="false")
    refuse(env, {"1"})
    await env.put_loc("L1", 1)
    [v1] = await dead_ids(env, n=1)
    await env.iop.down()
    await env.put_loc("L1", 2)

    res = await cli(env, "dlq", "replay", v1)
    assert summary(res) == {"selected": 1, "skipped_newer": 1}
    assert "queued" in res.stderr
    assert await dead_ids(env) == [v1]  # skipped: still there

    await env.iop.start()
    await env.iop.wait_for(lambda: names(env, "L1") == ["2"])
    await wait_until(env.all_streams_empty, 10, "streams drained")
    await stays_false(lambda: len(names(env, "L1")) > 1, 0.3)
    # Now v2 was delivered: still skipped, for that reason.
    res = await cli(env, "dlq", "replay", v1)
    assert summary(res) == {"selected": 1, "skipped_newer": 1} and "delivered" in res.stderr


async def test_a_replay_from_state_of_v1_while_v2_is_queued_goes_and_sends_the_current_state(
    make_env: Callable[..., Any],  # noqa: F811
) -> None:
    # State store on: the replay goes to the end of the stream, after v2, and sends the current state (v2's).
    env: Env = await make_env()
    refuse(env, {"1"})
    await env.put_loc("L1", 1)
    [v1] = await dead_ids(env, n=1)
    await env.iop.down()
    await env.put_loc("L1", 2)
    assert summary(await cli(env, "dlq", "replay", v1)) == {"selected": 1, "replayed": 1}
    await env.iop.start()
    await env.iop.wait_for(lambda: names(env, "L1") == ["2", "2"])  # never v1's "1"
    assert await dead_ids(env) == []


async def test_a_replay_from_state_behind_a_newer_delivered_status_patch_is_not_skipped(
    make_env: Callable[..., Any],  # noqa: F811
) -> None:
    # The dead PUT renamed the Location; the newer delivered update is only an EVSE status PATCH that
    # does not carry the name. The replay sends the current state, with the dead PUT's change.
    env: Env = await make_env()
    refuse(env, {"1"})
    await env.put_loc("L1", 1)
    [v1] = await dead_ids(env, n=1)
    patch = {"status": "CHARGING", "last_updated": "2026-03-09T10:03:00Z"}
    await env.send("PATCH", f"/locations/FR/AB1/L1/{EVSE}", patch)
    await env.iop.wait_for(lambda: len(env.iop.delivered(f"{LOC_PREFIX}L1/{EVSE}")) == 1)
    await wait_until(env.all_streams_empty, 10, "streams drained")
    refuse(env, set())
    res = await cli(env, "dlq", "replay", v1)
    assert summary(res) == {"selected": 1, "replayed": 1}
    await env.iop.wait_for(lambda: names(env, "L1") == ["1"])
    [sent] = env.iop.delivered(LOC_PREFIX + "L1")
    [evse] = [e for e in sent.json()["evses"] if e["uid"] == EVSE]
    assert evse["status"] == "CHARGING"  # the current state: the patch is kept too


async def test_b_replay_of_v1_alone_then_of_the_newer_dead_v2_is_not_skipped(make_env: Callable[..., Any]) -> None:  # noqa: F811
    # (b) v1 and v2 dead. v1 replayed alone goes out as the current state (v2's); v2's replay afterwards
    # is not "older than what was delivered": the delivered marker keeps v1's original id.
    env: Env = await make_env()
    refuse(env, {"1", "2"})
    await env.put_loc("L1", 1)
    await dead_ids(env, n=1)
    await env.put_loc("L1", 2)
    v1, v2 = await dead_ids(env, n=2)
    refuse(env, set())

    assert summary(await cli(env, "dlq", "replay", v1)) == {"selected": 1, "replayed": 1}
    await env.iop.wait_for(lambda: names(env, "L1") == ["2"])  # the current state, never v1's "1"
    await wait_until(env.all_streams_empty, 10, "streams drained")
    assert summary(await cli(env, "dlq", "replay", v2)) == {"selected": 1, "replayed": 1}
    await env.iop.wait_for(lambda: names(env, "L1") == ["2", "2"])
    assert await dead_ids(env) == []


async def test_c_purging_the_parking_dead_letter_unparks_the_key_and_its_queued_events_flow(
    make_env: Callable[..., Any],  # noqa: F811
) -> None:
    park = {"RELAY_FORWARDER_ON_PERMANENT": "park"}
    env: Env = await make_env(**park)
    refuse(env, {"1"})
    await env.put_loc("K1", 1)
    [parking] = await dead_ids(env, n=1)
    key = location_key("FR", "AB1", "K1")
    assert await env.ds.parked(shard_of(key, env.settings.redis.shards), "locations", key) == parking
    await env.relay.stop()

    # Events of the parked key queued while no forwarder runs (an ingress-only relay).
    intake: Env = await make_env(iop=env.iop, RELAY_FORWARDER_ENABLED="false", **park)
    await intake.put_loc("K1", 2)
    await intake.put_loc("K1", 3)
    res = await cli(intake, "dlq", "purge", parking, "--yes")
    assert summary(res) == {"selected": 1, "purged": 1, "unparked": 1}
    assert f"unparked {key}" in res.stderr
    await intake.relay.stop()

    nxt: Env = await make_env(iop=env.iop, **park)
    # Both, or (compacted) one PUT of the current state: "3".
    await env.iop.wait_for(lambda: names(nxt, "K1")[-1:] == ["3"])
    assert names(nxt, "K1") in (["2", "3"], ["3"])
    await nxt.put_loc("K1", 4)
    await env.iop.wait_for(lambda: names(nxt, "K1")[-1:] == ["4"])
    assert await dead_ids(nxt) == []


async def test_purging_another_dead_letter_of_a_parked_key_leaves_it_parked(make_env: Callable[..., Any]) -> None:  # noqa: F811
    env: Env = await make_env(RELAY_FORWARDER_ON_PERMANENT="park")
    refuse(env, {"1"})
    await env.put_loc("K1", 1)
    await dead_ids(env, n=1)
    await env.put_loc("K1", 2)  # dead as "parked" behind 1
    parking, behind = await dead_ids(env, n=2)
    res = await cli(env, "dlq", "purge", behind, "--yes", "--json")
    assert summary(res) == {"selected": 1, "purged": 1}
    line = json.loads(res.stdout.splitlines()[0])
    assert line["dead_id"] == behind and line["result"] == "purged" and "unparked" not in line
    await env.put_loc("K1", 3)
    await dead_ids(env, n=2)  # 3 parked too
    assert names(env, "K1") == []


# -- what a replay sends -------------------------------------------------------------------------------


async def test_a_replay_from_state_puts_the_current_merged_object_at_its_top_level_path(
    make_env: Callable[..., Any],  # noqa: F811
) -> None:
    env: Env = await make_env()
    env.iop.script = lambda r: REFUSED if r.method == "PATCH" else None
    await env.put_loc("L1", 1)
    await env.iop.wait_for(lambda: names(env, "L1") == ["1"])
    patch = {"status": "CHARGING", "last_updated": "2026-03-09T10:03:00Z"}
    await env.send("PATCH", f"/locations/FR/AB1/L1/{EVSE}", patch)
    [dead] = await dead_ids(env, n=1)
    env.iop.script = lambda r: None

    res = await cli(env, "dlq", "replay", dead, "--json")
    assert summary(res) == {"selected": 1, "replayed": 1}
    line = json.loads(res.stdout.splitlines()[0])
    assert line["result"] == "replayed" and line["from_state"] is True and line["object"].endswith(f"L1/{EVSE}")
    await env.iop.wait_for(lambda: len(env.iop.delivered(LOC_PREFIX + "L1")) == 2)
    sent = env.iop.delivered(LOC_PREFIX + "L1")[-1]
    assert sent.method == "PUT"  # the whole Location, not the EVSE PATCH
    body = sent.json()
    assert body["name"] == "1" and body["id"] == "L1"
    [evse] = [e for e in body["evses"] if e["uid"] == EVSE]
    assert evse["status"] == "CHARGING" and body["last_updated"] == "2026-03-09T10:03:00Z"


async def test_several_dead_letters_of_one_key_replay_as_one_request(make_env: Callable[..., Any]) -> None:  # noqa: F811
    env: Env = await make_env()
    refuse(env, {"1", "2", "3", "x"})
    for n in (1, 2, 3):
        await env.put_loc("L1", n)
        await dead_ids(env, n=n)
    await env.send("PUT", "/locations/FR/AB1/L2", gireve_location("L2", name="x"))
    dead = await dead_ids(env, n=4)
    refuse(env, set())

    dry = await cli(env, "dlq", "replay", "--all", "--dry-run")
    assert summary(dry) == {"selected": 4, "would_replay": 2, "would_supersede": 2}
    res = await cli(env, "dlq", "replay", "--all", "--yes", "--json")
    assert summary(res) == {"selected": 4, "replayed": 2, "superseded": 2}
    rows = [json.loads(line) for line in res.stdout.splitlines()[:-1]]
    newest = max((d for d in rows if d["key"] == "loc:FR:AB1:L1"), key=lambda d: d["dead_id"])
    assert sorted(d["superseded_by"] for d in rows if d["result"] == "superseded") == [newest["dead_id"]] * 2
    await env.iop.wait_for(lambda: names(env, "L1") == ["3"] and names(env, "L2") == ["x"])
    await wait_until(env.all_streams_empty, 10, "streams drained")
    await stays_false(lambda: len(env.iop.delivered(LOC_PREFIX + "L1")) > 1, 0.3)  # one request for L1
    assert await dead_ids(env) == [] and len(dead) == 4


async def test_with_the_state_store_off_several_dead_letters_of_a_key_each_replay_in_order(
    make_env: Callable[..., Any],  # noqa: F811
) -> None:
    """No state to send: the newest alone would drop the older ones' changes, so each goes as it was, in order."""
    env: Env = await make_env(RELAY_STATE_ENABLED="false")
    refuse(env, {"1", "2"})
    await env.put_loc("L1", 1)
    await dead_ids(env, n=1)
    await env.put_loc("L1", 2)
    await dead_ids(env, n=2)
    refuse(env, set())
    assert summary(await cli(env, "dlq", "replay", "--all", "--yes")) == {"selected": 2, "replayed": 2}
    await env.iop.wait_for(lambda: names(env, "L1") == ["1", "2"])
    await wait_until(env.all_streams_empty, 10, "streams drained")


async def test_force_replays_each_old_event_as_it_was_in_order(make_env: Callable[..., Any]) -> None:  # noqa: F811
    # State store off: an as-it-was replay behind a newer delivered update is skipped; --force sends it.
    env: Env = await make_env(RELAY_STATE_ENABLED="false")
    refuse(env, {"1", "2"})
    await env.put_loc("L1", 1)
    await dead_ids(env, n=1)
    await env.put_loc("L1", 2)
    await dead_ids(env, n=2)
    await env.put_loc("L1", 3)
    await env.iop.wait_for(lambda: names(env, "L1") == ["3"])
    v1, v2 = await dead_ids(env, n=2)
    refuse(env, set())
    assert summary(await cli(env, "dlq", "replay", v1, v2)) == {"selected": 2, "skipped_newer": 2}
    assert summary(await cli(env, "dlq", "replay", "--force", v1, v2)) == {"selected": 2, "replayed": 2}
    await env.iop.wait_for(lambda: names(env, "L1") == ["3", "1", "2"])  # the old events themselves


async def test_a_cdr_is_replayed_as_it_was(make_env: Callable[..., Any]) -> None:  # noqa: F811
    env: Env = await make_env()
    env.iop.script = lambda r: REFUSED if r.path.endswith("/cdrs") else None
    cdr = fr_cdr("CDR1", "S-none")
    await env.send("POST", "/cdrs", cdr)
    [dead] = await dead_ids(env, "cdrs", n=1)
    original = (await env.dead("cdrs"))[0].event.body
    env.iop.script = lambda r: None
    res = await cli(env, "dlq", "replay", dead, "--json")
    assert summary(res) == {"selected": 1, "replayed": 1}
    assert "from_state" not in json.loads(res.stdout.splitlines()[0])
    await env.iop.wait_for(lambda: len(env.iop.delivered("/ocpi/2.2.1/cdrs")) == 1)
    [sent] = env.iop.delivered("/ocpi/2.2.1/cdrs")
    assert sent.method == "POST" and sent.body == original


async def test_several_dead_letters_behind_a_newer_delivered_update_replay_as_one_from_state(
    make_env: Callable[..., Any],  # noqa: F811
) -> None:
    env: Env = await make_env()
    refuse(env, {"1", "2"})
    await env.put_loc("L1", 1)
    await dead_ids(env, n=1)
    await env.put_loc("L1", 2)
    await dead_ids(env, n=2)
    await env.put_loc("L1", 3)
    await env.iop.wait_for(lambda: names(env, "L1") == ["3"])
    v1, v2 = await dead_ids(env, n=2)
    refuse(env, set())
    assert summary(await cli(env, "dlq", "replay", v1, v2)) == {"selected": 2, "replayed": 1, "superseded": 1}
    await env.iop.wait_for(lambda: names(env, "L1") == ["3", "3"])  # the current state, once


async def test_a_cdr_is_replayed_though_another_cdr_of_its_session_was_delivered(
    make_env: Callable[..., Any],  # noqa: F811
) -> None:
    # CDRs are immutable: the "delivered" marker of the session's CDR key is no reason to skip one.
    env: Env = await make_env()
    env.iop.script = lambda r: REFUSED if r.path.endswith("/cdrs") and r.json()["id"] == "CDR1" else None
    await env.send("POST", "/cdrs", fr_cdr("CDR1", "S1"))
    [dead] = await dead_ids(env, "cdrs", n=1)
    await env.send("POST", "/cdrs", fr_cdr("CDR2", "S1"))
    await env.iop.wait_for(lambda: len(env.iop.delivered("/ocpi/2.2.1/cdrs")) == 1)
    await wait_until(env.all_streams_empty, 10, "streams drained")
    env.iop.script = lambda r: None
    assert summary(await cli(env, "dlq", "replay", dead)) == {"selected": 1, "replayed": 1}
    await env.iop.wait_for(lambda: [r.json()["id"] for r in env.iop.delivered("/ocpi/2.2.1/cdrs")] == ["CDR2", "CDR1"])


async def test_a_session_update_replays_from_state_while_a_newer_one_is_queued(make_env: Callable[..., Any]) -> None:  # noqa: F811
    # From state, the replay goes after the queued update and sends the current (merged) Session.
    env: Env = await make_env()
    path = "/ocpi/2.2.1/sessions/FR/AB1/S1"
    env.iop.script = lambda r: REFUSED if r.path == path and r.json()["kwh"] == 1.0 else None
    await env.send("PUT", "/sessions/FR/AB1/S1", fr_session("S1", kwh=1.0))
    [v1] = await dead_ids(env, "sessions", n=1)
    await env.iop.down()
    await env.send("PATCH", "/sessions/FR/AB1/S1", {"kwh": 2.0, "last_updated": "2026-03-09T10:03:00Z"})
    res = await cli(env, "dlq", "replay", v1)
    assert summary(res) == {"selected": 1, "replayed": 1}
    await env.iop.start()
    await env.iop.wait_for(lambda: len(env.iop.delivered(path)) == 2)
    assert [r.json()["kwh"] for r in env.iop.delivered(path)] == [2.0, 2.0]


async def test_a_session_update_as_it_was_is_skipped_while_a_newer_one_is_queued(
    make_env: Callable[..., Any],  # noqa: F811
) -> None:
    # A Session's "newer accepted" is its session-last watermark (written at ingress anyway).
    env: Env = await make_env(RELAY_STATE_ENABLED="false")
    path = "/ocpi/2.2.1/sessions/FR/AB1/S1"
    env.iop.script = lambda r: REFUSED if r.path == path and r.json()["kwh"] == 1.0 else None
    await env.send("PUT", "/sessions/FR/AB1/S1", fr_session("S1", kwh=1.0))
    [v1] = await dead_ids(env, "sessions", n=1)
    await env.iop.down()
    await env.send("PUT", "/sessions/FR/AB1/S1", fr_session("S1", kwh=2.0, last_updated="2026-03-09T10:03:00Z"))
    res = await cli(env, "dlq", "replay", v1)
    assert summary(res) == {"selected": 1, "skipped_newer": 1} and "queued" in res.stderr
    await env.iop.start()
    await env.iop.wait_for(lambda: len(env.iop.delivered(path)) == 1)
    assert env.iop.delivered(path)[0].json()["kwh"] == 2.0


# -- the envelope -------------------------------------------------------------------------------------


def test_an_envelope_stored_before_from_state_existed_still_decodes() -> None:
    ev = Event(id="e1", module="locations", method="PUT", country_code="FR", party_id="AB1", object_id="L1",
               key="loc:FR:AB1:L1", correlation_id="c", received_at=1.0, body=b"{}")  # fmt: skip
    old = msgspec.msgpack.encode(list(msgspec.msgpack.decode(msgspec.msgpack.encode(ev)))[:-1])
    assert decode(old) == ev and not decode(old).from_state


def test_an_event_replayed_from_state_is_never_sent_as_is(settings: Any) -> None:
    ev = Event(id="e1", module="locations", method="PUT", country_code="FR", party_id="AB1", object_id="L1",
               key="loc:FR:AB1:L1", correlation_id="c", received_at=1.0, body=b"{}")  # fmt: skip
    assert outgoing.as_is(settings, ev)
    assert not outgoing.as_is(settings, msgspec.structs.replace(ev, from_state=True))
