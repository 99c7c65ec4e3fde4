"""The NATS JetStream adapter: ensures the stream and the durable pull
consumer, pulls messages, hands them to trio as `Delivery` values and acks
them when the pipeline says so.

nats-py is asyncio; it runs inside trio through trio-asyncio (the supervisor
opens the loop). Two field-notes facts shape this module:

- nats-py's own `fetch()` spawns a task per message (~3k msg/s under
  trio-asyncio), so it pulls "continuously" itself: one core subscription on
  an inbox plus `$JS.API.CONSUMER.MSG.NEXT` requests, refilled as room frees
  up (~80-95k msg/s).
- Memory is bounded by credit: new pull requests go out only while
  received-but-unacked plus requested messages stay under `max_in_flight`. A
  stalled database therefore stops the pulls, not the process.

Nothing reports a consumer deleted behind our back, so a ticker checks
`consumer_info` and recreates it.

Every frame the server delivers ends as a delivery (maybe marked unreadable,
which the pipeline rejects before the ack), a pull status, or a counted drop
(no ack subject); none raises into nats-py (frames.py). The nats-py private
API this needs lives in internals.py; when that is not what it expects, the
public API is used instead (`NatsSettings.fast_path` turns it off too).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any

import msgspec
import nats
import nats.aio.client
import nats.errors
import nats.js.errors
import trio
import trio_asyncio
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType

from dcmstatus.adapters.nats import internals
from dcmstatus.adapters.nats.frames import Frame, ack_position, read_frame
from dcmstatus.core.model import Delivery
from dcmstatus.engine.logs import EventLog
from dcmstatus.engine.metrics import Metrics

log = logging.getLogger(__name__)

_encode_json = msgspec.json.Encoder().encode
_MAX_REQUESTS = 16  # pull requests outstanding at once


class NatsSettings(msgspec.Struct, frozen=True):
    url: str
    stream: str = "dcm-status"
    subjects: str = "dcm.*"
    durable: str = "dcmstatus"
    ack_wait: float = 30.0  # seconds before the server redelivers an unacked message
    max_ack_pending: int = 20_000
    max_in_flight: int = 10_000  # our own bound; at most max_ack_pending
    max_in_flight_bytes: int = 64 * 1024 * 1024  # the same bound in body bytes
    pull_batch: int = 500
    pull_expires: float = 5.0
    check_interval: float = 5.0  # consumer existence check
    fast_path: bool = True  # nats-py internals (internals.py) when they check out; False: public API only


class JetStreamSource:
    def __init__(self, settings: NatsSettings, metrics: Metrics) -> None:
        if settings.max_in_flight > settings.max_ack_pending:
            raise ValueError("max_in_flight must not exceed max_ack_pending")
        self.settings = settings
        self._metrics = metrics
        self._nc: nats.NATS | None = None
        self._js = None
        self._sub = None
        self._inbox = ""
        self._next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{settings.stream}.{settings.durable}"
        self._deliveries: trio.MemorySendChannel[Delivery] | None = None
        # Credit accounting, all on the (single) event-loop thread.
        self._in_flight = 0
        self._requests: deque[list[float]] = deque()  # [remaining, expires_at] per pull request
        self._requested = 0
        self._stopping = False
        self._received = 0
        # Bytes: what is held, per ack token, and what each pull request may bring.
        self._bytes_in_flight = 0
        self._sizes: dict[str, int] = {}
        self._request_bytes = 0  # set once connected (needs the server's max_payload)
        self._intake_closed = False
        self.consumer_ok = False
        self.fast_path = False  # true once the frame hook is installed
        self._send_acks = _publish_acks  # internals.send_acks with the fast path
        self.acks_failing = False  # the most recent ack send failed
        self._events = EventLog(log)  # rate-limited lines about dropped frames

    # ---- trio side -------------------------------------------------------

    async def run(
        self,
        deliveries: trio.MemorySendChannel[Delivery],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Connect, ensure stream and consumer, subscribe, then keep watch until stopped."""
        self._deliveries = deliveries
        await self._connect()
        await trio_asyncio.aio_as_trio(self._ensure_stream)()
        await trio_asyncio.aio_as_trio(self._ensure_consumer)()
        await trio_asyncio.aio_as_trio(self._subscribe)()
        task_status.started()
        s = self.settings
        next_check = trio.current_time() + s.check_interval
        while not self._stopping:
            await trio.sleep(min(1.0, s.pull_expires / 2))
            if self._stopping:
                break
            if trio.current_time() >= next_check:
                next_check = trio.current_time() + s.check_interval
                await trio_asyncio.aio_as_trio(self._check_consumer)()
            await trio_asyncio.aio_as_trio(self._refill)()

    async def ack(self, tokens: list[str]) -> None:
        await trio_asyncio.aio_as_trio(self._ack_and_refill)(tokens)

    async def stop_intake(self) -> None:
        """Stop pulling; take in what is already on its way; close the channel."""
        self._stopping = True
        # Messages the server sends for our open pull requests after we
        # unsubscribe would wait out ack_wait before redelivery, so while they
        # keep coming (a backlog) take them in; an idle stream sends nothing more.
        deadline = trio.current_time() + self.settings.pull_expires
        seen = -1
        while self._requested > 0 and self._received != seen and trio.current_time() < deadline:
            seen = self._received
            await trio.sleep(0.05)
        if self._sub is not None:
            try:
                await trio_asyncio.aio_as_trio(self._sub.drain)()
            except Exception as exc:  # a dead connection has nothing left to drain
                log.debug("drain of the pull subscription failed: %s", exc)
        self._intake_closed = True
        if self._deliveries is not None:
            await self._deliveries.aclose()

    async def close(self) -> None:
        """Push out the last acks, then close the connection."""
        self._events.flush()  # the summary of suppressed lines about dropped frames, if any
        if self._nc is None or self._nc.is_closed:
            return
        try:
            await trio_asyncio.aio_as_trio(self._nc.flush)(2)
        except Exception as exc:
            log.warning("could not flush the last acks to NATS (%s); those messages will be redelivered", exc)
        try:
            await trio_asyncio.aio_as_trio(self._nc.close)()
        except Exception as exc:
            # SIGTERM while the server is away (a restart): nats-py's close()
            # drains a lost transport and raises ConnectionResetError. There
            # is nothing left to close; the exit must still be clean (0).
            log.debug("closing the NATS connection: %s", exc)

    def health(self) -> dict[str, str]:
        nc = self._nc
        if nc is None:
            connection = "connecting"
        elif nc.is_connected:
            connection = "connected"
        elif nc.is_reconnecting:
            connection = "reconnecting"
        elif nc.is_closed:
            connection = "closed"
        else:
            connection = "disconnected"
        consumer = "subscribed" if (self.consumer_ok and self._sub is not None and not self._stopping) else "not subscribed"
        components = {"nats": connection, "consumer": consumer}
        if self.acks_failing:
            components["acks"] = "failing"
        return components

    @property
    def healthy(self) -> bool:
        h = self.health()
        return h["nats"] == "connected" and h["consumer"] == "subscribed" and "acks" not in h

    async def _connect(self) -> None:
        delay = 0.5
        while True:
            try:
                self._nc = await trio_asyncio.aio_as_trio(nats.connect)(
                    self.settings.url,
                    name="dcmstatus",
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,  # the default gives up after ~2 minutes
                    reconnect_time_wait=0.5,
                    connect_timeout=2,
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                )
                self._js = self._nc.jetstream()
                log.info("connected to NATS at %s", self.settings.url)
                return
            except Exception as exc:
                log.warning("cannot reach NATS at %s (%s); retrying in %.1fs", self.settings.url, exc, delay)
                await trio.sleep(delay)
                delay = min(delay * 2, 5.0)

    # ---- asyncio side ----------------------------------------------------

    async def _ensure_stream(self) -> None:
        s = self.settings
        try:
            info = await self._js.stream_info(s.stream)
        except nats.js.errors.NotFoundError:
            await self._js.add_stream(name=s.stream, subjects=[s.subjects], storage=StorageType.FILE)
            log.info("created stream %s on %s", s.stream, s.subjects)
            return
        # An existing stream is used as it is: never reconfigure it destructively.
        if s.subjects not in (info.config.subjects or []):
            log.warning(
                "stream %s exists with subjects %s, not %s; using it as it is",
                s.stream, info.config.subjects, s.subjects,
            )

    def _consumer_config(self) -> ConsumerConfig:
        s = self.settings
        return ConsumerConfig(
            durable_name=s.durable,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            filter_subject=s.subjects,
            ack_wait=s.ack_wait,
            max_ack_pending=s.max_ack_pending,
        )

    async def _ensure_consumer(self) -> None:
        s = self.settings
        wanted = self._consumer_config()
        try:
            info = await self._js.consumer_info(s.stream, s.durable)
        except nats.js.errors.NotFoundError:
            info = None
        if info is None:
            await self._js.add_consumer(s.stream, wanted)
            log.info("created durable consumer %s on stream %s", s.durable, s.stream)
        else:
            have = info.config
            if (have.ack_wait, have.max_ack_pending, have.filter_subject) != (
                wanted.ack_wait, wanted.max_ack_pending, wanted.filter_subject,
            ):
                # js.subscribe would silently keep the old config; update it explicitly.
                await self._js.add_consumer(s.stream, wanted)
                log.info("updated durable consumer %s to the configured settings", s.durable)
        self.consumer_ok = True

    async def _check_consumer(self) -> None:
        s = self.settings
        try:
            info = await self._js.consumer_info(s.stream, s.durable, timeout=2)
            self.consumer_ok = True
            self._metrics.observe_consumer(info)
        except nats.js.errors.NotFoundError:
            self.consumer_ok = False
            log.warning("durable consumer %s was deleted on the server; recreating it", s.durable)
            try:
                await self._ensure_stream()
                await self._ensure_consumer()
                self._forget_requests()
            except Exception as exc:
                log.error("could not recreate consumer %s: %s", s.durable, exc)
        except Exception as exc:  # timeouts while reconnecting: the next tick retries
            log.debug("consumer check failed: %s", exc)

    async def _subscribe(self) -> None:
        self._inbox = self._nc.new_inbox()
        # Credit bounds what can be pending here, so nats-py's slow-consumer
        # limits (which drop messages) are never the ones that bite.
        self._sub = await self._nc.subscribe(
            self._inbox,
            cb=self._on_message,
            pending_msgs_limit=self.settings.max_in_flight * 2,
            pending_bytes_limit=-1,
        )
        self._install_fast_path()
        await self._refill()

    async def _on_message(self, msg) -> None:
        """nats-py's subscription callback: every frame when the fast path is off.

        nats-py has decoded and parsed the frame already (a frame it cannot
        decode never gets here: its reader stops on it, see internals.py).
        """
        try:
            headers, reply = msg.headers, msg.reply
            if not reply and headers and "Status" in headers:
                self._on_status(headers)
                return
            try:
                seq, ts = ack_position(reply)
            except ValueError:
                frame = read_frame(msg.subject.encode(), reply.encode(), None)
                if not self._take(msgspec.structs.replace(frame, headers=headers), msg.data):
                    return
            else:
                self._deliver(Delivery(msg.subject, headers, msg.data, seq, ts, reply))
        except Exception as exc:
            self._on_hook_error(exc)
            return
        if self._room_for_a_pull():
            await self._refill()

    def _install_fast_path(self) -> None:
        """Take the frames of our inbox straight from nats-py's parser (internals.py).

        The subscription path builds a Msg, parses headers, and passes each
        message through an asyncio.Queue and a task switch before our
        callback: about a quarter of the consume path (profiled). It also
        stops nats-py's reader on a frame it cannot decode.
        """
        if not self.settings.fast_path:
            log.info("NATS fast path turned off: consuming through nats-py's public API")
            return
        problem = internals.fast_path_problem(self._nc, self._sub)
        if problem is not None:
            log.warning(
                "nats-py %s internals are not what dcmstatus expects (%s); consuming through the public "
                "API: slower, and a frame nats-py cannot decode stops its reader (docs/operations.md)",
                getattr(nats.aio.client, "__version__", "?"), problem,
            )
            return
        internals.install_frame_hook(self._nc, self._sub, self._on_frame, self._refill, self._on_hook_error)
        self._send_acks = internals.send_acks
        self.fast_path = True
        problem = internals.widen_protocol_parser()
        if problem is not None:
            log.warning(
                "%s; a subject with a vertical tab or form feed may reset the NATS connection (docs/operations.md)",
                problem,
            )

    def _on_frame(self, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> bool:
        """One frame of our inbox, as bytes (the fast path). Returns whether
        a pull request may be due. Raises only on a bug (the hook catches it)."""
        if headers is None:
            # The common frame, read inline (frames.ack_position, inlined);
            # anything odd about it raises, and it is read again, carefully.
            try:
                ack = reply.decode()
                tokens = ack.split(".")
                if len(tokens) == 9 and tokens[1] == "ACK" and tokens[0] == "$JS":
                    seq, ts = int(tokens[5]), int(tokens[7])
                elif len(tokens) >= 11 and tokens[1] == "ACK" and tokens[0] == "$JS":  # with domain and account hash
                    seq, ts = int(tokens[7]), int(tokens[9])
                else:
                    raise ValueError(ack)
                delivery = Delivery(subject.decode(), None, data, seq, ts, ack)
            except Exception:
                pass
            else:
                self._deliver(delivery)
                return self._room_for_a_pull()
        return self._take(read_frame(subject, reply, headers), data) and self._room_for_a_pull()

    def _take(self, frame: Frame, data: bytes) -> bool:
        """A frame read carefully: a pull status, a delivery (maybe unreadable),
        or a drop. Returns whether a message was delivered."""
        if frame.status is not None:
            self._on_status({"Status": frame.status, "Description": frame.description})
            return False
        if frame.ack is None:
            self._metrics.frames_dropped.inc()
            self._events.frame_dropped(frame.subject, frame.problem or "no ack subject")
            return False
        self._deliver(
            Delivery(frame.subject, frame.headers, data, frame.stream_seq, frame.stream_time_ns, frame.ack, frame.problem)
        )
        return True

    def _deliver(self, delivery: Delivery) -> None:
        if self._intake_closed:
            return  # stopping: unacked, so NATS redelivers it
        self._deliveries.send_nowait(delivery)  # first: if it fails, nothing was counted
        self._in_flight += 1
        self._received += 1
        size = len(delivery.body)
        self._bytes_in_flight += size
        self._sizes[delivery.token] = size
        requests = self._requests
        if requests:
            self._requested -= 1
            head = requests[0]
            head[0] -= 1
            if head[0] <= 0:
                requests.popleft()

    def _on_hook_error(self, exc: BaseException) -> None:
        """A frame nothing could handle (a bug, or nats-py failing on another
        subscription's frame): counted and logged, and the reader goes on."""
        self._metrics.frames_dropped.inc()
        self._events.frame_dropped("?", f"handling it raised {type(exc).__name__}: {exc}")

    def _on_status(self, headers: dict[str, str]) -> None:
        status = headers.get("Status")
        if status in ("408", "409", "404"):
            # The oldest request ended (expired, or the server refused it).
            if self._requests:
                remaining, _ = self._requests.popleft()
                self._requested -= int(remaining)
            if status == "409":
                description = headers.get("Description", "")
                log.info("pull request ended by the server: %s", description)
                if "Deleted" in description:
                    self.consumer_ok = False

    def _room_for_a_pull(self) -> bool:
        # Checked per message: while the credit is used up (a backlog) this is
        # all the per-message pull logic costs.
        s = self.settings
        return (
            self._requested < s.pull_batch
            and self._in_flight + self._requested + s.pull_batch <= s.max_in_flight
            and self._bytes_in_flight + (len(self._requests) + 1) * self._request_bytes <= s.max_in_flight_bytes
        )

    async def _refill(self) -> None:
        """Send pull requests while credit allows."""
        if self._stopping or self._nc is None or not self._nc.is_connected:
            return
        s = self.settings
        now = time.monotonic()
        requests = self._requests
        # Requests the server never answered (lost in a disconnect) expire here.
        while requests and requests[0][1] < now:
            remaining, _ = requests.popleft()
            self._requested -= int(remaining)
        self._metrics.in_flight.set(self._in_flight)
        if not self._request_bytes:
            # Each request may bring at most this many bytes (max_bytes), and
            # outstanding requests reserve it: bytes held stay under the budget
            # whatever the message sizes. Never below one maximal message, or
            # such a message could never be delivered (and would block the stream).
            max_payload = getattr(self._nc, "max_payload", 0) or 1024 * 1024
            self._request_bytes = max(s.max_in_flight_bytes // _MAX_REQUESTS, max_payload)
        try:
            while (
                self._in_flight + self._requested + s.pull_batch <= s.max_in_flight
                and self._bytes_in_flight + (len(requests) + 1) * self._request_bytes <= s.max_in_flight_bytes
                and len(requests) < _MAX_REQUESTS
            ):
                body = _encode_json(
                    {"batch": s.pull_batch, "max_bytes": self._request_bytes, "expires": int(s.pull_expires * 1e9)}
                )
                await self._nc.publish(self._next_subject, body, reply=self._inbox)
                # A little slack past `expires` so a late 408 still finds its request.
                requests.append([s.pull_batch, now + s.pull_expires + 1.0])
                self._requested += s.pull_batch
        except Exception as exc:
            # The connection went away mid-publish (a NATS restart: asyncio's
            # "Connection lost"). Raised from here it would stop the service;
            # the reconnect, or the next tick, sends the requests again.
            log.debug("pull request not sent (%s); retrying after reconnect", exc)

    async def _ack_and_refill(self, tokens: list[str]) -> None:
        nc = self._nc
        try:
            if nc.is_closed:
                raise nats.errors.ConnectionClosedError
            if tokens:
                await self._send_acks(nc, tokens)
                self.acks_failing = False
        except Exception as exc:
            # Not acked means redelivered after ack_wait; the ordering guard
            # makes that harmless once, but a persistent failure is an endless
            # redelivery: counted, and reported by health until an ack goes out.
            self.acks_failing = True
            self._metrics.ack_failures.inc(len(tokens))
            log.warning("could not send %d acks (%s); they will be redelivered", len(tokens), exc)
        self._in_flight -= len(tokens)
        pop = self._sizes.pop
        self._bytes_in_flight -= sum([pop(t, 0) for t in tokens])
        await self._refill()

    def _forget_requests(self) -> None:
        self._requests.clear()
        self._requested = 0

    async def _on_error(self, exc: Exception) -> None:
        log.warning("NATS error: %s", exc)

    async def _on_disconnected(self) -> None:
        if not self._stopping:  # our own close() disconnects too
            log.warning("disconnected from NATS; reconnecting")

    async def _on_reconnected(self) -> None:
        self._metrics.nats_reconnects.inc()
        log.info("reconnected to NATS at %s", self._nc.connected_url.netloc if self._nc.connected_url else "?")
        # Pull requests do not survive a reconnect; messages delivered but not
        # acked come back after ack_wait, so in-flight credit stays as it is.
        self._forget_requests()
        await self._refill()


async def _publish_acks(nc: Any, tokens: list[str]) -> None:
    """Acks through the public API (the fallback of internals.send_acks)."""
    for token in tokens:
        await nc.publish(token, b"+ACK")


def asyncio_exception_handler(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """Log, never raise: inside trio-asyncio an unhandled asyncio error would tear
    down the whole nursery (field notes)."""
    exc = context.get("exception")
    log.error("asyncio: %s", context.get("message"), exc_info=exc)

