"""Deterministic tests of the JetStream adapter's own logic, without sockets:
the credit accounting of the continuous pull (what bounds memory) against a
fake connection, and the initial-connect back-off schedule on trio's MockClock.

The asyncio-side methods of JetStreamSource only await the connection's
`publish`, so with a fake connection they run under plain trio.
"""

from __future__ import annotations

import itertools
import random
from types import SimpleNamespace

import pytest
import trio
import trio.testing

import dcmstatus.adapters.nats.source as nats_source
from dcmstatus.adapters.nats.source import JetStreamSource, NatsSettings
from dcmstatus.engine.metrics import Metrics


class FakeNC:
    """Records pull requests (publishes to $JS.API.CONSUMER.MSG.NEXT) and acks."""

    def __init__(self) -> None:
        self.is_connected = True
        self.is_closed = False
        self.connected_url = None
        self.pulls: list[dict] = []
        self.acks: list[str] = []

    async def _send_command(self, cmd: bytes, priority: bool = False) -> None:
        # Acks go out as raw PUB commands, one buffer write per batch.
        for line in cmd.split(b"\r\n"):
            if line.startswith(b"PUB "):
                self.acks.append(line.split()[1].decode())

    async def _flush_pending(self, force_flush: bool = False) -> None:
        pass

    async def publish(self, subject: str, body: bytes = b"", reply: str = "", headers=None) -> None:
        if subject.startswith("$JS.API.CONSUMER.MSG.NEXT."):
            import json

            self.pulls.append(json.loads(body))
        else:
            assert body == b"+ACK"
            self.acks.append(subject)


def message(seq: int) -> SimpleNamespace:
    reply = f"$JS.ACK.dcm-status.dcmstatus.1.{seq}.{seq}.1700000000000000000.0"
    return SimpleNamespace(headers=None, reply=reply, subject="dcm.vm", data=b"x")


def status(code: str, description: str = "") -> dict[str, str]:
    return {"Status": code, "Description": description}


def make_source(max_in_flight=1000, pull_batch=100):
    source = JetStreamSource(
        NatsSettings(url="nats://fake", max_in_flight=max_in_flight, max_ack_pending=2 * max_in_flight, pull_batch=pull_batch),
        Metrics(),
    )
    nc = FakeNC()
    source._nc = nc
    send, receive = trio.open_memory_channel(float("inf"))
    source._deliveries = send
    return source, nc, receive


async def test_pulls_fill_the_credit_and_no_more():
    source, nc, _ = make_source(max_in_flight=1000, pull_batch=100)
    await source._refill()
    assert len(nc.pulls) == 10 and all(p["batch"] == 100 for p in nc.pulls)
    assert source._requested == 1000
    await source._refill()
    assert len(nc.pulls) == 10, "requested more than the credit"


async def test_deliveries_use_credit_and_acks_return_it():
    source, nc, receive = make_source(max_in_flight=1000, pull_batch=100)
    await source._refill()
    for seq in range(1, 1001):
        await source._on_message(message(seq))
    assert source._in_flight == 1000 and source._requested == 0
    assert len(nc.pulls) == 10, "pulled while every message is in flight"
    tokens = [receive.receive_nowait().token for _ in range(300)]
    await source._ack_and_refill(tokens)
    assert nc.acks == tokens
    assert source._in_flight == 700
    assert len(nc.pulls) == 13 and source._requested == 300


async def test_request_timeouts_and_refusals_return_their_unfilled_credit():
    source, _nc, _ = make_source(max_in_flight=1000, pull_batch=100)
    await source._refill()
    for seq in range(1, 41):  # the oldest request got 40 of its 100
        await source._on_message(message(seq))
    source._on_status(status("408", "Request Timeout"))
    assert source._requested == 900  # 1000 asked, 40 came, the 60 still owed are void
    assert source._in_flight == 40
    source._on_status(status("409", "Consumer Deleted"))
    assert source._requested == 800
    assert source.consumer_ok is False


async def test_unanswered_requests_expire(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(nats_source.time, "monotonic", lambda: now[0])
    source, nc, _ = make_source(max_in_flight=1000, pull_batch=100)
    await source._refill()
    assert source._requested == 1000
    now[0] += source.settings.pull_expires + 1.5  # lost in a disconnect: no 408 ever comes
    await source._refill()
    assert source._requested == 1000 and len(nc.pulls) == 20, "expired requests were not replaced"


async def test_disconnected_source_sends_nothing():
    source, nc, _ = make_source()
    nc.is_connected = False
    await source._refill()
    assert nc.pulls == []


async def test_random_traffic_never_exceeds_the_credit():
    """In-flight plus requested stays within max_in_flight whatever the order of
    deliveries, partial fills, 408s and acks (the memory bound)."""
    rng = random.Random(4)
    max_in_flight, pull_batch = 500, 50
    source, nc, receive = make_source(max_in_flight, pull_batch)
    await source._refill()
    outstanding: list[int] = []  # what the fake server still owes, per request
    served = 0
    seq = 0
    for _ in range(20_000):
        while len(outstanding) < len(nc.pulls) - served:
            outstanding.append(nc.pulls[len(outstanding) + served]["batch"])
        action = rng.random()
        if action < 0.6 and outstanding:
            seq += 1
            outstanding[0] -= 1
            await source._on_message(message(seq))
            if outstanding[0] == 0:
                outstanding.pop(0)
                served += 1
        elif action < 0.7 and outstanding:
            outstanding.pop(0)
            served += 1
            source._on_status(status("408", "Request Timeout"))
            await source._refill()
        else:
            tokens = []
            for _ in range(rng.randrange(0, 120)):
                try:
                    tokens.append(receive.receive_nowait().token)
                except trio.WouldBlock:
                    break
            await source._ack_and_refill(tokens)
        assert source._in_flight + source._requested <= max_in_flight
        assert source._requested == sum(outstanding) + sum(
            p["batch"] for p in nc.pulls[served + len(outstanding):]
        )
    assert seq > 5000, "the credit stalled: deliveries stopped"


@pytest.fixture
def autojump_clock():
    return trio.testing.MockClock(autojump_threshold=0)


async def test_initial_connect_backs_off_exponentially_up_to_5s(monkeypatch, autojump_clock):
    attempts: list[float] = []

    async def refusing_connect(url, security, **kwargs):
        attempts.append(trio.current_time())
        if len(attempts) < 8:
            raise ConnectionRefusedError("nobody listens")
        return SimpleNamespace(jetstream=lambda: "js", options={})

    monkeypatch.setattr(nats_source, "open_connection", refusing_connect)
    monkeypatch.setattr(nats_source.trio_asyncio, "aio_as_trio", lambda f: f)
    source = JetStreamSource(NatsSettings(url="nats://nowhere"), Metrics())
    await source._connect()
    gaps = [round(b - a, 6) for a, b in itertools.pairwise(attempts)]
    assert gaps == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
    assert source._js == "js"


async def test_a_connection_lost_while_pulling_does_not_escape():
    """During a NATS restart nats-py's publish can raise ConnectionResetError
    ("Connection lost"); out of _refill it would stop the whole service."""
    source, nc, _receive = make_source(max_in_flight=1000, pull_batch=100)

    async def lost(*args, **kwargs):
        raise ConnectionResetError("Connection lost")

    nc.publish = lost
    await source._refill()  # from the run loop's tick
    assert source._requested == 0, "a request that was not sent is not owed"
    await source._ack_and_refill([])  # from a writer's ack
    source._nc = FakeNC()
    await source._refill()  # the next tick, connected again
    assert source._requested == 1000


async def test_bytes_in_flight_never_exceed_the_byte_budget():
    # 16 MiB budget, 1 MiB per pull request (the server's max payload): large
    # bodies stop the pulls long before the message count does.
    mib = 1024 * 1024
    source = JetStreamSource(
        NatsSettings(url="nats://fake", max_in_flight=1000, max_ack_pending=2000, pull_batch=10, max_in_flight_bytes=16 * mib),
        Metrics(),
    )
    nc = FakeNC()
    source._nc = nc
    send, receive = trio.open_memory_channel(float("inf"))
    source._deliveries = send
    await source._refill()
    assert len(nc.pulls) == 16 and all(p["max_bytes"] == mib for p in nc.pulls)
    seq = 0
    for _ in range(16):  # the server fills each request up to its max_bytes, then ends it
        for _ in range(2):
            seq += 1
            big = SimpleNamespace(headers=None, reply=message(seq).reply, subject="dcm.vm", data=b"x" * (mib // 2))
            await source._on_message(big)
            assert source._bytes_in_flight <= 16 * mib
        source._on_status(status("409", "Message Size Exceeds MaxBytes"))
    assert source._bytes_in_flight == 16 * mib and source._in_flight == 32
    await source._refill()
    assert len(nc.pulls) == 16, "pulled with the byte budget used up"
    tokens = [receive.receive_nowait().token for _ in range(4)]
    await source._ack_and_refill(tokens)
    assert source._bytes_in_flight == 14 * mib
    assert len(nc.pulls) == 18, "acked bytes were not given back to pull with"


async def serve_every_request(source, nc, served: int, size: int = 1) -> int:
    """The fake server delivers all that the pull requests from `served` on ask for."""
    seq = 1_000_000 + served * 10_000
    for pull in nc.pulls[served:]:
        for _ in range(pull["batch"]):
            seq += 1
            msg = SimpleNamespace(headers=None, reply=message(seq).reply, subject="dcm.vm", data=b"x" * size)
            await source._on_message(msg)
    return len(nc.pulls)


@pytest.mark.parametrize("bound", ["messages", "bytes"])
async def test_a_reconnect_does_not_double_the_credit(bound):
    """After a blip the server still holds our pull requests (they are the
    consumer's state) and serves them to the re-subscribed inbox. Requests sent
    on top of them must stay within the credit."""
    mib = 1024 * 1024
    if bound == "messages":
        settings = NatsSettings(url="nats://fake", max_in_flight=1000, max_ack_pending=2000, pull_batch=100)
        size = 1
    else:  # 16 requests of 1 MiB each fill the byte budget; messages of 1/4 MiB
        settings = NatsSettings(
            url="nats://fake", max_in_flight=1000, max_ack_pending=2000, pull_batch=4, max_in_flight_bytes=16 * mib,
        )
        size = mib // 4
    source = JetStreamSource(settings, Metrics())
    nc = FakeNC()
    source._nc = nc
    send, _ = trio.open_memory_channel(float("inf"))
    source._deliveries = send
    await source._refill()
    sent_before = len(nc.pulls)
    await source._on_reconnected()
    await serve_every_request(source, nc, 0, size)  # the old requests and any new ones
    assert source._in_flight <= settings.max_in_flight, f"{len(nc.pulls) - sent_before} requests sent on top"
    assert source._bytes_in_flight <= settings.max_in_flight_bytes
    assert source._in_flight + source._requested <= settings.max_in_flight


async def test_requests_a_restarted_server_lost_are_replaced_once_expired(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(nats_source.time, "monotonic", lambda: now[0])
    source, nc, _ = make_source(max_in_flight=1000, pull_batch=100)
    await source._refill()
    now[0] += 1.0  # restarted and reconnected: the server forgot the requests, we cannot tell
    await source._on_reconnected()
    assert len(nc.pulls) == 10, "the old requests may still be served: no new ones yet"
    now[0] = 1000.0 + source.settings.pull_expires + 1.5  # the old requests have expired on any server
    await source._refill()
    assert len(nc.pulls) == 20 and source._requested == 1000


async def test_failing_ack_sends_are_counted_and_reported_until_one_succeeds():
    """A persistent ack failure is an endless redelivery: it must show."""
    source, nc, receive = make_source(max_in_flight=1000, pull_batch=100)
    source._sub, source.consumer_ok = object(), True
    for seq in range(1, 4):
        await source._on_message(message(seq))
    tokens = [receive.receive_nowait().token for _ in range(3)]
    assert source.healthy and "acks" not in source.health()

    async def refused(subject, body=b"", reply="", headers=None):
        if body == b"+ACK":
            raise nats_source.nats.errors.OutboundBufferLimitError
        await FakeNC.publish(nc, subject, body, reply, headers)

    nc.publish = refused
    await source._ack_and_refill(tokens[:2])
    failures = source._metrics.registry.get_sample_value("dcmstatus_ack_failures_total")
    assert failures == 2
    assert source.health()["acks"] == "failing" and not source.healthy
    assert source._in_flight == 1, "credit of unacked messages is given back (they are redelivered)"
    del nc.publish
    await source._ack_and_refill(tokens[2:])
    assert nc.acks == tokens[2:]
    assert "acks" not in source.health() and source.healthy
