"""The localhost face for the CSMS and operators: OCPI Receiver-shaped routes, health, metrics."""

from relay.ingress.app import create_app

__all__ = ["create_app"]
