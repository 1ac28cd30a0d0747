"""``relay register`` and ``relay unregister``: the OCPI credentials handshake with the IOP."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
import msgspec

from relay.cli_common import config_option, load_settings, warn_weak, with_store


@click.command()
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
        Token A is printed once: the relay stores only its digest and cannot show it again.
    \b
    Other hubs (Register – ToIOP):
      relay register --versions-url https://hub.example/ocpi/versions --token-a TOKEN
    \b
    Re-registration: GIREVE has no credentials update; run either form again (after `relay
    unregister` or a DELETE from GIREVE): tokens and endpoints are replaced.
    \b
    Both forms hand the IOP our versions URL, [ocpi] public_url: it must be https on a public host
    (T4), else nothing is done and the exit code is 2. Test set-ups: [ocpi] allow_insecure_urls = true
    (RELAY_OCPI_ALLOW_INSECURE_URLS=true), the setting that also lets the handshake call http URLs.
    """
    from relay.config_checks import announce_refusal
    from relay.credentials import HandshakeError, Registry, new_token, register_to_iop
    from relay.credentials import versions_url as ours
    from relay.store import RegistrationStore

    settings = load_settings(config_path)
    if from_iop == bool(versions_url):
        raise click.UsageError("use either --from-iop, or --versions-url with --token-a")
    if versions_url and not token_a:
        raise click.UsageError("--versions-url needs --token-a (or RELAY_REGISTER_TOKEN_A)")
    if refused := announce_refusal(settings):
        # Before any token is made: the IOP would send its token to that URL (in clear, or nowhere).
        click.echo(f"not registering: {refused}", err=True)
        sys.exit(2)
    warn_weak(settings, registering=True, iop_versions_url=versions_url or "")  # our public URL goes to the IOP

    async def go(store: Any) -> None:
        rs = RegistrationStore(store)
        if from_iop:
            token = new_token()
            await rs.set_token_a(token)
            out = {"versions_url": ours(settings), "token_a": token}
            click.echo(msgspec.json.encode(out).decode() if as_json else
                       f"versions URL: {out['versions_url']}\ntoken A:      {token}\n"
                       "Hand both to GIREVE; the relay must be running and reachable at that URL.\n"
                       "Token A is shown only now: the relay keeps its digest, it cannot be read back "
                       "(run this again for a new one).")  # fmt: skip
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
                click.echo(f"registration failed ({exc.kind.replace('_', ' ')}, OCPI {exc.ocpi_code}): {exc}", err=True)
                sys.exit(1)
            raise
        registry = Registry(settings, rs)
        await registry.refresh()
        await registry.save(reg, used_token_a=token_b)
        summary = {"registered": True, "versions_url": reg.versions_url, "endpoints": len(reg.endpoints)}
        click.echo(msgspec.json.encode(summary).decode() if as_json else
                   f"registered with {reg.versions_url}: {len(reg.endpoints)} endpoints")  # fmt: skip

    with_store(settings, go)


@click.command()
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@config_option
def unregister(yes: bool, config_path: Path | None) -> None:
    """Stop delivering to the IOP (events keep queueing); tells the IOP with DELETE credentials.

    Register again (`relay register --from-iop`) to resume; the queued events then go out in order.
    Exit code 1 if the relay is not registered.
    """
    from relay.credentials import Registry, unregister_at_iop
    from relay.store import RegistrationStore

    settings = load_settings(config_path)
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

    with_store(settings, go)
