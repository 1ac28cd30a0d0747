"""Logs as an operator reads them: JSON lines with the ids to follow an event, and never a secret.

The end-to-end test runs ``relay serve`` as a real process (JSON at INFO, as shipped) with real
tokens in its environment and a token file, against the session's Redis and a fake IOP that echoes
the credentials it received into its error messages. The Redactor itself is tested directly.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog

from relay.config import Settings
from relay.logs import REDACTED, Redactor, add_secrets, settings_secrets
from tests.conftest import REPO, configure_test_logging, gireve_location
from tests.fake_iop import FakeIop, Received, Reply
from tests.loopback import free_port
from tests.test_forwarder import loc_of
from tests.waiting import wait_until

INGRESS_SECRET = "ingress-S3cret-4f9c2a71"
INGRESS_OLD = "ingress-0ld-rotated-9e1d"
IOP_SECRET = "iop-S3cret-77d1e0b5c3"
TOKEN_A = "tokenA-S3cret-0c4e8812"
SECRETS = [INGRESS_SECRET, INGRESS_OLD, IOP_SECRET, TOKEN_A] + [
    base64.b64encode(s.encode()).decode() for s in (IOP_SECRET, INGRESS_SECRET, TOKEN_A)
]


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line must be one JSON object: an operator's log shipper parses them blindly."""
    out = []
    for line in text.splitlines():
        if line.strip():
            doc = json.loads(line)
            assert isinstance(doc, dict), line
            out.append(doc)
    return out


# -- the Redactor --------------------------------------------------------------------------------


def test_secret_named_keys_are_replaced_whole_at_any_depth() -> None:
    r = Redactor(["pin", "X-Custom-Secret"])
    event = {
        "event": "x",
        "token": "t1",
        "Authorization": "Token abc",
        "iop_token": "t2",
        "password": "p",
        "pin": "1234",
        "x-custom-secret": "c",
        "headers": {"authorization": "Bearer zzz", "X-Request-ID": "req-1", "Cookie": "s=1"},
        "items": [{"token_a": "a"}, {"module": "locations"}],
        "key": "loc:FR:AB1:L1",
    }
    out = r(None, "info", dict(event))
    for k in ("token", "Authorization", "iop_token", "password", "pin", "x-custom-secret"):
        assert out[k] == REDACTED, k
    assert out["headers"] == {"authorization": REDACTED, "X-Request-ID": "req-1", "Cookie": REDACTED}
    assert out["items"] == [{"token_a": REDACTED}, {"module": "locations"}]
    assert out["event"] == "x" and out["key"] == "loc:FR:AB1:L1"  # ordinary fields untouched


def test_credentials_inside_strings_are_replaced() -> None:
    r = Redactor()
    cases = {
        "sent Authorization: Token ZXhhbXBsZS10b2tlbg==": "sent Authorization: Token [redacted]",
        "got bearer abc.DEF-123_x~y": "got bearer [redacted]",
        "proxy said Basic dXNlcjpwYXNz": "proxy said Basic [redacted]",
        "GET /cb?token=abcdef123&x=1": "GET /cb?token=[redacted]&x=1",
        'body {"token": "secret-value", "url": "u"}': 'body {"token": "[redacted]", "url": "u"}',
        "redis at rediss://default:pa55word@redis:6380/0": "redis at rediss://default:[redacted]@redis:6380/0",
        "plain http://host:8080/path@x and redis://user@host": "plain http://host:8080/path@x and redis://user@host",
    }
    for given, want in cases.items():
        assert r(None, "info", {"event": "e", "msg": given})["msg"] == want
    nested = r(None, "info", {"event": "e", "reasons": ("a Token abcdefgh", ["Bearer xyzxyzxy"])})
    assert nested["reasons"] == ["a Token [redacted]", ["Bearer [redacted]"]]


def test_the_relays_own_words_are_left_alone_and_secrets_still_go() -> None:
    r = Redactor()
    own = [
        "http 401: token refused",  # relay.retry's reason for a 401/403 (link state, dead letter, status)
        "Token refused by the IOP",
        "token unknown to the relay",
        "the token expired",
        "ingress.token: required (set RELAY_INGRESS_TOKEN or ingress.token_file)",
        "authorization: missing",
        "a bearer token is the ingress's only lock",
        "basic auth is not supported",
    ]
    for text in own:
        out = r(None, "warning", {"event": text, "reason": text, "problem": {"why": [text]}})
        assert out == {"event": text, "reason": text, "problem": {"why": [text]}}, text
    # A credential after the same words is still one: it has a digit, a capital or a symbol, or a scheme.
    secrets = {
        "http 401: token refused, sent token s3cr3t-abc": "http 401: token refused, sent token [redacted]",
        "Token refused: Token ZXhhbXBsZS10b2tlbg==": "Token refused: Token [redacted]",
        "a Token abcdefgh": "a Token [redacted]",
        "Bearer refusedsecret": "Bearer [redacted]",
        "GET /cb?token=refused": "GET /cb?token=[redacted]",
        "token: Abcdef12": "token: [redacted]",
    }
    for given, want in secrets.items():
        assert r(None, "info", {"event": "e", "reason": given})["reason"] == want, given
    assert r(None, "info", {"event": "e", "token": "token refused"})["token"] == REDACTED  # a secret-named key: whole


def test_known_secret_values_are_replaced_wherever_they_appear() -> None:
    value = "s3cr3t-value-2b7e91"
    r = Redactor(secrets=[value])
    b64 = base64.b64encode(value.encode()).decode()
    out = r(None, "info", {"event": f"peer said {value}!", "reason": f"OCPI 2001: invalid credentials {b64}"})
    assert out == {"event": f"peer said {REDACTED}!", "reason": f"OCPI 2001: invalid credentials {REDACTED}"}
    add_secrets(["abc"])  # too short to be told from ordinary words: ignored
    assert Redactor()(None, "info", {"event": "abc"}) == {"event": "abc"}


def test_settings_secrets_finds_every_token_and_url_password(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(
        RELAY_INGRESS_TOKEN=f"{INGRESS_SECRET}, {INGRESS_OLD}",
        RELAY_IOP_TOKEN=IOP_SECRET,
        RELAY_OCPI_TOKEN_A=TOKEN_A,
        RELAY_IOP_URL="https://hub:hub-pa55w0rd@iop.example/ocpi/2.2.1",
    )
    found = set(settings_secrets(settings))
    assert {INGRESS_SECRET, INGRESS_OLD, IOP_SECRET, TOKEN_A, "hub-pa55w0rd"} <= found
    assert "https://hub:hub-pa55w0rd@iop.example/ocpi/2.2.1" not in found


def test_configure_logging_json_lines_for_structlog_and_stdlib() -> None:
    # In a child process: configure_logging() changes process-wide state that the suite relies on.
    code = """
import logging, structlog
from relay.logs import configure_logging
configure_logging("info", "json", ["pin"])
logging.getLogger("aiohttp.server").error("Error handling request: Authorization: Bearer abcdef123456")
log = structlog.get_logger("relay.x")
log.info("evt", pin="pin-9731-xq", headers={"Authorization": "Token zzzzzz"}, url="redis://:hunter22@redis:6379/0")
log.debug("hidden_at_info")
try:
    1 / 0
except ZeroDivisionError:
    logging.getLogger("asyncio").exception("boom token=abcdef987")
    log.exception("failed", note="Bearer qwertyuiop")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60, check=True, cwd=REPO)
    assert out.stdout == b""
    stderr = out.stderr.decode()
    lines = json_lines(stderr)
    for secret in ("abcdef123456", "zzzzzz", "hunter22", "pin-9731-xq", "abcdef987", "qwertyuiop"):
        assert secret not in stderr, secret
    aio, evt, boom, failed = lines
    assert aio["level"] == "error" and aio["logger"] == "aiohttp.server" and "Bearer [redacted]" in aio["event"]
    assert evt["event"] == "evt" and evt["level"] == "info" and evt["timestamp"].endswith("Z")
    assert evt["pin"] == REDACTED and evt["headers"] == {"Authorization": REDACTED}
    assert evt["url"] == "redis://:[redacted]@redis:6379/0"
    assert boom["logger"] == "asyncio" and "ZeroDivisionError" in boom["exception"]
    assert failed["level"] == "error" and "ZeroDivisionError" in failed["exception"]
    assert "hidden_at_info" not in stderr


# -- a real relay process -------------------------------------------------------------------------


class Served:
    def __init__(self, tmp: Path, redis_url: str, iop: FakeIop) -> None:
        self.port = free_port()
        self.log_path = tmp / "relay.log"
        token_file = tmp / "iop-token"
        token_file.write_text(IOP_SECRET + "\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        env.update(
            RELAY_REDIS_URL=redis_url,
            RELAY_STORAGE_DIR=str(tmp / "data"),
            RELAY_INGRESS_LISTEN=f"127.0.0.1:{self.port}",
            RELAY_OCPI_LISTEN="127.0.0.1:0",
            RELAY_INGRESS_TOKEN=f"{INGRESS_SECRET},{INGRESS_OLD}",
            RELAY_IOP_URL=iop.url,
            RELAY_IOP_TOKEN_FILE=str(token_file),
            RELAY_OCPI_TOKEN_A=TOKEN_A,
            RELAY_LOG_FORMAT="json",
            RELAY_LOG_LEVEL="info",
            RELAY_FORWARDER_BACKOFF_INITIAL_S="0.01",
            RELAY_FORWARDER_BACKOFF_MAX_S="0.1",
        )
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "relay", "serve", "--config", str(REPO / "config" / "relay.toml")],
                env=env, cwd=tmp, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )  # fmt: skip

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        """True while the process runs; fails at once, with its log, if it has exited."""
        assert self.proc.poll() is None, f"relay exited {self.proc.returncode}:\n{self.log()}"
        return True


@pytest.fixture
def served(redis_url: str, tmp_path: Path) -> Iterator[Callable[[FakeIop], Served]]:
    procs: list[Served] = []

    def start(iop: FakeIop) -> Served:
        procs.append(Served(tmp_path, redis_url, iop))
        return procs[-1]

    yield start
    for s in procs:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.wait(timeout=10)


async def test_relay_logs_ids_on_failures_nothing_per_delivery_and_no_secret(
    served: Callable[[FakeIop], Served], iop: FakeIop
) -> None:
    def script(r: Received) -> Reply | None:
        if loc_of(r) != "FAIL":
            return None
        # An IOP that echoes the credentials it got, in every form, into its error messages.
        echo = f'auth={r.headers.get("Authorization")} plain={IOP_SECRET} body={{"token": "{IOP_SECRET}"}}'
        first = len([x for x in iop.arrived if loc_of(x) == "FAIL"]) == 1
        return Reply(status=200, ocpi=3000 if first else 2001, body=json.dumps(
            {"status_code": 3000 if first else 2001, "status_message": echo, "timestamp": "2026-01-01T00:00:00Z"}
        ).encode())  # fmt: skip

    iop.script = script
    relay = served(iop)
    base = f"http://127.0.0.1:{relay.port}"
    async with aiohttp.ClientSession() as http:

        async def up() -> bool:
            assert relay.alive()
            try:
                async with http.get(f"{base}/readyz") as r:
                    return r.status == 200
            except aiohttp.ClientError:
                return False

        await wait_until(up, 30, lambda: f"relay ready; its log:\n{relay.log()}")

        async def put(loc: str, token: str, **headers: str) -> tuple[int, Any]:
            url = f"{base}/ingress/2.2.1/locations/FR/AB1/{loc}"
            hdrs = {"Authorization": token, **headers}
            async with http.put(url, json=gireve_location(loc), headers=hdrs) as r:
                return r.status, await r.json()

        status, answer = await put("FAIL", f"Bearer {INGRESS_SECRET}", **{"X-Correlation-ID": "csms-corr-77"})
        assert status == 202, answer
        fail_id = answer["data"]["event_id"]
        ok_ids = []
        for i in range(20):
            status, answer = await put(f"OK{i:02d}", f"Bearer {INGRESS_OLD}" if i % 2 else f"Token {INGRESS_SECRET}")
            assert status == 202, answer
            ok_ids.append(answer["data"]["event_id"])
        assert (await put("NOPE", f"Bearer {INGRESS_SECRET}-wrong"))[0] == 401

        await iop.wait_for(lambda: len(iop.delivered()) == 20 and len(iop.failed()) == 2)
        await wait_until(lambda: relay.alive() and '"dead_lettered"' in relay.log(), 20,
                         lambda: f"the dead letter's log line; the log:\n{relay.log()}")  # fmt: skip
    relay.proc.send_signal(signal.SIGTERM)
    assert relay.proc.wait(timeout=20) == 0, relay.log()

    text = relay.log()
    lines = json_lines(text)
    assert all({"event", "level", "timestamp"} <= line.keys() for line in lines)
    for secret in SECRETS:
        assert secret not in text, secret
    assert REDACTED in text  # the echoes did reach the logs, redacted (else this test proves nothing)

    # One line per failed attempt that is retried; the attempt that dead-letters is one line, dead_lettered,
    # with the attempt's fields and the dead letter's (not a delivery_failed line and a dead_lettered line).
    failed = [line for line in lines if line["event"] == "delivery_failed"]
    first, last = [r for r in iop.received if loc_of(r) == "FAIL"]
    assert [(f["attempt"], f["outcome"]) for f in failed] == [(1, "transient")]
    [dead] = [line for line in lines if line["event"] == "dead_lettered"]
    for f, r in ((failed[0], first), (dead, last)):
        assert f["level"] == "warning"
        assert f["event_id"] == fail_id and f["module"] == "locations" and f["key"] == "loc:FR:AB1:FAIL"
        assert f["correlation_id"] == "csms-corr-77" == r.headers["X-Correlation-ID"]
        assert f["request_id"] == r.headers["X-Request-ID"] and f["request_id"]
    assert dead["reason"].startswith("OCPI 2001") and dead["dead_id"] and dead["attempts"] == 2
    assert (dead["outcome"], dead["kind"], dead["http_status"], dead["ocpi_code"]) == (
        "permanent",
        "permanent",
        200,
        2001,
    )
    assert [line["event"] for line in lines if line.get("event_id") == fail_id] == ["delivery_failed", "dead_lettered"]

    # No line per successful delivery (nor per accepted event) at INFO.
    assert not [line for line in lines if line.get("event_id") in ok_ids or any(i in str(line) for i in ok_ids)]
    assert not [line for line in lines if line["level"] == "debug"]


def test_debug_lines_are_known_to_be_off_at_info_level() -> None:
    # The forwarder skips building its per-event debug line when debug is off; it must still log
    # it when an operator turns debug on.
    from relay import logs

    suite = structlog.get_config()
    try:
        logs.configure_logging("info", "console")
        assert logs.debug_enabled() is False
        logs.configure_logging("debug", "console")
        assert logs.debug_enabled() is True
    finally:
        configure_test_logging()  # what the suite runs with (the debug flag, the stdlib handler)
        # and the very processor list that loggers already used hold (tests.ocpi_peer.captured_logs wraps it)
        structlog.configure(**suite)
