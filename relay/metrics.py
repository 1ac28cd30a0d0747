"""Prometheus metrics, defined once at module level, and the /metrics handler.

Label sets are bounded: module, outcome, reason kind, validation rule, hosted operator (the
operators of the config, ``CC/PID``). Never an object id. docs/operations.md lists every metric.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from functools import lru_cache
from itertools import product
from typing import Any, get_args

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from relay import __version__
from relay.errors import Problem
from relay.states import CONNECTION_STATES
from relay.states import LINK_STATES as LINK_STATES

_le: Callable[[float], str] = floatToGoString  # how prometheus_client writes a bucket bound (untyped there)


class HotCounter(Collector):
    """A labelled counter for the per-event delivery path: plain numbers, exported when scraped.

    prometheus_client's Counter takes a lock and checks its arguments on every ``inc()``; four such
    updates per delivered event were ~10 % of the forwarder's own work. The event loop is the only
    writer, so no lock is needed (do not update from other threads).
    """

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry = REGISTRY
    ) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, list(labelnames)
        self._values: dict[tuple[str, ...], float] = {}
        self._created: dict[tuple[str, ...], float] = {}  # the _created sample prometheus_client writes
        registry.register(self)

    def inc(self, *labels: str) -> None:
        """Add one to the series of these label values (in ``labelnames`` order)."""
        values = self._values
        value = values.get(labels)
        if value is None:
            self._created[labels] = time.time()
            value = 0.0
        values[labels] = value + 1.0

    def add(self, n: float, *labels: str) -> None:
        """Add ``n`` to the series of these label values."""
        if labels not in self._values:
            self._created[labels] = time.time()
        self._values[labels] = self._values.get(labels, 0.0) + n

    def touch(self, *labels: str) -> None:
        """Export the series of these label values (at 0 if it has no count yet)."""
        if labels not in self._values:
            self._created[labels] = time.time()
            self._values[labels] = 0.0

    def value(self, *labels: str) -> float:
        """The current count of one series (0 when never incremented)."""
        return self._values.get(labels, 0.0)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, v in list(self._values.items()):
            family.add_metric(list(labels), v, created=self._created[labels])
        yield family

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)


class HotHistogram(Collector):
    """A labelled histogram for the per-event delivery path (see HotCounter): per series, a count
    per bucket and the sum, made cumulative only when scraped."""

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float],
        registry: CollectorRegistry = REGISTRY,
    ) -> None:  # fmt: skip
        self.name, self.documentation, self.labelnames = name, documentation, list(labelnames)
        self.bounds = sorted(float(b) for b in buckets)
        self._series: dict[tuple[str, ...], list[float]] = {}  # per-bucket counts, +Inf, then the sum
        self._created: dict[tuple[str, ...], float] = {}
        registry.register(self)

    def observe(self, value: float, *labels: str) -> None:
        """Record one observation in the series of these label values."""
        series = self._series.get(labels)
        if series is None:
            series = self._series[labels] = [0.0] * (len(self.bounds) + 2)
            self._created[labels] = time.time()
        series[bisect_left(self.bounds, value)] += 1  # le semantics: the first bound >= value
        series[-1] += value

    def touch(self, *labels: str) -> None:
        """Export the series of these label values (empty if it has no observation yet)."""
        if labels not in self._series:
            self._series[labels] = [0.0] * (len(self.bounds) + 2)
            self._created[labels] = time.time()

    def count(self, *labels: str) -> float:
        """Observations recorded in one series."""
        series = self._series.get(labels)
        return sum(series[:-1]) if series else 0.0

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, series in list(self._series.items()):
            cumulative, buckets = 0.0, []
            for bound, n in zip([*self.bounds, float("inf")], series[:-1], strict=True):
                cumulative += n
                buckets.append((_le(bound), cumulative))
            family.add_metric(list(labels), buckets, sum_value=series[-1])
            family.add_sample(self.name + "_created", dict(zip(self.labelnames, labels, strict=True)),
                              self._created[labels])  # fmt: skip
        yield family

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)


BUILD = Info("relay_build", "The running relay's version")
BUILD.info({"version": __version__})
# Per accepted event (the ingress's hot path): plain numbers, as the delivery path's counters.
ACCEPTED = HotCounter("relay_events_accepted_total", "Events durably accepted at the ingress", ["module", "operator"])
REFUSED = Counter(
    "relay_events_refused_total",
    "Events refused at the ingress, nothing stored (reason: the first broken rule)",
    ["module", "operator", "status", "reason"],
)
INGRESS_STORE_ERRORS = Counter("relay_ingress_store_errors_total", "Ingress writes that Redis did not take (503)")
INGRESS_STORE_FULL = Counter(
    "relay_ingress_store_full_total", "Ingress writes refused because Redis is at its maxmemory (503, nothing stored)"
)
DUPLICATES = Counter(
    "relay_events_not_stored_again_total",
    "Ingress requests answered 202 without storing: a replayed Idempotency-Key, or the object already was this",
    ["module", "kind"],
)
REDIS_USED_MEMORY = Gauge("relay_redis_used_memory_bytes", "Redis's used_memory (INFO memory)")
REDIS_MAX_MEMORY = Gauge("relay_redis_maxmemory_bytes", "Redis's maxmemory (0: no limit; writes refused at it)")
REDIS_AOF_SIZE = Gauge("relay_redis_aof_size_bytes", "Redis's append-only file size (INFO persistence)")
CONSUMERS_REMOVED = Counter(
    "relay_consumers_removed_total", "Consumers of replicas no longer alive, without pending entries, removed"
)
# What relay.retention forgets: the label values of relay_retention_removed_total{what}.
RETENTION_WHAT = ("delivered", "accepted", "dead_last", "session_watermarks", "sessions", "cdrs")
RETENTION_REMOVED = Counter(
    "relay_retention_removed_total",
    "Old markers, session watermarks and Session/CDR states forgotten by the retention sweeper",
    ["what"],  # delivered, accepted, dead_last, session_watermarks, sessions, cdrs
)
UNKNOWN_OBJECT = Counter(
    "relay_events_unknown_object_total", "PATCHes (or child PUTs) for objects the relay has never seen", ["module"]
)
STATE_CONFLICTS = Counter("relay_state_conflicts_total", "State merges retried because another writer got in first")
WARNINGS = HotCounter("relay_events_warnings_total", "GIREVE rule warnings on accepted events", ["module", "rule"])

DELIVERIES = HotCounter(
    "relay_delivery_attempts_total", "Delivery attempts to the IOP by outcome", ["module", "outcome"]
)
DELIVERED = HotCounter("relay_events_delivered_total", "Events delivered to the IOP", ["module"])
COMPACTED = HotCounter(
    "relay_compacted_total",
    "Undelivered events superseded by a compacted request of their object, acknowledged with it (relay.compaction)",
    ["module"],
)
RETRIED = Counter(
    "relay_delivery_retries_total",
    "Attempts that failed transiently and will be tried again after a backoff",
    ["module"],
)
DEAD_LETTERED = Counter(
    "relay_events_dead_lettered_total", "Events moved to the dead-letter stream", ["module", "kind"]
)
HEALED = Counter("relay_patches_healed_total", "PATCHes the IOP did not know, resent as a PUT of the whole object",
                 ["module"])  # fmt: skip
REPLAYED = Counter("relay_events_replayed_total", "Dead letters put back on the delivery path", ["module"])
ADMIN_REQUESTS = Counter(
    "relay_admin_requests_total",
    "Requests to the admin API by route (its template) and HTTP status",
    ["route", "status"],
)
DELIVERY_LATENCY = HotHistogram(
    "relay_delivery_latency_seconds",
    "From ingress accept to the IOP's 2xx",
    ["module"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
)
IOP_REQUEST = HotHistogram(
    "relay_iop_request_duration_seconds",
    "One HTTP request to the IOP",
    ["module"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
INFLIGHT = Gauge("relay_inflight_attempts", "Delivery attempts in flight")
QUEUE_DEPTH = Gauge("relay_queue_depth", "Events accepted and not yet delivered or dead-lettered", ["module"])
OLDEST_AGE = Gauge("relay_oldest_event_age_seconds", "Age of the oldest undelivered event", ["module"])
DLQ_DEPTH = Gauge("relay_dead_letters", "Entries in the dead-letter stream", ["module"])
LINK_STATE = Gauge("relay_iop_link_state", "1 for the IOP link's current state", ["state"])
AUTHORIZATIONS = Counter("relay_authorizations_total", "Real-time authorisations answered to the CSMS",
                         ["decided_by", "allowed"])  # fmt: skip
AUTHORIZATION_DECIDERS = ("iop", "whitelist", "none")  # relay_authorizations_total{decided_by} (relay.authorize)
COMMANDS = Counter("relay_commands_total", "Commands from the IOP by type and immediate answer", ["command", "result"])
COMMAND_RESULTS = Counter("relay_command_results_total", "CommandResults queued for the IOP", ["result"])
TOKENS_RECEIVED = Counter("relay_tokens_received_total", "Tokens pushed by the IOP", ["method"])
REDIS_ERRORS = Counter("relay_redis_errors_total", "Redis errors seen by the relay", ["op"])
REDIS_ROUNDTRIP = Histogram(
    "relay_redis_roundtrip_seconds",
    "PING round trip to Redis, measured by every replica's gauge loop",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
REGISTRATION = Gauge("relay_registration_state", "1 for the current state of the OCPI connection", ["state"])
SHARDS_OWNED = Gauge("relay_shards_owned", "Shards whose lease this replica holds")
TAKEOVER_HELD_KEYS = Gauge(
    "relay_takeover_held_keys",
    "Ordering keys held after an unclean takeover until the old owner's requests cannot land",
)
# relay serve --workers N (relay.worker_metrics): in no registry, added to the merged /metrics answer only.
WORKER_SCRAPE_ERRORS = Gauge(
    "relay_worker_scrape_errors",
    "Workers (relay serve --workers N) whose series this /metrics answer lacks: no answer on their socket in 1 s",
    registry=None,
)
# Both listeners' connections (relay.listeners): open now, and closed on a limit by reason.
LISTENERS = ("ingress", "ocpi")
CONNECTION_CLOSE_REASONS = ("max_connections_per_ip", "header_timeout", "idle_timeout", "accept_error")
CONNECTIONS_OPEN = Gauge("relay_connections_open", "Connections open on a listener (TLS handshakes included)",
                         ["listener"])  # fmt: skip
CONNECTIONS_MAX = Gauge("relay_connections_max", "A listener's cap: at it, new connections wait in the kernel's queue",
                        ["listener"])  # fmt: skip
CONNECTIONS_CLOSED = Counter(
    "relay_connections_closed_total",
    "Connections a listener refused (per-address cap) or closed (late headers, idle), and failed accepts",
    ["listener", "reason"],
)
for _listener in LISTENERS:
    CONNECTIONS_OPEN.labels(_listener)
    CONNECTIONS_MAX.labels(_listener)
    for _reason in CONNECTION_CLOSE_REASONS:
        CONNECTIONS_CLOSED.labels(_listener, _reason)

# The names and their meaning: relay.states (LINK_STATES is imported from there above).
REGISTRATION_STATES = CONNECTION_STATES
# relay_redis_errors_total{op}: the loop whose Redis call failed.
REDIS_OPS = ("gauges", "consumers", "lease", "read", "deliver", "state", "registration", "commands", "retention")
# relay_events_not_stored_again_total{kind}: a replayed Idempotency-Key, or the object already was this document.
NOT_STORED_AGAIN_KINDS = ("idempotency_key", "same_state")
TOKEN_METHODS = ("PUT", "PATCH")  # relay_tokens_received_total{method}: the token routes that store
OTHER_COMMAND = "OTHER"  # relay_commands_total{command} of a command type OCPI does not name
# Series whose label values are not known in advance stay lazy (they appear with their first event):
# relay_events_accepted_total and relay_events_refused_total (operator, status, rule), relay_events_warnings_total
# (rule), relay_admin_requests_total (HTTP status). Every other labelled series is exported at 0 from the start:
# preset() (tests/test_observability.py fails on a labelled metric that is in neither).
LAZY = ("relay_events_accepted_total", "relay_events_refused_total", "relay_events_warnings_total",
        "relay_admin_requests_total")  # fmt: skip


def preset_series() -> list[tuple[Any, list[tuple[str, ...]]]]:
    """Per labelled metric whose label values are known in advance, every label tuple it can take (in
    ``labelnames`` order), from the code's own names: modules, outcome kinds, states, command types…"""
    from relay.config import MODULES
    from relay.models.tokens import AllowedType, CommandResponseType, CommandResultType, CommandType
    from relay.policy import DEAD_LETTER_KINDS
    from relay.retry import Kind

    mods: list[tuple[str, ...]] = [(m,) for m in MODULES]
    return [
        (DELIVERIES, list(product(MODULES, [k.value for k in Kind]))),
        (DELIVERED, mods),
        (COMPACTED, mods),
        (DELIVERY_LATENCY, mods),
        (IOP_REQUEST, mods),
        (RETRIED, mods),
        (HEALED, mods),
        (REPLAYED, mods),
        (UNKNOWN_OBJECT, mods),
        (QUEUE_DEPTH, mods),
        (OLDEST_AGE, mods),
        (DLQ_DEPTH, mods),
        (DEAD_LETTERED, list(product(MODULES, DEAD_LETTER_KINDS))),
        (DUPLICATES, list(product(MODULES, NOT_STORED_AGAIN_KINDS))),
        (RETENTION_REMOVED, [(w,) for w in RETENTION_WHAT]),
        (LINK_STATE, [(s,) for s in LINK_STATES]),
        (REGISTRATION, [(s,) for s in REGISTRATION_STATES]),
        (AUTHORIZATIONS, list(product(AUTHORIZATION_DECIDERS, get_args(AllowedType)))),
        (COMMANDS, list(product([*get_args(CommandType), OTHER_COMMAND], get_args(CommandResponseType)))),
        (COMMAND_RESULTS, [(r,) for r in get_args(CommandResultType)]),
        (TOKENS_RECEIVED, [(m,) for m in TOKEN_METHODS]),
        (REDIS_ERRORS, [(op,) for op in REDIS_OPS]),
        (CONNECTIONS_OPEN, [(x,) for x in LISTENERS]),
        (CONNECTIONS_MAX, [(x,) for x in LISTENERS]),
        (CONNECTIONS_CLOSED, list(product(LISTENERS, CONNECTION_CLOSE_REASONS))),
    ]


def preset() -> None:
    """Export every series of ``preset_series()`` (at 0 until its first event), so that ``rate()`` and the alert
    rules see them from the first scrape. Idempotent; create_app() calls it."""
    for metric, label_sets in preset_series():
        for labels in label_sets:
            if isinstance(metric, HotCounter | HotHistogram):
                metric.touch(*labels)
            else:
                child(metric, *labels)  # creates the child at 0; a gauge already set keeps its value


@lru_cache(maxsize=256)
def operator_label(country_code: str, party_id: str) -> str:
    """``CC/PID``; pass only hosted operators (bounded by the config), else the empty string. Cached: one
    call per event on the ingress."""
    return f"{country_code.upper()}/{party_id.upper()}" if country_code and party_id else ""


def count_refused(module: str, operator: str, status: int, problems: list[Problem]) -> None:
    """One refused event, labelled with the first rule it broke (rules are a fixed set of names)."""
    reason = problems[0].rule if problems else ""
    REFUSED.labels(module=module, operator=operator, status=str(status), reason=reason).inc()


def set_registration_state(state: str) -> None:
    """Exactly one registration state gauge is 1."""
    for s in REGISTRATION_STATES:
        REGISTRATION.labels(state=s).set(1 if s == state else 0)


def set_link_state(state: str) -> None:
    """Exactly one state gauge is 1."""
    for s in LINK_STATES:
        LINK_STATE.labels(state=s).set(1 if s == state else 0)


_children: dict[tuple[int, tuple[str, ...]], Any] = {}


def child(metric: Any, *values: str) -> Any:
    """``metric.labels(*values)``, cached: labels() takes a lock and checks the names on every call,
    which the hot paths (one call per event) feel. The label sets are bounded, so is the cache."""
    key = (id(metric), values)
    found = _children.get(key)
    if found is None:
        found = _children[key] = metric.labels(*values)
    return found


async def handle_metrics(_: web.Request) -> web.Response:
    """GET /metrics in the Prometheus text format."""
    resp = web.Response(body=generate_latest(REGISTRY))
    resp.content_type = CONTENT_TYPE_LATEST.split(";")[0]
    resp.charset = "utf-8"
    return resp
