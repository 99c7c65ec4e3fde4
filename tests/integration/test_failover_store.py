"""PostgreSQL failover on a real primary with a synchronous standby
(dcmstatus.devtools.cluster.PgPair), below the service: the guarantee of
synchronous replication (docs/reliability.md#replication-and-failover), the
status writer finding the new primary after a write refused as read-only
(25006), and the API pool dropping connections of before a failover."""

from __future__ import annotations

import trio_asyncio  # noqa: F401  # isort: skip  # before psycopg (docs/architecture.md#import-order)

import os
import signal
import threading
import time
from datetime import UTC, datetime, timedelta

import psycopg
import psycopg_pool
import pytest

from dcmstatus.adapters.postgres.instances import CHECK_INTERVAL, check_connection
from dcmstatus.adapters.postgres.schema import migrate
from dcmstatus.adapters.postgres.writer import StatusStore
from dcmstatus.core.batching import WriteBatch
from dcmstatus.core.errors import StoreUnavailable
from dcmstatus.core.model import StatusUpdate
from dcmstatus.devtools.cluster import PgPair
from dcmstatus.devtools.embedded import create_database

T0 = datetime(2026, 4, 9, 13, 0, 0, tzinfo=UTC)


def _server_port(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute("SELECT inet_server_port()").fetchone()[0]


def test_a_commit_that_returned_is_on_the_promoted_standby_and_one_it_lacks_never_returns(pg_pair: PgPair):
    url = create_database(pg_pair.url, "sync")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
        for i in range(200):
            conn.execute("INSERT INTO t VALUES (%s)", (i,))  # each returned: committed, and acked by the standby
    standby = pg_pair.standby
    # The standby stops taking WAL (a network partition, a stalled disk): a
    # commit must now wait for it, never return as if it were safe. (Each
    # PostgreSQL process has a session of its own: the WAL receiver is
    # stopped by its pid.)
    [(receiver,)] = standby.sql("SELECT pid FROM pg_stat_wal_receiver")
    os.kill(receiver, signal.SIGSTOP)
    outcome: dict[str, object] = {}

    def late_commit() -> None:
        try:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("INSERT INTO t VALUES (1000)")
            outcome["returned"] = True
        except psycopg.Error as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=late_commit, daemon=True)
    try:
        thread.start()
        thread.join(1.5)
        assert "returned" not in outcome, "a commit returned that the standby never confirmed"
        pg_pair.primary.kill()  # the primary dies with that commit unconfirmed
        thread.join(10)
        assert "error" in outcome and "returned" not in outcome, outcome
    finally:
        os.kill(receiver, signal.SIGCONT)
    pg_pair.promote()
    # Read on the promoted standby itself. Row 1000 may be there or not: it
    # was never confirmed to its client, so never acked.
    with psycopg.connect(standby.url.rsplit("/", 1)[0] + "/sync") as conn:
        have = {row[0] for row in conn.execute("SELECT id FROM t")}
    assert set(range(200)) <= have  # nothing that returned is lost


def _batch(*updates: StatusUpdate) -> WriteBatch:
    return WriteBatch(0, list(updates), [], [], 0)


def _update(instance: str, status: str, second: int, seq: int) -> StatusUpdate:
    return StatusUpdate(instance, "vm", status, "", "test", None, T0 + timedelta(seconds=second), seq)


def _make_read_only_and_promote_the_standby(pair: PgPair) -> None:
    """The primary turns read-only for its sessions (as when it is being
    demoted) and the standby becomes the primary: the writer's connection to
    the old one is alive, but every write on it fails with 25006."""
    old = pair.primary
    old.sql("ALTER SYSTEM SET default_transaction_read_only = on")
    old.sql("SELECT pg_reload_conf()")
    new = pair.promote()
    new.set_synchronous(False)  # alone now: its old primary is no standby of it


def test_the_writer_finds_the_new_primary_after_a_write_refused_as_read_only(pg_pair: PgPair):
    url = create_database(pg_pair.url, "ro")
    migrate(url)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO service_type_instances (instance_id, service_type, created_at) VALUES ('vm1', 'vm', %s)",
            (T0 - timedelta(days=1),),
        )
    first_port = pg_pair.primary.port
    store = StatusStore(url)
    try:
        assert store.apply_sync(_batch(_update("vm1", "RUNNING", 1, 1))).applied == 1
        _make_read_only_and_promote_the_standby(pg_pair)
        with pytest.raises(StoreUnavailable, match="read-only"):
            store.apply_sync(_batch(_update("vm1", "STOPPED", 2, 2)))
        # The retry (what the pipeline does, acking nothing meanwhile) goes to the new primary.
        deadline = time.monotonic() + 20
        while True:
            try:
                result = store.apply_sync(_batch(_update("vm1", "STOPPED", 2, 2)))
                break
            except (StoreUnavailable, psycopg.Error):
                assert time.monotonic() < deadline, "the writer never reached the new primary"
                time.sleep(0.2)
        assert result.applied == 1
        assert store._conn is not None and store._conn.info.port != first_port
    finally:
        store.close()
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT status FROM service_type_instances").fetchone()[0] == "STOPPED"


def test_the_api_pool_drops_a_connection_to_a_server_that_turned_read_only(pg_pair: PgPair):
    url = create_database(pg_pair.url, "pool")
    first_port = pg_pair.primary.port
    with psycopg_pool.ConnectionPool(url, min_size=1, max_size=1, check=check_connection, open=True) as pool:
        with pool.connection() as conn:
            assert conn.info.port == first_port
        _make_read_only_and_promote_the_standby(pg_pair)
        # A connection checked within the check interval is handed out as it
        # is (a request on it fails as unavailable); past it, it is checked.
        time.sleep(CHECK_INTERVAL)
        with pool.connection() as conn:
            # The pooled connection to the old primary was dropped at checkout.
            assert conn.info.port == pg_pair.primary.port != first_port
            conn.execute("CREATE TABLE written_after_failover (x int)")
    assert _server_port(url) == pg_pair.primary.port
