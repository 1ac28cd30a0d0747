"""The Lua scripts: ``lua/*.lua``, shipped as package data, loaded once with SCRIPT LOAD and again after NOSCRIPT.

A line ``-- include: NAME.lua`` is replaced by that file's text when a script is read: finish.lua,
dead_letter.lua, replay.lua and the retention scripts share gt.lua's comparison of stream ids. Each script's
SHA1 is computed here from the text that is sent, as Redis computes it, so a command names its script by SHA
whether or not it was loaded yet; a NOSCRIPT answer (Redis restarted or failed over) loads it and sends the
command again.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from relay.errors import StoreUnavailable

_INCLUDE = re.compile(r"^-- include: (\S+\.lua)$", re.MULTILINE)


def source(filename: str) -> str:
    """The text of ``lua/<filename>`` with its includes expanded."""
    raw = (resources.files("relay.store") / "lua" / filename).read_text(encoding="utf-8")
    return _INCLUDE.sub(lambda m: source(m.group(1)), raw)


@dataclass(frozen=True, slots=True)
class Script:
    """One Lua script: its file's name (without .lua), the text sent to Redis, and that text's SHA1."""

    name: str
    source: str
    sha: str


def _script(name: str) -> Script:
    src = source(f"{name}.lua")
    return Script(name, src, hashlib.sha1(src.encode(), usedforsecurity=False).hexdigest())


# Ingress: one event (and its state) per script.
APPEND_SESSION = _script("append_session")
APPEND_CDR = _script("append_cdr")
COMMIT = _script("commit")
TOUCH = _script("touch")
# Delivery: finishing an entry, leases, replay.
FINISH = _script("finish")
DEAD_LETTER = _script("dead_letter")
LEASE_ACQUIRE = _script("lease_acquire")
LEASE_RENEW = _script("lease_renew")
LEASE_RELEASE = _script("lease_release")
REPLAY = _script("replay")
COMPACT_DEAD = _script("compact_dead")  # a compacted unit's dead letter (relay.compaction)
# Replicas: the heartbeat (allowed at maxmemory), removing dead replicas' idle consumers (store/leases.py).
HEARTBEAT = _script("heartbeat")
REAP_CONSUMERS = _script("reap_consumers")
PURGE = _script("purge")
# Retention (relay/retention.py): compare-and-delete of old markers, watermarks and state.
TRIM_MARKERS = _script("trim_markers")
TRIM_WATERMARKS = _script("trim_watermarks")
TRIM_STATE = _script("trim_state")
# Registration.
WITHDRAW_TOKEN_A = _script("withdraw_token_a")
CLAIM_TOKEN_A = _script("claim_token_a")
SAVE_REGISTRATION = _script("save_registration")
SET_TOKEN_A = _script("set_token_a")
# `relay link resume` (allowed at maxmemory).
RESUME = _script("resume")

INGRESS = (APPEND_SESSION, APPEND_CDR, COMMIT, TOUCH)
DELIVERY = (FINISH, DEAD_LETTER, LEASE_ACQUIRE, LEASE_RENEW, LEASE_RELEASE, REPLAY, PURGE, COMPACT_DEAD)
REPLICAS = (HEARTBEAT, REAP_CONSUMERS)
RETENTION = (TRIM_MARKERS, TRIM_WATERMARKS, TRIM_STATE)
ALL = (
    *INGRESS,
    *DELIVERY,
    *REPLICAS,
    *RETENTION,
    WITHDRAW_TOKEN_A,
    CLAIM_TOKEN_A,
    SAVE_REGISTRATION,
    SET_TOKEN_A,
    RESUME,
)


async def load(client: aioredis.Redis, which: Iterable[Script]) -> None:
    """SCRIPT LOAD each script (at start, and again when Redis answered NOSCRIPT)."""
    for script in which:
        sha = await client.script_load(script.source)
        if sha != script.sha:  # never with a real Redis: the SHA1 of the text is its name
            raise StoreUnavailable(f"redis: script {script.name} loaded as {sha!r}, expected {script.sha}")


async def run(client: aioredis.Redis, script: Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
    """EVALSHA on the pooled client; after NOSCRIPT, the script is loaded and the command sent again."""
    try:
        return await client.evalsha(script.sha, len(keys), *keys, *args)
    except NoScriptError:
        await load(client, [script])
        return await client.evalsha(script.sha, len(keys), *keys, *args)
