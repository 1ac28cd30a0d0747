"""A minimal fast OCPI receiver for bench/forward.py: 200 + a fixed OCPI 1000 body, one record per request.

Built on aiohttp's low-level ``web.Server`` (no router, no middlewares, no access log). Each request
reads its body and appends ``(path, X-Correlation-ID)`` to a list, so the bench can check delivery
and order per key afterwards; the first and last request times are ``time.monotonic()`` (the same
clock in every process on Linux).

Control routes (not counted): ``GET /healthz``, ``GET /_bench/stats``, ``GET /_bench/dump``
(JSON list of [path, correlation id]), ``POST /_bench/reset``.

Run: ``python -m bench.receiver --port 8791``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time

import msgspec
from aiohttp import web

OCPI_OK = b'{"status_code":1000,"status_message":"Success","timestamp":"2026-01-01T00:00:00Z"}'
_JSON = "application/json"


class Stats(msgspec.Struct):
    count: int
    first: float
    last: float


class Receiver:
    """Counts and records every non-control request."""

    def __init__(self) -> None:
        self.records: list[tuple[str, str]] = []
        self.first = 0.0
        self.last = 0.0

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        path = request.raw_path
        if path.startswith("/_bench/") or path == "/healthz":
            return self._control(request.method, path)
        await request.read()
        now = time.monotonic()
        if not self.records:
            self.first = now
        self.last = now
        self.records.append((path, request.headers.get("X-Correlation-ID", "")))
        return web.Response(body=OCPI_OK, content_type=_JSON)

    def _control(self, method: str, path: str) -> web.Response:
        if path == "/healthz":
            return web.Response(body=b'{"status":"ok"}', content_type=_JSON)
        if path == "/_bench/stats":
            stats = Stats(count=len(self.records), first=self.first, last=self.last)
            return web.Response(body=msgspec.json.encode(stats), content_type=_JSON)
        if path == "/_bench/dump":
            return web.Response(body=msgspec.json.encode(self.records), content_type=_JSON)
        if path == "/_bench/reset" and method == "POST":
            self.records = []
            self.first = self.last = 0.0
            return web.Response(body=b'{"reset":true}', content_type=_JSON)
        return web.Response(status=404)


async def serve(host: str, port: int) -> None:
    receiver = Receiver()
    server = web.Server(receiver.handle, access_log=None)
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(server, host, port, backlog=1024, reuse_address=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        srv.close()
        await server.shutdown(1.0)
        await srv.wait_closed()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
