"""`dcmstatus serve --role` (docs/operations.md#roles), real processes on real
servers: an api replica sees every change a consumer replica makes (watch
stream and GET) without a NATS connection of its own; a consumer replica
serves only health and metrics; health reports what each role runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from sse_client import EventReader
from test_service import Running, publish, wait_for

# Nothing listens here: an api replica given it must still come up healthy,
# which it can only if it never connects to NATS.
DEAD_NATS = "nats://127.0.0.1:9"



def start_role(tmp_path: Path, name: str, *args: str, env: dict[str, str] | None = None) -> Running:
    """A `dcmstatus serve` with exactly these options (no --nats-url unless given)."""
    data_dir = tmp_path / name
    data_dir.mkdir(exist_ok=True)
    log_path = data_dir / "serve.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dcmstatus", "serve", "--http-port", "0", "--data-dir", str(data_dir), *args],
        stdout=log_path.open("w"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )
    deadline = time.monotonic() + 60
    while not (data_dir / "runtime.json").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"serve --role did not start:\n{log_path.read_text()}")
        time.sleep(0.05)
    running = Running(proc, data_dir, log_path)
    wait_for(lambda: running.http("GET", "/api/v1/health")[0] == 200, f"{name}: health 200")
    return running


def raw(service: Running, method: str, path: str) -> tuple[int, str, bytes]:
    request = urllib.request.Request(service.http_url + path, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers["content-type"], response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["content-type"], error.read()


def test_an_api_replica_sees_every_change_a_consumer_replica_makes(tmp_path, nats_url, database_url):
    consumer = start_role(tmp_path, "consumer", "--role", "consumer", "--nats-url", nats_url, "--database-url", database_url)
    # Given a NATS URL nothing answers at: it is ignored (and said so), never dialled.
    api = start_role(tmp_path, "api", "--role", "api", "--database-url", database_url, "--nats-url", DEAD_NATS)
    address = urlsplit(api.http_url)
    stream = EventReader(address.hostname, address.port)
    try:
        assert stream.status == 200
        assert stream.frame()[0].startswith("id: ")
        ids = [f"vm{i}" for i in range(20)]
        for id_ in ids:
            status, body = api.http("POST", f"/api/v1/service-type-instances?id={id_}", {"service_type": "vm", "spec": {}})
            assert status == 201, body
        # Each instance changes twice; the consumer replica applies them.
        for second, status in ((1, "Running"), (2, "Stopped")):
            for id_ in ids:
                publish(nats_url, "vm", id_, status, second=second)
        seen = stream.events(len(ids) * 3)
        created = [(c["instance_id"], c["status"]) for c in seen if c["kind"] == "created"]
        changed = [(c["instance_id"], c["previous_status"], c["status"]) for c in seen if c["kind"] == "changed"]
        assert created == [(id_, "PROVISIONING") for id_ in ids]
        assert sorted(changed) == sorted(
            [(id_, "PROVISIONING", "RUNNING") for id_ in ids] + [(id_, "RUNNING", "STOPPED") for id_ in ids]
        )
        for id_ in ids:  # and every row, read through the api replica
            status, body = api.http("GET", f"/api/v1/service-type-instances/{id_}")
            assert status == 200 and body["status"] == "STOPPED", body
        assert consumer.metric("dcmstatus_events_applied_total") == 2 * len(ids)
        assert api.metric("dcmstatus_events_received_total") == 0  # it consumes nothing
        assert "--role api does not use --nats-url (flag): ignored" in api.log()
        assert "NATS" not in api.log().replace("--nats-url", "")
    finally:
        stream.close()
        assert api.stop() == 0, api.log()
        assert consumer.stop() == 0, consumer.log()


def test_a_consumer_replica_serves_only_health_and_metrics(tmp_path, nats_url, database_url):
    consumer = start_role(
        tmp_path, "consumer", "--role", "consumer", "--nats-url", nats_url, "--database-url", database_url,
        env={"DCMSTATUS_API_TOKEN": "a-token-the-consumer-ignores"},
    )
    try:
        for path in ("/api/v1/service-type-instances", "/api/v1/status-changes", "/api/v1/rejected-events",
                     "/api/v1/openapi.json", "/", "/api/v1/service-type-instances/vm1"):
            status, content_type, body = raw(consumer, "GET", path)
            assert status == 404, (path, status)
            assert content_type == "application/problem+json"
            problem = json.loads(body)
            assert problem["status"] == 404
            assert "--role consumer" in problem["detail"] and "role api or all" in problem["detail"], problem
        status, _, body = raw(consumer, "POST", "/api/v1/service-type-instances?id=vm1")
        assert status == 404 and "--role consumer" in json.loads(body)["detail"]
        # The token is no concern of a consumer: health and metrics answer without one.
        status, _, _ = raw(consumer, "POST", "/api/v1/health")
        assert status == 405
        status, _, body = raw(consumer, "GET", "/metrics")
        assert status == 200 and b"dcmstatus_events_received_total" in body
        assert "--role consumer does not use DCMSTATUS_API_TOKEN (env DCMSTATUS_API_TOKEN): ignored" in consumer.log()
        # And it consumes: a status for a row made directly in the database lands.
        import psycopg

        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO service_type_instances (instance_id, service_type, created_at) "
                "VALUES ('vm1', 'vm', now() - interval '1 hour')"
            )
        publish(nats_url, "vm", "vm1", "Running")
        wait_for(lambda: consumer.metric("dcmstatus_events_applied_total") == 1, "the event applied")
    finally:
        assert consumer.stop() == 0, consumer.log()


def test_health_reports_what_each_role_runs(tmp_path, nats_url, database_url):
    replicas = {
        "all": start_role(tmp_path, "all", "--nats-url", nats_url, "--database-url", database_url),
        "consumer": start_role(tmp_path, "consumer", "--role", "consumer", "--nats-url", nats_url, "--database-url", database_url),
        "api": start_role(tmp_path, "api", "--role", "api", "--database-url", database_url),
    }
    try:
        health = {role: r.http("GET", "/api/v1/health")[1] for role, r in replicas.items()}
        for role, body in health.items():
            assert body["status"] == "ok" and body["role"] == role, body
        consumer_components = {"database", "nats", "consumer", "changes"}
        assert set(health["all"]["components"]) == consumer_components
        assert set(health["consumer"]["components"]) == consumer_components
        assert health["consumer"]["components"]["nats"] == "connected"
        assert health["api"]["components"] == {"database": "reachable", "notifications": "listening"}
        runtime = json.loads((replicas["api"].data_dir / "runtime.json").read_text())
        assert runtime["role"] == "api" and runtime["nats_url"] is None
    finally:
        for r in replicas.values():
            assert r.stop() == 0, r.log()


def test_a_role_without_the_servers_it_needs_is_refused(tmp_path):
    for args, missing in ((["--role", "consumer"], "--nats-url and --database-url"),
                          (["--role", "api"], "--database-url"),
                          (["--role", "consumer", "--database-url", "postgresql://localhost/x"], "--nats-url")):
        done = subprocess.run(
            [sys.executable, "-m", "dcmstatus", "serve", "--data-dir", str(tmp_path), *args],
            capture_output=True, text=True, timeout=60,
        )
        assert done.returncode == 2, done.stderr
        assert f"--role {args[1]} needs {missing}" in done.stderr
    assert not (tmp_path / "runtime.json").exists()


def test_serve_help_teaches_the_roles():
    done = subprocess.run([sys.executable, "-m", "dcmstatus", "serve", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert "--role {all,consumer,api}" in done.stdout
    assert "roles (--role, docs/operations.md#roles):" in done.stdout
    for role in ("all", "consumer", "api"):
        assert f"\n  {role} " in done.stdout
