"""The change relay and the outbox's housekeeping (docs/changes.md#relay):
trio tasks over an outbox (the `status_changes` rows) and a publisher (NATS).

The relay of every replica tries to become leader; only the leader
publishes, so no change is published by two replicas at once and changes go
out in change-id order. The leader reads the oldest unpublished rows, hands
them to the publisher (pipelined, acked in order) and marks the acked ones
published. It wakes on the committers' notification, or after
`poll_interval` when a notification was missed. Whatever fails, the rows stay
unpublished and are published again; JetStream drops what it already has.

The engine knows the outbox and the publisher only by these methods
(duck-typed; the adapters implement them).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Protocol

import msgspec
import trio

from dcmstatus.core.changes import PendingChange
from dcmstatus.core.errors import RelayError
from dcmstatus.engine.metrics import Metrics

log = logging.getLogger(__name__)


class Outbox(Protocol):
    @property
    def leading(self) -> bool: ...
    async def lead(self) -> bool: ...
    async def pending(self, limit: int) -> list[PendingChange]: ...
    async def mark_published(self, first: int, last: int) -> None: ...


class Listener(Protocol):
    async def wait(self, timeout: float) -> None: ...


class Publisher(Protocol):
    async def ready(self) -> None: ...
    async def publish(self, changes: list[PendingChange]) -> int: ...


class RelaySettings(msgspec.Struct, frozen=True):
    batch: int = 500  # rows read and published per round
    poll_interval: float = 2.0  # look for rows without a notification this often
    lead_retry: float = 5.0  # a standby replica tries for the leadership this often
    max_backoff: float = 5.0  # seconds between failed rounds at most


class Relay:
    def __init__(
        self, outbox: Outbox, listener: Listener, publisher: Publisher, metrics: Metrics, settings: RelaySettings
    ) -> None:
        self.outbox = outbox
        self.listener = listener
        self.publisher = publisher
        self.metrics = metrics
        self.settings = settings
        self.state = "standby"  # publishing | standby | failing (docs/operations.md#health)
        self._backoff = 0.1  # after a failed round, doubling to max_backoff

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # Ready at once: with NATS or the database away the rows wait, and the
        # rest of the service need not.
        task_status.started()
        s = self.settings
        while True:
            try:
                if not await self.outbox.lead():
                    self._set("standby")
                    await trio.sleep(s.lead_retry)
                    continue
                await self.publisher.ready()
                await self._publish_rounds()
            except Exception as exc:
                self.metrics.changes_publish_errors.inc()
                if self.state != "failing":
                    log.warning("change relay: %s; changes wait in the outbox, retrying", _describe(exc))
                else:
                    log.debug("change relay still failing: %s", _describe(exc))
                self._set("failing")
                await trio.sleep(self._backoff)
                self._backoff = min(self._backoff * 2, s.max_backoff)

    async def _publish_rounds(self) -> None:
        """Publish while leader; returns only by raising."""
        s = self.settings
        metrics = self.metrics
        while self.outbox.leading:
            changes = await self.outbox.pending(s.batch)
            if not changes:
                self._set("publishing")
                await self.listener.wait(s.poll_interval)
                continue
            acked = await self.publisher.publish(changes)
            if acked:
                done = changes[:acked]
                await self.outbox.mark_published(done[0].change_id, done[-1].change_id)
                now = datetime.now(UTC)
                metrics.changes_published.inc(acked)
                metrics.changes_publish_lag.observe_many(
                    max((now - c.commit_time).total_seconds(), 0.0) for c in done
                )
            if acked < len(changes):
                raise RelayError(
                    f"NATS acknowledged {acked} of {len(changes)} change events (from change {changes[0].change_id})"
                )
            self._set("publishing")
        raise RelayError("the relay's database connection was lost, and with it the leadership")

    def _set(self, state: str) -> None:
        before = self.state
        if state == "publishing":
            self._backoff = 0.1
            if before == "standby":
                log.info("change relay: leader of the replicas; publishing change events")
            elif before == "failing":
                log.info("change relay: publishing again")
        elif state == "standby" and before != "standby":
            log.info("change relay: another replica leads; standing by")
        self.state = state
        self.metrics.changes_relay_leader.set(1 if self.outbox.leading else 0)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


class Housekeeping(Protocol):
    async def depth(self) -> tuple[int, float]: ...
    async def prune(self, retention: timedelta, *, relay_on: bool) -> int: ...


async def keep_outbox(
    housekeeping: Housekeeping,
    metrics: Metrics,
    *,
    retention: timedelta,
    relay_on: bool,
    depth_interval: float = 5.0,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Every replica: measure the outbox (while the relay is on) and prune
    rows past `retention` — published ones only while the relay is on."""
    task_status.started()
    # Often enough that a row outlives the retention by at most a tenth of it, at most every 5 minutes.
    prune_interval = min(300.0, max(0.5, retention.total_seconds() / 10))
    next_prune = trio.current_time()
    interval = min(depth_interval, prune_interval) if relay_on else prune_interval
    while True:
        try:
            if relay_on:
                count, age = await housekeeping.depth()
                metrics.changes_outbox.set(count)
                metrics.changes_oldest_unpublished.set(age)
            if trio.current_time() >= next_prune:
                next_prune = trio.current_time() + prune_interval
                pruned = await housekeeping.prune(retention, relay_on=relay_on)
                if pruned:
                    metrics.changes_pruned.inc(pruned)
                    log.info("pruned %d change rows older than %s", pruned, retention)
        except Exception as exc:  # the database is away: health and the writers say so already
            log.debug("outbox housekeeping failed: %s", _describe(exc))
        await trio.sleep(interval)
