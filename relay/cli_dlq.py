"""``relay dlq``: list, show, replay and purge dead letters."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import msgspec

from relay.cli_common import config_option, load_settings, with_store
from relay.config import MODULES
from relay.dlq import (
    Filter,
    Purge,
    Replay,
    describe,
    find,
    outcome_row,
    parse_since,
    purge_fields,
    purge_many,
    purge_summary,
    replay_fields,
    replay_many,
    replay_summary,
    select,
)  # fmt: skip
from relay.store import DeadLetter, DeliveryStore


def _since(value: str | None) -> float | None:
    """``90s``, ``15m``, ``2h``, ``7d`` ago, or an ISO date/time (UTC)."""
    if not value:
        return None
    try:
        return parse_since(value)
    except ValueError:
        raise click.BadParameter(f"{value!r}: use e.g. 30m, 2h, 7d or 2026-11-26T10:00:00Z") from None


def _filter(ids: tuple[str, ...], module: str | None, kind: str | None, reason: str | None,
            key: str | None, since: str | None) -> Filter:  # fmt: skip
    return Filter(module=module, kind=kind, reason=reason, key=key, since=_since(since), ids=frozenset(ids))


def _selection_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--since", help="Dead since a duration ago (30m, 2h, 7d) or an ISO time.")(fn)
    fn = click.option("--key", help="Exact ordering key, e.g. loc:FR:AB1:LOC1.")(fn)
    fn = click.option("--reason", help="Substring of the failure reason, e.g. 'OCPI 2001'.")(fn)
    kinds = click.Choice(["permanent", "transient", "auth", "parked"])
    fn = click.option("--kind", type=kinds, help="Failure kind.")(fn)
    fn = click.option("--module", type=click.Choice(MODULES), help="OCPI module.")(fn)
    return fn


@click.group()
def dlq() -> None:
    """Inspect, replay and purge dead letters.

    \b
    Examples:
      relay dlq list --module locations --since 2h
      relay dlq show 1764151200000-0
      relay dlq replay --reason "OCPI 2001" --dry-run
      relay dlq replay --all --yes
      relay dlq purge --module cdrs --kind parked --yes
    """


@dlq.command("list")
@_selection_options
@click.option("--limit", default=100, show_default=True, help="Show at most this many.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@config_option
def dlq_list(module: str | None, kind: str | None, reason: str | None, key: str | None, since: str | None,
             limit: int, as_json: bool, config_path: Path | None) -> None:  # fmt: skip
    """List dead letters (oldest first per module).

    \b
    Examples:
      relay dlq list --since 2h
      relay dlq list --module sessions --reason "OCPI 2001"
      relay dlq list --json | jq -r .dead_id
    """
    settings = load_settings(config_path)
    flt = _filter((), module, kind, reason, key, since)

    async def go(store: Any) -> None:
        n = 0
        async for dead in select(DeliveryStore(store), flt):
            if n >= limit:
                break
            n += 1
            d = describe(dead)
            if as_json:
                d.pop("body")
                click.echo(msgspec.json.encode(d).decode())
            else:
                click.echo(f"{d['dead_id']:<17} {d['dead_at']} {d['module']:<9} {d['method']:<6} {d['object']}  "
                           f"attempts={d['attempts']} {d['kind']}: {d['reason']}")  # fmt: skip
        if not as_json:
            click.echo(f"{n} shown", err=True)

    with_store(settings, go)


@dlq.command("show")
@click.argument("ident")
@config_option
def dlq_show(ident: str, config_path: Path | None) -> None:
    """Show one dead letter (by dead-letter id or event id) with its body and reason, as JSON."""
    settings = load_settings(config_path)

    async def go(store: Any) -> None:
        dead = await find(DeliveryStore(store), ident)
        if dead is None:
            click.echo(f"no dead letter {ident}", err=True)
            sys.exit(1)
        click.echo(msgspec.json.format(msgspec.json.encode(describe(dead))).decode())

    with_store(settings, go)


def _check_selection(ids: tuple[str, ...], all_: bool, flt: Filter, verb: str) -> None:
    has_filter = any((flt.module, flt.kind, flt.reason, flt.key, flt.since))
    if not ids and not all_ and not has_filter:
        raise click.UsageError(f"say what to {verb}: IDs, a filter (--module, --reason, …) or --all")
    if all_ and (ids or has_filter):
        raise click.UsageError("--all excludes IDs and filters")


def _confirm_bulk(ids: tuple[str, ...], chosen: list[DeadLetter], yes: bool, verb: str) -> None:
    """A filter or --all: ask with the number of dead letters it selected ("Replay 12 dead letters? [y/N]").

    Declined: exit code 1, nothing changed. IDs, --yes, --dry-run and an empty selection do not ask.
    """
    if ids or yes or not chosen:
        return
    n = len(chosen)
    click.confirm(f"{verb.capitalize()} {n} dead letter{'s' if n != 1 else ''}?", abort=True, err=True)


def _json_line(dead: DeadLetter, **fields: Any) -> str:
    """One dead letter's outcome as a JSON line (``--json`` of replay and purge)."""
    return msgspec.json.encode(outcome_row(dead, **fields)).decode()


@dlq.command("replay")
@click.argument("ids", nargs=-1)
@_selection_options
@click.option("--all", "all_", is_flag=True, help="Every dead letter (excludes IDs and filters).")
@click.option("--dry-run", is_flag=True, help="Say what would happen; change nothing.")
@click.option("--force", is_flag=True, help="Replay each old event itself, as it was, even if a newer update "
              "of the object was delivered or is queued.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="One JSON object per dead letter, then the summary.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@config_option
def dlq_replay(ids: tuple[str, ...], module: str | None, kind: str | None, reason: str | None, key: str | None,
               since: str | None, all_: bool, dry_run: bool, force: bool, as_json: bool, yes: bool,
               config_path: Path | None) -> None:  # fmt: skip
    """Put dead letters back on the ordered delivery path.

    A Location (or EVSE, Connector), Session or Tariff is replayed from state: the IOP gets a PUT of
    the object's current state in the key's order, not the old operation (as it was only if the object
    has no state any more). Several dead letters of one object replay as one, the newest; the older
    ones leave the DLQ as superseded. One whose object has a newer update delivered or still queued is
    skipped. CDRs and command results go as they were. --force replays each selected old event itself,
    as it was, in order. A replay unparks its object. Exit code 0 even when some are skipped.

    \b
    Summary (last line, JSON): selected, replayed, superseded, skipped_newer, gone, unparked
    (dry run: would_replay, would_supersede, would_skip).
    """
    settings = load_settings(config_path)
    flt = _filter(ids, module, kind, reason, key, since)
    _check_selection(ids, all_, flt, "replay")

    async def go(store: Any) -> None:
        ds = DeliveryStore(store)
        await ds.load_scripts()
        # Select first: replaying deletes from the streams being paged through.
        chosen = [d async for d in select(ds, flt)]
        _confirm_bulk(ids, chosen, yes or dry_run, "replay")
        unparked = 0
        with click.progressbar(length=len(chosen), label="replaying", file=sys.stderr) as bar:

            def step(dead: DeadLetter, rep: Replay) -> None:
                nonlocal unparked
                bar.update(1)
                unparked += rep.unparked
                if as_json:
                    click.echo(_json_line(dead, **replay_fields(rep)))
                    return
                ref = f"{dead.id} {dead.event.object_ref()}"
                if rep.result in ("skipped_newer", "would_skip"):
                    click.echo(f"\n{ref}: skipped, a newer update of the object was {rep.newer or 'delivered'} "
                               "(use --force to replay it anyway)", err=True)  # fmt: skip
                elif rep.result in ("superseded", "would_supersede"):
                    click.echo(f"\n{ref}: superseded by {rep.by}, the newer dead letter of the object", err=True)
                if rep.unparked:
                    click.echo(f"\nunparked {dead.event.key}", err=True)

            counts = await replay_many(
                ds, chosen, force=force, dry_run=dry_run, from_state=settings.state.enabled, progress=step
            )
        click.echo(msgspec.json.encode(replay_summary(len(chosen), counts, unparked)).decode())

    with_store(settings, go)


@dlq.command("purge")
@click.argument("ids", nargs=-1)
@_selection_options
@click.option("--all", "all_", is_flag=True, help="Every dead letter (excludes IDs and filters).")
@click.option("--dry-run", is_flag=True, help="Say how many would go; delete nothing.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per dead letter, then the summary.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@config_option
def dlq_purge(ids: tuple[str, ...], module: str | None, kind: str | None, reason: str | None, key: str | None,
              since: str | None, all_: bool, dry_run: bool, as_json: bool, yes: bool,
              config_path: Path | None) -> None:  # fmt: skip
    """Delete dead letters for good.

    Purging the dead letter that parked its object unparks the object (its later events flow again).

    \b
    Examples:
      relay dlq purge 1764151200000-0
      relay dlq purge --module cdrs --kind parked --dry-run
      relay dlq purge --all --yes
    """
    settings = load_settings(config_path)
    flt = _filter(ids, module, kind, reason, key, since)
    _check_selection(ids, all_, flt, "purge")

    async def go(store: Any) -> None:
        ds = DeliveryStore(store)
        await ds.load_scripts()
        chosen = [d async for d in select(ds, flt)]
        _confirm_bulk(ids, chosen, yes or dry_run, "purge")
        unparked: list[str] = []
        with click.progressbar(length=len(chosen), label="purging", file=sys.stderr) as bar:

            def step(dead: DeadLetter, done: Purge) -> None:
                bar.update(1)
                if done.unparked:
                    unparked.append(dead.event.key)
                if as_json:
                    click.echo(_json_line(dead, **purge_fields(done, dry_run)))
                elif done.unparked:
                    click.echo(f"\n{'would unpark' if dry_run else 'unparked'} {dead.event.key}", err=True)

            n = await purge_many(ds, chosen, dry_run=dry_run, progress=step)
        click.echo(msgspec.json.encode(purge_summary(len(chosen), n, len(unparked), dry_run)).decode())

    with_store(settings, go)
