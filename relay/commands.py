"""Remote commands (K2): from the IOP to the CSMS, and the CSMS's results back to the IOP.

The IOP's request is answered at once with the CSMS's verdict (CommandResponse); the result comes
later from the CSMS through the ingress and is delivered to the command's ``response_url`` on the
ordered, retried, dead-lettered path of every other event. A result that never comes is sent as
TIMEOUT when its deadline passes (whichever comes first wins, atomically).

The result is POSTed with the hub's token: a ``response_url`` must be on one of the hub's origins
(``Directory.origins``: its registered endpoints, ``[iop] url``, ``[ocpi] command_response_origins``),
else the command is refused at once like any invalid command (OCPI 2001).

Refusals of a command that is JSON are HTTP 200 with an OCPI 2xxx code: such a request has reached the OCPI
layer, where "an HTTP error status code MUST NOT be returned" (status_codes.asciidoc); only a body that is
not JSON at all is HTTP 400.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, get_args

import msgspec
import structlog

from relay import metrics, urls
from relay.config import Settings
from relay.csms import CsmsClient, CsmsUnavailable
from relay.errors import InvalidEvent, Problem, StoreUnavailable
from relay.events import Event, new_event_id
from relay.models.common import DisplayText
from relay.models.tokens import CommandResponse, CommandResult, CommandType, StartSession, StopSession
from relay.ordering import location_key
from relay.store import RoamingStore, StateReader, Store
from relay.store.keys import state_field

log = structlog.get_logger(__name__)
_REQUESTS: dict[str, type[msgspec.Struct]] = {"START_SESSION": StartSession, "STOP_SESSION": StopSession}
_COMMAND_TYPES = frozenset(get_args(CommandType))


class Command(msgspec.Struct, kw_only=True):
    """A command the CSMS accepted and whose result is awaited."""

    id: str
    type: str
    response_url: str
    country_code: str
    party_id: str
    correlation_id: str
    received_at: float


@dataclass(frozen=True, slots=True)
class Reply:
    """HTTP status, OCPI status code, and the CommandResponse (or an error message)."""

    status: int
    code: int
    data: CommandResponse | None = None
    message: str | None = None


class Commands:
    """Receives the IOP's commands and the CSMS's results."""

    def __init__(self, settings: Settings, store: Store, roaming: RoamingStore, state: StateReader,
                 csms: CsmsClient) -> None:  # fmt: skip
        self.settings = settings
        self.store = store
        self.roaming = roaming
        self.state = state
        self.csms = csms

    def _response(self, command: str, result: str, message: str | None = None) -> Reply:
        # The command comes from the URL: only OCPI's names become label values (bounded series).
        metrics.COMMANDS.labels(command=command if command in _COMMAND_TYPES else "OTHER", result=result).inc()
        timeout = self.settings.csms.command_result_timeout_s
        msg = [DisplayText(language="en", text=message[:512])] if message else None
        return Reply(200, 1000, CommandResponse(result=result, timeout=timeout, message=msg))  # type: ignore[arg-type]

    async def receive(self, command: str, raw: bytes, operator: tuple[str, str], correlation_id: str, *,
                      origins: frozenset[str]) -> Reply:  # fmt: skip
        """One command from the IOP, for a hosted operator: validate, ask the CSMS, answer.

        ``origins``: where the hub's token may go (``Directory.origins``); the response_url must be on one.
        """
        if command not in self.settings.csms.commands or not self.csms.configured:
            return self._response(command, "NOT_SUPPORTED", "not supported by this CPO")
        kind = _REQUESTS.get(command)
        try:
            request: Any = msgspec.json.decode(raw, type=kind) if kind else msgspec.json.decode(raw)
        except msgspec.ValidationError as exc:  # JSON, not the command OCPI defines (a subclass of DecodeError)
            return Reply(200, 2001, message=f"invalid {command} request: {exc}")
        except msgspec.DecodeError as exc:  # not JSON: the transport layer's 400
            return Reply(400, 2001, message=f"invalid {command} request: {exc}")
        if kind:
            response_url = request.response_url
        else:  # a command only the CSMS knows: any JSON object with a response_url
            response_url = request.get("response_url") if isinstance(request, dict) else None
        if not isinstance(response_url, str) or not response_url.startswith(("http://", "https://")):
            return Reply(200, 2001, message="response_url: required http(s) URL")
        if urls.origin_or_none(response_url) not in origins:
            hint = "not on an origin of the IOP; list it in [ocpi] command_response_origins if it is"
            log.warning("command_response_url_refused", command=command, response_url=response_url[:300], hint=hint)
            return Reply(200, 2001, message="response_url: not on an origin of the IOP")
        if isinstance(request, StartSession):
            # evse_uid and connector_id are both optional (mod_commands, StartSession): an eMSP connected to
            # GIREVE in OCPI 2.1.1 cannot send connector_id at all (GIREVE's cpo_commands). The command goes to
            # the CSMS as it came, which picks the EVSE / connector; only connector_id without evse_uid
            # is refused, as OCPI says evse_uid is "Required when connector_id is set".
            if request.connector_id is not None and request.evse_uid is None:
                return Reply(200, 2001, message="evse_uid: required when connector_id is set")
            cc, pid = operator
            key = location_key(cc, pid, request.location_id)
            if self.settings.state.enabled and not await self.state.one(
                "locations", key, state_field(cc, pid, request.location_id)
            ):
                # status_codes: "2003 Unknown Location, for example: Command: START_SESSION with unknown location".
                return Reply(200, 2003, message=f"unknown location {request.location_id}")
        cmd = Command(id=new_event_id(), type=command, response_url=response_url, country_code=operator[0],
                      party_id=operator[1], correlation_id=correlation_id or new_event_id(),
                      received_at=time.time())  # fmt: skip
        payload = {"kind": "command", "command_id": cmd.id, "command": command,
                   "country_code": cmd.country_code, "party_id": cmd.party_id,
                   "request": msgspec.to_builtins(request)}  # fmt: skip
        # Awaited before the CSMS is asked: a fast CSMS may post the result before it answers.
        due_s = self.settings.csms.command_result_timeout_s
        await self.roaming.put_command(cmd.id, msgspec.json.encode(cmd), int((cmd.received_at + due_s) * 1000),
                                       ttl_s=due_s + 86_400)  # fmt: skip
        try:
            answer = await self.csms.post(payload, cmd.correlation_id)
        except CsmsUnavailable as exc:
            log.warning("csms_command_failed", command=command, command_id=cmd.id, error=str(exc))
            await self.roaming.forget_command(cmd.id)
            return self._response(command, "REJECTED", "charge point management system unavailable")
        result = str(answer.get("result", "REJECTED")).upper()
        if result not in ("ACCEPTED", "REJECTED", "NOT_SUPPORTED", "UNKNOWN_SESSION"):
            result = "REJECTED"
        if result != "ACCEPTED":
            await self.roaming.forget_command(cmd.id)  # no result awaited, no TIMEOUT
        log.info("command_received", command=command, command_id=cmd.id, result=result,
                 correlation_id=cmd.correlation_id)  # fmt: skip
        message = answer.get("message")
        return self._response(command, result, message if isinstance(message, str) else None)

    async def result(self, command_id: str, raw: bytes) -> str:
        """The CSMS's CommandResult: queued for the IOP's response_url. Raises InvalidEvent (404/409/422)."""
        try:
            msgspec.json.decode(raw, type=CommandResult)
        except msgspec.DecodeError as exc:
            raise InvalidEvent([Problem(field="$", rule="ocpi.type", message=str(exc))]) from None
        doc = await self.roaming.command(command_id)
        if doc is None:
            raise InvalidEvent([Problem(field="url.command_id", rule="command", message="unknown command")], 404)
        cmd = msgspec.json.decode(doc, type=Command)
        if not await self.roaming.settle(command_id):
            message = "the result already went to the IOP (or TIMEOUT did)"
            raise InvalidEvent([Problem(field="url.command_id", rule="command", message=message)], 409)
        try:
            return await self._queue(cmd, raw)
        except StoreUnavailable:
            # Not stored: await it again, so that the CSMS's retry (or else TIMEOUT) still goes out.
            due_s = self.settings.csms.command_result_timeout_s
            await self.roaming.await_again(command_id, int((cmd.received_at + due_s) * 1000))
            raise

    async def _queue(self, cmd: Command, body: bytes) -> str:
        result = msgspec.json.decode(body, type=CommandResult).result
        metrics.COMMAND_RESULTS.labels(result=result).inc()
        event = Event(
            id=new_event_id(), module="commands", method="POST", country_code=cmd.country_code,
            party_id=cmd.party_id, object_id=cmd.id, key=f"cmd:{cmd.country_code}:{cmd.party_id}:{cmd.id}",
            correlation_id=cmd.correlation_id, received_at=time.time(), body=body, url=cmd.response_url,
        )  # fmt: skip
        return await self.store.append(event)

    async def expire(self) -> int:
        """Send TIMEOUT for every command whose result is overdue; returns how many."""
        n = 0
        for command_id in await self.roaming.overdue(int(time.time() * 1000)):
            doc = await self.roaming.command(command_id)
            if not await self.roaming.settle(command_id) or doc is None:
                continue
            try:
                cmd = msgspec.json.decode(doc, type=Command)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                log.error("command_unreadable", command_id=command_id, error=str(exc))
                continue
            await self._queue(cmd, msgspec.json.encode(CommandResult(result="TIMEOUT")))
            log.warning("command_timeout", command=cmd.type, command_id=command_id)
            n += 1
        return n
