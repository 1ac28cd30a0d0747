"""OCPI 2.2.1 types shared by several modules: string aliases, enums and small classes.

Sources: ``types.asciidoc`` (DisplayText, Price, DateTime, CiString, string, URL), the data types of
``mod_locations.asciidoc`` that Tariffs reuse (BusinessDetails, Image, EnergyMix, GeoLocation) and those of
``mod_cdrs.asciidoc`` that Sessions reuse (CdrToken, CdrDimension, ChargingPeriod, AuthMethod).
"""

from __future__ import annotations

import datetime
from typing import Annotated, Any, Literal, TypeVar

import msgspec
import msgspec.inspect

from relay.timestamps import Instant, instant_hook, normalise, ocpi_instant

T = TypeVar("T")

# --- strings -------------------------------------------------------------------------------------------------------
# OCPI's CiString(n) and string(n) only differ in case sensitivity, which matters when comparing ids,
# not when validating them, so both map to a length-bounded str. Separate names keep the spec's wording
# visible in the field declarations.

CiString2 = Annotated[str, msgspec.Meta(max_length=2)]
CiString3 = Annotated[str, msgspec.Meta(max_length=3)]
CiString4 = Annotated[str, msgspec.Meta(max_length=4)]
CiString32 = Annotated[str, msgspec.Meta(max_length=32)]
CiString36 = Annotated[str, msgspec.Meta(max_length=36)]
CiString39 = Annotated[str, msgspec.Meta(max_length=39)]
CiString48 = Annotated[str, msgspec.Meta(max_length=48)]

String2 = Annotated[str, msgspec.Meta(max_length=2)]
String3 = Annotated[str, msgspec.Meta(max_length=3)]
String4 = Annotated[str, msgspec.Meta(max_length=4)]
String10 = Annotated[str, msgspec.Meta(max_length=10)]
String16 = Annotated[str, msgspec.Meta(max_length=16)]
String20 = Annotated[str, msgspec.Meta(max_length=20)]
String45 = Annotated[str, msgspec.Meta(max_length=45)]
String64 = Annotated[str, msgspec.Meta(max_length=64)]
String100 = Annotated[str, msgspec.Meta(max_length=100)]
String255 = Annotated[str, msgspec.Meta(max_length=255)]
String512 = Annotated[str, msgspec.Meta(max_length=512)]
String5000 = Annotated[str, msgspec.Meta(max_length=5000)]

URL = Annotated[str, msgspec.Meta(max_length=255)]
"""OCPI's URL type is a string(255)."""

# msgspec applies `pattern` with re.search, so every pattern is anchored to mean "the whole string".
# The spec gives latitude/longitude as string(10)/string(11) *and* a regex that allows one more character
# (a sign before 2/3 digits and 7 decimals: "-33.8688197", "-122.4194155"). The regex alone is kept: it
# bounds the length, and refusing the 7 decimals the spec recommends for negative coordinates would be wrong.
Latitude = Annotated[str, msgspec.Meta(pattern=r"^-?[0-9]{1,2}\.[0-9]{5,7}$")]
Longitude = Annotated[str, msgspec.Meta(pattern=r"^-?[0-9]{1,3}\.[0-9]{5,7}$")]
TimeOfDay = Annotated[str, msgspec.Meta(pattern=r"^([0-1][0-9]|2[0-3]):[0-5][0-9]$")]
"""string(5) "HH:MM" in local time, as in RegularHours and TariffRestrictions (the pattern bounds the length)."""
LocalDate = Annotated[str, msgspec.Meta(pattern=r"^([12][0-9]{3})-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])$")]
"""string(10) "YYYY-MM-DD" in local time, as in TariffRestrictions (the pattern bounds the length)."""

DateTime = datetime.datetime
"""RFC 3339 timestamp as msgspec reads it (offsets kept): the Tokens module's, which the relay receives."""
# The DateTimes of what the CSMS sends (Locations, Sessions, CDRs, Tariffs) are `Instant`s: OCPI's form only,
# decoded with `decoder()` (see relay.timestamps for what is read, rewritten or refused).

# --- enums ---------------------------------------------------------------------------------------------------------

TokenType = Literal["AD_HOC_USER", "APP_USER", "OTHER", "RFID"]
AuthMethod = Literal["AUTH_REQUEST", "COMMAND", "WHITELIST"]
CdrDimensionType = Literal[
    "CURRENT",
    "ENERGY",
    "ENERGY_EXPORT",
    "ENERGY_IMPORT",
    "MAX_CURRENT",
    "MIN_CURRENT",
    "MAX_POWER",
    "MIN_POWER",
    "PARKING_TIME",
    "POWER",
    "RESERVATION_TIME",
    "STATE_OF_CHARGE",
    "TIME",
]
ImageCategory = Literal["CHARGER", "ENTRANCE", "LOCATION", "NETWORK", "OPERATOR", "OTHER", "OWNER"]
EnergySourceCategory = Literal["NUCLEAR", "GENERAL_FOSSIL", "COAL", "GAS", "GENERAL_GREEN", "SOLAR", "WIND", "WATER"]
EnvironmentalImpactCategory = Literal["NUCLEAR_WASTE", "CARBON_DIOXIDE"]


# --- timestamps ----------------------------------------------------------------------------------------------------


def decoder(type_: type[T]) -> msgspec.json.Decoder[T]:
    """A JSON decoder of ``type_`` (a model of the CSMS's objects): its DateTimes decoded by the OCPI rule."""
    return msgspec.json.Decoder(type_, dec_hook=instant_hook)


Plan = dict[str, Any]
"""Where a model's DateTimes are: JSON field name → a nested Plan, or ``INSTANT`` for a DateTime (a list
field applies its plan to each item)."""
INSTANT = "DateTime"


def instant_plan(type_: type[msgspec.Struct]) -> Plan:
    """The Plan of a model, read from its types (msgspec.inspect), so that it cannot drift from them."""
    found = _plan_of(msgspec.inspect.type_info(type_))
    return found if isinstance(found, dict) else {}


def _plan_of(t: msgspec.inspect.Type) -> Plan | str | None:
    if isinstance(t, msgspec.inspect.CustomType):
        return INSTANT if t.cls is Instant else None
    if isinstance(t, msgspec.inspect.UnionType):
        return next((p for u in t.types if (p := _plan_of(u)) is not None), None)
    if isinstance(t, msgspec.inspect.ListType):
        return _plan_of(t.item_type)
    if isinstance(t, msgspec.inspect.StructType):
        fields = {f.encode_name: p for f in t.fields if (p := _plan_of(f.type)) is not None}
        return fields or None
    return None


def rewrite_instants(
    doc: Any, plan: Plan | str, path: str, rewritten: list[tuple[str, str, str]], unreadable: list[tuple[str, str]]
) -> Any:
    """``doc`` (plain JSON) with each DateTime the plan names written as OCPI writes it (timestamps.normalise).

    Appends ``(path, sent, stored)`` to ``rewritten`` for each change and ``(path, reason)`` to ``unreadable``
    for each string that is no instant; values of other JSON types are left for the typed decoder to refuse.
    """
    if isinstance(doc, list):
        return [rewrite_instants(x, plan, f"{path}[{i}]", rewritten, unreadable) for i, x in enumerate(doc)]
    if plan == INSTANT:
        if isinstance(doc, str) and ocpi_instant(doc) is None:
            try:
                stored = normalise(doc)
            except ValueError as exc:
                unreadable.append((path, str(exc)))
                return doc
            rewritten.append((path, doc, stored))
            return stored
        return doc
    if isinstance(doc, dict) and isinstance(plan, dict):
        for name, sub in plan.items():
            if name in doc:
                doc[name] = rewrite_instants(doc[name], sub, f"{path}.{name}", rewritten, unreadable)
    return doc


# --- classes -------------------------------------------------------------------------------------------------------


class OcpiStruct(msgspec.Struct, omit_defaults=True, repr_omit_defaults=True):
    """Base of every OCPI model: absent optional fields stay absent when encoded.

    Subclasses pass ``kw_only=True`` themselves (msgspec does not inherit it). Unknown fields are
    ignored, never forbidden: OCPI receivers must accept objects carrying fields they don't know.
    """


class DisplayText(OcpiStruct, kw_only=True):
    """Text shown to an end user, in one language."""

    language: String2
    text: String512


class Price(OcpiStruct, kw_only=True):
    """An amount of money without and (optionally) with VAT."""

    excl_vat: float
    incl_vat: float | None = None


class Image(OcpiStruct, kw_only=True):
    """A link to an image (photo or logo)."""

    url: URL
    thumbnail: URL | None = None
    category: ImageCategory
    type: CiString4
    # int(5): at most five digits.
    width: Annotated[int, msgspec.Meta(ge=0, le=99999)] | None = None
    height: Annotated[int, msgspec.Meta(ge=0, le=99999)] | None = None


class BusinessDetails(OcpiStruct, kw_only=True):
    """Name, website and logo of an operator, suboperator or owner."""

    name: String100
    website: URL | None = None
    logo: Image | None = None


class EnergySource(OcpiStruct, kw_only=True):
    """One energy source and its share of the mix."""

    source: EnergySourceCategory
    percentage: Annotated[float, msgspec.Meta(ge=0, le=100)]


class EnvironmentalImpact(OcpiStruct, kw_only=True):
    """Waste or emission per kWh, in g/kWh."""

    category: EnvironmentalImpactCategory
    amount: float


class EnergyMix(OcpiStruct, kw_only=True):
    """The energy mix of a Location or Tariff."""

    is_green_energy: bool
    energy_sources: list[EnergySource] | None = None
    environ_impact: list[EnvironmentalImpact] | None = None
    supplier_name: String64 | None = None
    energy_product_name: String64 | None = None


class GeoLocation(OcpiStruct, kw_only=True):
    """WGS 84 coordinates, as decimal-degree strings."""

    latitude: Latitude
    longitude: Longitude


class CdrToken(OcpiStruct, kw_only=True):
    """The token that started a Session or CDR."""

    country_code: CiString2
    party_id: CiString3
    uid: CiString36
    type: TokenType
    contract_id: CiString36


class CdrDimension(OcpiStruct, kw_only=True):
    """One measured value of a ChargingPeriod."""

    type: CdrDimensionType
    volume: float


class ChargingPeriod(OcpiStruct, kw_only=True):
    """A period of a Session or CDR with its measured dimensions; it ends where the next starts."""

    start_date_time: Instant
    dimensions: Annotated[list[CdrDimension], msgspec.Meta(min_length=1)]
    tariff_id: CiString36 | None = None
