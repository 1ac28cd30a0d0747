"""OCPI 2.2.1 CDRs module: Cdr and its nested types.

Source: ``mod_cdrs.asciidoc``. CDRs are only POSTed whole, so there is no PATCH body. CdrToken,
CdrDimension and ChargingPeriod, shared with Sessions, live in :mod:`relay.models.common`.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from relay.models.common import (
    AuthMethod,
    CdrToken,
    ChargingPeriod,
    CiString2,
    CiString3,
    CiString32,
    CiString36,
    CiString39,
    CiString48,
    GeoLocation,
    OcpiStruct,
    Price,
    String3,
    String10,
    String20,
    String45,
    String255,
    String512,
    String5000,
)
from relay.models.locations import ConnectorFormat, ConnectorType, PowerType
from relay.models.tariffs import Tariff
from relay.timestamps import Instant


class CdrLocation(OcpiStruct, kw_only=True):
    """The Location of a CDR reduced to the EVSE and Connector used, as they were at the session start."""

    id: CiString36
    name: String255 | None = None
    # 45 and 20, not Location's 255 and 45: the CdrLocation table was not widened when the Location one was.
    address: String45
    city: String45
    postal_code: String10 | None = None
    state: String20 | None = None
    country: String3
    coordinates: GeoLocation
    evse_uid: CiString36
    evse_id: CiString48
    connector_id: CiString36
    connector_standard: ConnectorType
    connector_format: ConnectorFormat
    connector_power_type: PowerType


class SignedValue(OcpiStruct, kw_only=True):
    """One signed meter value with its plain data."""

    nature: CiString32
    plain_data: String5000
    signed_data: String5000


class SignedData(OcpiStruct, kw_only=True):
    """Signed meter data of the session (German Eichrecht and similar)."""

    encoding_method: CiString36
    encoding_method_version: int | None = None
    public_key: String512 | None = None
    signed_values: Annotated[list[SignedValue], msgspec.Meta(min_length=1)]
    url: String512 | None = None


class Cdr(OcpiStruct, kw_only=True):
    """A charge detail record: the final, billable account of a session."""

    country_code: CiString2
    party_id: CiString3
    id: CiString39  # 39 for a Credit CDR only (a suffix to the original id); 36 otherwise: rules.check_cdr
    start_date_time: Instant
    end_date_time: Instant
    session_id: CiString36 | None = None
    cdr_token: CdrToken
    auth_method: AuthMethod
    authorization_reference: CiString36 | None = None
    cdr_location: CdrLocation
    meter_id: String255 | None = None
    currency: String3
    tariffs: list[Tariff] | None = None
    charging_periods: Annotated[list[ChargingPeriod], msgspec.Meta(min_length=1)]
    signed_data: SignedData | None = None
    total_cost: Price
    total_fixed_cost: Price | None = None
    total_energy: float
    total_energy_cost: Price | None = None
    total_time: float
    total_time_cost: Price | None = None
    total_parking_time: float | None = None
    total_parking_cost: Price | None = None
    total_reservation_cost: Price | None = None
    remark: String255 | None = None
    invoice_reference_id: CiString39 | None = None
    credit: bool | None = None
    credit_reference_id: CiString39 | None = None
    home_charging_compensation: bool | None = None
    last_updated: Instant
