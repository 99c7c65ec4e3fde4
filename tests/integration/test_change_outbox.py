"""The outbox SQL of the change relay (docs/changes.md#relay), against a real
PostgreSQL: leadership, what is pending, marking, depth and retention."""

import json
from datetime import datetime, timedelta

import psycopg
import pytest
import trio

import trio_asyncio  # noqa: F401  # isort: skip

from dcmstatus.adapters.postgres.outbox import ChangeHousekeeping, ChangeListener, ChangeOutbox
from dcmstatus.adapters.postgres.schema import migrate


def sql(url, query, params=None):
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


def insert(url, *ids):
    sql(url, "INSERT INTO service_type_instances (instance_id, service_type) SELECT i, 'vm' FROM unnest(%s::text[]) i", (list(ids),))


@pytest.fixture
def url(database_url):
    migrate(database_url)
    return database_url


async def test_one_leader_at_a_time_and_the_lock_goes_with_the_connection(url):
    a, b = ChangeOutbox(url, source="s"), ChangeOutbox(url, source="s")
    try:
        assert await a.lead() and a.leading
        assert not await b.lead() and not b.leading
        assert await a.lead()  # held already
        backend = a._conn.info.backend_pid
        a.close()  # the leader's connection ends: so does its lock
        assert not a.leading
        # The server releases the lock when that backend exits, a moment
        # after the client closed: wait for the exit, not for a time.
        with trio.fail_after(10):
            while sql(url, "SELECT 1 FROM pg_stat_activity WHERE pid = %s", (backend,)):
                await trio.sleep(0.02)
        assert await b.lead()
    finally:
        a.close()
        b.close()


async def test_pending_rows_are_ready_cloudevents_oldest_first_and_marked_by_range(url):
    insert(url, "vm1", "vm2", "vm3")
    outbox = ChangeOutbox(url, source="here")
    try:
        pending = await outbox.pending(10)
        ids = [p.change_id for p in pending]
        assert ids == sorted(ids) and len(ids) == 3
        event = json.loads(pending[0].body)
        assert (event["type"], event["source"], event["subject"], event["id"]) == (
            "dcmstatus.status.changed", "here", "vm1", f"change-{ids[0]}",
        )
        assert datetime.fromisoformat(event["time"]) == pending[0].commit_time
        assert event["data"]["kind"] == "created" and event["data"]["change_id"] == ids[0]
        await outbox.mark_published(ids[0], ids[1])
        assert [p.change_id for p in await outbox.pending(10)] == ids[2:]
        assert [p.change_id for p in await outbox.pending(1)] == ids[2:]
    finally:
        outbox.close()


async def test_a_commit_wakes_the_listener(url):
    listener = ChangeListener(url)
    try:
        await listener.wait(0.01)  # LISTEN is in place from the first wait on
        woke = trio.Event()

        async def waiter():
            await listener.wait(60)
            woke.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiter)
            await trio.sleep(0.2)
            await trio.to_thread.run_sync(insert, url, "vm1")
            with trio.fail_after(30):  # a bound, not a measurement
                await woke.wait()
    finally:
        listener.close()


async def test_retention_never_deletes_an_unpublished_row_while_the_relay_is_on(url):
    insert(url, *[f"vm{i}" for i in range(30)])
    insert(url, "new")  # the one recent row
    rows = [r[0] for r in sql(url, "SELECT change_id FROM status_changes ORDER BY change_id")]
    old = rows[:-1]
    sql(url, "UPDATE status_changes SET commit_time = now() - interval '2 days' WHERE change_id = ANY(%s)", (old,))
    # Old rows: the first 10 and the last 10 published, 10 in the middle not.
    published = old[:10] + old[20:]
    sql(url, "UPDATE status_changes SET published_at = now() WHERE change_id = ANY(%s)", (published + rows[-1:],))
    keeper = ChangeHousekeeping(url)
    try:
        assert await keeper.depth() == (10, pytest.approx(2 * 86400, rel=0.01))
        # Steps of 4 ids: ranges, and a range that holds an unpublished row ends the run.
        pruned = await keeper.prune(timedelta(days=1), relay_on=True, step=4)
        left = [r[0] for r in sql(url, "SELECT change_id FROM status_changes ORDER BY change_id")]
        assert pruned == 10
        assert left == old[10:] + rows[-1:]
        unpublished = {r[0] for r in sql(url, "SELECT change_id FROM status_changes WHERE published_at IS NULL")}
        assert unpublished == set(old[10:20])  # every unpublished row is still there
        # Relay off: old rows go whether published or not; the recent one stays.
        assert await keeper.prune(timedelta(days=1), relay_on=False, step=4) == 20
        assert [r[0] for r in sql(url, "SELECT change_id FROM status_changes")] == rows[-1:]
        assert await keeper.prune(timedelta(days=1), relay_on=False) == 0
    finally:
        keeper.close()
