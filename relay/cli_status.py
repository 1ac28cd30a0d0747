"""``relay status`` and ``relay link resume``: what the queues and the IOP link are doing."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click
import msgspec

from relay.cli_common import config_option, load_settings, with_store
from relay.config import MODULES, Settings
from relay.store import DeliveryStore


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@config_option
def status(as_json: bool, config_path: Path | None) -> None:
    """Queue depth and oldest age per module, dead letters, IOP link state per replica, takeover holds.

    Also the OCPI connection (registered, since when, the IOP's endpoints, the IOP party that OCPI-to-*
    names: the handshake's HUB role, flagged when it differs from [iop]). After a replica took a shard
    over from one that died, the keys whose events may still be on the wire from the dead one wait:
    "held" shows how many per shard, until when, and the first few. Works while the relay runs;
    the same numbers as the relay_queue_depth, relay_oldest_event_age_seconds and relay_dead_letters metrics.

    \b
    Examples:
      relay status
      relay status --json | jq '.modules.locations.oldest_age_s'
    """
    settings = load_settings(config_path)

    async def go(store: Any) -> None:
        from relay.credentials import Registry
        from relay.store import RegistrationStore

        ds = DeliveryStore(store)
        depth = await store.stream_lengths()
        oldest = await ds.oldest()
        dead = await ds.dlq_lengths()
        links = await ds.link_states()
        holds = _holds(await ds.holds(), time.time())
        registry = Registry(settings, RegistrationStore(store))
        await registry.refresh()
        now = time.time()
        modules = {
            m: {"queued": depth[m], "oldest_age_s": round(now - o, 1) if (o := oldest[m]) else 0, "dead": dead[m]}
            for m in MODULES
        }
        conn = _connection(registry, settings)
        if as_json:
            data = {"redis": "ok", "connection": conn, "modules": modules, "replicas": links, "holds": holds}
            click.echo(msgspec.json.encode(data).decode())
            return
        click.echo(f"connection: {conn['state']}" + (f" since {conn['since']}" if conn.get("since") else ""))
        if conn.get("versions_url"):
            click.echo(f"  IOP versions: {conn['versions_url']}")
        differs = conn["iop_party"] != conn["configured_iop_party"]
        click.echo(f"  IOP party:    {conn['iop_party']} (OCPI-to-*"
                   + (f"; differs from [iop] {conn['configured_iop_party']})" if differs else ")"))  # fmt: skip
        for ep in conn.get("endpoints", []):
            click.echo(f"  {ep['identifier']:<12} {ep['role']:<9} {ep['url']}")
        click.echo(f"{'module':<10} {'queued':>8} {'oldest age':>11} {'dead':>6}")
        for m, row in modules.items():
            click.echo(f"{m:<10} {row['queued']:>8} {row['oldest_age_s']:>10}s {row['dead']:>6}")
        for replica, link in links.items() or {"(no forwarder running)": {}}.items():
            click.echo(f"link {replica}: {link.get('state', '-')} {link.get('reason', '')}")
        for shard, hold in holds.items():
            click.echo(f"held shard {shard}: {hold['keys']} keys until {hold['until']} ({hold['wait_s']}s),"
                       f" old owner's requests may still land: {', '.join(hold['first'])}")  # fmt: skip

    with_store(settings, go)


def _holds(published: dict[int, dict[str, float]], now: float, first: int = 5) -> dict[str, dict[str, Any]]:
    """Per shard, the keys a takeover holds (relay.reader.Hold) that still wait: count, end, the first few."""
    out: dict[str, dict[str, Any]] = {}
    for shard, fields in sorted(published.items()):
        waiting = sorted(k for k, until in fields.items() if until > now)
        if not waiting:
            continue
        until = max(fields[k] for k in waiting)
        out[str(shard)] = {
            "keys": len(waiting),
            "until": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(until)),
            "wait_s": round(until - now, 1),
            "first": waiting[:first],
        }
    return out


def _connection(registry: Any, settings: Settings) -> dict[str, Any]:
    """How the relay is connected to the IOP, for `relay status`."""
    reg = registry.registration
    # OCPI-to-* of every request: the handshake's HUB role (T3), else [iop]; the two differ when [iop] is
    # stale (GIREVE: FR/107 in pre-production, FR/007 in production).
    party = {"iop_party": "/".join(registry.directory.iop_party()),
             "configured_iop_party": f"{settings.iop.country_code}/{settings.iop.party_id}"}  # fmt: skip
    if reg is None:
        static = bool(settings.iop.url and settings.iop.token)
        return {"state": "static" if static else "unregistered", "versions_url": settings.iop.url or None, **party}
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(reg.updated_at))
    return {
        **party,
        "state": reg.state,
        "direction": reg.direction,
        "since": since,
        "versions_url": reg.versions_url,
        "endpoints": [{"identifier": e.identifier, "role": e.role, "url": e.url} for e in reg.endpoints],
    }


@click.group()
def link() -> None:
    """Control the IOP link of every running replica."""


@link.command("resume")
@config_option
def link_resume(config_path: Path | None) -> None:
    """Resume delivery after an auth failure (401/403), an unknown receiver (OCPI 4001) or a pause, once fixed.

    Every running replica picks the request up within [forwarder] lease_ttl_s/3 seconds and starts
    again with one request at a time. If the IOP still refuses the token (or still does not know the
    OCPI-to-* party: `relay status` shows the one in use), the link stops again.

    \b
    Example:
      relay link resume && sleep 10 && relay status
    """
    settings = load_settings(config_path)

    async def go(store: Any) -> None:
        await DeliveryStore(store).request_resume(time.time())
        click.echo("resume requested; replicas pick it up within lease_ttl_s/3 seconds")

    with_store(settings, go)
