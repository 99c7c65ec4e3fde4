"""PostgreSQL over TLS is configured in the libpq URL (`sslmode`,
`sslrootcert`, ...): every connection dcmstatus opens — migrations, the
writers, the API's pool — must reach libpq with those parameters intact.

The embedded PostgreSQL is built without SSL, so `sslmode=require` makes
libpq refuse it: a parameter that got lost on the way would let the
connection succeed instead."""

from __future__ import annotations

import psycopg
import psycopg_pool
import pytest

import dcmstatus.cli.commands as cli
from dcmstatus.config import ServeConfig
from dcmstatus.devtools.embedded import _with_dbname

NO_SSL = "server does not support SSL"


def test_migrate_passes_sslmode_to_libpq(database_url, capsys):
    assert cli.main(["migrate", "--database-url", f"{database_url}?sslmode=require"]) == 2
    assert NO_SSL in capsys.readouterr().err
    assert cli.main(["migrate", "--database-url", f"{database_url}?sslmode=disable&connect_timeout=5"]) == 0


def test_the_writers_and_the_api_pool_pass_sslmode_to_libpq(database_url, nats_url):
    from dcmstatus.service import Service

    def service(url: str) -> Service:
        config = ServeConfig(nats_url=nats_url, database_url=url, writers=1)
        return Service(config, nats_url, url, config.catalog())

    refused = service(f"{database_url}?sslmode=require")
    with pytest.raises(psycopg.OperationalError, match=NO_SSL):
        refused.writer_stores[0]._connection()
    with pytest.raises(psycopg_pool.PoolTimeout):
        refused.api_pool.open(wait=True, timeout=2)
    refused.api_pool.close()

    accepted = service(f"{database_url}?sslmode=disable")
    try:
        assert accepted.writer_stores[0]._connection().execute("SELECT 1").fetchone() == (1,)
        accepted.api_pool.open(wait=True, timeout=10)
    finally:
        accepted.api_pool.close()
        accepted.writer_stores[0].close()


def test_a_database_made_for_tests_keeps_the_url_parameters():
    url = "postgresql://app:pw@db.example:5432/postgres?sslmode=verify-full&sslrootcert=/etc/ca.pem"
    assert _with_dbname(url, "other") == "postgresql://app:pw@db.example:5432/other?sslmode=verify-full&sslrootcert=/etc/ca.pem"
