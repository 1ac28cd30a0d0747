"""Every Redis key name and hash field the relay uses, built here and nowhere else.

Every key of shard N carries the hash tag ``{rN}`` so that on Redis Cluster a shard's streams,
its session watermarks and its lease live in one slot, and one Lua script may touch them together.
"""

from __future__ import annotations

PREFIX = "relay"
GROUP = "relay"
ENTRY_FIELD = "e"


def stream_key(module: str, shard: int) -> str:
    """The stream holding one module's events of one shard."""
    return f"{PREFIX}:{{r{shard}}}:{module}"


def dlq_key(module: str, shard: int) -> str:
    """The dead-letter stream of one module's shard (in the shard's slot, so moving there is atomic)."""
    return f"{PREFIX}:{{r{shard}}}:dlq:{module}"


def parked_key(shard: int) -> str:
    """Hash: module|ordering key → dead-letter id of the failure that parked it."""
    return f"{PREFIX}:{{r{shard}}}:parked"


def session_last_key(shard: int) -> str:
    """Hash: session ordering key → stream id of its last accepted update (set at ingress)."""
    return f"{PREFIX}:{{r{shard}}}:session-last"


def session_done_key(shard: int) -> str:
    """Hash: session ordering key → stream id of its last delivered or dead-lettered update."""
    return f"{PREFIX}:{{r{shard}}}:session-done"


def delivered_key(shard: int) -> str:
    """Hash: ordering key + object path → ingress stream id of its last delivered update (replay guard)."""
    return f"{PREFIX}:{{r{shard}}}:delivered"


def state_key(module: str, shard: int) -> str:
    """Hash: ``CC:PID:ID[:TARGET]`` → ``<version>|<current object JSON>``."""
    return f"{PREFIX}:{{r{shard}}}:state:{module}"


def index_key(module: str, shard: int, country_code: str, party_id: str) -> str:
    """Sorted set of one operator's objects by last_updated (ms): member ``ID[:TARGET]``."""
    return f"{PREFIX}:{{r{shard}}}:idx:{module}:{country_code}:{party_id}"


def lease_key(shard: int) -> str:
    """String: the replica that owns a shard, with an expiry."""
    return f"{PREFIX}:{{r{shard}}}:lease"


REPLICAS_KEY = f"{PREFIX}:replicas"
META_KEY = f"{PREFIX}:meta"
LINK_KEY = f"{PREFIX}:link"
