"""Both listeners' connection limits (relay.listeners), on real sockets on loopback.

Issue 14, finding 1: connections that send nothing, or half a header, stayed open for ever on the
OCPI port; once they had taken the process's file descriptors, the ingress (PUT, /healthz, /readyz)
could not accept the CSMS and asyncio logged every failed accept. The in-process tests run a real
``Relay`` with small timeouts; the saturation tests run ``relay serve`` in a process of its own
with a low RLIMIT_NOFILE, as the finding did.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import resource
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import trustme
from prometheus_client import REGISTRY

from relay.config import Settings
from relay.listeners import Guard, Limits, LogRate, fd_reserve, ocpi_connection_budget
from tests.conftest import REPO, gireve_location
from tests.ocpi_peer import captured_logs, running
from tests.waiting import stays_false, wait_until

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def closed_total(listener: str, reason: str) -> float:
    labels = {"listener": listener, "reason": reason}
    return REGISTRY.get_sample_value("relay_connections_closed_total", labels) or 0.0


async def connect(port: int, source: str = "127.0.0.1", ctx: ssl.SSLContext | None = None) -> Conn:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0), ssl=ctx)


async def server_closed(conn: Conn, timeout: float) -> bytes:
    """Wait until the server closes the connection; what it sent before (b"": closed without a word)."""
    try:
        return await asyncio.wait_for(conn[0].read(), timeout)
    except (ConnectionResetError, ssl.SSLError):
        return b""


async def status_of(conn: Conn, path: bytes) -> int:
    """One keep-alive GET on the connection; the answer's status (its body read and dropped)."""
    reader, writer = conn
    writer.write(b"GET " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = next(int(h.split(b":", 1)[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:"))
    await reader.readexactly(length)
    return int(head.split(b" ", 2)[1])


def close_all(conns: list[Conn]) -> None:
    for _, writer in conns:
        writer.transport.abort()


async def trickle(writer: asyncio.StreamWriter, every_s: float) -> None:
    """A header line sent one byte at a time, for ever: progress that never ends (slowloris)."""
    with suppress(ConnectionError, OSError):
        writer.write(b"X-Slow: ")
        while True:
            await asyncio.sleep(every_s)
            writer.write(b"a")
            await writer.drain()


# -- header and idle timeouts ----------------------------------------------------------------------------


@pytest.mark.parametrize("listener", ["ingress", "ocpi"])
async def test_silent_and_half_sent_headers_are_closed_after_the_header_timeout(
    make_settings: Callable[..., Settings], listener: str
) -> None:
    settings = make_settings(**{f"RELAY_{listener.upper()}_HEADER_TIMEOUT_S": "0.5"})
    before = closed_total(listener, "header_timeout")
    async with running(settings) as relay:
        port = relay.ingress_port if listener == "ingress" else relay.ocpi_port
        assert port is not None
        started = time.monotonic()
        silent, half = await connect(port), await connect(port)
        half[1].write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        slow = asyncio.create_task(trickle(half[1], 0.05))  # a byte every 50 ms: never idle, never done
        try:
            await wait_for_count(relay.guards[listener], 2)
            for conn in (silent, half):
                assert await server_closed(conn, 5) == b""  # closed, no answer
            took = time.monotonic() - started
        finally:
            slow.cancel()
            close_all([silent, half])
        assert 0.45 <= took < 3, took
        await wait_until(lambda: relay.guards[listener].open == 0, 5, "the guard to count both gone")
    assert closed_total(listener, "header_timeout") - before == 2


async def wait_for_count(guard: Guard, n: int) -> None:
    await wait_until(lambda: guard.open == n, 5, f"{n} connections counted")


async def test_keep_alive_connection_outlives_the_header_timeout_then_idles_out(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(RELAY_OCPI_HEADER_TIMEOUT_S="0.3", RELAY_OCPI_IDLE_TIMEOUT_S="1.0")
    before = closed_total("ocpi", "idle_timeout"), closed_total("ocpi", "header_timeout")
    async with running(settings) as relay:
        assert relay.ocpi_port is not None
        conn = await connect(relay.ocpi_port)
        try:
            assert await status_of(conn, b"/ocpi/versions") == 401  # no token; answered, kept alive
            await stays_false(conn[0].at_eof, 0.6)  # past header_timeout_s: its headers came in time
            assert await status_of(conn, b"/ocpi/versions") == 401  # the same connection serves again
            answered = time.monotonic()
            await wait_until(conn[0].at_eof, 5, "the idle connection closed")
            idle = time.monotonic() - answered
        finally:
            close_all([conn])
        assert 0.9 <= idle < 3, idle
    assert closed_total("ocpi", "idle_timeout") - before[0] == 1
    assert closed_total("ocpi", "header_timeout") - before[1] == 0


# -- caps ------------------------------------------------------------------------------------------------


async def test_per_ip_cap_refuses_the_extra_connection(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(RELAY_OCPI_MAX_CONNECTIONS_PER_IP="2")
    before = closed_total("ocpi", "max_connections_per_ip")
    async with running(settings) as relay:
        port, guard = relay.ocpi_port, relay.guards["ocpi"]
        assert port is not None
        held = [await connect(port), await connect(port)]
        try:
            await wait_until(lambda: guard.per_ip.get("127.0.0.1") == 2, 5, "two connections from 127.0.0.1")
            extra = await connect(port)
            held.append(extra)
            assert await server_closed(extra, 2) == b""  # closed at once, nothing read nor answered
            other = await connect(port, source="127.0.0.2")  # another address has its own allowance
            held.append(other)
            for conn in (held[0], held[1], other):
                assert await status_of(conn, b"/ocpi/versions") == 401
            close_all(held[:1])
            await wait_until(lambda: guard.per_ip.get("127.0.0.1") == 1, 5, "a slot of 127.0.0.1 freed")
            again = await connect(port)
            held.append(again)
            assert await status_of(again, b"/ocpi/versions") == 401
        finally:
            close_all(held)
        await wait_until(lambda: guard.open == 0 and not guard.per_ip, 5, "every connection released")
    assert closed_total("ocpi", "max_connections_per_ip") - before == 1


async def test_at_max_connections_new_connections_wait_until_one_closes(
    make_settings: Callable[..., Settings],
) -> None:
    settings = make_settings(RELAY_INGRESS_MAX_CONNECTIONS="3")
    async with running(settings) as relay:
        port, guard = relay.ingress_port, relay.guards["ingress"]
        assert port is not None
        held = [await connect(port) for _ in range(3)]
        try:
            await wait_for_count(guard, 3)
            assert REGISTRY.get_sample_value("relay_connections_open", {"listener": "ingress"}) == 3
            assert REGISTRY.get_sample_value("relay_connections_max", {"listener": "ingress"}) == 3
            extra = await connect(port, source="127.0.0.3")  # the cap is per listener, whatever the address
            held.append(extra)
            waiting = asyncio.create_task(status_of(extra, b"/healthz"))
            await stays_false(waiting.done, 0.5)  # not accepted: it waits in the kernel's queue, unread
            assert guard.open == 3
            assert await status_of(held[0], b"/healthz") == 200  # the admitted ones are served meanwhile
            close_all(held[1:2])
            assert await asyncio.wait_for(waiting, 5) == 200  # a place freed: accepted and served
        finally:
            close_all(held)
        await wait_for_count(guard, 0)


# -- TLS: counted and timed from the accept, before the handshake ------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[trustme.CA, str, str]:
    d = tmp_path_factory.mktemp("listener-pki")
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    for pem in leaf.cert_chain_pems:
        pem.write_to_path(str(d / "server.pem"), append=True)
    leaf.private_key_pem.write_to_path(str(d / "server.key"))
    return ca, str(d / "server.pem"), str(d / "server.key")


async def test_tls_handshakes_count_against_the_caps_and_the_header_timeout(
    make_settings: Callable[..., Settings], tls_files: tuple[trustme.CA, str, str]
) -> None:
    ca, cert, key = tls_files
    settings = make_settings(RELAY_OCPI_TLS_CERT_FILE=cert, RELAY_OCPI_TLS_KEY_FILE=key,
                             RELAY_OCPI_HEADER_TIMEOUT_S="1.0", RELAY_OCPI_MAX_CONNECTIONS_PER_IP="1")  # fmt: skip
    client = ssl.create_default_context()
    ca.configure_trust(client)
    before = closed_total("ocpi", "header_timeout"), closed_total("ocpi", "max_connections_per_ip")
    async with running(settings) as relay:
        port, guard = relay.ocpi_port, relay.guards["ocpi"]
        assert port is not None
        started = time.monotonic()
        silent = await connect(port)  # TCP only: no ClientHello ever
        await wait_for_count(guard, 1)  # counted before any handshake
        extra = await connect(port)
        assert await server_closed(extra, 0.5) == b""  # over the per-address cap: closed before a handshake
        assert not silent[0].at_eof()
        assert await server_closed(silent, 5) == b""  # no handshake within header_timeout_s
        assert 0.9 <= time.monotonic() - started < 3
        await wait_for_count(guard, 0)
        # A finished handshake, then no request: the deadline started at the accept still applies.
        started = time.monotonic()
        quiet = await connect(port, ctx=client)
        assert await server_closed(quiet, 5) == b""
        assert 0.9 <= time.monotonic() - started < 3
        await wait_for_count(guard, 0)
        served = await connect(port, ctx=client)
        assert await status_of(served, b"/ocpi/versions") == 401  # https still works
        pending = await connect(port, source="127.0.0.2")  # its handshake still awaited when the relay stops
        await wait_for_count(guard, 2)
    assert guard.open == 0 and not guard.per_ip  # stopping ended both, the handshake included
    close_all([silent, extra, quiet, served, pending])
    assert closed_total("ocpi", "header_timeout") - before[0] == 2
    assert closed_total("ocpi", "max_connections_per_ip") - before[1] == 1


# -- the file-descriptor budget and accept errors -----------------------------------------------------------


def test_ocpi_cap_is_lowered_to_what_the_fd_limit_leaves(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    reserve = fd_reserve(settings)
    assert reserve > settings.ingress.max_connections  # the ingress's connections are part of it
    assert ocpi_connection_budget(settings, 1_048_576, 40) == settings.ocpi.max_connections
    assert ocpi_connection_budget(settings, 1024, 40) == 1024 - 40 - reserve < settings.ocpi.max_connections
    assert ocpi_connection_budget(settings, 256, 40) == 1  # never 0: a tiny limit still serves the IOP
    assert ocpi_connection_budget(settings, resource.RLIM_INFINITY, 40) == settings.ocpi.max_connections


def test_log_rate_lets_a_burst_through_per_interval_and_counts_the_rest() -> None:
    now = [0.0]
    rate = LogRate(interval_s=10.0, burst=2, clock=lambda: now[0])
    got = [rate.allow() for _ in range(10_000)]
    assert got[:2] == [0, 0] and set(got[2:]) == {None}
    now[0] = 9.9
    assert rate.allow() is None
    now[0] = 10.0
    assert rate.allow() == 9_999  # the next line says how many were held back
    assert rate.allow() == 0
    assert rate.allow() is None


def test_accept_errors_are_counted_each_and_logged_at_a_bounded_rate() -> None:
    guard = Guard("ocpi", Limits(header_timeout_s=10, idle_timeout_s=60, max_connections=10))
    before = closed_total("ocpi", "accept_error")
    with captured_logs() as out:
        for _ in range(20_000):  # asyncio logged this many in a few seconds once descriptors ran out
            guard.accept_failed(OSError(24, "Too many open files"))
    lines = [line for line in out.getvalue().splitlines() if "accept_failed" in line]
    assert len(lines) == 1 and "Too many open files" in lines[0] and "ocpi" in lines[0]
    assert closed_total("ocpi", "accept_error") - before == 20_000


# -- saturation: relay serve with a low RLIMIT_NOFILE --------------------------------------------------------

NOFILE = 1024
SECRET = "listeners-T0ken-5c1d"
FLOOD_SOURCES = [f"127.0.0.{i}" for i in range(2, 32)]  # 30 addresses: under the default per-address cap


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Served:
    """``relay serve`` in its own process, with RLIMIT_NOFILE (soft and hard) at NOFILE."""

    proc: subprocess.Popen[bytes]
    ingress: int
    ocpi: int
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def get(self, http: aiohttp.ClientSession, path: str) -> int:
        async with http.get(f"http://127.0.0.1:{self.ingress}{path}") as resp:
            await resp.read()
            return resp.status


@pytest.fixture
def serve(redis_url: str, tmp_path: Path) -> Iterator[Callable[..., Served]]:
    procs: list[subprocess.Popen[bytes]] = []

    def limit() -> None:  # in the child, before exec
        resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))

    def start(**extra: str) -> Served:
        ingress, ocpi = _free_port(), _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        env.update(RELAY_REDIS_URL=redis_url, RELAY_STORAGE_DIR=str(tmp_path / "data"), RELAY_INGRESS_TOKEN=SECRET,
                   RELAY_INGRESS_LISTEN=f"127.0.0.1:{ingress}", RELAY_OCPI_LISTEN=f"127.0.0.1:{ocpi}",
                   RELAY_FORWARDER_ENABLED="false", RELAY_LOOP="asyncio")  # fmt: skip
        env.update(extra)
        log_path = tmp_path / f"relay-{len(procs)}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "relay", "serve", "--config", str(REPO / "config" / "relay.toml")],
                env=env, cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=log, stderr=log, preexec_fn=limit,
            )  # fmt: skip
        procs.append(proc)
        return Served(proc, ingress, ocpi, log_path)

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


async def ready(served: Served) -> None:
    async def up() -> bool:
        if served.proc.poll() is not None:
            raise AssertionError(f"relay exited with {served.proc.returncode}:\n{served.log()}")
        with suppress(aiohttp.ClientError, OSError):
            async with aiohttp.ClientSession() as http:
                return await served.get(http, "/readyz") == 200
        return False

    await wait_until(up, 30, lambda: f"relay ready; its log:\n{served.log()}")


@pytest.fixture
async def flood() -> AsyncIterator[list[Conn]]:
    conns: list[Conn] = []
    yield conns
    close_all(conns)


async def open_flood(conns: list[Conn], port: int, n: int, half_header: bytes) -> None:
    """n connections from FLOOD_SOURCES, every other one sending half a header, none finishing it."""

    async def one(i: int) -> None:
        try:
            conn = await asyncio.wait_for(connect(port, FLOOD_SOURCES[i % len(FLOOD_SOURCES)]), 3)
        except (OSError, TimeoutError):
            return  # the accept queue is full: the kernel drops the SYN (a connect that never completes)
        conns.append(conn)
        if i % 2:
            conn[1].write(half_header)

    await asyncio.gather(*(one(i) for i in range(n)))


def metric(text: str, name: str, **labels: str) -> float:
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    for line in text.splitlines():
        if line.startswith(want + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{want} not in /metrics")


LOOPS = ["asyncio"] + (["uvloop"] if importlib.util.find_spec("uvloop") else [])


@pytest.mark.parametrize("loop", LOOPS)
async def test_a_saturated_ocpi_listener_does_not_starve_the_ingress(
    serve: Callable[..., Served], flood: list[Conn], loop: str
) -> None:
    served = serve(RELAY_LOOP=loop)
    await ready(served)
    # More idle and half-sent connections than the process has descriptors (the finding: 200 + 200
    # on a smaller limit), from 30 addresses so that the per-address cap does not stop them first.
    await open_flood(flood, served.ocpi, NOFILE + 100, b"GET /ocpi/versions HTTP/1.1\r\nHost: relay\r\n")
    body = json.dumps(gireve_location("SAT1")).encode()
    timeout = aiohttp.ClientTimeout(total=5)
    headers = {"Authorization": f"Bearer {SECRET}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession(timeout=timeout, headers=headers) as http:
        started = time.monotonic()
        async with http.put(f"http://127.0.0.1:{served.ingress}/ingress/2.2.1/locations/FR/AB1/SAT1",
                            data=body) as resp:  # fmt: skip
            assert resp.status == 202, await resp.text()
        assert await served.get(http, "/healthz") == 200
        assert await served.get(http, "/readyz") == 200
        assert time.monotonic() - started < 5
        async with http.get(f"http://127.0.0.1:{served.ingress}/metrics") as resp:
            text = await resp.text()
    lowered = next(json.loads(line) for line in served.log().splitlines() if "ocpi_max_connections_lowered" in line)
    cap = lowered["lowered_to"]
    assert 0 < cap < NOFILE - 600  # [ocpi] max_connections (512) lowered: the ingress's share is kept
    assert metric(text, "relay_connections_max", listener="ocpi") == cap
    assert metric(text, "relay_connections_open", listener="ocpi") == cap  # full: the rest wait in the kernel
    assert "out of system resource" not in served.log() and "accept_failed" not in served.log()


async def test_accept_errors_when_descriptors_run_out_are_logged_at_a_bounded_rate(
    serve: Callable[..., Served], flood: list[Conn]
) -> None:
    # An ingress allowed more connections than the process has descriptors (a misconfiguration the
    # budget cannot fix): its accepts fail for as long as the flood lasts.
    served = serve(RELAY_INGRESS_MAX_CONNECTIONS="5000")
    await ready(served)
    await open_flood(flood, served.ingress, NOFILE + 100, b"GET /healthz HTTP/1.1\r\n")
    await wait_until(lambda: "accept_failed" in served.log(), 10, "the first accept error logged")
    await asyncio.sleep(2.5)  # the flood holds: asyncio retries the accept every second, and fails again
    close_all(flood)
    flood.clear()

    async def serving(http: aiohttp.ClientSession) -> bool:
        with suppress(aiohttp.ClientError, OSError):
            return await served.get(http, "/healthz") == 200
        return False

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        await wait_until(lambda: serving(http), 15, "the ingress to serve again")
        async with http.get(f"http://127.0.0.1:{served.ingress}/metrics") as resp:
            text = await resp.text()
    failed = metric(text, "relay_connections_closed_total", listener="ingress", reason="accept_error")
    lines = [line for line in served.log().splitlines() if "accept_failed" in line]
    assert failed >= 4, failed  # accepts failed again and again (retried every 0.25 s)...
    assert 1 <= len(lines) <= 2, lines  # ...and one line per 10 s says so, with the count held back
    assert "out of system resource" not in served.log()
