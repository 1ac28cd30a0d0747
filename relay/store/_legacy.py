"""The only module that talks to Redis: appending events, consumer groups, acks, leases, dead letters.

Concurrent appends are coalesced into one pipeline per Redis round trip: the per-request round
trip costs more CPU in the client than HTTP and validation together (see bench/ingress.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import hiredis
import msgspec
import redis.asyncio as aioredis
import structlog
from redis.exceptions import NoScriptError, RedisError, ResponseError

from relay.config import MODULES, RedisSettings
from relay.errors import Conflict, NoGroup, StoreError, StoreUnavailable
from relay.events import Event, decode, encode
from relay.ordering import shard_of
from relay.store import keys as K

log = structlog.get_logger(__name__)
_C = TypeVar("_C", bound=type)


def translate(exc: BaseException) -> StoreUnavailable:
    """A redis-py or socket error as the store's own: NoGroup for a vanished group, else StoreUnavailable."""
    if isinstance(exc, ResponseError) and "NOGROUP" in str(exc):
        return NoGroup(str(exc))
    return StoreUnavailable(f"redis: {exc.__class__.__name__}: {exc}")


def raises_store_errors(cls: _C) -> _C:
    """Wrap every public coroutine method so callers see StoreError subclasses only, never redis-py's."""
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

# A session update records itself as its session's latest; a CDR notes that id as the one it must
# wait for. Both in one script, so "accepted before the CDR" is decided by Redis, not by timing.
_APPEND_SESSION = """
local id = redis.call('XADD', KEYS[1], '*', 'e', ARGV[1])
redis.call('HSET', KEYS[2], ARGV[2], id)
return id
"""
_APPEND_CDR = """
local after = redis.call('HGET', KEYS[2], ARGV[2])
if after then
  return redis.call('XADD', KEYS[1], '*', 'e', ARGV[1], 'a', after)
end
return redis.call('XADD', KEYS[1], '*', 'e', ARGV[1])
"""


# One event and the current state of its object, in one step (so they never disagree).
# KEYS: stream, session-last, state hash, index zset
# ARGV: envelope, kind ('session'|'cdr'|''), ordering key, mode ('put'|'cas'|'del'|'none'),
#       state field, expected version (cas), document, score (last_updated ms), index member
# Returns the stream id, or false when a 'cas' or 'none' finds another version than the one the
# caller read (the caller reads and merges again): 'none' (nothing to merge into) is a decision
# taken on that read too, and must not stand if the object appeared or changed in between.
_COMMIT = """
local mode = ARGV[4]
local ver = 0
local cur = redis.call('HGET', KEYS[3], ARGV[5])
if cur then ver = tonumber(string.match(cur, '^(%d+)|')) or 0 end
if (mode == 'cas' or mode == 'none') and ver ~= tonumber(ARGV[6]) then return false end
local id
if ARGV[2] == 'cdr' then
  local after = redis.call('HGET', KEYS[2], ARGV[3])
  if after then id = redis.call('XADD', KEYS[1], '*', 'e', ARGV[1], 'a', after)
  else id = redis.call('XADD', KEYS[1], '*', 'e', ARGV[1]) end
else
  id = redis.call('XADD', KEYS[1], '*', 'e', ARGV[1])
  if ARGV[2] == 'session' then redis.call('HSET', KEYS[2], ARGV[3], id) end
end
if mode == 'put' or mode == 'cas' then
  redis.call('HSET', KEYS[3], ARGV[5], (ver + 1) .. '|' .. ARGV[7])
  redis.call('ZADD', KEYS[4], ARGV[8], ARGV[9])
elseif mode == 'del' then
  redis.call('HDEL', KEYS[3], ARGV[5])
  redis.call('ZREM', KEYS[4], ARGV[9])
end
return id
"""


@dataclass(frozen=True, slots=True)
class StateWrite:
    """How an event changes its object's stored state."""

    mode: str  # put | cas | del | none (cas and none: only if the stored version is still ``expected``)
    field: str
    member: str
    country_code: str
    party_id: str
    doc: bytes = b""
    score: int = 0
    expected: int = 0


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
class Store:
    """Typed Redis operations of the relay."""

    def __init__(self, client: aioredis.Redis, settings: RedisSettings) -> None:
        # Any: redis-py's asyncio annotations type pipeline calls as awaitables and replies as
        # unions of every encoding; the typed methods below are the boundary instead.
        self.redis: Any = client
        pool = client.connection_pool
        # rediss:// keeps redis-py's pipeline: the raw connection speaks plain TCP or a unix socket.
        tls = issubclass(pool.connection_class, aioredis.SSLConnection)
        self._raw = None if tls else _RawPipe(pool.connection_kwargs, settings.socket_timeout_s)
        self.settings = settings
        self.shards = settings.shards
        self._pending: list[_Pending] = []
        self._flusher: asyncio.Task[None] | None = None
        self._sha: dict[str, str] = {}

    # -- set-up -------------------------------------------------------------------------------

    async def load_scripts(self) -> None:
        """Register the Lua scripts; called at start and again after a NOSCRIPT (Redis restarted)."""
        for name, src in (("session", _APPEND_SESSION), ("cdr", _APPEND_CDR), ("commit", _COMMIT)):
            self._sha[name] = await self.redis.script_load(src)

    async def ensure_groups(self) -> None:
        """Create every stream and its consumer group (idempotent; also the cure for NOGROUP)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for module in MODULES:
                for shard in range(self.shards):
                    pipe.xgroup_create(K.stream_key(module, shard), K.GROUP, id="0", mkstream=True)
            results = await pipe.execute(raise_on_error=False)
        for r in results:
            if isinstance(r, Exception) and "BUSYGROUP" not in str(r):
                raise r

    async def check_shard_count(self) -> int | None:
        """The shard count recorded in Redis by the first replica; a different one would break order."""
        recorded = await self.redis.hget(K.META_KEY, "shards")
        if recorded is None:
            await self.redis.hsetnx(K.META_KEY, "shards", self.shards)
            return None
        return int(recorded)

    async def persistence(self) -> dict[str, str]:
        """appendonly/appendfsync as Redis reports them ({} if CONFIG is not allowed, e.g. managed Redis)."""
        try:
            raw: dict[Any, Any] = await self.redis.config_get("append*")
        except RedisError:
            return {}
        return {_s(k): _s(v) for k, v in raw.items() if _s(k) in {"appendonly", "appendfsync"}}

    async def ping(self) -> bool:
        """True if Redis answers."""
        try:
            return bool(await self.redis.ping())
        except (RedisError, OSError):
            return False

    async def close(self) -> None:
        """Flush pending appends, then close the connection pool."""
        if self._flusher is not None:
            with contextlib.suppress(Exception):
                await self._flusher
        if self._raw is not None:
            self._raw.close()
        await self.redis.aclose()

    # -- appending ----------------------------------------------------------------------------

    def _append_args(self, event: Event) -> tuple[Any, ...]:
        shard = shard_of(event.key, self.shards)
        stream = K.stream_key(event.module, shard)
        payload = encode(event)
        if event.module == "sessions":
            return ("EVALSHA", self._sha["session"], 2, stream, K.session_last_key(shard), payload, event.key)
        if event.module == "cdrs":
            return ("EVALSHA", self._sha["cdr"], 2, stream, K.session_last_key(shard), payload, event.key)
        return ("XADD", stream, "*", K.ENTRY_FIELD, payload)

    async def append(self, event: Event) -> str:
        """Durably add one event to its stream; returns the stream id. Raises StoreUnavailable.

        Failure policy: the caller answers 2xx only after this returns, i.e. after Redis
        acknowledged the write (and fsynced it with appendfsync always, and WAIT-ed for replicas
        when configured). Each event is one XADD or one script: all or nothing.
        """
        return _s(await self.call(*self._append_args(event)))

    def call(self, *args: Any) -> asyncio.Future[Any]:
        """Queue one command for the next coalesced pipeline; the future gets its reply."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(args, fut))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_loop())
        return fut

    def _commit_args(self, event: Event, write: StateWrite) -> tuple[Any, ...]:
        shard = shard_of(event.key, self.shards)
        kind = "session" if event.module == "sessions" else "cdr" if event.module == "cdrs" else ""
        return (
            "EVALSHA", self._sha["commit"], 4,
            K.stream_key(event.module, shard), K.session_last_key(shard), K.state_key(event.module, shard),
            K.index_key(event.module, shard, write.country_code, write.party_id),
            encode(event), kind, event.key, write.mode, write.field, write.expected, write.doc, write.score,
            write.member,
        )  # fmt: skip

    async def commit(self, event: Event, write: StateWrite) -> str:
        """Append the event and apply its state change atomically; raises Conflict or StoreUnavailable.

        Failure policy: as append(); a 'cas' write that finds a newer version stores nothing.
        """
        result = await self.call(*self._commit_args(event, write))
        if result is None:
            raise Conflict(write.field)
        return _s(result)

    async def commit_many(self, items: Sequence[tuple[Event, StateWrite]]) -> list[str | StoreUnavailable]:
        """commit() for a batch of unconditional writes, in one pipeline."""
        futures = [self.call(*self._commit_args(ev, w)) for ev, w in items]
        out: list[str | StoreUnavailable] = []
        for fut in futures:
            try:
                out.append(_s(await fut))
            except StoreUnavailable as exc:
                out.append(exc)
        return out

    async def read_state(self, module: str, key: str, field: str) -> tuple[int, bytes | None]:
        """(version, JSON document) of an object's stored state; (0, None) if unknown."""
        raw = await self.call("HGET", K.state_key(module, shard_of(key, self.shards)), field)
        return split_state(raw)

    async def append_many(self, events: Sequence[Event]) -> list[str | StoreUnavailable]:
        """Append a batch in one pipeline; each item succeeds or fails on its own."""
        loop = asyncio.get_running_loop()
        items = [_Pending(self._append_args(e), loop.create_future()) for e in events]
        self._pending.extend(items)
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_loop())
        results: list[str | StoreUnavailable] = []
        for item in items:
            try:
                results.append(_s(await item.future))
            except StoreUnavailable as exc:
                results.append(exc)
        return results

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
                item.future.set_exception(StoreUnavailable(f"redis: {result}"))
            else:
                item.future.set_result(result)

    async def _execute(self, batch: list[_Pending], *, reload: bool = True) -> list[Any]:
        results: list[Any]
        if self._raw is not None:
            commands = [item.args for item in batch]
            if self.settings.wait_replicas:
                commands.append(("WAIT", self.settings.wait_replicas, self.settings.wait_timeout_ms))
            results = await self._raw.execute(commands)
        else:
            async with self.redis.pipeline(transaction=False) as pipe:
                for item in batch:
                    pipe.execute_command(*item.args)
                if self.settings.wait_replicas:
                    pipe.execute_command("WAIT", self.settings.wait_replicas, self.settings.wait_timeout_ms)
                results = await pipe.execute(raise_on_error=False)
        if self.settings.wait_replicas:
            acked = results.pop()
            if isinstance(acked, int) and acked < self.settings.wait_replicas:
                log.warning("replicas_lagging", wanted=self.settings.wait_replicas, acked=acked)
        lost = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if lost and reload:
            # Redis lost its script cache (restart, failover). A NOSCRIPT reply means that command
            # did nothing, so only those commands are sent again (a script's SHA never changes).
            await self.load_scripts()
            again = await self._execute([batch[i] for i in lost], reload=False)
            for i, r in zip(lost, again, strict=True):
                results[i] = r
        return results

    # -- inspection ---------------------------------------------------------------------------

    async def stream_lengths(self) -> dict[str, int]:
        """Entries in each module's streams (all shards), delivered or not."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for module in MODULES:
                for shard in range(self.shards):
                    pipe.xlen(K.stream_key(module, shard))
            lengths = await pipe.execute()
        out: dict[str, int] = {}
        for i, module in enumerate(MODULES):
            out[module] = sum(lengths[i * self.shards : (i + 1) * self.shards])
        return out

    async def peek(self, module: str, count: int) -> list[tuple[str, bytes]]:
        """The first ``count`` entries of a module, shard by shard (for the CLI)."""
        out: list[tuple[str, bytes]] = []
        for shard in range(self.shards):
            rows = await self.redis.xrange(K.stream_key(module, shard), count=count - len(out))
            out += [(_s(sid), fields[K.ENTRY_FIELD.encode()]) for sid, fields in rows]
            if len(out) >= count:
                break
        return out


def split_state(raw: bytes | None) -> tuple[int, bytes | None]:
    """``b"3|{...}"`` → (3, b"{...}")."""
    if raw is None:
        return 0, None
    ver, _, doc = raw.partition(b"|")
    return int(ver), doc


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def is_nogroup(exc: BaseException) -> bool:
    """A consumer group vanished (Redis restarted without persistence, or the stream was deleted)."""
    return isinstance(exc, NoGroup) or (isinstance(exc, ResponseError) and "NOGROUP" in str(exc))


# -- the delivery side ---------------------------------------------------------------------------

# Stream ids compare as (milliseconds, sequence), not as strings.
_LUA_GT = """
local function gt(a, b)
  if not b then return true end
  local am, as = string.match(a, '(%d+)-(%d+)')
  local bm, bs = string.match(b, '(%d+)-(%d+)')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am > bm or (am == bm and as > bs)
end
"""
# KEYS: stream, delivered, session-done, session-last
# ARGV: group, id, module|key, session key ('' unless a session), cdr key ('' unless a CDR), cdr's after id
_FINISH = (
    _LUA_GT
    + """
local n = redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
-- The first to finish an entry is the one that deletes it. (XACK alone cannot tell: it counts 0
-- when the group was recreated after NOGROUP, and a delivered session update must still count.)
local d = redis.call('XDEL', KEYS[1], ARGV[2])
if d == 1 then
  if gt(ARGV[2], redis.call('HGET', KEYS[2], ARGV[3])) then redis.call('HSET', KEYS[2], ARGV[3], ARGV[2]) end
  if ARGV[4] ~= '' and gt(ARGV[2], redis.call('HGET', KEYS[3], ARGV[4])) then
    redis.call('HSET', KEYS[3], ARGV[4], ARGV[2])
  end
  if ARGV[5] ~= '' and redis.call('HGET', KEYS[4], ARGV[5]) == ARGV[6] then
    -- the session is over: its CDR is out and no update came after it; forget its watermarks
    redis.call('HDEL', KEYS[4], ARGV[5])
    redis.call('HDEL', KEYS[3], ARGV[5])
  end
end
return n
"""
)
# KEYS: stream, dlq, session-done, parked
# ARGV: group, id, envelope, info, session key or '', after or '', park field or ''
_DEAD = (
    _LUA_GT
    + """
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
-- Only the first to finish the entry writes the dead letter (see _FINISH).
if redis.call('XDEL', KEYS[1], ARGV[2]) == 0 then return false end
local fields = {'e', ARGV[3], 'i', ARGV[4], 's', ARGV[2]}
if ARGV[6] ~= '' then table.insert(fields, 'a'); table.insert(fields, ARGV[6]) end
local dead = redis.call('XADD', KEYS[2], '*', unpack(fields))
if ARGV[5] ~= '' and gt(ARGV[2], redis.call('HGET', KEYS[3], ARGV[5])) then
  redis.call('HSET', KEYS[3], ARGV[5], ARGV[2])
end
if ARGV[7] ~= '' then redis.call('HSETNX', KEYS[4], ARGV[7], dead) end
return dead
"""
)
# KEYS: lease. ARGV: me, ttl ms. Returns the previous holder ('' none, 'free:x' released), or false.
_LEASE_ACQUIRE = """
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]); return 'self' end
if v and string.sub(v, 1, 5) ~= 'free:' then return false end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return v or ''
"""
_LEASE_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_LEASE_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], 'free:' .. ARGV[1], 'PX', ARGV[2]); return 1
end
return 0
"""
# KEYS: dlq, stream, parked. ARGV: dead id, park field. Puts a dead letter back on the ordered path.
_REPLAY = """
local rows = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #rows == 0 then return false end
local f = rows[1][2]
local e, a, s
for i = 1, #f, 2 do
  if f[i] == 'e' then e = f[i + 1] elseif f[i] == 'a' then a = f[i + 1] elseif f[i] == 's' then s = f[i + 1] end
end
local id
if a then id = redis.call('XADD', KEYS[2], '*', 'e', e, 'a', a, 'o', s)
else id = redis.call('XADD', KEYS[2], '*', 'e', e, 'o', s) end
redis.call('XDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[2])
return id
"""

DELIVERY_SCRIPTS = {
    "finish": _FINISH,
    "dead": _DEAD,
    "lease_acquire": _LEASE_ACQUIRE,
    "lease_renew": _LEASE_RENEW,
    "lease_release": _LEASE_RELEASE,
    "replay": _REPLAY,
}


@dataclass(slots=True)
class Entry:
    """One stream entry as the forwarder holds it."""

    stream: str
    shard: int
    id: str
    event: Event
    after: str | None = None  # a CDR waits until its session's done-watermark reaches this id
    origin: str | None = None  # a replayed entry: its id before it was dead-lettered


@dataclass(slots=True)
class DeadLetter:
    """A dead-letter entry with its envelope and the reason, as the CLI shows it."""

    module: str
    shard: int
    id: str
    stream_id: str
    event: Event
    info: dict[str, Any]
    after: str | None = None


def id_tuple(stream_id: str) -> tuple[int, int]:
    """``1700000000000-3`` → (1700000000000, 3), for ordering ids of one stream."""
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


def _entry(stream: str, shard: int, sid: Any, fields: dict[bytes, bytes]) -> Entry:
    after = fields.get(b"a")
    origin = fields.get(b"o")
    return Entry(
        stream=stream,
        shard=shard,
        id=_s(sid),
        event=decode(fields[b"e"]),
        after=after.decode() if after else None,
        origin=origin.decode() if origin else None,
    )


@raises_store_errors
class DeliveryStore:
    """Redis operations of the forwarder and the dead-letter tools, on top of Store's connection."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.redis: Any = store.redis
        self._sha: dict[str, str] = {}
        self._finish_keys: dict[int, tuple[str, str, str]] = {}  # per shard: built once, used per event

    async def load_scripts(self) -> None:
        """Register the delivery scripts (again after NOSCRIPT)."""
        for name, src in DELIVERY_SCRIPTS.items():
            self._sha[name] = await self.redis.script_load(src)

    async def _eval(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            return await self.redis.evalsha(self._sha[name], len(keys), *keys, *args)
        except NoScriptError:
            await self.load_scripts()
            return await self.redis.evalsha(self._sha[name], len(keys), *keys, *args)

    # leases
    async def acquire(self, shard: int, me: str, ttl_ms: int) -> str | None:
        """Take or keep a shard lease; returns the previous holder ('' none, 'self', 'free:x') or None."""
        r = await self._eval("lease_acquire", [K.lease_key(shard)], [me, ttl_ms])
        return None if r is None else _s(r)

    async def renew(self, shard: int, me: str, ttl_ms: int) -> bool:
        """Extend a lease this replica holds; False if it was lost."""
        return bool(await self._eval("lease_renew", [K.lease_key(shard)], [me, ttl_ms]))

    async def release(self, shard: int, me: str, ttl_ms: int) -> None:
        """Hand a shard back cleanly: the next owner need not wait for our in-flight attempts."""
        await self._eval("lease_release", [K.lease_key(shard)], [me, ttl_ms])

    async def heartbeat(self, me: str, now_ms: int, dead_after_ms: int) -> int:
        """Record this replica as alive; returns how many replicas are alive."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(K.REPLICAS_KEY, {me: now_ms})
            pipe.zremrangebyscore(K.REPLICAS_KEY, 0, now_ms - dead_after_ms)
            pipe.zcard(K.REPLICAS_KEY)
            res = await pipe.execute()
        return int(res[2])

    async def leave(self, me: str) -> None:
        """Remove this replica from the live set (graceful stop)."""
        await self.redis.zrem(K.REPLICAS_KEY, me)

    async def link_sync(self, me: str, state: str, reason: str, since: float) -> float | None:
        """Publish a replica's link state; returns when an operator last asked to resume, if ever."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(f"{K.LINK_KEY}:{me}", mapping={"state": state, "reason": reason, "since": since})
            pipe.expire(f"{K.LINK_KEY}:{me}", 60)
            pipe.hget(K.LINK_KEY, "resume_at")
            res = await pipe.execute()
        return float(res[2]) if res[2] is not None else None

    async def request_resume(self, now: float) -> None:
        """Ask every replica to resume a paused or auth-failed link."""
        await self.redis.hset(K.LINK_KEY, "resume_at", now)

    async def link_states(self) -> dict[str, dict[str, str]]:
        """Link state as each live replica last published it."""
        out: dict[str, dict[str, str]] = {}
        async for key in self.redis.scan_iter(match=f"{K.LINK_KEY}:*", count=100):
            raw = await self.redis.hgetall(key)
            out[_s(key).split(":", 2)[2]] = {_s(k): _s(v) for k, v in raw.items()}
        return out

    # reading
    async def read_new(self, streams: dict[str, int], consumer: str, count: int, block_ms: int | None) -> list[Entry]:
        """XREADGROUP ``>`` over several streams (stream → shard), up to ``count`` from each.

        Blocks up to block_ms for the first entry (None: returns at once)."""
        resp = await self.redis.xreadgroup(K.GROUP, consumer, {s: ">" for s in streams}, count=count, block=block_ms)
        out: list[Entry] = []
        for stream, rows in resp or []:
            name = _s(stream)
            out += [_entry(name, streams[name], sid, fields) for sid, fields in rows if fields]
        return out

    async def claim(self, stream: str, shard: int, consumer: str, start: str, count: int) -> tuple[str, list[Entry]]:
        """XAUTOCLAIM every pending entry of a stream (we own its shard), in stream order."""
        res = await self.redis.xautoclaim(stream, K.GROUP, consumer, 0, start_id=start, count=count)
        nxt, rows = _s(res[0]), res[1]
        return nxt, [_entry(stream, shard, sid, fields) for sid, fields in rows if fields]

    async def foreign_pending(self, stream: str, consumer: str) -> int:
        """Pending entries of a stream held by other consumers (a dead or departed replica)."""
        info = await self.redis.xpending(stream, K.GROUP)
        return sum(int(c["pending"]) for c in info.get("consumers", []) if _s(c["name"]) != consumer)

    # finishing
    def finish(self, entry: Entry) -> asyncio.Future[Any]:
        """Ack + delete a delivered entry and advance its watermarks, in one script (coalesced)."""
        ev = entry.event
        keys = self._finish_keys.get(entry.shard)
        if keys is None:
            shard = entry.shard
            keys = self._finish_keys[shard] = (
                K.delivered_key(shard), K.session_done_key(shard), K.session_last_key(shard)
            )  # fmt: skip
        return self.store.call(
            "EVALSHA", self._sha["finish"], 4, entry.stream, *keys,
            K.GROUP, entry.id, f"{ev.module}|{ev.key}",
            ev.key if ev.module == "sessions" else "",
            ev.key if ev.module == "cdrs" else "",
            entry.after or "",
        )  # fmt: skip

    async def dead_letter(self, entry: Entry, info: bytes, *, park: bool) -> str | None:
        """Move an entry to its dead-letter stream with the reason, ack it, maybe park its key."""
        ev = entry.event
        shard = entry.shard
        r = await self._eval(
            "dead",
            [entry.stream, K.dlq_key(ev.module, shard), K.session_done_key(shard), K.parked_key(shard)],
            [
                K.GROUP, entry.id, encode(ev), info,
                ev.key if ev.module == "sessions" else "", entry.after or "",
                f"{ev.module}|{ev.key}" if park else "",
            ],
        )  # fmt: skip
        return None if r is None else _s(r)

    async def parked_fields(self, shard: int) -> set[str]:
        """Every parked ``module|key`` of a shard."""
        return {_s(k) for k in await self.redis.hkeys(K.parked_key(shard))}

    async def parked(self, shard: int, module: str, key: str) -> str | None:
        """The dead-letter id that parked this key, if it is parked (coalesced with other commands)."""
        r = await self.store.call("HGET", K.parked_key(shard), f"{module}|{key}")
        return None if r is None else _s(r)

    async def session_done(self, shard: int, key: str) -> str | None:
        """Stream id of the last delivered or dead-lettered update of a session."""
        r = await self.store.call("HGET", K.session_done_key(shard), key)
        return None if r is None else _s(r)

    async def last_delivered(self, shard: int, module: str, key: str) -> str | None:
        """Stream id of the newest delivered event of an ordering key (the replay guard)."""
        r = await self.redis.hget(K.delivered_key(shard), f"{module}|{key}")
        return None if r is None else _s(r)

    # dead letters
    async def dead_letters(self, module: str, shard: int, start: str = "-", count: int = 100) -> list[DeadLetter]:
        """Dead letters of one module's shard, oldest first, from ``start`` (inclusive)."""
        rows = await self.redis.xrange(K.dlq_key(module, shard), min=start, count=count)
        out = []
        for sid, f in rows:
            out.append(
                DeadLetter(
                    module=module,
                    shard=shard,
                    id=_s(sid),
                    stream_id=_s(f[b"s"]),
                    event=decode(f[b"e"]),
                    info=_info_decoder.decode(f[b"i"]),
                    after=_s(f[b"a"]) if b"a" in f else None,
                )
            )
        return out

    async def replay(self, dead: DeadLetter) -> str | None:
        """Put a dead letter back at the end of its stream (new id) and unpark its key; None if gone."""
        ev = dead.event
        r = await self._eval(
            "replay",
            [K.dlq_key(dead.module, dead.shard), K.stream_key(dead.module, dead.shard), K.parked_key(dead.shard)],
            [dead.id, f"{ev.module}|{ev.key}"],
        )
        return None if r is None else _s(r)

    async def purge(self, dead: DeadLetter) -> bool:
        """Delete a dead letter for good."""
        return bool(await self.redis.xdel(K.dlq_key(dead.module, dead.shard), dead.id))

    async def dlq_lengths(self) -> dict[str, int]:
        """Dead letters per module."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for module in MODULES:
                for shard in range(self.store.shards):
                    pipe.xlen(K.dlq_key(module, shard))
            res = await pipe.execute()
        n = self.store.shards
        return {m: sum(res[i * n : (i + 1) * n]) for i, m in enumerate(MODULES)}

    async def oldest(self) -> dict[str, float | None]:
        """Per module, the ingress time (epoch ms from the stream id) of the oldest undelivered event."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for module in MODULES:
                for shard in range(self.store.shards):
                    pipe.xrange(K.stream_key(module, shard), count=1)
            res = await pipe.execute()
        n = self.store.shards
        out: dict[str, float | None] = {}
        for i, module in enumerate(MODULES):
            firsts = [id_tuple(_s(rows[0][0]))[0] for rows in res[i * n : (i + 1) * n] if rows]
            out[module] = min(firsts) / 1000 if firsts else None
        return out


_info_decoder = msgspec.msgpack.Decoder(dict[str, Any])


# -- registration with the IOP -------------------------------------------------------------------

REGISTRATION_KEY = f"{K.PREFIX}:registration"
TOKEN_A_KEY = f"{K.PREFIX}:token-a"
TOKEN_A_USED_KEY = f"{K.PREFIX}:token-a-used"


@raises_store_errors
class RegistrationStore:
    """The credentials handshake's durable state: one JSON document and the pending token A."""

    def __init__(self, store: Store) -> None:
        self.redis: Any = store.redis

    async def load(self) -> tuple[bytes | None, str | None, set[str]]:
        """(registration JSON or None, pending token A or None, digests of used A tokens)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(REGISTRATION_KEY)
            pipe.get(TOKEN_A_KEY)
            pipe.smembers(TOKEN_A_USED_KEY)
            reg, token_a, used = await pipe.execute()
        return reg, _s(token_a) if token_a else None, {_s(u) for u in used}

    async def save(self, registration: bytes, used_token_a_digest: str | None = None) -> None:
        """Replace the registration; a token A that was just used is retired in the same transaction."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(REGISTRATION_KEY, registration)
            if used_token_a_digest is not None:
                pipe.delete(TOKEN_A_KEY)
                pipe.sadd(TOKEN_A_USED_KEY, used_token_a_digest)
            await pipe.execute()

    async def set_token_a(self, token: str) -> None:
        """A new one-time token A for the next Register – FromIOP."""
        await self.redis.set(TOKEN_A_KEY, token)

    async def withdraw_token_a(self, token: str, restore: str | None = None) -> bool:
        """Take back a pending token A if it is still this one, putting ``restore`` back in its place."""
        script = (
            "if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end "
            "if ARGV[2] == '' then redis.call('DEL', KEYS[1]) else redis.call('SET', KEYS[1], ARGV[2]) end "
            "return 1"
        )
        return bool(await self.redis.eval(script, 1, TOKEN_A_KEY, token, restore or ""))


# -- current state, as the Sender interfaces read it ----------------------------------------------


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a Sender list: the total matching, and the documents in order."""

    total: int
    docs: list[tuple[str, bytes]]  # (state field, JSON document)


@raises_store_errors
class StateReader:
    """Reads of the state store for the OCPI listener (never writes)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.redis: Any = store.redis

    async def page(self, module: str, operators: Sequence[tuple[str, str]], date_from_ms: int | None,
                   date_to_ms: int | None, offset: int, limit: int) -> Page:  # fmt: skip
        """Objects of these operators with date_from <= last_updated < date_to, by (last_updated, id)."""
        lo = str(date_from_ms) if date_from_ms is not None else "-inf"
        hi = f"({date_to_ms}" if date_to_ms is not None else "+inf"
        sources = [(cc, pid, shard) for cc, pid in operators for shard in range(self.store.shards)]
        async with self.redis.pipeline(transaction=False) as pipe:
            for cc, pid, shard in sources:
                idx = K.index_key(module, shard, cc, pid)
                pipe.zcount(idx, lo, hi)
                pipe.zrangebyscore(idx, lo, hi, start=0, num=offset + limit, withscores=True)
            res = await pipe.execute()
        total = sum(int(n) for n in res[0::2])
        merged: list[tuple[float, str, int]] = []
        for (cc, pid, shard), rows in zip(sources, res[1::2], strict=True):
            merged += [(score, f"{cc}:{pid}:{_s(member)}", shard) for member, score in rows]
        merged.sort()
        chosen = merged[offset : offset + limit]
        if not chosen:
            return Page(total, [])
        async with self.redis.pipeline(transaction=False) as pipe:
            for _, fld, shard in chosen:
                pipe.hget(K.state_key(module, shard), fld)
            raws = await pipe.execute()
        docs = [(fld, doc) for (_, fld, _), raw in zip(chosen, raws, strict=True) if (doc := split_state(raw)[1])]
        return Page(total, docs)

    async def one(self, module: str, key: str, fld: str) -> bytes | None:
        """One object's current document (the shard comes from its ordering key)."""
        raw = await self.redis.hget(K.state_key(module, shard_of(key, self.store.shards)), fld)
        return split_state(raw)[1]


# -- tokens from the IOP and commands in progress (K2, K3) ----------------------------------------

COMMANDS_DUE_KEY = f"{K.PREFIX}:commands:due"


def _token_key(token_type: str, uid: str) -> str:
    return f"{K.PREFIX}:token:{token_type}:{uid.upper()}"


@raises_store_errors
class RoamingStore:
    """Tokens pushed by the IOP and commands waiting for their result."""

    def __init__(self, store: Store) -> None:
        self.redis: Any = store.redis

    async def token(self, token_type: str, uid: str, country_code: str, party_id: str) -> bytes | None:
        """One token as the IOP last sent it."""
        raw: bytes | None = await self.redis.hget(_token_key(token_type, uid), f"{country_code}:{party_id}".upper())
        return raw

    async def tokens_by_uid(self, token_type: str, uid: str) -> list[bytes]:
        """Every issuer's token with this uid and type (for offline decisions)."""
        raw: dict[bytes, bytes] = await self.redis.hgetall(_token_key(token_type, uid))
        return list(raw.values())

    async def put_token(self, token_type: str, uid: str, country_code: str, party_id: str, doc: bytes) -> None:
        """Store (replace) a token."""
        await self.redis.hset(_token_key(token_type, uid), f"{country_code}:{party_id}".upper(), doc)

    async def put_command(self, command_id: str, doc: bytes, due_ms: int, ttl_s: int) -> None:
        """Remember a command accepted by the CSMS and when its result is due."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(f"{K.PREFIX}:command:{command_id}", doc, ex=ttl_s)
            pipe.zadd(COMMANDS_DUE_KEY, {command_id: due_ms})
            await pipe.execute()

    async def command(self, command_id: str) -> bytes | None:
        """A command in progress (or recently finished)."""
        raw: bytes | None = await self.redis.get(f"{K.PREFIX}:command:{command_id}")
        return raw

    async def forget_command(self, command_id: str) -> None:
        """A command the CSMS did not accept: no result awaited."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.zrem(COMMANDS_DUE_KEY, command_id)
            pipe.delete(f"{K.PREFIX}:command:{command_id}")
            await pipe.execute()

    async def await_again(self, command_id: str, due_ms: int) -> None:
        """Undo settle() when the result could not be stored."""
        await self.redis.zadd(COMMANDS_DUE_KEY, {command_id: due_ms})

    async def settle(self, command_id: str) -> bool:
        """Take the command off the due list; only the first caller (result or timeout) gets True."""
        return bool(await self.redis.zrem(COMMANDS_DUE_KEY, command_id))

    async def overdue(self, now_ms: int, count: int = 100) -> list[str]:
        """Commands whose result is late."""
        rows = await self.redis.zrangebyscore(COMMANDS_DUE_KEY, "-inf", now_ms, start=0, num=count)
        return [_s(r) for r in rows]
