"""Keys renamed for Cluster support (issue 17): the registration, token A and command keys that a script or a
MULTI touches together now share the hash tag ``{g}``. A relay upgraded in place renames the older ones at
start (and a CLI of the new version does the same), so a registration survives the upgrade."""

from __future__ import annotations

import redis.asyncio as aioredis

from relay.store import RegistrationStore, RoamingStore, Store
from relay.store import keys as K


async def test_older_key_names_are_renamed_once_and_a_newer_key_wins(store: Store, redis_url: str) -> None:
    raw = aioredis.Redis.from_url(redis_url)
    try:
        await raw.set("relay:registration", b'{"old": true}')
        await raw.set("relay:token-a", "a" * 64)
        await raw.sadd("relay:token-a-used", "b" * 64)
        await raw.zadd("relay:commands:due", {"c1": 5})
        await raw.set("relay:command:c1", b"{}", ex=600)
        await raw.set(K.TOKEN_A_KEY, "c" * 64)  # already under the new name: kept, the older one left alone
        assert await RegistrationStore(store).rename_old_keys() == 4
        reg, pending, used = await RegistrationStore(store).load()
        assert reg == b'{"old": true}' and pending == "c" * 64 and used == {"b" * 64}
        assert await RoamingStore(store).command("c1") == b"{}"
        assert 0 < await raw.ttl(K.command_key("c1")) <= 600  # the TTL travels with the key
        assert await RoamingStore(store).overdue(10) == ["c1"]
        assert not await raw.exists("relay:registration", "relay:command:c1", "relay:commands:due")
        assert await RegistrationStore(store).rename_old_keys() == 0  # idempotent
    finally:
        await raw.aclose()
