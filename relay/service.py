"""Relay: composes the store, the listeners and (later) the forwarder; run() = start → wait → stop."""

from __future__ import annotations

import asyncio
import gc
import signal
import time
from collections.abc import Callable
from contextlib import suppress

import structlog
from aiohttp import web

from relay import logs, metrics
from relay.authorize import Authorizer
from relay.commands import Commands
from relay.config import MODULES, Settings
from relay.credentials import Registry
from relay.csms import CsmsClient
from relay.embedded_redis import EmbeddedRedis, EmbeddedRedisFailed, EmbeddedRedisLost
from relay.errors import ConfigError, StoreError, StoreUnavailable
from relay.forwarder import Forwarder
from relay.ingress import create_app
from relay.ingress.roaming import RoamingDeps
from relay.link import Link
from relay.listeners import (
    Guard,
    GuardedSite,
    handler_args,
    ingress_limits,
    ocpi_connection_budget,
    ocpi_limits,
    open_fds,
    raise_fd_limit,
)
from relay.ocpi_client import OcpiClient
from relay.ocpi_server import create_ocpi_app
from relay.ocpi_server.app import server_ssl_context
from relay.retention import Sweeper
from relay.states import connection_state
from relay.store import DeliveryStore, RegistrationStore, RoamingStore, StateReader, Store, connect, keys
from relay.typedefs import Health
from relay.worker_metrics import WorkerMetrics

log = structlog.get_logger(__name__)


def split_listen(listen: str) -> tuple[str, int]:
    """``127.0.0.1:8780`` or ``[::1]:8780`` → (host, port)."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


async def _cancel(task: asyncio.Task[None]) -> None:
    """Cancel a background loop and wait for its end.

    redis-py (8.x) can swallow a CancelledError that lands in the middle of a command or pipeline;
    the loop then carries on as if nothing happened and a single cancel() would be waited on
    forever. Cancel again until the task is done.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.1)
    with suppress(asyncio.CancelledError):
        await task


GC_THRESHOLDS = (20_000, 20, 20)

# The embedded server is watched: when it exits the relay restarts it at once (its AOF makes that safe),
# then with a backoff; one exit more than EMBEDDED_RESTARTS within EMBEDDED_RESTART_WINDOW_S and the
# relay stops and exits 3, for its supervisor to restart (a relay that cannot store must not look alive).
EMBEDDED_RESTARTS = 5
EMBEDDED_RESTART_WINDOW_S = 600.0
EMBEDDED_POLL_S = 0.25
# Dead replicas' idle consumers are removed at start, then every REAP_EVERY passes of the gauge loop (~1 min).
REAP_EVERY = 12


def tune_gc() -> None:
    """Fewer cyclic-GC passes for a long-running relay: freeze the start-up heap, collect gen0 less often.

    A forwarder with a backlog keeps thousands of key runners and entries alive; with the default
    gen0 threshold (700 allocations) the collector walked them so often that it took about a quarter
    of the CPU per delivered event (bench/forward.py: 391 → 282 us/event). Reference counting still
    frees almost everything at once; only reference cycles wait a little longer.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


async def keep_embedded_up(embedded: EmbeddedRedis, down: Callable[[str], None]) -> str:
    """Watch the embedded server: restart it when it exits (at once, then with a backoff); return why it
    was given up on, after EMBEDDED_RESTARTS restarts within EMBEDDED_RESTART_WINDOW_S.

    ``down(reason)`` is called when it exits and ``down("")`` once it answers again. The relay runs this
    (relay.service.Relay), or the supervisor of ``relay serve --workers N`` that owns the server.
    """
    restarts = list[float]()
    while True:
        await asyncio.sleep(EMBEDDED_POLL_S)
        code = embedded.exited()
        if code is None:
            continue
        reason = f"embedded redis exited with {code}: {embedded.failure_reason()}"
        down(reason)
        log.error("embedded_redis_exited", returncode=code, reason=reason)
        while True:
            now = time.monotonic()
            restarts = [t for t in restarts if now - t < EMBEDDED_RESTART_WINDOW_S]
            if len(restarts) >= EMBEDDED_RESTARTS:
                log.critical("embedded_redis_given_up", restarts=len(restarts), reason=reason)
                return (f"the embedded server kept stopping ({len(restarts)} restarts within "
                        f"{EMBEDDED_RESTART_WINDOW_S:.0f} s), giving up: {reason}")  # fmt: skip
            if restarts:  # the first restart at once, then 0.5 s, 1 s, 2 s…
                await asyncio.sleep(min(0.5 * 2 ** (len(restarts) - 1), 30.0))
            restarts.append(time.monotonic())
            try:
                await embedded.start()
            except (EmbeddedRedisFailed, OSError) as exc:  # OSError: the process could not even be spawned
                reason = str(exc)
                log.error("embedded_redis_restart_failed", reason=reason)
                continue
            break
        down("")
        log.warning("embedded_redis_restarted", restarts_in_window=len(restarts))


class Relay:
    """One relay process: start() brings every part up in order, stop() takes it down in reverse."""

    def __init__(
        self,
        settings: Settings,
        *,
        worker: int | None = None,
        parent_embedded_url: str = "",
        worker_metrics: WorkerMetrics | None = None,
    ) -> None:
        self.settings = settings
        # Under `relay serve --workers N` (relay.supervisor): this worker's index (its listeners share the
        # ports with SO_REUSEPORT), and the URL of the embedded server the supervisor runs and watches (this
        # process then neither locks the data directory nor starts nor watches a server).
        self.worker = worker
        self.parent_embedded_url = parent_embedded_url
        # A worker's private metrics socket, and its /metrics answering for every worker (relay.worker_metrics).
        self.worker_metrics = worker_metrics
        logs.add_secrets(logs.settings_secrets(settings))  # never logged, whatever the message
        self.health = Health()
        self.embedded: EmbeddedRedis | None = None
        self.store: Store | None = None
        self._runners: list[web.AppRunner] = []
        self._stop = asyncio.Event()
        self.ingress_port: int | None = None
        self.ocpi_port: int | None = None
        self.registry: Registry | None = None
        self.client: OcpiClient | None = None
        self.forwarder: Forwarder | None = None
        self.link = Link(
            settings.forwarder.concurrency,
            settings.forwarder.link_failure_threshold,
            probe_initial_s=settings.forwarder.backoff_initial_s,
            probe_max_s=settings.forwarder.probe_max_s,
        )
        self._gauges: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None
        self._timeouts: asyncio.Task[None] | None = None
        self._embedded_watch: asyncio.Task[None] | None = None
        self._retention: asyncio.Task[None] | None = None
        self.failure: str | None = None  # why the relay stopped by itself (run() raises it)
        self.csms: CsmsClient | None = None
        self.commands: Commands | None = None
        self.guards: dict[str, Guard] = {}
        self.health.link_state_of = lambda: self.link.state
        self.health.connection_of = self._registration_state

    async def _open_store(self) -> Store:
        url = self.parent_embedded_url or self.settings.redis.url
        if not url:
            st = self.settings.storage
            self.embedded = EmbeddedRedis(st.dir, st.durability, st.max_memory_mib)
            await self.embedded.start()
            url = self.embedded.url
        store = Store(connect(url, self.settings.redis), self.settings.redis)
        await store.load_scripts()
        recorded = await store.check_shard_count()
        if recorded is not None and recorded != store.shards:
            await store.close()
            raise ConfigError(
                [f"redis.shards: {store.shards} differs from {recorded} recorded in Redis (changing it breaks order)"]
            )
        await store.ensure_groups()
        await RegistrationStore(store).rename_old_keys()
        self.health.persistence = await store.persistence()
        if self.health.persistence.get("appendonly") == "no":
            log.warning("redis_without_aof", hint="accepted events are lost if Redis restarts; enable appendonly")
        try:
            ack = await store.configure_ack(sentinel=store.sentinel)
        except ValueError as exc:
            await store.close()
            raise ConfigError([str(exc)]) from None
        log.info("redis_ack_policy", policy=ack.describe(), cluster=store.cluster, sentinel=store.sentinel)
        if ack.fsync and (ack.local or ack.replicas):
            log.warning("redis_ack_waits_for_fsync", hint="each 202 waits for the next fsync (tens of ms with "
                        "appendfsync everysec, ~1 s for a replica's): appendfsync always on the server gives the "
                        "same guarantee faster (docs/operations.md, Capacity planning)")  # fmt: skip
        return store

    async def _listen(self, app: web.Application, listen: str, timeout_s: float, guard: Guard) -> int:
        """Serve ``app`` on ``listen`` through ``guard`` (relay.listeners: timeouts, caps, TLS)."""
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=timeout_s,
                               **handler_args(guard.limits))  # fmt: skip
        await runner.setup()
        self._runners.append(runner)  # cleaned up by stop() even if the bind below fails
        self.guards[guard.listener] = guard
        host, port = split_listen(listen)
        site = GuardedSite(runner, host, port, guard, backlog=1024, reuse_port=self.worker is not None)
        await site.start()
        bound: int = runner.addresses[0][1]
        return bound

    def _ocpi_cap(self, soft_limit: int) -> int:
        """[ocpi] max_connections, lowered if RLIMIT_NOFILE cannot hold it beside everything else."""
        s = self.settings
        cap = ocpi_connection_budget(s, soft_limit, open_fds())
        if cap < s.ocpi.max_connections:
            log.warning("ocpi_max_connections_lowered", configured=s.ocpi.max_connections, lowered_to=cap,
                        fd_limit=soft_limit, hint="raise the open-file limit (ulimit -n, LimitNOFILE=)")  # fmt: skip
        return cap

    async def start(self) -> None:
        """Start Redis (embedded or not), the registration, both listeners, then the forwarder."""
        soft_limit, _ = raise_fd_limit()
        self.store = await self._open_store()
        if self.embedded is not None:
            self._embedded_watch = asyncio.create_task(self._watch_embedded(), name="relay-embedded-redis")
        self.registry = Registry(self.settings, RegistrationStore(self.store))
        # An older version's clear tokens, once; the registration's only on the embedded server (one relay
        # per data dir): replicas of an older version sharing a Redis still compare it in clear.
        await self.registry.hash_stored_tokens(registration=self.embedded is not None or bool(self.parent_embedded_url))
        await self.registry.refresh()
        s = self.settings
        self.client = OcpiClient(s.iop, self.registry.directory, pool=s.forwarder.concurrency * 2)
        await self.client.start()
        self.csms = CsmsClient(s.csms)
        await self.csms.start()
        state, roaming = StateReader(self.store), RoamingStore(self.store)
        self.commands = Commands(s, self.store, roaming, state, self.csms)
        deps = RoamingDeps(Authorizer(s, self.client, state, roaming), self.commands, roaming)
        ingress = Guard("ingress", ingress_limits(s))
        merged = None
        if self.worker_metrics is not None:  # first: its siblings may ask as soon as this worker serves
            self._runners.append(await self.worker_metrics.serve())
            merged = self.worker_metrics.handle
        self.ingress_port = await self._listen(
            create_app(s, self.store, self.health, deps, merged), s.ingress.listen, s.ingress.shutdown_timeout_s,
            ingress,
        )  # fmt: skip
        tls = server_ssl_context(s)
        ocpi_app = create_ocpi_app(s, self.registry, state, (self.commands, roaming, self.csms))
        ocpi = Guard("ocpi", ocpi_limits(s, self._ocpi_cap(soft_limit)), tls)
        self.ocpi_port = await self._listen(ocpi_app, s.ocpi.listen, s.ocpi.shutdown_timeout_s, ocpi)
        if not s.ocpi.public_url:
            # Announce the port actually bound (the config may say :0); production sets public_url.
            host = split_listen(s.ocpi.listen)[0]
            host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
            s.ocpi.public_url = f"{'https' if tls else 'http'}://{host}:{self.ocpi_port}/ocpi"
        self.health.listeners_up = True
        await self._start_forwarder()
        if self.forwarder is not None:  # the sweeper works on the shards the forwarder's lease loop holds
            shards = self.forwarder.shards
            sweeper = Sweeper(s, self.store, lambda: list(shards))
            self._retention = asyncio.create_task(sweeper.run(self._stop), name="relay-retention")
        self._gauges = asyncio.create_task(self._gauge_loop(), name="relay-gauges")
        self._watch = asyncio.create_task(self._watch_registration(), name="relay-registration")
        self._timeouts = asyncio.create_task(self._command_timeouts(), name="relay-command-timeouts")
        host = split_listen(s.ingress.listen)[0]
        log.info(
            "relay_started",
            ingress=f"http://{host}:{self.ingress_port}/ingress/2.2.1",
            ocpi=f"{'https' if tls else 'http'}://{split_listen(s.ocpi.listen)[0]}:{self.ocpi_port}/ocpi/versions",
            redis=s.redis.url or f"embedded ({self.embedded.url if self.embedded else self.parent_embedded_url})",
            operators=[f"{o.country_code}/{o.party_id}" for o in s.operators],
            profile=s.ingress.profile,
            registered=self._link_wanted()[1],
        )

    def _link_wanted(self) -> tuple[bool, str]:
        """(can deliver, why not): a registration, or static [iop] url + token."""
        assert self.registry is not None
        reg = self.registry.registration
        if self.registry.directory.usable():
            return True, "registered" if reg is not None else "static [iop] configuration"
        if reg is not None and reg.state == "unregistered":
            return False, "unregistered"
        return False, "no connection: no registration and no [iop] url/token"

    async def _apply_registration(self) -> None:
        if self.forwarder is None:
            return  # no forwarder on this replica: its link stays "disabled"
        usable, why = self._link_wanted()
        if usable:
            await self.link.resume(why)
        elif self.link.state != "paused":
            await self.link.pause(why)
        self.health.link_state = self.link.state

    async def _watch_registration(self, interval_s: float = 1.0) -> None:
        """The OCPI listener or another replica may register or unregister: follow it."""
        assert self.registry is not None
        applied = self.registry.generation
        while True:
            try:
                await self.registry.refresh()
                if self.registry.generation != applied:
                    applied = self.registry.generation
                    await self._apply_registration()
            except StoreError as exc:
                metrics.REDIS_ERRORS.labels(op="registration").inc()
                log.debug("registration_refresh_failed", error=str(exc))
            # Changes made in this process (the OCPI listener's handshake) wake us at once; other
            # replicas' changes are seen on the next poll.
            self.registry.changed.clear()
            with suppress(TimeoutError):
                await asyncio.wait_for(self.registry.changed.wait(), interval_s)

    async def _start_forwarder(self) -> None:
        if not self.settings.forwarder.enabled:
            log.info("forwarder_disabled", hint="events are accepted and queued only")
            await self.link.disable("[forwarder] enabled = false")
            return
        assert self.store is not None and self.registry is not None
        usable, why = self._link_wanted()
        if not usable:
            await self.link.pause(why)
            log.warning("iop_not_connected", reason=why, hint="events are queued until a registration")
        self.health.link_state = self.link.state
        assert self.client is not None
        self.forwarder = forwarder = Forwarder(self.settings, self.store, self.client, self.link)
        self.health.shards_owned_of = lambda: len(forwarder.shards)
        await self.forwarder.start()

    async def _command_timeouts(self, interval_s: float = 1.0) -> None:
        """Answer TIMEOUT to the IOP for commands whose result the CSMS never sent (any replica may)."""
        assert self.commands is not None
        while True:
            try:
                await self.commands.expire()
            except StoreError as exc:
                metrics.REDIS_ERRORS.labels(op="commands").inc()
                log.debug("command_timeouts_failed", error=str(exc))
            except Exception:
                # Anything else would end the loop silently, and no TIMEOUT would ever be sent again.
                log.exception("command_timeouts_failed")
            await asyncio.sleep(interval_s)

    async def _watch_embedded(self) -> None:
        """Restart the embedded server when it exits; give up (stop, exit 3) when it keeps exiting.

        While it is down /healthz and /readyz answer 503: the relay cannot store, and says so.
        """
        assert self.embedded is not None

        def down(reason: str) -> None:
            self.health.storage_down = reason

        self.failure = await keep_embedded_up(self.embedded, down)
        self.request_stop()

    def _registration_state(self) -> str:
        """The OCPI connection's state (relay.states): relay_registration_state, /readyz, `relay status`."""
        reg = self.registry.registration if self.registry is not None else None
        return connection_state(reg.state if reg is not None else None,
                                static=bool(self.settings.iop.url and self.settings.iop.token))  # fmt: skip

    async def update_gauges(self) -> bool:
        """One pass of the gauge loop; False (and a Redis error counted) if Redis did not answer.

        Queue depth, oldest age and dead letters come from Redis, so any replica reports them.
        """
        assert self.store is not None
        if self.forwarder is not None:
            self.health.link_state = self.link.state
        metrics.set_registration_state(self._registration_state())
        ds = DeliveryStore(self.store)
        try:
            started = time.perf_counter()
            if not await self.store.ping():
                raise StoreUnavailable("no answer to PING")
            metrics.REDIS_ROUNDTRIP.observe(time.perf_counter() - started)
            depth = await self.store.stream_lengths()
            oldest = await ds.oldest()
            dead = await ds.dlq_lengths()
            memory = await self.store.memory()
        except StoreError as exc:
            metrics.REDIS_ERRORS.labels(op="gauges").inc()
            log.debug("gauges_failed", error=str(exc))
            return False
        for gauge, name in ((metrics.REDIS_USED_MEMORY, "used_memory"), (metrics.REDIS_MAX_MEMORY, "maxmemory"),
                            (metrics.REDIS_AOF_SIZE, "aof_current_size")):  # fmt: skip
            if name in memory:
                gauge.set(memory[name])
        now = time.time()
        for module, n in depth.items():
            metrics.QUEUE_DEPTH.labels(module=module).set(n)
            first = oldest.get(module)
            metrics.OLDEST_AGE.labels(module=module).set(now - first if first else 0)
            metrics.DLQ_DEPTH.labels(module=module).set(dead[module])
        return True

    async def reap_consumers(self) -> list[str]:
        """Remove the consumers of replicas no longer alive that hold no pending entry (each restart of a
        replica leaves one in every group); any replica may, at start and every REAP_EVERY passes of the gauges.
        Returns ``stream/consumer`` of each removed."""
        assert self.store is not None
        ds = DeliveryStore(self.store)
        alive = await ds.alive()
        if self.forwarder is not None:
            alive.append(self.forwarder.me)  # ours, even before our first heartbeat
        streams = [keys.stream_key(module, shard) for module in MODULES for shard in range(self.store.shards)]
        removed = await ds.reap_consumers(streams, alive)
        if removed:
            metrics.CONSUMERS_REMOVED.inc(len(removed))
            log.info("consumers_removed", count=len(removed), consumers=removed[:20])
        return removed

    async def _gauge_loop(self, interval_s: float = 5.0) -> None:
        passes = 0
        while True:
            await self.update_gauges()
            if passes % REAP_EVERY == 0:
                try:
                    await self.reap_consumers()
                except StoreError as exc:
                    metrics.REDIS_ERRORS.labels(op="consumers").inc()
                    log.debug("consumers_reap_failed", error=str(exc))
            passes += 1
            await asyncio.sleep(interval_s)

    async def stop(self) -> None:
        """Stop accepting, finish in-flight work, close Redis, stop the embedded server."""
        self.health.stopping = True
        for task in (self._embedded_watch, self._gauges, self._watch, self._timeouts, self._retention):
            if task is not None:
                await _cancel(task)
        for runner in reversed(self._runners):
            await runner.cleanup()  # stops the site, waits shutdown_timeout for handlers, then cancels
        self._runners.clear()
        if self.worker_metrics is not None:
            self.worker_metrics.unlink()
        if self.forwarder is not None:
            await self.forwarder.stop()
            self.forwarder = None
        for client in (self.client, self.csms):
            if client is not None:
                await client.close()
        self.client = self.csms = None
        if self.store is not None:
            await self.store.close()
            self.store = None
        if self.embedded is not None:
            await self.embedded.stop()
        log.info("relay_stopped")

    def request_stop(self) -> None:
        """Ask run() to shut down (signal handlers call this)."""
        self._stop.set()

    async def run(self, started: Callable[[], None] | None = None) -> None:
        """Run until SIGTERM or SIGINT; ``started()`` once every part is up (the supervisor's readiness)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        try:
            await self.start()
            if started is not None:
                started()
            await self._stop.wait()
        finally:
            # A worker keeps its handlers while it stops: it may get the signal twice (from its supervisor, and
            # from a terminal's Ctrl-C or systemd's KillMode=control-group), and its supervisor SIGKILLs it
            # after the shutdown timeouts anyway. One relay: a second signal while stopping ends it at once.
            for sig in (signal.SIGTERM, signal.SIGINT) if self.worker is None else ():
                with suppress(Exception):
                    loop.remove_signal_handler(sig)
            await self.stop()
            for sig in (signal.SIGTERM, signal.SIGINT) if self.worker is not None else ():
                with suppress(Exception):
                    loop.remove_signal_handler(sig)
        if self.failure is not None:
            raise EmbeddedRedisLost(self.failure)
