"""Errors as values with a kind: invalid input, transient, permanent, store unavailable.

Here: the errors that more than one layer of the relay raises or answers (configuration, refused input,
the store). Where the others live: each is raised by one module only, is part of that module's API next to
the client or function that raises it, and derives from ``Exception``, not ``RelayError``:

- ``relay.credentials.HandshakeError``: the peer's answer to the OCPI credentials handshake was unusable.
- ``relay.csms.CsmsUnavailable``: the CSMS webhook did not answer usefully in time.
- ``relay.ocpi_client.NotConfigured``: no IOP endpoint or token for a module yet; the event waits.
- ``relay.ocpi_client.OriginRefused``: an event's own URL (a command's response_url) is off the IOP's origins
  (a ValueError too: a dead letter, never sent).
- ``relay.urls.UrlRefused``: a URL the outbound policy refuses (not a strict http(s) URL; for the handshake,
  not https or not public).
- ``relay.urls.ResponseTooLarge``: an answer over the read cap (an ``aiohttp.ClientPayloadError``).
- ``relay.link.GaveUp``: a wait for the IOP link's permission ended because the caller gave up (stopping).
- ``relay.shard.Abandon``: stop working on an entry without acknowledging it (stopping, lease lost).
- ``relay.openapi.parts.UndocumentedRoute``: a route of the ingress that the OpenAPI document does not describe.
- ``relay.ingress.admin._Refused``: an admin API request answered with a 4xx (its problems, maybe headers).
- ``relay.ocpi_server.sender.BadRequest``: a query parameter of a Sender interface was unusable (HTTP 400).
"""

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


class NotDurable(StoreUnavailable):
    """The write was applied but not confirmed on disk or on replicas within ``[redis] ack_timeout_ms``
    (relay.store.durability): the ingress answers 503 and the CSMS sends it again (stored once by the
    idempotent ingress). It may still be delivered: a 503 never promises that nothing was stored."""


class StoreFull(StoreUnavailable):
    """Redis is at its ``maxmemory`` (OOM, with ``noeviction``): the write was refused whole, nothing stored.

    A StoreUnavailable: callers that retry later are right (room comes back as the backlog drains).
    """


class Replayed(StoreError):
    """The write was not made: an earlier request with the same Idempotency-Key was; ``answer`` is what
    was stored for it (relay.ingest decodes it)."""

    def __init__(self, answer: bytes) -> None:
        super().__init__("replay of an earlier request with the same Idempotency-Key")
        self.answer = answer


class Conflict(StoreError):
    """Another writer changed the object between our read and our write: read and merge again."""


class DataDirBusy(RelayError):
    """Another relay holds the data directory's lock (relay.embedded_redis); nothing was started or signalled."""

    def __init__(self, data_dir: object, pid: int | None) -> None:
        held = f" (pid {pid})" if pid else ""
        super().__init__(f"another relay is running on data dir {data_dir}{held}")
        self.data_dir = data_dir
        self.pid = pid


class EmbeddedRedisFailed(StoreUnavailable):
    """The embedded server could not be started (or restarted); the message says why, on one line."""


class EmbeddedRedisLost(EmbeddedRedisFailed):
    """The relay stopped because its embedded server kept stopping (``relay serve`` exits 3)."""
