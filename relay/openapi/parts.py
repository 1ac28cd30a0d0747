"""The parts of the OpenAPI document: what it is built from (:class:`Ingress`), the schemas (msgspec's), the
parameters, headers and answers that several operations share, and the event routes of the ingress.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
from msgspec import UNSET

from relay.config import MODULES
from relay.constants import H_CORRELATION, H_FROM_CC, H_FROM_PID, MAX_HEADER_VALUE
from relay.errors import InvalidEvent
from relay.openapi.shapes import Refusal
from relay.timestamps import Instant
from relay.validation import parse_target

OPENAPI_PATH = "/ingress/openapi.json"
H_IDEMPOTENCY, H_RESEND = "Idempotency-Key", "X-Relay-Resend"  # relay.ingress.app's (a test keeps them equal)
REF = "#/components/schemas/{name}"
JSON = "application/json"


class UndocumentedRoute(RuntimeError):
    """A route of the ingress that this module does not describe."""


@dataclass(frozen=True)
class Ingress:
    """What the document describes: the ingress's prefix and route table, and the types its batch route reads
    (``batch``, ``batch_operation``) and answers per item (``item_result``)."""

    prefix: str
    routes: tuple[tuple[str, str], ...]
    batch: type[msgspec.Struct]
    batch_operation: type[msgspec.Struct]
    item_result: type[msgspec.Struct]


# -- the schemas -----------------------------------------------------------------------------------------------------


def schema_hook(type_: type[Any]) -> dict[str, Any]:
    if type_ is Instant:
        return {
            "type": "string",
            "format": "date-time",
            "description": "OCPI DateTime (UTC, `Z` or no designator, at most 25 characters). Another RFC 3339 "
            "instant is stored and sent in that form, with an `ocpi.datetime_rewritten` warning.",
        }
    raise NotImplementedError(f"no schema for {type_!r}")


def doc_copy(cls: type[msgspec.Struct], swap: Mapping[Any, Any]) -> type[msgspec.Struct]:
    """A Struct like ``cls`` for the document: a ``msgspec.Raw`` field (any JSON, whose default msgspec cannot write
    in a schema) becomes ``Any`` without a default; the field types in ``swap`` are replaced."""
    fields: list[Any] = []
    for f in msgspec.structs.fields(cls):
        if f.type is msgspec.Raw:
            fields.append((f.encode_name, Any, UNSET))
        else:
            t = swap.get(f.type, f.type)
            if f.required:
                fields.append((f.encode_name, t))
            elif f.default_factory is not msgspec.NODEFAULT:
                fields.append((f.encode_name, t, msgspec.field(default_factory=f.default_factory)))
            else:
                fields.append((f.encode_name, t, f.default))
    forbid = cls.__struct_config__.forbid_unknown_fields
    return msgspec.defstruct(cls.__name__, fields, kw_only=True, forbid_unknown_fields=forbid, module=__name__)


@functools.cache
def batch_types(ingress: Ingress) -> tuple[type[msgspec.Struct], type[msgspec.Struct]]:
    """The batch body and its operation, as the document shows them (``body``: any JSON)."""
    operation = doc_copy(ingress.batch_operation, {})
    swap = {list[ingress.batch_operation]: list[operation]}  # type: ignore[name-defined,valid-type]
    return doc_copy(ingress.batch, swap), operation


class Schemas:
    """Every type the document names, turned into components once (msgspec names them after their classes)."""

    def __init__(self, types: Iterable[Any]) -> None:
        self.types = list(dict.fromkeys(types))
        refs, self.components = msgspec.json.schema_components(self.types, schema_hook=schema_hook, ref_template=REF)
        self.refs = dict(zip(self.types, refs, strict=True))

    def __call__(self, type_: Any) -> dict[str, Any]:
        return dict(self.refs[type_])


# -- parameters and responses ----------------------------------------------------------------------------------------

PRINTABLE = f"^[ -~]{{1,{MAX_HEADER_VALUE}}}$"
# CiString(36) as validation._ID_RE reads it (printable ASCII but space, not "." or ".."), in ECMA-262 syntax.
ID_PATTERN = r"^(?!\.\.?$)[!-~]{1,36}$"


def path_param(name: str, description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": schema or {"type": "string", "pattern": ID_PATTERN},
    }


def header_param(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "header", "required": False, "description": description, "schema": schema}


CORRELATION = header_param(
    H_CORRELATION,
    "Kept with the event and sent to the IOP on every attempt. Printable ASCII, at most "
    f"{MAX_HEADER_VALUE} characters (else 422, rule `header`).",
    {"type": "string", "pattern": PRINTABLE},
)
IDEMPOTENCY = header_param(
    H_IDEMPOTENCY,
    "The CSMS's id of this request (its outbox id, say): the first answer is kept for `[ingress] "
    "idempotency_window_s` per operator and route; the same key with the same body gets it back (`replayed`, "
    "nothing stored), with another body a 422 (rule `idempotency`). Printable ASCII, 1 to "
    f"{MAX_HEADER_VALUE} characters (else 422, rule `header`).",
    {"type": "string", "pattern": PRINTABLE},
)
RESEND = header_param(
    H_RESEND,
    "`true` or `1` (case and surrounding spaces ignored): store and send the event even when the object is "
    "unchanged (a deliberate resend, not a retry). Any other value: 422, rule `header`.",
    {"type": "string", "enum": ["true", "1"]},
)
FROM_CC = header_param(
    H_FROM_CC,
    "The operator that owns the location, with OCPI-from-party-id (when several are "
    "hosted and [state] is off, or several have the location).",
    {"type": "string", "maxLength": 2},
)
FROM_PID = header_param(H_FROM_PID, "See OCPI-from-country-code.", {"type": "string", "maxLength": 3})

STATUS_TEXT = {
    400: "Not JSON (or not UTF-8), or arrays/objects nested more than 64 deep. Nothing stored.",
    401: "Missing or wrong token (`Authorization`, rule `auth`). Nothing stored.",
    404: "No such route, or an operator this relay does not host (rule `operator`, GIREVE T6). Nothing stored.",
    409: "The command's result already went to the IOP (or TIMEOUT did). Nothing stored.",
    413: "Body larger than `[ingress] max_body_bytes` (a batch: 64 times that), or more than "
    "`[ingress] max_batch_items` operations (rule `size`). Nothing stored.",
    422: "JSON that breaks a rule: OCPI types, cardinality, lengths, enums, DateTimes; a URL id that is no "
    "CiString(36) or differs from the body's; GIREVE's rules (profile `strict`); a malformed header or a reused "
    "Idempotency-Key. `errors` names each field (a JSON path, `url.*`, `query.*` or the header) and its rule. "
    "Nothing stored.",
}


def reply(
    description: str, schema: dict[str, Any] | None = None, headers: dict[str, Any] | None = None, media: str = JSON
) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description}
    if schema is not None:
        out["content"] = {media: {"schema": schema}}
    if headers:
        out["headers"] = headers
    return out


def not_null(schema: dict[str, Any]) -> dict[str, Any]:
    """A query parameter's schema without msgspec's ``null`` branch of an optional field (a query has no null)."""
    branches = [b for b in schema.get("anyOf", ()) if b != {"type": "null"}]
    if len(branches) != 1:
        return schema
    out = {**branches[0], **{k: v for k, v in schema.items() if k not in ("anyOf", "default")}}
    if schema.get("default") is not None:
        out["default"] = schema["default"]
    return out


OBJECTS: dict[str, tuple[str, ...]] = {
    "locations": ("Location", "EVSE", "Connector"),
    "sessions": ("Session",),
    "cdrs": ("CDR",),
    "tariffs": ("Tariff",),
}
OBJECT_ID = {"locations": "location_id", "sessions": "session_id", "tariffs": "tariff_id"}
VARIANT_QUERY = [
    {
        "name": name,
        "in": "query",
        "required": False,
        "schema": {"type": "string"},
        "description": "A per-eMSP variant: refused (422, `gireve.F1.variant_delete`).",
    }
    for name in ("target_operator_country_code", "target_operator_party_id")
]


def event_routes() -> dict[tuple[str, int], list[str]]:
    """(module, ids after it) → the methods the ingress's event route takes there, as relay.validation.parse_target
    says (what it does not refuse with 404 or 405)."""
    found: dict[tuple[str, int], list[str]] = {}
    for module in MODULES:
        for n in range(6):
            for method in ("DELETE", "GET", "PATCH", "POST", "PUT"):
                try:
                    parse_target(method, "/".join([module, *["X"] * n]))
                except InvalidEvent:
                    continue
                found.setdefault((module, n), []).append(method)
    return found


def event_path(prefix: str, module: str, n: int) -> tuple[str, list[dict[str, Any]]]:
    """The path of a module's route with ``n`` ids after the module, and its parameters."""
    if module not in OBJECTS or (n and module not in OBJECT_ID) or n not in (0, 3, 4, 5):
        raise UndocumentedRoute(f"{module} with {n} ids: add it to relay.openapi")
    names = ["country_code", "party_id", OBJECT_ID.get(module, ""), "evse_uid", "connector_id"][:n]
    text = {
        "country_code": ("The owning operator's country code (a hosted operator, else 404).", {"type": "string"}),
        "party_id": ("The owning operator's party id (a hosted operator, else 404).", {"type": "string"}),
    }
    params = [
        path_param(
            name,
            *text.get(
                name,
                ("CiString(36): 1 to 36 printable ASCII characters, not `.` or `..` (else 422, rule `ocpi.id`).", None),
            ),
        )
        for name in names
    ]
    return prefix + f"/{module}" + "".join(f"/{{{name}}}" for name in names), params


# -- the route table -------------------------------------------------------------------------------------------------

EVENT_ROUTE = "/{tail}"  # after the prefix: the catch-all of create_app, every Receiver-shaped route
UNROUTED = "/{path}"  # create_app's last route: 404/405 for what no route takes
ADMIN_UNROUTED = "/admin/{tail}"  # relay.ingress.admin's last route: 404/405 for what no admin route takes
ADMIN_STATUS_TEXT = {
    400: "A query parameter or body field that breaks a rule (each named in `errors`).",
    401: "Missing or wrong admin token.",
    403: "The admin API is disabled: no admin token configured.",
    404: "No such dead letter.",
    413: "Body too large.",
    503: "Redis unavailable: try again after Retry-After.",
}


def admin_error(op: Any) -> Any:
    """The type of the admin routes' error answers (``AdminError`` beside ``AdminOperation``), else Refusal."""
    return getattr(importlib.import_module(type(op).__module__), "AdminError", Refusal)
