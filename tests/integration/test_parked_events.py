"""Events that beat their row (parked events), tombstones and the predecessor
guard, against a real PostgreSQL (docs/database.md#parked-events).

Event times here are real ones (around now): parking and the predecessor
guard are about time relative to the rows' creation.
"""

import threading
import time
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
import trio

import trio_asyncio  # noqa: F401  # isort: skip

from http_harness import BASE, serve_api

from dcmstatus.adapters.postgres.schema import migrate
from dcmstatus.adapters.postgres.writer import StatusStore
from dcmstatus.core.batching import BatchBuilder
from dcmstatus.core.model import StatusUpdate


def now() -> datetime:
    return datetime.now(UTC)


def event(instance, status, *, at=None, seq=1, service_type="vm", message=""):
    return StatusUpdate(instance, service_type, status, message, "kubevirt", None, at or now(), seq)


def batch_of(*decisions):
    builder = BatchBuilder(1)
    for i, d in enumerate(decisions):
        builder.add(d, f"tok{i}")
    [batch] = builder.take()
    return batch


def sql(url, query, params=None):
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


def status_of(url, instance):
    rows = sql(url, "SELECT status FROM service_type_instances WHERE instance_id = %s", (instance,))
    return rows[0][0] if rows else None


@pytest.fixture
def store(database_url):
    migrate(database_url)
    store = StatusStore(database_url, parked_ttl=timedelta(minutes=5), max_clock_skew=timedelta(minutes=5))
    yield store, database_url
    store.close()


def test_an_event_before_its_row_is_applied_when_the_row_is_inserted_by_sql(store):
    store, url = store
    result = store.apply_sync(batch_of(event("early", "RUNNING", message="up")))
    assert (result.applied, result.unknown, result.parked) == (0, ("early",), 1)
    assert status_of(url, "early") is None
    # Any writer of the table, not only our API: the trigger applies it.
    sql(url, "INSERT INTO service_type_instances (instance_id, service_type) VALUES ('early', 'vm')")
    assert sql(url, "SELECT status, status_message, provider_name FROM service_type_instances")[0] == (
        "RUNNING", "up", "kubevirt",
    )
    assert sql(url, "SELECT count(*) FROM parked_events")[0][0] == 0


async def test_an_event_before_its_row_is_applied_when_the_api_creates_it_later(store):
    store, url = store
    assert store.apply_sync(batch_of(event("vm-late", "RUNNING"))).parked == 1
    await trio.sleep(2)
    async with serve_api(url) as api:
        created = await api.create("vm-late")
        assert created["status"] == "RUNNING"
        assert (await api.request("GET", f"{BASE}/vm-late")).json()["status"] == "RUNNING"


def test_only_the_newest_parked_event_is_kept(store):
    store, url = store
    t = now()
    store.apply_sync(batch_of(event("x", "RUNNING", at=t, seq=5)))
    store.apply_sync(batch_of(event("x", "PROVISIONING", at=t - timedelta(seconds=1), seq=9)))  # older: ignored
    store.apply_sync(batch_of(event("x", "STOPPING", at=t, seq=4)))  # same time, lower sequence: ignored
    sql(url, "INSERT INTO service_type_instances (instance_id, service_type) VALUES ('x', 'vm')")
    assert status_of(url, "x") == "RUNNING"


def test_a_parked_event_of_another_service_type_is_not_applied(store):
    store, url = store
    store.apply_sync(batch_of(event("c", "RUNNING", service_type="vm")))
    sql(url, "INSERT INTO service_type_instances (instance_id, service_type) VALUES ('c', 'container')")
    assert status_of(url, "c") == "PROVISIONING"


def test_an_expired_parked_event_is_not_applied_and_is_counted(database_url):
    migrate(database_url)
    store = StatusStore(database_url, parked_ttl=timedelta(seconds=1))
    try:
        assert store.apply_sync(batch_of(event("slow", "RUNNING"))).parked == 1
        time.sleep(1.5)
        # The next parking batch prunes what ran out, and says how much.
        result = store.apply_sync(batch_of(event("other", "RUNNING")))
        assert (result.parked, result.parked_expired) == (1, 1)
        sql(database_url, "INSERT INTO service_type_instances (instance_id, service_type) VALUES ('slow', 'vm')")
        assert status_of(database_url, "slow") == "PROVISIONING"
    finally:
        store.close()


def test_an_event_too_old_for_any_new_row_is_not_parked(store):
    store, url = store
    result = store.apply_sync(batch_of(event("ancient", "RUNNING", at=now() - timedelta(hours=1))))
    assert (result.parked, result.unknown) == (0, ("ancient",))
    assert sql(url, "SELECT count(*) FROM parked_events")[0][0] == 0


def test_parking_is_bounded_oldest_first(database_url):
    migrate(database_url)
    store = StatusStore(database_url, parked_limit=3)
    try:
        evicted = 0
        for n in range(6):
            evicted += store.apply_sync(batch_of(event(f"p{n}", "RUNNING"))).parked_evicted
        kept = [r[0] for r in sql(database_url, "SELECT instance_id FROM parked_events ORDER BY id")]
        assert kept == ["p3", "p4", "p5"]
        assert evicted == 3
    finally:
        store.close()


def test_a_trailing_event_of_a_deleted_instance_never_reaches_its_successor(store):
    store, url = store
    sql(url, "INSERT INTO service_type_instances (instance_id, service_type) VALUES ('reused', 'vm')")
    assert store.apply_sync(batch_of(event("reused", "RUNNING", seq=1))).applied == 1
    sql(url, "DELETE FROM service_type_instances WHERE instance_id = 'reused'")
    # DCM removed the row; the provider's last word arrives afterwards.
    result = store.apply_sync(batch_of(event("reused", "DELETED", seq=2)))
    assert (result.parked, result.after_delete, result.unknown) == (0, 1, ("reused",))
    sql(url, "INSERT INTO service_type_instances (instance_id, service_type) VALUES ('reused', 'vm')")
    assert status_of(url, "reused") == "PROVISIONING"


def test_a_replay_after_the_id_is_recreated_leaves_the_new_row_alone(store):
    """The predecessor guard: events older than the row (minus the skew) are a
    predecessor's, as a recreated consumer replaying the stream delivers them."""
    store, url = store
    sql(
        url,
        "INSERT INTO service_type_instances (instance_id, service_type, created_at)"
        " VALUES ('again', 'vm', now() - interval '1 hour')",
    )
    history = [
        event("again", "RUNNING", at=now() - timedelta(minutes=50), seq=1),
        event("again", "STOPPED", at=now() - timedelta(minutes=40), seq=2),
    ]
    for e in history:
        assert store.apply_sync(batch_of(e)).applied == 1
    sql(url, "DELETE FROM service_type_instances WHERE instance_id = 'again'")
    sql(url, "INSERT INTO service_type_instances (instance_id, service_type) VALUES ('again', 'vm')")
    for e in history:  # the whole stream again
        result = store.apply_sync(batch_of(e))
        assert (result.applied, result.stale) == (0, 1)
    assert status_of(url, "again") == "PROVISIONING"
    # A real event of the new instance still applies.
    assert store.apply_sync(batch_of(event("again", "RUNNING", seq=3))).applied == 1


def test_a_row_inserted_while_the_writer_parks_still_gets_the_event(store):
    """The race: the insert's transaction is open (its trigger found nothing
    parked) when the writer meets the unknown id; the writer's parking waits
    for it, and then the event goes onto the new row."""
    store, url = store
    with psycopg.connect(url) as inserter:  # one open transaction
        inserter.execute("INSERT INTO service_type_instances (instance_id, service_type) VALUES ('racy', 'vm')")
        outcome = {}
        writer = threading.Thread(target=lambda: outcome.update(r=store.apply_sync(batch_of(event("racy", "RUNNING")))))
        writer.start()
        # Wait until the writer waits for the inserting transaction, then commit it.
        for _ in range(200):
            waiting = sql(url, "SELECT count(*) FROM pg_locks WHERE locktype = 'transactionid' AND NOT granted")[0][0]
            if waiting:
                break
            time.sleep(0.05)
        assert waiting, "the writer never waited for the inserting transaction"
        inserter.commit()
        writer.join(timeout=30)
    result = outcome["r"]
    assert (result.applied, result.unknown, result.parked) == (1, (), 0)
    assert status_of(url, "racy") == "RUNNING"


def test_a_bulk_insert_of_many_rows_takes_its_parked_events_along(store):
    """Any writer may insert rows in bulk: the trigger must not take a lock per
    row (an advisory lock per id exhausted the lock table at 20k rows)."""
    store, url = store
    assert store.apply_sync(batch_of(event("bulk-12345", "RUNNING"))).parked == 1
    sql(
        url,
        "INSERT INTO service_type_instances (instance_id, service_type)"
        " SELECT 'bulk-' || g, 'vm' FROM generate_series(1, 20000) AS g",
    )
    assert status_of(url, "bulk-12345") == "RUNNING"
    assert status_of(url, "bulk-12346") == "PROVISIONING"
    assert sql(url, "SELECT count(*) FROM parked_events")[0][0] == 0
