"""The concurrency core: deliveries in, committed-then-acked batches out.

    source ──Delivery──▶ intake (decode, batch, coalesce) ──WriteBatch──▶ writer × N ──▶ store
                                                                               └──ack──▶ source

Guarantees, whatever the source and store are:
- a message is acked only after the transaction holding its effect committed;
- a failing store acks nothing: the writer backs off and retries the same
  batch, intake stops at the full writer channel, and the source, which
  grants new deliveries only as acks free room, stops pulling (bounded memory);
- when the source closes the delivery channel, everything already received
  is flushed, committed and acked before `run` returns (the drain).

It speaks only to the `Source` and `Store` protocols below, so it is tested
with in-memory fakes and trio's MockClock; the real adapters are NATS and
PostgreSQL.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import msgspec
import trio

from dcmstatus.core.batching import BatchBuilder, WriteBatch
from dcmstatus.core.errors import BatchRefused
from dcmstatus.core.model import (
    DEAD_LETTER_BODY_BYTES,
    INVALID_DATA,
    INVALID_ENVELOPE,
    BatchResult,
    Decision,
    Delivery,
    Rejection,
    StatusUpdate,
)
from dcmstatus.engine.logs import EventLog
from dcmstatus.engine.metrics import Metrics

log = logging.getLogger(__name__)


class Source(Protocol):
    async def ack(self, tokens: list[Any]) -> None: ...


class Store(Protocol):
    async def apply(self, batch: WriteBatch) -> BatchResult: ...


Decode = Callable[[str, "dict[str, str] | None", bytes, int, int], Decision]


class PipelineSettings(msgspec.Struct, frozen=True):
    max_batch: int = 1000  # messages per flush
    max_delay: float = 0.005  # how often a partial batch looks again for an idle writer
    writers: int = 2
    retry_initial: float = 0.1  # first back-off after a failed commit
    retry_max: float = 5.0
    poison_attempts: int = 3  # tries of a lone refused event before it is dead-lettered


class Pipeline:
    def __init__(
        self,
        decode: Decode,
        source: Source,
        stores: Sequence[Store],  # one per writer
        metrics: Metrics,
        settings: PipelineSettings = PipelineSettings(),
        events: EventLog | None = None,
    ) -> None:
        if len(stores) != settings.writers:
            raise ValueError(f"need one store per writer: {settings.writers} writers, {len(stores)} stores")
        self._decode = decode
        self._source = source
        self._stores = stores
        self._metrics = metrics
        self._settings = settings
        self._events = events or EventLog()  # rate-limited: a storm of bad input is summarised
        self.store_healthy = True  # false while a writer is retrying a failed commit
        self.drained = trio.Event()  # set when run() has committed and acked everything

    async def run(
        self,
        deliveries: trio.MemoryReceiveChannel[Delivery],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Process deliveries until the channel is closed and everything is acked."""
        async with trio.open_nursery() as nursery:
            batch_channels = []
            for store in self._stores:
                # Capacity 0: a batch is handed only to a writer ready to take it;
                # the next one fills in the builder meanwhile.
                send, receive = trio.open_memory_channel[WriteBatch](0)
                batch_channels.append(send)
                nursery.start_soon(self._write, store, receive)
            nursery.start_soon(self._intake, deliveries, batch_channels)
            task_status.started()
        self._events.flush()  # the last summary of suppressed lines, if any
        self.drained.set()

    async def _intake(
        self,
        deliveries: trio.MemoryReceiveChannel[Delivery],
        batch_channels: list[trio.MemorySendChannel[WriteBatch]],
    ) -> None:
        """Decode and batch deliveries; hand batches to the writers.

        A shard goes to its writer as soon as that writer is idle, so a quiet
        stream sees the latency of one commit, not of a timer. While a writer
        is busy its shard keeps filling ("one batch commits while the next
        fills"), checked again every `max_delay`; only a full batch makes
        intake wait for the writers, which is the back-pressure that pauses
        the source.
        """
        settings = self._settings
        builder: BatchBuilder[Any] = BatchBuilder(len(batch_channels))
        decode = self._decode
        max_batch = settings.max_batch
        wake_at = math.inf
        backlog = 0
        async with deliveries:
            try:
                while True:
                    full = False
                    with trio.move_on_at(wake_at):
                        try:
                            first = await deliveries.receive()
                        except trio.EndOfChannel:
                            break
                        # One checkpoint per burst, not per message: drain what is
                        # already queued (halves the per-message cost: docs/performance.md#why-it-is-fast).
                        burst = [first]
                        try:
                            while len(builder) + len(burst) < max_batch:
                                burst.append(deliveries.receive_nowait())
                        except (trio.WouldBlock, trio.EndOfChannel):
                            pass  # the next receive() reports the end
                        # The stream's backlog as of the newest delivery: while
                        # it is not 0, more arrives at once (see the hold below).
                        backlog = burst[-1].pending
                        self._metrics.events_received.inc(len(burst))
                        skewed = 0
                        for d in burst:
                            if d.unreadable is None:
                                decision = decode(d.subject, d.headers, d.body, d.stream_seq, d.stream_time_ns)
                            else:
                                decision = _unreadable(d)
                            if type(decision) is not StatusUpdate:
                                self._events.rejected(decision)  # type: ignore[arg-type]
                            elif decision.claimed_time is not None:
                                # Counted here, not after the commit: coalescing may
                                # drop the event, but its time was still wrong.
                                skewed += 1
                                self._events.clock_skew(decision)
                            builder.add(decision, d.token)
                        if skewed:
                            self._metrics.events_clock_skew.inc(skewed)
                        full = len(builder) >= max_batch
                    if full:
                        # Outside the timer's scope: a send cancelled after take()
                        # would drop the batch (NATS would redeliver it, late).
                        await self._flush(builder, batch_channels)
                    elif backlog:
                        # A backlog: more is on its way, so the batch fills up to
                        # max_batch instead of going to an idle writer half
                        # empty (fewer commits per event, more coalescing). The
                        # timer still hands it over when nothing arrives for
                        # max_delay (the credit is used up, or the source stalls).
                        backlog = 0
                        wake_at = trio.current_time() + settings.max_delay
                        continue
                    _hand_to_idle_writers(builder, batch_channels)
                    backlog = 0
                    wake_at = trio.current_time() + settings.max_delay if len(builder) else math.inf
                await self._flush(builder, batch_channels)
            finally:
                for channel in batch_channels:
                    await channel.aclose()

    @staticmethod
    async def _flush(builder: BatchBuilder[Any], batch_channels: list[trio.MemorySendChannel[WriteBatch]]) -> None:
        for batch in builder.take():
            await batch_channels[batch.shard].send(batch)

    async def _write(self, store: Store, batches: trio.MemoryReceiveChannel[WriteBatch]) -> None:
        metrics = self._metrics
        async with batches:
            async for batch in batches:
                result, dead_lettered = await self._commit(store, batch)
                await self._source.ack(batch.tokens)
                metrics.batch_size.observe(len(batch))
                metrics.events_applied.inc(result.applied)
                metrics.events_noop.inc(result.stale)
                metrics.observe_batch(batch, result)
                if result.unknown:
                    metrics.events_unknown_instance.inc(len(result.unknown))
                    if result.parked:
                        metrics.events_parked.inc(result.parked)
                    if result.after_delete:
                        metrics.events_after_delete.inc(result.after_delete)
                if result.parked_expired:
                    metrics.parked_dropped.labels("expired").inc(result.parked_expired)
                if result.parked_evicted:
                    metrics.parked_dropped.labels("evicted").inc(result.parked_evicted)
                self._events.unknown_instances(batch, result.unknown)
                for reason, count in batch.rejection_counts().items():
                    metrics.events_rejected.labels(reason).inc(count)
                for rejection in dead_lettered:
                    metrics.events_rejected.labels(rejection.reason).inc()

    async def _commit(self, store: Store, batch: WriteBatch) -> tuple[BatchResult, list[Rejection]]:
        """Commit `batch`, isolating any event the store refuses.

        Returns what was applied and the events turned into dead letters on
        the way, so a poison event costs a few splits, never a stalled
        consumer or an endless redelivery loop."""
        try:
            return await self._apply(store, batch), []
        except BatchRefused as refusal:
            if len(batch.updates) + len(batch.rejections) > 1:
                log.warning("%r refused (%s); splitting it to isolate the event at fault", batch, refusal)
                first, second = batch.halves()
                result_1, dead_1 = await self._commit(store, first)
                result_2, dead_2 = await self._commit(store, second)
                return result_1 + result_2, dead_1 + dead_2
            if batch.rejections:
                log.error("the database refuses the dead letter %r (%s); dropping it", batch.rejections[0], refusal)
                return _NOTHING, []
            return await self._dead_letter(store, batch, refusal)

    async def _dead_letter(
        self, store: Store, lone: WriteBatch, refusal: BatchRefused
    ) -> tuple[BatchResult, list[Rejection]]:
        """Dead-letter the one update of `lone`, then apply the newest event
        of its instance that it superseded in the batch, if any (which may be
        refused in turn)."""
        [update] = lone.updates
        # A refusal can be passing (a trigger that changes its mind): a few
        # spaced attempts before the event is given up.
        delay = self._settings.retry_initial
        for _ in range(self._settings.poison_attempts - 1):
            await trio.sleep(delay)
            delay = min(delay * 2, self._settings.retry_max)
            try:
                return await self._apply(store, lone), []
            except BatchRefused as again:
                refusal = again
        poison = Rejection(
            INVALID_DATA,
            f"the database refused it: {refusal}",
            f"dcm.{update.service_type}",
            update.stream_seq,
            None,
            _encode_json(update)[:DEAD_LETTER_BODY_BYTES],
            update.service_type,
            update.instance_id,
        )
        self._events.rejected(poison)
        await self._commit(store, WriteBatch.of_rejections(0, [poison]))
        fallback = lone.fallback(update)
        if fallback is None:
            return _NOTHING, [poison]
        # Acked with the batch, the superseded events must not go unapplied.
        result, dead = await self._commit(store, fallback)
        return result, [poison, *dead]

    async def _apply(self, store: Store, batch: WriteBatch) -> BatchResult:
        """Apply until it commits or is refused: nothing is acked meanwhile, so nothing is lost."""
        delay = self._settings.retry_initial
        while True:
            started = trio.current_time()
            try:
                result = await store.apply(batch)
            except BatchRefused:
                raise
            except Exception as exc:  # the store's errors are many; all mean "not committed"
                self._metrics.db_errors.inc()
                self.store_healthy = False
                log.error("commit of %r failed, retrying in %.1fs: %s", batch, delay, _one_line(exc))
                await trio.sleep(delay)
                delay = min(delay * 2, self._settings.retry_max)
                continue
            self._metrics.commit_seconds.observe(trio.current_time() - started)
            if not self.store_healthy:
                log.info("database writes succeed again")
                self.store_healthy = True
            return result


_NOTHING = BatchResult(0, 0, ())
_encode_json = msgspec.json.Encoder().encode


def _unreadable(d: Delivery) -> Rejection:
    """A frame the source could not read as a message: recorded, never decoded."""
    return Rejection(
        INVALID_ENVELOPE, f"unreadable frame: {d.unreadable}", d.subject, d.stream_seq, d.headers,
        bytes(d.body[:DEAD_LETTER_BODY_BYTES]),
    )


def _hand_to_idle_writers(builder: BatchBuilder[Any], batch_channels: list[trio.MemorySendChannel[WriteBatch]]) -> None:
    for shard, channel in enumerate(batch_channels):
        # Capacity 0: send_nowait succeeds exactly when the writer waits in receive().
        if builder.pending(shard) and channel.statistics().tasks_waiting_receive:
            channel.send_nowait(builder.take_shard(shard))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
