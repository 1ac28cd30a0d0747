"""``relay status`` and ``relay link resume``: what the queues and the IOP link are doing."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click
import msgspec

from relay.cli_common import config_option, load_config, load_settings, with_store
from relay.store import DeliveryStore


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@config_option
def status(as_json: bool, config_path: Path | None) -> None:
    """Queue depth and oldest age per module and shard, dead letters, IOP link per replica, parked and held keys.

    Also the OCPI connection (registered, since when, the IOP's endpoints, the IOP party that OCPI-to-*
    names: the handshake's HUB role, flagged when it differs from [iop]). After a replica took a shard
    over from one that died, the keys whose events may still be on the wire from the dead one wait:
    "held" shows how many per shard, until when, and the first few. Works while the relay runs;
    the same numbers as the relay_queue_depth, relay_oldest_event_age_seconds and relay_dead_letters metrics.

    \b
    Examples:
      relay status
      relay status --json | jq '.modules.locations.oldest_age_s'
    \b
    --json adds "config": the configuration file used ({"path", "source"}: --config, RELAY_CONFIG,
    ./config/relay.toml, /etc/relay/relay.toml, or path null and source "none").
    """
    settings, found = load_config(config_path)

    async def go(store: Any) -> None:
        from relay.status import collect

        report = await collect(store, settings)
        if as_json:
            click.echo(msgspec.json.encode({**msgspec.to_builtins(report), "config": found.to_json()}).decode())
            return
        data = msgspec.to_builtins(report)
        conn, modules, links, holds = data["connection"], data["modules"], report.replicas, data["holds"]
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
        for shard, parked in data["parked"].items():
            click.echo(
                f"parked shard {shard}: {parked['keys']} keys, e.g. "
                + ", ".join(f"{p['module']}|{p['key']} behind {p['dead_id']}" for p in parked["first"])
            )

    with_store(settings, go)


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
