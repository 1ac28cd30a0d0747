"""The IOP-facing OCPI listener: versions, credentials (and, later, Sender interfaces and commands)."""

from relay.ocpi_server.app import create_ocpi_app

__all__ = ["create_ocpi_app"]
