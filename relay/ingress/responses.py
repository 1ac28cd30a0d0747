"""Answers in the shape of the OCPI envelope, so a CSMS written for OCPI receivers reads them."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec
from aiohttp import web

from relay.errors import InvalidEvent, Problem

_enc = msgspec.json.Encoder()

# OCPI status codes for the ingress's own answers (the HTTP status carries the same meaning).
OCPI_OK = 1000
OCPI_CLIENT_ERROR = 2001
OCPI_SERVER_ERROR = 3000


class Answer(msgspec.Struct, kw_only=True, omit_defaults=True):
    """OCPI response envelope plus the relay's problem list."""

    status_code: int
    timestamp: str
    status_message: str | None = None
    data: Any = None
    errors: list[Problem] | None = None


def now_iso() -> str:
    """OCPI DateTime, UTC, second precision."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def json_response(status: int, answer: Answer, headers: dict[str, str] | None = None) -> web.Response:
    """Encode with msgspec; aiohttp's json_response would use the slower stdlib json."""
    return web.Response(status=status, body=_enc.encode(answer), content_type="application/json", headers=headers)


def accepted(data: Any) -> web.Response:
    """202: the event is durable in Redis."""
    return json_response(202, Answer(status_code=OCPI_OK, status_message="Accepted", timestamp=now_iso(), data=data))


def refused(exc: InvalidEvent) -> web.Response:
    """4xx naming each field and rule."""
    first = exc.problems[0]
    return json_response(
        exc.status,
        Answer(
            status_code=OCPI_CLIENT_ERROR,
            status_message=f"{first.field}: {first.message}",
            timestamp=now_iso(),
            errors=exc.problems,
        ),
    )


def unavailable(message: str, retry_after_s: int = 1) -> web.Response:
    """503 with Retry-After: nothing was stored, the CSMS should send again."""
    return json_response(
        503,
        Answer(status_code=OCPI_SERVER_ERROR, status_message=message, timestamp=now_iso()),
        headers={"Retry-After": str(retry_after_s)},
    )
