"""`dcmstatus bench` (also scripts/bench.py): measures the pipeline and the
limits around it in ONE run on this machine, because absolute numbers vary
between machines and only ratios travel.

Parts:
1. backlog drain: events published while the service is stopped, then the
   time from consumer start to everything committed and acked;
2. ceilings: consume-only (NATS → decode → ack, no database) and write-only
   (the same batched statements straight into PostgreSQL);
3. reference design: one autocommit UPDATE and one ack per event, in order;
4. latency at a fixed offered rate: publish → committed (a bench-only
   trigger NOTIFYs at commit);
5. memory: peak RSS of the service during a large backlog drain;
6. duplicate cost: draining re-published same-status events vs real changes.

It starts its own servers (embedded) unless given URLs, and works on its own
databases and its own stream/subjects (`dcmbench.*`), never on dcm.*.
"""

from __future__ import annotations

import trio_asyncio  # isort: skip  # before psycopg (docs/architecture.md#import-order)

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

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
from dcmstatus.devtools.embedded import EmbeddedNats, EmbeddedPostgres, create_database, drop_database
from dcmstatus.engine.metrics import Metrics
from dcmstatus.engine.pipeline import Pipeline, PipelineSettings

STREAM = "dcmstatus-bench"
PREFIX = "dcmbench"
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
    name: str
    events: int
    seconds: float
    rate: float  # events/s
    notes: dict = field(default_factory=dict)


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


class Servers:
    """Embedded servers in a temp dir, or the ones given by URL."""

    def __init__(self, nats_url: str | None, database_url: str | None, work_dir: Path) -> None:
        self._embedded: list = []
        if nats_url and database_url:
            self.nats_url, self.pg_url = nats_url, database_url
            return
        nats_server = EmbeddedNats(work_dir / "servers", port=None)
        postgres = EmbeddedPostgres(work_dir / "servers", fsync=True)  # durability as in production
        self._embedded = [nats_server, postgres]
        self.nats_url = nats_url or nats_server.start()
        self.pg_url = database_url or postgres.start()

    def close(self) -> None:
        for server in reversed(self._embedded):
            server.stop()

    def fresh_database(self, workload: Workload) -> str:
        name = f"dcmstatus_bench_{uuid.uuid4().hex[:8]}"
        url = create_database(self.pg_url, name)
        migrate(url)
        with psycopg.connect(url, autocommit=True) as conn:
            # Rows dated before the first event: the predecessor guard ignores
            # events older than the row they would update.
            created = T0 - timedelta(days=1)
            with conn.cursor().copy(
                "COPY service_type_instances (instance_id, service_type, created_at) FROM STDIN"
            ) as copy:
                for instance, service_type in workload.instances:
                    copy.write_row((instance, service_type, created))
            conn.execute("VACUUM ANALYZE service_type_instances")
        return url

    def drop(self, url: str) -> None:
        drop_database(self.pg_url, url.rsplit("/", 1)[1].split("?")[0])

    def fresh_stream(self, messages: list[tuple[str, bytes]]) -> None:
        asyncio.run(_fresh_stream(self.nats_url, messages))


async def _fresh_stream(url: str, messages: list[tuple[str, bytes]]) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    try:
        await js.delete_stream(STREAM)
    except nats.js.errors.NotFoundError:
        pass
    await js.add_stream(name=STREAM, subjects=[f"{PREFIX}.*"])
    await _publish_all(nc, messages)
    deadline = time.monotonic() + 60
    while (await js.stream_info(STREAM)).state.messages < len(messages):
        if time.monotonic() > deadline:
            raise RuntimeError("the bench stream did not store every published event")
        await asyncio.sleep(0.05)
    await nc.close()


async def _publish_all(nc, messages) -> None:
    # Core-NATS publish with periodic flushes: a provider-like firehose, fast enough
    # that publishing never dominates the bench.
    for i, (subject, body) in enumerate(messages, 1):
        await nc.publish(subject, body)
        if i % 2000 == 0:
            await nc.flush()
    await nc.flush()


async def _consumer_state(url: str, durable: str):
    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().consumer_info(STREAM, durable)
        return info.num_pending, info.num_ack_pending
    except nats.js.errors.NotFoundError:
        return None
    finally:
        await nc.close()


def _rss_peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _statuses(url: str) -> dict[str, str]:
    with psycopg.connect(url) as conn:
        return dict(conn.execute("SELECT instance_id, status FROM service_type_instances").fetchall())


class Bench:
    def __init__(self, args: argparse.Namespace, servers: Servers, work_dir: Path) -> None:
        self.args = args
        self.servers = servers
        self.work_dir = work_dir
        self.parts: list[Part] = []
        self.correct = True

    def say(self, text: str) -> None:
        print(f"[bench] {text}", file=sys.stderr, flush=True)

    # -- 1 and 5: the real service draining a backlog ---------------------------

    def _start_service(self, db_url: str) -> tuple[subprocess.Popen, Path]:
        """`dcmstatus serve` on the bench stream; returns once it consumes
        (serve writes runtime.json after subscribing)."""
        a = self.args
        data_dir = self.work_dir / f"serve-{uuid.uuid4().hex[:6]}"
        data_dir.mkdir()
        log_path = data_dir / "serve.log"
        # The URLs carry the servers' secrets: through the environment, not
        # the command line that every local user can read.
        proc = subprocess.Popen(
            [sys.executable, "-m", "dcmstatus", "serve", "--stream", STREAM, "--subjects", f"{PREFIX}.*",
             "--durable", "bench", "--http-port", "0", "--data-dir", str(data_dir),
             "--writers", str(a.writers), "--batch-size", str(a.batch_size), "--log-level", "WARNING"],
            stdout=log_path.open("w"), stderr=subprocess.STDOUT,
            env={**os.environ, "DCMSTATUS_NATS_URL": self.servers.nats_url, "DCMSTATUS_DATABASE_URL": db_url},
        )  # fmt: skip
        while not (data_dir / "runtime.json").exists():
            if proc.poll() is not None:
                raise RuntimeError(f"serve exited:\n{log_path.read_text()}")
            time.sleep(0.005)
        return proc, log_path

    def drain(self, name: str, workload: Workload, db_url: str | None = None) -> Part:
        db_url = db_url or self.servers.fresh_database(workload)
        self.servers.fresh_stream(workload.messages)
        self.say(f"{name}: {len(workload.messages):,} events published; starting the service")
        proc, log_path = self._start_service(db_url)
        try:
            started = time.monotonic()
            while True:
                state = asyncio.run(_consumer_state(self.servers.nats_url, "bench"))
                if state == (0, 0):
                    break
                if proc.poll() is not None:
                    raise RuntimeError(f"serve exited:\n{log_path.read_text()}")
                time.sleep(0.02)
            seconds = time.monotonic() - started
            rss = _rss_peak_mb(proc.pid)
        finally:
            proc.terminate()
            proc.wait(30)
        ok = _statuses(db_url) == {i: workload.expected.get(i, "PROVISIONING") for i, _ in workload.instances}
        self.correct &= ok
        self.servers.drop(db_url)
        n = len(workload.messages)
        return Part(name, n, seconds, n / seconds, {"peak_rss_mb": round(rss, 1), "correct": ok})

    # -- 2: ceilings ---------------------------------------------------------------

    def consume_only(self, workload: Workload) -> Part:
        self.servers.fresh_stream(workload.messages)
        n = len(workload.messages)
        seconds = trio.run(self._consume_only, n)
        return Part("ceiling: consume only (NATS → decode → ack)", n, seconds, n / seconds)

    async def _consume_only(self, n: int) -> float:
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
                await nursery.start(source.run, send)
                started = trio.current_time()
                await done.wait()
                seconds = trio.current_time() - started
                await source.stop_intake()
                await source.close()
                nursery.cancel_scope.cancel()
        return seconds

    def write_only(self, workload: Workload) -> Part:
        a = self.args
        db_url = self.servers.fresh_database(workload)
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
        started = time.monotonic()
        threads = [threading.Thread(target=lambda s=s, bs=bs: [s.apply_sync(b) for b in bs]) for s, bs in zip(stores, shards)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.monotonic() - started
        for store in stores:
            store.close()
        self.servers.drop(db_url)
        n = len(workload.messages)
        return Part("ceiling: write only (batched statements → PostgreSQL)", n, seconds, n / seconds)

    # -- 3: the reference design -------------------------------------------------------

    def reference(self, workload: Workload) -> Part:
        db_url = self.servers.fresh_database(workload)
        self.servers.fresh_stream(workload.messages)
        n = len(workload.messages)
        seconds = asyncio.run(self._reference(db_url, n))
        self.servers.drop(db_url)
        return Part("reference: one UPDATE + one ack per event", n, seconds, n / seconds)

    async def _reference(self, db_url: str, n: int) -> float:
        # What the DCM control plane's Go consumer does: id from data.id, the
        # status lower-cased, one autocommit UPDATE, then the ack, in order.
        nc = await nats.connect(self.servers.nats_url)
        sub = await nc.jetstream().pull_subscribe(f"{PREFIX}.*", durable="bench-reference", stream=STREAM)
        conn = psycopg.connect(db_url, autocommit=True)
        done = 0
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
        conn.close()
        await nc.close()
        return seconds

    # -- 4: latency at a fixed rate ----------------------------------------------------

    def latency(self) -> Part:
        a = self.args
        total = int(a.latency_rate * a.latency_seconds)
        workload = make_workload(0, a.instances, 0)
        db_url = self.servers.fresh_database(workload)
        with psycopg.connect(db_url, autocommit=True) as conn:
            # Bench-only: NOTIFY is delivered at commit, so it timestamps "committed".
            conn.execute(
                "CREATE FUNCTION bench_notify() RETURNS trigger LANGUAGE plpgsql AS"
                " $$ BEGIN PERFORM pg_notify('dcmbench', NEW.status_message); RETURN NEW; END $$;"
                "CREATE TRIGGER bench_notify AFTER UPDATE ON service_type_instances"
                " FOR EACH ROW EXECUTE FUNCTION bench_notify()"
            )
        self.servers.fresh_stream([])
        received: dict[int, float] = {}
        listener = psycopg.connect(db_url, autocommit=True)
        listener.execute("LISTEN dcmbench")
        stop_listening = threading.Event()

        def listen():
            while not stop_listening.is_set():
                for note in listener.notifies(timeout=0.2):
                    received[int(note.payload[1:])] = time.time()

        thread = threading.Thread(target=listen, daemon=True)
        thread.start()
        proc, _ = self._start_service(db_url)
        try:
            self.say(f"latency: offering {a.latency_rate:,}/s for {a.latency_seconds}s")
            sent = asyncio.run(self._offer(workload, total, a.latency_rate))
            deadline = time.time() + 10
            while len(received) < total and time.time() < deadline:
                time.sleep(0.05)
        finally:
            proc.terminate()
            proc.wait(30)
            stop_listening.set()
            thread.join()
            listener.close()
        self.servers.drop(db_url)
        latencies = sorted((received[i] - sent[i]) * 1000 for i in sent if i in received)
        lost = total - len(latencies)
        self.correct &= lost == 0
        q = statistics.quantiles(latencies, n=100) if len(latencies) >= 2 else [float("nan")] * 99
        return Part(
            f"latency at {a.latency_rate:,}/s, publish → committed",
            total, a.latency_seconds, a.latency_rate,
            {"p50_ms": round(q[49], 2), "p99_ms": round(q[98], 2), "max_ms": round(latencies[-1], 2) if latencies else None,
             "missing": lost},
        )

    async def _offer(self, workload: Workload, total: int, rate: int) -> dict[int, float]:
        nc = await nats.connect(self.servers.nats_url)
        sent: dict[int, float] = {}
        tick = 0.005
        per_tick = max(1, int(rate * tick))
        start = time.monotonic()
        statuses: dict[str, int] = {}  # instance -> index of its last status in its choices
        for i in range(total):
            if i % per_tick == 0:
                await nc.flush()
                delay = start + (i // per_tick) * tick - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            instance, service_type = workload.instances[i % len(workload.instances)]
            _, _, choices, source = next(s for s in SHAPES if s[0] == service_type)
            status = choices[(statuses.get(instance, -1) + 1) % len(choices)]
            statuses[instance] = choices.index(status)
            body = _body(service_type, instance, status, source, 10_000_000 + i, message=f"b{i}")
            sent[i] = time.time()
            await nc.publish(f"{PREFIX}.{service_type}", body)
        await nc.flush()
        await nc.close()
        return sent

    # -- 6: what a duplicate costs ------------------------------------------------------

    def duplicate_cost(self) -> tuple[Part, Part]:
        a = self.args
        n = a.duplicate_events
        changes = make_workload(n, a.instances, 0.0, seed=11)
        changes_part = self.drain("duplicate cost: real changes", changes)
        # The same events, re-published: every one repeats the status already stored.
        dup_db = self.servers.fresh_database(changes)
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
        dup_part = self.drain("duplicate cost: same-status re-publishes", dups, db_url=dup_db)
        return changes_part, dup_part


def run(args: argparse.Namespace) -> int:
    work_dir = Path(tempfile.mkdtemp(prefix="dcmstatus-bench-"))
    servers = Servers(args.nats_url, args.database_url, work_dir)
    bench = Bench(args, servers, work_dir)
    started = time.monotonic()
    try:
        bench.say(f"generating {args.events:,} events over {args.instances:,} instances")
        workload = make_workload(args.events, args.instances, args.duplicate_ratio)
        drain = bench.drain("backlog drain (the service)", workload)
        bench.say(f"backlog drain: {drain.rate:,.0f} events/s")
        consume = bench.consume_only(workload)
        bench.say(f"consume only: {consume.rate:,.0f} events/s")
        write = bench.write_only(workload)
        bench.say(f"write only: {write.rate:,.0f} events/s")
        ref_workload = make_workload(args.reference_events, args.instances, args.duplicate_ratio)
        reference = bench.reference(ref_workload)
        bench.say(f"reference: {reference.rate:,.0f} events/s")
        latency = bench.latency()
        memory_workload = make_workload(args.memory_events, args.instances, args.duplicate_ratio, seed=3)
        memory = bench.drain("memory: large backlog drain", memory_workload)
        changes, dups = bench.duplicate_cost()
        bench.parts = [drain, consume, write, reference, latency, memory, changes, dups]
    finally:
        servers.close()
    ceiling = min(consume.rate, write.rate)
    summary = {
        "drain_events_per_s": round(drain.rate),
        "vs_reference": round(drain.rate / reference.rate, 1),
        "vs_lower_ceiling": round(drain.rate / ceiling, 2),
        "latency_p99_ms": latency.notes["p99_ms"],
        "peak_rss_mb_large_drain": memory.notes["peak_rss_mb"],
        "duplicate_cost_vs_change": round(changes.rate / dups.rate, 2),
        "correct": bench.correct,
        "wall_seconds": round(time.monotonic() - started, 1),
        "machine": f"{os.cpu_count()} cores, Python {sys.version.split()[0]}",
    }
    if args.json:
        print(json.dumps({"parts": [asdict(p) for p in bench.parts], "summary": summary}, indent=2))
    else:
        print(_table(bench.parts, summary))
    return 0 if bench.correct else 1


def _table(parts: list[Part], summary: dict) -> str:
    lines = [f"{'part':<56} {'events':>9} {'seconds':>8} {'events/s':>10}  notes", "-" * 110]
    for p in parts:
        notes = " ".join(f"{k}={v}" for k, v in p.notes.items())
        lines.append(f"{p.name:<56} {p.events:>9,} {p.seconds:>8.2f} {p.rate:>10,.0f}  {notes}")
    lines.append("-" * 110)
    lines.append(
        f"drain / reference = {summary['vs_reference']}x   drain / lower ceiling = {summary['vs_lower_ceiling']:.0%}   "
        f"p99 = {summary['latency_p99_ms']} ms   peak RSS = {summary['peak_rss_mb_large_drain']} MB   "
        f"a duplicate costs {summary['duplicate_cost_vs_change']:.2f} of a change   correct = {summary['correct']}"
    )
    lines.append(f"machine: {summary['machine']}; wall time {summary['wall_seconds']}s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dcmstatus bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))
