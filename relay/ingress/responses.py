"""Answers in the shape of the OCPI envelope, so a CSMS written for OCPI receivers reads them."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import msgspec
from aiohttp import web
from multidict import CIMultiDict

from relay.envelope import OCPI_CLIENT_ERROR, OCPI_OK, OCPI_SERVER_ERROR, Answer, iso_second, json_response, now_iso
from relay.errors import InvalidEvent, Problem

__all__ = ["Answer", "accepted", "accepted_event", "json_response", "now_iso", "refused", "unavailable"]

_enc = msgspec.json.Encoder()
FULL_RETRY_S = 5  # Retry-After while Redis is at its maxmemory: room comes back as the backlog drains
_JSON = CIMultiDict({"Content-Type": "application/json"})  # copied by each Response (aiohttp adds to it)
_head: list[Any] = [0, b""]  # (second, the accepted answer up to its event id, timestamp included)


def accepted(data: Any) -> web.Response:
    """202: the event is durable in Redis."""
    return json_response(202, Answer(status_code=OCPI_OK, status_message="Accepted", timestamp=now_iso(), data=data))


def accepted_event(
    event_id: str, warnings: Sequence[Problem] | None, unknown_object: bool = False, *,
    duplicate: bool = False, replayed: bool = False,
) -> web.Response:  # fmt: skip
    """``accepted({"event_id": ..., "warnings": ..., ["unknown_object": true], ["duplicate": true],
    ["replayed": true]})``, byte for byte, without building the envelope per request: the part before the id is
    encoded once a second. ``duplicate``: nothing stored, the object already was this; ``replayed``: the answer
    kept for the request's Idempotency-Key, nothing stored."""
    second = int(time.time())
    if second != _head[0]:
        answer = _enc.encode(
            Answer(status_code=OCPI_OK, status_message="Accepted", timestamp=iso_second(second), data={})
        )
        _head[0], _head[1] = second, answer[:-2] + b'"event_id":'  # strip "}}" of the empty data
    body = b"".join((
        _head[1], _enc.encode(event_id), b',"warnings":', _enc.encode(warnings),
        b',"unknown_object":true' if unknown_object else b"", b',"duplicate":true' if duplicate else b"",
        b',"replayed":true' if replayed else b"", b"}}",
    ))  # fmt: skip
    return web.Response(status=202, body=body, headers=_JSON)


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
    """503 with Retry-After: nothing was stored, the CSMS should send again (Redis away, or full: FULL_RETRY_S)."""
    return json_response(
        503,
        Answer(status_code=OCPI_SERVER_ERROR, status_message=message, timestamp=now_iso()),
        headers={"Retry-After": str(retry_after_s)},
    )
