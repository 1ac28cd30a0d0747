from __future__ import annotations
import asyncio
from collections.abc import Callable
from typing import Any
from tests.test_forwarder import make_env,  Env, fr_session, fr_cdr, until_async

async def test_cdr_backlog(make_env: Callable[..., Any]) -> None:
    knobs = {"RELAY_REDIS_SHARDS": "1", "RELAY_FORWARDER_MAX_BUFFERED": "6", "RELAY_FORWARDER_READ_BATCH": "3"}
    first: Env = await make_env(RELAY_FORWARDER_ENABLED="false", **knobs)
    for i in range(10):
        for k in range(4):
            await first.send("PUT", f"/sessions/FR/AB1/S{i}", fr_session(f"S{i}", kwh=float(k)))
    for i in range(10):
        await first.send("POST", "/cdrs", fr_cdr(f"C{i}", f"S{i}"))
    await first.relay.stop()
    nxt: Env = await make_env(iop=first.iop, **knobs)
    await nxt.iop.wait_for(lambda: len(nxt.iop.delivered("/ocpi/2.2.1/cdrs")) == 10, timeout=15)
