"""What the queues, the dead letters and the IOP link are doing: one read of Redis that both ``relay status
--json`` and ``GET /admin/status`` answer with (relay.cli_status, relay.ingress.admin).

The same numbers as the relay_queue_depth, relay_oldest_event_age_seconds and relay_dead_letters metrics,
plus each shard's, the link of every live replica, the OCPI connection, the keys parked behind a dead letter
and the keys a takeover holds. Pure reads: nothing here changes Redis.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec

from relay.config import MODULES, Settings
from relay.credentials import Registry
from relay.states import connection_state
from relay.store import DeliveryStore, RegistrationStore, Store

__all__ = ["Connection", "Hold", "ModuleQueue", "Parked", "ParkedKey", "ShardQueue", "Status", "collect"]

HELD_FIRST = 5  # keys named per shard in a takeover hold
PARKED_FIRST = 20  # keys named per shard among the parked ones (about: one HSCAN page)


class ShardQueue(msgspec.Struct, kw_only=True):
    """One shard of a module's stream."""

    shard: int
    queued: int
    oldest_age_s: float  # 0 when nothing is queued
    dead: int


class ModuleQueue(msgspec.Struct, kw_only=True):
    """A module over all shards (``shards``: each one)."""

    queued: int
    oldest_age_s: float
    dead: int
    shards: list[ShardQueue]


class Endpoint(msgspec.Struct, kw_only=True):
    identifier: str
    role: str
    url: str


class Connection(msgspec.Struct, kw_only=True, omit_defaults=True):
    """How the relay is connected to the IOP: ``state`` (relay.states) registered | unregistered (handshake),
    static (``[iop] url`` + token) | none (nothing). ``iop_party``: the OCPI-to-* of every request."""

    state: str
    iop_party: str
    configured_iop_party: str
    versions_url: str | None
    direction: str | None = None
    since: str | None = None
    endpoints: list[Endpoint] | None = None


class Hold(msgspec.Struct, kw_only=True):
    """A shard's keys held after a takeover (relay.reader.Hold): how many, until when, the first few."""

    keys: int
    until: str
    wait_s: float
    first: list[str]  # module|key


class ParkedKey(msgspec.Struct, kw_only=True):
    module: str
    key: str
    dead_id: str  # the dead letter that parked it: replay or purge it to unpark the key


class Parked(msgspec.Struct, kw_only=True):
    """A shard's parked keys: how many, and some of them."""

    keys: int
    first: list[ParkedKey]


class Status(msgspec.Struct, kw_only=True):
    """``relay status --json``, and ``GET /admin/status``."""

    redis: str
    connection: Connection
    modules: dict[str, ModuleQueue]
    replicas: dict[str, dict[str, str]]  # replica id → its link as it last published it (state, reason…)
    holds: dict[str, Hold]  # shard → its takeover hold
    parked: dict[str, Parked]  # shard → its parked keys


async def collect(store: Store, settings: Settings) -> Status:
    """Read everything ``Status`` says from Redis (a StoreError when Redis does not answer)."""
    ds = DeliveryStore(store)
    gauges = await ds.shard_gauges()
    links = await ds.link_states()
    published = await ds.holds()
    parked = await ds.parked_sample(PARKED_FIRST)
    registry = Registry(settings, RegistrationStore(store))
    await registry.refresh()
    now = time.time()

    def age(oldest: float | None) -> float:
        return round(now - oldest, 1) if oldest else 0

    modules: dict[str, ModuleQueue] = {}
    for m in MODULES:
        rows = [(shard, *gauges[(m, shard)]) for shard in range(store.shards)]
        firsts = [oldest for _, _, oldest, _ in rows if oldest]
        modules[m] = ModuleQueue(
            queued=sum(r[1] for r in rows), oldest_age_s=age(min(firsts) if firsts else None),
            dead=sum(r[3] for r in rows),
            shards=[ShardQueue(shard=s, queued=q, oldest_age_s=age(o), dead=d) for s, q, o, d in rows],
        )  # fmt: skip
    return Status(
        redis="ok",
        connection=connection(registry, settings),
        modules=modules,
        replicas=links,
        holds=holds(published, now),
        parked={
            str(shard): Parked(
                keys=n,
                first=[
                    ParkedKey(module=f.partition("|")[0], key=f.partition("|")[2], dead_id=dead)
                    for f, dead in sorted(sample.items())[:PARKED_FIRST]
                ],
            )
            for shard, (n, sample) in sorted(parked.items())
        },
    )


def holds(published: dict[int, dict[str, float]], now: float, first: int = HELD_FIRST) -> dict[str, Hold]:
    """Per shard, the keys a takeover holds (relay.reader.Hold) that still wait: count, end, the first few."""
    out: dict[str, Hold] = {}
    for shard, fields in sorted(published.items()):
        waiting = sorted(k for k, until in fields.items() if until > now)
        if not waiting:
            continue
        until = max(fields[k] for k in waiting)
        out[str(shard)] = Hold(keys=len(waiting), until=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(until)),
                               wait_s=round(until - now, 1), first=waiting[:first])  # fmt: skip
    return out


def connection(registry: Any, settings: Settings) -> Connection:
    """How the relay is connected to the IOP."""
    reg = registry.registration
    # OCPI-to-* of every request: the handshake's HUB role (T3), else [iop]; the two differ when [iop] is
    # stale (GIREVE: FR/107 in pre-production, FR/007 in production).
    party = "/".join(registry.directory.iop_party())
    configured = f"{settings.iop.country_code}/{settings.iop.party_id}"
    if reg is None:
        static = bool(settings.iop.url and settings.iop.token)
        return Connection(state=connection_state(None, static=static), versions_url=settings.iop.url or None,
                          iop_party=party, configured_iop_party=configured)  # fmt: skip
    return Connection(
        iop_party=party,
        configured_iop_party=configured,
        state=reg.state,
        direction=reg.direction,
        since=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(reg.updated_at)),
        versions_url=reg.versions_url,
        endpoints=[Endpoint(identifier=e.identifier, role=e.role, url=e.url) for e in reg.endpoints],
    )
