"""The API's store (adapters/postgres/instances.py) translates driver failures
into the one error tree at its edge, so the HTTP layer never sees psycopg's:
an unreachable database is StoreUnavailable, a refused value InvalidInput, a
taken id InstanceExists."""

import socket
from functools import partial

import psycopg
import pytest
import trio
import trio_asyncio  # noqa: F401  # must precede psycopg: it patches asyncio
from psycopg_pool import ConnectionPool

from dcmstatus.adapters.postgres.instances import InstanceStore
from dcmstatus.adapters.postgres.schema import migrate
from dcmstatus.core.errors import InstanceExists, InvalidInput, StoreUnavailable


@pytest.fixture
async def pool(database_url):
    await trio.to_thread.run_sync(migrate, database_url)
    pool = ConnectionPool(database_url, min_size=1, max_size=2, open=False, timeout=5)
    await trio.to_thread.run_sync(partial(pool.open, wait=True))
    yield pool
    await trio.to_thread.run_sync(pool.close)


def _calls(store: InstanceStore):
    return [
        store.ping,
        partial(store.get, "x"),
        partial(store.delete, "x"),
        store.list,
        store.rejected,
        partial(store.create, "vm", b"{}"),
    ]


async def test_closed_pool_is_store_unavailable(pool):
    store = InstanceStore(pool)
    await trio.to_thread.run_sync(pool.close)
    for call in _calls(store):
        with pytest.raises(StoreUnavailable, match="the database is unavailable") as caught:
            await call()
        assert isinstance(caught.value.__cause__, psycopg.OperationalError)


async def test_server_nobody_listens_on_is_store_unavailable():
    with socket.socket() as probe:  # a port that was free a moment ago
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"postgresql://nobody@127.0.0.1:{port}/none?connect_timeout=1"
    pool = ConnectionPool(url, min_size=1, max_size=1, open=False, timeout=0.5)
    await trio.to_thread.run_sync(partial(pool.open, wait=False))
    try:
        with pytest.raises(StoreUnavailable):
            await InstanceStore(pool).get("x")
    finally:
        await trio.to_thread.run_sync(pool.close)


async def test_connection_killed_by_the_server_is_store_unavailable_then_recovers(pool, database_url):
    store = InstanceStore(pool)
    await store.create("vm", b"{}", instance_id="kept")

    def terminate_pool_connections() -> None:
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE pid <> pg_backend_pid() AND datname = current_database() AND backend_type = 'client backend'"
            )

    await trio.to_thread.run_sync(terminate_pool_connections)
    with pytest.raises(StoreUnavailable):
        await store.get("kept")
    # The pool drops the broken connection; the next call gets a new one.
    instance = await store.get("kept")
    assert instance is not None and instance.id == "kept"


async def test_refused_values_and_taken_ids_keep_their_own_errors(pool):
    store = InstanceStore(pool)
    await store.create("vm", b"{}", instance_id="taken")
    with pytest.raises(InstanceExists):
        await store.create("vm", b"{}", instance_id="taken")
    with pytest.raises(InvalidInput):
        await store.create("vm", b'{"k": "\\u0000"}')


def test_the_pool_check_costs_no_round_trip_for_a_connection_checked_just_now(database_url, monkeypatch):
    """A connection checked within the last CHECK_INTERVAL is handed out as it
    is (an API read is then one round trip, not two); one idle for longer is
    checked again, and a dead one is dropped."""
    import dcmstatus.adapters.postgres.instances as instances

    clock = [1000.0]
    monkeypatch.setattr(instances, "_monotonic", lambda: clock[0])
    with psycopg.connect(database_url, autocommit=True) as conn, psycopg.connect(database_url, autocommit=True) as admin:
        instances.check_connection(conn)  # checked: a round trip
        admin.execute("SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))
        clock[0] += instances.CHECK_INTERVAL / 2
        instances.check_connection(conn)  # within the interval: not asked again
        clock[0] += instances.CHECK_INTERVAL
        with pytest.raises(psycopg.OperationalError):
            instances.check_connection(conn)  # idle for longer: asked, found dead
