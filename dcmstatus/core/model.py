"""The values that flow through dcmstatus: decisions made by the I/O-free core
(a status update or a rejection) and the batches the writers commit.

Nothing here does I/O; every adapter (NATS, PostgreSQL, HTTP) speaks in these
types, so the core can be tested without servers.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Final

import msgspec

# The fixed vocabulary of rejection reasons, used in logs, metrics and dead
# letters (docs/events.md#rejections).
MALFORMED_JSON: Final = "malformed_json"
INVALID_ENVELOPE: Final = "invalid_envelope"
UNSUPPORTED_SPECVERSION: Final = "unsupported_specversion"
INVALID_DATA: Final = "invalid_data"
UNKNOWN_SERVICE_TYPE: Final = "unknown_service_type"
MISSING_INSTANCE_ID: Final = "missing_instance_id"
INVALID_INSTANCE_ID: Final = "invalid_instance_id"
UNKNOWN_STATUS: Final = "unknown_status"
TOO_LARGE: Final = "too_large"

REJECTION_REASONS: Final = (
    MALFORMED_JSON,
    INVALID_ENVELOPE,
    UNSUPPORTED_SPECVERSION,
    INVALID_DATA,
    UNKNOWN_SERVICE_TYPE,
    MISSING_INSTANCE_ID,
    INVALID_INSTANCE_ID,
    UNKNOWN_STATUS,
    TOO_LARGE,
)

# How much of a rejected body the dead-letter record keeps.
DEAD_LETTER_BODY_BYTES: Final = 4096


class Delivery(msgspec.Struct, gc=False):
    """One message as taken from the stream, before decoding."""

    subject: str
    headers: dict[str, str] | None
    body: bytes
    stream_seq: int
    stream_time_ns: int
    token: Any  # what the source needs to ack it (the JetStream reply subject)
    # Set by the source for a frame it could read only in part (a subject
    # that is not UTF-8, a broken header block, …): the sentence saying so.
    # Such a delivery is not decoded; it is rejected as invalid_envelope.
    unreadable: str | None = None
    # Messages the stream still held for the consumer when this one was sent
    # (the last number of a JetStream ack subject); 0 when not known. While
    # it is not 0 more is on its way, so the pipeline lets batches fill.
    pending: int = 0


class StatusUpdate(msgspec.Struct, frozen=True, gc=False):
    """An accepted event, reduced to what the database needs."""

    instance_id: str
    service_type: str
    status: str  # canonical, upper case
    message: str
    provider: str
    outputs: bytes | None  # the JSON text of data.output_spec (an object), or None
    event_time: datetime  # timezone-aware
    stream_seq: int
    # The time the event claimed when that was more than the allowed clock
    # skew after the stream time, which then became `event_time`
    # (docs/events.md#time); None when the event's own time was used.
    claimed_time: datetime | None = None

    def order_key(self) -> tuple[datetime, int]:
        """The ordering guard (docs/events.md#ordering): event time, then stream sequence."""
        return (self.event_time, self.stream_seq)


class Rejection(msgspec.Struct, frozen=True):
    """An event that will never be applied, with the contract's reason."""

    reason: str  # one of REJECTION_REASONS
    detail: str  # one human sentence: what was wrong
    subject: str
    stream_seq: int
    headers: dict[str, str] | None
    body: bytes  # at most DEAD_LETTER_BODY_BYTES
    service_type: str | None = None
    instance_id: str | None = None


Decision = StatusUpdate | Rejection


class BatchResult(msgspec.Struct, frozen=True):
    """What one committed batch did, for metrics and logs."""

    applied: int
    stale: int  # newer-or-equal event already stored: replay, duplicate, late, a predecessor's
    unknown: tuple[str, ...]  # instance ids with no row of that service type
    parked: int = 0  # unknown-instance events kept for a row that may appear (docs/database.md#parked-events)
    after_delete: int = 0  # unknown-instance events for a just-deleted id: not parked
    parked_expired: int = 0  # parked events dropped because their time ran out
    parked_evicted: int = 0  # parked events dropped to stay within the parking bound

    def __add__(self, other: BatchResult) -> BatchResult:
        return BatchResult(
            self.applied + other.applied,
            self.stale + other.stale,
            self.unknown + other.unknown,
            self.parked + other.parked,
            self.after_delete + other.after_delete,
            self.parked_expired + other.parked_expired,
            self.parked_evicted + other.parked_evicted,
        )
