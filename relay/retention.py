"""Retention: what the relay forgets once it is old enough, so Redis does not grow with every object ever sent.

Without it, the marker hashes keep a field per ordering key forever (``delivered``: every CDR, every command;
``accepted``, ``dead-last``; the session watermarks of sessions that never get a CDR), and the state every
Session and CDR. The sweeper runs in each replica, every ``[retention] sweep_interval_s`` (jittered), over
the shards this replica owns (the lease loop's map, read at each shard: a shard lost meanwhile is skipped):

- markers (delivered, accepted, dead-last) whose stream id is older than ``markers_s``, except those of
  keys that still have a dead letter (the replay guard compares the dead letter's id with them);
- session watermarks (session-last + session-done) older than ``markers_s``, only when nothing of the
  session is undelivered (done >= last: a CDR waiting for an update keeps them), and orphan session-done;
- Sessions and CDRs whose last_updated is older than ``sessions_s`` (state field + index member), except a
  Session with an undelivered update or a dead letter. Locations and Tariffs are never touched.

Every deletion is a compare-and-delete (relay/store/lua/trim_*.lua): a field written since it was read is
kept. ``0`` for a window keeps that kind forever. See docs/operations.md "Retention".
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable

import structlog

from relay import metrics
from relay.config import Settings
from relay.errors import StoreError
from relay.store import RetentionStore, Store

log = structlog.get_logger(__name__)

# The kinds counted (relay_retention_removed_total{what}) and logged, always all of them.
WHAT = metrics.RETENTION_WHAT
JITTER = 0.2  # each wait is sweep_interval_s × (1 ± JITTER): replicas started together do not sweep together


class Sweeper:
    """The retention sweeper of one replica; ``owned()`` names the shards it holds now."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        owned: Callable[[], Iterable[int]],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = settings.retention
        self.store = RetentionStore(store)
        self.owned = owned
        self.operators = [op.key for op in settings.operators]
        self.state_enabled = settings.state.enabled
        self.clock = clock

    @property
    def enabled(self) -> bool:
        """False when both windows are 0 (keep everything forever)."""
        return self.cfg.markers_s > 0 or self.cfg.sessions_s > 0

    async def sweep_shard(self, shard: int) -> Counter[str]:
        """One shard's sweep; returns what it removed, by kind."""
        cfg, st, now_ms = self.cfg, self.store, int(self.clock() * 1000)
        removed: Counter[str] = Counter()
        keep = await st.dead_letter_fields(shard, cfg.batch)
        if cfg.markers_s > 0:
            cutoff = now_ms - cfg.markers_s * 1000
            removed.update(await st.trim_markers(shard, cutoff, keep, cfg.batch))
            removed["session_watermarks"] += await st.trim_watermarks(shard, cutoff, keep, cfg.batch)
        if cfg.sessions_s > 0 and self.state_enabled:
            cutoff = now_ms - cfg.sessions_s * 1000
            for module in ("sessions", "cdrs"):
                removed[module] += await st.trim_state(shard, module, self.operators, cutoff, keep, cfg.batch)
        for what, n in removed.items():
            if n:
                metrics.RETENTION_REMOVED.labels(what=what).inc(n)
        return removed

    async def sweep(self) -> Counter[str]:
        """Sweep every shard this replica owns (checked again before each: one lost meanwhile is left alone)."""
        started = time.monotonic()
        total: Counter[str] = Counter()
        swept = []
        for shard in sorted(self.owned()):
            if shard not in set(self.owned()):
                continue
            total.update(await self.sweep_shard(shard))
            swept.append(shard)
        log.info("retention_swept", shards=swept, seconds=round(time.monotonic() - started, 3),
                 **{what: total[what] for what in WHAT})  # fmt: skip
        return total

    async def run(self, stopping: asyncio.Event) -> None:
        """Sweep every sweep_interval_s (jittered) until ``stopping``; a Redis error waits for the next turn."""
        if not self.enabled:
            log.info("retention_disabled", hint="[retention] markers_s and sessions_s are 0: nothing is forgotten")
            return
        # The first sweep within one interval of the start (a relay restarted often still sweeps), spread.
        wait = self.cfg.sweep_interval_s * random.uniform(JITTER, 1)
        while not stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), wait)
            if stopping.is_set():
                return
            try:
                await self.sweep()
            except StoreError as exc:
                metrics.REDIS_ERRORS.labels(op="retention").inc()
                log.warning("retention_sweep_failed", error=str(exc))
            except Exception:  # anything else would end the loop silently, and nothing be swept again
                log.exception("retention_sweep_failed")
            wait = self.cfg.sweep_interval_s * random.uniform(1 - JITTER, 1 + JITTER)
