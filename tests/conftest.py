"""Shared fixtures: one real embedded Redis for the session (flushed per test), settings, ingress client."""

from __future__ import annotations

import os
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer

from relay.config import Settings, load
from relay.embedded_redis import EmbeddedRedis
from relay.ingress import create_app
from relay.logs import configure_logging
from relay.store import Store, connect
from relay.typedefs import Health
from tests.fake_iop import FakeIop

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = Path(os.environ.get("RELAY_REFERENCE_DIR", REPO.parent / "shared" / "reference")) / "ocpi-2.2.1" / "examples"
TOKEN = "test-ingress-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="session", autouse=True)
def _logging() -> None:
    # Logs go to the real stderr, bound now, so CliRunner's captured stdout holds only CLI output.
    configure_logging("debug", "console")


@pytest.fixture(scope="session")
def redis_dir() -> Iterator[Path]:
    # Short path: unix socket paths are limited to ~107 bytes.
    with tempfile.TemporaryDirectory(prefix="relay-t-", dir="/tmp") as d:
        yield Path(d)


@pytest.fixture(scope="session")
async def embedded_redis(redis_dir: Path) -> AsyncIterator[EmbeddedRedis]:
    """The same pip-installed server the relay embeds, with AOF on (everysec keeps the suite fast)."""
    server = EmbeddedRedis(redis_dir / "redis", fsync="everysec")
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def redis_url(embedded_redis: EmbeddedRedis) -> AsyncIterator[str]:
    """URL of the session server, flushed before each test."""
    client = aioredis.Redis.from_url(embedded_redis.url)
    await client.flushall()
    await client.aclose()
    yield embedded_redis.url


@pytest.fixture
def make_settings(redis_url: str, tmp_path: Path) -> Callable[..., Settings]:
    """Settings from the shipped config/relay.toml, pointed at the test Redis, with overrides by env name."""

    def make(**env: str) -> Settings:
        base = {
            "RELAY_REDIS_URL": redis_url,
            "RELAY_INGRESS_TOKEN": TOKEN,
            "RELAY_STORAGE_DIR": str(tmp_path / "data"),
            "RELAY_INGRESS_LISTEN": "127.0.0.1:0",
            "RELAY_OCPI_LISTEN": "127.0.0.1:0",
        }
        base.update(env)
        return load(REPO / "config" / "relay.toml", env=base)

    return make


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[Store]:
    s = Store(connect(settings.redis.url, settings.redis), settings.redis)
    await s.load_scripts()
    await s.ensure_groups()
    yield s
    await s.close()


@pytest.fixture
async def iop() -> AsyncIterator[FakeIop]:
    """A fake IOP on loopback answering 200 + OCPI 1000 unless scripted."""
    fake = FakeIop()
    await fake.start()
    yield fake
    await fake.close()


@pytest.fixture
async def ingress(settings: Settings, store: Store) -> AsyncIterator[TestClient[Any, Any]]:
    """A real ingress server on loopback, and a client with the CSMS's token."""
    health = Health(listeners_up=True)
    client = TestClient(TestServer(create_app(settings, store, health)))
    await client.start_server()
    yield client
    await client.close()


def example(name: str, **changes: Any) -> dict[str, Any]:
    """A spec example as a dict, with top-level fields changed."""
    data: dict[str, Any] = msgspec.json.decode((EXAMPLES / name).read_bytes())
    data.update(changes)
    return data


def gireve_location(location_id: str = "LOC1", **changes: Any) -> dict[str, Any]:
    """The repo's example Location of FR/AB1, which satisfies GIREVE's rules."""
    data: dict[str, Any] = msgspec.json.decode((REPO / "examples" / "location.json").read_bytes())
    data["id"] = location_id
    data.update(changes)
    return data
