"""The consumer gauges (backlog, ack-pending, redelivered) as the source's
periodic consumer check records them, against a real nats-server."""

import trio_asyncio  # isort: skip

import nats
import trio

from dcmstatus.adapters.nats.source import JetStreamSource, NatsSettings, asyncio_exception_handler
from dcmstatus.engine.metrics import Metrics


async def publish(url: str, count: int) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    for i in range(count):
        await js.publish("dcm.vm", f"event {i}".encode())
    await nc.close()


async def receive_n(receive, n: int) -> list:
    with trio.fail_after(20):  # a guard against hanging, not a timing assertion
        return [await receive.receive() for _ in range(n)]


def gauges(metrics: Metrics) -> tuple[float, float, float]:
    get = metrics.registry.get_sample_value
    return (
        get("dcmstatus_consumer_pending_messages"),
        get("dcmstatus_consumer_ack_pending_messages"),
        get("dcmstatus_consumer_redelivered_messages"),
    )


async def test_consumer_check_records_pending_ack_pending_and_redelivered(nats_url, fast_path):
    # check_interval is long: the test runs the check itself, when it wants.
    settings = NatsSettings(url=nats_url, fast_path=fast_path, max_in_flight=50, max_ack_pending=100, pull_batch=10, check_interval=3600)
    metrics = Metrics()
    async with trio_asyncio.open_loop() as loop:
        loop.set_exception_handler(asyncio_exception_handler)
        source = JetStreamSource(settings, metrics)
        send, receive = trio.open_memory_channel(float("inf"))
        async with trio.open_nursery() as nursery:
            await nursery.start(source.run, send)
            assert source.fast_path is fast_path
            assert gauges(metrics) == (0, 0, 0)
            await trio_asyncio.aio_as_trio(publish)(nats_url, 200)
            got = await receive_n(receive, 50)  # the credit: no more until acks

            await trio_asyncio.aio_as_trio(source._check_consumer)()
            assert gauges(metrics) == (150, 50, 0)

            # Five refused (NAK): the server redelivers them first once credit frees up.
            for d in got[:5]:
                await trio_asyncio.aio_as_trio(source._nc.publish)(d.token, b"-NAK")
            # The server queues acks and pull requests apart: a round trip
            # first, or the next pull can overtake the NAKs.
            await trio_asyncio.aio_as_trio(source._nc.flush)()
            await source.ack([d.token for d in got[5:15]])
            again = await receive_n(receive, 10)
            assert [d.stream_seq for d in again[:5]] == [1, 2, 3, 4, 5]

            await trio_asyncio.aio_as_trio(source._check_consumer)()
            # 50 delivered - 10 acked + 5 new (51..55); the 5 redelivered are among them.
            assert gauges(metrics) == (145, 45, 5)

            await source.ack([d.token for d in got[15:] + again])
            await source.stop_intake()
            await source.close()
            nursery.cancel_scope.cancel()
