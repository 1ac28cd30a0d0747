"""The parts of ``relay doctor`` that need neither Redis nor the IOP: the Check and Report records, the
configuration, operator and certificate checks, and the HTTP probes the network checks use (relay.doctor)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import ipaddress
import os
import re
import ssl
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp
import msgspec

from relay import urls
from relay.config import Settings, load
from relay.errors import ConfigError

Status = Literal["ok", "warn", "fail", "skip"]
CLOCK_WARN_S = 5.0
CLOCK_FAIL_S = 60.0
CERT_WARN_DAYS = 30
DEFAULT_TIMEOUT_S = 5.0
_MAX_BODY = 256 * 1024  # a versions answer is a few hundred bytes
_EXAMPLE_OPERATOR = (("FR", "AB1"), "Example CPO")  # config/relay.toml's


@dataclass(frozen=True, slots=True)
class Check:
    """One line of the checklist: which check, its result, what was found, and what to do about it."""

    name: str
    status: Status
    found: str
    hint: str = ""


@dataclass(slots=True)
class Report:
    """Every check's result; ``config_valid`` False when the configuration did not load (nothing else checked)."""

    checks: list[Check]
    config_valid: bool = True

    def count(self, status: Status) -> int:
        return sum(c.status == status for c in self.checks)

    @property
    def exit_code(self) -> int:
        """0: nothing failed (warnings allowed); 1: a check failed; 2: the configuration is invalid."""
        if not self.config_valid:
            return 2
        return 1 if self.count("fail") else 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.exit_code == 0,
            "failed": self.count("fail"),
            "warnings": self.count("warn"),
            "checks": [{"check": c.name, "status": c.status, "found": c.found, "hint": c.hint} for c in self.checks],
        }

    def lines(self) -> list[str]:
        """The checklist as text: one line per check, its hint indented below it."""
        label = {"ok": "ok", "warn": "warn", "fail": "FAIL", "skip": "skip"}
        width = max((len(c.name) for c in self.checks), default=0)
        out: list[str] = []
        for c in self.checks:
            out.append(f"{label[c.status]:<5} {c.name:<{width}}  {c.found}")
            if c.hint and c.status != "ok":
                out.append(f"{'':<5} {'':<{width}}  → {c.hint}")
        summary = f"{self.count('fail')} failed, {self.count('warn')} warning(s), {self.count('ok')} ok"
        if skipped := self.count("skip"):
            summary += f", {skipped} not checked"
        out.append(summary)
        return out


def tail(token: str) -> str:
    """How a token is shown: its last four characters at most (nothing of a short one)."""
    return f"…{token[-4:]}" if len(token) >= 12 else "…"


def scrubber(values: Iterable[str]) -> Callable[[str], str]:
    """Replace each secret (and its base64, as OCPI sends tokens) wherever it appears."""
    found: set[str] = set()
    for v in values:
        if len(v) >= 6:
            found |= {v, base64.b64encode(v.encode()).decode()}
    ordered = sorted(found, key=len, reverse=True)

    def scrub(text: str) -> str:
        for v in ordered:
            text = text.replace(v, "[redacted]")
        return text

    return scrub


def when(at: dt.datetime) -> str:
    return at.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- 1. configuration ------------------------------------------------------------------------------------


def check_config(
    config_path: Path | None, source: str = "", env: Mapping[str, str] | None = None
) -> tuple[Settings | None, list[Check]]:
    """Load the configuration as ``relay serve`` does (``config_path``, then RELAY_* env); weak settings as warnings.

    ``source``: how the file was found, for the message (the CLI's ``find_config``)."""
    from relay.config_checks import config_warnings

    env = {k: v for k, v in (os.environ if env is None else env).items() if k != "RELAY_CONFIG"}
    source = source or (str(config_path) if config_path else "no file (defaults)")
    try:
        settings = load(config_path, env)
        if problems := settings.serve_problems():
            raise ConfigError(problems)
    except ConfigError as exc:
        return None, [Check("config", "fail", f"invalid ({source}): {'; '.join(exc.problems)}",
                            "fix each key named (`relay check-config` prints the effective values)")]  # fmt: skip
    rows = [Check("config", "ok", f"valid: {source} + RELAY_* env, as `relay serve` loads it")]
    # The public URL has checks of its own below (set, https, reachable): not repeated here.
    for w in config_warnings(settings, registering=False):
        rows.append(Check("config", "warn", f"{w.key} — {w.message}", w.hint))
    return settings, rows


# -- 8. operators ----------------------------------------------------------------------------------------


def check_operators(settings: Settings) -> list[Check]:
    """Each hosted operator with its eMI3 operator id (2 letters, optional ``*``, 3 letters or digits)."""
    if not settings.operators:
        hint = "list them in [[operators]] (country_code, party_id, name, emi3_id) or RELAY_OPERATORS_JSON"
        return [Check("operators", "fail", "none configured: every event would be refused", hint)]
    rows: list[Check] = []
    owner: dict[str, str] = {}
    for op in settings.operators:
        party = f"{op.country_code}/{op.party_id}"
        compact = op.emi3_id.replace("*", "")
        if not re.fullmatch(r"[A-Z]{2}\*?[A-Z0-9]{3}", op.emi3_id):
            rows.append(Check("operators", "fail", f"{party}: eMI3 id {op.emi3_id!r} is not CC*XXX or CCXXX",
                              "set emi3_id to the operator id its evse_ids begin with, e.g. FR*AB1"))  # fmt: skip
        elif compact in owner:
            rows.append(Check("operators", "fail", f"{party} and {owner[compact]} share the eMI3 id {op.emi3_id}: "
                              "their EVSE ids cannot be told apart",
                              "give each operator its own emi3_id (an eMI3 id belongs to one operator)"))  # fmt: skip
        elif compact[:2] != op.country_code:
            rows.append(Check("operators", "warn", f"{party}: eMI3 id {op.emi3_id} is not of country {op.country_code}",
                              "check it against the operator's eMI3 id registration (AFIREV in France)"))  # fmt: skip
        owner.setdefault(compact, party)
        if (op.key, op.name) == _EXAMPLE_OPERATOR:
            rows.append(Check("operators", "warn", f"{party} {op.name!r} is config/relay.toml's example operator",
                              "list your own operators in [[operators]] (or RELAY_OPERATORS_JSON)"))  # fmt: skip
    listed = ", ".join(f"{o.country_code}/{o.party_id} {o.name!r} (eMI3 {o.emi3_id})" for o in settings.operators)
    return [Check("operators", "ok", f"{len(settings.operators)} hosted: {listed}"), *rows]


# -- 7. certificates ---------------------------------------------------------------------------------------


def _names(cert: Any) -> tuple[list[str], list[str]]:
    """(DNS names, IP addresses) of a certificate's subjectAltName."""
    from cryptography import x509

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return [], []
    return san.get_values_for_type(x509.DNSName), [str(a) for a in san.get_values_for_type(x509.IPAddress)]


def _covers(dns: list[str], ips: list[str], host: str) -> bool:
    host = host.strip("[]").lower().rstrip(".")
    try:
        return str(ipaddress.ip_address(host)) in ips
    except ValueError:
        pass
    for name in (n.lower().rstrip(".") for n in dns):
        if name == host or (name.startswith("*.") and host.partition(".")[2] == name[2:] and "." in name[2:]):
            return True
    return False


def check_certificate(name: str, cert_file: str, key_file: str, now: dt.datetime, host: str = "") -> list[Check]:
    """A certificate file: readable, a PEM certificate, matching its key, valid at ``now`` and for a while yet;
    with ``host``, one of its names covers it."""
    from cryptography import x509

    try:
        data = Path(cert_file).read_bytes()
    except OSError as exc:
        return [Check(name, "fail", f"cannot read {cert_file}: {exc.strerror or exc}",
                      "fix the path or the file's permissions (the relay's user must read it)")]  # fmt: skip
    try:
        leaf = x509.load_pem_x509_certificates(data)[0]
    except ValueError as exc:
        return [Check(name, "fail", f"{cert_file} holds no PEM certificate ({exc})",
                      "give the certificate chain in PEM, the server's certificate first")]  # fmt: skip
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert_file, key_file or None)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH" or "mismatch" in str(exc).lower():
            return [Check(name, "fail", f"{cert_file} does not match its key {key_file}",
                          "give the key the certificate was issued for (or the certificate of this key)")]  # fmt: skip
        return [Check(name, "fail", f"{cert_file} with {key_file} cannot be loaded: {exc.reason or exc}",
                      "a PEM certificate chain and its unencrypted PEM private key")]  # fmt: skip
    except OSError as exc:
        return [Check(name, "fail", f"cannot read the key {key_file}: {exc.strerror or exc}",
                      "fix the path or the file's permissions (the relay's user must read it)")]  # fmt: skip
    subject = leaf.subject.rfc4514_string() or "(no subject)"
    start, end = leaf.not_valid_before_utc, leaf.not_valid_after_utc
    if now < start:
        return [Check(name, "fail", f"{subject}: not valid before {when(start)}",
                      "check the host clock, or install a certificate valid now")]  # fmt: skip
    if now >= end:
        return [Check(name, "fail", f"{subject}: expired on {when(end)}",
                      "renew it (and reload the relay: it reads the certificate at start)")]  # fmt: skip
    days = (end - now).days
    dns, ips = _names(leaf)
    found = f"{subject}, names {', '.join(dns + ips) or 'none'}, valid until {when(end)} ({days} days)"
    rows = [Check(name, "ok", found)]
    if days < CERT_WARN_DAYS:
        rows = [Check(name, "warn", f"{found}: expires within {CERT_WARN_DAYS} days",
                      "renew it now (and restart the relay: it reads the certificate at start)")]  # fmt: skip
    if host and not _covers(dns, ips, host):
        rows.append(Check(name, "warn", f"its names ({', '.join(dns + ips) or 'none'}) do not cover {host}",
                          "the IOP checks the name of public_url's host: issue the certificate for it"))  # fmt: skip
    return rows


# -- HTTP ------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Answer:
    status: int
    headers: Mapping[str, str]
    body: bytes
    sent: float
    received: float

    def envelope(self) -> dict[str, Any] | None:
        try:
            data = msgspec.json.decode(self.body)
        except msgspec.DecodeError:
            return None
        return data if isinstance(data, dict) and isinstance(data.get("status_code"), int) else None


async def get(url: str, headers: dict[str, str], timeout_s: float, tls: ssl.SSLContext) -> Answer:
    """One GET, no redirects followed, the body capped; raises aiohttp.ClientError or TimeoutError."""
    timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=timeout_s)
    connector = aiohttp.TCPConnector(ssl=tls)
    accept = {"Accept-Encoding": urls.ACCEPT_ENCODING}
    async with (
        asyncio.timeout(timeout_s + 1.0),  # a backstop: aiohttp's own timeout covers the request
        aiohttp.ClientSession(timeout=timeout, connector=connector, auto_decompress=False, headers=accept) as http,
    ):
        sent = time.time()
        async with http.get(url, headers=headers, allow_redirects=False) as resp:
            received = time.time()
            body = await urls.read_capped(resp, _MAX_BODY)
            return Answer(resp.status, resp.headers, body, sent, received)


async def peer_certificate(url: str, tls: ssl.SSLContext, timeout_s: float) -> dict[str, Any]:
    """The certificate an https server presents (verified with ``tls``), as ``SSLSocket.getpeercert()`` decodes it."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    async with asyncio.timeout(timeout_s):
        _, writer = await asyncio.open_connection(host, parts.port or 443, ssl=tls, server_hostname=host)
    try:
        cert: dict[str, Any] = writer.get_extra_info("peercert") or {}
        return cert
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(timeout_s):
                await writer.wait_closed()


def failure(exc: BaseException, timeout_s: float) -> str:
    """Why a GET got no answer, in a few words."""
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout_s:g} s"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return f"its certificate is not trusted: {exc.certificate_error}"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect: {exc.os_error.strerror or exc.os_error}"
    return f"{exc.__class__.__name__}: {exc}"


def client_certificate_refused(exc: BaseException) -> bool:
    """Whether a GET failed the way a listener asking for a client certificate (mTLS) refuses one without: in
    or right after the TLS handshake (not a refused connection, nor a server certificate not trusted)."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return False
    if isinstance(exc, aiohttp.ClientSSLError | aiohttp.ServerDisconnectedError):
        return True
    return isinstance(exc, aiohttp.ClientOSError) and not isinstance(exc, aiohttp.ClientConnectorError)


def request_id() -> str:
    return os.urandom(16).hex()


def ocpi_said(env: dict[str, Any] | None) -> str:
    if env is None:
        return ""
    message = str(env.get("status_message") or "")[:120]
    return f", OCPI {env['status_code']}" + (f" {message!r}" if message else "")
