"""Generated hostile requests against both listeners (issue 14): no 5xx, nothing stored when refused, RSS bounded.

tests/hostile_requests.py generates the requests with hypothesis (every route of the ingress and of the
OCPI listener, valid-ish objects with mutated fields, deep JSON, huge strings, control characters,
non-UTF-8 bytes, odd Authorization headers, ``..``/``%2e%2e``/``?``/``#`` in paths, long ids, odd queries).
A raw HTTP/1.1 client sends them one at a time, as generated (nothing normalised on the way), to a real
relay on loopback, registered with an IOP-like peer, with a fake IOP and a fake CSMS behind it. A worker
process generates the next requests while these are sent (generation costs as much as sending).

After every answer the suite reads Redis's write counter (``rdb_changes_since_last_save``: the embedded
server never saves an RDB, so it only grows, and with the forwarder off nothing else writes): an answer
that refuses (4xx, an OCPI status other than 1000, a batch that accepted nothing) must leave it unchanged.
At the end the stream entries added must be exactly the events accepted (202s and accepted batch items).
The relay runs as ``relay serve`` in a process of its own, so that its RSS is its own: sampled after every
chunk of requests, it may not trend up (``RSS_TREND_LIMIT_MB``) nor end far above its value after the
warm-up (``RSS_GROWTH_LIMIT_MB``); the relay must still be serving at the end.
An answer that never comes (``TIMEOUT_S``) fails the run; a connection the listener closes without an answer
(aiohttp does, on some requests its parser refuses) is counted, not failed.

Reproducible: ``RELAY_HOSTILE_SEED`` (default 0) seeds the generation; ``RELAY_HOSTILE_REQUESTS`` (default
10,000) sets the count. The figures are printed whatever pytest captures; a 5xx is reported with a
reproducer cut down to what still gets the 5xx (headers, body, query dropped one at a time).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import multiprocessing
import os
import secrets
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from tests.conftest import AUTH, REPO, TOKEN, gireve_location
from tests.csms_fake import CsmsFake, RecordingIop, RoamingPeer, fast_env, iop_token
from tests.hostile_requests import INGRESS_ROUTES, OCPI_ROUTES, SEED, Req, generate
from tests.ocpi_peer import token_header

REQUESTS = int(os.environ.get("RELAY_HOSTILE_REQUESTS", "10000"))
CHUNK = 250  # requests per hypothesis run (bounded memory; each run seeded by its index)
WARMUP = 1000  # requests before the RSS baseline
# The relay process's RSS is sampled after every chunk; it swings with the garbage awaiting a collection
# (some bodies are 1 MiB). A leak shows as a trend: the median of the last quarter of the samples against
# the median of the first, and the end against the start.
RSS_TREND_LIMIT_MB = 24
RSS_GROWTH_LIMIT_MB = 48
CLOSED, TIMED_OUT = 0, -1  # no answer: the server closed the connection, or did not answer within TIMEOUT_S
TIMEOUT_S = 15.0


@dataclass
class Answer:
    status: int  # or CLOSED / TIMED_OUT
    body: bytes = b""


class RawClient:
    """HTTP/1.1 over one keep-alive connection, the request's bytes as given; reconnects when the server closes."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def close(self) -> None:
        if self.writer is not None:
            # Abort: a close would first wait to send the rest of a body the listener stopped reading.
            self.writer.transport.abort()
            try:
                await self.writer.wait_closed()
            except OSError:
                pass
        self.reader = self.writer = None

    async def send(self, req: Req) -> Answer:
        for attempt in (1, 2):
            reused = self.writer is not None
            try:
                return await asyncio.wait_for(self._send(req), TIMEOUT_S)
            except TimeoutError:  # before OSError, its base class
                await self.close()
                return Answer(TIMED_OUT)
            except (ConnectionError, asyncio.IncompleteReadError, OSError) as exc:
                await self.close()
                # A kept-alive connection the server had closed: once more. Else the server closed on this
                # request without an answer (it may, when it stops reading a request its parser refused).
                if not (reused and attempt == 1 and not getattr(exc, "partial", b"")):
                    return Answer(CLOSED)
        return Answer(CLOSED)

    async def _send(self, req: Req) -> Answer:
        if self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port, limit=2**22)
        assert self.reader is not None and self.writer is not None
        # Not drained before reading: a listener answers (401, 413…) without reading a body it refuses, and a
        # client that waits to have sent it all would wait for aiohttp's lingering_time. The rest stays buffered.
        self.writer.write(req.wire())
        version, status, hdrs = await self._head()
        while status == 100:
            version, status, hdrs = await self._head()
        if version == "HTTP/1.0":  # aiohttp's own answer to what its parser refused: a body, then close
            hdrs["connection"] = "close"
            data = await self.reader.read()
        elif req.method == "HEAD" or status in (204, 304):
            data = b""
        elif "content-length" in hdrs:
            data = await self.reader.readexactly(int(hdrs["content-length"]))
        elif hdrs.get("transfer-encoding", "").lower() == "chunked":
            data = await self._chunked()
        else:
            hdrs["connection"] = "close"
            data = await self.reader.read()
        # A refusal may come before the listener has read the body: aiohttp then reads and drops the rest (for
        # up to its lingering_time, 10 s) before it reads a next request on this connection. Start afresh, as
        # clients do after an error answer to a request with a body.
        refused_body = status >= 400 and bool(req.body)
        if hdrs.get("connection", "").lower() == "close" or refused_body:
            await self.close()
        return Answer(status, data)

    async def _head(self) -> tuple[str, int, dict[str, str]]:
        assert self.reader is not None
        lines = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        version, status = lines[0].split(" ", 2)[:2]
        hdrs = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:]) if v}
        return version, int(status), hdrs

    async def _chunked(self) -> bytes:
        assert self.reader is not None
        out = bytearray()
        while size := int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16):
            out += await self.reader.readexactly(size)
            await self.reader.readexactly(2)
        await self.reader.readuntil(b"\r\n")
        return bytes(out)


def refused(req: Req, answer: Answer) -> bool:
    """A refusal: a 4xx, no answer, an OCPI status other than 1000, or a batch that accepted nothing."""
    if answer.status >= 400 or answer.status <= CLOSED:
        return True
    try:
        doc = json.loads(answer.body)
    except ValueError:
        return False
    if not isinstance(doc, dict):
        return False
    if req.route == "batch" and isinstance(doc.get("data"), dict):
        return bool(doc["data"].get("accepted") == 0)
    return "status_code" in doc and doc["status_code"] != 1000


def stored_events(req: Req, answer: Answer) -> int:
    """Stream entries an answer says were written: one per ingress 202, the accepted items of a batch; none
    for a 202 (or a batch item) that says ``duplicate`` or ``replayed`` (accepted, nothing stored again)."""
    if req.listener != "ingress":
        return 0
    if answer.status == 202:
        try:
            data = json.loads(answer.body)["data"]
            return 0 if data.get("duplicate") or data.get("replayed") else 1
        except (ValueError, KeyError, TypeError, AttributeError):
            return 1
    if req.route == "batch" and answer.status == 200:
        try:
            data = json.loads(answer.body)["data"]
            return int(data["accepted"]) - sum(1 for r in data.get("results", ()) if r.get("duplicate"))
        except (ValueError, KeyError, TypeError, AttributeError):
            return 0
    return 0


def process_rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process, in MB: its resident memory now, and the most it ever had."""
    found: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0]) / 1024
    return found["VmRSS"], found["VmHWM"]


def _keep_shortest(found: dict[Any, Req], key: Any, req: Req) -> None:
    if key not in found or len(req.wire()) < len(found[key].wire()):
        found[key] = req


@dataclass
class Run:
    """The figures of one run, and the evidence of anything wrong."""

    by_status: Counter[str] = field(default_factory=Counter)
    by_listener: Counter[str] = field(default_factory=Counter)
    five_xx: dict[tuple[str, str, str, int], Req] = field(default_factory=dict)  # shortest request of each kind
    stored_on_refusal: list[tuple[Req, int, int]] = field(default_factory=list)
    timed_out: dict[tuple[str, str], Req] = field(default_factory=dict)
    closed: dict[tuple[str, str], Req] = field(default_factory=dict)
    accepted_events: int = 0
    sent: int = 0
    elapsed_s: float = 0.0
    rss_mb: tuple[float, float] = (0.0, 0.0)
    stream_entries: int = 0
    rss_trace: list[int] = field(default_factory=list)  # the relay's RSS after each chunk
    peak_rss_mb: float = 0.0

    def record(self, req: Req, answer: Answer, writes: int) -> None:
        self.sent += 1
        self.by_listener[req.listener] += 1
        label = {CLOSED: "closed", TIMED_OUT: "timed out"}.get(answer.status, f"{answer.status // 100}xx")
        self.by_status[label] += 1
        if answer.status >= 500:
            _keep_shortest(self.five_xx, (req.listener, req.route, req.method, answer.status), req)
        elif answer.status == CLOSED:
            _keep_shortest(self.closed, (req.listener, req.route), req)
        elif answer.status == TIMED_OUT:
            _keep_shortest(self.timed_out, (req.listener, req.route), req)
        if writes and refused(req, answer) and len(self.stored_on_refusal) < 20:
            self.stored_on_refusal.append((req, answer.status, writes))
        self.accepted_events += stored_events(req, answer)

    def rss_trend_mb(self) -> float:
        quarter = max(1, len(self.rss_trace) // 4)
        first = self.rss_trace[WARMUP // CHUNK :][:quarter] or [0]
        return float(statistics.median(self.rss_trace[-quarter:]) - statistics.median(first))

    def figures(self) -> str:
        answers = ", ".join(f"{k} {v}" for k, v in sorted(self.by_status.items()))
        return (
            f"hostile requests: {self.sent} sent (ingress {self.by_listener['ingress']}, OCPI "
            f"{self.by_listener['ocpi']}) in {self.elapsed_s:.1f} s, seed {SEED}; answers: {answers}; "
            f"stream entries added {self.stream_entries} for {self.accepted_events} events accepted; "
            f"relay RSS {self.rss_mb[0]:.0f} MB after {WARMUP} requests, {self.rss_mb[1]:.0f} MB at the end "
            f"(trend {self.rss_trend_mb():+.0f} MB, peak {self.peak_rss_mb:.0f} MB)"
        )


async def _writes(r: aioredis.Redis) -> int:
    return int((await r.info("persistence"))["rdb_changes_since_last_save"])


async def _stream_entries(r: aioredis.Redis) -> int:
    total = 0
    async for key in r.scan_iter(match="relay:*", _type="stream", count=1000):
        total += int(await r.xlen(key))
    return total


def _simpler(req: Req) -> list[Req]:
    """Smaller variants of a request: a header less, no body, no chunking, no query."""
    out = [replace(req, headers=req.headers[:i] + req.headers[i + 1 :]) for i in range(len(req.headers))]
    out += [replace(req, body=b"", chunked=False, bad_chunk=False), replace(req, chunked=False, bad_chunk=False)]
    if b"?" in req.target:
        out.append(replace(req, target=req.target.split(b"?")[0]))
    return [r for r in out if r != req]


async def minimise(client: RawClient, req: Req, budget: int = 60) -> Req:
    """The request cut down, one simplification at a time, to what still gets a 5xx."""
    progress = True
    while progress and budget > 0:
        progress = False
        for smaller in _simpler(req):
            budget -= 1
            if (await client.send(smaller)).status >= 500:
                req, progress = smaller, True
                break
            if budget <= 0:
                break
    return req


# The relay under test runs as `relay serve` in a process of its own: its RSS is the relay's alone (not
# pytest's, nor the fakes', nor the generator's), with the production GC settings. Host names resolve to
# nothing there: a generated URL (credentials, response_url) never leads to a DNS query.
RUNNER = """
import ipaddress, socket
real = socket.getaddrinfo
def loopback_only(host, *args, **kwargs):
    name = host.decode() if isinstance(host, bytes) else str(host or "")
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        if name != "localhost":
            raise socket.gaierror(socket.EAI_NONAME, "no DNS in the hostile suite: " + name) from None
    return real(host, *args, **kwargs)
socket.getaddrinfo = loopback_only
from relay.cli import main
main()
"""


@dataclass
class Target:
    """A registered relay process, and the fakes around it."""

    proc: asyncio.subprocess.Process
    ingress_port: int
    ocpi_port: int
    relay_token: str
    iop: RecordingIop
    csms: CsmsFake
    peer: RoamingPeer

    def forget(self) -> None:
        """The fakes keep what they received: dropped between chunks (the test process's memory)."""
        for kept in (self.iop.received, self.iop.arrived, self.iop.queries, self.csms.posts, self.peer.seen):
            kept.clear()


def _log_text(log: Path) -> str:
    return log.read_text(errors="replace")


async def _started(log: Path, proc: asyncio.subprocess.Process) -> dict[str, Any]:
    """The relay_started line of the relay's log (its listeners' real ports)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for line in (await asyncio.to_thread(_log_text, log)).splitlines():
            if '"relay_started"' in line:
                started: dict[str, Any] = json.loads(line)
                return started
        if proc.returncode is not None:
            break
        await asyncio.sleep(0.1)
    tail = (await asyncio.to_thread(_log_text, log))[-3000:]
    raise AssertionError(f"relay did not start (exit {proc.returncode}):\n{tail}")


@contextlib.asynccontextmanager
async def relay_process(redis_url: str, tmp_path: Path) -> AsyncIterator[Target]:
    """`relay serve` on the test Redis, registered (Register – FromIOP) by an IOP-like peer; the forwarder off,
    so that only requests write to Redis, and commands waiting an hour for their result (no TIMEOUT)."""
    iop, csms = RecordingIop(), CsmsFake()
    await iop.start()
    await csms.start()
    peer = RoamingPeer(iop)
    await peer.start()
    token_a = "token-a-" + secrets.token_hex(8)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env.update(fast_env(csms, token_a), RELAY_REDIS_URL=redis_url, RELAY_INGRESS_TOKEN=TOKEN,
               RELAY_STORAGE_DIR=str(tmp_path / "data"), RELAY_INGRESS_LISTEN="127.0.0.1:0",
               RELAY_OCPI_LISTEN="127.0.0.1:0", RELAY_OCPI_ALLOW_INSECURE_URLS="true",
               RELAY_FORWARDER_ENABLED="false", RELAY_CSMS_COMMAND_RESULT_TIMEOUT_S="3600", RELAY_LOG_FORMAT="json",
               RELAY_LOG_LEVEL="info", RELAY_LOOP="asyncio")  # fmt: skip
    log = tmp_path / "relay.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", RUNNER, "serve", "--config", str(REPO / "config" / "relay.toml"),
            env=env, stdout=out, stderr=out,
        )  # fmt: skip
    try:
        started = await _started(log, proc)
        ingress_port = int(started["ingress"].split(":")[2].split("/")[0])
        ocpi_port = int(started["ocpi"].split(":")[2].split("/")[0])
        await peer.register(f"http://127.0.0.1:{ocpi_port}/ocpi/versions", token_a)
        assert peer.relay_token is not None
        yield Target(proc, ingress_port, ocpi_port, peer.relay_token, iop, csms, peer)
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        await csms.close()
        await peer.close()
        await iop.close()


async def _known_objects(t: Target) -> None:
    """What valid-ish requests need to get through: a known Location, a Token the IOP pushed."""
    async with aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{t.ingress_port}/ingress/2.2.1/locations/FR/AB1/LOC1"
        async with http.put(url, json=gireve_location("LOC1"), headers=AUTH) as resp:
            assert resp.status == 202, await resp.text()
        url = f"http://127.0.0.1:{t.ocpi_port}/ocpi/2.2.1/tokens/NL/TNM/0102ABCD?type=RFID"
        async with http.put(
            url, json=iop_token("0102ABCD"), headers={"Authorization": token_header(t.relay_token)}
        ) as r:
            assert r.status in (200, 201), await r.text()  # 201: the token is new


class Driver:
    """Sends the generated requests to the relay, chunk by chunk, checking the store after each answer."""

    def __init__(self, t: Target, r: aioredis.Redis) -> None:
        self.t, self.r = t, r
        self.clients = {"ingress": RawClient(t.ingress_port), "ocpi": RawClient(t.ocpi_port)}
        self.run = Run()

    def rss(self) -> float:
        return process_rss_mb(self.t.proc.pid)[0]

    async def send_all(self, pool: ProcessPoolExecutor) -> None:
        loop = asyncio.get_running_loop()
        args = (self.t.relay_token, self.t.iop.port)

        def submit(index: int) -> asyncio.Future[list[Req]]:
            return loop.run_in_executor(pool, generate, index, CHUNK, *args)

        entries, writes = await _stream_entries(self.r), await _writes(self.r)
        started, rss_start, index = time.perf_counter(), 0.0, 0
        ahead = [submit(0), submit(1)]  # the worker generates the next chunk while this one is sent
        while self.run.sent < REQUESTS:
            chunk = await ahead.pop(0)
            ahead.append(submit(index + 2))
            index += 1
            for req in chunk[: REQUESTS - self.run.sent]:
                answer = await self.clients[req.listener].send(req)
                now = await _writes(self.r)
                self.run.record(req, answer, now - writes)
                writes = now
                if self.run.sent == WARMUP:
                    rss_start = self.rss()
            self.t.forget()
            self.run.rss_trace.append(round(self.rss()))
        for pending in ahead:
            pending.cancel()
        self.run.elapsed_s = time.perf_counter() - started
        self.run.rss_mb = (rss_start, self.rss())
        self.run.peak_rss_mb = process_rss_mb(self.t.proc.pid)[1]
        self.run.stream_entries = await _stream_entries(self.r) - entries

    async def reproducers(self) -> list[str]:
        """Each kind of 5xx, cut down to a minimal request (deduplicated once cut)."""
        found: dict[bytes, str] = {}
        for (listener, route, method, status), req in sorted(self.run.five_xx.items())[:12]:
            small = await minimise(self.clients[listener], req)
            found.setdefault(small.wire(), f"{status} from {listener} ({route} {method}): {small.short()}")
        return list(found.values())

    async def close(self) -> None:
        for c in self.clients.values():
            await c.close()


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_hostile_requests_to_both_listeners(redis_url: str, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    r = aioredis.Redis.from_url(redis_url)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        async with relay_process(redis_url, tmp_path) as target:
            await _known_objects(target)
            driver = Driver(target, r)
            try:
                await driver.send_all(pool)
                reproducers = await driver.reproducers()
            finally:
                await driver.close()
            exit_code = target.proc.returncode  # None: still serving after all of it
    await r.aclose()

    run = driver.run
    with capsys.disabled():
        print("\n" + run.figures())
        print(f"relay RSS after each chunk of {CHUNK} (MB): {run.rss_trace}")
        if run.closed:
            print("closed without an answer (aiohttp's parser refused the request):",
                  ", ".join(f"{listener} {route}" for listener, route in sorted(run.closed)))  # fmt: skip
    problems = reproducers
    if exit_code is not None:
        problems.append(f"the relay exited ({exit_code}): {_log_text(tmp_path / 'relay.log')[-2000:]}")
    problems += [f"stored {n} write(s) for a refused request ({status}): {req.short()}"
                 for req, status, n in run.stored_on_refusal]  # fmt: skip
    problems += [f"no answer within {TIMEOUT_S} s from {where}: {req.short()}" for where, req in run.timed_out.items()]
    if run.stream_entries != run.accepted_events:
        problems.append(f"{run.stream_entries} stream entries added, but {run.accepted_events} events accepted")
    if (trend := run.rss_trend_mb()) > RSS_TREND_LIMIT_MB:
        problems.append(
            f"relay RSS trend +{trend:.0f} MB from the first to the last quarter (limit {RSS_TREND_LIMIT_MB})"
        )
    if run.rss_mb[1] - run.rss_mb[0] > RSS_GROWTH_LIMIT_MB:
        problems.append(f"relay RSS grew {run.rss_mb[1] - run.rss_mb[0]:.0f} MB (limit {RSS_GROWTH_LIMIT_MB})")
    assert run.sent >= REQUESTS
    assert not problems, run.figures() + "\n" + "\n".join(problems)


_GENERATE_ELSEWHERE = """
import hashlib, sys, time
time.time = lambda: 1_000_000_000.0  # another day: nothing generated may depend on the clock (gzip's mtime did)
from tests.hostile_requests import generate
sys.stdout.write(hashlib.sha256(b"".join(r.wire() for r in generate(7, 30, "relay-token", 1))).hexdigest())
"""


def test_generation_is_reproducible() -> None:
    """The same seed and index give the same requests in another process, with another hash seed and another
    clock (a CI run reproduces locally)."""
    here = hashlib.sha256(b"".join(r.wire() for r in generate(7, 30, "relay-token", 1))).hexdigest()
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO)}
    other = subprocess.run(
        [sys.executable, "-c", _GENERATE_ELSEWHERE], env=env, cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert other.returncode == 0, other.stderr[-2000:]
    assert other.stdout == here


def test_the_first_chunks_cover_every_route_of_both_listeners() -> None:
    reqs = [r for index in range(4) for r in generate(index, CHUNK, "relay-token", 1)]
    assert {r.route for r in reqs if r.listener == "ingress"} == set(INGRESS_ROUTES)
    assert {r.route for r in reqs if r.listener == "ocpi"} == set(OCPI_ROUTES)


async def test_a_5xx_is_caught_and_cut_down_to_what_causes_it() -> None:
    """The suite's own instruments: a server that fails on one header gets a 5xx recorded, and the reproducer
    loses every other header, the body and the query."""

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=500 if "X-Boom" in request.headers else 400)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    client = RawClient(runner.addresses[0][1])
    try:
        req = Req("ingress", "cdr", "POST", b"/ingress/2.2.1/cdrs?x=1",
                  ((b"Authorization", b"Bearer x"), (b"X-Boom", b"1"), (b"Content-Type", b"text/plain")),
                  b'{"id": "CDR1"}', chunked=True)  # fmt: skip
        run = Run()
        run.record(req, await client.send(req), writes=1)
        assert run.five_xx and run.stored_on_refusal  # a 500 is a refusal that wrote: both recorded
        small = await minimise(client, req)
        assert small == Req("ingress", "cdr", "POST", b"/ingress/2.2.1/cdrs", ((b"X-Boom", b"1"),))
    finally:
        await client.close()
        await runner.cleanup()


@pytest.mark.parametrize(
    ("route", "status", "body", "is_refused", "stored"),
    [
        ("cdr", 202, b'{"status_code": 1000}', False, 1),
        ("cdr", 422, b'{"status_code": 2001}', True, 0),
        ("token_get", 200, b'{"status_code": 2004}', True, 0),  # an OCPI refusal in a 200
        ("batch", 200, b'{"status_code": 1000, "data": {"accepted": 0, "refused": 2}}', True, 0),
        ("batch", 200, b'{"status_code": 1000, "data": {"accepted": 2, "refused": 1}}', False, 2),
        ("ops", 200, b"# HELP relay_build_info", False, 0),  # not JSON: /metrics
        ("cdr", CLOSED, b"", True, 0),
    ],
)
def test_what_counts_as_refused_and_as_stored(route: str, status: int, body: bytes, is_refused: bool,
                                             stored: int) -> None:  # fmt: skip
    req = Req("ingress", route, "POST", b"/ingress/2.2.1/" + route.encode())
    assert refused(req, Answer(status, body)) is is_refused
    assert stored_events(req, Answer(status, body)) == stored
