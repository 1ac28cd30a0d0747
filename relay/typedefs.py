"""Typed aiohttp application keys shared by the listeners and the service."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from relay.config import Settings
from relay.store import Store


@dataclass
class Health:
    """What /readyz reports; the service updates it as components start and stop."""

    stopping: bool = False
    listeners_up: bool = False
    # Why the store cannot store right now, when the relay knows it for sure (its embedded server exited
    # and is being restarted): /healthz and /readyz answer 503 meanwhile. Empty: nothing known wrong.
    storage_down: str = ""
    persistence: dict[str, str] = field(default_factory=dict)
    link_state: str = "disabled"  # relay.states: no forwarder known to this app
    # Reads the live link state when a forwarder runs (link_state is then only a fallback).
    link_state_of: Callable[[], str] | None = None
    # The OCPI connection's state (relay.states), and how many shards this replica's forwarder holds (None: no
    # forwarder): per-module readiness in /readyz (relay.readiness).
    connection_of: Callable[[], str] | None = None
    shards_owned_of: Callable[[], int] | None = None
    # What relay.readiness read from Redis last, and when (monotonic s): reused for READINESS_TTL_S, so that a
    # probe every second costs one read of every stream per interval, not one per probe.
    readiness: tuple[float, dict[str, Any]] | None = None

    def link(self) -> str:
        """The IOP link state as of now."""
        return self.link_state_of() if self.link_state_of is not None else self.link_state


SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", Store)
HEALTH = web.AppKey("health", Health)
