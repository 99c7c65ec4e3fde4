"""Fault suite: the real `dcmstatus serve` against real nats-server and
PostgreSQL processes, with real faults injected (kill -9, server restarts,
an unreachable database, a deleted consumer, two replicas, SIGTERM under load).

Every test ends with the same proof: the durable consumer has every stream
message acknowledged (and a message is acked only after its commit), and every
instance holds the status of its newest event. Time bounds are timeouts only,
never performance assertions.
"""

from __future__ import annotations

import random
import time
import uuid

import chaos
import psycopg
import pytest
from chaos import all_acked, compare, consumer_state, converged, database_state, wait_for

from dcmstatus.devtools.embedded import create_database

ACK_WAIT = "2"


def ready_db(url: str, workload: chaos.Workload) -> str:
    chaos.prepare_database(url, workload.instances)
    return url


def assert_final_state(nats_url: str, database_url: str, workload: chaos.Workload, timeout: float = 90) -> None:
    wait_for(lambda: all_acked(nats_url), "every message acknowledged", timeout, interval=0.3)
    lost, wrong = compare(workload.expected, database_state(database_url))
    assert not lost, f"{len(lost)} instances lost their newest event, e.g. {lost[:3]}"
    assert not wrong, f"{len(wrong)} instances hold a wrong status, e.g. {wrong[:3]}"


def test_kill9_at_random_points_during_a_backlog(tmp_path, nats_url, database_url, serve, publisher):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    workload = chaos.make_workload(200, 60, seed=seed, bad_rate=0)
    ready_db(database_url, workload)
    # Small batches and one writer: the backlog takes long enough to be killed into.
    args = ("--ack-wait", ACK_WAIT, "--writers", "1", "--batch-size", "100", "--max-in-flight", "2000")
    svc = serve(nats_url, database_url, *args)
    pub = publisher(nats_url, workload.events, rate=3000)
    kills = 0
    for _ in range(6):
        time.sleep(rng.uniform(0.2, 1.2))
        received = svc.metric("dcmstatus_events_received_total") if svc.health()[0] == 200 else None
        svc.kill9()
        kills += 1
        print(f"seed {seed}: kill -9 #{kills} after received={received}, published={pub.progress[0]}")
        svc.start(wait_healthy=rng.random() < 0.5)  # sometimes killed again while starting up
    pub.join()
    wait_for(lambda: svc.health()[0] == 200, "healthy after the last restart")
    assert kills >= 5
    assert_final_state(nats_url, database_url, workload)
    assert svc.terminate() == 0, svc.log()


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_nats_server_restart_mid_stream(tmp_path, nats_server, database_url, serve, publisher, how):
    workload = chaos.make_workload(100, 100, seed=2, bad_rate=0)
    ready_db(database_url, workload)
    svc = serve(nats_server.url, database_url, "--ack-wait", ACK_WAIT)
    pub = publisher(nats_server.url, workload.events, rate=4000)
    wait_for(lambda: pub.progress[0] > len(workload.events) // 3, "a third published")
    if how == "sigterm":
        nats_server.restart()
    else:
        nats_server.kill()
        time.sleep(0.5)
        nats_server.start()
    pub.join()
    assert_final_state(nats_server.url, database_url, workload)
    wait_for(lambda: svc.health()[0] == 200, "healthy again")
    assert svc.metric("dcmstatus_nats_reconnects_total") >= 1
    assert svc.terminate() == 0, svc.log()


def test_sigterm_while_nats_is_down_exits_0(tmp_path, nats_server, database_url, serve):
    """Found by the chaos run: SIGTERM during a NATS restart made serve exit 1
    (nats-py's close() raised ConnectionResetError on the lost transport)."""
    workload = chaos.make_workload(20, 5, seed=11, bad_rate=0)
    ready_db(database_url, workload)
    svc = serve(nats_server.url, database_url, "--ack-wait", ACK_WAIT, "--grace-period", "5")
    import asyncio

    asyncio.run(chaos.publish_events(nats_server.url, workload.events))
    wait_for(lambda: all_acked(nats_server.url), "backlog done")
    nats_server.kill()
    wait_for(lambda: "disconnected from NATS" in svc.log(), "the service saw the disconnect")
    try:
        assert svc.terminate(timeout=30) == 0, svc.log()[-3000:]
    finally:
        nats_server.start()
    assert converged(database_url, workload.expected)


@pytest.mark.parametrize("how", ["restart", "kill"])
def test_postgres_restart_mid_stream(tmp_path, nats_url, pg_server, serve, publisher, how):
    database_url = create_database(pg_server.url, f"faults_{uuid.uuid4().hex[:8]}")
    workload = chaos.make_workload(100, 100, seed=3, bad_rate=0)
    ready_db(database_url, workload)
    svc = serve(nats_url, database_url, "--ack-wait", ACK_WAIT)
    pub = publisher(nats_url, workload.events, rate=4000)
    wait_for(lambda: pub.progress[0] > len(workload.events) // 3, "a third published")
    if how == "restart":
        pg_server.restart()
    else:
        pg_server.kill()
        time.sleep(0.5)
        pg_server.start()
    pub.join()
    assert_final_state(nats_url, database_url, workload)
    wait_for(lambda: svc.health()[0] == 200, "healthy again")
    assert svc.terminate() == 0, svc.log()


def test_postgres_unreachable_longer_than_ack_wait(tmp_path, nats_url, pg_server, serve):
    """Intake pauses, nothing is acked, memory stays bounded, health is 503
    then 200 again, and in the end nothing is lost."""
    database_url = create_database(pg_server.url, f"faults_{uuid.uuid4().hex[:8]}")
    workload = chaos.make_workload(200, 100, seed=4, bad_rate=0)
    ready_db(database_url, workload)
    max_in_flight = 2000
    svc = serve(nats_url, database_url, "--ack-wait", ACK_WAIT, "--max-in-flight", str(max_in_flight))
    rss_before = svc.rss_kib()
    pg_server.stop()
    import asyncio

    asyncio.run(chaos.publish_events(nats_url, workload.events))  # 24k events while the database is down
    import threading

    # /health is asked in a thread with a generous HTTP timeout (see
    # test_health_answers_promptly_while_the_database_is_down) while memory is sampled.
    during: list = []
    asker = threading.Thread(target=lambda: during.append(svc.health(timeout=45)), daemon=True)
    asker.start()
    acked_floor = consumer_state(nats_url)["ack_floor"]
    rss, in_flight = [], []
    outage_until = time.monotonic() + 4 * float(ACK_WAIT) + 2  # several redelivery rounds
    while time.monotonic() < outage_until or asker.is_alive():
        rss.append(svc.rss_kib())
        in_flight.append(svc.metric("dcmstatus_in_flight_messages"))
        time.sleep(0.25)
        assert time.monotonic() < outage_until + 60, "health never answered"
    status, body = during[0]
    assert status == 503 and ("unreachable" in str(body) or "failing" in str(body)), body
    state = consumer_state(nats_url)
    assert state["ack_floor"] == acked_floor, "a message was acknowledged while the database was down"
    assert state["num_pending"] > 0, "intake did not pause: the whole backlog was taken in"
    assert max(in_flight) <= max_in_flight
    growth_mib = (max(rss) - rss_before) / 1024
    print(f"RSS before {rss_before} KiB, max during the outage {max(rss)} KiB (+{growth_mib:.1f} MiB)")
    assert growth_mib < 64, f"RSS grew by {growth_mib:.1f} MiB during the outage"
    assert svc.metric("dcmstatus_db_errors_total") >= 1
    assert svc.alive()
    pg_server.start()
    wait_for(lambda: svc.health()[0] == 200, "health 200 again", 60)
    assert_final_state(nats_url, database_url, workload)
    assert svc.terminate() == 0, svc.log()


def test_health_answers_promptly_while_the_database_is_down(tmp_path, nats_url, pg_server, serve):
    database_url = create_database(pg_server.url, f"faults_{uuid.uuid4().hex[:8]}")
    svc = serve(nats_url, database_url)
    pg_server.stop()
    try:
        # Health reports the service's latest ping (once a second, 2 s
        # deadline: docs/operations.md#health), so the outage shows within 3 s.
        wait_for(lambda: svc.health(timeout=10)[0] == 503, "health 503 after the next ping", 5)
        for _ in range(3):
            status, body = svc.health(timeout=10)
            assert status == 503, f"health did not answer within 10 s: {body}"
            time.sleep(0.5)
    finally:
        pg_server.start()
    wait_for(lambda: svc.health(timeout=40)[0] == 200, "health 200 again", 60)
    assert svc.terminate() == 0, svc.log()


def test_consumer_deleted_on_the_server_is_recreated(tmp_path, nats_url, database_url, serve):
    import asyncio

    first = chaos.make_workload(50, 20, seed=5, bad_rate=0)
    second = chaos.make_workload(50, 20, seed=6, bad_rate=0)
    # The second half is newer for the same instances: it must land after the deletion.
    for e in second.events:
        e.body = e.body.replace(b'"time":"2026-04-09T13:', b'"time":"2026-04-09T14:')
    second.expected = {k: (s, t.replace(hour=14)) for k, (s, t) in second.expected.items()}
    ready_db(database_url, first)
    svc = serve(nats_url, database_url, "--ack-wait", ACK_WAIT)
    asyncio.run(chaos.publish_events(nats_url, first.events))
    assert_final_state(nats_url, database_url, first)
    chaos.delete_consumer(nats_url)
    asyncio.run(chaos.publish_events(nats_url, second.events))
    wait_for(lambda: consumer_state(nats_url) is not None, "consumer recreated", 60)
    assert_final_state(nats_url, database_url, second)
    wait_for(lambda: svc.health()[0] == 200, "healthy again")
    assert "was deleted on the server" in svc.log()
    assert svc.terminate() == 0, svc.log()


def test_two_replicas_on_the_same_durable_consumer(tmp_path, nats_url, database_url, serve, publisher):
    workload = chaos.make_workload(200, 60, seed=7, bad_rate=0)
    ready_db(database_url, workload)
    a = serve(nats_url, database_url, "--ack-wait", ACK_WAIT, name="a")
    b = serve(nats_url, database_url, "--ack-wait", ACK_WAIT, name="b")
    pub = publisher(nats_url, workload.events, rate=5000)
    pub.join()
    assert_final_state(nats_url, database_url, workload)
    assert a.terminate() == 0, a.log()
    assert b.terminate() == 0, b.log()
    sa, sb = a.summary(), b.summary()
    print(f"replica a {sa}, replica b {sb}")
    assert sa["received"] > 0 and sb["received"] > 0, "one replica got nothing"
    assert sa["received"] + sb["received"] >= len(workload.events)
    # No duplicate side effects: an event changes its row at most once.
    assert sa["applied"] + sb["applied"] <= workload.valid


def test_sigterm_during_a_large_backlog_then_restart(tmp_path, nats_url, database_url, serve):
    import asyncio

    workload = chaos.make_workload(500, 80, seed=8, bad_rate=0, duplicate_rate=0)
    ready_db(database_url, workload)
    grace = 10
    slow = ("--ack-wait", "3", "--writers", "1", "--batch-size", "200", "--grace-period", str(grace))
    # The backlog is in the stream before the service starts: a service
    # faster than the publisher must still have one to be stopped in. (The
    # service uses an existing stream as it is.)
    asyncio.run(chaos._js_call(nats_url, lambda js: js.add_stream(name=chaos.STREAM, subjects=["dcm.*"])))
    asyncio.run(chaos.publish_events(nats_url, workload.events))  # confirmed: all stored
    first = serve(nats_url, database_url, *slow, name="first")
    total = consumer_state(nats_url)["last_seq"]
    assert total == len(workload.events)
    wait_for(lambda: first.metric("dcmstatus_events_received_total") >= 2000, "intake under way")
    t0 = time.monotonic()
    assert first.terminate(timeout=grace + 20) == 0, first.log()
    print(f"stopped in {time.monotonic() - t0:.1f}s; {first.summary()}")
    assert "grace period over" not in first.log()
    taken = first.summary()["received"]
    assert 0 < taken < total, "SIGTERM did not land during the backlog"
    state = consumer_state(nats_url)
    assert state["num_ack_pending"] == 0, f"the first run left unacknowledged messages: {state}"
    assert state["ack_floor"] == taken, state
    second = serve(nats_url, database_url, *slow, name="second")
    wait_for(lambda: all_acked(nats_url), "the rest acknowledged", 90)
    time.sleep(3.5)  # past ack_wait: anything taken but not acked would be back by now
    assert second.terminate() == 0, second.log()
    # Each message was taken exactly once: what the first run committed was
    # acked (never re-delivered), and nothing was skipped.
    assert taken + second.summary()["received"] == total
    lost, wrong = compare(workload.expected, database_state(database_url))
    assert not lost and not wrong


def test_poison_event_is_isolated_and_dead_lettered(tmp_path, nats_url, database_url, serve):
    """A value the database rejects (here a trigger raising for one instance)
    fails its whole batch: the batch must be split, the rest committed, the
    poison dead-lettered after bounded attempts, and the consumer must go on."""
    import asyncio

    workload = chaos.make_workload(50, 20, seed=9, bad_rate=0, duplicate_rate=0)
    ready_db(database_url, workload)
    poison = "poison-1"
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO service_type_instances (instance_id, service_type, created_at) VALUES (%s, 'vm', %s)",
            (poison, chaos.CREATED),
        )
        conn.execute(
            """CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN
                 IF NEW.instance_id = 'poison-1' THEN RAISE EXCEPTION 'poison event for %', NEW.instance_id; END IF;
                 RETURN NEW;
               END $$"""
        )
        conn.execute(
            "CREATE TRIGGER refuse_poison BEFORE UPDATE ON service_type_instances"
            " FOR EACH ROW EXECUTE FUNCTION refuse_poison()"
        )
    svc = serve(nats_url, database_url, "--ack-wait", ACK_WAIT)
    events = list(workload.events)
    middle = len(events) // 2
    events.insert(middle, chaos.Event("dcm.vm", chaos.event_body("vm", poison, "RUNNING", chaos.T0)))
    asyncio.run(chaos.publish_events(nats_url, events))
    # Good events around the poison land, and the consumer is not stalled.
    assert_final_state(nats_url, database_url, workload, timeout=60)
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT reason FROM rejected_events WHERE instance_id = %s", (poison,)).fetchall()
        status = conn.execute("SELECT status FROM service_type_instances WHERE instance_id = %s", (poison,)).fetchone()
    assert rows, "the poison event was not dead-lettered"
    assert status == ("PROVISIONING",)
    # Still consuming after the poison.
    late = chaos.make_workload(5, 2, seed=10, bad_rate=0, prefix="late")
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO service_type_instances (instance_id, service_type, created_at)"
            " SELECT *, %s FROM unnest(%b::text[], %b::text[])",
            (chaos.CREATED, list(late.instances), list(late.instances.values())),
        )
    asyncio.run(chaos.publish_events(nats_url, late.events))
    wait_for(lambda: converged(database_url, late.expected), "events after the poison applied", 60)
    assert svc.terminate() == 0, svc.log()

