"""Lifecycle of ``relay serve`` as a real process: start, readiness, graceful SIGTERM, crash, restart.

The relay runs as ``python -m relay serve`` with the shipped config and its own embedded server in a
temporary data directory, exactly as the README's first command runs it.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from relay.embedded_redis import EmbeddedRedis
from tests.conftest import REPO, gireve_location
from tests.waiting import wait_until

SHIPPED = REPO / "config" / "relay.toml"
SECRET = "svc-T0ken-never-logged-7f3a"
LOC_PATH = "/ingress/2.2.1/locations/FR/AB1/LOC1"
START_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def servers_on(data_dir: Path) -> list[int]:
    """Pids of live processes whose command line names this data directory's socket."""
    needle = str((data_dir / "redis.sock").resolve()).encode()
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with suppress(OSError):
                if needle in (proc / "cmdline").read_bytes() and alive(int(proc.name)):
                    pids.append(int(proc.name))
    return pids


@dataclass
class Served:
    """One ``relay serve`` process."""

    data_dir: Path
    port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, config: Path = SHIPPED, **extra_env: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        env.update(
            RELAY_STORAGE_DIR=str(self.data_dir),
            RELAY_REDIS_URL="",
            RELAY_INGRESS_LISTEN=f"127.0.0.1:{self.port}",
            RELAY_OCPI_LISTEN="127.0.0.1:0",
            RELAY_INGRESS_TOKEN=SECRET,
            RELAY_FORWARDER_ENABLED="false",
        )
        env.update(extra_env)
        self.env = env
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "relay", "serve", "--config", str(config)],
                env=env,
                cwd=self.data_dir.parent,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )

    async def ready(self, http: aiohttp.ClientSession) -> None:
        async def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"relay exited with {self.proc.returncode}:\n{self.log()}")
            with suppress(aiohttp.ClientError):
                async with http.get(f"{self.base}/readyz") as resp:
                    return resp.status == 200
            return False

        await wait_until(up, START_TIMEOUT_S, lambda: f"relay ready; its log:\n{self.log()}")

    async def wait_exit(self, timeout_s: float) -> int:
        assert self.proc is not None
        proc = self.proc
        await wait_until(lambda: proc.poll() is not None, timeout_s, "the relay to exit")
        return proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log().splitlines():
            with suppress(ValueError):
                doc = json.loads(line)
                if isinstance(doc, dict):
                    out.append(doc)
        return out

    def stop_now(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def served() -> Iterator[Served]:
    top = Path(tempfile.mkdtemp(prefix="relay-s-", dir="/tmp"))  # short: unix socket paths are limited
    srv = Served(data_dir=top / "data", port=free_port(), log_path=top / "relay.log")
    yield srv
    srv.stop_now()
    for pid in servers_on(srv.data_dir):  # never leave a server behind, even when a test failed
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(top, ignore_errors=True)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {SECRET}"}) as session:
        yield session


async def peek(srv: Served, module: str) -> str:
    """``relay peek`` on the data directory of a stopped relay: its server started here, as a restart would."""
    server = EmbeddedRedis(srv.data_dir)
    await server.start()
    try:
        out = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "relay", "peek", module, "--count", "100", "--config", str(SHIPPED)],
            env={**srv.env, "RELAY_LOG_LEVEL": "warning"},
            cwd=srv.data_dir.parent,
            capture_output=True,
            timeout=60,
            check=False,
        )
    finally:
        await server.stop()
    assert out.returncode == 0, out.stderr.decode()
    return out.stdout.decode()


async def held_request(port: int, body: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A PUT whose headers the server has routed (it answered 100 Continue) and whose body is not sent yet."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (
        f"PUT {LOC_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {SECRET}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n"
    )
    writer.write(head.encode())
    await writer.drain()
    line = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert line.startswith(b"HTTP/1.1 100"), line
    return reader, writer


async def finish(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: bytes) -> tuple[int, Any]:
    writer.write(body)
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 15)
    status = int(head.split(b" ", 2)[1])
    length = next(int(h.split(b":", 1)[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:"))
    payload = json.loads(await reader.readexactly(length))
    await close(writer)
    return status, payload


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with suppress(OSError):
        await writer.wait_closed()


def _refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            return False
    except OSError:
        return True


async def wait_for_refused(port: int, timeout_s: float = 10) -> None:
    """Until a new connection to the port is refused (the listener is closed)."""
    await wait_until(lambda: asyncio.to_thread(_refused, port), timeout_s, "the listener closed after SIGTERM")


# --- the tests ---------------------------------------------------------------------------------------------------


def unread_bytes(server_port: int, client_ports: set[int]) -> int | None:
    """Bytes the server has not read yet on its side of these loopback connections (/proc/net/tcp rx_queue)."""
    total, seen = 0, set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        cols = line.split()
        local, remote = int(cols[1].split(":")[1], 16), int(cols[2].split(":")[1], 16)
        if local == server_port and remote in client_ports:
            total += int(cols[4].split(":")[1], 16)
            seen.add(remote)
    return total if seen == client_ports else None


def event_ids_of(listing: str) -> list[str]:
    return [line.split("event_id=")[1] for line in listing.splitlines() if "event_id=" in line]


async def test_serve_accepts_then_stops_gracefully_on_sigterm(served: Served, http: aiohttp.ClientSession) -> None:
    served.start()
    await served.ready(http)
    assert served.proc is not None
    redis_pid = int((served.data_dir / "redis.pid").read_text())
    assert alive(redis_pid)

    body = (REPO / "examples" / "location.json").read_bytes()
    async with http.put(f"{served.base}{LOC_PATH}", data=body) as resp:
        answer = await resp.json()
        assert resp.status == 202, answer
    event_ids = [answer["data"]["event_id"]]
    # a refused request must not leak the (wrong) token it carried either
    async with http.put(f"{served.base}{LOC_PATH}", data=body, headers={"Authorization": f"Token {SECRET}-x"}) as r:
        assert r.status == 401

    # Requests in flight: Redis is paused, so their handlers sit in the Redis write when SIGTERM comes.
    bodies = [json.dumps(gireve_location(last_updated=f"2024-01-0{i + 1}T00:00:00Z")).encode() for i in range(3)]
    held = [await held_request(served.port, b) for b in bodies]
    os.kill(redis_pid, signal.SIGSTOP)
    try:
        for (_, writer), b in zip(held, bodies, strict=True):
            writer.write(b)
            await writer.drain()
        # Once the relay has read every body, each handler has all it needs: it validates and then waits
        # for the paused Redis, so it is in flight when SIGTERM comes.
        ports = {writer.get_extra_info("sockname")[1] for _, writer in held}
        await wait_until(lambda: unread_bytes(served.port, ports) == 0, 10, "the relay to read the bodies")
        served.proc.send_signal(signal.SIGTERM)
        # it stops accepting new connections while the in-flight requests are still open
        await wait_for_refused(served.port)
        assert served.proc.poll() is None  # still finishing the in-flight requests
    finally:
        os.kill(redis_pid, signal.SIGCONT)

    for reader, writer in held:
        status, payload = await finish(reader, writer, b"")
        assert status == 202, payload
        event_ids.append(payload["data"]["event_id"])

    assert await served.wait_exit(15) == 0, served.log()
    await wait_until(lambda: not alive(redis_pid), 10, "the embedded server to exit")
    assert servers_on(served.data_dir) == []

    events = served.log_events()
    started = [e for e in events if e.get("event") == "relay_started"]
    assert len(started) == 1, served.log()
    assert started[0]["ingress"] == f"http://127.0.0.1:{served.port}/ingress/2.2.1"
    assert [e.get("returncode") for e in events if e.get("event") == "embedded_redis_stopped"] == [0]
    assert [e for e in events if e.get("event") == "relay_stopped"]
    assert SECRET not in served.log()

    # a fresh start on the same directory still has every accepted event
    listing = await peek(served, "locations")
    assert event_ids_of(listing)[0] == event_ids[0]
    assert sorted(event_ids_of(listing)) == sorted(event_ids)
    assert all("key=loc:FR:AB1:LOC1" in line for line in listing.splitlines() if "event_id=" in line)


async def test_sigterm_during_a_body_upload_never_acks_without_storing(
    served: Served, http: aiohttp.ClientSession
) -> None:
    """A request whose body is still arriving at SIGTERM gets either a 202 with its event stored, or no answer."""
    served.start(RELAY_INGRESS_SHUTDOWN_TIMEOUT_S="1")
    await served.ready(http)
    assert served.proc is not None
    body = json.dumps(gireve_location()).encode()
    reader, writer = await held_request(served.port, body)
    writer.write(body[:100])
    await writer.drain()
    served.proc.send_signal(signal.SIGTERM)
    await wait_for_refused(served.port)  # the relay is shutting down; the rest of the body comes after
    try:
        writer.write(body[100:])
        await writer.drain()
        status, payload = await finish(reader, writer, b"")
    except (OSError, asyncio.IncompleteReadError):
        status, payload = 0, None
        await close(writer)
    assert await served.wait_exit(15) == 0, served.log()
    stored = event_ids_of(await peek(served, "locations"))
    if status == 202:
        assert stored == [payload["data"]["event_id"]]
    else:
        assert status == 0 and stored == []


async def test_kill_9_of_the_relay_loses_nothing_and_takes_its_server_down(
    served: Served, http: aiohttp.ClientSession
) -> None:
    served.start()
    await served.ready(http)
    redis_pid = int((served.data_dir / "redis.pid").read_text())
    event_ids = []
    for i in range(5):
        doc = gireve_location(f"K{i}")
        async with http.put(f"{served.base}/ingress/2.2.1/locations/FR/AB1/K{i}", json=doc) as resp:
            assert resp.status == 202
            event_ids.append((await resp.json())["data"]["event_id"])
    assert served.proc is not None
    served.proc.kill()
    served.proc.wait(timeout=10)
    await wait_until(lambda: not alive(redis_pid), 10, "the orphaned embedded server to exit")

    served.start()  # same directory: the stale pidfile and socket must not get in the way
    await served.ready(http)
    async with http.get(f"{served.base}/readyz") as resp:
        assert (await resp.json())["persistence"] == {"appendonly": "yes", "appendfsync": "always"}
    served.proc.send_signal(signal.SIGTERM)
    assert await served.wait_exit(15) == 0, served.log()
    assert sorted(event_ids_of(await peek(served, "locations"))) == sorted(event_ids)
    assert len([e for e in served.log_events() if e.get("event") == "relay_started"]) == 2  # one per start


async def test_serve_without_token_exits_2_before_starting_anything(served: Served) -> None:
    served.start(RELAY_INGRESS_TOKEN="")
    assert await served.wait_exit(20) == 2
    assert "ingress.token" in served.log()
    assert not (served.data_dir / "redis.sock").exists()


async def test_listen_port_taken_fails_and_leaves_no_server(served: Served) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", served.port))
        blocker.listen()
        served.start()
        code = await served.wait_exit(30)
    assert code != 0
    assert servers_on(served.data_dir) == []
    assert SECRET not in served.log()


def test_serve_tunes_the_cyclic_gc_for_a_large_live_heap(monkeypatch: pytest.MonkeyPatch) -> None:
    # bench/forward.py: with the default gen0 threshold the collector took ~28 % of the CPU per
    # delivered event while a backlog kept thousands of key runners alive.
    import gc

    from click.testing import CliRunner

    from relay import cli, logs, service

    ran: list[tuple[tuple[int, int, int], int]] = []

    async def fake_run(self: Any) -> None:
        ran.append((gc.get_threshold(), gc.get_freeze_count()))

    before = gc.get_threshold()
    monkeypatch.setattr(service.Relay, "run", fake_run)
    monkeypatch.setattr(logs, "configure_logging", lambda *a, **k: None)  # keep the suite's logging
    try:
        result = CliRunner().invoke(
            cli.main, ["serve", "--config", str(REPO / "config" / "relay.toml")], env={"RELAY_INGRESS_TOKEN": "t0ken-x"}
        )
        assert result.exit_code == 0, result.output
        [(threshold, frozen)] = ran
        assert threshold == service.GC_THRESHOLDS and frozen > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


# --- one relay per data directory, its server watched, found from anywhere, clear failures (issue 14) ----------

Completed = subprocess.CompletedProcess[str]


def relay_cli(args: list[str], env: dict[str, str], cwd: Path, timeout_s: float = 60) -> Completed:
    return subprocess.run(
        [sys.executable, "-m", "relay", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout_s,
        check=False,
    )  # fmt: skip


def not_logs(stderr: str) -> list[str]:
    """The lines of stderr that are not JSON log lines: what the command itself says."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith("{")]


async def test_a_second_serve_on_the_same_data_dir_refuses_and_signals_nothing(
    served: Served, http: aiohttp.ClientSession
) -> None:
    """Finding 8: the second relay took the first one's server for a stale one and killed it."""
    served.start()
    await served.ready(http)
    assert served.proc is not None
    redis_pid = int((served.data_dir / "redis.pid").read_text())
    env = {**served.env, "RELAY_INGRESS_LISTEN": f"127.0.0.1:{free_port()}"}
    second = await asyncio.to_thread(relay_cli, ["serve", "--config", str(SHIPPED)], env, served.data_dir.parent, 30)
    assert second.returncode == 1, second.stderr
    assert not_logs(second.stderr) == [
        f"cannot start: another relay is running on data dir {served.data_dir.resolve()} (pid {served.proc.pid})"
    ]
    assert servers_on(served.data_dir) == [redis_pid]  # the first relay's server, untouched
    async with http.put(f"{served.base}{LOC_PATH}", data=(REPO / "examples" / "location.json").read_bytes()) as r:
        assert r.status == 202, await r.text()
    async with http.get(f"{served.base}/healthz") as r:
        assert r.status == 200


async def test_the_relay_restarts_its_embedded_server_when_it_dies(served: Served, http: aiohttp.ClientSession) -> None:
    """Finding 8: a relay whose server had gone answered /healthz 200 and never stored anything again."""
    served.start()
    await served.ready(http)
    body = (REPO / "examples" / "location.json").read_bytes()
    ids = []
    async with http.put(f"{served.base}{LOC_PATH}", data=body) as r:
        ids.append((await r.json())["data"]["event_id"])
    redis_pid = int((served.data_dir / "redis.pid").read_text())
    os.kill(redis_pid, signal.SIGKILL)

    def restarted() -> bool:
        with suppress(OSError, ValueError):
            pid = int((served.data_dir / "redis.pid").read_text())
            return pid != redis_pid and alive(pid)
        return False

    await wait_until(restarted, 15, lambda: f"a new embedded server; the log:\n{served.log()}")
    await served.ready(http)
    changed = json.loads(body)
    changed["name"] = f"{changed.get('name', '')} (renamed)"  # an identical resend would not be stored again
    async with http.put(f"{served.base}{LOC_PATH}", json=changed) as r:
        assert r.status == 202, await r.text()
        ids.append((await r.json())["data"]["event_id"])
    async with http.get(f"{served.base}/healthz") as r:
        assert r.status == 200
    events = [e.get("event") for e in served.log_events()]
    assert "embedded_redis_exited" in events and "embedded_redis_restarted" in events
    assert served.proc is not None
    served.proc.send_signal(signal.SIGTERM)
    assert await served.wait_exit(15) == 0, served.log()
    assert sorted(event_ids_of(await peek(served, "locations"))) == sorted(ids)  # the AOF kept the first one


async def test_the_relay_exits_3_when_its_embedded_server_cannot_be_restarted(
    served: Served, http: aiohttp.ClientSession
) -> None:
    """Finding 8: never /healthz 200 while it cannot store; a bounded number of restarts, then exit 3."""
    served.start()
    await served.ready(http)
    redis_pid = int((served.data_dir / "redis.pid").read_text())
    aof = served.data_dir / "appendonlydir"
    aof.rename(served.data_dir / "appendonlydir.moved")
    aof.write_text("a file where the server needs its AOF directory")
    os.kill(redis_pid, signal.SIGKILL)

    async def healthz_down() -> bool:
        with suppress(aiohttp.ClientError):
            async with http.get(f"{served.base}/healthz") as r:
                return r.status == 503 and (await r.json())["status"] == "storage_down"
        return False

    await wait_until(healthz_down, 10, "/healthz 503 while the embedded server is down")
    assert await served.wait_exit(60) == 3, served.log()
    assert not_logs(served.log())[-1].startswith("stopped: the embedded server kept stopping"), served.log()
    assert "Traceback" not in served.log()
    assert servers_on(served.data_dir) == []


async def test_cli_verbs_find_the_running_relay_from_any_directory(served: Served, http: aiohttp.ClientSession) -> None:
    """Finding 8: run from another directory, `relay peek` started an empty server there and showed nothing."""
    config = served.data_dir.parent / "relay.toml"
    config.write_text(SHIPPED.read_text())
    served.start(config=config, RELAY_STORAGE_DIR="data")  # relative: to the config file's directory
    await served.ready(http)
    async with http.put(f"{served.base}{LOC_PATH}", data=(REPO / "examples" / "location.json").read_bytes()) as r:
        event_id = (await r.json())["data"]["event_id"]
    elsewhere = served.data_dir.parent / "elsewhere"
    elsewhere.mkdir()
    env = {**served.env, "RELAY_LOG_LEVEL": "warning"}
    out = await asyncio.to_thread(relay_cli, ["peek", "locations", "--config", str(config)], env, elsewhere)
    assert out.returncode == 0, out.stderr
    assert event_ids_of(out.stdout) == [event_id]
    assert list(elsewhere.iterdir()) == []  # no server, no data directory of its own


def test_cli_verbs_without_a_running_relay_say_so_and_start_nothing(tmp_path: Path) -> None:
    """Finding 8: with no relay running, a CLI verb started an empty server and reported 0 queued."""
    top = Path(tempfile.mkdtemp(prefix="relay-c-", dir="/tmp"))  # short: unix socket paths are limited
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        env.update(RELAY_STORAGE_DIR=str(top / "data"), RELAY_LOG_LEVEL="warning")
        for args in (["peek", "locations"], ["status"], ["dlq", "list"]):
            out = relay_cli([*args, "--config", str(SHIPPED)], env, top)
            assert out.returncode == 3, (args, out.stdout, out.stderr)
            [line] = not_logs(out.stderr)
            assert line.startswith(f"no relay is running on data dir {(top / 'data').resolve()} "), line
            assert not (top / "data" / "appendonlydir").exists() and servers_on(top / "data") == []
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_serve_and_cli_with_redis_unreachable_say_so_in_one_line_and_exit_3(served: Served) -> None:
    """Finding 9: `relay serve` with an unreachable Redis printed a traceback (or blamed the listen addresses)."""
    port = free_port()  # nothing listens there
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env.update(RELAY_REDIS_URL=f"redis://:pa55-s3cret@127.0.0.1:{port}/0", RELAY_INGRESS_TOKEN=SECRET,
               RELAY_INGRESS_LISTEN="127.0.0.1:0", RELAY_OCPI_LISTEN="127.0.0.1:0",
               RELAY_LOG_LEVEL="warning")  # fmt: skip
    for args in (["serve"], ["status"], ["peek", "locations"]):
        out = relay_cli([*args, "--config", str(SHIPPED)], env, REPO, 60)
        assert out.returncode == 3, (args, out.stderr)
        [line] = not_logs(out.stderr)
        prefix = "cannot start: Redis unreachable" if args == ["serve"] else "Redis unreachable"
        assert line.startswith(f"{prefix} (redis.url redis://:[redacted]@127.0.0.1:{port}/0): "), line
        assert "pa55-s3cret" not in out.stderr + out.stdout

    # The embedded server failing to start (here: a file where its AOF directory goes) is the same failure.
    served.data_dir.mkdir(parents=True)
    (served.data_dir / "appendonlydir").write_text("not a directory")
    env.update(RELAY_REDIS_URL="", RELAY_STORAGE_DIR=str(served.data_dir))
    out = relay_cli(["serve", "--config", str(SHIPPED)], env, REPO, 60)
    assert out.returncode == 3, out.stderr
    [line] = not_logs(out.stderr)
    where = f"embedded server of data dir {served.data_dir.resolve()}"
    assert line.startswith(f"cannot start: Redis unreachable ({where}): embedded redis exited with 1: "), line
    assert "append-only dir" in line and "Traceback" not in out.stderr
