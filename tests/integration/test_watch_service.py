"""The watch stream of real `dcmstatus serve` processes (docs/changes.md#watch-stream):
events published on NATS arrive as `changed`, every replica streams every
replica's changes, `dcmstatus watch` resumes across a server restart, and a
client that does not read holds no growing buffer in the server."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import urlsplit

from sse_client import PATH, EventReader
from test_service import Running, publish, start_service, wait_for

from dcmstatus.cli.publish import build_event


def reader(service: Running, query: str = "") -> EventReader:
    address = urlsplit(service.http_url)
    stream = EventReader(address.hostname, address.port, query)
    assert stream.status == 200
    assert stream.frame()[0].startswith("id: ")  # serving: its "present" is fixed
    return stream


def create(service: Running, id_: str) -> None:
    status, body = service.http("POST", f"/api/v1/service-type-instances?id={id_}", {"service_type": "vm", "spec": {}})
    assert status == 201, body


def summary(changes: list[dict]) -> list[tuple]:
    return [(c["kind"], c["instance_id"], c["previous_status"], c["status"]) for c in changes]


def test_every_replica_streams_every_replicas_changes_and_a_duplicate_adds_none(tmp_path, nats_url, database_url):
    a = start_service(tmp_path, nats_url, database_url, name="a")
    b = start_service(tmp_path, nats_url, database_url, name="b")
    streams = [reader(a), reader(b)]
    try:
        create(a, "vm1")
        create(b, "vm2")
        body = build_event("vm", "vm1", "RUNNING", message="up")
        for _ in range(2):  # the same event twice: the second is a duplicate
            asyncio_publish(nats_url, body)
        publish(nats_url, "vm", "vm2", "RUNNING")  # after the duplicate on the stream
        expected = [
            ("created", "vm1", None, "PROVISIONING"),
            ("created", "vm2", None, "PROVISIONING"),
            ("changed", "vm1", "PROVISIONING", "RUNNING"),
            ("changed", "vm2", "PROVISIONING", "RUNNING"),
        ]
        seen = [stream.events(4) for stream in streams]
        assert [summary(s) for s in seen] == [expected, expected]
        assert seen[0] == seen[1]
        assert seen[0][2]["status_message"] == "up" and seen[0][2]["event_time"].endswith("Z")
    finally:
        for stream in streams:
            stream.close()
        assert a.stop() == 0 and b.stop() == 0


def asyncio_publish(nats_url: str, body: bytes) -> None:
    import asyncio

    from dcmstatus.cli.publish import publish_event

    asyncio.run(publish_event(nats_url, "dcm.vm", body))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Lines:
    """A subprocess's stdout, line by line, read in a thread."""

    def __init__(self, stream) -> None:
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream) -> None:
        for line in stream:
            self._lines.put(line)

    def take(self, n: int, timeout: float = 60) -> list[str]:
        return [self._lines.get(timeout=timeout) for _ in range(n)]

    def left(self) -> list[str]:
        out = []
        while not self._lines.empty():
            out.append(self._lines.get())
        return out


def test_watch_json_prints_the_changes_and_resumes_after_the_server_restarts(tmp_path, nats_url, database_url):
    port = str(_free_port())
    service = start_service(tmp_path, nats_url, database_url, "--http-port", port, name="svc")
    create(service, "vm1")  # before the watch, with --after 0 it is printed too
    watch = subprocess.Popen(
        [sys.executable, "-m", "dcmstatus", "watch", "--json", "--after", "0", "--api-url", service.http_url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    out = Lines(watch.stdout)
    try:
        create(service, "vm2")
        first = [json.loads(line) for line in out.take(2)]
        assert summary(first) == [("created", "vm1", None, "PROVISIONING"), ("created", "vm2", None, "PROVISIONING")]

        assert service.stop() == 0  # ends the stream; watch retries while nothing listens
        create_while_down = start_service(tmp_path, nats_url, database_url, "--http-port", port, name="svc")
        service = create_while_down
        create(service, "vm3")
        publish(nats_url, "vm", "vm2", "RUNNING", message="up")
        after = [json.loads(line) for line in out.take(2)]
        assert summary(after) == [("created", "vm3", None, "PROVISIONING"), ("changed", "vm2", "PROVISIONING", "RUNNING")]
        ids = [c["change_id"] for c in first + after]
        assert ids == sorted(set(ids))
    finally:
        watch.send_signal(signal.SIGINT)  # Ctrl-C
        code = watch.wait(30)
        err = watch.stderr.read()
        service.stop()
    assert code == 0, err
    assert "Traceback" not in err and "reconnecting" in err
    assert out.left() == []  # nothing repeated after the restart


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_client_that_does_not_read_holds_no_growing_buffer_in_the_server(tmp_path, nats_url, database_url):
    service = start_service(tmp_path, nats_url, database_url)
    address = urlsplit(service.http_url)
    rows, rounds, message_bytes = 500, 40, 5000  # 20 000 changes, ~100 MB of events
    service.http("GET", PATH)
    import psycopg

    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO service_type_instances (instance_id, service_type)"
            " SELECT 'slow' || g, 'vm' FROM generate_series(1, %s) AS g",
            (rows,),
        )
        start = conn.execute("SELECT max(change_id) FROM status_changes").fetchone()[0]
        # The stalled client: a small receive buffer, and it never reads.
        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect((address.hostname, address.port))
        stalled.sendall(
            f"GET {PATH}?after={start} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n".encode()
        )
        wait_for(lambda: service.metric("dcmstatus_watch_streams") == 1, "the stalled stream open")
        before = _rss_bytes(service.proc.pid)
        for n in range(rounds):
            conn.execute(
                "UPDATE service_type_instances SET status_message = repeat(%s, %s)", (str(n % 10), message_bytes)
            )
    # A client that reads gets all of it, so the server has been through the
    # whole feed while the stalled one still waits.
    follower = reader(service, f"?after={start}")
    try:
        for _ in range(rows * rounds):
            assert follower.event() is not None
    finally:
        follower.close()
    grown = _rss_bytes(service.proc.pid) - before
    produced = rows * rounds * message_bytes
    try:
        # A buffer per client would hold all of it (an unbounded one grew
        # ~176 MB here); RSS also moves with the allocator and with what the
        # reading follower's pages left behind (4-27 MB seen on a loaded machine).
        assert grown < produced / 2, f"the server grew by {grown} bytes while {produced} bytes of changes went out"
    finally:
        stalled.close()
        assert service.stop() == 0
