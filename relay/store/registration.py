"""RegistrationStore: the credentials handshake's durable state (the registration, the pending token A).

Tokens that the relay only compares (a token A, spent or pending) are stored as their SHA-256 digest,
never in clear: every method here takes the token and stores ``token_digest(token)``.

The registration is one JSON document (``credentials.Registration``), the IOP's credentials roles with the
rest: its HUB role is the OCPI-to-* party of every request (``Registration.hub_party``, T3), so the IOP's
identity from the handshake survives restarts and is the same on every replica.
"""

from __future__ import annotations

import hashlib
import re
from contextlib import suppress
from typing import cast

from relay.store import keys as K
from relay.store import scripts
from relay.store.connection import Part, pipelined, raises_store_errors, text

_DIGEST = re.compile(r"^[0-9a-f]{64}$")


def token_digest(token: str) -> str:
    """How a token the relay only compares is kept (hex SHA-256: tokens are random, no salt needed)."""
    return hashlib.sha256(token.encode()).hexdigest()


def is_digest(value: str) -> bool:
    """True for a stored digest; an older version stored tokens in clear (never 64 lowercase hex characters)."""
    return _DIGEST.match(value) is not None


@raises_store_errors
class RegistrationStore(Part):
    """The credentials handshake's durable state: one JSON document and the pending token A."""

    async def rename_old_keys(self) -> int:
        """Give keys written by an older version their current (hash-tagged) names; how many were renamed.

        Idempotent; a key whose new name exists already is left (the newer one wins). Not on a Cluster,
        where the older names never existed (the cluster mode came with the new names)."""
        if self.store.cluster:
            return 0
        # One round trip in the common case (nothing of an older version left): which older names exist, and the
        # commands still due under them (never a SCAN: every start and every CLI call runs this).
        olds = list(K.RENAMED_KEYS)
        *found, due = await pipelined(
            self.redis, lambda pipe: [*(pipe.exists(k) for k in olds), pipe.zrange(K.OLD_COMMANDS_DUE_KEY, 0, -1)]
        )
        moves = {old: K.RENAMED_KEYS[old] for old, n in zip(olds, found, strict=True) if n}
        moves |= {K.old_command_key(text(c)): K.command_key(text(c)) for c in due}
        if not moves:
            return 0
        done = await pipelined(self.redis, lambda pipe: [pipe.renamenx(old, new) for old, new in moves.items()],
                               raise_on_error=False)  # fmt: skip
        return sum(1 for r in done if r is True or r == 1)  # an older command key gone meanwhile: not renamed

    async def load(self) -> tuple[bytes | None, str | None, set[str]]:
        """(registration JSON or None, the pending token A's digest or None, digests of used A tokens).

        A pending token A stored in clear by an older version comes back as its digest too.
        """
        reg, token_a, used = await pipelined(
            self.redis,
            lambda pipe: [pipe.get(K.REGISTRATION_KEY), pipe.get(K.TOKEN_A_KEY), pipe.smembers(K.TOKEN_A_USED_KEY)],
        )
        pending = text(token_a) if token_a else None
        if pending is not None and not is_digest(pending):
            pending = token_digest(pending)
        return cast(bytes | None, reg), pending, {text(u) for u in used}

    async def save(self, registration: bytes, used_token_a_digest: str | None = None) -> None:
        """Replace the registration; a token A that was just used is retired in the same script (allowed at
        Redis's maxmemory: a handshake must still complete)."""
        keys = [K.REGISTRATION_KEY, K.TOKEN_A_KEY, K.TOKEN_A_USED_KEY]
        await scripts.run(self.redis, scripts.SAVE_REGISTRATION, keys, [registration, used_token_a_digest or ""])

    async def set_token_a(self, token: str) -> None:
        """A new one-time token A for the next Register – FromIOP (its digest: it cannot be read back)."""
        keys = [K.TOKEN_A_KEY, K.TOKEN_A_USED_KEY]
        await scripts.run(self.redis, scripts.SET_TOKEN_A, keys, [token_digest(token), ""])

    async def claim_token_a(self, token: str, *, configured: bool) -> int:
        """Spend a token A atomically as a registration starts (its digest joins the spent ones; a pending
        token A is deleted). 0: refused (spent already, or not a token A any more); 1: the configured
        ``[ocpi] token_a``; 2: the pending one. Concurrent callers with one token: one wins, the rest get 0."""
        keys, args = [K.TOKEN_A_KEY, K.TOKEN_A_USED_KEY], [token_digest(token), "1" if configured else "0"]
        return int(await scripts.run(self.redis, scripts.CLAIM_TOKEN_A, keys, args))

    async def release_token_a(self, token: str, *, pending: bool) -> None:
        """Undo ``claim_token_a`` after a handshake that failed before anything was stored: the token
        works again (a pending one comes back only if no newer token A was made meanwhile)."""

        keys = [K.TOKEN_A_KEY, K.TOKEN_A_USED_KEY]
        await scripts.run(self.redis, scripts.SET_TOKEN_A, keys, [token_digest(token), "1" if pending else "0"])

    async def withdraw_token_a(self, token: str, restore: str | None = None) -> bool:
        """Take back a pending token A if it is still this one, putting ``restore`` (a digest, as ``load()``
        returned it) back in its place."""
        args = [token_digest(token), restore or ""]
        return bool(await scripts.run(self.redis, scripts.WITHDRAW_TOKEN_A, [K.TOKEN_A_KEY], args))

    async def hash_clear_tokens(self, registration: bytes | None, hashed: bytes | None) -> bool:
        """Replace what an older version stored in clear: the pending token A by its digest, and the
        registration JSON ``registration`` by ``hashed`` (if it is still that one). True if anything changed;
        the server is then asked to rewrite its append-only file, so that the clear values leave the disk.
        """
        changed = False
        pending = await self.redis.get(K.TOKEN_A_KEY)
        if pending and not is_digest(text(pending)):
            args = [text(pending), token_digest(text(pending))]  # compare-and-set on the stored value
            changed |= bool(await scripts.run(self.redis, scripts.WITHDRAW_TOKEN_A, [K.TOKEN_A_KEY], args))
        if registration is not None and hashed is not None:
            args2 = [registration, hashed]
            changed |= bool(await scripts.run(self.redis, scripts.WITHDRAW_TOKEN_A, [K.REGISTRATION_KEY], args2))
        if changed:
            with suppress(Exception):  # a managed Redis may refuse it: the digests are stored either way
                await self.redis.bgrewriteaof()
        return changed
