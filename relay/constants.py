"""HTTP header names of OCPI and the relay, in one place (Redis key names live in relay.store.keys)."""

from __future__ import annotations

H_CORRELATION = "X-Correlation-ID"
H_REQUEST = "X-Request-ID"
H_FROM_CC = "OCPI-from-country-code"
H_FROM_PID = "OCPI-from-party-id"
H_TO_CC = "OCPI-to-country-code"
H_TO_PID = "OCPI-to-party-id"
