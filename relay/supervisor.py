"""``relay serve --workers N``: N relay processes on the same ports, and the parent that supervises them.

Each worker is an ordinary replica (``relay.service.Relay``: its own replica id, its fair share of the shard
leases, both listeners) started as a fresh interpreter (``python -m relay serve --worker-index I …``, never a
fork of a process that runs an event loop). Both listeners bind with SO_REUSEPORT (Linux), so the kernel
spreads new connections among the workers; a fixed port is required (port 0 would give each its own).

The parent (``Supervisor``) serves nothing itself:

- it has loaded and validated the configuration (exit 2 as for one process), and when ``[redis] url`` is
  empty it takes the data directory's lock and runs the embedded server (relay.embedded_redis), restarting it
  as one relay does (``relay.service.keep_embedded_up``) and stopping everything (exit 3) when it keeps dying.
  Workers get its unix-socket URL: they neither lock the directory nor start nor watch a server;
- a worker that exits unexpectedly is started again, at once and then with a backoff; more than
  ``WORKER_RESTARTS`` exits within ``WORKER_RESTART_WINDOW_S`` stop everything (exit 1). A worker that cannot
  start the first time (a port in use, Redis unreachable) stops everything with that worker's exit code;
- SIGTERM or SIGINT is forwarded to every worker; the parent waits for them (the shutdown timeouts of the
  configuration, plus a margin), SIGKILLs what is left, then stops the embedded server and exits 0;
- it creates a private directory (0700, relay.worker_metrics.make_socket_dir) where each worker serves its
  own metrics on ``worker-<i>.sock``, so that the /metrics of any worker answers for all of them; it removes
  the directory once the workers have stopped (after a kill -9 of the parent, the last worker out does);
- a worker dies with the parent even after a kill -9 of it: PR_SET_PDEATHSIG sends it SIGTERM (a graceful
  stop), and it also watches its parent pid, with a hard deadline (SIGALRM) once the parent is gone.
"""

from __future__ import annotations

import asyncio
import ctypes
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from relay.config import Settings
from relay.embedded_redis import EmbeddedRedis, EmbeddedRedisLost
from relay.worker_metrics import make_socket_dir

if TYPE_CHECKING:
    from relay.service import Relay

__all__ = ["CrashBudget", "Supervisor", "WorkersFailed", "die_with_parent", "run_worker", "workers_problems"]

log = structlog.get_logger(__name__)

# A worker that exits is restarted at once, then after 0.5 s, 1 s, 2 s… (at most WORKER_BACKOFF_MAX_S); one
# exit more than WORKER_RESTARTS within WORKER_RESTART_WINDOW_S (all workers together) and the parent stops
# everything and exits 1, for its own supervisor (systemd, Kubernetes) to see a relay that cannot run.
WORKER_RESTARTS = 5
WORKER_RESTART_WINDOW_S = 60.0
WORKER_BACKOFF_MAX_S = 10.0
POLL_S = 0.1
STOP_MARGIN_S = 5.0  # beyond the configured shutdown timeouts: closing Redis, the clients, the interpreter
PARENT_POLL_S = 0.5  # how often a worker checks that its parent is still there

_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class WorkersFailed:
    """Why the supervisor stopped by itself: a worker could not start, or they kept exiting."""

    message: str  # one line for stderr
    code: int = 1  # the exit code of ``relay serve``


def workers_problems(settings: Settings, workers: int) -> list[str]:
    """Why ``--workers N`` (N > 1) cannot serve this configuration (config errors, exit 2)."""
    problems = []
    if not sys.platform.startswith("linux"):
        problems.append(f"--workers {workers}: needs Linux (SO_REUSEPORT spreading connections among processes)")
    for name, listen in (("ingress.listen", settings.ingress.listen), ("ocpi.listen", settings.ocpi.listen)):
        if int(listen.rpartition(":")[2]) == 0:
            problems.append(
                f"{name}: port 0 cannot be shared by --workers {workers} (each worker would get a port of its "
                "own): give a fixed port"
            )
    return problems


def stop_timeout_s(settings: Settings) -> float:
    """How long a worker may take to stop gracefully: its listeners, then its forwarder, then a margin."""
    s = settings
    return s.ingress.shutdown_timeout_s + s.ocpi.shutdown_timeout_s + s.forwarder.shutdown_timeout_s + STOP_MARGIN_S


class CrashBudget:
    """Unexpected worker exits: the wait before the next restart, or None once they are too many."""

    def __init__(
        self,
        limit: int = WORKER_RESTARTS,
        window_s: float = WORKER_RESTART_WINDOW_S,
        backoff_max_s: float = WORKER_BACKOFF_MAX_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit, self.window_s, self.backoff_max_s, self._clock = limit, window_s, backoff_max_s, clock
        self.exits: list[float] = []

    def crashed(self) -> float | None:
        """Count an exit now; the seconds to wait before restarting, or None: more than ``limit`` in the window."""
        now = self._clock()
        self.exits = [t for t in self.exits if now - t < self.window_s]
        if len(self.exits) >= self.limit:
            return None
        earlier = len(self.exits)
        self.exits.append(now)
        return 0.0 if earlier == 0 else min(0.5 * 2 ** (earlier - 1), self.backoff_max_s)


@dataclass
class Worker:
    """One worker slot: its process (a new one after each restart) and its readiness pipe."""

    index: int
    proc: subprocess.Popen[bytes] | None = None
    ready_fd: int | None = None  # read end: the worker writes one byte once it serves
    ready: bool = False
    ever_ready: bool = False  # this slot has served once: a later exit is a crash, not a failed start
    started_at: float = 0.0
    restart_at: float | None = None

    def poll_ready(self) -> None:
        if self.ready or self.ready_fd is None:
            return
        with suppress(BlockingIOError):
            if os.read(self.ready_fd, 1):
                self.ready = self.ever_ready = True
                self._close_pipe()
                assert self.proc is not None
                log.info("worker_ready", worker=self.index, pid=self.proc.pid)

    def _close_pipe(self) -> None:
        fd, self.ready_fd = self.ready_fd, None
        if fd is not None:
            os.close(fd)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def reaped(self) -> int | None:
        """The exit status if its process has exited (the slot is then empty), else None."""
        if self.proc is None:
            return None
        code = self.proc.poll()
        if code is None:
            return None
        self.poll_ready()  # it may have become ready just before it died
        self._close_pipe()
        self.proc, self.ready = None, False
        return code


class Supervisor:
    """The parent of ``relay serve --workers N``: the embedded server (if any), N workers, signals."""

    def __init__(self, settings: Settings, workers: int, config_path: Path | None) -> None:
        self.settings = settings
        self.workers = [Worker(i) for i in range(workers)]
        self.config_path = config_path.resolve() if config_path is not None else None
        self.embedded: EmbeddedRedis | None = None
        self.metrics_dir: Path | None = None  # the workers' metrics sockets (relay.worker_metrics)
        self.budget = CrashBudget()
        self.stop_timeout_s = stop_timeout_s(settings)
        self._stop = asyncio.Event()
        self.failure: WorkersFailed | EmbeddedRedisLost | None = None

    def request_stop(self) -> None:
        self._stop.set()

    def _argv(self, worker: Worker, ready_fd: int) -> list[str]:
        argv = [sys.executable, "-m", "relay", "serve"]
        if self.config_path is not None:  # else RELAY_CONFIG, or none: the environment is inherited
            argv += ["--config", str(self.config_path)]
        argv += ["--worker-index", str(worker.index), "--parent-pid", str(os.getpid()), "--ready-fd", str(ready_fd)]
        argv += ["--workers", str(len(self.workers))]
        if self.metrics_dir is not None:
            argv += ["--metrics-dir", str(self.metrics_dir)]
        if self.embedded is not None:
            argv += ["--embedded-url", self.embedded.url]
        return argv

    def _spawn(self, worker: Worker) -> None:
        """A new process for the slot, from this (the main) thread: PR_SET_PDEATHSIG follows the thread."""
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        try:
            worker.proc = subprocess.Popen(  # a child we keep and poll
                self._argv(worker, write_fd), stdin=subprocess.DEVNULL, pass_fds=(write_fd,)
            )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        worker.ready_fd, worker.ready = read_fd, False
        worker.started_at, worker.restart_at = time.monotonic(), None
        log.info("worker_started", worker=worker.index, pid=worker.proc.pid)

    async def run(self) -> WorkersFailed | None:
        """Start the embedded server (if any) and the workers, supervise until a signal, stop in reverse.

        Raises what one relay would (DataDirBusy, EmbeddedRedisFailed at start, EmbeddedRedisLost); returns
        why the workers failed, if they did (None: stopped by a signal).
        """
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        watch: asyncio.Task[str] | None = None
        try:
            if not self.settings.redis.url:
                st = self.settings.storage
                self.embedded = EmbeddedRedis(st.dir, st.durability, st.max_memory_mib)
                await self.embedded.start()
                from relay.service import keep_embedded_up

                watch = asyncio.create_task(keep_embedded_up(self.embedded, _storage_down), name="relay-embedded")
            if not self._stop.is_set():
                self.metrics_dir = make_socket_dir()
                for worker in self.workers:
                    self._spawn(worker)
                redis = self.settings.redis.url or f"embedded ({self.embedded.url if self.embedded else ''})"
                log.info("supervisor_started", workers=len(self.workers), pid=os.getpid(), redis=redis,
                         metrics_dir=str(self.metrics_dir))  # fmt: skip
                await self._supervise(watch)
        finally:
            if watch is not None:
                watch.cancel()
                with suppress(asyncio.CancelledError):
                    await watch
            await self._stop_workers()
            if self.metrics_dir is not None:
                shutil.rmtree(self.metrics_dir, ignore_errors=True)
            if self.embedded is not None:
                await self.embedded.stop()  # last: the workers have all exited
            for sig in (signal.SIGTERM, signal.SIGINT):
                with suppress(Exception):
                    loop.remove_signal_handler(sig)
            failure = self.failure.message if isinstance(self.failure, WorkersFailed) else self.failure
            log.info("supervisor_stopped", failure=str(failure) if failure else None)
        if isinstance(self.failure, EmbeddedRedisLost):
            raise self.failure
        return self.failure

    async def _supervise(self, watch: asyncio.Task[str] | None) -> None:
        while not self._stop.is_set():
            if watch is not None and watch.done():
                self.failure = EmbeddedRedisLost(watch.result())
                return
            now = time.monotonic()
            for worker in self.workers:
                worker.poll_ready()
                code = worker.reaped()
                if code is not None and not self._exited(worker, code, now):
                    return
                if worker.proc is None and worker.restart_at is not None and now >= worker.restart_at:
                    self._spawn(worker)
            with suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), POLL_S)

    def _exited(self, worker: Worker, code: int, now: float) -> bool:
        """A worker exited on its own: schedule its restart (True), or fail everything (False)."""
        uptime = round(now - worker.started_at, 3)
        if not worker.ever_ready:  # its first start failed: its own line on stderr says why
            log.error("worker_start_failed", worker=worker.index, returncode=code)
            self.failure = WorkersFailed(
                f"cannot start: worker {worker.index} exited with {_describe(code)} while starting",
                code if code in (1, 2, 3) else 1,
            )
            return False
        delay = self.budget.crashed()
        if delay is None:
            log.critical("workers_given_up", worker=worker.index, returncode=code, exits=len(self.budget.exits))
            self.failure = WorkersFailed(
                f"stopped: workers kept exiting ({len(self.budget.exits) + 1} exits within "
                f"{self.budget.window_s:.0f} s), the last: worker {worker.index} with {_describe(code)}"
            )
            return False
        log.error("worker_exited", worker=worker.index, returncode=code, uptime_s=uptime, restart_in_s=delay)
        worker.restart_at = now + delay
        return True

    async def _stop_workers(self) -> None:
        """SIGTERM to every worker, wait for them (the graceful stop's timeouts), then SIGKILL what is left."""
        live = [w for w in self.workers if w.alive]
        if not live:
            return
        log.info("workers_stopping", workers=len(live), timeout_s=self.stop_timeout_s)
        for w in live:
            assert w.proc is not None
            with suppress(ProcessLookupError):
                w.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout_s
        # Child processes are polled: nothing sets an event when one exits.
        while any(w.alive for w in live) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        for w in live:
            if w.alive:
                assert w.proc is not None
                log.error("worker_killed", worker=w.index, pid=w.proc.pid, hint="did not stop within the timeouts")
                w.proc.kill()
                await asyncio.to_thread(w.proc.wait)
            code = w.reaped()
            log.info("worker_stopped", worker=w.index, returncode=code)


def _describe(code: int) -> str:
    if code < 0:
        with suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
    return f"code {code}"


def _storage_down(reason: str) -> None:
    """The workers find out by themselves (their Redis calls fail, /readyz answers 503): nothing to pass on."""


# -- in the worker ------------------------------------------------------------------------------------------


def die_with_parent(parent_pid: int) -> None:
    """SIGTERM this worker when its parent dies (Linux), and exit at once if it is already gone."""
    if sys.platform.startswith("linux"):
        with suppress(OSError):  # no glibc (musl): the parent watch below still stops the worker
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent_pid:  # the parent died before the prctl: no signal will come
        sys.exit(1)


def parent_gone(parent_pid: int) -> bool:
    """The parent has exited (or is exiting: a kill -9 reparents this worker to one of its threads that may
    live a little longer than its main thread, whose state is then zombie)."""
    if os.getppid() != parent_pid:
        return True
    try:
        stat = Path(f"/proc/{parent_pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


async def _watch_parent(parent_pid: int, stop: Callable[[], None], deadline_s: float) -> None:
    """Stop when the parent is gone (on a platform without PDEATHSIG too), and exit by SIGALRM after deadline_s."""
    while os.getppid() == parent_pid:  # noqa: ASYNC110 - nothing but the PDEATHSIG signals a reparenting
        await asyncio.sleep(PARENT_POLL_S)
    log.error("supervisor_gone", parent_pid=parent_pid, hint="stopping; exiting at the latest in "
              f"{deadline_s:.0f} s")  # fmt: skip
    signal.alarm(math.ceil(deadline_s))  # the default action ends the process, whatever it is waiting for
    stop()


async def run_worker(relay: Relay, parent_pid: int, ready_fd: int, deadline_s: float) -> None:
    """Run one worker's relay: tell the parent once it serves, stop when the parent is gone."""

    def started() -> None:
        with suppress(OSError):
            os.write(ready_fd, b"r")
        with suppress(OSError):
            os.close(ready_fd)

    watch = asyncio.create_task(_watch_parent(parent_pid, relay.request_stop, deadline_s), name="relay-parent")
    try:
        await relay.run(started)
    finally:
        watch.cancel()
        with suppress(asyncio.CancelledError):
            await watch
        if relay.worker_metrics is not None and parent_gone(parent_pid):  # nobody left to remove it
            relay.worker_metrics.unlink(directory=True)
