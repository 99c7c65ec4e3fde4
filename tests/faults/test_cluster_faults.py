"""The service on clustered servers (docs/reliability.md#clustered-servers):
on a 3-node NATS cluster its streams get 3 replicas, and a kill -9 of the
stream leader's node mid-drain loses nothing; on a PostgreSQL primary with a
synchronous standby, a failover mid-drain (kill the primary, promote the
standby) ends with every row correct and every message acked."""

import asyncio

import chaos
import nats
from chaos import all_acked, compare, consumer_state, database_state, rejected_by_reason, wait_for

from dcmstatus.adapters.nats.source import nats_servers
from dcmstatus.devtools.embedded import create_database


def _stream_info(url: str, stream: str):
    async def go():
        nc = await nats.connect(nats_servers(url), connect_timeout=5)
        try:
            return await nc.jetstream(timeout=5).stream_info(stream)
        finally:
            await nc.close()

    return asyncio.run(go())


def _check_the_outcome(svc, nats_url: str, database_url: str, workload) -> None:
    wait_for(lambda: all_acked(nats_url), "every message acknowledged", 120, interval=0.5)
    lost, wrong = compare(workload.expected, database_state(database_url))
    assert (len(lost), len(wrong)) == (0, 0), (lost[:5], wrong[:5])
    assert rejected_by_reason(database_url) == dict(workload.bad_by_reason)
    assert svc.terminate() == 0, svc.log()[-3000:]


def test_a_kill_of_the_stream_leaders_node_mid_drain_loses_nothing(nats_cluster, database_url, serve, publisher):
    workload = chaos.make_workload(200, 40, seed=12)
    chaos.prepare_database(database_url, workload.instances)
    svc = serve(nats_cluster.url, database_url, "--ack-wait", "3")
    assert "3 replicas (the server is in cluster 'dcmstatus', which lists 3 servers)" in svc.log(), svc.log()
    feed = publisher(nats_cluster.url, workload.events, rate=1500)
    wait_for(lambda: feed.progress[0] >= 3000 and svc.metric("dcmstatus_events_applied_total") > 0, "draining", 60)
    leader = nats_cluster.leader(chaos.STREAM)
    assert leader is not None
    nats_cluster.kill(leader)  # left dead: two of three nodes keep the quorum
    feed.join()
    _check_the_outcome(svc, nats_cluster.url, database_url, workload)
    assert nats_cluster.leader(chaos.STREAM) not in (None, leader)
    info = _stream_info(nats_cluster.url, chaos.STREAM)
    assert info.config.num_replicas == 3 and info.state.messages == len(workload.events)
    # The relay publishes change events over the same list of servers, to a replicated stream.
    changes = _stream_info(nats_cluster.url, "dcmstatus-changes")
    assert changes.config.num_replicas == 3 and changes.state.messages > 0


def test_a_postgres_failover_mid_drain_ends_with_every_row_correct(nats_url, pg_pair, serve, publisher):
    database_url = create_database(pg_pair.url, "failover")
    workload = chaos.make_workload(200, 40, seed=13)
    chaos.prepare_database(database_url, workload.instances)
    svc = serve(nats_url, database_url, "--ack-wait", "3")
    feed = publisher(nats_url, workload.events, rate=1500)
    wait_for(lambda: feed.progress[0] >= 3000 and svc.metric("dcmstatus_events_applied_total") > 0, "draining", 60)
    old = pg_pair.primary
    new = pg_pair.failover(rejoin=True)  # kill -9 the primary, promote the standby, re-attach the old one
    assert new is not old and pg_pair.primary is new
    feed.join()
    _check_the_outcome(svc, nats_url, database_url, workload)
    state = consumer_state(nats_url)
    assert state["num_ack_pending"] == 0 and state["ack_floor"] == state["last_seq"]
