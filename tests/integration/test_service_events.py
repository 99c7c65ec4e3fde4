"""End to end through a real `dcmstatus serve`: the clock-skew bound
(docs/events.md#time) and a configured service type whose name has '-'
(docs/statuses.md#adding-a-service-type-or-an-alias)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import nats
from prometheus_client.parser import text_string_to_metric_families
from test_service import create, publish_raw, start_service, status_of, wait_for

from dcmstatus.cli.publish import build_event

FAR_FUTURE = datetime(2999, 1, 1, tzinfo=UTC)


def publish(url: str, subject: str, body: bytes) -> datetime:
    """Publish through JetStream; return the stream's time of the message."""

    async def go() -> datetime:
        nc = await nats.connect(url)
        try:
            js = nc.jetstream()
            ack = await js.publish(subject, body)
            stored = await js.get_msg(ack.stream, ack.seq)
            assert stored.time is not None
            return stored.time
        finally:
            await nc.close()

    return asyncio.run(go())


def instance(svc, instance_id: str) -> dict:
    status, body = svc.http("GET", f"/api/v1/service-type-instances/{instance_id}")
    assert status == 200, body
    return body


def test_an_event_from_2999_gets_the_stream_time_and_does_not_pin_the_status(tmp_path, nats_url, database_url):
    svc = start_service(tmp_path, nats_url, database_url)
    try:
        create(svc, "skewed")
        stream_time = publish(svc.nats_url, "dcm.vm", build_event("vm", "skewed", "RUNNING", time=FAR_FUTURE))
        wait_for(lambda: status_of(svc, "skewed") == "RUNNING", "the 2999 event applied")
        assert datetime.fromisoformat(instance(svc, "skewed")["status_time"]) == stream_time
        assert svc.metric("dcmstatus_events_clock_skew_total") == 1
        wait_for(lambda: "reason=clock_skew" in svc.log(), "the clock-skew line")
        line = next(line for line in svc.log().splitlines() if "reason=clock_skew" in line)
        stream_text = stream_time.isoformat().replace("+00:00", "Z")
        for expected in ("instance_id=skewed", "claimed_time=2999-01-01T00:00:00Z", f"stream_time={stream_text}"):
            assert expected in line, line

        # A later real event: its time (now) is after the first one's stream
        # time, so it applies; with the claimed 2999 kept it never would.
        later = datetime.now(UTC)
        publish(svc.nats_url, "dcm.vm", build_event("vm", "skewed", "STOPPED", time=later))
        wait_for(lambda: status_of(svc, "skewed") == "STOPPED", "the later real event applied")
        assert datetime.fromisoformat(instance(svc, "skewed")["status_time"]) == later
        assert svc.metric("dcmstatus_events_clock_skew_total") == 1
    finally:
        assert svc.stop() == 0, svc.log()


def test_a_configured_hyphenated_type_works_end_to_end(tmp_path, nats_url, database_url):
    config = tmp_path / "dcmstatus.toml"
    config.write_text(
        "[service_types.three-tier-app-demo]\n"
        'statuses = ["PENDING", "RUNNING", "FAILED", "DELETED"]\n'
        'aliases = { Up = "RUNNING" }\n'
    )
    svc = start_service(tmp_path, nats_url, database_url, "--config", str(config))
    try:
        created = create(svc, "demo1", "three-tier-app-demo")
        assert created["service_type"] == "three-tier-app-demo"
        subject = "dcm.three-tier-app-demo"
        publish_raw(svc.nats_url, subject, [build_event("three-tier-app-demo", "demo1", "up")])
        wait_for(lambda: status_of(svc, "demo1") == "RUNNING", "the hyphenated type's event applied")

        status, page = svc.http("GET", "/api/v1/service-type-instances?service_type=three-tier-app-demo")
        assert status == 200 and [i["id"] for i in page["instances"]] == ["demo1"]

        publish_raw(svc.nats_url, subject, [build_event("three-tier-app-demo", "demo1", "FLYING")])
        wait_for(lambda: svc.metric("dcmstatus_events_rejected_total", 'reason="unknown_status"') == 1, "rejected")
        status, dead = svc.http("GET", "/api/v1/rejected-events")
        assert status == 200
        [rejected] = dead["rejected_events"]
        assert (rejected["service_type"], rejected["subject"]) == ("three-tier-app-demo", subject)
        assert status_of(svc, "demo1") == "RUNNING"

        # The whole exposition still parses: no service type became a broken label.
        _, text = svc.http("GET", "/metrics")
        names = {family.name for family in text_string_to_metric_families(text)}
        assert "dcmstatus_events_applied" in names
    finally:
        assert svc.stop() == 0, svc.log()
