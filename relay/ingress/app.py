"""create_app(): the ingress application (CSMS events, batch, health, metrics).

No middleware (see auth.py): the routes under the prefix check the token themselves, through the one
``TokenCheck``, and what no route takes answers 404/405 in the JSON shape of refusals from a last
catch-all route. The event and batch handlers are the hot path: what they read on every request is bound
once (``_Events``), the answer of a single event is pre-encoded around its id and warnings
(``responses.accepted_event``), and their counters are plain numbers (``metrics.HotCounter``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import msgspec
import structlog
from aiohttp import web

from relay import logs, metrics, openapi, readiness
from relay.config import Settings
from relay.constants import H_CORRELATION, MAX_HEADER_VALUE, header_value_ok
from relay.errors import InvalidEvent, NotDurable, Problem, StoreFull, StoreUnavailable
from relay.ingest import Idempotency, Ingest, Ingested, idempotency
from relay.ingress import admin as admin_routes
from relay.ingress import roaming as roaming_routes
from relay.ingress.auth import TokenCheck
from relay.ingress.responses import (
    FULL_RETRY_S,
    Answer,
    accepted_event,
    json_response,
    now_iso,
    refused,
    unavailable,
)
from relay.ingress.roaming import RoamingDeps
from relay.store import Store
from relay.typedefs import HEALTH, SETTINGS, STORE, Health
from relay.validation import Accepted, Target, decode_problem, parse_target, validate

log = structlog.get_logger(__name__)
_NOT_STORED = "event not stored: Redis unavailable, send again"
_NOT_DURABLE = "event not confirmed on disk or replicas in time ([redis] ack_*), send again"
PREFIX = "/ingress/2.2.1"
H_IDEMPOTENCY = "Idempotency-Key"
IDEMPOTENCY_PROBLEM = Problem(field=H_IDEMPOTENCY, rule="header",
                              message=f"1 to {MAX_HEADER_VALUE} printable ASCII characters")  # fmt: skip
H_RESEND = "X-Relay-Resend"
RESEND_PROBLEM = Problem(field=H_RESEND, rule="header", message="true or 1 (or leave the header out)")


def resend(request: web.Request) -> bool:
    """``X-Relay-Resend: true``: store the event even if the object already is its document (a deliberate
    resend to repair the IOP, not a retry); InvalidEvent (422) for any value but true or 1."""
    value = request.headers.get(H_RESEND)
    if value is None:
        return False
    if value.strip().lower() not in ("true", "1"):
        raise InvalidEvent([RESEND_PROBLEM])
    return True


def idempotency_key(request: web.Request, acc: Accepted, raw: bytes, window_s: int) -> Idempotency | None:
    """The request's Idempotency-Key (per operator and route), or None; InvalidEvent (422) when malformed."""
    key = request.headers.get(H_IDEMPOTENCY)
    if key is None:
        return None
    if not key or not header_value_ok(key):  # printable ASCII, at most 255 characters
        raise InvalidEvent([IDEMPOTENCY_PROBLEM])
    ev = acc.event
    return idempotency(key, ev.country_code, ev.party_id, f"{request.method} {request.match_info['tail']}", raw,
                       window_s)  # fmt: skip


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
    duplicate: bool | None = None
    errors: list[Problem] | None = None


batch_decoder = msgspec.json.Decoder(Batch)  # POST /batch's body (bench/bare.py decodes with it too)
INGEST = web.AppKey("ingest", Ingest)


def _too_large(limit: int) -> InvalidEvent:
    return InvalidEvent([Problem(field="body", rule="size", message=f"larger than {limit} bytes")], 413)


async def _read_body(request: web.Request, limit: int) -> bytes:
    length = request.content_length
    if length is not None and length > limit:
        raise _too_large(limit)
    try:
        raw = await request.read() if length is not None else await _read_chunked(request, limit)
    except web.HTTPRequestEntityTooLarge:
        raise _too_large(limit) from None
    if len(raw) > limit:
        raise _too_large(limit)
    return raw


async def _read_chunked(request: web.Request, limit: int) -> bytes:
    """A body without Content-Length (or none), refused as soon as it passes ``limit``: request.read()
    would read up to the application's client_max_size (the batch's limit) first."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _warnings(acc: Accepted, done: Ingested) -> list[Problem] | None:
    """The warnings of an accepted event (validation's, then the state step's), counted."""
    found = [*acc.warnings, *done.warnings] if done.warnings else acc.warnings
    if not found:
        return None
    module = acc.event.module
    for w in found:
        metrics.WARNINGS.inc(module, w.rule)
    return found


def _labels(settings: Settings, target: Target | None, unknown: str) -> tuple[str, str]:
    """Metrics labels of a refused event: its module (``unknown`` before the route is known) and its
    operator when hosted (a bounded set), else ""."""
    if target is None:
        return unknown, ""
    op = settings.operator(target.country_code, target.party_id)
    return target.module, metrics.operator_label(op.country_code, op.party_id) if op is not None else ""


def _batch_item(index: int, op: BatchOperation, settings: Settings) -> Accepted | ItemResult:
    target = None
    try:
        target = parse_target(op.method, op.path.removeprefix(PREFIX), op.query)
        return validate(target, op.method, bytes(op.body), settings, correlation_id=op.correlation_id)
    except InvalidEvent as exc:
        metrics.count_refused(*_labels(settings, target, "batch"), exc.status, exc.problems)
        return ItemResult(index=index, status=exc.status, errors=exc.problems)


class _Events:
    """The event and batch routes, with what they use on every request bound once."""

    def __init__(self, settings: Settings, ingest: Ingest, check: TokenCheck) -> None:
        self.settings = settings
        self.ingest = ingest
        self.store = ingest.store
        self.check = check
        self.max_body = settings.ingress.max_body_bytes

    async def event(self, request: web.Request) -> web.Response:
        """Any Receiver-shaped route: the token, validate, append durably, 202 with the event id."""
        denied = self.check.refusal(request)
        if denied is not None:
            metrics.count_refused("unknown", "", denied.status, denied.problems)  # a refused event, module unknown
            return refused(denied)
        settings = self.settings
        method = request.method
        target = None
        try:
            query = dict(request.query) if request.query_string else None
            target = parse_target(method, request.match_info["tail"], query)
            length, limit = request.content_length, self.max_body  # _read_body, inline: no coroutine layer
            if length is not None and length > limit:
                raise _too_large(limit)
            try:  # without Content-Length (chunked), refused at the limit, not at client_max_size (64×)
                raw = await request.read() if length is not None else await _read_chunked(request, limit)
            except web.HTTPRequestEntityTooLarge:
                raise _too_large(limit) from None
            if len(raw) > limit:
                raise _too_large(limit)
            acc = validate(target, method, raw, settings,  # type: ignore[arg-type]  # parse_target checked it
                           correlation_id=request.headers.get(H_CORRELATION, ""))  # fmt: skip
            idem = idempotency_key(request, acc, raw, settings.ingress.idempotency_window_s)
            again = resend(request)
        except InvalidEvent as exc:
            metrics.count_refused(*_labels(settings, target, "unknown"), exc.status, exc.problems)
            return refused(exc)
        ev = acc.event
        operator = metrics.operator_label(ev.country_code, ev.party_id)  # hosted: validate() checked
        try:
            write = self.ingest.unconditional(acc) if idem is None else None
            if write is not None:  # the common PUT: committed here, without one()'s layer
                if again:
                    write = dataclasses.replace(write, resend=True)
                stream_id = await self.store.commit(ev, write)
                done = Ingested(stream_id, duplicate=not stream_id)
            else:
                done = await self.ingest.one(acc, idem, resend=again)
        except StoreFull as exc:
            metrics.INGRESS_STORE_ERRORS.inc()
            metrics.INGRESS_STORE_FULL.inc()
            log.warning("ingress_store_full", error=str(exc), module=ev.module)
            return unavailable("event not stored: Redis is full (maxmemory), send again later", FULL_RETRY_S)
        except StoreUnavailable as exc:  # NotDurable too: applied, not confirmed in time ([redis] ack_*)
            metrics.INGRESS_STORE_ERRORS.inc()
            log.warning("ingress_store_unavailable", error=str(exc), module=ev.module)
            return unavailable(_NOT_DURABLE if isinstance(exc, NotDurable) else _NOT_STORED)
        except InvalidEvent as exc:  # a rule that needs the stored state (tariff immutability), a reused key
            metrics.count_refused(ev.module, operator, exc.status, exc.problems)
            return refused(exc)
        if done.replayed or done.duplicate:
            return self._again(acc, done)
        metrics.ACCEPTED.inc(ev.module, operator)
        if logs.debug_enabled():
            log.debug("accepted", event_id=ev.id, module=ev.module, key=ev.key, stream_id=done.stream_id)
        return accepted_event(ev.id, _warnings(acc, done), done.unknown_object)

    @staticmethod
    def _again(acc: Accepted, done: Ingested) -> web.Response:
        """202 for a request that stored nothing: a replayed Idempotency-Key (the first answer) or a duplicate."""
        ev = acc.event
        metrics.DUPLICATES.labels(module=ev.module, kind="idempotency_key" if done.replayed else "same_state").inc()
        if logs.debug_enabled():  # counted; a CSMS resending its inventory must not flood the log
            log.debug("ingress_not_stored_again", event_id=ev.id, module=ev.module, key=ev.key,
                      replayed=done.replayed, duplicate=done.duplicate)  # fmt: skip
        if done.replayed:
            return accepted_event(done.event_id, list(done.warnings) or None, done.unknown_object,
                                  duplicate=done.duplicate, replayed=True)  # fmt: skip
        return accepted_event(ev.id, _warnings(acc, done), done.unknown_object, duplicate=True)

    async def batch(self, request: web.Request) -> web.Response:
        """Many operations in one request, each validated and stored on its own; per-item results."""
        denied = self.check.refusal(request)
        if denied is not None:
            return refused(denied)  # not a single event: not counted as a refused one
        settings = self.settings
        try:
            raw = await _read_body(request, self.max_body * 64)
            try:
                batch = batch_decoder.decode(raw)
            except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
                raise decode_problem(exc) from None
            limit = settings.ingress.max_batch_items
            if len(batch.operations) > limit:
                problem = Problem(field="$.operations", rule="size", message=f"more than {limit} items")
                raise InvalidEvent([problem], 413)
        except InvalidEvent as exc:
            return refused(exc)
        results: list[ItemResult | None] = [None] * len(batch.operations)
        indexes: list[int] = []
        accs: list[Accepted] = []
        for i, op in enumerate(batch.operations):
            item = _batch_item(i, op, settings)
            if isinstance(item, ItemResult):
                results[i] = item
            else:
                indexes.append(i)
                accs.append(item)
        stored = await self.ingest.many(accs)
        n_ok, full = 0, False
        for i, acc, outcome in zip(indexes, accs, stored, strict=True):
            ev = acc.event
            if isinstance(outcome, Ingested):
                metrics.ACCEPTED.inc(ev.module, metrics.operator_label(ev.country_code, ev.party_id))
                n_ok += 1
                results[i] = ItemResult(index=i, status=202, event_id=ev.id, warnings=_warnings(acc, outcome),
                                        unknown_object=outcome.unknown_object or None,
                                        duplicate=outcome.duplicate or None)  # fmt: skip
            elif isinstance(outcome, StoreUnavailable):
                metrics.INGRESS_STORE_ERRORS.inc()
                if isinstance(outcome, StoreFull):
                    full = True
                    metrics.INGRESS_STORE_FULL.inc()
                problem = Problem(field="$", rule="store", message=str(outcome))
                results[i] = ItemResult(index=i, status=503, errors=[problem])
            else:
                metrics.count_refused(ev.module, metrics.operator_label(ev.country_code, ev.party_id), outcome.status,
                                      outcome.problems)  # fmt: skip
                results[i] = ItemResult(index=i, status=outcome.status, errors=outcome.problems)
        if accs and n_ok == 0 and all(r is not None and r.status in (202, 503) for r in results):
            if full:
                return unavailable("no event stored: Redis is full (maxmemory), send again later", FULL_RETRY_S)
            return unavailable("no event stored: Redis unavailable, send again")
        data = {"accepted": n_ok, "refused": len(results) - n_ok, "results": results}  # every item has its result
        answer = Answer(status_code=1000, status_message="Batch processed", timestamp=now_iso(), data=data)
        return json_response(200, answer)


async def handle_healthz(request: web.Request) -> web.Response:
    """Liveness: the process serves HTTP, and its embedded server (if any) runs or is being restarted.

    503 while the relay knows it cannot store (embedded server down): restarting the relay may fix that.
    An external Redis that does not answer is /readyz's business: restarting the relay fixes nothing there.
    """
    down = request.app[HEALTH].storage_down
    if down:
        return web.json_response({"status": "storage_down", "reason": down}, status=503)
    return web.json_response({"status": "ok"})


async def handle_readyz(request: web.Request) -> web.Response:
    """Readiness: Redis answers, listeners are up, not stopping. The IOP link, the connection and each module's
    readiness (relay.readiness) are reported, not required."""
    health = request.app[HEALTH]
    redis_ok = await request.app[STORE].ping()
    ready = redis_ok and health.listeners_up and not health.stopping and not health.storage_down
    body = {
        "ready": ready,
        "redis": "ok" if redis_ok else "unreachable",
        "stopping": health.stopping,
        "persistence": health.persistence,
        "iop_link": health.link(),
        **await readiness.report(request.app[STORE], health, redis_ok),
    }
    return web.json_response(body, status=200 if ready else 503)


def openapi_of(app: web.Application) -> openapi.Ingress:
    """What relay.openapi describes: this application's route table and the batch route's types."""
    return openapi.Ingress(PREFIX, openapi.routes(app), Batch, BatchOperation, ItemResult)


async def handle_openapi(request: web.Request) -> web.Response:
    """The OpenAPI 3.1 document of this listener (no token: it describes, it holds no data)."""
    return web.Response(body=openapi.document_bytes(openapi_of(request.app)), content_type="application/json")


def openapi_document() -> bytes:
    """The document of the ingress ``relay serve`` runs (roaming routes on): ``relay openapi``, docs/openapi.json.
    The application is built, never run (no store): only its route table is read."""
    none: Any = None
    return openapi.document_bytes(openapi_of(create_app(Settings(), none, Health(), RoamingDeps(none, none, none))))


async def handle_unrouted(request: web.Request) -> web.Response:
    """The last route: what no other route takes, in the JSON shape of refusals (no token needed).

    405 when a route has this path for other methods, else 404, as aiohttp's own answers would be.
    """
    own = request.match_info.route.resource
    for resource in request.app.router.resources():
        if resource is not own and (await resource.resolve(request))[1]:
            exc: web.HTTPException = web.HTTPMethodNotAllowed(request.method, ())
            break
    else:
        exc = web.HTTPNotFound()
    return refused(InvalidEvent([Problem(field="url", rule="route", message=exc.reason)], exc.status))


def create_app(
    settings: Settings, store: Store, health: Health, roaming: RoamingDeps | None = None,
    metrics_handler: Callable[[web.Request], Awaitable[web.StreamResponse]] | None = None,
) -> web.Application:  # fmt: skip
    """The ingress application; the caller owns the store and the runner. Routes under PREFIX need the token.

    ``metrics_handler``: GET /metrics, this process's registry by default (a worker of ``relay serve --workers
    N`` answers for every worker: relay.worker_metrics)."""
    app = web.Application(client_max_size=settings.ingress.max_body_bytes * 64)
    metrics.preset()  # every series whose label values are known, at 0 from the first scrape
    app[SETTINGS] = settings
    app[STORE] = store
    app[INGEST] = ingest = Ingest(store, settings)
    app[HEALTH] = health
    check = TokenCheck(settings.ingress)
    events = _Events(settings, ingest, check)
    app.router.add_post(f"{PREFIX}/batch", check.checks(events.batch))
    if roaming is not None:
        roaming_routes.setup(app, PREFIX, roaming, check)
    app.router.add_route("*", PREFIX + "/{tail:(?s:.*)}", check.checks(events.event))
    admin_routes.setup(app)  # /admin/…, behind [admin] token (relay.ingress.admin)
    app.router.add_get("/healthz", handle_healthz)
    app.router.add_get("/readyz", handle_readyz)
    app.router.add_get("/metrics", metrics_handler or metrics.handle_metrics)
    app.router.add_get("/ingress/openapi.json", handle_openapi)  # no token: it describes, holds no data
    app.router.add_route("*", "/{path:(?s:.*)}", handle_unrouted)  # last: what nothing above took (a %0A too)
    check.verify(app, PREFIX)
    return app
