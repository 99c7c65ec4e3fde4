"""`dcmstatus watch`'s reconnect loop (dcmstatus/cli/watch.py) with a scripted
client: where each connection resumes, the capped back-off, and which answers
end it. The real stream is tested in tests/integration/test_watch_service.py."""

import io

import pytest

from dcmstatus.cli.watch import BACKOFF_SECONDS, change_line, follow
from dcmstatus.core.errors import ApiError


def change(change_id, instance="vm1", previous="PROVISIONING", status="RUNNING", message="up"):
    return {
        "change_id": change_id, "kind": "changed", "instance_id": instance, "service_type": "vm",
        "previous_status": previous, "status": status, "status_message": message, "outputs": None,
        "provider_name": "", "event_time": None, "commit_time": "2026-12-01T10:00:00Z",
    }  # fmt: skip


class ScriptedClient:
    """Each connection plays the next script: frames, then an error (or the end)."""

    def __init__(self, *scripts):
        self.scripts = list(scripts)
        self.connections = []

    def events(self, path, query, last_event_id, read_timeout):
        self.connections.append((query, last_event_id))
        frames, error = self.scripts.pop(0)
        yield from frames
        if error is not None:
            raise error


class Stop(Exception):
    pass


def run(client, after=None, max_sleeps=10):
    out, err, sleeps = io.StringIO(), io.StringIO(), []

    def sleep(seconds):
        sleeps.append(seconds)
        if len(sleeps) >= max_sleeps:
            raise Stop

    with pytest.raises((Stop, ApiError)) as raised:
        follow(client, {"service_type": "vm"}, after, as_json=False, out=out, err=err, sleep=sleep)
    return raised.value, out.getvalue().splitlines(), err.getvalue(), sleeps


def test_resumes_from_the_last_id_received_and_stops_at_an_answer_retrying_cannot_change():
    client = ScriptedClient(
        ([(5, None), (6, change(6))], ApiError("lost the stream")),  # network trouble
        ([(6, None)], None),  # the server ended the stream (shutdown) right after the position
        ([(6, None), (7, change(7, status=None, message=""))], ApiError("the bearer token is wrong", 401)),
    )
    error, lines, err, sleeps = run(client)
    assert isinstance(error, ApiError) and error.status == 401
    assert [last for _, last in client.connections] == [None, 6, 6]
    assert all(query == {"service_type": "vm", "after": None} for query, _ in client.connections)
    assert lines == [
        "2026-12-01T10:00:00Z  vm1  vm  PROVISIONING → RUNNING  up",
        "2026-12-01T10:00:00Z  vm1  vm  PROVISIONING → (deleted)",
    ]
    assert sleeps == [BACKOFF_SECONDS[0], BACKOFF_SECONDS[0]]  # each reconnect succeeded: no growth
    assert "lost the stream; reconnecting in 0.5s" in err and "the server ended the stream" in err


def test_back_off_grows_to_its_cap_while_the_service_stays_away():
    client = ScriptedClient(*[([], ApiError("too many open watch streams", 503))] * 8)
    error, lines, _, sleeps = run(client, after=41, max_sleeps=8)
    assert isinstance(error, Stop) and lines == []
    assert sleeps == [*BACKOFF_SECONDS, BACKOFF_SECONDS[-1], BACKOFF_SECONDS[-1], BACKOFF_SECONDS[-1]]
    assert {last for _, last in client.connections} == {41}  # --after until something arrives


def test_a_line_squeezes_the_message_onto_one_line():
    assert change_line(change(1, previous=None, status="PROVISIONING", message="a\nb  c")) == (
        "2026-12-01T10:00:00Z  vm1  vm  - → PROVISIONING  a b c"
    )
