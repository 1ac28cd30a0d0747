"""A scripted OCPI receiver on loopback standing in for GIREVE's IOP: records requests, injects faults."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.loopback import LoopbackServer
from tests.waiting import wait_until


@dataclass
class Received:
    """One request as the IOP saw it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float
    # Filled in when the fake answers: the Reply it sent, when, and how many requests were in
    # flight at the fake when this one arrived (itself included).
    reply: Reply | None = None
    answered_at: float = 0.0
    inflight: int = 0

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None

    @property
    def ok(self) -> bool:
        """Answered with a success (HTTP 2xx and OCPI 1xxx or no OCPI code): the IOP took it."""
        r = self.reply
        return r is not None and 200 <= r.status < 300 and (r.ocpi is None or 1000 <= r.ocpi < 2000)


@dataclass
class Reply:
    """What the fake answers: HTTP status, OCPI status_code (None → a non-OCPI body), extras."""

    status: int = 200
    ocpi: int | None = 1000
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    hold: asyncio.Event | None = None  # answer only once this is set (after delay_s)


Script = Callable[[Received], Reply | None]


def ok() -> Reply:
    return Reply()


class FakeIop(LoopbackServer):
    """Answers every request with ``script(request)`` (default: 200 + OCPI 1000)."""

    def __init__(self, port: int | None = None) -> None:
        super().__init__(port)
        self.received: list[Received] = []  # in the order answered
        self.arrived: list[Received] = []  # in the order they came in (answered or not yet)
        self.inflight = 0
        self.max_inflight = 0
        self.script: Script = lambda _: None
        self._handling: set[asyncio.Task[Any]] = set()

    @property
    def url(self) -> str:
        """Version base URL: module endpoints are {url}/{module}."""
        return f"http://127.0.0.1:{self.port}/ocpi/2.2.1"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        rec = Received(request.method, request.path, dict(request.headers), await request.read(), time.time())
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        rec.inflight = self.inflight
        self.arrived.append(rec)
        self.changed.set()
        me = asyncio.current_task()
        assert me is not None
        self._handling.add(me)
        try:
            reply = self.script(rec) or ok()
            if reply.delay_s:
                await asyncio.sleep(reply.delay_s)
            if reply.hold is not None:
                await reply.hold.wait()
        finally:
            self.inflight -= 1
            self._handling.discard(me)
        rec.reply, rec.answered_at = reply, time.time()
        self.received.append(rec)
        self.changed.set()
        body = reply.body
        if body is None:
            envelope = {"status_code": reply.ocpi, "status_message": "fake", "timestamp": "2026-01-01T00:00:00Z"}
            body = json.dumps(envelope).encode() if reply.ocpi is not None else b""
        return web.Response(status=reply.status, body=body, headers=reply.headers, content_type="application/json")

    def add_routes(self, app: web.Application) -> None:
        app.router.add_route("*", "/{tail:.*}", self._handle)

    async def wait_for(self, cond: Callable[[], bool], timeout: float = 20.0) -> None:
        """Wait until cond() holds (checked after each request), or fail."""
        await wait_until(
            cond, timeout, lambda: f"condition on the fake IOP ({len(self.received)} requests)", changed=self.changed
        )

    def paths(self, method: str | None = None) -> list[str]:
        return [r.path for r in self.received if method is None or r.method == method]

    async def down(self) -> None:
        """Go down as a whole: refuse connections, cut open ones, and drop the requests being worked on.

        aiohttp lets a handler run on after its client left. Left running, a slow answer of a cut
        request would still count as taken after the retry that replaced it, as if the relay had
        sent an older update last; an IOP that goes down applies nothing more. (A client that gives
        up while the IOP is up is another case: that request may still be applied, late.)
        """
        for task in list(self._handling):
            task.cancel()
        await super().down()

    def delivered(self, path: str | None = None) -> list[Received]:
        """Requests answered with a success, in the order answered (optionally of one path)."""
        return [r for r in self.received if r.ok and (path is None or r.path == path)]

    def failed(self) -> list[Received]:
        """Requests answered with anything but a success."""
        return [r for r in self.received if not r.ok]


def random_faults(rate: float, seed: int = 1) -> Script:
    """Transient faults at random: 5xx, 429 with Retry-After 0, OCPI 3xxx in a 200, slow answers."""
    rng = random.Random(seed)

    def script(_: Received) -> Reply | None:
        if rng.random() >= rate:
            return None
        return rng.choice(
            [
                Reply(status=503, ocpi=None),
                Reply(status=500, ocpi=3000),
                Reply(status=429, ocpi=None, headers={"Retry-After": "0"}),
                Reply(status=200, ocpi=3001),
                Reply(status=200, ocpi=1000, delay_s=0.05),
            ]
        )

    return script
