"""Deterministic tests of the change relay (dcmstatus.engine.relay) with
in-memory fakes of the outbox, the listener and the publisher, on trio's
MockClock with autojump (docs/changes.md#relay)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import trio
import trio.testing

from dcmstatus.core.changes import PendingChange
from dcmstatus.engine.metrics import Metrics
from dcmstatus.engine.relay import Relay, RelaySettings


@pytest.fixture
def autojump_clock():
    return trio.testing.MockClock(autojump_threshold=0)


class FakeOutbox:
    def __init__(self, count: int, *, leader: bool = True) -> None:
        self.rows = {i: False for i in range(1, count + 1)}  # change id -> published
        self.leader = leader
        self.leading = False
        self.marked: list[tuple[int, int]] = []

    async def lead(self) -> bool:
        self.leading = self.leader
        return self.leading

    async def pending(self, limit: int) -> list[PendingChange]:
        await trio.sleep(0)
        ids = [i for i, done in sorted(self.rows.items()) if not done][:limit]
        return [PendingChange(i, "vm", datetime.now(UTC), b"{}") for i in ids]

    async def mark_published(self, first: int, last: int) -> None:
        self.marked.append((first, last))
        for i in range(first, last + 1):
            self.rows[i] = True


class FakeListener:
    async def wait(self, timeout: float) -> None:
        await trio.sleep(timeout)


class FakePublisher:
    """Acks everything, except that the rounds listed in `short` ack only that many."""

    def __init__(self, short: dict[int, int] | None = None, after=None) -> None:
        self.short = short or {}
        self.after = after or (lambda: None)
        self.sent: list[int] = []
        self.rounds = 0

    async def ready(self) -> None:
        pass

    async def publish(self, changes: list[PendingChange]) -> int:
        self.rounds += 1
        self.sent.extend(c.change_id for c in changes)
        self.after()
        return self.short.get(self.rounds, len(changes))


def relay(outbox, publisher, metrics=None, batch=4):
    return Relay(outbox, FakeListener(), publisher, metrics or Metrics(), RelaySettings(batch=batch, poll_interval=1.0))


async def test_only_acked_rows_are_marked_and_the_rest_is_published_again(autojump_clock):
    outbox, publisher, metrics = FakeOutbox(10), FakePublisher(short={2: 1}), Metrics()
    r = relay(outbox, publisher, metrics)
    async with trio.open_nursery() as nursery:
        await nursery.start(r.run)
        await trio.sleep(0.05)  # inside the back-off after the short round
        assert r.state == "failing"
        await trio.sleep(10)
        nursery.cancel_scope.cancel()
    # Round 2 sent 5..8, only 5 was acked: 6..8 go again, nothing is skipped.
    assert publisher.sent == [1, 2, 3, 4, 5, 6, 7, 8, 6, 7, 8, 9, 10]
    assert outbox.marked == [(1, 4), (5, 5), (6, 9), (10, 10)]
    assert all(outbox.rows.values())
    assert r.state == "publishing"
    get = metrics.registry.get_sample_value
    assert get("dcmstatus_changes_published_total") == 10
    assert get("dcmstatus_changes_publish_errors_total") == 1
    assert get("dcmstatus_changes_relay_leader") == 1


async def test_a_replica_that_is_not_leader_publishes_nothing(autojump_clock):
    outbox, publisher, metrics = FakeOutbox(3, leader=False), FakePublisher(), Metrics()
    r = relay(outbox, publisher, metrics)
    async with trio.open_nursery() as nursery:
        await nursery.start(r.run)
        await trio.sleep(12)  # a few leadership retries
        assert (r.state, publisher.sent) == ("standby", [])
        assert metrics.registry.get_sample_value("dcmstatus_changes_relay_leader") == 0
        outbox.leader = True  # the leader went: this one takes over at its next try
        await trio.sleep(RelaySettings().lead_retry + 1)
        nursery.cancel_scope.cancel()
    assert publisher.sent == [1, 2, 3] and r.state == "publishing"


async def test_a_leader_that_loses_its_connection_stops_publishing(autojump_clock):
    outbox = FakeOutbox(3)

    def connection_lost():  # and another replica took the lock
        outbox.leading = outbox.leader = False

    publisher = FakePublisher(after=connection_lost)
    r = relay(outbox, publisher, batch=1)
    async with trio.open_nursery() as nursery:
        await nursery.start(r.run)
        await trio.sleep(20)
        nursery.cancel_scope.cancel()
    assert publisher.sent == [1] and r.state == "standby"
