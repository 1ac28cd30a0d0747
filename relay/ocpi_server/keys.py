"""App keys and route tables shared by the OCPI listener's modules."""

from __future__ import annotations

from contextvars import ContextVar
from typing import Literal

from aiohttp import web

from relay.config import Settings
from relay.credentials import Endpoint, Registry
from relay.store import StateReader

SETTINGS = web.AppKey("ocpi_settings", Settings)
REGISTRY = web.AppKey("ocpi_registry", Registry)
ENDPOINTS = web.AppKey("ocpi_endpoints", list[Endpoint])
STATE = web.AppKey("ocpi_state", StateReader)
# What the presented token is ("registered" or "token_a"), for the handler of the current request.
# A context variable, not request storage: aiohttp >= 3.14 warns on plain-string request keys and
# RequestKey does not exist before 3.14 (each request is handled in its own task, so no leaking).
ROLE: ContextVar[Literal["registered", "token_a"] | None] = ContextVar("ocpi_token_role", default=None)
# The request's X-Correlation-ID as answered (its X-Request-ID, or a fresh id, when absent or not a value
# a header of ours can carry), for handlers that send it on (a command's result, the CSMS webhook).
CORRELATION: ContextVar[str] = ContextVar("ocpi_correlation_id", default="")

# (method, canonical route) that the one-time token A may call: enough to register, nothing more.
TOKEN_A_ROUTES = {
    ("GET", "/ocpi/versions"),
    ("GET", "/ocpi/2.2.1"),
    ("POST", "/ocpi/2.2.1/credentials"),
}
# Canonical routes of the configuration modules (versions, version details, credentials): their answers
# carry no OCPI-from/OCPI-to (transport_and_format: "routing headers SHALL NOT be used with these modules").
CONFIG_ROUTES = frozenset({"/ocpi/versions", "/ocpi/2.2.1", "/ocpi/2.2.1/credentials"})
