"""Property-based tests of the decoder beyond tests/unit/test_decoding.py:

- any valid status event built with the official CloudEvents SDK (structured
  mode, and binary mode through the SDK's ce-* header binding) is accepted,
  and decodes to exactly what was put in;
- any headers (any names, any values, any case) with any body never raise.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from cloudevents.core.bindings import http as ce_binding
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dcmstatus.core.catalog import Catalog
from dcmstatus.core.decoding import MAX_INSTANCE_ID_LENGTH, Decoder
from dcmstatus.core.model import REJECTION_REASONS, Rejection, StatusUpdate

CATALOG = Catalog.default()
DECODER = Decoder(CATALOG)
FORMAT = JSONFormat()
UTC = UTC
SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

instance_ids = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._:-",
    min_size=1,
    max_size=MAX_INSTANCE_ID_LENGTH,
)
# Anything printable that a text column stores: no NUL, no lone surrogates.
texts = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=200)
nonempty_texts = texts.filter(bool)
times = st.datetimes(
    min_value=datetime(1971, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
)


@st.composite
def status_events(draw):
    """(service type, reported status, canonical status, attributes, data)."""
    service_type = draw(st.sampled_from(CATALOG.service_types()))
    lookup = CATALOG.status_lookup(service_type)
    reported = draw(st.sampled_from(sorted(lookup)))
    # Providers mix cases and pad: matched case-insensitively, trimmed.
    reported = draw(st.sampled_from([reported, reported.upper(), reported.title(), f"  {reported} "]))
    attributes = {
        "id": draw(nonempty_texts),
        "source": draw(nonempty_texts),
        "type": f"dcm.status.{service_type}",
        "time": draw(times),
        "datacontenttype": draw(st.sampled_from(["application/json", "application/json; charset=utf-8", "text/json", "application/cloudevents-x+json"])),
    }
    if draw(st.booleans()):
        attributes["subject"] = f"dcm.{service_type}"
    data = {"id": draw(instance_ids), "status": reported}
    if draw(st.booleans()):
        data["message"] = draw(texts)
    if draw(st.booleans()):
        data["output_spec"] = draw(st.dictionaries(texts, texts | st.integers(-(2**53), 2**53) | st.booleans(), max_size=4))
    return service_type, lookup[reported.strip().lower()], attributes, data


def _check(update, service_type, canonical, attributes, data, seq):
    assert isinstance(update, StatusUpdate), update
    assert update.service_type == service_type
    assert update.instance_id == data["id"]
    assert update.status == canonical
    assert update.message == data.get("message", "")
    assert update.provider == attributes["source"]
    assert update.event_time == attributes["time"]
    assert update.stream_seq == seq
    if "output_spec" in data:
        assert update.outputs is not None


@SETTINGS
@given(status_events(), st.integers(1, 2**63 - 1))
def test_sdk_structured_events_are_always_accepted(case, seq):
    service_type, canonical, attributes, data = case
    body = FORMAT.write(CloudEvent(dict(attributes), data))
    update = DECODER.decode(f"dcm.{service_type}", None, body, seq, 0)
    _check(update, service_type, canonical, attributes, data, seq)


@SETTINGS
@given(status_events(), st.integers(1, 2**63 - 1), st.booleans())
def test_sdk_binary_mode_events_are_always_accepted(case, seq, shout):
    service_type, canonical, attributes, data = case
    message = ce_binding.to_binary(CloudEvent(dict(attributes), data), FORMAT)
    headers = dict(message.headers)
    if shout:  # header names are case-insensitive
        headers = {k.upper(): v for k, v in headers.items()}
    update = DECODER.decode(f"dcm.{service_type}", headers, message.body, seq, 0)
    _check(update, service_type, canonical, attributes, data, seq)


header_names = st.one_of(
    st.sampled_from(["ce-specversion", "ce-id", "ce-source", "ce-type", "ce-time", "ce-subject",
                     "ce-datacontenttype", "Content-Type", "content-type", "CE-SPECVERSION", "Status", "Nats-Msg-Id"]),
    st.text(max_size=20),
)  # fmt: skip
header_values = st.one_of(
    st.sampled_from(["1.0", "0.3", "", "%", "%zz", "%C3%28", "application/cloudevents+json", "application/json",
                     "text/plain", "2026-01-01T00:00:00Z", "not a time"]),
    st.text(max_size=40),
)  # fmt: skip
bodies = st.one_of(
    st.binary(max_size=300),
    st.sampled_from([b"", b"{}", b"[]", b"null", b'{"id":"a","status":"RUNNING"}', b'{"specversion":"1.0"}']),
)


@SETTINGS
@given(
    st.sampled_from(["dcm.vm", "dcm.cluster", "dcm.toaster", "dcm.", "", "dcm.vm.extra"]),
    st.none() | st.dictionaries(header_names, header_values, max_size=8),
    bodies,
)
def test_any_headers_and_bytes_never_raise(subject, headers, body):
    result = DECODER.decode(subject, headers, body, 1, 0)
    assert isinstance(result, (StatusUpdate, Rejection))
    if isinstance(result, Rejection):
        assert result.reason in REJECTION_REASONS
        assert len(result.body) <= 4096


@SETTINGS
@given(status_events(), st.binary(min_size=1, max_size=8), st.integers(0, 10_000))
def test_sdk_events_with_trailing_or_inserted_garbage_never_raise(case, garbage, where):
    service_type, _, attributes, data = case
    body = FORMAT.write(CloudEvent(dict(attributes), data))
    where = where % (len(body) + 1)
    mangled = body[:where] + garbage + body[where:]
    result = DECODER.decode(f"dcm.{service_type}", None, mangled, 1, 0)
    assert isinstance(result, (StatusUpdate, Rejection))


def test_time_within_a_second_keeps_order():
    """Sub-second SDK times keep their order after decoding (the ordering guard relies on it)."""
    t0 = datetime(2026, 4, 9, 13, 8, 32, tzinfo=UTC)
    previous = None
    for micro in (0, 1, 999_999):
        attributes = {"id": "e", "source": "s", "type": "t", "time": t0 + timedelta(microseconds=micro)}
        body = FORMAT.write(CloudEvent(attributes, {"id": "a", "status": "RUNNING"}))
        update = DECODER.decode("dcm.vm", None, body, 1, 0)
        assert previous is None or update.event_time > previous
        previous = update.event_time
