"""Settings: defaults → TOML file → ``RELAY_<SECTION>_<KEY>`` env → validation.

Every key of every section can be overridden by an env var named after it in upper case
(``[redis] url`` → ``RELAY_REDIS_URL``). Secrets are never written in the file itself: each secret
``X`` has an ``X_file`` companion, and the env var wins over both.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from relay import urls
from relay.errors import ConfigError
from relay.redis_url import sentinel_address

CiCountry = Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{2}$")]
CiParty = Annotated[str, msgspec.Meta(pattern=r"^[A-Z0-9]{3}$")]
Listen = Annotated[str, msgspec.Meta(pattern=r"^(\[[0-9a-fA-F:]+\]|[^:\s]+):\d{1,5}$")]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
Module = Literal["locations", "sessions", "cdrs", "tariffs", "commands"]
# "commands" carries CommandResults to the IOP's response_url, with the same guarantees.
MODULES: tuple[Module, ...] = ("locations", "sessions", "cdrs", "tariffs", "commands")
# Modules whose objects have a current state that supersedes their history (relay.state): a replayed dead
# letter of one of them sends that state (relay.dlq). A CDR or a command result is immutable: as it was.
STATEFUL_MODULES: frozenset[Module] = frozenset({"locations", "sessions", "tariffs"})


class RedisSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Where events are stored; an empty URL starts the embedded server."""

    url: str = ""
    # The URL is a seed node of a Redis/Valkey Cluster (redis-py's cluster client; shards spread over nodes).
    cluster: bool = False
    shards: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 4
    # What a 202 waits for (relay.store.durability; docs/operations.md "What can be lost when"). "auto":
    # the embedded server and a plain URL follow the server's own appendfsync, Sentinel waits for one replica.
    ack_fsync: bool | Literal["auto"] = "auto"
    ack_replicas: Annotated[int, msgspec.Meta(ge=0, le=16)] | Literal["auto"] = "auto"
    ack_timeout_ms: Annotated[int, msgspec.Meta(ge=1, le=60_000)] = 1000
    # The older names of ack_replicas/ack_timeout_ms, still read: wait_replicas > 0 with ack_replicas "auto"
    # means ack_replicas = wait_replicas and ack_timeout_ms = wait_timeout_ms.
    wait_replicas: Annotated[int, msgspec.Meta(ge=0)] = 0
    wait_timeout_ms: Annotated[int, msgspec.Meta(ge=0)] = 100
    socket_timeout_s: PositiveFloat = 5.0


class StorageSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Local data directory (embedded server's AOF, local state) and its fsync policy.

    ``dir``, as every path of the configuration (``PATH_KEYS``), is relative to the config file's directory
    (to the working directory without a file).
    """

    dir: str = "./data"
    durability: Literal["always", "everysec"] = "always"
    # The embedded server's maxmemory in MiB (noeviction: at it, writes are refused and the ingress answers
    # 503); 0 = no limit. Sized for ~0.5–1 million queued events; the container must hold it × 1.25 + ~150 MB.
    max_memory_mib: Annotated[int, msgspec.Meta(ge=0)] = 1024


class IngressSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The localhost listener the CSMS and operators call."""

    listen: Listen = "127.0.0.1:8780"
    token: str = ""
    token_file: str = ""
    max_body_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 1_048_576
    max_batch_items: Annotated[int, msgspec.Meta(ge=1)] = 5000
    profile: Literal["strict", "warn"] = "strict"
    shutdown_timeout_s: PositiveFloat = 10.0
    # Connection limits (relay.listeners): a request line and headers complete within header_timeout_s
    # of the accept, an idle keep-alive connection closed after idle_timeout_s, at most max_connections
    # open at once (the next ones wait in the kernel's accept queue).
    header_timeout_s: PositiveFloat = 10.0
    idle_timeout_s: PositiveFloat = 120.0
    max_connections: Annotated[int, msgspec.Meta(ge=1)] = 256
    # How long an Idempotency-Key's first answer is kept: a retry with the key within it gets that answer
    # and stores nothing (the same key with another body: 422).
    idempotency_window_s: Annotated[int, msgspec.Meta(ge=1, le=30 * 86400)] = 86400

    def tokens(self) -> tuple[str, ...]:
        """Accepted bearer tokens; a comma-separated list allows rotation without downtime."""
        return tuple(t.strip() for t in self.token.split(",") if t.strip())


class AdminSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The admin API's bearer token(s), comma-separated to rotate (relay.ingress.admin); empty: it answers 403."""

    token: str = ""
    token_file: str = ""

    def tokens(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.token.split(",") if t.strip())


class OcpiSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The listener the IOP calls (used from the "OCPI connection" work on)."""

    listen: Listen = "0.0.0.0:8781"
    public_url: str = ""
    token_a: str = ""
    token_a_file: str = ""
    accept_plain_token: bool = True
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    shutdown_timeout_s: PositiveFloat = 5.0
    # Connection limits, as [ingress]'s (the TLS handshake counts in header_timeout_s), and at most
    # max_connections_per_ip from one client address (0: no per-address cap). max_connections is also
    # kept below what RLIMIT_NOFILE leaves once the ingress and outbound connections are served.
    header_timeout_s: PositiveFloat = 10.0
    idle_timeout_s: PositiveFloat = 60.0
    max_connections: Annotated[int, msgspec.Meta(ge=1)] = 512
    max_connections_per_ip: Annotated[int, msgspec.Meta(ge=0)] = 64
    # Handshake URLs, and the public_url `relay register` hands over, may be http, loopback or private
    # (test set-ups, private networks); else https + public.
    allow_insecure_urls: bool = False
    # Origins (https://host[:port]) a command's response_url may name besides the hub's own.
    command_response_origins: list[str] = []


class IopSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Identity of the hub and, until a handshake fills them, its URL and token."""

    country_code: CiCountry = "FR"
    party_id: CiParty = "107"
    url: str = ""
    token: str = ""
    token_file: str = ""
    connect_timeout_s: PositiveFloat = 5.0
    request_timeout_s: PositiveFloat = 30.0
    tls_ca_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    authorize_timeout_s: PositiveFloat = 5.0
    # Largest answer read from the hub or a handshake peer (on the wire, and once inflated).
    max_response_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 1_048_576


CommandName = Literal["START_SESSION", "STOP_SESSION", "RESERVE_NOW", "CANCEL_RESERVATION", "UNLOCK_CONNECTOR"]


class CsmsSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """How the relay hands commands and tokens from the IOP to the CSMS (a webhook the CSMS serves)."""

    webhook_url: str = ""
    token: str = ""
    token_file: str = ""
    timeout_s: PositiveFloat = 5.0
    commands: list[CommandName] = msgspec.field(default_factory=lambda: ["START_SESSION", "STOP_SESSION"])
    command_result_timeout_s: Annotated[int, msgspec.Meta(ge=1, le=3600)] = 120


class ForwarderSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Delivery engine tuning (see docs/delivery.md)."""

    enabled: bool = True
    concurrency: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 64
    read_batch: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 256
    max_buffered: Annotated[int, msgspec.Meta(ge=1)] = 2048
    backoff_initial_s: PositiveFloat = 1.0
    backoff_max_s: PositiveFloat = 300.0
    max_age_s: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    on_permanent: Literal["continue", "park"] = "continue"
    park_modules: list[Module] = []
    lease_ttl_s: PositiveFloat = 15.0
    claim_idle_s: PositiveFloat = 120.0
    link_failure_threshold: Annotated[int, msgspec.Meta(ge=1)] = 5
    probe_max_s: PositiveFloat = 60.0
    shutdown_timeout_s: PositiveFloat = 10.0
    # Modules whose backlogs are compacted (relay.compaction; never cdrs or commands), and how many
    # entries may be folded into compacted units at once (an id each, 16 bytes, beside max_buffered).
    compact: list[Module] = msgspec.field(default_factory=lambda: ["locations", "sessions", "tariffs"])
    compact_max_folded: Annotated[int, msgspec.Meta(ge=0)] = 1_048_576


class StateSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Current object state kept from what the CSMS sends (Sender interfaces, healing)."""

    enabled: bool = True
    max_page_limit: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 100
    sessions_patch_to_put: bool = True
    heal_patches: bool = True
    tariffs_immutable: Literal["reject", "warn", "off"] = "warn"


class RetentionSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What the relay forgets once it is old (relay.retention, docs/operations.md "Retention"); 0 = keep forever."""

    # Per-key markers (delivered, accepted, dead-last) and session watermarks, by the age of their stream id.
    # Long enough that a dead letter is replayed or purged within it (the markers of a key that still has a
    # dead letter are kept anyway).
    markers_s: Annotated[int, msgspec.Meta(ge=0)] = 7 * 86400
    # Sessions and CDRs in the state, by last_updated: what the IOP can still pull from the Sender interfaces.
    sessions_s: Annotated[int, msgspec.Meta(ge=0)] = 60 * 86400
    sweep_interval_s: Annotated[float, msgspec.Meta(ge=1)] = 300.0
    batch: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 500  # fields per HSCAN page and per script


class AdvenirSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The CdrToken that replaces the real one on non-roaming charges (values confirmed by GIREVE at onboarding)."""

    country_code: str = "$$"
    party_id: str = "ADV"
    uid: str = "12345671234567"
    type: str = "RFID"
    contract_id: str = "Gireve2Advenir"


class Operator(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A CPO operator hosted on this platform (T6)."""

    country_code: CiCountry
    party_id: CiParty
    # The eMI3 operator id its EVSE ids begin with (L2): 2 letters, optional "*", 3 letters or digits. Empty:
    # country_code*party_id. It may differ from them (OCPI does not tie the two): an operator whose OCPI party
    # id is FR/AB1 may own the EVSE ids of FR*XYZ.
    emi3_id: Annotated[str, msgspec.Meta(pattern=r"^([A-Z]{2}\*?[A-Z0-9]{3})?$")] = ""
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=100)]
    # Advenir (S4): send this operator's non-roaming Sessions/CDRs with GIREVE's anonymous CdrToken.
    advenir: bool = False
    # Token issuers ("CC:PID") whose charges are not roaming; empty = the operator itself.
    advenir_local_issuers: list[str] = []

    @property
    def key(self) -> tuple[str, str]:
        return (self.country_code, self.party_id)

    def __post_init__(self) -> None:
        if not self.emi3_id:
            self.emi3_id = f"{self.country_code}*{self.party_id}"

    def evse_id_prefixes(self) -> tuple[str, str]:
        """eMI3 EVSE ids start with the operator id then ``E``, with the separator star throughout or nowhere."""
        compact = self.emi3_id.replace("*", "")
        return (f"{compact[:2]}*{compact[2:]}*E", f"{compact}E")


class LogSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Structured logging."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"
    redact_fields: list[str] = []


class Settings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Everything the relay reads at start."""

    redis: RedisSettings = msgspec.field(default_factory=RedisSettings)
    storage: StorageSettings = msgspec.field(default_factory=StorageSettings)
    ingress: IngressSettings = msgspec.field(default_factory=IngressSettings)
    admin: AdminSettings = msgspec.field(default_factory=AdminSettings)
    ocpi: OcpiSettings = msgspec.field(default_factory=OcpiSettings)
    iop: IopSettings = msgspec.field(default_factory=IopSettings)
    forwarder: ForwarderSettings = msgspec.field(default_factory=ForwarderSettings)
    state: StateSettings = msgspec.field(default_factory=StateSettings)
    retention: RetentionSettings = msgspec.field(default_factory=RetentionSettings)
    advenir: AdvenirSettings = msgspec.field(default_factory=AdvenirSettings)
    csms: CsmsSettings = msgspec.field(default_factory=CsmsSettings)
    log: LogSettings = msgspec.field(default_factory=LogSettings)
    operators: list[Operator] = []

    def serve_problems(self) -> list[str]:
        """What only serving needs (operator tools such as ``relay dlq`` run without it)."""
        if not self.ingress.tokens():
            return ["ingress.token: required (set RELAY_INGRESS_TOKEN or ingress.token_file)"]
        return []

    def operator(self, country_code: str, party_id: str) -> Operator | None:
        """The hosted operator with these ids, case-insensitively (OCPI ids are CiStrings)."""
        cc, pid = country_code.upper(), party_id.upper()
        for op in self.operators:
            if op.country_code == cc and op.party_id == pid:
                return op
        return None


# Every key that names a file or a directory: a relative one is taken from the config file's directory (load).
PATH_KEYS: tuple[tuple[str, str], ...] = (
    ("storage", "dir"), ("ingress", "token_file"), ("ocpi", "token_a_file"), ("ocpi", "tls_cert_file"),
    ("ocpi", "tls_key_file"), ("ocpi", "tls_client_ca_file"), ("iop", "token_file"), ("iop", "tls_ca_file"),
    ("iop", "tls_cert_file"), ("iop", "tls_key_file"), ("csms", "token_file"), ("admin", "token_file"),
)  # fmt: skip

# Secrets: the env var wins, then the *_file companion, then the (discouraged) inline value.
_SECRETS = {("ingress", "token"), ("admin", "token"), ("iop", "token"), ("ocpi", "token_a"), ("csms", "token")}


_ENV_RE = re.compile(r"^RELAY_([A-Z]+)_([A-Z0-9_]+)$")


def _coerce_env(raw: str, current: Any, key: str = "") -> Any:
    """Env values are strings; give them the shape of the default they replace."""
    if current == "auto":  # [redis] ack_fsync (a bool) or ack_replicas (a number), or "auto"
        word = raw.strip().lower()
        if word.isdigit() and key != "ack_fsync":
            return int(word)
        return {"1": True, "true": True, "yes": True, "on": True,
                "0": False, "false": False, "no": False, "off": False}.get(word, word)  # fmt: skip
    if isinstance(current, bool):
        word = raw.strip().lower()
        if word in {"1", "true", "yes", "on"}:
            return True
        if word in {"0", "false", "no", "off", ""}:
            return False
        return raw  # refused by validation, naming the key, instead of silently meaning False
    if isinstance(current, int):
        try:
            return int(raw)
        except ValueError:
            return raw
    if isinstance(current, float):
        try:
            return float(raw)
        except ValueError:
            return raw
    if isinstance(current, list):
        raw = raw.strip()
        if raw.startswith("["):
            return msgspec.json.decode(raw)  # a DecodeError is reported by _apply_env with the var's name
        return [v.strip() for v in raw.split(",") if v.strip()]
    return raw


def _apply_env(data: dict[str, Any], env: Mapping[str, str]) -> None:
    defaults = msgspec.to_builtins(Settings())
    for name, raw in env.items():
        m = _ENV_RE.match(name)
        if m is None or name == "RELAY_CONFIG":
            continue
        section, key = m.group(1).lower(), m.group(2).lower()
        try:
            if section == "operators" and key == "json":
                data["operators"] = msgspec.json.decode(raw)
                continue
            if section not in defaults or not isinstance(defaults[section], dict):
                continue
            sect = data.setdefault(section, {})
            if key not in defaults[section]:
                raise ConfigError([f"{name}: no such key [{section}] {key}"])
            sect[key] = _coerce_env(raw, defaults[section][key], key)
        except msgspec.DecodeError as exc:
            raise ConfigError([f"{name}: not valid JSON: {exc}"]) from exc


def _read_secret_files(settings: Settings, base: Path, env: Mapping[str, str]) -> list[str]:
    errors: list[str] = []
    for section, key in _SECRETS:
        sect = getattr(settings, section)
        path = getattr(sect, f"{key}_file")
        if env.get(f"RELAY_{section.upper()}_{key.upper()}") or not path:
            continue  # the env var wins over the file, the file over an inline value
        p = Path(path) if Path(path).is_absolute() else base / path
        try:
            lines = p.read_text().strip().splitlines()
            setattr(sect, key, lines[0].strip() if lines else "")
        except OSError as exc:
            errors.append(f"{section}.{key}_file: cannot read {p}: {exc.strerror}")
    return errors


def _validate_operators(s: Settings) -> list[str]:
    errors: list[str] = []
    if not s.operators:
        errors.append("operators: at least one hosted operator is required")
    seen: set[tuple[str, str]] = set()
    for i, op in enumerate(s.operators):
        if op.key in seen:
            errors.append(f"operators[{i}]: duplicate operator {op.country_code}/{op.party_id}")
        seen.add(op.key)
    return errors


def _validate_urls_and_tls(s: Settings) -> list[str]:
    errors: list[str] = []
    url = s.redis.url
    if url and not url.startswith(("redis://", "rediss://", "unix://", "redis+sentinel://", "rediss+sentinel://")):
        errors.append(
            "redis.url: must start with redis://, rediss://, unix://, redis+sentinel:// or rediss+sentinel:// "
            "(or be empty for the embedded server)"
        )
    if s.redis.cluster and not url.startswith(("redis://", "rediss://")):
        errors.append("redis.cluster: needs a redis:// or rediss:// url of a seed node of the cluster")
    if "+sentinel://" in url:
        try:
            sentinel_address(url)
        except ValueError as exc:
            errors.append(f"redis.url: {exc}")
    for name, value in (("iop.url", s.iop.url), ("ocpi.public_url", s.ocpi.public_url),
                        ("csms.webhook_url", s.csms.webhook_url)):  # fmt: skip
        if value and not value.startswith(("http://", "https://")):
            errors.append(f"{name}: must be an http(s) URL")
    for i, value in enumerate(s.ocpi.command_response_origins):
        try:
            urls.parse_origin(value)
        except urls.UrlRefused as exc:
            errors.append(f"ocpi.command_response_origins[{i}]: {value!r} is not https://host[:port]: {exc}")
    for section, tls in (("iop", s.iop), ("ocpi", s.ocpi)):
        if bool(tls.tls_cert_file) != bool(tls.tls_key_file):
            errors.append(f"{section}.tls_cert_file/tls_key_file: give both or neither")
    if s.ocpi.tls_client_ca_file and not s.ocpi.tls_cert_file:
        errors.append("ocpi.tls_client_ca_file: mTLS needs ocpi.tls_cert_file and tls_key_file")
    return errors


def _validate(s: Settings) -> list[str]:
    errors: list[str] = []
    for name, listen in (("ingress.listen", s.ingress.listen), ("ocpi.listen", s.ocpi.listen)):
        if int(listen.rpartition(":")[2]) > 65535:
            errors.append(f"{name}: port of {listen!r} is above 65535")
    errors += _validate_operators(s) + _validate_urls_and_tls(s)
    if set(s.admin.tokens()) & set(s.ingress.tokens()):  # the CSMS's token must not open the admin API
        errors.append("admin.token: must differ from every ingress.token")
    if s.csms.timeout_s >= s.csms.command_result_timeout_s:
        errors.append("csms.timeout_s: must be below csms.command_result_timeout_s")
    if s.forwarder.backoff_max_s < s.forwarder.backoff_initial_s:
        errors.append("forwarder.backoff_max_s: must be >= backoff_initial_s")
    if never := sorted({"cdrs", "commands"} & set(s.forwarder.compact)):
        errors.append(f"forwarder.compact: {', '.join(never)} cannot be compacted (each one is sent as it is)")
    # A reclaim before the longest attempt ends would run one event twice (PITFALLS 5).
    if s.forwarder.claim_idle_s <= s.iop.request_timeout_s + s.iop.connect_timeout_s:
        errors.append("forwarder.claim_idle_s: must exceed iop.request_timeout_s + iop.connect_timeout_s")
    return errors


def load(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Build Settings from defaults, the TOML file, then RELAY_* env; raise ConfigError naming each bad key."""
    env = os.environ if env is None else env
    path = path or env.get("RELAY_CONFIG") or None
    data: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text())
        except OSError as exc:
            raise ConfigError([f"{p}: cannot read: {exc.strerror}"]) from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"{p}: not valid TOML: {exc}"]) from exc
        base = p.resolve().parent
    _apply_env(data, env)
    try:
        settings = msgspec.convert(data, Settings)
    except msgspec.ValidationError as exc:
        raise ConfigError([_config_path(str(exc))]) from exc
    # Relative paths are relative to the config file's directory (the working directory without a file),
    # wherever they were written: `relay serve` and every CLI verb find the same files from anywhere.
    for section, key in PATH_KEYS:
        sect = getattr(settings, section)
        value = getattr(sect, key)
        if value or key == "dir":  # an empty *_file is "none"; an empty storage.dir, the directory itself
            setattr(sect, key, os.path.normpath(base / value))
    errors = _read_secret_files(settings, base, env) + _validate(settings)
    if errors:
        raise ConfigError(errors)
    return settings


def _config_path(msg: str) -> str:
    """Turn msgspec's ``… - at `$.ingress.listen``` into ``ingress.listen: …``."""
    m = re.search(r" - at `\$\.?(.*)`$", msg)
    if m is None:
        return msg
    return f"{m.group(1) or '(root)'}: {msg[: m.start()]}"
