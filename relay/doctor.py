"""``relay doctor``: check a set-up before go-live; one result per check (ok, warn, fail, skip), a hint per problem.

What is checked, in this order (``Check.name``):

- ``config``: the configuration loads as ``relay serve`` loads it (file + env, ``serve_problems``); each weak
  setting of relay.config_checks is a warning. An invalid configuration stops there.
- ``redis``: the relay's Redis answers: the embedded server of a relay running on ``[storage] dir`` (doctor
  never starts one), or ``[redis] url``.
- ``persistence``: ``appendonly yes`` and an ``appendfsync`` that keeps a 202-ed event through a crash of the
  host (``always``, or ``everysec`` with 202s that wait for an fsync or a replica; ``everysec`` alone warns).
- ``eviction``: ``maxmemory-policy noeviction`` (any other policy may drop queued events silently). A server
  that refuses CONFIG (a managed Redis) is a warning, not a failure: ``INFO persistence`` still says whether
  the append-only file is on.
- ``durability``: what a 202 waits for (relay.store.durability, ``AckPolicy.describe()``).
- ``registration``: registered, pending (a token A waits for the IOP), static (``[iop] url`` and token), none.
- ``public_url``: ``[ocpi] public_url`` set and https (plain http only with ``[ocpi] allow_insecure_urls``:
  a warning); ``public_versions``: a GET of its versions URL, without a token, is answered by the relay's
  OCPI listener (401 in the relay's envelope, our X-Request-ID echoed) or with a versions list;
  ``public_certificate``: the certificate the TLS front presents, as the check's connection saw it.
- ``iop_versions``: the IOP's versions URL (the registration's, else ``[iop] url``) answers with the token the
  relay sends (the registration's, else ``[iop] token``) and the headers of the handshake's calls; 401/403 is
  a failure naming the token as ``…last4``.
- ``clock``: the host clock against the ``Date`` header of the IOP's answer: warn above ``CLOCK_WARN_S`` (5 s),
  fail above ``CLOCK_FAIL_S`` (60 s). The hub orders an object's updates by ``last_updated`` and checks the
  envelopes' timestamps: a clock a minute off makes fresh updates look stale or come from the future.
  ``Date`` has a resolution of one second and the round trip blurs it by half its time, hence 5 s of slack.
- ``certificate`` (``[ocpi] tls_cert_file``) and ``iop_certificate`` (``[iop] tls_cert_file``, the client
  certificate for mTLS): readable, matching its key, valid now; fail when expired or not yet valid, warn
  within ``CERT_WARN_DAYS`` (30) days of its end or when it does not name ``public_url``'s host.
- ``operators``: each hosted operator with its eMI3 operator id; duplicates fail, a foreign country or the
  example operator of config/relay.toml warn.

Read-only: nothing is written to Redis and nothing is registered. Every network call ends within the timeout
(``--timeout``, default ``DEFAULT_TIMEOUT_S``), so the whole run takes at most a few times it. No secret is
shown: tokens appear as ``…last4`` at most, and every text is scrubbed of the configured secrets and the
registration's token (and their base64) before it is returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import email.utils
import ssl
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp
import msgspec

from relay import constants as K
from relay.config import Settings
from relay.doctor_checks import (
    CERT_WARN_DAYS,
    CLOCK_FAIL_S,
    CLOCK_WARN_S,
    DEFAULT_TIMEOUT_S,
    Answer,
    Check,
    Report,
    check_certificate,
    check_config,
    check_operators,
    client_certificate_refused,
    failure,
    get,
    ocpi_said,
    peer_certificate,
    request_id,
    scrubber,
    tail,
    when,
)
from relay.errors import StoreError

if TYPE_CHECKING:
    from relay.credentials import Registry
    from relay.store import Store
    from relay.store.durability import AckPolicy

__all__ = [
    "CERT_WARN_DAYS", "CLOCK_FAIL_S", "CLOCK_WARN_S", "DEFAULT_TIMEOUT_S", "Check", "Report",
    "check_certificate", "check_config", "check_operators", "diagnose", "run",
]  # fmt: skip


# -- the checks that need Redis or the network -------------------------------------------------------------


@dataclass(slots=True)
class _Doctor:
    settings: Settings
    timeout_s: float
    secrets: list[str] = field(default_factory=list)  # found on the way (the registration's token)

    # 2. Redis -----------------------------------------------------------------------------------------

    async def open_store(self) -> tuple[Store | None, Check]:
        from relay.cli_common import storage_where
        from relay.embedded_redis import EmbeddedRedis
        from relay.store import Store, connect

        s = self.settings
        url, where = s.redis.url, storage_where(s)
        if not url:
            embedded = EmbeddedRedis(s.storage.dir, s.storage.durability)
            if not await embedded.answers():
                return None, Check("redis", "fail", f"no relay is running on data dir {embedded.dir} "
                                   f"(nothing answers on {embedded.socket})",
                                   "start `relay serve` with this configuration first (doctor never starts a "
                                   "server), or set [redis] url")  # fmt: skip
            url = embedded.url
        rs = msgspec.structs.replace(s.redis, socket_timeout_s=min(s.redis.socket_timeout_s, self.timeout_s))
        store = Store(connect(url, rs), rs)
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.timeout_s):
                await store.answer()
        except (StoreError, OSError, TimeoutError) as exc:
            await self.close(store)
            said = f"no answer within {self.timeout_s:g} s" if isinstance(exc, TimeoutError) else str(exc)
            hint = "start Redis, or fix [redis] url (host, port, password, TLS) and the firewall"
            return None, Check("redis", "fail", f"{where} does not answer: {said}", hint)
        ms = (time.monotonic() - started) * 1000
        running = " (a relay runs on it)" if not s.redis.url else ""
        return store, Check("redis", "ok", f"{where} answers{running}, PING {ms:.1f} ms")

    async def close(self, store: Store) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(store.close(), self.timeout_s)

    async def persistence(self, store: Store) -> list[Check]:
        """Rows ``persistence``, ``eviction`` and ``durability``."""
        from relay.store.durability import resolve

        servers, refused = await store.server_settings()
        rows: list[Check] = []
        if refused:  # CONFIG refused (a managed Redis): INFO still says whether AOF is on
            aof = await store.aof_enabled()
            found = {} if aof is None else {"appendonly": "yes" if aof else "no"}
        else:  # the weakest primary of a Cluster
            worst = min(servers, key=lambda c: (c.get("appendonly") == "yes", c.get("appendfsync") == "always"))
            found = {k: worst[k] for k in ("appendonly", "appendfsync") if k in worst}
        ack: AckPolicy | None = None
        try:
            ack = resolve(self.settings.redis, found, sentinel=store.sentinel)
        except ValueError as exc:
            durability = Check("durability", "fail", f"`relay serve` would refuse to start: {exc}",
                               "turn appendonly on, or set [redis] ack_fsync = auto")  # fmt: skip
        else:
            durability = Check("durability", "ok", ack.describe())
        if refused:
            hint = ("check with your provider: appendonly yes, appendfsync always (or everysec), "
                    "maxmemory-policy noeviction")  # fmt: skip
            if found.get("appendonly") == "no":
                rows.append(Check("persistence", "fail", f"append-only file off (INFO persistence; CONFIG refused: "
                                  f"{refused})", "turn persistence (AOF) on: queued events are lost at a "
                                  "restart"))  # fmt: skip
            else:
                on = "on (INFO persistence)" if found else "unknown"
                rows.append(Check("persistence", "warn", f"CONFIG refused ({refused}): append-only file {on}, "
                                  "appendfsync unknown", hint))  # fmt: skip
            rows.append(Check("eviction", "warn", "maxmemory-policy unknown (CONFIG refused)", hint))
        else:
            policies = [c.get("maxmemory-policy", "?") for c in servers]
            policy = next((p for p in policies if p != "noeviction"), "noeviction")
            rows += [self._aof(found, ack), self._eviction(policy, servers)]
        return [*rows, durability]

    @staticmethod
    def _aof(found: dict[str, str], ack: AckPolicy | None) -> Check:
        aof, fsync = found.get("appendonly", "?"), found.get("appendfsync", "?")
        said = f"appendonly {aof}, appendfsync {fsync}"
        if aof != "yes":
            return Check("persistence", "fail", f"{said}: queued events and the registration are lost when Redis "
                         "restarts", "appendonly yes (CONFIG SET appendonly yes, and in its config file or the "
                         "provider's persistence setting)")  # fmt: skip
        if fsync == "always" or (ack is not None and ack.fsync):
            return Check("persistence", "ok", f"{said}: a 202-ed event is on disk")
        if fsync == "everysec":
            if ack is not None and ack.replicas:
                return Check("persistence", "ok", f"{said}; each 202 waits for {ack.replicas} replica(s)")
            return Check("persistence", "warn", f"{said}: a crash of the host can lose the last second of "
                         "202-ed events", "appendfsync always on the server ([storage] durability = \"always\" "
                         "for the embedded one), or [redis] ack_fsync = true (each 202 waits for the next "
                         "fsync)")  # fmt: skip
        return Check("persistence", "fail", f"{said}: the OS writes the append-only file when it likes",
                     "appendfsync always (or everysec)")  # fmt: skip

    @staticmethod
    def _eviction(policy: str, servers: list[dict[str, str]]) -> Check:
        if policy != "noeviction":
            return Check("eviction", "fail", f"maxmemory-policy {policy}: at maxmemory Redis evicts keys, and "
                         "queued events, state or the registration vanish silently",
                         "maxmemory-policy noeviction (CONFIG SET, and in its config file): at the limit the "
                         "ingress then answers 503 and nothing is lost")  # fmt: skip
        limits = {c.get("maxmemory", "0") for c in servers}
        if limits <= {"0"}:
            return Check("eviction", "ok", "maxmemory-policy noeviction, no maxmemory: nothing is ever evicted")
        limit = f"maxmemory {max(int(v) for v in limits) // 2**20} MiB"
        return Check("eviction", "ok", f"maxmemory-policy noeviction, {limit}: at the limit writes are refused "
                     "(the ingress answers 503), nothing is dropped")  # fmt: skip

    # 3. registration ---------------------------------------------------------------------------------

    async def registration(self, store: Store) -> tuple[Check, Registry]:
        from relay.credentials import Registry, versions_url
        from relay.store import RegistrationStore

        s = self.settings
        registry = Registry(s, RegistrationStore(store))
        await registry.refresh()
        reg = registry.registration
        static = bool(s.iop.url and s.iop.token)
        if reg is not None and reg.state == "registered":
            self.secrets.append(reg.outgoing_token)
            since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(reg.registered_at))
            party, configured = "/".join(registry.directory.iop_party()), f"{s.iop.country_code}/{s.iop.party_id}"
            found = (f"registered ({reg.direction.replace('_', ' ')}) since {since}: IOP {party}, "
                     f"{reg.versions_url}, {len(reg.endpoints)} endpoints")  # fmt: skip
            if party != configured:
                return Check("registration", "warn", f"{found}; [iop] says {configured}",
                             f"set [iop] country_code/party_id to {party} (FR/107 pre-production, FR/007 "
                             "production)"), registry  # fmt: skip
            return Check("registration", "ok", found), registry
        pending = registry.pending_a is not None or bool(s.ocpi.token_a and registry.is_token_a(s.ocpi.token_a))
        if pending:
            extra = "; meanwhile [iop] url and token are used" if static else ""
            return Check("registration", "warn", f"pending: a token A waits for the IOP's Register – FromIOP{extra}",
                         f"hand GIREVE {versions_url(s)} and the token A (`relay register --from-iop` makes a new "
                         "one), then run `relay doctor` again"), registry  # fmt: skip
        if static:
            return Check("registration", "ok", f"static: [iop] url {s.iop.url} and [iop] token {tail(s.iop.token)}, "
                         "no handshake"), registry  # fmt: skip
        was = " (unregistered: the IOP's tokens were forgotten)" if reg is not None else ""
        return Check("registration", "fail", f"none{was}: nothing can be delivered, events only queue",
                     "`relay register --from-iop` and hand GIREVE the versions URL and token A it prints "
                     "(or set [iop] url and token)"), registry  # fmt: skip

    async def store_checks(self) -> tuple[list[Check], Registry | None]:
        """Redis, its persistence, what a 202 waits for, and the registration."""
        store, check = await self.open_store()
        if store is None:
            rows = [check] + [Check(n, "skip", "Redis unreachable") for n in ("persistence", "registration")]
            return rows, None
        rows, registry = [check], None
        try:
            async with asyncio.timeout(self.timeout_s * 2):
                rows += await self.persistence(store)
                reg_check, registry = await self.registration(store)
                rows.append(reg_check)
        except (StoreError, OSError, TimeoutError) as exc:
            said = "stopped answering" if isinstance(exc, TimeoutError) else f"{exc.__class__.__name__}: {exc}"
            rows.append(Check("redis", "fail", f"{said} during the checks", "check the server's log and load"))
        finally:
            await self.close(store)
        return rows, registry

    # 4. the public URL ------------------------------------------------------------------------------

    def public_url(self) -> Check:
        from relay.config_checks import announce_refusal
        from relay.credentials import public_base

        s = self.settings
        public = s.ocpi.public_url
        if not public:
            return Check("public_url", "fail", f"[ocpi] public_url is unset: the IOP would be handed {public_base(s)}, "
                         "which it cannot reach and which has no TLS",
                         "set it to the https:// URL of your TLS front, e.g. RELAY_OCPI_PUBLIC_URL="
                         "https://ocpi.cpo.example/ocpi")  # fmt: skip
        if refused := announce_refusal(s):
            return Check("public_url", "fail", refused, "announce the https:// URL of a public host")
        if public.lower().startswith("http://"):
            return Check("public_url", "warn", f"{public} is plain http, allowed by [ocpi] allow_insecure_urls",
                         "test set-ups only: production announces an https:// URL")  # fmt: skip
        return Check("public_url", "ok", f"{public} (https)")

    async def public_versions(self) -> list[Check]:
        from relay.credentials import versions_url

        s = self.settings
        if not s.ocpi.public_url:
            return [Check("public_versions", "skip", "no public_url")]
        url, rid = versions_url(s), request_id()
        hint = (f"route {url} to the OCPI listener ([ocpi] listen {s.ocpi.listen}) through your front, and run "
                "doctor where the URL resolves as it does for the IOP")  # fmt: skip
        tls = ssl.create_default_context()  # the system's trust store (SSL_CERT_FILE, SSL_CERT_DIR honoured)
        try:
            answer = await get(url, {K.H_REQUEST: rid, K.H_CORRELATION: rid}, self.timeout_s, tls)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            if s.ocpi.tls_client_ca_file and client_certificate_refused(exc):
                return [Check("public_versions", "warn", f"GET {url}: {failure(exc, self.timeout_s)} (the listener "
                              "asks for a client certificate: not checked from here)", hint)]  # fmt: skip
            return [Check("public_versions", "fail", f"GET {url}: {failure(exc, self.timeout_s)}", hint)]
        rows = [self._versions_answer(url, rid, answer, hint)]
        if urlsplit(url).scheme == "https":
            try:
                rows.append(self._front_certificate(await peer_certificate(url, tls, self.timeout_s)))
            except (OSError, TimeoutError, ssl.SSLError, KeyError, ValueError) as exc:
                rows.append(Check("public_certificate", "warn", f"not read: {exc.__class__.__name__}: {exc}"))
        return rows

    @staticmethod
    def _versions_answer(url: str, rid: str, answer: Answer, hint: str) -> Check:
        env = answer.envelope()
        if answer.status in (301, 302, 303, 307, 308):
            return Check("public_versions", "fail", f"GET {url}: HTTP {answer.status} to "
                         f"{answer.headers.get('Location', '?')}", "announce the final URL: the IOP's calls do not "
                         "follow redirects")  # fmt: skip
        if answer.status == 401 and env is not None and answer.headers.get(K.H_REQUEST) == rid:
            return Check("public_versions", "ok", f"GET {url}: the relay's OCPI listener answers (401 without a "
                         "token, as it should)")  # fmt: skip
        listed = env.get("data") if env is not None and answer.status == 200 else None
        if isinstance(listed, list) and any(isinstance(v, dict) and v.get("version") == "2.2.1" for v in listed):
            return Check("public_versions", "ok", f"GET {url}: versions answered, 2.2.1 listed")
        what = f"HTTP {answer.status}{ocpi_said(env)}"
        return Check("public_versions", "fail", f"GET {url}: {what}, not the relay's OCPI listener", hint)

    def _front_certificate(self, peercert: dict[str, Any]) -> Check:
        end = dt.datetime.fromtimestamp(ssl.cert_time_to_seconds(peercert["notAfter"]), dt.UTC)
        days = (end - dt.datetime.now(dt.UTC)).days
        found = f"the certificate of {self.settings.ocpi.public_url} is valid until {when(end)} ({days} days)"
        if days < CERT_WARN_DAYS:
            return Check("public_certificate", "warn", f"{found}: expires within {CERT_WARN_DAYS} days",
                         "renew the TLS front's certificate now")  # fmt: skip
        return Check("public_certificate", "ok", found)

    # 5. and 6. the IOP, and the clock -----------------------------------------------------------------

    async def iop(self, registry: Registry | None) -> tuple[Check, Answer | None]:
        from relay.ocpi_client import authorization, ssl_context

        s = self.settings
        reg = registry.registration if registry is not None else None
        if reg is not None and reg.state == "registered":
            url, token, whose = reg.versions_url, reg.outgoing_token, "the registration's token"
        elif s.iop.url:
            url, token, whose = s.iop.url, s.iop.token, "[iop] token"
        elif registry is None:
            return Check("iop_versions", "skip", "no IOP URL to call (Redis unreachable: registration unknown)"), None
        else:
            return Check("iop_versions", "skip", "no IOP URL to call (not registered, no [iop] url)",
                         "run `relay doctor` again once GIREVE has registered"), None  # fmt: skip
        rid = request_id()
        headers = {K.H_REQUEST: rid, K.H_CORRELATION: rid}  # as the handshake's calls: no OCPI-to/from (T3)
        if token:
            headers["Authorization"] = authorization(token)
        shown = f"{whose} {tail(token)}" if token else f"no token ({whose} is empty)"
        try:
            tls = ssl_context(s.iop) or ssl.create_default_context()
        except (OSError, ssl.SSLError) as exc:
            return Check("iop_versions", "fail", f"the TLS settings of [iop] cannot be loaded: {exc}",
                         "fix [iop] tls_ca_file, tls_cert_file, tls_key_file"), None  # fmt: skip
        try:
            answer = await get(url, headers, self.timeout_s, tls)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return Check("iop_versions", "fail", f"GET {url}: {failure(exc, self.timeout_s)}",
                         "check DNS, the firewall's egress to the IOP, [iop] tls_ca_file; the relay retries "
                         "meanwhile"), None  # fmt: skip
        return self._iop_answer(url, answer, shown, reg is not None and reg.state == "registered"), answer

    @staticmethod
    def _iop_answer(url: str, answer: Answer, shown: str, registered: bool) -> Check:
        env = answer.envelope()
        what = f"HTTP {answer.status}{ocpi_said(env)}"
        if answer.status in (401, 403):
            hint = ("the hub no longer takes the token it gave at registration: register again (`relay "
                    "unregister`, `relay register --from-iop`, hand GIREVE the new token A)" if registered else
                    "set [iop] token (RELAY_IOP_TOKEN or iop.token_file) to the token the IOP gave you")  # fmt: skip
            return Check("iop_versions", "fail", f"GET {url}: {what}: the IOP refused {shown}", hint)
        if answer.status != 200 or env is None or not 1000 <= env["status_code"] < 2000:
            return Check("iop_versions", "fail", f"GET {url}: {what} with {shown}",
                         "check the URL (the IOP's versions URL, or [iop] url: its 2.2.1 base)")  # fmt: skip
        data = env.get("data")
        if registered and isinstance(data, list):
            offered = [str(v.get("version")) for v in data if isinstance(v, dict)]
            if "2.2.1" not in offered:
                return Check("iop_versions", "fail", f"GET {url}: the IOP offers {offered}, not 2.2.1 (OCPI 3002)",
                             "ask the hub to enable OCPI 2.2.1 for this connection")  # fmt: skip
            return Check("iop_versions", "ok", f"GET {url} with {shown}: {what}, 2.2.1 offered")
        return Check("iop_versions", "ok", f"GET {url} with {shown}: {what}")

    @staticmethod
    def clock(answer: Answer | None) -> Check:
        if answer is None:
            return Check("clock", "skip", "no answer from the IOP to compare with")
        date = answer.headers.get("Date", "")
        try:
            when = email.utils.parsedate_to_datetime(date)
            # HTTP dates are GMT; a "-0000" or a missing zone parses as naive: GMT too, never the host's zone.
            theirs = (when if when.tzinfo else when.replace(tzinfo=dt.UTC)).timestamp()
        except (TypeError, ValueError):
            return Check("clock", "warn", f"the IOP's answer has no usable Date header ({date!r}): skew not measured",
                         "check the host clock is synchronised (chrony, systemd-timesyncd)")  # fmt: skip
        # Date is truncated to the second: the server's clock was in [theirs, theirs + 1) when it answered.
        skew = (answer.sent + answer.received) / 2 - (theirs + 0.5)
        found = f"{abs(skew):.1f} s {'ahead of' if skew > 0 else 'behind'} the IOP's Date header"
        hint = "synchronise the host clock (NTP: chrony, systemd-timesyncd); the hub compares timestamps with its own"
        if abs(skew) > CLOCK_FAIL_S:
            return Check("clock", "fail", f"{found} (more than {CLOCK_FAIL_S:g} s)", hint)
        if abs(skew) > CLOCK_WARN_S:
            return Check("clock", "warn", f"{found} (more than {CLOCK_WARN_S:g} s)", hint)
        return Check("clock", "ok", found)

    # 7. certificates of the configuration -----------------------------------------------------------

    def certificates(self, now: dt.datetime) -> list[Check]:
        s = self.settings
        rows: list[Check] = []
        public = urlsplit(s.ocpi.public_url)
        host = (public.hostname or "") if public.scheme == "https" else ""
        if s.ocpi.tls_cert_file:
            rows += check_certificate("certificate", s.ocpi.tls_cert_file, s.ocpi.tls_key_file, now, host)
        elif host:
            rows.append(Check("certificate", "ok", "none on the OCPI listener: TLS ends at the front of public_url"))
        else:
            rows.append(Check("certificate", "skip", "no [ocpi] tls_cert_file and public_url is not https"))
        if s.iop.tls_cert_file:
            rows += check_certificate("iop_certificate", s.iop.tls_cert_file, s.iop.tls_key_file, now)
        return rows


async def diagnose(settings: Settings, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[list[Check], list[str]]:
    """Every check past the configuration: (results in checklist order, secrets met on the way)."""
    doc = _Doctor(settings, timeout_s)
    (store_rows, registry), public_rows = await asyncio.gather(doc.store_checks(), doc.public_versions())
    iop_row, answer = await doc.iop(registry)
    rows = [*store_rows, doc.public_url(), *public_rows, iop_row, doc.clock(answer)]
    rows += doc.certificates(dt.datetime.now(dt.UTC))
    rows += check_operators(settings)
    return rows, doc.secrets


def run(config_path: Path | None, source: str = "", *, timeout_s: float = DEFAULT_TIMEOUT_S) -> Report:
    """The whole checklist, every text scrubbed of the secrets (to be printed as it is)."""
    from relay.logs import settings_secrets

    settings, rows = check_config(config_path, source)
    if settings is None:
        return Report(rows, config_valid=False)
    more, found = asyncio.run(diagnose(settings, timeout_s=timeout_s))
    scrub = scrubber([*settings_secrets(settings), *found])
    return Report([replace(c, found=scrub(c.found), hint=scrub(c.hint)) for c in [*rows, *more]])
