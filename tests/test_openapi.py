"""The ingress's OpenAPI document (relay.openapi): valid, complete, current, served, true to the wire.

- It validates (openapi-spec-validator), docs/openapi.json is what ``relay openapi`` prints, every route the
  ingress registers is in it and every operation in it reaches a route (both ways), a route it cannot describe
  fails the build, PATCH bodies require nothing but ``last_updated``.
- The webhook the relay calls and the answers it sends decode as the document says (real calls, real answers).
- schemathesis (``test_schemathesis_finds_no_5xx_and_no_stored_refusal``) generates requests from the served
  document, valid and invalid, and sends them to a real ingress on loopback with the suite's embedded Redis:
  no 5xx, every answer conforms to the document, an answer that refuses wrote nothing to Redis, and the stream
  entries added are exactly the events accepted. Deterministic (``derandomize``), bounded (``MAX_EXAMPLES`` per
  operation and generation mode).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest
import redis
import schemathesis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from openapi_spec_validator import validate
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from yarl import URL

from relay import openapi
from relay.authorize import Authorizer
from relay.commands import Commands
from relay.config import Settings
from relay.csms import CsmsClient
from relay.ingress import app as ingress_app
from relay.ingress.roaming import RoamingDeps
from relay.openapi.parts import EVENT_ROUTE, UNROUTED, event_path, event_routes
from relay.openapi.shapes import CommandNotification, ResultAnswer, TokenNotification
from relay.store import RoamingStore, StateReader, Store
from relay.typedefs import Health
from relay.validation import parse_target
from tests.conftest import AUTH, REPO, gireve_location
from tests.csms_fake import bench
from tests.test_commands import command, start_session

MAX_EXAMPLES = 20  # per operation and generation mode (positive, negative)


def offline_app() -> web.Application:
    none: Any = None
    return ingress_app.create_app(Settings(), none, Health(), RoamingDeps(none, none, none))


def document() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(ingress_app.openapi_document())
    return doc


def test_the_document_validates() -> None:
    validate(document())


def test_docs_copy_is_current() -> None:
    kept = (REPO / "docs" / "openapi.json").read_bytes()
    assert kept == ingress_app.openapi_document(), "docs/openapi.json is out of date: relay openapi > docs/openapi.json"


def _sample(path: str) -> str:
    return path.replace("{", "").replace("}", "").replace("_", "")  # /x/{evse_uid} → /x/evseuid: an id as any


async def test_every_route_is_in_the_document_and_every_operation_reaches_a_route() -> None:
    app, doc = offline_app(), document()
    paths = doc["paths"]
    for method, path in openapi.routes(app):
        if (method, path) == ("*", ingress_app.PREFIX + EVENT_ROUTE):
            for (module, n), methods in event_routes().items():
                described = paths[event_path(ingress_app.PREFIX, module, n)[0]]
                assert set(described) == {m.lower() for m in methods}, (module, n)
        elif method != "*":
            assert method.lower() in paths.get(path, {}), f"{method} {path} is not in the document"
        else:
            assert path in (UNROUTED, "/admin/{tail}"), path
    for path, ops in paths.items():
        for method in ops:
            request = make_mocked_request(method.upper(), _sample(path), app=app)
            match = await app.router.resolve(request)
            route = match.route.resource.canonical if match.route.resource is not None else ""
            assert route != UNROUTED and match.http_exception is None, f"{method} {path} reaches no route"
            if route == ingress_app.PREFIX + EVENT_ROUTE:
                parse_target(method.upper(), match["tail"])  # 404/405 would raise


def test_a_route_the_document_cannot_describe_fails_the_build() -> None:
    described = ingress_app.openapi_of(offline_app())
    routes = (*described.routes, ("GET", ingress_app.PREFIX + "/new"))
    new = openapi.Ingress(described.prefix, routes, described.batch, described.batch_operation, described.item_result)
    with pytest.raises(openapi.UndocumentedRoute, match="/new"):
        openapi.build(new, openapi.admin_operations())


def test_patch_bodies_require_only_last_updated_and_headers_are_the_ingress_s() -> None:
    doc = document()
    schemas = doc["components"]["schemas"]
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            if "requestBody" not in op or not path.startswith(ingress_app.PREFIX):
                continue
            ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
            required = set(schemas[ref].get("required", ()))
            if method == "patch":
                assert required == {"last_updated"}, (path, ref, required)
            elif ref in ("Location", "Session", "Cdr", "Tariff"):
                assert {"id", "last_updated"} <= required, (path, ref)
    assert (openapi.parts.H_IDEMPOTENCY, openapi.parts.H_RESEND) == (ingress_app.H_IDEMPOTENCY, ingress_app.H_RESEND)


async def test_served_without_a_token(ingress: TestClient[Any, Any]) -> None:
    resp = await ingress.get("/ingress/openapi.json")  # no Authorization
    assert resp.status == 200 and resp.content_type == "application/json"
    body = await resp.read()
    assert body == openapi.document_bytes(ingress_app.openapi_of(ingress.app))
    assert json.loads(body)["openapi"] == "3.1.0"


async def test_a_newline_in_a_path_is_refused_in_json(ingress: TestClient[Any, Any]) -> None:
    """Found by schemathesis: ``{tail:.*}`` did not match a decoded %0A, which got aiohttp's text/plain 404."""
    for path, status in ((f"{ingress_app.PREFIX}/sessions/FR/AB1/a%0Ab", 422), ("/x%0Ay", 404)):
        resp = await ingress.session.put(URL(str(ingress.make_url(path)), encoded=True), json={}, headers=AUTH)
        assert (resp.status, resp.content_type) == (status, "application/json"), path
        assert (await resp.json())["status_code"] == 2001


def test_admin_operations_are_in_the_document() -> None:
    ops = openapi.admin_operations()
    if ops is None:
        pytest.skip("relay.ingress.admin (ADMIN_OPERATIONS) is absent: no admin routes to describe")
    doc = document()
    assert "adminToken" in doc["components"]["securitySchemes"]
    for op in ops:
        described = doc["paths"][op.path][op.method.lower()]
        assert described["security"] == [{"adminToken": []}], op.path
        if op.body is not None:
            assert "requestBody" in described, op.path


async def test_the_webhook_and_the_result_answer_are_as_described(make_settings: Callable[..., Settings]) -> None:
    """A real START_SESSION reaches the CSMS as a CommandNotification; its result's 202 is a ResultAnswer; a
    token the IOP pushes reaches the CSMS as a TokenNotification."""
    assert set(document()["webhooks"]) == {"command", "token"}
    async with bench(make_settings) as b:
        await b.put_location()
        status, _, _ = await command(b, "START_SESSION", start_session(b))
        assert status == 200
        [post] = b.csms.of_kind("command")
        notification = msgspec.convert(post.body, CommandNotification)
        status, answer = await b.ingress("POST", f"/commands/{notification.command_id}/result", {"result": "ACCEPTED"})
        assert status == 202
        msgspec.convert(answer, ResultAnswer)
        await b.push_token("0102ABCD")
        await b.csms.wait_for(lambda: bool(b.csms.of_kind("token")))
        msgspec.convert(b.csms.of_kind("token")[0].body, TokenNotification, strict=False)  # DateTimes are strings


# -- schemathesis against a live ingress --------------------------------------------------------------------------


@dataclass
class Run:
    by_status: Counter[str] = field(default_factory=Counter)
    five_xx: list[str] = field(default_factory=list)
    nonconforming: dict[str, str] = field(default_factory=dict)  # operation → first problem
    stored_on_refusal: list[str] = field(default_factory=list)
    accepted_events: int = 0
    sent: int = 0


def refused(status: int, body: bytes) -> bool:
    """An answer that says nothing was stored: 4xx/5xx, or a batch that accepted nothing."""
    if status >= 400:
        return True
    try:
        doc = json.loads(body)
    except ValueError:
        return False
    data = doc.get("data") if isinstance(doc, dict) else None
    return isinstance(data, dict) and data.get("accepted") == 0 and "results" in data


def stored(status: int, body: bytes) -> int:
    """Stream entries the answer says were written (as tests/test_hostile.stored_events counts them)."""
    try:
        data = json.loads(body)["data"]
    except (ValueError, KeyError, TypeError):
        return 0
    if status == 202:
        return 0 if data.get("duplicate") or data.get("replayed") else 1
    if status == 200 and isinstance(data, dict) and "results" in data:
        return int(data["accepted"]) - sum(1 for r in data["results"] if r.get("duplicate"))
    return 0


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]  # fmt: skip


def fuzz(doc: dict[str, Any], base_url: str, redis_url: str) -> Run:
    """Every operation of the document but the admin ones (their own token, their own tests), positive then
    negative, each case sent once; the Redis write counter read around each answer."""
    schema = schemathesis.openapi.from_dict(doc)
    r = redis.Redis.from_url(redis_url)
    run = Run()
    writes = [int(r.info("persistence")["rdb_changes_since_last_save"])]

    def send(case: Any) -> None:
        response = case.call(base_url=base_url, headers=AUTH, timeout=15)
        label = f"{case.method} {case.path}"
        run.sent += 1
        run.by_status[f"{response.status_code // 100}xx"] += 1
        if response.status_code >= 500:
            run.five_xx.append(f"{response.status_code} {label}: {response.content[:300]!r}")
        try:
            case.validate_response(response, checks=CHECKS)
        except (
            Exception,
            BaseExceptionGroup,
        ) as exc:  # a schemathesis failure (group): the answer is not what the document says
            run.nonconforming.setdefault(label, str(exc)[:600])
        now = int(r.info("persistence")["rdb_changes_since_last_save"])
        if now != writes[0] and refused(response.status_code, response.content):
            run.stored_on_refusal.append(f"{response.status_code} {label}: {now - writes[0]} writes")
        writes[0] = now
        if response.status_code < 300:
            run.accepted_events += stored(response.status_code, response.content)

    for result in schema.get_all_operations():
        operation = result.ok()  # type: ignore[union-attr]  # a schema that loads has no Err
        if operation.path.startswith("/admin"):
            continue
        names = {p.name for p in operation.path_parameters}
        hosted = {k: v for k, v in (("country_code", "FR"), ("party_id", "AB1")) if k in names}
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            strategy = operation.as_strategy(generation_mode=mode, path_parameters=hosted or None)

            @settings(max_examples=MAX_EXAMPLES, derandomize=True, database=None, deadline=None,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))  # fmt: skip
            @given(case=strategy)
            def each(case: Any) -> None:
                send(case)

            try:
                each()
            except Unsatisfiable:  # nothing to make invalid (no parameter, no body): the positive run covered it
                if mode is schemathesis.GenerationMode.POSITIVE:
                    raise
    r.close()
    return run


async def stream_entries(store: Store) -> int:
    total = 0
    async for key in store.redis.scan_iter(match="relay:*", _type="stream", count=1000):
        total += int(await store.redis.xlen(key))
    return total


@pytest.fixture
async def live(settings: Settings, store: Store) -> AsyncIterator[TestClient[Any, Any]]:
    """The ingress as relay serve builds it (roaming routes on, no IOP, no CSMS webhook) on loopback."""
    state, roaming = StateReader(store), RoamingStore(store)
    commands = Commands(settings, store, roaming, state, CsmsClient(settings.csms))
    deps = RoamingDeps(Authorizer(settings, None, state, roaming), commands, roaming)
    client = TestClient(TestServer(ingress_app.create_app(settings, store, Health(listeners_up=True), deps)))
    await client.start_server()
    yield client
    await client.close()


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_schemathesis_finds_no_5xx_and_no_stored_refusal(live: TestClient[Any, Any], store: Store,
                                                                 redis_url: str) -> None:  # fmt: skip
    put = await live.put(f"{ingress_app.PREFIX}/locations/FR/AB1/LOC1", json=gireve_location("LOC1"), headers=AUTH)
    assert put.status == 202  # a known Location: PATCHes of it get through
    doc = await (await live.get("/ingress/openapi.json")).json()
    before = await stream_entries(store)
    started = time.perf_counter()
    base = str(live.make_url("")).rstrip("/")
    run = await asyncio.to_thread(fuzz, doc, base, redis_url)
    elapsed = time.perf_counter() - started
    added = await stream_entries(store) - before
    statuses = ", ".join(f"{k} {v}" for k, v in sorted(run.by_status.items()))
    print(f"\nschemathesis {schemathesis.__version__}: {run.sent} requests in {elapsed:.1f} s ({statuses}); "
          f"{added} stream entries for {run.accepted_events} events accepted")  # fmt: skip
    assert not run.five_xx, "\n".join(run.five_xx[:10])
    assert not run.stored_on_refusal, "\n".join(run.stored_on_refusal[:10])
    assert added == run.accepted_events
    assert not run.nonconforming, "\n\n".join(f"{k}: {v}" for k, v in run.nonconforming.items())
    assert run.by_status["2xx"] > 0  # some requests got through, not only refusals
