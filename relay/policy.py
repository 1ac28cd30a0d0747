"""What delivery does with an attempt's outcome: the decisions beside ``retry.classify``.

``classify`` says what an IOP answer means; these say what follows from it: whether to try again
and after how long, when an event has expired, when a key parks, when a PATCH is healed with a
PUT of the whole object, and what a dead letter records. They are pure (no I/O, no clock, no
randomness but an optional ``rng``) and every row is in ``tests/test_policy.py``;
``relay.delivery`` applies them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Literal

from relay.config import ForwarderSettings
from relay.retry import Kind, Outcome, backoff_s

HEALING_REASON = "healing: the IOP does not know the object; a PUT of the whole object follows"


@dataclass(slots=True)
class Attempts:
    """The attempts made for one entry so far: what its dead letter records."""

    count: int = 0
    first_at: float = 0.0  # wall clock of the first attempt, 0 before it
    last_at: float = 0.0
    last: Outcome | None = None
    heal: bool = False  # the IOP did not know the object: send a PUT of the whole object next
    request_id: str = ""  # the X-Request-ID of the last attempt ("" before one, or when none was sent)


def settled(outcome: Outcome) -> bool:
    """Delivered or permanent: no further attempt (acknowledge, or dead-letter)."""
    return outcome.kind is Kind.DELIVERED or outcome.kind is Kind.PERMANENT


def retries(outcome: Outcome) -> bool:
    """Whether another attempt follows.

    Failure policy: transient failures retry (until ``expired``); auth failures (401/403, OCPI 4001)
    retry too, their next attempt waiting in the link until it is resumed. Nothing else is retried.
    """
    return outcome.kind is Kind.TRANSIENT or outcome.kind is Kind.AUTH


def next_wait_s(
    outcome: Outcome, attempt_number: int, cfg: ForwarderSettings, rng: random.Random | None = None
) -> float:
    """Seconds before the attempt after ``attempt_number`` (1 = the first attempt) ended as ``outcome``.

    Failure policy: full-jitter exponential backoff between ``backoff_initial_s`` and
    ``backoff_max_s``, ``Retry-After`` as its floor. No wait after an auth failure (the next
    attempt waits in the link until it is resumed, and burns no retries) nor before a heal (the
    PUT follows at once).
    """
    if outcome.kind is Kind.AUTH or outcome.healing:
        return 0.0
    return backoff_s(attempt_number, cfg.backoff_initial_s, cfg.backoff_max_s, outcome.retry_after_s, rng)


def link_stop(outcome: Outcome) -> Literal["auth_failed", "unknown_receiver"] | None:
    """The link state an outcome stops the link in, or None when the link goes on.

    Failure policy: the IOP refusing the connection stops every attempt, not only this one, until
    an operator's ``relay link resume`` or a new registration: 401/403 (the token) → ``auth_failed``;
    OCPI 4001 (the hub does not know our OCPI-to-* party, so it knows none of our events' receiver) →
    ``unknown_receiver``. Nothing is dead-lettered for it: the event is retried once the link is back.
    An AUTH outcome without an answer (no endpoint or token yet) stops nothing here: the link was
    paused as the attempt found it.
    """
    if outcome.kind is not Kind.AUTH:
        return None
    if outcome.unknown_receiver:
        return "unknown_receiver"
    return "auth_failed" if outcome.http_status is not None else None


def counts_as_retry(outcome: Outcome) -> bool:
    """Whether the attempt that follows ``outcome`` counts in ``relay_retried_total``: a transient
    failure's, not an auth failure's (a wait for the operator) nor a heal's (a different request)."""
    return outcome.kind is Kind.TRANSIENT and not outcome.healing


def expired(received_at: float, now: float, max_age_s: float) -> bool:
    """Whether an event still failing transiently stops being retried.

    Failure policy: never while ``max_age_s`` is 0 (the default: transient failures wait for the
    IOP however long it takes); else once the event is older than ``max_age_s`` (ingress time).
    """
    return bool(max_age_s) and now - received_at > max_age_s


def expired_outcome(last: Outcome, max_age_s: float) -> Outcome:
    """The permanent outcome of an event that expired while ``last`` was its latest failure; the
    answer's status, code and message are kept for the dead letter."""
    return Outcome(
        Kind.PERMANENT, f"expired after {max_age_s}s: {last.reason}", http_status=last.http_status,
        ocpi_code=last.ocpi_code, ocpi_message=last.ocpi_message, expired=True,
    )  # fmt: skip


def parks(outcome: Outcome, module: str, cfg: ForwarderSettings) -> bool:
    """Whether dead-lettering ``outcome`` parks its key (its later events go to the DLQ unsent).

    Failure policy: a permanent failure (an expired event included) parks the key when
    ``on_permanent = "park"`` or its module is in ``park_modules``; otherwise the key continues
    with its next event. An event dead-lettered because its key is already parked parks nothing
    anew: the key stays parked behind its first dead letter.
    """
    if outcome.kind is not Kind.PERMANENT or outcome.parked:
        return False
    return cfg.on_permanent == "park" or module in cfg.park_modules


def heal_wanted(outcome: Outcome, method: str, *, already_healed: bool, enabled: bool) -> bool:
    """Whether a PATCH the IOP answered "unknown object" is healed with a PUT of the whole object.

    Failure policy: only a PATCH (a PUT already carries the whole object), only once per event,
    only with ``state.heal_patches`` on. The heal also needs the object's stored state, which
    costs a Redis read: ``Delivery`` asks for it only when this is true, and without it the
    answer stays a permanent failure.
    """
    return outcome.unknown_object and method == "PATCH" and not already_healed and enabled


def healing(answer: Outcome) -> Outcome:
    """The outcome of an attempt whose PATCH is healed: transient, retried at once as a PUT."""
    return Outcome(Kind.TRANSIENT, HEALING_REASON, http_status=answer.http_status, ocpi_code=answer.ocpi_code,
                   ocpi_message=answer.ocpi_message, healing=True)  # fmt: skip


def parked_behind(dead_id: str) -> Outcome:
    """The outcome of an event whose key is parked behind the dead letter ``dead_id``: not sent."""
    return Outcome(Kind.PERMANENT, f"parked behind dead letter {dead_id}", parked=True)


# The ``kind`` of a dead letter (dead_letter_record(); relay_events_dead_lettered_total{kind}).
DEAD_LETTER_KINDS = ("permanent", "parked")


def dead_letter_record(outcome: Outcome, attempts: Attempts, now: float, replica: str) -> dict[str, Any]:
    """What a dead letter records beside the event (``relay dlq`` shows it and filters on ``kind``).

    ``kind``: "parked" (behind a parked key's dead letter, never sent), else the outcome's kind
    ("permanent", an expired event included). Attempt times are None when no attempt was made.
    """
    return {
        "kind": "parked" if outcome.parked else outcome.kind.value,
        "reason": outcome.reason,
        "http_status": outcome.http_status,
        "ocpi_code": outcome.ocpi_code,
        "ocpi_message": outcome.ocpi_message,
        "attempts": attempts.count,
        "first_attempt_at": attempts.first_at or None,
        "last_attempt_at": attempts.last_at or None,
        "dead_at": now,
        "unknown_object": outcome.unknown_object,
        "replica": replica,
    }
