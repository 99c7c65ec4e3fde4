"""End to end: the real `dcmstatus serve` process against a real nats-server
and PostgreSQL, driven the way users and providers drive it (HTTP, NATS,
signals)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

import nats
import pytest

from dcmstatus.cli.publish import build_event, publish_event

# Event times are real ones, taken when each test starts (tests/conftest.py
# resets T0): the rows these tests create through the API are dated now, and
# the predecessor guard ignores events older than their row
# (docs/database.md#ordering-guard).
T0 = datetime.now(UTC)


class Running:
    """A `dcmstatus serve` subprocess and what it wrote to runtime.json."""

    def __init__(self, proc: subprocess.Popen, data_dir: Path, log_path: Path) -> None:
        self.proc = proc
        self.data_dir = data_dir
        self.log_path = log_path
        runtime = json.loads((data_dir / "runtime.json").read_text())
        self.http_url = runtime["http_url"]
        self.nats_url = runtime["nats_url"]

    def http(self, method: str, path: str, body: object | None = None) -> tuple[int, object]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.http_url + path, data=data, method=method)
        request.add_header("content-type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                raw = response.read()
                status = response.status
        except urllib.error.HTTPError as error:
            raw, status = error.read(), error.code
        if not raw:
            return status, None
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode()

    def metric(self, name: str, labels: str = "") -> float:
        _, text = self.http("GET", "/metrics")
        key = f"{name}{{{labels}}}" if labels else name
        for line in text.splitlines():
            if line.startswith(key + " "):
                return float(line.split()[-1])
        raise AssertionError(f"metric {key} not exported")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


def start_service(tmp_path: Path, nats_url: str, database_url: str, *extra: str, name: str = "svc") -> Running:
    data_dir = tmp_path / name
    data_dir.mkdir(exist_ok=True)
    runtime = data_dir / "runtime.json"
    runtime.unlink(missing_ok=True)
    log_path = data_dir / "serve.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dcmstatus", "serve", "--nats-url", nats_url, "--database-url", database_url,
         "--http-port", "0", "--data-dir", str(data_dir), *extra],
        stdout=log_path.open("w"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.monotonic() + 60
    while not runtime.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"serve did not start:\n{log_path.read_text()}")
        time.sleep(0.05)
    running = Running(proc, data_dir, log_path)
    wait_for(lambda: running.http("GET", "/api/v1/health")[0] == 200, "health 200")
    return running


def wait_for(predicate, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def publish(url: str, service_type: str, instance: str, status: str, second: float | None = None, **kw) -> int:
    time_ = None if second is None else T0 + timedelta(seconds=second)
    body = build_event(service_type, instance, status, time=time_, **kw)
    return asyncio.run(publish_event(url, f"dcm.{service_type}", body))


def publish_raw(url: str, subject: str, bodies: list[bytes], *, core: bool = False, headers=None) -> None:
    async def go():
        nc = await nats.connect(url)
        js = nc.jetstream()
        for body in bodies:
            if core:
                await nc.publish(subject, body, headers=headers)
            else:
                await js.publish(subject, body, headers=headers)
        await nc.flush()
        await nc.close()

    asyncio.run(go())


@pytest.fixture
def service(tmp_path, nats_url, database_url):
    running = start_service(tmp_path, nats_url, database_url)
    yield running
    assert running.stop() == 0, running.log()


def create(svc: Running, instance: str, service_type: str = "vm") -> dict:
    status, body = svc.http("POST", f"/api/v1/service-type-instances?id={instance}", {"service_type": service_type, "spec": {}})
    assert status == 201, body
    return body


def status_of(svc: Running, instance: str) -> str:
    return svc.http("GET", f"/api/v1/service-type-instances/{instance}")[1]["status"]


def test_create_publish_and_watch_the_status_change(service):
    assert create(service, "vm1")["status"] == "PROVISIONING"
    publish(service.nats_url, "vm", "vm1", "Running", message="VM is running")
    wait_for(lambda: status_of(service, "vm1") == "RUNNING", "vm1 RUNNING")
    _, instance = service.http("GET", "/api/v1/service-type-instances/vm1")
    assert instance["status_message"] == "VM is running"
    assert instance["provider_name"] == "dcm/providers/dcmstatus-cli"
    assert service.metric("dcmstatus_events_applied_total") == 1


def test_out_of_order_pair_keeps_the_newest(service):
    create(service, "vm2")
    publish(service.nats_url, "vm", "vm2", "STOPPED", second=20)
    publish(service.nats_url, "vm", "vm2", "RUNNING", second=10)  # older, arrives later
    wait_for(lambda: service.metric("dcmstatus_events_received_total") == 2, "both events")
    wait_for(lambda: service.metric("dcmstatus_events_noop_total") == 1, "the late one counted as no-op")
    assert status_of(service, "vm2") == "STOPPED"


def test_duplicate_is_a_noop(service):
    create(service, "vm3")
    body = build_event("vm", "vm3", "RUNNING", time=T0)
    publish_raw(service.nats_url, "dcm.vm", [body, body])
    wait_for(lambda: service.metric("dcmstatus_events_received_total") == 2, "both copies")
    wait_for(
        lambda: service.metric("dcmstatus_events_applied_total") + service.metric("dcmstatus_events_noop_total") == 2,
        "both committed",
    )
    assert service.metric("dcmstatus_events_applied_total") == 1
    assert status_of(service, "vm3") == "RUNNING"


def test_unknown_instance_is_counted_and_logged(service):
    publish(service.nats_url, "vm", "ghost", "RUNNING")
    wait_for(lambda: service.metric("dcmstatus_events_unknown_instance_total") == 1, "unknown counted")
    wait_for(lambda: "ghost" in service.log(), "warning logged")
    assert "WARNING" in service.log()


def test_malformed_messages_then_a_valid_one(service):
    create(service, "c1", "container")
    publish_raw(
        service.nats_url,
        "dcm.container",
        [b"not json", b"[1,2]", b'{"specversion":"0.3","id":"x","source":"s","type":"t"}', b"\xff\xfe"],
    )
    publish(service.nats_url, "container", "c1", "RUNNING")
    wait_for(lambda: status_of(service, "c1") == "RUNNING", "valid event applied after the bad ones")
    assert service.metric("dcmstatus_events_rejected_total", 'reason="unsupported_specversion"') == 1
    total = sum(
        service.metric("dcmstatus_events_rejected_total", f'reason="{r}"')
        for r in ("malformed_json", "invalid_envelope", "unsupported_specversion")
    )
    assert total == 4
    status, body = service.http("GET", "/api/v1/rejected-events")
    assert status == 200 and len(body["rejected_events"]) == 4
    assert service.proc.poll() is None


def test_core_nats_publish_lands(service):
    create(service, "n1", "network")
    body = build_event("network", "n1", "READY")
    publish_raw(service.nats_url, "dcm.network", [body], core=True)
    wait_for(lambda: status_of(service, "n1") == "READY", "core-NATS event applied")


def test_sigterm_with_backlog_exits_0_and_nothing_is_reapplied(tmp_path, nats_url, database_url):
    first = start_service(tmp_path, nats_url, database_url, "--ack-wait", "3", name="first")
    for i in range(20):
        create(first, f"b{i}")
    events = 5000
    bodies = [
        build_event("vm", f"b{i % 20}", "RUNNING" if i % 2 else "STOPPED", time=T0 + timedelta(milliseconds=i))
        for i in range(events)
    ]
    publish_raw(first.nats_url, "dcm.vm", bodies)
    assert first.stop() == 0, first.log()
    taken_by_first = summary(first)["received"]
    second = start_service(tmp_path, nats_url, database_url, "--ack-wait", "3", name="second")
    try:
        wait_for(lambda: second.metric("dcmstatus_events_received_total") >= events - taken_by_first, "the rest")
        time.sleep(4)  # past ack_wait: anything the first took but did not ack would be back by now
        final = {f"b{i}": status_of(second, f"b{i}") for i in range(20)}
    finally:
        assert second.stop() == 0, second.log()
    # Each event was taken exactly once across both runs: what the first
    # committed was acked (not redelivered), and nothing was skipped.
    assert taken_by_first + summary(second)["received"] == events
    newest = {f"b{i % 20}": ("RUNNING" if i % 2 else "STOPPED") for i in range(events)}
    assert final == newest


def summary(svc: Running) -> dict[str, int]:
    """The counts of the `stopped:` line serve logs on exit."""
    for line in reversed(svc.log().splitlines()):
        if "stopped:" in line:
            pairs = (part.split("=") for part in line.split("stopped:", 1)[1].split())
            return {key: int(value) for key, value in pairs}
    raise AssertionError(f"no summary line in the log:\n{svc.log()}")


def test_nats_server_restart_mid_stream_loses_nothing(tmp_path, nats_server, database_url):
    svc = start_service(tmp_path, nats_server.url, database_url, "--ack-wait", "3")
    try:
        for i in range(10):
            create(svc, f"r{i}")
        newest = {}
        for round_ in range(2):
            bodies = []
            for i in range(1000):
                n = round_ * 1000 + i
                status = ("RUNNING", "STOPPED", "PAUSED")[n % 3]
                bodies.append(build_event("vm", f"r{n % 10}", status, time=T0 + timedelta(milliseconds=n)))
                newest[f"r{n % 10}"] = status
            publish_raw(svc.nats_url, "dcm.vm", bodies)
            if round_ == 0:
                nats_server.restart()
        wait_for(lambda: all(status_of(svc, k) == v for k, v in newest.items()), "newest statuses", timeout=60)
        wait_for(lambda: svc.http("GET", "/api/v1/health")[0] == 200, "healthy again")
        assert svc.metric("dcmstatus_nats_reconnects_total") >= 1
    finally:
        assert svc.stop() == 0, svc.log()


def test_page_tokens_survive_a_restart_and_are_refused_by_another_secret(tmp_path, nats_url, database_url):
    list_path = "/api/v1/service-type-instances?max_page_size=1"
    first = start_service(tmp_path, nats_url, database_url)
    try:
        create(first, "pt1")
        create(first, "pt2")
        _, page = first.http("GET", list_path)
        token = page["next_page_token"]
    finally:
        assert first.stop() == 0, first.log()
    key_file = first.data_dir / "page-token.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600

    again = start_service(tmp_path, nats_url, database_url)  # same data dir: the key file is reused
    try:
        status, page = again.http("GET", f"{list_path}&page_token={token}")
        assert status == 200 and [i["id"] for i in page["instances"]] == ["pt2"], page
    finally:
        assert again.stop() == 0, again.log()

    elsewhere = start_service(tmp_path, nats_url, database_url, name="other")  # its own key file
    try:
        status, problem = elsewhere.http("GET", f"{list_path}&page_token={token}")
        assert status == 400 and "page_token is invalid" in problem["detail"], problem
    finally:
        assert elsewhere.stop() == 0, elsewhere.log()


def test_unusable_page_token_secret_stops_serve_before_it_starts_anything(tmp_path):
    (tmp_path / "page-token.key").write_text("\n")
    proc = subprocess.run(
        [sys.executable, "-m", "dcmstatus", "serve", "--nats-url", "nats://127.0.0.1:9",
         "--database-url", "postgresql://nobody@127.0.0.1:9/none", "--data-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "page-token.key is empty: delete it to have a new one made" in proc.stderr


# --- DCM fit: parked events, the predecessor guard, the stream DCM already has


def test_a_status_that_beats_its_instance_is_applied_when_the_instance_is_created(service):
    publish(service.nats_url, "vm", "vm-early", "RUNNING", 0, message="first word")
    wait_for(lambda: service.metric("dcmstatus_events_parked_total") == 1, "the event parked")
    assert service.metric("dcmstatus_events_unknown_instance_total") == 1  # still a counted no-op
    time.sleep(2)  # DCM writes the row a little later
    created = create(service, "vm-early")
    assert (created["status"], created["status_message"]) == ("RUNNING", "first word")
    assert service.metric("dcmstatus_parked_applied_total") == 1


def test_a_replay_after_the_id_is_recreated_leaves_the_new_instance_alone(tmp_path, nats_url, database_url):
    svc = start_service(tmp_path, nats_url, database_url, "--max-clock-skew", "1")
    try:
        create(svc, "vm-again")
        publish(svc.nats_url, "vm", "vm-again", "RUNNING")  # dated now
        wait_for(lambda: status_of(svc, "vm-again") == "RUNNING", "the first instance RUNNING")
        time.sleep(2)  # more than the skew: the next row is younger than every event so far
        assert svc.http("DELETE", "/api/v1/service-type-instances/vm-again")[0] == 204
        create(svc, "vm-again")
        received = svc.metric("dcmstatus_events_received_total")

        async def delete_consumer():
            nc = await nats.connect(svc.nats_url)
            await nc.jetstream().delete_consumer("dcm-status", "dcmstatus")
            await nc.close()

        # A recreated consumer delivers the stream from its start: the replay.
        asyncio.run(delete_consumer())
        wait_for(lambda: svc.metric("dcmstatus_events_received_total") > received, "the replay", timeout=60)
        wait_for(lambda: svc.metric("dcmstatus_in_flight_messages") == 0, "the replay acked")
        assert status_of(svc, "vm-again") == "PROVISIONING"
    finally:
        assert svc.stop() == 0, svc.log()


def test_serve_consumes_from_a_stream_of_another_name_that_dcm_made(tmp_path, nats_url, database_url):
    async def dcm_makes_its_stream():
        nc = await nats.connect(nats_url)
        await nc.jetstream().add_stream(name="dcm-control-plane", subjects=["dcm.*"])
        await nc.close()

    async def stream_names():
        nc = await nats.connect(nats_url)
        try:
            return [s.config.name for s in await nc.jetstream().streams_info()]
        finally:
            await nc.close()

    asyncio.run(dcm_makes_its_stream())
    svc = start_service(tmp_path, nats_url, database_url)
    try:
        create(svc, "vm-bound")
        publish(svc.nats_url, "vm", "vm-bound", "RUNNING", 0)
        wait_for(lambda: status_of(svc, "vm-bound") == "RUNNING", "the event applied from DCM's stream")
        # No stream of its own for the events; the change events have theirs (docs/changes.md).
        assert sorted(asyncio.run(stream_names())) == ["dcm-control-plane", "dcmstatus-changes"]
        assert "bound to the existing stream dcm-control-plane" in svc.log()
    finally:
        assert svc.stop() == 0, svc.log()
