"""The JetStream adapter's stall watch, deterministically: its real run loop on
trio's MockClock against a fake server that can stop delivering without a
word, as a subscription lost on the server side does.

The asyncio-side methods only await the fake connection, so with
`aio_as_trio` replaced by the identity everything runs under plain trio.
"""

from __future__ import annotations

import itertools
import json
from types import SimpleNamespace

import pytest
import trio
import trio.testing

import dcmstatus.adapters.nats.source as nats_source
from dcmstatus.adapters.nats.source import JetStreamSource, NatsSettings
from dcmstatus.engine.metrics import Metrics

STALL_TIMEOUT = 10.0


class FakeSub:
    def __init__(self, server: FakeServer, sid: int, subject: str) -> None:
        self._id, self.subject, self._server = sid, subject, server

    async def unsubscribe(self) -> None:
        self._server.subs.pop(self._id, None)
        self._server.interest.discard(self.subject)


class FakeServer:
    """A nats-py connection and, behind it, the stream and the durable pull
    consumer: pull requests wait in order and are served to their reply inbox
    while the server knows a subscription for it (`interest`); the client
    side drops messages for subscriptions it no longer has, as nats-py does."""

    def __init__(self) -> None:
        self.is_connected, self.is_closed, self.is_reconnecting = True, False, False
        self.connected_url = None
        self.max_payload = 1024 * 1024
        self.options: dict = {}  # nats-py connect options (start-up sets max_reconnect_attempts)
        self.subs: dict[int, FakeSub] = {}  # the client's subscriptions, by sid
        self._subs = self.subs  # where nats-py keeps them (the fast path checks it)
        self.interest: set[str] = set()  # inboxes the server delivers to
        self.waiting: list[list] = []  # [reply inbox, messages still owed] per pull request
        self.stream: list[int] = []  # sequences not yet delivered
        self.acked: set[int] = set()
        self.inboxes = (f"_INBOX.{n}" for n in itertools.count(1))
        self.sids = itertools.count(1)
        self.last_seq = 0

    # -- what the adapter calls
    def jetstream(self) -> FakeServer:
        return self

    def new_inbox(self) -> str:
        return next(self.inboxes)

    async def subscribe(self, subject: str, cb, pending_msgs_limit: int, pending_bytes_limit: int) -> FakeSub:
        sub = FakeSub(self, next(self.sids), subject)
        self.subs[sub._id] = sub
        self.interest.add(subject)
        return sub

    async def publish(self, subject: str, body: bytes = b"", reply: str = "", headers=None) -> None:
        assert subject.startswith("$JS.API.CONSUMER.MSG.NEXT.")
        self.waiting.append([reply, json.loads(body)["batch"]])

    async def _send_command(self, cmd: bytes, priority: bool = False) -> None:
        for line in cmd.split(b"\r\n"):
            if line.startswith(b"PUB "):
                self.acked.add(int(line.split()[1].decode().split(".")[5]))

    async def _flush_pending(self, force_flush: bool = False) -> None:
        pass

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes) -> None:
        assert sid not in self.subs, "the adapter's own hook takes the messages of its subscription"

    async def stream_info(self, stream: str):
        return SimpleNamespace(
            config=SimpleNamespace(name=stream, subjects=["dcm.*"], max_age=3600.0, max_bytes=-1, max_msgs=-1, num_replicas=1)
        )

    async def consumer_info(self, stream: str, durable: str, timeout: float | None = None):
        return SimpleNamespace(
            config=SimpleNamespace(ack_wait=None, max_ack_pending=None, filter_subject=None),
            num_pending=len(self.stream), num_ack_pending=0, num_redelivered=0,
        )

    async def add_consumer(self, stream: str, config) -> None:
        pass

    # -- what the test does
    def append(self, count: int) -> None:
        self.stream += range(self.last_seq + 1, self.last_seq + count + 1)
        self.last_seq += count

    async def serve(self) -> None:
        """Deliver what the stream holds to waiting requests, forever."""
        while True:
            while self.stream and self.waiting:
                reply = self.waiting[0][0]
                if reply not in self.interest:
                    self.waiting.pop(0)  # no interest: the request is dropped (the server does so)
                    continue
                seq = self.stream.pop(0)
                sid = next(s._id for s in self.subs.values() if s.subject == reply)
                ack = f"$JS.ACK.dcm-status.dcmstatus.1.{seq}.{seq}.1700000000000000000.0"
                await self._process_msg(sid, b"dcm.vm", ack.encode(), b"x", b"")
                self.waiting[0][1] -= 1
                if self.waiting[0][1] == 0:
                    self.waiting.pop(0)
            await trio.sleep(0.01)


@pytest.fixture
def autojump_clock():
    return trio.testing.MockClock(autojump_threshold=0)


@pytest.fixture
def server(monkeypatch) -> FakeServer:
    fake = FakeServer()

    async def connect(url, security, **kwargs):
        return fake

    monkeypatch.setattr(nats_source, "open_connection", connect)
    monkeypatch.setattr(nats_source.trio_asyncio, "aio_as_trio", lambda f: f)
    return fake


async def acknowledge_all(source: JetStreamSource, receive) -> None:
    """The pipeline, as far as the source can tell: every delivery is acked."""
    async for delivery in receive:
        await source.ack([delivery.token])


async def until(predicate, what: str, timeout: float) -> None:
    with trio.fail_after(timeout):  # virtual time: MockClock
        while not predicate():
            await trio.sleep(0.1)


async def test_a_subscription_lost_on_the_server_is_reported_stalled_and_reset(server, autojump_clock):
    metrics = Metrics()
    sample = metrics.registry.get_sample_value
    source = JetStreamSource(
        NatsSettings(url="nats://fake", max_in_flight=100, max_ack_pending=200, pull_batch=10,
                     check_interval=2.0, stall_timeout=STALL_TIMEOUT),
        metrics,
    )
    send, receive = trio.open_memory_channel(float("inf"))
    async with trio.open_nursery() as nursery:
        await nursery.start(source.run, send)
        nursery.start_soon(server.serve)
        nursery.start_soon(acknowledge_all, source, receive)
        server.append(50)
        await until(lambda: len(server.acked) == 50, "the first 50 acked", 5)
        # A quiet stream, however long, is not a stall.
        await trio.sleep(3 * STALL_TIMEOUT)
        assert source.health()["consumer"] == "subscribed" and sample("dcmstatus_consumer_stalled") == 0

        old_inbox = source._inbox
        server.interest.discard(old_inbox)  # the server forgets our subscription; nats-py cannot tell
        server.append(50)
        stalled_at = trio.current_time()
        await until(lambda: source.health()["consumer"] == "stalled", "health says stalled", 3 * STALL_TIMEOUT)
        # Virtual time: the stall timeout, counted from the first tick after a
        # consumer check saw the backlog (a check every 2 s, a tick every 1 s),
        # plus this loop's 0.1 s polling.
        assert STALL_TIMEOUT <= trio.current_time() - stalled_at <= STALL_TIMEOUT + 2.0 + 1.0 + 0.2
        assert not source.healthy
        assert sample("dcmstatus_consumer_stalled") == 1
        assert sample("dcmstatus_consumer_resets_total") == 1
        assert source._inbox != old_inbox and [s.subject for s in server.subs.values()] == [source._inbox]
        assert {reply for reply, _ in server.waiting} <= {source._inbox}

        await until(lambda: len(server.acked) == 100, "the backlog acked after the reset", 5)
        await until(lambda: source.health()["consumer"] == "subscribed", "health back to subscribed", 3)
        assert source.healthy and sample("dcmstatus_consumer_stalled") == 0
        assert sample("dcmstatus_consumer_resets_total") == 1
        await source.stop_intake()
        nursery.cancel_scope.cancel()


async def test_writes_that_do_not_commit_are_a_stall_but_not_reset(server, autojump_clock):
    metrics = Metrics()
    source = JetStreamSource(
        NatsSettings(url="nats://fake", max_in_flight=100, max_ack_pending=200, pull_batch=10,
                     check_interval=2.0, stall_timeout=STALL_TIMEOUT),
        metrics,
    )
    send, receive = trio.open_memory_channel(float("inf"))
    async with trio.open_nursery() as nursery:
        await nursery.start(source.run, send)
        nursery.start_soon(server.serve)
        server.append(500)  # and nothing acks: the database hangs
        await until(lambda: source._in_flight == 100, "the credit used up", 5)
        await until(lambda: source.health()["consumer"] == "stalled", "health says stalled", 3 * STALL_TIMEOUT)
        await trio.sleep(5 * STALL_TIMEOUT)
        assert source.health()["consumer"] == "stalled"
        assert metrics.registry.get_sample_value("dcmstatus_consumer_resets_total") == 0
        tokens = []
        while len(tokens) < 100:
            tokens.append(receive.receive_nowait().token)
        await source.ack(tokens)  # the database is back
        await until(lambda: source.health()["consumer"] == "subscribed", "health back to subscribed", 3)
        await source.stop_intake()
        nursery.cancel_scope.cancel()


async def test_a_reset_keeps_the_credit_of_messages_in_flight(server, autojump_clock):
    """Messages received before a reset still hold their credit until acked;
    what the server still sends for the old requests goes to the old inbox and
    is not counted (nats-py drops it: no subscription for it any more)."""
    source = JetStreamSource(
        NatsSettings(url="nats://fake", max_in_flight=100, max_ack_pending=200, pull_batch=10), Metrics()
    )
    source._nc = server
    send, receive = trio.open_memory_channel(float("inf"))
    source._deliveries = send
    await source._subscribe()
    old_sid = next(iter(server.subs))
    server.append(30)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.serve)
        await trio.sleep(1)  # the server delivers
        assert source._in_flight == 30 and source._requested == 70
        old_inbox, requests_before = source._inbox, len(server.waiting)

        await source._resubscribe()
        assert source._in_flight == 30 and source._requested == 70, "the reset forgot the credit held in flight"
        assert source._inbox != old_inbox
        assert [reply for reply, _ in server.waiting[requests_before:]] == [source._inbox] * 7
        # The server still serves the old requests, to the old inbox and sid.
        for seq in range(1, 71):
            ack = f"$JS.ACK.dcm-status.dcmstatus.1.{9000 + seq}.{9000 + seq}.1700000000000000000.0"
            await server._process_msg(old_sid, b"dcm.vm", ack.encode(), b"x", b"")
        assert source._in_flight == 30, "a late delivery for an old request was counted"
        server.append(100)
        await trio.sleep(1)  # the server delivers
        assert source._in_flight == 100 and source._requested == 0
        tokens = [receive.receive_nowait().token for _ in range(30)]
        await source.ack(tokens)  # acks of messages from before the reset free credit as ever
        await trio.sleep(1)  # the server delivers
        assert source._in_flight == 100 and len(server.acked) == 30
        nursery.cancel_scope.cancel()
