"""Frames no client library sends, live: written by hand over a raw TCP socket
into a running `dcmstatus serve`, on a subject the stream captures. Each must
end as a rejection (invalid_envelope, in the dead-letter table), be acked,
and not stop intake: the valid event after them is applied and health is 200
because intake really goes on.

Before: the first of them raised inside nats-py's reader, which stopped; the
valid event was never applied while /api/v1/health said 200.
"""

from __future__ import annotations

import chaos
import psycopg
from chaos import all_acked, consumer_state, database_state, hpub_frame, pub_frame, publish_frames, wait_for

UNREADABLE = [
    pub_frame(b"dcm.vm\xff", b'{"subject": "not UTF-8"}'),
    pub_frame(b"dcm.\xc3\x28", b"{}"),
    hpub_frame(b"dcm.vm", b"NATS/1.0", b"{}"),  # nats-py's own header parser raises IndexError on it
    hpub_frame(b"dcm.vm", b"GARBAGE\r\n\r\n", b"{}"),
    hpub_frame(b"dcm.vm", b"NATS/1.0\r\nce-id: \xff\r\n\r\n", b"{}"),
    hpub_frame(b"dcm.vm", b"NATS/1.0\r\n" + b"a:\r\n" * 16_000 + b"\r\n", b"{}"),  # ~64 KiB: the server's limit
    hpub_frame(b"dcm.vm", b"NATS/1.0\r\n" + b"a\r\n" * 20_000 + b"\r\n", b"{}"),
]


def test_unreadable_frames_are_rejected_acked_and_the_next_event_is_applied(nats_url, database_url, serve):
    chaos.prepare_database(database_url, {"vm-1": "vm", "vm-2": "vm"})
    svc = serve(nats_url, database_url)
    first = pub_frame(b"dcm.vm", chaos.event_body("vm", "vm-1", "RUNNING", chaos.T0))
    publish_frames(nats_url, [*UNREADABLE, first])
    wait_for(lambda: consumer_state(nats_url)["last_seq"] == len(UNREADABLE) + 1, "the stream stored every frame", 30)
    wait_for(lambda: database_state(database_url)["vm-1"][0] == "RUNNING", "the event after the frames applied", 30)
    wait_for(lambda: all_acked(nats_url), "every frame acknowledged", 30)
    assert svc.health()[0] == 200
    assert svc.metric("dcmstatus_events_rejected_total", 'reason="invalid_envelope"') == len(UNREADABLE)
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT reason, subject, detail FROM rejected_events ORDER BY stream_seq").fetchall()
    assert [r[0] for r in rows] == ["invalid_envelope"] * len(UNREADABLE)
    assert [r[1] for r in rows[:2]] == ["dcm.vm\\xff", "dcm.\\xc3("]
    assert all(r[2].startswith("unreadable frame: ") for r in rows), rows

    # And again, with the service well past them: intake still goes on.
    publish_frames(nats_url, [*UNREADABLE, pub_frame(b"dcm.vm", chaos.event_body("vm", "vm-2", "FAILED", chaos.T0))])
    wait_for(lambda: database_state(database_url)["vm-2"][0] == "FAILED", "the next event applied", 30)
    wait_for(lambda: all_acked(nats_url), "every frame acknowledged", 30)
    status, body = svc.health()
    assert status == 200 and "acks" not in body["components"], body
    assert svc.metric("dcmstatus_events_rejected_total", 'reason="invalid_envelope"') == 2 * len(UNREADABLE)
    assert svc.terminate() == 0
