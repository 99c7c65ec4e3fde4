"""`dcmstatus watch`: follow the change feed's event stream (docs/cli.md#watch).

One line per change. A dropped connection (network, server restart, the
database gone for a moment) is retried with a capped back-off and resumed
from the last id received, so the output has no gap and no repeat. Only an
answer that retrying cannot change (a bad token, a bad filter) ends it.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from dcmstatus.cli.client import ApiClient
from dcmstatus.core.errors import ApiError

__all__ = ["BACKOFF_SECONDS", "change_line", "follow"]

PATH = "/api/v1/status-changes"
BACKOFF_SECONDS = (0.5, 1, 2, 5, 10)  # the last one repeats
# The server sends a heartbeat every 15 s at the latest: three missed mean
# the connection is dead even if the socket does not say so.
READ_TIMEOUT = 45.0
# Answers worth retrying: the stream limit, a database or server going away.
_RETRIED = {502, 503, 504}


def change_line(change: dict[str, Any]) -> str:
    """time  instance  type  previous → status  message"""
    previous = change["previous_status"] or "-"
    status = change["status"] or "(deleted)"
    parts = [change["commit_time"], change["instance_id"], change["service_type"], f"{previous} → {status}"]
    if change["status_message"]:
        parts.append(" ".join(change["status_message"].split()))
    return "  ".join(parts)


def follow(
    client: ApiClient,
    query: dict[str, Any],
    after: int | None,
    *,
    as_json: bool,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Print changes after `after` (None: from the present) until interrupted.
    Raises ApiError for an answer that retrying cannot change."""
    position = after
    failures = 0
    while True:
        try:
            for change_id, change in client.events(PATH, {**query, "after": after}, position, READ_TIMEOUT):
                position = change_id
                if change is not None:
                    print(json.dumps(change) if as_json else change_line(change), file=out, flush=True)
                if failures:
                    print("watch: connected again", file=err, flush=True)
                    failures = 0
            reason = "the server ended the stream"
        except ApiError as exc:
            if exc.status is not None and exc.status not in _RETRIED:
                raise
            reason = str(exc)
        delay = BACKOFF_SECONDS[min(failures, len(BACKOFF_SECONDS) - 1)]
        failures += 1
        print(f"watch: {reason}; reconnecting in {delay:g}s", file=err, flush=True)
        sleep(delay)
