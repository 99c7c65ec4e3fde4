"""The scale figures (scripts/scale.py, docs/performance.md#replicas): backlog
drain throughput with 1, 2, 3... consumer replicas sharing one durable.

For each replica count, in ONE run on the machine at hand: a fresh database
and a fresh stream holding the whole backlog (published while no replica
runs), then N `dcmstatus serve --role consumer` processes started while the
durable consumer is paused (NATS 2.11+), so that they all begin together;
timed from its resumption to the durable fully acknowledged, then
every row checked against the newest event of its instance. Besides the wall
time it reports what travels between machines: the CPU-seconds the replicas,
nats-server and PostgreSQL spent per event (embedded servers only: their
processes are ours to measure), how busy the machine's cores were, and how
the replicas shared the work. Counts are taken in an interleaved order
(1, 2, 3, 3, 2, 1 with --repeat 2) so that a drift of the shared machine
does not favour one count.

It starts embedded servers (PostgreSQL with fsync on, as in production)
unless given `--nats-url` and `--database-url` (e.g. a cluster): it then works
on its own databases and its own stream (that of the bench, `dcmbench.*`).
"""

from __future__ import annotations

import trio_asyncio  # isort: skip  # noqa: F401  # before psycopg (docs/architecture.md#import-order)

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import nats
import nats.js.errors
import psutil
import psycopg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from dcmstatus.config import ServeConfig
from dcmstatus.devtools.bench import PREFIX, STREAM, Servers, Workload, make_workload

DURABLE = "scale"


@dataclass
class Drain:
    replicas: int
    events: int
    seconds: float  # the durable resumed, every replica subscribed → the durable fully acknowledged
    rate: float  # events/s
    start_skew: float  # seconds between the first and the last replica subscribed (the durable paused meanwhile)
    replica_cpu: float  # CPU-seconds of all replicas during the drain
    nats_cpu: float | None  # of nats-server (embedded only)
    postgres_cpu: float | None  # of PostgreSQL, its backends included (embedded only)
    busy_cores: float  # the machine's busy CPU-seconds per wall second during the drain

    @property
    def own_cores(self) -> float | None:
        """CPU-seconds per wall second that the drain itself got (replicas,
        nats-server, PostgreSQL): on a shared machine, less than busy_cores."""
        if self.nats_cpu is None or self.postgres_cpu is None:
            return None
        return (self.replica_cpu + self.nats_cpu + self.postgres_cpu) / self.seconds
    shares: list[int] = field(default_factory=list)  # messages each replica received
    # Failed (and retried) batch commits, all replicas: replicas that update
    # the same rows at once can deadlock, which PostgreSQL breaks after its
    # deadlock_timeout (1 s by default), and the loser retries.
    retried_commits: int = 0
    correct: bool = False


def _cpu_seconds(pid: int) -> float:
    """CPU-seconds of a process: its own, its reaped children's and its live
    descendants' (PostgreSQL's backends)."""
    try:
        process = psutil.Process(pid)
        times = process.cpu_times()
        total = times.user + times.system + times.children_user + times.children_system
        for child in process.children(recursive=True):
            try:
                child_times = child.cpu_times()
                total += child_times.user + child_times.system
            except psutil.NoSuchProcess:
                pass
        return total
    except psutil.NoSuchProcess:
        return 0.0


def _busy_seconds() -> float:
    """CPU-seconds the whole machine spent busy so far (every core)."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


async def _consumer_state(url: str) -> tuple[int, int] | None:
    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().consumer_info(STREAM, DURABLE)
        return info.num_pending, info.num_ack_pending
    except nats.js.errors.NotFoundError:
        return None
    finally:
        await nc.close()


async def _paused_consumer(url: str) -> None:
    """The durable as `serve` would create it (so that no replica updates it),
    paused for up to 10 minutes."""
    defaults = ServeConfig()
    config = ConsumerConfig(
        durable_name=DURABLE,
        ack_policy=AckPolicy.EXPLICIT,
        deliver_policy=DeliverPolicy.ALL,
        filter_subject=f"{PREFIX}.*",
        ack_wait=defaults.ack_wait,
        max_ack_pending=max(defaults.max_in_flight * 2, 1000),
    )
    until = (datetime.now(UTC) + timedelta(minutes=10)).isoformat().replace("+00:00", "Z")
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await js.add_consumer(STREAM, config)
        await js.pause_consumer(STREAM, DURABLE, until)
    finally:
        await nc.close()


async def _resume(url: str) -> bool:
    """Resume the durable; whether it was still paused."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        paused = bool((await js.consumer_info(STREAM, DURABLE)).paused)
        await js.resume_consumer(STREAM, DURABLE)
        return paused
    finally:
        await nc.close()


def _counters(http_url: str) -> dict[str, int]:
    """The unlabelled counters of a replica's /metrics."""
    with urllib.request.urlopen(http_url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        line.split()[0]: int(float(line.split()[1]))
        for line in text.splitlines()
        if line.startswith("dcmstatus_") and "{" not in line.split()[0] and line.split()[0].endswith("_total")
    }


class Scale:
    def __init__(self, args: argparse.Namespace, servers: Servers, work_dir: Path) -> None:
        self.args = args
        self.servers = servers
        self.work_dir = work_dir

    def say(self, text: str) -> None:
        print(f"[scale] {text}", file=sys.stderr, flush=True)

    def _server_pids(self) -> tuple[int | None, int | None]:
        """nats-server's and PostgreSQL's pids, when they are our embedded ones."""
        embedded = getattr(self.servers, "_embedded", [])
        if len(embedded) != 2:
            return None, None
        return embedded[0].pid, embedded[1].pid

    def _start(self, db_url: str, index: int) -> tuple[subprocess.Popen[bytes], Path]:
        a = self.args
        data_dir = self.work_dir / f"replica-{index}-{uuid.uuid4().hex[:6]}"
        data_dir.mkdir()
        log_path = data_dir / "serve.log"
        # The URLs carry the servers' secrets: through the environment, not
        # the command line that every local user can read.
        proc = subprocess.Popen(
            [sys.executable, "-m", "dcmstatus", "serve", "--role", "consumer", "--stream", STREAM,
             "--subjects", f"{PREFIX}.*", "--durable", DURABLE, "--http-port", "0", "--data-dir", str(data_dir),
             "--writers", str(a.writers), "--batch-size", str(a.batch_size), "--log-level", "WARNING"],
            stdout=log_path.open("w"), stderr=subprocess.STDOUT,
            env={**os.environ, "DCMSTATUS_NATS_URL": self.servers.nats_url, "DCMSTATUS_DATABASE_URL": db_url},
        )  # fmt: skip
        return proc, data_dir

    def drain(self, replicas: int, workload: Workload) -> Drain:
        db_url = self.servers.fresh_database(workload.instances)
        self.servers.fresh_stream(workload.messages)
        n = len(workload.messages)
        self.say(f"{replicas} replica(s): {n:,} events published; starting them")
        nats_pid, pg_pid = self._server_pids()
        # The durable waits paused while the replicas start, so that they all
        # begin together: else the first one up drains a share alone.
        asyncio.run(_paused_consumer(self.servers.nats_url))
        procs = [self._start(db_url, i) for i in range(replicas)]
        ready: dict[int, float] = {}  # replica → when it was subscribed (serve writes runtime.json then)
        http_urls: dict[int, str] = {}
        try:
            while len(ready) < replicas:
                for i, (proc, data_dir) in enumerate(procs):
                    if proc.poll() is not None:
                        raise RuntimeError(f"serve exited:\n{(data_dir / 'serve.log').read_text()}")
                    if i not in ready and (data_dir / "runtime.json").exists():
                        ready[i] = time.monotonic()
                        http_urls[i] = json.loads((data_dir / "runtime.json").read_text())["http_url"]
                time.sleep(0.02)
            cpu_start = [_cpu_seconds(proc.pid) for proc, _ in procs]
            busy_start = _busy_seconds()
            nats_start = _cpu_seconds(nats_pid) if nats_pid else 0.0
            pg_start = _cpu_seconds(pg_pid) if pg_pid else 0.0
            started = time.monotonic()
            if not asyncio.run(_resume(self.servers.nats_url)):
                raise RuntimeError("the durable was no longer paused when every replica was up: a replica changed it")
            while asyncio.run(_consumer_state(self.servers.nats_url)) != (0, 0):
                for proc, data_dir in procs:
                    if proc.poll() is not None:
                        raise RuntimeError(f"serve exited:\n{(data_dir / 'serve.log').read_text()}")
                time.sleep(0.02)
            seconds = time.monotonic() - started
            busy = _busy_seconds() - busy_start
            replica_cpu = sum(_cpu_seconds(proc.pid) - cpu_start[i] for i, (proc, _) in enumerate(procs))
            nats_cpu = _cpu_seconds(nats_pid) - nats_start if nats_pid else None
            pg_cpu = _cpu_seconds(pg_pid) - pg_start if pg_pid else None
            counters = [_counters(http_urls[i]) if i in http_urls else {} for i in range(replicas)]
            shares = [c.get("dcmstatus_events_received_total", 0) for c in counters]
            retried = sum(c.get("dcmstatus_db_errors_total", 0) for c in counters)
        finally:
            for proc, _ in procs:
                proc.terminate()
            for proc, _ in procs:
                proc.wait(30)
        with psycopg.connect(db_url) as conn:
            rows = conn.execute("SELECT instance_id, status FROM service_type_instances").fetchall()
        statuses: dict[str, str] = dict(rows)
        correct = statuses == {i: workload.expected.get(i, "PROVISIONING") for i, _ in workload.instances}
        self.servers.drop(db_url)
        return Drain(
            replicas, n, seconds, n / seconds, max(ready.values()) - min(ready.values()) if ready else 0.0,
            replica_cpu, nats_cpu, pg_cpu, busy / seconds, shares, retried, correct,
        )  # fmt: skip


def _order(counts: list[int], repeat: int) -> list[int]:
    """1, 2, 3, then 3, 2, 1, ...: every count sees early and late machine states alike."""
    out: list[int] = []
    for r in range(repeat):
        out += counts if r % 2 == 0 else counts[::-1]
    return out


def _per_100k(cpu: float | None, events: int) -> str:
    return "—" if cpu is None else f"{cpu * 100_000 / events:.1f}"


def table(drains: list[Drain], machine: str) -> str:
    by_count: dict[int, list[Drain]] = {}
    for d in drains:
        by_count.setdefault(d.replicas, []).append(d)
    base = statistics.median(d.rate for d in by_count[min(by_count)])
    header = (
        f"{'replicas':>8} {'events':>9} {'seconds':>8} {'events/s':>9} {'vs 1':>5} {'skew s':>6} "
        f"{'busy cores':>10} {'ours':>5}  {'CPU-s per 100k events: replicas':>31} {'nats':>5} {'pg':>5}  {'shares':<11} "
        "retried  correct"
    )
    lines = [header, "-" * len(header)]
    for d in drains:
        shares = "/".join(f"{s / d.events:.0%}" for s in d.shares)
        lines.append(
            f"{d.replicas:>8} {d.events:>9,} {d.seconds:>8.2f} {d.rate:>9,.0f} {d.rate / base:>5.2f} "
            f"{d.start_skew:>6.2f} {d.busy_cores:>10.2f} {'—' if d.own_cores is None else f'{d.own_cores:.2f}':>5}  "
            f"{_per_100k(d.replica_cpu, d.events):>31} "
            f"{_per_100k(d.nats_cpu, d.events):>5} {_per_100k(d.postgres_cpu, d.events):>5}  {shares:<11} "
            f"{d.retried_commits:>7}  {d.correct}"
        )
    lines.append("-" * len(header))
    medians = "   ".join(
        f"{n}: {statistics.median(d.rate for d in ds):,.0f}/s ({statistics.median(d.rate for d in ds) / base:.2f}x)"
        for n, ds in sorted(by_count.items())
    )
    lines.append(f"median drain rate by replicas  {medians}")
    lines.append(f"machine: {machine}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    work_dir = Path(tempfile.mkdtemp(prefix="dcmstatus-scale-"))
    servers = Servers(args.nats_url, args.database_url, work_dir, window=2000)
    scale = Scale(args, servers, work_dir)
    counts = [int(c) for c in args.replicas.split(",")]
    drains: list[Drain] = []
    try:
        scale.say(f"generating {args.events:,} events over {args.instances:,} instances")
        workload = make_workload(args.events, args.instances, args.duplicate_ratio)
        for replicas in _order(counts, args.repeat):
            drain = scale.drain(replicas, workload)
            scale.say(f"{replicas} replica(s): {drain.rate:,.0f} events/s, correct={drain.correct}")
            drains.append(drain)
    finally:
        servers.close()
    machine = f"{os.cpu_count()} cores, Python {sys.version.split()[0]}, load average {os.getloadavg()[0]:.1f}"
    if args.json:
        rows = [{**asdict(d), "own_cores": d.own_cores} for d in drains]
        print(json.dumps({"drains": rows, "machine": machine}, indent=2))
    else:
        print(table(drains, machine))
    return 0 if all(d.correct for d in drains) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/scale.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--replicas", default="1,2,3", help="replica counts to measure, comma-separated [default 1,2,3]")
    parser.add_argument("--repeat", type=int, default=2, help="rounds over the counts, alternating order [default 2]")
    parser.add_argument("--events", type=int, default=200_000, help="backlog size [default 200000]")
    parser.add_argument("--instances", type=int, default=10_000, help="instances the events spread over [default 10000]")
    parser.add_argument("--duplicate-ratio", type=float, default=0.5, help="share of same-status re-publishes [default 0.5]")
    parser.add_argument("--writers", type=int, default=2, help="each replica's --writers [default 2]")
    parser.add_argument("--batch-size", type=int, default=1000, help="each replica's --batch-size [default 1000]")
    parser.add_argument("--nats-url", help="use this NATS server or cluster (default: start an embedded one)")
    parser.add_argument("--database-url", help="use this PostgreSQL server; the script creates and drops its own databases")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = parser.parse_args(argv)
    if bool(args.nats_url) != bool(args.database_url):
        parser.error("give both --nats-url and --database-url, or neither (embedded servers)")
    return run(args)
