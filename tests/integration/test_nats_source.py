"""The JetStream adapter (dcmstatus.nats_source) against a real nats-server:
stream and consumer set-up, credit-bounded pulls, acks, reconnects, and a
consumer deleted behind its back."""

import trio_asyncio  # isort: skip

import json
import socket
from urllib.parse import unquote, urlsplit

import nats
import trio

from dcmstatus.adapters.nats.source import JetStreamSource, NatsSettings, asyncio_exception_handler
from dcmstatus.engine.metrics import Metrics


async def publish(url: str, count: int, start: int = 0, subject: str = "dcm.vm") -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    for i in range(start, start + count):
        await js.publish(subject, f"event {i}".encode())
    await nc.close()


async def consumer_info(url: str, settings: NatsSettings):
    nc = await nats.connect(url)
    try:
        return await nc.jetstream().consumer_info(settings.stream, settings.durable)
    finally:
        await nc.close()


async def receive_n(receive, n: int, timeout: float = 20) -> list:
    got = []
    with trio.fail_after(timeout):
        while len(got) < n:
            got.append(await receive.receive())
    return got


async def test_creates_stream_and_consumer_pulls_and_acks(nats_url, fast_path):
    settings = NatsSettings(url=nats_url, fast_path=fast_path, max_in_flight=200, max_ack_pending=400, pull_batch=50)
    async with trio_asyncio.open_loop() as loop:
        loop.set_exception_handler(asyncio_exception_handler)
        source = JetStreamSource(settings, Metrics())
        send, receive = trio.open_memory_channel(float("inf"))
        async with trio.open_nursery() as nursery:
            await nursery.start(source.run, send)
            assert source.fast_path is fast_path
            assert source.healthy
            await trio_asyncio.aio_as_trio(publish)(nats_url, 300)
            got = await receive_n(receive, 200)
            # Credit: nothing beyond max_in_flight arrives until acks free room.
            await trio.sleep(0.5)
            assert receive.statistics().current_buffer_used == 0
            assert [d.stream_seq for d in got] == list(range(1, 201))
            assert got[0].subject == "dcm.vm" and got[0].body == b"event 0" and got[0].stream_time_ns > 0
            await source.ack([d.token for d in got])
            got += await receive_n(receive, 100)
            await source.ack([d.token for d in got[200:]])
            await source.stop_intake()
            await source.close()
            nursery.cancel_scope.cancel()
        info = await trio_asyncio.aio_as_trio(consumer_info)(nats_url, settings)
    assert info.ack_floor.stream_seq == 300
    assert info.num_ack_pending == 0


async def test_reconnects_after_server_restart_and_loses_nothing(nats_server, fast_path):
    url = nats_server.url
    settings = NatsSettings(url=url, fast_path=fast_path, max_in_flight=1000, pull_batch=100, pull_expires=1.0)
    async with trio_asyncio.open_loop() as loop:
        loop.set_exception_handler(asyncio_exception_handler)
        metrics = Metrics()
        source = JetStreamSource(settings, metrics)
        send, receive = trio.open_memory_channel(float("inf"))
        async with trio.open_nursery() as nursery:
            await nursery.start(source.run, send)
            assert source.fast_path is fast_path
            await trio_asyncio.aio_as_trio(publish)(url, 50)
            first = await receive_n(receive, 50)
            await source.ack([d.token for d in first])
            await trio.to_thread.run_sync(nats_server.restart)
            await trio_asyncio.aio_as_trio(publish)(url, 50, start=50)
            second = await receive_n(receive, 50)
            await source.ack([d.token for d in second])
            assert source.healthy
            await source.stop_intake()
            await source.close()
            nursery.cancel_scope.cancel()
    assert metrics.registry.get_sample_value("dcmstatus_nats_reconnects_total") >= 1
    assert sorted({d.stream_seq for d in first + second}) == list(range(1, 101))


async def test_recreates_a_consumer_deleted_on_the_server(nats_url, fast_path):
    settings = NatsSettings(url=nats_url, fast_path=fast_path, max_in_flight=100, pull_batch=10, pull_expires=1.0, check_interval=0.5)

    async def delete_consumer():
        nc = await nats.connect(nats_url)
        await nc.jetstream().delete_consumer(settings.stream, settings.durable)
        await nc.close()

    async with trio_asyncio.open_loop() as loop:
        loop.set_exception_handler(asyncio_exception_handler)
        source = JetStreamSource(settings, Metrics())
        send, receive = trio.open_memory_channel(float("inf"))
        async with trio.open_nursery() as nursery:
            await nursery.start(source.run, send)
            assert source.fast_path is fast_path
            await trio_asyncio.aio_as_trio(delete_consumer)()
            with trio.fail_after(10):
                while True:
                    await trio.sleep(0.2)
                    try:
                        await trio_asyncio.aio_as_trio(consumer_info)(nats_url, settings)
                        break
                    except nats.js.errors.NotFoundError:
                        continue
            await trio_asyncio.aio_as_trio(publish)(nats_url, 5)
            got = await receive_n(receive, 5)
            await source.ack([d.token for d in got])
            await source.stop_intake()
            await source.close()
            nursery.cancel_scope.cancel()


# ---------------------------------------------------------------- raw frames


def connect_frame(url: str) -> bytes:
    """CONNECT with the credentials the URL carries, as nats-py reads them:
    the embedded server's nats://TOKEN@host as auth_token, USER:PASS as
    user and pass."""
    address = urlsplit(url)
    options: dict[str, object] = {"verbose": False, "pedantic": False, "headers": True, "protocol": 1}
    if address.username and address.password is not None:
        options.update(user=unquote(address.username), **{"pass": unquote(address.password)})
    elif address.username:
        options["auth_token"] = unquote(address.username)
    return b"CONNECT " + json.dumps(options).encode() + b"\r\n"


def publish_frames(url: str, frames: list[bytes]) -> None:
    """Write hand-made protocol lines (PUB/HPUB) to nats-server over a raw
    TCP socket: what a client library would refuse to send. Returns once the
    server answered the PING after them, so it has taken them all."""
    address = urlsplit(url)
    with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
        reader = sock.makefile("rb")
        reader.readline()  # INFO
        sock.sendall(connect_frame(url) + b"".join(frames) + b"PING\r\n")
        while not (line := reader.readline()).startswith(b"PONG"):
            assert line and not line.startswith(b"-ERR"), line


def pub(subject: bytes, body: bytes, reply: bytes = b"") -> bytes:
    return b"PUB " + subject + (b" " + reply if reply else b"") + b" %d\r\n" % len(body) + body + b"\r\n"


def hpub(subject: bytes, header_block: bytes, body: bytes) -> bytes:
    sizes = b" %d %d\r\n" % (len(header_block), len(header_block) + len(body))
    return b"HPUB " + subject + sizes + header_block + body + b"\r\n"


# What a well-behaved publisher never sends, all on a subject the stream
# captures; nats-server stores each of them as it is.
UNREADABLE_FRAMES = [
    pub(b"dcm.vm\xff", b'{"not": "read"}'),
    hpub(b"dcm.vm", b"NATS/1.0", b"{}"),  # no line end: nats-py's own parser raises IndexError
    hpub(b"dcm.vm", b"GARBAGE\r\n\r\n", b"{}"),
    hpub(b"dcm.vm", b"NATS/1.0\r\nce-id: \xff\xfe\r\n\r\n", b"{}"),
    hpub(b"dcm.vm", b"NATS/1.0\r\n" + b"a:\r\n" * 16_000 + b"\r\n", b"{}"),  # 16k headers: ~64 KiB, the server's limit
    hpub(b"dcm.vm", b"NATS/1.0\r\n" + b"a\r\n" * 20_000 + b"\r\n", b"{}"),  # 20k lines
]
# Readable (UTF-8) but split by nats-py's own parser as no server does: a
# vertical tab or form feed in the subject reset the connection, forever.
ODD_BUT_READABLE = [pub(b"dcm.a\x0bb", b"{}"), pub(b"dcm.a\x0cb", b"{}")]


async def test_frames_that_cannot_be_read_are_delivered_as_unreadable_and_intake_goes_on(nats_url):
    """Each frame becomes a delivery marked unreadable (the pipeline rejects
    it before the ack); the valid event after them arrives; all are acked.
    Before: the first frame raised inside nats-py's reader, which stopped."""
    settings = NatsSettings(url=nats_url, max_in_flight=100, pull_batch=10)
    async with trio_asyncio.open_loop() as loop:
        loop.set_exception_handler(asyncio_exception_handler)
        source = JetStreamSource(settings, Metrics())
        send, receive = trio.open_memory_channel(float("inf"))
        async with trio.open_nursery() as nursery:
            await nursery.start(source.run, send)
            assert source.fast_path
            valid = pub(b"dcm.vm", b'{"valid": "event"}')
            await trio.to_thread.run_sync(publish_frames, nats_url, [*ODD_BUT_READABLE, *UNREADABLE_FRAMES, valid])
            odd = await receive_n(receive, len(ODD_BUT_READABLE))
            assert [d.subject for d in odd] == ["dcm.a\x0bb", "dcm.a\x0cb"] and not any(d.unreadable for d in odd)
            got = await receive_n(receive, len(UNREADABLE_FRAMES) + 1)
            n = len(ODD_BUT_READABLE)
            assert [d.stream_seq for d in got] == list(range(n + 1, n + len(UNREADABLE_FRAMES) + 2))
            assert all(d.unreadable for d in got[:-1]), [d.unreadable for d in got]
            assert got[0].subject == "dcm.vm\\xff" and "not UTF-8" in got[0].unreadable
            assert "NATS/1.0" in got[1].unreadable and "not UTF-8" in got[3].unreadable
            assert "more than 256 headers" in got[4].unreadable and "more than 256 headers" in got[5].unreadable
            assert got[-1].unreadable is None and got[-1].body == b'{"valid": "event"}'
            await source.ack([d.token for d in odd + got])
            assert source.healthy
            await source.stop_intake()
            await source.close()
            nursery.cancel_scope.cancel()
        info = await trio_asyncio.aio_as_trio(consumer_info)(nats_url, settings)
    assert info.ack_floor.stream_seq == n + len(UNREADABLE_FRAMES) + 1 and info.num_ack_pending == 0


async def test_frames_without_an_ack_subject_are_counted_and_dropped(nats_url, fast_path):
    """Frames published straight to the consumer's inbox are no stream
    messages: nothing can ack them. Counted, dropped, and intake goes on."""
    settings = NatsSettings(url=nats_url, fast_path=fast_path, max_in_flight=100, pull_batch=10)
    metrics = Metrics()
    async with trio_asyncio.open_loop() as loop:
        loop.set_exception_handler(asyncio_exception_handler)
        source = JetStreamSource(settings, metrics)
        send, receive = trio.open_memory_channel(float("inf"))
        async with trio.open_nursery() as nursery:
            await nursery.start(source.run, send)
            assert source.fast_path is fast_path
            inbox = source._inbox.encode()
            # (The server refuses a client's PUB with a $JS.ACK reply: a reply
            # like that comes from JetStream only.)
            odd = [pub(inbox, b"no reply"), pub(inbox, b"odd reply", reply=b"not.an.ack")]
            await trio.to_thread.run_sync(publish_frames, nats_url, odd)
            await trio_asyncio.aio_as_trio(publish)(nats_url, 1)
            [event] = await receive_n(receive, 1)
            assert event.body == b"event 0" and event.unreadable is None
            assert metrics.registry.get_sample_value("dcmstatus_frames_dropped_total") == 2
            await source.ack([event.token])
            assert source.healthy
            await source.stop_intake()
            await source.close()
            nursery.cancel_scope.cancel()


async def test_acks_that_cannot_be_sent_are_counted_and_shown_in_health(nats_url, fast_path):
    settings = NatsSettings(url=nats_url, fast_path=fast_path, max_in_flight=100, pull_batch=10)
    metrics = Metrics()
    async with trio_asyncio.open_loop() as loop:
        loop.set_exception_handler(asyncio_exception_handler)
        source = JetStreamSource(settings, metrics)
        send, receive = trio.open_memory_channel(float("inf"))
        async with trio.open_nursery() as nursery:
            await nursery.start(source.run, send)
            assert source.fast_path is fast_path
            await trio_asyncio.aio_as_trio(publish)(nats_url, 3)
            got = await receive_n(receive, 3)
            await source.ack([got[0].token])
            assert "acks" not in source.health()
            await trio_asyncio.aio_as_trio(source._nc.close)()
            await source.ack([d.token for d in got[1:]])
            assert metrics.registry.get_sample_value("dcmstatus_ack_failures_total") == 2
            assert source.health()["acks"] == "failing" and not source.healthy
            await source.stop_intake()
            await source.close()
            nursery.cancel_scope.cancel()
