"""The delivery engine end to end, in process: ingress → Redis → forwarder → fake IOP.

Each test runs a real ``Relay`` against the session's embedded Redis (flushed per test) and a
``FakeIop`` on loopback that scripts its answers. Events carry a sequence number in the Location's
``name`` so the fake can tell, per object, in which order the IOP took them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
import redis.asyncio as aioredis

from relay import dlq
from relay.config import MODULES, Settings
from relay.embedded_redis import EmbeddedRedis
from relay.errors import StoreUnavailable
from relay.ordering import location_key, session_key, shard_of
from relay.service import Relay
from relay.store import DeadLetter, DeliveryStore, Store, connect
from relay.store import keys as K
from relay.validation import parse_target, validate
from tests.conftest import AUTH, example, gireve_location
from tests.fake_iop import FakeIop, Received, Reply, random_faults
from tests.waiting import stays_false, wait_until

IOP_TOKEN = "iop-token-42"
FAST = {
    "RELAY_IOP_TOKEN": IOP_TOKEN,
    # These tests follow every update to the IOP: compaction off (tests/test_compaction.py turns it on).
    "RELAY_FORWARDER_COMPACT": "",
    "RELAY_FORWARDER_BACKOFF_INITIAL_S": "0.01",
    "RELAY_FORWARDER_BACKOFF_MAX_S": "0.2",
    "RELAY_IOP_REQUEST_TIMEOUT_S": "1",
    "RELAY_IOP_CONNECT_TIMEOUT_S": "0.5",
    "RELAY_FORWARDER_CLAIM_IDLE_S": "2",
    "RELAY_FORWARDER_LEASE_TTL_S": "1.5",
    "RELAY_FORWARDER_SHUTDOWN_TIMEOUT_S": "2",
}
LOC_PREFIX = "/ocpi/2.2.1/locations/FR/AB1/"


# The suite's one polling helper, under the names the forwarder tests (and test_forwarder_workers) use.
until = wait_until
until_async = wait_until


def seq(r: Received) -> int:
    return int(r.json()["name"])


def loc_of(r: Received) -> str:
    return r.path.removeprefix(LOC_PREFIX).split("/")[0]


def stream_of(module: str, key: str, shards: int = 4) -> str:
    return K.stream_key(module, shard_of(key, shards))


class Env:
    """One relay, its fake IOP, a Redis client and an HTTP client for the ingress."""

    def __init__(self, settings: Settings, iop: FakeIop, http: aiohttp.ClientSession) -> None:
        self.settings = settings
        self.iop = iop
        self.http = http
        self.relay = Relay(settings)
        self.redis: Any = aioredis.Redis.from_url(settings.redis.url)
        self.store = Store(connect(settings.redis.url, settings.redis), settings.redis)
        self.ds = DeliveryStore(self.store)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.relay.ingress_port}/ingress/2.2.1"

    async def send(self, method: str, path: str, body: Any = None, **headers: str) -> dict[str, Any]:
        async with self.http.request(method, self.base + path, json=body, headers={**AUTH, **headers}) as r:
            text = await r.text()
            assert r.status == 202, text
            answer: dict[str, Any] = msgspec.json.decode(text)
            return answer

    async def put_loc(self, loc: str, n: int, **headers: str) -> str:
        answer = await self.send("PUT", f"/locations/FR/AB1/{loc}", gireve_location(loc, name=str(n)), **headers)
        event_id: str = answer["data"]["event_id"]
        return event_id

    def seqs(self, loc: str) -> list[int]:
        """Sequence numbers of a location that the IOP took (answered with success), in that order."""
        return [seq(r) for r in self.iop.delivered(LOC_PREFIX + loc)]

    async def stream_len(self, module: str = "locations") -> int:
        return sum([await self.redis.xlen(K.stream_key(module, s)) for s in range(self.settings.redis.shards)])

    async def all_streams_empty(self) -> bool:
        for m in MODULES:
            if await self.stream_len(m):
                return False
        return True

    async def dead(self, module: str = "locations") -> list[DeadLetter]:
        out: list[DeadLetter] = []
        for shard in range(self.settings.redis.shards):
            out += await self.ds.dead_letters(module, shard)
        return out

    async def metric(self, name: str, **labels: str) -> float | None:
        async with self.http.get(f"http://127.0.0.1:{self.relay.ingress_port}/metrics") as r:
            text = await r.text()
        want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
        for line in text.splitlines():
            if line.startswith(want + " "):
                return float(line.split()[-1])
        return None


@pytest.fixture
async def make_env(make_settings: Callable[..., Settings]) -> AsyncIterator[Callable[..., Any]]:
    envs: list[Env] = []
    iops: list[FakeIop] = []
    http = aiohttp.ClientSession()

    async def make(start: bool = True, iop: FakeIop | None = None, **env: str) -> Env:
        if iop is None:
            iop = FakeIop()
            await iop.start()
            iops.append(iop)
        settings = make_settings(**{"RELAY_IOP_URL": iop.url, **FAST, **env})
        e = Env(settings, iop, http)
        envs.append(e)
        if start:
            await e.relay.start()
        return e

    yield make
    for e in envs:
        await e.relay.stop()
        await e.redis.aclose()
        await e.store.close()
    for iop in iops:
        await iop.close()
    await http.close()


# -- T1–T3 ----------------------------------------------------------------------------------------


async def test_headers_on_every_attempt(make_env: Callable[..., Any]) -> None:
    env: Env = await make_env()
    failures: dict[str, int] = {}

    def script(r: Received) -> Reply | None:
        n = failures.get(r.path, 0)
        if n < 2:  # each object's first two attempts fail: three attempts each
            failures[r.path] = n + 1
            return Reply(status=503, ocpi=None) if n == 0 else Reply(status=200, ocpi=3000)
        return None

    env.iop.script = script
    await env.put_loc("LOC1", 1, **{"X-Correlation-ID": "csms-corr-1"})
    event_id = await env.put_loc("LOC2", 1)
    await until(lambda: len(env.iop.delivered()) == 2)
    assert len(env.iop.received) == 6
    token = "Token " + base64.b64encode(IOP_TOKEN.encode()).decode()
    for r in env.iop.received:
        assert r.headers["Authorization"] == token
        assert r.headers["OCPI-from-country-code"] == "FR" and r.headers["OCPI-from-party-id"] == "AB1"
        assert r.headers["OCPI-to-country-code"] == "FR" and r.headers["OCPI-to-party-id"] == "107"
        assert r.headers["X-Correlation-ID"] == ("csms-corr-1" if loc_of(r) == "LOC1" else event_id)
    request_ids = [r.headers["X-Request-ID"] for r in env.iop.received]
    assert len(set(request_ids)) == 6 and all(request_ids)  # fresh per attempt


# -- order ---------------------------------------------------------------------------------------


async def put_many(env: Env, locs: list[str], count: int, start: int = 1) -> None:
    """Each location's updates one after the other (the CSMS's order), locations concurrently."""

    async def one(loc: str) -> None:
        for n in range(start, start + count):
            await env.put_loc(loc, n)

    await asyncio.gather(*(one(loc) for loc in locs))


async def test_order_per_key_under_random_transient_faults(make_env: Callable[..., Any]) -> None:
    env: Env = await make_env()
    env.iop.script = random_faults(0.3, seed=11)
    locs = [f"L{i:02d}" for i in range(50)]
    await put_many(env, locs, 20)
    await env.iop.wait_for(lambda: all(len(env.seqs(loc)) >= 20 for loc in locs), timeout=60)
    assert len(env.iop.failed()) > 100  # the faults really happened
    for loc in locs:
        assert env.seqs(loc) == list(range(1, 21)), loc  # in order, each once
    await until_async(env.all_streams_empty, what="streams drained")
    assert await env.dead() == []


async def test_slow_key_does_not_delay_others(make_env: Callable[..., Any]) -> None:
    env: Env = await make_env(RELAY_IOP_REQUEST_TIMEOUT_S="20", RELAY_FORWARDER_CLAIM_IDLE_S="21")
    release = asyncio.Event()
    env.iop.script = lambda r: Reply(hold=release) if loc_of(r) == "SLOW" else None
    await env.put_loc("SLOW", 1)
    await env.put_loc("SLOW", 2)
    await env.iop.wait_for(lambda: len(env.iop.arrived) == 1)
    locs = [f"F{i:02d}" for i in range(20)]
    await put_many(env, locs, 3)
    await env.iop.wait_for(lambda: all(env.seqs(loc) == [1, 2, 3] for loc in locs))
    # The slow object is still on its first update, and its second has not overtaken it.
    assert [loc_of(r) for r in env.iop.arrived].count("SLOW") == 1
    assert env.seqs("SLOW") == []
    release.set()
    await env.iop.wait_for(lambda: env.seqs("SLOW") == [1, 2])


# -- link ----------------------------------------------------------------------------------------


async def test_iop_down_then_back_probe_first_then_ramp(make_env: Callable[..., Any]) -> None:
    # probe_max_s stays at its shipped default (60 s): recovery must not depend on it.
    # Many objects: when the IOP dies, many attempts are in flight and fail after the link is down.
    env: Env = await make_env()
    locs = [f"D{i:02d}" for i in range(40)]
    await put_many(env, locs, 1)
    await env.iop.wait_for(lambda: all(env.seqs(loc) == [1] for loc in locs))

    await env.iop.down()
    await put_many(env, locs, 3, start=2)
    await until(lambda: env.relay.link.state == "down", what="link down")
    down_at = time.monotonic()
    await until(lambda: time.monotonic() - down_at > 0.5)  # an outage of a while, probes failing

    holds = [asyncio.Event(), asyncio.Event()]
    before = len(env.iop.arrived)

    def script(r: Received) -> Reply | None:
        i = env.iop.arrived.index(r) - before
        return Reply(hold=holds[i]) if i < len(holds) else None

    env.iop.script = script
    back_at = time.monotonic()
    await env.iop.start()
    await env.iop.wait_for(lambda: len(env.iop.arrived) == before + 1, timeout=5)
    assert time.monotonic() - back_at < 3  # the probe came soon after the IOP was back
    await stays_false(lambda: len(env.iop.arrived) > before + 1, 0.3)  # one probe, not a burst
    holds[0].set()
    await env.iop.wait_for(lambda: len(env.iop.arrived) == before + 2)
    await stays_false(lambda: len(env.iop.arrived) > before + 2, 0.2)  # ramp starts at one
    assert env.relay.link.state == "up" and env.relay.link.limit == 1
    holds[1].set()
    await env.iop.wait_for(lambda: all(len(env.seqs(loc)) >= 4 for loc in locs))
    for loc in locs:
        assert env.seqs(loc) == [1, 2, 3, 4], loc
    after = env.iop.arrived[before:]
    assert max(r.inflight for r in after[:3]) <= 2  # 1, 1, then at most 2 in flight
    await until_async(env.all_streams_empty)
    assert await env.dead() == []


@pytest.mark.parametrize("status", [401, 403])
async def test_auth_failure_pauses_the_link_until_resumed(make_env: Callable[..., Any], status: int) -> None:
    env: Env = await make_env()
    refuse = {"on": True}
    env.iop.script = lambda r: Reply(status=status, ocpi=None) if refuse["on"] else None
    for n in (1, 2, 3):
        await env.put_loc("A1", n)
    await until(lambda: env.relay.link.state == "auth_failed", what="auth_failed")
    assert await env.metric("relay_iop_link_state", state="auth_failed") == 1.0
    assert await env.metric("relay_iop_link_state", state="up") == 0.0
    await stays_false(lambda: len(env.iop.arrived) > 1, 0.6)  # no retries burned on a refused token
    refuse["on"] = False
    if status == 401:
        await env.ds.request_resume(time.time())  # what `relay link resume` does: picked up via Redis
    else:
        await env.relay.link.resume()
    await env.iop.wait_for(lambda: env.seqs("A1") == [1, 2, 3], timeout=5)
    assert env.relay.link.state == "up"
    assert await env.metric("relay_iop_link_state", state="auth_failed") == 0.0
    assert await env.dead() == []  # the refused event was not dead-lettered: it was resent


async def test_stop_is_prompt_while_the_link_is_auth_failed(make_env: Callable[..., Any]) -> None:
    env: Env = await make_env(RELAY_FORWARDER_SHUTDOWN_TIMEOUT_S="5")
    env.iop.script = lambda r: Reply(status=401, ocpi=None)
    await put_many(env, ["Z1", "Z2", "Z3"], 2)
    await until(lambda: env.relay.link.state == "auth_failed", what="auth_failed")
    started = time.monotonic()
    await env.relay.stop()  # runners waiting for a slot behind the paused link give up at once
    assert time.monotonic() - started < 1.5
    assert await env.stream_len() == 6  # and nothing was acknowledged


async def test_retry_after_is_honoured(make_env: Callable[..., Any]) -> None:
    env: Env = await make_env()
    env.iop.script = lambda r: Reply(status=429, ocpi=None, headers={"Retry-After": "1"}) if not env.iop.arrived[
        :-1] else None  # fmt: skip
    await env.put_loc("R1", 1)
    await env.iop.wait_for(lambda: env.seqs("R1") == [1], timeout=5)
    first, second = env.iop.arrived
    assert first.reply is not None and first.reply.status == 429
    # backoff_max_s is 0.2 s: only Retry-After explains a wait of a second.
    assert second.at - first.answered_at >= 0.95


# -- permanent failures --------------------------------------------------------------------------


async def test_permanent_failure_dead_letters_and_the_key_continues(make_env: Callable[..., Any]) -> None:
    env: Env = await make_env()

    def script(r: Received) -> Reply | None:
        if loc_of(r) == "P1" and seq(r) == 2:
            return Reply(status=200, ocpi=2001)
        if loc_of(r) == "P2" and seq(r) == 1:
            return Reply(status=422, ocpi=None, body=b'{"detail": [{"loc": ["evses"], "msg": "field required"}]}')
        return None

    env.iop.script = script
    for n in (1, 2, 3):
        await env.put_loc("P1", n)
    await env.put_loc("P2", 1)
    await env.put_loc("P2", 2)
    await put_many(env, ["Q1", "Q2"], 3)
    await env.iop.wait_for(
        lambda: env.seqs("P1") == [1, 3] and env.seqs("P2") == [2] and env.seqs("Q1") == env.seqs("Q2") == [1, 2, 3]
    )
    await until_async(env.all_streams_empty)
    dead = await env.dead()
    assert len(dead) == 2
    by_loc = {d.event.object_id: d for d in dead}
    p1 = by_loc["P1"]
    assert p1.shard == shard_of(location_key("FR", "AB1", "P1"), 4)
    assert msgspec.json.decode(p1.event.body)["name"] == "2"
    assert p1.info["kind"] == "permanent"
    assert p1.info["http_status"] == 200 and p1.info["ocpi_code"] == 2001
    assert "2001" in p1.info["reason"] and p1.info["ocpi_message"] == "fake"
    assert p1.info["attempts"] == 1 and p1.info["first_attempt_at"] and p1.info["last_attempt_at"]
    p2 = by_loc["P2"]
    assert p2.info["http_status"] == 422 and p2.info["ocpi_code"] is None
    assert "field required" in p2.info["reason"]
    raw = await env.redis.xlen(K.dlq_key("locations", p1.shard))
    assert raw >= 1


async def test_an_event_the_http_client_refuses_is_dead_lettered_and_the_link_stays_up(
    make_env: Callable[..., Any],
) -> None:
    # Events no request can carry, as an earlier ingress accepted them (the ingress refuses both now):
    # an X-Correlation-ID with CR LF (aiohttp: "forbidden control character"), and an id ".." that
    # would address another object (PUT /locations/FR/). Each is refused before anything is sent:
    # dead-lettered at once, the link untouched, and the object's later updates go on.
    env: Env = await make_env(RELAY_FORWARDER_LINK_FAILURE_THRESHOLD="1")
    body = msgspec.json.encode(gireve_location("B1", name="1"))
    event = validate(parse_target("PUT", "locations/FR/AB1/B1"), "PUT", body, env.settings).event
    bad = msgspec.structs.replace(event, correlation_id="corr\r\nX-Injected: 1")
    await env.store.append(bad)
    dots = msgspec.structs.replace(bad, id=bad.id[:-1] + "f", object_id="..", key=location_key("FR", "AB1", ".."),
                                   correlation_id="")  # fmt: skip
    await env.store.append(dots)
    await env.put_loc("B1", 2)
    await env.iop.wait_for(lambda: env.seqs("B1") == [2], timeout=10)
    await until_async(env.all_streams_empty)
    assert env.relay.link.state == "up"
    assert env.iop.paths() == [LOC_PREFIX + "B1"]  # nothing else reached the IOP
    dead = sorted(await env.dead(), key=lambda d: d.event.object_id)
    assert [d.event.object_id for d in dead] == ["..", "B1"]
    for d in dead:
        assert d.info["kind"] == "permanent" and d.info["attempts"] == 1, d.info
        assert d.info["http_status"] is None and "refused by the HTTP client" in d.info["reason"], d.info
    assert "control character" in dead[1].info["reason"]


async def test_ids_reach_the_iop_percent_encoded_as_one_path_segment(make_env: Callable[..., Any]) -> None:
    # "?" and "#" are printable ASCII, so valid in an OCPI CiString id: the IOP must see them in the
    # id, not as a query or a fragment; "%" must not be taken as an escape.
    env: Env = await make_env()
    # The single route: the CSMS escapes them in its URL.
    await env.send("PUT", "/locations/FR/AB1/LOCX%3Fa%3D1", gireve_location("LOCX?a=1", name="1"))
    batch = {"operations": [
        {"method": "PUT", "path": f"/ingress/2.2.1/locations/FR/AB1/{i}", "body": gireve_location(i, name="1")}
        for i in ("LOCY#frag", "LOC%2F1", "LOC+1")
    ]}  # fmt: skip
    async with env.http.post(env.base + "/batch", json=batch, headers=AUTH) as r:
        answer = await r.json()
        assert [x["status"] for x in answer["data"]["results"]] == [202] * 3, answer
    ids = ["LOCX?a=1", "LOCY#frag", "LOC%2F1", "LOC+1"]
    await env.iop.wait_for(lambda: len(env.iop.delivered()) == 4)
    assert sorted(env.iop.paths("PUT")) == sorted(LOC_PREFIX + i for i in ids)
    assert all(r.json()["id"] in ids for r in env.iop.received)


@pytest.mark.parametrize(
    "how",
    [{"RELAY_FORWARDER_ON_PERMANENT": "park"}, {"RELAY_FORWARDER_PARK_MODULES": "locations"}],
    ids=["on_permanent=park", "park_modules"],
)
async def test_park_sends_the_keys_later_events_to_the_dlq(make_env: Callable[..., Any], how: dict[str, str]) -> None:
    env: Env = await make_env(**how)
    env.iop.script = lambda r: Reply(status=200, ocpi=2001) if loc_of(r) == "K1" and seq(r) == 1 else None
    for n in (1, 2, 3):
        await env.put_loc("K1", n)
    await put_many(env, ["O1", "O2"], 3)
    await env.iop.wait_for(lambda: env.seqs("O1") == env.seqs("O2") == [1, 2, 3])
    await until_async(env.all_streams_empty)
    await env.put_loc("K1", 4)  # still parked later on
    await until_async(lambda: _count_dead(env, 4), what="four dead letters")
    assert [loc_of(r) for r in env.iop.arrived].count("K1") == 1  # parked events are never sent
    dead = sorted(await env.dead(), key=lambda d: d.id)
    assert [msgspec.json.decode(d.event.body)["name"] for d in dead] == ["1", "2", "3", "4"]
    assert dead[0].info["kind"] == "permanent" and dead[0].info["ocpi_code"] == 2001
    for d in dead[1:]:
        assert d.info["kind"] == "parked"
        assert dead[0].id in d.info["reason"]
    assert await env.ds.parked(dead[0].shard, "locations", location_key("FR", "AB1", "K1")) == dead[0].id


async def _count_dead(env: Env, n: int) -> bool:
    return len(await env.dead()) == n


async def test_a_parked_key_stays_parked_for_the_next_owner_and_goes_on_after_a_replay(
    make_env: Callable[..., Any],
) -> None:
    # The forwarder keeps the parked keys of its shards in memory (no Redis read per event): the
    # next owner must load them, and a replay (which unparks in Redis only) must be noticed.
    park = {"RELAY_FORWARDER_ON_PERMANENT": "park"}
    env: Env = await make_env(**park)
    env.iop.script = lambda r: Reply(status=200, ocpi=2001) if loc_of(r) == "K1" and seq(r) == 1 else None
    await env.put_loc("K1", 1)
    await until_async(lambda: _count_dead(env, 1), what="first dead letter")
    await env.relay.stop()

    nxt: Env = await make_env(iop=env.iop, **park)
    await nxt.put_loc("K1", 2)
    await until_async(lambda: _count_dead(nxt, 2), what="parked dead letter")
    assert [loc_of(r) for r in env.iop.arrived].count("K1") == 1  # the next owner knew K1 was parked
    first = min(await nxt.dead(), key=lambda d: d.id)
    await nxt.ds.load_scripts()
    assert await dlq.replay_one(nxt.ds, first, force=True) == "replayed"
    env.iop.script = lambda r: None
    await env.iop.wait_for(lambda: env.seqs("K1") == [1])
    await nxt.put_loc("K1", 3)
    await env.iop.wait_for(lambda: env.seqs("K1") == [1, 3])
    assert len(await nxt.dead()) == 1  # only the parked update 2 stays dead


async def test_a_key_parked_by_a_script_whose_reply_was_lost_stays_parked(make_env: Callable[..., Any]) -> None:
    # The park ran in Redis but its reply was lost (timeout): the retried script finds the entry gone
    # and returns no dead id. The key must still count as parked in memory.
    env: Env = await make_env(RELAY_FORWARDER_ON_PERMANENT="park")
    fwd = env.relay.forwarder
    assert fwd is not None
    real = fwd.ds.dead_letter
    runs: list[str | None] = []

    async def reply_lost_once(
        entry: Any, info: bytes, *, park: bool, superseded: Sequence[str] = (), parked_by: str = ""
    ) -> str | None:
        dead_id = await real(entry, info, park=park, superseded=superseded, parked_by=parked_by)
        runs.append(dead_id)
        if len(runs) == 1:
            raise StoreUnavailable("redis: TimeoutError: the reply was lost after the script ran")
        return dead_id

    fwd.ds.dead_letter = reply_lost_once  # type: ignore[method-assign]
    env.iop.script = lambda r: Reply(status=200, ocpi=2001) if loc_of(r) == "K1" and seq(r) == 1 else None
    await env.put_loc("K1", 1)
    await until(lambda: len(runs) >= 2, what="dead letter retried")
    assert runs[0] is not None and runs[1] is None
    await env.put_loc("K1", 2)
    await until_async(lambda: _count_dead(env, 2), what="update 2 parked")
    assert env.seqs("K1") == []  # update 2 was not sent


async def test_entries_of_a_read_whose_reply_was_lost_are_sent_before_newer_ones(make_env: Callable[..., Any]) -> None:
    # XREADGROUP ran in Redis (the entries are now pending to this consumer) but its reply was lost.
    # The reader must take them back before it reads on, or they would wait for a restart, or be
    # sent after newer updates of the same objects.
    env: Env = await make_env(RELAY_REDIS_SHARDS="1")
    fwd = env.relay.forwarder
    assert fwd is not None
    real = fwd.ds.read_new
    lost: list[int] = []

    async def reply_lost_once(streams: dict[str, int], consumer: str, count: int, block_ms: int | None) -> list[Any]:
        got = await real(streams, consumer, count, block_ms)
        if got and not lost:
            lost.append(len(got))
            raise StoreUnavailable("redis: ConnectionError: the reply was lost after XREADGROUP ran")
        return got

    fwd.ds.read_new = reply_lost_once  # type: ignore[method-assign]
    await env.put_loc("R1", 1)
    await until(lambda: bool(lost), what="a lost read")
    for n in (2, 3):
        await env.put_loc("R1", n)
    await env.iop.wait_for(lambda: env.seqs("R1") == [1, 2, 3], timeout=10)
    await until_async(env.all_streams_empty)


async def test_readers_of_many_shards_hold_at_most_max_buffered_entries(make_env: Callable[..., Any]) -> None:
    # Four shard readers share one buffer. Each reserves its room before it reads: counting only
    # after the read let every reader take a full batch into the same free room.
    env: Env = await make_env(
        start=False, RELAY_FORWARDER_MAX_BUFFERED="40", RELAY_FORWARDER_READ_BATCH="32",
        RELAY_IOP_REQUEST_TIMEOUT_S="20", RELAY_FORWARDER_CLAIM_IDLE_S="21",
    )  # fmt: skip
    release = asyncio.Event()
    env.iop.script = lambda r: Reply(hold=release)
    locs = [f"B{i:03d}" for i in range(100)]
    for n in (1, 2):
        for loc in locs:
            body = msgspec.json.encode(gireve_location(loc, name=str(n)))
            target = parse_target("PUT", f"locations/FR/AB1/{loc}")
            await env.store.append(validate(target, "PUT", body, env.settings).event)
    await env.relay.start()
    fwd = env.relay.forwarder
    assert fwd is not None
    peak = [0]

    def held() -> int:
        n = sum(len(q) for shard in fwd.shards.values() for q in shard.queues.values())
        peak[0] = max(peak[0], n)
        return n

    async def sample() -> None:
        while True:
            held()
            await asyncio.sleep(0.002)

    sampler = asyncio.create_task(sample())
    try:
        # A reader waits for room of at least the low-water mark (40 // 8): the buffer fills to 35+.
        await until(lambda: held() >= 40 - 5, what="buffer filled")
        await stays_false(lambda: held() > 40, 0.5)
        release.set()
        await env.iop.wait_for(lambda: all(env.seqs(loc) == [1, 2] for loc in locs), timeout=30)
    finally:
        sampler.cancel()
    assert 0 < peak[0] <= 40
    await until_async(env.all_streams_empty)


async def test_max_age_dead_letters_expired_transient_events(make_env: Callable[..., Any]) -> None:
    env: Env = await make_env(RELAY_FORWARDER_MAX_AGE_S="0.5")
    env.iop.script = lambda r: Reply(status=200, ocpi=3000) if loc_of(r) == "E1" else None
    await env.put_loc("E1", 1)
    await env.put_loc("OK", 1)
    await env.iop.wait_for(lambda: env.seqs("OK") == [1])
    await until_async(lambda: _count_dead(env, 1), what="expired dead letter")
    [d] = await env.dead()
    assert d.event.object_id == "E1"
    assert d.info["reason"].startswith("expired")
    assert d.info["ocpi_code"] == 3000 and d.info["http_status"] == 200
    assert d.info["attempts"] >= 2
    # Expired when an attempt ends past the deadline (the last one may have started just before it).
    assert d.info["dead_at"] - d.event.received_at >= 0.5
    await until_async(env.all_streams_empty)


async def test_without_max_age_transient_events_wait(make_env: Callable[..., Any]) -> None:
    env: Env = await make_env()
    env.iop.script = lambda r: Reply(status=200, ocpi=3000)
    await env.put_loc("W1", 1)
    await env.iop.wait_for(lambda: len(env.iop.received) >= 5)
    assert await env.dead() == []
    assert await env.stream_len() == 1


# -- CDR after its session -----------------------------------------------------------------------


def fr_session(session_id: str, **changes: Any) -> dict[str, Any]:
    return example("session_example_2_short_finished.json", country_code="FR", party_id="AB1", id=session_id, **changes)


def fr_cdr(cdr_id: str, session_id: str) -> dict[str, Any]:
    return example("cdr_example.json", country_code="FR", party_id="AB1", id=cdr_id, session_id=session_id)


async def test_cdr_waits_for_its_sessions_updates(make_env: Callable[..., Any]) -> None:
    env: Env = await make_env(RELAY_IOP_REQUEST_TIMEOUT_S="10", RELAY_FORWARDER_CLAIM_IDLE_S="11")
    session_path = "/ocpi/2.2.1/sessions/FR/AB1/S1"
    cdr_path = "/ocpi/2.2.1/cdrs"
    mode = {"session": "fail"}
    release = asyncio.Event()

    def script(r: Received) -> Reply | None:
        if r.path == session_path and mode["session"] == "fail":
            return Reply(status=200, ocpi=3000)
        if r.path == session_path and mode["session"] == "slow":
            return Reply(hold=release)
        return None

    env.iop.script = script
    await env.send("PUT", "/sessions/FR/AB1/S1", fr_session("S1", kwh=1.0))
    await env.send("PUT", "/sessions/FR/AB1/S1", fr_session("S1", kwh=2.0))
    await env.send("POST", "/cdrs", fr_cdr("CDR1", "S1"))
    await env.send("POST", "/cdrs", fr_cdr("CDR9", "S-unknown"))  # no session update: not held
    await env.iop.wait_for(lambda: any(r.json()["id"] == "CDR9" for r in env.iop.delivered(cdr_path)))
    await env.iop.wait_for(lambda: len(env.iop.paths()) >= 5)  # the session fails again and again
    assert all(r.json()["id"] != "CDR1" for r in env.iop.arrived if r.path == cdr_path)

    mode["session"] = "slow"  # now the session's update is answered slowly
    before = len(env.iop.arrived)
    await env.iop.wait_for(lambda: len(env.iop.arrived) > before)
    await stays_false(lambda: any(r.json()["id"] == "CDR1" for r in env.iop.arrived if r.path == cdr_path), 0.4)
    mode["session"] = "ok"
    release.set()
    await env.iop.wait_for(lambda: any(r.json()["id"] == "CDR1" for r in env.iop.delivered(cdr_path)))
    sessions = env.iop.delivered(session_path)
    assert [r.json()["kwh"] for r in sessions] == [1.0, 2.0]
    [cdr] = [r for r in env.iop.arrived if r.path == cdr_path and r.json()["id"] == "CDR1"]
    assert cdr.at >= sessions[-1].answered_at  # sent only after the last session update was taken
    assert cdr.headers["OCPI-from-party-id"] == "AB1"
    await until_async(env.all_streams_empty)
    # The session is over: its watermarks are forgotten once its CDR is out.
    shard = shard_of(session_key("FR", "AB1", "S1"), 4)
    assert await env.redis.hget(K.session_last_key(shard), session_key("FR", "AB1", "S1")) is None


async def test_cdr_after_a_dead_lettered_session_update_is_sent(make_env: Callable[..., Any]) -> None:
    env: Env = await make_env()
    session_path = "/ocpi/2.2.1/sessions/FR/AB1/S2"
    env.iop.script = lambda r: Reply(status=200, ocpi=2001) if r.path == session_path else None
    await env.send("PUT", "/sessions/FR/AB1/S2", fr_session("S2"))
    await env.send("POST", "/cdrs", fr_cdr("CDR2", "S2"))
    await env.iop.wait_for(lambda: len(env.iop.delivered("/ocpi/2.2.1/cdrs")) == 1)
    assert len(await env.dead("sessions")) == 1


async def test_cdr_backlog_larger_than_the_buffer_does_not_deadlock(make_env: Callable[..., Any]) -> None:
    # A backlog (after an outage) of sessions with several updates each, then their CDRs. CDRs that
    # wait for session updates still unread in Redis must not fill the bounded read buffer.
    knobs = {"RELAY_REDIS_SHARDS": "1", "RELAY_FORWARDER_MAX_BUFFERED": "6", "RELAY_FORWARDER_READ_BATCH": "3"}
    first: Env = await make_env(RELAY_FORWARDER_ENABLED="false", **knobs)  # accept and queue only
    for i in range(10):
        for k in range(4):
            await first.send("PUT", f"/sessions/FR/AB1/S{i}", fr_session(f"S{i}", kwh=float(k)))
    for i in range(10):
        await first.send("POST", "/cdrs", fr_cdr(f"C{i}", f"S{i}"))
    await first.relay.stop()
    nxt: Env = await make_env(iop=first.iop, **knobs)
    iop = nxt.iop
    await iop.wait_for(lambda: len(iop.delivered("/ocpi/2.2.1/cdrs")) == 10, timeout=15)
    for i in range(10):
        path = f"/ocpi/2.2.1/sessions/FR/AB1/S{i}"
        updates = iop.delivered(path)
        assert [r.json()["kwh"] for r in updates] == [0.0, 1.0, 2.0, 3.0]
        [cdr] = [r for r in iop.delivered("/ocpi/2.2.1/cdrs") if r.json()["session_id"] == f"S{i}"]
        assert cdr.at >= updates[-1].answered_at
    await until_async(nxt.all_streams_empty)


# -- Redis trouble -------------------------------------------------------------------------------


async def test_lost_consumer_group_is_recreated(make_env: Callable[..., Any]) -> None:
    env: Env = await make_env()
    key = location_key("FR", "AB1", "G1")
    stream = stream_of("locations", key)
    await env.put_loc("G1", 1)
    await env.iop.wait_for(lambda: env.seqs("G1") == [1])
    await until_async(env.all_streams_empty)
    assert await env.redis.xgroup_destroy(stream, K.GROUP) == 1
    await env.put_loc("G1", 2)
    await env.put_loc("G1", 3)
    await env.iop.wait_for(lambda: env.seqs("G1") == [1, 2, 3], timeout=10)
    await until_async(env.all_streams_empty)
    groups = await env.redis.xinfo_groups(stream)
    assert [g["name"] for g in groups] == [K.GROUP.encode()]


async def test_lost_consumer_group_with_events_in_flight(make_env: Callable[..., Any]) -> None:
    env: Env = await make_env(RELAY_IOP_REQUEST_TIMEOUT_S="10", RELAY_FORWARDER_CLAIM_IDLE_S="11")
    key = location_key("FR", "AB1", "G2")
    stream = stream_of("locations", key)
    release = asyncio.Event()
    env.iop.script = lambda r: Reply(hold=release) if seq(r) == 1 and loc_of(r) == "G2" else None
    for n in (1, 2, 3):
        await env.put_loc("G2", n)
    await env.iop.wait_for(lambda: len(env.iop.arrived) == 1)
    assert await env.redis.xgroup_destroy(stream, K.GROUP) == 1
    await env.put_loc("G2", 4)
    await until_async(lambda: _has_group(env, stream), what="group recreated")
    release.set()
    await env.iop.wait_for(lambda: env.seqs("G2")[-1:] == [4], timeout=10)
    await until_async(env.all_streams_empty)
    got = env.seqs("G2")
    assert got == sorted(got), got  # no update older than one already taken
    assert set(got) == {1, 2, 3, 4}
    assert len(got) <= 5  # at most the in-flight one twice


async def _has_group(env: Env, stream: str) -> bool:
    return bool(await env.redis.xinfo_groups(stream))


async def test_redis_restart_loses_nothing(make_env: Callable[..., Any]) -> None:
    # A Redis of its own (AOF, fsync always) that this test may stop and start. After the restart
    # its script cache is empty (NOSCRIPT) and connections are new; pending entries and groups persist.
    with tempfile.TemporaryDirectory(prefix="rr-", dir="/tmp") as d:
        server = EmbeddedRedis(Path(d) / "r", fsync="always")
        await server.start()
        env: Env = await make_env(RELAY_REDIS_URL=server.url)
        try:
            env.iop.script = lambda r: Reply(status=200, ocpi=3000) if loc_of(r) == "X1" else None
            await put_many(env, ["X1", "X2"], 3)
            await env.iop.wait_for(lambda: env.seqs("X2") == [1, 2, 3] and len(env.iop.arrived) >= 6)
            await server.stop()
            await server.start()
            env.iop.script = lambda r: None
            await put_many(env, ["X1", "X2"], 2, start=4)
            done = [1, 2, 3, 4, 5]
            await env.iop.wait_for(lambda: env.seqs("X1") == done and env.seqs("X2") == done, timeout=20)
            await until_async(env.all_streams_empty, timeout=10)
            assert await env.dead() == []
            # Nothing sent twice: the acks that failed while Redis was away were retried, the shards kept.
            assert len(env.iop.delivered()) == 10
        finally:
            await env.relay.stop()
            await server.stop()


# -- stopping ------------------------------------------------------------------------------------


async def test_graceful_stop_acks_nothing_undelivered_and_the_next_relay_resumes(
    make_env: Callable[..., Any],
) -> None:
    env: Env = await make_env(RELAY_FORWARDER_CLAIM_IDLE_S="30")
    env.iop.script = lambda r: Reply(status=200, ocpi=3000)  # transient: every event stays in backoff
    for n in (1, 2, 3):
        await env.put_loc("S1", n)
    await env.put_loc("S2", 1)
    await env.iop.wait_for(lambda: len(env.iop.arrived) >= 6)
    started = time.monotonic()
    await env.relay.stop()
    assert time.monotonic() - started < 2.5  # backoffs are interrupted, not waited out
    assert env.iop.delivered() == []
    assert await env.stream_len() == 4  # nothing acknowledged
    pending = 0
    for s in range(4):
        info = await env.redis.xpending(K.stream_key("locations", s), K.GROUP)
        pending += info["pending"]
    assert pending == 4  # read, not finished: the next owner takes them back
    assert await env.dead() == []

    env.iop.script = lambda r: None
    nxt: Env = await make_env(iop=env.iop)
    resumed = time.monotonic()
    await env.iop.wait_for(lambda: env.seqs("S1") == [1, 2, 3] and env.seqs("S2") == [1], timeout=10)
    # A clean hand-back: the next relay need not wait claim_idle_s (30 s) for the old one's attempts.
    assert time.monotonic() - resumed < 10
    await until_async(nxt.all_streams_empty)


async def test_stop_that_cuts_an_attempt_short_makes_the_next_owner_wait(make_env: Callable[..., Any]) -> None:
    # A request still on the wire at the shutdown deadline is cancelled, but the IOP may apply it
    # later. The next owner must then wait claim_idle_s before resending, or the late request lands
    # after the resent newer update.
    knobs = {
        "RELAY_IOP_REQUEST_TIMEOUT_S": "2",
        "RELAY_FORWARDER_CLAIM_IDLE_S": "2.6",
        "RELAY_FORWARDER_SHUTDOWN_TIMEOUT_S": "0.3",
    }
    env: Env = await make_env(**knobs)
    release = asyncio.Event()
    env.iop.script = lambda r: Reply(hold=release) if r is env.iop.arrived[0] else None
    await env.put_loc("H1", 1)
    await env.put_loc("H1", 2)
    await env.iop.wait_for(lambda: len(env.iop.arrived) == 1)
    await env.relay.stop()  # cuts the held attempt short after 0.3 s
    await make_env(iop=env.iop, **knobs)
    with contextlib.suppress(AssertionError):  # the old attempt lands late, or when 2 is sent
        await env.iop.wait_for(lambda: len(env.iop.arrived) >= 3, timeout=1.5)
    release.set()
    held = env.iop.arrived[0]
    await env.iop.wait_for(lambda: held.reply is not None and len(env.seqs("H1")) >= 3, timeout=10)
    got = env.seqs("H1")
    collapsed = [n for i, n in enumerate(got) if i == 0 or n != got[i - 1]]
    assert collapsed == [1, 2], got


async def test_finishing_after_the_group_was_recreated_still_counts(settings: Settings, store: Store) -> None:
    # The group vanished (NOGROUP) while an attempt was in flight and was recreated before the
    # attempt finished: the XACK counts 0. The delivery must still raise the session's watermark
    # (or its CDR waits forever), and a dead letter must still be written (or the event is lost).
    ds = DeliveryStore(store)
    await ds.load_scripts()
    key = session_key("FR", "AB1", "S7")
    shard = shard_of(key, store.shards)
    stream = K.stream_key("sessions", shard)
    redis: Any = store.redis
    for n in (1, 2):
        body = msgspec.json.encode(fr_session("S7", kwh=float(n)))
        await store.append(validate(parse_target("PUT", "sessions/FR/AB1/S7"), "PUT", body, settings).event)
    first, second = await ds.read_new({stream: shard}, "c1", 10, 100)
    await redis.xgroup_destroy(stream, K.GROUP)
    await redis.xgroup_create(stream, K.GROUP, id="$")
    await ds.finish(first)
    assert await ds.session_done(shard, key) == first.id
    assert await ds.dead_letter(second, msgspec.msgpack.encode({"reason": "test"}), park=False) is not None
    assert await ds.session_done(shard, key) == second.id
    [dead] = await ds.dead_letters("sessions", shard)
    assert dead.stream_id == second.id and dead.info["reason"] == "test"
    assert await redis.xlen(stream) == 0
    # Finishing again (a second replica, a retried write) changes nothing.
    await ds.finish(first)
    assert await ds.dead_letter(second, b"\x80", park=False) is None
    assert len(await ds.dead_letters("sessions", shard)) == 1
