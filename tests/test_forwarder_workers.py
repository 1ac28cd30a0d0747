"""The worker pool's risky paths under load: the IOP going down and up while a backlog churns
through a small buffer, acknowledgements that fail because Redis went away between the IOP's
answer and the ack, and keys that leave the fast path (retries) and come back to it.
Nothing may be lost, nothing reordered per key, nothing left pending."""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from relay import metrics
from relay.config import Settings
from relay.delivery import Delivery
from relay.embedded_redis import EmbeddedRedis
from relay.events import Event
from relay.forwarder import Forwarder
from relay.link import Link
from relay.ordering import location_key, shard_of
from relay.shard import QKey, Shard
from relay.store import Entry
from relay.store import keys as K
from tests.fake_iop import Received, Reply, random_faults
from tests.test_forwarder import Env, make_env, put_many, until, until_async  # noqa: F401  (fixture)


async def _pending(env: Env) -> int:
    total = 0
    for s in range(env.settings.redis.shards):
        info = await env.redis.xpending(K.stream_key("locations", s), K.GROUP)
        total += info["pending"]
    return total


def _collapsed(got: list[int]) -> list[int]:
    """Sequence numbers with repeats in a row merged: a duplicate is allowed, going back is not."""
    return [n for i, n in enumerate(got) if i == 0 or n != got[i - 1]]


def _redis_errors(op: str) -> float:
    return float(metrics.REDIS_ERRORS.labels(op=op)._value.get())


async def _all_in_order(env: Env, locs: list[str], want: list[int], timeout: float) -> None:
    """Every update of every location taken by the IOP in order (repeats allowed), nothing left
    in Redis: no stream entry, nothing pending, no dead letter."""
    try:
        await env.iop.wait_for(lambda: all(_collapsed(env.seqs(loc)) == want for loc in locs), timeout=timeout)
    except AssertionError as exc:  # name the keys: a key out of order looks like a stall otherwise
        wrong = {loc: env.seqs(loc) for loc in locs if _collapsed(env.seqs(loc)) != want}
        raise AssertionError(f"{exc}; not {want} (repeats collapsed): {wrong}") from None
    for loc in locs:
        assert _collapsed(env.seqs(loc)) == want, (loc, env.seqs(loc))
    await until_async(env.all_streams_empty, timeout=20)
    assert await _pending(env) == 0
    assert await env.dead() == []


def _delivered_at_least(env: Env, n: int) -> Callable[[], bool]:
    return lambda: len(env.iop.delivered()) >= n


async def test_iop_flapping_with_a_small_buffer_loses_and_reorders_nothing(make_env: Callable[..., Any]) -> None:  # noqa: F811
    env: Env = await make_env(RELAY_FORWARDER_MAX_BUFFERED="24", RELAY_FORWARDER_READ_BATCH="16",
                              RELAY_FORWARDER_PROBE_MAX_S="0.3")  # fmt: skip
    env.iop.script = random_faults(0.1, seed=5)
    locs = [f"F{i:03d}" for i in range(60)]
    per = 6
    writer = asyncio.create_task(put_many(env, locs, per))
    for cycle in range(1, 5):  # outages while the backlog is being written and delivered
        await env.iop.wait_for(_delivered_at_least(env, 40 * cycle), timeout=30)
        await env.iop.down()
        await until(lambda: env.relay.link.state == "down", timeout=20, what="link down")
        await env.iop.start()
    await writer
    await _all_in_order(env, locs, list(range(1, per + 1)), timeout=60)


async def test_acks_that_fail_are_written_again_before_the_key_goes_on(make_env: Callable[..., Any]) -> None:  # noqa: F811
    """The IOP answers while Redis is down: every ack of those answers fails, and each key must
    neither send its next update nor lose the delivered one before that ack is written."""
    with tempfile.TemporaryDirectory(prefix="rw-", dir="/tmp") as d:
        server = EmbeddedRedis(Path(d) / "r", fsync="always")
        await server.start()
        env: Env = await make_env(RELAY_REDIS_URL=server.url)
        try:
            locs = [f"R{i:03d}" for i in range(80)]
            await put_many(env, locs, 3)
            await env.iop.wait_for(lambda: len(env.iop.delivered()) >= 40, timeout=20)
            hold = asyncio.Event()
            env.iop.script = lambda _: Reply(hold=hold)
            await env.iop.wait_for(lambda: env.iop.inflight >= 10, timeout=20)
            errors = _redis_errors("deliver")
            await server.stop()
            answered = len(env.iop.received)
            hold.set()  # the IOP takes them all while Redis is down: their acks fail
            await env.iop.wait_for(lambda: len(env.iop.received) >= answered + 10, timeout=20)
            await until(lambda: _redis_errors("deliver") > errors, timeout=20, what="acks failed")
            env.iop.script = lambda _: None
            await server.start()
            await put_many(env, locs, 2, start=4)
            await _all_in_order(env, locs, [1, 2, 3, 4, 5], timeout=40)
        finally:
            await env.relay.stop()
            await server.stop()


async def test_keys_leave_the_fast_path_for_retries_and_come_back(make_env: Callable[..., Any]) -> None:  # noqa: F811
    """A key whose first attempt fails is retried by a runner of its own, then handed back to the
    workers; the pool never sends more at once than its concurrency, and never two of one key."""
    env: Env = await make_env(RELAY_FORWARDER_CONCURRENCY="8")
    failed: set[str] = set()

    def script(r: Received) -> Reply | None:
        if r.path.endswith("0") and r.path not in failed:  # one key in ten: first attempt fails
            failed.add(r.path)
            return Reply(status=503, ocpi=None)
        return Reply(delay_s=0.005)

    env.iop.script = script
    locs = [f"W{i:03d}" for i in range(50)]
    await put_many(env, locs, 4)
    want = [1, 2, 3, 4]
    await env.iop.wait_for(lambda: all(env.seqs(loc) == want for loc in locs), timeout=30)
    assert env.iop.max_inflight <= 8
    for loc in locs:
        assert env.seqs(loc) == want, (loc, env.seqs(loc))
        mine = sorted((r for r in env.iop.received if r.path.endswith("/" + loc)), key=lambda r: r.at)
        for before, after in zip(mine, mine[1:], strict=False):  # never two of one key on the wire
            assert after.at >= before.answered_at, loc
    assert len(env.iop.received) == len(locs) * 4 + len(failed)
    await until_async(env.all_streams_empty, timeout=20)
    fwd = env.relay.forwarder
    assert fwd is not None
    await until(lambda: all(not s.runners and not s.active and not s.queues for s in fwd.shards.values()),
                what="every key let go")  # fmt: skip
    assert fwd.pool_size == 8


async def _one_failure_then_all_delivered(env: Env, failed: Callable[[], bool]) -> None:
    locs = [f"B{i:02d}" for i in range(20)]
    await put_many(env, locs, 3)
    await _all_in_order(env, locs, [1, 2, 3], timeout=30)
    assert failed()


def _fifth_attempt_raises(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> Callable[[], bool]:
    """Patch the forwarder's attempts: the fifth raises ``exc``; the result says whether more followed."""
    calls = 0
    real = Delivery.attempt

    async def flaky(self: Delivery, shard: Any, entry: Any, attempts: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 5:
            raise exc
        return await real(self, shard, entry, attempts)

    monkeypatch.setattr(Delivery, "attempt", flaky)
    return lambda: calls > 5


async def test_a_failing_attempt_loses_its_shard_not_its_key(
    make_env: Callable[..., Any],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bug in a worker's attempt: the shard is lost and recovered, the key is not left behind."""
    went_on = _fifth_attempt_raises(monkeypatch, RuntimeError("injected"))
    env: Env = await make_env()
    await _one_failure_then_all_delivered(env, went_on)


async def test_a_failing_ack_callback_loses_its_shard_not_its_key(
    make_env: Callable[..., Any],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = 0
    real = Delivery.count_delivered

    def flaky(self: Delivery, ev: Any) -> None:
        nonlocal calls
        calls += 1
        if calls == 5:
            raise RuntimeError("injected")
        real(self, ev)

    monkeypatch.setattr(Delivery, "count_delivered", flaky)
    env: Env = await make_env()
    await _one_failure_then_all_delivered(env, lambda: calls > 5)


async def test_a_cancel_that_is_not_ours_loses_the_shard_and_keeps_the_pool(
    make_env: Callable[..., Any],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A CancelledError a library lets out is not a stop: the worker goes on, the shard recovers."""
    went_on = _fifth_attempt_raises(monkeypatch, asyncio.CancelledError())
    env: Env = await make_env(RELAY_FORWARDER_CONCURRENCY="8")
    await _one_failure_then_all_delivered(env, went_on)
    assert env.relay.forwarder is not None and env.relay.forwarder.pool_size == 8


class _NoRedis:
    redis = None
    shards = 4


async def test_a_runner_cut_before_its_first_step_gives_its_room_back() -> None:
    """A key handed to a runner, and its shard lost in the same turn of the loop: the runner never
    starts, and its entries must still leave the buffer (else max_buffered shrinks for good)."""
    fwd = Forwarder(Settings(), _NoRedis(), client=None, link=Link(4, 3))  # type: ignore[arg-type]
    shard = Shard(index=0, dirty=False, stopping=asyncio.Event())
    fwd.shards[0] = shard

    def entry(n: int) -> Entry:
        ev = Event(id=f"e{n}", module="locations", method="PUT", country_code="FR", party_id="AB1",
                   object_id="L1", key="loc:FR:AB1:L1", correlation_id="", received_at=0.0, body=b"{}")  # fmt: skip
        return Entry(stream=K.stream_key("locations", 0), shard=0, id=f"{n}-0", event=ev, after=None)

    taken: list[QKey] = []
    fwd.reader.ready = lambda _shard, qkey: taken.append(qkey)  # this test is the worker that takes it
    fwd.reader.feed(shard, [entry(1), entry(2)])
    [qkey] = taken
    assert fwd.buffer.held == 2
    fwd.start_runner(shard, qkey)  # as a worker hands it to a runner
    runner = shard.runners[qkey]
    fwd.lose(0, "lease lost")  # same turn: the runner has not run a line yet
    await asyncio.wait({runner})
    assert runner.cancelled()
    assert fwd.buffer.held == 0 and not shard.queues and not shard.runners


async def test_a_shard_taken_back_after_a_cut_request_waits_before_resending(make_env: Callable[..., Any]) -> None:  # noqa: F811
    """We lose a shard with a request on the wire (cut, but the IOP may still apply it) and our
    lease loop takes the shard back: its pending entries are ours, yet the resend must wait as after
    any takeover (until the cut attempt's deadline has passed), or it could overtake it at the IOP."""
    env: Env = await make_env()
    hold = asyncio.Event()
    env.iop.script = lambda r: Reply(hold=hold) if not hold.is_set() else None
    await env.put_loc("G1", 1)
    await env.iop.wait_for(lambda: env.iop.inflight == 1)
    fwd = env.relay.forwarder
    assert fwd is not None
    index = shard_of(location_key("FR", "AB1", "G1"), env.settings.redis.shards)
    cut_at = time.time()
    fwd.lose(index, "test: lease lost")
    await until(lambda: index in fwd.shards, timeout=10, what="shard taken back")
    await env.iop.wait_for(lambda: len(env.iop.arrived) == 2, timeout=15)
    iop = env.settings.iop
    assert env.iop.arrived[1].at - cut_at >= iop.connect_timeout_s + iop.request_timeout_s
    hold.set()
    await _all_in_order(env, ["G1"], [1], timeout=10)
