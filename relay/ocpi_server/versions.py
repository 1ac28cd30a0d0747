"""GET /ocpi/versions and GET /ocpi/2.2.1: what the relay serves, with public URLs."""

from __future__ import annotations

from aiohttp import web

from relay.credentials import VERSION, Endpoint, public_base
from relay.envelope import ocpi
from relay.ocpi_server.keys import ENDPOINTS, SETTINGS


def announce(app: web.Application, identifier: str, role: str, path: str) -> None:
    """Add a module endpoint to our version details (each module calls this from its setup)."""
    app[ENDPOINTS].append(Endpoint(identifier=identifier, role=role, url=f"/{VERSION}{path}"))


async def get_versions(request: web.Request) -> web.Response:
    base = public_base(request.app[SETTINGS])
    return ocpi(200, 1000, [{"version": VERSION, "url": f"{base}/{VERSION}"}])


async def get_details(request: web.Request) -> web.Response:
    base = public_base(request.app[SETTINGS])
    endpoints = [Endpoint(e.identifier, e.role, base + e.url) for e in request.app[ENDPOINTS]]
    return ocpi(200, 1000, {"version": VERSION, "endpoints": endpoints})


def setup(app: web.Application) -> None:
    """Register the routes and start the endpoint list."""
    app[ENDPOINTS] = []
    app.router.add_get("/ocpi/versions", get_versions)
    app.router.add_get(f"/ocpi/{VERSION}", get_details)
