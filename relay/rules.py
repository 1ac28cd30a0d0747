"""GIREVE's rules on top of OCPI 2.2.1 cardinality (checklist L2, F2, K1), and the OCPI rules the models'
types cannot say (a CDR's id and credit fields), as pure functions.

Each function returns the problems it finds; for GIREVE's, the caller decides (by profile) whether they
refuse the event or travel with it as warnings.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from msgspec import UNSET

from relay import advenir
from relay.config import Operator
from relay.errors import Problem
from relay.models import Cdr, Location


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
    if not _evse_id_ok(str(evse_id).upper(), prefixes):
        yield Problem(
            field=f"{path}.evse_id",
            rule="gireve.L2.evse_id_prefix",
            message=f"{evse_id!r} must begin with the operator's eMI3 id and the EVSE marker E, then the outlet's id "
            f"({prefixes[0]}… or {prefixes[1]}…)",
        )


def _evse_id_ok(evse_id: str, prefixes: tuple[str, str]) -> bool:
    """The eMI3 EVSE id (GIREVE's definiton_roaming_uses_cases.md, "FR*AB1*EABCDEFG*1"): operator id, ``E``, and
    at least one character of the outlet's id after it, with the separator star throughout or nowhere."""
    starred, compact = prefixes
    return (evse_id.startswith(starred) and len(evse_id) > len(starred)) or (
        evse_id.startswith(compact) and len(evse_id) > len(compact)
    )


# GIREVE lists capabilities and tariff_ids as "mandatory" (cpo_locations.md) for what they say: whether the EVSE
# takes RFID or remote start, and which tariff group it belongs to. An empty list says neither, so it is no more
# accepted than an absent one. Except on an EVSE whose status is REMOVED, as for evse_id (same page): it is being
# retired, nobody charges there any more, and a CSMS may well have cleared both. The field itself stays required.
_EMPTY = "required by GIREVE, and not empty unless the EVSE's status is REMOVED"


def _required(value: Any, removed: bool) -> str | None:
    """Why ``value`` (a capabilities or tariff_ids list) fails GIREVE's rule; None when it does not."""
    if _missing(value):
        return "required by GIREVE"
    if not value and not removed:
        return _EMPTY
    return None


def check_connector(conn: Any, path: str, *, partial: bool = False, removed: bool = False) -> list[Problem]:
    """``tariff_ids`` is required by GIREVE on every connector, and not empty (``removed``: its EVSE is REMOVED)."""
    tariff_ids = getattr(conn, "tariff_ids", None)
    if partial and tariff_ids is UNSET:
        return []
    why = _required(tariff_ids, removed)
    return [Problem(field=f"{path}.tariff_ids", rule="gireve.L2.tariff_ids", message=why)] if why else []


def check_evse(evse: Any, path: str, op: Operator, *, partial: bool = False) -> list[Problem]:
    """capabilities, evse_id with the operator's prefix, and tariff_ids on each connector."""
    evse_id = getattr(evse, "evse_id", None)
    if isinstance(evse_id, str) and _evse_id_ok(evse_id, _prefixes(op)):
        problems: list[Problem] = []  # the common case, without the generator
    else:
        problems = list(_check_evse_id(evse, path, op, partial=partial))
    removed = getattr(evse, "status", None) == "REMOVED"
    capabilities = getattr(evse, "capabilities", None)
    if not (partial and capabilities is UNSET) and (why := _required(capabilities, removed)):
        problems.append(Problem(field=f"{path}.capabilities", rule="gireve.L2.capabilities", message=why))
    connectors: Any = getattr(evse, "connectors", None)
    if not _missing(connectors):
        for i, conn in enumerate(connectors):
            if not conn.tariff_ids:
                problems += check_connector(conn, f"{path}.connectors[{i}]", removed=removed)
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
        shortest_ok = len(prefixes[0]) + 1  # the starred prefix is the longer: a stricter test than _evse_id_ok
        for i, evse in enumerate(loc.evses):
            evse_id = evse.evse_id
            if (
                evse_id is None
                or len(evse_id) < shortest_ok
                or not evse_id.startswith(prefixes)
                or not evse.capabilities
            ):
                return check_location(loc, op), location_warnings(loc)
            connectors = evse.connectors
            first = connectors[0].tariff_ids  # at least one connector: the model says so
            for j, conn in enumerate(connectors):
                tariff_ids = conn.tariff_ids
                if not tariff_ids:  # None or []
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


# --- Sessions and CDRs ---------------------------------------------------------------------------------------------

# GIREVE's integration_guidelines.md, "RFID Tokens": the hexadecimal form of a 4- or 7-byte UID, 8 or 14 characters
# with leading zeros, case-insensitive (upper case recommended); "IOP rejects requests done with a bad RFID UID
# format". The one test of it: real-time authorisation (K1) and a Session's or CDR's cdr_token alike.
_RFID_UID = re.compile(r"[0-9A-Fa-f]{8}|[0-9A-Fa-f]{14}")


def is_rfid_uid(uid: str) -> bool:
    """An RFID UID as GIREVE takes it: 8 or 14 hexadecimal characters, nothing else (no trailing newline)."""
    return _RFID_UID.fullmatch(uid) is not None


def check_cdr_token(token: Any, path: str, op: Operator) -> list[Problem]:
    """The uid of an RFID ``cdr_token`` is 8 or 14 hex characters, unless Advenir (S4) replaces the token anyway."""
    if _missing(token) or token.type != "RFID" or is_rfid_uid(token.uid):
        return []
    if op.advenir and advenir.is_local(op, {"country_code": token.country_code, "party_id": token.party_id}):
        return []  # a non-roaming charge: the IOP gets GIREVE's anonymous token, never this uid
    return [
        Problem(
            field=f"{path}.uid",
            rule="gireve.K1.rfid_uid",
            message="an RFID UID is 8 or 14 hexadecimal characters (the 4- or 7-byte UID, leading zeros kept)",
        )
    ]


# mod_cdrs.asciidoc, CDR object: `id` is a CiString(39) "to allow for credit CDRs to have something appended to the
# original ID. Normal (non-credit) CDRs SHALL only have an ID with a maximum length of 36"; `credit_reference_id`
# "is required to be set for a Credit CDR" and the credit CDR "SHALL have a different CDR.id" (Credit CDRs).
# GIREVE's cpo_cdrs.md sets no other length and asks CPOs to send Credit CDRs: OCPI's rules are the stricter ones.
_CDR_ID_MAX = 36


def check_cdr(cdr: Cdr) -> list[Problem]:
    """OCPI's rules on a CDR's id and credit fields that its types cannot say (always enforced)."""
    if not cdr.credit:
        if len(cdr.id) > _CDR_ID_MAX:
            message = f"at most {_CDR_ID_MAX} characters unless the CDR is a Credit CDR (credit: true)"
            return [Problem(field="$.id", rule="ocpi.cdr_id", message=message)]
        return []
    if cdr.credit_reference_id is None:
        message = "required on a Credit CDR (credit: true): the id of the CDR it credits"
        return [Problem(field="$.credit_reference_id", rule="ocpi.credit_reference_id", message=message)]
    if cdr.credit_reference_id.upper() == cdr.id.upper():  # CiStrings
        message = "a Credit CDR has an id of its own, not the id of the CDR it credits"
        return [Problem(field="$.id", rule="ocpi.credit_cdr_id", message=message)]
    return []
