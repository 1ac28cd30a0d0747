"""Weak settings, valid but unsafe: warned about by ``relay check-config``, ``relay serve``, ``relay register``.

Validation (relay.config) refuses what cannot work; these checks name what works but should not
reach production: a short ingress token, an ingress reachable from the network (it has no TLS), an
IOP spoken to in clear, a public URL the IOP cannot use safely while a registration is pending. One of
them is a refusal where it matters: ``announce_refusal``, for ``relay register``, which hands that URL over.
Pure: settings in, warnings out, nothing logged or printed here.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from relay import urls
from relay.config import Settings

__all__ = ["MIN_INGRESS_TOKEN_CHARS", "ConfigWarning", "announce_refusal", "config_warnings", "is_loopback"]

# A bearer token is the ingress's only lock: 16 random characters are 64 bits in hex, 96 in base64;
# `openssl rand -hex 32` gives 64 characters.
MIN_INGRESS_TOKEN_CHARS = 16


@dataclass(frozen=True, slots=True)
class ConfigWarning:
    """One weak setting: the key, what is wrong with it, and what to do instead."""

    key: str
    message: str
    hint: str

    def __str__(self) -> str:
        # No "key: value" shape: the log redaction would take the words after "token:" for a secret.
        return f"{self.key} — {self.message}; {self.hint}"


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1): no other host is reached from here only."""
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def _is_http(url: str) -> bool:
    return url.strip().lower().startswith("http://")


def _ingress(settings: Settings) -> list[ConfigWarning]:
    found: list[ConfigWarning] = []
    tokens = settings.ingress.tokens()
    short = [i for i, t in enumerate(tokens, 1) if len(t) < MIN_INGRESS_TOKEN_CHARS]
    if short:
        which = "the token" if len(tokens) == 1 else "token " + ", ".join(f"#{i}" for i in short) + f" of {len(tokens)}"
        found.append(ConfigWarning(
            "ingress.token",
            f"{which} is shorter than {MIN_INGRESS_TOKEN_CHARS} characters",
            "use a long random value, e.g. `openssl rand -hex 32`",
        ))  # fmt: skip
    admin = settings.admin.tokens()
    if any(len(t) < MIN_INGRESS_TOKEN_CHARS for t in admin):  # it replays and purges dead letters
        found.append(ConfigWarning(
            "admin.token", f"an admin token is shorter than {MIN_INGRESS_TOKEN_CHARS} characters",
            "use a long random value, e.g. `openssl rand -hex 32`",
        ))  # fmt: skip
    host = settings.ingress.listen.rpartition(":")[0]
    if not is_loopback(host):
        found.append(ConfigWarning(
            "ingress.listen",
            f"{settings.ingress.listen} is not a loopback address and the ingress has no TLS: its token, the events, "
            "/metrics and /readyz are open to whoever reaches that address",
            "listen on 127.0.0.1 (the CSMS runs on the same host or in the same pod); in a container, publish "
            "the port on loopback or a private network only",
        ))  # fmt: skip
    return found


def _urls(settings: Settings, registering: bool, iop_versions_url: str) -> list[ConfigWarning]:
    found: list[ConfigWarning] = []
    for key, url in (("iop.url", settings.iop.url), ("register --versions-url", iop_versions_url)):
        if _is_http(url):
            found.append(ConfigWarning(
                key, f"{url} is plain http: tokens and events go to the IOP in clear", "use the IOP's https:// URL"
            ))  # fmt: skip
    if registering:
        public = settings.ocpi.public_url
        if not public:
            found.append(ConfigWarning(
                "ocpi.public_url",
                "unset while registering: the IOP is told a URL made from ocpi.listen (http://…/ocpi), "
                "which it cannot reach and which has no TLS",
                "set it to the https:// URL of your TLS front, e.g. https://ocpi.cpo.example/ocpi",
            ))  # fmt: skip
        elif _is_http(public):
            found.append(ConfigWarning(
                "ocpi.public_url",
                f"{public} is plain http while registering: the IOP would send its token to it in clear",
                "put the OCPI listener behind TLS (or set ocpi.tls_cert_file) and announce its https:// URL",
            ))  # fmt: skip
    return found


# A shard lives on one Cluster node (its keys share {rN}): with fewer shards than this, three primaries
# get an uneven share and some may get none.
MIN_CLUSTER_SHARDS = 16


def _redis(settings: Settings) -> list[ConfigWarning]:
    found: list[ConfigWarning] = []
    r = settings.redis
    if r.cluster and r.shards < MIN_CLUSTER_SHARDS:
        found.append(ConfigWarning(
            "redis.shards",
            f"{r.shards} shards on a Cluster: a shard lives on one node, so few shards spread unevenly",
            f"use {MIN_CLUSTER_SHARDS} or more before the first start (the count is fixed for the life of the data)",
        ))  # fmt: skip
    if "+sentinel://" in r.url and r.ack_replicas == 0:
        found.append(ConfigWarning(
            "redis.ack_replicas",
            "0 with Sentinel: a 202 does not wait for a replica, so a failover can lose events already answered 202",
            "leave it at auto (1), and run two replicas so that one remains after a failover",
        ))  # fmt: skip
    return found


def config_warnings(
    settings: Settings, *, registering: bool = False, iop_versions_url: str = ""
) -> list[ConfigWarning]:
    """Every weak setting of ``settings``, in a stable order.

    ``registering``: a credentials handshake is pending or being started (``[ocpi] token_a`` set, or
    ``relay register``), so the public URL is about to be handed to the IOP. ``iop_versions_url``: the
    hub's versions URL of ``relay register --versions-url``.
    """
    return _ingress(settings) + _urls(settings, registering, iop_versions_url) + _redis(settings)


def announce_refusal(settings: Settings) -> str | None:
    """Why the relay's versions URL must not be handed to the IOP (``relay register``), or None.

    T4: the IOP sends its token to that URL, so it must be ``[ocpi] public_url`` and https on a public
    host (``urls.check_handshake_url``, the rule the handshake applies to the IOP's URLs); an unset
    ``public_url`` would announce ``http://<listen>/ocpi``, which the IOP cannot reach and which has no
    TLS. ``[ocpi] allow_insecure_urls`` (test set-ups, private networks) lifts the rule, as it does for
    the IOP's URLs; the weak setting is then only warned about (``config_warnings``).
    """
    if settings.ocpi.allow_insecure_urls:
        return None
    public = settings.ocpi.public_url
    allow = "or, for a test set-up, [ocpi] allow_insecure_urls = true (RELAY_OCPI_ALLOW_INSECURE_URLS=true)"
    if not public:
        return ("ocpi.public_url is unset: the IOP would be handed http://<ocpi.listen>/ocpi, which it cannot "
                f"reach and which has no TLS; set it to the https:// URL of your TLS front, {allow}")  # fmt: skip
    try:
        urls.check_handshake_url(public, allow_insecure=False)
    except urls.UrlRefused as exc:
        return f"ocpi.public_url {public} cannot be handed to the IOP ({exc}): announce an https:// public URL, {allow}"
    return None
