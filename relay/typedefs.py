"""Typed aiohttp application keys shared by the listeners and the service."""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from relay.config import Settings
from relay.store import Store


@dataclass
class Health:
    """What /readyz reports; the service updates it as components start and stop."""

    stopping: bool = False
    listeners_up: bool = False
    persistence: dict[str, str] = field(default_factory=dict)
    link_state: str = "unconfigured"


SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", Store)
HEALTH = web.AppKey("health", Health)
