"""The pipeline counts and logs the events whose time the decoder replaced by
the stream time (docs/events.md#time), once per burst, including those a
newer event in the same batch supersedes."""

from __future__ import annotations

import json
import logging

import trio

from dcmstatus.core.batching import WriteBatch
from dcmstatus.core.decoding import Decoder
from dcmstatus.core.model import BatchResult, Delivery
from dcmstatus.engine.logs import EventLog
from dcmstatus.engine.metrics import Metrics
from dcmstatus.engine.pipeline import Pipeline, PipelineSettings

STREAM_NS = 1_786_000_000_123_456_789  # 2026-08-06T07:06:40.123456789Z


class Store:
    def __init__(self) -> None:
        self.batches: list[WriteBatch] = []

    async def apply(self, batch: WriteBatch) -> BatchResult:
        self.batches.append(batch)
        return BatchResult(len(batch.updates), batch.superseded, ())


class Source:
    def __init__(self) -> None:
        self.acked: list[object] = []

    async def ack(self, tokens: list[object]) -> None:
        self.acked.extend(tokens)


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def event(instance: str, time: str) -> bytes:
    return json.dumps({
        "specversion": "1.0", "id": "e", "source": "dcm/providers/bad-clock", "type": "dcm.status.vm", "time": time,
        "data": {"id": instance, "status": "RUNNING"},
    }).encode()  # fmt: skip


async def test_replaced_event_times_are_counted_and_logged_with_both_times(autojump_clock):
    store, source, metrics = Store(), Source(), Metrics()
    logger = logging.getLogger("test.clock_skew")
    logger.propagate = False
    capture = Capture()
    logger.addHandler(capture)
    try:
        pipeline = Pipeline(
            Decoder(max_clock_skew=300).decode, source, [store], metrics,
            PipelineSettings(max_batch=100, writers=1), EventLog(logger),
        )  # fmt: skip
        send, receive = trio.open_memory_channel[Delivery](float("inf"))
        bodies = [
            event("vm-1", "2999-01-01T00:00:00Z"),  # skewed, then superseded in the batch
            event("vm-1", "2999-06-01T00:00:00Z"),  # skewed
            event("vm-2", "2026-08-06T07:07:00Z"),  # 20 s ahead: inside the bound
            event("vm-3", "2026-08-06T07:11:40.123457Z"),  # 1 µs beyond the bound
        ]
        for seq, body in enumerate(bodies, start=1):
            send.send_nowait(Delivery("dcm.vm", None, body, seq, STREAM_NS, seq))
        await send.aclose()
        await pipeline.run(receive)
    finally:
        logger.removeHandler(capture)

    assert metrics.registry.get_sample_value("dcmstatus_events_clock_skew_total") == 3
    assert sorted(source.acked) == [1, 2, 3, 4]
    [batch] = store.batches
    times = {u.instance_id: u.event_time.isoformat() for u in batch.updates}
    assert times == {
        "vm-1": "2026-08-06T07:06:40.123456+00:00",
        "vm-2": "2026-08-06T07:07:00+00:00",
        "vm-3": "2026-08-06T07:06:40.123456+00:00",
    }
    lines = [(r.instance_id, r.claimed_time, r.stream_time) for r in capture.records if r.reason == "clock_skew"]
    assert lines == [
        ("vm-1", "2999-01-01T00:00:00Z", "2026-08-06T07:06:40.123456Z"),
        ("vm-1", "2999-06-01T00:00:00Z", "2026-08-06T07:06:40.123456Z"),
        ("vm-3", "2026-08-06T07:11:40.123457Z", "2026-08-06T07:06:40.123456Z"),
    ]
