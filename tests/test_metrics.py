"""What an SRE sees: /metrics after a scripted run, /healthz and /readyz while Redis comes and goes.

A real ``Relay`` runs in process against the session's embedded Redis (or a private one where the
test stops it) and a ``FakeIop`` on loopback. /metrics is parsed with prometheus_client's own
parser. The registry is process-wide (other tests count too), so counters are checked as the
difference between two scrapes; gauges are absolute (set from Redis by ``Relay.update_gauges()``,
which the tests call instead of waiting for the 5 s gauge loop).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from relay import __version__, metrics
from relay.config import Settings
from relay.embedded_redis import EmbeddedRedis
from tests.conftest import AUTH, gireve_location
from tests.fake_iop import FakeIop, Received, Reply
from tests.test_forwarder import FAST, Env, loc_of
from tests.waiting import wait_until

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
LOC = "locations"
OP = "FR/AB1"
LINK_STATES = metrics.LINK_STATES  # relay.states


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def val(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def scrape(http: aiohttp.ClientSession, port: int | None) -> Samples:
    async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
        assert r.status == 200
        assert r.content_type == "text/plain"
        return parse(await r.text())


async def probe(http: aiohttp.ClientSession, port: int | None, path: str) -> tuple[int, Any]:
    async with http.get(f"http://127.0.0.1:{port}{path}") as r:
        return r.status, await r.json()


class Run:
    """Counters as differences from a first scrape."""

    def __init__(self, env: Env, before: Samples) -> None:
        self.env = env
        self.before = before
        self.now: Samples = before

    async def scrape(self) -> Samples:
        self.now = await scrape(self.env.http, self.env.relay.ingress_port)
        return self.now

    def delta(self, name: str, **labels: str) -> float:
        return val(self.now, name, **labels) - val(self.before, name, **labels)

    async def until_delta(self, name: str, want: float, **labels: str) -> None:
        async def reached() -> bool:
            await self.scrape()
            return self.delta(name, **labels) >= want

        await wait_until(reached, what=f"{name}{labels} +{want}")


@pytest.fixture
async def relay_env(make_settings: Callable[..., Settings]) -> AsyncIterator[Callable[..., Any]]:
    """make(**env) → a started Env (relay + fake IOP); everything is stopped afterwards."""
    made: list[Env] = []
    http = aiohttp.ClientSession()

    async def make(iop: FakeIop | None = None, **env: str) -> Env:
        if iop is None:
            iop = FakeIop()
            await iop.start()
        e = Env(make_settings(**{"RELAY_IOP_URL": iop.url, **FAST, **env}), iop, http)
        made.append(e)
        await e.relay.start()
        return e

    yield make
    for e in made:
        await e.relay.stop()
        await e.iop.close()
        await e.redis.aclose()
        await e.store.close()
    await http.close()


async def test_scrape_after_a_scripted_run(relay_env: Callable[..., Any]) -> None:
    # A short probe ceiling so the link comes back quickly once the IOP listens again.
    env: Env = await relay_env(RELAY_FORWARDER_PROBE_MAX_S="0.3")
    run = Run(env, await scrape(env.http, env.relay.ingress_port))
    tries: dict[str, int] = {}

    def script(r: Received) -> Reply | None:
        loc = loc_of(r)
        tries[loc] = tries.get(loc, 0) + 1
        if loc == "M-RETRY" and tries[loc] == 1:
            return Reply(status=503, ocpi=None)  # transient: retried, then delivered
        if loc == "M-DEAD":
            return Reply(status=200, ocpi=2001)  # OCPI client error: dead-lettered at once
        return None

    env.iop.script = script
    ids = [await env.put_loc(loc, 1) for loc in ("M-OK1", "M-OK2", "M-RETRY", "M-DEAD")]
    await run.until_delta("relay_events_delivered_total", 3, module=LOC)
    await run.until_delta("relay_events_dead_lettered_total", 1, module=LOC, kind="permanent")
    assert await env.relay.update_gauges()
    m = await run.scrape()
    assert run.delta("relay_events_accepted_total", module=LOC, operator=OP) == 4
    assert run.delta("relay_delivery_attempts_total", module=LOC, outcome="delivered") == 3
    assert run.delta("relay_delivery_attempts_total", module=LOC, outcome="transient") == 1
    assert run.delta("relay_delivery_attempts_total", module=LOC, outcome="permanent") == 1
    assert run.delta("relay_delivery_retries_total", module=LOC) == 1
    assert run.delta("relay_events_delivered_total", module=LOC) == 3
    assert run.delta("relay_events_dead_lettered_total", module=LOC, kind="permanent") == 1
    assert run.delta("relay_delivery_latency_seconds_count", module=LOC) == 3
    assert run.delta("relay_iop_request_duration_seconds_count", module=LOC) == 5
    assert run.delta("relay_redis_roundtrip_seconds_count") >= 1
    assert val(m, "relay_queue_depth", module=LOC) == 0
    assert val(m, "relay_oldest_event_age_seconds", module=LOC) == 0
    assert val(m, "relay_dead_letters", module=LOC) == 1
    link = {s: val(m, "relay_iop_link_state", state=s) for s in LINK_STATES}
    assert link == {s: float(s == "up") for s in LINK_STATES}
    assert val(m, "relay_registration_state", state="static") == 1  # [iop] url + token, no handshake
    assert val(m, "relay_registration_state", state="registered") == 0
    assert val(m, "relay_build_info", version=__version__) == 1
    assert val(m, "relay_inflight_attempts") == 0

    # The IOP goes away: events queue, the link goes down, the oldest age is that of the first queued event.
    await env.iop.down()
    before_first = time.time()
    await env.put_loc("M-DOWN", 1)
    after_first = time.time()
    for n in (2, 3):
        await env.put_loc("M-DOWN", n)
    await wait_until(lambda: env.relay.link.state == "down", what="link down")
    gauges_from = time.time()
    assert await env.relay.update_gauges()
    gauges_to = time.time()
    m = await run.scrape()
    assert val(m, "relay_queue_depth", module=LOC) == 3
    age = val(m, "relay_oldest_event_age_seconds", module=LOC)
    # The stream id's millisecond clock: the age lies between these bounds (± a millisecond).
    assert gauges_from - after_first - 0.002 <= age <= gauges_to - before_first + 0.002, age
    assert val(m, "relay_iop_link_state", state="down") == 1 and val(m, "relay_iop_link_state", state="up") == 0
    # threshold 5: at least five refused connections in a row took the link down, and were retried
    assert run.delta("relay_delivery_attempts_total", module=LOC, outcome="transient") >= 1 + 5
    assert run.delta("relay_delivery_retries_total", module=LOC) >= 1 + 4
    status, ready = await probe(env.http, env.relay.ingress_port, "/readyz")
    assert (status, ready["ready"], ready["iop_link"]) == (200, True, "down")  # an IOP outage is not unreadiness

    # The IOP is back: the queued events go out in order, the backlog gauges return to zero.
    await env.iop.start()
    await env.iop.wait_for(lambda: env.seqs("M-DOWN") == [1, 2, 3])
    await run.until_delta("relay_events_delivered_total", 6, module=LOC)
    assert await env.relay.update_gauges()
    m = await run.scrape()
    assert val(m, "relay_queue_depth", module=LOC) == 0
    assert val(m, "relay_oldest_event_age_seconds", module=LOC) == 0
    assert val(m, "relay_iop_link_state", state="up") == 1 and val(m, "relay_iop_link_state", state="down") == 0
    assert run.delta("relay_delivery_attempts_total", module=LOC, outcome="delivered") == 6
    assert run.delta("relay_delivery_latency_seconds_count", module=LOC) == 6
    assert run.delta("relay_events_accepted_total", module=LOC, operator=OP) == 7
    assert run.delta("relay_events_dead_lettered_total", module=LOC, kind="permanent") == 1
    # A long outage shows in the latency histogram: the OUT events waited for the IOP.
    assert run.delta("relay_delivery_latency_seconds_sum", module=LOC) > 0
    # Never an object id or an event id in a label (the ids are distinctive: other tests share the registry).
    labels = {v for (name, ls) in m if name.startswith("relay_") for _, v in ls}
    for ident in ["M-OK1", "M-OK2", "M-RETRY", "M-DEAD", "M-DOWN", *ids]:
        assert not any(ident in v for v in labels), ident


async def test_refused_and_accepted_carry_module_operator_and_rule(ingress: TestClient[Any, Any]) -> None:
    async def metrics() -> Samples:
        resp = await ingress.get("/metrics")
        return parse(await resp.text())

    before = await metrics()
    url = "/ingress/2.2.1/locations/FR/AB1/LOC9"
    assert (await ingress.put(url, json=gireve_location("LOC9"), headers=AUTH)).status == 202
    no_caps = gireve_location("LOC9")
    no_caps["evses"][0].pop("capabilities")
    assert (await ingress.put(url, json=no_caps, headers=AUTH)).status == 422
    other = "/ingress/2.2.1/locations/DE/XYZ/LOC9"
    assert (await ingress.put(other, json=gireve_location("LOC9"), headers=AUTH)).status == 404
    assert (await ingress.put(url, json=gireve_location("LOC9"))).status == 401
    batch = {"operations": [{"method": "PUT", "path": url, "body": gireve_location("LOC9")},
                            {"method": "PUT", "path": url, "body": no_caps}]}  # fmt: skip
    assert (await ingress.post("/ingress/2.2.1/batch", json=batch, headers=AUTH)).status == 200
    after = await metrics()

    def delta(name: str, **labels: str) -> float:
        return val(after, name, **labels) - val(before, name, **labels)

    refused = "relay_events_refused_total"
    assert delta("relay_events_accepted_total", module=LOC, operator=OP) == 2
    assert delta(refused, module=LOC, operator=OP, status="422", reason="gireve.L2.capabilities") == 2
    # An operator that is not hosted is not a label value (unbounded): it counts under "".
    assert delta(refused, module=LOC, operator="", status="404", reason="operator") == 1
    assert not any(("operator", "DE/XYZ") in labels for _, labels in after)
    assert delta(refused, module="unknown", operator="", status="401", reason="auth") == 1


async def test_readyz_follows_redis_not_the_iop(relay_env: Callable[..., Any]) -> None:
    with tempfile.TemporaryDirectory(prefix="rz-", dir="/tmp") as d:
        server = EmbeddedRedis(Path(d) / "r", fsync="everysec")
        await server.start()
        env: Env | None = None
        try:
            # The fake IOP never listens: the IOP is down for the whole test.
            env = await relay_env(iop=FakeIop(), RELAY_REDIS_URL=server.url)
            port = env.relay.ingress_port
            await env.put_loc("R1", 1)
            await wait_until(lambda: env.relay.link.state == "down", what="link down")
            assert await env.relay.update_gauges()
            status, body = await probe(env.http, port, "/readyz")
            assert status == 200, body
            assert body["ready"] is True and body["redis"] == "ok" and body["iop_link"] == "down"
            assert body["persistence"]["appendonly"] == "yes"
            before = await scrape(env.http, port)

            await server.stop()

            async def unready() -> bool:
                return (await probe(env.http, port, "/readyz"))[0] == 503

            await wait_until(unready, what="/readyz 503 with Redis stopped")
            status, body = await probe(env.http, port, "/readyz")
            assert body["ready"] is False and body["redis"] == "unreachable"
            assert await probe(env.http, port, "/healthz") == (200, {"status": "ok"})  # alive: no restart wanted
            assert not await env.relay.update_gauges()
            during = await scrape(env.http, port)  # /metrics answers without Redis
            errors = "relay_redis_errors_total"
            assert val(during, errors, op="gauges") - val(before, errors, op="gauges") >= 1

            await server.start()

            async def ready() -> bool:
                return (await probe(env.http, port, "/readyz"))[0] == 200

            await wait_until(ready, what="/readyz 200 with Redis back")
            assert await env.relay.update_gauges()
            after = await scrape(env.http, port)
            assert val(after, "relay_queue_depth", module=LOC) == 1  # still queued, still counted
            assert await probe(env.http, port, "/healthz") == (200, {"status": "ok"})
        finally:
            if env is not None:
                await env.relay.stop()  # before its Redis goes for good
            await server.stop()


# -- the delivery path's own counters -------------------------------------------------------------


def _samples(registry: CollectorRegistry) -> list[tuple[str, list[tuple[str, str]], float]]:
    """Every sample of a scrape; a _created sample's value (a time) is checked apart."""
    return sorted(
        (s.name, sorted(s.labels.items()), 0.0 if s.name.endswith("_created") else s.value)
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for s in family.samples
    )


def _created_times(registry: CollectorRegistry) -> list[float]:
    return [
        s.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for s in family.samples
        if s.name.endswith("_created")
    ]


def test_hot_metrics_expose_what_prometheus_client_would() -> None:
    """HotCounter and HotHistogram trade the lock for plain numbers: the scrape must not change."""
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    before = time.time()
    buckets = (0.005, 0.01, 0.1, 1, 30)
    hot_c = metrics.HotCounter("x_attempts_total", "doc", ["module", "outcome"], registry=ours)
    ref_c = Counter("x_attempts_total", "doc", ["module", "outcome"], registry=theirs)
    hot_h = metrics.HotHistogram("x_seconds", "doc", ["module"], buckets, registry=ours)
    ref_h = Histogram("x_seconds", "doc", ["module"], buckets=buckets, registry=theirs)
    for module, outcome in [("locations", "delivered"), ("locations", "delivered"), ("cdrs", "transient")]:
        hot_c.inc(module, outcome)
        ref_c.labels(module, outcome).inc()
    # bounds themselves (le is inclusive), between them, above the last, zero
    for value in (0.0, 0.005, 0.0051, 0.01, 0.5, 1.0, 29.99, 30.0, 31.0, 4000.0):
        hot_h.observe(value, "locations")
        ref_h.labels("locations").observe(value)
    hot_h.observe(0.2, "cdrs")
    ref_h.labels("cdrs").observe(0.2)
    assert _samples(ours) == _samples(theirs)  # _created included, one per series, as prometheus_client writes it
    created = _created_times(ours)
    assert len(created) == 4 and all(before <= t <= time.time() for t in created)
    assert hot_c.value("locations", "delivered") == 2 and hot_c.value("sessions", "delivered") == 0
    assert hot_h.count("locations") == 10 and hot_h.count("tariffs") == 0
