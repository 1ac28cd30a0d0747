"""What every command of ``relay`` shares: the --config option, loading the settings, running against the store."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from relay.config import Settings, load
from relay.errors import ConfigError, StoreError

__all__ = ["config_option", "load_settings", "with_store"]

T = TypeVar("T")

config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="RELAY_CONFIG",
    help="TOML config file (env RELAY_CONFIG). Every key can be overridden by RELAY_<SECTION>_<KEY>.",
)


def load_settings(config_path: Path | None, *, serving: bool = False) -> Settings:
    """The configuration (file + env); on a problem, each one on stderr and exit code 2."""
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


def with_store(settings: Settings, fn: Callable[[Any], Awaitable[T]]) -> T:
    """Run fn(store) against the configured Redis, starting the embedded server if needed."""
    import structlog

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
        except StoreError as exc:
            click.echo(f"Redis unreachable: {exc}", err=True)
            sys.exit(1)
        finally:
            await store.close()
            if embedded is not None:
                await embedded.stop()

    return asyncio.run(go())
