"""OCPI 2.2.1 Tokens and Commands objects the relay receives from or sends to the IOP (K1–K3)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, UnsetType

from relay.models.common import (
    URL,
    CiString2,
    CiString3,
    CiString36,
    DateTime,
    DisplayText,
    OcpiStruct,
    String2,
    String64,
    TokenType,
)

WhitelistType = Literal["ALWAYS", "ALLOWED", "ALLOWED_OFFLINE", "NEVER"]
AllowedType = Literal["ALLOWED", "BLOCKED", "EXPIRED", "NO_CREDIT", "NOT_ALLOWED"]
ProfileType = Literal["CHEAP", "FAST", "GREEN", "REGULAR"]
CommandType = Literal["CANCEL_RESERVATION", "RESERVE_NOW", "START_SESSION", "STOP_SESSION", "UNLOCK_CONNECTOR"]
CommandResponseType = Literal["NOT_SUPPORTED", "REJECTED", "ACCEPTED", "UNKNOWN_SESSION"]
CommandResultType = Literal[
    "ACCEPTED", "CANCELED_RESERVATION", "EVSE_OCCUPIED", "EVSE_INOPERATIVE", "FAILED", "NOT_SUPPORTED",
    "REJECTED", "TIMEOUT", "UNKNOWN_RESERVATION",
]  # fmt: skip


class EnergyContract(OcpiStruct, kw_only=True):
    supplier_name: String64
    contract_id: String64 | None = None


class Token(OcpiStruct, kw_only=True):
    """A Token pushed by the IOP (eMSP-owned)."""

    country_code: CiString2
    party_id: CiString3
    uid: CiString36
    type: TokenType
    contract_id: CiString36
    visual_number: String64 | None = None
    issuer: String64
    group_id: CiString36 | None = None
    valid: bool
    whitelist: WhitelistType
    language: String2 | None = None
    default_profile_type: ProfileType | None = None
    energy_contract: EnergyContract | None = None
    last_updated: DateTime


class TokenPatch(OcpiStruct, kw_only=True):
    """A partial Token; ``last_updated`` is required."""

    country_code: CiString2 | UnsetType = UNSET
    party_id: CiString3 | UnsetType = UNSET
    uid: CiString36 | UnsetType = UNSET
    type: TokenType | UnsetType = UNSET
    contract_id: CiString36 | UnsetType = UNSET
    visual_number: String64 | UnsetType = UNSET
    issuer: String64 | UnsetType = UNSET
    group_id: CiString36 | UnsetType = UNSET
    valid: bool | UnsetType = UNSET
    whitelist: WhitelistType | UnsetType = UNSET
    language: String2 | UnsetType = UNSET
    default_profile_type: ProfileType | UnsetType = UNSET
    energy_contract: EnergyContract | UnsetType = UNSET
    last_updated: DateTime


class LocationReferences(OcpiStruct, kw_only=True):
    """Where a token wants to charge (GIREVE: location required, EVSEs optional)."""

    location_id: Annotated[CiString36, msgspec.Meta(min_length=1)]
    evse_uids: list[CiString36] | None = None


class AuthorizedToken(OcpiStruct, kw_only=True):
    """The Token inside an AuthorizationInfo: mod_tokens' required fields checked, the optional ones kept as sent.

    The answer decides whether a driver may charge now: an optional field the eMSP (or the hub) filled
    oddly (a ``language`` of three letters, a ``default_profile_type`` of a later version, an
    ``energy_contract`` without ``supplier_name``) must not turn an ALLOWED into "unusable answer".
    The relay does not store this token (pushed tokens are ``Token``, checked in full); the CSMS
    gets the optional fields as they came. Unknown fields are dropped, as everywhere.
    """

    country_code: CiString2
    party_id: CiString3
    uid: CiString36
    type: TokenType
    contract_id: CiString36
    visual_number: Any = None
    issuer: String64
    group_id: Any = None
    valid: bool
    whitelist: WhitelistType
    language: Any = None
    default_profile_type: Any = None
    energy_contract: Any = None
    last_updated: DateTime


class AuthorizationInfo(OcpiStruct, kw_only=True):
    """The eMSP's answer to a real-time authorisation."""

    allowed: AllowedType
    token: AuthorizedToken
    location: LocationReferences | None = None
    authorization_reference: CiString36 | None = None
    info: DisplayText | None = None


class StartSession(OcpiStruct, kw_only=True):
    """START_SESSION. ``evse_uid`` and ``connector_id`` are optional (eMSPs on OCPI 2.1.1 behind GIREVE
    cannot send ``connector_id``); ``connector_id`` needs ``evse_uid``."""

    response_url: URL
    token: Token
    location_id: CiString36
    evse_uid: CiString36 | None = None
    connector_id: CiString36 | None = None
    authorization_reference: CiString36 | None = None


class StopSession(OcpiStruct, kw_only=True):
    response_url: URL
    session_id: CiString36


class CommandResult(OcpiStruct, kw_only=True):
    """What the CSMS reports once the command ran (delivered to ``response_url``)."""

    result: CommandResultType
    message: list[DisplayText] | None = None


class CommandResponse(OcpiStruct, kw_only=True):
    """The immediate answer to the IOP's command request."""

    result: CommandResponseType
    timeout: Annotated[int, msgspec.Meta(ge=0)]
    message: list[DisplayText] | None = None


__all__ = [
    "AuthorizationInfo", "AuthorizedToken", "CommandResponse", "CommandResult", "CommandType", "LocationReferences",
    "StartSession", "StopSession", "Token", "TokenPatch",
]  # fmt: skip
