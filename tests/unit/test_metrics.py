"""Metrics that are more than a counter: the bulk event-lag histogram and the
consumer gauges, read back through the Prometheus text exposition."""

from datetime import UTC, datetime, timedelta

from nats.js.api import ConsumerInfo
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dcmstatus.core.batching import BatchBuilder
from dcmstatus.core.model import BatchResult, Rejection, StatusUpdate
from dcmstatus.engine.metrics import LAG_BUCKETS, Metrics

COMMIT = datetime(2026, 4, 9, 13, 0, 0, tzinfo=UTC)


def _update(instance_id: str, lag: float, seq: int) -> StatusUpdate:
    return StatusUpdate(instance_id, "vm", "RUNNING", "", "sp", None, COMMIT - timedelta(seconds=lag), seq)


def _samples(metrics: Metrics, name: str) -> dict[tuple, float]:
    text = generate_latest(metrics.registry).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith(name):
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_event_lag_histogram_counts_known_instances_per_bucket():
    metrics = Metrics()
    builder = BatchBuilder(1)
    for n, lag in enumerate([0.001, 0.0049, 0.3, 7.0, 7.0, 100_000.0]):
        builder.add(_update(f"i{n}", lag, n + 1), n)
    builder.add(_update("gone", 2.0, 99), 99)
    builder.add(Rejection("too_large", "big", "dcm.vm", 100, None, b""), 100)
    (batch,) = builder.take()
    metrics.observe_batch(batch, BatchResult(applied=6, stale=0, unknown=("gone",)), COMMIT)

    s = _samples(metrics, "dcmstatus_event_lag_seconds")

    def bucket(le: str) -> float:
        return s[("dcmstatus_event_lag_seconds_bucket", (("le", le),))]

    assert bucket("0.005") == 2  # bounds are upper bounds (le)
    assert bucket("0.25") == 2
    assert bucket("0.5") == 3
    assert bucket("5.0") == 3  # the unknown instance (2 s) is not counted
    assert bucket("10.0") == 5
    assert bucket("21600.0") == 5
    assert bucket("+Inf") == 6
    assert s[("dcmstatus_event_lag_seconds_count", ())] == 6
    assert abs(s[("dcmstatus_event_lag_seconds_sum", ())] - 100_014.3059) < 1e-4
    assert len([k for k in s if k[0].endswith("_bucket")]) == len(LAG_BUCKETS) + 1


def test_event_lag_of_a_future_event_is_zero_and_rejection_only_batches_are_skipped():
    metrics = Metrics()
    builder = BatchBuilder(1)
    builder.add(_update("a", -30.0, 1), 1)  # a provider clock ahead of ours
    (batch,) = builder.take()
    metrics.observe_batch(batch, BatchResult(1, 0, ()), COMMIT)
    builder.add(Rejection("too_large", "big", "dcm.vm", 2, None, b""), 2)
    (batch,) = builder.take()
    metrics.observe_batch(batch, BatchResult(0, 0, ()))
    s = _samples(metrics, "dcmstatus_event_lag_seconds")
    assert s[("dcmstatus_event_lag_seconds_bucket", (("le", "0.005"),))] == 1
    assert s[("dcmstatus_event_lag_seconds_count", ())] == 1


def test_consumer_gauges_from_consumer_info():
    metrics = Metrics()
    info = ConsumerInfo.from_response(
        {
            "stream_name": "dcm-status",
            "name": "dcmstatus",
            "config": {"durable_name": "dcmstatus"},
            "num_pending": 1234,
            "num_ack_pending": 56,
            "num_redelivered": 7,
            "num_waiting": 1,
            "created": "2026-04-09T13:00:00Z",
        }
    )
    metrics.observe_consumer(info)
    s = {k: v for k, v in _samples(metrics, "dcmstatus_consumer_").items() if k[0].endswith("_messages")}
    assert s == {
        ("dcmstatus_consumer_pending_messages", ()): 1234,
        ("dcmstatus_consumer_ack_pending_messages", ()): 56,
        ("dcmstatus_consumer_redelivered_messages", ()): 7,
    }


def test_stall_metrics_are_exported_from_the_start():
    # Alerting on them needs the series before the first stall.
    s = _samples(Metrics(), "dcmstatus_consumer_")
    assert s[("dcmstatus_consumer_stalled", ())] == 0
    assert s[("dcmstatus_consumer_resets_total", ())] == 0
