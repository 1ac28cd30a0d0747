"""The two state vocabularies an operator sees: the IOP link's and the OCPI connection's.

One set of names each, used by the code, the metric label values (``relay_iop_link_state{state}``,
``relay_registration_state{state}``), ``/readyz``, ``relay status``, the alert rules, the dashboard, the
README and docs/operations.md (tests/test_states.py checks that they agree).

- **Link** (per replica: can this replica send to the IOP now?): ``up``; ``down`` (the IOP fails, one
  probe on a backoff); ``auth_failed`` (401/403) and ``unknown_receiver`` (OCPI 4001), until
  ``relay link resume`` or a new registration; ``paused``: nothing to deliver to (the connection is
  ``unregistered`` or ``none``), events queue; ``disabled``: this replica runs no forwarder
  (``[forwarder] enabled = false``).
- **Connection** (shared by every replica: who the relay delivers to): ``registered`` (credentials
  handshake done), ``unregistered`` (it was, then GIREVE's ``DELETE credentials`` or ``relay unregister``),
  ``static`` (no handshake, ``[iop] url`` + token), ``none`` (neither: nothing configured yet).
"""

from __future__ import annotations

from typing import Literal, get_args

LinkState = Literal["up", "down", "auth_failed", "unknown_receiver", "paused", "disabled"]
LINK_STATES: tuple[LinkState, ...] = get_args(LinkState)
# States that only resume() ends (an operator's `relay link resume`, a new registration), with no probe
# meanwhile: the same token (auth_failed) or the same OCPI-to-* party (unknown_receiver) cannot succeed.
STOPPED: frozenset[str] = frozenset({"auth_failed", "unknown_receiver", "paused"})

ConnectionState = Literal["registered", "unregistered", "static", "none"]
CONNECTION_STATES: tuple[ConnectionState, ...] = get_args(ConnectionState)


def connection_state(registration_state: str | None, *, static: bool) -> ConnectionState:
    """The connection's state: the registration's own (``registered``/``unregistered``) when there is one,
    else ``static`` with ``[iop] url`` + token, else ``none``."""
    if registration_state == "registered":
        return "registered"
    if registration_state is not None:
        return "unregistered"
    return "static" if static else "none"
