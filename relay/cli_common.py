"""What every command of ``relay`` shares: the --config option, loading the settings, running against the store."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import click

from relay.config import Settings, load
from relay.errors import ConfigError, StoreError

__all__ = ["config_option", "load_settings", "storage_where", "warn_weak", "with_store"]

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


def warn_weak(settings: Settings, *, registering: bool, iop_versions_url: str = "") -> int:
    """Each weak setting (relay.config_checks) on stderr, redacted as the logs are; returns how many."""
    from relay.config_checks import config_warnings
    from relay.logs import Redactor, settings_secrets

    weak = [str(w) for w in config_warnings(settings, registering=registering, iop_versions_url=iop_versions_url)]
    for line in Redactor(secrets=settings_secrets(settings))(None, "", {"weak": weak})["weak"]:
        click.echo(f"warning: {line}", err=True)
    return len(weak)


def storage_where(settings: Settings) -> str:
    """Which Redis, for a message: the data directory's embedded server, or [redis] url without its password."""
    if not settings.redis.url:
        return f"embedded server of data dir {Path(settings.storage.dir).resolve()}"
    parts = urlsplit(settings.redis.url)
    if parts.password:
        parts = parts._replace(netloc=f"{parts.username or ''}:[redacted]@{parts.netloc.rpartition('@')[2]}")
    return f"redis.url {urlunsplit(parts)}"


NOT_RUNNING = 3  # exit code: Redis unreachable (no relay running on the data directory, or [redis] url silent)


def with_store(settings: Settings, fn: Callable[[Any], Awaitable[T]]) -> T:
    """Run fn(store) against the running relay's Redis: the embedded server of [storage] dir, or [redis] url.

    Never starts a server: with none answering, one line on stderr and exit code 3 (an empty server
    started here would report an empty queue while the relay's events wait elsewhere).
    """
    import structlog

    from relay.embedded_redis import EmbeddedRedis
    from relay.logs import configure_logging
    from relay.store import RegistrationStore, Store, connect

    if not structlog.is_configured():
        # Operator tools log to stderr, so stdout holds only their output.
        configure_logging("warning", "console", settings.log.redact_fields)

    async def go() -> T:
        url = settings.redis.url
        if not url:
            embedded = EmbeddedRedis(settings.storage.dir, settings.storage.durability)
            if not await embedded.answers():
                click.echo(f"no relay is running on data dir {embedded.dir} (nothing answers on {embedded.socket}): "
                           "start `relay serve` with this configuration, or set [redis] url", err=True)  # fmt: skip
                sys.exit(NOT_RUNNING)
            url = embedded.url  # the running relay's server
        store = Store(connect(url, settings.redis), settings.redis)
        try:
            await store.load_scripts()
            await RegistrationStore(store).rename_old_keys()  # a CLI of the new version before its relay restarted
            return await fn(store)
        except StoreError as exc:
            click.echo(f"Redis unreachable ({storage_where(settings)}): {exc}", err=True)
            sys.exit(NOT_RUNNING)
        finally:
            await store.close()

    return asyncio.run(go())
