"""Weak defaults warn (issue 14, finding 10): a short ingress token, an ingress off loopback, plain-http IOP
and public URLs. ``relay check-config`` prints them (``--strict`` fails on them), ``relay serve`` logs them
at start, ``relay register`` prints them before handing our public URL to the IOP."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from click.testing import CliRunner

import relay.logs
import relay.service
from relay.cli import main
from relay.config import Settings, load
from relay.config_checks import MIN_INGRESS_TOKEN_CHARS, announce_refusal, config_warnings, is_loopback
from relay.store import RegistrationStore, Store, connect
from tests.conftest import REPO
from tests.ocpi_peer import OcpiPeer, captured_logs, cli

SHIPPED = REPO / "config" / "relay.toml"
GOOD = "k" * 32  # a token long enough


def settings_with(**env: str) -> Settings:
    return load(SHIPPED, env={"RELAY_INGRESS_TOKEN": GOOD, **env})


def keys(settings: Settings, **kw: Any) -> list[str]:
    return [w.key for w in config_warnings(settings, **kw)]


# -- the pure checks, one row per case -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "registering", "expected"),
    [
        ({}, False, []),  # the shipped config with a long token: nothing to say
        ({"RELAY_INGRESS_TOKEN": "x"}, False, ["ingress.token"]),
        ({"RELAY_INGRESS_TOKEN": "k" * (MIN_INGRESS_TOKEN_CHARS - 1)}, False, ["ingress.token"]),
        ({"RELAY_INGRESS_TOKEN": "k" * MIN_INGRESS_TOKEN_CHARS}, False, []),
        ({"RELAY_INGRESS_TOKEN": f"{GOOD},short"}, False, ["ingress.token"]),  # every rotated token counts
        ({"RELAY_INGRESS_LISTEN": "0.0.0.0:8780"}, False, ["ingress.listen"]),
        ({"RELAY_INGRESS_LISTEN": "[::]:8780"}, False, ["ingress.listen"]),
        ({"RELAY_INGRESS_LISTEN": "10.1.2.3:8780"}, False, ["ingress.listen"]),
        ({"RELAY_INGRESS_LISTEN": "relay.internal:8780"}, False, ["ingress.listen"]),  # a name may resolve anywhere
        ({"RELAY_INGRESS_LISTEN": "127.0.0.2:8780"}, False, []),
        ({"RELAY_INGRESS_LISTEN": "[::1]:8780"}, False, []),
        ({"RELAY_INGRESS_LISTEN": "localhost:8780"}, False, []),
        ({"RELAY_IOP_URL": "http://iop.example/ocpi/2.2.1"}, False, ["iop.url"]),
        ({"RELAY_IOP_URL": "https://iop.example/ocpi/2.2.1"}, False, []),
        # The public URL matters when it is about to be handed to the IOP.
        ({}, True, ["ocpi.public_url"]),
        ({"RELAY_OCPI_PUBLIC_URL": "http://ocpi.cpo.example/ocpi"}, True, ["ocpi.public_url"]),
        ({"RELAY_OCPI_PUBLIC_URL": "http://ocpi.cpo.example/ocpi"}, False, []),
        ({"RELAY_OCPI_PUBLIC_URL": "https://ocpi.cpo.example/ocpi"}, True, []),
        (
            {"RELAY_INGRESS_TOKEN": "x", "RELAY_INGRESS_LISTEN": "0.0.0.0:8780", "RELAY_IOP_URL": "http://i.example"},
            True,
            ["ingress.token", "ingress.listen", "iop.url", "ocpi.public_url"],
        ),
    ],
)
def test_config_warnings(env: dict[str, str], registering: bool, expected: list[str]) -> None:
    assert keys(settings_with(**env), registering=registering) == expected


def test_register_to_a_plain_http_hub_warns() -> None:
    s = settings_with(RELAY_OCPI_PUBLIC_URL="https://ocpi.cpo.example/ocpi")
    assert keys(s, registering=True, iop_versions_url="http://hub.example/ocpi/versions") == ["register --versions-url"]
    assert keys(s, registering=True, iop_versions_url="https://hub.example/ocpi/versions") == []


def test_each_warning_names_its_key_says_what_to_do_and_never_shows_the_token() -> None:
    secret = "tiny-secret"
    s = settings_with(RELAY_INGRESS_TOKEN=secret, RELAY_INGRESS_LISTEN="0.0.0.0:8780", RELAY_IOP_URL="http://i.example")
    found = config_warnings(s, registering=True)
    assert len(found) == 4
    for w in found:
        assert str(w).startswith(w.key + " — ") and w.message and w.hint
        assert secret not in str(w)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.9.9.9", True), ("::1", True), ("[::1]", True), ("localhost", True),
     ("LOCALHOST", True), ("0.0.0.0", False), ("::", False), ("", False), ("192.168.1.5", False),
     ("relay", False)],
)  # fmt: skip
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


# -- relay check-config -------------------------------------------------------------------------------------


def run_check(*args: str, **env: str) -> tuple[int, str, str]:
    clean: dict[str, str | None] = {k: None for k in os.environ if k.startswith("RELAY_")}
    clean.update(env)
    result = CliRunner().invoke(main, ["check-config", "--config", str(SHIPPED), *args], env=clean)
    return result.exit_code, result.stdout, result.stderr


WEAK = {"RELAY_INGRESS_TOKEN": "x", "RELAY_INGRESS_LISTEN": "0.0.0.0:8780", "RELAY_IOP_URL": "http://iop.example/ocpi"}


def test_check_config_warns_on_weak_defaults_and_still_exits_0() -> None:
    code, out, err = run_check(**WEAK)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert [w.split()[1] for w in warnings] == ["ingress.token", "ingress.listen", "iop.url"], err
    assert "configuration is valid, with 3 warning(s)" in err
    assert out.startswith("{")  # the effective settings, as before


def test_check_config_strict_fails_on_warnings_only() -> None:
    code, out, err = run_check("--strict", **WEAK)
    assert code == 2
    assert "refused by --strict" in err and "warning: ingress.token" in err
    code, _, err = run_check("--strict", RELAY_INGRESS_TOKEN=GOOD)
    assert code == 0, err
    assert "warning" not in err


def test_check_config_warns_about_the_public_url_when_a_token_a_is_set() -> None:
    _, _, err = run_check(RELAY_INGRESS_TOKEN=GOOD, RELAY_OCPI_TOKEN_A="a" * 32)
    assert "warning: ocpi.public_url — unset while registering" in err
    _, _, err = run_check(RELAY_INGRESS_TOKEN=GOOD, RELAY_OCPI_TOKEN_A="a" * 32,
                          RELAY_OCPI_PUBLIC_URL="https://ocpi.cpo.example/ocpi")  # fmt: skip
    assert "warning" not in err


def test_check_config_warnings_hide_secrets() -> None:
    _, out, err = run_check(RELAY_INGRESS_TOKEN="tiny-secret", RELAY_IOP_URL="http://user:hunter22@iop.example/ocpi")
    assert "warning: iop.url — http://user:[redacted]@iop.example/ocpi" in err
    assert "hunter22" not in out + err and "tiny-secret" not in out + err


# -- relay serve logs them at start --------------------------------------------------------------------------


class _NoRelay:
    """Stands in for Relay: serve's start-up runs up to it, then returns at once."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def run(self) -> None:
        return None


@pytest.fixture
def serve_stubbed(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(relay.service, "Relay", _NoRelay)
    monkeypatch.setattr(relay.service, "tune_gc", lambda: None)  # no gc.freeze() in the test process
    # Keep the suite's logging: configuring it again would leave the loggers already cached on the old
    # processor list, out of tests.ocpi_peer.captured_logs' reach.
    monkeypatch.setattr(relay.logs, "configure_logging", lambda *a, **kw: None)
    yield


def test_serve_logs_each_weak_setting_as_a_warning(serve_stubbed: None) -> None:
    clean: dict[str, str | None] = {k: None for k in os.environ if k.startswith("RELAY_")}
    clean.update(WEAK, RELAY_LOOP="asyncio", RELAY_OCPI_TOKEN_A="a" * 32)
    with captured_logs() as out:
        result = CliRunner().invoke(main, ["serve", "--config", str(SHIPPED)], env=clean)
    assert result.exit_code == 0, result.output
    lines = [line for line in out.getvalue().splitlines() if "weak_setting" in line]
    assert len(lines) == 4, out.getvalue()
    for key in ("ingress.token", "ingress.listen", "iop.url", "ocpi.public_url"):
        assert any(key in line and "warn" in line for line in lines), (key, lines)


def test_serve_with_strong_settings_logs_no_warning(serve_stubbed: None) -> None:
    clean: dict[str, str | None] = {k: None for k in os.environ if k.startswith("RELAY_")}
    clean.update(RELAY_INGRESS_TOKEN=GOOD, RELAY_LOOP="asyncio")
    with captured_logs() as out:
        result = CliRunner().invoke(main, ["serve", "--config", str(SHIPPED)], env=clean)
    assert result.exit_code == 0, result.output
    assert "weak_setting" not in out.getvalue()


# -- relay register prints them before the handshake ---------------------------------------------------------


async def test_register_warns_about_an_unset_or_plain_public_url(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    res = await cli(settings, "register", "--from-iop", RELAY_OCPI_PUBLIC_URL="")
    assert res.exit_code == 0, res.output
    assert "warning: ocpi.public_url — unset while registering" in res.stderr
    assert "token A:" in res.stdout  # still done: a warning, not a refusal
    res = await cli(settings, "register", "--from-iop", RELAY_OCPI_PUBLIC_URL="http://ocpi.cpo.example/ocpi")
    assert "warning: ocpi.public_url — http://ocpi.cpo.example/ocpi is plain http" in res.stderr
    res = await cli(settings, "register", "--from-iop", RELAY_OCPI_PUBLIC_URL="https://ocpi.cpo.example/ocpi")
    assert res.exit_code == 0 and "warning" not in res.stderr, res.stderr


# -- T4: relay register hands the IOP an https URL, or nothing ---------------------------------------------

# (id, [ocpi] public_url, [ocpi] allow_insecure_urls, refused because …)
ANNOUNCED = [
    ("https on a public name", "https://ocpi.cpo.example/ocpi", "false", None),
    ("https with a port", "https://ocpi.cpo.example:8443/ocpi", "false", None),
    ("unset: http://<listen> would be announced", "", "false", "is unset"),
    ("plain http", "http://ocpi.cpo.example/ocpi", "false", "only https"),
    ("https on loopback", "https://127.0.0.1:8781/ocpi", "false", "not a public address"),
    ("https on a private address", "https://10.0.0.7/ocpi", "false", "not a public address"),
    ("https on localhost", "https://localhost/ocpi", "false", "a local name"),
    ("test set-up: unset allowed", "", "true", None),
    ("test set-up: http allowed", "http://127.0.0.1:8781/ocpi", "true", None),
]


@pytest.mark.parametrize(("public", "insecure", "refused"), [a[1:] for a in ANNOUNCED], ids=[a[0] for a in ANNOUNCED])
def test_announce_refusal(public: str, insecure: str, refused: str | None) -> None:
    got = announce_refusal(settings_with(RELAY_OCPI_PUBLIC_URL=public, RELAY_OCPI_ALLOW_INSECURE_URLS=insecure))
    if refused is None:
        assert got is None
    else:
        assert got is not None and refused in got and "allow_insecure_urls" in got, got


async def test_register_refuses_to_hand_over_a_url_that_is_not_https(make_settings: Callable[..., Settings]) -> None:
    """`relay register --from-iop` printed http://127.0.0.1:8781/ocpi/versions for GIREVE when public_url was unset."""
    settings = make_settings(RELAY_OCPI_ALLOW_INSECURE_URLS="false")
    strict = {"RELAY_OCPI_ALLOW_INSECURE_URLS": "false"}
    for public in ("", "http://ocpi.cpo.example/ocpi", "https://127.0.0.1/ocpi"):
        res = await cli(settings, "register", "--from-iop", RELAY_OCPI_PUBLIC_URL=public, **strict)
        assert res.exit_code == 2, res.output
        said = [line for line in res.stderr.splitlines() if not line.startswith("config: ")]  # the file used, first
        assert said[0].startswith("not registering: ocpi.public_url"), res.stderr
        assert "token A" not in res.stdout and "versions URL" not in res.stdout
    store = Store(connect(settings.redis.url, settings.redis), settings.redis)
    try:
        assert (await RegistrationStore(store).load())[1] is None  # no token A was made
    finally:
        await store.close()
    res = await cli(settings, "register", "--from-iop", RELAY_OCPI_PUBLIC_URL="https://ocpi.cpo.example/ocpi", **strict)
    assert res.exit_code == 0, res.output
    assert "versions URL: https://ocpi.cpo.example/ocpi/versions" in res.stdout and "token A:" in res.stdout
    # The existing switch for test set-ups lets it through, with the warning.
    res = await cli(settings, "register", "--from-iop", RELAY_OCPI_PUBLIC_URL="", RELAY_OCPI_ALLOW_INSECURE_URLS="true")
    assert res.exit_code == 0 and "warning: ocpi.public_url — unset while registering" in res.stderr, res.output


async def test_register_to_iop_refuses_it_too_before_calling_the_hub(make_settings: Callable[..., Settings]) -> None:
    peer = OcpiPeer()
    await peer.start()
    try:
        settings = make_settings()
        res = await cli(settings, "register", "--versions-url", peer.versions_url, "--token-a", peer.token_a,
                        RELAY_OCPI_PUBLIC_URL="", RELAY_OCPI_ALLOW_INSECURE_URLS="false")  # fmt: skip
        assert res.exit_code == 2 and "not registering: ocpi.public_url is unset" in res.stderr, res.output
        assert peer.seen == []
    finally:
        await peer.close()
