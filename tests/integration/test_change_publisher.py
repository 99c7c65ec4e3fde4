"""The change relay's publisher against a real nats-server, on both paths:
raw protocol lines with acks taken from nats-py's parser (internals.py), and
the public API used when those internals are not what it expects."""

import trio_asyncio  # isort: skip

from datetime import UTC, datetime

import nats
import pytest

from dcmstatus.adapters.nats import changes as publisher_module
from dcmstatus.adapters.nats.changes import ChangePublisher, ChangeStreamSettings
from dcmstatus.core.changes import PendingChange


async def _stream_state(url: str) -> tuple[int, list[str]]:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        info = await js.stream_info("dcmstatus-changes")
        ids = [(await js.get_msg("dcmstatus-changes", seq)).headers["Nats-Msg-Id"] for seq in range(1, info.state.messages + 1)]
        return info.state.messages, ids
    finally:
        await nc.close()


@pytest.mark.parametrize("raw", [True, False], ids=["internals", "public-api"])
async def test_each_change_is_stored_once_in_order_and_a_republish_is_dropped(nats_url, asyncio_loop, monkeypatch, raw):
    if not raw:
        monkeypatch.setattr(publisher_module.internals, "raw_send_problem", lambda nc: "made up for the test")
    publisher = ChangePublisher(ChangeStreamSettings(url=nats_url, window=4))
    changes = [PendingChange(n, "vm", datetime.now(UTC), b'{"n": %d}' % n) for n in range(1, 11)]
    try:
        await publisher.ready()
        assert publisher._raw is raw
        assert await publisher.publish(changes) == 10
        assert await publisher.publish(changes[:3]) == 3  # JetStream de-duplicates by Nats-Msg-Id
    finally:
        await publisher.close()
    count, ids = await trio_asyncio.aio_as_trio(_stream_state)(nats_url)
    assert count == 10
    assert ids == [f"change-{n}" for n in range(1, 11)]
