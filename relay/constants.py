"""HTTP header names of OCPI and the relay, in one place (Redis key names live in relay.store.keys), and what a
value the relay copies into a header of its own requests may be."""

from __future__ import annotations

H_CORRELATION = "X-Correlation-ID"
H_REQUEST = "X-Request-ID"
H_FROM_CC = "OCPI-from-country-code"
H_FROM_PID = "OCPI-from-party-id"
H_TO_CC = "OCPI-to-country-code"
H_TO_PID = "OCPI-to-party-id"

MAX_HEADER_VALUE = 255  # characters of a value received (X-Correlation-ID…) that the relay sends on in a header


def header_value_ok(value: str) -> bool:
    """A value that can go into an outgoing header as it is: printable ASCII (0x20-0x7E), at most
    MAX_HEADER_VALUE characters. Anything else would make the HTTP client refuse the request (control
    characters), or change on the way (non-ASCII)."""
    return len(value) <= MAX_HEADER_VALUE and value.isascii() and value.isprintable()
