"""The embedded server as the relay runs it (appendfsync always), and the ingress when it goes away.

Each test starts its own server in its own data directory, so stopping or killing it does not touch
the session server the other tests share.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer

from relay.config import Settings
from relay.embedded_redis import EmbeddedRedis
from relay.events import decode
from relay.ingress import create_app
from relay.store import Store, connect
from relay.typedefs import Health
from tests.conftest import AUTH, example, gireve_location

P = "/ingress/2.2.1"
STAMP = "2024-06-01T12:00:00Z"
Client = TestClient[Any, Any]


def enc(doc: Any) -> bytes:
    return json.dumps(doc).encode()


@pytest.fixture
async def data_dir() -> AsyncIterator[Path]:
    # Short path: unix socket paths are limited to ~107 bytes, pytest's tmp_path can be longer.
    d = Path(tempfile.mkdtemp(prefix="relay-e-", dir="/tmp"))
    yield d / "data"
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
async def server(data_dir: Path) -> AsyncIterator[EmbeddedRedis]:
    srv = EmbeddedRedis(data_dir, fsync="always")
    await srv.start()
    yield srv
    await srv.stop()


@pytest.fixture
async def relay_on(
    server: EmbeddedRedis, make_settings: Callable[..., Settings]
) -> AsyncIterator[tuple[Client, Store]]:
    """An ingress whose store talks to this test's own server."""
    settings = make_settings(RELAY_REDIS_URL=server.url, RELAY_REDIS_SOCKET_TIMEOUT_S="2")
    store = Store(connect(settings.redis.url, settings.redis), settings.redis)
    await store.load_scripts()
    await store.ensure_groups()
    client: Client = TestClient(TestServer(create_app(settings, store, Health(listeners_up=True))))
    await client.start_server()
    yield client, store
    await client.close()
    await store.close()


def kill_hard(srv: EmbeddedRedis) -> None:
    """SIGKILL the server process: no AOF flush at exit, no pidfile or socket clean-up."""
    proc = srv.proc
    assert proc is not None
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    if proc.stderr:
        proc.stderr.close()
    srv.proc = None


async def accept_some(client: Client, n: int) -> dict[str, list[str]]:
    """n events per module (the session and CDR paths run Lua scripts): their event ids by module."""
    ids: dict[str, list[str]] = {"locations": [], "sessions": [], "cdrs": [], "tariffs": []}
    for i in range(n):
        for module, method, path, doc in [
            ("locations", "PUT", f"locations/FR/AB1/L{i}", gireve_location(f"L{i}")),
            (
                "sessions",
                "PUT",
                f"sessions/FR/AB1/S{i}",
                example("session_example_2_short_finished.json", country_code="FR", party_id="AB1", id=f"S{i}"),
            ),
            (
                "cdrs",
                "POST",
                "cdrs",
                example("cdr_example.json", country_code="FR", party_id="AB1", id=f"C{i}", session_id=f"S{i}"),
            ),
            (
                "tariffs",
                "PUT",
                f"tariffs/FR/AB1/T{i}",
                example(
                    "tariff_1_simple_2hour.json", country_code="FR", party_id="AB1", id=f"T{i}", start_date_time=STAMP
                ),
            ),
        ]:
            resp = await client.request(method, f"{P}/{path}", data=enc(doc), headers=AUTH)
            body = await resp.json()
            assert resp.status == 202, body
            ids[module].append(body["data"]["event_id"])
    return ids


async def stored_ids(url: str, shards: int = 4) -> dict[str, list[str]]:
    """Event ids in every module's streams, read with a fresh client."""
    client = Store(connect(url, Settings().redis), Settings().redis)
    try:
        out: dict[str, list[str]] = {}
        for module in ("locations", "sessions", "cdrs", "tariffs"):
            out[module] = sorted(decode(raw).id for _, raw in await client.peek(module, 100_000))
        return out
    finally:
        await client.close()


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def sorted_ids(ids: dict[str, list[str]]) -> dict[str, list[str]]:
    return {m: sorted(v) for m, v in ids.items()}


# --- the server itself ---------------------------------------------------------------------------------------


async def test_embedded_server_is_persistent_and_socket_only(server: EmbeddedRedis, data_dir: Path) -> None:
    client = aioredis.Redis.from_url(server.url)
    try:
        raw: dict[Any, Any] = await client.config_get("*")
        conf = {_s(k): _s(v) for k, v in raw.items()}
        assert (conf["appendonly"], conf["appendfsync"], conf["port"]) == ("yes", "always", "0")
        assert conf["maxmemory-policy"] == "noeviction"
        assert conf["dir"] == str(server.dir)  # the resolved data directory
        info: dict[str, Any] = await client.info("server")
        assert str(info.get("valkey_version") or info["redis_version"]).split(".")[0].isdigit()
    finally:
        await client.aclose()
    assert server.socket.is_socket()
    assert (data_dir / "redis.pid").read_text().strip() == str(server.proc.pid if server.proc else "")


async def test_stop_is_clean_and_idempotent(data_dir: Path) -> None:
    srv = EmbeddedRedis(data_dir, fsync="always")
    await srv.start()
    proc = srv.proc
    assert proc is not None
    await srv.stop()
    assert proc.returncode == 0  # SIGTERM: the server flushed its AOF and exited on its own
    assert not (data_dir / "redis.pid").exists()
    await srv.stop()  # a second stop is harmless


def _block_aof_dir(data_dir: Path) -> None:
    data_dir.mkdir(parents=True)
    (data_dir / "appendonlydir").write_text("a file where the server needs a directory")


async def test_start_reports_a_server_that_cannot_start(data_dir: Path) -> None:
    _block_aof_dir(data_dir)
    srv = EmbeddedRedis(data_dir)
    with pytest.raises(RuntimeError, match=r"(?s)embedded redis exited with 1: .*append-only dir"):
        await srv.start(timeout_s=10)
    await srv.stop()


# --- Redis down: 503 and nothing stored; restart keeps what was accepted -------------------------------------


async def test_redis_down_is_503_with_retry_after_and_restart_keeps_events(
    server: EmbeddedRedis, relay_on: tuple[Client, Store]
) -> None:
    client, store = relay_on
    accepted = await accept_some(client, 5)
    await server.stop()

    refused: list[tuple[str, str, Any]] = [
        ("PUT", "locations/FR/AB1/LX", gireve_location("LX")),
        (
            "PUT",
            "sessions/FR/AB1/SX",
            example("session_example_2_short_finished.json", country_code="FR", party_id="AB1", id="SX"),
        ),
        ("PATCH", "locations/FR/AB1/L0/3256", {"status": "CHARGING", "last_updated": STAMP}),
    ]
    for method, path, doc in refused:
        resp = await client.request(method, f"{P}/{path}", data=enc(doc), headers=AUTH)
        body = await resp.json()
        assert resp.status == 503, body
        assert int(resp.headers["Retry-After"]) >= 1
        assert body["status_code"] == 3000
    batch = {"operations": [{"method": m, "path": p, "body": d} for m, p, d in refused]}
    resp = await client.post(f"{P}/batch", data=enc(batch), headers=AUTH)
    assert resp.status == 503, await resp.text()
    assert "Retry-After" in resp.headers
    # bad input is still answered as bad input, not as an outage
    resp = await client.put(f"{P}/locations/FR/AB1/L1", data=b"{", headers=AUTH)
    assert resp.status == 400
    resp = await client.get("/readyz")
    assert resp.status == 503
    assert (await resp.json())["redis"] == "unreachable"

    await server.start()
    assert await stored_ids(server.url) == sorted_ids(accepted)  # all accepted, nothing of the refused
    # the same store works again, Lua scripts included (the restarted server lost its script cache)
    more = await accept_some(client, 1)
    after = await stored_ids(server.url)
    for module, ids in more.items():
        assert set(ids) <= set(after[module])
        assert len(after[module]) == len(accepted[module]) + 1
    resp = await client.get("/readyz")
    assert resp.status == 200


async def test_sigkill_after_accepts_loses_nothing(server: EmbeddedRedis, relay_on: tuple[Client, Store]) -> None:
    """appendfsync always: a 202 means on disk, so even a SIGKILL of the server keeps every accepted event."""
    client, _ = relay_on
    accepted = await accept_some(client, 10)
    # and a batch, whose events are pipelined together
    ops = [
        {"method": "PATCH", "path": "locations/FR/AB1/L0/3256", "body": {"status": s, "last_updated": STAMP}}
        for s in ["CHARGING", "AVAILABLE"] * 25
    ]
    resp = await client.post(f"{P}/batch", data=enc({"operations": ops}), headers=AUTH)
    answer = await resp.json()
    assert answer["data"]["accepted"] == 50, answer
    accepted["locations"] += [r["event_id"] for r in answer["data"]["results"]]

    kill_hard(server)
    assert (server.dir / "redis.pid").exists()  # left behind by the killed server
    await server.start()  # a stale pidfile (and socket) must not stop the restart
    assert await stored_ids(server.url) == sorted_ids(accepted)


async def test_restart_after_sigkill_keeps_stream_order(server: EmbeddedRedis, relay_on: tuple[Client, Store]) -> None:
    client, store = relay_on
    statuses = ["CHARGING", "AVAILABLE", "BLOCKED", "OUTOFORDER"] * 10
    for i, status in enumerate(statuses):
        resp = await client.patch(
            f"{P}/locations/FR/AB1/LOC1/3256",
            data=enc({"status": status, "last_updated": STAMP}),
            headers={**AUTH, "X-Correlation-ID": f"c{i}"},
        )
        assert resp.status == 202
    kill_hard(server)
    await server.start()
    rows = await stored_ids(server.url)
    assert len(rows["locations"]) == len(statuses)
    fresh = Store(connect(server.url, store.settings), store.settings)
    try:
        evs = [decode(raw) for _, raw in await fresh.peek("locations", 1000)]
    finally:
        await fresh.close()
    assert [ev.correlation_id for ev in evs] == [f"c{i}" for i in range(len(statuses))]
