"""Change events on NATS (docs/changes.md#change-events-on-nats), end to end:
real `dcmstatus serve` processes, a real nats-server and PostgreSQL.

Every test ends with the same proof: every `status_changes` row is marked
published, and the changes stream holds exactly one message per row, in
change-id order, as the CloudEvent docs/changes.md describes.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime

import nats
import psycopg
from chaos import wait_for
from nats.js.api import AckPolicy, ConsumerConfig

from dcmstatus.adapters.postgres.schema import migrate
from dcmstatus.cli.publish import build_event, publish_event

STREAM = "dcmstatus-changes"


def sql(url: str, query: str, params=None):
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        cur = conn.execute(query, params)
        return cur.fetchall() if cur.description else []


def change_rows(url: str) -> list[tuple]:
    return sql(
        url,
        "SELECT change_id, kind, instance_id, service_type, previous_status, status, commit_time"
        " FROM status_changes ORDER BY change_id",
    )


def unpublished(url: str) -> int:
    return sql(url, "SELECT count(*) FROM status_changes WHERE published_at IS NULL")[0][0]


def insert_instances(url: str, ids: list[str], service_type: str = "vm") -> None:
    sql(
        url,
        "INSERT INTO service_type_instances (instance_id, service_type) SELECT i, %s FROM unnest(%s::text[]) AS i",
        (service_type, ids),
    )


def publish(url: str, service_type: str, instance: str, status: str, **kw) -> None:
    # Real times: rows are dated now, and the predecessor guard ignores
    # events older than their row (docs/database.md#ordering-guard).
    body = build_event(service_type, instance, status, time=datetime.now(UTC), **kw)
    asyncio.run(publish_event(url, f"dcm.{service_type}", body))


async def _stream_messages(url: str) -> list[tuple[str, dict, dict]]:
    nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        js = nc.jetstream()
        count = (await js.stream_info(STREAM)).state.messages
        # No acks: a reader that acks nothing would stop at max_ack_pending otherwise.
        sub = await js.pull_subscribe(
            "dcmstatus.changes.>", durable="test-reader", stream=STREAM, config=ConsumerConfig(ack_policy=AckPolicy.NONE)
        )
        out = []
        while len(out) < count:
            for msg in await sub.fetch(min(1000, count - len(out)), timeout=10):
                out.append((msg.subject, dict(msg.headers or {}), json.loads(msg.data)))
        await js.delete_consumer(STREAM, "test-reader")
        return out
    finally:
        await nc.close()


def stream_messages(url: str) -> list[tuple[str, dict, dict]]:
    return asyncio.run(_stream_messages(url))


async def _stream_count(url: str) -> int:
    nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        return (await nc.jetstream().stream_info(STREAM)).state.messages
    finally:
        await nc.close()


def stream_count(url: str) -> int:
    try:
        return asyncio.run(_stream_count(url))
    except Exception:
        return -1


def assert_published_once_in_order(nats_url: str, database_url: str, timeout: float = 120) -> list[dict]:
    """Every change row published, each exactly once, in change-id order."""
    wait_for(lambda: unpublished(database_url) == 0, "the outbox drained", timeout, interval=0.2)
    rows = change_rows(database_url)
    assert rows, "the test made no changes"
    # Marked published only after the ack: every row is in the stream by now.
    assert stream_count(nats_url) == len(rows), "the stream holds a duplicate or misses a change"
    messages = stream_messages(nats_url)
    ids = [event["data"]["change_id"] for _, _, event in messages]
    assert ids == [r[0] for r in rows]
    return [event for _, _, event in messages]


def test_each_change_once_in_order_as_a_cloudevent(tmp_path, nats_url, database_url, serve):
    migrate(database_url)
    svc = serve(nats_url, database_url)
    assert svc.health()[1]["components"]["changes"] == "publishing"
    insert_instances(database_url, ["vm1", "vm2"])
    publish(nats_url, "vm", "vm1", "RUNNING")
    wait_for(lambda: len(change_rows(database_url)) == 3, "vm1's change")
    # The same event again is a duplicate: no change row, so no change event.
    events = sql(database_url, "SELECT count(*) FROM status_changes")[0][0]
    body = build_event("vm", "vm2", "FAILED", time=datetime.now(UTC))
    asyncio.run(publish_event(nats_url, "dcm.vm", body))
    asyncio.run(publish_event(nats_url, "dcm.vm", body))
    wait_for(lambda: svc.metric("dcmstatus_events_received_total") >= 3, "both copies received")
    wait_for(lambda: svc.metric("dcmstatus_events_noop_total") >= 1, "the copy found a duplicate")
    assert sql(database_url, "SELECT count(*) FROM status_changes")[0][0] == events + 1
    sql(database_url, "DELETE FROM service_type_instances WHERE instance_id = 'vm1'")

    messages = assert_published_once_in_order(nats_url, database_url)
    rows = change_rows(database_url)
    assert [m["data"]["kind"] for m in messages] == ["created", "created", "changed", "changed", "deleted"]
    for message, (change_id, kind, instance, service_type, previous, status, commit_time) in zip(messages, rows):
        assert message["specversion"] == "1.0"
        assert message["type"] == "dcmstatus.status.changed"
        assert message["source"] == "dcmstatus"
        assert message["subject"] == instance
        assert message["id"] == f"change-{change_id}"
        assert datetime.fromisoformat(message["time"]) == commit_time
        data = message["data"]
        assert set(data) == {
            "id", "kind", "service_type", "status", "previous_status", "status_message", "outputs",
            "provider_name", "event_time", "change_id",
        }
        assert (data["id"], data["kind"], data["service_type"]) == (instance, kind, service_type)
        assert (data["previous_status"], data["status"]) == (previous, status)
    assert messages[2]["data"]["status"] == "RUNNING" and messages[2]["data"]["event_time"] is not None
    subjects_and_ids = [(s, h.get("Nats-Msg-Id")) for s, h, _ in stream_messages(nats_url)]
    assert subjects_and_ids == [("dcmstatus.changes.vm", f"change-{r[0]}") for r in rows]
    assert svc.metric("dcmstatus_changes_relay_leader") == 1
    wait_for(lambda: svc.metric("dcmstatus_changes_published_total") == len(rows), "published counted")
    assert svc.terminate() == 0, svc.log()


def test_two_replicas_publish_each_change_once(tmp_path, nats_url, database_url, serve):
    migrate(database_url)
    a = serve(nats_url, database_url, name="a")
    b = serve(nats_url, database_url, name="b")
    ids = [f"vm{i}" for i in range(300)]
    for chunk in range(0, len(ids), 50):
        insert_instances(database_url, ids[chunk:chunk + 50])
    for instance in ids[:100]:
        publish(nats_url, "vm", instance, "RUNNING")
    wait_for(lambda: len(change_rows(database_url)) == 400, "every change written")
    assert_published_once_in_order(nats_url, database_url)
    leaders = [svc.metric("dcmstatus_changes_relay_leader") for svc in (a, b)]
    assert sorted(leaders) == [0, 1]
    states = sorted(svc.health()[1]["components"]["changes"] for svc in (a, b))
    assert states == ["publishing", "standby"]
    published = [svc.metric("dcmstatus_changes_published_total") for svc in (a, b)]
    assert sum(published) == 400 and 0 in published
    assert a.terminate() == 0 and b.terminate() == 0


def test_kill9_of_the_leader_mid_backlog_loses_nothing_and_duplicates_nothing(
    tmp_path, nats_url, database_url, serve
):
    migrate(database_url)
    ids = [f"vm{i}" for i in range(20_000)]
    for chunk in range(0, len(ids), 2000):
        insert_instances(database_url, ids[chunk:chunk + 2000])  # a backlog before any relay runs
    a = serve(nats_url, database_url, name="a")
    wait_for(lambda: unpublished(database_url) < len(ids), "the relay under way")
    a.kill9()
    left = unpublished(database_url)
    print(f"killed with {left} of {len(ids)} changes unpublished")
    b = serve(nats_url, database_url, name="b")  # another replica takes the leadership
    a.start()  # and the killed one comes back as a standby (or leader, if first)
    assert_published_once_in_order(nats_url, database_url)
    assert a.terminate() == 0 and b.terminate() == 0


def test_nats_down_then_up_the_outbox_drains(tmp_path, nats_server, database_url, serve):
    migrate(database_url)
    svc = serve(nats_server.url, database_url)
    insert_instances(database_url, ["vm0"])
    wait_for(lambda: unpublished(database_url) == 0, "the first change published")
    nats_server.kill()
    insert_instances(database_url, [f"vm{i}" for i in range(1, 200)])
    wait_for(lambda: svc.metric("dcmstatus_changes_outbox_rows") == 199, "the outbox holds the changes")
    wait_for(lambda: svc.health()[1].get("components", {}).get("changes") == "failing", "the relay failing")
    time.sleep(1)  # a few failed rounds: nothing may be marked meanwhile
    assert unpublished(database_url) == 199
    nats_server.start()
    assert_published_once_in_order(nats_server.url, database_url)
    wait_for(lambda: svc.health()[1]["components"]["changes"] == "publishing", "publishing again")
    assert svc.metric("dcmstatus_changes_publish_errors_total") >= 1
    assert svc.terminate() == 0, svc.log()


def test_no_change_events_publishes_nothing(tmp_path, nats_url, database_url, serve):
    migrate(database_url)
    svc = serve(nats_url, database_url, "--no-change-events")
    insert_instances(database_url, ["vm1"])
    assert svc.health()[1]["components"]["changes"] == "off"
    wait_for(lambda: len(change_rows(database_url)) == 1, "the change written all the same")
    assert svc.terminate() == 0
    assert unpublished(database_url) == 1
    assert stream_count(nats_url) == -1  # no changes stream was made
