"""Dead letters end to end: produced by the forwarder, then listed, shown, replayed and purged by the CLI."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from click.testing import CliRunner, Result

from relay.cli import main
from relay.config import Settings
from relay.service import Relay
from tests.conftest import AUTH, REPO, TOKEN, gireve_location
from tests.fake_iop import FakeIop, Received, Reply
from tests.waiting import wait_until

FAST = {
    "RELAY_FORWARDER_COMPACT": "",  # each update followed to the IOP: compaction off (tests/test_compaction.py)
    "RELAY_FORWARDER_BACKOFF_INITIAL_S": "0.01",
    "RELAY_FORWARDER_BACKOFF_MAX_S": "0.05",
}


class Env:
    def __init__(self, relay: Relay, iop: FakeIop, settings: Settings) -> None:
        self.relay, self.iop, self.settings = relay, iop, settings
        self.refuse: set[str] = set()  # location names the IOP answers with OCPI 2001
        self.accepted: list[tuple[str, str]] = []  # (location id, name) the IOP answered 1000

    async def put(self, loc: str, name: str) -> None:
        url = f"http://127.0.0.1:{self.relay.ingress_port}/ingress/2.2.1/locations/FR/AB1/{loc}"
        body = gireve_location(loc, name=name)
        async with aiohttp.ClientSession() as http, http.put(url, json=body, headers=AUTH) as r:
            assert r.status == 202, await r.text()

    async def cli(self, *args: str, input: str | None = None) -> Result:
        env = {
            "RELAY_REDIS_URL": self.settings.redis.url,
            "RELAY_INGRESS_TOKEN": TOKEN,
            "RELAY_CONFIG": str(REPO / "config" / "relay.toml"),
            "RELAY_STATE_ENABLED": "true" if self.settings.state.enabled else "false",
        }
        runner = CliRunner()
        return await asyncio.to_thread(runner.invoke, main, list(args), env=env, input=input)

    def names(self, loc: str) -> list[str]:
        """Names of the location as the IOP accepted them, in order."""
        return [name for lid, name in self.accepted if lid == loc]


@pytest.fixture
async def env(make_settings: Callable[..., Settings], request: pytest.FixtureRequest) -> AsyncIterator[Env]:
    iop = FakeIop()
    await iop.start()
    extra: dict[str, str] = getattr(request, "param", {})  # indirect parametrization: more settings
    settings = make_settings(RELAY_IOP_URL=iop.url, RELAY_IOP_TOKEN="t", **FAST, **extra)
    relay = Relay(settings)
    e = Env(relay, iop, settings)

    def script(r: Received) -> Reply | None:
        body = r.json()
        if body["name"] in e.refuse:
            return Reply(status=200, ocpi=2001)
        e.accepted.append((body["id"], body["name"]))
        return None

    iop.script = script
    await relay.start()
    yield e
    await relay.stop()
    await iop.close()


def _summary(res: Result) -> dict[str, Any]:
    assert res.exit_code == 0, res.output
    out: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


async def _dead(e: Env) -> list[dict[str, Any]]:
    res = await e.cli("dlq", "list", "--json")
    assert res.exit_code == 0, res.output
    return [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]


async def _wait_dead(e: Env, n: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    async def listed() -> bool:
        nonlocal rows
        rows = await _dead(e)
        return len(rows) >= n

    await wait_until(listed, 20, f"{n} dead letters listed")
    return rows


async def test_permanent_failure_is_listed_and_shown(env: Env) -> None:
    env.refuse.add("bad")
    await env.put("LOC1", "bad")
    await env.put("LOC1", "good")
    rows = await _wait_dead(env, 1)
    await env.iop.wait_for(lambda: env.names("LOC1") == ["good"])
    assert rows[0]["kind"] == "permanent" and rows[0]["ocpi_code"] == 2001 and rows[0]["http_status"] == 200
    assert rows[0]["object"] == "locations/FR/AB1/LOC1" and rows[0]["attempts"] == 1
    shown = await env.cli("dlq", "show", rows[0]["dead_id"])
    assert shown.exit_code == 0
    detail = json.loads(shown.stdout)
    assert json.loads(detail["body"])["name"] == "bad"
    assert "OCPI 2001" in detail["reason"]
    missing = await env.cli("dlq", "show", "0-1")
    assert missing.exit_code == 1


@pytest.mark.parametrize("env", [{"RELAY_STATE_ENABLED": "false"}], indirect=True, ids=["no-state"])
async def test_replay_delivers_and_skips_newer_unless_forced(env: Env) -> None:
    # State store off: a replay sends the old event as it was, so one behind a newer delivered update is
    # skipped (from state it would go: tests/test_replay.py).
    env.refuse.update({"old1", "only2"})
    await env.put("LOC1", "old1")
    await env.put("LOC1", "new1")  # delivered after old1 died: replaying old1 would regress LOC1
    await env.put("LOC2", "only2")  # nothing newer: replay must deliver it
    rows = await _wait_dead(env, 2)
    await env.iop.wait_for(lambda: env.names("LOC1") == ["new1"])
    by_obj = {r["object"]: r["dead_id"] for r in rows}
    env.refuse.clear()

    res = await env.cli("dlq", "replay", by_obj["locations/FR/AB1/LOC1"], by_obj["locations/FR/AB1/LOC2"])
    assert res.exit_code == 0, res.output
    summary = _summary(res)
    assert summary == {"selected": 2, "skipped_newer": 1, "replayed": 1}
    await env.iop.wait_for(lambda: env.names("LOC2") == ["only2"])
    assert env.names("LOC1") == ["new1"]
    assert [r["object"] for r in await _dead(env)] == ["locations/FR/AB1/LOC1"]

    res = await env.cli("dlq", "replay", "--force", by_obj["locations/FR/AB1/LOC1"])
    assert _summary(res) == {"selected": 1, "replayed": 1}
    await env.iop.wait_for(lambda: env.names("LOC1") == ["new1", "old1"])
    assert await _dead(env) == []


async def test_dry_run_changes_nothing_and_bulk_needs_a_selection(env: Env) -> None:
    env.refuse.update({"a", "b"})
    await env.put("LOC1", "a")
    await env.put("LOC2", "b")
    await _wait_dead(env, 2)
    res = await env.cli("dlq", "replay", "--all", "--dry-run")
    assert _summary(res) == {"selected": 2, "would_replay": 2}
    assert len(await _dead(env)) == 2
    res = await env.cli("dlq", "purge")
    assert res.exit_code == 2 and "say what to purge" in res.output
    res = await env.cli("dlq", "purge", "--all", "--module", "locations", "--yes")
    assert res.exit_code == 2
    res = await env.cli("dlq", "purge", "--all", input="n\n")
    assert res.exit_code == 1 and len(await _dead(env)) == 2  # declined at the prompt
    res = await env.cli("dlq", "purge", "--reason", "OCPI 2001", "--key", "loc:FR:AB1:LOC2", "--yes")
    assert _summary(res) == {"selected": 1, "purged": 1}
    res = await env.cli("dlq", "purge", "--all", "--yes")
    assert _summary(res) == {"selected": 1, "purged": 1}
    assert await _dead(env) == []


async def test_status_reports_queues_dead_letters_and_link(env: Env) -> None:
    env.refuse.add("x")
    await env.put("LOC1", "x")
    await _wait_dead(env, 1)
    data: dict[str, Any] = {}

    async def published() -> bool:  # the link state is published on the lease loop's next round
        nonlocal data
        data = json.loads((await env.cli("status", "--json")).stdout)
        return bool(data["replicas"])

    await wait_until(published, 10, "a replica in relay status")
    assert data["modules"]["locations"]["dead"] == 1
    assert data["modules"]["locations"]["queued"] == 0
    assert [link["state"] for link in data["replicas"].values()] == ["up"]
