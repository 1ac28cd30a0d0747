"""What an IOP answer means for delivery, and the backoff curve between attempts.

``classify`` is pure: (HTTP status, headers, body, exception) → Outcome. Every row of the policy
is in ``tests/test_retry.py``. What delivery does with an Outcome (the wait before the next
attempt, expiry, parking, healing, the dead letter) is decided in ``relay.policy``.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from enum import StrEnum
from typing import Any

import aiohttp
import msgspec


class Kind(StrEnum):
    """The four things an attempt can end as.

    ``AUTH``: the IOP refuses the connection itself, not this event (401/403, OCPI 4001 unknown
    receiver): the link stops until it is resumed; the event waits, it is never dead-lettered for it.
    """

    DELIVERED = "delivered"
    TRANSIENT = "transient"
    PERMANENT = "permanent"
    AUTH = "auth"


@dataclass(frozen=True, slots=True)
class Outcome:
    """One attempt's result. ``link`` marks failures that say the IOP as a whole is unwell.

    ``classify`` sets the fields up to ``unknown_receiver``; the flags after it are set by the
    decisions of ``relay.policy`` (code checks them, never the wording of ``reason``).
    """

    kind: Kind
    reason: str
    http_status: int | None = None
    ocpi_code: int | None = None
    ocpi_message: str | None = None
    retry_after_s: float | None = None
    link: bool = False
    # The HTTP client refused to build or send the request (a header value or URL it cannot put on
    # the wire): nothing reached the IOP, so the outcome says nothing about the link either way.
    unsent: bool = False
    # The IOP does not know the object a PATCH addresses: a later issue heals with a full PUT.
    unknown_object: bool = False
    # OCPI 4001: the hub does not know the party of our OCPI-to-* headers (an AUTH outcome). Every
    # event goes to that party, so it is the connection that is wrong: the link stops (policy.link_stop).
    unknown_receiver: bool = False
    # A PUT of the whole object follows at once (policy.healing): no wait, not counted as a retry.
    healing: bool = False
    # Dead-lettered without an attempt, behind its parked key's dead letter (policy.parked_behind).
    parked: bool = False
    # Transient until max_age_s ran out, then permanent (policy.expired_outcome).
    expired: bool = False


class _Envelope(msgspec.Struct):
    status_code: int
    status_message: str | None = None


_envelope = msgspec.json.Decoder(_Envelope)
# OCPI 2xxx codes that mean "the receiver does not know this object" whatever the HTTP status (2003:
# unknown location; a PATCH for an object never PUT is answered like this by most receivers). With an
# HTTP 404 any 2xxx means it too (``_unknown_object``).
_UNKNOWN_OBJECT = {2003}
_TRANSIENT_HTTP = {408, 425, 429}
_TRANSIENT_HUB = {4002, 4003}  # hub: unknown/timeout at the receiving party's side


def retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """``Retry-After`` as seconds from now: delta-seconds or an HTTP date; None if absent or unparsable."""
    value = headers.get("Retry-After")
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


def _ocpi(body: bytes | None) -> _Envelope | None:
    if not body:
        return None
    try:
        return _envelope.decode(body)
    except msgspec.DecodeError:
        return None


def _snippet(body: bytes | None) -> str:
    return (body or b"")[:200].decode("utf-8", "replace")


def classify_exception(exc: BaseException) -> Outcome:
    """Timeouts and connection-level errors are transient and count against the link.

    A ValueError that is not one of those (aiohttp refusing a header value with a control character,
    a value it cannot encode, a URL it cannot parse; ``Event.url_path`` refusing an id) means the
    request never left: permanent, since the same event would be refused again, and ``unsent``, so
    the link is neither failed nor credited.
    """
    if isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        return Outcome(Kind.TRANSIENT, "timeout", link=True)
    if isinstance(exc, aiohttp.ClientSSLError):
        # A certificate problem will not fix itself by retrying fast, but an operator can fix
        # it without losing the event: keep it, count it against the link.
        return Outcome(Kind.TRANSIENT, f"tls: {exc}", link=True)
    if isinstance(exc, aiohttp.ClientConnectionError | aiohttp.ClientPayloadError | OSError):
        # DNS failures are connection errors too: transient (PITFALLS 3).
        return Outcome(Kind.TRANSIENT, f"connection: {exc.__class__.__name__}: {exc}", link=True)
    if isinstance(exc, ValueError):
        return Outcome(Kind.PERMANENT, f"refused by the HTTP client: {exc.__class__.__name__}: {exc}", unsent=True)
    return Outcome(Kind.TRANSIENT, f"client error: {exc.__class__.__name__}: {exc}", link=True)


_delivered: dict[tuple[int, int, str | None], Outcome] = {}


def _delivered_outcome(status: int, env: _Envelope) -> Outcome:
    """Outcomes are immutable and a receiver's success answers repeat: one object per distinct answer."""
    key = (status, env.status_code, env.status_message)
    found = _delivered.get(key)
    if found is None:
        if len(_delivered) >= 256:  # a receiver that puts a timestamp in its message: stay bounded
            _delivered.clear()
        found = _delivered[key] = Outcome(
            Kind.DELIVERED, "ok", http_status=status, ocpi_code=env.status_code, ocpi_message=env.status_message
        )
    return found


def _unknown_object(status: int, code: int) -> bool:
    """Whether a client error (2xxx) says the receiver does not know the object addressed.

    2003 says so in any answer. An HTTP 404 says so itself, and the 2xxx beside it (2000, 2001
    "invalid or missing parameters", a custom 29xx, …) only says the client is at fault: status_codes
    has no "unknown object" code for Locations, EVSEs, Sessions or Tariffs, so receivers pick one. The
    words of ``status_message`` are never read: they differ from one receiver to the next.
    """
    return code in _UNKNOWN_OBJECT or status == 404


def _by_ocpi_code(status: int, env: _Envelope, hint: float | None) -> Outcome:
    code, msg = env.status_code, env.status_message
    kw: dict[str, Any] = {"http_status": status, "ocpi_code": code, "ocpi_message": msg}
    if 1000 <= code < 2000:
        if 200 <= status < 300:
            return _delivered_outcome(status, env)
        # OCPI success in an HTTP error: the HTTP status is what GIREVE's rule looks at.
        return Outcome(Kind.TRANSIENT, f"http {status} with OCPI {code}", retry_after_s=hint, **kw)
    if 2000 <= code < 3000:
        reason = f"OCPI {code}: {msg or ''}".strip()
        return Outcome(Kind.PERMANENT, reason, unknown_object=_unknown_object(status, code), **kw)
    if 3000 <= code < 4000:
        return Outcome(Kind.TRANSIENT, f"OCPI {code}: {msg or ''}".strip(), retry_after_s=hint, **kw)
    if code == 4001:
        # The hub cannot route to our OCPI-to-* party: every other event would get the same answer.
        return Outcome(Kind.AUTH, f"OCPI 4001 unknown receiver: {msg or ''}".strip(), unknown_receiver=True, **kw)
    if 4000 <= code < 5000:
        return Outcome(Kind.TRANSIENT, f"OCPI {code}: {msg or ''}".strip(), retry_after_s=hint, link=code == 4000, **kw)
    return Outcome(Kind.PERMANENT, f"unknown OCPI status_code {code}", **kw)


def classify(
    status: int | None,
    headers: Mapping[str, str] | None = None,
    body: bytes | None = None,
    exc: BaseException | None = None,
) -> Outcome:
    """Decide delivered / transient / permanent / auth for one attempt.

    Failure policy:
    - no answer (timeout, refused, reset, DNS, TLS) → transient, counted against the link;
    - the HTTP client refusing the request (a ValueError: a header value or URL it cannot send)
      → permanent, not sent, the link left alone;
    - 401 and 403 → auth: the link pauses; retrying with the same token cannot succeed, and
      receivers answer 403 where 401 is meant, so both are treated alike;
    - 408, 425, 429, 5xx → transient (429 and 5xx also count against the link); Retry-After is
      the earliest next attempt;
    - otherwise the OCPI ``status_code`` in the body decides: 1xxx delivered (in a 2xx), 2xxx
      permanent (an unknown object with 2003, or with any 2xxx in a 404), 3xxx transient, 4001 auth
      (unknown receiver: the link stops, the event waits), other 4xxx transient;
    - a 2xx without an OCPI body is **delivered**: GIREVE's rule is "retry until HTTP 2xx", and
      resending an accepted update only risks duplicates;
    - a 4xx without an OCPI body (``{"detail": …}``, HTML) is permanent, with the body kept;
    - a 3xx left after the client's own redirect handling is permanent (misconfigured URL).
    """
    if exc is not None:
        return classify_exception(exc)
    assert status is not None
    if 200 <= status < 300 and body:  # the common case first: no Retry-After to read
        env = _ocpi(body)
        if env is not None and 1000 <= env.status_code < 2000:
            return _delivered_outcome(status, env)
    hdrs = headers or {}
    hint = retry_after(hdrs)
    if status in (401, 403):
        return Outcome(Kind.AUTH, f"http {status}: token refused", http_status=status)
    if status in _TRANSIENT_HTTP or status >= 500:
        env = _ocpi(body)
        return Outcome(
            Kind.TRANSIENT,
            f"http {status}" + (f" OCPI {env.status_code}" if env else ""),
            http_status=status,
            ocpi_code=env.status_code if env else None,
            ocpi_message=env.status_message if env else None,
            retry_after_s=hint,
            link=status == 429 or status >= 500,
        )
    env = _ocpi(body)
    if env is not None:
        return _by_ocpi_code(status, env, hint)
    if 200 <= status < 300:
        return Outcome(Kind.DELIVERED, "http 2xx without OCPI body", http_status=status)
    if 300 <= status < 400:
        return Outcome(Kind.PERMANENT, f"http {status}: redirect not followed", http_status=status)
    unknown = status == 404
    return Outcome(Kind.PERMANENT, f"http {status}: {_snippet(body)}", http_status=status, unknown_object=unknown)


def backoff_s(
    attempt: int, initial_s: float, max_s: float, floor_s: float | None = None, rng: random.Random | None = None
) -> float:
    """Exponential backoff with full jitter, capped; ``floor_s`` (Retry-After) is the minimum wait."""
    cap = min(max_s, initial_s * (2 ** max(0, attempt - 1)))
    wait = (rng or random).uniform(0, cap)
    if floor_s is not None:
        wait = max(wait, floor_s)
    return wait
