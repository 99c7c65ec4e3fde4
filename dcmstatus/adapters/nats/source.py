"""The NATS JetStream adapter: ensures the stream and the durable pull
consumer, pulls messages, hands them to trio as `Delivery` values and acks
them when the pipeline says so.

nats-py is asyncio; it runs inside trio through trio-asyncio (the supervisor
opens the loop). Two measured facts (docs/performance.md#why-it-is-fast) shape this module:

- nats-py's own `fetch()` spawns a task per message (~3k msg/s under
  trio-asyncio), so it pulls "continuously" itself: one core subscription on
  an inbox plus `$JS.API.CONSUMER.MSG.NEXT` requests, refilled as room frees
  up (~80-95k msg/s).
- Memory is bounded by credit: new pull requests go out only while
  received-but-unacked plus requested messages stay under `max_in_flight`. A
  stalled database therefore stops the pulls, not the process.

Nothing reports a consumer deleted behind our back, so a ticker checks
`consumer_info` and recreates it. Nothing reports a subscription that silently
stopped delivering either, so the same ticker feeds a stall watch
(`dcmstatus.core.stall`): health says `stalled`, and a stall on the delivery
side starts intake afresh on a new inbox (docs/reliability.md).

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
from typing import TYPE_CHECKING, Any

import msgspec
import nats
import nats.aio.client
import nats.errors
import nats.js.errors
import trio
import trio_asyncio
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType

from dcmstatus.adapters.nats import internals
from dcmstatus.adapters.nats.connection import NatsSecurity, open_connection
from dcmstatus.adapters.nats.frames import Frame, ack_position, read_frame
from dcmstatus.core.errors import AccessDenied, ConfigError
from dcmstatus.core.model import Delivery
from dcmstatus.core.redaction import redact_url
from dcmstatus.core.stall import StallWatch, Verdict
from dcmstatus.engine.logs import EventLog
from dcmstatus.engine.metrics import Metrics
from dcmstatus.engine.startup import Startup

if TYPE_CHECKING:
    from nats.aio.subscription import Subscription
    from nats.js import JetStreamContext

log = logging.getLogger(__name__)

_encode_json = msgspec.json.Encoder().encode
_MAX_REQUESTS = 16  # pull requests outstanding at once


class NatsSettings(msgspec.Struct, frozen=True):
    url: str
    stream: str = "dcm-status"  # created only when no stream captures `subjects`
    stream_max_age: float = 7 * 24 * 3600.0  # retention of a stream we create; 0 = unbounded
    stream_replicas: int | None = None  # of a stream we create; None: 1 on a single server, 3 on a cluster
    subjects: str = "dcm.*"
    durable: str = "dcmstatus"
    ack_wait: float = 30.0  # seconds before the server redelivers an unacked message
    max_ack_pending: int = 20_000
    max_in_flight: int = 10_000  # our own bound; at most max_ack_pending
    max_in_flight_bytes: int = 64 * 1024 * 1024  # the same bound in body bytes
    pull_batch: int = 500
    pull_expires: float = 5.0
    check_interval: float = 5.0  # consumer existence check
    stall_timeout: float = 30.0  # work waiting and nothing received or acked this long: stalled
    security: NatsSecurity = msgspec.field(default_factory=NatsSecurity)  # credentials and TLS
    fast_path: bool = True  # nats-py internals (internals.py) when they check out; False: public API only


class JetStreamSource:
    def __init__(self, settings: NatsSettings, metrics: Metrics, startup: Startup | None = None) -> None:
        if settings.max_in_flight > settings.max_ack_pending:
            raise ValueError("max_in_flight must not exceed max_ack_pending")
        self.settings = settings
        self._metrics = metrics
        # The supervisor's start-up policy; alone, the source waits for NATS forever.
        self._startup = startup or Startup(0)
        self._nc: nats.NATS | None = None
        self._js: JetStreamContext | None = None  # set with _nc, before any use
        self._sub: Subscription | None = None
        self._inbox = ""
        self.stream = settings.stream  # the stream bound to at start-up (see _ensure_stream)
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
        self._backlog = 0  # messages the server has not yet delivered to the consumer, last we asked
        self._connect_error: Exception | None = None
        self.consumer_ok = False
        self._watch = StallWatch(settings.stall_timeout)
        self.fast_path = False  # true once the frame hook is installed
        self.frame_parser = False  # true once the frame parser is installed too
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
        # Right after a node of a cluster went, JetStream answers nothing
        # (or 503) until the stream and the meta group elect leaders again:
        # awaited like any dependency at start-up, never a crash.
        await self._startup.reach(
            "NATS JetStream",
            trio_asyncio.aio_as_trio(self._ensure_stream_and_consumer),
            at=",".join(map(_shown, self.settings.url.split(","))),
            unreachable=JETSTREAM_UNAVAILABLE,
        )
        await trio_asyncio.aio_as_trio(self._subscribe)()
        task_status.started()
        s = self.settings
        next_check = trio.current_time() + s.check_interval
        while not self._stopping:
            await trio.sleep(min(1.0, s.pull_expires / 2))
            if self._stopping:
                break
            # Before the check: progress seen now predates the backlog it counts.
            await self._watch_intake()
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
        if not (self.consumer_ok and self._sub is not None and not self._stopping):
            consumer = "not subscribed"
        elif self._watch.stalled:
            consumer = "stalled"
        else:
            consumer = "subscribed"
        components = {"nats": connection, "consumer": consumer}
        if self.acks_failing:
            components["acks"] = "failing"
        return components

    @property
    def unacknowledged(self) -> int:
        """Messages received and not (yet) acknowledged."""
        return self._in_flight

    @property
    def healthy(self) -> bool:
        h = self.health()
        return h["nats"] == "connected" and h["consumer"] == "subscribed" and "acks" not in h

    async def _watch_intake(self) -> None:
        """One look of the stall watch; subscribe afresh when it says so."""
        nc = self._nc
        watch = self._watch
        if nc is None or not nc.is_connected or not self.consumer_ok:
            watch.hold()  # health says so already; the reconnect or the consumer check mends it
            return
        was_stalled = watch.stalled
        # Every message received is either in flight or acked.
        acked = self._received - self._in_flight
        verdict = watch.observe(trio.current_time(), moved=self._received + acked, in_flight=self._in_flight)
        self._metrics.consumer_stalled.set(1 if watch.stalled else 0)
        timeout = self.settings.stall_timeout
        if verdict is Verdict.RESET:
            log.warning(
                "intake stalled: the server holds %d messages for consumer %s and none arrived for %.0fs; "
                "subscribing afresh", self._backlog, self.settings.durable, timeout,
            )
            self._metrics.consumer_resets.inc()
            try:
                await trio_asyncio.aio_as_trio(self._resubscribe)()
            except Exception as exc:  # the connection went meanwhile: the next reset is due after `timeout`
                log.warning("could not subscribe afresh (%s); trying again in %.0fs", exc, timeout)
        elif verdict is Verdict.STALLED and not was_stalled:
            log.warning(
                "intake stalled: %d messages received and none acknowledged for %.0fs; the writes are not committing",
                self._in_flight, timeout,
            )
        elif was_stalled and not watch.stalled:
            log.info("intake is moving again")

    async def _connect(self) -> None:
        """Connect under the start-up policy (retry with capped back-off until
        --startup-timeout); AccessDenied (credentials or TLS refused) ends the
        service with a message saying what to fix."""
        where = redact_url(self.settings.url)
        tries = self._startup.dependency("NATS", at=",".join(map(_shown, self.settings.url.split(","))))
        while True:
            try:
                self._nc = await trio_asyncio.aio_as_trio(open_connection)(
                    nats_servers(self.settings.url),
                    self.settings.security,
                    name="dcmstatus",
                    allow_reconnect=True,
                    # One try of the start-up policy: each server twice, then
                    # connect() raises. Once connected: -1, reconnect forever
                    # (the default gives up after ~2 minutes).
                    max_reconnect_attempts=1,
                    reconnect_time_wait=0.5,
                    connect_timeout=2,
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                )
                self._nc.options["max_reconnect_attempts"] = -1  # read by nats-py at each reconnect
                self._js = self._nc.jetstream()
                log.info("connected to NATS at %s", where)
                tries.reached()
                return
            except AccessDenied:
                raise
            except Exception as exc:
                # nats-py's "no servers available" hides why: its last error says it.
                reason, self._connect_error = self._connect_error or exc, None
                await tries.failed(reason)  # waits for the next try, or gives up

    # ---- asyncio side ----------------------------------------------------

    async def _ensure_stream_and_consumer(self) -> None:
        await self._ensure_stream()
        await self._ensure_consumer()

    async def _ensure_stream(self) -> None:
        """Bind to the stream that captures our subjects, or create one.

        In a DCM deployment the control plane has made that stream already
        (`dcm-status`, with server defaults): JetStream refuses a second
        stream on overlapping subjects, and its configuration is not ours to
        change, so any stream that captures the filter, whatever its name, is
        used as it is (docs/dcm.md#stream). Only when there is none is
        `settings.stream` created, with a retention bound.
        """
        assert self._js is not None, "connected first"
        s = self.settings
        info = None
        try:
            info = await self._js.stream_info(s.stream)
        except nats.js.errors.NotFoundError:
            try:
                name = await self._js.find_stream_name_by_subject(s.subjects)
            except nats.js.errors.NotFoundError:
                name = None
            if name is not None:
                info = await self._js.stream_info(name)
                log.info("bound to the existing stream %s, which captures %s", name, s.subjects)
        if info is None:
            replicas, why = stream_replicas(internals.server_info(self._nc), s.stream_replicas)
            try:
                await self._js.add_stream(
                    name=s.stream, subjects=[s.subjects], storage=StorageType.FILE,
                    max_age=s.stream_max_age or None, num_replicas=replicas,
                )  # fmt: skip
            except nats.js.errors.BadRequestError as exc:
                raise _placement_error(exc, replicas, internals.server_info(self._nc)) from None
            bound = f"kept {s.stream_max_age:g}s" if s.stream_max_age else "kept forever (--stream-max-age 0)"
            log.info("created stream %s on %s, messages %s, %d replicas (%s)", s.stream, s.subjects, bound, replicas, why)
            self._bind(s.stream)
            return
        config = info.config
        assert config.name is not None, "a stream's info names it (nats-py types the request's config)"
        self._bind(config.name)
        have = config.num_replicas or 1
        if s.stream_replicas is not None and s.stream_replicas != have:
            log.warning(
                "stream %s exists with %d replicas: --stream-replicas %d applies only to a stream dcmstatus "
                "creates, and this one is used as it is", config.name, have, s.stream_replicas,
            )
        else:
            log.info("stream %s has %d replicas", config.name, have)
        if s.subjects not in (config.subjects or []):
            log.warning(
                "stream %s has subjects %s, not %s; using it as it is",
                config.name, config.subjects, s.subjects,
            )
        if not (config.max_age or (config.max_bytes or -1) > 0 or (config.max_msgs or -1) > 0):
            log.warning(
                "stream %s has no retention bound (max_age, max_bytes and max_msgs are unset): it grows "
                "until the server's disk is full. dcmstatus does not change it; its owner may set one",
                config.name,
            )

    def _bind(self, stream: str) -> None:
        self.stream = stream
        self._next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{self.settings.durable}"

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
        assert self._js is not None, "connected first"
        s = self.settings
        wanted = self._consumer_config()
        try:
            info = await self._js.consumer_info(self.stream, s.durable)
        except nats.js.errors.NotFoundError:
            info = None
        if info is None:
            await self._js.add_consumer(self.stream, wanted)
            log.info("created durable consumer %s on stream %s", s.durable, self.stream)
        else:
            have = info.config
            if (have.ack_wait, have.max_ack_pending, have.filter_subject) != (
                wanted.ack_wait, wanted.max_ack_pending, wanted.filter_subject,
            ):
                # js.subscribe would silently keep the old config; update it explicitly.
                await self._js.add_consumer(self.stream, wanted)
                log.info("updated durable consumer %s to the configured settings", s.durable)
        self.consumer_ok = True

    async def _check_consumer(self) -> None:
        s = self.settings
        try:
            assert self._js is not None, "connected first"
            info = await self._js.consumer_info(self.stream, s.durable, timeout=2)
            self.consumer_ok = True
            self._metrics.observe_consumer(info)
            self._backlog = info.num_pending or 0
            self._watch.saw_backlog(self._backlog)
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
        assert self._nc is not None, "connected first"
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
        # Checked once per process (a self-test of ~10 ms), then per client.
        problem = _frame_parser_problem(self._nc)
        if problem is None:
            internals.install_frame_parser(
                self._nc, self._sub, self._read_frame, self._refill_if_room, self._on_hook_error
            )
        elif self._nc is not None and hasattr(self._nc, "_ps"):  # a real client: worth saying
            log.warning("NATS frame parser not used, frames go through nats-py's parser (slower): %s", problem)
        self.frame_parser = problem is None

    def _on_frame(self, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> bool:
        """One frame of our inbox, as bytes (the frame hook). Returns whether
        a pull request may be due. Raises only on a bug (the hook catches it)."""
        return self._read_frame(subject, reply, data, headers) and self._room_for_a_pull()

    async def _refill_if_room(self) -> None:
        """The frame parser's `after`, once per chunk that delivered: the
        credit is looked at once per chunk, not once per frame."""
        if self._room_for_a_pull():
            await self._refill()

    def _read_frame(self, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> bool:
        """One frame of our inbox, as bytes (the fast path). Returns whether
        a message was delivered. Raises only on a bug (the caller catches it)."""
        if headers is None:
            # The common frame, read inline (frames.ack_position, inlined);
            # anything odd about it raises, and it is read again, carefully.
            try:
                ack = reply.decode()
                tokens = ack.split(".")
                if len(tokens) == 9 and tokens[1] == "ACK" and tokens[0] == "$JS":
                    seq, ts, pending = int(tokens[5]), int(tokens[7]), tokens[8]
                elif len(tokens) >= 11 and tokens[1] == "ACK" and tokens[0] == "$JS":  # with domain and account hash
                    seq, ts, pending = int(tokens[7]), int(tokens[9]), tokens[10]
                else:
                    raise ValueError(ack)
                # The consumer's backlog, a hint only: what is not a number is 0.
                backlog = int(pending) if pending.isascii() and pending.isdigit() else 0
                delivery = Delivery(subject.decode(), None, data, seq, ts, ack, None, backlog)
            except Exception:
                pass
            else:
                self._deliver(delivery)
                return True
        return self._take(read_frame(subject, reply, headers), data)

    def _take(self, frame: Frame, data: bytes) -> bool:
        """A frame read carefully: a pull status, a delivery (maybe unreadable),
        or a drop. Returns whether a message was delivered."""
        if frame.status is not None:
            self._on_status({**(frame.headers or {}), "Status": frame.status, "Description": frame.description})
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
        assert self._deliveries is not None, "run() set it before subscribing"
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
            description = headers.get("Description", "")
            # A request ended (expired, fulfilled, or refused). Which one, the
            # status does not say: the server serves its waiting requests in
            # turn, while each message was counted off the oldest. What it
            # left undelivered, it does say (Nats-Pending-Messages); a request
            # fulfilled ("Batch Completed") left nothing, its messages were
            # counted as they came. Un-counting the oldest request's remainder
            # instead would free credit for messages still on their way.
            pending = headers.get("Nats-Pending-Messages")
            if pending is not None and pending.isdigit():
                self._uncount(int(pending))
            elif status == "409" and description == "Batch Completed":
                pass
            elif self._requests:
                remaining, _ = self._requests.popleft()
                self._requested -= int(remaining)
            if status == "409":
                log.info("pull request ended by the server: %s", description)
                if "Deleted" in description:
                    self.consumer_ok = False

    def _uncount(self, messages: int) -> None:
        """Take `messages` the server will not deliver off the requests, oldest first."""
        requests = self._requests
        while messages > 0 and requests:
            head = requests[0]
            taken = min(messages, int(head[0]))
            head[0] -= taken
            self._requested -= taken
            messages -= taken
            if head[0] <= 0:
                requests.popleft()

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
            if nc is None or nc.is_closed:
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

    async def _resubscribe(self) -> None:
        """Intake afresh after a stall: a new inbox, new pull requests.

        What the server may still send for the old requests goes to the old
        inbox, where nobody listens (redelivered after ack_wait), so it never
        arrives uncounted on top of the new ones. Messages already received
        keep their credit until acked, as always: in-flight counts stay.
        """
        old = self._sub
        self._forget_requests()
        if old is not None:
            try:
                await old.unsubscribe()
            except Exception as exc:  # already gone on our side, or the connection is
                log.debug("unsubscribing the stalled inbox: %s", exc)
        # The fast path hook filters on the old subscription's id: remove it
        # (nats-py's own method shows through again) so the new one replaces it.
        internals.remove_frame_hook(self._nc)
        await self._subscribe()

    async def _on_error(self, exc: Exception) -> None:
        if self._nc is None:  # a failed first connect: the start-up policy logs each try
            self._connect_error = exc
            return
        log.warning("NATS error: %s", exc)

    async def _on_disconnected(self) -> None:
        if not self._stopping:  # our own close() disconnects too
            log.warning("disconnected from NATS; reconnecting")

    async def _on_reconnected(self) -> None:
        self._metrics.nats_reconnects.inc()
        log.info("reconnected to NATS at %s", redact_url(self._nc.connected_url.geturl()) if self._nc and self._nc.connected_url else "?")
        # The pull requests stay counted. They are the consumer's state on the
        # server, which may still serve them to our inbox (re-subscribed under
        # the same name): after a blip the server may not even have noticed.
        # Forgetting them would let new requests double the credit. Requests a
        # restarted server lost end by their expiry in _refill; until then the
        # credit they hold waits (at most pull_expires + 1 s). Messages
        # delivered but not acked keep their credit too.
        await self._refill()


def nats_servers(url: str) -> list[str]:
    """The server URLs of a --nats-url (one, or several separated by commas),
    as nats-py takes them; ValueError saying what is wrong with one nats-py
    would refuse (so start-up never retries a malformed URL)."""
    from nats.aio.client import Client

    servers = [entry.strip() for entry in url.split(",")]
    for entry in servers:
        if not entry:
            raise ValueError("an empty server entry")
        scheme, sep, _ = entry.partition("://")
        if sep and scheme.lower() not in ("nats", "tls", "ws", "wss"):
            raise ValueError(f"{_shown(entry)!r} has the scheme {scheme!r}; use nats://, tls://, ws:// or wss://")
        try:
            Client._parse_server_uri(entry)  # nats-py's own parser: what connect() would refuse
        except Exception as exc:
            raise ValueError(f"{_shown(entry)!r}: {str(exc).removeprefix('nats: ')}") from None
    websocket = [entry.lower().startswith(("ws://", "wss://")) for entry in servers]
    if any(websocket) and not all(websocket):
        raise ValueError("websocket (ws://, wss://) and other URLs cannot be mixed")
    return servers


class StreamUnplaceable(Exception):
    """The cluster cannot place the stream's replicas now (a node is down): retried at start-up."""


# What says "JetStream cannot answer now" at start-up, retried under the
# start-up policy: no answer (timeout, no responders), 503 and 500 (no leader
# yet), a stream that cannot be placed while a node is away.
JETSTREAM_UNAVAILABLE: tuple[type[BaseException], ...] = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionClosedError,
    nats.js.errors.ServiceUnavailableError,
    nats.js.errors.ServerError,
    StreamUnplaceable,
)

_MAX_REPLICAS = 3  # the default on a cluster (JetStream allows up to 5)


def stream_replicas(server_info: dict[str, Any], wanted: int | None) -> tuple[int, str]:
    """The replicas of a stream dcmstatus creates, and why (for the log):
    `wanted` (--stream-replicas) when given, else 1 on a single server and 3
    on a cluster (the server's INFO names a cluster). ConfigError when
    `wanted` asks for replicas a single server cannot hold."""
    cluster = server_info.get("cluster")
    listed = len(server_info.get("connect_urls") or ())
    if wanted is not None:
        if wanted > 1 and not cluster:
            raise ConfigError(
                f"--stream-replicas {wanted}: the NATS server is not part of a cluster, so a stream there has "
                "1 replica; use --stream-replicas 1 (or leave it out), or point --nats-url at a cluster"
            )
        return wanted, "--stream-replicas"
    if not cluster:
        return 1, "a single server (its INFO names no cluster)"
    return _MAX_REPLICAS, f"the server is in cluster {cluster!r}, which lists {listed} servers"


def _placement_error(exc: nats.js.errors.BadRequestError, replicas: int, server_info: dict[str, Any]) -> Exception:
    """A refused stream creation, as what it means: more replicas than the
    cluster has servers is a setting to fix (exit 2); no room for them now (a
    node down) is awaited; anything else is raised as it came."""
    if exc.err_code != 10005:  # JSClusterNoPeersErr: "no suitable peers for placement"
        return exc
    listed = len(server_info.get("connect_urls") or ())
    if listed and replicas > listed:
        return ConfigError(
            f"--stream-replicas {replicas}: NATS cluster {server_info.get('cluster')!r} lists {listed} servers, "
            f"too few for {replicas} replicas; use --stream-replicas {listed} or less"
        )
    return StreamUnplaceable(f"the cluster cannot place {replicas} replicas now ({exc.description})")


def _shown(entry: str) -> str:
    """A server entry fit for an error message: a token or password hidden."""
    head, at, host = entry.rpartition("@")
    return f"{head.partition('://')[0]}://***@{host}" if at and "://" in head else ("***@" + host if at else entry)


async def _publish_acks(nc: Any, tokens: list[str]) -> None:
    """Acks through the public API (the fallback of internals.send_acks)."""
    for token in tokens:
        await nc.publish(token, b"+ACK")


_PARSER_SELF_TEST: dict[type, str | None] = {}


def _frame_parser_problem(nc: Any) -> str | None:
    """internals.frame_parser_problem, its self-test run once per parser class."""
    parser_class = type(getattr(nc, "_ps", None))
    if parser_class not in _PARSER_SELF_TEST:
        _PARSER_SELF_TEST[parser_class] = internals.frame_parser_problem(nc)
    return _PARSER_SELF_TEST[parser_class]


def asyncio_exception_handler(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """Log, never raise: inside trio-asyncio an unhandled asyncio error would tear
    down the whole nursery (docs/architecture.md#import-order)."""
    exc = context.get("exception")
    log.error("asyncio: %s", context.get("message"), exc_info=exc)

