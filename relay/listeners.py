"""Connection limits of both listeners: header-read and idle timeouts, connection caps, the fd budget.

aiohttp's server has an idle (keep-alive) timeout but no deadline for a request's headers and no cap
on connections, and asyncio accepts whatever arrives: 1,000 clients that connect and send nothing, or
half a header, each held a file descriptor for an hour, and once the process had run out of them the
ingress could not accept the CSMS (while asyncio logged every failed accept).

``GuardedSite`` serves an ``AppRunner`` like ``web.TCPSite``, but runs its own accept loop with a
``Guard`` per listener:

- at ``max_connections`` open connections the listener stops accepting: new connections wait in the
  kernel's accept queue (the listen backlog) until one closes, and cost the process nothing;
- a connection from an address that already has ``max_connections_per_ip`` open is closed at once,
  before any transport, protocol or TLS state is made for it;
- every connection is counted from the accept to its close, TLS handshake included; the handshake
  and then the first request's line and headers must be complete within ``header_timeout_s`` of the
  accept; afterwards aiohttp's keep-alive timeout (``idle_timeout_s``) closes a connection with no
  complete request pending;
- a failed accept (out of file descriptors) is counted, logged at a bounded rate, and retried after
  a pause instead of at once;
- a request body is not timed here: both applications refuse an unauthenticated request before
  reading its body, and aiohttp then stops reading it after ``lingering_time`` (10 s).

The work is per connection (an accept, a timer, two dict updates); nothing is added per request.

``ocpi_connection_budget`` keeps the OCPI listener's cap below what the process's RLIMIT_NOFILE
leaves once the ingress, Redis and outbound connections are served, so the OCPI port cannot take the
descriptors the ingress needs.
"""

from __future__ import annotations

import asyncio
import errno
import os
import resource
import socket
import ssl
import struct
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, cast

import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from relay import metrics
from relay.config import Settings

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Limits:
    """One listener's connection limits (``[ingress]`` / ``[ocpi]`` settings)."""

    header_timeout_s: float
    idle_timeout_s: float
    max_connections: int
    max_connections_per_ip: int = 0  # 0: no per-address cap


def ingress_limits(settings: Settings) -> Limits:
    s = settings.ingress
    return Limits(s.header_timeout_s, s.idle_timeout_s, s.max_connections)


def ocpi_limits(settings: Settings, max_connections: int | None = None) -> Limits:
    """The OCPI listener's limits; ``max_connections`` overrides the setting (the fd budget's cap)."""
    s = settings.ocpi
    return Limits(s.header_timeout_s, s.idle_timeout_s, max_connections or s.max_connections, s.max_connections_per_ip)


def handler_args(limits: Limits) -> dict[str, Any]:
    """AppRunner keyword arguments for a listener: aiohttp closes idle keep-alive connections."""
    return {"keepalive_timeout": limits.idle_timeout_s}


class LogRate:
    """At most ``burst`` lines per ``interval_s``; allow() says how many were held back since the last one."""

    def __init__(self, interval_s: float = 10.0, burst: int = 1, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s, self.burst, self._clock = interval_s, burst, clock
        self._window = -float("inf")
        self._sent = 0
        self.suppressed = 0

    def allow(self) -> int | None:
        """None: do not log this one. Else the number suppressed before it (now reset to 0)."""
        now = self._clock()
        if now - self._window >= self.interval_s:
            self._window, self._sent = now, 0
        if self._sent >= self.burst:
            self.suppressed += 1
            return None
        self._sent += 1
        held, self.suppressed = self.suppressed, 0
        return held


class Guard:
    """One listener's open connections, in all and per client address, and its Limits."""

    def __init__(self, listener: str, limits: Limits, tls: ssl.SSLContext | None = None) -> None:
        assert listener in metrics.LISTENERS, listener
        self.listener = listener
        self.limits = limits
        self.tls = tls
        self.open = 0
        self.per_ip: dict[str, int] = {}
        self.accept_errors = LogRate()
        self._room: asyncio.Event | None = None  # set when a connection closes below the cap
        self._closed = {r: metrics.CONNECTIONS_CLOSED.labels(listener, r) for r in metrics.CONNECTION_CLOSE_REASONS}
        metrics.CONNECTIONS_OPEN.labels(listener).set_function(lambda: self.open)
        metrics.CONNECTIONS_MAX.labels(listener).set(limits.max_connections)

    @property
    def full(self) -> bool:
        return self.open >= self.limits.max_connections

    def admit(self, peer: str) -> bool:
        """Count a new connection from ``peer``; False (counted as refused) over the per-address cap."""
        n = self.per_ip.get(peer, 0)
        cap = self.limits.max_connections_per_ip
        if cap and n >= cap:
            self.closed("max_connections_per_ip")
            return False
        self.per_ip[peer] = n + 1
        self.open += 1
        return True

    def release(self, peer: str) -> None:
        """One admitted connection from ``peer`` is gone."""
        self.open -= 1
        n = self.per_ip[peer] - 1
        if n:
            self.per_ip[peer] = n
        else:
            del self.per_ip[peer]
        if self._room is not None and not self.full:
            self._room.set()

    async def room(self) -> None:
        """Until the listener is below its cap."""
        while self.full:
            if self._room is None:
                self._room = asyncio.Event()
            self._room.clear()
            await self._room.wait()

    def closed(self, reason: str) -> None:
        self._closed[reason].inc()

    def accept_failed(self, exc: OSError) -> None:
        """A failed accept: counted; logged once per 10 s with the number held back."""
        self.closed("accept_error")
        suppressed = self.accept_errors.allow()
        if suppressed is not None:
            log.error(
                "accept_failed",
                listener=self.listener,
                error=str(exc),
                suppressed=suppressed,
                open_fds=open_fds(),
                fd_limit=resource.getrlimit(resource.RLIMIT_NOFILE)[0],
                hint="out of file descriptors: connections wait in the kernel until some close; raise ulimit -n "
                "or lower [ingress]/[ocpi] max_connections",
            )


class GuardedHandler(RequestHandler):
    """aiohttp's RequestHandler for an admitted connection: released by its Guard on close, closed if
    its first request's headers are not in by the deadline.

    Relies on aiohttp's ``RequestHandler._request_count`` (messages parsed on this connection) and
    ``_process_keepalive`` (the idle timer's callback); tests/test_listeners.py breaks if they change.
    """

    __slots__ = ("_guard", "_peer", "_deadline", "_header_timer", "_counted")

    def __init__(self, guard: Guard, peer: str, deadline: float, manager: web.Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = guard
        self._peer = peer
        self._deadline = deadline  # loop time: accept + header_timeout_s
        self._header_timer: asyncio.TimerHandle | None = None
        self._counted = True  # admitted at the accept

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self._counted:
            self._header_timer = self._loop.call_at(self._deadline, self._header_deadline)

    def _header_deadline(self) -> None:
        self._header_timer = None
        if self._request_count == 0 and self.transport is not None:
            self._guard.closed("header_timeout")
            self.force_close()  # connection_lost releases

    def _process_keepalive(self) -> None:
        transport = self.transport
        super()._process_keepalive()
        if transport is not None and self.transport is None:  # aiohttp closed it: idle for idle_timeout_s
            self._guard.closed("idle_timeout")

    def release(self) -> bool:
        """Give the connection's place back to the Guard; False if it was already given back."""
        if not self._counted:
            return False
        self._counted = False
        self._guard.release(self._peer)
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        return True

    def connection_lost(self, exc: BaseException | None) -> None:
        self.release()
        super().connection_lost(exc)


def _host(address: Any) -> str:
    """The host part of an accepted address: ``(host, port)`` (IPv4) or ``(host, port, flow, scope)``."""
    return str(address[0]) if isinstance(address, tuple) and address else ""


_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST and leaves no TIME_WAIT behind
ACCEPT_RETRY_S = 0.25  # after a failed accept: accepting again at once would only fail again
ACCEPT_BURST = 64  # connections accepted per wake-up of an accept loop


class _Listening:
    """What aiohttp's BaseRunner uses of an asyncio server: ``sockets`` (runner.addresses)."""

    def __init__(self, sockets: list[socket.socket]) -> None:
        self.sockets = sockets

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


class GuardedSite(web.BaseSite):
    """``web.TCPSite`` with an accept loop that enforces a Guard (and starts TLS, if any, for it)."""

    __slots__ = ("_host", "_port", "_guard", "_reuse_port", "_loops", "_tasks")

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        guard: Guard,
        *,
        backlog: int = 128,
        reuse_port: bool = False,
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._host, self._port, self._guard = host, port, guard
        self._reuse_port = reuse_port  # `relay serve --workers N`: every worker binds the same port
        self._loops: list[asyncio.Task[None]] = []  # one accept loop per listening socket
        self._tasks: set[asyncio.Task[None]] = set()  # connections being set up (TLS: handshaking)

    @property
    def name(self) -> str:
        return f"{'https' if self._guard.tls else 'http'}://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()  # registers the site with its runner
        server = self._runner.server
        assert server is not None
        sockets = await _bind(self._host, self._port, self._backlog, reuse_port=self._reuse_port)
        self._server = cast(asyncio.AbstractServer, _Listening(sockets))  # runner.addresses reads its sockets
        loop = asyncio.get_running_loop()
        self._loops = [loop.create_task(self._accept_loop(sock, server)) for sock in sockets]

    async def stop(self) -> None:
        listening, self._server = self._server, None
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        # Every connection task has taken its first step by now (a task cancelled before it would never
        # hand its socket to the loop): cancelling one ends its handshake, and the loop closes the socket.
        await asyncio.sleep(0)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if listening is not None:
            listening.close()
        await super().stop()

    async def _accept_loop(self, sock: socket.socket, server: web.Server) -> None:
        loop = asyncio.get_running_loop()
        guard = self._guard
        while True:
            if guard.full:
                await guard.room()  # at the cap: new connections wait in the kernel's accept queue
            try:
                conn, address = await loop.sock_accept(sock)
                self._admit(conn, address, server)
                for _ in range(ACCEPT_BURST - 1):  # what else is queued, without a wait per connection
                    if guard.full:
                        break
                    try:
                        conn, address = sock.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    self._admit(conn, address, server)
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):  # that client left before its accept
                    continue
                guard.accept_failed(exc)  # out of descriptors, mostly: accepting again at once would fail again
                await asyncio.sleep(ACCEPT_RETRY_S)
            except Exception:
                log.exception("accept_loop_failed", listener=guard.listener)
                await asyncio.sleep(ACCEPT_RETRY_S)

    def _admit(self, conn: socket.socket, address: Any, server: web.Server) -> None:
        guard = self._guard
        peer = _host(address)
        if not guard.admit(peer):
            with suppress(OSError):
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
            conn.close()
            return
        loop = asyncio.get_running_loop()
        kwargs = server._kwargs  # what web.Server.__call__ passes to RequestHandler
        handler = GuardedHandler(guard, peer, loop.time() + guard.limits.header_timeout_s, server, loop=loop, **kwargs)
        conn.setblocking(False)
        task = loop.create_task(self._connect(conn, handler))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect(self, conn: socket.socket, handler: GuardedHandler) -> None:
        """Hand the socket to the event loop (which owns and closes it from then on), TLS first if any."""
        loop = asyncio.get_running_loop()
        tls = self._guard.tls
        try:
            if tls is None:
                await loop.connect_accepted_socket(lambda: handler, conn)
            else:  # the handshake and the first request's headers share header_timeout_s from the accept
                timeout = max(handler._deadline - loop.time(), 0.001)
                await loop.connect_accepted_socket(lambda: handler, conn, ssl=tls, ssl_handshake_timeout=timeout)
        except asyncio.CancelledError:  # the site stopping
            handler.release()
            raise
        except Exception:  # a handshake that failed (certificate, garbage, reset) or took too long
            if handler.release() and loop.time() >= handler._deadline:
                self._guard.closed("header_timeout")


async def _bind(host: str, port: int, backlog: int, *, reuse_port: bool = False) -> list[socket.socket]:
    """Listening sockets for host:port (one per address the host resolves to), as loop.create_server binds.

    ``reuse_port``: with SO_REUSEPORT (Linux), so that the workers of ``relay serve --workers N`` each bind
    the same port and the kernel spreads new connections among them (relay.supervisor). Only processes of
    the same user can join such a group.
    """
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


# -- the file-descriptor budget ------------------------------------------------------------------------

REDIS_POOL = 64  # relay.store.connection.connect: max_connections of the Redis pool
CSMS_POOL = 100  # relay.csms: aiohttp's default connector limit
FD_HEADROOM = 64  # epoll, the log, the embedded server's pipes, DNS, certificate files, a handshake client


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard one (as Go programs do); (soft, hard) after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft, hard


def open_fds() -> int:
    """Descriptors open in this process now (0 where /proc is missing)."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # minus the one listdir itself opened
    except OSError:
        return 0


def fd_reserve(settings: Settings) -> int:
    """Descriptors kept for everything but the OCPI listener's connections: the ingress's connections,
    Redis, the IOP client's pool, the CSMS webhook's pool, and headroom."""
    outbound = REDIS_POOL + 2 * settings.forwarder.concurrency + CSMS_POOL
    return settings.ingress.max_connections + outbound + FD_HEADROOM


def ocpi_connection_budget(settings: Settings, soft_limit: int, in_use: int) -> int:
    """The OCPI listener's cap: its setting, lowered (to at least 1) to fit what RLIMIT_NOFILE leaves."""
    wanted = settings.ocpi.max_connections
    if soft_limit == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, soft_limit - in_use - fd_reserve(settings)))
