"""From one CSMS operation (route ids, method, raw body) to a validated Event, or InvalidEvent.

Pure but for one log line when it rewrites a body's timestamps: no I/O, so the single routes and the batch
endpoint share it and tests need no server.
"""

from __future__ import annotations

import re
import time
from typing import Any

import msgspec
import structlog

from relay import models, ordering, rules
from relay.config import Module, Operator, Settings
from relay.constants import MAX_HEADER_VALUE, header_value_ok
from relay.errors import InvalidEvent, Problem
from relay.events import Event, Method, new_event_id
from relay.json_depth import MAX_JSON_DEPTH, too_deep
from relay.models.common import Plan, decoder, instant_plan, rewrite_instants
from relay.timestamps import NOT_OCPI_DATETIME
from relay.type_problems import type_problems

log = structlog.get_logger(__name__)


class Target(msgspec.Struct, frozen=True):
    """What a route names: the module and the ids in the URL (and the per-eMSP variant a tariff DELETE's query
    names, which :func:`validate` refuses)."""

    module: Module
    country_code: str = ""
    party_id: str = ""
    object_id: str = ""
    evse_uid: str | None = None
    connector_id: str | None = None
    target_country: str | None = None
    target_party: str | None = None


class Accepted(msgspec.Struct, frozen=True):
    """A validated event and the warnings it travels with."""

    event: Event
    warnings: list[Problem]
    updated_ms: int = 0  # the body's last_updated, for the state index


_MODELS: dict[tuple[str, str, int], type[msgspec.Struct]] = {
    ("locations", "PUT", 0): models.Location,
    ("locations", "PUT", 1): models.Evse,
    ("locations", "PUT", 2): models.Connector,
    ("locations", "PATCH", 0): models.LocationPatch,
    ("locations", "PATCH", 1): models.EvsePatch,
    ("locations", "PATCH", 2): models.ConnectorPatch,
    ("sessions", "PUT", 0): models.Session,
    ("sessions", "PATCH", 0): models.SessionPatch,
    ("cdrs", "POST", 0): models.Cdr,
    ("tariffs", "PUT", 0): models.Tariff,
}
# The typed decoder of each (module, method, level: 0 object, 1 EVSE, 2 Connector); bench/bare.py uses them too.
DECODERS: dict[tuple[str, str, int], msgspec.json.Decoder[Any]] = {k: decoder(t) for k, t in _MODELS.items()}
# Where each body's DateTimes are, for the rare body whose timestamps must be rewritten.
_INSTANTS: dict[tuple[str, str, int], Plan] = {k: instant_plan(t) for k, t in _MODELS.items()}
# CiString(36): printable ASCII, no spaces; "." and ".." are no ids (a URL path would drop or climb them).
_ID_RE = re.compile(r"(?!\.\.?\Z)[\x21-\x7e]{1,36}\Z")  # \Z: "$" would let a trailing newline in
_AT_RE = re.compile(r"^(.*) - at `(\$[^`]*)`$", re.S)
_MISSING_RE = re.compile(r"^Object missing required field `([^`]+)`$")


def decode_problem(exc: msgspec.DecodeError | UnicodeDecodeError | RecursionError) -> InvalidEvent:
    """msgspec's error → 400 for bytes that are not JSON, 422 naming the field for a typed rule.

    msgspec raises UnicodeDecodeError (not a DecodeError) for invalid UTF-8 inside a JSON string, and
    RecursionError for nesting deeper than the interpreter's recursion limit.
    """
    if isinstance(exc, UnicodeDecodeError):
        return InvalidEvent([Problem(field="$", rule="json", message=f"not UTF-8: {exc.reason}")], status=400)
    if isinstance(exc, RecursionError):
        return too_deep_problem()
    msg = str(exc)
    if not isinstance(exc, msgspec.ValidationError):
        return InvalidEvent([Problem(field="$", rule="json", message=msg)], status=400)
    m = _AT_RE.match(msg)
    field, text = (m.group(2), m.group(1)) if m else ("$", msg)
    missing = _MISSING_RE.match(text)
    if missing:
        # Name the absent field itself, not the object that lacks it.
        return InvalidEvent([Problem(field=f"{field}.{missing.group(1)}", rule="ocpi.required", message=text)])
    return InvalidEvent([Problem(field=field, rule="ocpi.datetime" if text == NOT_OCPI_DATETIME else "ocpi.type",
                                 message=text)])  # fmt: skip


def _decode(route: tuple[str, str, int], raw: bytes) -> tuple[Any, bytes, list[Problem]]:
    """The typed body, the bytes to store and forward, and the timestamps rewritten in them (as warnings).

    The common body is decoded once and kept as it came. One whose DateTimes are not all written as OCPI
    writes them (types.asciidoc: UTC, string(25), ``Z`` or no designator) is rewritten before anything is
    stored, so the state, the stream and the IOP see the same instants in OCPI's form (relay.timestamps.normalise
    says what is converted and what is refused, with a 422 naming each field).
    """
    try:
        return DECODERS[route].decode(raw), raw, []
    except msgspec.ValidationError as exc:
        refused = _every_problem(route, raw, exc)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise decode_problem(exc) from None
    if not any(p.rule == "ocpi.datetime" for p in refused.problems):
        raise refused
    raw, warnings = _rewrite_datetimes(route, raw)
    try:
        return DECODERS[route].decode(raw), raw, warnings
    except msgspec.ValidationError as exc:
        raise _every_problem(route, raw, exc) from None
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise decode_problem(exc) from None


def _every_problem(route: tuple[str, str, int], raw: bytes, exc: msgspec.ValidationError) -> InvalidEvent:
    """A 422 naming every typed problem of the body (relay.type_problems), not only the decoder's first."""
    first = decode_problem(exc)
    try:
        doc = msgspec.json.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError, ValueError):
        return first
    problems = type_problems(_MODELS[route], doc)
    return InvalidEvent(problems) if problems else first


def _rewrite_datetimes(route: tuple[str, str, int], raw: bytes) -> tuple[bytes, list[Problem]]:
    """The body re-encoded with its DateTimes in OCPI's form (other values as they were), and one warning per
    change; a 422 naming every DateTime that is no instant."""
    if too_deep(raw):
        raise too_deep_problem()
    try:
        doc = msgspec.json.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise decode_problem(exc) from None
    except ValueError as exc:  # a number JSON carries but Python cannot read (1e999999)
        raise InvalidEvent([Problem(field="$", rule="json", message=f"a value Python cannot read: {exc}")]) from None
    rewritten: list[tuple[str, str, str]] = []
    unreadable: list[tuple[str, str]] = []
    doc = rewrite_instants(doc, _INSTANTS[route], "$", rewritten, unreadable)
    if unreadable:
        why = "not an instant an OCPI DateTime can carry"
        raise InvalidEvent([Problem(field=f, rule="ocpi.datetime", message=f"{why}: {r}") for f, r in unreadable])
    form = "OCPI DateTime: UTC, string(25)"
    warnings = [
        Problem(field=f, rule="ocpi.datetime_rewritten", message=f"{sent!r} stored and sent as {kept!r} ({form})")
        for f, sent, kept in rewritten
    ]
    return msgspec.json.encode(doc), warnings


def _ids_problems(target: Target, level: int) -> list[Problem]:
    problems = []
    match = _ID_RE.match
    if not match(target.object_id):
        problems.append(_id_problem("object_id"))
    if level >= 1 and not match(target.evse_uid or ""):
        problems.append(_id_problem("evse_uid"))
    if level == 2 and not match(target.connector_id or ""):
        problems.append(_id_problem("connector_id"))
    return problems


def _id_problem(name: str) -> Problem:
    return Problem(field=f"url.{name}", rule="ocpi.id", message="1 to 36 printable ASCII characters, not . or ..")


# F1: OCPI's DELETE /tariffs/{country_code}/{party_id}/{tariff_id} has no way to name one per-eMSP variant, and
# GIREVE's cpo_tariffs.md ("Differentiate tariff per eMSP") documents none: sent as is, it would read as the
# deletion of the default tariff. What GIREVE does document for a tariff that ends ("Locations tariff update":
# "Update the end_date of the ongoing tariff") retires a variant too.
VARIANT_DELETE_PROBLEM = Problem(
    field="query.target_operator_country_code",
    rule="gireve.F1.variant_delete",
    message="GIREVE has no DELETE of one per-eMSP variant (the IOP would take it for the default tariff): retire "
    "the variant with a PUT of it (same target_operator_country_code/party_id) whose end_date_time is now or past",
)


def too_deep_problem() -> InvalidEvent:
    """400 for a body that nests arrays and objects deeper than MAX_JSON_DEPTH."""
    return InvalidEvent([Problem(field="$", rule="json", message=f"nested deeper than {MAX_JSON_DEPTH} levels")], 400)


# The event's X-Correlation-ID goes in a header of every attempt: a value no header can carry is refused here.
_PRINTABLE = f"printable ASCII (0x20-0x7E), at most {MAX_HEADER_VALUE} characters"
CORRELATION_PROBLEM = Problem(field="X-Correlation-ID", rule="header", message=_PRINTABLE)


def _same(problems: list[Problem], body: Any, field: str, expected: str | None, *, ci: bool) -> None:
    """URL ids and body ids must agree (OCPI's own Receiver rule), ignoring case where the type is a CiString."""
    value = getattr(body, field, msgspec.UNSET)
    if value is msgspec.UNSET or value is None or expected is None:
        return
    if (value.upper() != expected.upper()) if ci else (value != expected):
        problems.append(
            Problem(field=f"$.{field}", rule="ocpi.url_id", message=f"{value!r} differs from the URL's {expected!r}")
        )


def _url_problems(target: Target, body: Any, level: int) -> list[Problem]:
    problems: list[Problem] = []
    if level == 0:
        oid, cc, pid = getattr(body, "id", None), getattr(body, "country_code", None), getattr(body, "party_id", None)
        unset = msgspec.UNSET
        if (
            (oid == target.object_id or oid is None or oid is unset)
            and (cc == target.country_code or cc is None or cc is unset)
            and (pid == target.party_id or pid is None or pid is unset)
        ):
            return problems  # the common case: the body names exactly what the URL names
        _same(problems, body, "country_code", target.country_code, ci=True)
        _same(problems, body, "party_id", target.party_id, ci=True)
        _same(problems, body, "id", target.object_id, ci=False)
    elif level == 1:
        _same(problems, body, "uid", target.evse_uid, ci=False)
    else:
        _same(problems, body, "id", target.connector_id, ci=False)
    return problems


def _rules(target: Target, body: Any, level: int, op: Operator, method: str) -> tuple[list[Problem], list[Problem]]:
    """GIREVE's rules: (problems that the profile may soften, warnings that never refuse)."""
    if level == 0 and method == "PUT" and target.module == "locations":  # the common event: one pass
        return rules.check_whole_location(body, op)
    partial = method == "PATCH"
    if target.module == "locations":
        checks = (
            rules.check_location(body, op, partial=partial)
            if level == 0
            else rules.check_evse(body, "$", op, partial=partial)
            if level == 1
            else rules.check_connector(body, "$", partial=partial)
        )
        return checks, rules.location_warnings(body) if level < 2 else []
    if target.module == "tariffs":
        return rules.check_tariff(body), []
    return rules.check_cdr_token(getattr(body, "cdr_token", None), "$.cdr_token", op), []  # sessions, cdrs


def _always(module: str, body: Any) -> list[Problem]:
    """The rules no profile softens: GIREVE's tariff variant pair (it names the object), OCPI's CDR id and credit."""
    if module == "tariffs":
        return rules.check_tariff_target(body)
    if module == "cdrs":
        return rules.check_cdr(body)
    return []


def validate(target: Target, method: Method, raw: bytes, settings: Settings, *, correlation_id: str = "") -> Accepted:
    """Decode, check ids, operator (T6) and GIREVE rules; build the Event. Raises InvalidEvent."""
    level = 2 if target.connector_id is not None else 1 if target.evse_uid is not None else 0
    problems = _ids_problems(target, level) if target.module != "cdrs" else []
    if correlation_id and not header_value_ok(correlation_id):
        problems.append(CORRELATION_PROBLEM)
    body: Any = None
    rewritten: list[Problem] = []
    if method != "DELETE":
        route = (target.module, method, level)
        if route not in DECODERS:
            raise InvalidEvent([Problem(field="method", rule="route", message=f"{method} not allowed here")], 405)
        body, raw, rewritten = _decode(route, raw)
        if too_deep(raw):  # unknown fields are skipped by the decoder, at any depth
            raise too_deep_problem()
    elif target.target_country is not None or target.target_party is not None:
        problems.append(VARIANT_DELETE_PROBLEM)
    if target.module == "cdrs":
        target = _owner_from_body(target, body)
    op = settings.operator(target.country_code, target.party_id)
    if op is None:
        where = "$.party_id" if target.module == "cdrs" else "url.party_id"  # a CDR names its owner in the body
        message = f"{target.country_code}/{target.party_id} is not hosted here"
        raise InvalidEvent([Problem(field=where, rule="operator", message=message)], status=404)
    warnings: list[Problem] = []
    if body is not None:
        problems += _url_problems(target, body, level) if target.module != "cdrs" else []
        gireve, warnings = _rules(target, body, level, op, method)
        if settings.ingress.profile == "strict":
            problems += gireve
        else:
            warnings = gireve + warnings
        problems += _always(target.module, body)
    if problems:
        raise InvalidEvent(problems)
    event = Event(
        id=new_event_id(),
        module=target.module,
        method=method,
        country_code=op.country_code,
        party_id=op.party_id,
        object_id=target.object_id,
        evse_uid=target.evse_uid,
        connector_id=target.connector_id,
        key=_key(target, op, body),
        correlation_id=correlation_id,
        received_at=time.time(),
        body=raw if method != "DELETE" else b"",
    )
    stamp = getattr(body, "last_updated", None)
    updated_ms = int(stamp.timestamp() * 1000) if stamp is not None and stamp is not msgspec.UNSET else 0
    if rewritten:
        # The CSMS gets them as warnings in its 202; operators get this line (a CSMS sending local time, say).
        log.warning("datetime_rewritten", event_id=event.id, module=event.module, object=event.object_ref(),
                    fields={p.field: p.message for p in rewritten})  # fmt: skip
        warnings = rewritten + warnings
    return Accepted(event, warnings, updated_ms)


def _owner_from_body(target: Target, body: Any) -> Target:
    """A CDR is POSTed without ids in the URL: its owner and id come from the body."""
    if target.module != "cdrs" or body is None:
        return target
    return Target(module="cdrs", country_code=body.country_code, party_id=body.party_id, object_id=body.id)


def _key(target: Target, op: Operator, body: Any) -> str:
    cc, pid = op.country_code, op.party_id
    if target.module == "locations":
        return ordering.location_key(cc, pid, target.object_id)
    if target.module == "sessions":
        return ordering.session_key(cc, pid, target.object_id)
    if target.module == "cdrs":
        if body.session_id:
            return ordering.session_key(cc, pid, body.session_id)
        return ordering.cdr_key(cc, pid, body.id)
    if body is not None:
        return ordering.tariff_key(
            cc, pid, target.object_id, body.target_operator_country_code, body.target_operator_party_id
        )
    return ordering.tariff_key(cc, pid, target.object_id, target.target_country, target.target_party)


_ALLOWED: dict[str, tuple[frozenset[str], int, int]] = {
    # module: (methods, min ids after the module, max ids after the module)
    "locations": (frozenset({"PUT", "PATCH"}), 3, 5),
    "sessions": (frozenset({"PUT", "PATCH"}), 3, 3),
    "cdrs": (frozenset({"POST"}), 0, 0),
    "tariffs": (frozenset({"PUT", "DELETE"}), 3, 3),
}


def parse_target(method: str, path: str, query: dict[str, str] | None = None) -> Target:
    """``locations/FR/AB1/LOC1/3256/1`` (decoded, relative to the ingress prefix) → Target, or 404/405."""
    parts = path.strip("/").split("/")
    if "" in parts:
        parts = [p for p in parts if p]
    module = parts[0] if parts else ""
    spec = _ALLOWED.get(module)
    n = len(parts) - 1
    if spec is None or not spec[1] <= n <= spec[2]:
        raise InvalidEvent([Problem(field="url", rule="route", message=f"no such route: /{path.strip('/')}")], 404)
    if method not in spec[0]:
        allowed = ", ".join(sorted(spec[0]))
        raise InvalidEvent([Problem(field="method", rule="route", message=f"{method} not allowed; use {allowed}")], 405)
    if n == 3 and not query:  # the common case: an object, no query
        return Target(module, parts[1], parts[2], parts[3])  # type: ignore[arg-type]  # checked against _ALLOWED
    ids: list[str | None] = [*parts[1:], None, None, None, None, None][:5]
    q = query or {}
    return Target(
        module=module,  # type: ignore[arg-type]  # checked against _ALLOWED above
        country_code=ids[0] or "",
        party_id=ids[1] or "",
        object_id=ids[2] or "",
        evse_uid=ids[3],
        connector_id=ids[4],
        target_country=q.get("target_operator_country_code"),
        target_party=q.get("target_operator_party_id"),
    )
