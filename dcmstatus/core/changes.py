"""Values and rules of change events on NATS (docs/changes.md#change-events-on-nats):
an outbox row ready to publish, the subject it goes to, and whether a
subject filter would capture change events."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

# Characters a NATS subject token cannot hold as such: a service type written
# by another writer of the table must not make a row unpublishable.
_NOT_A_TOKEN = re.compile(r"[^A-Za-z0-9_-]")
_VALID_PREFIX = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")


@dataclass(frozen=True, slots=True)
class PendingChange:
    """A `status_changes` row not yet published, with its CloudEvent body."""

    change_id: int
    service_type: str
    commit_time: datetime
    body: bytes

    @property
    def message_id(self) -> str:
        """Its CloudEvent id and `Nats-Msg-Id`: JetStream drops a second publish of it."""
        return f"change-{self.change_id}"


def change_subject(prefix: str, service_type: str) -> str:
    return f"{prefix}.{_NOT_A_TOKEN.sub('_', service_type) or '_'}"


def valid_prefix(prefix: str) -> bool:
    """Literal dot-separated tokens: no wildcards, spaces or empty tokens."""
    return _VALID_PREFIX.fullmatch(prefix) is not None


def subjects_overlap(a: str, b: str) -> bool:
    """True when some subject matches both NATS subject patterns."""
    ta, tb = a.split("."), b.split(".")
    for x, y in zip(ta, tb):
        if x == ">" or y == ">":
            return True
        if x != y and "*" not in (x, y):
            return False
    return len(ta) == len(tb)
