"""The Prometheus metrics of one dcmstatus process.

One `Metrics` object per service (not module globals) so tests and several
services in one process never share counters. The pipeline increments them
once per batch, never once per message: prometheus-client takes a lock per call.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .model import REJECTION_REASONS


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.events_received = Counter(
            "dcmstatus_events_received_total", "Messages taken from the stream", registry=r
        )
        self.events_applied = Counter(
            "dcmstatus_events_applied_total", "Events that changed an instance row", registry=r
        )
        self.events_noop = Counter(
            "dcmstatus_events_noop_total",
            "Events with no effect: replayed, duplicate, late, or superseded in their batch",
            registry=r,
        )
        self.events_unknown_instance = Counter(
            "dcmstatus_events_unknown_instance_total",
            "Valid events naming no instance of their service type",
            registry=r,
        )
        self.events_rejected = Counter(
            "dcmstatus_events_rejected_total", "Events rejected, by reason", ["reason"], registry=r
        )
        for reason in REJECTION_REASONS:
            self.events_rejected.labels(reason)  # export zeros: rate() needs the series
        self.batch_size = Histogram(
            "dcmstatus_batch_size_events",
            "Messages per committed batch",
            buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 5000),
            registry=r,
        )
        self.commit_seconds = Histogram(
            "dcmstatus_commit_duration_seconds",
            "Time to apply and commit one batch",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        self.in_flight = Gauge(
            "dcmstatus_in_flight_messages", "Messages received and not yet acknowledged", registry=r
        )
        self.db_errors = Counter(
            "dcmstatus_db_errors_total", "Failed batch transactions (retried)", registry=r
        )
        self.nats_reconnects = Counter(
            "dcmstatus_nats_reconnects_total", "Reconnections to the NATS server", registry=r
        )

    def totals(self) -> dict[str, int]:
        """Event counts so far, for the summary line logged on exit."""
        get = self.registry.get_sample_value
        rejected = sum(get("dcmstatus_events_rejected_total", {"reason": r}) or 0 for r in REJECTION_REASONS)
        return {
            "received": int(get("dcmstatus_events_received_total") or 0),
            "applied": int(get("dcmstatus_events_applied_total") or 0),
            "noop": int(get("dcmstatus_events_noop_total") or 0),
            "unknown": int(get("dcmstatus_events_unknown_instance_total") or 0),
            "rejected": int(rejected),
        }
