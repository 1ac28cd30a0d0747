"""msgspec models of the OCPI 2.2.1 objects a CPO pushes, with GIREVE's Tariff extension.

Decode with ``relay.models.common.decoder(Location).decode(body)`` (its hook reads every DateTime the
OCPI way); a ``msgspec.ValidationError`` names the offending field path (``$.evses[0].status``).
Nested and enum types live in the submodules.
"""

from relay.models.cdrs import Cdr
from relay.models.locations import Connector, ConnectorPatch, Evse, EvsePatch, Location, LocationPatch
from relay.models.sessions import Session, SessionPatch
from relay.models.tariffs import Tariff

__all__ = [
    "Cdr",
    "Connector",
    "ConnectorPatch",
    "Evse",
    "EvsePatch",
    "Location",
    "LocationPatch",
    "Session",
    "SessionPatch",
    "Tariff",
]
