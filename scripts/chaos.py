#!/usr/bin/env python3
"""Chaos run: publish a status workload while injecting real faults, then prove
that nothing was lost and no status is wrong.

    .venv/bin/python scripts/chaos.py --instances 2000 --events 100 --faults 20

It starts its own embedded nats-server and PostgreSQL (dcmstatus.devtools.embedded)
under a temporary directory and its own `dcmstatus serve` subprocess(es), then:

1. creates the instances (rows in PROVISIONING) and builds the workload:
   `events` status events per instance with increasing event times, shuffled
   (random reordering), plus OSAC-style re-publishes (duplicates of earlier
   events) and a small share of bad events whose rejection reason the official
   Decoder predicts;
2. publishes it through JetStream (retrying what a fault interrupted) while a
   fault loop applies, at random intervals, one of: kill -9 of the service
   (then a restart), NATS restart (SIGTERM or SIGKILL; of every node on a
   cluster), PostgreSQL restart of the primary (fast shutdown or SIGKILL);
   with --nats-cluster N (a cluster of N nodes, dcmstatus.devtools.cluster,
   the stream with N replicas at most 3) also kill -9 or restart of one
   random node, the stream's leader included (nats_node_kill,
   nats_node_restart); with --pg-standby (a synchronous streaming standby)
   also pg_failover: kill -9 of the primary, promotion of the standby, the
   old primary re-attached as the new standby;
3. waits until the durable consumer has nothing pending and nothing unacked,
   stops the service with SIGTERM (it must exit 0), and compares every row with
   the newest event of its instance:
     lost  = rows whose newest event never got applied (older status_time),
     wrong = rows whose status differs from the newest event's status;
   and the dead letters with the predicted rejections.

Prints a summary table; exit code 0 when lost = wrong = 0 and every check
passed, 1 otherwise. The module is also the harness of tests/faults.
"""

from __future__ import annotations

import trio_asyncio  # noqa: F401  # isort: skip  # patches asyncio before psycopg binds it

import argparse
import asyncio
import collections
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import nats
import psycopg

from dcmstatus.adapters.nats.source import nats_servers
from dcmstatus.adapters.postgres.schema import migrate
from dcmstatus.core.catalog import Catalog
from dcmstatus.core.decoding import Decoder
from dcmstatus.core.model import StatusUpdate
from dcmstatus.devtools.cluster import NatsCluster, PgPair
from dcmstatus.devtools.embedded import EmbeddedNats, EmbeddedPostgres, create_database

T0 = datetime(2026, 4, 9, 13, 0, 0, tzinfo=UTC)
CREATED = T0 - timedelta(days=1)  # when the workload's instances were created
STREAM, DURABLE = "dcm-status", "dcmstatus"
_json = msgspec.json.Encoder()


# --------------------------------------------------------------- the service


class Serve:
    """A `dcmstatus serve` subprocess against given NATS and PostgreSQL URLs."""

    def __init__(self, workdir: Path, nats_url: str, database_url: str, *extra: str, name: str = "svc") -> None:
        self.workdir = Path(workdir)
        self.nats_url = nats_url
        self.database_url = database_url
        self.extra = list(extra)
        self.name = name
        self.proc: subprocess.Popen | None = None
        self.http_url = ""
        self.starts = 0
        self.log_path = self.workdir / f"{name}.log"
        self.logs: list[str] = []  # the log of each finished run

    def start(self, wait_healthy: bool = True, timeout: float = 60) -> Serve:
        data_dir = self.workdir / self.name
        data_dir.mkdir(parents=True, exist_ok=True)
        runtime = data_dir / "runtime.json"
        runtime.unlink(missing_ok=True)
        self.starts += 1
        self.log_path = self.workdir / f"{self.name}.{self.starts}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dcmstatus", "serve", "--nats-url", self.nats_url,
             "--database-url", self.database_url, "--http-port", "0", "--data-dir", str(data_dir), *self.extra],
            stdout=self.log_path.open("w"),
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            try:
                # serve writes runtime.json in place: it can be seen empty or half-written.
                self.http_url = json.loads(runtime.read_text())["http_url"]
                break
            except (OSError, ValueError, KeyError):
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"serve did not start:\n{self.log()[-3000:]}")
            time.sleep(0.05)
        if wait_healthy:
            wait_for(lambda: self.health()[0] == 200, f"{self.name} healthy", timeout)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def http(self, method: str, path: str, body: object | None = None, timeout: float = 10) -> tuple[int, object]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.http_url + path, data=data, method=method)
        request.add_header("content-type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                raw, status = response.read(), response.status
        except urllib.error.HTTPError as error:
            raw, status = error.read(), error.code
        except OSError as error:
            return 0, str(error)
        try:
            return status, json.loads(raw) if raw else None
        except ValueError:
            return status, raw.decode(errors="replace")

    def health(self, timeout: float = 5) -> tuple[int, object]:
        return self.http("GET", "/api/v1/health", timeout=timeout)

    def metrics(self) -> dict[str, float]:
        status, text = self.http("GET", "/metrics")
        if status != 200:
            raise AssertionError(f"/metrics answered {status}: {text}")
        values = {}
        for line in str(text).splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                values[key] = float(value)
        return values

    def metric(self, name: str, labels: str = "") -> float:
        key = f"{name}{{{labels}}}" if labels else name
        return self.metrics()[key]

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.logs.append(self.log())

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM and wait; returns the exit code (raises on timeout)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self.logs.append(self.log())
        return code

    def summary(self) -> dict[str, int]:
        """The counts of the `stopped: received=… applied=…` line of the last run."""
        for line in reversed(self.log().splitlines()):
            if "stopped:" in line:
                pairs = (part.split("=") for part in line.split("stopped:", 1)[1].split())
                return {key: int(value) for key, value in pairs}
        raise AssertionError(f"no summary line in the log:\n{self.log()[-3000:]}")

    def ensure_stopped(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait()


def rss_kib(pid: int) -> int:
    """Resident set size of a process in KiB (VmRSS of /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def wait_for(predicate, what: str, timeout: float = 60, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return
        except Exception:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# ------------------------------------------------------------------ workload


@dataclass
class Event:
    subject: str
    body: bytes
    headers: dict[str, str] | None = None


@dataclass
class Workload:
    """Events to publish, and what the database must hold afterwards."""

    instances: dict[str, str]  # instance id -> service type
    events: list[Event]
    expected: dict[str, tuple[str, datetime]]  # instance id -> (status, event time) of its newest event
    valid: int = 0
    duplicates: int = 0
    bad_by_reason: collections.Counter = field(default_factory=collections.Counter)


def event_body(service_type: str, instance_id: str, status: str, when: datetime, message: str = "") -> bytes:
    """A structured-mode CloudEvent shaped like OSAC's (the NATS subject as CE subject)."""
    return _json.encode({
        "specversion": "1.0",
        "id": str(uuid.uuid4()),
        "source": f"dcm/providers/chaos-{service_type}",
        "type": f"dcm.status.{service_type}",
        "subject": f"dcm.{service_type}",
        "datacontenttype": "application/json",
        "time": when.isoformat().replace("+00:00", "Z"),
        "data": {"id": instance_id, "status": status, "message": message},
    })  # fmt: skip


def bad_event(rng: random.Random, n: int) -> Event:
    """A small, unique bad event (its reason is predicted by the Decoder)."""
    kind = n % 5
    tag = f"bad-{n}-{uuid.uuid4().hex[:8]}"
    if kind == 0:
        return Event("dcm.vm", b'{"specversion":"1.0","id":"' + tag.encode() + b'",')  # truncated JSON
    if kind == 1:
        return Event("dcm.vm", event_body("vm", tag, "EXPLODED", T0))  # unknown status
    if kind == 2:
        return Event("dcm.toaster", event_body("toaster", tag, "RUNNING", T0))  # unknown service type
    if kind == 3:
        return Event("dcm.vm", event_body("vm", f"x'; DROP TABLE t;--{tag}", "RUNNING", T0))  # bad instance id
    return Event("dcm.cluster", b"\xff\xfe" + tag.encode())  # invalid UTF-8


def make_workload(
    instances: int,
    events: int,
    *,
    duplicate_rate: float = 0.2,
    bad_rate: float = 0.01,
    seed: int = 1,
    prefix: str = "i",
) -> Workload:
    """`instances` × `events` status events with increasing times per instance,
    shuffled; plus re-published duplicates and a few bad events."""
    rng = random.Random(seed)
    catalog = Catalog.default()
    types = ["vm", "container", "storage", "network", "cluster", "database"]
    statuses = {t: _canonical(catalog, t) for t in types}
    ids = {f"{prefix}{n:06d}": types[n % len(types)] for n in range(instances)}
    out: list[Event] = []
    expected: dict[str, tuple[str, datetime]] = {}
    for instance_id, service_type in ids.items():
        for k in range(events):
            when = T0 + timedelta(seconds=k, microseconds=rng.randrange(1_000_000))
            status = rng.choice(statuses[service_type])
            out.append(Event(f"dcm.{service_type}", event_body(service_type, instance_id, status, when, f"step {k}")))
            expected[instance_id] = (status, when)
    valid = len(out)
    rng.shuffle(out)
    # OSAC re-publishes what it already sent: duplicates anywhere after the original.
    duplicates = int(valid * duplicate_rate)
    for _ in range(duplicates):
        original = rng.randrange(len(out))
        out.insert(rng.randrange(original, len(out) + 1), out[original])
    workload = Workload(ids, out, expected, valid=valid, duplicates=duplicates)
    decoder = Decoder(catalog)
    for n in range(int(valid * bad_rate)):
        bad = bad_event(rng, n)
        decision = decoder.decode(bad.subject, bad.headers, bad.body, 1, 0)
        assert not isinstance(decision, StatusUpdate), bad
        workload.bad_by_reason[decision.reason] += 1
        out.insert(rng.randrange(len(out) + 1), bad)
    return workload


def _canonical(catalog: Catalog, service_type: str) -> list[str]:
    return sorted(set(catalog.status_lookup(service_type).values()))


# ---------------------------------------------------------------- publishing


async def publish_events(
    url: str,
    events: list[Event],
    *,
    window: int = 2000,
    rate: float = 0,
    progress: list[int] | None = None,
    deadline: float = 600,
) -> int:
    """Publish into the stream, confirmed: each event goes out with a reply
    subject (as JetStream publish does) and `window` at a time; whatever the
    stream did not confirm within a few seconds (a server restart, no
    responders yet) is published again, until every event is confirmed. At
    most `rate` events per second (0: as fast as it goes). A retry of a
    publish whose confirmation was lost stores a duplicate: harmless, as for
    OSAC's re-publishing. Returns how many publishes were retried."""
    nc = await nats.connect(
        nats_servers(url), max_reconnect_attempts=-1, reconnect_time_wait=0.2, connect_timeout=2,
        error_cb=_ignore, disconnected_cb=_ignore_cb, reconnected_cb=_ignore_cb,
    )  # fmt: skip
    inbox = nc.new_inbox()
    confirmed: set[int] = set()
    changed = asyncio.Event()

    async def on_reply(msg) -> None:
        # A PubAck is {"stream":…,"seq":…}; "no responders" (503) and API errors are not.
        if msg.headers and msg.headers.get("Status"):
            return
        if b'"seq"' in msg.data and b'"error"' not in msg.data:
            confirmed.add(int(msg.subject.rpartition(".")[2]))
            changed.set()

    await nc.subscribe(inbox + ".*", cb=on_reply, pending_msgs_limit=-1, pending_bytes_limit=-1)
    retried = 0
    began = time.monotonic()
    stop_at = began + deadline
    try:
        for start in range(0, len(events), window):
            if rate > 0:
                await asyncio.sleep(max(0.0, began + start / rate - time.monotonic()))
            todo = list(range(start, min(start + window, len(events))))
            while todo:
                if time.monotonic() > stop_at:
                    raise TimeoutError("publishing did not finish in time")
                try:
                    for i in todo:
                        e = events[i]
                        await nc.publish(e.subject, e.body, reply=f"{inbox}.{i}", headers=e.headers)
                    await nc.flush(timeout=5)
                except Exception:
                    pass
                wait_until = time.monotonic() + 3
                while time.monotonic() < wait_until and not all(i in confirmed for i in todo):
                    changed.clear()
                    try:
                        await asyncio.wait_for(changed.wait(), 0.2)
                    except TimeoutError:
                        pass
                todo = [i for i in todo if i not in confirmed]
                if todo:
                    retried += len(todo)
                    await asyncio.sleep(0.2)
            if progress is not None:
                progress[0] = min(start + window, len(events))
        return retried
    finally:
        await nc.close()


async def publish_core(url: str, events: list[Event], *, flush_every: int = 2000) -> None:
    """Core NATS publish in a tight loop (fast; only for fault-free phases)."""
    nc = await nats.connect(nats_servers(url), connect_timeout=5)
    try:
        for n, e in enumerate(events, 1):
            await nc.publish(e.subject, e.body, headers=e.headers)
            if n % flush_every == 0:
                await nc.flush(timeout=30)
        await nc.flush(timeout=30)
    finally:
        await nc.close()


def pub_frame(subject: bytes, body: bytes) -> bytes:
    """A core-NATS PUB protocol line with its payload, built by hand."""
    return b"PUB " + subject + b" %d\r\n" % len(body) + body + b"\r\n"


def hpub_frame(subject: bytes, header_block: bytes, body: bytes) -> bytes:
    """An HPUB (headers) protocol line with its payload, built by hand: the
    header block goes out as given, however broken."""
    sizes = b" %d %d\r\n" % (len(header_block), len(header_block) + len(body))
    return b"HPUB " + subject + sizes + header_block + body + b"\r\n"


def connect_frame(url: str) -> bytes:
    """The CONNECT line of a raw-socket client, with the credentials the URL
    carries as nats-py reads them: nats://TOKEN@host (the embedded server's
    token) as auth_token, nats://USER:PASS@host as user and pass."""
    from urllib.parse import unquote, urlsplit

    address = urlsplit(url)
    options: dict[str, object] = {"verbose": False, "pedantic": False, "headers": True, "protocol": 1}
    if address.username and address.password is not None:
        options.update(user=unquote(address.username), **{"pass": unquote(address.password)})
    elif address.username:
        options["auth_token"] = unquote(address.username)
    return b"CONNECT " + json.dumps(options).encode() + b"\r\n"


def publish_frames(url: str, frames: list[bytes], *, chunk: int = 1000) -> None:
    """Write hand-made protocol frames to nats-server over a raw TCP socket:
    what no client library sends (subjects that are not UTF-8, broken header
    blocks). Returns once the server answered a PING after them all."""
    import socket
    from urllib.parse import urlsplit

    address = urlsplit(url)
    with socket.create_connection((address.hostname, address.port), timeout=30) as sock:
        reader = sock.makefile("rb")
        reader.readline()  # INFO
        sock.sendall(connect_frame(url))
        for start in range(0, len(frames), chunk):
            sock.sendall(b"".join(frames[start : start + chunk]) + b"PING\r\n")
            while not (line := reader.readline()).startswith(b"PONG"):
                if not line or line.startswith(b"-ERR"):
                    raise AssertionError(f"nats-server refused a frame: {line!r}")


async def _ignore(exc: Exception) -> None:
    pass


async def _ignore_cb() -> None:
    pass


async def _js_call(url: str, what):
    nc = await nats.connect(nats_servers(url), connect_timeout=5, max_reconnect_attempts=0, allow_reconnect=False)
    try:
        return await what(nc.jetstream(timeout=5))
    finally:
        await nc.close()


def consumer_state(url: str, stream: str = STREAM, durable: str = DURABLE) -> dict:
    """num_pending (not yet delivered), num_ack_pending, ack floor and the stream's last sequence."""

    async def go(js):
        info = await js.consumer_info(stream, durable)
        sinfo = await js.stream_info(stream)
        return {
            "num_pending": info.num_pending,
            "num_ack_pending": info.num_ack_pending,
            "num_redelivered": info.num_redelivered,
            "ack_floor": info.ack_floor.stream_seq if info.ack_floor else 0,
            "last_seq": sinfo.state.last_seq,
            "messages": sinfo.state.messages,
            "replicas": sinfo.config.num_replicas or 1,
        }

    return asyncio.run(_js_call(url, go))


def all_acked(url: str) -> bool:
    state = consumer_state(url)
    return state["num_pending"] == 0 and state["num_ack_pending"] == 0 and state["ack_floor"] == state["last_seq"]


def delete_consumer(url: str, stream: str = STREAM, durable: str = DURABLE) -> None:
    asyncio.run(_js_call(url, lambda js: js.delete_consumer(stream, durable)))


# ------------------------------------------------------------------ database


def prepare_database(database_url: str, instances: dict[str, str]) -> None:
    """Apply the schema and create the instances (status PROVISIONING).

    The rows are dated before the workload's first event (T0): the
    predecessor guard ignores events older than the row they would update."""
    migrate(database_url)
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO service_type_instances (instance_id, service_type, created_at)"
            " SELECT *, %s FROM unnest(%b::text[], %b::text[])",
            (CREATED, list(instances), list(instances.values())),
        )


def database_state(database_url: str) -> dict[str, tuple[str, datetime]]:
    with psycopg.connect(database_url, connect_timeout=5) as conn:
        rows = conn.execute(
            "SELECT instance_id, status, CASE WHEN isfinite(status_time) THEN status_time END FROM service_type_instances"
        ).fetchall()
    return {r[0]: (r[1], r[2]) for r in rows}


def rejected_by_reason(database_url: str) -> dict[str, int]:
    """Distinct rejected bodies per reason (a redelivered rejection is recorded again)."""
    with psycopg.connect(database_url, connect_timeout=5) as conn:
        rows = conn.execute("SELECT reason, count(DISTINCT body) FROM rejected_events GROUP BY reason").fetchall()
    return dict(rows)


def compare(expected: dict[str, tuple[str, datetime]], actual: dict[str, tuple[str, datetime]]) -> tuple[list, list]:
    """(lost, wrong): rows whose newest event was not applied / whose status is not the newest's."""
    lost, wrong = [], []
    for instance_id, (status, when) in expected.items():
        have = actual.get(instance_id)
        if have is None or have[1] is None or have[1] < when:  # None: never updated
            lost.append((instance_id, status, when, have))
        elif have[0] != status or have[1] != when:
            wrong.append((instance_id, status, when, have))
    return lost, wrong


def converged(database_url: str, expected: dict) -> bool:
    lost, wrong = compare(expected, database_state(database_url))
    return not lost and not wrong


# ------------------------------------------------------------------ the run


FAULT_KINDS = ("kill9_service", "nats_restart_term", "nats_restart_kill", "pg_restart", "pg_kill")
CLUSTER_FAULT_KINDS = ("nats_node_kill", "nats_node_restart")  # with --nats-cluster
STANDBY_FAULT_KINDS = ("pg_failover",)  # with --pg-standby
ALL_FAULT_KINDS = FAULT_KINDS + CLUSTER_FAULT_KINDS + STANDBY_FAULT_KINDS


def fault_kinds(args: argparse.Namespace) -> list[str]:
    """The kinds this run injects: today's, plus the cluster's and the standby's when those run."""
    kinds = list(FAULT_KINDS)
    if args.nats_cluster:
        kinds += CLUSTER_FAULT_KINDS
    if args.pg_standby:
        kinds += STANDBY_FAULT_KINDS
    return [k for k in kinds if k not in set(args.no_fault or [])]


def fault_plan(rng: random.Random, kinds: list[str], faults: int, even: bool) -> list[str]:
    """Which kind each fault is: random picks, or (even) every kind in turn,
    shuffled round by round, so each kind comes up faults/len(kinds) times."""
    if not kinds:
        return []
    if not even:
        return [rng.choice(kinds) for _ in range(faults)]
    plan: list[str] = []
    while len(plan) < faults:
        round_ = list(kinds)
        rng.shuffle(round_)
        plan += round_
    return plan[:faults]


def run_chaos(args: argparse.Namespace, out=sys.stdout) -> int:
    rng = random.Random(args.seed)
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="dcmstatus-chaos-", dir=args.workdir))
    kinds = fault_kinds(args)
    if args.faults_per_kind:
        args.faults = args.faults_per_kind * len(kinds)
    plan = fault_plan(rng, kinds, args.faults, even=args.even or bool(args.faults_per_kind))
    injected: collections.Counter = collections.Counter()
    leaders_hit: collections.Counter = collections.Counter()  # node faults that hit the stream's leader
    checks: list[tuple[str, bool, str]] = []
    nats_server: EmbeddedNats | NatsCluster = (
        NatsCluster(workdir / "nats", size=args.nats_cluster) if args.nats_cluster else EmbeddedNats(workdir / "nats")
    )
    pg: EmbeddedPostgres | PgPair = (
        PgPair(workdir / "pg", fsync=args.pg_fsync) if args.pg_standby else EmbeddedPostgres(workdir / "pg", fsync=args.pg_fsync)
    )
    services: list[Serve] = []
    try:
        nats_server.start()
        pg.start()
        database_url = create_database(pg.url, "chaos")
        workload = make_workload(
            args.instances, args.events, duplicate_rate=args.duplicates, bad_rate=args.bad, seed=args.seed
        )
        prepare_database(database_url, workload.instances)
        extra = ["--ack-wait", str(args.ack_wait), "--grace-period", "10", "--log-level", args.serve_log_level]
        services = [Serve(workdir, nats_server.url, database_url, *extra, name=f"svc{n}") for n in range(args.replicas)]
        for svc in services:
            svc.start()
        log(out, f"workdir {workdir}; publishing {len(workload.events)} events "
                 f"({workload.valid} valid, {workload.duplicates} duplicates, {sum(workload.bad_by_reason.values())} bad) "
                 f"for {args.instances} instances; faults: {', '.join(kinds) or 'none'}")  # fmt: skip

        progress = [0]
        result: dict = {}

        def publisher():
            try:
                # A long workload at a bounded rate takes its own time, plus the timeout.
                deadline = args.timeout + (len(workload.events) / args.rate if args.rate > 0 else 0)
                result["retried"] = asyncio.run(
                    publish_events(nats_server.url, workload.events, rate=args.rate, progress=progress, deadline=deadline)
                )
            except BaseException as exc:
                result["error"] = exc

        thread = threading.Thread(target=publisher, daemon=True)
        thread.start()
        crashes = 0
        for faults_done, kind in enumerate(plan, 1):
            time.sleep(rng.uniform(args.min_interval, args.max_interval))
            crashes += restart_crashed(services, out)
            detail = inject(kind, rng, services, nats_server, pg)
            injected[kind] += 1
            if "(the stream leader)" in detail:
                leaders_hit[kind] += 1
            log(out, f"fault {faults_done}/{args.faults}: {kind}{detail} (published {progress[0]}/{len(workload.events)})")
        thread.join(args.timeout + (len(workload.events) / args.rate if args.rate > 0 else 0))
        if thread.is_alive() or "error" in result:
            raise AssertionError(f"publishing failed: {result.get('error', 'timed out')}")
        crashes += restart_crashed(services, out)
        # Everything published must end acknowledged (after its commit) ...
        try:
            wait_for(lambda: all_acked(nats_server.url), "every message acknowledged", args.timeout, interval=0.5)
            checks.append(("every message acknowledged", True, ""))
        except AssertionError as exc:
            checks.append(("every message acknowledged", False, f"{exc}: {consumer_state(nats_server.url)}"))
        crashes += restart_crashed(services, out)
        checks.append(("no service crashed", crashes == 0, f"{crashes} crashes (exit code != 0 without a kill)"))
        for svc in services:
            code = svc.terminate(60)
            checks.append((f"{svc.name} exits 0 on SIGTERM", code == 0, f"exit code {code}"))
        lost, wrong = compare(workload.expected, database_state(database_url))
        rejected = rejected_by_reason(database_url)
        for reason, count in sorted(workload.bad_by_reason.items()):
            have = rejected.get(reason, 0)
            checks.append((f"rejected {reason}: {have} of {count}", have == count, ""))
        state = consumer_state(nats_server.url)
        if args.nats_cluster:
            want = min(args.nats_cluster, 3)
            checks.append((f"the stream has {want} replicas", state["replicas"] == want, f"{state['replicas']} replicas"))
        wall = time.monotonic() - started
        ok = not lost and not wrong and all(passed for _, passed, _ in checks)
        rows = [
            ("events published", f"{len(workload.events)} ({workload.valid} valid, {workload.duplicates} duplicates, "
                                 f"{sum(workload.bad_by_reason.values())} bad; {result.get('retried', 0)} publishes retried)"),
            ("instances", str(args.instances)),
            ("servers", topology(args, state, pg)),
            ("stream messages", str(state["messages"])),
            ("faults injected", f"{sum(injected.values())}: " + ", ".join(f"{k}={v}" for k, v in sorted(injected.items()))),
            *([("stream leader hit", ", ".join(f"{k}={v}" for k, v in sorted(leaders_hit.items())) or "never")]
              if args.nats_cluster else []),
            ("service starts", ", ".join(f"{s.name}={s.starts}" for s in services) + f" ({crashes} after a crash)"),
            ("lost", str(len(lost))),
            ("wrong", str(len(wrong))),
            ("rejected by reason", ", ".join(f"{k}={v}" for k, v in sorted(rejected.items())) or "none"),
            ("wall time", f"{wall:.1f} s"),
            ("result", "PASS" if ok else "FAIL"),
        ]  # fmt: skip
        width = max(len(k) for k, _ in rows)
        print("\n" + "\n".join(f"{k:<{width}}  {v}" for k, v in rows), file=out)
        for name, passed, detail in checks:
            if not passed:
                print(f"FAILED: {name} {detail}", file=out)
        for item in (lost + wrong)[:10]:
            print(f"  expected {item[0]} = {item[1]} @ {item[2].isoformat()}, have {item[3]}", file=out)
        out.flush()
        if not ok:
            args.keep = True
        return 0 if ok else 1
    finally:
        for svc in services:
            svc.ensure_stopped()
        nats_server.stop()
        pg.stop()
        if args.keep:
            print(f"logs kept in {workdir}", file=out)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def restart_crashed(services: list[Serve], out) -> int:
    """Restart (and count) the services that died on their own."""
    crashed = 0
    for svc in services:
        if not svc.alive():
            crashed += 1
            tail = "\n".join(svc.log().splitlines()[-5:])
            log(out, f"{svc.name} CRASHED (exit code {svc.proc.returncode}):\n{tail}")
            svc.logs.append(svc.log())
            svc.start(wait_healthy=False)
    return crashed


def topology(args: argparse.Namespace, state: dict, pg: EmbeddedPostgres | PgPair) -> str:
    nats_part = (
        f"NATS cluster of {args.nats_cluster} (stream R{state['replicas']})" if args.nats_cluster else "one nats-server"
    )
    if isinstance(pg, PgPair):
        pg_part = f"PostgreSQL primary + synchronous standby ({pg.failovers} failovers)"
    else:
        pg_part = "one PostgreSQL"
    return f"{nats_part}; {pg_part}; {args.replicas} serve replicas"


def inject(
    kind: str,
    rng: random.Random,
    services: list[Serve],
    nats_server: EmbeddedNats | NatsCluster,
    pg: EmbeddedPostgres | PgPair,
) -> str:
    """Apply one fault and recover from it; returns a detail for the log."""
    primary = pg.primary if isinstance(pg, PgPair) else pg
    if kind == "kill9_service":
        svc = rng.choice(services)
        svc.kill9()
        time.sleep(rng.uniform(0, 0.5))
        svc.start(wait_healthy=False)
        return f" {svc.name}"
    if kind in ("nats_restart_term", "nats_restart_kill"):
        nodes = nats_server.nodes if isinstance(nats_server, NatsCluster) else [nats_server]
        for node in nodes:  # on a cluster, every node: the whole cluster restarts
            if kind == "nats_restart_term":
                node.stop()
            else:
                node.kill()
        if kind == "nats_restart_kill":
            time.sleep(rng.uniform(0, 0.5))
        nats_server.start()  # a cluster: every node, then until JetStream is current on each
        return ""
    if kind in ("nats_node_kill", "nats_node_restart"):
        assert isinstance(nats_server, NatsCluster), kind
        index = rng.randrange(nats_server.size)
        leader = nats_server.leader(STREAM)
        if kind == "nats_node_kill":
            nats_server.kill(index)
            time.sleep(rng.uniform(0, 1.0))
            nats_server.start_node(index)
        else:
            nats_server.restart_node(index)
        return f" n{index}" + (" (the stream leader)" if index == leader else "")
    if kind == "pg_restart":
        primary.stop()
        time.sleep(rng.uniform(0, 1.0))
        primary.start()
        return ""
    if kind == "pg_kill":
        primary.kill()
        time.sleep(rng.uniform(0, 1.0))
        primary.start()
        return ""
    if kind == "pg_failover":
        assert isinstance(pg, PgPair), kind
        new = pg.failover(rejoin=True)
        return f" pg{new.index} promoted"
    raise ValueError(kind)


def log(out, text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=out, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--instances", type=int, default=500, help="instances (rows) in the workload")
    p.add_argument("--events", type=int, default=20, help="status events per instance")
    p.add_argument("--duplicates", type=float, default=0.2, help="share of re-published duplicates (OSAC style)")
    p.add_argument("--bad", type=float, default=0.01, help="share of bad events (counted per rejection reason)")
    p.add_argument("--rate", type=float, default=2000, help="events published per second at most (0: unlimited)")
    p.add_argument("--faults", type=int, default=6, help="faults to inject")
    p.add_argument("--faults-per-kind", type=int, default=0, help="inject this many of every kind (overrides --faults)")
    p.add_argument("--even", action="store_true", help="every kind in turn (shuffled per round), not random picks")
    p.add_argument("--no-fault", action="append", choices=ALL_FAULT_KINDS, help="leave this kind of fault out")
    p.add_argument("--nats-cluster", type=int, default=0, metavar="N",
                   help="a NATS cluster of N nodes (0: one nats-server); adds nats_node_kill and nats_node_restart")
    p.add_argument("--pg-standby", action="store_true",
                   help="PostgreSQL with a synchronous streaming standby; adds pg_failover")
    p.add_argument("--min-interval", type=float, default=0.5, help="shortest pause between faults (s)")
    p.add_argument("--max-interval", type=float, default=3.0, help="longest pause between faults (s)")
    p.add_argument("--replicas", type=int, default=1, help="serve processes sharing the durable consumer")
    p.add_argument("--ack-wait", type=float, default=3, help="serve --ack-wait (s)")
    p.add_argument("--timeout", type=float, default=300, help="longest wait for publishing and for convergence (s)")
    p.add_argument("--seed", type=int, default=int(time.time()), help="random seed (printed; reuse to replay)")
    p.add_argument("--serve-log-level", default="WARNING", help="serve --log-level (DEBUG shows tracebacks)")
    p.add_argument("--pg-fsync", action="store_true", help="run PostgreSQL with fsync on")
    p.add_argument("--workdir", default=None, help="parent of the temporary working directory")
    p.add_argument("--keep", action="store_true", help="keep the working directory (always kept on failure)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(f"chaos seed {args.seed}", flush=True)
    return run_chaos(args)


if __name__ == "__main__":
    sys.exit(main())
