"""OCPI 2.2.1 Sessions module: Session and its PATCH body.

Source: ``mod_sessions.asciidoc``. CdrToken, ChargingPeriod and AuthMethod come from the CDRs module and
live in :mod:`relay.models.common`.
"""

from __future__ import annotations

from typing import Literal

from msgspec import UNSET, UnsetType

from relay.models.common import (
    AuthMethod,
    CdrToken,
    ChargingPeriod,
    CiString2,
    CiString3,
    CiString36,
    OcpiStruct,
    Price,
    String3,
    String255,
)
from relay.timestamps import Instant

SessionStatus = Literal["ACTIVE", "COMPLETED", "INVALID", "PENDING", "RESERVATION"]


class Session(OcpiStruct, kw_only=True):
    """One charging session as the CPO currently knows it."""

    country_code: CiString2
    party_id: CiString3
    id: CiString36
    start_date_time: Instant
    end_date_time: Instant | None = None
    kwh: float
    cdr_token: CdrToken
    auth_method: AuthMethod
    authorization_reference: CiString36 | None = None
    location_id: CiString36
    evse_uid: CiString36
    connector_id: CiString36
    meter_id: String255 | None = None
    currency: String3
    charging_periods: list[ChargingPeriod] | None = None
    total_cost: Price | None = None
    status: SessionStatus
    last_updated: Instant


class SessionPatch(OcpiStruct, kw_only=True):
    """PATCH body for a Session: only the fields that changed, plus ``last_updated``.

    Absent fields are UNSET. ``last_updated`` is required: OCPI says every PATCH request SHALL carry it.
    ``charging_periods`` in a PATCH are appended to the Session's list, not a replacement (OCPI rule,
    applied by whoever merges the patch).
    """

    country_code: CiString2 | UnsetType = UNSET
    party_id: CiString3 | UnsetType = UNSET
    id: CiString36 | UnsetType = UNSET
    start_date_time: Instant | UnsetType = UNSET
    end_date_time: Instant | UnsetType = UNSET
    kwh: float | UnsetType = UNSET
    cdr_token: CdrToken | UnsetType = UNSET
    auth_method: AuthMethod | UnsetType = UNSET
    authorization_reference: CiString36 | UnsetType = UNSET
    location_id: CiString36 | UnsetType = UNSET
    evse_uid: CiString36 | UnsetType = UNSET
    connector_id: CiString36 | UnsetType = UNSET
    meter_id: String255 | UnsetType = UNSET
    currency: String3 | UnsetType = UNSET
    charging_periods: list[ChargingPeriod] | UnsetType = UNSET
    total_cost: Price | UnsetType = UNSET
    status: SessionStatus | UnsetType = UNSET
    last_updated: Instant
