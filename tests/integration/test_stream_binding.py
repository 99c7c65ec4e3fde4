"""Binding to the stream DCM already has (docs/dcm.md#stream), against a real
nats-server: a stream of another name that captures dcm.* is consumed as it
is, never reconfigured; with none, dcmstatus creates its own with a retention
bound."""

import trio_asyncio  # isort: skip

import logging

import nats
import pytest
import trio
from nats.js.api import StreamConfig

from dcmstatus.adapters.nats.source import JetStreamSource, NatsSettings
from dcmstatus.config import ServeConfig
from dcmstatus.engine.metrics import Metrics


async def _js(url, action):
    nc = await nats.connect(url)
    try:
        return await action(nc.jetstream())
    finally:
        await nc.close()


async def js_call(url, action):
    return await trio_asyncio.aio_as_trio(_js)(url, action)


async def run_source(settings, body):
    source = JetStreamSource(settings, Metrics())
    send, receive = trio.open_memory_channel(float("inf"))
    async with trio.open_nursery() as nursery:
        await nursery.start(source.run, send)
        await body(source, receive)
        await source.stop_intake()
        await source.close()
        nursery.cancel_scope.cancel()


async def test_binds_to_an_existing_stream_of_another_name_and_leaves_it_as_it_is(nats_server, asyncio_loop, caplog):
    url = nats_server.url

    async def make(js):
        # What the DCM control plane does: name and subjects only (server defaults).
        await js.add_stream(name="dcm-events", subjects=["dcm.*"])
        await js.publish("dcm.vm", b"first")
        return (await js.stream_info("dcm-events")).config

    before = await js_call(url, make)
    settings = NatsSettings(url=url, max_in_flight=100, max_ack_pending=200, pull_batch=10)

    async def consume(source, receive):
        assert source.stream == "dcm-events"
        with trio.fail_after(20):
            delivery = await receive.receive()
        assert (delivery.subject, delivery.body) == ("dcm.vm", b"first")
        await source.ack([delivery.token])

    with caplog.at_level(logging.INFO, logger="dcmstatus"):
        await run_source(settings, consume)

    async def inspect(js):
        streams = await js.streams_info()
        consumer = await js.consumer_info("dcm-events", "dcmstatus")
        return streams, consumer

    streams, consumer = await js_call(url, inspect)
    assert [s.config.name for s in streams] == ["dcm-events"]  # no second, overlapping stream
    # Not reconfigured (the server's own metadata keys aside, which it fills in itself).
    assert _settings(streams[0].config) == _settings(before)
    assert consumer.ack_floor.stream_seq == 1
    assert "bound to the existing stream dcm-events" in caplog.text
    assert "no retention bound" in caplog.text


async def test_creates_its_own_stream_with_a_retention_bound_when_none_exists(nats_server, asyncio_loop):
    url = nats_server.url
    settings = NatsSettings(url=url, stream_max_age=3600.0, max_in_flight=100, max_ack_pending=200, pull_batch=10)

    async def idle(source, receive):
        assert source.stream == "dcm-status"

    await run_source(settings, idle)
    config = await js_call(url, lambda js: _config(js, "dcm-status"))
    assert config.subjects == ["dcm.*"]
    assert config.max_age == pytest.approx(3600.0)


def _settings(config: StreamConfig) -> dict:
    return {k: v for k, v in config.as_dict().items() if k != "metadata"}


async def _config(js, name) -> StreamConfig:
    return (await js.stream_info(name)).config


@pytest.mark.parametrize("durable", ["control-plane", "service-provider-manager", "placement-manager"])
def test_refuses_a_durable_of_dcm_itself(durable):
    with pytest.raises(ValueError, match="durable consumer of DCM itself"):
        ServeConfig(nats_url="nats://x", database_url="postgresql://x", durable=durable).validate()
