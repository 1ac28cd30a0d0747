"""The ``relay`` command: serve, check-config, and operator tools.

Exit codes: 0 success, 1 runtime failure, 2 usage or configuration error.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click
import msgspec

from relay import __version__
from relay.config import MODULES, Settings, load
from relay.dlq import Filter, ReplayResult, describe, find, purge_many, replay_many, select
from relay.errors import ConfigError
from relay.store import DeadLetter, DeliveryStore

T = TypeVar("T")

config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="RELAY_CONFIG",
    help="TOML config file (env RELAY_CONFIG). Every key can be overridden by RELAY_<SECTION>_<KEY>.",
)


def _settings(config_path: Path | None, *, serving: bool = False) -> Settings:
    try:
        settings = load(config_path)
        if serving and (problems := settings.serve_problems()):
            raise ConfigError(problems)
        return settings
    except ConfigError as exc:
        click.echo("configuration is invalid:", err=True)
        for p in exc.problems:
            click.echo(f"  - {p}", err=True)
        sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="relay")
def main() -> None:
    """Store-and-forward OCPI 2.2.1 relay between a CSMS and GIREVE's IOP.

    Every command reads the same configuration: --config FILE (or RELAY_CONFIG), then RELAY_<SECTION>_<KEY>
    environment variables. Operator commands talk to the relay's Redis (the embedded one of a running
    relay in [storage] dir, or [redis] url) and work while the relay runs. `relay COMMAND --help` for more.

    \b
    Examples:
      RELAY_INGRESS_TOKEN=secret relay serve --config config/relay.toml
      relay check-config --config config/relay.toml
      relay status                      # queues, oldest age, dead letters, link
      relay peek locations --count 5
      relay dlq list --since 2h
      relay link resume                 # after fixing a token the IOP refused

    \b
    Exit codes:
      0  success
      1  runtime failure (Redis unreachable, unknown id, declined prompt, handshake refused)
      2  usage or configuration error (the message names the option or the key)
    """


@main.command()
@config_option
def serve(config_path: Path | None) -> None:
    """Run the relay until SIGTERM/SIGINT.

    With no [redis] url (RELAY_REDIS_URL empty) an embedded Redis-compatible server is started
    with its append-only file in [storage] dir. Logs go to stderr ([log] format json or console).
    SIGTERM is graceful: stop accepting, finish in-flight work within the shutdown timeouts, exit 0.

    \b
    Examples:
      RELAY_INGRESS_TOKEN=secret relay serve --config config/relay.toml
      RELAY_REDIS_URL=redis://redis:6379/0 RELAY_INGRESS_TOKEN_FILE=/run/secrets/token relay serve
    \b
    Endpoints on the ingress port: /healthz (alive), /readyz (Redis reachable), /metrics (Prometheus).
    Exit codes: 0 after a graceful stop, 1 cannot start (port in use…), 2 configuration error.
    """
    from relay.logs import configure_logging
    from relay.service import Relay, tune_gc

    settings = _settings(config_path, serving=True)
    configure_logging(settings.log.level, settings.log.format, settings.log.redact_fields)
    tune_gc()
    try:
        asyncio.run(Relay(settings).run())
    except ConfigError as exc:
        for p in exc.problems:
            click.echo(f"  - {p}", err=True)
        sys.exit(2)
    except OSError as exc:
        # e.g. a listen address already in use: say which, without a traceback.
        click.echo(f"cannot start: {exc.strerror or exc} (ingress.listen={settings.ingress.listen}, "
                   f"ocpi.listen={settings.ocpi.listen})", err=True)  # fmt: skip
        sys.exit(1)


@main.command("check-config")
@config_option
def check_config(config_path: Path | None) -> None:
    """Validate the configuration (file + env) and print the effective values, secrets hidden.

    \b
    Examples:
      relay check-config --config config/relay.toml
      RELAY_IOP_PARTY_ID=007 relay check-config | jq .iop
    \b
    Exit codes: 0 valid (JSON on stdout), 2 invalid (each problem on stderr, naming the key).
    """
    settings = _settings(config_path, serving=True)
    from relay.logs import Redactor, add_secrets, settings_secrets

    add_secrets(settings_secrets(settings))
    # The same redaction as the logs: secret-named keys, tokens and URL passwords are hidden.
    data = Redactor()(None, "", msgspec.to_builtins(settings))
    click.echo(msgspec.json.format(msgspec.json.encode(data)).decode())
    click.echo("configuration is valid", err=True)


def _with_store(settings: Settings, fn: Callable[[Any], Awaitable[T]]) -> T:
    """Run fn(store) against the configured Redis, starting the embedded server if needed."""
    import structlog
    from redis.exceptions import RedisError

    from relay.embedded_redis import EmbeddedRedis
    from relay.logs import configure_logging
    from relay.store import Store, connect

    if not structlog.is_configured():
        # Operator tools log to stderr, so stdout holds only their output.
        configure_logging("warning", "console", settings.log.redact_fields)

    async def go() -> T:
        embedded = None
        url = settings.redis.url
        if not url:
            embedded = EmbeddedRedis(settings.storage.dir, settings.storage.durability)
            if await embedded.answers():
                url = embedded.url  # a running relay's server: use it, don't start a second one
                embedded = None
            else:
                await embedded.start()
                url = embedded.url
        store = Store(connect(url, settings.redis), settings.redis)
        try:
            await store.load_scripts()
            return await fn(store)
        except (RedisError, OSError) as exc:
            click.echo(f"Redis unreachable: {exc}", err=True)
            sys.exit(1)
        finally:
            await store.close()
            if embedded is not None:
                await embedded.stop()

    return asyncio.run(go())


@main.command()
@click.argument("module", type=click.Choice(MODULES))
@click.option("--count", default=10, show_default=True, help="How many entries to show.")
@config_option
def peek(module: str, count: int, config_path: Path | None) -> None:
    """Print the first queued entries of MODULE's streams (delivered ones are trimmed away).

    One line per entry: stream id, method, object, ordering key and event id, oldest first per shard.

    \b
    Examples:
      relay peek locations
      relay peek cdrs --count 50
    """
    from relay.events import decode

    settings = _settings(config_path)

    async def show(store: Any) -> None:
        for stream_id, raw in await store.peek(module, count):
            ev = decode(raw)
            click.echo(f"{stream_id} {ev.method} {ev.object_ref()} key={ev.key} event_id={ev.id}")

    _with_store(settings, show)


def _since(value: str | None) -> float | None:
    """``90s``, ``15m``, ``2h``, ``7d`` ago, or an ISO date/time (UTC)."""
    if not value:
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if value[-1] in units and value[:-1].replace(".", "", 1).isdigit():
        return time.time() - float(value[:-1]) * units[value[-1]]
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(f"{value!r}: use e.g. 30m, 2h, 7d or 2026-11-26T10:00:00Z") from None
    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()


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


@main.group()
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
    settings = _settings(config_path)
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

    _with_store(settings, go)


@dlq.command("show")
@click.argument("ident")
@config_option
def dlq_show(ident: str, config_path: Path | None) -> None:
    """Show one dead letter (by dead-letter id or event id) with its body and reason, as JSON."""
    settings = _settings(config_path)

    async def go(store: Any) -> None:
        dead = await find(DeliveryStore(store), ident)
        if dead is None:
            click.echo(f"no dead letter {ident}", err=True)
            sys.exit(1)
        click.echo(msgspec.json.format(msgspec.json.encode(describe(dead))).decode())

    _with_store(settings, go)


def _confirm_bulk(ids: tuple[str, ...], all_: bool, flt: Filter, yes: bool, verb: str) -> None:
    has_filter = any((flt.module, flt.kind, flt.reason, flt.key, flt.since))
    if not ids and not all_ and not has_filter:
        raise click.UsageError(f"say what to {verb}: IDs, a filter (--module, --reason, …) or --all")
    if all_ and (ids or has_filter):
        raise click.UsageError("--all excludes IDs and filters")
    if not ids and not yes:
        click.confirm(f"{verb} every matching dead letter?", abort=True)


@dlq.command("replay")
@click.argument("ids", nargs=-1)
@_selection_options
@click.option("--all", "all_", is_flag=True, help="Every dead letter (excludes IDs and filters).")
@click.option("--dry-run", is_flag=True, help="Say what would happen; change nothing.")
@click.option("--force", is_flag=True, help="Replay even if a newer update of the object was delivered since.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@config_option
def dlq_replay(ids: tuple[str, ...], module: str | None, kind: str | None, reason: str | None, key: str | None,
               since: str | None, all_: bool, dry_run: bool, force: bool, yes: bool,
               config_path: Path | None) -> None:  # fmt: skip
    """Put dead letters back on the ordered delivery path.

    An event whose object received a newer delivered update since it died is skipped (it would
    overwrite newer state at the IOP) unless --force. Exit code 0 even when some are skipped.
    """
    settings = _settings(config_path)
    flt = _filter(ids, module, kind, reason, key, since)
    _confirm_bulk(ids, all_, flt, yes or dry_run, "replay")

    async def go(store: Any) -> None:
        ds = DeliveryStore(store)
        await ds.load_scripts()
        # Select first: replaying deletes from the streams being paged through.
        chosen = [d async for d in select(ds, flt)]
        with click.progressbar(length=len(chosen), label="replaying", file=sys.stderr) as bar:

            def step(dead: DeadLetter, result: ReplayResult) -> None:
                bar.update(1)
                if result in ("skipped_newer", "would_skip"):
                    click.echo(f"\n{dead.id} {dead.event.object_ref()}: skipped, a newer update was delivered "
                               "since (use --force to replay anyway)", err=True)  # fmt: skip

            counts = await replay_many(ds, chosen, force=force, dry_run=dry_run, progress=step)
        click.echo(msgspec.json.encode({"selected": len(chosen), **counts}).decode())

    _with_store(settings, go)


@dlq.command("purge")
@click.argument("ids", nargs=-1)
@_selection_options
@click.option("--all", "all_", is_flag=True, help="Every dead letter (excludes IDs and filters).")
@click.option("--dry-run", is_flag=True, help="Say how many would go; delete nothing.")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@config_option
def dlq_purge(ids: tuple[str, ...], module: str | None, kind: str | None, reason: str | None, key: str | None,
              since: str | None, all_: bool, dry_run: bool, yes: bool, config_path: Path | None) -> None:  # fmt: skip
    """Delete dead letters for good.

    \b
    Examples:
      relay dlq purge 1764151200000-0
      relay dlq purge --module cdrs --kind parked --dry-run
      relay dlq purge --all --yes
    """
    settings = _settings(config_path)
    flt = _filter(ids, module, kind, reason, key, since)
    _confirm_bulk(ids, all_, flt, yes or dry_run, "purge")

    async def go(store: Any) -> None:
        ds = DeliveryStore(store)
        chosen = [d async for d in select(ds, flt)]
        with click.progressbar(length=len(chosen), label="purging", file=sys.stderr) as bar:
            n = await purge_many(ds, chosen, dry_run=dry_run, progress=lambda: bar.update(1))
        click.echo(msgspec.json.encode({"selected": len(chosen), "would_purge" if dry_run else "purged": n}).decode())

    _with_store(settings, go)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@config_option
def status(as_json: bool, config_path: Path | None) -> None:
    """Queue depth and oldest age per module, dead letters, IOP link state per replica.

    Also the OCPI connection (registered, since when, the IOP's endpoints). Works while the relay runs;
    the same numbers as the relay_queue_depth, relay_oldest_event_age_seconds and relay_dead_letters metrics.

    \b
    Examples:
      relay status
      relay status --json | jq '.modules.locations.oldest_age_s'
    """
    settings = _settings(config_path)

    async def go(store: Any) -> None:
        from relay.credentials import Registry
        from relay.store import RegistrationStore

        ds = DeliveryStore(store)
        depth = await store.stream_lengths()
        oldest = await ds.oldest()
        dead = await ds.dlq_lengths()
        links = await ds.link_states()
        registry = Registry(settings, RegistrationStore(store))
        await registry.refresh()
        now = time.time()
        modules = {
            m: {"queued": depth[m], "oldest_age_s": round(now - o, 1) if (o := oldest[m]) else 0, "dead": dead[m]}
            for m in MODULES
        }
        conn = _connection(registry, settings)
        if as_json:
            data = {"redis": "ok", "connection": conn, "modules": modules, "replicas": links}
            click.echo(msgspec.json.encode(data).decode())
            return
        click.echo(f"connection: {conn['state']}" + (f" since {conn['since']}" if conn.get("since") else ""))
        if conn.get("versions_url"):
            click.echo(f"  IOP versions: {conn['versions_url']}")
        for ep in conn.get("endpoints", []):
            click.echo(f"  {ep['identifier']:<12} {ep['role']:<9} {ep['url']}")
        click.echo(f"{'module':<10} {'queued':>8} {'oldest age':>11} {'dead':>6}")
        for m, row in modules.items():
            click.echo(f"{m:<10} {row['queued']:>8} {row['oldest_age_s']:>10}s {row['dead']:>6}")
        for replica, link in links.items() or {"(no forwarder running)": {}}.items():
            click.echo(f"link {replica}: {link.get('state', '-')} {link.get('reason', '')}")

    _with_store(settings, go)


def _connection(registry: Any, settings: Settings) -> dict[str, Any]:
    """How the relay is connected to the IOP, for `relay status`."""
    reg = registry.registration
    if reg is None:
        static = bool(settings.iop.url and settings.iop.token)
        return {"state": "static" if static else "unregistered", "versions_url": settings.iop.url or None}
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(reg.updated_at))
    return {
        "state": reg.state,
        "direction": reg.direction,
        "since": since,
        "versions_url": reg.versions_url,
        "endpoints": [{"identifier": e.identifier, "role": e.role, "url": e.url} for e in reg.endpoints],
    }


@main.group()
def link() -> None:
    """Control the IOP link of every running replica."""


@link.command("resume")
@config_option
def link_resume(config_path: Path | None) -> None:
    """Resume delivery after an auth failure (401/403) or a pause, once the cause is fixed.

    Every running replica picks the request up within [forwarder] lease_ttl_s/3 seconds and starts
    again with one request at a time. If the IOP still refuses the token, the link pauses again.

    \b
    Example:
      relay link resume && sleep 10 && relay status
    """
    settings = _settings(config_path)

    async def go(store: Any) -> None:
        await DeliveryStore(store).request_resume(time.time())
        click.echo("resume requested; replicas pick it up within lease_ttl_s/3 seconds")

    _with_store(settings, go)


@main.command()
@click.option("--from-iop", is_flag=True, help="Create a one-time token A for GIREVE's Register – FromIOP.")
@click.option("--versions-url", help="Register – ToIOP: the IOP's versions URL.")
@click.option("--token-a", envvar="RELAY_REGISTER_TOKEN_A", help="Register – ToIOP: the token A the IOP gave you.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@config_option
def register(from_iop: bool, versions_url: str | None, token_a: str | None, as_json: bool,
             config_path: Path | None) -> None:  # fmt: skip
    """Connect to the IOP with the OCPI credentials handshake.

    \b
    GIREVE (Register – FromIOP, what GIREVE uses):
      relay register --from-iop
      → hand the printed versions URL and token A to GIREVE; GIREVE calls the relay, which then
        uses the token GIREVE gave and hands GIREVE a fresh one. Token A then stops working.
    \b
    Other hubs (Register – ToIOP):
      relay register --versions-url https://hub.example/ocpi/versions --token-a TOKEN
    \b
    Re-registration: GIREVE has no credentials update; run either form again (after `relay
    unregister` or a DELETE from GIREVE): tokens and endpoints are replaced.
    """
    from relay.credentials import HandshakeError, Registry, new_token, register_to_iop
    from relay.credentials import versions_url as ours
    from relay.store import RegistrationStore

    settings = _settings(config_path)
    if from_iop == bool(versions_url):
        raise click.UsageError("use either --from-iop, or --versions-url with --token-a")
    if versions_url and not token_a:
        raise click.UsageError("--versions-url needs --token-a (or RELAY_REGISTER_TOKEN_A)")

    async def go(store: Any) -> None:
        rs = RegistrationStore(store)
        if from_iop:
            token = new_token()
            await rs.set_token_a(token)
            out = {"versions_url": ours(settings), "token_a": token}
            click.echo(msgspec.json.encode(out).decode() if as_json else
                       f"versions URL: {out['versions_url']}\ntoken A:      {token}\n"
                       "Hand both to GIREVE; the relay must be running and reachable at that URL.")  # fmt: skip
            return
        assert versions_url is not None and token_a is not None
        token_b = new_token()
        # The IOP may call us back with B during its handling of our POST: let B open the door
        # the way a token A does, until the registration is stored.
        previous_a = (await rs.load())[1]
        await rs.set_token_a(token_b)
        try:
            reg = await register_to_iop(settings, versions_url, token_a, token_b)
        except BaseException as exc:
            # B went to a peer that did not take it: it must not open a Register – FromIOP later,
            # and a token A made earlier by `register --from-iop` stays valid.
            await rs.withdraw_token_a(token_b, restore=previous_a)
            if isinstance(exc, HandshakeError):
                click.echo(f"registration failed: {exc}", err=True)
                sys.exit(1)
            raise
        registry = Registry(settings, rs)
        await registry.refresh()
        await registry.save(reg, used_token_a=token_b)
        summary = {"registered": True, "versions_url": reg.versions_url, "endpoints": len(reg.endpoints)}
        click.echo(msgspec.json.encode(summary).decode() if as_json else
                   f"registered with {reg.versions_url}: {len(reg.endpoints)} endpoints")  # fmt: skip

    _with_store(settings, go)


@main.command()
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@config_option
def unregister(yes: bool, config_path: Path | None) -> None:
    """Stop delivering to the IOP (events keep queueing); tells the IOP with DELETE credentials.

    Register again (`relay register --from-iop`) to resume; the queued events then go out in order.
    Exit code 1 if the relay is not registered.
    """
    from relay.credentials import Registry, unregister_at_iop
    from relay.store import RegistrationStore

    settings = _settings(config_path)
    if not yes:
        click.confirm("unregister from the IOP? delivery stops until a new registration", abort=True)

    async def go(store: Any) -> None:
        registry = Registry(settings, RegistrationStore(store))
        await registry.refresh()
        reg = registry.registration
        if reg is None or reg.state != "registered":
            click.echo("not registered", err=True)
            sys.exit(1)
        problem = await unregister_at_iop(settings, reg)
        if problem:
            click.echo(f"the IOP did not confirm ({problem}); unregistered locally anyway", err=True)
        await registry.unregister()
        click.echo("unregistered; events keep queueing")

    _with_store(settings, go)
