"""``relay doctor``: the checks of relay.doctor as a checklist, or as JSON."""

from __future__ import annotations

import sys
from pathlib import Path

import click
import msgspec

from relay.cli_common import config_option, find_config
from relay.doctor import DEFAULT_TIMEOUT_S, run


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output: one JSON object.")
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=0.1, max=60),
    default=DEFAULT_TIMEOUT_S,
    show_default=True,
    help="Seconds each network call may take (Redis, the public URL, the IOP).",
)
@config_option
def doctor(as_json: bool, timeout_s: float, config_path: Path | None) -> None:
    """Check a set-up before go-live: one line per check (ok, warn, FAIL, skip) and a hint for each problem.

    \b
    Checks, in order:
      config              loads as `relay serve` loads it; weak settings warn
      redis               the running relay's Redis answers (embedded on [storage] dir, or [redis] url)
      persistence         appendonly yes and appendfsync always (everysec warns unless 202s wait for more)
      eviction            maxmemory-policy noeviction (CONFIG refused on a managed Redis: warn)
      durability          what a 202 waits for
      registration        registered / pending (token A given out) / static ([iop] url + token) / none
      public_url          [ocpi] public_url set and https (http only with allow_insecure_urls: warn)
      public_versions     GET {public_url}/versions reaches the relay's OCPI listener
      public_certificate  the certificate the TLS front presents, its expiry
      iop_versions        the IOP's versions URL answers the relay's token (401/403 names it as …last4)
      clock               skew against the IOP's Date header: warn above 5 s, FAIL above 60 s
      certificate         [ocpi] tls_cert_file: readable, matches its key, not expired (warn within 30 days)
      iop_certificate     [iop] tls_cert_file (mTLS towards the IOP), the same
      operators           each hosted operator with its eMI3 id
    \b
    Read-only: it starts no server and writes nothing. Every network call gives up after --timeout
    seconds. No secret is printed: tokens appear as …last4 at most. Run it where the relay runs (the
    public URL as the IOP resolves it); a private CA for the public URL: SSL_CERT_FILE.
    \b
    Examples:
      relay doctor --config config/relay.toml
      relay doctor --json | jq '.checks[] | select(.status == "fail")'
    \b
    Exit codes: 0 nothing failed (warnings allowed), 1 a check failed, 2 the configuration is invalid.
    """
    import structlog

    from relay.logs import configure_logging

    if not structlog.is_configured():  # stdout holds the checklist; what goes wrong is in it, not in log lines
        configure_logging("error", "console")
    found = find_config(config_path)
    if found.source != "--config":  # as the other verbs: the file used, on stderr (stdout holds the checklist)
        click.echo(found.describe(), err=True)
    report = run(found.path, found.describe().removeprefix("config: "), timeout_s=timeout_s)
    if as_json:
        click.echo(msgspec.json.encode(report.as_dict()).decode())
    else:
        for line in report.lines():
            click.echo(line)
    sys.exit(report.exit_code)
