"""Fallback load generator (when ``wrk`` is not installed): aiohttp client, N keep-alive connections.

Caveat: on one core this generator tops out near 8 k PUTs/s (PITFALLS), below what the servers can
do, so its numbers are a floor for the servers, not their capacity. Install wrk for real numbers.

It stops issuing requests at the deadline and waits for the ones in flight, so every 202 it
received is counted (the stream-entry check is exact with it).

Run: ``python -m bench.loadgen --url http://127.0.0.1:8780 --kind single --duration 10``;
prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import time

import aiohttp
import msgspec

from bench._common import BATCH_PATH, LOCATION_PATH, TOKEN, batch_body, location_template

_ACCEPTED_RE = re.compile(rb'"accepted":(\d+)')


class Result(msgspec.Struct):
    ok_requests: int = 0
    events: int = 0
    other: int = 0
    errors: int = 0
    seconds: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0


async def run(url: str, kind: str, duration: float, connections: int, tag: str, batch_size: int) -> Result:
    head, tail = location_template()
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    res = Result()
    latencies: list[float] = []
    counter = 0

    async def worker(session: aiohttp.ClientSession, deadline: float) -> None:
        nonlocal counter
        while time.monotonic() < deadline:
            counter += 1
            t0 = time.perf_counter()
            try:
                if kind == "batch":
                    # New ids every request: a body sent again would be stored nothing (a duplicate).
                    batch = batch_body(batch_size, f"{tag}{counter}-")
                    async with session.post(url + BATCH_PATH, data=batch, headers=headers) as resp:
                        body = await resp.read()
                        status = resp.status
                    m = _ACCEPTED_RE.search(body) if status == 200 else None
                    n = int(m.group(1)) if m else 0
                else:
                    loc_id = f"{tag}{counter}"
                    data = head + loc_id.encode() + tail
                    async with session.put(url + LOCATION_PATH + loc_id, data=data, headers=headers) as resp:
                        await resp.read()
                        status = resp.status
                    n = 1 if status == 202 else 0
            except (aiohttp.ClientError, TimeoutError):
                res.errors += 1
                continue
            latencies.append(time.perf_counter() - t0)
            if n:
                res.ok_requests += 1
                res.events += n
            else:
                res.other += 1

    connector = aiohttp.TCPConnector(limit=connections, force_close=False)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.monotonic()
        await asyncio.gather(*(worker(session, start + duration) for _ in range(connections)))
        res.seconds = time.monotonic() - start
    if latencies:
        latencies.sort()
        res.p50_ms = latencies[len(latencies) // 2] * 1000
        res.p99_ms = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--kind", choices=["single", "batch"], required=True)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--tag", default="P")
    parser.add_argument("--batch-size", type=int, default=200)
    a = parser.parse_args()
    result = asyncio.run(run(a.url, a.kind, a.duration, a.connections, a.tag, a.batch_size))
    print(msgspec.json.encode(result).decode(), flush=True)


if __name__ == "__main__":
    main()
