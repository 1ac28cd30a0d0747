"""RegistrationStore: the credentials handshake's durable state (the registration, the pending token A)."""

from __future__ import annotations

from typing import cast

from redis.asyncio.client import Pipeline

from relay.store import keys as K
from relay.store import scripts
from relay.store.connection import Part, pipelined, raises_store_errors, text


@raises_store_errors
class RegistrationStore(Part):
    """The credentials handshake's durable state: one JSON document and the pending token A."""

    async def load(self) -> tuple[bytes | None, str | None, set[str]]:
        """(registration JSON or None, pending token A or None, digests of used A tokens)."""
        reg, token_a, used = await pipelined(
            self.redis,
            lambda pipe: [pipe.get(K.REGISTRATION_KEY), pipe.get(K.TOKEN_A_KEY), pipe.smembers(K.TOKEN_A_USED_KEY)],
        )
        return cast(bytes | None, reg), text(token_a) if token_a else None, {text(u) for u in used}

    async def save(self, registration: bytes, used_token_a_digest: str | None = None) -> None:
        """Replace the registration; a token A that was just used is retired in the same transaction."""

        def queue(pipe: Pipeline) -> list[object]:
            queued: list[object] = [pipe.set(K.REGISTRATION_KEY, registration)]
            if used_token_a_digest is not None:
                queued += [pipe.delete(K.TOKEN_A_KEY), pipe.sadd(K.TOKEN_A_USED_KEY, used_token_a_digest)]
            return queued

        await pipelined(self.redis, queue, transaction=True)

    async def set_token_a(self, token: str) -> None:
        """A new one-time token A for the next Register – FromIOP."""
        await self.redis.set(K.TOKEN_A_KEY, token)

    async def withdraw_token_a(self, token: str, restore: str | None = None) -> bool:
        """Take back a pending token A if it is still this one, putting ``restore`` back in its place."""
        return bool(await scripts.run(self.redis, scripts.WITHDRAW_TOKEN_A, [K.TOKEN_A_KEY], [token, restore or ""]))
