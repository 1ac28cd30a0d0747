"""Bare aiohttp handlers, the yardsticks of the relay's ingress.

``single`` and ``coalesce``: read the body, XADD it, answer 202. No auth, no validation, no envelope:
only HTTP + Redis, with the same stack as the relay (aiohttp, redis-py asyncio with hiredis, no
access log).

- ``single``: one awaited XADD per request (each request pays its own Redis round trip).
- ``coalesce``: the XADDs of concurrent requests go out as one pipeline per Redis round trip
  (whatever arrived while the previous pipeline was in flight).

``commit``: the work the relay must do for a Location PUT and nothing more, with the relay's own
code for each step: msgspec decode of the body into ``relay.models.Location`` (the ingress's own
decoder, and its ``Batch`` decoder for POST /batch), the event envelope (``relay.events.Event``,
msgpack-encoded by the store), and ``relay.store.Store.commit`` / ``commit_many`` with the state
write: one EVALSHA of the ``_COMMIT`` script per event (XADD + HSET of the document + ZADD of the
index), coalesced per Redis round trip on the store's raw hiredis pipeline, on the relay's shard
count; the process tunes the GC as ``relay serve`` does. Not done (what the relay adds on top):
auth, parse_target and the URL/body id checks, operator lookup, GIREVE rules and warnings, metrics,
logging, per-key chaining of batch items, the OCPI answer envelope. Answers: PUT 202
``{"event_id": ...}``; POST /batch 200 ``{"accepted": n, "event_ids": [...]}``.

``--loop``: ``asyncio`` or ``uvloop``, chosen by ``relay.cli.choose_loop`` as ``relay serve`` does.

Run: ``python -m bench.bare --mode coalesce --redis unix:///tmp/x/redis.sock --port 8790``.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import redis.asyncio as aioredis
from aiohttp import web

from relay import models, ordering
from relay.cli import choose_loop
from relay.config import load
from relay.events import Event, new_event_id
from relay.ingress.app import batch_decoder
from relay.service import tune_gc
from relay.state import state_field
from relay.store import StateWrite, Store, connect
from relay.validation import DECODERS

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


# -- commit: decode + envelope + the relay's Store.commit ------------------------------------------

STORE: web.AppKey[Store] = web.AppKey("store", Store)
LOCATION = DECODERS[("locations", "PUT", 0)]  # the ingress's decoder: msgspec.json.Decoder(models.Location)
_ids = msgspec.json.Encoder()


def _location_write(cc: str, pid: str, object_id: str, raw: bytes, correlation: str = "") -> tuple[Event, StateWrite]:
    """The typed decode, the envelope and the state write of one Location PUT, as the relay builds them."""
    body: models.Location = LOCATION.decode(raw)  # raises on an invalid body: 500, never stored
    event = Event(
        id=new_event_id(),
        module="locations",
        method="PUT",
        country_code=cc,
        party_id=pid,
        object_id=object_id,
        key=ordering.location_key(cc, pid, object_id),
        correlation_id=correlation,
        received_at=time.time(),
        body=raw,
    )
    fld, member = state_field(event)
    updated_ms = int(body.last_updated.timestamp() * 1000)
    return event, StateWrite("put", fld, member, cc, pid, raw, updated_ms)


async def handle_commit(request: web.Request) -> web.Response:
    info = request.match_info
    event, write = _location_write(info["cc"], info["pid"], info["id"], await request.read())
    await request.app[STORE].commit(event, write)
    return web.Response(status=202, body=b'{"event_id":"' + event.id.encode() + b'"}', content_type="application/json")


async def handle_commit_batch(request: web.Request) -> web.Response:
    batch = batch_decoder.decode(await request.read())
    writes = []
    for op in batch.operations:
        cc, pid, object_id = op.path.rsplit("/", 3)[1:]
        writes.append(_location_write(cc, pid, object_id, bytes(op.body), op.correlation_id))
    stored = await request.app[STORE].commit_many(writes)
    ids = [ev.id for (ev, _), r in zip(writes, stored, strict=True) if isinstance(r, str)]
    answer = {"accepted": len(ids), "event_ids": ids}
    return web.Response(status=200, body=_ids.encode(answer), content_type="application/json")


def create_commit_app(redis_url: str) -> web.Application:
    """Routes of the relay's ingress for Location PUTs and /batch, served by handle_commit*."""
    app = web.Application(client_max_size=64 * 1024 * 1024)
    config = load(Path(__file__).resolve().parents[1] / "config" / "relay.toml", env={})
    settings = msgspec.structs.replace(config.redis, url=redis_url)  # the relay's shard count and timeouts

    async def store_ctx(app: web.Application) -> AsyncIterator[None]:
        store = Store(connect(redis_url, settings), settings)
        await store.load_scripts()
        await store.ensure_groups()  # what the relay does at start: the same streams, with their group
        app[STORE] = store
        yield
        await store.close()

    app.cleanup_ctx.append(store_ctx)
    app.router.add_get("/healthz", handle_healthz)
    app.router.add_post("/ingress/2.2.1/batch", handle_commit_batch)
    app.router.add_put("/ingress/2.2.1/locations/{cc}/{pid}/{id}", handle_commit)
    return app


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
    parser.add_argument("--mode", choices=["single", "coalesce", "commit"], required=True)
    parser.add_argument("--redis", required=True, help="redis:// or unix:// URL")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio", help="event loop (uvloop: extra)")
    args = parser.parse_args()
    _, factory = choose_loop(args.loop)  # as relay serve picks it (uvloop: pip install 'relay[speed]')
    if args.mode == "commit":
        app = create_commit_app(args.redis)
        tune_gc()  # as relay serve does
    else:
        app = create_app(args.mode, args.redis)
    loop = factory() if factory is not None else None
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None, backlog=1024, loop=loop)


if __name__ == "__main__":
    main()
