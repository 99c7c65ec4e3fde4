"""The PostgreSQL write path: one transaction per WriteBatch, holding the
set-based status UPDATE (with the ordering guard, docs/database.md#the-status-update)
and the dead-letter INSERT, so one commit makes every message of the batch
safe to ack.

psycopg runs synchronously in a worker thread: as fast as the async driver
under trio-asyncio, and simpler to cancel (docs/performance.md#why-it-is-fast).
Each writer owns one `StatusStore` and so one connection; a broken connection
is dropped and re-opened on the next attempt, and so is one to a server that
refuses writes as read-only (SQLSTATE 25006: a standby, or a primary being
demoted): with a multi-host URL and target_session_attrs=read-write the next
connection finds the primary of now (docs/reliability.md#replication-and-failover).
Either way the batch is not committed, so the pipeline retries it and acks nothing. A connection is closed only by
the thread that uses it (see `StatusStore.close`).
"""

from __future__ import annotations

import contextlib
import logging
import struct
import threading
from datetime import timedelta
from functools import partial
from typing import Any, Final

import msgspec
import psycopg
import psycopg.errors
import trio
from psycopg.adapt import Dumper
from psycopg.pq import Format

from dcmstatus.adapters.postgres.conninfo import with_defaults
from dcmstatus.core.batching import WriteBatch
from dcmstatus.core.errors import BatchRefused, StoreUnavailable
from dcmstatus.core.model import BatchResult, StatusUpdate

log = logging.getLogger(__name__)

# Arrays go in binary (%b): the text form costs ~10 ms CPU per 1000 rows.
# A row matches only its own service type, and only when the event is newer
# than the one that set the current status: replays, duplicates and late
# events change nothing. Outputs keep their last value when an event has none.
# The events of a batch, as a relation: arrays go in binary (%b), the text
# form costs ~10 ms CPU per 1000 rows.
_EVENTS = """
    SELECT * FROM unnest(
        %(ids)b::text[], %(types)b::text[], %(statuses)b::text[], %(messages)b::text[], %(providers)b::text[],
        %(outputs)b::text[], %(times)b::timestamptz[], %(seqs)b::int8[]
    ) AS e(instance_id, service_type, status, message, provider, outputs, event_time, seq)
"""

# A row matches only its own service type, and only when the event is newer
# than the one that set the current status: replays, duplicates and late
# events change nothing. Nor does an event older than the row itself (its
# time before the row's creation minus the allowed clock skew): that is a
# predecessor's, of an instance deleted and created again under the same id.
# Outputs keep their last value when an event has none.
# (docs/database.md#ordering-guard)
_UPDATE_ROWS = """
    UPDATE service_type_instances AS t
       SET status = ev.status,
           status_message = ev.message,
           provider_name = ev.provider,
           outputs = COALESCE(ev.outputs::jsonb, t.outputs),
           status_time = ev.event_time,
           status_seq = ev.seq,
           updated_at = now()
      FROM ev
     WHERE t.instance_id = ev.instance_id
       AND t.service_type = ev.service_type
       AND (t.status_time, t.status_seq) < (ev.event_time, ev.seq)
       AND ev.event_time >= t.created_at - %(skew)s::interval
       -- The same event published twice (same time, same content) is a
       -- duplicate, not a newer event, whatever its stream sequence.
       AND (ev.event_time > t.status_time
            OR ev.status IS DISTINCT FROM t.status
            OR ev.message IS DISTINCT FROM t.status_message
            OR ev.provider IS DISTINCT FROM t.provider_name
            OR (ev.outputs IS NOT NULL AND ev.outputs::jsonb IS DISTINCT FROM t.outputs))
    RETURNING t.instance_id, t.service_type
"""

# Unknown instances: of the events no row took (what the update did not
# return), those with no row of their type. Only these few - stale events and
# unknown ids - look the table up a second time, not every event of the
# batch; MATERIALIZED keeps the planner from probing the table first.
_APPLY_UPDATES = f"""
WITH ev AS ({_EVENTS}), upd AS ({_UPDATE_ROWS}),
missed AS MATERIALIZED (
    SELECT instance_id, service_type FROM ev EXCEPT ALL SELECT instance_id, service_type FROM upd
)
SELECT (SELECT count(*) FROM upd),
       ARRAY(SELECT m.instance_id FROM missed AS m
              WHERE NOT EXISTS (
                    SELECT 1 FROM service_type_instances AS t
                     WHERE t.instance_id = m.instance_id AND t.service_type = m.service_type)
              ORDER BY m.instance_id)
"""

# Parking (docs/database.md#parked-events), only for a batch that met unknown
# instances. Rows inserted since the batch's first statement get their event
# now; for the others, park the newest event per (id, service type), unless the id was just
# deleted (a trailing event of the deleted instance) or the event is already
# too old for any row created from now on. Writing a key that a concurrent
# insert is writing too (its trigger) waits for that insert to finish.
_PARK = f"""
WITH ev AS ({_EVENTS}),
upd AS ({_UPDATE_ROWS}),
homeless AS (
    SELECT ev.* FROM ev
     WHERE NOT EXISTS (SELECT 1 FROM service_type_instances AS t WHERE t.instance_id = ev.instance_id)
), after_delete AS (
    SELECT h.instance_id FROM homeless AS h JOIN instance_tombstones AS d USING (instance_id)
     WHERE d.deleted_at > now() - %(ttl)s::interval
), park AS (
    INSERT INTO parked_events AS p
        (instance_id, service_type, status, status_message, provider_name, outputs,
         event_time, stream_seq, expires_at)
    SELECT h.instance_id, h.service_type, h.status, h.message, h.provider, h.outputs::jsonb,
           h.event_time, h.seq, least(now() + %(ttl)s::interval, h.event_time + %(skew)s::interval)
      FROM homeless AS h
     WHERE h.instance_id NOT IN (SELECT instance_id FROM after_delete)
       AND h.event_time + %(skew)s::interval >= now()
    ON CONFLICT (instance_id, service_type) DO UPDATE
       SET status = EXCLUDED.status,
           status_message = EXCLUDED.status_message,
           provider_name = EXCLUDED.provider_name,
           outputs = EXCLUDED.outputs,
           event_time = EXCLUDED.event_time,
           stream_seq = EXCLUDED.stream_seq,
           expires_at = EXCLUDED.expires_at,
           id = nextval(pg_get_serial_sequence('parked_events', 'id'))
     WHERE (p.event_time, p.stream_seq) < (EXCLUDED.event_time, EXCLUDED.stream_seq)
    RETURNING 1
)
SELECT ARRAY(SELECT instance_id FROM upd), (SELECT count(*) FROM park), (SELECT count(*) FROM after_delete)
"""

# Then, in a statement of its own (so it sees inserts that committed while we
# parked or waited), move parked events of these ids whose row exists now
# onto the row, under the ordering and predecessor guards.
_SETTLE = """
WITH moved AS (
    DELETE FROM parked_events AS p
     USING service_type_instances AS t
     WHERE p.instance_id = ANY(%(ids)s::text[])
       AND t.instance_id = p.instance_id AND t.service_type = p.service_type
    RETURNING p.*
), upd AS (
    UPDATE service_type_instances AS t
       SET status = m.status,
           status_message = m.status_message,
           provider_name = m.provider_name,
           outputs = COALESCE(m.outputs, t.outputs),
           status_time = m.event_time,
           status_seq = m.stream_seq,
           updated_at = now()
      FROM moved AS m
     WHERE t.instance_id = m.instance_id AND t.service_type = m.service_type
       AND (t.status_time, t.status_seq) < (m.event_time, m.stream_seq)
       AND m.expires_at >= t.created_at
    RETURNING t.instance_id
)
SELECT ARRAY(SELECT instance_id FROM upd), (SELECT count(*) FROM moved)
"""

# Keep parking bounded: drop what expired, then the oldest beyond the limit
# (ids are renumbered on replacement, so the newest `limit` ids are the
# newest parked events), and tombstones past the TTL.
_PRUNE_PARKED = """
WITH expired AS (
    DELETE FROM parked_events WHERE expires_at < now() RETURNING 1
), evicted AS (
    DELETE FROM parked_events
     WHERE id <= (SELECT max(id) FROM parked_events) - %(limit)s AND expires_at >= now()
    RETURNING 1
), tombstones AS (
    DELETE FROM instance_tombstones WHERE deleted_at < now() - %(ttl)s::interval
)
SELECT (SELECT count(*) FROM expired), (SELECT count(*) FROM evicted)
"""

_RECORD_REJECTIONS = """
INSERT INTO rejected_events
    (reason, detail, subject, stream_seq, headers, body, service_type, instance_id)
SELECT * FROM unnest(
    %b::text[], %b::text[], %b::text[], %b::int8[], %b::text[]::jsonb[], %b::bytea[],
    %b::text[], %b::text[])
"""

# The dead-letter table is bounded: keep the newest `limit` rows.
_PRUNE_REJECTIONS = "DELETE FROM rejected_events WHERE id <= (SELECT max(id) FROM rejected_events) - %s"

_json = msgspec.json.Encoder()
_TEXT_OID: Final = 25
_TEXT_ARRAY_OID: Final = 1009
_ARRAY_HEADER: Final = struct.Struct(">iiIii")  # ndim, has nulls, element oid, length, lower bound

# Errors that say "this data", not "this database": a value a column refuses,
# a constraint, a trigger's RAISE. (A failed dump of a Python value is a
# ValueError.) Connection loss, deadlocks, timeouts and schema problems are
# OperationalError/ProgrammingError: retried as they are, never blamed on an event.
_REFUSALS = (psycopg.DataError, psycopg.IntegrityError, psycopg.errors.RaiseException, ValueError)


class StatusStore:
    """Applies write batches to PostgreSQL; one connection, used by one writer."""

    def __init__(
        self,
        conninfo: str,
        *,
        dead_letter_limit: int = 10_000,
        max_clock_skew: timedelta = timedelta(minutes=5),
        parked_ttl: timedelta = timedelta(minutes=5),
        parked_limit: int = 100_000,
    ) -> None:
        self._conninfo = conninfo
        self._dead_letter_limit = dead_letter_limit
        self._skew = max_clock_skew
        self._parked_ttl = parked_ttl
        self._parked_limit = parked_limit
        self._conn: psycopg.Connection | None = None
        # Held by the thread running statements on the connection: libpq
        # must not have the connection closed under a running statement.
        self._in_use = threading.Lock()
        self._closing = False

    async def apply(self, batch: WriteBatch) -> BatchResult:
        # abandon_on_cancel: if the grace period ends mid-commit we walk away;
        # that batch is simply never acked and comes back, which the ordering
        # guard makes harmless.
        return await trio.to_thread.run_sync(
            partial(self.apply_sync, batch), abandon_on_cancel=True
        )

    def apply_sync(self, batch: WriteBatch) -> BatchResult:
        with self._in_use:
            if self._closing:
                raise StoreUnavailable("the status writer is closed")
            try:
                return self._apply_sync(batch)
            finally:
                if self._closing:  # close() came while the statement ran: ours to close
                    self._close_connection()

    def _apply_sync(self, batch: WriteBatch) -> BatchResult:
        conn = self._connection()
        try:
            with conn.transaction():
                result = _NOTHING
                if batch.updates:
                    result = self._apply_updates(conn, batch)
                if batch.rejections:
                    self._record_rejections(conn, batch)
        except psycopg.errors.ReadOnlySqlTransaction as exc:
            # Not this batch's fault, and not this server's to fix: find the primary.
            self._close_connection()
            raise StoreUnavailable(
                f"the database refused the write as read-only ({_first_line(exc)}); reconnecting to find the primary"
            ) from exc
        except _REFUSALS as exc:
            # The content is at fault, not the database: the pipeline isolates the event.
            raise BatchRefused(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from exc
        except psycopg.Error:
            if conn.broken or conn.closed:
                self._conn = None
            raise
        return result

    def close(self, cancel_timeout: float = 2.0) -> None:
        """Close the connection; safe from any thread, and while a writer
        thread abandoned at the grace deadline still runs a statement on it:
        that statement is then cancelled (waiting at most `cancel_timeout`
        for a server that may not answer) and its thread closes the
        connection when the statement returns. Later applies are refused."""
        self._closing = True
        if self._in_use.acquire(blocking=False):
            try:
                self._close_connection()
            finally:
                self._in_use.release()
            return
        conn = self._conn
        if conn is not None:
            # cancel_safe may run beside the statement; errors mean there is
            # nothing left to cancel, or no server to hear it.
            with contextlib.suppress(psycopg.Error):
                conn.cancel_safe(timeout=cancel_timeout)

    def _close_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _connection(self) -> psycopg.Connection:
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(
                with_defaults(
                    self._conninfo,
                    connect_timeout=5,
                    application_name="dcmstatus-writer",
                    # A dead peer must surface as an error, not a hang.
                    keepalives=1,
                    keepalives_idle=10,
                    keepalives_interval=5,
                    keepalives_count=3,
                )
            )
            self._conn.adapters.register_dumper(_TextArray, _TextArrayDumper)
        return self._conn

    def _apply_updates(self, conn: psycopg.Connection, batch: WriteBatch) -> BatchResult:
        ups = batch.updates
        params = {**_event_params(ups), "skew": self._skew}
        row = conn.execute(_APPLY_UPDATES, params).fetchone()
        assert row is not None
        applied, unknown = row
        parked = after_delete = expired = evicted = 0
        if unknown:
            # Rare in steady state: only batches that met unknown instances pay
            # for parking, with up to three statements per batch, none per event.
            missing = set(unknown)
            homeless = [u for u in ups if u.instance_id in missing]
            ids = [u.instance_id for u in homeless]
            park = {**_event_params(homeless), "skew": self._skew, "ttl": self._parked_ttl}
            found, parked, after_delete = conn.execute(_PARK, park).fetchone()  # type: ignore[misc]
            if parked:
                settled, moved = conn.execute(_SETTLE, {"ids": ids}).fetchone()  # type: ignore[misc]
                parked -= moved
                found += settled
            if found:
                # Rows inserted while this batch ran: applied now, no longer unknown.
                applied += len(found)
                now_known = set(found)
                unknown = [i for i in unknown if i not in now_known]
            if parked:
                prune = {"ttl": self._parked_ttl, "limit": self._parked_limit}
                expired, evicted = conn.execute(_PRUNE_PARKED, prune).fetchone()  # type: ignore[misc]
        return BatchResult(
            applied=applied,
            stale=len(ups) - applied - len(unknown) + batch.superseded,
            unknown=tuple(unknown),
            parked=parked,
            after_delete=after_delete,
            parked_expired=expired,
            parked_evicted=evicted,
        )

    def _record_rejections(self, conn: psycopg.Connection, batch: WriteBatch) -> None:
        rs = batch.rejections
        params = (
            [r.reason for r in rs],
            [_storable(r.detail) for r in rs],
            [_storable(r.subject) for r in rs],
            [r.stream_seq for r in rs],
            [_storable_headers(r.headers) for r in rs],
            [r.body for r in rs],
            [_storable(r.service_type) for r in rs],
            [_storable(r.instance_id) for r in rs],
        )
        conn.execute(_RECORD_REJECTIONS, params)
        conn.execute(_PRUNE_REJECTIONS, (self._dead_letter_limit,))


_NOTHING = BatchResult(0, 0, ())


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _event_params(ups: list[StatusUpdate]) -> dict[str, Any]:
    # The text columns as ready binary text[] values (see _TextArray): service
    # types, statuses, providers and messages repeat across a batch, so their
    # elements come from a cache; psycopg's list dumper costs ~0.19 µs per
    # element and column.
    return {
        "ids": _text_array([u.instance_id for u in ups]),
        "types": _text_array([u.service_type for u in ups], _REPEATED),
        "statuses": _text_array([u.status for u in ups], _REPEATED),
        "messages": _text_array([u.message for u in ups], _REPEATED),
        "providers": _text_array([u.provider for u in ups], _REPEATED),
        "outputs": _text_array([None if u.outputs is None else u.outputs.decode() for u in ups]),
        "times": [u.event_time for u in ups],
        "seqs": [u.stream_seq for u in ups],
    }


class _TextArray:
    """A text[] parameter already in PostgreSQL's binary array form."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


class _TextArrayDumper(Dumper):
    format = Format.BINARY
    oid = _TEXT_ARRAY_OID

    def dump(self, obj: Any) -> bytes:
        return obj.data


_NULL_ELEMENT: Final = b"\xff\xff\xff\xff"  # length -1
# Element bytes of recurring values, across batches and writer threads (a
# dict's get and setdefault are atomic; a value missed is encoded again).
_REPEATED: dict[str | None, bytes] = {}
_REPEATED_LIMIT: Final = 10_000  # then it starts afresh: messages can be as many as events


def _element(value: str | None) -> bytes:
    """One element of a binary text array: its length, then its UTF-8 bytes.
    Text that cannot be encoded (a lone surrogate) raises UnicodeEncodeError,
    a ValueError: a refusal, as psycopg's own dumper would make it."""
    if value is None:
        return _NULL_ELEMENT
    data = value.encode()
    return len(data).to_bytes(4, "big") + data


def _text_array(values: list[str | None], cache: dict[str | None, bytes] | None = None) -> _TextArray:
    """PostgreSQL's binary form of a one-dimensional text[] (array_recv):
    dimensions 1, a has-nulls flag, the element type, the length and lower
    bound 1, then each element."""
    if cache is None:
        elements = list(map(_element, values))
    else:
        if len(cache) > _REPEATED_LIMIT:
            cache.clear()
        get = cache.get
        elements = [get(v) or cache.setdefault(v, _element(v)) for v in values]
    header = _ARRAY_HEADER.pack(1, None in values, _TEXT_OID, len(values), 1)
    return _TextArray(header + b"".join(elements))


def _storable(text: str | None) -> str | None:
    """Hostile input must still be recordable: PostgreSQL text takes neither
    NUL (it becomes U+FFFD) nor lone surrogates (they become '?')."""
    if text is None:
        return None
    return text.encode("utf-8", "replace").decode("utf-8").replace("\x00", "\ufffd")


def _storable_headers(headers: dict[str, str] | None) -> str | None:
    if headers is None:
        return None
    # jsonb rejects the \u0000 escape, so NULs are replaced before encoding.
    clean = {_storable(str(k)): _storable(str(v)) for k, v in headers.items()}
    return _json.encode(clean).decode()
