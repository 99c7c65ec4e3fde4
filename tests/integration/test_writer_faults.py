"""The real status writer under faults the database makes: an event it
refuses (a trigger's RAISE) with an older valid event of the same instance in
the same batch, and a connection closed while a statement runs on it."""

from __future__ import annotations

import trio_asyncio  # noqa: F401  # isort: skip  # before psycopg (docs/architecture.md#import-order)

import threading
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
import trio

from dcmstatus.adapters.postgres.schema import migrate
from dcmstatus.adapters.postgres.writer import StatusStore
from dcmstatus.core.batching import BatchBuilder
from dcmstatus.core.model import Delivery, StatusUpdate
from dcmstatus.engine.metrics import Metrics
from dcmstatus.engine.pipeline import Pipeline, PipelineSettings

T0 = datetime(2026, 4, 9, 13, 0, 0, tzinfo=UTC)


def decode(subject, headers, body, seq, time_ns):
    """b"<instance>:<status>:<second>" → an update of a vm."""
    instance, status, second = body.decode().split(":")
    return StatusUpdate(instance, "vm", status, "", "test", None, T0 + timedelta(seconds=int(second)), seq)


class AckRecorder:
    def __init__(self) -> None:
        self.acked: list[str] = []

    async def ack(self, tokens):
        self.acked.extend(tokens)


@pytest.fixture
def refusing_db(database_url):
    """A database whose trigger refuses status FAILED for vm1."""
    migrate(database_url)
    with psycopg.connect(database_url, autocommit=True) as conn:
        # Created before the events (T0): the predecessor guard ignores events
        # dated before a row's creation minus the clock skew.
        conn.execute(
            "INSERT INTO service_type_instances (instance_id, service_type, created_at)"
            " VALUES ('vm1', 'vm', %s), ('vm2', 'vm', %s)",
            (T0, T0),
        )
        conn.execute(
            """CREATE FUNCTION refuse_failed() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN
                 IF NEW.status = 'FAILED' THEN RAISE EXCEPTION 'FAILED refused for %', NEW.instance_id; END IF;
                 RETURN NEW;
               END $$"""
        )
        conn.execute(
            "CREATE TRIGGER refuse_failed BEFORE UPDATE ON service_type_instances"
            " FOR EACH ROW EXECUTE FUNCTION refuse_failed()"
        )
    return database_url


def status_of(url: str, instance: str) -> tuple:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT status, status_seq FROM service_type_instances WHERE instance_id = %s", (instance,)
        ).fetchone()


async def test_refused_newest_event_falls_back_to_the_older_valid_one(refusing_db):
    store = StatusStore(refusing_db)
    source = AckRecorder()
    metrics = Metrics()
    settings = PipelineSettings(max_batch=100, writers=1, retry_initial=0.01, poison_attempts=2)
    pipeline = Pipeline(decode, source, [store], metrics, settings)
    send, receive = trio.open_memory_channel[Delivery](float("inf"))
    bodies = [b"vm1:STARTING:1", b"vm1:RUNNING:2", b"vm1:FAILED:3", b"vm2:RUNNING:1"]
    for seq, body in enumerate(bodies, start=1):
        send.send_nowait(Delivery("dcm.vm", None, body, seq, 0, f"ack-{seq}"))  # all in one batch
    await send.aclose()
    try:
        await pipeline.run(receive)
    finally:
        store.close()
    assert status_of(refusing_db, "vm1") == ("RUNNING", 2), "the newest valid event was acked but not applied"
    assert status_of(refusing_db, "vm2") == ("RUNNING", 4)
    with psycopg.connect(refusing_db) as conn:
        dead = conn.execute("SELECT reason, instance_id, stream_seq FROM rejected_events").fetchall()
    assert dead == [("invalid_data", "vm1", 3)]
    assert sorted(source.acked) == [f"ack-{s}" for s in range(1, 5)]
    assert metrics.registry.get_sample_value("dcmstatus_events_applied_total") == 2
    assert metrics.registry.get_sample_value("dcmstatus_events_noop_total") == 1


def test_close_while_a_statement_runs_cancels_it_and_the_owner_closes_the_connection(database_url):
    """At the end of the grace period a writer thread may be abandoned in the
    middle of a statement; closing its connection from another thread must
    not pull the connection from under it."""
    migrate(database_url)
    with psycopg.connect(database_url, autocommit=True) as setup:
        # Created at T0, so the event (dated T0) passes the predecessor guard
        # and the UPDATE really reaches the row and waits for its lock.
        setup.execute(
            "INSERT INTO service_type_instances (instance_id, service_type, created_at) VALUES ('vm1', 'vm', %s)",
            (T0,),
        )
    store = StatusStore(database_url)
    builder = BatchBuilder(1)
    builder.add(StatusUpdate("vm1", "vm", "RUNNING", "", "test", None, T0, 1), "tok")
    [batch] = builder.take()
    outcome: list[BaseException | object] = []

    def write() -> None:
        try:
            outcome.append(store.apply_sync(batch))
        except BaseException as exc:
            outcome.append(exc)

    with psycopg.connect(database_url) as locker:
        locker.execute("SELECT 1 FROM service_type_instances WHERE instance_id = 'vm1' FOR UPDATE")
        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        with psycopg.connect(database_url, autocommit=True) as watcher:
            deadline = 200
            # A row lock: waiting on the locker's transaction (or the tuple),
            # not on the status_changes advisory lock, which nobody holds here.
            while not watcher.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'dcmstatus-writer'"
                " AND wait_event_type = 'Lock' AND wait_event IN ('transactionid', 'tuple')"
            ).fetchone()[0]:
                deadline -= 1
                assert deadline, "the writer never blocked on the row lock"
                threading.Event().wait(0.05)
        store.close()
        writer.join(30)  # a timeout only: the lock is still held, so only a cancel can end the statement
        assert not writer.is_alive(), "close() left the running statement running"
        locker.rollback()
    [result] = outcome
    assert isinstance(result, psycopg.errors.QueryCanceled), result
    assert store._conn is None, "the connection was left open"
    assert status_of(database_url, "vm1")[0] == "PROVISIONING"
    with pytest.raises(Exception, match="closed"):
        store.apply_sync(batch)


def test_the_api_pool_bounds_every_statement_and_keeps_tcp_alive(database_url):
    """A database that stops answering mid-request must not hold an API
    worker thread for ever: statement timeout and TCP keepalives."""
    from dcmstatus.config import ServeConfig
    from dcmstatus.core.catalog import Catalog
    from dcmstatus.service import Service

    config = ServeConfig(nats_url="nats://127.0.0.1:4222", database_url=database_url)
    service = Service(config, config.nats_url, database_url, Catalog.default(), b"test page-token secret")
    service.api_pool.open(wait=True)
    try:
        with service.api_pool.connection() as conn:
            assert conn.execute("SHOW statement_timeout").fetchone() == ("5s",)
            assert conn.info.get_parameters()["keepalives"] == "1"
    finally:
        service.api_pool.close()
