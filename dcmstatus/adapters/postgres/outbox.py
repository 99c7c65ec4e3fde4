"""The outbox side of the change relay (docs/changes.md#relay): the SQL that
takes relay leadership, reads unpublished `status_changes` rows as ready
CloudEvent bodies, marks them published, listens for the wake-up, measures
the outbox and prunes it (docs/changes.md#retention).

psycopg runs synchronously in worker threads, as in the status writer. Each
class owns its connection; a broken one is dropped (and with it, for the
outbox, the leadership) and re-opened on the next call.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from functools import partial

import psycopg
import trio

from dcmstatus.adapters.postgres.conninfo import with_defaults
from dcmstatus.core.changes import PendingChange

log = logging.getLogger(__name__)

# The session-level advisory lock of the relay leader. (7235, 1) is the
# transaction lock that orders change ids (migration 0004).
_LEADER_LOCK = (7235, 2)

# The rows still to publish, oldest first, through the partial index on
# unpublished change ids. The body is built here, once, as the CloudEvent
# of docs/changes.md#change-events-on-nats, and only for the rows taken: in
# one flat query the planner may build it for every unpublished row before
# it sorts (a quarter of a second per round with a backlog of 20,000). The
# session's time zone is UTC, so times are RFC 3339 with +00:00.
_PENDING = """
WITH next AS (
    SELECT * FROM status_changes WHERE published_at IS NULL ORDER BY change_id LIMIT %(limit)s
)
SELECT change_id, service_type, commit_time, json_build_object(
           'specversion', '1.0',
           'type', 'dcmstatus.status.changed',
           'source', %(source)s::text,
           'subject', instance_id,
           'id', 'change-' || change_id,
           'time', commit_time,
           'datacontenttype', 'application/json',
           'data', json_build_object(
               'id', instance_id, 'kind', kind, 'service_type', service_type, 'status', status,
               'previous_status', previous_status, 'status_message', status_message, 'outputs', outputs,
               'provider_name', provider_name, 'event_time', event_time, 'change_id', change_id)
       )::text
  FROM next
 ORDER BY change_id
"""

_MARK = """
UPDATE status_changes SET published_at = now()
 WHERE change_id BETWEEN %(first)s AND %(last)s AND published_at IS NULL
"""

_DEPTH = """
SELECT count(*), coalesce(extract(epoch FROM clock_timestamp() - min(commit_time)), 0)::float8
  FROM status_changes WHERE published_at IS NULL
"""

# One bounded step of retention: the `step` change ids from the oldest row,
# of those committed before the cut-off and (while the relay is on)
# published. Commit times grow with change ids (docs/changes.md#order), so
# the old rows are the low ids and each step reads one primary-key range.
_PRUNE_STEP = """
WITH doomed AS (
    SELECT change_id FROM status_changes
     WHERE change_id < (SELECT min(change_id) FROM status_changes) + %(step)s
       AND commit_time < clock_timestamp() - %(retention)s::interval
       AND (published_at IS NOT NULL OR NOT %(relay_on)s)
)
DELETE FROM status_changes WHERE change_id IN (SELECT change_id FROM doomed)
"""


def _connect(conninfo: str, application_name: str) -> psycopg.Connection:
    conn = psycopg.connect(
        with_defaults(
            conninfo,
            connect_timeout=5,
            application_name=application_name,
            # A dead peer must surface as an error (and end the leadership), not a hang.
            keepalives=1,
            keepalives_idle=10,
            keepalives_interval=5,
            keepalives_count=3,
        ),
        autocommit=True,
    )
    # UTC for the CloudEvent times, set in the session rather than through
    # `options`, which would replace the URL's own.
    try:
        conn.execute("SET TimeZone = 'UTC'")
    except BaseException:
        conn.close()
        raise
    return conn


class _Connected:
    """One connection, opened on demand and dropped when it breaks."""

    application_name = "dcmstatus"

    def __init__(self, conninfo: str) -> None:
        self._conninfo = conninfo
        self._conn: psycopg.Connection | None = None

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = None
            self._conn = self._opened(_connect(self._conninfo, self.application_name))
        return self._conn

    def _opened(self, conn: psycopg.Connection) -> psycopg.Connection:
        return conn

    def _run(self, function, *args):
        try:
            return function(self._connection(), *args)
        except psycopg.Error:
            if self._conn is not None and (self._conn.broken or self._conn.closed):
                self._drop()
            raise

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    async def _call(self, function, *args):
        # abandon_on_cancel: at shutdown we walk away from a query in flight;
        # an unmarked row is published again by the next leader, and
        # JetStream drops the duplicate (docs/changes.md#relay).
        return await trio.to_thread.run_sync(partial(self._run, function, *args), abandon_on_cancel=True)

    def close(self) -> None:
        self._drop()


class ChangeOutbox(_Connected):
    """The relay leader's connection: the leader lock lives and dies with it."""

    application_name = "dcmstatus-relay"

    def __init__(self, conninfo: str, *, source: str) -> None:
        super().__init__(conninfo)
        self._source = source
        self._leading = False

    @property
    def leading(self) -> bool:
        return self._leading and self._conn is not None and not self._conn.closed

    def _drop(self) -> None:
        self._leading = False
        super()._drop()

    async def lead(self) -> bool:
        """Take the leader lock unless held already; False while another replica holds it."""
        if self.leading:
            return True
        self._leading = await self._call(_try_lock)
        return self._leading

    async def pending(self, limit: int) -> list[PendingChange]:
        return await self._call(self._pending, limit)

    async def mark_published(self, first: int, last: int) -> None:
        await self._call(_mark, first, last)

    def _pending(self, conn: psycopg.Connection, limit: int) -> list[PendingChange]:
        rows = conn.execute(_PENDING, {"source": self._source, "limit": limit}).fetchall()
        return [PendingChange(cid, st, at, body.encode()) for cid, st, at, body in rows]


def _try_lock(conn: psycopg.Connection) -> bool:
    row = conn.execute("SELECT pg_try_advisory_lock(%s, %s)", _LEADER_LOCK).fetchone()
    return bool(row and row[0])


def _mark(conn: psycopg.Connection, first: int, last: int) -> None:
    conn.execute(_MARK, {"first": first, "last": last})


class ChangeListener(_Connected):
    """A connection that LISTENs on `dcmstatus_changes`, the committers' wake-up."""

    application_name = "dcmstatus-relay-listen"

    def _opened(self, conn: psycopg.Connection) -> psycopg.Connection:
        conn.execute("LISTEN dcmstatus_changes")
        return conn

    async def wait(self, timeout: float) -> None:
        """Return at the next notification (one that came meanwhile counts) or after `timeout`."""
        await self._call(_wait, timeout)


def _wait(conn: psycopg.Connection, timeout: float) -> None:
    for _ in conn.notifies(timeout=timeout, stop_after=1):
        break


class ChangeHousekeeping(_Connected):
    """Outbox depth for the metrics, and retention."""

    application_name = "dcmstatus-changes"

    async def depth(self) -> tuple[int, float]:
        """Unpublished rows, and the age in seconds of the oldest of them (0 when none)."""
        return await self._call(_depth)

    async def prune(self, retention: timedelta, *, relay_on: bool, step: int = 10_000) -> int:
        """Delete rows older than `retention` (only published ones while the
        relay is on), one bounded range of change ids per statement; returns
        how many went."""
        return await self._call(_prune, retention, relay_on, step)


def _depth(conn: psycopg.Connection) -> tuple[int, float]:
    count, age = conn.execute(_DEPTH).fetchone()  # type: ignore[misc]
    return int(count), float(age)


def _prune(conn: psycopg.Connection, retention: timedelta, relay_on: bool, step: int) -> int:
    total = 0
    while True:
        deleted = conn.execute(_PRUNE_STEP, {"step": step, "retention": retention, "relay_on": relay_on}).rowcount
        if deleted <= 0:
            return total
        total += deleted
