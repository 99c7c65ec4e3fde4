"""PostgreSQL's side of a drain, measured A/B in one run (docs/operations.md#postgresql-settings).

Runs the status writer's real batch statements (StatusStore.apply_sync) with
the batches a drain makes (the bench workload, coalesced per instance by
BatchBuilder, --batch-size messages per round, one shard per writer) against
embedded PostgreSQL servers, and reports per event: the writers' backend CPU
(/proc/<pg_backend_pid()>/stat), the whole server's CPU (postmaster, its live
children, and the children it reaped: checkpointer, WAL writer, autovacuum),
WAL bytes and full-page images (pg_stat_wal), and HOT updates.

Variants, each on a server of its own, interleaved round by round:

  base  a git ref's writer.py, migrations and embedded settings (default main)
  new   this tree's

Usage: PYTHONPATH=$PWD python scripts/pg_drain.py [--instances 10000,100000]
       [--events 200000] [--rounds 2] [--explain]
"""

from __future__ import annotations

import trio_asyncio  # noqa: F401  # isort: skip  # before psycopg (docs/architecture.md#import-order)

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import types
from pathlib import Path
from typing import Any

import psutil
import psycopg

from dcmstatus.adapters.postgres import schema as new_schema
from dcmstatus.adapters.postgres import writer as new_writer
from dcmstatus.core.batching import BatchBuilder, WriteBatch
from dcmstatus.core.catalog import Catalog
from dcmstatus.core.decoding import Decoder
from dcmstatus.devtools.bench import make_workload, seed_instances
from dcmstatus.devtools.embedded import EmbeddedPostgres, create_database, drop_database

ROOT = Path(__file__).resolve().parent.parent
_MIGRATIONS = "dcmstatus/adapters/postgres/migrations"


def _git(ref: str, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout


class Variant:
    def __init__(self, name: str, ref: str | None, work: Path, extra: str = "", settings: str = "") -> None:
        self.name = name
        self.extra = extra
        self.mid_checkpoint = name.endswith("+cp")
        if ref is None:
            self.writer: Any = new_writer
            self.migrations = [sql for _, sql in new_schema.migration_files()]
            server_cls: type[EmbeddedPostgres] = EmbeddedPostgres
        else:
            self.writer = types.ModuleType(f"writer_{name}")
            code = _git(ref, "show", f"{ref}:dcmstatus/adapters/postgres/writer.py")
            exec(compile(code, f"{ref}:writer.py", "exec"), self.writer.__dict__)
            files = sorted(_git(ref, "ls-tree", "--name-only", f"{ref}:{_MIGRATIONS}").split())
            self.migrations = [_git(ref, "show", f"{ref}:{_MIGRATIONS}/{f}") for f in files if f.endswith(".sql")]
            server_cls = _settings_of(ref)
        if settings:
            server_cls = _with_settings(server_cls, dict(kv.split("=", 1) for kv in settings.split(",")))
        self.server = server_cls(work / name.replace("+", "_"), fsync=True)

    def start(self) -> None:
        self.url = self.server.start()

    def stop(self) -> None:
        self.server.stop()

    def fresh_database(self, instances: list[tuple[str, str]]) -> str:
        name = f"drain_{self.name.replace('+', '_')}_{time.monotonic_ns()}"
        url = create_database(self.url, name)
        with psycopg.connect(url, autocommit=True) as conn:
            for sql in self.migrations:
                conn.execute(sql)
            if self.extra:
                conn.execute(self.extra)
            seed_instances(conn, instances)
            conn.execute("CHECKPOINT")  # the same start for every variant: first touches write full pages
        self._db = name
        return url

    def drop(self) -> None:
        drop_database(self.url, self._db)


def _settings_of(ref: str) -> type[EmbeddedPostgres]:
    """EmbeddedPostgres with the `-c` settings of `ref`'s embedded.py: this
    tree's argv, less the settings `ref` does not pass, plus those it does."""
    code = _git(ref, "show", f"{ref}:dcmstatus/devtools/embedded.py")
    mod = types.ModuleType("embedded_base")
    mod.__dict__["__name__"] = "embedded_base"
    exec(compile(code, f"{ref}:embedded.py", "exec"), mod.__dict__)
    base_cls = mod.EmbeddedPostgres

    class Base(EmbeddedPostgres):
        def _argv(self, port: int) -> list[str]:
            mine = super()._argv(port)
            probe = base_cls.__new__(base_cls)
            probe.__dict__.update(self.__dict__)
            probe._pick_socket_dir = lambda port: self._socket_dir  # type: ignore[method-assign]
            theirs = base_cls._argv(probe, port)
            return mine[:5] + theirs[5:]

    return Base


def _with_settings(cls: type[EmbeddedPostgres], settings: dict[str, str]) -> type[EmbeddedPostgres]:
    class Tuned(cls):  # type: ignore[valid-type,misc]
        def _argv(self, port: int) -> list[str]:
            argv = super()._argv(port)
            for k, v in settings.items():
                argv += ["-c", f"{k}={v}"]
            return argv

    return Tuned


def _server_cpu(pid: int) -> float:
    """CPU seconds of the postmaster, its reaped children and its live ones."""
    proc = psutil.Process(pid)
    t = proc.cpu_times()
    total = t.user + t.system + t.children_user + t.children_system
    for child in proc.children():
        try:
            c = child.cpu_times()
            total += c.user + c.system
        except psutil.NoSuchProcess:
            pass
    return total


def _stats(url: str) -> dict[str, float]:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_force_next_flush()")
        wal = conn.execute("SELECT wal_bytes, wal_fpi, wal_records FROM pg_stat_wal").fetchone()
        cp = conn.execute("SELECT num_timed + num_requested FROM pg_stat_checkpointer").fetchone()
        lsn = conn.execute("SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn").fetchone()
        return {
            "wal_bytes": float(lsn[0]),
            "wal_fpi": float(wal[1]),
            "wal_records": float(wal[2]),
            "checkpoints": float(cp[0]),
        }


def _table_stats(url: str) -> dict[str, float]:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT n_tup_upd, n_tup_hot_upd, pg_relation_size('service_type_instances'),"
            " pg_indexes_size('service_type_instances'),"
            " (SELECT count(*) FROM status_changes)"
            " FROM pg_stat_user_tables WHERE relname = 'service_type_instances'"
        ).fetchone()
        return {"upd": row[0], "hot": row[1], "heap": row[2], "idx": row[3], "changes": row[4]}


def _backend_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / psutil_ticks()


def psutil_ticks() -> int:
    import os

    return os.sysconf("SC_CLK_TCK")


def batches_of(messages: list[tuple[str, bytes]], writers: int, batch_size: int) -> list[list[WriteBatch]]:
    decoder = Decoder(Catalog.default())
    builder: BatchBuilder = BatchBuilder(writers)
    shards: list[list[WriteBatch]] = [[] for _ in range(writers)]
    for seq, (subject, body) in enumerate(messages, 1):
        builder.add(decoder.decode(subject, None, body, seq, 0), seq)
        if len(builder) >= batch_size:
            for batch in builder.take():
                shards[batch.shard].append(batch)
    for batch in builder.take():
        shards[batch.shard].append(batch)
    return shards


def drain(v: Variant, url: str, shards: list[list[WriteBatch]], n: int) -> dict[str, float]:
    stores = [v.writer.StatusStore(url) for _ in shards]
    pids = []
    for store in stores:
        store.apply_sync(WriteBatch(0, [], [], [], 0))  # connect before measuring
        pids.append(store._connection().info.backend_pid)  # pg_backend_pid(), without opening a transaction
    before, server0, backend0 = _stats(url), _server_cpu(v.server.pid), sum(map(_backend_cpu, pids))
    tables0 = _table_stats(url)
    t0 = time.monotonic()
    results: list[list[Any]] = [[] for _ in shards]

    def run(i: int) -> None:
        for k, b in enumerate(shards[i]):
            if v.mid_checkpoint and i == 0 and k == len(shards[i]) // 2:
                # What a checkpoint falling inside the drain costs (the
                # server's own come every checkpoint_timeout or max_wal_size).
                with psycopg.connect(url, autocommit=True) as c:
                    c.execute("CHECKPOINT")
            results[i].append(stores[i].apply_sync(b))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(shards))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.monotonic() - t0
    backend = sum(map(_backend_cpu, pids)) - backend0
    server = _server_cpu(v.server.pid) - server0
    after = _stats(url)
    tables = _table_stats(url)
    plans = (
        stores[0]
        ._connection()
        .execute("SELECT coalesce(sum(generic_plans), 0), coalesce(sum(custom_plans), 0) FROM pg_prepared_statements")
        .fetchone()
    )
    for store in stores:
        store.close()
    applied = sum(r.applied for rs in results for r in rs)
    rows = sum(len(b.updates) for s in shards for b in s)
    return {
        "seconds": seconds,
        "backend_us": backend / n * 1e6,
        "server_us": server / n * 1e6,
        "wal_b": (after["wal_bytes"] - before["wal_bytes"]) / n,
        "fpi_per_kev": (after["wal_fpi"] - before["wal_fpi"]) / n * 1000,
        "checkpoints": after["checkpoints"] - before["checkpoints"],
        "rows": rows,
        "applied": applied,
        "hot_pct": 100 * (tables["hot"] - tables0["hot"]) / max(1, tables["upd"] - tables0["upd"]),
        "heap_mb": tables["heap"] / 2**20,
        "idx_mb": tables["idx"] / 2**20,
        "changes": tables["changes"],
        "generic": plans[0],
        "custom": plans[1],
    }


def generic_plan(v: Variant, url: str) -> str:
    """EXPLAIN (GENERIC_PLAN): the plan the writer's prepared statement ends up with."""
    import re

    names: list[str] = []

    def dollar(m: re.Match[str]) -> str:
        if m.group(1) not in names:
            names.append(m.group(1))
        return f"${names.index(m.group(1)) + 1}"

    sql = re.sub(r"%\((\w+)\)[bs]", dollar, v.writer._APPLY_UPDATES)
    with psycopg.connect(url, autocommit=True) as conn:
        res = conn.pgconn.exec_(("EXPLAIN (GENERIC_PLAN) " + sql).encode())
        return "\n".join(res.get_value(i, 0).decode() for i in range(res.ntuples))


def explain(v: Variant, url: str, batch: WriteBatch) -> str:
    """EXPLAIN (ANALYZE, BUFFERS, WAL) of one batch's statement, rolled back."""
    store = v.writer.StatusStore(url)
    conn = store._connection()
    params = {**v.writer._event_params(batch.updates), "skew": store._skew}
    try:
        with conn.transaction(force_rollback=True):
            rows = conn.execute("EXPLAIN (ANALYZE, BUFFERS, WAL) " + v.writer._APPLY_UPDATES, params).fetchall()
    finally:
        store.close()
    return "\n".join(r[0] for r in rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--instances", default="10000,100000")
    p.add_argument("--events", type=int, default=200_000)
    p.add_argument("--duplicates", type=float, default=0.5, help="share of same-status re-publishes")
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--writers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--base", default="main", help="git ref of the baseline")
    p.add_argument("--only", default="base,new", help="variants: base, new; a +cp suffix checkpoints mid-drain")
    p.add_argument("--extra", default="", help="SQL run on the new variant's database after its migrations")
    p.add_argument("--set", default="", help="k=v,... more settings of the new variant's server")
    p.add_argument("--explain", action="store_true", help="print EXPLAIN of a batch from the drain's middle")
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pg-drain-"))
    variants = [
        Variant(name, a.base, work) if name.startswith("base") else Variant(name, None, work, a.extra, a.set)
        for name in a.only.split(",")
    ]
    for v in variants:
        v.start()
    out: dict[tuple[str, int], list[dict[str, float]]] = {}
    try:
        for count in map(int, a.instances.split(",")):
            w = make_workload(a.events, count, a.duplicates)
            for r in range(a.rounds):
                for v in variants if r % 2 == 0 else variants[::-1]:
                    url = v.fresh_database(w.instances)
                    shards = batches_of(w.messages, a.writers, a.batch_size)
                    if a.explain and r == 0:
                        # apply the first half, explain the next batch, start again
                        half = len(shards[0]) // 2
                        first = [s[:half] for s in shards]
                        rest = [s[half:] for s in shards]
                        drain(v, url, first, 1)
                        print(f"--- {v.name} {count} instances: EXPLAIN of a batch of {len(rest[0][0].updates)} rows")
                        print(explain(v, url, rest[0][0]), flush=True)
                        print(f"--- generic plan:\n{generic_plan(v, url)}", flush=True)
                        v.drop()
                        url = v.fresh_database(w.instances)
                    res = drain(v, url, shards, len(w.messages))
                    out.setdefault((v.name, count), []).append(res)
                    print(
                        f"{v.name:5} {count:>7} round {r}: " + " ".join(f"{k}={val:.4g}" for k, val in res.items()),
                        flush=True,
                    )
                    v.drop()
        print("\nmedian of rounds, per event:")
        print(
            f"{'variant':8}{'instances':>10}{'backend µs':>12}{'server µs':>11}{'WAL B':>8}{'FPI/1k':>8}{'HOT %':>7}{'s':>7}"
        )
        for (name, count), rs in out.items():
            med = {k: sorted(r[k] for r in rs)[len(rs) // 2] for k in rs[0]}
            print(
                f"{name:8}{count:>10}{med['backend_us']:>12.2f}{med['server_us']:>11.2f}{med['wal_b']:>8.0f}"
                f"{med['fpi_per_kev']:>8.1f}{med['hot_pct']:>7.1f}{med['seconds']:>7.2f}"
            )
        counts = sorted({c for _, c in out})
        if len(counts) == 2:
            for name in {n for n, _ in out}:
                lo, hi = (sorted(r["server_us"] for r in out[(name, c)])[len(out[(name, c)]) // 2] for c in counts)
                blo, bhi = (sorted(r["backend_us"] for r in out[(name, c)])[len(out[(name, c)]) // 2] for c in counts)
                print(f"{name}: {counts[1]}/{counts[0]} instances: server {hi / lo:.2f}x, backend {bhi / blo:.2f}x")
    finally:
        for v in variants:
            v.stop()
        shutil.rmtree(work, ignore_errors=True)  # the servers' data dirs


if __name__ == "__main__":
    sys.exit(main())
