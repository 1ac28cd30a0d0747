"""Token authentication of the IOP's requests, and what each token may do.

A token is printable ASCII (OCPI's CiString(64); the relay's own are URL-safe base64): a header
that is anything else (not UTF-8, non-ASCII, control characters, oversized, bad base64) presents no
token and is answered 401 like a wrong one, never compared.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from collections.abc import Callable
from contextlib import suppress
from typing import Literal

from relay.credentials import Registry
from relay.errors import StoreError

TokenRole = Literal["registered", "token_a"]
MAX_TOKEN_CHARS = 512  # what a header may carry as a token; OCPI's tokens are CiString(64), base64 adds a third


def _printable(value: str) -> bool:
    return 0 < len(value) <= MAX_TOKEN_CHARS and value.isascii() and value.isprintable()


def presented_token(header: str) -> tuple[str, str | None]:
    """``Token <x>`` → (raw x, base64-decoded x or None if x is not base64 of printable ASCII);
    ("", None) when x is not printable ASCII itself."""
    scheme, _, value = header.partition(" ")
    raw = value.strip()
    if scheme.lower() != "token" or not _printable(raw):
        return "", None
    try:
        decoded: str | None = base64.b64decode(raw, validate=True).decode("ascii")
    except (binascii.Error, UnicodeDecodeError):
        decoded = None
    if decoded is not None and not _printable(decoded):
        decoded = None
    return raw, decoded


def authenticate(header: str, registry: Registry, *, accept_plain: bool) -> TokenRole | None:
    """The base64 form of 2.2.1 first; the plain form of older peers only if allowed."""
    raw, decoded = presented_token(header)
    if decoded is not None and (role := registry.role_of(decoded)) is not None:
        return role
    if accept_plain and raw:
        return registry.role_of(raw)
    return None


class UnknownTokens:
    """Requests whose token this replica does not know, which may be new (a token A just made by the CLI, a
    token B handed to a hub that calls back at once, a registration made by another replica): the
    registration is re-read from Redis for them, but at most once per ``refresh_every_s``. A request that
    comes sooner waits for the next re-read, shared with every other one waiting, and is then decided on
    it: a new token is never refused for being early, and a flood of wrong tokens costs Redis one read per
    interval (and each of them a wait). A token a re-read left unknown less than ``remember_s`` ago is
    refused at once (the relay's registration watch re-reads every second anyway). Their log lines are
    bounded too: one per ``log_every_s``, with the count of refusals it stands for."""

    def __init__(self, refresh_every_s: float = 0.2, remember_s: float = 1.0, log_every_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic, max_remembered: int = 1024) -> None:  # fmt: skip
        self.refresh_every_s = refresh_every_s
        self.remember_s = remember_s
        self.log_every_s = log_every_s
        self._clock = clock
        self._max_remembered = max_remembered
        self._last = -refresh_every_s  # when the last re-read started
        self._next: asyncio.Task[None] | None = None  # the re-read not started yet, that arrivals wait for
        self._current: asyncio.Task[None] | None = None  # the one reading Redis (held: tasks are weakly kept)
        self._unknown: dict[str, float] = {}  # token → when the re-read that left it unknown started
        self._log_at = 0.0
        self._unlogged = 0

    async def refresh(self, registry: Registry, token: str) -> None:
        """Re-read the registration for ``token``: at once if no re-read started in the last interval, else
        with the next one; not at all if a re-read left it unknown a moment ago. Redis unreachable: the
        request is decided on what this replica knows."""
        checked = self._unknown.get(token)
        if checked is not None and self._clock() - checked < self.remember_s:
            return
        if self._next is None:
            delay = max(0.0, self._last + self.refresh_every_s - self._clock())
            self._next = asyncio.create_task(self._refresh(registry, delay))
        await asyncio.shield(self._next)  # a request that goes away does not cancel it for the others
        if len(self._unknown) >= self._max_remembered:
            self._unknown.clear()
        self._unknown[token] = self._last  # consulted only while the token is unknown

    async def _refresh(self, registry: Registry, delay: float) -> None:
        if delay:
            await asyncio.sleep(delay)
        self._current, self._next = self._next, None  # who comes now waits for the next one: its token may be newer
        self._last = self._clock()
        with suppress(StoreError):
            await registry.refresh()

    def to_log(self) -> int | None:
        """The number of refusals this log line stands for, or None when no line is due."""
        self._unlogged += 1
        now = self._clock()
        if now < self._log_at:
            return None
        self._log_at = now + self.log_every_s
        count, self._unlogged = self._unlogged, 0
        return count
