"""OCPI 2.2.1 Locations module: Location, EVSE, Connector, their PATCH bodies and nested types.

Source: ``mod_locations.asciidoc``. The classes it shares with other modules (BusinessDetails, Image,
EnergyMix, GeoLocation) live in :mod:`relay.models.common`.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, UnsetType

from relay.models.common import (
    URL,
    BusinessDetails,
    CiString2,
    CiString3,
    CiString36,
    CiString48,
    DisplayText,
    EnergyMix,
    GeoLocation,
    Image,
    Latitude,
    Longitude,
    OcpiStruct,
    String3,
    String4,
    String10,
    String16,
    String45,
    String64,
    String255,
    TimeOfDay,
    TokenType,
)
from relay.timestamps import Instant

Capability = Literal[
    "CHARGING_PROFILE_CAPABLE",
    "CHARGING_PREFERENCES_CAPABLE",
    "CHIP_CARD_SUPPORT",
    "CONTACTLESS_CARD_SUPPORT",
    "CREDIT_CARD_PAYABLE",
    "DEBIT_CARD_PAYABLE",
    "PED_TERMINAL",
    "REMOTE_START_STOP_CAPABLE",
    "RESERVABLE",
    "RFID_READER",
    "START_SESSION_CONNECTOR_REQUIRED",
    "TOKEN_GROUP_CAPABLE",
    "UNLOCK_CAPABLE",
]
ConnectorFormat = Literal["SOCKET", "CABLE"]
ConnectorType = Literal[
    "CHADEMO",
    "CHAOJI",
    "DOMESTIC_A",
    "DOMESTIC_B",
    "DOMESTIC_C",
    "DOMESTIC_D",
    "DOMESTIC_E",
    "DOMESTIC_F",
    "DOMESTIC_G",
    "DOMESTIC_H",
    "DOMESTIC_I",
    "DOMESTIC_J",
    "DOMESTIC_K",
    "DOMESTIC_L",
    "DOMESTIC_M",
    "DOMESTIC_N",
    "DOMESTIC_O",
    "GBT_AC",
    "GBT_DC",
    "IEC_60309_2_single_16",
    "IEC_60309_2_three_16",
    "IEC_60309_2_three_32",
    "IEC_60309_2_three_64",
    "IEC_62196_T1",
    "IEC_62196_T1_COMBO",
    "IEC_62196_T2",
    "IEC_62196_T2_COMBO",
    "IEC_62196_T3A",
    "IEC_62196_T3C",
    "NEMA_5_20",
    "NEMA_6_30",
    "NEMA_6_50",
    "NEMA_10_30",
    "NEMA_10_50",
    "NEMA_14_30",
    "NEMA_14_50",
    "PANTOGRAPH_BOTTOM_UP",
    "PANTOGRAPH_TOP_DOWN",
    "TESLA_R",
    "TESLA_S",
]
Facility = Literal[
    "HOTEL",
    "RESTAURANT",
    "CAFE",
    "MALL",
    "SUPERMARKET",
    "SPORT",
    "RECREATION_AREA",
    "NATURE",
    "MUSEUM",
    "BIKE_SHARING",
    "BUS_STOP",
    "TAXI_STAND",
    "TRAM_STOP",
    "METRO_STATION",
    "TRAIN_STATION",
    "AIRPORT",
    "PARKING_LOT",
    "CARPOOL_PARKING",
    "FUEL_STATION",
    "WIFI",
]
ParkingRestriction = Literal["EV_ONLY", "PLUGGED", "DISABLED", "CUSTOMERS", "MOTORCYCLES"]
ParkingType = Literal[
    "ALONG_MOTORWAY", "PARKING_GARAGE", "PARKING_LOT", "ON_DRIVEWAY", "ON_STREET", "UNDERGROUND_GARAGE"
]
PowerType = Literal["AC_1_PHASE", "AC_2_PHASE", "AC_2_PHASE_SPLIT", "AC_3_PHASE", "DC"]
Status = Literal[
    "AVAILABLE", "BLOCKED", "CHARGING", "INOPERATIVE", "OUTOFORDER", "PLANNED", "REMOVED", "RESERVED", "UNKNOWN"
]
"""Status of an EVSE."""


class AdditionalGeoLocation(OcpiStruct, kw_only=True):
    """A point related to the Location (an entrance, a parking lot…), with an optional name."""

    latitude: Latitude
    longitude: Longitude
    name: DisplayText | None = None


class PublishTokenType(OcpiStruct, kw_only=True):
    """Identifies a token whose owner may see an unpublished Location."""

    uid: CiString36 | None = None
    type: TokenType | None = None
    visual_number: String64 | None = None
    issuer: String64 | None = None
    group_id: CiString36 | None = None


class RegularHours(OcpiStruct, kw_only=True):
    """One weekday's opening period, in local time."""

    weekday: Annotated[int, msgspec.Meta(ge=1, le=7)]  # Monday (1) to Sunday (7)
    period_begin: TimeOfDay
    period_end: TimeOfDay


class ExceptionalPeriod(OcpiStruct, kw_only=True):
    """An exceptional opening or closing, in UTC."""

    period_begin: Instant
    period_end: Instant


class Hours(OcpiStruct, kw_only=True):
    """Opening and access hours of a Location."""

    twentyfourseven: bool
    regular_hours: list[RegularHours] | None = None
    exceptional_openings: list[ExceptionalPeriod] | None = None
    exceptional_closings: list[ExceptionalPeriod] | None = None


class StatusSchedule(OcpiStruct, kw_only=True):
    """A planned status of an EVSE; the period may have no end."""

    period_begin: Instant
    period_end: Instant | None = None
    status: Status


class Connector(OcpiStruct, kw_only=True):
    """A socket or cable-and-plug of an EVSE."""

    id: CiString36
    standard: ConnectorType
    format: ConnectorFormat
    power_type: PowerType
    max_voltage: int
    max_amperage: int
    max_electric_power: int | None = None
    tariff_ids: list[CiString36] | None = None
    terms_and_conditions: URL | None = None
    last_updated: Instant


class Evse(OcpiStruct, kw_only=True):
    """An EVSE: the part that powers one EV at a time, with its connectors."""

    uid: CiString36
    evse_id: CiString48 | None = None
    status: Status
    status_schedule: list[StatusSchedule] | None = None
    capabilities: list[Capability] | None = None
    connectors: Annotated[list[Connector], msgspec.Meta(min_length=1)]
    floor_level: String4 | None = None
    coordinates: GeoLocation | None = None
    physical_reference: String16 | None = None
    directions: list[DisplayText] | None = None
    parking_restrictions: list[ParkingRestriction] | None = None
    images: list[Image] | None = None
    last_updated: Instant


class Location(OcpiStruct, kw_only=True):
    """A charging location and its EVSEs."""

    country_code: CiString2
    party_id: CiString3
    id: CiString36
    publish: bool
    publish_allowed_to: list[PublishTokenType] | None = None
    name: String255 | None = None
    address: String255
    city: String45
    postal_code: String10 | None = None
    state: String45 | None = None
    country: String3
    coordinates: GeoLocation
    related_locations: list[AdditionalGeoLocation] | None = None
    parking_type: ParkingType | None = None
    evses: list[Evse] | None = None
    directions: list[DisplayText] | None = None
    operator: BusinessDetails | None = None
    suboperator: BusinessDetails | None = None
    owner: BusinessDetails | None = None
    facilities: list[Facility] | None = None
    time_zone: String255
    opening_times: Hours | None = None
    charging_when_closed: bool | None = None
    images: list[Image] | None = None
    energy_mix: EnergyMix | None = None
    last_updated: Instant


# --- PATCH bodies --------------------------------------------------------------------------------------------------
# Same fields as the objects, each one UNSET when absent, so "not sent" stays distinguishable from any value.
# `last_updated` is required: OCPI says every PATCH request SHALL carry it. Nested objects are whole objects.


class ConnectorPatch(OcpiStruct, kw_only=True):
    """PATCH body for a Connector: only the fields that changed, plus ``last_updated``."""

    id: CiString36 | UnsetType = UNSET
    standard: ConnectorType | UnsetType = UNSET
    format: ConnectorFormat | UnsetType = UNSET
    power_type: PowerType | UnsetType = UNSET
    max_voltage: int | UnsetType = UNSET
    max_amperage: int | UnsetType = UNSET
    max_electric_power: int | UnsetType = UNSET
    tariff_ids: list[CiString36] | UnsetType = UNSET
    terms_and_conditions: URL | UnsetType = UNSET
    last_updated: Instant


class EvsePatch(OcpiStruct, kw_only=True):
    """PATCH body for an EVSE: only the fields that changed, plus ``last_updated``."""

    uid: CiString36 | UnsetType = UNSET
    evse_id: CiString48 | UnsetType = UNSET
    status: Status | UnsetType = UNSET
    status_schedule: list[StatusSchedule] | UnsetType = UNSET
    capabilities: list[Capability] | UnsetType = UNSET
    connectors: Annotated[list[Connector], msgspec.Meta(min_length=1)] | UnsetType = UNSET
    floor_level: String4 | UnsetType = UNSET
    coordinates: GeoLocation | UnsetType = UNSET
    physical_reference: String16 | UnsetType = UNSET
    directions: list[DisplayText] | UnsetType = UNSET
    parking_restrictions: list[ParkingRestriction] | UnsetType = UNSET
    images: list[Image] | UnsetType = UNSET
    last_updated: Instant


class LocationPatch(OcpiStruct, kw_only=True):
    """PATCH body for a Location: only the fields that changed, plus ``last_updated``."""

    country_code: CiString2 | UnsetType = UNSET
    party_id: CiString3 | UnsetType = UNSET
    id: CiString36 | UnsetType = UNSET
    publish: bool | UnsetType = UNSET
    publish_allowed_to: list[PublishTokenType] | UnsetType = UNSET
    name: String255 | UnsetType = UNSET
    address: String255 | UnsetType = UNSET
    city: String45 | UnsetType = UNSET
    postal_code: String10 | UnsetType = UNSET
    state: String45 | UnsetType = UNSET
    country: String3 | UnsetType = UNSET
    coordinates: GeoLocation | UnsetType = UNSET
    related_locations: list[AdditionalGeoLocation] | UnsetType = UNSET
    parking_type: ParkingType | UnsetType = UNSET
    evses: list[Evse] | UnsetType = UNSET
    directions: list[DisplayText] | UnsetType = UNSET
    operator: BusinessDetails | UnsetType = UNSET
    suboperator: BusinessDetails | UnsetType = UNSET
    owner: BusinessDetails | UnsetType = UNSET
    facilities: list[Facility] | UnsetType = UNSET
    time_zone: String255 | UnsetType = UNSET
    opening_times: Hours | UnsetType = UNSET
    charging_when_closed: bool | UnsetType = UNSET
    images: list[Image] | UnsetType = UNSET
    energy_mix: EnergyMix | UnsetType = UNSET
    last_updated: Instant
