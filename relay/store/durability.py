"""What a 202 waits for: the ``[redis] ack_fsync`` / ``ack_replicas`` policy as one command after a batch.

The coalesced pipeline (relay.store.connection) appends the policy's command after a batch that holds
ingress writes, on the same connection (WAIT and WAITAOF count the writes of their own connection):

- ``WAITAOF local replicas timeout`` when fsync is asked: ``local`` is 0 when the server already fsyncs
  every write itself (``appendfsync always``, the embedded default), so only replicas are waited for;
- ``WAIT replicas timeout`` when only replicas are asked (their memory, not their disk);
- nothing when neither is asked.

When the reply falls short, the batch's writes fail with NotDurable (the ingress answers 503 + Retry-After).
docs/operations.md, "What can be lost when", has the table of what each choice means.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from relay.config import RedisSettings


@dataclass(frozen=True, slots=True)
class AckPolicy:
    """The command that confirms a batch's writes, and what its reply must reach."""

    fsync: bool = False  # on the primary's disk (and on the replicas' disks when replicas > 0)
    local: int = 0  # WAITAOF's numlocal: 1 unless the server fsyncs every write itself
    replicas: int = 0
    timeout_ms: int = 1000

    @property
    def command(self) -> tuple[Any, ...] | None:
        """The command to append after a batch of writes (None: the server's own reply is enough)."""
        if self.fsync and (self.local or self.replicas):
            return ("WAITAOF", self.local, self.replicas, self.timeout_ms)
        if self.replicas:
            return ("WAIT", self.replicas, self.timeout_ms)
        return None

    def met(self, reply: Any) -> bool:
        """Whether the command's reply confirms the batch (an error reply does not)."""
        if isinstance(reply, list) and len(reply) == 2:  # WAITAOF: [local fsynced, replicas fsynced]
            return int(reply[0]) >= self.local and int(reply[1]) >= self.replicas
        return isinstance(reply, int) and reply >= self.replicas

    def describe(self) -> str:
        """One line for logs, ``relay status`` and ``relay doctor``."""
        disk = "on the primary's disk" if self.fsync or not self.local else "in the primary's memory"
        if self.replicas:
            where = "disks" if self.fsync else "memory"
            return f"202 after the event is {disk} and in {self.replicas} replica(s)' {where} (≤ {self.timeout_ms} ms)"
        return f"202 after the event is {disk}"


def resolve(settings: RedisSettings, persistence: dict[str, str], *, sentinel: bool) -> AckPolicy:
    """The policy for these settings on a server with this ``appendonly``/``appendfsync`` ({} if unknown).

    ValueError when the settings ask what the server cannot give (fsync without an append-only file)."""
    legacy = settings.ack_replicas == "auto" and settings.wait_replicas > 0
    if isinstance(settings.ack_replicas, int):
        replicas = settings.ack_replicas
    else:
        replicas = settings.wait_replicas if legacy else (1 if sentinel else 0)
    timeout_ms = settings.wait_timeout_ms if legacy else settings.ack_timeout_ms
    aof = persistence.get("appendonly")
    always = aof == "yes" and persistence.get("appendfsync") == "always"
    if settings.ack_fsync is True and aof == "no":
        raise ValueError("redis.ack_fsync: the server runs without an append-only file (appendonly no)")
    # "auto" follows the server's own appendfsync: with "always" every write is on disk before its reply.
    # "auto" asks no fsync of replicas (they may run without AOF): Sentinel's default is WAIT 1, their memory.
    fsync = settings.ack_fsync is True or (settings.ack_fsync == "auto" and always and not replicas)
    return AckPolicy(fsync=fsync, local=0 if always else 1, replicas=max(0, replicas), timeout_ms=max(1, timeout_ms))
