"""Deterministic tests of the concurrency core (dcmstatus.pipeline) with
in-memory fakes of the source and the store, on trio's MockClock with
autojump: exact times, no sockets, no sleeps in real time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import trio
import trio.testing

from dcmstatus.core.batching import WriteBatch
from dcmstatus.core.errors import BatchRefused
from dcmstatus.core.model import BatchResult, Delivery, Rejection, StatusUpdate
from dcmstatus.engine.metrics import Metrics
from dcmstatus.engine.pipeline import Pipeline, PipelineSettings

EPOCH = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
def autojump_clock():
    return trio.testing.MockClock(autojump_threshold=0)


def fake_decode(subject, headers, body, seq, time_ns):
    """b"<instance>:<status>:<second>" → an update; anything else → a rejection."""
    try:
        instance, status, second = body.decode().split(":")
        return StatusUpdate(instance, "vm", status, "", "test", None, EPOCH + timedelta(seconds=int(second)), seq)
    except ValueError:
        return Rejection("malformed_json", "not a fake event", subject, seq, headers, body)


class FakeStore:
    """Commits after `delay`; fails the first `failures` attempts."""

    def __init__(
        self, delay: float = 0.0, failures: int = 0, refuse: str | None = None, refuse_status: str | None = None
    ) -> None:
        self.delay = delay
        self.failures = failures
        self.refuse = refuse  # an instance id whose updates the "database" refuses
        self.refuse_status = refuse_status  # a status value it refuses, whatever the instance
        self.attempts = 0
        self.committed: list[tuple[float, WriteBatch]] = []
        self.rows: dict[str, tuple[datetime, int, str]] = {}

    async def apply(self, batch: WriteBatch) -> BatchResult:
        self.attempts += 1
        await trio.sleep(self.delay)
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionError("database went away")
        if any(u.instance_id == self.refuse or u.status == self.refuse_status for u in batch.updates):
            raise BatchRefused("trigger says no")
        applied = 0
        for u in batch.updates:
            current = self.rows.get(u.instance_id)
            if current is None or (u.event_time, u.stream_seq) > current[:2]:
                self.rows[u.instance_id] = (u.event_time, u.stream_seq, u.status)
                applied += 1
        self.committed.append((trio.current_time(), batch))
        return BatchResult(applied, len(batch.updates) - applied + batch.superseded, ())

    def holds_effect_of(self, seq: int, body: bytes) -> bool:
        """Whether message `seq` is durable: its instance row is written (by it
        or a newer event), or it is recorded as a rejection."""
        decision = fake_decode("dcm.vm", None, body, seq, 0)
        rejected = {(r.stream_seq, r.instance_id) for _, b in self.committed for r in b.rejections}
        if type(decision) is Rejection:
            return (seq, None) in rejected
        return decision.instance_id in self.rows or any(i == decision.instance_id for _, i in rejected)


class FakeSource:
    """Records acks, and checks each one follows the commit of its message's effect."""

    def __init__(self, stores: list[FakeStore]) -> None:
        self.stores = stores
        self.bodies: dict[str, tuple[int, bytes]] = {}
        self.acked: list[tuple[float, object]] = []

    async def ack(self, tokens):
        for token in tokens:
            seq, body = self.bodies[token]
            assert any(s.holds_effect_of(seq, body) for s in self.stores), f"{token} acked before its commit"
            self.acked.append((trio.current_time(), token))

    def acked_tokens(self) -> list:
        return [t for _, t in self.acked]


def delivery(seq: int, body: bytes) -> Delivery:
    return Delivery("dcm.vm", None, body, seq, 0, f"ack-{seq}")


class Deliveries:
    """The send side of the delivery channel, telling the fake source each message's body."""

    def __init__(self, send, source: FakeSource) -> None:
        self._send = send
        self._source = source

    def send_nowait(self, d: Delivery) -> None:
        self._source.bodies[d.token] = (d.stream_seq, d.body)
        self._send.send_nowait(d)

    async def aclose(self) -> None:
        await self._send.aclose()


def make(settings: PipelineSettings, stores: list[FakeStore]):
    source = FakeSource(stores)
    pipeline = Pipeline(fake_decode, source, stores, Metrics(), settings)
    send, receive = trio.open_memory_channel[Delivery](float("inf"))
    return pipeline, source, Deliveries(send, source), receive


async def test_full_batches_go_at_once_and_the_rest_to_the_idle_writer(autojump_clock):
    store = FakeStore()
    pipeline, source, send, receive = make(PipelineSettings(max_batch=10, max_delay=0.25, writers=1), [store])
    async with trio.open_nursery() as nursery:
        await nursery.start(pipeline.run, receive)
        start = trio.current_time()
        for seq in range(1, 26):
            send.send_nowait(delivery(seq, f"i{seq}:RUNNING:1".encode()))
        await trio.sleep(5)
        await send.aclose()
    sizes = [(round(t - start, 3), len(b)) for t, b in store.committed]
    # The last 5 go at once if the writer is already back in receive() when
    # they are decoded (trio randomises that order), else at the next look.
    assert sizes[:2] == [(0.0, 10), (0.0, 10)]
    assert sizes[2] in ((0.0, 5), (0.25, 5))
    assert sorted(source.acked_tokens()) == sorted(f"ack-{s}" for s in range(1, 26))


async def test_an_idle_writer_takes_a_partial_batch_at_once(autojump_clock):
    store = FakeStore()
    pipeline, _source, send, receive = make(PipelineSettings(max_batch=1000, max_delay=0.02, writers=1), [store])
    async with trio.open_nursery() as nursery:
        await nursery.start(pipeline.run, receive)
        start = trio.current_time()
        send.send_nowait(delivery(1, b"a:RUNNING:1"))
        await trio.sleep(1)
        assert [round(t - start, 6) for t, _ in store.committed] == [0.0]
        await send.aclose()


def backlogged(seq: int, body: bytes, pending: int) -> Delivery:
    return Delivery("dcm.vm", None, body, seq, 0, f"ack-{seq}", None, pending)


async def test_with_a_backlog_a_batch_fills_before_an_idle_writer_takes_it(autojump_clock):
    """While the stream says more is pending, deliveries arriving in bursts
    fill one batch (fewer commits, more coalescing) instead of a commit per
    burst; once pending is 0 the rest goes at once."""
    store = FakeStore()
    pipeline, source, send, receive = make(PipelineSettings(max_batch=30, max_delay=0.005, writers=1), [store])
    async with trio.open_nursery() as nursery:
        await nursery.start(pipeline.run, receive)
        start = trio.current_time()
        for burst in range(5):  # 10 per burst, 1 ms apart: faster than max_delay
            for seq in range(burst * 10 + 1, burst * 10 + 11):
                send.send_nowait(backlogged(seq, f"i{seq % 7}:RUNNING:{seq}".encode(), 50 - seq))
            await trio.sleep(0.001)
        await trio.sleep(1)
        await send.aclose()
    assert [len(b) for _, b in store.committed] == [30, 20]  # the last 20: pending 0, at once
    assert [round(t - start, 6) for t, _ in store.committed] == [0.002, 0.004]
    assert sum(b.superseded for _, b in store.committed) == 50 - 14  # 7 instances per batch kept
    assert sorted(source.acked_tokens()) == sorted(f"ack-{s}" for s in range(1, 51))


async def test_a_backlog_that_stops_arriving_is_handed_over_after_max_delay(autojump_clock):
    """Pending says more, but nothing comes (credit used up, a stalled source):
    the held batch goes at the next look, max_delay later."""
    store = FakeStore()
    pipeline, _source, send, receive = make(PipelineSettings(max_batch=1000, max_delay=0.02, writers=1), [store])
    async with trio.open_nursery() as nursery:
        await nursery.start(pipeline.run, receive)
        start = trio.current_time()
        for seq in range(1, 6):
            send.send_nowait(backlogged(seq, f"i{seq}:RUNNING:1".encode(), 10_000))
        await trio.sleep(1)
        await send.aclose()
    assert [(round(t - start, 6), len(b)) for t, b in store.committed] == [(0.02, 5)]


async def test_a_batch_fills_while_its_writer_commits_then_goes_when_it_is_free(autojump_clock):
    store = FakeStore(delay=1.0)
    pipeline, _source, send, receive = make(PipelineSettings(max_batch=100, max_delay=0.005, writers=1), [store])
    async with trio.open_nursery() as nursery:
        await nursery.start(pipeline.run, receive)
        start = trio.current_time()
        send.send_nowait(delivery(1, b"first:RUNNING:1"))
        await trio.sleep(0.1)
        for seq in range(2, 12):
            send.send_nowait(delivery(seq, f"i{seq}:RUNNING:1".encode()))
        await trio.sleep(0.4)
        for seq in range(12, 22):
            send.send_nowait(delivery(seq, f"i{seq}:RUNNING:1".encode()))
        await trio.sleep(3)
        await send.aclose()
    committed = [(t - start, len(b)) for t, b in store.committed]
    assert [n for _, n in committed] == [1, 20]  # the 20 waited together, not in two commits
    assert committed[0][0] == pytest.approx(1.0)
    # Handed over at the first look after the writer became free (looks every 5 ms).
    assert 2.0 <= committed[1][0] <= 2.0 + 0.0051


async def test_a_full_batch_waiting_for_a_busy_writer_is_never_dropped(autojump_clock):
    # A partial batch arms the look-again timer; a full batch then waits for
    # the busy writer past that time. The wait must not be cut short.
    store = FakeStore(delay=1.0)
    pipeline, source, send, receive = make(PipelineSettings(max_batch=10, max_delay=0.005, writers=1), [store])
    async with trio.open_nursery() as nursery:
        await nursery.start(pipeline.run, receive)
        send.send_nowait(delivery(1, b"first:RUNNING:1"))
        await trio.sleep(0.1)
        send.send_nowait(delivery(2, b"partial:RUNNING:1"))
        await trio.sleep(0.1)
        for seq in range(3, 40):
            send.send_nowait(delivery(seq, f"i{seq}:RUNNING:1".encode()))
        await trio.sleep(20)
        assert sorted(source.acked_tokens()) == sorted(f"ack-{s}" for s in range(1, 40))
        await send.aclose()


async def test_coalesces_to_newest_per_instance_and_acks_every_message(autojump_clock):
    store = FakeStore()
    pipeline, source, send, receive = make(PipelineSettings(max_batch=100, max_delay=0.5, writers=1), [store])
    bodies = [b"a:PROVISIONING:1", b"a:STOPPED:9", b"a:RUNNING:5", b"b:RUNNING:2", b"a:STOPPED:9"]
    async with trio.open_nursery() as nursery:
        await nursery.start(pipeline.run, receive)
        for seq, body in enumerate(bodies, start=1):
            send.send_nowait(delivery(seq, body))
        await send.aclose()
    [(_, batch)] = store.committed
    # Newest by (event time, stream sequence): the replayed seq 5 beats seq 2.
    assert [(u.instance_id, u.status, u.stream_seq) for u in batch.updates] == [("a", "STOPPED", 5), ("b", "RUNNING", 4)]
    assert batch.superseded == 3
    assert sorted(source.acked_tokens()) == sorted(f"ack-{s}" for s in range(1, 6))


async def test_ack_only_after_commit(autojump_clock):
    store = FakeStore(delay=5.0)
    pipeline, source, send, receive = make(PipelineSettings(max_batch=10, max_delay=0.1, writers=1), [store])
    async with trio.open_nursery() as nursery:
        await nursery.start(pipeline.run, receive)
        start = trio.current_time()
        send.send_nowait(delivery(1, b"a:RUNNING:1"))
        await trio.sleep(4)
        assert source.acked == []
        await trio.sleep(2)
        assert [(round(t - start, 3), tok) for t, tok in source.acked] == [(5.0, "ack-1")]
        await send.aclose()


async def test_failing_store_pauses_intake_retries_with_backoff_and_loses_nothing(autojump_clock):
    store = FakeStore(failures=6)
    settings = PipelineSettings(max_batch=10, max_delay=0.05, writers=1, retry_initial=0.1, retry_max=1.0)
    pipeline, source, send, receive = make(settings, [store])
    async with trio.open_nursery() as nursery:
        await nursery.start(pipeline.run, receive)
        for seq in range(1, 1001):
            send.send_nowait(delivery(seq, f"i{seq % 50}:RUNNING:{seq}".encode()))
        await trio.sleep(0.5)
        # Stuck on the first batch: one in the writer, one waiting, one filling.
        assert source.acked == []
        taken = 1000 - receive.statistics().current_buffer_used
        assert taken <= 3 * settings.max_batch
        assert not pipeline.store_healthy
        await trio.sleep(10)
        await send.aclose()
    # Back-off doubles and is capped: 0.1, 0.2, 0.4, 0.8, 1.0, 1.0.
    assert store.attempts == 6 + len(store.committed)
    assert pipeline.store_healthy
    assert sorted(source.acked_tokens()) == sorted(f"ack-{s}" for s in range(1, 1001))
    assert len(source.acked_tokens()) == 1000  # each exactly once
    assert store.rows["i7"][2] == "RUNNING" and store.rows["i7"][1] == 957


async def test_backoff_schedule_is_exact(autojump_clock):
    store = FakeStore(failures=5)
    settings = PipelineSettings(max_batch=10, max_delay=0.0001, writers=1, retry_initial=0.1, retry_max=0.5)
    pipeline, _source, send, receive = make(settings, [store])
    async with trio.open_nursery() as nursery:
        await nursery.start(pipeline.run, receive)
        start = trio.current_time()
        send.send_nowait(delivery(1, b"a:RUNNING:1"))
        await send.aclose()
    [(committed_at, _)] = store.committed
    # Closing the channel flushes at once; then five back-offs, doubling, capped at 0.5.
    assert round(committed_at - start, 6) == round(0.1 + 0.2 + 0.4 + 0.5 + 0.5, 6)


async def test_drain_commits_and_acks_everything_received(autojump_clock):
    stores = [FakeStore(delay=0.2), FakeStore(delay=0.2)]
    pipeline, source, send, receive = make(PipelineSettings(max_batch=100, max_delay=30, writers=2), stores)
    async with trio.open_nursery() as nursery:
        await nursery.start(pipeline.run, receive)
        for seq in range(1, 251):
            send.send_nowait(delivery(seq, f"i{seq}:RUNNING:1".encode()))
        start = trio.current_time()
        await send.aclose()  # the source stops: no timer wait, flush now
        with trio.fail_after(2):
            await pipeline.drained.wait()
    assert trio.current_time() - start < 1
    assert len(source.acked_tokens()) == 250
    # Instances are split between the writers, never shared.
    ids = [{u.instance_id for _, b in s.committed for u in b.updates} for s in stores]
    assert ids[0] and ids[1] and not ids[0] & ids[1]


async def test_rejections_are_committed_then_acked_and_counted(autojump_clock):
    store = FakeStore()
    pipeline, source, send, receive = make(PipelineSettings(max_batch=10, max_delay=0.1, writers=1), [store])
    async with trio.open_nursery() as nursery:
        await nursery.start(pipeline.run, receive)
        send.send_nowait(delivery(1, b"garbage"))
        send.send_nowait(delivery(2, b"a:RUNNING:1"))
        await send.aclose()
    [(_, batch)] = store.committed
    assert [r.stream_seq for r in batch.rejections] == [1]
    assert sorted(source.acked_tokens()) == ["ack-1", "ack-2"]
    metrics = pipeline._metrics.registry
    assert metrics.get_sample_value("dcmstatus_events_rejected_total", {"reason": "malformed_json"}) == 1
    assert metrics.get_sample_value("dcmstatus_events_applied_total") == 1


async def test_grace_deadline_cancels_a_hung_store(autojump_clock):
    store = FakeStore(delay=1000)
    pipeline, source, send, receive = make(PipelineSettings(max_batch=10, max_delay=0.1, writers=1), [store])
    async with trio.open_nursery() as nursery:
        await nursery.start(pipeline.run, receive)
        send.send_nowait(delivery(1, b"a:RUNNING:1"))
        await trio.sleep(1)
        await send.aclose()
        with trio.move_on_after(10) as grace:
            await pipeline.drained.wait()
        assert grace.cancelled_caught
        nursery.cancel_scope.cancel()
    assert source.acked == []  # never committed, so never acked: NATS redelivers it


async def test_a_poison_event_is_isolated_and_dead_lettered_and_the_rest_commits(autojump_clock):
    store = FakeStore(refuse="poison")
    settings = PipelineSettings(max_batch=100, max_delay=0.1, writers=1, retry_initial=0.1, poison_attempts=3)
    pipeline, source, send, receive = make(settings, [store])
    async with trio.open_nursery() as nursery:
        await nursery.start(pipeline.run, receive)
        for seq in range(1, 41):
            send.send_nowait(delivery(seq, f"i{seq}:RUNNING:1".encode()))
        send.send_nowait(delivery(41, b"poison:RUNNING:1"))
        send.send_nowait(delivery(42, b"after:RUNNING:1"))
        await send.aclose()
    assert set(store.rows) == {f"i{s}" for s in range(1, 41)} | {"after"}
    [dead] = [r for _, b in store.committed for r in b.rejections]
    assert (dead.reason, dead.instance_id, dead.stream_seq) == ("invalid_data", "poison", 41)
    assert "trigger says no" in dead.detail
    # Every message acked once, the poison included: no redelivery loop.
    assert sorted(source.acked_tokens()) == sorted(f"ack-{s}" for s in range(1, 43))
    registry = pipeline._metrics.registry
    assert registry.get_sample_value("dcmstatus_events_rejected_total", {"reason": "invalid_data"}) == 1
    assert registry.get_sample_value("dcmstatus_events_applied_total") == 41


async def test_transient_errors_never_dead_letter(autojump_clock):
    store = FakeStore(failures=20)
    settings = PipelineSettings(max_batch=10, max_delay=0.1, writers=1, retry_initial=0.1, retry_max=0.2)
    pipeline, _source, send, receive = make(settings, [store])
    async with trio.open_nursery() as nursery:
        await nursery.start(pipeline.run, receive)
        send.send_nowait(delivery(1, b"a:RUNNING:1"))
        await send.aclose()
    assert store.rows["a"][2] == "RUNNING"
    assert not [r for _, b in store.committed for r in b.rejections]


async def test_a_refused_newest_event_falls_back_to_the_newest_valid_one_of_its_batch(autojump_clock):
    """The events a refused (poison) event superseded in its batch are acked
    with it: the newest of them must be applied, not silently dropped."""
    store = FakeStore(refuse_status="POISON")
    settings = PipelineSettings(max_batch=100, max_delay=0.1, writers=1, retry_initial=0.1, poison_attempts=2)
    pipeline, source, send, receive = make(settings, [store])
    bodies = [b"a:PROVISIONING:1", b"a:POISON:9", b"a:RUNNING:5", b"b:RUNNING:2", b"a:STOPPED:3"]
    for seq, body in enumerate(bodies, start=1):
        send.send_nowait(delivery(seq, body))  # one burst: one batch
    await send.aclose()
    await pipeline.run(receive)
    assert store.rows["a"][1:] == (3, "RUNNING"), "the newest valid event of a was not applied"
    assert store.rows["b"][2] == "RUNNING"
    [dead] = [r for _, b in store.committed for r in b.rejections]
    assert (dead.reason, dead.instance_id, dead.stream_seq) == ("invalid_data", "a", 2)
    assert sorted(source.acked_tokens()) == sorted(f"ack-{s}" for s in range(1, 6))
    # Each message counted once: 2 applied, 2 superseded (no-op), 1 rejected.
    registry = pipeline._metrics.registry
    assert registry.get_sample_value("dcmstatus_events_applied_total") == 2
    assert registry.get_sample_value("dcmstatus_events_noop_total") == 2
    assert registry.get_sample_value("dcmstatus_events_rejected_total", {"reason": "invalid_data"}) == 1


async def test_the_fallback_is_refused_too_then_the_next_older_one_applies(autojump_clock):
    store = FakeStore(refuse_status="POISON")
    settings = PipelineSettings(max_batch=100, max_delay=0.1, writers=1, retry_initial=0.1, poison_attempts=1)
    pipeline, source, send, receive = make(settings, [store])
    for seq, body in enumerate([b"a:RUNNING:1", b"a:POISON:3", b"a:POISON:2"], start=1):
        send.send_nowait(delivery(seq, body))
    await send.aclose()
    await pipeline.run(receive)
    assert store.rows["a"][1:] == (1, "RUNNING")
    dead = sorted(r.stream_seq for _, b in store.committed for r in b.rejections)
    assert dead == [2, 3]
    assert sorted(source.acked_tokens()) == ["ack-1", "ack-2", "ack-3"]
    registry = pipeline._metrics.registry
    assert registry.get_sample_value("dcmstatus_events_applied_total") == 1
    assert registry.get_sample_value("dcmstatus_events_noop_total") == 0


async def test_unreadable_deliveries_are_rejected_undecoded_and_acked_after_the_commit(autojump_clock):
    """A frame the source could only partly read is recorded as rejected
    (invalid_envelope) and acked like any other message, never decoded: its
    body would decode as a valid update here."""
    store = FakeStore()
    acked = []

    class Source:
        async def ack(self, tokens):
            assert store.committed, "acked before the commit"
            acked.extend(tokens)

    metrics = Metrics()
    pipeline = Pipeline(fake_decode, Source(), [store], metrics, PipelineSettings(max_batch=10, writers=1))
    send, receive = trio.open_memory_channel[Delivery](float("inf"))
    async with trio.open_nursery() as nursery:
        await nursery.start(pipeline.run, receive)
        send.send_nowait(Delivery("dcm.vm\\xff", None, b"i1:RUNNING:1", 1, 0, "ack-1", "the subject is not UTF-8"))
        send.send_nowait(delivery(2, b"i2:RUNNING:1"))
        await send.aclose()
    [rejection] = [r for _, b in store.committed for r in b.rejections]
    assert (rejection.reason, rejection.subject, rejection.stream_seq) == ("invalid_envelope", "dcm.vm\\xff", 1)
    assert rejection.detail == "unreadable frame: the subject is not UTF-8" and rejection.body == b"i1:RUNNING:1"
    assert set(store.rows) == {"i2"}
    assert sorted(acked) == ["ack-1", "ack-2"]
    assert metrics.registry.get_sample_value("dcmstatus_events_rejected_total", {"reason": "invalid_envelope"}) == 1
