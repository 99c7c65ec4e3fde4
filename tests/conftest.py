import trio_asyncio  # isort: skip  # first: it patches asyncio before psycopg binds it (docs/architecture.md#import-order)

# Shared fixtures: real PostgreSQL and nats-server for the tests.
#
# - `pg_server_url` (session): a server where we may CREATE DATABASE —
#   $DCMSTATUS_TEST_DATABASE_URL, else one EmbeddedPostgres for the session.
# - `database_url`: a fresh empty database on it per test, dropped afterwards.
# - `nats_url`: $DCMSTATUS_TEST_NATS_URL with every stream on `dcm.*` subjects
#   deleted first, else a fresh EmbeddedNats per test.
# - `pg_template` (session): an initdb-ed PGDATA that fresh servers copy (fast).
# - `pg_data_dir`: where a test may run its own EmbeddedPostgres (root-safe).
# - `nats_server` / `pg_server`: fresh embedded servers the test controls
#   (restart, kill). `pg_server` runs with fsync off unless the test asks:
#   `@pytest.mark.parametrize("pg_server", [{"fsync": True}], indirect=True)`.
# - `nats_cluster` / `pg_pair`: a 3-node nats-server cluster and a PostgreSQL
#   primary with a synchronous standby (dcmstatus.devtools.cluster) the test
#   controls (kill a node, fail over); tests using them get the `cluster` marker.
# - `fast_path`: True and False, for NatsSettings.fast_path (both consume paths).
# - `asyncio_loop`: a trio-asyncio loop for async tests that call asyncio
#   code (nats-py); pytest-trio cannot open one by itself.
#
# Embedded PostgreSQL runs with fsync off in tests (commits still survive a
# kill of the server, not of the machine); DCMSTATUS_TEST_PG_FSYNC=1 turns it on.
# Tests under tests/integration get the `integration` marker.
import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from dcmstatus.devtools.cluster import NatsCluster, PgPair
from dcmstatus.devtools.embedded import EmbeddedNats, EmbeddedPostgres, create_database, drop_database


@pytest.fixture(autouse=True)
def _events_start_now():
    """test_service.publish() dates events from its T0, which must be when
    the test started, for every module that uses it: the rows a test creates
    through the API are dated now, and the predecessor guard ignores events
    older than their row by more than the allowed clock skew
    (docs/database.md#ordering-guard). A T0 from import time is minutes old
    by the time a later module runs in a full suite."""
    module = sys.modules.get("test_service")
    if module is not None:
        module.T0 = datetime.now(UTC)

DCM_SUBJECTS = "dcm.*"
_INTEGRATION_DIR = Path(__file__).parent / "integration"


def _test_fsync() -> bool:
    return os.environ.get("DCMSTATUS_TEST_PG_FSYNC", "").lower() in ("1", "true", "yes", "on")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(_INTEGRATION_DIR):
            item.add_marker(pytest.mark.integration)
        if {"nats_cluster", "pg_pair"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.cluster)


# ----------------------------------------------------------------- PostgreSQL


@contextlib.contextmanager
def _pg_dir(name: str, tmp: pytest.TempPathFactory | Path):
    """A directory for an embedded PostgreSQL. As root, PostgreSQL runs as
    another user who must traverse every ancestor, but pytest's base temp
    root is 0700 and every pytest session starting (any other run on this
    machine) resets it to 0700: use a directory under the system tmp then."""
    if not (hasattr(os, "geteuid") and os.geteuid() == 0):
        yield tmp.mktemp(name) if isinstance(tmp, pytest.TempPathFactory) else tmp / name
        return
    path = Path(tempfile.mkdtemp(prefix=f"dcmstatus-test-{name}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def pg_data_dir(tmp_path: Path):
    """A directory where a test may run its own EmbeddedPostgres (see _pg_dir)."""
    with _pg_dir("pg", tmp_path) as path:
        yield path


@pytest.fixture(scope="session")
def pg_template(tmp_path_factory: pytest.TempPathFactory):
    """An initialised, never started PGDATA: fresh servers copy it instead of running initdb."""
    with _pg_dir("pg-template", tmp_path_factory) as path:
        yield EmbeddedPostgres(path, fsync=False).init()


@pytest.fixture(scope="session")
def pg_server_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """URL of a PostgreSQL server (its `postgres` database) where tests may create databases."""
    url = os.environ.get("DCMSTATUS_TEST_DATABASE_URL")
    if url:
        yield url
        return
    with _pg_dir("pg-session", tmp_path_factory) as path:
        server = EmbeddedPostgres(path, fsync=_test_fsync(), template=request.getfixturevalue("pg_template"))
        server.start()
        try:
            yield server.url
        finally:
            server.stop()


@pytest.fixture
def database_url(pg_server_url: str):
    """A fresh, empty database for this test (dropped afterwards, sessions ended)."""
    name = f"dcmstatus_test_{uuid.uuid4().hex[:12]}"
    url = create_database(pg_server_url, name)
    try:
        yield url
    finally:
        drop_database(pg_server_url, name)


@pytest.fixture
def pg_server(request: pytest.FixtureRequest, tmp_path: Path, pg_template: Path):
    """A fresh EmbeddedPostgres this test owns (restart, kill, ...).
    Indirect parameters are passed to EmbeddedPostgres, e.g. {"fsync": True}."""
    kwargs = {"fsync": _test_fsync(), "template": pg_template, **getattr(request, "param", {})}
    with _pg_dir("pg-server", tmp_path) as path:
        server = EmbeddedPostgres(path, **kwargs)
        server.start()
        try:
            yield server
        finally:
            server.stop()


# ----------------------------------------------------------------------- NATS


def _subjects_overlap(a: str, b: str) -> bool:
    """True when some subject matches both NATS subject patterns."""
    ta, tb = a.split("."), b.split(".")
    for x, y in zip(ta, tb):
        if x == ">" or y == ">":
            return True
        if x != y and "*" not in (x, y):
            return False
    return len(ta) == len(tb)


async def _delete_streams_overlapping(url: str, subjects: str) -> list[str]:
    import nats

    nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        js = nc.jetstream()
        deleted = []
        for info in await js.streams_info():
            if any(_subjects_overlap(s, subjects) for s in info.config.subjects or ()):
                await js.delete_stream(info.config.name)
                deleted.append(info.config.name)
        return deleted
    finally:
        await nc.close()


@pytest.fixture
def nats_url(tmp_path: Path):
    """URL of a nats-server with JetStream and no stream on `dcm.*` subjects."""
    url = os.environ.get("DCMSTATUS_TEST_NATS_URL")
    if url:
        asyncio.run(_delete_streams_overlapping(url, DCM_SUBJECTS))
        yield url
        return
    server = EmbeddedNats(tmp_path / "nats-url")
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def nats_server(tmp_path: Path):
    """A fresh EmbeddedNats this test owns (restart, kill, ...)."""
    server = EmbeddedNats(tmp_path / "nats-server")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def nats_cluster(tmp_path: Path):
    """A fresh 3-node nats-server cluster (JetStream on each) this test owns."""
    cluster = NatsCluster(tmp_path / "nats-cluster", size=3)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def pg_pair(pg_template: Path):
    """A fresh PostgreSQL primary with a synchronous streaming standby this
    test owns; `pg_pair.url_for(db)` is the multi-host URL (target_session_attrs=read-write)."""
    with _pg_dir("pg-pair", Path(tempfile.gettempdir())) as path:
        pair = PgPair(path, fsync=_test_fsync(), template=pg_template)
        pair.start()
        try:
            yield pair
        finally:
            pair.stop()


@pytest.fixture(params=[True, False], ids=["fast-path", "public-api"])
def fast_path(request: pytest.FixtureRequest) -> bool:
    """Run a NATS adapter test on both consume paths: nats-py internals
    (adapters/nats/internals.py) and the public-API fallback."""
    return request.param


# ------------------------------------------------------------------- asyncio


@pytest.fixture
async def asyncio_loop():
    """A trio-asyncio loop around the test: asyncio code runs via
    trio_asyncio.aio_as_trio(...) inside it."""
    async with trio_asyncio.open_loop() as loop:
        yield loop
