"""Every row of the delivery decisions after ``classify`` (relay.policy: pure, no I/O)."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from relay import policy
from relay.config import ForwarderSettings
from relay.policy import Attempts
from relay.retry import Kind, Outcome, backoff_s, classify

CFG = ForwarderSettings(backoff_initial_s=1.0, backoff_max_s=8.0)
DELIVERED = Outcome(Kind.DELIVERED, "ok", http_status=200, ocpi_code=1000)
TRANSIENT = Outcome(Kind.TRANSIENT, "OCPI 3000: busy", http_status=200, ocpi_code=3000, ocpi_message="busy")
TIMEOUT = Outcome(Kind.TRANSIENT, "timeout", link=True)
THROTTLED = Outcome(Kind.TRANSIENT, "http 429", http_status=429, retry_after_s=30.0, link=True)
SOON = Outcome(Kind.TRANSIENT, "http 503", http_status=503, retry_after_s=0.5, link=True)
PERMANENT = Outcome(Kind.PERMANENT, "OCPI 2001: invalid", http_status=200, ocpi_code=2001, ocpi_message="invalid")
UNKNOWN = Outcome(Kind.PERMANENT, "OCPI 2003: unknown location", http_status=404, ocpi_code=2003,
                  ocpi_message="unknown location", unknown_object=True)  # fmt: skip
AUTH = Outcome(Kind.AUTH, "http 401: token refused", http_status=401)
UNKNOWN_RECEIVER = classify(200, {}, b'{"status_code": 4001, "status_message": "Unknown receiver FR*107"}')
NOT_CONFIGURED = Outcome(Kind.AUTH, "no IOP endpoint for locations")  # delivery's, before anything is sent
HEALING = policy.healing(UNKNOWN)
PARKED = policy.parked_behind("1700000000000-0")
EXPIRED = policy.expired_outcome(TRANSIENT, 0.5)


# -- what follows an outcome ------------------------------------------------------------------------

# (id, outcome, settled, retries, counts as a retry)
KINDS = [
    ("delivered", DELIVERED, True, False, False),
    ("transient", TRANSIENT, False, True, True),
    ("transient link failure", TIMEOUT, False, True, True),
    ("permanent", PERMANENT, True, False, False),
    ("auth: waits for the operator, burns no retry", AUTH, False, True, False),
    ("unknown receiver: waits like auth", UNKNOWN_RECEIVER, False, True, False),
    ("healing: a PUT follows, not a retry", HEALING, False, True, False),
    ("parked behind a dead letter", PARKED, True, False, False),
    ("expired", EXPIRED, True, False, False),
]


@pytest.mark.parametrize(("outcome", "settled", "retries", "counts"), [r[1:] for r in KINDS], ids=[r[0] for r in KINDS])
def test_what_follows_an_outcome(outcome: Outcome, settled: bool, retries: bool, counts: bool) -> None:
    assert policy.settled(outcome) is settled
    assert policy.retries(outcome) is retries
    assert policy.counts_as_retry(outcome) is counts


# (id, outcome, attempt number, lowest wait, highest wait): backoff 1 s doubling up to 8 s
WAITS = [
    ("auth: no wait, the link holds the next attempt", AUTH, 3, 0.0, 0.0),
    ("unknown receiver: no wait either", UNKNOWN_RECEIVER, 2, 0.0, 0.0),
    ("healing: the PUT goes at once", HEALING, 1, 0.0, 0.0),
    ("first retry: up to initial", TRANSIENT, 1, 0.0, 1.0),
    ("third: up to 4x initial", TIMEOUT, 3, 0.0, 4.0),
    ("tenth: capped at max", TRANSIENT, 10, 0.0, 8.0),
    ("Retry-After above the cap wins", THROTTLED, 1, 30.0, 30.0),
    ("Retry-After is a floor under the jitter", SOON, 2, 0.5, 2.0),
]


@pytest.mark.parametrize(("outcome", "attempt", "lo", "hi"), [r[1:] for r in WAITS], ids=[r[0] for r in WAITS])
def test_next_wait(outcome: Outcome, attempt: int, lo: float, hi: float) -> None:
    rng = random.Random(7)
    for _ in range(200):
        assert lo <= policy.next_wait_s(outcome, attempt, CFG, rng) <= hi


def test_next_wait_is_the_jittered_backoff_curve() -> None:
    got = policy.next_wait_s(SOON, 4, CFG, random.Random(3))
    assert got == backoff_s(4, 1.0, 8.0, 0.5, random.Random(3))


# (id, received_at, now, max_age_s, expired)
AGES = [
    ("max_age_s 0: never expires", 0.0, 1e9, 0.0, False),
    ("younger than max_age_s", 100.0, 100.5, 1.0, False),
    ("exactly max_age_s old", 100.0, 101.0, 1.0, False),
    ("older than max_age_s", 100.0, 101.01, 1.0, True),
    ("clock behind the ingress", 100.0, 99.0, 1.0, False),
]


@pytest.mark.parametrize(("received", "now", "max_age", "want"), [r[1:] for r in AGES], ids=[r[0] for r in AGES])
def test_expired(received: float, now: float, max_age: float, want: bool) -> None:
    assert policy.expired(received, now, max_age) is want


def test_an_expired_outcome_keeps_the_last_answer() -> None:
    assert EXPIRED == Outcome(Kind.PERMANENT, "expired after 0.5s: OCPI 3000: busy", http_status=200, ocpi_code=3000,
                              ocpi_message="busy", expired=True)  # fmt: skip
    assert not EXPIRED.parked and not EXPIRED.healing


# -- parking ----------------------------------------------------------------------------------------

CONTINUE = ForwarderSettings()
PARK = ForwarderSettings(on_permanent="park")
PARK_LOCATIONS = ForwarderSettings(park_modules=["locations"])

# (id, outcome, module, settings, parks)
PARKS = [
    ("continue: a permanent failure does not park", PERMANENT, "locations", CONTINUE, False),
    ("on_permanent=park", PERMANENT, "locations", PARK, True),
    ("park_modules lists the module", PERMANENT, "locations", PARK_LOCATIONS, True),
    ("park_modules lists another module", PERMANENT, "sessions", PARK_LOCATIONS, False),
    ("an expired event parks too", EXPIRED, "cdrs", PARK, True),
    ("an unknown object that was not healed parks", UNKNOWN, "locations", PARK, True),
    ("parked behind a dead letter: parks nothing anew", PARKED, "locations", PARK, False),
    ("parked behind, park_modules", PARKED, "locations", PARK_LOCATIONS, False),
    ("delivered", DELIVERED, "locations", PARK, False),
    ("transient", TRANSIENT, "locations", PARK, False),
    ("auth", AUTH, "locations", PARK, False),
    ("unknown receiver: no dead letter, nothing parks", UNKNOWN_RECEIVER, "locations", PARK, False),
]


@pytest.mark.parametrize(("outcome", "module", "cfg", "want"), [r[1:] for r in PARKS], ids=[r[0] for r in PARKS])
def test_parks(outcome: Outcome, module: str, cfg: ForwarderSettings, want: bool) -> None:
    assert policy.parks(outcome, module, cfg) is want


def test_parked_behind() -> None:
    assert PARKED == Outcome(Kind.PERMANENT, "parked behind dead letter 1700000000000-0", parked=True)


# -- the link --------------------------------------------------------------------------------------

# (id, outcome, the state the link stops in)
LINK_STOPS = [
    ("401: the token", AUTH, "auth_failed"),
    ("403: the token", classify(403, {}, b"Forbidden"), "auth_failed"),
    ("OCPI 4001: the OCPI-to-* party", UNKNOWN_RECEIVER, "unknown_receiver"),
    ("OCPI 4001 in a 404", classify(404, {}, b'{"status_code": 4001}'), "unknown_receiver"),
    ("no endpoint or token: already paused", NOT_CONFIGURED, None),
    ("delivered", DELIVERED, None),
    ("transient link failure", TIMEOUT, None),
    ("permanent", PERMANENT, None),
    ("hub timeout 4002: one event's receiver", classify(200, {}, b'{"status_code": 4002}'), None),
]


@pytest.mark.parametrize(("outcome", "want"), [r[1:] for r in LINK_STOPS], ids=[r[0] for r in LINK_STOPS])
def test_link_stop(outcome: Outcome, want: str | None) -> None:
    assert policy.link_stop(outcome) == want


# -- healing ----------------------------------------------------------------------------------------


def answer(status: int, code: int) -> Outcome:
    return classify(status, {}, json.dumps({"status_code": code, "status_message": "Unknown EVSE 3256"}).encode())


# (id, outcome, method, already healed, heal_patches, heal wanted)
HEALS = [
    ("PATCH of an unknown object", UNKNOWN, "PATCH", False, True, True),
    ("healing turned off", UNKNOWN, "PATCH", False, False, False),
    ("already healed once", UNKNOWN, "PATCH", True, True, False),
    ("a PUT already carries the whole object", UNKNOWN, "PUT", False, True, False),
    ("a POST (CDR)", UNKNOWN, "POST", False, True, False),
    ("another permanent failure", PERMANENT, "PATCH", False, True, False),
    ("delivered", DELIVERED, "PATCH", False, True, False),
    ("404 without OCPI body", classify(404, {}, b"not found"), "PATCH", False, True, True),
    # L5, decided: a 404 with any client error (2xxx) is "the object is not there" (retry._unknown_object).
    ("404 + 2001", answer(404, 2001), "PATCH", False, True, True),
    ("404 + 2000", answer(404, 2000), "PATCH", False, True, True),
    ("404 + custom 2901", answer(404, 2901), "PATCH", False, True, True),
    ("400 + 2003 unknown location", answer(400, 2003), "PATCH", False, True, True),
    ("200 + 2001: a fault in the data, whatever the message", answer(200, 2001), "PATCH", False, True, False),
    ("404 + 2001 to a PUT", answer(404, 2001), "PUT", False, True, False),
    ("404 + 3000: transient, retried", answer(404, 3000), "PATCH", False, True, False),
    ("404 + 4001: the link, not the object", answer(404, 4001), "PATCH", False, True, False),
]


@pytest.mark.parametrize(
    ("outcome", "method", "healed", "enabled", "want"), [r[1:] for r in HEALS], ids=[r[0] for r in HEALS]
)
def test_heal_wanted(outcome: Outcome, method: str, healed: bool, enabled: bool, want: bool) -> None:
    assert policy.heal_wanted(outcome, method, already_healed=healed, enabled=enabled) is want


def test_healing_keeps_the_answer_and_retries_at_once() -> None:
    assert HEALING == Outcome(Kind.TRANSIENT, policy.HEALING_REASON, http_status=404, ocpi_code=2003,
                              ocpi_message="unknown location", healing=True)  # fmt: skip
    assert not HEALING.unknown_object and not HEALING.link


def test_classify_sets_no_policy_flag() -> None:
    answers: list[tuple[int | None, bytes | None, BaseException | None]] = [
        (200, b'{"status_code": 1000}', None), (404, b'{"status_code": 2003}', None), (503, None, None),
        (401, None, None), (None, None, TimeoutError()), (302, None, None),
    ]  # fmt: skip
    for status, body, exc in answers:
        o = classify(status, {}, body, exc=exc)
        assert not (o.healing or o.parked or o.expired), (status, body, exc)


# -- the dead letter --------------------------------------------------------------------------------

TRIED = Attempts(count=3, first_at=1000.0, last_at=1004.5, last=TRANSIENT)
ONCE = Attempts(count=1, first_at=1000.0, last_at=1000.0, last=PERMANENT)

# (id, outcome, attempts, record)
RECORDS: list[tuple[str, Outcome, Attempts, dict[str, Any]]] = [
    ("permanent answer", PERMANENT, ONCE, {
        "kind": "permanent", "reason": "OCPI 2001: invalid", "http_status": 200, "ocpi_code": 2001,
        "ocpi_message": "invalid", "attempts": 1, "first_attempt_at": 1000.0, "last_attempt_at": 1000.0,
        "dead_at": 2000.0, "unknown_object": False, "replica": "r1",
    }),
    ("unknown object (not healed)", UNKNOWN, ONCE, {
        "kind": "permanent", "reason": "OCPI 2003: unknown location", "http_status": 404, "ocpi_code": 2003,
        "ocpi_message": "unknown location", "attempts": 1, "first_attempt_at": 1000.0, "last_attempt_at": 1000.0,
        "dead_at": 2000.0, "unknown_object": True, "replica": "r1",
    }),
    ("expired: kind permanent", EXPIRED, TRIED, {
        "kind": "permanent", "reason": "expired after 0.5s: OCPI 3000: busy", "http_status": 200, "ocpi_code": 3000,
        "ocpi_message": "busy", "attempts": 3, "first_attempt_at": 1000.0, "last_attempt_at": 1004.5,
        "dead_at": 2000.0, "unknown_object": False, "replica": "r1",
    }),
    ("parked: never attempted", PARKED, Attempts(), {
        "kind": "parked", "reason": "parked behind dead letter 1700000000000-0", "http_status": None,
        "ocpi_code": None, "ocpi_message": None, "attempts": 0, "first_attempt_at": None, "last_attempt_at": None,
        "dead_at": 2000.0, "unknown_object": False, "replica": "r1",
    }),
]  # fmt: skip


@pytest.mark.parametrize(("outcome", "attempts", "want"), [r[1:] for r in RECORDS], ids=[r[0] for r in RECORDS])
def test_dead_letter_record(outcome: Outcome, attempts: Attempts, want: dict[str, Any]) -> None:
    got = policy.dead_letter_record(outcome, attempts, 2000.0, "r1")
    assert got == want
    assert list(got) == list(want)  # the field order of the stored record stays as it was
