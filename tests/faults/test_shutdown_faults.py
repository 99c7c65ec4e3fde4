"""Stopping under faults, with the real `dcmstatus serve` process: a second
SIGTERM during the drain, and a database that stops answering (SIGSTOP, a
black hole: connections stay open, nothing comes back). Time bounds are
timeouts only, never performance assertions."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import chaos
import psycopg
from chaos import wait_for

from dcmstatus.devtools.embedded import create_database


def processes_of(data_dir: Path) -> list[tuple[int, str]]:
    """Live processes whose command line names `data_dir` (the embedded servers')."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if str(data_dir) in cmdline and state not in ("Z", "X"):
            found.append((int(entry.name), cmdline))
    return found


def signal_postgres(postmaster: int, sig: int) -> None:
    """Signal the postmaster and each of its children: PostgreSQL puts every
    backend in a process group of its own, so killpg() would reach none."""
    children = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == postmaster:
                children.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    for pid in [postmaster, *children]:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def received(http_url: str) -> float:
    with urllib.request.urlopen(http_url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    [line] = [line for line in text.splitlines() if line.startswith("dcmstatus_events_received_total ")]
    return float(line.split()[-1])


def slow_updates(database_url: str, instances: dict[str, str], seconds_per_row: float) -> None:
    """Make every status UPDATE take a while: a drain then takes long."""
    chaos.prepare_database(database_url, instances)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            f"""CREATE FUNCTION slow_update() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN PERFORM pg_sleep({seconds_per_row}); RETURN NEW; END $$"""
        )
        conn.execute(
            "CREATE TRIGGER slow_update BEFORE UPDATE ON service_type_instances"
            " FOR EACH ROW EXECUTE FUNCTION slow_update()"
        )


def test_second_sigterm_during_the_drain_stops_at_once_and_leaves_no_server_behind(pg_data_dir):
    data_dir = pg_data_dir / "svc"
    log_path = pg_data_dir / "serve.log"
    grace = 300  # a drain this long would outlast every timeout below
    proc = subprocess.Popen(
        [sys.executable, "-m", "dcmstatus", "serve", "--data-dir", str(data_dir), "--http-port", "0",
         "--nats-port", "0", "--writers", "1", "--batch-size", "50", "--grace-period", str(grace)],
        stdout=log_path.open("w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip

    def log() -> str:
        return log_path.read_text(errors="replace")

    try:
        wait_for(lambda: (data_dir / "runtime.json").exists() or proc.poll() is not None, "serve running", 120)
        assert proc.poll() is None, log()
        runtime = json.loads((data_dir / "runtime.json").read_text())
        assert len(processes_of(data_dir)) >= 2, "the embedded servers are not found by their data dir"
        workload = chaos.make_workload(200, 10, seed=12, bad_rate=0, duplicate_rate=0)
        slow_updates(runtime["database_url"], workload.instances, 0.02)  # ~1 s per batch of 50
        asyncio.run(chaos.publish_events(runtime["nats_url"], workload.events))

        wait_for(lambda: received(runtime["http_url"]) >= 100, "a backlog being written", 60)
        proc.send_signal(signal.SIGTERM)
        wait_for(lambda: "stopping: finishing in-flight work" in log(), "the drain began", 30)
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        code = proc.wait(60)  # a timeout only: the grace period would be 300 s
        print(f"exited {code} {time.monotonic() - t0:.1f}s after the second SIGTERM")
        assert code == 0, log()[-3000:]
        text = log()
        left = re.search(r"stopping at once \(second signal\): (\d+) received messages left unacknowledged", text)
        assert left, text[-3000:]
        print(left.group(0))
        assert int(left.group(1)) > 0, "nothing was in flight: the second signal did not land during the drain"
        assert processes_of(data_dir) == [], f"servers left running: {processes_of(data_dir)}"
        assert "postgres stopped" in text and "nats stopped" in text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid, _ in processes_of(data_dir):  # orphans of a failed run: leave nothing behind
            os.kill(pid, signal.SIGKILL)


def test_black_holed_database_health_answers_and_sigterm_exits_within_the_grace_period(
    tmp_path, nats_url, pg_server, serve
):
    """SIGSTOP on the PostgreSQL server: its connections stay open and
    nothing answers (no error, no timeout from TCP)."""
    database_url = create_database(pg_server.url, f"faults_{uuid.uuid4().hex[:8]}")
    workload = chaos.make_workload(50, 4, seed=13, bad_rate=0)
    chaos.prepare_database(database_url, workload.instances)
    grace = 3
    svc = serve(nats_url, database_url, "--grace-period", str(grace), "--writers", "1")
    half = len(workload.events) // 2
    asyncio.run(chaos.publish_events(nats_url, workload.events[:half]))
    wait_for(lambda: chaos.all_acked(nats_url), "the first half written: the writer has its connection", 30)
    signal_postgres(pg_server.pid, signal.SIGSTOP)
    try:
        asyncio.run(chaos.publish_events(nats_url, workload.events[half:]))
        wait_for(lambda: svc.metric("dcmstatus_events_received_total") > half, "events taken in", 30)
        # The next ping goes unanswered: within its 2 s deadline (plus the
        # second between pings) health says so (docs/operations.md#health).
        wait_for(lambda: svc.health(timeout=15)[0] == 503, "health 503 once the ping is overdue", 5)
        for _ in range(3):
            status, body = svc.health(timeout=15)
            assert status == 503, f"health did not answer within its deadline: {body}"
            assert "unreachable" in str(body), body
        t0 = time.monotonic()
        code = svc.terminate(timeout=grace + 20)  # a timeout only
        print(f"exited {code} {time.monotonic() - t0:.1f}s after SIGTERM (grace {grace}s)")
        assert code == 0, svc.log()[-3000:]
        assert "grace period over" in svc.log()
    finally:
        signal_postgres(pg_server.pid, signal.SIGCONT)
