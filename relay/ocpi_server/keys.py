"""App keys and route tables shared by the OCPI listener's modules."""

from __future__ import annotations

from aiohttp import web

from relay.config import Settings
from relay.credentials import Endpoint, Registry

SETTINGS = web.AppKey("ocpi_settings", Settings)
REGISTRY = web.AppKey("ocpi_registry", Registry)
ENDPOINTS = web.AppKey("ocpi_endpoints", list[Endpoint])
ROLE = "ocpi_token_role"

# (method, canonical route) that the one-time token A may call: enough to register, nothing more.
TOKEN_A_ROUTES = {
    ("GET", "/ocpi/versions"),
    ("GET", "/ocpi/2.2.1"),
    ("POST", "/ocpi/2.2.1/credentials"),
}
