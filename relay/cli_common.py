"""What every command of ``relay`` shares: the --config option, loading the settings, running against the store."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar
from urllib.parse import urlsplit, urlunsplit

import click

from relay.config import Settings, load
from relay.errors import ConfigError, StoreError

__all__ = [
    "ConfigFile", "SIGPIPE_EXIT", "config_option", "find_config", "load_config", "load_settings", "stdout_closed",
    "storage_where", "warn_weak", "with_store",
]  # fmt: skip

T = TypeVar("T")

config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="TOML config file. Without it: env RELAY_CONFIG, then ./config/relay.toml, then /etc/relay/relay.toml "
    "(the one used is named on stderr). Every key can be overridden by RELAY_<SECTION>_<KEY>.",
)

# Where a configuration file is looked for when neither --config nor RELAY_CONFIG names one, in this order
# (relative: to the working directory). The first that exists is used.
DEFAULT_CONFIGS: tuple[Path, ...] = (Path("config/relay.toml"), Path("/etc/relay/relay.toml"))


@dataclass(frozen=True, slots=True)
class ConfigFile:
    """Which configuration file a command uses, and how it was found."""

    path: Path | None  # None: no file, defaults and RELAY_* variables only
    source: str  # "--config", "RELAY_CONFIG", "./config/relay.toml", "/etc/relay/relay.toml" or "none"
    looked_at: tuple[str, ...] = ()

    def describe(self) -> str:
        """One line for stderr: the file and how it was found, or that there is none and where it was looked for."""
        if self.path is not None:
            how = self.source if self.source in ("--config", "RELAY_CONFIG") else f"found as {self.source}"
            return f"config: {self.path} ({how})"
        return (f"config: no file (no --config, RELAY_CONFIG unset, none of {', '.join(self.looked_at)} exists): "
                "defaults and RELAY_* variables only; give one with --config FILE")  # fmt: skip

    def to_json(self) -> dict[str, str | None]:
        return {"path": None if self.path is None else str(self.path), "source": self.source}


def find_config(explicit: Path | None, env: Mapping[str, str] | None = None, cwd: Path | None = None) -> ConfigFile:
    """The configuration file: ``--config``, then env ``RELAY_CONFIG``, then the first of DEFAULT_CONFIGS that exists.

    A file named by --config or RELAY_CONFIG is used even if it does not exist (loading it then says so);
    the default places are only looked at.
    """
    env = os.environ if env is None else env
    cwd = Path.cwd() if cwd is None else cwd
    if explicit is not None:
        return ConfigFile(Path(os.path.abspath(cwd / explicit)), "--config")
    if named := env.get("RELAY_CONFIG", "").strip():
        return ConfigFile(Path(os.path.abspath(cwd / named)), "RELAY_CONFIG")
    looked: list[str] = []
    for candidate in DEFAULT_CONFIGS:
        shown = str(candidate) if candidate.is_absolute() else f"./{candidate}"
        looked.append(shown)
        if (cwd / candidate).is_file():
            return ConfigFile(Path(os.path.abspath(cwd / candidate)), shown)
    return ConfigFile(None, "none", tuple(looked))


def load_config(
    config_path: Path | None, *, serving: bool = False, announce: bool = True
) -> tuple[Settings, ConfigFile]:
    """The configuration (file + env) and which file it came from; on a problem, each one on stderr and exit code 2.

    ``announce``: say on stderr which file is used unless --config named it (``relay serve`` logs it instead,
    its stderr being JSON lines); a configuration that fails to load always says which file it came from.
    """
    found = find_config(config_path)
    announced = announce and found.source != "--config"
    if announced:
        click.echo(found.describe(), err=True)
    try:
        settings = load(found.path, env={k: v for k, v in os.environ.items() if k != "RELAY_CONFIG"})
        if serving and (problems := settings.serve_problems()):
            raise ConfigError(problems)
        return settings, found
    except ConfigError as exc:
        if not announced and found.source != "--config":
            click.echo(found.describe(), err=True)
        click.echo("configuration is invalid:", err=True)
        for p in exc.problems:
            click.echo(f"  - {p}", err=True)
        sys.exit(2)


def load_settings(config_path: Path | None, *, serving: bool = False) -> Settings:
    """The configuration (file + env), its file named on stderr when found without --config (``load_config``)."""
    return load_config(config_path, serving=serving)[0]


SIGPIPE_EXIT = 141  # 128 + SIGPIPE: what a shell reports for a command whose reader went away (`| head -1`)


def stdout_closed() -> NoReturn:
    """stdout's reader went away (``relay dlq list | head -1``): stop quietly, as command-line tools do.

    Later writes (and the interpreter's flush at exit) go to /dev/null instead of raising again.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no file descriptor behind sys.stdout (a test's capture)
        pass
    sys.exit(SIGPIPE_EXIT)


def _broken_pipe(exc: BaseException) -> bool:
    """Whether an error is, or was caused by, a write to a closed pipe (a store method wraps an OSError
    raised inside it, a callback's included, into StoreUnavailable)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, BrokenPipeError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


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
            if _broken_pipe(exc):
                stdout_closed()
            click.echo(f"Redis unreachable ({storage_where(settings)}): {exc}", err=True)
            sys.exit(NOT_RUNNING)
        finally:
            await store.close()

    try:
        return asyncio.run(go())
    except BrokenPipeError:
        stdout_closed()
