"""Observability from the first minute: metrics at 0 from the first scrape, /readyz per module, one state
vocabulary (code, metrics, /readyz, `relay status`, README, docs, alerts), `relay status` that follows a link
change within a second and forgets a replica that stopped cleanly at once.

Everything runs against the session's real embedded Redis; the "fresh process" and `relay status` are real
``python -m relay`` processes.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from itertools import product
from pathlib import Path
from typing import Any, get_args

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import TestClient
from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from relay import metrics, readiness, retention
from relay.config import MODULES
from relay.models.tokens import AllowedType, CommandResponseType, CommandResultType, CommandType
from relay.policy import DEAD_LETTER_KINDS
from relay.retry import Kind
from relay.states import CONNECTION_STATES, LINK_STATES, connection_state
from relay.store import keys
from tests.conftest import REPO, TOKEN
from tests.fake_iop import Reply
from tests.loopback import free_port
from tests.test_forwarder import Env
from tests.test_metrics import relay_env  # noqa: F401  (the fixture envs uses)
from tests.waiting import wait_until

README = (REPO / "README.md").read_text()
OPERATIONS = (REPO / "docs" / "operations.md").read_text()


# -- the expected label sets, from the code's own names ------------------------------------------------------

# Per metric, each label's domain where it is not the default (module: MODULES).
DOMAINS: dict[str, dict[str, tuple[str, ...]]] = {
    "relay_delivery_attempts_total": {"outcome": tuple(k.value for k in Kind)},
    "relay_events_dead_lettered_total": {"kind": DEAD_LETTER_KINDS},
    "relay_events_not_stored_again_total": {"kind": metrics.NOT_STORED_AGAIN_KINDS},
    "relay_retention_removed_total": {"what": retention.WHAT},
    "relay_iop_link_state": {"state": LINK_STATES},
    "relay_registration_state": {"state": CONNECTION_STATES},
    "relay_authorizations_total": {"decided_by": metrics.AUTHORIZATION_DECIDERS, "allowed": get_args(AllowedType)},
    "relay_commands_total": {
        "command": (*get_args(CommandType), metrics.OTHER_COMMAND),
        "result": get_args(CommandResponseType),
    },  # fmt: skip
    "relay_command_results_total": {"result": get_args(CommandResultType)},
    "relay_tokens_received_total": {"method": metrics.TOKEN_METHODS},
    "relay_redis_errors_total": {"op": metrics.REDIS_OPS},
}
DEFAULT_DOMAINS: dict[str, tuple[str, ...]] = {
    "module": MODULES,
    "listener": metrics.LISTENERS,
    "reason": metrics.CONNECTION_CLOSE_REASONS,
}


def labelled_metrics() -> Iterator[tuple[str, str, tuple[str, ...]]]:
    """(exported name, type, label names) of every labelled metric relay.metrics defines."""
    for m in vars(metrics).values():
        if isinstance(m, MetricWrapperBase) and m._labelnames:
            name = m._name + ("_total" if m._type == "counter" else "")
            yield name, str(m._type), tuple(m._labelnames)
        elif isinstance(m, metrics.HotCounter):
            yield m.name, "counter", tuple(m.labelnames)
        elif isinstance(m, metrics.HotHistogram):
            yield m.name, "histogram", tuple(m.labelnames)


def expected_series() -> dict[str, tuple[str, tuple[str, ...], list[tuple[str, ...]]]]:
    """Per metric whose label values are known in advance: its type, label names and every label tuple."""
    out = {}
    for name, kind, labelnames in labelled_metrics():
        if name in metrics.LAZY:
            continue
        domains = {**DEFAULT_DOMAINS, **DOMAINS.get(name, {})}
        unknown = [label for label in labelnames if label not in domains]
        assert not unknown, (f"{name}: no known values for {unknown}: add the domain to preset_series() and DOMAINS, "
                             "or list the metric in metrics.LAZY")  # fmt: skip
        out[name] = (kind, labelnames, list(product(*(domains[label] for label in labelnames))))
    return out


def sample_name(name: str, kind: str) -> str:
    return {"counter": name, "histogram": name + "_count"}.get(kind, name)


def parse(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}  # fmt: skip


def check_scrape(text: str, *, fresh: bool) -> None:
    """Every known series is in the scrape; counters and histograms at 0 in a fresh process; exactly one state."""
    samples = parse(text)
    for name, (kind, labelnames, tuples) in expected_series().items():
        for values in tuples:
            key = (sample_name(name, kind), frozenset(zip(labelnames, values, strict=True)))
            assert key in samples, f"{name}{dict(key[1])} is not exported"
            if fresh and kind in ("counter", "histogram"):
                assert samples[key] == 0, f"{name}{dict(key[1])} = {samples[key]} in a fresh process"
        if kind == "histogram" and fresh:
            bucket = (
                name + "_bucket",
                frozenset({**dict(zip(labelnames, tuples[0], strict=True)), "le": "+Inf"}.items()),
            )
            assert samples[bucket] == 0, name
    for name in ("relay_iop_link_state", "relay_registration_state") if fresh else ():
        states = {dict(labels)["state"]: v for (n, labels), v in samples.items() if n == name}
        assert sum(states.values()) == 1 and set(states) == set(DOMAINS[name]["state"]), (name, states)


def exported_name(m: Any) -> str:
    if isinstance(m, metrics.HotCounter | metrics.HotHistogram):
        return m.name
    return str(m._name) + ("_total" if m._type == "counter" else "")


def test_every_labelled_metric_is_either_preset_or_lazy_with_a_reason() -> None:
    preset = {exported_name(m): label_sets for m, label_sets in metrics.preset_series()}
    for name, (_, _, tuples) in expected_series().items():
        assert name in preset, f"{name} is not in metrics.preset_series()"
        assert sorted(preset[name]) == sorted(tuples), name
    for lazy in metrics.LAZY:
        labels = next(ls for n, _, ls in labelled_metrics() if n == lazy)
        assert {"operator", "rule", "status"} & set(labels), f"{lazy} is lazy but all its labels are known in advance"


def literals(node: ast.expr) -> list[ast.Constant]:
    """The string constants an expression may evaluate to: itself, or the branches of ``a if c else b``."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node]
    if isinstance(node, ast.IfExp):
        return literals(node.body) + literals(node.orelse)
    return []


def test_label_literals_in_the_code_are_in_the_preset_domains() -> None:
    """A label value written in the code (``metrics.X.labels(op="gauges")``, ``Decision("iop", …)``) is one the
    preset knows: a new one must be added there, or its series would appear only with its first event."""
    by_attr = {attr: m for attr, m in vars(metrics).items() if isinstance(m, MetricWrapperBase)}
    seen = 0
    for path in (REPO / "relay").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            if node.func.attr != "labels" or not isinstance(node.func.value, ast.Attribute):
                continue
            owner = node.func.value
            if not (isinstance(owner.value, ast.Name) and owner.value.id == "metrics" and owner.attr in by_attr):
                continue
            m = by_attr[owner.attr]
            name = m._name + ("_total" if m._type == "counter" else "")
            if name in metrics.LAZY:
                continue
            domains = {**DEFAULT_DOMAINS, **DOMAINS.get(name, {})}
            args = list(zip(m._labelnames, node.args, strict=False)) + [(k.arg, k.value) for k in node.keywords]
            for label, value in args:
                for const in literals(value):
                    seen += 1
                    where = f"{path.name}:{node.lineno}: {name}{{{label}={const.value!r}}}"
                    assert const.value in domains[label], where
    assert seen >= 10
    deciders = set()
    for node in ast.walk(ast.parse((REPO / "relay" / "authorize.py").read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Decision":
            first = node.args[0]
            assert isinstance(first, ast.Constant), ast.unparse(node)
            deciders.add(first.value)
    assert deciders == set(metrics.AUTHORIZATION_DECIDERS)


async def test_the_registry_has_every_known_series_once_the_app_is_built(ingress: TestClient[Any, Any]) -> None:
    resp = await ingress.get("/metrics")
    check_scrape(await resp.text(), fresh=False)


@pytest.fixture
def serve_env(redis_url: str, tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "RELAY_REDIS_URL": redis_url,
        "RELAY_INGRESS_TOKEN": TOKEN,
        "RELAY_STORAGE_DIR": str(tmp_path / "data"),
        "RELAY_OCPI_LISTEN": "127.0.0.1:0",
        "RELAY_IOP_URL": "",
        "RELAY_IOP_TOKEN": "",
    }


def relay_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "relay", *args, "--config", str(REPO / "config" / "relay.toml")],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=60)  # fmt: skip


def start_serve(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        argv = [sys.executable, "-m", "relay", "serve", "--config", str(REPO / "config" / "relay.toml")]
        return subprocess.Popen(argv, env=env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=out, stderr=out)


async def test_a_fresh_process_exports_every_known_series_at_zero(serve_env: dict[str, str], tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "serve.log"
    proc = start_serve({**serve_env, "RELAY_INGRESS_LISTEN": f"127.0.0.1:{port}"}, log)
    try:
        async with aiohttp.ClientSession() as http:

            async def up() -> bool:
                assert proc.poll() is None, log.read_text()
                with suppress(aiohttp.ClientError, OSError):
                    async with http.get(f"http://127.0.0.1:{port}/healthz") as r:
                        return r.status == 200
                return False

            await wait_until(up, 30, lambda: f"relay serve up; its log:\n{log.read_text()}")
            async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
                text = await r.text()
        check_scrape(text, fresh=True)
        samples = parse(text)
        # No IOP configured: nothing to deliver to, in the one vocabulary.
        assert samples[("relay_iop_link_state", frozenset({("state", "paused")}))] == 1
        assert samples[("relay_registration_state", frozenset({("state", "none")}))] == 1
        # The alert rules' counters exist, so rate() is 0, not "no data".
        assert samples[("relay_redis_errors_total", frozenset({("op", "gauges")}))] == 0
    finally:
        proc.terminate()
        proc.wait(30)


# -- one vocabulary --------------------------------------------------------------------------------------------


def backticked(text: str) -> set[str]:
    return set(re.findall(r"`([a-z_]+)`", text))


def test_readme_docs_and_deploy_name_the_states_of_the_code() -> None:
    links, conns = set(LINK_STATES), set(CONNECTION_STATES)
    # README: what /readyz shows with no IOP, and the two lists of the Metrics section.
    assert set(re.findall(r'"iop_link": "(\w+)"', README)) <= links
    assert set(re.findall(r'"connection": "(\w+)"', README)) <= conns
    shown = re.search(r'`"iop_link": "(\w+)"` and `"connection": "(\w+)"`', README)
    assert shown is not None and (shown[1], shown[2]) == (
        "paused", connection_state(None, static=False)), "README: what /readyz shows with no IOP"  # fmt: skip
    metrics_section = README.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    link_list = re.search(r"`relay_iop_link_state\{state\}` \(([^)]*)\)", metrics_section, re.S)
    conn_list = re.search(r"`relay_registration_state\{state\}` \(([^)]*)\)", metrics_section, re.S)
    assert link_list and backticked(link_list[1]) == links, "README, Metrics: link states"
    assert conn_list and backticked(conn_list[1]) == conns, "README, Metrics: connection states"
    for name in re.findall(r'relay_iop_link_state\{state="(\w+)"\}', README + OPERATIONS):
        assert name in links, name
    for name in re.findall(r'relay_registration_state\{state="(\w+)"\}', README + OPERATIONS):
        assert name in conns, name
    # docs/operations.md: the metrics table and the /readyz paragraph.
    row = re.search(r"^\| `relay_iop_link_state` \|.*$", OPERATIONS, re.M)
    assert row and backticked(row[0].split("|")[4]) - conns == links  # paused: "the connection is unregistered or none"
    row = re.search(r"^\| `relay_registration_state` \|.*$", OPERATIONS, re.M)
    assert row and backticked(row[0].split("|")[4]) == conns
    readyz = OPERATIONS.split("`/readyz` body:", 1)[1].split("\n\n", 1)[0]
    found = re.search(r"`iop_link` \(this replica's link: ([^)]*)\)", readyz)
    assert found and backticked(found[1]) == links
    found = re.search(r"`connection` \(([^)]*)\)", readyz)
    assert found and backticked(found[1]) == conns
    # The alert rules and the dashboard name only states the code has.
    rules = yaml.safe_load((REPO / "deploy" / "prometheus" / "alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            for value in re.findall(r'relay_iop_link_state\{[^}]*state=~?"([^"]*)"', rule["expr"]):
                assert set(value.split("|")) <= links, (rule["alert"], value)
            for value in re.findall(r'relay_registration_state\{[^}]*state=~?"([^"]*)"', rule["expr"]):
                assert set(value.split("|")) <= conns, (rule["alert"], value)
    dashboard = (REPO / "deploy" / "grafana" / "dashboards" / "relay.json").read_text()
    # The old name is gone, but from the upgrade notes that say so.
    before_upgrading = README.split("## Upgrading", 1)[0]
    assert "unconfigured" not in dashboard + before_upgrading + OPERATIONS
    assert set(metrics.REGISTRATION_STATES) == conns and set(metrics.LINK_STATES) == links


# -- /readyz per module ------------------------------------------------------------------------------------------


@pytest.fixture
def envs(relay_env: Callable[..., Any]) -> Callable[..., Any]:  # noqa: F811  (the fixture, by name)
    """tests.test_metrics' relay_env (a started relay + fake IOP, stopped afterwards), by the name used here."""
    return relay_env


async def readyz(env: Env) -> tuple[int, dict[str, Any]]:
    async with env.http.get(f"http://127.0.0.1:{env.relay.ingress_port}/readyz") as r:
        body: dict[str, Any] = await r.json()
        return r.status, body


async def test_readyz_reports_each_modules_readiness_and_keeps_its_status(
    envs: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(readiness, "READINESS_TTL_S", 0.0)  # each probe reads Redis again
    env: Env = await envs(RELAY_IOP_URL="", RELAY_IOP_TOKEN="")  # nothing to deliver to
    shards = env.store.shards
    await wait_until(lambda: env.relay.forwarder is not None and len(env.relay.forwarder.shards) == shards,
                     what="all shards held")  # fmt: skip
    status, body = await readyz(env)
    assert status == 200 and body["ready"] is True, body
    assert (body["iop_link"], body["connection"]) == ("paused", "none"), body
    assert set(body["modules"]) == set(MODULES)
    for module, row in body["modules"].items():
        assert row == {"ready": True, "streams": "ok", "queued": 0, "oldest_age_s": 0, "dead": 0, "shards": shards,
                       "shards_owned": shards, "delivering": False}, (module, row)  # fmt: skip

    await env.put_loc("RZ1", 1)
    status, body = await readyz(env)
    loc = body["modules"]["locations"]
    assert status == 200 and loc["queued"] == 1 and 0 <= loc["oldest_age_s"] < 60, loc
    assert body["modules"]["cdrs"]["queued"] == 0


async def test_readyz_says_which_modules_this_replica_delivers(envs: Callable[..., Any]) -> None:
    env: Env = await envs()  # a static [iop] url + token
    shards = env.store.shards

    async def delivering() -> bool:
        return all(
            row["delivering"] and row["shards_owned"] == shards for row in (await readyz(env))[1]["modules"].values()
        )

    await wait_until(delivering, what="every module delivered by this replica")
    status, body = await readyz(env)
    assert (status, body["iop_link"], body["connection"]) == (200, "up", "static")


async def test_readyz_without_a_forwarder_says_disabled_and_names_a_lost_stream(
    envs: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(readiness, "READINESS_TTL_S", 0.0)  # each probe reads Redis again
    env: Env = await envs(RELAY_FORWARDER_ENABLED="false")
    status, body = await readyz(env)
    assert (status, body["iop_link"], body["connection"]) == (200, "disabled", "static"), body
    assert all(r["ready"] and r["shards_owned"] == 0 and r["delivering"] is False for r in body["modules"].values())
    assert REGISTRY.get_sample_value("relay_iop_link_state", {"state": "disabled"}) == 1

    # A stream lost (a flushed Redis, a deleted key; no forwarder here to recreate it at its next read): that
    # module is not ready and says which shard; the relay still is (README: readiness is Redis, listeners, not
    # stopping).
    await env.redis.delete(keys.stream_key("cdrs", 1))
    status, body = await readyz(env)
    cdrs = body["modules"]["cdrs"]
    assert status == 200 and body["ready"] is True
    assert (cdrs["ready"], cdrs["streams"], cdrs["missing_shards"]) == (False, "missing", [1]), cdrs
    assert body["modules"]["locations"]["ready"] is True
    # Redis unreachable: nothing known about the modules, and /readyz is 503 as before.


# -- relay status: a link change within a second, a clean stop at once -------------------------------------------


async def test_relay_status_shows_a_link_change_within_a_second(
    envs: Callable[..., Any], serve_env: dict[str, str]
) -> None:
    # Lease rounds every 10 s: only the publication on change can be this quick.
    env: Env = await envs(RELAY_FORWARDER_LEASE_TTL_S="30")
    fwd = env.relay.forwarder
    assert fwd is not None
    await wait_until(lambda: len(fwd.shards) == env.store.shards, what="all shards held")

    async def published() -> str:
        return (await env.ds.link_states()).get(fwd.me, {}).get("state", "")

    async def shows(state: str) -> bool:
        return await published() == state

    await wait_until(lambda: shows("up"), what="link published")
    env.iop.script = lambda r: Reply(status=401, ocpi=None)
    await env.put_loc("LS1", 1)
    await wait_until(lambda: env.relay.link.state == "auth_failed", what="auth_failed")
    changed_at = env.relay.link.since
    await wait_until(lambda: shows("auth_failed"), 1.0, "auth_failed published")
    assert time.time() - changed_at < 1.0
    # What `relay status` prints, from the same Redis.
    out = relay_cli({**serve_env, "RELAY_REDIS_URL": env.settings.redis.url}, "status", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["replicas"][fwd.me]["state"] == "auth_failed"


async def test_a_replica_that_stopped_cleanly_leaves_relay_status_at_once(
    envs: Callable[..., Any], serve_env: dict[str, str]
) -> None:
    first: Env = await envs()
    second: Env = await envs(iop=first.iop)
    gone, stays = first.relay.forwarder, second.relay.forwarder
    assert gone is not None and stays is not None

    async def listed() -> set[str]:
        return set(await first.ds.link_states())

    await wait_until(lambda: _has(listed, {gone.me, stays.me}), what="both replicas listed")
    await first.relay.stop()
    assert await listed() == {stays.me}
    assert gone.me not in await first.ds.alive()
    out = relay_cli({**serve_env, "RELAY_REDIS_URL": first.settings.redis.url}, "status", "--json")
    assert out.returncode == 0, out.stderr
    assert set(json.loads(out.stdout)["replicas"]) == {stays.me}


async def _has(listed: Callable[[], Any], want: set[str]) -> bool:
    got: set[str] = await listed()
    return want <= got


async def test_readyz_reads_the_streams_once_per_interval(envs: Callable[..., Any]) -> None:
    """Probes in a row reuse one read of every stream for readiness.READINESS_TTL_S (a probe every second
    with 1,024 shards would otherwise read 20,480 streams a second on the serving loop)."""
    env: Env = await envs(RELAY_FORWARDER_ENABLED="false")
    await readyz(env)
    calls = await _commands(env, "xlen")
    for _ in range(5):
        status, _ = await readyz(env)
        assert status == 200
    assert await _commands(env, "xlen") == calls


async def _commands(env: Env, name: str) -> int:
    stats: dict[str, Any] = await env.store.redis.info("commandstats")
    return int(stats.get(f"cmdstat_{name}", {}).get("calls", 0))
