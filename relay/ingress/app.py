"""create_app(): the ingress application (CSMS events, batch, health, metrics)."""

from __future__ import annotations

from typing import Any, Literal

import msgspec
import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from relay import metrics
from relay.config import Settings
from relay.constants import H_CORRELATION
from relay.errors import InvalidEvent, Problem, StoreUnavailable
from relay.events import Method
from relay.ingest import Ingest, Ingested
from relay.ingress import roaming as roaming_routes
from relay.ingress.auth import token_required
from relay.ingress.responses import Answer, accepted, json_response, now_iso, refused, unavailable
from relay.ingress.roaming import RoamingDeps
from relay.store import Store
from relay.typedefs import HEALTH, SETTINGS, STORE, Health
from relay.validation import Accepted, decode_problem, parse_target, validate

log = structlog.get_logger(__name__)
PREFIX = "/ingress/2.2.1"


class BatchOperation(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One operation of a batch: what a single request would have carried."""

    method: Literal["PUT", "PATCH", "POST", "DELETE"]
    path: str
    body: msgspec.Raw = msgspec.Raw(b"")
    correlation_id: str = ""
    query: dict[str, str] = {}


class Batch(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    operations: list[BatchOperation]


class ItemResult(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Per-item outcome of a batch: status as the single route would have answered it."""

    index: int
    status: int
    event_id: str | None = None
    warnings: list[Problem] | None = None
    unknown_object: bool | None = None
    errors: list[Problem] | None = None


_batch_decoder = msgspec.json.Decoder(Batch)
INGEST = web.AppKey("ingest", Ingest)


async def _read_body(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise InvalidEvent([Problem(field="body", rule="size", message=f"larger than {limit} bytes")], 413)
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise InvalidEvent([Problem(field="body", rule="size", message=f"larger than {limit} bytes")], 413) from None
    if len(raw) > limit:
        raise InvalidEvent([Problem(field="body", rule="size", message=f"larger than {limit} bytes")], 413)
    return raw


def _warnings(acc: Accepted, done: Ingested) -> list[Problem] | None:
    found = acc.warnings + done.warnings
    for w in found:
        metrics.child(metrics.WARNINGS, acc.event.module, w.rule).inc()
    return found or None


def _accepted_data(acc: Accepted, done: Ingested) -> dict[str, Any]:
    data: dict[str, Any] = {"event_id": acc.event.id, "warnings": _warnings(acc, done)}
    if done.unknown_object:
        data["unknown_object"] = True  # forwarded all the same; the relay had no state for it
    return data


def _operator(settings: Settings, country_code: str, party_id: str) -> str:
    """Metrics label of an event's operator: hosted ones only (a bounded set), else ""."""
    op = settings.operator(country_code, party_id)
    return metrics.operator_label(op.country_code, op.party_id) if op is not None else ""


async def handle_event(request: web.Request) -> web.Response:
    """Any Receiver-shaped route: validate, append durably, 202 with the event id (the token checked before)."""
    settings = request.app[SETTINGS]
    module, operator = "unknown", ""
    try:
        query = dict(request.query) if request.query_string else None
        target = parse_target(request.method, request.match_info["tail"], query)
        module, operator = target.module, _operator(settings, target.country_code, target.party_id)
        raw = await _read_body(request, settings.ingress.max_body_bytes)
        method: Method = request.method  # type: ignore[assignment]  # parse_target checked it
        acc = validate(target, method, raw, settings, correlation_id=request.headers.get(H_CORRELATION, ""))
    except InvalidEvent as exc:
        metrics.count_refused(module, operator, exc.status, exc.problems)
        return refused(exc)
    operator = metrics.operator_label(acc.event.country_code, acc.event.party_id)  # hosted: validate() checked
    try:
        done = await request.app[INGEST].one(acc)
    except StoreUnavailable as exc:
        metrics.INGRESS_STORE_ERRORS.inc()
        log.warning("ingress_store_unavailable", error=str(exc), module=module)
        return unavailable("event not stored: Redis unavailable, send again")
    except InvalidEvent as exc:  # a rule that needs the stored state (tariff immutability)
        metrics.count_refused(module, operator, exc.status, exc.problems)
        return refused(exc)
    metrics.child(metrics.ACCEPTED, module, operator).inc()
    log.debug("accepted", event_id=acc.event.id, module=module, key=acc.event.key, stream_id=done.stream_id)
    return accepted(_accepted_data(acc, done))


def _batch_item(index: int, op: BatchOperation, settings: Settings) -> Accepted | ItemResult:
    module, operator = "batch", ""
    try:
        target = parse_target(op.method, op.path.removeprefix(PREFIX), op.query)
        module, operator = target.module, _operator(settings, target.country_code, target.party_id)
        return validate(target, op.method, bytes(op.body), settings, correlation_id=op.correlation_id)
    except InvalidEvent as exc:
        metrics.count_refused(module, operator, exc.status, exc.problems)
        return ItemResult(index=index, status=exc.status, errors=exc.problems)


async def handle_batch(request: web.Request) -> web.Response:
    """Many operations in one request, each validated and stored on its own; per-item results."""
    settings = request.app[SETTINGS]
    try:
        raw = await _read_body(request, settings.ingress.max_body_bytes * 64)
        try:
            batch = _batch_decoder.decode(raw)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise decode_problem(exc) from None
        if len(batch.operations) > settings.ingress.max_batch_items:
            limit = settings.ingress.max_batch_items
            raise InvalidEvent([Problem(field="$.operations", rule="size", message=f"more than {limit} items")], 413)
    except InvalidEvent as exc:
        return refused(exc)
    results: list[ItemResult] = []
    ok: list[tuple[int, Accepted]] = []
    for i, op in enumerate(batch.operations):
        item = _batch_item(i, op, settings)
        if isinstance(item, ItemResult):
            results.append(item)
        else:
            ok.append((i, item))
    stored = await request.app[INGEST].many([acc for _, acc in ok])
    for (i, acc), outcome in zip(ok, stored, strict=True):
        if isinstance(outcome, StoreUnavailable):
            metrics.INGRESS_STORE_ERRORS.inc()
            problem = Problem(field="$", rule="store", message=str(outcome))
            results.append(ItemResult(index=i, status=503, errors=[problem]))
        elif isinstance(outcome, InvalidEvent):
            ev = acc.event
            metrics.count_refused(ev.module, metrics.operator_label(ev.country_code, ev.party_id), outcome.status,
                                  outcome.problems)  # fmt: skip
            results.append(ItemResult(index=i, status=outcome.status, errors=outcome.problems))
        else:
            ev = acc.event
            operator = metrics.operator_label(ev.country_code, ev.party_id)
            metrics.child(metrics.ACCEPTED, ev.module, operator).inc()
            results.append(ItemResult(index=i, status=202, event_id=acc.event.id, warnings=_warnings(acc, outcome),
                                      unknown_object=outcome.unknown_object or None))  # fmt: skip
    results.sort(key=lambda r: r.index)
    n_ok = sum(1 for r in results if r.status == 202)
    data = {"accepted": n_ok, "refused": len(results) - n_ok, "results": results}
    if ok and n_ok == 0 and all(r.status in (202, 503) for r in results):
        return unavailable("no event stored: Redis unavailable, send again")
    answer = Answer(status_code=1000, status_message="Batch processed", timestamp=now_iso(), data=data)
    return json_response(200, answer)


async def handle_healthz(_: web.Request) -> web.Response:
    """Liveness: the process serves HTTP."""
    return web.json_response({"status": "ok"})


async def handle_readyz(request: web.Request) -> web.Response:
    """Readiness: Redis answers, listeners are up, not stopping. The IOP link is reported, not required."""
    health = request.app[HEALTH]
    redis_ok = await request.app[STORE].ping()
    ready = redis_ok and health.listeners_up and not health.stopping
    body = {
        "ready": ready,
        "redis": "ok" if redis_ok else "unreachable",
        "stopping": health.stopping,
        "persistence": health.persistence,
        "iop_link": health.link(),
    }
    return web.json_response(body, status=200 if ready else 503)


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Unknown routes and wrong methods answer in the same JSON shape as validation errors."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return refused(InvalidEvent([Problem(field="url", rule="route", message=exc.reason)], exc.status))


def _count_refused_token(request: web.Request, exc: InvalidEvent) -> None:
    """A 401 of the event route counts as a refused event (module unknown); batch and roaming 401s do not."""
    if request.match_info.handler is handle_event:
        metrics.count_refused("unknown", "", exc.status, exc.problems)


def create_app(settings: Settings, store: Store, health: Health, roaming: RoamingDeps | None = None) -> web.Application:
    """The ingress application; the caller owns the store and the runner. Routes under PREFIX need the token."""
    middlewares = [json_errors, token_required(PREFIX, on_refused=_count_refused_token)]
    app = web.Application(client_max_size=settings.ingress.max_body_bytes * 64, middlewares=middlewares)
    app[SETTINGS] = settings
    app[STORE] = store
    app[INGEST] = Ingest(store, settings)
    app[HEALTH] = health
    app.router.add_post(f"{PREFIX}/batch", handle_batch)
    if roaming is not None:
        roaming_routes.setup(app, PREFIX, roaming)
    app.router.add_route("*", PREFIX + "/{tail:.*}", handle_event)
    app.router.add_get("/healthz", handle_healthz)
    app.router.add_get("/readyz", handle_readyz)
    app.router.add_get("/metrics", metrics.handle_metrics)
    return app
