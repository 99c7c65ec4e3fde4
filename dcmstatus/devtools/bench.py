"""`dcmstatus bench` (also scripts/bench.py): measures the pipeline and the
limits around it in ONE run on this machine, because absolute numbers vary
between machines and only ratios travel (docs/performance.md).

Parts (`--parts`, docs/performance.md#parts):
- drain: events published while the service is stopped, then the time from
  consumer start to everything committed and acked, over `--instances`;
- feed: the same drain with the change relay off (`--no-change-events`);
- scale: the same drain over `--instances-large` instances;
- ceilings: consume-only (NATS → decode → ack, no database) and write-only
  (the same batched statements straight into PostgreSQL);
- reference: one autocommit UPDATE and one ack per event, in order;
- latency: at a fixed offered rate, publish → committed (a bench-only trigger
  NOTIFYs at commit), → Server-Sent Event received, → change event on NATS;
- memory: peak RSS of the service during a large backlog drain;
- duplicates: draining re-published same-status events vs real changes;
- api: GET one instance and /health at N keep-alive clients, and a drain
  quiet vs under that load, the API quiet vs during the drain.

Each part reports the CPU seconds per event of the service process,
nats-server and PostgreSQL (every process of the server), read from /proc
through psutil; the zero-cost-consumer limit follows from the servers' share.
A part that fails is reported with its reason and the others still run.

Backlogs are published with JetStream publish and a bounded window of acks
outstanding, re-sending what was refused or not acknowledged: core-NATS
publishing at full speed loses messages, and a bench must not.

It starts its own servers (embedded) unless given URLs, and works on its own
databases, its own stream/subjects (`dcmbench.*`) and its own changes stream
(`dcmbench-changes.*`), never on dcm.* or the service's default change feed.
"""

from __future__ import annotations

import trio_asyncio  # isort: skip  # before psycopg (docs/architecture.md#import-order)

import argparse
import asyncio
import json
import os
import random
import select
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec
import nats
import nats.js.errors
import psycopg
import trio

from dcmstatus.adapters.nats.source import JetStreamSource, NatsSettings, asyncio_exception_handler
from dcmstatus.adapters.postgres.schema import migrate
from dcmstatus.adapters.postgres.writer import StatusStore
from dcmstatus.core.batching import BatchBuilder, WriteBatch
from dcmstatus.core.catalog import Catalog
from dcmstatus.core.decoding import Decoder
from dcmstatus.core.model import BatchResult, StatusUpdate
from dcmstatus.devtools.bench_options import add_arguments
from dcmstatus.devtools.embedded import EmbeddedNats, EmbeddedPostgres, create_database, drop_database, free_port
from dcmstatus.engine.metrics import Metrics
from dcmstatus.engine.pipeline import Pipeline, PipelineSettings

STREAM = "dcmstatus-bench"
PREFIX = "dcmbench"
# The service's change events go to a stream of the bench's own, deleted before
# every start: each part's fresh database numbers its changes from 1 again, and
# the stream's duplicate window would drop them as re-publishes.
CHANGES_STREAM = "dcmstatus-bench-changes"
CHANGES_PREFIX = "dcmbench-changes"
T0 = datetime(2026, 1, 1, tzinfo=UTC)

# (service type, share of instances, statuses providers report, source) — the
# shapes of today's providers: kubevirt's mixed-case phases, ACM's aliases
# (docs/statuses.md#aliases), networks' outputs.
SHAPES = [
    ("vm", 0.4, ["Pending", "Scheduled", "Running", "Succeeded", "Failed"], "kubevirt.localhost"),
    ("container", 0.2, ["PENDING", "RUNNING", "FAILED", "UNKNOWN"], "dcm/providers/k8s-container-sp"),
    ("cluster", 0.2, ["PENDING", "PROVISIONING", "READY", "UNAVAILABLE"], "dcm/providers/acm-cluster-sp"),
    ("storage", 0.1, ["PROVISIONING", "RUNNING", "FAILED"], "dcm/providers/k8s-storage-sp"),
    ("network", 0.1, ["PENDING", "READY"], "dcm/providers/env-agent"),
]


@dataclass
class Part:
    key: str  # stable, for --json readers: drain, drain_feed_off, drain_large, ...
    name: str
    events: int = 0
    seconds: float | None = None
    rate: float | None = None  # events/s (requests/s for the API parts)
    # CPU µs per event (per request for the API parts) of each process, the
    # zero-cost-consumer limit, and why a figure is absent (docs/performance.md#cpu-columns).
    cpu: dict[str, Any] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # why the part could not run; its figures are then absent


@dataclass
class Workload:
    instances: list[tuple[str, str]]  # (id, service type)
    messages: list[tuple[str, bytes]]  # (subject, body)
    expected: dict[str, str]  # newest canonical status per instance


def make_workload(events: int, instances: int, duplicate_ratio: float, seed: int = 7) -> Workload:
    """Realistic provider bodies; each event newer than the last, so the
    newest event per instance is its last one."""
    rng = random.Random(seed)
    catalog = Catalog.default()
    ids: list[tuple[str, str]] = []
    for service_type, share, _, _ in SHAPES:
        ids += [(f"{service_type}-{i:07d}", service_type) for i in range(int(instances * share))]
    shapes = {s[0]: s for s in SHAPES}
    last: dict[str, str] = {}
    expected: dict[str, str] = {}
    messages = []
    for n in range(events):
        instance, service_type = ids[rng.randrange(len(ids))]
        _, _, statuses, source = shapes[service_type]
        previous = last.get(instance)
        if previous is not None and rng.random() < duplicate_ratio:
            status = previous  # OSAC-style re-publish of an unchanged status
        else:
            status = rng.choice([s for s in statuses if s != previous])
        last[instance] = status
        canonical = catalog.canonical_status(service_type, status)
        assert canonical is not None, f"{status!r} is one of the {service_type} statuses"
        expected[instance] = canonical
        messages.append((f"{PREFIX}.{service_type}", _body(service_type, instance, status, source, n)))
    return Workload(ids, messages, expected)


def _body(service_type: str, instance: str, status: str, source: str, n: int, message: str | None = None) -> bytes:
    when = (T0 + timedelta(milliseconds=n)).isoformat().replace("+00:00", "Z")
    data: dict = {"id": instance, "status": status}
    if service_type == "vm":
        data["timestamp"] = when  # kubevirt sends no message
    else:
        data["message"] = f"{service_type} is {status.lower()}"
    if message is not None:
        data["message"] = message
    if service_type == "network" and status == "READY":
        data["output_spec"] = {"cidr": "10.0.0.0/24", "gateway": "10.0.0.1"}
    event = {
        "specversion": "1.0",
        "id": str(uuid.UUID(int=n + 1)),
        "source": source,
        "type": f"dcm.status.{service_type}",
        "subject": f"dcm.{service_type}",
        "datacontenttype": "application/json",
        "time": when,
        "data": data,
    }
    return msgspec.json.encode(event)


# -- publishing: JetStream publish with a bounded window of acks outstanding ----------------


class StreamFiller:
    """Publishes with JetStream publish (a request whose reply is the ack),
    at most `window` awaiting their ack; a refused publish, or one whose ack
    does not come within `stall` seconds, is sent again. Core-NATS publishing
    at full speed loses messages (JetStream drops what it cannot take), so the
    bench would measure a backlog it did not publish. The acks come to one
    wildcard inbox, `<inbox>.<token>`; bodies carry no headers, as providers'
    do, so the service's path is the one it takes in production."""

    def __init__(self, nc: Any, window: int, stall: float = 5.0) -> None:
        self.nc = nc
        self.window = max(1, window)
        self.stall = stall
        self.outstanding: dict[int, tuple[str, bytes]] = {}
        self.failed: list[tuple[str, bytes]] = []
        self.resent = 0
        self.acked = 0
        self._token = 0
        self._room = asyncio.Event()
        self._progress = time.monotonic()
        self._inbox = ""
        self._sub: Any = None

    async def start(self) -> StreamFiller:
        self._inbox = self.nc.new_inbox()
        self._sub = await self.nc.subscribe(self._inbox + ".*", cb=self._on_ack)
        return self

    async def _on_ack(self, msg: Any) -> None:
        item = self.outstanding.pop(int(msg.subject.rsplit(".", 1)[1]), None)
        if item is None:
            return  # the ack of a publish we already gave up on and re-sent
        self._progress = time.monotonic()
        if not msg.data or b'"error"' in msg.data:  # no stream answered, or it refused
            self.failed.append(item)
        else:
            self.acked += 1
        if len(self.outstanding) <= self.window // 2:
            self._room.set()

    async def _send(self, subject: str, body: bytes) -> None:
        self._token += 1
        self.outstanding[self._token] = (subject, body)
        await self.nc.publish(subject, body, reply=f"{self._inbox}.{self._token}")

    def _give_up_outstanding(self) -> None:
        # No ack for `stall` seconds: send them again. One that was stored
        # after all is then stored twice, the same event again, which the
        # service treats as a re-publish; the bench counts it (`resent`).
        self.failed.extend(self.outstanding.values())
        self.outstanding.clear()
        self._progress = time.monotonic()

    async def _resend_failed(self) -> None:
        if self.failed:
            await asyncio.sleep(0.01)  # refused (no stream, or it is full): not in a tight loop
        while self.failed and len(self.outstanding) < self.window:
            self.resent += 1
            await self._send(*self.failed.pop())

    async def _wait_for_room(self) -> None:
        while len(self.outstanding) >= self.window:
            self._room.clear()
            try:
                await asyncio.wait_for(self._room.wait(), self.stall)
            except TimeoutError:
                if time.monotonic() - self._progress >= self.stall:
                    self._give_up_outstanding()

    async def publish(self, subject: str, body: bytes) -> None:
        if len(self.outstanding) >= self.window:
            await self._wait_for_room()
        if self.failed:
            await self._resend_failed()
        await self._send(subject, body)

    async def finish(self, timeout: float = 120.0) -> None:
        """Returns once every publish is acknowledged; raises after `timeout`."""
        deadline = time.monotonic() + timeout
        await self.nc.flush()
        while self.outstanding or self.failed:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"JetStream did not acknowledge {len(self.outstanding) + len(self.failed):,} publishes "
                    f"within {timeout:.0f}s ({self.resent:,} re-sent)"
                )
            await self._resend_failed()
            await asyncio.sleep(0.01)
            if self.outstanding and time.monotonic() - self._progress >= self.stall:
                self._give_up_outstanding()
        await self._sub.unsubscribe()


# -- CPU: the service, nats-server and PostgreSQL, from /proc through psutil -----------------

COMPONENTS = ("service", "nats", "postgres")


class CpuProbe:
    """CPU seconds used so far by each process of a part. The service is the
    process the bench started (or the bench itself, for the ceilings); nats-server
    the embedded one, or the process listening on the URL's port when that is
    visible; PostgreSQL the postmaster of the server the bench's connection
    reached, with every child (backends, checkpointer, WAL writer…), living
    children directly and exited ones through the postmaster's children times.
    What cannot be seen is None, with the reason in `missing`."""

    def __init__(self, servers: Servers) -> None:
        self.missing: dict[str, str] = {}
        self.cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self._nats: Any = None
        self._pg: Any = None
        self._psutil: Any = None
        try:
            import psutil
        except ImportError:
            for c in COMPONENTS:
                self.missing[c] = "psutil is not installed (pip install 'dcmstatus[bench]')"
            return
        self._psutil = psutil
        self._nats = self._find_nats(servers)
        self._pg = self._find_postgres(servers)

    def _find_nats(self, servers: Servers) -> Any:
        psutil = self._psutil
        pid = servers.nats_pid
        if pid is None:
            parts = urlsplit(servers.nats_url)
            if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
                self.missing["nats"] = f"nats-server at {parts.hostname} is not on this machine"
                return None
            try:
                pid = next(
                    (c.pid for c in psutil.net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == parts.port and c.pid),
                    None,
                )  # fmt: skip
            except psutil.AccessDenied:
                pid = None
            if pid is None:
                self.missing["nats"] = f"the process listening on port {parts.port} is not visible to this user"
                return None
        return psutil.Process(pid)

    def _find_postgres(self, servers: Servers) -> Any:
        psutil = self._psutil
        try:
            with psycopg.connect(servers.pg_url, autocommit=True) as conn:
                row = conn.execute("SELECT pg_backend_pid(), extract(epoch FROM pg_postmaster_start_time())").fetchone()
                assert row is not None
                backend, started = row[0], float(row[1])
                try:
                    postmaster = psutil.Process(backend).parent()
                except psutil.Error:
                    postmaster = None
        except psycopg.Error as exc:
            self.missing["postgres"] = "could not ask the server: " + " ".join(str(exc).split())
            return None
        # The backend pid is this machine's only when the server is: a postmaster
        # started when the server says it was is the one.
        if postmaster is None or abs(postmaster.create_time() - started) > 2:
            self.missing["postgres"] = "the PostgreSQL server's processes are not on this machine"
            return None
        return postmaster

    def _seconds(self, proc: Any, tree: bool = False) -> float | None:
        if proc is None:
            return None
        psutil = self._psutil
        try:
            t = proc.cpu_times()
            total = t.user + t.system + (t.children_user + t.children_system if tree else 0.0)
        except psutil.Error:
            return None
        if tree:
            for child in proc.children():
                try:
                    c = child.cpu_times()
                    total += c.user + c.system + c.children_user + c.children_system
                except psutil.Error:
                    pass  # exited meanwhile: its time is now in the postmaster's children times
        return total

    def snapshot(self, service_pid: int | None) -> dict[str, float | None]:
        service = None
        if self._psutil is not None and service_pid is not None:
            try:
                service = self._psutil.Process(service_pid)
            except self._psutil.Error:
                service = None
        return {
            "service": self._seconds(service),
            "nats": self._seconds(self._nats),
            "postgres": self._seconds(self._pg, tree=True),
        }

    def split(self, before: dict[str, float | None], after: dict[str, float | None], units: int,
              per: str = "event", extra: dict[str, float] | None = None) -> dict[str, Any]:
        """µs of CPU per unit of each component between two snapshots, and the
        zero-cost-consumer limit: cores ÷ (nats + PostgreSQL CPU per event)."""
        out: dict[str, Any] = {"per": per}
        missing = {}
        for c in COMPONENTS:
            b, a = before.get(c), after.get(c)
            if b is None or a is None or units <= 0:
                out[f"{c}_us"] = None
                missing[c] = self.missing.get(c, "the process was not visible during the part")
            else:
                out[f"{c}_us"] = round((a - b) * 1e6 / units, 2)
        for name, seconds in (extra or {}).items():
            out[f"{name}_us"] = round(seconds * 1e6 / units, 2) if units > 0 else None
        servers = (out["nats_us"] or 0) + (out["postgres_us"] or 0)
        if per == "event" and out["nats_us"] is not None and out["postgres_us"] is not None and servers > 0:
            out["zero_cost_limit_per_s"] = round(self.cores * 1e6 / servers)
        else:
            out["zero_cost_limit_per_s"] = None
        out["cores"] = self.cores
        if missing:
            out["missing"] = missing
        return out


# -- servers, databases, streams -------------------------------------------------------------


class Servers:
    """Embedded servers in a temp dir, or the ones given by URL."""

    def __init__(self, nats_url: str | None, database_url: str | None, work_dir: Path, window: int) -> None:
        self._embedded: list = []
        self.window = window
        self.nats_pid: int | None = None
        nats_server = postgres = None
        if not nats_url:
            nats_server = EmbeddedNats(work_dir / "servers", port=None)
            self._embedded.append(nats_server)
        if not database_url:
            postgres = EmbeddedPostgres(work_dir / "servers", fsync=True)  # durability as in production
            self._embedded.append(postgres)
        self.nats_url = nats_url or nats_server.start()  # type: ignore[union-attr]
        self.pg_url = database_url or postgres.start()  # type: ignore[union-attr]
        if nats_server is not None:
            self.nats_pid = nats_server.pid

    def close(self) -> None:
        for server in reversed(self._embedded):
            server.stop()

    def fresh_database(self, instances: Sequence[tuple[str, str]]) -> str:
        name = f"dcmstatus_bench_{uuid.uuid4().hex[:8]}"
        url = create_database(self.pg_url, name)
        migrate(url)
        with psycopg.connect(url, autocommit=True) as conn:
            seed_instances(conn, instances)
        return url

    def drop(self, url: str) -> None:
        drop_database(self.pg_url, url.rsplit("/", 1)[1].split("?")[0])

    def fresh_stream(self, messages: list[tuple[str, bytes]]) -> dict[str, Any]:
        """A new bench stream holding `messages` (and no changes stream: the
        service creates it); returns how publishing went."""
        return asyncio.run(_fresh_stream(self.nats_url, messages, self.window))


async def _fresh_stream(url: str, messages: list[tuple[str, bytes]], window: int) -> dict[str, Any]:
    nc = await nats.connect(url)
    js = nc.jetstream()
    try:
        for stream in (STREAM, CHANGES_STREAM):
            try:
                await js.delete_stream(stream)
            except nats.js.errors.NotFoundError:
                pass
        await js.add_stream(name=STREAM, subjects=[f"{PREFIX}.*"])
        started = time.monotonic()
        filler = await StreamFiller(nc, window).start()
        for subject, body in messages:
            await filler.publish(subject, body)
        await filler.finish()
        seconds = time.monotonic() - started
        stored = (await js.stream_info(STREAM)).state.messages
        if stored < len(messages):
            raise RuntimeError(f"the bench stream stored {stored:,} of {len(messages):,} acknowledged events")
        return {"publish_s": round(seconds, 2), "resent": filler.resent, "stored": stored}
    finally:
        await nc.close()


def seed_instances(conn: psycopg.Connection[Any], instances: Sequence[tuple[str, str]]) -> None:
    """The workload's rows, dated before the first event: the predecessor
    guard ignores events older than the row they would update."""
    created = T0 - timedelta(days=1)
    with conn.cursor().copy("COPY service_type_instances (instance_id, service_type, created_at) FROM STDIN") as copy:
        for instance, service_type in instances:
            copy.write_row((instance, service_type, created))
    conn.execute("VACUUM ANALYZE service_type_instances")


def _rss_peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _statuses(url: str) -> dict[str, str]:
    with psycopg.connect(url) as conn:
        return dict(conn.execute("SELECT instance_id, status FROM service_type_instances").fetchall())


def _quantiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None}
    values = sorted(values)

    def at(q: float) -> float:
        return round(values[min(len(values) - 1, int(q * len(values)))], 2)

    return {"p50_ms": at(0.50), "p99_ms": at(0.99), "max_ms": round(values[-1], 2)}


class Client:
    """One of the bench's client processes (dcmstatus/devtools/bench_clients.py)."""

    def __init__(self, kind: str, config: dict[str, Any]) -> None:
        self.kind = kind
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dcmstatus.devtools.bench_clients", kind, json.dumps(config)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip

    def wait_ready(self, timeout: float = 60.0) -> None:
        assert self.proc.stdout is not None
        # The client prints "ready" (or dies); one that does neither in time fails the part.
        readable, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if readable else ""
        if line.strip() != "ready":
            self.proc.kill()
            raise RuntimeError(f"bench client {self.kind} did not start: {self.proc.stderr.read()[-1500:]}")  # type: ignore[union-attr]

    def mark(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("mark\n")
        self.proc.stdin.flush()

    def stop(self, timeout: float = 60.0) -> dict[str, Any]:
        out, err = self.proc.communicate(input="", timeout=timeout)
        if self.proc.returncode != 0 or not out.strip():
            raise RuntimeError(f"bench client {self.kind} failed: {err[-1500:]}")
        return json.loads(out.strip().splitlines()[-1])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Service:
    """`dcmstatus serve` on the bench stream."""

    def __init__(self, bench: Bench, db_url: str, extra: Sequence[str] = (), http_port: int = 0) -> None:
        a = bench.args
        self.data_dir = bench.work_dir / f"serve-{uuid.uuid4().hex[:6]}"
        self.data_dir.mkdir()
        self.log_path = self.data_dir / "serve.log"
        # The URLs carry the servers' secrets: through the environment, not
        # the command line that every local user can read.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dcmstatus", "serve", "--stream", STREAM, "--subjects", f"{PREFIX}.*",
             "--durable", "bench", "--http-port", str(http_port), "--data-dir", str(self.data_dir),
             "--changes-stream", CHANGES_STREAM, "--changes-subject-prefix", CHANGES_PREFIX,
             "--writers", str(a.writers), "--batch-size", str(a.batch_size), "--log-level", "WARNING", *extra],
            stdout=self.log_path.open("w"), stderr=subprocess.STDOUT,
            env={**os.environ, "DCMSTATUS_NATS_URL": bench.servers.nats_url, "DCMSTATUS_DATABASE_URL": db_url},
        )  # fmt: skip
        self.http_url = ""

    def wait_consuming(self, timeout: float = 120.0) -> None:
        """serve writes runtime.json once it consumes."""
        deadline = time.monotonic() + timeout
        runtime = self.data_dir / "runtime.json"
        while not runtime.exists():
            self.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"serve did not start consuming within {timeout:.0f}s: {self.log_tail()}")
            time.sleep(0.005)
        self.http_url = json.loads(runtime.read_text())["http_url"]

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text()[-1500:]
        except OSError:
            return "(no log)"

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"serve exited with {self.proc.returncode}: {self.log_tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


async def _wait_drained(url: str, service: Service, timeout: float) -> None:
    """Polls the bench consumer on one connection until nothing is pending or unacknowledged."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        deadline = time.monotonic() + timeout
        while True:
            try:
                info = await js.consumer_info(STREAM, "bench")
                if info.num_pending == 0 and info.num_ack_pending == 0:
                    return
            except nats.js.errors.NotFoundError:
                pass
            service.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"the drain did not finish within {timeout:.0f}s")
            await asyncio.sleep(0.02)
    finally:
        await nc.close()


def _unpublished(db_url: str) -> int:
    with psycopg.connect(db_url, autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM status_changes WHERE published_at IS NULL").fetchone()
        return int(row[0]) if row else 0


def _http_target(http_url: str) -> tuple[str, int]:
    parts = urlsplit(http_url)
    return parts.hostname or "127.0.0.1", parts.port or 80


class Bench:
    def __init__(self, args: argparse.Namespace, servers: Servers, work_dir: Path) -> None:
        self.args = args
        self.servers = servers
        self.work_dir = work_dir
        self.cpu = CpuProbe(servers)
        self.parts: list[Part] = []
        self.correct = True
        self.failed: list[str] = []

    def say(self, text: str) -> None:
        print(f"[bench] {text}", file=sys.stderr, flush=True)

    def attempt(self, key: str, name: str, run: Callable[[], Part | list[Part]]) -> list[Part]:
        """Runs one part; a failure becomes its row (with the reason), not the end of the bench."""
        self.say(f"{name} …")
        try:
            result = run()
        except Exception as exc:
            reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:1500]
            self.say(f"{name}: could not run: {reason}")
            traceback.print_exc(file=sys.stderr)
            self.failed.append(key)
            result = Part(key, name, error=reason)
        parts = result if isinstance(result, list) else [result]
        for p in parts:
            if p.error is None and p.rate is not None:
                self.say(f"{p.name}: {p.rate:,.0f}/s {_cpu_text(p.cpu)}")
        self.parts.extend(parts)
        return parts

    # -- drains: the real service draining a backlog --------------------------------------

    def drain(self, key: str, name: str, workload: Workload, db_url: str | None = None,
              extra: Sequence[str] = (), load_paths: list[str] | None = None) -> Part:
        a = self.args
        n = len(workload.messages)
        db_url = db_url or self.servers.fresh_database(workload.instances)
        try:
            published = self.servers.fresh_stream(workload.messages)
            self.say(f"{name}: {n:,} events published in {published['publish_s']}s; starting the service")
            load = None
            port = 0
            if load_paths:
                # The load starts before the service and connects as soon as it
                # listens, so it runs through the whole drain.
                port = free_port()
                load = Client("http-load", {"host": "127.0.0.1", "port": port, "paths": load_paths, "clients": a.api_clients})
            service = Service(self, db_url, extra, http_port=port)
            load_result = None
            feed: dict[str, Any] = {}
            try:
                service.wait_consuming()
                if load is not None:
                    load.wait_ready()
                    load.mark()  # what the API answered during start-up does not count
                before = self.cpu.snapshot(service.proc.pid)
                started = time.monotonic()
                asyncio.run(_wait_drained(self.servers.nats_url, service, timeout=max(300.0, n / 200)))
                seconds = time.monotonic() - started
                after = self.cpu.snapshot(service.proc.pid)
                rss = _rss_peak_mb(service.proc.pid)
                if load is not None:
                    load_result = load.stop()
                if "--no-change-events" not in extra:
                    # The drain is timed to the last ack; the relay may still be
                    # publishing: say how far behind it was and when it caught up.
                    feed["outbox_at_drain_end"] = left = _unpublished(db_url)
                    caught_up = time.monotonic()
                    while left and time.monotonic() - caught_up < 120:
                        time.sleep(0.05)
                        left = _unpublished(db_url)
                    feed["feed_caught_up_s"] = round(time.monotonic() - caught_up, 2) if not left else None
                    # The relay's tail is work the drain caused: the CPU split
                    # up to the caught-up feed is what the feed's cost compares.
                    feed["cpu_with_feed_tail"] = self.cpu.split(before, self.cpu.snapshot(service.proc.pid), n)
            finally:
                service.stop()
                if load is not None:
                    load.kill()
            ok = _statuses(db_url) == {i: workload.expected.get(i, "PROVISIONING") for i, _ in workload.instances}
            self.correct &= ok
        finally:
            self.servers.drop(db_url)
        notes: dict[str, Any] = {"peak_rss_mb": round(rss, 1), "correct": ok, "instances": len(workload.instances), **feed}
        if published["resent"]:
            notes["publishes_resent"] = published["resent"]
        if load_result is not None:
            notes["api"] = load_result
        return Part(key, name, n, round(seconds, 3), n / seconds, cpu=self.cpu.split(before, after, n), notes=notes)

    def repeat_feed_pairs(self, workload: Workload, extra_pairs: int) -> None:
        """More feed-on/feed-off drains, alternating, for a feed cost that
        stands above a busy machine's noise: each pair's ratio goes into the
        `drain_feed_off` row's `pairs`, and the target takes their median."""
        p = {part.key: part for part in self.parts if part.error is None}
        if "drain" not in p or "drain_feed_off" not in p:
            return
        pairs = [_feed_pair(p["drain"], p["drain_feed_off"])]
        for n in range(extra_pairs):
            self.say(f"change feed: pair {n + 2} of {extra_pairs + 1}")
            try:
                on = self.drain("drain", "backlog drain (repeat)", workload)
                off = self.drain("drain_feed_off", "backlog drain, feed off (repeat)", workload, extra=["--no-change-events"])
            except Exception as exc:
                self.say(f"change feed pair {n + 2} could not run: {exc}")
                p["drain_feed_off"].notes["pairs_error"] = " ".join(str(exc).split())[:500]
                break
            pairs.append(_feed_pair(on, off))
        p["drain_feed_off"].notes["pairs"] = pairs

    # -- ceilings ---------------------------------------------------------------------------

    def consume_only(self, workload: Workload) -> Part:
        self.servers.fresh_stream(workload.messages)
        n = len(workload.messages)
        seconds, before, after = trio.run(self._consume_only, n)
        return Part("consume_only", "ceiling: consume only (NATS → decode → ack)", n, round(seconds, 3), n / seconds,
                    cpu=self.cpu.split(before, after, n), notes={"service": "the bench process"})  # fmt: skip

    async def _consume_only(self, n: int) -> tuple[float, dict, dict]:
        acked = 0
        done = trio.Event()

        class NullStore:
            async def apply(self, batch) -> BatchResult:
                return BatchResult(len(batch.updates), 0, ())

        async with trio_asyncio.open_loop() as loop:
            loop.set_exception_handler(asyncio_exception_handler)
            metrics = Metrics()
            source = JetStreamSource(
                NatsSettings(url=self.servers.nats_url, stream=STREAM, subjects=f"{PREFIX}.*", durable="bench-consume"),
                metrics,
            )

            class CountingSource:
                async def ack(self, tokens):
                    nonlocal acked
                    await source.ack(tokens)
                    acked += len(tokens)
                    if acked >= n:
                        done.set()

            a = self.args
            pipeline = Pipeline(
                Decoder(Catalog.default()).decode, CountingSource(), [NullStore() for _ in range(a.writers)], metrics,
                PipelineSettings(max_batch=a.batch_size, writers=a.writers),
            )
            send, receive = trio.open_memory_channel(float("inf"))
            async with trio.open_nursery() as nursery:
                await nursery.start(pipeline.run, receive)
                before = self.cpu.snapshot(os.getpid())
                await nursery.start(source.run, send)
                started = trio.current_time()
                await done.wait()
                seconds = trio.current_time() - started
                after = self.cpu.snapshot(os.getpid())
                await source.stop_intake()
                await source.close()
                nursery.cancel_scope.cancel()
        return seconds, before, after

    def write_only(self, workload: Workload) -> Part:
        a = self.args
        db_url = self.servers.fresh_database(workload.instances)
        try:
            decoder = Decoder(Catalog.default())
            builder: BatchBuilder = BatchBuilder(a.writers)
            shards: list[list] = [[] for _ in range(a.writers)]
            for seq, (subject, body) in enumerate(workload.messages, 1):
                builder.add(decoder.decode(subject, None, body, seq, 0), seq)
                if len(builder) >= a.batch_size:
                    for batch in builder.take():
                        shards[batch.shard].append(batch)
            for batch in builder.take():
                shards[batch.shard].append(batch)
            stores = [StatusStore(db_url) for _ in range(a.writers)]
            for store in stores:
                store.apply_sync(WriteBatch(0, [], [], [], 0))  # connect before the clock starts
            before = self.cpu.snapshot(os.getpid())
            started = time.monotonic()
            threads = [threading.Thread(target=lambda s=s, bs=bs: [s.apply_sync(b) for b in bs]) for s, bs in zip(stores, shards)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            seconds = time.monotonic() - started
            after = self.cpu.snapshot(os.getpid())
            for store in stores:
                store.close()
        finally:
            self.servers.drop(db_url)
        n = len(workload.messages)
        return Part("write_only", "ceiling: write only (batched statements → PostgreSQL)", n, round(seconds, 3),
                    n / seconds, cpu=self.cpu.split(before, after, n), notes={"service": "the bench process"})  # fmt: skip

    # -- the reference design ------------------------------------------------------------

    def reference(self, workload: Workload) -> Part:
        db_url = self.servers.fresh_database(workload.instances)
        try:
            self.servers.fresh_stream(workload.messages)
            n = len(workload.messages)
            seconds, before, after = asyncio.run(self._reference(db_url, n))
        finally:
            self.servers.drop(db_url)
        return Part("reference", "reference: one UPDATE + one ack per event", n, round(seconds, 3), n / seconds,
                    cpu=self.cpu.split(before, after, n), notes={"service": "the bench process"})  # fmt: skip

    async def _reference(self, db_url: str, n: int) -> tuple[float, dict, dict]:
        # What the DCM control plane's Go consumer does: id from data.id, the
        # status lower-cased, one autocommit UPDATE, then the ack, in order.
        nc = await nats.connect(self.servers.nats_url)
        sub = await nc.jetstream().pull_subscribe(f"{PREFIX}.*", durable="bench-reference", stream=STREAM)
        conn = psycopg.connect(db_url, autocommit=True)
        done = 0
        before = self.cpu.snapshot(os.getpid())
        started = time.monotonic()
        while done < n:
            for msg in await sub.fetch(100, timeout=5):
                data = json.loads(msg.data)["data"]
                conn.execute(
                    "UPDATE service_type_instances SET status = %s, status_message = %s, updated_at = now()"
                    " WHERE instance_id = %s",
                    (data["status"].lower(), data.get("message", ""), data["id"]),
                )
                await msg.ack()
                done += 1
        seconds = time.monotonic() - started
        after = self.cpu.snapshot(os.getpid())
        conn.close()
        await nc.close()
        return seconds, before, after

    # -- latency at a fixed rate: committed, SSE received, change event received -----------------

    def latency(self) -> Part:
        a = self.args
        total = int(a.latency_rate * a.latency_seconds)
        workload = make_workload(0, a.instances, 0)
        db_url = self.servers.fresh_database(workload.instances)
        clients: list[Client] = []
        try:
            with psycopg.connect(db_url, autocommit=True) as conn:
                # Bench-only: NOTIFY is delivered at commit, so it timestamps "committed".
                conn.execute(
                    "CREATE FUNCTION bench_notify() RETURNS trigger LANGUAGE plpgsql AS"
                    " $$ BEGIN PERFORM pg_notify('dcmbench', NEW.status_message); RETURN NEW; END $$;"
                    "CREATE TRIGGER bench_notify AFTER UPDATE ON service_type_instances"
                    " FOR EACH ROW EXECUTE FUNCTION bench_notify()"
                )
            self.servers.fresh_stream([])
            service = Service(self, db_url)
            try:
                service.wait_consuming()
                host, port = _http_target(service.http_url)
                clients = [
                    Client("pg-notify", {"database_url": db_url}),
                    Client("sse", {"host": host, "port": port}),
                    Client("nats-changes", {"nats_url": self.servers.nats_url, "stream": CHANGES_STREAM, "prefix": CHANGES_PREFIX}),
                ]
                for client in clients:
                    client.wait_ready()
                self.say(f"latency: offering {a.latency_rate:,}/s for {a.latency_seconds}s")
                before = self.cpu.snapshot(service.proc.pid)
                sent = asyncio.run(self._offer(workload, total, a.latency_rate))
                # Wait for the relay to publish everything, then a moment for the last SSE frames.
                deadline = time.monotonic() + 30
                time.sleep(0.5)
                while _unpublished(db_url) and time.monotonic() < deadline:
                    time.sleep(0.05)
                time.sleep(0.5)
                after = self.cpu.snapshot(service.proc.pid)
                results = [client.stop() for client in clients]
            finally:
                service.stop()
                for client in clients:
                    client.kill()
        finally:
            self.servers.drop(db_url)
        notes: dict[str, Any] = {}
        client_cpu = 0.0
        for label, result in zip(("committed", "sse", "nats_change"), results):
            received = result["received"]
            latencies = [(received[k] - t) * 1000 for k, t in sent.items() if k in received]
            q = _quantiles(latencies)
            notes[label] = {**q, "missing": total - len(latencies)}
            if result.get("error"):
                notes[label]["error"] = result["error"]
            client_cpu += result["client_cpu_s"]
        missing = notes["committed"]["missing"]
        self.correct &= missing == 0
        notes["p50_ms"], notes["p99_ms"] = notes["committed"]["p50_ms"], notes["committed"]["p99_ms"]
        notes["missing"] = missing
        notes["receivers_cpu_s"] = round(client_cpu, 2)
        # What the publisher reached: on a busy machine it can fall behind the offer.
        span = max(sent.values()) - min(sent.values()) if len(sent) > 1 else 0.0
        notes["published_per_s"] = round((len(sent) - 1) / span) if span > 0 else None
        return Part(
            "latency", f"latency at {a.latency_rate:,}/s: publish → committed, SSE, NATS change",
            total, a.latency_seconds, a.latency_rate, cpu=self.cpu.split(before, after, total), notes=notes,
        )  # fmt: skip

    async def _offer(self, workload: Workload, total: int, rate: int) -> dict[str, float]:
        nc = await nats.connect(self.servers.nats_url)
        filler = await StreamFiller(nc, self.args.publish_window).start()
        sent: dict[str, float] = {}
        tick = 0.005
        per_tick = max(1, int(rate * tick))
        start = time.monotonic()
        statuses: dict[str, int] = {}  # instance -> index of its last status in its choices
        shapes = {s[0]: s for s in SHAPES}
        for i in range(total):
            if i % per_tick == 0:
                delay = start + (i // per_tick) * tick - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            instance, service_type = workload.instances[i % len(workload.instances)]
            _, _, choices, source = shapes[service_type]
            index = (statuses.get(instance, -1) + 1) % len(choices)
            statuses[instance] = index
            # Every event changes the message, so every one is a change on the feed;
            # the message ("b<n>") is how the receivers say which event arrived.
            key = f"b{i}"
            body = _body(service_type, instance, choices[index], source, 10_000_000 + i, message=key)
            sent[key] = time.time()
            await filler.publish(f"{PREFIX}.{service_type}", body)
        await filler.finish()
        await nc.close()
        return sent

    # -- what a duplicate costs -------------------------------------------------------------

    def duplicate_cost(self) -> list[Part]:
        a = self.args
        n = a.duplicate_events
        changes = make_workload(n, a.instances, 0.0, seed=11)
        changes_part = self.drain("duplicates_changes", "duplicate cost: real changes", changes)
        # The same events, re-published: every one repeats the status already stored.
        dup_db = self.servers.fresh_database(changes.instances)
        with psycopg.connect(dup_db, autocommit=True) as conn, conn.cursor() as cur:
            cur.executemany(
                "UPDATE service_type_instances SET status = %s WHERE instance_id = %s",
                list((s, i) for i, s in changes.expected.items()),
            )
        dups = Workload(changes.instances, [], changes.expected)
        decoder = Decoder(Catalog.default())
        for seq, (subject, body) in enumerate(changes.messages, 1):
            update = decoder.decode(subject, None, body, seq, 0)
            assert isinstance(update, StatusUpdate)
            service_type = subject.rsplit(".", 1)[1]
            source = next(s[3] for s in SHAPES if s[0] == service_type)
            status = changes.expected[update.instance_id]
            dups.messages.append((subject, _body(service_type, update.instance_id, status, source, 20_000_000 + seq)))
        dup_part = self.drain("duplicates_republishes", "duplicate cost: same-status re-publishes", dups, db_url=dup_db)
        return [changes_part, dup_part]

    # -- the HTTP API: quiet, and against a drain ------------------------------------------------

    def api_paths(self, instances: list[tuple[str, str]]) -> list[str]:
        rng = random.Random(5)
        sample = rng.sample(instances, min(2000, len(instances)))
        return [f"/api/v1/service-type-instances/{instance}" for instance, _ in sample]

    def api_quiet(self, instances: list[tuple[str, str]], paths: list[str]) -> list[Part]:
        a = self.args
        db_url = self.servers.fresh_database(instances)
        parts = []
        try:
            self.servers.fresh_stream([])
            service = Service(self, db_url)
            try:
                service.wait_consuming()
                host, port = _http_target(service.http_url)
                for key, name, targets in (
                    ("api_get", f"API: GET one instance, {a.api_clients} clients, {len(instances):,} rows", paths),
                    ("api_health", f"API: GET /api/v1/health, {a.api_clients} clients", ["/api/v1/health"]),
                ):
                    client = Client("http-load", {"host": host, "port": port, "paths": targets, "clients": a.api_clients})
                    try:
                        client.wait_ready()
                        before = self.cpu.snapshot(service.proc.pid)
                        time.sleep(a.api_seconds)
                        after = self.cpu.snapshot(service.proc.pid)
                        r = client.stop()
                    finally:
                        client.kill()
                    notes = {k: r[k] for k in ("p50_ms", "p99_ms", "max_ms", "errors", "timeouts", "statuses")}
                    cpu = self.cpu.split(before, after, r["requests"], per="request", extra={"client": r["client_cpu_s"]})
                    parts.append(Part(key, name, r["requests"], r["seconds"], r["rps"], cpu=cpu, notes=notes))
            finally:
                service.stop()
        finally:
            self.servers.drop(db_url)
        return parts

    def api_under_drain(self, workload: Workload, paths: list[str]) -> list[Part]:
        quiet = self.drain("api_drain_quiet", f"API under drain: the drain quiet ({len(workload.instances):,} instances)", workload)
        loaded = self.drain(
            "api_drain_loaded", f"API under drain: the drain under {self.args.api_clients} GET clients", workload,
            load_paths=paths,
        )  # fmt: skip
        api = loaded.notes["api"]
        loaded.notes["drain_vs_quiet"] = round(loaded.rate / quiet.rate, 3) if loaded.rate and quiet.rate else None
        loaded.notes["api_rps_during_drain"] = api["rps"]
        loaded.notes["api_timeouts_during_drain"] = api["timeouts"]
        loaded.notes["api_errors_during_drain"] = api["errors"]
        return [quiet, loaded]


def _feed_pair(on: Part, off: Part) -> dict[str, Any]:
    tail = on.notes.get("cpu_with_feed_tail") or on.cpu

    def total(cpu: dict[str, Any]) -> float | None:
        values = [cpu.get(f"{c}_us") for c in COMPONENTS]
        return None if None in values else sum(values)  # type: ignore[arg-type]

    on_cpu, off_cpu = total(tail), total(off.cpu)
    return {
        "on_per_s": round(on.rate or 0), "off_per_s": round(off.rate or 0),
        "throughput_cost": round(1 - (on.rate or 0) / off.rate, 3) if off.rate else None,
        "cpu_cost": round(on_cpu / off_cpu - 1, 3) if on_cpu is not None and off_cpu else None,
    }  # fmt: skip


def _median(values: list[float]) -> float | None:
    values = sorted(v for v in values if v is not None)
    return statistics.median(values) if values else None


def _cpu_text(cpu: dict[str, Any]) -> str:
    if not cpu:
        return ""
    figures = " ".join(
        f"{c}={cpu.get(f'{c}_us'):.1f}µs" if cpu.get(f"{c}_us") is not None else f"{c}=n/a" for c in COMPONENTS
    )
    return f"(CPU per {cpu.get('per', 'event')}: {figures})"


def run(args: argparse.Namespace) -> int:
    work_dir = Path(tempfile.mkdtemp(prefix="dcmstatus-bench-"))
    started = time.monotonic()
    try:
        servers = Servers(args.nats_url, args.database_url, work_dir, args.publish_window)
    except Exception as exc:
        # Without servers no part can run: say so in the table, not in a traceback.
        reason = " ".join(f"the servers did not start: {type(exc).__name__}: {exc}".split())[:1500]
        rows = [Part(name, name, error=reason) for name in args.parts]
        summary = {"correct": True, "failed_parts": list(args.parts), "wall_seconds": round(time.monotonic() - started, 1),
                   "machine": f"{os.cpu_count()} cores, Python {sys.version.split()[0]}", "cpu_unavailable": {}}  # fmt: skip
        if args.json:
            print(json.dumps({"parts": [asdict(p) for p in rows], "targets": [], "summary": summary}, indent=2))
        else:
            print(_table(rows, [], summary))
        return 3
    bench = Bench(args, servers, work_dir)
    parts = set(args.parts)
    try:
        if parts & {"drain", "feed", "ceilings"}:
            bench.say(f"generating {args.events:,} events over {args.instances:,} instances")
            workload = make_workload(args.events, args.instances, args.duplicate_ratio)
        if "drain" in parts:
            bench.attempt("drain", "backlog drain (the service)", lambda: bench.drain(
                "drain", f"backlog drain (the service, {args.instances:,} instances)", workload))
        if "feed" in parts:
            bench.attempt("drain_feed_off", "backlog drain, change feed off", lambda: bench.drain(
                "drain_feed_off", "backlog drain, change feed off (--no-change-events)", workload,
                extra=["--no-change-events"]))
            if "drain" in parts and args.feed_repeat > 1:
                bench.repeat_feed_pairs(workload, args.feed_repeat - 1)
        large = None
        if parts & {"scale", "api"}:
            large = make_workload(args.events, args.instances_large, args.duplicate_ratio, seed=13)
        if "scale" in parts:
            assert large is not None
            bench.attempt("drain_large", "backlog drain over the large instance count", lambda: bench.drain(
                "drain_large", f"backlog drain ({args.instances_large:,} instances)", large))
        if "ceilings" in parts:
            bench.attempt("consume_only", "ceiling: consume only", lambda: bench.consume_only(workload))
            bench.attempt("write_only", "ceiling: write only", lambda: bench.write_only(workload))
        if "reference" in parts:
            ref_workload = make_workload(args.reference_events, args.instances, args.duplicate_ratio)
            bench.attempt("reference", "reference design", lambda: bench.reference(ref_workload))
        if "latency" in parts:
            bench.attempt("latency", "latency at a fixed rate", bench.latency)
        if "memory" in parts:
            bench.say(f"generating {args.memory_events:,} events")
            memory_workload = make_workload(args.memory_events, args.instances, args.duplicate_ratio, seed=3)
            bench.attempt("memory", "memory: large backlog drain", lambda: bench.drain(
                "memory", f"memory: large backlog drain ({args.instances:,} instances)", memory_workload))
            del memory_workload
        if "duplicates" in parts:
            bench.attempt("duplicates", "duplicate cost", bench.duplicate_cost)
        if "api" in parts:
            assert large is not None
            paths = bench.api_paths(large.instances)
            bench.attempt("api", "API quiet", lambda: bench.api_quiet(large.instances, paths))
            bench.attempt("api_drain", "API under drain", lambda: bench.api_under_drain(large, paths))
    finally:
        servers.close()
    targets = _targets(bench, args)
    summary = {
        "correct": bench.correct,
        "failed_parts": bench.failed,
        "wall_seconds": round(time.monotonic() - started, 1),
        "machine": f"{bench.cpu.cores} cores, Python {sys.version.split()[0]}",
        "cpu_unavailable": bench.cpu.missing,
    }
    if args.json:
        print(json.dumps({"parts": [asdict(p) for p in bench.parts], "targets": targets, "summary": summary}, indent=2))
    else:
        print(_table(bench.parts, targets, summary))
    if not bench.correct:
        return 1
    return 3 if bench.failed else 0


def _targets(bench: Bench, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The issue's targets, each as a ratio or figure from this run
    (docs/performance.md#targets); None, with why, when a part is missing."""
    p = {part.key: part for part in bench.parts if part.error is None}
    rows: list[dict[str, Any]] = []

    def add(name: str, needs: Sequence[str], compute: Callable[[], float | None], target: str | None = None,
            check: Callable[[float], bool] | None = None) -> None:
        row: dict[str, Any] = {"name": name, "value": None, "target": target, "met": None}
        absent = [k for k in needs if k not in p]
        if absent:
            row["why"] = f"part {', '.join(absent)} did not run or failed"
        else:
            try:
                value = compute()
            except (TypeError, ZeroDivisionError, KeyError):
                value = None
            if value is None:
                row["why"] = "a figure it needs is absent (see the parts' cpu.missing)"
            else:
                row["value"] = round(value, 3)
                row["met"] = check(value) if check else None
        rows.append(row)

    def cpu(key: str, component: str) -> float:
        return p[key].cpu[f"{component}_us"]

    def total_cpu(key: str) -> float:
        return sum(cpu(key, c) for c in COMPONENTS)

    add("service CPU/event ÷ nats-server CPU/event (drain)", ["drain"],
        lambda: cpu("drain", "service") / cpu("drain", "nats"), "≤ 1.0", lambda v: v <= 1.0)
    add("drain ÷ zero-cost-consumer limit", ["drain"],
        lambda: p["drain"].rate / p["drain"].cpu["zero_cost_limit_per_s"], "≥ 0.70", lambda v: v >= 0.70)
    add("re-publish ÷ real change, time per event", ["duplicates_changes", "duplicates_republishes"],
        lambda: p["duplicates_changes"].rate / p["duplicates_republishes"].rate, "≤ 0.5", lambda v: v <= 0.5)  # type: ignore[operator]
    add("re-publish ÷ real change, CPU per event (all three processes)", ["duplicates_changes", "duplicates_republishes"],
        lambda: total_cpu("duplicates_republishes") / total_cpu("duplicates_changes"), "≤ 0.5", lambda v: v <= 0.5)
    rate = f"{args.latency_rate:,}/s"
    add(f"p99 publish → committed at {rate}, ms", ["latency"],
        lambda: p["latency"].notes["committed"]["p99_ms"], "≤ 25", lambda v: v <= 25)
    add(f"p99 publish → SSE received at {rate}, ms", ["latency"], lambda: p["latency"].notes["sse"]["p99_ms"])
    add(f"p99 publish → NATS change received at {rate}, ms", ["latency"],
        lambda: p["latency"].notes["nats_change"]["p99_ms"])
    add(f"peak RSS on the {args.memory_events:,}-event backlog, MB", ["memory"],
        lambda: p["memory"].notes["peak_rss_mb"], "≤ 100", lambda v: v <= 100)
    add("change feed cost, throughput: 1 − (drain rate feed on ÷ feed off)", ["drain", "drain_feed_off"],
        lambda: 1 - p["drain"].rate / p["drain_feed_off"].rate, "≤ 0.10", lambda v: v <= 0.10)  # type: ignore[operator]
    pairs = p["drain_feed_off"].notes.get("pairs") if "drain_feed_off" in p else None
    if pairs:
        add(f"change feed cost, throughput, median of {len(pairs)} alternating pairs", ["drain", "drain_feed_off"],
            lambda: _median([x["throughput_cost"] for x in pairs]), "≤ 0.10", lambda v: v <= 0.10)
        add(f"change feed cost, CPU per event, median of {len(pairs)} alternating pairs", ["drain", "drain_feed_off"],
            lambda: _median([x["cpu_cost"] for x in pairs]), "≤ 0.10", lambda v: v <= 0.10)
    add("change feed cost, CPU per event of all three (relay's tail included)", ["drain", "drain_feed_off"],
        lambda: sum(p["drain"].notes["cpu_with_feed_tail"][f"{c}_us"] for c in COMPONENTS) / total_cpu("drain_feed_off") - 1,
        "≤ 0.10", lambda v: v <= 0.10)
    add(f"GET one instance at {args.api_clients} clients, requests/s", ["api_get"],
        lambda: p["api_get"].rate, "≥ 1500", lambda v: v >= 1500)
    add("GET one instance p99, ms", ["api_get"], lambda: p["api_get"].notes["p99_ms"], "≤ 50", lambda v: v <= 50)
    add(f"/health at {args.api_clients} clients, requests/s", ["api_health"], lambda: p["api_health"].rate)
    add("/health service CPU per request, µs", ["api_health"], lambda: cpu("api_health", "service"))
    add("isolation: drain under API load ÷ quiet drain", ["api_drain_quiet", "api_drain_loaded"],
        lambda: p["api_drain_loaded"].rate / p["api_drain_quiet"].rate, "≥ 0.70", lambda v: v >= 0.70)  # type: ignore[operator]
    add("isolation: API requests/s during the drain ÷ quiet", ["api_drain_loaded", "api_get"],
        lambda: p["api_drain_loaded"].notes["api_rps_during_drain"] / p["api_get"].rate)
    add("isolation: API time-outs during the drain", ["api_drain_loaded"],
        lambda: p["api_drain_loaded"].notes["api_timeouts_during_drain"], "= 0", lambda v: v == 0)
    add(f"PostgreSQL CPU/event over {args.instances_large:,} ÷ over {args.instances:,} instances",
        ["drain", "drain_large"], lambda: cpu("drain_large", "postgres") / cpu("drain", "postgres"),
        "≤ 1.3", lambda v: v <= 1.3)
    return rows


def _notes_text(notes: dict[str, Any]) -> str:
    out = []
    for k, v in notes.items():
        if k in ("api", "statuses", "p50_ms", "p99_ms", "missing", "service", "instances", "pairs"):
            continue  # shown elsewhere, or in --json only
        if isinstance(v, dict):
            if "p99_ms" in v:
                text = f"{k}=p50 {v['p50_ms']}/p99 {v['p99_ms']} ms"
                if v.get("missing"):
                    text += f" missing {v['missing']}"
                if v.get("error"):
                    text += f" ({v['error']})"
                out.append(text)
            continue
        out.append(f"{k}={v}")
    return " ".join(out)


def _fmt(value: float | None, width: int, digits: int = 1) -> str:
    return f"{'n/a':>{width}}" if value is None else f"{value:>{width},.{digits}f}"


def _table(parts: list[Part], targets: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    width = 150
    lines = [
        f"{'part':<60} {'events':>9} {'seconds':>8} {'rate/s':>9} {'svc µs':>7} {'nats µs':>7} {'pg µs':>7} {'limit/s':>8}  notes",
        "-" * width,
    ]
    for p in parts:
        if p.error is not None:
            lines.append(f"{p.name:<60} could not run: {p.error}")
            continue
        c = p.cpu
        lines.append(
            f"{p.name[:60]:<60} {p.events:>9,} {_fmt(p.seconds, 8, 2)} {_fmt(p.rate, 9, 0)} "
            f"{_fmt(c.get('service_us'), 7)} {_fmt(c.get('nats_us'), 7)} {_fmt(c.get('postgres_us'), 7)} "
            f"{_fmt(c.get('zero_cost_limit_per_s'), 8, 0)}  {_notes_text(p.notes)}"
        )
    lines.append("-" * width)
    lines.append("CPU µs per event (per request for the API rows); limit/s = cores ÷ (nats + pg µs per event)")
    missing = summary.get("cpu_unavailable") or {}
    for component, why in missing.items():
        lines.append(f"  {component} CPU not measured: {why}")
    lines.append("")
    lines.append(f"{'target (one run)':<74} {'value':>10} {'target':>8}  met")
    lines.append("-" * 100)
    for t in targets:
        value = "n/a" if t["value"] is None else f"{t['value']:,.3f}".rstrip("0").rstrip(".")
        met = {True: "yes", False: "NO", None: ""}[t["met"]]
        if t.get("why"):
            met = f"({t['why']})"
        lines.append(f"{t['name']:<74} {value:>10} {t['target'] or '':>8}  {met}")
    lines.append("-" * 100)
    failed = summary["failed_parts"]
    lines.append(
        f"correct = {summary['correct']}   parts that could not run: {', '.join(failed) if failed else 'none'}   "
        f"machine: {summary['machine']}; wall time {summary['wall_seconds']}s"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dcmstatus bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))
