"""The HTTP API's data access: service-type instances and dead letters.

`InstanceStore` owns every SQL statement the API runs. It wraps a synchronous
psycopg `ConnectionPool`; each async method runs its statement in a worker
thread, so the trio event loop never blocks on the database. The status
writer (the NATS side) has its own SQL and does not go through this module.

Driver failures are translated here, at the adapter's edge: a database that
cannot be reached (connection lost or refused, pool exhausted or closed,
server shutting down) raises `StoreUnavailable`; a value PostgreSQL refuses
raises `InvalidInput`; a taken id raises `InstanceExists`. Callers never
import psycopg to handle them.

JSON columns are read as text and handed on as `msgspec.Raw`: the API returns
what PostgreSQL stored without decoding and re-encoding it in Python (which
would also fail on deeply nested documents).
"""

from __future__ import annotations

import base64
import builtins  # annotations in the class body: its list() method shadows the type
import time
import uuid
import weakref
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal

import msgspec
import psycopg
import psycopg_pool
import trio
from psycopg import sql
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from dcmstatus.core.errors import InstanceExists, InvalidInput, StoreUnavailable
from dcmstatus.engine.metrics import Metrics

__all__ = [
    "Instance",
    "InstanceExists",
    "InstanceStore",
    "InvalidInput",
    "RejectedEvent",
    "StoreUnavailable",
    "Summary",
]

# What "the database cannot be reached now" looks like from psycopg. The pool's
# errors are OperationalErrors already; they are named for the reader. A write
# refused as read-only (25006) means a standby or a demoted primary answered:
# unavailable too, while the pool finds the new primary (check_connection).
_UNAVAILABLE = (
    psycopg.OperationalError,
    psycopg_pool.PoolTimeout,
    psycopg_pool.PoolClosed,
    psycopg.errors.ReadOnlySqlTransaction,
)


# A connection checked this recently is handed out without another round
# trip: checking every checkout doubled an API read's round trips (and most of
# its PostgreSQL CPU). A connection that died within the interval fails its
# request once, as unavailable (503), and the pool drops it when it comes back
# broken (docs/reliability.md#replication-and-failover).
CHECK_INTERVAL = 1.0  # seconds
_monotonic = time.monotonic
_checked_at: weakref.WeakKeyDictionary[psycopg.Connection[Any], float] = weakref.WeakKeyDictionary()


def check_connection(conn: psycopg.Connection[Any]) -> None:
    """The pools' `check` at each checkout: raise, so the pool drops it and
    connects afresh, for a connection that no longer works (its server was
    killed or failed over: one empty round trip finds out) or whose server
    now reports itself read-only (a hot standby, or a primary set read-only:
    PostgreSQL pushes these two settings to every session). The new
    connection goes where the URL's target_session_attrs sends it
    (docs/reliability.md#replication-and-failover). The round trip is skipped
    for a connection checked within CHECK_INTERVAL."""
    now = _monotonic()
    if now - _checked_at.get(conn, float("-inf")) >= CHECK_INTERVAL:
        psycopg_pool.ConnectionPool.check_connection(conn)  # first: its answer brings what changed
        _checked_at[conn] = now
    info = conn.info
    for setting in ("in_hot_standby", "default_transaction_read_only"):
        if info.parameter_status(setting) == "on":
            conn.close()  # the pool keeps a failed connection that is still open
            raise psycopg.OperationalError(f"the server reports {setting} = on")


class Instance(msgspec.Struct, frozen=True):
    """One row of service_type_instances, with the API's JSON names (docs/http-api.md#instances)."""

    id: str
    path: str  # "service-type-instances/<id>"
    service_type: str
    name: str
    agent_name: str
    provider_name: str
    status: str
    status_message: str
    outputs: msgspec.Raw | None  # a JSON object, as stored
    spec: msgspec.Raw  # a JSON object, as stored
    status_time: datetime | None  # None until a status event has been applied
    create_time: datetime
    update_time: datetime


class RejectedEvent(msgspec.Struct, frozen=True):
    """One dead letter: an event the consumer will never apply, and why."""

    id: int
    reason: str
    detail: str
    subject: str
    stream_seq: int
    headers: msgspec.Raw | None
    body: str  # the stored (possibly truncated) body, as text or base64
    body_encoding: Literal["utf-8", "base64"]
    service_type: str | None
    instance_id: str | None
    receive_time: datetime


class StatusCount(msgspec.Struct, frozen=True):
    service_type: str
    status: str
    count: int


class ReasonCount(msgspec.Struct, frozen=True):
    reason: str
    count: int


class Summary(msgspec.Struct, frozen=True):
    """What the dashboard shows at a glance (docs/dashboard.md#summary)."""

    instances: list[StatusCount]  # per service type and status, rows that exist now
    rejected: list[ReasonCount]  # dead letters received in the last `rejected_window_seconds`
    rejected_window_seconds: int
    last_change_id: int  # the newest status_changes row; 0 before any


# The same column list for every statement that returns instances, so one
# function turns a row into an Instance. status_time is '-infinity' until the
# first event (the ordering guard's floor); psycopg cannot load infinities.
_INSTANCE_COLUMNS = sql.SQL(
    "instance_id, service_type, name, agent_name, provider_name, status,"
    " status_message, outputs::text, spec::text,"
    " CASE WHEN isfinite(status_time) THEN status_time END, created_at, updated_at"
)


def _utc(value: datetime) -> datetime:
    # psycopg returns timestamptz in the session's TimeZone; the API always
    # speaks UTC so clients see one stable format ("...Z").
    return value.astimezone(UTC)


def _raw(text: str | None) -> msgspec.Raw | None:
    return None if text is None else msgspec.Raw(text.encode())


def _instance(row: tuple[Any, ...]) -> Instance:
    (id_, service_type, name, agent, provider, status, message, outputs, spec,
     status_time, created, updated) = row  # fmt: skip
    return Instance(
        id=id_,
        path=f"service-type-instances/{id_}",
        service_type=service_type,
        name=name,
        agent_name=agent,
        provider_name=provider,
        status=status,
        status_message=message,
        outputs=_raw(outputs),
        spec=msgspec.Raw(spec.encode()),
        status_time=None if status_time is None else _utc(status_time),
        create_time=_utc(created),
        update_time=_utc(updated),
    )


def _rejected(row: tuple[Any, ...]) -> RejectedEvent:
    (id_, reason, detail, subject, seq, headers, body, service_type, instance_id,
     received) = row  # fmt: skip
    encoding: Literal["utf-8", "base64"] = "utf-8"
    try:
        text = bytes(body).decode("utf-8")
    except UnicodeDecodeError:
        text, encoding = base64.b64encode(body).decode("ascii"), "base64"
    return RejectedEvent(
        id=id_,
        reason=reason,
        detail=detail,
        subject=subject,
        stream_seq=seq,
        headers=_raw(headers),
        body=text,
        body_encoding=encoding,
        service_type=service_type,
        instance_id=instance_id,
        receive_time=_utc(received),
    )


def _first_line(exc: Exception) -> str:
    # psycopg's messages go on with DETAIL/HINT/context lines.
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def _where(conditions: list[sql.Composable]) -> sql.Composable:
    return sql.SQL(" WHERE ") + sql.SQL(" AND ").join(conditions) if conditions else sql.SQL("")


def _jsonb(spec: bytes | msgspec.Raw | Mapping[str, Any]) -> Jsonb:
    if isinstance(spec, (bytes, msgspec.Raw)):
        return Jsonb(spec, dumps=bytes)  # already JSON text: PostgreSQL validates it
    return Jsonb(spec, dumps=msgspec.json.encode)


class InstanceStore:
    """Async access to instances and dead letters over a sync connection pool.

    The caller opens and closes the pool. Calls wait for a free connection in
    trio (cancellable), not in a blocked worker thread: at most `pool.max_size`
    threads are ever busy here.
    """

    def __init__(self, pool: ConnectionPool, metrics: Metrics | None = None) -> None:
        self._pool = pool
        self._metrics = metrics
        self._limiter = trio.CapacityLimiter(pool.max_size)

    async def _run(self, fn: Any, *args: Any, abandon_on_cancel: bool = False) -> Any:
        try:
            return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter, abandon_on_cancel=abandon_on_cancel)
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"the database is unavailable: {_first_line(exc)}") from exc

    async def ping(self) -> None:
        """Raise (StoreUnavailable, mostly) unless the database answers.
        Cancellable at once (the health check's deadline holds against a
        database that never answers): the abandoned thread ends, and frees its
        limiter slot, when libpq does."""
        await self._run(self._ping, abandon_on_cancel=True)

    async def create(
        self,
        service_type: str,
        spec: bytes | msgspec.Raw | Mapping[str, Any],
        name: str = "",
        agent_name: str = "",
        provider_name: str = "",
        instance_id: str | None = None,
    ) -> Instance:
        """Insert a new instance in status PROVISIONING.

        `spec` is a JSON object, as a mapping or as its JSON text. Without
        `instance_id` a lowercase UUID4 is generated. Raises InstanceExists
        when the id is taken, InvalidInput when PostgreSQL refuses a value.
        """
        if instance_id is None:
            instance_id = str(uuid.uuid4())
        instance = await self._run(
            self._create, instance_id, service_type, _jsonb(spec), name, agent_name, provider_name
        )
        if instance.status_time is not None and self._metrics is not None:
            # A new row has a status time only when its insert applied a parked
            # event (docs/database.md#parked-events).
            self._metrics.parked_applied.inc()
        return instance

    async def get(self, instance_id: str) -> Instance | None:
        return await self._run(self._get, instance_id)

    async def delete(self, instance_id: str) -> bool:
        """Delete the instance; False when there was none."""
        return await self._run(self._delete, instance_id)

    async def list(
        self,
        service_type: str | None = None,
        status: str | None = None,
        provider_name: str | None = None,
        page_size: int = 50,
        after_id: str | None = None,
        id_prefix: str | None = None,
    ) -> tuple[list[Instance], str | None]:
        """One page of instances in id order, and the id to continue after
        (None on the last page). `id_prefix`: only ids starting with it.

        Keyset pagination: rows inserted or deleted between pages never cause
        a skipped or repeated row, unlike OFFSET.
        """
        filters = {"service_type": service_type, "status": status, "provider_name": provider_name}
        return await self._run(self._list, filters, page_size, after_id, id_prefix)

    async def summary(self, rejected_window_seconds: int = 3600) -> Summary:
        """Instance counts per service type and status, recent dead letters
        per reason, and the newest change id."""
        return await self._run(self._summary, rejected_window_seconds)

    async def rejected(
        self, reason: str | None = None, page_size: int = 50, before_id: int | None = None
    ) -> tuple[builtins.list[RejectedEvent], int | None]:
        """One page of dead letters, newest first, and the id to continue
        before (None on the last page)."""
        return await self._run(self._rejected, reason, page_size, before_id)

    # The synchronous halves, run in worker threads. Leaving the pool's
    # connection() block commits (or rolls back on an exception); the
    # service's API pool autocommits, so a read there is one round trip.

    def _ping(self) -> None:
        with self._pool.connection() as conn:
            conn.execute("SELECT 1")

    def _create(
        self,
        instance_id: str,
        service_type: str,
        spec: Jsonb,
        name: str,
        agent_name: str,
        provider_name: str,
    ) -> Instance:
        # ON CONFLICT DO NOTHING instead of catching UniqueViolation: a taken id
        # is an expected answer, not an error for PostgreSQL to log.
        query = sql.SQL(
            "INSERT INTO service_type_instances"
            " (instance_id, service_type, spec, name, agent_name, provider_name)"
            " VALUES (%s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (instance_id) DO NOTHING RETURNING {}"
        ).format(_INSTANCE_COLUMNS)
        params = (instance_id, service_type, spec, name, agent_name, provider_name)
        try:
            with self._pool.connection() as conn:
                row = conn.execute(query, params).fetchone()
        except (psycopg.DataError, psycopg.errors.ProgramLimitExceeded) as exc:
            # Class 22 (data exception, also raised by psycopg itself for NUL
            # in text) and 54 (e.g. JSON nested too deep): the input's fault.
            raise InvalidInput(_first_line(exc)) from exc
        if row is None:
            raise InstanceExists(instance_id)
        return _instance(row)

    def _get(self, instance_id: str) -> Instance | None:
        query = sql.SQL("SELECT {} FROM service_type_instances WHERE instance_id = %s").format(
            _INSTANCE_COLUMNS
        )
        with self._pool.connection() as conn:
            row = conn.execute(query, (instance_id,)).fetchone()
        return None if row is None else _instance(row)

    def _delete(self, instance_id: str) -> bool:
        with self._pool.connection() as conn:
            cur = conn.execute(
                "DELETE FROM service_type_instances WHERE instance_id = %s", (instance_id,)
            )
            return cur.rowcount > 0

    def _list(
        self, filters: dict[str, str | None], page_size: int, after_id: str | None, id_prefix: str | None
    ) -> tuple[builtins.list[Instance], str | None]:
        # Only the conditions in use appear in the statement: "(%s IS NULL OR
        # col = %s)" would defeat the indexes once psycopg prepares the query.
        conditions: list[sql.Composable] = []
        params: list[Any] = []
        for column, value in filters.items():
            if value is not None:
                conditions.append(sql.SQL("{} = %s").format(sql.Identifier(column)))
                params.append(value)
        if id_prefix:
            # The range lets the primary key's index find the first row (a
            # LIKE would need C collation for that); starts_with bounds it.
            conditions.append(sql.SQL("instance_id >= %s AND starts_with(instance_id, %s)"))
            params += [id_prefix, id_prefix]
        if after_id is not None:
            conditions.append(sql.SQL("instance_id > %s"))
            params.append(after_id)
        query = sql.SQL(
            "SELECT {} FROM service_type_instances{} ORDER BY instance_id LIMIT %s"
        ).format(_INSTANCE_COLUMNS, _where(conditions))
        # One row more than asked tells whether another page exists.
        params.append(page_size + 1)
        with self._pool.connection() as conn:
            rows = conn.execute(query, params).fetchall()
        page = [_instance(row) for row in rows[:page_size]]
        return page, (page[-1].id if len(rows) > page_size else None)

    def _rejected(
        self, reason: str | None, page_size: int, before_id: int | None
    ) -> tuple[builtins.list[RejectedEvent], int | None]:
        conditions: list[sql.Composable] = []
        params: list[Any] = []
        if reason is not None:
            conditions.append(sql.SQL("reason = %s"))
            params.append(reason)
        if before_id is not None:
            conditions.append(sql.SQL("id < %s"))
            params.append(before_id)
        query = sql.SQL(
            "SELECT id, reason, detail, subject, stream_seq, headers::text, body,"
            " service_type, instance_id, received_at"
            " FROM rejected_events{} ORDER BY id DESC LIMIT %s"
        ).format(_where(conditions))
        params.append(page_size + 1)
        with self._pool.connection() as conn:
            rows = conn.execute(query, params).fetchall()
        page = [_rejected(row) for row in rows[:page_size]]
        return page, (page[-1].id if len(rows) > page_size else None)

    def _summary(self, rejected_window_seconds: int) -> Summary:
        with self._pool.connection() as conn:
            counts = conn.execute(
                "SELECT service_type, status, count(*) FROM service_type_instances"
                " GROUP BY service_type, status ORDER BY service_type, status"
            ).fetchall()
            reasons = conn.execute(
                "SELECT reason, count(*) FROM rejected_events"
                " WHERE received_at > now() - make_interval(secs => %s)"
                " GROUP BY reason ORDER BY count(*) DESC, reason",
                (rejected_window_seconds,),
            ).fetchall()
            row = conn.execute("SELECT coalesce(max(change_id), 0) FROM status_changes").fetchone()
            assert row is not None, "an aggregate without GROUP BY returns one row"
            (last,) = row
        return Summary(
            [StatusCount(*row) for row in counts],
            [ReasonCount(*row) for row in reasons],
            rejected_window_seconds,
            last,
        )
