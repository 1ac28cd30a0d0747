"""Bare aiohttp handlers, the yardsticks of the relay's ingress: read the body, XADD it, answer 202.

No auth, no validation, no envelope: only HTTP + Redis, with the same stack as the relay (aiohttp on
the default asyncio loop, redis-py asyncio with hiredis, no access log).

- ``single``: one awaited XADD per request (each request pays its own Redis round trip).
- ``coalesce``: the XADDs of concurrent requests go out as one pipeline per Redis round trip
  (whatever arrived while the previous pipeline was in flight).

Run: ``python -m bench.bare --mode coalesce --redis unix:///tmp/x/redis.sock --port 8790``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis
from aiohttp import web

STREAM = "bench:bare"
REDIS: web.AppKey[aioredis.Redis] = web.AppKey("redis", aioredis.Redis)


def _accepted(stream_id: Any) -> web.Response:
    sid = stream_id if isinstance(stream_id, bytes) else str(stream_id).encode()
    return web.Response(status=202, body=b'{"stream_id":"' + sid + b'"}', content_type="application/json")


async def handle_single(request: web.Request) -> web.Response:
    body = await request.read()
    stream_id = await request.app[REDIS].xadd(STREAM, {"e": body})
    return _accepted(stream_id)


class Coalescer:
    """One pipeline per round trip: the pending XADDs are sent together when the previous batch returned."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self.pending: list[tuple[bytes, asyncio.Future[Any]]] = []
        self.flusher: asyncio.Task[None] | None = None

    async def xadd(self, body: bytes) -> Any:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.pending.append((body, fut))
        if self.flusher is None:
            self.flusher = asyncio.create_task(self._loop())
        return await fut

    async def _loop(self) -> None:
        try:
            while self.pending:
                batch, self.pending = self.pending, []
                try:
                    async with self.client.pipeline(transaction=False) as pipe:
                        for body, _ in batch:
                            _ = pipe.xadd(STREAM, {"e": body})  # queued; pipeline returns self
                        results = await pipe.execute(raise_on_error=False)
                except Exception as exc:  # every waiter gets the failure
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                for (_, fut), result in zip(batch, results, strict=True):
                    if fut.done():
                        continue
                    if isinstance(result, Exception):
                        fut.set_exception(result)
                    else:
                        fut.set_result(result)
        finally:
            self.flusher = None


COALESCER: web.AppKey[Coalescer] = web.AppKey("coalescer", Coalescer)


async def handle_coalesce(request: web.Request) -> web.Response:
    body = await request.read()
    stream_id = await request.app[COALESCER].xadd(body)
    return _accepted(stream_id)


async def handle_healthz(_: web.Request) -> web.Response:
    return web.Response(body=b'{"status":"ok"}', content_type="application/json")


def create_app(mode: str, redis_url: str) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)

    async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
        client = aioredis.Redis.from_url(redis_url, max_connections=64)
        app[REDIS] = client
        app[COALESCER] = Coalescer(client)
        yield
        await client.aclose()

    app.cleanup_ctx.append(redis_ctx)
    app.router.add_get("/healthz", handle_healthz)
    app.router.add_route("*", "/{tail:.*}", handle_single if mode == "single" else handle_coalesce)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["single", "coalesce"], required=True)
    parser.add_argument("--redis", required=True, help="redis:// or unix:// URL")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio", help="event loop (uvloop: pip)")
    args = parser.parse_args()
    if args.loop == "uvloop":  # to compare with a relay that would run on uvloop
        importlib.import_module("uvloop").install()  # optional: not a dependency of the project
    web.run_app(
        create_app(args.mode, args.redis), host=args.host, port=args.port, access_log=None, print=None, backlog=1024
    )


if __name__ == "__main__":
    main()
