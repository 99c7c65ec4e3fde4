"""Start-up under faults, with the real `dcmstatus serve` process: PostgreSQL
or NATS unreachable when the service starts is awaited under one policy
(health 503 naming what is awaited, one log line per try) until
--startup-timeout; a malformed URL or a taken HTTP port is a configuration
error (exit 2) naming the option. Time bounds are timeouts only."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from chaos import wait_for

from dcmstatus.devtools.embedded import create_database, free_port


class Starting:
    """A serve process on a known HTTP port, watched before it is ready."""

    def __init__(self, tmp_path: Path, nats_url: str, database_url: str, *extra: str) -> None:
        self.port = free_port()
        self.data_dir = tmp_path / f"svc-{uuid.uuid4().hex[:6]}"
        self.log_path = self.data_dir.with_suffix(".log")
        self.data_dir.mkdir()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dcmstatus", "serve", "--nats-url", nats_url, "--database-url", database_url,
             "--http-port", str(self.port), "--data-dir", str(self.data_dir), *extra],
            stdout=self.log_path.open("w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip

    def health(self) -> tuple[int, object]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/v1/health", timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())
        except OSError as error:
            return 0, str(error)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def starting(tmp_path):
    started: list[Starting] = []

    def start(nats_url: str, database_url: str, *extra: str) -> Starting:
        started.append(Starting(tmp_path, nats_url, database_url, *extra))
        return started[-1]

    yield start
    for svc in started:
        svc.kill()


def unreachable_nats_url() -> str:
    return f"nats://127.0.0.1:{free_port()}"  # nothing listens there


def unreachable_database_url() -> str:
    return f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"


def awaiting(svc: Starting, what: str) -> bool:
    status, body = svc.health()
    # The kind only: /health answers without a token, so no address in it.
    return status == 503 and body["components"].get("startup") == f"waiting for {what}" if status else False


@pytest.mark.parametrize("down", ["postgres", "nats"])
def test_a_dependency_down_at_startup_is_awaited_then_used(tmp_path, pg_server, nats_server, starting, down):
    database_url = create_database(pg_server.url, f"startup_{uuid.uuid4().hex[:8]}")
    server, what = (pg_server, "PostgreSQL") if down == "postgres" else (nats_server, "NATS")
    server.stop()
    svc = starting(nats_server.url, database_url)
    try:
        # HTTP is up before the dependency: health says what start-up waits for.
        wait_for(lambda: awaiting(svc, what), f"health 503 naming {what}", 60)
        wait_for(lambda: svc.log().count(f"waiting for {what} at") >= 2, "a log line per try", 60)
    finally:
        server.start()
    wait_for(lambda: svc.health()[0] == 200, "healthy once the dependency is up", 60)
    line = next(line for line in svc.log().splitlines() if f"waiting for {what} at" in line)
    assert "try 1 failed" in line and "next try in" in line and "giving up in" in line, line
    assert (svc.data_dir / "runtime.json").exists()
    assert svc.terminate() == 0, svc.log()


@pytest.mark.parametrize("down", ["postgres", "nats"])
def test_a_dependency_unreachable_past_the_startup_timeout_exits_1(nats_url, database_url, starting, down):
    if down == "postgres":
        svc, what = starting(nats_url, unreachable_database_url(), "--startup-timeout", "3"), "PostgreSQL at"
    else:
        secret_url = unreachable_nats_url().replace("nats://", "nats://s3cret-token@")
        svc, what = starting(secret_url, database_url, "--startup-timeout", "3"), "NATS at nats://***@"
    assert svc.proc.wait(60) == 1, svc.log()
    assert "s3cret" not in svc.log()
    last = svc.log().strip().splitlines()[-2:]
    assert any(what in line and "--startup-timeout 3s" in line for line in last), svc.log()[-2000:]


def test_sigterm_while_awaiting_a_dependency_exits_0(starting):
    svc = starting(unreachable_nats_url(), unreachable_database_url(), "--startup-timeout", "0")
    wait_for(lambda: awaiting(svc, "PostgreSQL"), "awaiting PostgreSQL", 60)
    assert svc.terminate() == 0, svc.log()
    assert "stopped during start-up" in svc.log()


def test_a_list_of_nats_servers_is_used_as_a_list(nats_url, database_url, starting):
    svc = starting(f"{unreachable_nats_url()}, {nats_url}", database_url)
    wait_for(lambda: svc.health()[0] == 200, "healthy through the live server of the list", 60)
    assert svc.terminate() == 0, svc.log()


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--nats-url", "nats://127.0.0.1:4222,nats://other:port"),
        ("--nats-url", "http://127.0.0.1:4222"),
        ("--database-url", "postgresql://127.0.0.1:5432/db?nosuch=1"),
        ("--database-url", "not a url"),
        ("--database-url", "postgresql://127.0.0.1:http/db"),
    ],
)
def test_a_malformed_url_is_a_configuration_error_naming_the_option(starting, option, value):
    urls = {"--nats-url": unreachable_nats_url(), "--database-url": unreachable_database_url(), option: value}
    svc = starting(urls["--nats-url"], urls["--database-url"])
    assert svc.proc.wait(30) == 2, svc.log()
    assert f"dcmstatus serve: {option} " in svc.log(), svc.log()
    assert "waiting for" not in svc.log()


def test_an_http_port_taken_names_the_port_and_the_option(tmp_path, starting):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        svc = starting(unreachable_nats_url(), unreachable_database_url(), "--http-port", str(port))
        assert svc.proc.wait(30) == 2, svc.log()
    assert f"cannot listen on 127.0.0.1:{port}" in svc.log() and "--http-port" in svc.log(), svc.log()


def test_the_startup_timeout_is_an_option_declared_once(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "dcmstatus", "config", "--json"], capture_output=True, text=True,
        env={**os.environ, "DCMSTATUS_STARTUP_TIMEOUT": "7"}, check=True,
    )  # fmt: skip
    assert json.loads(out.stdout)["startup_timeout"] == 7.0
    help_text = subprocess.run(
        [sys.executable, "-m", "dcmstatus", "serve", "--help"], capture_output=True, text=True
    ).stdout
    assert "--startup-timeout" in help_text and "0 waits forever" in help_text


def test_stream_replicas_a_single_server_cannot_hold_is_a_configuration_error(nats_url, database_url, starting):
    svc = starting(nats_url, database_url, "--stream-replicas", "3")
    assert svc.proc.wait(60) == 2, svc.log()
    assert "--stream-replicas 3: the NATS server is not part of a cluster" in svc.log(), svc.log()
    assert "waiting for" not in svc.log()
