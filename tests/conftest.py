"""Shared fixtures: one real embedded Redis for the session (flushed per test), settings, ingress client."""

from __future__ import annotations

import os
import sys
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
DATA = REPO / "tests" / "data"  # the project's own OCPI objects, read by example()
TOKEN = "test-ingress-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

# The official OCPI examples, for the tests that check them (tests/test_models.py, tests/test_ingress.py):
# $RELAY_REFERENCE_DIR/ocpi-2.2.1/examples, else the reference copy beside the repo. A clone on its own has
# neither: those tests are skipped, unless RELAY_REFERENCE_DIR is set, when a wrong path must fail them.
_REFERENCE = os.environ.get("RELAY_REFERENCE_DIR")
SPEC_DIR = Path(_REFERENCE or REPO.parent / "shared" / "reference") / "ocpi-2.2.1" / "examples"
needs_spec_examples = pytest.mark.skipif(
    not SPEC_DIR.is_dir() and not _REFERENCE, reason="OCPI reference examples not found (set RELAY_REFERENCE_DIR)"
)


def configure_test_logging() -> None:
    """The suite's logging: debug lines on the process's own stderr, bound now.

    Not sys.stderr: pytest swaps it for a capture file that an interrupted run closes before the session's
    last teardowns log (the embedded Redis stopping), nor CliRunner's stream while a CLI test runs. File
    descriptor 2 is still captured per test by pytest's default (fd) capture.
    """
    configure_logging("debug", "console", stream=sys.__stderr__ or sys.stderr)


@pytest.fixture(scope="session", autouse=True)
def _logging() -> None:
    configure_test_logging()


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
            # The peers of the tests (fake IOP, OCPI peer, CSMS) are http on 127.0.0.1: tests of the
            # outbound policy itself set it back to "false".
            "RELAY_OCPI_ALLOW_INSECURE_URLS": "true",
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
    """One of the project's OCPI objects (tests/data) as a dict, with top-level fields changed."""
    data: dict[str, Any] = msgspec.json.decode((DATA / name).read_bytes())
    data.update(changes)
    return data


def gireve_location(location_id: str = "LOC1", **changes: Any) -> dict[str, Any]:
    """The repo's example Location of FR/AB1, which satisfies GIREVE's rules."""
    data: dict[str, Any] = msgspec.json.decode((REPO / "examples" / "location.json").read_bytes())
    data["id"] = location_id
    data.update(changes)
    return data
