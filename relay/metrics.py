"""Prometheus metrics, defined once at module level, and the /metrics handler.

Label sets are bounded: module, outcome, reason kind. Never an object id.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, generate_latest

ACCEPTED = Counter("relay_events_accepted_total", "Events durably accepted at the ingress", ["module"])
REFUSED = Counter("relay_events_refused_total", "Events refused at the ingress, nothing stored", ["module", "status"])
INGRESS_STORE_ERRORS = Counter("relay_ingress_store_errors_total", "Ingress writes that Redis did not take (503)")
UNKNOWN_OBJECT = Counter(
    "relay_events_unknown_object_total", "PATCHes (or child PUTs) for objects the relay has never seen", ["module"]
)
STATE_CONFLICTS = Counter("relay_state_conflicts_total", "State merges retried because another writer got in first")
WARNINGS = Counter("relay_events_warnings_total", "GIREVE rule warnings on accepted events", ["module", "rule"])

DELIVERIES = Counter(
    "relay_delivery_attempts_total", "Delivery attempts to the IOP by outcome", ["module", "outcome"]
)
DELIVERED = Counter("relay_events_delivered_total", "Events delivered to the IOP", ["module"])
DEAD_LETTERED = Counter(
    "relay_events_dead_lettered_total", "Events moved to the dead-letter stream", ["module", "kind"]
)
HEALED = Counter("relay_patches_healed_total", "PATCHes the IOP did not know, resent as a PUT of the whole object",
                 ["module"])  # fmt: skip
REPLAYED = Counter("relay_events_replayed_total", "Dead letters put back on the delivery path", ["module"])
DELIVERY_LATENCY = Histogram(
    "relay_delivery_latency_seconds",
    "From ingress accept to the IOP's 2xx",
    ["module"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600),
)
IOP_REQUEST = Histogram(
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
REDIS_ERRORS = Counter("relay_redis_errors_total", "Redis errors seen by the relay", ["op"])
SHARDS_OWNED = Gauge("relay_shards_owned", "Shards whose lease this replica holds")

LINK_STATES = ("up", "down", "auth_failed", "paused", "unconfigured")


def set_link_state(state: str) -> None:
    """Exactly one state gauge is 1."""
    for s in LINK_STATES:
        LINK_STATE.labels(state=s).set(1 if s == state else 0)


async def handle_metrics(_: web.Request) -> web.Response:
    """GET /metrics in the Prometheus text format."""
    resp = web.Response(body=generate_latest(REGISTRY))
    resp.content_type = CONTENT_TYPE_LATEST.split(";")[0]
    resp.charset = "utf-8"
    return resp
