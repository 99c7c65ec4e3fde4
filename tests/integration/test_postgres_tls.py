"""PostgreSQL over TLS is configured in the libpq URL (`sslmode`,
`sslrootcert`, ...): every connection dcmstatus opens — migrations, the
writers, the API and watch pools, the watch streams' LISTEN connection, the
outbox housekeeping and the relay's connections — must reach libpq with
those parameters intact, never replaced by dcmstatus's own defaults.

The embedded PostgreSQL is built without SSL, so `sslmode=require` makes
libpq refuse it: a parameter that got lost on the way would let the
connection succeed instead."""

from __future__ import annotations

import psycopg
import pytest

import dcmstatus.cli.commands as cli
from dcmstatus.config import ServeConfig
from dcmstatus.devtools.embedded import _with_dbname

NO_SSL = "server does not support SSL"


def test_migrate_passes_sslmode_to_libpq(database_url, capsys):
    assert cli.main(["migrate", "--database-url", f"{database_url}?sslmode=require"]) == 2
    assert NO_SSL in capsys.readouterr().err
    assert cli.main(["migrate", "--database-url", f"{database_url}?sslmode=disable&connect_timeout=5"]) == 0


def _service_connections(service) -> dict:
    """A way to open each kind of connection the service makes, by role:
    the writers, the API and watch pools, the LISTEN connection of the watch
    streams, the outbox housekeeping and the relay's leader and listener."""

    def from_pool(pool):
        # What the pool runs for each new connection of its own.
        return lambda: pool.connection_class.connect(pool.conninfo, **(pool.kwargs or {}))

    assert service.relay is not None, "the relay is on by default"
    return {
        "writer": service.writer_stores[0]._connection,
        "api pool": from_pool(service.api_pool),
        "watch pool": from_pool(service.watch_pool),
        "watch listen": service.notifier._connect,
        "housekeeping": service.housekeeping._connection,
        "relay leader": service.relay.outbox._connection,
        "relay listen": service.relay.listener._connection,
    }


def _close(service) -> None:
    service.api_pool.close()
    service.watch_pool.close()
    service.writer_stores[0].close()
    service.housekeeping.close()
    service.relay.outbox.close()
    service.relay.listener.close()


def test_every_connection_of_the_service_passes_the_url_parameters_to_libpq(database_url, nats_url):
    from dcmstatus.service import Service

    def service(url: str) -> Service:
        config = ServeConfig(nats_url=nats_url, database_url=url, writers=1)
        return Service(config, nats_url, url, config.catalog(), b"test page-token secret")

    refused = service(f"{database_url}?sslmode=require")
    try:
        for role, connect in _service_connections(refused).items():
            try:
                connect().close()
            except psycopg.OperationalError as exc:
                assert NO_SSL in str(exc), role
            else:
                pytest.fail(f"{role}: connected without SSL, so sslmode=require never reached libpq")
    finally:
        _close(refused)

    # Parameters dcmstatus has defaults of its own for (connect_timeout,
    # options, application_name) are the URL's when it gives them.
    accepted = service(
        f"{database_url}?sslmode=disable&connect_timeout=7&application_name=ops&options=-c%20lock_timeout%3D1234ms"
    )
    opened = []
    try:
        for role, connect in _service_connections(accepted).items():
            conn = connect()
            opened.append((role, conn))
            params = conn.info.get_parameters()
            assert (params.get("sslmode"), params.get("connect_timeout")) == ("disable", "7"), role
            assert conn.execute("SHOW lock_timeout").fetchone() == ("1234ms",), role
            assert conn.execute("SHOW application_name").fetchone() == ("ops",), role
    finally:
        for role, conn in opened:
            if role in ("watch listen", "api pool", "watch pool"):  # not owned by a store
                conn.close()
        _close(accepted)


def test_a_database_made_for_tests_keeps_the_url_parameters():
    url = "postgresql://app:pw@db.example:5432/postgres?sslmode=verify-full&sslrootcert=/etc/ca.pem"
    assert _with_dbname(url, "other") == "postgresql://app:pw@db.example:5432/other?sslmode=verify-full&sslrootcert=/etc/ca.pem"
