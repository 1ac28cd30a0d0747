"""Errors as values with a kind: invalid input, transient, permanent, store unavailable."""

from __future__ import annotations

import msgspec


class RelayError(Exception):
    """Root of every error the relay raises on purpose."""


class ConfigError(RelayError):
    """The configuration is unusable; ``problems`` names each bad key."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class Problem(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One reason an event was refused (or warned about): where, which rule, and why."""

    field: str
    rule: str
    message: str


class InvalidEvent(RelayError, ValueError):
    """Input that breaks a rule; answered with a 4xx and never stored."""

    def __init__(self, problems: list[Problem], status: int = 422) -> None:
        super().__init__("; ".join(f"{p.field}: {p.message}" for p in problems))
        self.problems = problems
        self.status = status


class StoreError(RelayError):
    """Root of what relay.store raises: no caller outside the store sees a redis-py exception."""


class StoreUnavailable(StoreError, ConnectionError):
    """Redis did not answer or refused the command; the caller may retry.

    A write that timed out may still have been applied: callers that retry rely on idempotence.
    """


class NoGroup(StoreUnavailable):
    """A consumer group vanished (Redis restarted without persistence, or a stream was deleted)."""


class Conflict(StoreError):
    """Another writer changed the object between our read and our write: read and merge again."""
