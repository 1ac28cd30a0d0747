"""What a newcomer tripped on with the CLI (issue 18, papercuts): where the configuration comes from, relative
paths, the count in a bulk prompt, and a closed stdout.

- The CLI verbs and ``relay serve`` find their configuration without --config (RELAY_CONFIG, then
  ./config/relay.toml, then /etc/relay/relay.toml) and say which file they used, or that there is none.
- Every relative path of the configuration is taken from the config file's directory, from any working
  directory.
- ``relay dlq replay``/``purge`` with a filter ask with the number of dead letters it selected.
- ``relay … | head -1`` ends quietly (exit 141, as a command killed by SIGPIPE), never "Redis unreachable".
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trustme
from click.testing import CliRunner

from relay import cli_common
from relay.cli import main
from relay.cli_common import SIGPIPE_EXIT, find_config, with_store
from relay.config import PATH_KEYS, Settings, load
from relay.errors import StoreUnavailable
from relay.ocpi_client import ssl_context
from relay.ocpi_server.app import server_ssl_context
from tests.conftest import REPO, TOKEN
from tests.loopback import free_port
from tests.test_dlq import Env, _wait_dead, env  # noqa: F401  (the fixture, used by name)
from tests.waiting import wait_until_sync

SHIPPED = REPO / "config" / "relay.toml"
Completed = subprocess.CompletedProcess[str]


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any RELAY_* variable (the suite's own, or a developer's), plus ``extra``."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    environ.update(extra)
    return environ


@pytest.fixture
def no_relay_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [k for k in os.environ if k.startswith("RELAY_")]:
        monkeypatch.delenv(name)


def cli_run(args: list[str], cwd: Path, environ: dict[str, str], timeout_s: float = 60) -> Completed:
    return subprocess.run(
        [sys.executable, "-m", "relay", *args], cwd=cwd, env=environ, capture_output=True, text=True, timeout=timeout_s,
        check=False,
    )  # fmt: skip


# -- 1. the configuration file, found without --config ------------------------------------------------------


def test_config_is_found_by_option_then_env_then_the_working_directory_then_etc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    here, etc = tmp_path / "here", tmp_path / "etc" / "relay" / "relay.toml"
    here.mkdir()
    monkeypatch.setattr(cli_common, "DEFAULT_CONFIGS", (Path("config/relay.toml"), etc))

    none = find_config(None, {}, here)
    assert (none.path, none.source) == (None, "none")
    line = none.describe()
    assert "no file" in line and "./config/relay.toml" in line and str(etc) in line and "--config" in line

    etc.parent.mkdir(parents=True)
    etc.write_text("")
    assert (find_config(None, {}, here).path, find_config(None, {}, here).source) == (etc, str(etc))

    (here / "config").mkdir()
    (here / "config" / "relay.toml").write_text("")
    local = find_config(None, {}, here)
    assert (local.path, local.source) == (here / "config" / "relay.toml", "./config/relay.toml")
    assert local.describe() == f"config: {here / 'config' / 'relay.toml'} (found as ./config/relay.toml)"

    named = find_config(None, {"RELAY_CONFIG": "other.toml"}, here)  # named: used even if missing (then refused)
    assert (named.path, named.source) == (here / "other.toml", "RELAY_CONFIG")
    given = find_config(Path("given.toml"), {"RELAY_CONFIG": "other.toml"}, here)
    assert (given.path, given.source) == (here / "given.toml", "--config")
    assert find_config(None, {"RELAY_CONFIG": " "}, here).source == "./config/relay.toml"  # empty: unset


def test_cli_verbs_say_which_config_they_use_and_when_there_is_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_relay_env: None
) -> None:
    monkeypatch.setattr(cli_common, "DEFAULT_CONFIGS", (Path("config/relay.toml"), tmp_path / "no-etc.toml"))
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()

    # None anywhere: said first, then what is missing (before: only "operators: at least one … is required").
    res = runner.invoke(main, ["check-config"], env={"RELAY_INGRESS_TOKEN": TOKEN})
    assert res.exit_code == 2
    lines = res.stderr.splitlines()
    assert lines[0].startswith("config: no file (no --config, RELAY_CONFIG unset, none of ./config/relay.toml, ")
    assert lines[1:] == ["configuration is invalid:", "  - operators: at least one hosted operator is required"]

    # ./config/relay.toml of the working directory.
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "relay.toml").write_text(SHIPPED.read_text())
    res = runner.invoke(main, ["check-config"], env={"RELAY_INGRESS_TOKEN": "x" * 32})
    assert res.exit_code == 0, res.output
    assert res.stderr.splitlines()[0] == f"config: {tmp_path / 'config' / 'relay.toml'} (found as ./config/relay.toml)"
    assert json.loads(res.stdout)["storage"]["dir"] == str(tmp_path / "data")  # its "../data", from its directory

    # RELAY_CONFIG before it; --config before both, and then nothing to say.
    elsewhere = tmp_path / "elsewhere.toml"
    elsewhere.write_text(SHIPPED.read_text().replace('profile = "strict"', 'profile = "warn"'))
    res = runner.invoke(main, ["check-config"], env={"RELAY_INGRESS_TOKEN": "x" * 32, "RELAY_CONFIG": str(elsewhere)})
    assert res.exit_code == 0 and json.loads(res.stdout)["ingress"]["profile"] == "warn"
    assert res.stderr.splitlines()[0] == f"config: {elsewhere} (RELAY_CONFIG)"
    both = {"RELAY_INGRESS_TOKEN": "x" * 32, "RELAY_CONFIG": str(elsewhere)}
    res = runner.invoke(main, ["check-config", "--config", str(SHIPPED)], env=both)
    assert res.exit_code == 0 and json.loads(res.stdout)["ingress"]["profile"] == "strict"
    assert "config: " not in res.stderr

    # A file RELAY_CONFIG names that is not there: said, not skipped for another.
    res = runner.invoke(main, ["check-config"], env={"RELAY_INGRESS_TOKEN": TOKEN, "RELAY_CONFIG": "missing.toml"})
    assert res.exit_code == 2
    assert res.stderr.splitlines()[0] == f"config: {tmp_path / 'missing.toml'} (RELAY_CONFIG)"
    assert "missing.toml: cannot read: No such file or directory" in res.stderr


async def test_status_json_names_the_config_file(redis_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 no_relay_env: None) -> None:  # fmt: skip
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "relay.toml").write_text(SHIPPED.read_text())
    monkeypatch.chdir(tmp_path)
    res = await _invoke(["status", "--json"], {"RELAY_REDIS_URL": redis_url})
    assert res.exit_code == 0, res.output
    config = json.loads(res.stdout)["config"]
    assert config == {"path": str(tmp_path / "config" / "relay.toml"), "source": "./config/relay.toml"}
    res = await _invoke(["status", "--json", "--config", str(SHIPPED)], {"RELAY_REDIS_URL": redis_url})
    assert json.loads(res.stdout)["config"] == {"path": str(SHIPPED), "source": "--config"}


async def _invoke(args: list[str], environ: dict[str, str]) -> Any:
    return await asyncio.to_thread(CliRunner().invoke, main, args, env=environ)


def test_serve_finds_its_config_logs_it_and_says_when_there_is_none(redis_url: str, tmp_path: Path) -> None:
    # No file anywhere (the working directory has none; /etc/relay/relay.toml is not on a test machine): the
    # line that says so comes before the problem it causes, one plain line each, exit 2.
    if Path("/etc/relay/relay.toml").exists():
        pytest.skip("this machine has an /etc/relay/relay.toml")
    out = cli_run(["serve"], tmp_path, clean_env(RELAY_INGRESS_TOKEN=TOKEN))
    assert out.returncode == 2, out.stderr
    assert out.stderr.splitlines() == [
        "config: no file (no --config, RELAY_CONFIG unset, none of ./config/relay.toml, /etc/relay/relay.toml "
        "exists): defaults and RELAY_* variables only; give one with --config FILE",
        "configuration is invalid:",
        "  - operators: at least one hosted operator is required",
    ]

    # ./config/relay.toml: served, and the file is in the JSON log (stderr stays JSON lines only).
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "relay.toml").write_text(SHIPPED.read_text())
    port = free_port()
    environ = clean_env(RELAY_INGRESS_TOKEN=TOKEN, RELAY_REDIS_URL=redis_url, RELAY_INGRESS_LISTEN=f"127.0.0.1:{port}",
                    RELAY_OCPI_LISTEN="127.0.0.1:0", RELAY_FORWARDER_ENABLED="false")  # fmt: skip
    log = tmp_path / "serve.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "relay", "serve"], cwd=tmp_path, env=environ,
                                stdin=subprocess.DEVNULL, stdout=sink, stderr=sink)  # fmt: skip
    try:
        wait_until_sync(lambda: '"relay_started"' in log.read_text(), 30, log.read_text)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]  # every line is JSON
    [found] = [line for line in lines if line["event"] == "config_file"]
    assert found["path"] == str(tmp_path / "config" / "relay.toml") and found["source"] == "./config/relay.toml"
    assert found["level"] == "info"


# -- 2. relative paths, from the config file's directory ------------------------------------------------------


def test_every_path_key_is_resolved_from_the_config_files_directory() -> None:
    # Every key that names a file or a directory is in PATH_KEYS: a new one cannot be forgotten.
    found = {
        (section, key)
        for section, value in msgspec_sections(Settings()).items()
        for key in value
        if key.endswith("_file") or key == "dir"
    }
    assert found == set(PATH_KEYS)


def msgspec_sections(settings: Settings) -> dict[str, dict[str, Any]]:
    import msgspec

    return {k: v for k, v in msgspec.to_builtins(settings).items() if isinstance(v, dict)}


def test_relative_paths_are_taken_from_the_config_file_wherever_the_command_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pki = trustme.CA()
    conf = tmp_path / "etc"
    (conf / "tls").mkdir(parents=True)
    leaf = pki.issue_cert("ocpi.cpo.example")
    leaf.cert_chain_pems[0].write_to_path(str(conf / "tls" / "cert.pem"))
    leaf.private_key_pem.write_to_path(str(conf / "tls" / "key.pem"))
    pki.cert_pem.write_to_path(str(conf / "tls" / "ca.pem"))
    for name, value in (("ingress", "ingress-S3cret-0123456789"), ("iop", "iop-S3cret-0123"), ("csms", "csms-S3cret"),
                        ("token_a", "tokenA-S3cret")):  # fmt: skip
        (conf / f"{name}.token").write_text(value + "\n")
    text = SHIPPED.read_text()
    for section, pairs in {
        "[storage]": 'dir = "state/data"',
        "[ingress]": 'token_file = "ingress.token"',
        "[ocpi]": 'token_a_file = "token_a.token"\ntls_cert_file = "tls/cert.pem"\ntls_key_file = "tls/key.pem"\n'
        'tls_client_ca_file = "tls/ca.pem"',
        "[iop]": 'token_file = "iop.token"\ntls_ca_file = "tls/ca.pem"\ntls_cert_file = "tls/cert.pem"\n'
        'tls_key_file = "./tls/../tls/key.pem"',
        "[csms]": 'token_file = "csms.token"',
    }.items():
        keys = [line.split(" = ")[0] for line in pairs.splitlines()]
        body = text.split(section + "\n", 1)[1]
        kept = "\n".join(line for line in body.splitlines() if line.split(" = ")[0] not in keys or line.startswith("#"))
        text = text.split(section + "\n", 1)[0] + section + "\n" + pairs + "\n" + kept + "\n"
    (conf / "relay.toml").write_text(text)

    elsewhere = tmp_path / "somewhere" / "else"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    s = load(Path("../../etc/relay.toml"), env={})  # a relative --config, from another directory
    for section, key in PATH_KEYS:
        value = getattr(getattr(s, section), key)
        assert value == "" or (Path(value).is_absolute() and Path(value).is_relative_to(conf)), (section, key, value)
    assert s.storage.dir == str(conf / "state" / "data")
    assert s.ocpi.tls_cert_file == str(conf / "tls" / "cert.pem") and s.iop.tls_key_file == str(conf / "tls/key.pem")
    assert s.ocpi.tls_client_ca_file == s.iop.tls_ca_file == str(conf / "tls" / "ca.pem")
    assert (s.ingress.token, s.iop.token, s.csms.token, s.ocpi.token_a) == (
        "ingress-S3cret-0123456789", "iop-S3cret-0123", "csms-S3cret", "tokenA-S3cret",
    )  # fmt: skip
    # The TLS files open from here: the OCPI listener's certificate, the IOP's CA and client certificate.
    assert isinstance(server_ssl_context(s), ssl.SSLContext) and isinstance(ssl_context(s.iop), ssl.SSLContext)
    # An env var's relative path is the config file's too; an absolute one stays as it is.
    s = load(conf / "relay.toml", env={"RELAY_OCPI_TLS_CERT_FILE": "tls/cert.pem", "RELAY_STORAGE_DIR": "/srv/x"})
    assert s.ocpi.tls_cert_file == str(conf / "tls" / "cert.pem") and s.storage.dir == "/srv/x"
    assert list(elsewhere.iterdir()) == []


def test_without_a_file_relative_paths_are_the_working_directorys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t").write_text("from-file-0123456789\n")
    ops = '[{"country_code": "FR", "party_id": "AB1", "name": "x"}]'
    s = load(None, env={"RELAY_OPERATORS_JSON": ops, "RELAY_INGRESS_TOKEN_FILE": "t", "RELAY_IOP_TLS_CA_FILE": "ca"})
    assert s.ingress.token == "from-file-0123456789" and s.ingress.token_file == str(tmp_path / "t")
    assert s.iop.tls_ca_file == str(tmp_path / "ca") and s.storage.dir == str(tmp_path / "data")
    assert s.iop.tls_cert_file == ""  # unset stays unset


# -- 4. a bulk replay or purge asks with the number it selected -----------------------------------------------


async def test_bulk_replay_and_purge_ask_with_the_number_of_dead_letters_that_match(env: Env) -> None:  # noqa: F811
    env.refuse.add("refused")
    for loc in ("LOC1", "LOC2", "LOC3"):
        await env.put(loc, "refused")
    await _wait_dead(env, 3)

    res = await env.cli("dlq", "replay", "--module", "locations", input="n\n")
    assert res.exit_code == 1 and "Replay 3 dead letters? [y/N]" in res.stderr, res.output
    assert len(await _dead_rows(env)) == 3  # declined: nothing replayed

    res = await env.cli("dlq", "purge", "--key", "loc:FR:AB1:LOC2", "--json", input="y\n")
    assert res.exit_code == 0 and "Purge 1 dead letter? [y/N]" in res.stderr, res.output
    assert json.loads(res.stdout.splitlines()[-1]) == {"selected": 1, "purged": 1}  # stdout: only the results

    res = await env.cli("dlq", "purge", "--all", input="n\n")
    assert res.exit_code == 1 and "Purge 2 dead letters? [y/N]" in res.stderr

    res = await env.cli("dlq", "replay", "--reason", "no such reason")  # nothing selected: nothing to ask
    assert res.exit_code == 0 and "[y/N]" not in res.output and json.loads(res.stdout)["selected"] == 0
    res = await env.cli("dlq", "replay", "--all", "--dry-run")  # a dry run changes nothing: no question
    assert res.exit_code == 0 and "[y/N]" not in res.output


async def _dead_rows(e: Env) -> list[dict[str, Any]]:
    res = await e.cli("dlq", "list", "--json")
    return [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]


# -- 7. a closed stdout ---------------------------------------------------------------------------------------


def _with_closed_stdout(args: list[str], environ: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    """Run a verb whose stdout's reader is gone before it writes (what `| head -1` leaves after one line)."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run([sys.executable, "-m", "relay", *args], env=environ, cwd=REPO, stdout=write,
                              stderr=subprocess.PIPE, timeout=60, check=False)  # fmt: skip
    finally:
        os.close(write)


async def test_a_closed_stdout_ends_quietly_not_as_redis_unreachable(env: Env) -> None:  # noqa: F811
    env.refuse.add("x")
    for i in range(3):
        await env.put(f"LOC{i}", "x")
    await _wait_dead(env, 3)
    base = clean_env(RELAY_REDIS_URL=env.settings.redis.url, RELAY_INGRESS_TOKEN=TOKEN)
    for args in (["dlq", "list"], ["dlq", "list", "--json"], ["status"], ["status", "--json"], ["peek", "locations"],
                 ["dlq", "replay", "--all", "--yes", "--dry-run", "--json"], ["check-config"]):  # fmt: skip
        out = await asyncio.to_thread(_with_closed_stdout, [*args, "--config", str(SHIPPED)], base)
        stderr = out.stderr.decode()
        assert out.returncode == SIGPIPE_EXIT, (args, out.returncode, stderr)
        assert "Redis unreachable" not in stderr and "Traceback" not in stderr and "Broken pipe" not in stderr, stderr
    assert len(await _dead_rows(env)) == 3


def test_a_broken_pipe_wrapped_by_the_store_is_still_a_closed_stdout(settings: Settings) -> None:
    # A store method turns every OSError raised inside it (a callback's write to stdout included) into
    # StoreUnavailable: the CLI tells it from an unreachable Redis by its cause.
    async def write_in_a_store_call(store: Any) -> None:
        try:
            raise BrokenPipeError(32, "Broken pipe")
        except OSError as exc:
            raise StoreUnavailable(f"redis: {exc}") from exc

    async def unreachable(store: Any) -> None:
        raise StoreUnavailable("redis: ConnectionError: connection refused")

    with pytest.raises(SystemExit) as stopped:
        with_store(settings, write_in_a_store_call)
    assert stopped.value.code == SIGPIPE_EXIT
    with pytest.raises(SystemExit) as stopped:
        with_store(settings, unreachable)
    assert stopped.value.code == 3
