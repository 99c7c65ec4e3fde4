"""Property-based tests of the decoder beyond tests/unit/test_decoding.py:

- any valid status event built with the official CloudEvents SDK (structured
  mode, and binary mode through the SDK's ce-* header binding) is accepted,
  and decodes to exactly what was put in;
- any headers (any names, any values, any case) with any body never raise;
- the one-pass decode of valid structured events decides exactly as the
  careful decode, whatever the body.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import msgspec
import pytest
from cloudevents.core.bindings import http as ce_binding
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dcmstatus.core import decoding
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


# -- the one-pass decode of valid structured events agrees with the careful one

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64) | st.floats(allow_nan=False) | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=6,
)
# Per member, the values that sit on a rule's edge; then anything.
ODD: dict[str, list[object]] = {
    "specversion": ["0.3", "1.0 ", "", 1.0, None],
    "id": ["", 1, None, ["e"]],
    "source": ["", "a\x00b", 1, None],
    "type": ["", 0, None],
    "subject": ["", "bad id", "vm-2", 5, None],
    "time": ["", "2026-01-01T00:00:00", "2026-01-01T01:00:00+01:00", "2026-13-01T00:00:00Z", "9999-12-31T23:59:59-23:59",
             "2026-01-01 00:00:00z", 0, None],
    "datacontenttype": ["", "text/plain", "application/x+json", "APPLICATION/JSON; x=1", 1, None],
    "dataschema": ["", "https://s", 1, None],
    "data_base64": ["eyJpZCI6InZtLTEiLCJzdGF0dXMiOiJSVU5OSU5HIn0=", "!!", "", 1, None],
    "extension": ["x", None],
    "data.id": ["", "bad id", "vm-2", 1, None, "a" * 254],
    "data.status": ["running ", "RUNNING", "FLYING", "", 1, None],
    "data.message": ["", "a\x00b", 1, None, ["x"]],
    "data.timestamp": ["", "2026-01-01T00:00:00", "2026-01-02T00:00:00Z", 1, None],
    "data.output_spec": [[], "x", None, {"a": "\x00"}, {"n": 1e308}, {"n": 10**400}],
}
@st.composite
def structured_bodies(draw):
    """Structured-mode bodies near the valid ones: each member may be absent,
    null, of another type, empty or odd; some bytes may be cut or repeated."""
    envelope = {"specversion": "1.0", "id": "e-1", "source": "kubevirt", "type": "dcm.status.vm",
                "time": "2026-01-01T00:00:00Z", "subject": "dcm.vm", "datacontenttype": "application/json"}  # fmt: skip
    data = {"id": "vm-1", "status": "Running", "message": "up", "timestamp": "2026-01-01T00:00:01Z",
            "output_spec": {"cidr": "10.0.0.0/24"}}  # fmt: skip
    # One or two changes each, so that many bodies stay valid or nearly so.
    for _ in range(draw(st.integers(0, 2))):
        name = draw(st.sampled_from(sorted(ODD)))
        target, key = (data, name[5:]) if name.startswith("data.") else (envelope, name)
        if draw(st.integers(0, 3)) == 0:
            target.pop(key, None)
        else:
            odd = draw(st.integers(0, 4)) > 0
            target[key] = draw(st.sampled_from(ODD[name]) if odd else json_values)
    envelope["data"] = draw(st.sampled_from([data] * 8 + [None, [data], "text", {}]))
    if draw(st.integers(0, 9)) == 0:
        envelope.pop("data")
    body = json.dumps(envelope, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    if draw(st.integers(0, 9)) == 0:
        where = draw(st.integers(0, len(body)))
        body = body[:where] + draw(st.sampled_from([b"", b"}", b",", b'"', b"\xff", b"\\u0000"])) + body[where + 1 :]
    return body


@settings(SETTINGS, max_examples=1000)
@given(st.sampled_from(["dcm.vm", "dcm.network", "dcm.cluster"]), structured_bodies(), st.integers(0, 2**62))
def test_the_one_pass_decode_and_the_careful_decode_agree(monkeypatch_module, subject, body, stream_ns):
    """Whatever the body, the decoder decides exactly as it does with its
    one-pass shortcut (_ValidEnvelope) turned off: the shortcut can accept
    nothing the careful rules reject, and changes no value."""
    decoder = Decoder(CATALOG, max_clock_skew=300)
    fast = decoder.decode(subject, None, body, 7, stream_ns)
    with monkeypatch_module.context() as patch:
        patch.setattr(decoding, "_decode_valid", _refuse)
        careful = decoder.decode(subject, None, body, 7, stream_ns)
    assert fast == careful


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def _one_change(name: str, value: object) -> bytes:
    envelope: dict = {"specversion": "1.0", "id": "e-1", "source": "kubevirt", "type": "dcm.status.vm",
                      "time": "2026-01-01T00:00:00Z", "subject": "dcm.vm", "datacontenttype": "application/json",
                      "data": {"id": "vm-1", "status": "Running", "message": "up"}}  # fmt: skip
    target, key = (envelope["data"], name[5:]) if name.startswith("data.") else (envelope, name)
    if value is _ABSENT:
        target.pop(key, None)
    else:
        target[key] = value
    return json.dumps(envelope).encode()


_ABSENT = object()


@pytest.mark.parametrize(
    ("name", "value"), [(name, value) for name, values in ODD.items() for value in [*values, _ABSENT]]
)
def test_each_edge_decides_the_same_with_and_without_the_one_pass_decode(monkeypatch, name, value):
    """Every value on a rule's edge, one member at a time (the property test
    above mixes them, but meets a given one rarely)."""
    body = _one_change(name, value)
    decoder = Decoder(CATALOG, max_clock_skew=300)
    fast = decoder.decode("dcm.vm", None, body, 7, 0)
    monkeypatch.setattr(decoding, "_decode_valid", _refuse)
    assert fast == decoder.decode("dcm.vm", None, body, 7, 0)


def _refuse(body: bytes) -> None:
    raise msgspec.ValidationError("the shortcut is off")


def test_the_one_pass_decode_takes_the_providers_events():
    """The shortcut is the common path: a known provider's event fits it."""
    body = json.dumps({"specversion": "1.0", "id": "e", "source": "kubevirt.localhost", "type": "dcm.status.vm",
                       "subject": "dcm.vm", "datacontenttype": "application/json", "time": "2026-01-01T00:00:00Z",
                       "data": {"id": "vm-1", "status": "Running", "timestamp": "2026-01-01T00:00:00Z"}}).encode()  # fmt: skip
    assert isinstance(decoding._decode_valid(body), decoding._ValidEnvelope)
    assert isinstance(DECODER.decode("dcm.vm", None, body, 1, 0), StatusUpdate)
