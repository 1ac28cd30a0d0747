"""What a shard reader does with the entries it read (relay.reader's feed, no Redis): queue them per
key, hand new keys to the workers, count them in the buffer, and never queue one twice."""

from __future__ import annotations

import asyncio

from relay import compaction
from relay.buffer import Buffer
from relay.config import ForwarderSettings, Module
from relay.events import Event
from relay.reader import Reader
from relay.shard import QKey, Shard
from relay.store import Entry
from relay.store import keys as K


def entry(n: int, module: Module = "locations", obj: str = "L1") -> Entry:
    key = f"{module[:3]}:FR:AB1:{obj}"
    ev = Event(id=f"e{n}", module=module, method="PUT", country_code="FR", party_id="AB1", object_id=obj,
               key=key, correlation_id="", received_at=0.0, body=b"{}")  # fmt: skip
    return Entry(stream=K.stream_key(module, 0), shard=0, id=f"{n}-0", event=ev, after=None)


def reader() -> tuple[Reader, Buffer, list[QKey]]:
    buffer = Buffer(100, 10)
    ready: list[QKey] = []
    r = Reader(ForwarderSettings(), None, None, "me", buffer, lambda _shard, qkey: ready.append(qkey))  # type: ignore[arg-type]
    return r, buffer, ready


def test_entries_queue_per_key_and_new_keys_become_ready() -> None:
    r, buffer, ready = reader()
    shard = Shard(index=0, dirty=False, stopping=asyncio.Event())
    r.feed(shard, [entry(1), entry(2, obj="L2"), entry(3), entry(4, "cdrs", "C1")])
    assert ready == [("locations", "loc:FR:AB1:L1"), ("locations", "loc:FR:AB1:L2"), ("cdrs", "cdr:FR:AB1:C1")]
    assert [e.id for e in shard.queues[("locations", "loc:FR:AB1:L1")]] == ["1-0", "3-0"]
    assert (buffer.held, buffer.cdrs) == (4, 1)
    r.feed(shard, [entry(5)])  # the key's queue exists: somebody works on it, it is not ready again
    assert len(ready) == 3 and len(shard.queues[("locations", "loc:FR:AB1:L1")]) == 3
    r.feed(shard, [])
    assert buffer.held == 5


def test_entries_already_held_are_not_queued_again() -> None:
    """A consumer group recreated after NOGROUP hands its stream out again from 0."""
    r, buffer, ready = reader()
    shard = Shard(index=0, dirty=False, stopping=asyncio.Event())
    r.feed(shard, [entry(1), entry(2), entry(3, "cdrs", "C1"), entry(4, "cdrs", "C1")])
    r.feed(shard, [entry(1), entry(2), entry(4, "cdrs", "C1"), entry(5), entry(6, "cdrs", "C1")])
    assert [e.id for e in shard.queues[("locations", "loc:FR:AB1:L1")]] == ["1-0", "2-0", "5-0"]
    assert [e.id for e in shard.queues[("cdrs", "cdr:FR:AB1:C1")]] == ["3-0", "4-0", "6-0"]
    assert (buffer.held, buffer.cdrs) == (6, 3)
    assert len(ready) == 2


async def test_held_keys_squeezed_then_forgotten_give_back_exactly_what_they_took() -> None:
    """A takeover hold cancelled after the full buffer folded the held queue: units leave ``units`` and
    ``folded``, raw entries ``held`` (relay.compaction.drop), nothing goes negative or stays."""
    r, buffer, ready = reader()
    shard = Shard(index=0, dirty=True, stopping=asyncio.Event())
    qkey = ("locations", "loc:FR:AB1:L1")
    r._hold(shard, {qkey}, r.clock() + 100)
    r.feed(shard, [entry(1), entry(2), entry(3)])
    assert ready == [] and buffer.held == 3
    assert compaction.fold_queue(shard.queues[qkey], buffer, state=True, keep_head=True) == 2
    assert (buffer.held, buffer.units, buffer.folded) == (1, 1, 2)
    r._cancel_hold(shard)
    assert qkey not in shard.queues
    assert (buffer.held, buffer.units, buffer.folded) == (0, 0, 0)


def status(n: int, evse: str) -> Entry:
    key = "loc:FR:AB1:L1"
    ev = Event(id=f"s{n}", module="locations", method="PATCH", country_code="FR", party_id="AB1", object_id="L1",
               evse_uid=evse, key=key, correlation_id="", received_at=0.0, body=b'{"status":"AVAILABLE"}')  # fmt: skip
    return Entry(stream=K.stream_key("locations", 0), shard=0, id=f"{n}-0", event=ev, after=None)


def test_an_entry_already_folded_is_not_queued_again() -> None:
    """A folded dynamic run ends with one unit per path, in the order the paths first appeared: the last
    item of the queue is not always its newest entry."""
    r, buffer, _ = reader()
    shard = Shard(index=0, dirty=False, stopping=asyncio.Event())
    r.feed(shard, [status(1, "E2"), status(2, "E1"), status(3, "E2")])
    q = shard.queues[("locations", "loc:FR:AB1:L1")]
    assert compaction.fold_queue(q, buffer, state=True) == 3
    assert [e.id for e in q] == ["3-0", "2-0"]
    r.feed(shard, [status(3, "E2"), status(4, "E1")])  # the group handed 3 out again
    assert [e.id for e in q] == ["3-0", "2-0", "4-0"]
    assert (buffer.held, buffer.units, buffer.folded) == (1, 2, 3)
