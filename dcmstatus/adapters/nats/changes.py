"""The NATS side of the change relay (docs/changes.md#change-events-on-nats):
a connection of its own, the changes stream (bound as it is, or created with
bounded retention), and JetStream publishes of a batch of outbox rows with a
bounded window of acks outstanding.

nats-py's `publish_async` does the pipelining: each publish returns a future
for its ack, and a semaphore of `window` permits holds back the next publish
while that many acks are outstanding. Every message carries `Nats-Msg-Id`
`change-<id>`, so a row published again (after a crash before it was marked,
or by a new leader) is dropped by JetStream within the duplicate window.
"""

from __future__ import annotations

import asyncio
import logging

import msgspec
import nats
import nats.js.errors
import trio_asyncio
from nats.js.api import StorageType

from dcmstatus.core.changes import PendingChange, change_subject

log = logging.getLogger(__name__)


class ChangeStreamSettings(msgspec.Struct, frozen=True):
    url: str
    stream: str = "dcmstatus-changes"
    subject_prefix: str = "dcmstatus.changes"
    max_age: float = 7 * 24 * 3600.0  # retention of a stream we create: the changes retention
    duplicate_window: float = 600.0  # at most max_age
    window: int = 256  # acks outstanding at most
    ack_timeout: float = 10.0  # for a whole batch's acks


class ChangePublisher:
    def __init__(self, settings: ChangeStreamSettings) -> None:
        self.settings = settings
        self._nc: nats.NATS | None = None
        self._js = None
        self._stream_ready = False

    # ---- trio side -------------------------------------------------------

    async def ready(self) -> None:
        """Connected, and the changes stream exists (raises while NATS is away)."""
        await trio_asyncio.aio_as_trio(self._ready)()

    async def publish(self, changes: list[PendingChange]) -> int:
        """Publish `changes` in order; return how many of them, from the
        first, JetStream acknowledged (all of them unless something failed)."""
        return await trio_asyncio.aio_as_trio(self._publish)(changes)

    async def close(self) -> None:
        if self._nc is None or self._nc.is_closed:
            return
        try:
            await trio_asyncio.aio_as_trio(self._nc.close)()
        except Exception as exc:  # a lost transport has nothing left to close
            log.debug("closing the relay's NATS connection: %s", exc)

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    # ---- asyncio side ----------------------------------------------------

    async def _ready(self) -> None:
        s = self.settings
        if self._nc is None or self._nc.is_closed:
            self._nc = await nats.connect(
                s.url,
                name="dcmstatus-relay",
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                connect_timeout=2,
                error_cb=self._on_error,
            )
            self._js = self._nc.jetstream(publish_async_max_pending=s.window)
            self._stream_ready = False
        if not self._stream_ready:
            await self._ensure_stream()
            self._stream_ready = True

    async def _ensure_stream(self) -> None:
        """Bind to the changes stream as it is, or create it with bounded retention."""
        s = self.settings
        subjects = f"{s.subject_prefix}.>"
        try:
            info = await self._js.stream_info(s.stream)
        except nats.js.errors.NotFoundError:
            await self._js.add_stream(
                name=s.stream,
                subjects=[subjects],
                storage=StorageType.FILE,
                max_age=s.max_age,
                duplicate_window=min(s.duplicate_window, s.max_age),
            )
            log.info(
                "created stream %s on %s for change events, kept %gs, duplicates dropped within %gs",
                s.stream, subjects, s.max_age, min(s.duplicate_window, s.max_age),
            )
            return
        config = info.config
        if subjects not in (config.subjects or []):
            log.warning(
                "stream %s has subjects %s, not %s; publishing change events to it as it is",
                s.stream, config.subjects, subjects,
            )
        log.info("bound to the existing stream %s for change events", s.stream)

    async def _publish(self, changes: list[PendingChange]) -> int:
        s = self.settings
        js = self._js
        futures = []
        try:
            for change in changes:
                # publish_async waits here while `window` acks are outstanding.
                futures.append(
                    await js.publish_async(
                        change_subject(s.subject_prefix, change.service_type),
                        change.body,
                        wait_stall=s.ack_timeout,
                        stream=s.stream,
                        headers={"Nats-Msg-Id": change.message_id},
                    )
                )
        except Exception as exc:
            log.debug("publish stopped after %d of %d changes: %s", len(futures), len(changes), exc)
        if futures:
            await asyncio.wait(futures, timeout=s.ack_timeout)
        # Acked from the first on; the rest is published again next time.
        acked, in_order = 0, True
        for future in futures:
            if not future.done():
                future.cancel()  # releases its window permit
                in_order = False
                continue
            exc = None if future.cancelled() else future.exception()  # retrieved: no asyncio noise
            if future.cancelled() or exc is not None:
                in_order = False
                if isinstance(exc, nats.js.errors.NotFoundError | nats.js.errors.NoStreamResponseError):
                    self._stream_ready = False  # gone behind our back: ensured again next time
            elif in_order:
                acked += 1
        return acked

    async def _on_error(self, exc: Exception) -> None:
        log.warning("NATS error (change relay): %s", exc)
