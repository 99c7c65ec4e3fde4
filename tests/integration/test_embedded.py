"""The embedded servers are real: JetStream data and PostgreSQL rows survive
restarts and crashes, taken ports are avoided, start-up failures explain
themselves, and the test fixtures hand out what they promise."""

import asyncio
import socket
from pathlib import Path

import nats
import psycopg
import pytest
import trio_asyncio
from nats.js.api import ConsumerConfig, StorageType, StreamConfig

from dcmstatus.devtools.embedded import (
    EmbeddedNats,
    EmbeddedPostgres,
    EmbeddedServerError,
    create_database,
    drop_database,
    free_port,
)

# ----------------------------------------------------------------------- NATS


async def _publish(url: str, n: int, *, create: bool = True) -> None:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        if create:
            await js.add_stream(StreamConfig(name="dcm-status", subjects=["dcm.*"], storage=StorageType.FILE))
            await js.add_consumer("dcm-status", ConsumerConfig(durable_name="dcmstatus"))
        for i in range(n):
            await js.publish("dcm.vm", f"event {i}".encode())
    finally:
        await nc.close()


async def _stream_state(url: str) -> tuple[int, int]:
    """(messages in the stream, messages pending for the durable consumer)."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        stream = await js.stream_info("dcm-status")
        consumer = await js.consumer_info("dcm-status", "dcmstatus")
        return stream.state.messages, consumer.num_pending
    finally:
        await nc.close()


def test_nats_stream_and_durable_consumer_survive_restart(nats_server: EmbeddedNats):
    url = nats_server.url
    asyncio.run(_publish(url, 5))
    old_pid = nats_server.pid

    assert nats_server.restart() == url  # same port, same store
    assert nats_server.pid != old_pid
    assert asyncio.run(_stream_state(url)) == (5, 5)


def test_nats_data_survives_kill_and_start(nats_server: EmbeddedNats):
    url = nats_server.url
    asyncio.run(_publish(url, 3))

    nats_server.kill()
    assert not nats_server.running
    assert nats_server.start() == url
    asyncio.run(_publish(url, 2, create=False))
    assert asyncio.run(_stream_state(url)) == (5, 5)


def test_nats_taken_port_falls_back_to_a_free_one(tmp_path: Path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with EmbeddedNats(tmp_path, port=port) as server:
            assert server.port != port
            asyncio.run(_publish(server.url, 1))
            assert asyncio.run(_stream_state(server.url)) == (1, 1)


def test_nats_uses_the_preferred_port_when_free(tmp_path: Path):
    port = free_port()
    with EmbeddedNats(tmp_path, port=port) as server:
        assert server.url == f"nats://{server.token}@127.0.0.1:{port}"
    assert not server.running


def test_nats_start_failure_shows_the_log(tmp_path: Path):
    (tmp_path / "nats").write_text("a file where the JetStream store dir should be")
    server = EmbeddedNats(tmp_path)
    with pytest.raises(EmbeddedServerError, match=r"(?s)nats exited with code .*last lines of"):
        server.start()
    assert not server.running


# ----------------------------------------------------------------- PostgreSQL


def _rows(url: str) -> list[str]:
    with psycopg.connect(url) as conn:
        return [r[0] for r in conn.execute("SELECT v FROM t ORDER BY v")]


def test_postgres_rows_survive_restart(pg_server: EmbeddedPostgres):
    url = pg_server.url
    with psycopg.connect(url) as conn:
        conn.execute("CREATE TABLE t (v text)")
        conn.execute("INSERT INTO t VALUES ('kept')")

    assert pg_server.restart() == url
    assert _rows(url) == ["kept"]


def test_postgres_starts_after_kill_with_stale_pid_file(pg_server: EmbeddedPostgres):
    url = pg_server.url
    with psycopg.connect(url) as conn:
        conn.execute("CREATE TABLE t (v text)")
        conn.execute("INSERT INTO t VALUES ('committed before the crash')")

    pg_server.kill()
    assert (pg_server.pgdata / "postmaster.pid").exists()  # left behind, as after a crash
    assert pg_server.start() == url
    assert _rows(url) == ["committed before the crash"]


@pytest.mark.parametrize("pg_server", [{"fsync": True}], indirect=True)
def test_postgres_is_durable_by_default(pg_server: EmbeddedPostgres):
    with psycopg.connect(pg_server.url) as conn:
        settings = dict(
            conn.execute(
                "SELECT name, setting FROM pg_settings"
                " WHERE name IN ('fsync', 'synchronous_commit', 'full_page_writes', 'max_connections')"
            ).fetchall()
        )
    assert settings == {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on", "max_connections": "100"}


def test_postgres_taken_port_falls_back_and_listens_on_a_socket_too(pg_data_dir: Path, pg_template: Path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with EmbeddedPostgres(pg_data_dir, port=port, fsync=False, template=pg_template) as server:
            assert server.port != port
            assert server.url == f"postgresql://postgres:{server.password}@127.0.0.1:{server.port}/postgres"
            assert server.socket_dir is not None
            with psycopg.connect(host=str(server.socket_dir), port=server.port, user="postgres") as conn:
                assert conn.execute("SELECT current_user").fetchone() == ("postgres",)


def test_create_and_drop_database(pg_server_url: str):
    name = "dcmstatus_test_create_drop"
    url = create_database(pg_server_url, name)
    try:
        lingering = psycopg.connect(url)  # drop must not be blocked by open sessions
        assert lingering.execute("SELECT current_database()").fetchone() == (name,)
    finally:
        drop_database(pg_server_url, name)
    with psycopg.connect(pg_server_url) as conn:
        assert conn.execute("SELECT count(*) FROM pg_database WHERE datname = %s", (name,)).fetchone() == (0,)
    drop_database(pg_server_url, name)  # dropping a missing database is fine


# ------------------------------------------------------------------- fixtures


def test_database_url_is_a_fresh_empty_database(database_url: str):
    with psycopg.connect(database_url) as conn:
        tables = conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone()
    assert tables == (0,)


async def test_nats_url_works_from_trio_through_trio_asyncio(nats_url: str, asyncio_loop):
    nc = await trio_asyncio.aio_as_trio(nats.connect)(nats_url)
    try:
        js = nc.jetstream()
        names = [s.config.name for s in await trio_asyncio.aio_as_trio(js.streams_info)()]
        assert "dcm-status" not in names
        await trio_asyncio.aio_as_trio(js.add_stream)(name="dcm-status", subjects=["dcm.*"])
        ack = await trio_asyncio.aio_as_trio(js.publish)("dcm.container", b"{}")
        assert ack.stream == "dcm-status"
    finally:
        await trio_asyncio.aio_as_trio(nc.close)()
