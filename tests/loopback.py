"""Loopback HTTP servers the tests stand up as peers (the IOP, the CSMS): free ports, and a server that can
be taken down and brought back on its port, with an event its requests set (for ``tests.waiting.wait_until``)."""

from __future__ import annotations

import asyncio
import socket

from aiohttp import web


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class LoopbackServer:
    """An aiohttp server on 127.0.0.1:port that a test can take down and bring back on the same port."""

    shutdown_timeout = 0.5

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.changed = asyncio.Event()  # set by the subclass's handlers on every request
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    def add_routes(self, app: web.Application) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        """Listen (again) on the same port."""
        if self._runner is None:
            app = web.Application()
            self.add_routes(app)
            self._runner = web.AppRunner(
                app, handle_signals=False, shutdown_timeout=self.shutdown_timeout, access_log=None
            )
            await self._runner.setup()
        self._site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await self._site.start()

    async def down(self) -> None:
        """Stop listening: connections are refused until start(); open keep-alive connections are cut."""
        if self._site is not None:
            await self._site.stop()
            self._site = None
        if self._runner is not None and self._runner.server is not None:
            for conn in self._runner.server.connections:
                conn.force_close()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
