"""GIREVE's rules on top of OCPI 2.2.1 cardinality (checklist L2, F2), as pure functions.

Each function returns the problems it finds; the caller decides (by profile) whether they refuse
the event or travel with it as warnings.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from msgspec import UNSET

from relay.config import Operator
from relay.errors import Problem
from relay.models import Location


def _missing(value: Any) -> bool:
    return value is None or value is UNSET


_PREFIXES: dict[str, tuple[str, str]] = {}


def _prefixes(op: Operator) -> tuple[str, str]:
    p = _PREFIXES.get(op.emi3_id)
    if p is None:
        p = _PREFIXES[op.emi3_id] = op.evse_id_prefixes()
    return p


def _check_evse_id(evse: Any, path: str, op: Operator, *, partial: bool) -> Iterable[Problem]:
    evse_id = getattr(evse, "evse_id", None)
    status = getattr(evse, "status", None)
    if _missing(evse_id):
        if not partial and status != "REMOVED":
            yield Problem(
                field=f"{path}.evse_id", rule="gireve.L2.evse_id", message="required unless status is REMOVED"
            )
        return
    prefixes = _prefixes(op)
    if not str(evse_id).upper().startswith(prefixes):
        yield Problem(
            field=f"{path}.evse_id",
            rule="gireve.L2.evse_id_prefix",
            message=f"{evse_id!r} must begin with the operator's eMI3 id ({prefixes[0]}… or {prefixes[1]}…)",
        )


def check_connector(conn: Any, path: str, *, partial: bool = False) -> list[Problem]:
    """``tariff_ids`` is required by GIREVE on every connector."""
    if not partial and _missing(getattr(conn, "tariff_ids", None)):
        return [Problem(field=f"{path}.tariff_ids", rule="gireve.L2.tariff_ids", message="required by GIREVE")]
    return []


def check_evse(evse: Any, path: str, op: Operator, *, partial: bool = False) -> list[Problem]:
    """capabilities, evse_id with the operator's prefix, and tariff_ids on each connector."""
    evse_id = getattr(evse, "evse_id", None)
    if isinstance(evse_id, str) and evse_id.startswith(_prefixes(op)):
        problems: list[Problem] = []  # the common case, without the generator
    else:
        problems = list(_check_evse_id(evse, path, op, partial=partial))
    if not partial and _missing(getattr(evse, "capabilities", None)):
        problems.append(
            Problem(field=f"{path}.capabilities", rule="gireve.L2.capabilities", message="required by GIREVE")
        )
    connectors: Any = getattr(evse, "connectors", None)
    if not _missing(connectors):
        for i, conn in enumerate(connectors):
            if _missing(getattr(conn, "tariff_ids", None)):
                problems += check_connector(conn, f"{path}.connectors[{i}]")
    return problems


def tariff_mismatch_warnings(evse: Any, path: str) -> list[Problem]:
    """GIREVE applies the first connector's tariff_ids to the whole EVSE: differing ones are ignored there."""
    connectors: Any = getattr(evse, "connectors", None)
    if _missing(connectors) or len(connectors) < 2:
        return []
    first = connectors[0].tariff_ids
    return [
        _tariff_mismatch(f"{path}.connectors[{i}].tariff_ids")
        for i, conn in enumerate(connectors[1:], start=1)
        if conn.tariff_ids != first
    ]


def _tariff_mismatch(field: str) -> Problem:
    return Problem(
        field=field,
        rule="gireve.L2.tariff_ids_per_evse",
        message="differs from the first connector's; GIREVE applies the first connector's tariff_ids to the EVSE",
    )


def check_location(loc: Any, op: Operator, *, partial: bool = False) -> list[Problem]:
    """owner.name and operator.name, then every EVSE."""
    problems: list[Problem] = []
    for field in ("owner", "operator"):
        value = getattr(loc, field, UNSET)
        if partial and value is UNSET:
            continue
        if _missing(value) or _missing(getattr(value, "name", None)):
            problems.append(
                Problem(field=f"$.{field}.name", rule=f"gireve.L2.{field}_name", message="required by GIREVE")
            )
    evses: Any = getattr(loc, "evses", None)
    if not _missing(evses):
        for i, evse in enumerate(evses):
            problems += check_evse(evse, f"$.evses[{i}]", op)
    return problems


def location_warnings(obj: Any) -> list[Problem]:
    """Warnings that never refuse an event, whatever the profile."""
    if hasattr(obj, "evses"):
        evses = obj.evses
        if _missing(evses):
            return []
        return [w for i, e in enumerate(evses) for w in tariff_mismatch_warnings(e, f"$.evses[{i}]")]
    return tariff_mismatch_warnings(obj, "$")


def check_whole_location(loc: Location, op: Operator) -> tuple[list[Problem], list[Problem]]:
    """``(check_location(loc, op), location_warnings(loc))`` of a Location PUT.

    The ingress's hot path: one pass over the EVSEs, building no field path, when the Location conforms
    (the common case, warnings aside); the two functions themselves as soon as something does not.
    """
    if loc.owner is None or loc.operator is None:  # BusinessDetails.name is required: present when decoded
        return check_location(loc, op), location_warnings(loc)
    warnings: list[Problem] = []
    if loc.evses:
        prefixes = _prefixes(op)
        for i, evse in enumerate(loc.evses):
            evse_id = evse.evse_id
            if evse_id is None or not evse_id.startswith(prefixes) or evse.capabilities is None:
                return check_location(loc, op), location_warnings(loc)
            connectors = evse.connectors
            first = connectors[0].tariff_ids  # at least one connector: the model says so
            for j, conn in enumerate(connectors):
                tariff_ids = conn.tariff_ids
                if tariff_ids is None:
                    return check_location(loc, op), location_warnings(loc)
                if tariff_ids != first:
                    warnings.append(_tariff_mismatch(f"$.evses[{i}].connectors[{j}].tariff_ids"))
    return [], warnings


def check_tariff(tariff: Any) -> list[Problem]:
    """start_date_time is required by GIREVE."""
    if _missing(getattr(tariff, "start_date_time", None)):
        return [Problem(field="$.start_date_time", rule="gireve.F2.start_date_time", message="required by GIREVE")]
    return []


def check_tariff_target(tariff: Any) -> list[Problem]:
    """GIREVE's target operator fields come both or neither; they name the per-eMSP variant (always enforced)."""
    cc = getattr(tariff, "target_operator_country_code", None)
    pid = getattr(tariff, "target_operator_party_id", None)
    if (cc is None) != (pid is None):
        return [
            Problem(
                field="$.target_operator_party_id" if pid is None else "$.target_operator_country_code",
                rule="gireve.F2.target_operator_pair",
                message="target_operator_country_code and target_operator_party_id come both or neither",
            )
        ]
    return []
