# ruff: noqa: F811  (pytest fixtures imported from the feature's own test modules)
"""Found in review of issue 18's /readyz per module: its cost with many shards."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from tests.test_metrics import relay_env  # noqa: F401  (the fixture envs uses)
from tests.test_observability import envs, readyz  # noqa: F401  (the fixture)


async def test_readyz_with_1024_shards_stays_cheap(envs: Callable[..., Any]) -> None:
    # Each probe now reads Redis four times over every (module, shard) stream: XINFO GROUPS, XLEN, XRANGE, XLEN
    # of the DLQ (20 480 commands with [redis] shards = 1024), on the serving event loop, every periodSeconds
    # per replica. The manifests give the probe timeoutSeconds 3 and urlopen(timeout=2).
    env = await envs(RELAY_REDIS_SHARDS="1024", RELAY_FORWARDER_ENABLED="false")
    await readyz(env)  # warm
    lags: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:  # how long the event loop is blocked (the ingress waits as long)
        while not stop.is_set():
            t = time.perf_counter()
            await asyncio.sleep(0.001)
            lags.append(time.perf_counter() - t)

    tick = asyncio.create_task(ticker())
    took = []
    for _ in range(3):
        t = time.perf_counter()
        status, _ = await readyz(env)
        took.append(time.perf_counter() - t)
        assert status == 200
    stop.set()
    await tick
    print(f"readyz took {[round(x, 3) for x in took]} s; worst loop stall {max(lags) * 1000:.0f} ms")
    assert max(lags) < 0.05, f"event loop stalled {max(lags) * 1000:.0f} ms by one /readyz"
