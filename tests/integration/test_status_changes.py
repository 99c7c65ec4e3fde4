"""The change feed's table (docs/changes.md), against a real PostgreSQL:
exactly one row per real change, whoever writes, in commit order."""

import threading
import time
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

import trio_asyncio  # noqa: F401  # isort: skip

from dcmstatus.adapters.postgres.schema import migrate
from dcmstatus.adapters.postgres.writer import StatusStore
from dcmstatus.core.batching import BatchBuilder
from dcmstatus.core.model import StatusUpdate


def event(instance, status, *, seconds=0.0, seq=1, message="", outputs=None, service_type="vm"):
    at = datetime.now(UTC) + timedelta(seconds=seconds)
    return StatusUpdate(instance, service_type, status, message, "kubevirt", outputs, at, seq)


def apply(store, *events):
    builder = BatchBuilder(1)
    for i, e in enumerate(events):
        builder.add(e, i)
    [batch] = builder.take()
    return store.apply_sync(batch)


def sql(url, query, params=None):
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


def changes(url):
    return sql(
        url,
        "SELECT kind, instance_id, previous_status, status, status_message, outputs"
        " FROM status_changes ORDER BY change_id",
    )


@pytest.fixture
def db(database_url):
    migrate(database_url)
    store = StatusStore(database_url)
    yield store, database_url
    store.close()


def test_one_row_per_real_change_and_none_for_a_republish(db):
    store, url = db
    sql(url, "INSERT INTO service_type_instances (instance_id, service_type) VALUES ('vm1', 'vm')")
    apply(store, event("vm1", "RUNNING", seq=1, message="up"))
    apply(store, event("vm1", "RUNNING", seconds=1, seq=2, message="up"))  # re-publish: guard moves only
    apply(store, event("vm1", "RUNNING", seconds=2, seq=3, message="still up"))  # message changed
    apply(store, event("vm1", "RUNNING", seconds=3, seq=4, message="still up", outputs=b'{"ip":"10.0.0.7"}'))
    sql(url, "DELETE FROM service_type_instances WHERE instance_id = 'vm1'")
    assert changes(url) == [
        ("created", "vm1", None, "PROVISIONING", "", None),
        ("changed", "vm1", "PROVISIONING", "RUNNING", "up", None),
        ("changed", "vm1", "RUNNING", "RUNNING", "still up", None),
        ("changed", "vm1", "RUNNING", "RUNNING", "still up", {"ip": "10.0.0.7"}),
        ("deleted", "vm1", "RUNNING", None, "still up", {"ip": "10.0.0.7"}),
    ]


def test_a_batch_appends_its_changes_in_one_go_and_duplicates_add_none(db):
    store, url = db
    sql(url, "INSERT INTO service_type_instances (instance_id, service_type)"
             " SELECT 'b' || g, 'vm' FROM generate_series(1, 500) AS g")
    before = len(changes(url))
    apply(store, *[event(f"b{n}", "RUNNING") for n in range(1, 501)])
    apply(store, *[event(f"b{n}", "RUNNING", seconds=1, seq=2) for n in range(1, 501)])
    rows = changes(url)[before:]
    assert len(rows) == 500
    assert {r[:4] for r in rows} == {("changed", f"b{n}", "PROVISIONING", "RUNNING") for n in range(1, 501)}


def test_a_parked_event_makes_one_created_change_with_its_status(db):
    store, url = db
    apply(store, event("early", "RUNNING", message="first"))
    sql(url, "INSERT INTO service_type_instances (instance_id, service_type) VALUES ('early', 'vm')")
    assert changes(url) == [("created", "early", None, "RUNNING", "first", None)]


def test_change_ids_follow_commit_order(db):
    """A transaction that appends changes while another one that appended
    first is still open waits for it: ids are never handed out of commit
    order, so "after <id>" never skips a change that commits late."""
    _, url = db
    sql(url, "INSERT INTO service_type_instances (instance_id, service_type) VALUES ('a', 'vm'), ('b', 'vm')")
    first = psycopg.connect(url)
    first.execute("UPDATE service_type_instances SET status = 'RUNNING' WHERE instance_id = 'a'")
    done = threading.Event()

    def second():
        with psycopg.connect(url) as conn:
            conn.execute("UPDATE service_type_instances SET status = 'RUNNING' WHERE instance_id = 'b'")
        done.set()

    thread = threading.Thread(target=second)
    thread.start()
    for _ in range(200):
        waiting = sql(url, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")[0][0]
        if waiting:
            break
        time.sleep(0.05)
    assert waiting and not done.is_set(), "the second transaction did not wait for the first"
    first.commit()
    first.close()
    thread.join(timeout=30)
    ids = dict(sql(url, "SELECT instance_id, change_id FROM status_changes WHERE kind = 'changed'"))
    assert ids["a"] < ids["b"]
