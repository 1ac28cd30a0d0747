"""The ``relay`` command: serve, check-config, and operator tools.

Exit codes: 0 success, 1 runtime failure, 2 usage or configuration error.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import click
import msgspec

from relay import __version__
from relay.config import MODULES, Settings, load
from relay.errors import ConfigError

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

    \b
    Examples:
      RELAY_INGRESS_TOKEN=secret relay serve --config config/relay.toml
      relay check-config --config config/relay.toml
      relay peek locations --count 5
    """


@main.command()
@config_option
def serve(config_path: Path | None) -> None:
    """Run the relay until SIGTERM/SIGINT.

    With no [redis] url (RELAY_REDIS_URL empty) an embedded Redis-compatible server is started
    with its append-only file in [storage] dir.
    """
    from relay.logs import configure_logging
    from relay.service import Relay

    settings = _settings(config_path, serving=True)
    configure_logging(settings.log.level, settings.log.format, settings.log.redact_fields)
    try:
        asyncio.run(Relay(settings).run())
    except ConfigError as exc:
        for p in exc.problems:
            click.echo(f"  - {p}", err=True)
        sys.exit(2)


@main.command("check-config")
@config_option
def check_config(config_path: Path | None) -> None:
    """Validate the configuration (file + env) and print the effective values, secrets hidden."""
    settings = _settings(config_path, serving=True)
    data = msgspec.to_builtins(settings)
    for section in ("ingress", "iop"):
        for key in ("token",):
            if data[section].get(key):
                data[section][key] = "[set]"
    click.echo(msgspec.json.format(msgspec.json.encode(data)).decode())
    click.echo("configuration is valid", err=True)


def _with_store(settings: Settings, fn: Callable[[Any], Awaitable[T]]) -> T:
    """Run fn(store) against the configured Redis, starting the embedded server if needed."""
    from relay.embedded_redis import EmbeddedRedis
    from relay.store import Store, connect

    async def go() -> T:
        embedded = None
        url = settings.redis.url
        if not url:
            embedded = EmbeddedRedis(settings.storage.dir, settings.storage.durability)
            if embedded.socket.exists():
                url = embedded.url  # a running relay's server: use it, don't start a second one
                embedded = None
            else:
                await embedded.start()
                url = embedded.url
        store = Store(connect(url, settings.redis), settings.redis)
        try:
            await store.load_scripts()
            return await fn(store)
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
    """Print the first queued entries of MODULE's streams (delivered ones are trimmed away)."""
    from relay.events import decode

    settings = _settings(config_path)

    async def show(store: Any) -> None:
        for stream_id, raw in await store.peek(module, count):
            ev = decode(raw)
            click.echo(f"{stream_id} {ev.method} {ev.object_ref()} key={ev.key} event_id={ev.id}")

    _with_store(settings, show)
