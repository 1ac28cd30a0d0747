"""The connection to Redis: the pooled redis-py client, the coalesced pipeline, and error translation.

Two paths to Redis, on purpose. The hot commands (ingress commits, state reads, the forwarder's
acks and parked checks) are queued by ``Connection.call()`` and sent as one pipeline per round
trip on a dedicated connection where hiredis packs the commands and parses the replies
(``_RawPipe``; with ``rediss://`` redis-py's pipeline instead). Everything else (blocking reads,
leases, admin, the CLI) uses redis-py's pooled client, typed by redis-py's own annotations.

Every public coroutine of a store class is wrapped by ``raises_store_errors``: callers see
``relay.errors.StoreError`` subclasses only, never a redis-py exception or an ``OSError`` of a socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import hiredis
import redis.asyncio as aioredis
import structlog
from redis.asyncio.client import Pipeline
from redis.exceptions import NoScriptError, OutOfMemoryError, RedisError, ResponseError

from relay.config import RedisSettings
from relay.errors import NoGroup, StoreError, StoreFull, StoreUnavailable
from relay.store import scripts

log = structlog.get_logger(__name__)
_C = TypeVar("_C", bound=type)


# -- errors ----------------------------------------------------------------------------------------


def is_oom(exc: BaseException) -> bool:
    """Redis refused a write at its ``maxmemory`` (noeviction): redis-py's OutOfMemoryError, or the same
    ``OOM …`` error reply read by the raw pipeline (a script's first write refused: nothing was written)."""
    return isinstance(exc, OutOfMemoryError) or (isinstance(exc, ResponseError) and str(exc).startswith("OOM "))


def translate(exc: BaseException) -> StoreUnavailable:
    """A redis-py or socket error as the store's own: NoGroup for a vanished group, StoreFull for a write
    refused at maxmemory, else StoreUnavailable."""
    if isinstance(exc, ResponseError) and "NOGROUP" in str(exc):
        return NoGroup(str(exc))
    if is_oom(exc):
        return StoreFull(f"redis full (maxmemory): {exc}")
    return StoreUnavailable(f"redis: {exc.__class__.__name__}: {exc}")


def raises_store_errors(cls: _C) -> _C:
    """Wrap every public coroutine method so callers see StoreError subclasses only, never redis-py's.

    Only the methods the class itself defines: a class built on another wraps its own methods too.
    """
    for name, fn in list(vars(cls).items()):
        if name.startswith("_") or not inspect.iscoroutinefunction(fn):
            continue

        async def wrapper(*args: Any, __fn: Any = fn, **kwargs: Any) -> Any:
            try:
                return await __fn(*args, **kwargs)
            except StoreError:
                raise
            except (RedisError, OSError) as exc:
                raise translate(exc) from exc

        setattr(cls, name, functools.wraps(fn)(wrapper))
    return cls


def is_nogroup(exc: BaseException) -> bool:
    """A consumer group vanished (Redis restarted without persistence, or the stream was deleted).

    Kept for callers written before NoGroup: ``except NoGroup`` says the same.
    """
    return isinstance(exc, NoGroup) or (isinstance(exc, ResponseError) and "NOGROUP" in str(exc))


# -- replies ---------------------------------------------------------------------------------------


def text(v: Any) -> str:
    """A reply (bytes, or a number) as a str."""
    return v.decode() if isinstance(v, bytes) else str(v)


def optional_text(v: Any) -> str | None:
    """A reply that may be nil, as a str or None."""
    return None if v is None else text(v)


async def pipelined(
    client: aioredis.Redis,
    queue: Callable[[Pipeline], object],
    *,
    transaction: bool = False,
    raise_on_error: bool = True,
) -> list[Any]:
    """The replies of the commands ``queue(pipe)`` adds, sent as one redis-py pipeline (MULTI/EXEC if transaction).

    ``queue`` returns what the pipeline's methods return (the pipeline itself, which redis-py types
    as awaitables): returned, they are not mistaken for forgotten awaits.
    """
    async with client.pipeline(transaction=transaction) as pipe:
        queue(pipe)
        return await pipe.execute(raise_on_error=raise_on_error)


# -- the client ------------------------------------------------------------------------------------


def connect(url: str, settings: RedisSettings) -> aioredis.Redis:
    """A client for redis://, rediss:// or unix:// URLs, bytes in and out."""
    # A blocking pool: with thousands of key runners, a burst of reads waits for a free connection
    # instead of failing with "Too many connections".
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        socket_timeout=settings.socket_timeout_s,
        socket_connect_timeout=settings.socket_timeout_s,
        health_check_interval=30,
        max_connections=64,
        timeout=settings.socket_timeout_s,
    )
    return aioredis.Redis.from_pool(pool)  # the client owns the pool: aclose() closes it


# -- the coalesced pipeline --------------------------------------------------------------------------


@dataclass(slots=True)
class _Pending:
    args: tuple[Any, ...]
    future: asyncio.Future[Any]


class _RawPipe:
    """A dedicated connection for the coalesced pipelines: hiredis packs the commands and parses the replies.

    redis-py's Pipeline costs several microseconds per command (a coroutine, an asyncio timeout and a
    response-callback lookup per reply); here one pipeline is one write, one timeout and a gets() loop.
    """

    def __init__(self, kwargs: dict[str, Any], timeout_s: float) -> None:
        self.kw = kwargs
        self.timeout_s = timeout_s
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._parser = hiredis.Reader()

    async def _connect(self) -> None:
        if self.kw.get("path"):
            r, w = await asyncio.open_unix_connection(self.kw["path"])
        else:
            r, w = await asyncio.open_connection(self.kw.get("host", "localhost"), self.kw.get("port", 6379))
        self._reader, self._writer, self._parser = r, w, hiredis.Reader()
        init: list[tuple[Any, ...]] = []
        if self.kw.get("password"):
            user = self.kw.get("username")
            init.append(("AUTH", user, self.kw["password"]) if user else ("AUTH", self.kw["password"]))
        if self.kw.get("db"):
            init.append(("SELECT", self.kw["db"]))
        for reply in await self._roundtrip(init) if init else []:
            if isinstance(reply, hiredis.ReplyError):
                raise ResponseError(str(reply))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None

    async def execute(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        try:
            async with asyncio.timeout(self.timeout_s):
                if self._writer is None or self._writer.is_closing() or (self._reader and self._reader.at_eof()):
                    self.close()  # never used, or Redis closed it while idle (restart): nothing was sent on it
                    await self._connect()
                return [_reply(r) for r in await self._roundtrip(commands)]
        except BaseException:
            self.close()  # unread replies would answer the next pipeline: never reuse a broken one
            raise

    async def _roundtrip(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        assert self._writer is not None and self._reader is not None
        self._writer.write(b"".join([hiredis.pack_command(c) for c in commands]))
        out: list[Any] = []
        n, parser, reader = len(commands), self._parser, self._reader
        while len(out) < n:
            reply = parser.gets()
            if reply is False:
                data = await reader.read(1 << 18)
                if not data:
                    raise ConnectionError("redis closed the connection")
                parser.feed(data)
            else:
                out.append(reply)
        return out


def _reply(r: Any) -> Any:
    if isinstance(r, hiredis.ReplyError):
        msg = str(r)
        return NoScriptError(msg) if msg.startswith("NOSCRIPT") else ResponseError(msg)
    return r


@raises_store_errors
class Connection:
    """The pooled client (``redis``) and the coalesced pipeline (``call``) that every store part uses."""

    def __init__(self, client: aioredis.Redis, settings: RedisSettings) -> None:
        self.redis: aioredis.Redis = client
        pool = client.connection_pool
        # rediss:// keeps redis-py's pipeline: the raw connection speaks plain TCP or a unix socket.
        tls = issubclass(pool.connection_class, aioredis.SSLConnection)
        self._raw = None if tls else _RawPipe(pool.connection_kwargs, settings.socket_timeout_s)
        self.settings = settings
        self.shards = settings.shards
        self._pending: list[_Pending] = []
        self._flusher: asyncio.Task[None] | None = None

    async def persistence(self) -> dict[str, str]:
        """appendonly/appendfsync as Redis reports them ({} if CONFIG is not allowed, e.g. managed Redis)."""
        try:
            raw: dict[Any, Any] = await self.redis.config_get("append*")
        except RedisError:
            return {}
        return {text(k): text(v) for k, v in raw.items() if text(k) in {"appendonly", "appendfsync"}}

    async def memory(self) -> dict[str, int]:
        """Redis's ``used_memory``, ``maxmemory`` (0: no limit) and ``aof_current_size`` (0 without AOF), from
        INFO memory and INFO persistence (a key a managed Redis leaves out is left out here)."""
        mem: dict[str, Any] = await self.redis.info("memory")
        per: dict[str, Any] = await self.redis.info("persistence")
        out: dict[str, int] = {k: int(mem[k]) for k in ("used_memory", "maxmemory") if k in mem}
        if "aof_current_size" in per or "aof_enabled" in per:
            out["aof_current_size"] = int(per.get("aof_current_size", 0))
        return out

    async def ping(self) -> bool:
        """True if Redis answers."""
        try:
            return bool(await self.redis.ping())
        except (RedisError, OSError):
            return False

    async def close(self) -> None:
        """Flush pending commands, then close the connection pool."""
        if self._flusher is not None:
            with contextlib.suppress(Exception):
                await self._flusher
        if self._raw is not None:
            self._raw.close()
        await self.redis.aclose()

    def call(self, *args: Any) -> asyncio.Future[Any]:
        """Queue one command for the next coalesced pipeline; the future gets its reply or a StoreUnavailable."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(args, fut))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_loop())
        return fut

    async def _flush_loop(self) -> None:
        # One pipeline per round trip: whatever arrived while the previous one was in flight.
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                await self._flush(batch)
        finally:
            self._flusher = None

    async def _flush(self, batch: list[_Pending]) -> None:
        try:
            results = await self._execute(batch)
        except BaseException as exc:
            # Any failure (a reply hiredis cannot parse, an argument it cannot pack, cancellation)
            # fails the whole batch: a future left pending would hang a request or a key forever.
            err = StoreUnavailable(f"redis: {exc.__class__.__name__}: {exc}")
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(err)
            if not isinstance(exc, Exception):
                raise
            return
        for item, result in zip(batch, results, strict=False):
            if item.future.done():
                continue
            if isinstance(result, Exception):
                item.future.set_exception(translate(result) if is_oom(result) else StoreUnavailable(f"redis: {result}"))
            else:
                item.future.set_result(result)

    async def _execute(self, batch: list[_Pending], *, reload: bool = True) -> list[Any]:
        results: list[Any]
        wait = self.settings.wait_replicas
        if self._raw is not None:
            commands = [item.args for item in batch]
            if wait:
                commands.append(("WAIT", wait, self.settings.wait_timeout_ms))
            results = await self._raw.execute(commands)
        else:

            def queue(pipe: Pipeline) -> list[object]:
                queued: list[object] = [pipe.execute_command(*item.args) for item in batch]
                if wait:
                    queued.append(pipe.execute_command("WAIT", wait, self.settings.wait_timeout_ms))
                return queued

            results = await pipelined(self.redis, queue, raise_on_error=False)
        if wait:
            acked = results.pop()
            if isinstance(acked, int) and acked < wait:
                log.warning("replicas_lagging", wanted=wait, acked=acked)
        lost = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if lost and reload:
            # Redis lost its script cache (restart, failover). A NOSCRIPT reply means that command
            # did nothing, so only those commands are sent again (a script's SHA never changes).
            await scripts.load(self.redis, scripts.ALL)
            again = await self._execute([batch[i] for i in lost], reload=False)
            for i, r in zip(lost, again, strict=True):
                results[i] = r
        return results


class Part:
    """The operations of one job, on top of a Store's connection (its pooled client and coalesced pipeline)."""

    def __init__(self, store: Connection) -> None:
        self.store = store
        self.redis: aioredis.Redis = store.redis
