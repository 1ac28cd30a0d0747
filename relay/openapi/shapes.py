"""The shapes the OpenAPI document names that are not models of the relay: the answers the ingress encodes
itself (relay.ingress.responses, the batch, the roaming routes) and the webhook the relay calls (relay.csms).

Documentation types: nothing decodes or encodes them on the hot path; tests/test_openapi.py checks real answers
and real webhook calls against them.
"""

from __future__ import annotations

import functools
from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, UnsetType

from relay.envelope import Answer
from relay.errors import Problem
from relay.models.tokens import AuthorizationInfo, CommandResponseType, Token
from relay.models.tokens import CommandType as OcpiCommandType

__all__ = [
    "AuthorizationAnswer", "AuthorizationDecision", "CommandNotification", "CommandVerdict",
    "EventAccepted", "EventAnswer", "Refusal", "ResultAccepted", "ResultAnswer", "TokenAnswer", "TokenNotification",
    "Unavailable", "batch_answer",
]  # fmt: skip


# -- what the answers carry (documentation types: the ingress encodes these shapes itself) -------------------------


class EventAccepted(msgspec.Struct, kw_only=True):
    """``data`` of a 202 to a single event (relay.ingress.responses.accepted_event)."""

    event_id: str
    warnings: list[Problem] | None  # always present: null without warnings
    unknown_object: Literal[True] | UnsetType = UNSET  # a PATCH of an object the relay does not know (yet)
    duplicate: Literal[True] | UnsetType = UNSET  # nothing stored: the object already was this document
    replayed: Literal[True] | UnsetType = UNSET  # the answer kept for this Idempotency-Key, nothing stored


class EventAnswer(Answer, kw_only=True):
    """202: the event is durable (or, ``duplicate``/``replayed``, already was); nothing else to do."""

    status_code: Literal[1000]
    status_message: str
    data: EventAccepted


class Refusal(Answer, kw_only=True):
    """4xx: nothing stored; ``errors`` lists every problem (field path, rule, message), ``status_message`` the
    first."""

    status_code: Literal[2001]
    status_message: str
    errors: list[Problem]


class Unavailable(Answer, kw_only=True):
    """503 + Retry-After: nothing stored (Redis unavailable, or full), send the same request again."""

    status_code: Literal[3000]
    status_message: str


@functools.cache
def batch_answer(item_result: type[msgspec.Struct]) -> type[msgspec.Struct]:
    """The answer of the batch route, around its per-item result type (relay.ingress.app.ItemResult)."""
    results = msgspec.defstruct(
        "BatchResults",
        [("accepted", int), ("refused", int), ("results", list[item_result])],  # type: ignore[valid-type]
        kw_only=True,
        module=__name__,
    )
    results.__doc__ = "``data`` of a batch's answer: one result per operation, in order."
    answer = msgspec.defstruct(
        "BatchAnswer",
        [("status_code", Literal[1000]), ("status_message", str), ("data", results)],
        bases=(Answer,),
        kw_only=True,
        module=__name__,
    )
    answer.__doc__ = "200: every operation was validated and stored on its own; its result says how it went."
    return answer


class AuthorizationDecision(msgspec.Struct, kw_only=True):
    """``data`` of a real-time authorisation's answer (relay.authorize.Decision)."""

    decided_by: Literal["iop", "whitelist", "none"]
    allowed: str
    authorization: AuthorizationInfo | None  # the IOP's, or the relay's copy of the token (whitelist)
    iop_error: str | None
    reason: str | UnsetType = UNSET
    whitelist: str | UnsetType = UNSET
    ocpi_code: int | UnsetType = UNSET
    ocpi_message: str | None | UnsetType = UNSET


class AuthorizationAnswer(Answer, kw_only=True):
    status_code: Literal[1000]
    data: AuthorizationDecision


class ResultAccepted(msgspec.Struct, kw_only=True):
    command_id: str


class ResultAnswer(Answer, kw_only=True):
    """202: the result is stored, and goes to the IOP's response_url in order, with retries."""

    status_code: Literal[1000]
    status_message: str
    data: ResultAccepted


class TokenAnswer(Answer, kw_only=True):
    status_code: Literal[1000]
    data: Token


# -- the webhook the relay calls (relay.csms, relay.commands, relay.ocpi_server.roaming) ---------------------------


class CommandNotification(msgspec.Struct, kw_only=True, tag_field="kind", tag="command"):
    """A command from the IOP for a hosted operator. The CSMS answers at once whether it takes it; the result
    comes later, ``POST /ingress/2.2.1/commands/{command_id}/result``."""

    command_id: str
    command: OcpiCommandType
    country_code: str
    party_id: str
    request: Annotated[
        dict[str, Any],
        msgspec.Meta(
            description="The IOP's request as received: OCPI StartSession (`#/components/schemas/StartSession`"
            "), StopSession, or the JSON object of another command."
        ),
    ]


class CommandVerdict(msgspec.Struct, kw_only=True):
    """The CSMS's answer to a command (any 2xx). A missing or unknown ``result`` is taken as REJECTED; ``message``
    goes to the IOP (at most 512 characters)."""

    result: CommandResponseType
    message: str | UnsetType = UNSET


class TokenNotification(msgspec.Struct, kw_only=True, tag_field="kind", tag="token"):
    """A token the IOP pushed (PUT or PATCH, merged): stored by the relay first, then handed to the CSMS; the
    answer's body is not read. The CSMS can also read it: ``GET /ingress/2.2.1/tokens/{cc}/{pid}/{uid}``."""

    token: Token
