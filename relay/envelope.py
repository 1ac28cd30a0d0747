"""The OCPI response envelope (``data``, ``status_code``, ``status_message``, ``timestamp``), for both listeners."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import msgspec
from aiohttp import web
from multidict import CIMultiDict

from relay.errors import Problem

_enc = msgspec.json.Encoder()
_JSON = CIMultiDict({"Content-Type": "application/json"})  # copied by each Response (aiohttp adds to it)

OCPI_OK = 1000
OCPI_CLIENT_ERROR = 2001
OCPI_SERVER_ERROR = 3000


class Answer(msgspec.Struct, kw_only=True, omit_defaults=True):
    """OCPI response envelope, plus the relay's problem list on refusals."""

    status_code: int
    timestamp: str
    status_message: str | None = None
    data: Any = None
    errors: list[Problem] | None = None


_NOW: list[Any] = [0, ""]


def iso_second(t: int) -> str:
    """An OCPI DateTime, UTC, of the epoch second ``t``."""
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def now_iso() -> str:
    """OCPI DateTime, UTC, second precision (formatted once per second)."""
    t = int(time.time())
    if t != _NOW[0]:
        _NOW[0], _NOW[1] = t, iso_second(t)
    return str(_NOW[1])


def json_response(status: int, answer: Answer, headers: dict[str, str] | None = None) -> web.Response:
    """Encode with msgspec; aiohttp's json_response would use the slower stdlib json."""
    if headers is None:
        return web.Response(status=status, body=_enc.encode(answer), headers=_JSON)
    return web.Response(status=status, body=_enc.encode(answer), content_type="application/json", headers=headers)


def ocpi(status: int, code: int, data: Any = None, message: str | None = None,
         headers: dict[str, str] | None = None) -> web.Response:  # fmt: skip
    """An OCPI answer with this HTTP status and OCPI status_code."""
    answer = Answer(status_code=code, status_message=message, timestamp=now_iso(), data=data)
    return json_response(status, answer, headers)
