"""structlog set-up: JSON lines (or console), and a processor that redacts secrets.

Every line, the relay's own and those of the libraries that log through the standard library
(aiohttp, asyncio), goes through the same chain: level, UTC timestamp, redaction, renderer.

Redaction, in this order, on every value of every event (nested dicts and lists too):
- the value of a key named like a secret (``token``, ``authorization``, ``password``, ``*_token``,
  ``*_secret``… and ``log.redact_fields``) is replaced whole;
- inside strings: ``Token x``, ``Bearer x``, ``Basic x``, ``token=x``, ``"token": "x"``, and the
  password of a URL (``rediss://user:x@host``); not the relay's own words: ``token refused``,
  ``token unknown to the relay``, ``authorization: missing`` are prose, left as they are (``_prose``);
- inside strings: the secret values themselves (and their base64, as OCPI 2.2.1 sends tokens),
  registered with ``add_secrets()`` from the settings at start, whatever the text around them.
"""

from __future__ import annotations

import base64
import logging
import re
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any, TextIO
from urllib.parse import parse_qs, unquote, urlsplit

import msgspec
import structlog

REDACTED = "[redacted]"
_DEFAULT_SECRET_KEYS = frozenset(
    {
        "token", "authorization", "proxy-authorization", "password", "passwd", "secret", "client_secret",
        "api_key", "apikey", "x-api-key", "cookie", "set-cookie", "token_a", "token_b", "token_c",
        "incoming_token", "outgoing_token",
    }
)  # fmt: skip
_SECRET_SUFFIXES = ("_token", "-token", "_secret", "-secret", "_password")
_AUTH_RE = re.compile(r"(?i)\b(token|bearer|basic)\s+([A-Za-z0-9+/=._~-]{4,})")
# token=…, "token": "…", authorization: … inside a message (a logged URL, a quoted JSON body).
_PAIR_RE = re.compile(
    r"""(?i)(["']?\b(?:token|token_[abc]|authorization|password|secret|api_key)["']?\s*[:=]\s*["']?)"""
    r"""(?!(?:token|bearer|basic)\s)([^"'\s,;&}]+)"""
)
_URL_PASSWORD_RE = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^/\s:@]*:)[^/\s@]+@")
_MIN_SECRET_LEN = 6  # shorter values would redact ordinary words
_secret_values: set[str] = set()
_secret_re: re.Pattern[str] | None = None

# The relay's own words after "token", "bearer", "basic" or "authorization:" ("http 401: token refused",
# "token unknown to the relay", "a bearer token", "authorization: missing"): prose, not a credential. Only the
# words listed: anything else after a scheme is redacted, also a value of lower-case letters alone (and the
# secrets the relay knows are replaced by value anyway, whatever their shape).
_WORDS = frozenset(
    {
        "refused", "rejected", "unknown", "missing", "invalid", "expired", "required", "revoked", "denied",
        "accepted", "allowed", "blocked", "wrong", "mismatch", "absent", "empty", "unset", "none", "null",
        "given", "sent", "stored", "spent", "used", "valid", "changed", "rotated", "received",
        "token", "tokens", "auth", "authentication", "authorization", "credentials", "realm", "scheme", "header",
    }
)  # fmt: skip


def _prose(scheme: str, value: str) -> bool:
    """Whether ``value``, after ``scheme`` (token, bearer, basic, or a pair's key), is a word, not a secret."""
    # Only the listed words: a credential may be lower-case letters too (a passphrase, a rotated peer token).
    return value.lower() in _WORDS


def _auth_sub(m: re.Match[str]) -> str:
    scheme = m.group(1)
    return m.group(0) if _prose(scheme, m.group(2)) else f"{scheme} {REDACTED}"


def _pair_sub(m: re.Match[str]) -> str:
    if m.group(2).lower() in _WORDS and "=" not in m.group(1):  # a query string's value is one whatever it says
        return m.group(0)
    return m.group(1) + REDACTED


def is_secret_key(key: str, extra: frozenset[str] = frozenset()) -> bool:
    """A field whose whole value is a secret."""
    k = key.lower()
    return k in _DEFAULT_SECRET_KEYS or k in extra or k.endswith(_SECRET_SUFFIXES)


def add_secrets(values: Iterable[str]) -> None:
    """Never log these values (nor their base64) wherever they appear, from now on, process-wide."""
    global _secret_re
    added = False
    for value in values:
        for v in (value, base64.b64encode(value.encode()).decode()):
            if len(v) >= _MIN_SECRET_LEN and v not in _secret_values:
                _secret_values.add(v)
                added = True
    if added:
        # Longest first, so a value that contains another is replaced whole.
        alternatives = sorted(_secret_values, key=len, reverse=True)
        _secret_re = re.compile("|".join(re.escape(v) for v in alternatives))


def _url_password(value: str) -> str | None:
    try:
        parts = urlsplit(value)
        return parts.password or parse_qs(parts.query).get("password", [None])[0]
    except ValueError:
        return None


def settings_secrets(settings: object) -> list[str]:
    """Every secret value in the settings: fields named like secrets (tokens split on commas), URL passwords."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                if is_secret_key(str(k)) and isinstance(v, str) and v:
                    found.extend(t.strip() for t in v.split(",") if t.strip())
                elif isinstance(v, str) and "://" in v:
                    if password := _url_password(v):
                        found.extend({password, unquote(password)})  # as written in the URL, and as sent
                else:
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(msgspec.to_builtins(settings))
    return found


class Redactor:
    """Replaces values of secret-named keys, and credentials inside strings, before rendering."""

    def __init__(self, extra_keys: Iterable[str] = (), secrets: Iterable[str] = ()) -> None:
        self.extra = frozenset(k.lower() for k in extra_keys)
        add_secrets(secrets)

    def _clean(self, value: Any) -> Any:
        if isinstance(value, str):
            if _secret_re is not None:
                value = _secret_re.sub(REDACTED, value)
            value = _AUTH_RE.sub(_auth_sub, value)
            value = _URL_PASSWORD_RE.sub(lambda m: f"{m.group(1)}{REDACTED}@", value)
            return _PAIR_RE.sub(_pair_sub, value)
        if isinstance(value, dict):
            return {k: self._hide(str(k), v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._clean(v) for v in value]
        return value

    def _hide(self, key: str, value: Any) -> Any:
        # Flags and empty values named like secrets (accept_plain_token = true) reveal nothing.
        secret = is_secret_key(key, self.extra) and value not in (None, "") and not isinstance(value, bool)
        return REDACTED if secret else self._clean(value)

    def __call__(self, _: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        for k, v in list(event_dict.items()):
            event_dict[k] = self._hide(k, v)
        return event_dict


class _StdlibHandler(logging.StreamHandler[Any]):
    """Marks the handler configure_logging() installed, so a second call replaces it."""


_debug = True  # until configure_logging() says otherwise: structlog's default logs everything


def debug_enabled() -> bool:
    """Whether debug lines are written: hot paths skip building one that would be filtered out."""
    return _debug


def configure_logging(
    level: str = "info", fmt: str = "json", redact: Iterable[str] = (), stream: TextIO | None = None
) -> None:
    """Configure structlog (and stdlib logging for aiohttp's own messages) once per process.

    Lines go to ``stream``, bound now (default: ``sys.stderr`` as it is at this call). The tests pass
    ``sys.__stderr__``: pytest swaps ``sys.stderr`` for a capture file, and an interrupted run closes it
    before the session's last teardowns log. The renderer stays the last processor (tests wrap it in place
    to capture rendered lines).
    """
    global _debug
    out = stream if stream is not None else sys.stderr
    lvl = logging.getLevelName(level.upper())
    _debug = lvl <= logging.DEBUG
    renderer: Any = (
        structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    redactor = Redactor(redact)
    stamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            stamper,
            structlog.processors.format_exc_info,
            redactor,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=True,
    )
    # Libraries' stdlib records (warnings and up): same shape, same redaction, one line each.
    handler = _StdlibHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_log_level, structlog.stdlib.add_logger_name, stamper],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                redactor,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StdlibHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(max(lvl, logging.WARNING))
