"""The JetStream adapter (dcmstatus.nats_source) against a real nats-server:
stream and consumer set-up, credit-bounded pulls, acks, reconnects, and a
consumer deleted behind its back."""

import trio_asyncio  # isort: skip

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


async def test_creates_stream_and_consumer_pulls_and_acks(nats_url):
    settings = NatsSettings(url=nats_url, max_in_flight=200, max_ack_pending=400, pull_batch=50)
    async with trio_asyncio.open_loop() as loop:
        loop.set_exception_handler(asyncio_exception_handler)
        source = JetStreamSource(settings, Metrics())
        send, receive = trio.open_memory_channel(float("inf"))
        async with trio.open_nursery() as nursery:
            await nursery.start(source.run, send)
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


async def test_reconnects_after_server_restart_and_loses_nothing(nats_server):
    url = nats_server.url
    settings = NatsSettings(url=url, max_in_flight=1000, pull_batch=100, pull_expires=1.0)
    async with trio_asyncio.open_loop() as loop:
        loop.set_exception_handler(asyncio_exception_handler)
        metrics = Metrics()
        source = JetStreamSource(settings, metrics)
        send, receive = trio.open_memory_channel(float("inf"))
        async with trio.open_nursery() as nursery:
            await nursery.start(source.run, send)
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


async def test_recreates_a_consumer_deleted_on_the_server(nats_url):
    settings = NatsSettings(url=nats_url, max_in_flight=100, pull_batch=10, pull_expires=1.0, check_interval=0.5)

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
