"""The embedded servers are real: JetStream data and PostgreSQL rows survive
restarts and crashes, taken ports are avoided, start-up failures explain
themselves, and the test fixtures hand out what they promise."""

import asyncio
import os
import socket
from pathlib import Path

import nats
import nats.errors
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


@pytest.mark.parametrize("pg_server", [{"fsync": True}], indirect=True)
def test_postgres_checkpoints_are_spaced_for_drains(pg_server: EmbeddedPostgres):
    # docs/operations.md#postgresql-settings: a million-event drain fits
    # between two checkpoints, so pages are written whole to the WAL once.
    with psycopg.connect(pg_server.url) as conn:
        max_wal_mb, timeout_s = conn.execute(
            "SELECT (SELECT setting::int FROM pg_settings WHERE name = 'max_wal_size'),"
            " (SELECT setting::int FROM pg_settings WHERE name = 'checkpoint_timeout')"
        ).fetchone()  # type: ignore[misc]
    assert max_wal_mb >= 2048
    assert timeout_s >= 15 * 60


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


# ------------------------------------------- keeping other local users out


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


async def _connect_and_close(url: str) -> None:
    nc = await nats.connect(url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=5)
    await nc.close()


def test_nats_admits_only_clients_with_its_token(nats_server: EmbeddedNats):
    address = f"nats://127.0.0.1:{nats_server.port}"
    for url in (address, f"nats://not-the-token@127.0.0.1:{nats_server.port}"):
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            asyncio.run(_connect_and_close(url))
    asyncio.run(_connect_and_close(nats_server.url))
    assert nats_server.token and nats_server.token in nats_server.url


def test_nats_token_is_private_kept_on_restart_and_not_on_the_command_line(nats_server: EmbeddedNats):
    token = nats_server.token
    assert _mode(nats_server.token_path) == 0o600 and _mode(nats_server.config_path) == 0o600
    # The process list is readable by every local user.
    assert token not in Path(f"/proc/{nats_server.pid}/cmdline").read_bytes().decode()
    nats_server.restart()
    assert nats_server.token == token == nats_server.token_path.read_text().strip()
    asyncio.run(_connect_and_close(nats_server.url))


def test_postgres_admits_tcp_clients_only_with_its_password(pg_server: EmbeddedPostgres):
    port = pg_server.port
    for url in (f"postgresql://postgres@127.0.0.1:{port}/postgres", f"postgresql://postgres:guess@127.0.0.1:{port}/postgres"):
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(url, connect_timeout=5)
    with psycopg.connect(pg_server.url) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("postgres",)
    assert _mode(pg_server.password_path) == 0o600
    # The trusted socket is reachable by the server's own user only.
    assert _mode(pg_server.socket_dir) == 0o700
    rules = [line.split() for line in (pg_server.pgdata / "pg_hba.conf").read_text().splitlines()]
    assert [r for r in rules if r and r[0].startswith("host")] == [["host", "all", "all", "all", "scram-sha-256"]]


def test_postgres_password_is_kept_on_restart(pg_server: EmbeddedPostgres):
    url = pg_server.url
    assert pg_server.restart() == url
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_postgres_data_dir_that_trusted_tcp_demands_the_password_after_restart(pg_server: EmbeddedPostgres):
    # As an older dcmstatus (initdb --auth=trust) left it.
    (pg_server.pgdata / "pg_hba.conf").write_text("local all all trust\nhost all all all trust\n")
    pg_server.restart()
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(f"postgresql://postgres@127.0.0.1:{pg_server.port}/postgres", connect_timeout=5)
    with psycopg.connect(pg_server.url) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_postgres_socket_dir_opened_up_is_closed_again(pg_data_dir: Path, pg_template: Path):
    socket_dir = pg_data_dir / "postgres-socket"
    socket_dir.mkdir()
    socket_dir.chmod(0o777)
    with EmbeddedPostgres(pg_data_dir, fsync=False, template=pg_template) as server:
        assert server.socket_dir == socket_dir
        assert _mode(socket_dir) == 0o700


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a directory of another user")
def test_postgres_socket_dir_of_another_user_is_refused(pg_data_dir: Path, pg_template: Path):
    import pwd

    socket_dir = pg_data_dir / "postgres-socket"
    socket_dir.mkdir()
    os.chown(socket_dir, pwd.getpwnam("nobody").pw_uid, -1)
    server = EmbeddedPostgres(pg_data_dir, fsync=False, template=pg_template)
    with pytest.raises(EmbeddedServerError, match="socket directory.*not a directory of this user"):
        server.start()
    assert not server.running
