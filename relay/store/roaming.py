"""RoamingStore: tokens pushed by the IOP (K2) and remote commands waiting for their result (K3)."""

from __future__ import annotations

from typing import cast

from relay.store import keys as K
from relay.store.connection import Part, pipelined, raises_store_errors, text


@raises_store_errors
class RoamingStore(Part):
    """Tokens pushed by the IOP and commands waiting for their result."""

    async def token(self, token_type: str, uid: str, country_code: str, party_id: str) -> bytes | None:
        """One token as the IOP last sent it."""
        raw = await self.redis.hget(K.token_key(token_type, uid), K.token_field(country_code, party_id))
        return cast(bytes | None, raw)  # the client never decodes: bytes

    async def tokens_by_uid(self, token_type: str, uid: str) -> list[bytes]:
        """Every issuer's token with this uid and type (for offline decisions)."""
        raw = await self.redis.hgetall(K.token_key(token_type, uid))
        return cast(list[bytes], list(raw.values()))

    async def put_token(self, token_type: str, uid: str, country_code: str, party_id: str, doc: bytes) -> None:
        """Store (replace) a token."""
        await self.redis.hset(K.token_key(token_type, uid), K.token_field(country_code, party_id), doc)

    async def put_command(self, command_id: str, doc: bytes, due_ms: int, ttl_s: int) -> None:
        """Remember a command accepted by the CSMS and when its result is due."""
        await pipelined(
            self.redis,
            lambda pipe: [pipe.set(K.command_key(command_id), doc, ex=ttl_s),
                          pipe.zadd(K.COMMANDS_DUE_KEY, {command_id: due_ms})],
            transaction=True,
        )  # fmt: skip

    async def command(self, command_id: str) -> bytes | None:
        """A command in progress (or recently finished)."""
        raw = await self.redis.get(K.command_key(command_id))
        return cast(bytes | None, raw)

    async def forget_command(self, command_id: str) -> None:
        """A command the CSMS did not accept: no result awaited."""
        await pipelined(
            self.redis,
            lambda pipe: [pipe.zrem(K.COMMANDS_DUE_KEY, command_id), pipe.delete(K.command_key(command_id))],
            transaction=True,
        )

    async def await_again(self, command_id: str, due_ms: int) -> None:
        """Undo settle() when the result could not be stored."""
        await self.redis.zadd(K.COMMANDS_DUE_KEY, {command_id: due_ms})

    async def settle(self, command_id: str) -> bool:
        """Take the command off the due list; only the first caller (result or timeout) gets True."""
        return bool(await self.redis.zrem(K.COMMANDS_DUE_KEY, command_id))

    async def overdue(self, now_ms: int, count: int = 100) -> list[str]:
        """Commands whose result is late."""
        rows = await self.redis.zrangebyscore(K.COMMANDS_DUE_KEY, "-inf", now_ms, start=0, num=count)
        return [text(r) for r in rows]
