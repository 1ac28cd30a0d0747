"""Answers in the shape of the OCPI envelope, so a CSMS written for OCPI receivers reads them."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from relay.envelope import OCPI_CLIENT_ERROR, OCPI_OK, OCPI_SERVER_ERROR, Answer, json_response, now_iso
from relay.errors import InvalidEvent

__all__ = ["Answer", "accepted", "json_response", "now_iso", "refused", "unavailable"]


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
