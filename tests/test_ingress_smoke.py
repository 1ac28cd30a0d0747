from __future__ import annotations

from typing import Any

from aiohttp.test_utils import TestClient

from relay.events import decode
from relay.store import Store
from relay.store import keys as K
from tests.conftest import AUTH, gireve_location


async def test_put_location_is_stored(ingress: TestClient[Any, Any], store: Store) -> None:
    resp = await ingress.put("/ingress/2.2.1/locations/FR/AB1/LOC1", json=gireve_location(), headers=AUTH)
    body = await resp.json()
    assert resp.status == 202, body
    rows = await store.peek("locations", 10)
    assert len(rows) == 1
    ev = decode(rows[0][1])
    assert ev.id == body["data"]["event_id"]
    assert ev.key == "loc:FR:AB1:LOC1"
    assert K.stream_key("locations", 0).startswith("relay:")
