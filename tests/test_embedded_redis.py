"""The embedded server as the relay runs it (appendfsync always), and the ingress when it goes away.

Each test starts its own server in its own data directory, so stopping or killing it does not touch
the session server the other tests share.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import stat
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer

from relay.config import Settings
from relay.credentials import Registration, Registry, digest, registration_codec
from relay.embedded_redis import DataDirBusy, EmbeddedRedis, EmbeddedRedisFailed
from relay.events import decode
from relay.ingress import create_app
from relay.store import RegistrationStore, Store, connect
from relay.store import keys as K
from relay.typedefs import Health
from tests.conftest import AUTH, example, gireve_location
from tests.ocpi_peer import cli
from tests.waiting import wait_until

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


async def accept_some(client: Client, n: int, first: int = 0) -> dict[str, list[str]]:
    """n events per module (the session and CDR paths run Lua scripts), objects ``first`` on: their event ids by
    module (the same objects again would be duplicates, stored once)."""
    ids: dict[str, list[str]] = {"locations": [], "sessions": [], "cdrs": [], "tariffs": []}
    for i in range(first, first + n):
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
    with pytest.raises(EmbeddedRedisFailed, match=r"^embedded redis exited with 1: [^\n]*append-only dir[^\n]*$"):
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
    more = await accept_some(client, 1, first=5)
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


# --- the data directory: one relay at a time, nothing readable by others, no token in clear (issue 14) -------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _tree(top: Path) -> list[Path]:
    return [top, *top.rglob("*")]


def _aof_bytes(srv: EmbeddedRedis) -> bytes:
    return b"".join(p.read_bytes() for p in sorted((srv.dir / "appendonlydir").iterdir()) if p.is_file())


async def test_a_second_server_on_a_data_dir_in_use_is_refused_and_signals_nothing(
    server: EmbeddedRedis, data_dir: Path
) -> None:
    """Finding 8: a second start took the running server for a stale one and killed it."""
    assert server.proc is not None
    pid = server.proc.pid
    other = EmbeddedRedis(data_dir)
    busy = rf"^another relay is running on data dir {re.escape(str(server.dir))} \(pid {os.getpid()}\)$"
    with pytest.raises(DataDirBusy, match=busy):
        await other.start()
    await other.stop()  # harmless: it holds nothing
    assert server.proc is not None and server.proc.poll() is None and await server.answers()
    assert (data_dir / "redis.pid").read_text().strip() == str(pid)


async def test_the_lock_goes_with_the_relay_and_a_server_it_left_is_stale(data_dir: Path) -> None:
    first = EmbeddedRedis(data_dir)
    await first.start()
    await first.stop()
    second = EmbeddedRedis(data_dir)
    await second.start()  # the lock was let go
    # The relay holding the lock dies without taking its server along (no PDEATHSIG on that platform):
    left = second.proc
    assert left is not None
    second.unlock()
    second.proc = None
    third = EmbeddedRedis(data_dir)
    try:
        await third.start()  # the lock is free: the server found there is stale, and stopped
        assert left.wait(timeout=10) == 0 and third.proc is not None and await third.answers()
    finally:
        if left.stderr:
            left.stderr.close()
        await third.stop()


async def test_the_data_dir_and_everything_in_it_are_private(data_dir: Path) -> None:
    """Finding 9: the data directory was 755 and the AOF 644; an older version's files are tightened too."""
    srv = EmbeddedRedis(data_dir)
    await srv.start()
    await srv.stop()
    for path in _tree(data_dir):  # as an older version (umask 022) left them
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    await srv.start()
    try:
        client = aioredis.Redis.from_url(srv.url)  # the socket still works for the relay's own user
        try:
            assert await client.set("k", "v") and await client.get("k") == b"v"
        finally:
            await client.aclose()
        assert _mode(data_dir) == 0o700
        found = {p.name for p in _tree(data_dir)}
        assert {"appendonlydir", "redis.log", "redis.pid", "redis.sock", "relay.lock"} <= found, found
        assert any(name.endswith(".aof") for name in found), found
        for path in _tree(data_dir):
            if path.is_socket():
                assert _mode(path) & 0o077 == 0, path
            else:
                assert _mode(path) == (0o700 if path.is_dir() else 0o600), (path, oct(_mode(path)))
    finally:
        await srv.stop()


def _registration(incoming: str, outgoing: str) -> Registration:
    return Registration(state="registered", direction="from_iop", incoming_token=incoming, outgoing_token=outgoing,
                        versions_url="https://hub.example/ocpi/versions", version_url="https://hub.example/ocpi/2.2.1",
                        endpoints=[], registered_at=1.0, updated_at=1.0)  # fmt: skip


async def test_tokens_the_relay_only_compares_are_never_on_disk_in_clear(
    server: EmbeddedRedis, make_settings: Callable[..., Settings]
) -> None:
    """Finding 9: token A was in clear in the AOF (and the incoming token C with it)."""
    settings = make_settings(RELAY_REDIS_URL=server.url)
    store = Store(connect(server.url, settings.redis), settings.redis)
    try:
        registry = Registry(settings, RegistrationStore(store))
        token_a, token_c, hub_token = (f"{n}-{secrets.token_urlsafe(24)}" for n in ("A", "C", "B"))
        await registry.store.set_token_a(token_a)
        await registry.refresh()
        assert registry.role_of(token_a) == "token_a" and registry.role_of(token_c) is None
        await registry.save(_registration(token_c, hub_token))  # as a Register – FromIOP stores it
        assert registry.role_of(token_c) == "registered" and registry.role_of(hub_token) is None
        aof = _aof_bytes(server)  # appendfsync always: on disk once answered
        assert token_a.encode() not in aof and token_c.encode() not in aof
        assert digest(token_a).encode() in aof and digest(token_c).encode() in aof
        assert hub_token.encode() in aof  # the token the relay sends has to stay readable
    finally:
        await store.close()


async def test_clear_tokens_of_an_older_version_are_hashed_and_leave_the_aof(
    server: EmbeddedRedis, make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(RELAY_REDIS_URL=server.url)
    store = Store(connect(server.url, settings.redis), settings.redis)
    try:
        old_a, old_c, hub_token = (f"{n}-{secrets.token_urlsafe(24)}" for n in ("A", "C", "B"))
        await store.redis.set(K.TOKEN_A_KEY, old_a)  # as an older version stored them
        await store.redis.set(K.REGISTRATION_KEY, registration_codec[0].encode(_registration(old_c, hub_token)))
        registry = Registry(settings, RegistrationStore(store))
        await registry.refresh()
        assert registry.role_of(old_c) == "registered" and registry.role_of(old_a) == "token_a"  # before, too
        assert await registry.hash_stored_tokens() is True
        assert await store.redis.get(K.TOKEN_A_KEY) == digest(old_a).encode()
        reg = registry.registration
        assert reg is not None and (reg.incoming_token, reg.outgoing_token) == (digest(old_c), hub_token)
        assert registry.role_of(old_c) == "registered" and registry.role_of(old_a) == "token_a"
        assert await registry.hash_stored_tokens() is False  # once

        def rewritten() -> bool:  # the server rewrote its AOF: the clear values are gone from the disk
            aof = _aof_bytes(server)
            return old_a.encode() not in aof and old_c.encode() not in aof

        await wait_until(rewritten, 15, "the AOF rewrite")
    finally:
        await store.close()


async def test_register_from_iop_shows_token_a_once_and_keeps_only_its_digest(
    make_settings: Callable[..., Settings], redis_url: str
) -> None:
    res = await cli(make_settings(), "register", "--from-iop", RELAY_OCPI_PUBLIC_URL="https://ocpi.cpo.example/ocpi")
    assert res.exit_code == 0, res.output
    [token] = [line.split(":", 1)[1].strip() for line in res.stdout.splitlines() if line.startswith("token A:")]
    assert "cannot be read back" in res.stdout
    client = aioredis.Redis.from_url(redis_url)
    try:
        assert await client.get(K.TOKEN_A_KEY) == digest(token).encode()
    finally:
        await client.aclose()
