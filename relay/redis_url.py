"""Sentinel URLs (``redis+sentinel://[user:password@]h1:26379,h2:26379/mymaster/0``) taken apart: read by the
configuration's validation and by relay.store.connection, which gives them to redis-py's Sentinel client."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote


@dataclass(frozen=True, slots=True)
class SentinelAddress:
    """A ``redis+sentinel://[user:password@]h1:26379,h2:26379/service[/db]`` URL, taken apart."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False


def sentinel_address(url: str) -> SentinelAddress:
    """Parse a Sentinel URL (``rediss+sentinel://`` for TLS to the primary); ValueError saying what is wrong."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("redis+sentinel", "rediss+sentinel"):
        raise ValueError("a Sentinel URL starts with redis+sentinel:// or rediss+sentinel://")
    auth, at, rest = rest.rpartition("@")
    hosts, slash, path = rest.partition("/")
    parts = [p for p in path.split("/") if p] if slash else []
    if not parts or len(parts) > 2:
        raise ValueError("a Sentinel URL names the service after the hosts: …/mymaster or …/mymaster/0")
    service, db = parts[0], parts[1] if len(parts) == 2 else "0"
    if not db.isdigit():
        raise ValueError(f"database {db!r} is not a number")
    sentinels: list[tuple[str, int]] = []
    for item in hosts.split(","):
        host, colon, port = item.strip().rpartition(":")
        host, port = (host, port) if colon else (item.strip(), "26379")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"sentinel {item!r} is not host:port")
        sentinels.append((host.strip("[]"), int(port)))
    user, _, password = auth.partition(":") if at else ("", "", "")
    return SentinelAddress(
        tuple(sentinels), unquote(service), int(db), unquote(user) or None, unquote(password) or None,
        scheme.startswith("rediss"),
    )  # fmt: skip
