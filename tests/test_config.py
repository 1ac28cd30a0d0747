"""Configuration: defaults, the shipped TOML, RELAY_* env overrides, secrets, and errors that name the key."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import pytest
from click.testing import CliRunner

from relay.cli import main
from relay.config import Settings, load
from relay.errors import ConfigError
from tests.conftest import REPO

SHIPPED = REPO / "config" / "relay.toml"
SECRET = "s3cr3t-Ingress-T0ken-value"
FR_AB1 = {"country_code": "FR", "party_id": "AB1", "emi3_id": "FR*AB1", "name": "Example CPO"}


def errors_of(path: Path | None = SHIPPED, **env: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(path, env=env)
    assert info.value.problems
    return info.value.problems


def one_error(path: Path | None = SHIPPED, **env: str) -> str:
    problems = errors_of(path, **env)
    assert len(problems) == 1, problems
    return problems[0]


def write(tmp_path: Path, text: str, name: str = "relay.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


MINIMAL = """
[[operators]]
country_code = "FR"
party_id = "AB1"
emi3_id = "FR*AB1"
name = "Example CPO"
"""


# --- the shipped file and defaults ---------------------------------------------------------------------------


def test_shipped_config_loads_with_its_documented_defaults() -> None:
    s = load(SHIPPED, env={})
    assert s.redis.url == ""  # embedded server
    assert s.ingress.listen == "127.0.0.1:8780"
    assert s.ocpi.listen == "0.0.0.0:8781"
    assert (s.iop.country_code, s.iop.party_id) == ("FR", "107")
    assert s.storage.durability == "always"
    assert [(o.country_code, o.party_id, o.emi3_id, o.name) for o in s.operators] == [
        ("FR", "AB1", "FR*AB1", "Example CPO")
    ]
    assert s.serve_problems() == ["ingress.token: required (set RELAY_INGRESS_TOKEN or ingress.token_file)"]


def test_shipped_config_comments_every_key() -> None:
    """Every key of the shipped file has a comment line somewhere above it in its section."""
    lines = SHIPPED.read_text().splitlines()
    for i, line in enumerate(lines):
        if "=" in line and not line.lstrip().startswith("#") and not line.startswith("["):
            above = lines[max(0, i - 12) : i]
            assert any(a.lstrip().startswith("#") for a in above), line


def test_settings_match_the_toml_sections() -> None:
    """The shipped file lists every key the Settings know, so the documentation is complete."""
    text = SHIPPED.read_text()
    defaults = Settings()
    for section in ("redis", "storage", "ingress", "ocpi", "iop", "forwarder", "log"):
        assert f"[{section}]" in text
        for key in type(getattr(defaults, section)).__struct_fields__:
            assert f"\n{key} = " in text, f"[{section}] {key} is not in config/relay.toml"


def test_defaults_without_a_file(tmp_path: Path) -> None:
    s = load(None, env={"RELAY_OPERATORS_JSON": json.dumps([FR_AB1])})
    assert s.redis.shards == 4 and s.ingress.profile == "strict"


def test_relay_config_env_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[ingress]\nprofile = "warn"\n' + MINIMAL)  # sections after [[operators]] would nest in it
    assert load(None, env={"RELAY_CONFIG": str(path)}).ingress.profile == "warn"


# --- env overrides --------------------------------------------------------------------------------------------


def test_env_overrides_each_kind_of_value() -> None:
    s = load(
        SHIPPED,
        env={
            "RELAY_REDIS_URL": "redis://cache.internal:6380/2",  # str
            "RELAY_REDIS_SHARDS": "16",  # int
            "RELAY_IOP_REQUEST_TIMEOUT_S": "2.5",  # float
            "RELAY_FORWARDER_ENABLED": "false",  # bool
            "RELAY_FORWARDER_PARK_MODULES": "cdrs, sessions",  # list, comma-separated
            "RELAY_LOG_REDACT_FIELDS": '["x_api_key", "card"]',  # list, JSON
            "RELAY_INGRESS_PROFILE": "warn",  # literal
            "RELAY_OPERATORS_JSON": json.dumps([FR_AB1, {**FR_AB1, "party_id": "XY1", "emi3_id": "FRXY1"}]),
        },
    )
    assert s.redis.url == "redis://cache.internal:6380/2"
    assert s.redis.shards == 16
    assert s.iop.request_timeout_s == 2.5
    assert s.forwarder.enabled is False
    assert s.forwarder.park_modules == ["cdrs", "sessions"]
    assert s.log.redact_fields == ["x_api_key", "card"]
    assert s.ingress.profile == "warn"
    assert [o.party_id for o in s.operators] == ["AB1", "XY1"]


@pytest.mark.parametrize(
    ("raw", "value"),
    [("true", True), ("1", True), ("YES", True), ("on", True), ("false", False), ("0", False), ("no", False)],
)
def test_env_bools(raw: str, value: bool) -> None:
    assert load(SHIPPED, env={"RELAY_FORWARDER_ENABLED": raw}).forwarder.enabled is value


def test_env_wins_over_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[redis]\nshards = 2\nurl = "redis://a:1"\n' + MINIMAL)
    assert (load(path, env={}).redis.shards, load(path, env={}).redis.url) == (2, "redis://a:1")
    s = load(path, env={"RELAY_REDIS_SHARDS": "8", "RELAY_REDIS_URL": ""})
    assert (s.redis.shards, s.redis.url) == (8, "")


def test_unrelated_env_vars_are_ignored() -> None:
    s = load(SHIPPED, env={"RELAY_REFERENCE_DIR": "/x", "RELAY_CONFIG": str(SHIPPED), "PATH": "/bin", "RELAYX_Y": "1"})
    assert s.redis.shards == 4


# --- secrets --------------------------------------------------------------------------------------------------


def test_token_file_is_read_relative_to_the_config(tmp_path: Path) -> None:
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "ingress").write_text(f"{SECRET}\n")
    path = write(tmp_path, '[ingress]\ntoken_file = "secrets/ingress"\n' + MINIMAL)
    s = load(path, env={})
    assert s.ingress.tokens() == (SECRET,)
    assert s.serve_problems() == []


def test_token_file_first_line_only(tmp_path: Path) -> None:
    secret = tmp_path / "tok"
    secret.write_text(f"\n{SECRET}\nnot part of the token\n")
    s = load(SHIPPED, env={"RELAY_INGRESS_TOKEN_FILE": str(secret)})
    assert s.ingress.token == SECRET


def test_secret_precedence_env_then_file_then_inline(tmp_path: Path) -> None:
    secret = tmp_path / "tok"
    secret.write_text("from-file")
    path = write(tmp_path, f'[ingress]\ntoken = "inline"\ntoken_file = "{secret}"\n' + MINIMAL)
    assert load(path, env={}).ingress.token == "from-file"
    assert load(path, env={"RELAY_INGRESS_TOKEN": "from-env"}).ingress.token == "from-env"
    path = write(tmp_path, '[ingress]\ntoken = "inline"\n' + MINIMAL)
    assert load(path, env={}).ingress.token == "inline"


def test_unreadable_token_file_names_the_key(tmp_path: Path) -> None:
    err = one_error(SHIPPED, RELAY_INGRESS_TOKEN_FILE=str(tmp_path / "missing"))
    assert err.startswith("ingress.token_file: cannot read")


def test_token_list_for_rotation() -> None:
    s = load(SHIPPED, env={"RELAY_INGRESS_TOKEN": " old , new ,, "})
    assert s.ingress.tokens() == ("old", "new")


# --- errors name the key ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "prefix"),
    [
        ({"RELAY_INGRESS_LISTEN": "localhost"}, "ingress.listen:"),
        ({"RELAY_INGRESS_LISTEN": "127.0.0.1:99999"}, "ingress.listen:"),
        ({"RELAY_OCPI_LISTEN": "0.0.0.0"}, "ocpi.listen:"),
        ({"RELAY_REDIS_NOPE": "1"}, "RELAY_REDIS_NOPE:"),
        ({"RELAY_INGRESS_TOKENS": "x"}, "RELAY_INGRESS_TOKENS:"),
        ({"RELAY_REDIS_URL": "http://localhost:6379"}, "redis.url:"),
        ({"RELAY_REDIS_URL": "localhost:6379"}, "redis.url:"),
        ({"RELAY_REDIS_SHARDS": "0"}, "redis.shards:"),
        ({"RELAY_REDIS_SHARDS": "four"}, "redis.shards:"),
        ({"RELAY_IOP_REQUEST_TIMEOUT_S": "soon"}, "iop.request_timeout_s:"),
        ({"RELAY_FORWARDER_ENABLED": "maybe"}, "forwarder.enabled:"),
        ({"RELAY_FORWARDER_PARK_MODULES": "[oops"}, "RELAY_FORWARDER_PARK_MODULES:"),
        ({"RELAY_FORWARDER_PARK_MODULES": "tokens"}, "forwarder.park_modules[0]:"),
        ({"RELAY_INGRESS_PROFILE": "lenient"}, "ingress.profile:"),
        ({"RELAY_STORAGE_DURABILITY": "never"}, "storage.durability:"),
        ({"RELAY_INGRESS_MAX_BODY_BYTES": "10"}, "ingress.max_body_bytes:"),
        ({"RELAY_IOP_COUNTRY_CODE": "France"}, "iop.country_code:"),
        ({"RELAY_IOP_URL": "ftp://iop"}, "iop.url:"),
        ({"RELAY_IOP_TLS_CERT_FILE": "/c.pem"}, "iop.tls_cert_file/tls_key_file:"),
        ({"RELAY_OPERATORS_JSON": "[{"}, "RELAY_OPERATORS_JSON:"),
        ({"RELAY_OPERATORS_JSON": "[]"}, "operators:"),
        ({"RELAY_OPERATORS_JSON": json.dumps([{**FR_AB1, "party_id": "AB"}])}, "operators[0].party_id:"),
        ({"RELAY_OPERATORS_JSON": json.dumps([{**FR_AB1, "party_id": "ab1"}])}, "operators[0].party_id:"),
        ({"RELAY_OPERATORS_JSON": json.dumps([{**FR_AB1, "country_code": "FRA"}])}, "operators[0].country_code:"),
        ({"RELAY_OPERATORS_JSON": json.dumps([{**FR_AB1, "name": ""}])}, "operators[0].name:"),
        ({"RELAY_OPERATORS_JSON": json.dumps([{k: v for k, v in FR_AB1.items() if k != "name"}])}, "operators[0]:"),
        ({"RELAY_OPERATORS_JSON": json.dumps([{**FR_AB1, "emi3": "x"}])}, "operators[0]:"),
        ({"RELAY_OPERATORS_JSON": json.dumps([{**FR_AB1, "emi3_id": "FR*XY"}])}, "operators[0].emi3_id:"),
        ({"RELAY_OPERATORS_JSON": json.dumps([{**FR_AB1, "emi3_id": "FR**XY1"}])}, "operators[0].emi3_id:"),
        ({"RELAY_OPERATORS_JSON": json.dumps([{**FR_AB1, "emi3_id": "fr*xy1"}])}, "operators[0].emi3_id:"),
        ({"RELAY_OPERATORS_JSON": json.dumps([{**FR_AB1, "emi3_id": "FR*XY1*E"}])}, "operators[0].emi3_id:"),
        ({"RELAY_OPERATORS_JSON": json.dumps([FR_AB1, {**FR_AB1, "name": "Again"}])}, "operators[1]: duplicate"),
        ({"RELAY_FORWARDER_CLAIM_IDLE_S": "10"}, "forwarder.claim_idle_s:"),
        ({"RELAY_FORWARDER_BACKOFF_MAX_S": "0.5"}, "forwarder.backoff_max_s:"),
    ],
)
def test_errors_name_the_key(env: Mapping[str, str], prefix: str) -> None:
    err = one_error(SHIPPED, **env)
    assert err.startswith(prefix), err


def test_emi3_id_defaults_to_the_ocpi_ids_and_may_differ_from_them(tmp_path: Path) -> None:
    """L2: EVSE ids begin with the operator's eMI3 id, which OCPI does not tie to country_code + party_id."""
    without = write(tmp_path, MINIMAL.replace('emi3_id = "FR*AB1"\n', ""))
    [op] = load(without, env={}).operators
    assert (op.emi3_id, op.evse_id_prefixes()) == ("FR*AB1", ("FR*AB1*E", "FRAB1E"))
    [op] = load(write(tmp_path, MINIMAL.replace('"FR*AB1"', '"FR*XYZ"')), env={}).operators
    assert (op.country_code, op.party_id, op.evse_id_prefixes()) == ("FR", "AB1", ("FR*XYZ*E", "FRXYZE"))
    # the env override of operators: RELAY_OPERATORS_JSON, with or without the key
    env = {"RELAY_OPERATORS_JSON": json.dumps([FR_AB1, {**FR_AB1, "party_id": "AB2", "emi3_id": "DEXYZ"}])}
    assert [o.emi3_id for o in load(without, env=env).operators] == ["FR*AB1", "DEXYZ"]
    env = {"RELAY_OPERATORS_JSON": json.dumps([{k: v for k, v in FR_AB1.items() if k != "emi3_id"}])}
    assert [o.emi3_id for o in load(without, env=env).operators] == ["FR*AB1"]


def test_bad_toml_names_the_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, '[redis]\nurl = "unterminated\n')
    err = one_error(path)
    assert str(path) in err and "not valid TOML" in err and "line 2" in err


def test_unknown_toml_key_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, "[redis]\nshard = 3\n" + MINIMAL)
    err = one_error(path)
    assert err.startswith("redis:") and "shard" in err


def test_missing_file_is_named(tmp_path: Path) -> None:
    err = one_error(tmp_path / "nope.toml")
    assert "nope.toml" in err and "cannot read" in err


def test_all_problems_at_once() -> None:
    problems = errors_of(
        SHIPPED,
        RELAY_REDIS_URL="http://x",
        RELAY_OPERATORS_JSON=json.dumps([FR_AB1, FR_AB1]),
        RELAY_IOP_TLS_KEY_FILE="/k.pem",
    )
    assert sorted(p.split(":")[0] for p in problems) == sorted(
        ["operators[1]", "redis.url", "iop.tls_cert_file/tls_key_file"]
    )


# --- relay check-config ----------------------------------------------------------------------------------------


def run_check(*args: str, **env: str) -> tuple[int, str, str]:
    clean: dict[str, str | None] = {k: None for k in os.environ if k.startswith("RELAY_")}
    clean.update(env)
    result = CliRunner().invoke(main, ["check-config", *args], env=clean)
    return result.exit_code, result.stdout, result.stderr


def test_check_config_accepts_the_shipped_file() -> None:
    code, out, err = run_check("--config", str(SHIPPED), RELAY_INGRESS_TOKEN=SECRET, RELAY_IOP_TOKEN=SECRET + "2")
    assert code == 0, err
    assert "configuration is valid" in err
    effective = json.loads(out)
    assert effective["ingress"]["token"] == "[redacted]"
    assert effective["iop"]["token"] == "[redacted]"
    assert effective["operators"][0]["emi3_id"] == "FR*AB1"
    assert SECRET not in out + err


def test_check_config_reads_relay_config_env() -> None:
    code, out, _ = run_check(RELAY_CONFIG=str(SHIPPED), RELAY_INGRESS_TOKEN=SECRET, RELAY_REDIS_SHARDS="6")
    assert code == 0
    assert json.loads(out)["redis"]["shards"] == 6


def test_check_config_without_token_exits_2_with_the_reason() -> None:
    code, out, err = run_check("--config", str(SHIPPED))
    assert code == 2
    assert "ingress.token: required" in err
    assert out == ""


def test_check_config_bad_values_exit_2_and_never_print_the_token(tmp_path: Path) -> None:
    code, out, err = run_check(
        "--config",
        str(SHIPPED),
        RELAY_INGRESS_TOKEN=SECRET,
        RELAY_INGRESS_LISTEN="nowhere",
        RELAY_REDIS_URL="mysql://x",
    )
    assert code == 2
    assert "ingress.listen:" in err
    assert SECRET not in out + err
    code, out, err = run_check("--config", str(SHIPPED), RELAY_INGRESS_TOKEN=SECRET, RELAY_REDIS_URL="mysql://x")
    assert code == 2
    assert "redis.url:" in err
    assert SECRET not in out + err
    bad = write(tmp_path, f'[ingress]\ntoken = "{SECRET}"\nlisten = 8780\n' + MINIMAL)
    code, out, err = run_check("--config", str(bad))
    assert code == 2
    assert "ingress.listen:" in err
    assert SECRET not in out + err


def test_check_config_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    code, _, err = run_check("--config", str(tmp_path / "missing.toml"), RELAY_INGRESS_TOKEN=SECRET)
    assert code == 2
    assert "missing.toml" in err
