"""The admin API on the ingress listener: status and dead letters for a back office, over HTTP.

Routes (a fixed contract, README "Admin API"): ``GET /admin/status``, ``GET /admin/dead-letters``,
``GET /admin/dead-letters/{id}``, ``POST /admin/dead-letters/replay``, ``POST /admin/dead-letters/purge``.
Each does what ``relay status --json`` / ``relay dlq list|show|replay|purge --json`` do, with the same code:
relay.status.collect, relay.dlq's select / find / describe / replay_many / purge_many and the rows and
summaries the CLI prints.

Authentication: ``Authorization: Bearer <[admin] token>`` (RELAY_ADMIN_TOKEN, comma-separated to rotate).
The ingress token never opens these routes, nor the admin token the ingress's (relay.config refuses the
same value for both). No admin token configured: every admin route answers 403 ("admin API disabled").
Every route under /admin/ is registered through ``_Admin.route`` (auth, error shape, metric), and
``_Admin.verify`` refuses to build an application with one that was not, as the ingress's TokenCheck does.

Input is hostile: query parameters and bodies are decoded into the Structs below (unknown parameters and
fields refused, types strict, sizes bounded); any problem is a 4xx ``AdminError`` naming the field, never a
500. ``ADMIN_OPERATIONS`` describes each route for the OpenAPI document.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec
import structlog
from aiohttp import hdrs, web

from relay import metrics
from relay.config import MODULES, Module, Settings
from relay.dlq import (
    Filter,
    Position,
    describe,
    find,
    outcome_row,
    parse_since,
    purge_fields,
    purge_many,
    purge_summary,
    replay_fields,
    replay_many,
    replay_summary,
    select,
)
from relay.errors import Problem, StoreError
from relay.ingress.auth import authorised
from relay.status import Status, collect
from relay.store import DeadLetter, DeliveryStore, Store
from relay.typedefs import SETTINGS, STORE

__all__ = ["ADMIN_OPERATIONS", "MAX_BODY_BYTES", "MAX_IDS", "MAX_PAGE", "MAX_SELECTED", "AdminError", "AdminOperation",
           "DeadLetterDetail", "DeadLetterPage", "DeadLetterQuery", "DeadLetterSummary", "Outcome", "PurgeRequest",
           "PurgeResponse", "ReplayRequest", "ReplayResponse", "setup"]  # fmt: skip

log = structlog.get_logger(__name__)

PREFIX = "/admin"
MAX_BODY_BYTES = 65_536  # a replay or purge body (1000 ids are ~30 kB)
MAX_IDS = 1000  # ids in one replay or purge
MAX_SELECTED = 1000  # dead letters one replay or purge acts on (``limit``; more matching: ``more``, call again)
MAX_PAGE = 500  # dead letters in one page of the listing
DEFAULT_PAGE = 100

# A dead-letter id (its stream id) or an event id (28 hex characters), as `relay dlq show` takes them.
_ID_PATTERN = r"^([0-9]{1,20}-[0-9]{1,20}|[0-9a-f]{28})$"
_ID = re.compile(_ID_PATTERN)
DeadId = Annotated[str, msgspec.Meta(pattern=_ID_PATTERN, description="dead-letter id (stream id) or event id")]
Kind = Literal["permanent", "transient", "auth", "parked"]
Reason = Annotated[str, msgspec.Meta(min_length=1, max_length=200, description="substring of the failure reason")]
Key = Annotated[str, msgspec.Meta(min_length=1, max_length=255, description="exact ordering key, loc:FR:AB1:LOC1")]
Since = Annotated[
    str, msgspec.Meta(min_length=1, max_length=64, description="dead since: 30m, 2h, 7d ago, or an ISO date/time")
]
_U64 = 2**64 - 1
_CURSOR = re.compile(r"^(" + "|".join(MODULES) + r"):([0-9]{1,4}):([0-9]{1,20}-[0-9]{1,20})$")


# -- shapes ---------------------------------------------------------------------------------------------


class AdminError(msgspec.Struct, kw_only=True):
    """Every 4xx/5xx of the admin API: the status, one line, and each problem with its field."""

    status: int
    message: str
    errors: list[Problem] = []


class DeadLetterQuery(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Query parameters of GET /admin/dead-letters: `relay dlq list`'s filters (all must match), and paging."""

    module: Module | None = None
    kind: Kind | None = None
    reason: Reason | None = None
    key: Key | None = None
    since: Since | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_PAGE)] = DEFAULT_PAGE
    after: Annotated[str, msgspec.Meta(max_length=64, description="the previous page's `next`")] | None = None


class DeadLetterSummary(msgspec.Struct, kw_only=True):
    """One dead letter as `relay dlq list --json` prints it (times in ISO 8601 UTC)."""

    dead_id: str
    event_id: str
    module: str
    method: str
    object: str
    key: str
    correlation_id: str
    received_at: str
    stream_id: str  # its id in its stream before it died
    kind: str | None = None  # permanent | transient | auth | parked
    reason: str | None = None
    http_status: int | None = None
    ocpi_code: int | None = None
    ocpi_message: str | None = None
    attempts: int | None = None
    first_attempt_at: str | None = None
    last_attempt_at: str | None = None
    dead_at: str | None = None
    unknown_object: bool | None = None
    replica: str | None = None


class DeadLetterDetail(DeadLetterSummary, kw_only=True):
    """One dead letter as `relay dlq show` prints it: with the event's body (text)."""

    body: str | None = None


class DeadLetterPage(msgspec.Struct, kw_only=True):
    """A page of dead letters (per module, shard, then oldest first); ``next``: pass it as ``after``."""

    items: list[DeadLetterSummary]
    next: str | None


class _Selection(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Which dead letters: ``ids``, filters (both: each must match), or ``all`` (alone)."""

    ids: Annotated[list[DeadId], msgspec.Meta(max_length=MAX_IDS)] | None = None
    module: Module | None = None
    kind: Kind | None = None
    reason: Reason | None = None
    key: Key | None = None
    since: Since | None = None
    all: bool = False
    dry_run: bool = False
    limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_SELECTED)] = MAX_SELECTED


class ReplayRequest(_Selection, kw_only=True, forbid_unknown_fields=True):
    """Body of POST /admin/dead-letters/replay (`relay dlq replay`; ``force``: each one as it was, in order)."""

    force: bool = False


class PurgeRequest(_Selection, kw_only=True, forbid_unknown_fields=True):
    """Body of POST /admin/dead-letters/purge (`relay dlq purge`)."""


class Outcome(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What happened to one dead letter: a line of `relay dlq replay --json` / `purge --json`."""

    dead_id: str
    event_id: str
    module: str
    object: str
    key: str
    result: str  # replayed | skipped_newer | superseded | gone | would_*; purged | would_purge | gone
    from_state: bool = False
    unparked: bool = False
    newer: str | None = None  # delivered | queued
    superseded_by: str | None = None


class ReplayResponse(msgspec.Struct, kw_only=True):
    """``summary``: the CLI's last line (selected, replayed, superseded, skipped_newer, gone, unparked; a dry run:
    would_replay, would_supersede, would_skip); ``more``: more dead letters matched than ``limit``."""

    dry_run: bool
    results: list[Outcome]
    summary: dict[str, int]
    more: bool


class PurgeResponse(msgspec.Struct, kw_only=True):
    """``summary``: selected, purged (would_purge), unparked (would_unpark); ``more`` as for a replay."""

    dry_run: bool
    results: list[Outcome]
    summary: dict[str, int]
    more: bool


@dataclass(frozen=True, slots=True)
class AdminOperation:
    """One admin route, for the OpenAPI document: query (a Struct whose fields are the query parameters),
    body and response are msgspec Structs; every error answer is an ``AdminError``."""

    method: str
    path: str
    summary: str
    query: type | None
    body: type | None
    response: type
    errors: tuple[int, ...]


ADMIN_OPERATIONS: list[AdminOperation] = [
    AdminOperation("GET", "/admin/status", "Link, registration, queues per module and shard, dead letters, "
                   "parked and held keys (relay status --json)", None, None, Status, (401, 403, 503)),
    AdminOperation("GET", "/admin/dead-letters", "Dead letters, filtered and paged (relay dlq list)",
                   DeadLetterQuery, None, DeadLetterPage, (400, 401, 403, 503)),
    AdminOperation("GET", "/admin/dead-letters/{id}", "One dead letter with its body (relay dlq show)",
                   None, None, DeadLetterDetail, (400, 401, 403, 404, 503)),
    AdminOperation("POST", "/admin/dead-letters/replay", "Replay dead letters by ids or filters (relay dlq replay)",
                   None, ReplayRequest, ReplayResponse, (400, 401, 403, 413, 503)),
    AdminOperation("POST", "/admin/dead-letters/purge", "Delete dead letters by ids or filters (relay dlq purge)",
                   None, PurgeRequest, PurgeResponse, (400, 401, 403, 413, 503)),
]  # fmt: skip


# -- errors ---------------------------------------------------------------------------------------------


class _Refused(Exception):
    """A 4xx to answer, with its problems."""

    def __init__(self, status: int, problems: list[Problem], headers: dict[str, str] | None = None) -> None:
        super().__init__(problems[0].message)
        self.status, self.problems, self.headers = status, problems, headers


def _bad(field: str, rule: str, message: str, status: int = 400) -> _Refused:
    return _Refused(status, [Problem(field=field, rule=rule, message=message)])


_AT = re.compile(r" - at `\$\.?(.*)`$")
_UNKNOWN = re.compile(r"^Object contains unknown field `(.*)`$")


def _invalid(exc: msgspec.ValidationError, where: str) -> _Refused:
    """msgspec's ``Expected `int` >= 1 - at `$.limit``` as a 400 on field ``limit`` (``where`` when at the root)."""
    msg = str(exc)
    m = _AT.search(msg)
    field, msg = (m.group(1) or where, msg[: m.start()]) if m else (where, msg)
    if (u := _UNKNOWN.match(msg)) is not None:
        field, msg = u.group(1)[:64] or where, "unknown " + ("parameter" if where == "query" else "field")
    return _bad(field, where, msg)


def _json(status: int, value: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=msgspec.json.encode(value), content_type="application/json",
                        headers=headers)  # fmt: skip


def _error(status: int, problems: list[Problem], headers: dict[str, str] | None = None) -> web.Response:
    first = problems[0]
    return _json(status, AdminError(status=status, message=f"{first.field}: {first.message}", errors=problems),
                 headers)  # fmt: skip


# -- decoding input -------------------------------------------------------------------------------------


def _query(request: web.Request) -> DeadLetterQuery:
    params: dict[str, str] = {}
    for name in request.query:
        values = request.query.getall(name)
        if len(values) > 1:
            raise _bad(name[:64], "query", "given more than once")
        params[name] = values[0]
    try:
        return msgspec.convert(params, DeadLetterQuery, strict=False)  # strict=False: "50" → 50
    except msgspec.ValidationError as exc:
        raise _invalid(exc, "query") from None


async def _body(request: web.Request, kind: type[ReplayRequest] | type[PurgeRequest]) -> Any:
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise _bad("body", "size", f"larger than {MAX_BODY_BYTES} bytes", 413)
    chunks, size = [], 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _bad("body", "size", f"larger than {MAX_BODY_BYTES} bytes", 413)
        chunks.append(chunk)
    try:
        return msgspec.json.decode(b"".join(chunks), type=kind)
    except msgspec.ValidationError as exc:
        raise _invalid(exc, "body") from None
    except (msgspec.DecodeError, RecursionError):
        raise _bad("body", "json", "not a JSON object") from None


def _since(value: str | None, field: str = "since") -> float | None:
    if value is None:
        return None
    try:
        return parse_since(value)
    except (ValueError, OverflowError):
        raise _bad(field, "since", "use e.g. 30m, 2h, 7d or 2026-11-26T10:00:00Z") from None


def _after(value: str | None, shards: int) -> Position | None:
    if value is None:
        return None
    m = _CURSOR.match(value)
    ms, _, seq = m.group(3).partition("-") if m else ("", "", "")
    # A stream id is two 64-bit numbers; the listing resumes at seq + 1, so the last seq cannot be a cursor.
    if m is None or int(m.group(2)) >= shards or int(ms) > _U64 or int(seq) >= _U64:
        raise _bad("after", "cursor", "not a `next` of this listing")
    return m.group(1), int(m.group(2)), m.group(3)


def _selection(sel: _Selection, verb: str) -> Filter:
    """The Filter of a replay or purge body; the same rules as the CLI's (relay.cli_dlq._confirm_bulk)."""
    has_filter = any(v is not None for v in (sel.module, sel.kind, sel.reason, sel.key, sel.since))
    if not sel.ids and not sel.all and not has_filter:
        raise _bad("body", "selection", f"say what to {verb}: ids, a filter (module, kind, reason, key, since) or all")
    if sel.all and (sel.ids or has_filter):
        raise _bad("all", "selection", "all excludes ids and filters")
    return Filter(module=sel.module, kind=sel.kind, reason=sel.reason, key=sel.key, since=_since(sel.since),
                  ids=frozenset(sel.ids or ()))  # fmt: skip


async def _chosen(ds: DeliveryStore, flt: Filter, limit: int) -> tuple[list[DeadLetter], bool]:
    """The first ``limit`` dead letters the filter selects, and whether more match. Selected before acting:
    replaying and purging delete from the streams being paged through."""
    chosen: list[DeadLetter] = []
    async for dead in select(ds, flt):
        if len(chosen) == limit:
            return chosen, True
        chosen.append(dead)
    return chosen, False


# -- the routes -----------------------------------------------------------------------------------------

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


DISABLED = Problem(
    field="Authorization",
    rule="disabled",
    message="admin API disabled: no admin token configured (RELAY_ADMIN_TOKEN or [admin] token_file)",
)


class _Admin:
    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings, self.store = settings, store
        self._guarded: set[Callable[..., Any]] = set()

    def _denied(self, request: web.Request) -> web.Response | None:
        tokens = self.settings.admin.tokens()
        if not tokens:
            return _error(403, [DISABLED])
        if authorised(request.headers.get(hdrs.AUTHORIZATION, ""), tuple(t.encode() for t in tokens)):
            return None
        return _error(401, [Problem(field="Authorization", rule="auth", message="missing or wrong admin token")],
                      {"WWW-Authenticate": 'Bearer realm="relay-admin"'})  # fmt: skip

    def route(self, route: str, handler: _Handler) -> _Handler:
        """``handler`` behind the admin token, answering problems as AdminError, counted per route and status."""

        async def guarded(request: web.Request) -> web.StreamResponse:
            response: web.StreamResponse | None = self._denied(request)
            if response is None:
                try:
                    response = await handler(request)
                except _Refused as exc:
                    response = _error(exc.status, exc.problems, exc.headers)
                except StoreError as exc:
                    log.warning("admin_store_unavailable", route=route, error=str(exc))
                    response = _error(503, [Problem(field="redis", rule="store", message="Redis unavailable, "
                                                    "try again")], {"Retry-After": "1"})  # fmt: skip
            metrics.ADMIN_REQUESTS.labels(route=route, status=str(response.status)).inc()
            return response

        self._guarded.add(guarded)
        return guarded

    def verify(self, app: web.Application) -> None:
        """Every route under /admin/ goes through ``route``; else RuntimeError (fails at start, not open)."""
        open_routes = [
            f"{r.method} {r.resource.canonical}"
            for r in app.router.routes()
            if r.resource is not None
            and r.resource.canonical.startswith(PREFIX + "/")
            and r.handler not in self._guarded
        ]
        if open_routes:
            raise RuntimeError(f"routes under {PREFIX} without the admin token check: {', '.join(open_routes)}")

    async def status(self, request: web.Request) -> web.StreamResponse:
        return _json(200, await collect(self.store, self.settings))

    async def list(self, request: web.Request) -> web.StreamResponse:
        q = _query(request)
        flt = Filter(module=q.module, kind=q.kind, reason=q.reason, key=q.key, since=_since(q.since))
        after = _after(q.after, self.store.shards)
        items: list[DeadLetterSummary] = []
        last: DeadLetter | None = None
        more = False
        async for dead in select(DeliveryStore(self.store), flt, after=after):
            if len(items) == q.limit:
                more = True
                break
            items.append(msgspec.convert(describe(dead), DeadLetterSummary))
            last = dead
        nxt = f"{last.module}:{last.shard}:{last.id}" if more and last is not None else None
        return _json(200, DeadLetterPage(items=items, next=nxt))

    async def show(self, request: web.Request) -> web.StreamResponse:
        ident = request.match_info["id"]
        if ident in ("replay", "purge"):
            raise _Refused(405, [Problem(field="method", rule="route", message="use POST")], {"Allow": "POST"})
        if not _ID.match(ident):
            raise _bad("id", "id", "not a dead-letter id (stream id, 1700000000000-0) nor an event id (28 hex)")
        dead = await find(DeliveryStore(self.store), ident)
        if dead is None:
            raise _bad("id", "not_found", f"no dead letter {ident}", 404)
        return _json(200, msgspec.convert(describe(dead), DeadLetterDetail))

    async def replay(self, request: web.Request) -> web.StreamResponse:
        req: ReplayRequest = await _body(request, ReplayRequest)
        flt = _selection(req, "replay")
        ds = DeliveryStore(self.store)  # a lost script is loaded again on NOSCRIPT (scripts.run)
        chosen, more = await _chosen(ds, flt, req.limit)
        results: list[Outcome] = []
        unparked = 0

        def step(dead: DeadLetter, rep: Any) -> None:
            nonlocal unparked
            unparked += rep.unparked
            results.append(msgspec.convert(outcome_row(dead, **replay_fields(rep)), Outcome))

        counts = await replay_many(ds, chosen, force=req.force, dry_run=req.dry_run,
                                   from_state=self.settings.state.enabled, progress=step)  # fmt: skip
        summary = replay_summary(len(chosen), counts, unparked)
        log.info("admin_replay", dry_run=req.dry_run, force=req.force, more=more, **summary)
        return _json(200, ReplayResponse(dry_run=req.dry_run, results=results, summary=summary, more=more))

    async def purge(self, request: web.Request) -> web.StreamResponse:
        req: PurgeRequest = await _body(request, PurgeRequest)
        flt = _selection(req, "purge")
        ds = DeliveryStore(self.store)  # a lost script is loaded again on NOSCRIPT (scripts.run)
        chosen, more = await _chosen(ds, flt, req.limit)
        results: list[Outcome] = []

        def step(dead: DeadLetter, done: Any) -> None:
            results.append(msgspec.convert(outcome_row(dead, **purge_fields(done, req.dry_run)), Outcome))

        n = await purge_many(ds, chosen, dry_run=req.dry_run, progress=step)
        summary = purge_summary(len(chosen), n, sum(r.unparked for r in results), req.dry_run)
        log.info("admin_purge", dry_run=req.dry_run, more=more, **summary)
        return _json(200, PurgeResponse(dry_run=req.dry_run, results=results, summary=summary, more=more))

    async def unknown(self, request: web.Request) -> web.StreamResponse:
        """What no admin route takes: 405 when one has this path for other methods, else 404."""
        own = request.match_info.route.resource
        allowed: set[str] = set()
        for resource in request.app.router.resources():
            if resource is not own and resource.canonical.startswith(PREFIX + "/"):
                allowed |= (await resource.resolve(request))[1]
        if allowed:
            raise _Refused(405, [Problem(field="method", rule="route", message=f"use {', '.join(sorted(allowed))}")],
                           {"Allow": ", ".join(sorted(allowed))})  # fmt: skip
        raise _bad("url", "route", "no such admin route", 404)


def setup(app: web.Application) -> None:
    """Register the admin routes (before the application's last catch-all route)."""
    admin = _Admin(app[SETTINGS], app[STORE])
    add = app.router.add_route
    add("GET", f"{PREFIX}/status", admin.route("/admin/status", admin.status))
    add("GET", f"{PREFIX}/dead-letters", admin.route("/admin/dead-letters", admin.list))
    add("POST", f"{PREFIX}/dead-letters/replay", admin.route("/admin/dead-letters/replay", admin.replay))
    add("POST", f"{PREFIX}/dead-letters/purge", admin.route("/admin/dead-letters/purge", admin.purge))
    add("GET", f"{PREFIX}/dead-letters/{{id}}", admin.route("/admin/dead-letters/{id}", admin.show))
    add("*", f"{PREFIX}/{{tail:.*}}", admin.route("other", admin.unknown))
    admin.verify(app)
