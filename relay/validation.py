"""From one CSMS operation (route ids, method, raw body) to a validated Event, or InvalidEvent.

Pure: no I/O, so the single routes and the batch endpoint share it and tests need no server.
"""

from __future__ import annotations

import re
import time
from typing import Any

import msgspec

from relay import models, ordering, rules
from relay.config import Module, Operator, Settings
from relay.constants import MAX_HEADER_VALUE, header_value_ok
from relay.errors import InvalidEvent, Problem
from relay.events import Event, Method, new_event_id
from relay.json_depth import MAX_JSON_DEPTH, too_deep


class Target(msgspec.Struct, frozen=True):
    """What a route names: the module and the ids in the URL (or query, for a tariff DELETE variant)."""

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


# The typed decoder of each (module, method, level: 0 object, 1 EVSE, 2 Connector); bench/bare.py uses them too.
DECODERS: dict[tuple[str, str, int], msgspec.json.Decoder[Any]] = {
    ("locations", "PUT", 0): msgspec.json.Decoder(models.Location),
    ("locations", "PUT", 1): msgspec.json.Decoder(models.Evse),
    ("locations", "PUT", 2): msgspec.json.Decoder(models.Connector),
    ("locations", "PATCH", 0): msgspec.json.Decoder(models.LocationPatch),
    ("locations", "PATCH", 1): msgspec.json.Decoder(models.EvsePatch),
    ("locations", "PATCH", 2): msgspec.json.Decoder(models.ConnectorPatch),
    ("sessions", "PUT", 0): msgspec.json.Decoder(models.Session),
    ("sessions", "PATCH", 0): msgspec.json.Decoder(models.SessionPatch),
    ("cdrs", "POST", 0): msgspec.json.Decoder(models.Cdr),
    ("tariffs", "PUT", 0): msgspec.json.Decoder(models.Tariff),
}
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
    return InvalidEvent([Problem(field=field, rule="ocpi.type", message=text)])


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


def _gireve(target: Target, body: Any, level: int, op: Operator, method: str) -> tuple[list[Problem], list[Problem]]:
    """(rule problems that the profile may soften, warnings that never refuse)."""
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
    if target.module == "tariffs" and method == "PUT":
        return rules.check_tariff(body), []
    return [], []


def validate(target: Target, method: Method, raw: bytes, settings: Settings, *, correlation_id: str = "") -> Accepted:
    """Decode, check ids, operator (T6) and GIREVE rules; build the Event. Raises InvalidEvent."""
    level = 2 if target.connector_id is not None else 1 if target.evse_uid is not None else 0
    problems = _ids_problems(target, level) if target.module != "cdrs" else []
    if correlation_id and not header_value_ok(correlation_id):
        problems.append(CORRELATION_PROBLEM)
    body: Any = None
    if method != "DELETE":
        decoder = DECODERS.get((target.module, method, level))
        if decoder is None:
            raise InvalidEvent([Problem(field="method", rule="route", message=f"{method} not allowed here")], 405)
        try:
            body = decoder.decode(raw)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise decode_problem(exc) from None
        if too_deep(raw):  # unknown fields are skipped by the decoder, at any depth
            raise too_deep_problem()
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
        if level == 0 and method == "PUT" and target.module == "locations":  # the common event: one pass
            gireve, warnings = rules.check_whole_location(body, op)
        else:
            gireve, warnings = _gireve(target, body, level, op, method)
        if target.module == "tariffs":
            problems += rules.check_tariff_target(body)
        if settings.ingress.profile == "strict":
            problems += gireve
        else:
            warnings = gireve + warnings
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
