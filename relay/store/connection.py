"""The connection to Redis: the pooled redis-py client, the coalesced pipeline, and error translation.

Two paths to Redis, on purpose. The hot commands (ingress commits, state reads, the forwarder's
acks and parked checks) are queued by ``Connection.call()`` and sent as one pipeline per round
trip on a dedicated connection where hiredis packs the commands and parses the replies
(relay.store.pipes: one per server, or one per primary of a Cluster; with ``rediss://`` redis-py's
pipeline instead). Everything else (blocking reads, leases, admin, the CLI) uses redis-py's pooled client
(plain, Sentinel-managed, or a RedisCluster), typed by redis-py's own annotations.

After a batch that holds ingress writes the pipeline sends the ack policy's WAIT/WAITAOF on the same
connection (relay.store.durability) and fails those writes with NotDurable when it falls short.

Every public coroutine of a store class is wrapped by ``raises_store_errors``: callers see
``relay.errors.StoreError`` subclasses only, never a redis-py exception or an ``OSError`` of a socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import redis.asyncio as aioredis
import structlog
from redis.asyncio import BlockingConnectionPool
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, OutOfMemoryError, RedisError, ResponseError

from relay.config import RedisSettings
from relay.errors import NoGroup, NotDurable, StoreError, StoreFull, StoreUnavailable
from relay.redis_url import sentinel_address
from relay.store import scripts
from relay.store.durability import AckPolicy
from relay.store.durability import resolve as resolve_ack
from relay.store.pipes import NodePipes, Pending, RawPipe

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


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """redis-py's Sentinel pool (asks the sentinels for the primary, drops connections to a demoted one)
    that waits for a free connection like the plain client's pool instead of failing."""


def connect(url: str, settings: RedisSettings) -> aioredis.Redis:
    """A client for redis://, rediss://, unix:// and redis+sentinel:// URLs (a RedisCluster with
    ``[redis] cluster``), bytes in and out."""
    # A blocking pool: with thousands of key runners, a burst of reads waits for a free connection
    # instead of failing with "Too many connections".
    common: dict[str, Any] = {
        "socket_timeout": settings.socket_timeout_s,
        "socket_connect_timeout": settings.socket_timeout_s,
        "health_check_interval": 30,
        # Never a retry by the client: an XREADGROUP whose reply was lost, sent again, reads the next entries
        # and leaves the first ones pending unseen (a later claim delivers them out of order). RedisCluster
        # retries 10 times by default. The relay's own layers retry where that is safe (redirections, MOVED
        # and ASK, are still followed: they are not retries).
        "retry": Retry(NoBackoff(), 0),
    }
    if settings.cluster:
        cluster = RedisCluster.from_url(url, max_connections=64, **common)
        # RedisCluster has the command methods of Redis (the same mixins) but not its class: one static
        # type for the store's parts; the few calls that differ are made in cluster-aware code here.
        return cast(aioredis.Redis, cluster)
    if "+sentinel://" in url:
        where = sentinel_address(url)
        auth = {"username": where.username, "password": where.password}
        # rediss+sentinel://: TLS to the sentinels too (they are sent the URL's password).
        sentinel = Sentinel(list(where.sentinels), sentinel_kwargs={**auth, **common, "ssl": where.tls}, **common)
        client: aioredis.Redis = sentinel.master_for(
            where.service, redis_class=aioredis.Redis, connection_pool_class=_BlockingSentinelPool,
            db=where.db, ssl=where.tls, max_connections=64, timeout=settings.socket_timeout_s, **auth,
        )  # fmt: skip
        return client
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=64, timeout=settings.socket_timeout_s, **common
    )
    return aioredis.Redis.from_pool(pool)  # the client owns the pool: aclose() closes it


def is_cluster(client: aioredis.Redis) -> bool:
    """Whether connect() made a RedisCluster."""
    return isinstance(client, RedisCluster)


def _sentinel_pool(client: aioredis.Redis) -> SentinelConnectionPool | None:
    pool = None if is_cluster(client) else client.connection_pool
    return pool if isinstance(pool, SentinelConnectionPool) else None


# -- the coalesced pipeline --------------------------------------------------------------------------


@dataclass(slots=True)
class _Lane:
    """One coalesced pipeline: its queue, its flusher, and its connection (raw, per Cluster node, or pooled)."""

    raw: RawPipe | None = None
    nodes: NodePipes | None = None
    pending: list[Pending] = field(default_factory=list)
    flusher: asyncio.Task[None] | None = None

    def close(self) -> None:
        if self.raw is not None:
            self.raw.close()
        if self.nodes is not None:
            self.nodes.close()


@raises_store_errors
class Connection:
    """The pooled client (``redis``) and the coalesced pipeline (``call``) that every store part uses."""

    def __init__(self, client: aioredis.Redis, settings: RedisSettings) -> None:
        self.redis: aioredis.Redis = client
        self.sentinel = _sentinel_pool(client) is not None
        self.cluster = is_cluster(client)
        self.settings = settings
        self.shards = settings.shards
        self._lane = self._new_lane()
        # With an ack policy that waits (WAIT/WAITAOF: tens of ms on an everysec server), the ingress writes
        # go on a lane of their own: the forwarder's acks and the state reads never queue behind a wait.
        self._waiting = self._new_lane()
        self.ack = AckPolicy()  # what a 202 waits for: set by configure_ack() once the server is known

    def _new_lane(self) -> _Lane:
        if self.cluster:
            return _Lane(nodes=NodePipes(cast(RedisCluster, self.redis), self.settings.socket_timeout_s))
        pool = self.redis.connection_pool
        if issubclass(pool.connection_class, aioredis.SSLConnection):
            return _Lane()  # rediss:// keeps redis-py's pipeline: the raw connection speaks TCP or a unix socket
        sentinel = _sentinel_pool(self.redis)
        address = sentinel.get_master_address if sentinel is not None else None
        return _Lane(raw=RawPipe(pool.connection_kwargs, self.settings.socket_timeout_s, address))

    @property
    def _raw(self) -> RawPipe | None:
        return self._lane.raw

    async def persistence(self) -> dict[str, str]:
        """appendonly/appendfsync as Redis reports them ({} if CONFIG is not allowed, e.g. managed Redis)."""
        try:
            raw: dict[Any, Any] = await self.redis.config_get("append*")
        except RedisError:
            return {}
        return {text(k): text(v) for k, v in raw.items() if text(k) in {"appendonly", "appendfsync"}}

    def _targets(self) -> list[dict[str, Any]]:
        """Keyword arguments addressing each server: none for one server, each primary of a Cluster (whose
        client sends CONFIG GET and INFO to one random node unless told)."""
        if not self.cluster:
            return [{}]
        return [{"target_nodes": node} for node in cast(RedisCluster, self.redis).get_primaries()]

    async def answer(self) -> None:
        """PING; StoreUnavailable, with Redis's or the socket's words, when it does not answer."""
        await self.redis.ping()

    async def server_settings(self) -> tuple[list[dict[str, str]], str]:
        """Per server (one, or each primary of a Cluster): its ``append*`` and ``maxmemory*`` settings; and why
        CONFIG was refused ("" if it was not: a managed Redis refuses it)."""
        servers: list[dict[str, str]] = []
        try:
            for target in self._targets():
                raw: dict[Any, Any] = await self.redis.config_get("append*", **target)
                raw.update(await self.redis.config_get("maxmemory*", **target))
                servers.append({text(k): text(v) for k, v in raw.items()})
        except ResponseError as exc:  # NOPERM, unknown command
            return [], str(exc)
        return servers, ""

    async def aof_enabled(self) -> bool | None:
        """Whether the (first) server runs an append-only file, from INFO (None if it does not say)."""
        info: dict[str, Any] = await self.redis.info("persistence", **self._targets()[0])
        aof = info.get("aof_enabled")
        return None if aof is None else bool(int(aof))

    async def configure_ack(self, *, sentinel: bool) -> AckPolicy:
        """Resolve ``[redis] ack_*`` against the server's persistence (relay.store.durability) and use it.

        ValueError when the settings ask what the server cannot give."""
        found = await self.persistence()
        if self.cluster:  # every primary: the policy holds for the weakest of them
            servers, _ = await self.server_settings()
            if servers:
                aof = "no" if any(c.get("appendonly") == "no" for c in servers) else "yes"
                always = all(c.get("appendfsync") == "always" for c in servers)
                found = {"appendonly": aof, "appendfsync": "always" if always else "everysec"}
        if not found:  # CONFIG refused (a managed Redis): INFO still says whether AOF is on
            per: dict[str, Any] = await self.redis.info("persistence")
            if "aof_enabled" in per:
                found = {"appendonly": "yes" if int(per["aof_enabled"]) else "no"}
        self.ack = resolve_ack(self.settings, found, sentinel=sentinel)
        return self.ack

    async def memory(self) -> dict[str, int]:
        """Redis's ``used_memory``, ``maxmemory`` (0: no limit) and ``aof_current_size`` (0 without AOF), from
        INFO memory and INFO persistence (a key a managed Redis leaves out is left out here)."""
        if self.cluster:  # the primary nearest its limit (the one that refuses first)
            cluster = cast(RedisCluster, self.redis)
            each = [await self._memory_of(cluster, node) for node in cluster.get_primaries()]
            return max(each, key=lambda m: m.get("used_memory", 0) / (m.get("maxmemory") or 1 << 62), default={})
        return await self._memory_of(self.redis)

    @staticmethod
    async def _memory_of(client: Any, node: Any = None) -> dict[str, int]:
        target = {} if node is None else {"target_nodes": node}
        mem: dict[str, Any] = await client.info("memory", **target)
        per: dict[str, Any] = await client.info("persistence", **target)
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
        for lane in (self._lane, self._waiting):
            if lane.flusher is not None:
                with contextlib.suppress(Exception):
                    await lane.flusher
            lane.close()
        await self.redis.aclose()

    def call(self, *args: Any, durable: bool = False) -> asyncio.Future[Any]:
        """Queue one command for the next coalesced pipeline; the future gets its reply or a StoreUnavailable.

        ``durable``: a write the 202 depends on; it fails with NotDurable when the ack policy
        (relay.store.durability) is not met in time."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        lane = self._waiting if durable and self.ack.command is not None else self._lane
        lane.pending.append(Pending(args, fut, durable))
        if lane.flusher is None:
            lane.flusher = asyncio.create_task(self._flush_loop(lane))
        return fut

    async def _flush_loop(self, lane: _Lane) -> None:
        # One pipeline per round trip: whatever arrived while the previous one was in flight.
        try:
            while lane.pending:
                batch, lane.pending = lane.pending, []
                await self._flush(batch, lane)
        finally:
            lane.flusher = None

    async def _flush(self, batch: list[Pending], lane: _Lane) -> None:
        try:
            results = await self._execute(batch, lane)
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
                item.future.set_exception(
                    result if isinstance(result, StoreError)
                    else translate(result) if is_oom(result) else StoreUnavailable(f"redis: {result}")
                )  # fmt: skip
            else:
                item.future.set_result(result)

    async def _execute(self, batch: list[Pending], lane: _Lane, *, reload: bool = True) -> list[Any]:
        results: list[Any]
        commands = [item.args for item in batch]
        ack = self.ack.command if any(item.durable for item in batch) else None
        if ack is not None:
            commands.append(ack)
        if lane.nodes is not None:
            results = await lane.nodes.execute(batch, self.ack.command, self._confirm)
            ack = None  # confirmed per node
        elif lane.raw is not None:
            results = await lane.raw.execute(commands)
        else:
            results = await pipelined(
                self.redis, lambda pipe: [pipe.execute_command(*c) for c in commands], raise_on_error=False
            )
        if ack is not None:
            self._confirm(batch, results, results.pop())
        lost = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if lost and reload:
            # Redis lost its script cache (restart, failover). A NOSCRIPT reply means that command
            # did nothing, so only those commands are sent again (a script's SHA never changes).
            await scripts.load(self.redis, scripts.ALL)
            again = await self._execute([batch[i] for i in lost], lane, reload=False)
            for i, r in zip(lost, again, strict=True):
                results[i] = r
        return results

    def _confirm(self, batch: list[Pending], results: list[Any], reply: Any) -> None:
        """Fail the batch's durable writes with NotDurable when the ack command's reply falls short."""
        if self.ack.met(reply):
            return
        log.warning("ack_not_met", policy=self.ack.describe(), reply=repr(reply))
        err = NotDurable(f"not confirmed in time ({self.ack.describe()}; got {reply!r}): send again")
        for i, item in enumerate(batch):
            if item.durable and not isinstance(results[i], Exception):
                results[i] = err


class Part:
    """The operations of one job, on top of a Store's connection (its pooled client and coalesced pipeline)."""

    def __init__(self, store: Connection) -> None:
        self.store = store
        self.redis: aioredis.Redis = store.redis
