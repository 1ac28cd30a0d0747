"""Store: the event streams. Created with their consumer groups, appended to (with the object's state
in the same script), measured and peeked.

Concurrent appends are coalesced into one pipeline per Redis round trip (Connection.call): the
per-request round trip costs more CPU in the client than HTTP and validation together (see
bench/ingress.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from relay.config import MODULES
from relay.errors import Conflict, Replayed, StoreUnavailable
from relay.events import Event, encode
from relay.ordering import shard_of
from relay.store import keys as K
from relay.store import scripts
from relay.store.connection import Connection, pipelined, raises_store_errors, text
from relay.store.entries import Rows
from relay.store.state import split_state

# Modules whose newest accepted id per key the ingress records in K.accepted_key() (the replay guard's
# "a newer event is queued"); a Session's is its session-last, which the ingress writes anyway.
_ACCEPTED_MODULES = frozenset({"locations", "tariffs"})


@dataclass(frozen=True, slots=True)
class StateWrite:
    """How an event changes its object's stored state."""

    mode: str  # put | cas | del | none (cas and none: only if the stored version is still ``expected``)
    field: str
    member: str
    country_code: str
    party_id: str
    doc: bytes = b""
    score: int = 0
    expected: int = 0
    # Idempotency-Key (commit.lua): the key's scope digest ("" = none), the answer to keep for it, for how long.
    idem: str = ""
    answer: bytes = b""
    idem_ttl_s: int = 0
    resend: bool = False  # X-Relay-Resend: stored even when it leaves the object as it is (commit.lua)


@raises_store_errors
class Store(Connection):
    """Typed Redis operations of the relay: the connection, and the event streams' writes."""

    # -- set-up -------------------------------------------------------------------------------

    async def load_scripts(self) -> None:
        """Register the ingress scripts at start (a NOSCRIPT later loads them again by itself)."""
        await scripts.load(self.redis, scripts.INGRESS)

    async def ensure_groups(self) -> None:
        """Create every stream and its consumer group (idempotent; also the cure for NOGROUP)."""
        results = await pipelined(
            self.redis,
            lambda pipe: [
                pipe.xgroup_create(K.stream_key(module, shard), K.GROUP, id="0", mkstream=True)
                for module in MODULES
                for shard in range(self.shards)
            ],
            raise_on_error=False,
        )
        for r in results:
            if isinstance(r, Exception) and "BUSYGROUP" not in str(r):
                raise r

    async def check_shard_count(self) -> int | None:
        """The shard count recorded in Redis by the first replica; a different one would break order."""
        recorded = await self.redis.hget(K.META_KEY, K.SHARDS_FIELD)
        if recorded is None:
            await self.redis.hsetnx(K.META_KEY, K.SHARDS_FIELD, self.shards)
            return None
        return int(recorded)

    # -- appending ----------------------------------------------------------------------------

    def _append_args(self, event: Event) -> tuple[Any, ...]:
        shard = shard_of(event.key, self.shards)
        stream = K.stream_key(event.module, shard)
        payload = encode(event)
        if event.module == "sessions":
            return ("EVALSHA", scripts.APPEND_SESSION.sha, 2, stream, K.session_last_key(shard), payload, event.key)
        if event.module == "cdrs":
            return ("EVALSHA", scripts.APPEND_CDR.sha, 2, stream, K.session_last_key(shard), payload, event.key)
        if event.module in _ACCEPTED_MODULES:  # the same script: XADD + the key's newest accepted id
            field = K.key_field(event.module, event.key)
            return ("EVALSHA", scripts.APPEND_SESSION.sha, 2, stream, K.accepted_key(shard), payload, field)
        return ("XADD", stream, "*", K.ENTRY_FIELD, payload)

    async def append(self, event: Event) -> str:
        """Durably add one event to its stream; returns the stream id. Raises StoreUnavailable.

        Failure policy: the caller answers 2xx only after this returns, i.e. after Redis
        acknowledged the write (and fsynced it with appendfsync always, and WAIT-ed for replicas
        when configured). Each event is one XADD or one script: all or nothing.
        """
        return text(await self.call(*self._append_args(event), durable=True))

    async def append_many(self, events: Sequence[Event]) -> list[str | StoreUnavailable]:
        """Append a batch in one pipeline; each item succeeds or fails on its own."""
        futures = [self.call(*self._append_args(e), durable=True) for e in events]
        results: list[str | StoreUnavailable] = []
        for fut in futures:
            try:
                results.append(text(await fut))
            except StoreUnavailable as exc:
                results.append(exc)
        return results

    def _commit_args(self, event: Event, write: StateWrite) -> tuple[Any, ...]:
        shard = shard_of(event.key, self.shards)
        kind = "session" if event.module == "sessions" else "cdr" if event.module == "cdrs" else ""
        accepted = K.key_field(event.module, event.key) if event.module in _ACCEPTED_MODULES else ""
        # KEYS[6]: the Idempotency-Key's, or any key of the shard without one (positions stay fixed).
        idem = K.idempotency_key(shard, write.idem) if write.idem else K.stream_key(event.module, shard)
        return (
            "EVALSHA", scripts.COMMIT.sha, 6,
            K.stream_key(event.module, shard), K.session_last_key(shard), K.state_key(event.module, shard),
            K.index_key(event.module, shard, write.country_code, write.party_id), K.accepted_key(shard), idem,
            encode(event), kind, event.key, write.mode, write.field, write.expected, write.doc, write.score,
            write.member, accepted, write.answer if write.idem else b"", write.idem_ttl_s,
            "1" if write.resend else "",
        )  # fmt: skip

    async def commit(self, event: Event, write: StateWrite) -> str:
        """Append the event and apply its state change atomically; raises Conflict or StoreUnavailable.

        Failure policy: as append(); a 'cas' write that finds a newer version stores nothing. Returns ""
        (nothing stored) when the object already is ``write.doc`` (a retried PUT or PATCH); raises Replayed
        when ``write.idem`` names a key answered before (nothing stored).
        """
        return _committed(await self.call(*self._commit_args(event, write), durable=True), write)

    async def confirm_replay(self, event: Event, write: StateWrite) -> None:
        """Before a replayed Idempotency-Key's 202: make the ack policy (relay.store.durability) cover the event
        its first attempt stored, maybe on another connection whose WAIT timed out (touch.lua: an unchanged,
        replicated write, then this lane's WAIT). NotDurable when it falls short; nothing to do without a policy."""
        if self.ack.command is None or not write.idem:
            return
        key = K.idempotency_key(shard_of(event.key, self.shards), write.idem)
        await self.call("EVALSHA", scripts.TOUCH.sha, 1, key, durable=True)

    async def commit_many(self, items: Sequence[tuple[Event, StateWrite]]) -> list[str | StoreUnavailable]:
        """commit() for a batch of unconditional writes, in one pipeline."""
        futures = [self.call(*self._commit_args(ev, w), durable=True) for ev, w in items]
        out: list[str | StoreUnavailable] = []
        for fut, (_, w) in zip(futures, items, strict=True):
            try:
                out.append(_committed(await fut, w))
            except StoreUnavailable as exc:
                out.append(exc)
        return out

    async def read_state(self, module: str, key: str, field: str) -> tuple[int, bytes | None]:
        """(version, JSON document) of an object's stored state; (0, None) if unknown."""
        raw = await self.call("HGET", K.state_key(module, shard_of(key, self.shards)), field)
        return split_state(raw)

    # -- inspection ---------------------------------------------------------------------------

    async def stream_lengths(self) -> dict[str, int]:
        """Entries in each module's streams (all shards), delivered or not."""
        lengths = await pipelined(
            self.redis,
            lambda pipe: [pipe.xlen(K.stream_key(module, shard)) for module in MODULES for shard in range(self.shards)],
        )
        out: dict[str, int] = {}
        for i, module in enumerate(MODULES):
            out[module] = sum(lengths[i * self.shards : (i + 1) * self.shards])
        return out

    async def peek(self, module: str, count: int) -> list[tuple[str, bytes]]:
        """The first ``count`` entries of a module, shard by shard (for the CLI)."""
        field = K.ENTRY_FIELD.encode()
        out: list[tuple[str, bytes]] = []
        for shard in range(self.shards):
            rows = await self.redis.xrange(K.stream_key(module, shard), count=count - len(out))
            out += [(text(sid), fields[field]) for sid, fields in cast(Rows, rows)]
            if len(out) >= count:
                break
        return out

    async def peek_entries(self, module: str, count: int) -> list[tuple[str, str, dict[str, bytes]]]:
        """The first ``count`` entries of a module as stored: (stream key, stream id, every field), shard by shard."""
        out: list[tuple[str, str, dict[str, bytes]]] = []
        for shard in range(self.shards):
            stream = K.stream_key(module, shard)
            rows = await self.redis.xrange(stream, count=count - len(out))
            out += [(stream, text(sid), {text(k): v for k, v in fields.items()}) for sid, fields in cast(Rows, rows)]
            if len(out) >= count:
                break
        return out


def _committed(result: Any, write: StateWrite) -> str:
    """commit.lua's reply: the stream id; "" for a duplicate; Conflict; Replayed with the key's stored answer."""
    if result is None:
        raise Conflict(write.field)
    if isinstance(result, list):
        if result and result[0] == b"replay":
            raise Replayed(bytes(result[1]))
        return ""  # {'dup'}: the object already is this document
    return text(result)
