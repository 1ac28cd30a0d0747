"""OCPI 2.2.1 Tariffs module: Tariff and its nested types, with GIREVE's two extra fields.

Sources: ``mod_tariffs.asciidoc`` and GIREVE's ``cpo_tariffs.md`` ("Differentiate tariff per eMSP").
Tariffs are only PUT whole, so there is no PATCH body.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from relay.models.common import (
    URL,
    CiString2,
    CiString3,
    CiString36,
    DisplayText,
    EnergyMix,
    LocalDate,
    OcpiStruct,
    Price,
    String3,
    TimeOfDay,
)
from relay.timestamps import Instant

DayOfWeek = Literal["MONDAY", "TUESDAY", "WEDNESDAY", "THURSDAY", "FRIDAY", "SATURDAY", "SUNDAY"]
ReservationRestrictionType = Literal["RESERVATION", "RESERVATION_EXPIRES"]
TariffDimensionType = Literal["ENERGY", "FLAT", "PARKING_TIME", "TIME"]
TariffType = Literal["AD_HOC_PAYMENT", "PROFILE_CHEAP", "PROFILE_FAST", "PROFILE_GREEN", "REGULAR"]


class PriceComponent(OcpiStruct, kw_only=True):
    """How one dimension (energy, time…) is priced, excluding VAT."""

    type: TariffDimensionType
    price: float
    vat: float | None = None  # absent means no VAT applies, which differs from 0 %
    step_size: int


class TariffRestrictions(OcpiStruct, kw_only=True):
    """When a TariffElement applies; all set restrictions must match (logical AND)."""

    start_time: TimeOfDay | None = None
    end_time: TimeOfDay | None = None
    start_date: LocalDate | None = None
    end_date: LocalDate | None = None
    min_kwh: float | None = None
    max_kwh: float | None = None
    min_current: float | None = None
    max_current: float | None = None
    min_power: float | None = None
    max_power: float | None = None
    min_duration: int | None = None
    max_duration: int | None = None
    day_of_week: list[DayOfWeek] | None = None
    reservation: ReservationRestrictionType | None = None


class TariffElement(OcpiStruct, kw_only=True):
    """Price components that share one set of restrictions."""

    price_components: Annotated[list[PriceComponent], msgspec.Meta(min_length=1)]
    restrictions: TariffRestrictions | None = None


class Tariff(OcpiStruct, kw_only=True):
    """A tariff of the CPO, optionally targeted at one eMSP (GIREVE extension)."""

    country_code: CiString2
    party_id: CiString3
    id: CiString36
    currency: String3
    type: TariffType | None = None
    tariff_alt_text: list[DisplayText] | None = None
    tariff_alt_url: URL | None = None
    min_price: Price | None = None
    max_price: Price | None = None
    elements: Annotated[list[TariffElement], msgspec.Meta(min_length=1)]
    start_date_time: Instant | None = None
    end_date_time: Instant | None = None
    energy_mix: EnergyMix | None = None
    # GIREVE extension: the eMSP this variant of the tariff is for; absent on the default variant.
    # Both-or-neither is a GIREVE rule, checked outside the models.
    target_operator_country_code: CiString2 | None = None
    target_operator_party_id: CiString3 | None = None
    last_updated: Instant
