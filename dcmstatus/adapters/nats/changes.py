"""The NATS side of the change relay (docs/changes.md#change-events-on-nats):
a connection of its own, the changes stream (bound as it is, or created with
bounded retention), and JetStream publishes of a batch of outbox rows with a
bounded window of acks outstanding.

A JetStream publish is a NATS request whose reply is the ack. nats-py's
`publish_async` costs a future, a task switch and a subscription callback
per message (about 600 changes/s under trio-asyncio, measured), so, as the
consumer does for its acks (docs/performance.md#why-it-is-fast), a window of
up to `window` publishes goes out as one buffer write, each with the reply
subject `<inbox>.<change id>`, and the acks are taken straight from
nats-py's parser. The next window goes once this one is acknowledged.

Every message carries `Nats-Msg-Id` `change-<id>`, so a row published again
(after a crash before it was marked, or by a new leader) is dropped by
JetStream within the duplicate window.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import msgspec
import nats
import nats.errors
import nats.js.errors
import trio_asyncio
from nats.js.api import StorageType

from dcmstatus.adapters.nats import internals
from dcmstatus.adapters.nats.connection import NatsSecurity, open_connection
from dcmstatus.adapters.nats.source import nats_servers, stream_replicas
from dcmstatus.core.changes import PendingChange, change_subject

if TYPE_CHECKING:
    from nats.js import JetStreamContext

log = logging.getLogger(__name__)

_decode_ack = msgspec.json.Decoder().decode


class ChangeStreamSettings(msgspec.Struct, frozen=True):
    url: str
    stream: str = "dcmstatus-changes"
    subject_prefix: str = "dcmstatus.changes"
    max_age: float = 7 * 24 * 3600.0  # retention of a stream we create: the changes retention
    duplicate_window: float = 600.0  # at most max_age
    window: int = 256  # publishes awaiting their ack at most
    ack_timeout: float = 10.0  # for a window's acks
    replicas: int | None = None  # of a stream we create; None: 1 on a single server, 3 on a cluster
    # The same credentials and TLS as intake's connection (docs/security.md):
    # a NATS that wants them for one connection wants them for both.
    security: NatsSecurity = msgspec.field(default_factory=NatsSecurity)


class ChangePublisher:
    def __init__(self, settings: ChangeStreamSettings) -> None:
        self.settings = settings
        self._nc: nats.NATS | None = None
        self._js: JetStreamContext | None = None  # set with _nc, before any use
        self._stream_ready = False
        self._raw = False  # internals.send_raw and the reply hook; set once connected
        self._inbox = ""
        # The window in flight: change id (as text) -> stored?, and what is still unanswered.
        self._expected: set[str] = set()
        self._results: dict[str, bool] = {}
        self._unanswered = 0
        self._answered = asyncio.Event()

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
            self._nc = await open_connection(
                nats_servers(s.url),  # --nats-url may list several servers
                s.security,
                name="dcmstatus-relay",
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
                connect_timeout=2,
                error_cb=self._on_error,
            )
            self._js = self._nc.jetstream()
            self._stream_ready = False
            self._inbox = self._nc.new_inbox()
            sub = await self._nc.subscribe(f"{self._inbox}.*", cb=self._on_reply_msg, pending_bytes_limit=-1)
            self._install_fast_path(sub._id)
        if not self._stream_ready:
            await self._ensure_stream()
            self._stream_ready = True

    def _install_fast_path(self, sid: int) -> None:
        """Take the acks for our inbox straight from nats-py's parser, and
        publish windows as raw protocol lines (adapters/nats/internals.py);
        when nats-py's internals are not what that expects, publish and read
        acks through the public API instead."""
        problem = internals.raw_send_problem(self._nc)
        if problem is not None:
            log.warning("nats-py internals are not what dcmstatus expects (%s); change events go through the public API", problem)
            self._raw = False
            return
        on_reply = self._on_reply
        internals.install_reply_hook(self._nc, sid, lambda subject, data: on_reply(subject.decode(), data, False))
        self._raw = True

    async def _ensure_stream(self) -> None:
        """Bind to the changes stream as it is, or create it with bounded retention."""
        assert self._js is not None, "connected first"
        s = self.settings
        subjects = f"{s.subject_prefix}.>"
        try:
            info = await self._js.stream_info(s.stream)
        except nats.js.errors.NotFoundError:
            replicas, why = stream_replicas(internals.server_info(self._nc), s.replicas)
            await self._js.add_stream(
                name=s.stream,
                subjects=[subjects],
                storage=StorageType.FILE,
                max_age=s.max_age,
                duplicate_window=min(s.duplicate_window, s.max_age),
                num_replicas=replicas,
            )
            log.info(
                "created stream %s on %s for change events, kept %gs, duplicates dropped within %gs, "
                "%d replicas (%s)",
                s.stream, subjects, s.max_age, min(s.duplicate_window, s.max_age), replicas, why,
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
        nc = self._nc
        if nc is None or nc.is_closed:
            raise nats.errors.ConnectionClosedError
        stream_header = f"Nats-Expected-Stream: {s.stream}\r\n\r\n".encode()
        acked = 0
        for start in range(0, len(changes), s.window):
            window = changes[start:start + s.window]
            self._expected = {str(c.change_id) for c in window}
            self._results = {}
            self._unanswered = len(self._expected)
            self._answered.clear()
            if self._raw:
                commands = []
                for change in window:
                    subject = change_subject(s.subject_prefix, change.service_type)
                    headers = b"NATS/1.0\r\nNats-Msg-Id: " + change.message_id.encode() + b"\r\n" + stream_header
                    body = change.body
                    commands.append(
                        f"HPUB {subject} {self._inbox}.{change.change_id} {len(headers)} {len(headers) + len(body)}\r\n".encode()
                        + headers + body + b"\r\n"
                    )
                await internals.send_raw(nc, b"".join(commands))
            else:
                for change in window:
                    await nc.publish(
                        change_subject(s.subject_prefix, change.service_type),
                        change.body,
                        reply=f"{self._inbox}.{change.change_id}",
                        headers={"Nats-Msg-Id": change.message_id, "Nats-Expected-Stream": s.stream},
                    )
            try:
                await asyncio.wait_for(self._answered.wait(), s.ack_timeout)
            except TimeoutError:
                pass
            results = self._results
            for change in window:
                if not results.get(str(change.change_id), False):
                    return acked  # from here on, published again next round
                acked += 1
        return acked

    def _on_reply(self, subject: str, data: bytes, has_headers: bool) -> None:
        token = subject.rpartition(".")[2]
        if token not in self._expected or token in self._results:
            return  # a late reply to an earlier window
        stored, ack = False, None
        if not has_headers:  # headers: a status message (503 no responders), not an ack
            try:
                ack = _decode_ack(data)
                stored = isinstance(ack, dict) and "error" not in ack and "seq" in ack
            except msgspec.DecodeError:
                stored = False
            if not stored and isinstance(ack, dict):
                log.debug("JetStream refused change %s: %s", token, ack.get("error"))
        if not stored:
            self._stream_ready = False  # gone or refusing: ensured again next round
        self._results[token] = stored
        self._unanswered -= 1
        if self._unanswered <= 0:
            self._answered.set()

    async def _on_reply_msg(self, msg) -> None:
        self._on_reply(msg.subject, msg.data, bool(msg.headers))

    async def _on_error(self, exc: Exception) -> None:
        log.warning("NATS error (change relay): %s", exc)
