"""The lease loop alone (relay.leases, a fake lease store and a fake owner): fair share, renewals,
hand-backs, and letting go of every shard when Redis stays unreachable."""

from __future__ import annotations

import asyncio

from relay.config import ForwarderSettings
from relay.errors import StoreUnavailable
from relay.leases import LeaseLoop
from relay.link import Link
from tests.waiting import stays_false, wait_until


class FakeLeases:
    """Shard leases in memory: ``holders`` maps a shard to its holder's id or ``free:<id>``."""

    def __init__(self, alive: int = 1) -> None:
        self.alive = alive
        self.holders: dict[int, str] = {}
        self.released: list[int] = []
        self.left = False
        self.down = False
        self.resume_at: float | None = None

    def _check(self) -> None:
        if self.down:
            raise StoreUnavailable("redis: ConnectionError: refused")

    async def heartbeat(self, me: str, now_ms: int, dead_after_ms: int) -> int:
        self._check()
        return self.alive

    async def renew(self, shard: int, me: str, ttl_ms: int) -> bool:
        self._check()
        return self.holders.get(shard) == me

    async def acquire(self, shard: int, me: str, ttl_ms: int) -> str | None:
        self._check()
        previous = self.holders.get(shard, "")
        if previous not in ("", me) and not previous.startswith("free:"):
            return None
        self.holders[shard] = me
        return "self" if previous == me else previous

    async def release(self, shard: int, me: str, ttl_ms: int) -> None:
        self._check()
        self.holders[shard] = f"free:{me}"
        self.released.append(shard)

    async def leave(self, me: str) -> None:
        self.left = True

    async def link_sync(self, me: str, state: str, reason: str, since: float) -> float | None:
        self._check()
        return self.resume_at


class FakeOwner:
    def __init__(self, clean: bool = True) -> None:
        self.shards: dict[int, bool] = {}  # index → dirty
        self.lost: list[tuple[int, str]] = []
        self.handed: list[int] = []
        self.clean = clean

    def own(self, index: int, *, dirty: bool) -> None:
        self.shards[index] = dirty

    def lose(self, index: int, reason: str) -> None:
        if self.shards.pop(index, None) is not None:
            self.lost.append((index, reason))

    async def hand_back(self, index: int) -> bool:
        del self.shards[index]
        self.handed.append(index)
        return self.clean


def loop_of(ds: FakeLeases, owner: FakeOwner, total: int = 4, ttl_s: float = 15.0) -> LeaseLoop:
    cfg = ForwarderSettings(lease_ttl_s=ttl_s)
    return LeaseLoop(cfg, ds, Link(4, 3), "me", total, owner.shards, owner, stopping=asyncio.Event())


async def test_takes_a_fair_share_and_tells_a_takeover_from_a_clean_hand_back() -> None:
    ds, owner = FakeLeases(alive=2), FakeOwner()
    ds.holders = {0: "free:old", 1: "other", 2: "", 3: "free:old"}
    await loop_of(ds, owner).round()
    # ceil(4 / 2) = 2 shards; shard 1 is held by a live replica; "" (never held) counts as dirty.
    assert len(owner.shards) == 2 and 1 not in owner.shards
    for index, dirty in owner.shards.items():
        assert dirty is (index == 2)


async def test_a_lease_not_renewed_is_lost() -> None:
    ds, owner = FakeLeases(alive=1), FakeOwner()
    leases = loop_of(ds, owner)
    await leases.round()
    assert sorted(owner.shards) == [0, 1, 2, 3]
    ds.holders[2] = "other"  # our lease expired and another replica took it
    await leases.round()
    assert owner.lost == [(2, "lease lost")]
    assert 2 not in owner.shards


async def test_one_shard_too_many_is_handed_back_and_released_only_if_clean() -> None:
    ds, owner = FakeLeases(alive=1), FakeOwner()
    leases = loop_of(ds, owner)
    await leases.round()
    ds.alive = 2  # a second replica joined: our fair share is 2 of 4
    await leases.round()
    await leases.handed_back()
    assert owner.handed == [3] and ds.released == [3] and ds.holders[3] == "free:me"
    owner.clean = False  # an attempt of ours still on the wire: the lease must expire instead
    ds.alive = 4
    await leases.round()
    await leases.handed_back()
    assert owner.handed == [3, 2] and ds.released == [3]


class SlowOwner(FakeOwner):
    """An owner whose hand-back waits for an attempt on the wire (up to ``shutdown_timeout_s`` in the forwarder)."""

    def __init__(self) -> None:
        super().__init__()
        self.attempt_done = asyncio.Event()

    async def hand_back(self, index: int) -> bool:
        del self.shards[index]
        self.handed.append(index)
        await self.attempt_done.wait()
        return True


async def test_a_hand_back_held_by_a_slow_attempt_does_not_cost_the_other_shards() -> None:
    # The rounds go on renewing while one shard is handed back: the watchdog (70 % of the TTL without a
    # renewing round) must not fire, nor the handed-back shard be taken again meanwhile.
    ds, owner = FakeLeases(alive=1), SlowOwner()
    leases = loop_of(ds, owner, ttl_s=0.3)  # a round every 0.1 s; the watchdog fires after 0.21 s
    task = asyncio.create_task(leases.run())
    try:
        await wait_until(lambda: len(owner.shards) == 4, timeout=2)
        ds.alive = 2
        await wait_until(lambda: owner.handed == [3], timeout=2)
        # the hand-back waits three times the watchdog's limit: nothing lost, the shard not taken again
        await stays_false(lambda: owner.lost != [] or sorted(owner.shards) != [0, 1, 2] or owner.handed != [3], 0.6)
        assert owner.lost == [] and sorted(owner.shards) == [0, 1, 2] and owner.handed == [3]
        owner.attempt_done.set()
        await wait_until(lambda: ds.released == [3, 2], timeout=2)  # then the next extra, one at a time
        assert ds.holders[3] == "free:me" and owner.lost == [] and sorted(owner.shards) == [0, 1]
    finally:
        owner.attempt_done.set()
        leases.stopping.set()
        await task


async def test_redis_unreachable_for_most_of_the_ttl_loses_every_shard() -> None:
    ds, owner = FakeLeases(alive=1), FakeOwner()
    leases = loop_of(ds, owner, ttl_s=0.3)  # a round every 0.1 s; let go after 0.21 s
    task = asyncio.create_task(leases.run())
    try:
        await wait_until(lambda: len(owner.shards) == 4, timeout=2)
        ds.down = True
        await wait_until(lambda: not owner.shards, timeout=2)
        assert sorted(owner.lost) == [(i, "redis unreachable") for i in range(4)]
    finally:
        leases.stopping.set()
        await task


async def test_an_operator_resume_is_obeyed_once() -> None:
    ds, owner = FakeLeases(), FakeOwner()
    leases = loop_of(ds, owner)
    await leases.link.pause("unregistered")
    ds.resume_at = leases.link.since - 1  # an older request: not for this pause
    await leases.sync_link()
    assert leases.link.state == "paused"
    ds.resume_at = leases.link.since + 1
    await leases.sync_link()
    assert leases.link.reason == "operator resumed the link"


async def test_release_and_leave() -> None:
    ds, owner = FakeLeases(), FakeOwner()
    leases = loop_of(ds, owner)
    await leases.round()
    await leases.release(1)
    await leases.leave()
    assert ds.holders[1] == "free:me" and ds.left
