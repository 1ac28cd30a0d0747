"""OCPI credentials: the registration with the IOP (C1–C4), and the directory the forwarder reads.

Token names follow the role they play, not the letters of the spec (which swap with direction):
``incoming`` is what the IOP presents to us, ``outgoing`` what we present to the IOP.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
import msgspec
import structlog

from relay import logs, urls
from relay.config import Settings
from relay.errors import RelayError
from relay.ocpi_client import StaticDirectory, authorization, ssl_context
from relay.store import RegistrationStore
from relay.store.registration import is_digest, token_digest

log = structlog.get_logger(__name__)
VERSION = "2.2.1"
_COUNTRY, _PARTY = re.compile(r"[A-Z]{2}"), re.compile(r"[A-Z0-9]{3}")
# The IOP endpoints the relay cannot work without (3003 when one is missing): the Receivers the forwarder
# pushes to. Without one, that module's first event would pause the whole link (NotConfigured).
REQUIRED_ENDPOINTS = tuple((m, "RECEIVER") for m in ("locations", "sessions", "cdrs", "tariffs"))


class Endpoint(msgspec.Struct, frozen=True):
    """One module endpoint of a peer's version details."""

    identifier: str
    role: str
    url: str


class BusinessDetails(msgspec.Struct, omit_defaults=True):
    name: str
    website: str | None = None


class CredentialsRole(msgspec.Struct, omit_defaults=True):
    role: str
    business_details: BusinessDetails
    party_id: str
    country_code: str


class Credentials(msgspec.Struct, omit_defaults=True):
    """The OCPI Credentials object."""

    token: str
    url: str
    roles: list[CredentialsRole]


class Registration(msgspec.Struct, kw_only=True):
    """The connection with the IOP as stored in Redis."""

    state: Literal["registered", "unregistered"]
    direction: Literal["from_iop", "to_iop"]
    incoming_token: str  # stored as its digest (the relay only compares it); in clear only as just made
    outgoing_token: str
    versions_url: str
    version_url: str
    endpoints: list[Endpoint]
    roles: list[CredentialsRole] = []
    registered_at: float
    updated_at: float

    def receiver(self, module: str, role: str = "RECEIVER") -> str | None:
        """The IOP's endpoint of a module in a role (Receiver: where we push)."""
        for e in self.endpoints:
            if e.identifier == module and e.role.upper() == role:
                return e.url
        return None

    def hub_party(self, configured: tuple[str, str]) -> tuple[str, str] | None:
        """T3: the IOP operator as the handshake names it (GIREVE: its HUB role, FR/107 in pre-production,
        FR/007 in production): of its HUB roles the ``configured`` one if listed, else the first; else its
        only role; None if none fits (or its ids are no CiString(2)/(3): they go into headers)."""
        ids = [(r.role.upper(), r.country_code.upper(), r.party_id.upper()) for r in self.roles]
        ok = [(role, (cc, pid)) for role, cc, pid in ids if _COUNTRY.fullmatch(cc) and _PARTY.fullmatch(pid)]
        hubs = [party for role, party in ok if role == "HUB"] or [party for _, party in ok if len(ids) == 1]
        return configured if configured in hubs else next(iter(hubs), None)


HandshakeKind = Literal["unusable", "unsupported_version", "no_matching_endpoints"]
_PUBLIC: dict[HandshakeKind, tuple[int, str]] = {"unusable": (3001, "Unable to use the client's API"),
    "unsupported_version": (3002, f"Unsupported version: the relay speaks OCPI {VERSION} only"),
    "no_matching_endpoints": (3003, "No matching endpoints")}  # fmt: skip
_KIND_OF_CODE = {code: kind for kind, (code, _) in _PUBLIC.items()}


class HandshakeError(RelayError):
    """The peer's versions, details or credentials answer was unusable; nothing was stored. ``kind`` and
    ``ocpi_code``: 3001 the peer's API unusable, 3002 no version in common, 3003 an endpoint the relay needs
    is missing. ``public``: what the peer may be told; the message (URLs, errors) is for the log only."""

    def __init__(self, message: str, kind: HandshakeKind = "unusable", public: str = "") -> None:
        super().__init__(message)
        self.kind = kind
        self.ocpi_code, default = _PUBLIC[kind]
        self.public = public or default


def new_token() -> str:
    """A fresh random token (URL-safe, 43 characters: under OCPI's string(64))."""
    return secrets.token_urlsafe(32)


def our_credentials(settings: Settings, token: str) -> Credentials:
    """Our Credentials object: one CPO role per hosted operator, and our versions URL."""
    roles = [CredentialsRole(role="CPO", business_details=BusinessDetails(name=op.name), party_id=op.party_id,
                             country_code=op.country_code) for op in settings.operators]  # fmt: skip
    return Credentials(token=token, url=versions_url(settings), roles=roles)


def public_base(settings: Settings) -> str:
    """Base URL under which the IOP reaches our OCPI listener."""
    if settings.ocpi.public_url:
        return settings.ocpi.public_url.rstrip("/")
    host, _, port = settings.ocpi.listen.rpartition(":")
    host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    return f"http://{host}:{port}/ocpi"


def versions_url(settings: Settings) -> str:
    """Our versions endpoint, as announced to the IOP."""
    return f"{public_base(settings)}/versions"


# -- talking to the peer's versions and details ----------------------------------------------------


class _Envelope(msgspec.Struct):
    status_code: int
    data: Any = None
    status_message: str | None = None


class _Version(msgspec.Struct):
    version: str
    url: str


class _Details(msgspec.Struct):
    version: str
    endpoints: list[Endpoint]


def _client(settings: Settings) -> aiohttp.ClientSession:
    """The handshake's HTTP client: public addresses only (unless allowed), answers capped, no redirects
    (each request passes ``allow_redirects=False``: a redirect is a failed handshake)."""
    timeout = aiohttp.ClientTimeout(total=settings.iop.connect_timeout_s + settings.iop.request_timeout_s)
    connector = urls.connector(ssl=ssl_context(settings.iop) or True, allow_insecure=settings.ocpi.allow_insecure_urls)
    return aiohttp.ClientSession(timeout=timeout, connector=connector, auto_decompress=False,
                                 headers={"Accept-Encoding": urls.ACCEPT_ENCODING})  # fmt: skip


def _check(settings: Settings, url: str, what: str) -> None:
    """A URL named by the peer (or the operator) that the handshake is about to call; HandshakeError if refused."""
    try:
        urls.check_handshake_url(url, allow_insecure=settings.ocpi.allow_insecure_urls)
    except urls.UrlRefused as exc:
        raise HandshakeError(f"{what} {url!r} refused: {exc}") from None


async def _get_ocpi(http: aiohttp.ClientSession, settings: Settings, url: str, token: str) -> Any:
    headers = {"Authorization": authorization(token), "X-Request-ID": new_token()[:16]}
    headers["X-Correlation-ID"] = headers["X-Request-ID"]
    try:
        async with http.get(url, headers=headers, allow_redirects=False) as resp:
            if resp.status != 200:
                raise HandshakeError(f"GET {url}: HTTP {resp.status}")
            body = await urls.read_capped(resp, settings.iop.max_response_bytes)
    except aiohttp.ClientError as exc:
        raise HandshakeError(f"GET {url}: {exc.__class__.__name__}: {exc}") from exc
    try:
        env = msgspec.json.decode(body, type=_Envelope)
    except msgspec.DecodeError as exc:
        raise HandshakeError(f"GET {url}: not an OCPI answer: {exc}") from exc
    if not 1000 <= env.status_code < 2000:
        raise HandshakeError(f"GET {url}: OCPI {env.status_code} {env.status_message or ''}")
    return env.data


async def discover(http: aiohttp.ClientSession, settings: Settings, versions: str,
                   token: str) -> tuple[str, list[Endpoint]]:  # fmt: skip
    """GET the peer's versions, pick 2.2.1, GET its details: (version URL, endpoints).

    Every URL called or kept (versions, version details, each endpoint: where the peer's token will
    go) must pass the outbound policy (``urls.check_handshake_url``).
    """
    _check(settings, versions, "versions URL")
    try:
        listed = msgspec.convert(await _get_ocpi(http, settings, versions, token), list[_Version])
    except msgspec.ValidationError as exc:
        raise HandshakeError(f"versions: {exc}") from exc
    chosen = next((v for v in listed if v.version == VERSION), None)
    if chosen is None:
        raise HandshakeError(f"unsupported version (OCPI 3002): the peer offers {[v.version for v in listed]}, "
                             f"not {VERSION}", "unsupported_version")  # fmt: skip
    _check(settings, chosen.url, "version details URL")
    try:
        details = msgspec.convert(await _get_ocpi(http, settings, chosen.url, token), _Details)
    except msgspec.ValidationError as exc:
        raise HandshakeError(f"version details: {exc}") from exc
    for e in details.endpoints:
        _check(settings, e.url, f"{e.identifier} endpoint")
    have = {(e.identifier, e.role.upper()) for e in details.endpoints}
    if missing := [f"{m} {role}" for m, role in REQUIRED_ENDPOINTS if (m, role) not in have]:
        raise HandshakeError(f"no matching endpoints (OCPI 3003): the peer's {VERSION} details lack "
                             f"{', '.join(missing)}", "no_matching_endpoints",
                             f"No matching endpoints: the relay needs {', '.join(missing)}")  # fmt: skip
    return chosen.url, details.endpoints


def _registered(direction: Literal["from_iop", "to_iop"], incoming: str, outgoing: str, versions: str,
                discovered: tuple[str, list[Endpoint]], roles: list[CredentialsRole]) -> Registration:  # fmt: skip
    now = time.time()
    return Registration(state="registered", direction=direction, incoming_token=incoming, outgoing_token=outgoing,
                        versions_url=versions, version_url=discovered[0], endpoints=discovered[1], roles=roles,
                        registered_at=now, updated_at=now)  # fmt: skip


async def accept_from_iop(settings: Settings, offered: Credentials) -> Registration:
    """Register – FromIOP: check the IOP's versions with its token, and make a fresh token for it.

    Raises HandshakeError: 3002 when the IOP offers no 2.2.1, 3003 when it lacks an endpoint the relay
    needs (``REQUIRED_ENDPOINTS``), 3001 for anything else (credentials.asciidoc, "Errors during
    registration", "Required endpoints not available").
    """
    async with _client(settings) as http:
        discovered = await discover(http, settings, offered.url, offered.token)
    return _registered("from_iop", new_token(), offered.token, offered.url, discovered, offered.roles)


async def register_to_iop(settings: Settings, versions: str, token_a: str, token_b: str) -> Registration:
    """Register – ToIOP: discover with A, POST our credentials carrying B, keep the returned token.

    Raises HandshakeError: without 2.2.1 at the IOP (3002) or an endpoint the relay needs (3003) no
    credentials are POSTed; the IOP's own refusal keeps its 3002/3003 as the error's kind.
    """
    async with _client(settings) as http:
        discovered = await discover(http, settings, versions, token_a)
        cred_url = next((e.url for e in discovered[1] if e.identifier == "credentials"), None)
        if cred_url is None:
            raise HandshakeError("version details: no credentials endpoint")
        body = msgspec.json.encode(our_credentials(settings, token_b))
        headers = {"Authorization": authorization(token_a), "Content-Type": "application/json"}
        headers["X-Request-ID"] = headers["X-Correlation-ID"] = new_token()[:16]
        try:
            async with http.post(cred_url, data=body, headers=headers, allow_redirects=False) as resp:
                raw, status = await urls.read_capped(resp, settings.iop.max_response_bytes), resp.status
        except aiohttp.ClientError as exc:
            raise HandshakeError(f"POST {cred_url}: {exc}") from exc
    theirs = _posted(cred_url, status, raw)
    return _registered("to_iop", token_b, theirs.token, versions, discovered, theirs.roles)


def _posted(url: str, status: int, raw: bytes) -> Credentials:
    """The peer's answer to our credentials POST: its credentials, or a HandshakeError saying why not
    (its OCPI 3002/3003 keep their kind: the operator learns the peer found no version or endpoints)."""
    try:
        env: _Envelope | None = msgspec.json.decode(raw, type=_Envelope)
    except msgspec.DecodeError:
        env = None
    if status not in (200, 201) or (env is not None and not 1000 <= env.status_code < 2000):
        said = f"OCPI {env.status_code} {env.status_message or ''}".strip() if env else repr(raw[:200])
        raise HandshakeError(f"POST {url}: the peer refused the registration: HTTP {status}, {said}",
                             _KIND_OF_CODE.get(env.status_code if env else 0, "unusable"))  # fmt: skip
    try:
        return msgspec.convert(env.data if env is not None else None, Credentials)
    except msgspec.ValidationError as exc:
        raise HandshakeError(f"POST {url}: bad credentials answer: {exc}") from exc


class Directory:
    """IopDirectory for the forwarder: the registration when there is one, else the static [iop] values.

    An unregistered connection has no endpoints at all (C2): the forwarder pauses, the ingress
    keeps queueing.
    """

    def __init__(self, settings: Settings) -> None:
        self.static = StaticDirectory(settings.iop)
        self.registration: Registration | None = None
        # Configured in [ocpi] command_response_origins (validated by config.load).
        self._configured = frozenset(urls.parse_origin(o) for o in settings.ocpi.command_response_origins)
        self._derived: tuple[Registration | None, frozenset[str], tuple[str, str]] | None = None

    def endpoint(self, module: str, role: str = "RECEIVER") -> str | None:
        reg = self.registration
        if reg is None:
            return self.static.endpoint(module, role)
        return reg.receiver(module, role) if reg.state == "registered" else None

    def token(self) -> str | None:
        reg = self.registration
        if reg is None:
            return self.static.token()
        return reg.outgoing_token if reg.state == "registered" else None

    def origins(self) -> frozenset[str]:
        """Where the IOP's token may go: the registration's URLs, ``[iop] url``, and the configured extras.

        A command's response_url must be on one of these (checked when the command arrives and
        before each attempt): the hub's token never goes to a host the hub merely named.
        """
        return self._derive()[1]

    def iop_party(self) -> tuple[str, str]:
        """T3: OCPI-to-* of every request: the registration's HUB role, else ``[iop]`` country/party."""
        return self._derive()[2]

    def _derive(self) -> tuple[Registration | None, frozenset[str], tuple[str, str]]:
        """What follows from the registration, read per event: computed once per registration."""
        reg = self.registration
        if self._derived is None or self._derived[0] is not reg:
            found = set(self.static.origins()) | self._configured
            if reg is not None and reg.state == "registered":
                for url in (reg.versions_url, reg.version_url, *(e.url for e in reg.endpoints)):
                    if (o := urls.origin_or_none(url)) is not None:
                        found.add(o)
            static = self.static.iop_party()
            self._derived = (reg, frozenset(found), (reg.hub_party(static) if reg is not None else None) or static)
        return self._derived

    def usable(self) -> bool:
        """True when there is somewhere to deliver and a token to do it with."""
        return self.token() is not None and any(self.endpoint(m) for m in ("locations", "sessions", "cdrs", "tariffs"))


registration_codec = (msgspec.json.Encoder(), msgspec.json.Decoder(Registration))


def digest(token: str) -> str:
    """How a token the relay only compares is stored (tokens A, the incoming token): never in clear."""
    return token_digest(token)


@dataclass(frozen=True, slots=True)
class TokenAClaim:
    """A token A spent by a registration that is under way (``Registry.claim_token_a``)."""

    token: str
    pending: bool  # it was the pending token A (``relay register --from-iop``), not ``[ocpi] token_a``


class Registry:
    """The registration as this replica knows it; refreshed from Redis so replicas agree."""

    def __init__(self, settings: Settings, store: RegistrationStore) -> None:
        self.settings = settings
        self.store = store
        self.directory = Directory(settings)
        self.pending_a: str | None = None  # the pending token A's digest
        self._used: set[str] = set()
        self._incoming = ""  # the registered incoming token's digest
        self._raw: bytes | None = None
        self.generation = 0  # bumped on every change, whoever made it
        self.changed = asyncio.Event()  # set on every change, so the service reacts at once

    @property
    def registration(self) -> Registration | None:
        return self.directory.registration

    async def refresh(self) -> bool:
        """Reload from Redis; True if the registration changed."""
        raw, pending, used = await self.store.load()
        self.pending_a, self._used = pending, used
        if raw == self._raw:
            return False
        self._raw = raw
        self.directory.registration = registration_codec[1].decode(raw) if raw else None
        reg = self.directory.registration
        incoming = reg.incoming_token if reg is not None else ""
        self._incoming = incoming if not incoming or is_digest(incoming) else digest(incoming)  # an older version's
        if reg is not None and reg.outgoing_token:
            logs.add_secrets([reg.outgoing_token])
        if (party := self.directory.iop_party()) != (configured := self.directory.static.iop_party()):
            log.warning("iop_party_differs", handshake="/".join(party), configured="/".join(configured),
                        hint="OCPI-to-* follows the handshake; make [iop] country_code/party_id match")  # fmt: skip
        self.generation += 1
        self.changed.set()
        return True

    def is_token_a(self, token: str) -> bool:
        """True if the token may still open a Register – FromIOP (the pending token A or [ocpi] token_a)."""
        d = digest(token)
        if d in self._used:
            return False
        configured = self.settings.ocpi.token_a
        return any(secrets.compare_digest(d, a) for a in (self.pending_a, configured and digest(configured)) if a)

    def role_of(self, token: str) -> Literal["registered", "token_a"] | None:
        """What a presented (decoded) token is: the current incoming token, a token A, or nothing.

        Compared by digest: that is all Redis holds of them.
        """
        reg = self.registration
        if reg is not None and reg.state == "registered" and self._incoming:
            if secrets.compare_digest(digest(token), self._incoming):
                return "registered"
        return "token_a" if self.is_token_a(token) else None

    async def claim_token_a(self, token: str) -> TokenAClaim | None:
        """Spend a token A as its registration starts, atomically in Redis: of concurrent registrations
        with one token A, one gets the claim and the others None (they are answered like an unknown
        token). ``release_token_a`` gives it back if the handshake fails before anything is stored."""
        configured = bool(self.settings.ocpi.token_a) and secrets.compare_digest(token, self.settings.ocpi.token_a)
        got = await self.store.claim_token_a(token, configured=configured)
        if not got:
            return None
        self._used.add(digest(token))  # refused on this replica at once; refresh() confirms
        return TokenAClaim(token, pending=got == 2)

    async def release_token_a(self, claim: TokenAClaim) -> None:
        """The handshake failed and stored nothing: the token A works again (GIREVE may retry with it)."""
        await self.store.release_token_a(claim.token, pending=claim.pending)
        self._used.discard(digest(claim.token))

    async def save(self, reg: Registration, used_token_a: str | None = None) -> None:
        """Persist a (re-)registration; the token A that opened it stops working.

        The incoming token is stored as its digest (``reg`` itself, which the caller may still answer
        with, keeps it in clear).
        """
        if reg.incoming_token and not is_digest(reg.incoming_token):
            logs.add_secrets([reg.incoming_token])  # made by this process: never logged by it either
            reg = msgspec.structs.replace(reg, incoming_token=digest(reg.incoming_token))
        raw = registration_codec[0].encode(reg)
        await self.store.save(raw, digest(used_token_a) if used_token_a else None)
        await self.refresh()
        log.info("registered", direction=reg.direction, versions_url=reg.versions_url,
                 endpoints=len(reg.endpoints), iop_party="/".join(self.directory.iop_party()))  # fmt: skip

    async def hash_stored_tokens(self, *, registration: bool = True) -> bool:
        """An older version stored the pending token A and the incoming token in clear: store their
        digests instead (once, at start; the server then rewrites its AOF). True if anything changed.

        ``registration=False`` leaves the registration's incoming token as it is (a shared Redis: replicas
        of the older version still compare it in clear during a rolling upgrade); it is hashed by the
        next registration, and this version compares either form.
        """
        raw = (await self.store.load())[0]
        reg = registration_codec[1].decode(raw) if raw else None
        hashed = None
        if reg is not None and reg.incoming_token and not is_digest(reg.incoming_token):
            if registration:
                stored = msgspec.structs.replace(reg, incoming_token=digest(reg.incoming_token))
                hashed = registration_codec[0].encode(stored)
            else:
                log.warning("incoming_token_in_clear", hint="stored by an older version; register again "
                            "(relay register --from-iop) once every replica runs this version")  # fmt: skip
        changed = await self.store.hash_clear_tokens(raw if hashed else None, hashed)
        if changed:
            log.info("stored_tokens_hashed", hint="tokens kept in clear by an older version are now digests")
            await self.refresh()
        return changed

    async def unregister(self) -> bool:
        """C2: forget the tokens, keep the record (state unregistered); False if not registered."""
        reg = self.registration
        if reg is None or reg.state != "registered":
            return False
        reg = msgspec.structs.replace(reg, state="unregistered", incoming_token="", outgoing_token="",
                                      updated_at=time.time())  # fmt: skip
        await self.store.save(registration_codec[0].encode(reg))
        await self.refresh()
        log.warning("unregistered", hint="events keep queueing until a new registration")
        return True


async def unregister_at_iop(settings: Settings, reg: Registration) -> str | None:
    """DELETE our credentials at the IOP; returns a problem description, or None if it agreed."""
    url = next((e.url for e in reg.endpoints if e.identifier == "credentials"), None)
    if url is None:
        return "no credentials endpoint"
    try:
        _check(settings, url, "credentials endpoint")
    except HandshakeError as exc:
        return str(exc)
    headers = {"Authorization": authorization(reg.outgoing_token)}
    headers["X-Request-ID"] = headers["X-Correlation-ID"] = new_token()[:16]
    try:
        async with _client(settings) as http, http.delete(url, headers=headers, allow_redirects=False) as resp:
            return None if resp.status == 200 else f"HTTP {resp.status}"
    except aiohttp.ClientError as exc:
        return f"{exc.__class__.__name__}: {exc}"
