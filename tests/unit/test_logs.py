"""EventLog (rate limit and summaries, on an injected clock) and the log formats."""

import io
import json
import logging
from datetime import UTC, datetime

import pytest

from dcmstatus.core.batching import BatchBuilder
from dcmstatus.core.model import Rejection, StatusUpdate
from dcmstatus.engine.logs import EventLog, JsonFormatter, setup_logging


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self) -> list[str]:
        return [r.getMessage() for r in self.records]


@pytest.fixture
def capture():
    logger = logging.getLogger("test.events")
    logger.propagate = False
    handler = Capture()
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield logger, handler
    logger.removeHandler(handler)


def _rejection(reason: str, seq: int) -> Rejection:
    return Rejection(reason, "what was wrong", "dcm.vm", seq, None, b"", "vm", f"id{seq}")


def _update(instance_id: str, seq: int) -> StatusUpdate:
    return StatusUpdate(instance_id, "vm", "RUNNING", "", "sp", None, datetime(2026, 1, 1, tzinfo=UTC), seq)


def test_first_lines_per_reason_then_one_summary_per_interval(capture):
    logger, handler = capture
    clock = Clock()
    events = EventLog(logger, burst=3, interval=10.0, clock=clock)

    for seq in range(1, 1001):  # a storm of bad input
        events.rejected(_rejection("invalid_data", seq))
        clock.now += 0.001
    events.rejected(_rejection("too_large", 5000))
    messages = handler.messages()
    assert len(messages) == 4  # 3 invalid_data, 1 too_large; the rest counted
    assert messages[0] == (
        "rejected event: reason=invalid_data subject=dcm.vm seq=1 service_type=vm instance_id=id1: what was wrong"
    )
    record = handler.records[0]
    assert (record.reason, record.stream_seq, record.service_type, record.instance_id, record.subject) == (
        "invalid_data", 1, "vm", "id1", "dcm.vm",
    )

    clock.now = 1010.0  # 10 s after the start: the interval is over
    events.tick()
    assert handler.messages()[4:] == ["suppressed 997 event lines in the last 10s: invalid_data=997"]
    assert handler.records[4].suppressed == {"invalid_data": 997}

    # A new interval: its own burst again, and nothing to summarise when quiet.
    events.rejected(_rejection("invalid_data", 2000))
    assert len(handler.records) == 6 and handler.records[5].stream_seq == 2000
    clock.now += 10.0
    events.tick()
    assert len(handler.records) == 6


def test_unknown_instances_are_logged_from_the_batch_and_limited_too(capture):
    logger, handler = capture
    clock = Clock()
    events = EventLog(logger, burst=2, interval=10.0, clock=clock)
    builder = BatchBuilder(1)
    for n in range(5):
        builder.add(_update(f"u{n}", 10 + n), n)
    builder.add(_update("known", 20), 9)
    (batch,) = builder.take()

    events.unknown_instances(batch, ("u0", "u1", "u2", "u3", "u4"))
    events.rejected(_rejection("malformed_json", 30))
    records = handler.records
    assert [(r.instance_id, r.stream_seq, r.reason, r.service_type) for r in records[:2]] == [
        ("u0", 10, "unknown_instance", "vm"),
        ("u1", 11, "unknown_instance", "vm"),
    ]
    assert "instance_id=u0" in records[0].getMessage() and "seq=10" in records[0].getMessage()
    assert records[2].reason == "malformed_json"  # other reasons have their own burst

    events.unknown_instances(batch, ())  # nothing unknown: only a tick
    assert len(records) == 3
    clock.now += 3.5
    events.flush()  # e.g. at shutdown, before the interval is over
    assert handler.messages()[3] == "suppressed 3 event lines in the last 4s: unknown_instance=3"


def test_json_format_carries_the_event_fields(capture):
    logger, _ = capture
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    try:
        EventLog(logger, clock=Clock()).rejected(_rejection("unknown_status", 42))
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["level"] == "WARNING" and first["logger"] == "test.events"
    assert first["time"].endswith("Z")
    assert {k: first[k] for k in ("reason", "stream_seq", "service_type", "instance_id", "subject")} == {
        "reason": "unknown_status", "stream_seq": 42, "service_type": "vm", "instance_id": "id42", "subject": "dcm.vm",
    }
    assert first["message"].startswith("rejected event: reason=unknown_status")
    assert "ValueError: boom" in second["exception"]


def test_setup_logging_formats_and_levels():
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        out = io.StringIO()
        setup_logging("WARNING", "json", out)
        logging.getLogger("dcmstatus.x").info("hidden")
        logging.getLogger("dcmstatus.x").warning("shown %d", 1)
        (line,) = out.getvalue().splitlines()
        assert json.loads(line)["message"] == "shown 1"

        out = io.StringIO()
        setup_logging("DEBUG", "text", out)
        logging.getLogger("dcmstatus.x").debug("plain")
        assert out.getvalue().rstrip().endswith("DEBUG   dcmstatus.x: plain")
        with pytest.raises(ValueError, match="log format"):
            setup_logging("INFO", "xml")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def test_clock_skew_lines_name_the_instance_and_both_times_and_are_limited(capture):
    logger, handler = capture
    clock = Clock()
    events = EventLog(logger, burst=2, interval=10.0, clock=clock)
    stream_time = datetime(2026, 8, 6, 7, 6, 40, 123456, tzinfo=UTC)
    for seq in range(1, 6):
        update = StatusUpdate(
            f"vm-{seq}", "vm", "RUNNING", "", "dcm/providers/bad-clock", None, stream_time, seq, datetime(2999, 1, 1, tzinfo=UTC)
        )
        events.clock_skew(update)
    assert handler.messages()[0] == (
        "event time ahead of the stream, using the stream time: reason=clock_skew seq=1 service_type=vm "
        "instance_id=vm-1 provider=dcm/providers/bad-clock claimed_time=2999-01-01T00:00:00Z "
        "stream_time=2026-08-06T07:06:40.123456Z"
    )
    record = handler.records[0]
    assert (record.instance_id, record.claimed_time, record.stream_time, record.provider) == (
        "vm-1", "2999-01-01T00:00:00Z", "2026-08-06T07:06:40.123456Z", "dcm/providers/bad-clock",
    )
    assert len(handler.records) == 2
    events.flush()
    assert handler.messages()[2] == "suppressed 3 event lines in the last 0s: clock_skew=3"
