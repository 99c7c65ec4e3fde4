"""The alert rules and the Grafana dashboard in deploy/monitoring name only
metrics a live `dcmstatus serve` exports on /metrics (docs/deploy.md#monitoring):
a renamed or removed metric fails here, not in an operator's Prometheus."""

from __future__ import annotations

import dataclasses

import pytest
from deploy_refs import EXTERNAL, exported_samples, metric_names, references, unexported
from test_service import start_service

from dcmstatus.config import ServeConfig


def test_the_rules_and_the_panels_name_only_metrics_the_service_exports(tmp_path, nats_url, database_url):
    service = start_service(tmp_path, nats_url, database_url)
    try:
        status, text = service.http("GET", "/metrics")
    finally:
        assert service.stop() == 0, service.log()
    assert status == 200 and isinstance(text, str)
    exported = exported_samples(text)

    # What the check relies on: counters are selected with _total, histograms
    # through _bucket/_sum/_count and never by their family name.
    assert {"dcmstatus_events_received_total", "dcmstatus_event_lag_seconds_bucket",
            "dcmstatus_event_lag_seconds_count", "dcmstatus_commit_duration_seconds_sum",
            "dcmstatus_consumer_pending_messages", "dcmstatus_watch_streams"} <= exported
    assert "dcmstatus_event_lag_seconds" not in exported
    assert "dcmstatus_events_received" not in exported
    wrong = metric_names(
        "rate(dcmstatus_events_received[5m]) + histogram_quantile(0.9, rate(dcmstatus_event_lag_seconds[5m])) + dcmstatus_nope"
    )
    assert wrong and not wrong & exported, "the check would not catch a misnamed metric"

    names = {name for _, _, name in references()}
    assert len(names) > 25, "the rules and panels name hardly any metric: is the regex picking them?"
    bad = unexported(exported)
    assert not bad, "named but not exported by dcmstatus serve:\n" + "\n".join(bad)
    # The external names are used (else drop them from EXTERNAL) and none of them is dcmstatus's.
    assert set(EXTERNAL) <= names
    assert not set(EXTERNAL) & exported


@pytest.mark.skipif("role" not in {f.name for f in dataclasses.fields(ServeConfig)}, reason="serve has no --role")
def test_api_and_consumer_replicas_together_export_what_the_rules_and_panels_name(tmp_path, nats_url, database_url):
    """The manifests run split roles (docs/deploy.md#roles): what one role
    does not export (a consumer has no watch streams), the other must."""
    exported: set[str] = set()
    for role in ("consumer", "api"):
        service = start_service(tmp_path, nats_url, database_url, "--role", role, name=role)
        try:
            status, text = service.http("GET", "/metrics")
        finally:
            assert service.stop() == 0, service.log()
        assert status == 200 and isinstance(text, str)
        exported |= exported_samples(text)
    bad = unexported(exported)
    assert not bad, "named but exported by neither an api nor a consumer replica:\n" + "\n".join(bad)
