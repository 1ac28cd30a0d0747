"""The relay's calls to the CSMS: a webhook the CSMS serves, for commands and tokens from the IOP."""

from __future__ import annotations

from typing import Any

import aiohttp
import msgspec
import structlog

from relay import urls
from relay.config import CsmsSettings
from relay.errors import RelayError

log = structlog.get_logger(__name__)
# The webhook answers {"result": …}: far less than this; more is refused unread (like the hub's answers).
MAX_ANSWER_BYTES = 1_048_576


class CsmsUnavailable(RelayError):
    """The CSMS webhook did not answer usefully in time."""


class CsmsClient:
    """POSTs ``{"kind": …, …}`` JSON to ``[csms] webhook_url`` with the configured bearer token."""

    def __init__(self, settings: CsmsSettings) -> None:
        self.settings = settings
        self._session: aiohttp.ClientSession | None = None

    @property
    def configured(self) -> bool:
        return bool(self.settings.webhook_url)

    async def start(self) -> None:
        """Open the connection pool."""
        timeout = aiohttp.ClientTimeout(total=self.settings.timeout_s)
        headers = {"Accept-Encoding": urls.ACCEPT_ENCODING}
        self._session = aiohttp.ClientSession(timeout=timeout, auto_decompress=False, headers=headers)

    async def close(self) -> None:
        """Close the pool."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def post(self, payload: dict[str, Any], correlation_id: str = "") -> dict[str, Any]:
        """Send one notification or request; returns the CSMS's JSON answer. Raises CsmsUnavailable."""
        if self._session is None or not self.configured:
            raise CsmsUnavailable("no CSMS webhook configured")
        headers = {"Content-Type": "application/json", "X-Correlation-ID": correlation_id}
        if self.settings.token:
            headers["Authorization"] = f"Bearer {self.settings.token}"
        try:
            async with self._session.post(
                self.settings.webhook_url, data=msgspec.json.encode(payload), headers=headers, allow_redirects=False
            ) as resp:
                if resp.status // 100 != 2:  # a redirect too: the bearer token goes to the configured URL only
                    raise CsmsUnavailable(f"CSMS webhook answered HTTP {resp.status}")
                body = await urls.read_capped(resp, MAX_ANSWER_BYTES)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise CsmsUnavailable(f"CSMS webhook: {exc.__class__.__name__}: {exc}") from exc
        if not body:
            return {}
        try:
            answer: dict[str, Any] = msgspec.json.decode(body)
        except msgspec.DecodeError as exc:
            raise CsmsUnavailable(f"CSMS webhook answered non-JSON: {exc}") from exc
        return answer if isinstance(answer, dict) else {}
