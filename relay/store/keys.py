"""Every Redis key name and hash field the relay uses, built here and nowhere else.

Every key of shard N carries the hash tag ``{rN}`` so that on Redis Cluster a shard's streams,
its session watermarks and its lease live in one slot, and one Lua script may touch them together.
"""

from __future__ import annotations

PREFIX = "relay"
GROUP = "relay"  # the consumer group of every stream

# Fields of a stream entry (the Lua scripts spell them too: see relay/store/lua/).
ENTRY_FIELD = "e"  # the envelope (relay.events)
AFTER_FIELD = "a"  # a CDR: the id of its session's last update accepted before it
ORIGIN_FIELD = "o"  # a replayed entry: its stream id before it was dead-lettered
INFO_FIELD = "i"  # a dead letter: reason, attempts, times (msgpack)
SOURCE_FIELD = "s"  # a dead letter: its stream id before it died


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


def accepted_key(shard: int) -> str:
    """Hash: module|ordering key → stream id of its newest accepted event (set at ingress, in the same
    script as the XADD), for a Location or a Tariff variant: the replay guard's "a newer event is queued".
    A Session's is session_last_key(). About 70 bytes per object (measured, 100,000 Locations)."""
    return f"{PREFIX}:{{r{shard}}}:accepted"


def dead_last_key(shard: int) -> str:
    """Hash: module|ordering key → original stream id of its newest dead-lettered event (Location, Session,
    Tariff variant): with the delivered one, the last finished event of the key (replay guard)."""
    return f"{PREFIX}:{{r{shard}}}:dead-last"


def state_key(module: str, shard: int) -> str:
    """Hash: ``CC:PID:ID[:TARGET]`` → ``<version>|<current object JSON>``."""
    return f"{PREFIX}:{{r{shard}}}:state:{module}"


def index_key(module: str, shard: int, country_code: str, party_id: str) -> str:
    """Sorted set of one operator's objects by last_updated (ms): member ``ID[:TARGET]``."""
    return f"{PREFIX}:{{r{shard}}}:idx:{module}:{country_code}:{party_id}"


def holds_key(shard: int) -> str:
    """Hash: module|ordering key → when (epoch s) its takeover hold ends; expires with the hold."""
    return f"{PREFIX}:{{r{shard}}}:holds"


def idempotency_key(shard: int, scope: str) -> str:
    """String with a TTL: the answer to the first request with an Idempotency-Key (``scope``: a digest of the
    operator, the route and the key, relay.ingest), in the shard of the request's object (commit.lua)."""
    return f"{PREFIX}:{{r{shard}}}:idem:{scope}"


def lease_key(shard: int) -> str:
    """String: the replica that owns a shard, with an expiry."""
    return f"{PREFIX}:{{r{shard}}}:lease"


def key_field(module: str, key: str) -> str:
    """``module|ordering key``: the field of an ordering key in the parked and delivered hashes."""
    return f"{module}|{key}"


def state_field(country_code: str, party_id: str, member: str) -> str:
    """Field of a state hash: ``CC:PID:ID[:TARGET]`` (``member`` is the object's index member)."""
    return f"{country_code}:{party_id}:{member}"


def state_member(module: str, object_id: str, ordering_key: str) -> str:
    """Member of an index (and the end of the state field): the object id, ``ID:TARGET`` for a tariff variant.

    A tariff's variants per eMSP are distinct objects; the variant is the end of its ordering key
    ``tar:CC:PID:ID:TARGET`` (relay.ordering.tariff_key).
    """
    if module == "tariffs":
        return ordering_key.split(":", 3)[3]
    return object_id


# -- replicas and the link --------------------------------------------------------------------------

REPLICAS_KEY = f"{PREFIX}:replicas"  # zset: replica id -> last heartbeat (ms)
META_KEY = f"{PREFIX}:meta"  # hash of facts every replica must agree on
SHARDS_FIELD = "shards"  # in META_KEY: the shard count the first replica recorded
LINK_KEY = f"{PREFIX}:link"  # hash: operator requests to every replica
RESUME_FIELD = "resume_at"  # in LINK_KEY: when an operator last asked to resume (epoch s)


def link_key(replica: str) -> str:
    """Hash: one replica's link state as it last published it (link_fields())."""
    return f"{LINK_KEY}:{replica}"


def link_fields(state: str, reason: str, since: float) -> dict[str, str | float]:
    """The fields of a link_key() hash."""
    return {"state": state, "reason": reason, "since": since}


# -- registration with the IOP -----------------------------------------------------------------------

# The keys that a script or a MULTI touches together share the hash tag ``{g}`` (one slot on a Cluster).
# Their names before the tag (relay:registration …) are renamed once at start (RENAMED_KEYS).
GLOBAL = f"{PREFIX}:{{g}}"
REGISTRATION_KEY = f"{GLOBAL}:registration"  # string: the registration JSON
TOKEN_A_KEY = f"{GLOBAL}:token-a"  # string: the pending one-time token A
TOKEN_A_USED_KEY = f"{GLOBAL}:token-a-used"  # set: digests of spent tokens A


# -- tokens from the IOP and commands in progress ------------------------------------------------------

COMMANDS_DUE_KEY = f"{GLOBAL}:commands:due"  # zset: command id -> when its result is due (ms)


def token_key(token_type: str, uid: str) -> str:
    """Hash: ``CC:PID`` of each issuer -> its token with this type and uid."""
    return f"{PREFIX}:token:{token_type}:{uid.upper()}"


def token_field(country_code: str, party_id: str) -> str:
    """Field of a token_key(): the issuer, upper case."""
    return f"{country_code}:{party_id}".upper()


def command_key(command_id: str) -> str:
    """String with a TTL: a command awaiting its result."""
    return f"{GLOBAL}:command:{command_id}"


OLD_COMMANDS_DUE_KEY = f"{PREFIX}:commands:due"  # the older name of COMMANDS_DUE_KEY: its members are ids
# Older name → current name, renamed by RegistrationStore.rename_old_keys() at start (a relay upgraded in place).
RENAMED_KEYS = {
    f"{PREFIX}:registration": REGISTRATION_KEY,
    f"{PREFIX}:token-a": TOKEN_A_KEY,
    f"{PREFIX}:token-a-used": TOKEN_A_USED_KEY,
    OLD_COMMANDS_DUE_KEY: COMMANDS_DUE_KEY,
}


def old_command_key(command_id: str) -> str:
    """The older name of command_key(): renamed at start for each command still due under the older names."""
    return f"{PREFIX}:command:{command_id}"
