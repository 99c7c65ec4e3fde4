"""The PostgreSQL write path (dcmstatus.store) and migrations against a real
PostgreSQL: the ordering guard, unknown instances, outputs, dead letters."""

from datetime import UTC, datetime, timedelta

import psycopg
import pytest
import trio_asyncio  # noqa: F401  # before psycopg (docs/architecture.md#import-order)

from dcmstatus.adapters.postgres.schema import migrate
from dcmstatus.adapters.postgres.writer import StatusStore
from dcmstatus.core.batching import BatchBuilder
from dcmstatus.core.model import Rejection, StatusUpdate

T0 = datetime(2026, 4, 9, 13, 8, 32, tzinfo=UTC)


def update(instance, status, second, seq, *, service_type="vm", message="", outputs=None):
    return StatusUpdate(instance, service_type, status, message, "kubevirt.localhost", outputs, T0 + timedelta(seconds=second), seq)


def batch_of(*decisions):
    builder = BatchBuilder(1)
    for i, d in enumerate(decisions):
        builder.add(d, f"tok{i}")
    [batch] = builder.take()
    return batch


@pytest.fixture
def db(database_url):
    migrate(database_url)
    with psycopg.connect(database_url, autocommit=True) as conn:
        for instance, service_type in [("vm1", "vm"), ("vm2", "vm"), ("c1", "container")]:
            conn.execute(
                # Created before the events (the predecessor guard ignores older ones).
                "INSERT INTO service_type_instances (instance_id, service_type, created_at) VALUES (%s, %s, %s)",
                (instance, service_type, T0 - timedelta(days=1)),
            )
    store = StatusStore(database_url, dead_letter_limit=5)
    yield store, database_url
    store.close()


def row(url, instance):
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT status, status_message, provider_name, outputs, status_time::text, status_seq "
            "FROM service_type_instances WHERE instance_id = %s",
            (instance,),
        ).fetchone()


def test_migrate_is_idempotent(database_url):
    assert migrate(database_url) == [
        "0001_initial", "0002_hot_status_updates", "0003_parked_events", "0004_status_changes",
        "0005_hot_status_changes",
    ]  # fmt: skip
    assert migrate(database_url) == []


# The columns the status writer sets (docs/database.md#hot-updates).
_WRITTEN = {"status", "status_message", "provider_name", "outputs", "status_time", "status_seq", "updated_at"}


def test_no_column_an_event_sets_is_indexed(db):
    # Otherwise a status change is no HOT update: a new entry in every index.
    _, url = db
    with psycopg.connect(url) as conn:
        indexed = {
            r[0]
            for r in conn.execute(
                "SELECT a.attname FROM pg_index AS i"
                " JOIN pg_attribute AS a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)"
                " WHERE i.indrelid = 'service_type_instances'::regclass"
            )
        }
    assert indexed and not indexed & _WRITTEN, indexed & _WRITTEN


def test_status_changes_and_republishes_are_hot_updates(db):
    store, url = db
    events = [update("vm1", "RUNNING", 1, 1), update("vm1", "RUNNING", 2, 2), update("vm1", "STOPPED", 3, 3)]
    for e in events:
        assert store.apply_sync(batch_of(e)).applied == 1
    store.close()  # its backend reports its counts as it exits
    deadline = datetime.now(UTC) + timedelta(seconds=20)
    with psycopg.connect(url, autocommit=True) as conn:
        while True:
            conn.execute("SELECT pg_stat_clear_snapshot()")
            upd, hot = conn.execute(
                "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables WHERE relname = 'service_type_instances'"
            ).fetchone()  # type: ignore[misc]
            if upd >= len(events) or datetime.now(UTC) > deadline:
                break
    assert (upd, hot) == (len(events), len(events))


def test_applies_newest_and_ignores_replays_and_late_events(db):
    store, url = db
    result = store.apply_sync(batch_of(update("vm1", "RUNNING", 10, 5, message="up")))
    assert (result.applied, result.stale, result.unknown) == (1, 0, ())
    assert row(url, "vm1")[:3] == ("RUNNING", "up", "kubevirt.localhost")

    # The same event again (redelivery), an older one (late), an equal time with a lower sequence.
    for late in (update("vm1", "RUNNING", 10, 5), update("vm1", "STOPPED", 9, 6), update("vm1", "FAILED", 10, 4)):
        result = store.apply_sync(batch_of(late))
        assert (result.applied, result.stale) == (0, 1)
    assert row(url, "vm1")[0] == "RUNNING"

    # Same time, later stream sequence: the tie-break lets it through.
    assert store.apply_sync(batch_of(update("vm1", "STOPPING", 10, 7))).applied == 1
    assert row(url, "vm1")[0] == "STOPPING"


def test_the_same_event_published_twice_is_a_duplicate_not_a_newer_event(db):
    store, url = db
    assert store.apply_sync(batch_of(update("vm1", "RUNNING", 10, 5, message="up"))).applied == 1
    # Same time and content, later stream sequence: a second publish of one event.
    result = store.apply_sync(batch_of(update("vm1", "RUNNING", 10, 9, message="up")))
    assert (result.applied, result.stale) == (0, 1)
    assert row(url, "vm1")[5] == 5
    # Same time, different content: the tie-break (stream sequence) decides.
    assert store.apply_sync(batch_of(update("vm1", "FAILED", 10, 9))).applied == 1


def test_unknown_instance_and_wrong_service_type_are_noops(db):
    store, url = db
    result = store.apply_sync(batch_of(update("nope", "RUNNING", 1, 1), update("c1", "RUNNING", 1, 2)))
    assert result.applied == 0
    assert sorted(result.unknown) == ["c1", "nope"]  # c1 is a container, not a vm
    assert row(url, "c1")[0] == "PROVISIONING"


def test_outputs_are_kept_when_an_event_has_none(db):
    store, url = db
    store.apply_sync(batch_of(update("vm2", "RUNNING", 1, 1, outputs=b'{"ip": "10.0.0.7"}')))
    store.apply_sync(batch_of(update("vm2", "STOPPED", 2, 2)))
    status, _, _, outputs, _, _ = row(url, "vm2")
    assert (status, outputs) == ("STOPPED", {"ip": "10.0.0.7"})


def test_dead_letters_are_bounded_to_the_newest(db):
    store, url = db
    for seq in range(1, 10):
        store.apply_sync(batch_of(Rejection("malformed_json", "not JSON", "dcm.vm", seq, None, b"{")))
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT stream_seq FROM rejected_events ORDER BY id").fetchall()
    # Bounded to the newest dead_letter_limit (5) rows.
    assert [r[0] for r in rows] == [5, 6, 7, 8, 9]


def test_hostile_rejection_fields_are_stored(db):
    store, url = db
    hostile = Rejection(
        "invalid_instance_id", "bad\x00id", "dcm.vm", 1, {"x-h\x00": "v\udc80"}, b"\x00\xff" * 10, "vm", "a\x00b"
    )
    store.apply_sync(batch_of(hostile))
    with psycopg.connect(url) as conn:
        detail, headers, body, instance_id = conn.execute(
            "SELECT detail, headers, body, instance_id FROM rejected_events"
        ).fetchone()
    assert "\x00" not in detail and "\x00" not in instance_id
    assert body == b"\x00\xff" * 10
    assert len(headers) == 1


def test_broken_connection_is_reopened(db):
    store, url = db
    store.apply_sync(batch_of(update("vm1", "RUNNING", 1, 1)))
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'dcmstatus-writer'"
        )
    with pytest.raises(psycopg.OperationalError):
        store.apply_sync(batch_of(update("vm1", "STOPPED", 2, 2)))
    # The retry (what the pipeline's writer does) gets a new connection.
    assert store.apply_sync(batch_of(update("vm1", "STOPPED", 2, 2))).applied == 1
