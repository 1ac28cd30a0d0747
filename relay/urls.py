"""Outbound requests: which URLs the relay calls, which origins get the hub's token, how much of an answer it reads.

- ``parse``: a strict absolute http(s) URL (yarl): no user info, a host made of hostname characters or an
  IP literal, a port in range.
- ``origin``: ``scheme://host:port`` (default port made explicit, host lower case, no trailing dot): the unit
  of trust. The hub's token goes only to the hub's origins (``credentials.Directory.origins``).
- ``check_handshake_url``: a URL named by whoever holds a token A (versions, version details, endpoints)
  must be https on a public host, unless ``[ocpi] allow_insecure_urls`` (test set-ups, private networks).
  Literal addresses are checked here; names are checked when they are resolved, by ``PublicResolver``,
  so that a name re-pointed at a private address between the check and the connection (DNS rebinding)
  is refused too.
- ``read_capped``: an answer is read up to a byte cap, without aiohttp's automatic decompression; a
  gzip/deflate answer is inflated up to the same cap (a small compressed answer cannot blow up memory).

No function here follows redirects: callers send with ``allow_redirects=False`` and follow, by hand,
only redirects that stay on the origin they called (``ocpi_client``), or none at all.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import zlib

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver
from yarl import URL

from relay.errors import RelayError

# Sent on every outbound request of a session that reads with read_capped (which inflates exactly these).
ACCEPT_ENCODING = "gzip, deflate"
_CHUNK = 65_536
_MAX_CODINGS = 2  # Content-Encoding layers inflated at most ("gzip" is all anyone sends)
_HOSTNAME = re.compile(r"^[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*$")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class UrlRefused(RelayError):
    """A URL the outbound policy does not allow; the message says why (for the log, not for the caller)."""


class ResponseTooLarge(aiohttp.ClientPayloadError):
    """An answer (or its inflated form) over the cap: nothing more is read, the connection is dropped."""


def parse(url: str) -> URL:
    """A strict absolute http(s) URL; raises UrlRefused."""
    if not url or any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise UrlRefused("not a URL: empty, or with spaces or control characters")
    try:
        u = URL(url)
        host = u.raw_host
        port = u.port
    except (ValueError, TypeError) as exc:
        raise UrlRefused(f"not a URL: {exc}") from None
    if u.scheme not in ("http", "https") or not u.absolute or not host or port is None:
        raise UrlRefused("not an absolute http(s) URL")
    if u.raw_user is not None or u.raw_password is not None:
        raise UrlRefused("user info in a URL")
    if _ip(host) is None and not _HOSTNAME.match(_bare(host)):
        raise UrlRefused("not a host name")
    return u


def origin(url: str | URL) -> str:
    """``scheme://host:port`` of a URL; raises UrlRefused for anything ``parse`` refuses."""
    u = parse(url) if isinstance(url, str) else url
    host, port = u.raw_host, u.port
    if host is None or port is None:
        raise UrlRefused("not an absolute http(s) URL")
    host = _bare(host)
    return f"{u.scheme}://{'[' + host + ']' if ':' in host else host}:{port}"


def origin_or_none(url: str) -> str | None:
    """``origin(url)``, or None for a URL the policy refuses."""
    try:
        return origin(url)
    except UrlRefused:
        return None


def parse_origin(value: str) -> str:
    """A configured origin (``https://host[:port]``, nothing after it) in ``origin``'s form; raises UrlRefused."""
    u = parse(value)
    if u.raw_path not in ("", "/") or u.raw_query_string or u.raw_fragment:
        raise UrlRefused("an origin has no path, query or fragment")
    return origin(u)


def public_ip(address: str) -> bool:
    """True for an address on the public Internet: not loopback, private, shared, link-local, multicast,
    unspecified or reserved (an IPv4 address inside IPv6 — mapped, 6to4, Teredo, NAT64 — is judged as IPv4)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        inner = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if ip in _NAT64:
            inner = ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF)
        if inner is not None:
            return public_ip(str(inner))
    bad = ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_reserved
    return ip.is_global and not (bad or ip.is_unspecified)


def local_name(host: str) -> bool:
    """Names that are this machine whatever DNS says."""
    h = _bare(host)
    return h == "localhost" or h.endswith(".localhost")


def check_handshake_url(url: str, *, allow_insecure: bool) -> URL:
    """A URL the handshake may call: https and a public host, unless insecure URLs are allowed.

    Literal addresses are judged here; a name is judged by ``PublicResolver`` when it is resolved.
    Raises UrlRefused.
    """
    u = parse(url)
    if allow_insecure:
        return u
    if u.scheme != "https":
        raise UrlRefused(f"{u.scheme}: only https (set [ocpi] allow_insecure_urls for test set-ups)")
    host = _bare(u.raw_host or "")
    if _ip(host) is not None:
        if not public_ip(host):
            raise UrlRefused(f"{host}: not a public address")
    elif local_name(host):
        raise UrlRefused(f"{host}: a local name")
    return u


class PublicResolver(AbstractResolver):
    """Resolves names, keeping public addresses only; a name with none fails like a DNS failure."""

    def __init__(self, inner: AbstractResolver | None = None) -> None:
        self._inner = inner if inner is not None else ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if local_name(host):
            raise OSError(f"{host}: a local name")
        found = await self._inner.resolve(host, port, family)
        public = [r for r in found if public_ip(r["host"])]
        if not public:
            raise OSError(f"{host}: resolves to no public address")
        return public

    async def close(self) -> None:
        await self._inner.close()


def connector(*, ssl: object, allow_insecure: bool, **kw: object) -> aiohttp.TCPConnector:
    """A TCPConnector that connects only to public addresses unless insecure URLs are allowed."""
    resolver = None if allow_insecure else PublicResolver()
    return aiohttp.TCPConnector(ssl=ssl, resolver=resolver, **kw)  # type: ignore[arg-type]


async def read_capped(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The answer's body, at most ``limit`` bytes on the wire and ``limit`` bytes inflated.

    The session must be made with ``auto_decompress=False``. Raises ResponseTooLarge (a
    ClientPayloadError) past the cap, ClientPayloadError for an encoding that cannot be inflated.
    """
    length = resp.content_length
    if length is not None:
        if length > limit:
            resp.close()
            raise ResponseTooLarge(f"answer of {length} bytes, over the cap of {limit}")
        body = await resp.read()  # Content-Length bounds what the parser reads
    else:
        parts: list[bytes] = []
        size = 0
        while chunk := await resp.content.read(_CHUNK):
            size += len(chunk)
            if size > limit:
                resp.close()
                raise ResponseTooLarge(f"answer over the cap of {limit} bytes")
            parts.append(chunk)
        body = b"".join(parts)
    coding = resp.headers.get("Content-Encoding")
    return body if coding is None else decode(body, coding, limit)


def decode(body: bytes, coding: str, limit: int) -> bytes:
    """Undo a Content-Encoding (gzip, deflate, identity), producing at most ``limit`` bytes."""
    codings = [c.strip().lower() for c in coding.split(",") if c.strip() and c.strip().lower() != "identity"]
    if len(codings) > _MAX_CODINGS:
        raise aiohttp.ClientPayloadError(f"Content-Encoding with {len(codings)} layers")
    for c in reversed(codings):
        if c in ("gzip", "x-gzip"):
            body = _inflate(body, 16 + zlib.MAX_WBITS, limit, members=True)
        elif c == "deflate":
            try:
                body = _inflate(body, zlib.MAX_WBITS, limit)
            except zlib.error:  # raw deflate, as some servers send it
                body = _inflate(body, -zlib.MAX_WBITS, limit)
        else:
            raise aiohttp.ClientPayloadError(f"unsupported Content-Encoding {c!r}")
    return body


def _inflate(data: bytes, wbits: int, limit: int, *, members: bool = False) -> bytes:
    out: list[bytes] = []
    size = 0
    while data:
        d = zlib.decompressobj(wbits)
        try:
            chunk = d.decompress(data, limit - size + 1)
        except zlib.error:
            if wbits > 0 and wbits < 16:
                raise  # decode() retries as raw deflate
            raise aiohttp.ClientPayloadError("corrupt compressed answer") from None
        size += len(chunk)
        if size > limit:
            raise ResponseTooLarge(f"answer inflates past the cap of {limit} bytes")
        out.append(chunk)
        if not d.eof:
            raise aiohttp.ClientPayloadError("truncated compressed answer")
        data = d.unused_data if members else b""
    return b"".join(out)


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _bare(host: str) -> str:
    return host.lower().rstrip(".")
