"""The in-flight bounds of the JetStream adapter across reconnects, against a
real nats-server: a server restart, and a connection cut on the client's side
only (the server keeps the old connection, its subscription and our pull
requests, and serves them to the re-subscribed inbox)."""

import trio_asyncio  # isort: skip

from urllib.parse import urlsplit

import nats
import pytest
import trio

from dcmstatus.adapters.nats.source import JetStreamSource, NatsSettings, asyncio_exception_handler
from dcmstatus.engine.metrics import Metrics

MAX_IN_FLIGHT = 200


class HalfOpenProxy:
    """A TCP proxy in front of nats-server whose `cut()` closes the client's
    side of every connection and leaves the server's side open and silent, as
    a network failure the server has not noticed yet does."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self._links: list[trio.CancelScope] = []
        self._zombies: list[trio.SocketStream] = []

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        try:
            await trio.serve_listeners(self._link, listeners)
        finally:
            for stream in self._zombies:
                await trio.aclose_forcefully(stream)

    async def _link(self, client: trio.SocketStream) -> None:
        server = await trio.open_tcp_stream("127.0.0.1", self.upstream_port)
        self._zombies.append(server)  # closed only when the proxy stops

        async def pump(source: trio.SocketStream, sink: trio.SocketStream) -> None:
            while data := await source.receive_some(65536):
                await sink.send_all(data)

        async with trio.open_nursery() as nursery:
            self._links.append(nursery.cancel_scope)
            nursery.start_soon(pump, client, server)
            nursery.start_soon(pump, server, client)
        await trio.aclose_forcefully(client)

    def cut(self) -> None:
        for scope in self._links:
            scope.cancel()
        self._links.clear()


async def publish(url: str, count: int) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    for i in range(count):
        await js.publish("dcm.vm", f"event {i}".encode())
    await nc.close()


def assert_within_bounds(source: JetStreamSource) -> None:
    s = source.settings
    assert source._in_flight <= s.max_in_flight, f"{source._in_flight} messages in flight, at most {s.max_in_flight}"
    assert source._bytes_in_flight <= s.max_in_flight_bytes


@pytest.mark.parametrize("fault", ["server restart", "client side cut"])
async def test_in_flight_stays_within_the_credit_across_a_reconnect(nats_server, fault):
    total = 1000
    async with trio_asyncio.open_loop() as loop:
        loop.set_exception_handler(asyncio_exception_handler)
        async with trio.open_nursery() as outer:
            url = nats_server.url
            address = urlsplit(url)
            proxy = HalfOpenProxy(address.port)
            if fault == "client side cut":
                await outer.start(proxy.serve)
                # Through the proxy, with the server's token (it admits no one without).
                url = address._replace(netloc=f"{address.username}@127.0.0.1:{proxy.port}").geturl()
            settings = NatsSettings(url=url, max_in_flight=MAX_IN_FLIGHT, max_ack_pending=2 * MAX_IN_FLIGHT, pull_batch=50)
            metrics = Metrics()
            source = JetStreamSource(settings, metrics)
            send, receive = trio.open_memory_channel(float("inf"))
            async with trio.open_nursery() as nursery:
                await nursery.start(source.run, send)
                assert source._requested == MAX_IN_FLIGHT  # the whole credit waits on the server
                if fault == "server restart":
                    await trio.to_thread.run_sync(nats_server.restart)
                else:
                    proxy.cut()
                with trio.fail_after(20):
                    while not metrics.registry.get_sample_value("dcmstatus_nats_reconnects_total"):
                        await trio.sleep(0.05)

                # A backlog, and no acks: whatever requests the server serves,
                # old or new, what arrives must stay within the credit.
                await trio_asyncio.aio_as_trio(publish)(nats_server.url, total)
                got = []
                with trio.fail_after(30):
                    while len(got) < MAX_IN_FLIGHT:
                        got.append(await receive.receive())
                        assert_within_bounds(source)
                await trio.sleep(0.5)  # room for any excess to arrive
                assert_within_bounds(source)

                # Acks free the credit again; the rest comes, still within bounds.
                unacked = [d.token for d in got]
                seqs = {d.stream_seq for d in got}
                with trio.fail_after(60):
                    while len(seqs) < total:
                        await source.ack(unacked)
                        unacked = []
                        batch = [await receive.receive()]
                        while True:
                            try:
                                batch.append(receive.receive_nowait())
                            except trio.WouldBlock:
                                break
                        assert_within_bounds(source)
                        unacked += [d.token for d in batch]
                        seqs.update(d.stream_seq for d in batch)
                await source.ack(unacked)
                assert seqs == set(range(1, total + 1))
                await source.stop_intake()
                await source.close()
                nursery.cancel_scope.cancel()
            outer.cancel_scope.cancel()
