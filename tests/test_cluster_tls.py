"""Found in review of issue 17 (Cluster over TLS): docs/operations.md says a Cluster seed may be ``rediss://`` ("rediss://
for TLS"), and tests/test_store_pipeline.py says "rediss:// must not fall back to plain text". The coalesced
pipeline on a Cluster (relay.store.pipes.NodePipes) opens its RawPipe with asyncio.open_connection, TLS or not.

The pip-installed valkey-server is built without TLS, so a one-node Valkey Cluster (real, CLUSTER ADDSLOTSRANGE)
is put behind a TLS terminator (as stunnel or a cloud TLS endpoint would), announcing the terminator's port
(``cluster-announce-port``): every client must speak TLS to reach it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trustme

from relay.config import RedisSettings
from relay.errors import StoreUnavailable
from relay.store import Store, connect
from relay.store import keys as K
from tests.loopback import free_port
from tests.topologies import HOST, ValkeyProcess
from tests.waiting import wait_until


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, ConnectionError):
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    writer.close()


class TlsNode:
    def __init__(self, base: Path) -> None:
        self.ca = trustme.CA()
        self.ca_file = base / "ca.pem"
        base.mkdir(parents=True, exist_ok=True)
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.tls_port = free_port()
        config = ["cluster-enabled yes", "cluster-config-file nodes.conf", f"cluster-announce-port {self.tls_port}"]
        self.node = ValkeyProcess(base / "node", config, cluster_bus=True)
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        await self.node.start()
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert(HOST).configure_cert(ctx)

        async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                ur, uw = await asyncio.open_connection(HOST, self.node.port)
            except OSError:
                w.close()
                return
            await asyncio.gather(_pipe(r, uw), _pipe(ur, w))

        self.server = await asyncio.start_server(serve, HOST, self.tls_port, ssl=ctx)
        client = self.node.client()
        try:
            await client.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)  # type: ignore[no-untyped-call]

            async def formed() -> bool:
                info = await client.execute_command("CLUSTER", "INFO")  # type: ignore[no-untyped-call]
                return b"cluster_state:ok" in info

            await wait_until(formed, 10, "the one-node cluster says cluster_state:ok")
        finally:
            await client.aclose()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        self.node.stop()


@pytest.fixture
async def tls_cluster(tmp_path: Path) -> AsyncIterator[TlsNode]:
    node = TlsNode(tmp_path / "tls")
    try:
        await node.start()
        yield node
    finally:
        await node.stop()


async def test_the_coalesced_pipeline_speaks_tls_to_a_rediss_cluster(tls_cluster: TlsNode) -> None:
    url = f"rediss://{HOST}:{tls_cluster.tls_port}/0?ssl_ca_certs={tls_cluster.ca_file}"
    settings = RedisSettings(url=url, cluster=True, shards=16, socket_timeout_s=2.0)
    store = Store(connect(url, settings), settings)
    try:
        await store.load_scripts()  # the pooled RedisCluster client speaks TLS: this works
        assert await store.redis.ping()
        assert [n.port for n in store.redis.get_nodes()] == [tls_cluster.tls_port]  # type: ignore[attr-defined]
        # The hot path (every ingress commit, the forwarder's finish, the state reads) over plain TCP: refused.
        try:
            assert await store.call("HGET", K.parked_key(0), "nothing") is None
        except StoreUnavailable as exc:
            pytest.fail(f"the coalesced pipeline did not speak TLS to a rediss:// Cluster: {exc}")
    finally:
        await store.close()
