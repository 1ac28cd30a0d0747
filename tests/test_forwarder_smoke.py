from __future__ import annotations

import base64
from collections.abc import Callable

import aiohttp

from relay.config import Settings
from relay.service import Relay
from tests.conftest import AUTH, gireve_location
from tests.fake_iop import FakeIop, Reply
from tests.waiting import wait_until


async def test_delivers_with_headers(make_settings: Callable[..., Settings]) -> None:
    iop = FakeIop()
    await iop.start()
    settings = make_settings(RELAY_IOP_URL=iop.url, RELAY_IOP_TOKEN="tok-b", RELAY_FORWARDER_BACKOFF_INITIAL_S="0.01")
    fails = {"n": 2}

    def script(_r):
        if fails["n"]:
            fails["n"] -= 1
            return Reply(status=503, ocpi=None)
        return None

    iop.script = script
    relay = Relay(settings)
    await relay.start()
    try:
        async with aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{relay.ingress_port}/ingress/2.2.1/locations/FR/AB1/LOC1"
            async with http.put(url, json=gireve_location(), headers={**AUTH, "X-Correlation-ID": "corr-1"}) as resp:
                assert resp.status == 202
        await iop.wait_for(lambda: len(iop.received) == 3)
        ids = {r.headers["X-Request-ID"] for r in iop.received}
        assert len(ids) == 3
        for r in iop.received:
            assert r.path == "/ocpi/2.2.1/locations/FR/AB1/LOC1"
            assert r.headers["Authorization"] == "Token " + base64.b64encode(b"tok-b").decode()
            assert r.headers["X-Correlation-ID"] == "corr-1"
            assert r.headers["OCPI-from-country-code"] == "FR" and r.headers["OCPI-from-party-id"] == "AB1"
            assert r.headers["OCPI-to-country-code"] == "FR" and r.headers["OCPI-to-party-id"] == "107"
        assert relay.store is not None
        store = relay.store

        async def drained() -> bool:  # the ack follows the IOP's answer
            return (await store.stream_lengths())["locations"] == 0

        await wait_until(drained, 2, "the stream drained")
    finally:
        await relay.stop()
        await iop.close()
