"""The PostgreSQL write path: one transaction per WriteBatch, holding the
set-based status UPDATE (with the contract's ordering guard) and the
dead-letter INSERT, so one commit makes every message of the batch safe to ack.

psycopg runs synchronously in a worker thread (field notes: as fast as the
async driver under trio-asyncio, and simpler to cancel). Each writer owns one
`StatusStore` and so one connection; a broken connection is dropped and
re-opened on the next attempt. A connection is closed only by the thread that
uses it (see `StatusStore.close`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from functools import partial

import msgspec
import psycopg
import psycopg.errors
import trio

from dcmstatus.core.batching import WriteBatch
from dcmstatus.core.errors import BatchRefused, StoreUnavailable
from dcmstatus.core.model import BatchResult

log = logging.getLogger(__name__)

# Arrays go in binary (%b): the text form costs ~10 ms CPU per 1000 rows.
# A row matches only its own service type, and only when the event is newer
# than the one that set the current status: replays, duplicates and late
# events change nothing. Outputs keep their last value when an event has none.
_APPLY_UPDATES = """
WITH ev AS (
    SELECT * FROM unnest(
        %b::text[], %b::text[], %b::text[], %b::text[], %b::text[],
        %b::text[], %b::timestamptz[], %b::int8[]
    ) AS e(instance_id, service_type, status, message, provider, outputs, event_time, seq)
), upd AS (
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
       -- The same event published twice (same time, same content) is a
       -- duplicate, not a newer event, whatever its stream sequence.
       AND (ev.event_time > t.status_time
            OR ev.status IS DISTINCT FROM t.status
            OR ev.message IS DISTINCT FROM t.status_message
            OR ev.provider IS DISTINCT FROM t.provider_name
            OR (ev.outputs IS NOT NULL AND ev.outputs::jsonb IS DISTINCT FROM t.outputs))
    RETURNING 1
)
SELECT (SELECT count(*) FROM upd),
       ARRAY(SELECT ev.instance_id FROM ev WHERE NOT EXISTS (
           SELECT 1 FROM service_type_instances AS t
            WHERE t.instance_id = ev.instance_id AND t.service_type = ev.service_type))
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

# Errors that say "this data", not "this database": a value a column refuses,
# a constraint, a trigger's RAISE. (A failed dump of a Python value is a
# ValueError.) Connection loss, deadlocks, timeouts and schema problems are
# OperationalError/ProgrammingError: retried as they are, never blamed on an event.
_REFUSALS = (psycopg.DataError, psycopg.IntegrityError, psycopg.errors.RaiseException, ValueError)


class StatusStore:
    """Applies write batches to PostgreSQL; one connection, used by one writer."""

    def __init__(self, conninfo: str, *, dead_letter_limit: int = 10_000) -> None:
        self._conninfo = conninfo
        self._dead_letter_limit = dead_letter_limit
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
                applied, unknown = 0, ()
                if batch.updates:
                    applied, unknown = self._apply_updates(conn, batch)
                if batch.rejections:
                    self._record_rejections(conn, batch)
        except _REFUSALS as exc:
            # The content is at fault, not the database: the pipeline isolates the event.
            raise BatchRefused(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from exc
        except psycopg.Error:
            if conn.broken or conn.closed:
                self._conn = None
            raise
        return BatchResult(
            applied=applied,
            stale=len(batch.updates) - applied - len(unknown) + batch.superseded,
            unknown=tuple(unknown),
        )

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
                self._conninfo,
                connect_timeout=5,
                application_name="dcmstatus-writer",
                # A dead peer must surface as an error, not a hang.
                keepalives=1,
                keepalives_idle=10,
                keepalives_interval=5,
                keepalives_count=3,
            )
        return self._conn

    @staticmethod
    def _apply_updates(conn: psycopg.Connection, batch: WriteBatch) -> tuple[int, list[str]]:
        ups = batch.updates
        params = (
            [u.instance_id for u in ups],
            [u.service_type for u in ups],
            [u.status for u in ups],
            [u.message for u in ups],
            [u.provider for u in ups],
            [None if u.outputs is None else u.outputs.decode() for u in ups],
            [u.event_time for u in ups],
            [u.stream_seq for u in ups],
        )
        row = conn.execute(_APPLY_UPDATES, params).fetchone()
        assert row is not None
        return row[0], row[1]

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
