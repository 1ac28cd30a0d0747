"""structlog set-up: JSON lines (or console), and a processor that redacts secrets."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any

import structlog

REDACTED = "[redacted]"
_DEFAULT_SECRET_KEYS = frozenset({"token", "authorization", "password", "secret", "token_a", "token_b", "token_c"})
_AUTH_RE = re.compile(r"(?i)\b(token|bearer|basic)\s+[A-Za-z0-9+/=._~-]{4,}")


class Redactor:
    """Replaces values of secret-named keys, and credentials inside strings, before rendering."""

    def __init__(self, extra_keys: Iterable[str] = ()) -> None:
        self.keys = _DEFAULT_SECRET_KEYS | {k.lower() for k in extra_keys}

    def _clean(self, value: Any) -> Any:
        if isinstance(value, str):
            return _AUTH_RE.sub(lambda m: f"{m.group(1)} {REDACTED}", value)
        if isinstance(value, dict):
            return {k: REDACTED if str(k).lower() in self.keys else self._clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._clean(v) for v in value]
        return value

    def __call__(self, _: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        for k, v in list(event_dict.items()):
            event_dict[k] = REDACTED if k.lower() in self.keys else self._clean(v)
        return event_dict


def configure_logging(level: str = "info", fmt: str = "json", redact: Iterable[str] = ()) -> None:
    """Configure structlog (and stdlib logging for aiohttp's own messages) once per process."""
    lvl = logging.getLevelName(level.upper())
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            Redactor(redact),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(lvl),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=max(lvl, logging.WARNING), stream=sys.stderr, format="%(name)s %(levelname)s %(message)s")
