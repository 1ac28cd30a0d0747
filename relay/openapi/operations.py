"""The operations of the OpenAPI document: the ingress's routes, the admin routes and the CSMS webhook."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import msgspec

from relay.models.tokens import CommandResult, LocationReferences
from relay.openapi.parts import (
    ADMIN_STATUS_TEXT,
    CORRELATION,
    FROM_CC,
    FROM_PID,
    IDEMPOTENCY,
    JSON,
    OBJECTS,
    RESEND,
    STATUS_TEXT,
    VARIANT_QUERY,
    Ingress,
    Schemas,
    UndocumentedRoute,
    admin_error,
    batch_types,
    event_path,
    event_routes,
    not_null,
    path_param,
    reply,
)
from relay.openapi.shapes import (
    AuthorizationAnswer,
    CommandNotification,
    CommandVerdict,
    EventAnswer,
    Refusal,
    ResultAnswer,
    TokenAnswer,
    TokenNotification,
    Unavailable,
    batch_answer,
)
from relay.validation import DECODERS

__all__ = ["Builder"]


class Builder:
    """The document's parts: schemas, the ingress's operations, the admin operations, the webhooks."""

    def __init__(self, schemas: Schemas, ingress: Ingress) -> None:
        self.s = schemas
        self.ingress = ingress
        self.prefix = ingress.prefix

    def refusals(self, *statuses: int, text: Mapping[int, str] | None = None) -> dict[str, Any]:
        out = {str(st): reply((text or {}).get(st, STATUS_TEXT[st]), self.s(Refusal)) for st in statuses}
        out["503"] = self.unavailable()
        return out

    def unavailable(self) -> dict[str, Any]:
        retry = {
            "description": "Seconds to wait: 1 (Redis unavailable), 5 (Redis full, at its maxmemory).",
            "schema": {"type": "integer", "minimum": 1},
        }
        return reply(
            "Redis unavailable or full: nothing stored, send the same request again after Retry-After.",
            self.s(Unavailable),
            {"Retry-After": retry},
        )

    def body(self, type_: Any, description: str, required: bool = True) -> dict[str, Any]:
        return {"required": required, "description": description, "content": {JSON: {"schema": self.s(type_)}}}

    # -- the event routes (the catch-all route, expanded) --

    def events(self) -> dict[str, dict[str, Any]]:
        paths: dict[str, dict[str, Any]] = {}
        for (module, n), methods in event_routes().items():
            path, params = event_path(self.prefix, module, n)
            for method in methods:
                paths.setdefault(path, {})[method.lower()] = self.event(module, method, max(n - 3, 0), params)
        return paths

    def event(self, module: str, method: str, level: int, params: list[dict[str, Any]]) -> dict[str, Any]:
        what = OBJECTS[module][level]
        op: dict[str, Any] = {
            "tags": [module],
            "operationId": f"{method.lower()}_{what.lower().replace(' ', '_')}",
            "parameters": [*params, IDEMPOTENCY, RESEND, CORRELATION],
            "responses": {
                "202": reply(
                    "Stored durably (after Redis acknowledged the write); delivered to the IOP in order. "
                    "`duplicate`/`replayed`: nothing stored again.",
                    self.s(EventAnswer),
                ),
                **self.refusals(400, 401, 404, 413, 422),
            },
        }
        decoder = DECODERS.get((module, method, level))
        model = decoder.type if decoder is not None else None
        if method == "DELETE":
            op["summary"] = f"Delete a {what}"
            op["description"] = (
                "Deletes the default tariff. A per-eMSP variant cannot be deleted (GIREVE has no such call): naming "
                "one in the query is refused (422, `gireve.F1.variant_delete`); retire it with a PUT whose "
                "`end_date_time` is now or past."
            )
            op["parameters"] = [*params, *VARIANT_QUERY, IDEMPOTENCY, RESEND, CORRELATION]
            del op["responses"]["400"]
        elif model is None:
            raise UndocumentedRoute(f"{method} {module} level {level}: allowed by relay.validation but no model")
        else:
            partial = method == "PATCH"
            op["summary"] = (
                f"Update part of a {what}"
                if partial
                else f"Push a {what}"
                if method == "POST"
                else f"Create or replace a {what}"
            )
            op["description"] = (
                "Only the fields that changed, and `last_updated` (required by OCPI). Nested objects are whole."
                if partial
                else "The owner and the id are the body's (`country_code`, `party_id`, `id`)."
                if method == "POST"
                else "The URL's ids and the body's must agree (422, rule `ocpi.url_id`)."
            )
            op["requestBody"] = self.body(model, f"A {'partial ' if partial else ''}{what} (OCPI 2.2.1).")
        return op

    # -- the other routes of the ingress, by (method, canonical path) --

    def batch(self) -> dict[str, Any]:
        batch, _ = batch_types(self.ingress)
        return {
            "tags": ["batch"],
            "operationId": "post_batch",
            "summary": "Many events in one request",
            "description": "Each operation is what a single request would carry (`path` under or without the "
            "ingress prefix, `body` the single route's body, `query`, `correlation_id`), validated and stored "
            "on its own; operations on one object keep their order. Headers Idempotency-Key and X-Relay-Resend "
            "are not read here. 503 only when no operation was stored and each failed on Redis.",
            "parameters": [],
            "requestBody": self.body(batch, "The operations, at most `[ingress] max_batch_items`."),
            "responses": {
                "200": reply(
                    "One result per operation: 202 and its event id, or its refusal's status and errors.",
                    self.s(batch_answer(self.ingress.item_result)),
                ),
                **self.refusals(
                    400,
                    401,
                    413,
                    422,
                    text={422: "The body is not a batch (`operations`, each with `method` and `path`)."},
                ),
            },
        }

    def authorize(self) -> dict[str, Any]:
        return {
            "tags": ["tokens"],
            "operationId": "authorize_token",
            "summary": "Real-time authorisation of a token (GIREVE K1)",
            "description": "Asked of the IOP within `[iop] authorize_timeout_s`; otherwise decided from the tokens "
            "the IOP pushed (whitelist rules). A token whose whitelist is ALWAYS is decided at once.",
            "parameters": [
                path_param(
                    "uid",
                    "The token's uid (RFID: 8 or 14 hexadecimal characters).",
                    {"type": "string", "minLength": 1, "maxLength": 36},
                ),
                {
                    "name": "type",
                    "in": "query",
                    "required": False,
                    "description": "Token type (default RFID).",
                    "schema": {
                        "type": "string",
                        "enum": ["AD_HOC_USER", "APP_USER", "OTHER", "RFID"],
                        "default": "RFID",
                    },
                },
                FROM_CC,
                FROM_PID,
                CORRELATION,
            ],
            "requestBody": self.body(LocationReferences, "Where the token wants to charge."),
            "responses": {
                "200": reply(
                    "The decision, who made it, and why the IOP did not if it did not.", self.s(AuthorizationAnswer)
                ),
                **self.refusals(400, 401, 404, 413, 422),
            },
        }

    def get_token(self) -> dict[str, Any]:
        return {
            "tags": ["tokens"],
            "operationId": "get_token",
            "summary": "A token the IOP pushed (GIREVE K3)",
            "parameters": [
                path_param("cc", "The eMSP's country code.", {"type": "string", "minLength": 1}),
                path_param("pid", "The eMSP's party id.", {"type": "string", "minLength": 1}),
                path_param("uid", "The token's uid.", {"type": "string", "minLength": 1}),
                {
                    "name": "type",
                    "in": "query",
                    "required": False,
                    "description": "Token type (default RFID).",
                    "schema": {"type": "string", "default": "RFID"},
                },
            ],
            "responses": {
                "200": reply("The token as the IOP pushed it.", self.s(TokenAnswer)),
                **self.refusals(401, 404, text={404: "Unknown token (rule `token`)."}),
            },
        }

    def command_result(self) -> dict[str, Any]:
        return {
            "tags": ["commands"],
            "operationId": "post_command_result",
            "summary": "The result of a command (GIREVE K2)",
            "description": "The command_id is the one the webhook's `command` call carried. Stored, then POSTed "
            "to the command's response_url with retries; a result that never comes is sent as TIMEOUT after "
            "`[csms] command_result_timeout_s`.",
            "parameters": [
                path_param("command_id", "From the webhook's command call.", {"type": "string", "minLength": 1})
            ],
            "requestBody": self.body(CommandResult, "OCPI CommandResult."),
            "responses": {
                "202": reply("Stored; sent to the IOP.", self.s(ResultAnswer)),
                **self.refusals(400, 401, 404, 409, 413, 422, text={404: "Unknown command (rule `command`)."}),
            },
        }

    def public(self, summary: str, description: str, answers: dict[str, Any]) -> dict[str, Any]:
        return {
            "tags": ["operations"],
            "summary": summary,
            "description": description,
            "security": [],
            "responses": answers,
        }

    def healthz(self) -> dict[str, Any]:
        body = {"type": "object", "properties": {"status": {"type": "string"}, "reason": {"type": "string"}}}
        return self.public(
            "Liveness",
            "503 while the embedded Redis is down and being restarted.",
            {"200": reply("Alive.", body), "503": reply("The embedded Redis is down.", body)},
        )

    def readyz(self) -> dict[str, Any]:
        body = {
            "type": "object",
            "properties": {
                "ready": {"type": "boolean"},
                "redis": {"enum": ["ok", "unreachable"]},
                "stopping": {"type": "boolean"},
                "persistence": {"type": "object"},
                "iop_link": {"type": "string"},
            },
        }
        return self.public(
            "Readiness",
            "Redis answers, listeners up, not stopping; the IOP link is reported.",
            {"200": reply("Ready.", body), "503": reply("Not ready.", body)},
        )

    def metrics(self) -> dict[str, Any]:
        return self.public(
            "Prometheus metrics",
            "The text exposition format.",
            {"200": reply("Metrics.", {"type": "string"}, media="text/plain")},
        )

    def openapi(self) -> dict[str, Any]:
        return self.public(
            "This document",
            "No token: it describes the API and holds no data.",
            {"200": reply("OpenAPI 3.1.", {"type": "object"})},
        )

    # -- admin routes (relay.ingress.admin) --

    def admin(self, op: Any) -> dict[str, Any]:
        method, path = str(op.method).upper(), str(op.path)
        params = [
            path_param(name, f"The {name}.", {"type": "string", "minLength": 1})
            for name in re.findall(r"{([^}:]+)(?::[^}]*)?}", path)
        ]
        if op.query is not None:
            params += self.query_params(op.query)
        out: dict[str, Any] = {
            "tags": ["admin"],
            "operationId": "admin_" + re.sub(r"[^a-z0-9]+", "_", f"{method} {path}".lower()).strip("_"),
            "summary": str(op.summary),
            "security": [{"adminToken": []}],
            "parameters": params,
            "responses": {
                str(getattr(op, "status", 200)): reply(
                    str(op.summary), None if op.response is None else self.s(op.response)
                )
            },
        }
        if op.body is not None:
            out["requestBody"] = self.body(op.body, "See the schema.")
        errors = op.errors or ()
        described = errors.items() if isinstance(errors, Mapping) else ((e, None) for e in errors)
        error = admin_error(op)
        for status, text in described:
            answer = reply(text or ADMIN_STATUS_TEXT.get(int(status), "Refused."), self.s(error))
            if int(status) == 503:
                answer["headers"] = {"Retry-After": {"schema": {"type": "integer", "minimum": 1}}}
            out["responses"][str(int(status))] = answer
        return out

    def query_params(self, struct: type[msgspec.Struct]) -> list[dict[str, Any]]:
        component = self.s.components[self.s(struct)["$ref"].rsplit("/", 1)[1]]
        required = set(component.get("required", ()))
        return [
            {"name": name, "in": "query", "required": name in required, "schema": not_null(schema)}
            for name, schema in component.get("properties", {}).items()
        ]

    # -- the webhook --

    def webhooks(self) -> dict[str, Any]:
        headers = {
            "Authorization": {
                "description": "`Bearer` + `[csms] token`, when one is set.",
                "schema": {"type": "string"},
            },
            "X-Correlation-ID": {"description": "The IOP request's correlation id.", "schema": {"type": "string"}},
        }
        common = {"tags": ["webhook"], "security": [{"csmsToken": []}]}
        return {
            "command": {
                "post": {
                    **common,
                    "summary": "A remote command for the CSMS (POST to `[csms] webhook_url`)",
                    "description": "Within `[csms] timeout_s`; no 2xx, or no answer, is taken as REJECTED. Redirects "
                    "are not followed. Answers are read up to 1 MiB.",
                    "parameters": [{"name": n, "in": "header", **h} for n, h in headers.items()],
                    "requestBody": self.body(CommandNotification, "The command and the IOP's request, as received."),
                    "responses": {"200": reply("The CSMS's verdict (any 2xx).", self.s(CommandVerdict))},
                }
            },
            "token": {
                "post": {
                    **common,
                    "summary": "A token the IOP pushed (POST to `[csms] webhook_url`)",
                    "description": "Sent once, after the token is stored; a failure is logged, not retried.",
                    "parameters": [{"name": n, "in": "header", **h} for n, h in headers.items()],
                    "requestBody": self.body(TokenNotification, "The token, merged when the IOP patched it."),
                    "responses": {"200": reply("Any 2xx; the body is not read.")},
                }
            },
        }
