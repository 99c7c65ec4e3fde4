"""`dcmstatus serve` with its embedded servers keeps other local users out:
both servers refuse a client without their generated secret, the secrets and
runtime.json are the owner's alone (0600), nothing prints the secrets, and
the other commands (`publish`, `instances`, `migrate`) still reach the
servers through runtime.json."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import nats
import nats.errors
import psycopg
import pytest

import dcmstatus.cli.commands as cli


@pytest.fixture
def embedded_serve(pg_data_dir: Path):
    """A `dcmstatus serve` with no URLs: it starts its own servers under the data dir."""
    data_dir = pg_data_dir / "data"  # root-safe: PostgreSQL runs as another user
    log_path = pg_data_dir / "serve.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dcmstatus", "serve", "--data-dir", str(data_dir), "--http-port", "0", "--nats-port", "0"],
        stdout=log_path.open("w"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    runtime = data_dir / "runtime.json"
    deadline = time.monotonic() + 120
    while not runtime.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"serve did not start:\n{log_path.read_text()}")
        time.sleep(0.05)
    try:
        yield data_dir, json.loads(runtime.read_text()), log_path
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log_path.read_text()


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


async def _nats_connect(url: str) -> None:
    nc = await nats.connect(url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=5)
    await nc.close()


def test_embedded_servers_refuse_clients_without_the_generated_secrets(embedded_serve):
    data_dir, runtime, log_path = embedded_serve
    nats_url, database_url = urlsplit(runtime["nats_url"]), urlsplit(runtime["database_url"])
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        asyncio.run(_nats_connect(f"nats://{nats_url.hostname}:{nats_url.port}"))
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(f"postgresql://postgres@{database_url.hostname}:{database_url.port}/postgres", connect_timeout=5)

    # What runtime.json holds gets in: it is what the other commands use.
    asyncio.run(_nats_connect(runtime["nats_url"]))
    with psycopg.connect(runtime["database_url"]) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)

    for private in ("runtime.json", "nats.token", "nats.conf", "postgres.password"):
        assert _mode(data_dir / private) == 0o600, private
    token, password = nats_url.username, database_url.password
    assert token == (data_dir / "nats.token").read_text().strip()
    assert password == (data_dir / "postgres.password").read_text().strip()
    output = log_path.read_text()
    assert "dcmstatus is running" in output
    assert token not in output and password not in output


def test_publish_instances_and_migrate_work_through_runtime_json(embedded_serve, capsys):
    data_dir, runtime, _ = embedded_serve
    request = urllib.request.Request(
        runtime["http_url"] + "/api/v1/service-type-instances?id=vm1",
        data=json.dumps({"service_type": "vm", "spec": {}}).encode(),
        headers={"content-type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 201

    argv = ["publish", "--data-dir", str(data_dir), "--service-type", "vm", "--instance", "vm1", "--status", "RUNNING"]
    assert cli.main(argv) == 0
    assert "published RUNNING" in capsys.readouterr().out

    deadline = time.monotonic() + 30
    while True:
        assert cli.main(["instances", "get", "vm1", "--data-dir", str(data_dir), "--json"]) == 0
        if json.loads(capsys.readouterr().out)["status"] == "RUNNING":
            break
        assert time.monotonic() < deadline, "the published status never arrived"
        time.sleep(0.1)

    assert cli.main(["migrate", "--data-dir", str(data_dir)]) == 0
    assert "schema is already current" in capsys.readouterr().out
