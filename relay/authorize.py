"""Real-time authorisation (K1): the CSMS asks, the relay checks, asks the IOP, or decides offline.

A token the IOP pushed with whitelist ALWAYS is decided from the relay's copy without asking: mod_tokens'
WhitelistType, "ALWAYS: Token always has to be whitelisted, realtime authorization is not
possible/allowed. CPO shall always allow any use of this Token".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec
import structlog

from relay import metrics, rules
from relay.config import Settings
from relay.errors import InvalidEvent, Problem, StoreError
from relay.models.tokens import AuthorizationInfo, LocationReferences, Token
from relay.ocpi_client import NotConfigured, OcpiClient
from relay.ordering import location_key
from relay.retry import Kind, classify
from relay.store import RoamingStore, StateReader
from relay.store.keys import state_field

log = structlog.get_logger(__name__)
_TOKEN_TYPES = {"RFID", "APP_USER", "AD_HOC_USER", "OTHER"}
_OFFLINE_OK = {"ALWAYS", "ALLOWED", "ALLOWED_OFFLINE"}


class _Answer(msgspec.Struct):
    status_code: int
    data: Any = None
    status_message: str | None = None


@dataclass
class Decision:
    """What the CSMS gets back: who decided, the answer, and why the IOP did not, if it did not."""

    decided_by: str  # iop | whitelist | none
    allowed: str
    authorization: dict[str, Any] | None = None
    iop_error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def check_uid(uid: str, token_type: str) -> str:
    """RFID UIDs are 8 or 14 hexadecimal characters, sent upper case; others are refused here."""
    if token_type not in _TOKEN_TYPES:
        problem = Problem(field="query.type", rule="ocpi.enum", message=f"unknown token type {token_type!r}")
        raise InvalidEvent([problem])
    if token_type == "RFID":
        if not rules.is_rfid_uid(uid):
            raise InvalidEvent([Problem(field="url.token_uid", rule="gireve.K1.rfid_uid",
                                        message="an RFID UID is 8 or 14 hexadecimal characters")])  # fmt: skip
        return uid.upper()
    if not 1 <= len(uid) <= 36:
        raise InvalidEvent([Problem(field="url.token_uid", rule="ocpi.id", message="1 to 36 characters")])
    return uid


def newest(tokens: list[Token]) -> Token | None:
    """The most recently updated of the tokens the IOP pushed with one uid and type (eMSPs may share a uid)."""
    return max(tokens, key=lambda t: t.last_updated) if tokens else None


def offline(tokens: list[Token]) -> Decision:
    """OCPI's whitelist rules when the eMSP cannot be asked: ALWAYS/ALLOWED/ALLOWED_OFFLINE allow, NEVER refuses."""
    token = newest(tokens)
    if token is None:
        return Decision("none", "NOT_ALLOWED", extra={"reason": "token unknown to the relay"})
    allowed = "ALLOWED" if token.valid and token.whitelist in _OFFLINE_OK else "NOT_ALLOWED"
    info = {"allowed": allowed, "token": msgspec.to_builtins(token)}
    return Decision("whitelist", allowed, authorization=info, extra={"whitelist": token.whitelist})


class Authorizer:
    """Checks a CSMS authorisation request and answers it."""

    def __init__(self, settings: Settings, client: OcpiClient | None, state: StateReader, roaming: RoamingStore):
        self.settings = settings
        self.client = client
        self.state = state
        self.roaming = roaming

    async def _owner(self, location_id: str, named: tuple[str, str] | None) -> tuple[str, str]:
        candidates = [named] if named else [(o.country_code, o.party_id) for o in self.settings.operators]
        if not self.settings.state.enabled:
            # No state kept: locations cannot be checked; the owner is the one named, or the only one hosted.
            if len(candidates) == 1:
                return candidates[0]
            message = "several operators are hosted and [state] is off: name one in the OCPI-from-* headers"
            raise InvalidEvent([Problem(field="OCPI-from-party-id", rule="gireve.K1.operator", message=message)])
        found = []
        for cc, pid in candidates:
            if await self.state.one("locations", location_key(cc, pid, location_id), state_field(cc, pid, location_id)):
                found.append((cc, pid))
        if not found:
            raise InvalidEvent([Problem(field="$.location_id", rule="gireve.K1.location",
                                        message=f"location {location_id!r} is unknown to the relay")])  # fmt: skip
        if len(found) > 1:
            message = "several operators have this location: name one in the OCPI-from-* headers"
            raise InvalidEvent([Problem(field="OCPI-from-party-id", rule="gireve.K1.operator", message=message)])
        return found[0]

    async def authorize(self, uid: str, token_type: str, raw: bytes, named: tuple[str, str] | None,
                        correlation_id: str) -> Decision:  # fmt: skip
        """Validate (raises InvalidEvent), ask the IOP within the deadline, else decide from known tokens.

        A known token whose whitelist is ALWAYS is decided from the relay's copy at once, the IOP not asked.
        """
        uid = check_uid(uid, token_type)
        try:
            refs = msgspec.json.decode(raw, type=LocationReferences)
        except msgspec.DecodeError as exc:
            raise InvalidEvent([Problem(field="$.location_id", rule="gireve.K1.location", message=str(exc))]) from None
        if named is not None and self.settings.operator(*named) is None:
            raise InvalidEvent([Problem(field="OCPI-from-party-id", rule="operator", message="not hosted here")], 404)
        owner = await self._owner(refs.location_id, named)
        known = await self._known(token_type, uid)
        token = newest(known or [])
        if token is not None and token.whitelist == "ALWAYS":
            # Real-time authorisation "is not possible/allowed" for this token: the relay's copy decides.
            decision = offline(known or [])
            decision.extra["reason"] = "whitelist ALWAYS: decided without real-time authorisation"
        else:
            asked = await self._ask_iop(uid, token_type, raw, owner, correlation_id)
            if asked is not None and asked.decided_by == "iop":
                decision = asked
            else:
                # Redis did not answer before: once more, as before this check existed (a StoreError goes up).
                decision = offline(known if known is not None else await self._tokens(token_type, uid))
                decision.iop_error = asked.iop_error if asked else "IOP not reachable"
        metrics.AUTHORIZATIONS.labels(decided_by=decision.decided_by, allowed=decision.allowed).inc()
        return decision

    async def _tokens(self, token_type: str, uid: str) -> list[Token]:
        """Tokens the IOP pushed with this uid and type (raises StoreError)."""
        return [msgspec.json.decode(t, type=Token) for t in await self.roaming.tokens_by_uid(token_type, uid)]

    async def _known(self, token_type: str, uid: str) -> list[Token] | None:
        """``_tokens``, or None when Redis does not answer (the IOP is then asked, whatever the token's
        whitelist: an answer from it beats none)."""
        try:
            return await self._tokens(token_type, uid)
        except StoreError as exc:
            log.warning("authorization_tokens_unavailable", error=str(exc))
            return None

    async def _ask_iop(self, uid: str, token_type: str, raw: bytes, owner: tuple[str, str],
                       correlation_id: str) -> Decision | None:  # fmt: skip
        if self.client is None:
            return Decision("none", "NOT_ALLOWED", iop_error="no IOP connection")
        try:
            reply = await self.client.authorize(uid, token_type, raw, owner, correlation_id,
                                                self.settings.iop.authorize_timeout_s)  # fmt: skip
        except NotConfigured as exc:
            return Decision("none", "NOT_ALLOWED", iop_error=str(exc))
        except Exception as exc:
            return Decision("none", "NOT_ALLOWED", iop_error=classify(None, exc=exc).reason)
        outcome = classify(reply.status, reply.headers, reply.body)
        if outcome.kind is not Kind.DELIVERED:
            if outcome.kind is Kind.PERMANENT and outcome.ocpi_code is not None:
                # The eMSP answered (e.g. 2004 unknown token): that is its decision.
                return Decision("iop", "NOT_ALLOWED", extra={"ocpi_code": outcome.ocpi_code,
                                                             "ocpi_message": outcome.ocpi_message})  # fmt: skip
            return Decision("none", "NOT_ALLOWED", iop_error=outcome.reason)
        try:
            info = msgspec.convert(msgspec.json.decode(reply.body, type=_Answer).data, AuthorizationInfo)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return Decision("none", "NOT_ALLOWED", iop_error=f"unusable AuthorizationInfo: {exc}")
        return Decision("iop", info.allowed, authorization=msgspec.to_builtins(info))
