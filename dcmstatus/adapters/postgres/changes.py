"""The change feed as the watch stream reads it (docs/changes.md#watch-stream):
pages of `status_changes`, and the wake-ups that say a commit appended some.

`ChangeStore` reads the table over a sync psycopg pool in worker threads, as
`InstanceStore` does (same error translation: StoreUnavailable). The table is
the truth: a reader asks for `change_id > position`, which is gap-free because
ids follow commit order (docs/changes.md#order).

`ChangeNotifier` holds the one LISTEN connection of the process and fans its
notifications out to every open stream through a trio Event that is replaced
on each wake-up. A notification carries nothing but "look again"; a stream that
was busy (a slow client) when it came simply finds the rows on its next query.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any, Literal

import msgspec
import psycopg
import trio
from psycopg import sql
from psycopg_pool import ConnectionPool

from dcmstatus.adapters.postgres.conninfo import with_defaults
from dcmstatus.adapters.postgres.instances import _UNAVAILABLE, _first_line, _raw, _utc, _where
from dcmstatus.core.errors import StoreUnavailable

__all__ = ["CHANNEL", "ChangeNotifier", "ChangeStore", "StatusChange"]

log = logging.getLogger(__name__)

CHANNEL = "dcmstatus_changes"  # notified by every committing writer (migrations/0004_status_changes.sql)


class StatusChange(msgspec.Struct, frozen=True):
    """One row of status_changes, with the API's JSON names (docs/http-api.md#status-changes)."""

    change_id: int
    kind: Literal["created", "changed", "deleted"]
    instance_id: str
    service_type: str
    previous_status: str | None
    status: str | None
    status_message: str
    outputs: msgspec.Raw | None
    provider_name: str
    event_time: datetime | None
    commit_time: datetime


_CHANGE_COLUMNS = sql.SQL(
    "change_id, kind, instance_id, service_type, previous_status, status, status_message,"
    " outputs::text, provider_name, event_time, commit_time"
)


def _change(row: tuple[Any, ...]) -> StatusChange:
    (change_id, kind, instance_id, service_type, previous, status, message, outputs, provider,
     event_time, commit_time) = row  # fmt: skip
    return StatusChange(
        change_id=change_id,
        kind=kind,
        instance_id=instance_id,
        service_type=service_type,
        previous_status=previous,
        status=status,
        status_message=message,
        outputs=_raw(outputs),
        provider_name=provider,
        event_time=None if event_time is None else _utc(event_time),
        commit_time=_utc(commit_time),
    )


class ChangeStore:
    """Async reads of status_changes over a sync connection pool the caller owns."""

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool
        self._limiter = trio.CapacityLimiter(pool.max_size)

    async def _run(self, fn: Any, *args: Any) -> Any:
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"the database is unavailable: {_first_line(exc)}") from exc

    async def head(self) -> int:
        """The id of the newest committed change (0 when there is none): "the
        present" for a stream that starts without a position."""
        return await self._run(self._head)

    async def page(
        self,
        after: int,
        page_size: int,
        service_type: str | None = None,
        instance_id: str | None = None,
        upto: int | None = None,
    ) -> tuple[list[StatusChange], bool]:
        """Changes with `after < change_id (<= upto)` matching the filters,
        oldest first, at most `page_size`; and whether more match."""
        filters = {"service_type": service_type, "instance_id": instance_id}
        return await self._run(self._page, after, page_size, filters, upto)

    def _head(self) -> int:
        with self._pool.connection() as conn:
            row = conn.execute("SELECT change_id FROM status_changes ORDER BY change_id DESC LIMIT 1").fetchone()
        return 0 if row is None else row[0]

    def _page(
        self, after: int, page_size: int, filters: dict[str, str | None], upto: int | None
    ) -> tuple[list[StatusChange], bool]:
        conditions: list[sql.Composable] = [sql.SQL("change_id > %s")]
        params: list[Any] = [after]
        if upto is not None:
            conditions.append(sql.SQL("change_id <= %s"))
            params.append(upto)
        for column, value in filters.items():
            if value is not None:
                conditions.append(sql.SQL("{} = %s").format(sql.Identifier(column)))
                params.append(value)
        query = sql.SQL("SELECT {} FROM status_changes{} ORDER BY change_id LIMIT %s").format(
            _CHANGE_COLUMNS, _where(conditions)
        )
        params.append(page_size + 1)  # one more tells whether another page exists
        with self._pool.connection() as conn:
            rows = conn.execute(query, params).fetchall()
        return [_change(row) for row in rows[:page_size]], len(rows) > page_size


class ChangeNotifier:
    """One LISTEN connection for the whole process, as wake-ups for every stream.

    A stream takes `ticket()` *before* it queries the table and waits on it
    after: a commit that lands in between has set that ticket already, so no
    wake-up falls between the query and the wait. While the connection is
    down, streams still look at the table on every heartbeat; after a
    reconnect everyone is woken, since notifications may have been missed.
    `close()` (at shutdown) wakes everyone for the last time; streams then end.
    """

    # How long a worker thread blocks in notifies() at a time: the bound on
    # how long stopping the listener waits for the thread.
    POLL_SECONDS = 0.5
    RETRY_SECONDS = (0.5, 1, 2, 5)

    def __init__(self, conninfo: str) -> None:
        self._conninfo = conninfo
        self._wakeup = trio.Event()
        self.closed = False
        self.listening = False  # the LISTEN connection is up (health says so in an api replica)

    def ticket(self) -> trio.Event:
        """Set at the next wake-up (or at close)."""
        return self._wakeup

    def wake(self) -> None:
        self._wakeup.set()
        if not self.closed:
            self._wakeup = trio.Event()

    def close(self) -> None:
        self.closed = True
        self._wakeup.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """LISTEN until closed (or cancelled), reconnecting after a failure."""
        started = False
        failures = 0
        while not self.closed:
            conn = None
            try:
                conn = await trio.to_thread.run_sync(self._connect)
                if failures:
                    log.info("listening for change notifications again")
                    self.wake()  # what was committed while we were away
                failures = 0
                self.listening = True
                if not started:
                    started = True
                    task_status.started()
                while not self.closed:
                    if await trio.to_thread.run_sync(self._poll, conn):
                        self.wake()
            except psycopg.Error as exc:
                self.listening = False
                failures += 1
                delay = self.RETRY_SECONDS[min(failures, len(self.RETRY_SECONDS)) - 1]
                log.warning(
                    "change notifications lost (%s); watch streams fall back to polling; retrying in %.1fs",
                    _first_line(exc),
                    delay,
                )
                if not started:  # a stream may start anyway: it polls on every heartbeat
                    started = True
                    task_status.started()
                await trio.sleep(delay)
            finally:
                self.listening = False
                if conn is not None:
                    await trio.to_thread.run_sync(conn.close)

    def _connect(self) -> psycopg.Connection:
        conn = psycopg.connect(
            with_defaults(self._conninfo, connect_timeout=5, application_name="dcmstatus-listen"), autocommit=True
        )
        conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(CHANNEL)))
        return conn

    def _poll(self, conn: psycopg.Connection) -> bool:
        # Returns at the first notification (latency), then takes what else
        # is already there: a burst of commits is one wake-up, not one each.
        if not any(True for _ in conn.notifies(timeout=self.POLL_SECONDS, stop_after=1)):
            return False
        for _ in conn.notifies(timeout=0):
            pass
        return True
