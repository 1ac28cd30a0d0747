"""relay serve's event loop: uvloop when it is installed, the standard loop when told so (RELAY_LOOP).

uvloop is optional (the ``speed`` extra): the tests that need it skip without it.
"""

from __future__ import annotations

import asyncio
import sys

import pytest

from relay.cli import choose_loop
from relay.errors import ConfigError


def _no_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # ``import uvloop`` now raises ImportError


def test_auto_picks_uvloop_when_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    uvloop = pytest.importorskip("uvloop")
    monkeypatch.delenv("RELAY_LOOP", raising=False)
    for choice in (None, "auto", "uvloop", " UVLOOP "):
        name, factory = choose_loop(choice)
        assert name == f"uvloop {uvloop.__version__}"
        assert factory is uvloop.new_event_loop


def test_the_uvloop_factory_runs_the_relays_coroutines() -> None:
    pytest.importorskip("uvloop")
    _, factory = choose_loop("uvloop")

    async def which() -> str:
        await asyncio.sleep(0)
        return type(asyncio.get_running_loop()).__module__

    with asyncio.Runner(loop_factory=factory) as runner:
        assert runner.run(which()).startswith("uvloop")


def test_asyncio_forces_the_default_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    assert choose_loop("asyncio") == ("asyncio", None)
    monkeypatch.setenv("RELAY_LOOP", "asyncio")
    assert choose_loop() == ("asyncio", None)


def test_asyncio_does_not_import_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "uvloop", raising=False)
    assert choose_loop("asyncio") == ("asyncio", None)
    assert "uvloop" not in sys.modules


def test_auto_falls_back_to_the_default_loop_without_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_uvloop(monkeypatch)
    monkeypatch.delenv("RELAY_LOOP", raising=False)
    assert choose_loop() == ("asyncio", None)
    monkeypatch.setenv("RELAY_LOOP", "")
    assert choose_loop() == ("asyncio", None)


def test_uvloop_required_but_missing_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    _no_uvloop(monkeypatch)
    monkeypatch.setenv("RELAY_LOOP", "uvloop")
    with pytest.raises(ConfigError, match=r"relay\[speed\]"):
        choose_loop()


def test_unknown_loop_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="RELAY_LOOP: 'tokio'"):
        choose_loop("tokio")
