"""The ``relay`` command: serve, check-config, and operator tools.

Exit codes: 0 success, 1 runtime failure, 2 usage or configuration error, 3 Redis unreachable (no relay
running on the data directory, [redis] url not answering, the embedded server failing).
"""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import msgspec

from relay import __version__
from relay.cli_common import (
    config_option,
    load_config,
    load_settings,
    stdout_closed,
    storage_where,
    warn_weak,
    with_store,
)
from relay.cli_dlq import dlq
from relay.cli_doctor import doctor
from relay.cli_registration import register, unregister
from relay.cli_status import link, status
from relay.config import MODULES, Settings
from relay.config_checks import config_warnings
from relay.errors import ConfigError, StoreError

if TYPE_CHECKING:
    from relay.supervisor import Supervisor


class _RelayGroup(click.Group):
    """The ``relay`` group: a closed stdout (``relay dlq list | head -1``) ends any command quietly."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            stdout_closed()


@click.group(cls=_RelayGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="relay")
def main() -> None:
    """Store-and-forward OCPI 2.2.1 relay between a CSMS and GIREVE's IOP.

    Every command reads the same configuration: --config FILE, else env RELAY_CONFIG, else
    ./config/relay.toml, else /etc/relay/relay.toml (the file used is named on stderr; relay serve logs
    it), then RELAY_<SECTION>_<KEY> environment variables. Operator commands talk to the relay's Redis
    (the embedded one of a running relay in [storage] dir, or [redis] url) and work while the relay runs.
    `relay COMMAND --help` for more.

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
      3  Redis unreachable: no relay runs on [storage] dir (its embedded server), or [redis] url does not answer
    """


LOOPS = ("auto", "uvloop", "asyncio")


def choose_loop(choice: str | None = None) -> tuple[str, Callable[[], asyncio.AbstractEventLoop] | None]:
    """The event loop of ``relay serve``: (its name, a loop factory for asyncio.Runner; None = the default loop).

    ``choice`` (default: env ``RELAY_LOOP``, else ``auto``): ``auto`` takes uvloop when it is installed
    (``pip install 'relay[speed]'``), ``uvloop`` requires it, ``asyncio`` forces the standard loop.
    uvloop is optional: imported only here, and only when it may be used.
    """
    choice = (os.environ.get("RELAY_LOOP", "") if choice is None else choice).strip().lower() or "auto"
    if choice not in LOOPS:
        raise ConfigError([f"RELAY_LOOP: {choice!r} is not one of {', '.join(LOOPS)}"])
    if choice == "asyncio":
        return "asyncio", None
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        if choice == "uvloop":
            raise ConfigError(["RELAY_LOOP=uvloop: uvloop is not installed (pip install 'relay[speed]')"]) from None
        return "asyncio", None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return f"uvloop {uvloop.__version__}", factory


@main.command()
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    envvar="RELAY_WORKERS",
    help="Processes sharing both ports (SO_REUSEPORT, Linux), each a replica with its share of the shards, "
    "under a supervising parent (env RELAY_WORKERS). 1: one process, no parent.",
)
@click.option("--worker-index", type=click.IntRange(min=0), hidden=True)  # set by relay.supervisor only
@click.option("--parent-pid", type=int, hidden=True)
@click.option("--ready-fd", type=int, hidden=True)
@click.option("--embedded-url", default="", hidden=True)
@click.option("--metrics-dir", type=click.Path(path_type=Path), hidden=True)  # the workers' metrics sockets
@config_option
def serve(
    workers: int,
    worker_index: int | None,
    parent_pid: int | None,
    ready_fd: int | None,
    embedded_url: str,
    metrics_dir: Path | None,
    config_path: Path | None,
) -> None:
    """Run the relay until SIGTERM/SIGINT.

    With no [redis] url (RELAY_REDIS_URL empty) an embedded Redis-compatible server is started
    with its append-only file in [storage] dir. Logs go to stderr ([log] format json or console).
    SIGTERM is graceful: stop accepting, finish in-flight work within the shutdown timeouts, exit 0.

    With --workers N (N > 1) a parent process runs the embedded server and N worker processes that
    share the ingress and OCPI ports (fixed ports: not 0). It restarts a worker that dies, stops
    everything (exit 1) when they keep dying, and forwards SIGTERM/SIGINT to the workers before it
    stops the embedded server. Each worker is a replica with its share of the shard leases, and its
    log lines carry "worker": its index.

    \b
    Examples:
      RELAY_INGRESS_TOKEN=secret relay serve --config config/relay.toml
      RELAY_INGRESS_TOKEN=secret relay serve --workers 4 --config config/relay.toml
      RELAY_REDIS_URL=redis://redis:6379/0 RELAY_INGRESS_TOKEN_FILE=/run/secrets/token relay serve
    \b
    Endpoints on the ingress port: /healthz (alive), /readyz (Redis reachable), /metrics (Prometheus);
    with several workers, /healthz and /readyz answer for the worker that took the connection, /metrics
    for every worker (each series labelled worker="<index>").
    Exit codes: 0 after a graceful stop, 1 cannot start (port in use, another relay on the data dir) or
    workers that kept dying, 2 configuration error, 3 Redis unreachable at start or the embedded server
    failing (one line on stderr).
    Event loop: uvloop when installed (pip install 'relay[speed]'); env RELAY_LOOP=asyncio forces the standard one.
    """
    import structlog

    from relay import supervisor
    from relay.logs import configure_logging
    from relay.service import Relay, tune_gc

    worker = worker_index is not None
    if worker:
        assert parent_pid is not None and ready_fd is not None, "--worker-index comes with --parent-pid, --ready-fd"
        supervisor.die_with_parent(parent_pid)
        structlog.contextvars.bind_contextvars(worker=worker_index)  # on every line this process logs
    settings, found = load_config(config_path, serving=True, announce=False)  # logged below, stderr is JSON
    supervising = not worker and workers > 1
    if supervising and (problems := supervisor.workers_problems(settings, workers)):
        click.echo("configuration is invalid:", err=True)
        for p in problems:
            click.echo(f"  - {p}", err=True)
        sys.exit(2)
    configure_logging(settings.log.level, settings.log.format, settings.log.redact_fields)
    if not supervising:
        tune_gc()
    if not worker:  # the parent says it once, not every worker
        cfg_log = structlog.get_logger("relay.cli")
        if found.path is None:
            cfg_log.warning("config_file", path=None, source=found.source, problem=found.describe())
        else:
            cfg_log.info("config_file", path=str(found.path), source=found.source)
        for w in config_warnings(settings, registering=bool(settings.ocpi.token_a)):  # weak, not invalid: start anyway
            structlog.get_logger("relay.cli").warning("weak_setting", key=w.key, problem=w.message, hint=w.hint)
    if supervising:
        _serving(settings, lambda: _supervise(supervisor.Supervisor(settings, workers, found.path)))
    elif worker_index is None:
        _serving(settings, lambda: _run_relay(lambda: Relay(settings).run()))
    else:
        assert parent_pid is not None and ready_fd is not None
        from relay.worker_metrics import WorkerMetrics

        peers = WorkerMetrics(metrics_dir, worker_index, workers) if metrics_dir is not None else None
        relay = Relay(settings, worker=worker_index, parent_embedded_url=embedded_url, worker_metrics=peers)
        deadline_s = supervisor.stop_timeout_s(settings)
        _serving(settings, lambda: _run_relay(lambda: supervisor.run_worker(relay, parent_pid, ready_fd, deadline_s)))


def _supervise(parent: Supervisor) -> None:
    """Run the parent of ``relay serve --workers N``; when its workers failed, say why and exit with their code."""
    failed = asyncio.run(parent.run())
    if failed is not None:
        click.echo(failed.message, err=True)
        sys.exit(failed.code)


def _run_relay(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run one relay process's coroutine on the chosen event loop."""
    import structlog

    loop_name, loop_factory = choose_loop()
    structlog.get_logger("relay.cli").info("event_loop", loop=loop_name)
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main())


def _serving(settings: Settings, go: Callable[[], None]) -> None:
    """Run ``relay serve`` (one relay, a worker or the supervisor); each failure as one line and its exit code."""
    from relay.embedded_redis import DataDirBusy, EmbeddedRedisLost

    try:
        go()
    except ConfigError as exc:
        for p in exc.problems:
            click.echo(f"  - {p}", err=True)
        sys.exit(2)
    except EmbeddedRedisLost as exc:
        click.echo(f"stopped: {exc}", err=True)
        sys.exit(3)
    except StoreError as exc:  # before OSError: StoreUnavailable is a ConnectionError
        click.echo(f"cannot start: Redis unreachable ({storage_where(settings)}): {exc}", err=True)
        sys.exit(3)
    except DataDirBusy as exc:
        click.echo(f"cannot start: {exc}", err=True)  # nothing was started, stopped or signalled
        sys.exit(1)
    except OSError as exc:
        # e.g. a listen address already in use: say which, without a traceback.
        click.echo(f"cannot start: {exc.strerror or exc} (ingress.listen={settings.ingress.listen}, "
                   f"ocpi.listen={settings.ocpi.listen})", err=True)  # fmt: skip
        sys.exit(1)


@main.command("check-config")
@click.option("--strict", is_flag=True, help="Exit 2 when a weak setting is warned about, as for an invalid one.")
@config_option
def check_config(strict: bool, config_path: Path | None) -> None:
    """Validate the configuration (file + env) and print the effective values, secrets hidden.

    Valid but weak settings (a short ingress token, an ingress off loopback, plain-http IOP or public
    URLs) are warned about on stderr, one line each naming the key, with what to do instead.

    \b
    Examples:
      relay check-config --config config/relay.toml
      RELAY_IOP_PARTY_ID=007 relay check-config | jq .iop
      relay check-config --strict       # in a deployment pipeline: warnings fail it
    \b
    Exit codes: 0 valid (JSON on stdout; warnings, if any, on stderr), 2 invalid (each problem on
    stderr, naming the key), or valid with warnings under --strict.
    """
    settings = load_settings(config_path, serving=True)
    from relay.logs import Redactor, add_secrets, settings_secrets

    add_secrets(settings_secrets(settings))
    # The same redaction as the logs: secret-named keys, tokens and URL passwords are hidden.
    data = Redactor()(None, "", msgspec.to_builtins(settings))
    weak = warn_weak(settings, registering=bool(settings.ocpi.token_a))
    click.echo(msgspec.json.format(msgspec.json.encode(data)).decode())
    if weak and strict:
        click.echo(f"configuration is valid but has {weak} warning(s), refused by --strict", err=True)
        sys.exit(2)
    click.echo("configuration is valid" + (f", with {weak} warning(s)" if weak else ""), err=True)


def _body(raw: bytes) -> Any:
    """An event's body as JSON (the CSMS's exact bytes, decoded), None when it has none (a DELETE)."""
    if not raw:
        return None
    try:
        return msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return raw.decode(errors="replace")  # stored after validation: not expected


@main.command()
@click.argument("module", type=click.Choice(MODULES))
@click.option("--count", default=10, show_default=True, help="How many entries to show.")
@click.option("--raw", is_flag=True, help="Each entry as stored, one JSON object per line: stream key, stream id, "
              "every field, the envelope whole (its body decoded).")  # fmt: skip
@config_option
def peek(module: str, count: int, raw: bool, config_path: Path | None) -> None:
    """Print the first queued entries of MODULE's streams (delivered ones are trimmed away), decoded.

    Per entry, a line with the stream id, method, object, ordering key and event id, then the event's
    body (the JSON the CSMS sent, on one line, indented). ``compact=dynamic|state|last`` when its module's
    backlogs are compacted ([forwarder] compact): with its key's neighbours it may go as one request
    (docs/delivery.md, "Compaction"). A last line counts them; relay_compacted_total counts the entries
    compacted so far. --raw prints each stream entry as Redis holds it (no redis-cli needed), as JSON.

    \b
    Examples:
      relay peek locations
      relay peek cdrs --count 50
      relay peek locations --raw | jq .event.body
    """
    from relay.events import decode
    from relay.store.keys import ENTRY_FIELD

    settings = load_settings(config_path)

    from relay.compaction import describe, modules

    compacted = modules(settings.forwarder.compact)

    async def show_raw(store: Any) -> None:
        for stream, stream_id, fields in await store.peek_entries(module, count):
            row: dict[str, Any] = {"stream": stream, "id": stream_id, "fields": {}}
            for name, value in fields.items():
                if name == ENTRY_FIELD:  # the envelope, msgpack (relay.events): decoded into "event"
                    ev = decode(value)
                    row["fields"][name] = f"<envelope, {len(value)} bytes of msgpack: see event>"
                    row["event"] = {**msgspec.structs.asdict(ev), "body": _body(ev.body)}
                else:
                    row["fields"][name] = value.decode(errors="replace")
            click.echo(msgspec.json.encode(row).decode())

    async def show(store: Any) -> None:
        shown = compactable = 0
        for stream_id, entry in await store.peek(module, count):
            ev = decode(entry)
            word = describe(ev, compacted, settings.state.enabled)
            shown, compactable = shown + 1, compactable + bool(word)
            tag = f" compact={word}" if word else ""
            tag += " from_state" if ev.from_state else ""
            click.echo(f"{stream_id} {ev.method} {ev.object_ref()} key={ev.key}{tag} event_id={ev.id}")
            body = _body(ev.body)
            click.echo("  " + ("(no body)" if body is None else msgspec.json.encode(body).decode()))
        if shown:
            state = "compaction on" if module in compacted else "compaction off"
            click.echo(f"# {compactable} of {shown} shown may be compacted with their key's others ({state})")
        else:
            click.echo(f"# no {module} event queued (delivered ones are trimmed away)")

    with_store(settings, show_raw if raw else show)


@main.command("openapi")
def openapi_document() -> None:
    """Print the ingress's OpenAPI 3.1 document (served at GET /ingress/openapi.json; kept in docs/openapi.json).

    \b
    Example:
      relay openapi > docs/openapi.json
    """
    from relay.ingress.app import openapi_document

    sys.stdout.buffer.write(openapi_document())


# The operator tools, each group in its own module (relay.cli_dlq, relay.cli_status, relay.cli_registration).
main.add_command(dlq)
main.add_command(status)
main.add_command(link)
main.add_command(register)
main.add_command(unregister)
main.add_command(doctor)
