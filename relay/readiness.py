"""What /readyz reports beside its verdict: the OCPI connection and each module's readiness.

Per module: its streams and consumer groups exist in every shard (else the ingress cannot append there, or
no forwarder can read: ``ready`` is false), the queue depth, the oldest undelivered event's age, the dead
letters (read at most every READINESS_TTL_S), how many shards this replica's forwarder holds and whether it
is delivering now. Reported, never
required: the HTTP status of /readyz stays Redis + listeners + not stopping (README, "Operations").
"""

from __future__ import annotations

import time
from typing import Any

from relay.config import MODULES
from relay.errors import StoreError
from relay.store import DeliveryStore, Store
from relay.typedefs import Health

# How long one read of every stream serves the probes (a probe every second with [redis] shards = 1024 would
# otherwise read 20,480 streams a second on the serving event loop).
READINESS_TTL_S = 5.0


async def report(store: Store, health: Health, redis_ok: bool) -> dict[str, Any]:
    """``connection`` and ``modules`` of the /readyz body (Redis is read only when it answered the PING)."""
    owned = health.shards_owned_of() if health.shards_owned_of is not None else None
    link = health.link()
    forwarding = {"shards": store.shards, "shards_owned": owned or 0,
                  "delivering": owned is not None and owned > 0 and link == "up"}  # fmt: skip
    out: dict[str, Any] = {"connection": health.connection_of() if health.connection_of is not None else None}
    unknown = {m: {"ready": False, "streams": "unknown", **forwarding} for m in MODULES}
    if not redis_ok:
        out["modules"] = unknown
        return out
    cached = health.readiness
    if cached is not None and time.monotonic() - cached[0] < READINESS_TTL_S:
        read = cached[1]
    else:
        ds = DeliveryStore(store)
        try:
            read = {"missing": await ds.unreadable_shards(), "depth": await store.stream_lengths(),
                    "oldest": await ds.oldest(), "dead": await ds.dlq_lengths()}  # fmt: skip
        except StoreError as exc:
            out["modules"] = unknown
            out["modules_error"] = str(exc)
            return out
        health.readiness = (time.monotonic(), read)
    missing, depth, oldest, dead = read["missing"], read["depth"], read["oldest"], read["dead"]
    now = time.time()
    modules: dict[str, dict[str, Any]] = {}
    for m in MODULES:
        first = oldest.get(m)
        row: dict[str, Any] = {"ready": not missing[m], "streams": "missing" if missing[m] else "ok"}
        if missing[m]:
            row["missing_shards"] = missing[m]
        row.update(queued=depth[m], oldest_age_s=round(now - first, 1) if first else 0, dead=dead[m], **forwarding)
        modules[m] = row
    out["modules"] = modules
    return out
