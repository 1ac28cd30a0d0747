"""Token authentication of the IOP's requests, and what each token may do."""

from __future__ import annotations

import base64
import binascii
from typing import Literal

from relay.credentials import Registry

TokenRole = Literal["registered", "token_a"]


def presented_token(header: str) -> tuple[str, str | None]:
    """``Token <x>`` → (raw x, base64-decoded x or None if x is not valid base64 text)."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "token" or not value.strip():
        return "", None
    raw = value.strip()
    try:
        decoded: str | None = base64.b64decode(raw, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
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
