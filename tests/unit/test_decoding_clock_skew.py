"""The clock-skew bound (docs/events.md#time): an event time more than
`max_clock_skew` after the JetStream message time is replaced by the message
time, and the update says so (`claimed_time`)."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dcmstatus.core.decoding import MAX_CLOCK_SKEW, Decoder
from dcmstatus.core.model import UNKNOWN_STATUS, Rejection, StatusUpdate

STREAM_NS = 1_786_000_000_123_456_789  # 2026-08-06T07:06:40.123456789Z
STREAM_TIME = datetime(2026, 8, 6, 7, 6, 40, 123456, tzinfo=UTC)  # microseconds, as stored
FAR_FUTURE = datetime(2999, 1, 1, tzinfo=UTC)

DECODER = Decoder(max_clock_skew=300)


def body(time: str | None = "2999-01-01T00:00:00Z", timestamp: str | None = None, status: str = "RUNNING") -> bytes:
    data = {"id": "vm-1", "status": status}
    if timestamp is not None:
        data["timestamp"] = timestamp
    event = {"specversion": "1.0", "id": "e-1", "source": "dcm/providers/test-sp", "type": "dcm.status.vm", "data": data}
    if time is not None:
        event["time"] = time
    return json.dumps(event).encode()


def decode(payload: bytes, decoder: Decoder = DECODER, headers=None) -> StatusUpdate:
    result = decoder.decode("dcm.vm", headers, payload, 7, STREAM_NS)
    assert isinstance(result, StatusUpdate), result
    return result


def test_the_stream_time_of_these_tests():
    assert Decoder().decode("dcm.vm", None, body(time=None), 7, STREAM_NS).event_time == STREAM_TIME


def test_a_time_in_2999_is_replaced_by_the_stream_time():
    update = decode(body())
    assert update.event_time == STREAM_TIME
    assert update.claimed_time == FAR_FUTURE
    assert update.order_key() == (STREAM_TIME, 7)


def test_a_data_timestamp_in_the_future_is_replaced_too():
    update = decode(body(time=None, timestamp="2999-01-01T02:00:00+02:00"))
    assert (update.event_time, update.claimed_time) == (STREAM_TIME, FAR_FUTURE)


def test_a_binary_mode_time_in_the_future_is_replaced_too():
    headers = {
        "ce-specversion": "1.0", "ce-id": "e-1", "ce-source": "sp", "ce-type": "dcm.status.vm",
        "ce-time": "2999-01-01T00:00:00Z",
    }  # fmt: skip
    update = decode(b'{"id": "vm-1", "status": "RUNNING"}', headers=headers)
    assert (update.event_time, update.claimed_time) == (STREAM_TIME, FAR_FUTURE)


@pytest.mark.parametrize(
    "time",
    [
        "2026-08-06T07:11:40.123455Z",  # 1 µs inside the bound
        "2026-08-06T07:07:40Z",  # a minute ahead
        "2026-08-06T07:06:40.123456Z",  # the stream time itself
        "2026-04-09T13:08:32Z",  # in the past, however far
        "1999-01-01T00:00:00Z",
    ],
)
def test_a_time_inside_the_bound_is_kept(time):
    update = decode(body(time=time))
    assert update.event_time == datetime.fromisoformat(time)
    assert update.claimed_time is None


def test_exactly_at_the_bound_is_kept_one_microsecond_more_is_replaced():
    at_bound = STREAM_TIME + timedelta(seconds=300)
    assert at_bound.isoformat() == "2026-08-06T07:11:40.123456+00:00"
    kept = decode(body(time="2026-08-06T07:11:40.123456Z"))
    assert (kept.event_time, kept.claimed_time) == (at_bound, None)
    replaced = decode(body(time="2026-08-06T07:11:40.123457Z"))
    assert (replaced.event_time, replaced.claimed_time) == (STREAM_TIME, at_bound + timedelta(microseconds=1))


def test_an_event_without_time_gets_the_stream_time_and_no_claim():
    update = decode(body(time=None))
    assert (update.event_time, update.claimed_time) == (STREAM_TIME, None)


def test_a_fractional_bound():
    decoder = Decoder(max_clock_skew=0.5)
    assert decode(body(time="2026-08-06T07:06:40.623456Z"), decoder).claimed_time is None
    assert decode(body(time="2026-08-06T07:06:40.623457Z"), decoder).event_time == STREAM_TIME


def test_the_bound_does_not_change_a_rejection():
    result = DECODER.decode("dcm.vm", None, body(status="FLYING"), 7, STREAM_NS)
    assert isinstance(result, Rejection) and result.reason == UNKNOWN_STATUS


def test_without_a_bound_the_claimed_time_is_used():
    # The Decoder's own default; the service always passes --max-clock-skew.
    update = decode(body(), Decoder())
    assert (update.event_time, update.claimed_time) == (FAR_FUTURE, None)


@pytest.mark.parametrize("skew", [0, -1, -0.001, math.nan, math.inf, MAX_CLOCK_SKEW + 1])
def test_an_invalid_bound_is_refused(skew):
    with pytest.raises(ValueError, match="max_clock_skew must be more than 0"):
        Decoder(max_clock_skew=skew)


def test_the_largest_bound():
    decoder = Decoder(max_clock_skew=MAX_CLOCK_SKEW)
    assert decode(body(time="2026-08-07T07:06:40.123456Z"), decoder).claimed_time is None
    assert decode(body(time="9999-12-31T23:59:59Z"), decoder).event_time == STREAM_TIME


def test_the_bound_follows_the_stream_time_back_and_forth():
    # The decoder caches the bound per second of stream time; redeliveries
    # bring older stream times back, and each message gets its own bound.
    decoder = Decoder(max_clock_skew=300)
    payload = body(time="2026-08-06T07:11:40.5Z")  # 300.376544 s after STREAM_TIME
    for stream_ns, replaced in [
        (STREAM_NS + 10 * 10**9, False),
        (STREAM_NS, True),
        (STREAM_NS + 10**9 // 2, False),  # .623456: the same second, a later bound
        (STREAM_NS, True),
        (STREAM_NS - 3600 * 10**9, True),
        (STREAM_NS + 10 * 10**9, False),
    ]:
        update = decoder.decode("dcm.vm", None, payload, 7, stream_ns)
        assert isinstance(update, StatusUpdate)
        assert (update.claimed_time is not None) is replaced, stream_ns


SHARED = Decoder(max_clock_skew=300)  # one decoder across examples: its cached bound sees every order


@settings(max_examples=500, deadline=None)
@given(
    st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)),
    st.integers(min_value=-400 * 10**9, max_value=400 * 10**9),
)
def test_the_bound_against_a_plain_reference(event_time, offset_ns):
    stream_ns = int((event_time - datetime(1970, 1, 1, tzinfo=UTC)).total_seconds()) * 10**9 + offset_ns
    stream_time = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=stream_ns // 1000)
    update = SHARED.decode("dcm.vm", None, body(time=event_time.isoformat()), 7, stream_ns)
    assert isinstance(update, StatusUpdate)
    if event_time - stream_time > timedelta(seconds=300):
        assert (update.event_time, update.claimed_time) == (stream_time, event_time)
    else:
        assert (update.event_time, update.claimed_time) == (event_time, None)
