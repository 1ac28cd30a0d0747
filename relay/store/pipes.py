"""The raw connections of the coalesced pipeline: hiredis packs the commands and parses the replies.

``RawPipe`` is one connection to one server (a unix socket, TCP, or the primary the sentinels name);
``NodePipes`` splits a batch per Cluster primary by the slot of each command's key and follows redirections.
relay.store.connection queues the commands (``Connection.call``) and owns these.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import hiredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import SSLConnection
from redis.crc import key_slot
from redis.exceptions import NoScriptError, RedisError, ResponseError


@dataclass(slots=True)
class Pending:
    args: tuple[Any, ...]
    future: asyncio.Future[Any]
    durable: bool = False  # an ingress write: its batch ends with the ack policy's command


class RawPipe:
    """A dedicated connection for the coalesced pipelines: hiredis packs the commands and parses the replies.

    redis-py's Pipeline costs several microseconds per command (a coroutine, an asyncio timeout and a
    response-callback lookup per reply); here one pipeline is one write, one timeout and a gets() loop.
    """

    def __init__(
        self,
        kwargs: dict[str, Any],
        timeout_s: float,
        address: Callable[[], Awaitable[tuple[str, int]]] | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.kw = kwargs
        self.timeout_s = timeout_s
        self.tls = tls  # rediss:// (a Cluster's nodes): the same context redis-py's own connections use
        # Sentinel: the primary's address is asked of the sentinels at every (re)connect, so a failover
        # is followed by the next pipeline after the old primary's connection broke or turned read-only.
        self.address = address
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._parser = hiredis.Reader()

    async def _connect(self) -> None:
        if self.kw.get("path"):
            r, w = await asyncio.open_unix_connection(self.kw["path"])
        else:
            where = self.address() if self.address else None
            host, port = await where if where else (self.kw.get("host", "localhost"), self.kw.get("port", 6379))
            if self.tls is not None:
                name = host if self.tls.check_hostname else None
                r, w = await asyncio.open_connection(host, port, ssl=self.tls, server_hostname=name)
            else:
                r, w = await asyncio.open_connection(host, port)
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
                replies = [_reply(r) for r in await self._roundtrip(commands)]
        except BaseException:
            self.close()  # unread replies would answer the next pipeline: never reuse a broken one
            raise
        if any(isinstance(r, ResponseError) and str(r).startswith("READONLY") for r in replies):
            self.close()  # the primary was demoted (a failover): the next pipeline asks where the new one is
        return replies

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


def _key_of(args: tuple[Any, ...]) -> Any:
    """The key a coalesced command works on: EVALSHA's first key, else its first argument."""
    return args[3] if args[0] in ("EVALSHA", "EVAL") else args[1]


def _redirect(reply: Any) -> tuple[str, str] | None:
    """("MOVED"|"ASK", "host:port") of a cluster redirection reply, else None."""
    if isinstance(reply, ResponseError):
        head, _, rest = str(reply).partition(" ")
        if head in ("MOVED", "ASK"):
            return head, rest.rpartition(" ")[2]
    return None


class NodePipes:
    """Cluster: the coalesced pipeline split per primary, one RawPipe each, by the slot of each command's key.

    The slot map is redis-py's (RedisCluster.nodes_manager). A MOVED reply means the command did nothing
    there: the map is refreshed and the command sent again to the new owner; an ASK (a slot migrating)
    sends it once to the target after ASKING. A broken connection fails that node's commands only.
    """

    def __init__(self, cluster: RedisCluster, timeout_s: float) -> None:
        self.cluster = cluster
        self.timeout_s = timeout_s
        self._pipes: dict[str, RawPipe] = {}
        kw = cluster.get_connection_kwargs()
        # rediss://: TLS with the context redis-py builds from the URL's options (never plain text, never a
        # password in clear).
        self._tls = _tls_context(kw)

    def _pipe(self, address: str) -> RawPipe:
        pipe = self._pipes.get(address)
        if pipe is None:
            host, _, port = address.rpartition(":")
            kw = {**self.cluster.get_connection_kwargs(), "host": host, "port": int(port), "db": 0}
            pipe = self._pipes[address] = RawPipe(kw, self.timeout_s, tls=self._tls)
        return pipe

    def close(self) -> None:
        for pipe in self._pipes.values():
            pipe.close()
        self._pipes.clear()

    async def execute(
        self,
        batch: list[Pending],
        ack: tuple[Any, ...] | None,
        confirm: Callable[[list[Pending], list[Any], Any], None],
    ) -> list[Any]:
        """The replies of the batch's commands, in order; durable writes confirmed per node with ``ack``."""
        out: list[Any] = [None] * len(batch)
        todo = list(range(len(batch)))
        for attempt in range(3):
            groups = self._route(batch, todo, out)
            sent = await asyncio.gather(
                *(self._send(a, [batch[i] for i in g], ack, confirm) for a, g in groups.items()), return_exceptions=True
            )
            moved: list[int] = []
            asked: dict[str, list[int]] = {}
            for group, replies in zip(groups.values(), sent, strict=True):
                if isinstance(replies, BaseException) and not isinstance(replies, Exception):
                    raise replies
                each = replies if isinstance(replies, list) else [replies] * len(group)  # a node's error: all of it
                for i, reply in zip(group, each, strict=True):
                    redirect = _redirect(reply)
                    if redirect is None or attempt == 2:
                        out[i] = reply
                    elif redirect[0] == "MOVED":
                        moved.append(i)
                    else:  # ASK: once, at the target after ASKING (a migrating slot), confirmed there
                        asked.setdefault(redirect[1], []).append(i)
            if asked:
                await self._asked(batch, asked, ack, confirm, out)
            if moved or any(isinstance(r, (ConnectionError, OSError)) for r in out):
                with contextlib.suppress(RedisError, OSError):
                    await self.cluster.nodes_manager.initialize()  # a node left or slots moved: ask the cluster
            if not moved:
                break
            todo = moved
        return out

    async def _asked(
        self,
        batch: list[Pending],
        asked: dict[str, list[int]],
        ack: tuple[Any, ...] | None,
        confirm: Callable[[list[Pending], list[Any], Any], None],
        out: list[Any],
    ) -> None:
        """Send the ASK-redirected commands to their targets (each after ASKING, the ack command after them);
        a target that fails fails its own commands only."""
        sent = await asyncio.gather(
            *(self._send(t, [batch[i] for i in g], ack, confirm, asking=True) for t, g in asked.items()),
            return_exceptions=True,
        )
        for group, replies in zip(asked.values(), sent, strict=True):
            if isinstance(replies, BaseException) and not isinstance(replies, Exception):
                raise replies
            each = replies if isinstance(replies, list) else [replies] * len(group)
            for i, reply in zip(group, each, strict=True):
                out[i] = reply

    def _route(self, batch: list[Pending], todo: list[int], out: list[Any]) -> dict[str, list[int]]:
        """The batch's commands ``todo`` by primary ("host:port"); a slot nobody serves fails its command."""
        groups: dict[str, list[int]] = {}
        for i in todo:
            try:
                node = self.cluster.nodes_manager.get_node_from_slot(key_slot(_encode(_key_of(batch[i].args))))
            except RedisError as exc:  # a slot no primary serves (the cluster is failing over)
                out[i] = exc
                continue
            groups.setdefault(node.name, []).append(i)
        return groups

    async def _send(
        self,
        address: str,
        items: list[Pending],
        ack: tuple[Any, ...] | None,
        confirm: Callable[[list[Pending], list[Any], Any], None],
        *,
        asking: bool = False,
    ) -> list[Any]:
        commands: list[tuple[Any, ...]] = []
        for item in items:
            commands += [("ASKING",), item.args] if asking else [item.args]
        wait = ack is not None and any(item.durable for item in items)
        if wait:
            commands.append(ack)  # type: ignore[arg-type]
        replies = await self._pipe(address).execute(commands)
        ack_reply = replies.pop() if wait else None
        if asking:
            replies = replies[1::2]  # each command's reply, not its ASKING's OK
        if wait:
            confirm(items, replies, ack_reply)
        return replies


def _tls_context(kw: dict[str, Any]) -> ssl.SSLContext | None:
    """The TLS context of a rediss:// cluster's connections, as redis-py builds it from the URL's options."""
    cls = kw.get("connection_class")
    if cls is None or not issubclass(cls, SSLConnection):
        return None
    options: dict[str, Any] = {k: v for k, v in kw.items() if k.startswith("ssl_")}
    context: ssl.SSLContext = SSLConnection(**options).ssl_context.get()
    return context


def _encode(key: Any) -> bytes:
    return key if isinstance(key, bytes) else str(key).encode()
