"""Event decoding (docs/events.md): publishers' real bodies, the CloudEvents rules,
the mapping to an update, every rejection reason, and hostile input."""

from __future__ import annotations

import base64
import json
import random
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dcmstatus.core.model as model
from dcmstatus.core.catalog import Catalog
from dcmstatus.core.cloudevents import is_json_media_type
from dcmstatus.core.decoding import DEFAULT_MAX_EVENT_BYTES, Decoder
from dcmstatus.core.model import DEAD_LETTER_BODY_BYTES, Rejection, StatusUpdate

UTC = UTC
STREAM_NS = 1_786_000_000_123_456_789  # the JetStream message time used by default
STREAM_TIME = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=STREAM_NS // 1000)
SEQ = 42

DECODER = Decoder()


def decode(body, subject="dcm.vm", headers=None, *, seq=SEQ, time_ns=STREAM_NS, decoder=DECODER):
    return decoder.decode(subject, headers, body, seq, time_ns)


def accepted(*args, **kwargs) -> StatusUpdate:
    result = decode(*args, **kwargs)
    assert isinstance(result, StatusUpdate), result
    return result


def rejected(*args, **kwargs) -> Rejection:
    result = decode(*args, **kwargs)
    assert isinstance(result, Rejection), result
    assert result.reason in model.REJECTION_REASONS
    return result


DROP = object()  # marks an attribute / data member to leave out
DEFAULT = object()


def event(data=DEFAULT, **attrs) -> bytes:
    """A structured-mode vm event; `attrs` override or DROP attributes.

    `data=None` gives JSON null; non-ASCII text is written as raw UTF-8.
    """
    envelope = {
        "specversion": "1.0",
        "id": "e-1",
        "source": "dcm/providers/test-sp",
        "type": "dcm.status.vm",
        "subject": "dcm.vm",
        "datacontenttype": "application/json",
        "time": "2026-05-01T10:00:00Z",
        "data": {"id": "vm-1", "status": "RUNNING", "message": "ok"} if data is DEFAULT else data,
    }
    if data is DROP:
        del envelope["data"]
    for key, value in attrs.items():
        if value is DROP:
            envelope.pop(key, None)
        else:
            envelope[key] = value
    return json.dumps(envelope, ensure_ascii=False).encode()


def data(**members) -> dict:
    """An event's data; `members` override or DROP the defaults."""
    result = {"id": "vm-1", "status": "RUNNING", "message": "ok"}
    for key, value in members.items():
        if value is DROP:
            result.pop(key, None)
        else:
            result[key] = value
    return result


def binary_headers(**attrs) -> dict[str, str]:
    headers = {
        "ce-specversion": "1.0",
        "ce-id": "e-1",
        "ce-source": "dcm/providers/test-sp",
        "ce-type": "dcm.status.vm",
        "ce-time": "2026-05-01T10:00:00Z",
        "content-type": "application/json",
    }
    for key, value in attrs.items():
        key = key.replace("_", "-")
        if value is DROP:
            headers.pop(key, None)
        else:
            headers[key] = value
    return headers


# --------------------------------------------------------------------------
# Bodies as today's providers publish them, byte for byte (kubevirt's is the
# example in docs/events.md#mapping).

KUBEVIRT = b'{"specversion":"1.0","id":"3f0c9b52-6a51-4c1e-9d0e-2b8f2f5d7a11","source":"kubevirt.localhost","type":"dcm.status.vm","subject":"dcm.vm","datacontenttype":"application/json","time":"2026-04-09T13:08:32.123456789Z","data":{"id":"6c1e7f0a-2a4b-4b8e-9f3d-0d2c5e9a1b77","status":"Running","timestamp":"2026-04-09T13:08:32.123456789Z"}}'
STORAGE = b'{"specversion":"1.0","id":"8a2d4e6f-1b3c-4d5e-8f90-a1b2c3d4e5f6","source":"dcm/providers/k8s-storage-sp","type":"dcm.status.storage","subject":"dcm.storage","datacontenttype":"application/json","time":"2026-08-18T16:18:57.418203114Z","data":{"id":"abc-123","status":"RUNNING","message":"PVC is bound to volume pvc-9f1e2d3c"}}'
ACM = b'{"specversion":"1.0","id":"5b6c7d8e-9f01-4a2b-8c3d-4e5f6a7b8c9d","source":"dcm/providers/acm-cluster-sp","type":"dcm.status.cluster","time":"2026-04-22T18:21:57Z","subject":"dcm.cluster","datacontenttype":"application/json","data":{"id":"c1d2e3f4-0000-4000-8000-000000000001","status":"READY","message":""}}'
OSAC = b'{"specversion":"1.0","id":"2c3d4e5f-6a7b-4c8d-9e0f-1a2b3c4d5e6f","source":"dcm/providers/osac-sp-cluster","type":"dcm.status.cluster","subject":"dcm.cluster","datacontenttype":"application/json","time":"2026-08-20T19:44:12.90871Z","data":{"id":"c1d2e3f4-0000-4000-8000-000000000002","status":"ACTIVE","message":"cluster is active"}}'
THREE_TIER = b'{"specversion":"1.0","id":"7e8f9a0b-1c2d-4e3f-8a4b-5c6d7e8f9a0b","source":"dcm/providers/three-tier-provider","type":"dcm.status.container","time":"2026-04-30T15:16:24Z","datacontenttype":"application/json","data":{"id":"d4e5f6a7-0000-4000-8000-000000000003","status":"RUNNING","message":"3-tier app running"}}'
# Go SDK style: specversion last, <>& escaped as \u003c \u003e \u0026.
GO_SDK = b'{"data":{"id":"net-7","message":"gateway \\u003cnone\\u003e \\u0026 no routes","status":"ready"},"datacontenttype":"application/json","id":"9d8c7b6a","source":"dcm/providers/net-sp","subject":"dcm.network","time":"2026-06-01T08:00:00.5Z","type":"dcm.status.network","specversion":"1.0"}'


def _t(text: str) -> datetime:
    return datetime.fromisoformat(text)


PUBLISHER_EXAMPLES = [
    pytest.param(
        "dcm.vm",
        KUBEVIRT,
        StatusUpdate(
            instance_id="6c1e7f0a-2a4b-4b8e-9f3d-0d2c5e9a1b77",
            service_type="vm",
            status="RUNNING",
            message="",
            provider="kubevirt.localhost",
            outputs=None,
            # Nanoseconds are rounded to the microsecond by msgspec's parser.
            event_time=_t("2026-04-09T13:08:32.123457+00:00"),
            stream_seq=SEQ,
        ),
        id="kubevirt",
    ),
    pytest.param(
        "dcm.storage",
        STORAGE,
        StatusUpdate(
            "abc-123",
            "storage",
            "RUNNING",
            "PVC is bound to volume pvc-9f1e2d3c",
            "dcm/providers/k8s-storage-sp",
            None,
            _t("2026-08-18T16:18:57.418203+00:00"),
            SEQ,
        ),
        id="k8s-storage",
    ),
    pytest.param(
        "dcm.cluster",
        ACM,
        StatusUpdate(
            "c1d2e3f4-0000-4000-8000-000000000001",
            "cluster",
            "ACTIVE",  # READY through the default alias
            "",
            "dcm/providers/acm-cluster-sp",
            None,
            _t("2026-04-22T18:21:57+00:00"),
            SEQ,
        ),
        id="acm",
    ),
    pytest.param(
        "dcm.cluster",
        OSAC,
        StatusUpdate(
            "c1d2e3f4-0000-4000-8000-000000000002",
            "cluster",
            "ACTIVE",
            "cluster is active",
            "dcm/providers/osac-sp-cluster",
            None,
            _t("2026-08-20T19:44:12.908710+00:00"),
            SEQ,
        ),
        id="osac",
    ),
    pytest.param(
        "dcm.container",
        THREE_TIER,
        StatusUpdate(
            "d4e5f6a7-0000-4000-8000-000000000003",
            "container",
            "RUNNING",
            "3-tier app running",
            "dcm/providers/three-tier-provider",
            None,
            _t("2026-04-30T15:16:24+00:00"),
            SEQ,
        ),
        id="three-tier-no-subject",
    ),
    pytest.param(
        "dcm.network",
        GO_SDK,
        StatusUpdate(
            "net-7",
            "network",
            "READY",
            "gateway <none> & no routes",
            "dcm/providers/net-sp",
            None,
            _t("2026-06-01T08:00:00.500000+00:00"),
            SEQ,
        ),
        id="go-sdk-escapes",
    ),
]


@pytest.mark.parametrize(("subject", "body", "expected"), PUBLISHER_EXAMPLES)
def test_publisher_examples(subject, body, expected):
    result = accepted(body, subject)
    assert result == expected
    assert result.event_time.tzinfo is UTC


@pytest.mark.parametrize(("subject", "body", "expected"), PUBLISHER_EXAMPLES)
def test_publisher_examples_with_jetstream_headers(subject, body, expected):
    # JetStream publishers may add their own headers; they do not change the mode.
    headers = {"Nats-Msg-Id": "abc", "Nats-Expected-Stream": "dcm-status"}
    assert accepted(body, subject, headers) == expected


# --------------------------------------------------------------------------
# Statuses and aliases.


@pytest.mark.parametrize(
    ("service_type", "reported", "stored"),
    [
        ("vm", "Pending", "PROVISIONING"),
        ("vm", "Scheduling", "PROVISIONING"),
        ("vm", "Scheduled", "PROVISIONING"),
        ("vm", "Succeeded", "STOPPED"),
        ("vm", "Terminating", "DELETING"),
        ("cluster", "PENDING", "PROGRESSING"),
        ("cluster", "PROVISIONING", "PROGRESSING"),
        ("cluster", "READY", "ACTIVE"),
        # Case-insensitive and trimmed, for aliases and canonical names alike.
        ("vm", "  pENDING ", "PROVISIONING"),
        ("cluster", "ready", "ACTIVE"),
        ("vm", "Running", "RUNNING"),
        ("vm", "failed", "FAILED"),
        ("vm", "\tstopped\n", "STOPPED"),
    ],
)
def test_status_aliases(service_type, reported, stored):
    body = event(data(status=reported))
    assert accepted(body, f"dcm.{service_type}").status == stored


@pytest.mark.parametrize(
    ("service_type", "status"),
    [(name, status) for name in Catalog.default().service_types() for status in Catalog.default().statuses(name)],
)
def test_every_canonical_status(service_type, status):
    assert accepted(event(data(status=status)), f"dcm.{service_type}").status == status


@pytest.mark.parametrize(
    ("service_type", "status"),
    [
        ("vm", "Exploded"),
        ("vm", "Unknown"),  # a KubeVirt phase with no vm status and no default alias
        ("vm", "READY"),  # a network status, not a vm one
        ("network", "RUNNING"),
        ("cluster", ""),
        ("cluster", "   "),
        ("vm", "RUNNING\x00"),
    ],
)
def test_unknown_status(service_type, status):
    result = rejected(event(data(status=status)), f"dcm.{service_type}")
    assert result.reason == model.UNKNOWN_STATUS
    assert result.instance_id == "vm-1"
    assert result.service_type == service_type


def test_unknown_status_detail_names_status_and_type():
    result = rejected(event(data(status="Exploded")), "dcm.vm")
    assert result.detail == "status 'Exploded' is not a vm status"


def test_operator_added_type_and_alias():
    catalog = Catalog.default().merged(
        {
            "three_tier_app": {"statuses": ["PENDING", "RUNNING"]},
            "vm": {"aliases": {"Migrating": "RUNNING"}},
        }
    )
    decoder = Decoder(catalog)
    assert accepted(event(data(status="pending")), "dcm.three_tier_app", decoder=decoder).status == "PENDING"
    assert accepted(event(data(status="Migrating")), "dcm.vm", decoder=decoder).status == "RUNNING"
    # The default decoder knows neither.
    assert rejected(event(), "dcm.three_tier_app").reason == model.UNKNOWN_SERVICE_TYPE
    assert rejected(event(data(status="Migrating"))).reason == model.UNKNOWN_STATUS


# --------------------------------------------------------------------------
# The mapping: instance id, message, provider, outputs, event time.


def test_instance_id_from_data_id_even_when_subject_is_set():
    result = accepted(event(data(id="vm-9"), subject="dcm.vm"))
    assert result.instance_id == "vm-9"


@pytest.mark.parametrize("absent", [DROP, None], ids=["absent", "null"])
def test_instance_id_falls_back_to_ce_subject(absent):
    result = accepted(event(data(id=absent), subject="inst-77"))
    assert result.instance_id == "inst-77"


def test_instance_id_does_not_fall_back_when_data_id_is_invalid():
    result = rejected(event(data(id=""), subject="inst-77"))
    assert result.reason == model.INVALID_INSTANCE_ID


@pytest.mark.parametrize(
    "instance_id",
    ["a", "A.b_c:d-e", "6c1e7f0a-2a4b-4b8e-9f3d-0d2c5e9a1b77", "x" * 253, "---", "ns:name.1"],
)
def test_valid_instance_ids(instance_id):
    assert accepted(event(data(id=instance_id))).instance_id == instance_id


@pytest.mark.parametrize(
    "instance_id",
    ["", "x" * 254, "has space", "a/b", "ä", "a\nb", "a\x00b", 7, 1.5, True, ["a"], {"id": "a"}],
)
def test_invalid_instance_ids(instance_id):
    result = rejected(event(data(id=instance_id)))
    assert result.reason == model.INVALID_INSTANCE_ID
    assert result.instance_id is None
    assert "data.id" in result.detail


def test_invalid_subject_as_instance_id():
    result = rejected(event(data(id=DROP), subject="not an id"))
    assert result.reason == model.INVALID_INSTANCE_ID
    assert "subject" in result.detail


@pytest.mark.parametrize("subject", [DROP, None])
def test_missing_instance_id(subject):
    result = rejected(event(data(id=DROP), subject=subject))
    assert result.reason == model.MISSING_INSTANCE_ID


@pytest.mark.parametrize(("message", "stored"), [(DROP, ""), (None, ""), ("", ""), ("disk full ✓", "disk full ✓")])
def test_message(message, stored):
    assert accepted(event(data(message=message))).message == stored


@pytest.mark.parametrize("message", [1, True, ["a"], {"text": "a"}])
def test_message_not_a_string(message):
    result = rejected(event(data(message=message)))
    assert result.reason == model.INVALID_DATA
    assert result.instance_id == "vm-1"


def test_message_with_nul_is_rejected():
    # PostgreSQL text cannot hold U+0000; rejecting here keeps batches storable.
    result = rejected(event(data(message="a\x00b")))
    assert result.reason == model.INVALID_DATA


@pytest.mark.parametrize("status", [DROP, None, 1, ["RUNNING"], {"phase": "Running"}])
def test_status_missing_or_not_a_string(status):
    result = rejected(event(data(status=status)))
    assert result.reason == model.INVALID_DATA
    assert "data.status" in result.detail


def test_provider_is_ce_source():
    assert accepted(event(source="urn:sp:x")).provider == "urn:sp:x"


def test_source_with_nul_is_rejected():
    assert rejected(event(source="sp\x00")).reason == model.INVALID_ENVELOPE


def test_outputs_keep_the_raw_json_bytes():
    output = b'{ "ip" : "10.0.0.7",\n  "ports":[80, 443], "nested": {"z": 1.50, "a": null}, "s": "\\u003c" }'
    body = (
        b'{"specversion":"1.0","id":"1","source":"s","type":"t","data":'
        b'{"id":"net-1","status":"READY","output_spec":' + output + b"}}"
    )
    result = accepted(body, "dcm.network")
    assert result.outputs == output  # byte for byte: no re-encoding
    assert type(result.outputs) is bytes


@pytest.mark.parametrize("output_spec", [None, [], [{"a": 1}], "x", 3, True, DROP])
def test_outputs_other_than_an_object_are_ignored(output_spec):
    assert accepted(event(data(output_spec=output_spec))).outputs is None


def test_outputs_empty_object():
    assert accepted(event(data(output_spec={}))).outputs == b"{}"


@pytest.mark.parametrize(
    "output",
    [
        b'{"a":"x\\u0000y"}',  # jsonb refuses \u0000
        b'{"k\\u0000":1}',
        b'{"a":1e999}',  # beyond any double
    ],
)
def test_outputs_postgres_cannot_store_are_rejected(output):
    # (An unpaired surrogate escape never gets this far: msgspec rejects it
    # anywhere in the body, see test_body_shape.)
    body = b'{"specversion":"1.0","id":"1","source":"s","type":"t","data":{"id":"n","status":"READY","output_spec":' + output + b"}}"
    result = rejected(body, "dcm.network")
    assert result.reason == model.INVALID_DATA
    assert result.instance_id == "n"


def test_outputs_with_escaped_backslash_before_u0000_are_fine():
    # "\\u0000" is a backslash followed by the text u0000, not a NUL.
    output = b'{"path":"C:\\\\u0000"}'
    body = b'{"specversion":"1.0","id":"1","source":"s","type":"t","data":{"id":"n","status":"READY","output_spec":' + output + b"}}"
    assert accepted(body, "dcm.network").outputs == output


# Event time: CE time, else data.timestamp, else the JetStream message time.


def test_event_time_prefers_ce_time():
    body = event(data(timestamp="2020-01-01T00:00:00Z"), time="2026-05-01T10:00:00Z")
    assert accepted(body).event_time == _t("2026-05-01T10:00:00+00:00")


@pytest.mark.parametrize("time", [DROP, None], ids=["absent", "null"])
def test_event_time_from_data_timestamp_with_local_offset(time):
    body = event(data(timestamp="2026-04-09T15:08:32.123456789+02:00"), time=time)
    result = accepted(body)
    assert result.event_time == _t("2026-04-09T13:08:32.123457+00:00")
    assert result.event_time.tzinfo is UTC


@pytest.mark.parametrize("timestamp", [DROP, None])
def test_event_time_falls_back_to_stream_time(timestamp):
    result = accepted(event(data(timestamp=timestamp), time=DROP))
    assert result.event_time == STREAM_TIME
    assert result.event_time.tzinfo is UTC


def test_ce_time_converted_to_utc():
    result = accepted(event(time="2026-05-01T12:00:00-05:30"))
    assert result.event_time == _t("2026-05-01T17:30:00+00:00")
    assert result.event_time.tzinfo is UTC


@pytest.mark.parametrize(
    "timestamp",
    ["2026-04-09T13:08:32", "yesterday", "", "2026-04-09", "2026-02-30T00:00:00Z", 1712668112, ["x"]],
)
def test_invalid_data_timestamp(timestamp):
    result = rejected(event(data(timestamp=timestamp), time=DROP))
    assert result.reason == model.INVALID_DATA
    assert result.instance_id == "vm-1"


def test_data_timestamp_is_ignored_when_ce_time_is_present():
    assert isinstance(decode(event(data(timestamp="garbage"))), StatusUpdate)


def test_stream_seq_is_passed_through():
    assert accepted(event(), seq=123456789).stream_seq == 123456789


# --------------------------------------------------------------------------
# CloudEvents rules (structured mode).


@pytest.mark.parametrize(
    "attrs",
    [
        pytest.param({"subject": None}, id="null-subject"),
        pytest.param({"subject": DROP}, id="no-subject"),
        pytest.param({"datacontenttype": None}, id="null-datacontenttype"),
        pytest.param({"datacontenttype": DROP}, id="no-datacontenttype"),
        pytest.param({"time": None}, id="null-time"),
        pytest.param({"dataschema": None}, id="null-dataschema"),
        pytest.param({"dataschema": "https://example.com/s.json"}, id="dataschema"),
        pytest.param({"datacontenttype": "application/json; charset=utf-8"}, id="json-with-params"),
        pytest.param({"datacontenttype": "Application/JSON"}, id="json-any-case"),
        pytest.param({"datacontenttype": "application/vnd.foo+json"}, id="suffix-json"),
        pytest.param({"datacontenttype": "text/json"}, id="text-json"),
        pytest.param({"datacontenttype": " application/cloudevents+json ;x=y"}, id="ce-json-spaces"),
        pytest.param({"data_base64": None}, id="null-data_base64"),
        pytest.param({"time": "2026-05-01T10:00:00.123456789Z"}, id="time-nanoseconds"),
        pytest.param({"time": "2026-05-01T10:00:00+02:00"}, id="time-offset"),
        pytest.param({"time": "2026-05-01t10:00:00z"}, id="time-lower-case"),
        pytest.param({"comexampleextension": 5, "traceparent": None}, id="extensions-ignored"),
    ],
)
def test_envelope_accepted(attrs):
    assert isinstance(decode(event(**attrs)), StatusUpdate)


@pytest.mark.parametrize(
    ("attrs", "reason"),
    [
        # specversion
        ({"specversion": DROP}, model.INVALID_ENVELOPE),
        ({"specversion": None}, model.INVALID_ENVELOPE),
        ({"specversion": 1.0}, model.INVALID_ENVELOPE),
        ({"specversion": ""}, model.INVALID_ENVELOPE),
        ({"specversion": "0.3"}, model.UNSUPPORTED_SPECVERSION),
        ({"specversion": "1.0.0"}, model.UNSUPPORTED_SPECVERSION),
        ({"specversion": "2.0"}, model.UNSUPPORTED_SPECVERSION),
        # required attributes
        ({"id": DROP}, model.INVALID_ENVELOPE),
        ({"id": None}, model.INVALID_ENVELOPE),
        ({"id": ""}, model.INVALID_ENVELOPE),
        ({"id": 17}, model.INVALID_ENVELOPE),
        ({"source": DROP}, model.INVALID_ENVELOPE),
        ({"source": ""}, model.INVALID_ENVELOPE),
        ({"source": ["s"]}, model.INVALID_ENVELOPE),
        ({"type": DROP}, model.INVALID_ENVELOPE),
        ({"type": ""}, model.INVALID_ENVELOPE),
        ({"type": False}, model.INVALID_ENVELOPE),
        # optional attributes: non-empty strings when present
        ({"subject": ""}, model.INVALID_ENVELOPE),
        ({"subject": 5}, model.INVALID_ENVELOPE),
        ({"datacontenttype": ""}, model.INVALID_ENVELOPE),
        ({"datacontenttype": {"a": 1}}, model.INVALID_ENVELOPE),
        ({"dataschema": ""}, model.INVALID_ENVELOPE),
        ({"time": ""}, model.INVALID_ENVELOPE),
        ({"time": 1712668112}, model.INVALID_ENVELOPE),
        ({"time": "2026-05-01T10:00:00"}, model.INVALID_ENVELOPE),  # no offset
        ({"time": "2026-05-01"}, model.INVALID_ENVELOPE),
        ({"time": "May 1, 2026"}, model.INVALID_ENVELOPE),
        ({"time": "2026-05-01T25:00:00Z"}, model.INVALID_ENVELOPE),
        ({"time": "0001-01-01T00:00:00+01:00"}, model.INVALID_ENVELOPE),  # before year 1 in UTC
        ({"time": "9999-12-31T23:59:59-23:59"}, model.INVALID_ENVELOPE),  # after year 9999 in UTC
        # data that is not JSON by its content type
        ({"datacontenttype": "text/plain"}, model.INVALID_DATA),
        ({"datacontenttype": "application/xml"}, model.INVALID_DATA),
        ({"datacontenttype": "json"}, model.INVALID_DATA),
        ({"datacontenttype": "application/jsonx"}, model.INVALID_DATA),
        ({"datacontenttype": "application/octet-stream"}, model.INVALID_DATA),
        # data and data_base64
        ({"data_base64": "e30="}, model.INVALID_ENVELOPE),  # together with data
        ({"data": DROP}, model.INVALID_DATA),
        ({"data": None}, model.INVALID_DATA),
        ({"data": "RUNNING"}, model.INVALID_DATA),
        ({"data": ["RUNNING"]}, model.INVALID_DATA),
        ({"data": 5}, model.INVALID_DATA),
    ],
)
def test_envelope_rejected(attrs, reason):
    result = rejected(event(**attrs))
    assert result.reason == reason, result.detail


def test_empty_optional_attribute_detail():
    assert rejected(event(subject="")).detail == "optional attribute subject must be a non-empty string, got ''"


def test_text_plain_data_string_is_invalid_data():
    result = rejected(event(data="Running", datacontenttype="text/plain"))
    assert result.reason == model.INVALID_DATA
    assert "text/plain" in result.detail


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode()


def test_data_base64_json():
    payload = json.dumps(data(status="Stopped", message="bye")).encode()
    result = accepted(event(data=DROP, data_base64=_b64(payload)))
    assert (result.status, result.message) == ("STOPPED", "bye")


def test_data_base64_with_null_data_is_fine():
    payload = json.dumps(data()).encode()
    assert isinstance(decode(event(data=None, data_base64=_b64(payload))), StatusUpdate)


def test_data_base64_keeps_outputs_raw():
    payload = b'{"id":"n","status":"READY","output_spec":{"b": 2, "a": 1}}'
    result = accepted(event(data=DROP, data_base64=_b64(payload)), "dcm.network")
    assert result.outputs == b'{"b": 2, "a": 1}'


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("not base64!", model.INVALID_DATA),
        ("e30", model.INVALID_DATA),  # bad padding
        (_b64(b"not json"), model.INVALID_DATA),
        (_b64(b"[1]"), model.INVALID_DATA),
        (_b64(b'{"id":"a","status":"RUNNING"} x'), model.INVALID_DATA),
        (_b64(b'{"id":"a","status":"\xff"}'), model.INVALID_DATA),
        (_b64(b"null"), model.INVALID_DATA),
        ("", model.INVALID_DATA),
        (5, model.INVALID_ENVELOPE),
    ],
)
def test_data_base64_rejected(value, reason):
    assert rejected(event(data=DROP, data_base64=value)).reason == reason


def test_data_base64_with_non_json_content_type():
    body = event(data=DROP, data_base64=_b64(b"hello"), datacontenttype="text/plain")
    assert rejected(body).reason == model.INVALID_DATA


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        ("application/json", True),
        ("APPLICATION/JSON", True),
        ("application/json; charset=utf-8", True),
        ("application/json;charset=utf-8", True),
        ("  application/json  ", True),
        ("text/json", True),
        ("application/vnd.foo+json", True),
        ("application/cloudevents+json", True),
        ("application/vnd.foo+JSON; v=1", True),
        ("text/plain", False),
        ("application/jsonl", False),
        ("application/json-patch", False),
        ("json", False),
        ("/json", False),
        ("application/", False),
        ("application/x/json", False),
        ("application/ json", False),
        ("", False),
    ],
)
def test_is_json_media_type(content_type, expected):
    assert is_json_media_type(content_type) is expected


# Body shape and the malformed_json / invalid_envelope boundary:
# unparseable JSON is malformed_json; valid JSON that is not an object is
# invalid_envelope.


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", model.MALFORMED_JSON),
        (b"   ", model.MALFORMED_JSON),
        (b"{", model.MALFORMED_JSON),
        (b"not json", model.MALFORMED_JSON),
        (b"{'single': 'quotes'}", model.MALFORMED_JSON),
        (event() + b"garbage", model.MALFORMED_JSON),
        (event() + event(), model.MALFORMED_JSON),  # two events back to back
        (event() + b"\n" + event(), model.MALFORMED_JSON),
        (b"\xef\xbb\xbf" + event(), model.MALFORMED_JSON),  # BOM
        (event()[:-1] + b',"x":"\xff"}', model.MALFORMED_JSON),  # invalid UTF-8, ignored member
        (event(data(message="caf\u00e9")).replace("é".encode(), b"\xe9"), model.MALFORMED_JSON),
        (b"[1, 2", model.MALFORMED_JSON),  # unparseable array
        (event()[:-1] + b',"ext":"\\ud800"}', model.MALFORMED_JSON),  # unpaired surrogate escape
        (event()[:-1] + b',"ext":"\\udc00\\ud800"}', model.MALFORMED_JSON),
        (event(data=DROP)[:-1] + b',"data":{"id":"a","status":"RUNNING","output_spec":{"a":"\\ud800"}}}', model.MALFORMED_JSON),
        (b"[" + event() + b"]", model.INVALID_ENVELOPE),  # a batch
        (b"[]", model.INVALID_ENVELOPE),
        (b'"an event"', model.INVALID_ENVELOPE),
        (b"42", model.INVALID_ENVELOPE),
        (b"null", model.INVALID_ENVELOPE),
        (b"true", model.INVALID_ENVELOPE),
        (b"{}", model.INVALID_ENVELOPE),
    ],
)
def test_body_shape(body, reason):
    result = rejected(body)
    assert result.reason == reason, result.detail


def test_trailing_whitespace_is_fine():
    assert isinstance(decode(event() + b"\r\n \t"), StatusUpdate)


def test_non_ascii_utf8_body_is_fine():
    assert accepted(event(data(message="Füße 🚀"))).message == "Füße 🚀"


def test_duplicate_members_last_one_wins():
    body = event()[:-1] + b',"source":"second"}'
    assert accepted(body).provider == "second"


# --------------------------------------------------------------------------
# Binary mode: attributes in ce-* headers, body = data.


def test_binary_mode():
    body = json.dumps(data(status="Stopping", message="shutting down")).encode()
    result = accepted(body, "dcm.vm", binary_headers())
    assert result == StatusUpdate(
        "vm-1", "vm", "STOPPING", "shutting down", "dcm/providers/test-sp", None,
        _t("2026-05-01T10:00:00+00:00"), SEQ,
    )


def test_binary_mode_header_names_case_insensitive():
    headers = {
        "CE-SpecVersion": "1.0",
        "Ce-Id": "e-1",
        "CE-SOURCE": "sp",
        "ce-Type": "t",
        "Content-Type": "Application/JSON; charset=UTF-8",
    }
    result = accepted(json.dumps(data()).encode(), "dcm.vm", headers)
    assert result.provider == "sp"
    assert result.event_time == STREAM_TIME


def test_binary_mode_percent_decoded_values():
    headers = binary_headers(
        ce_source="dcm%2Fproviders%2Fk%C3%BCbe%20sp",
        ce_subject="inst%3A42",
        ce_time="2026-05-01T10%3A00%3A00%2B02%3A00",
    )
    result = accepted(json.dumps(data(id=DROP)).encode(), "dcm.vm", headers)
    assert result.provider == "dcm/providers/kübe sp"
    assert result.instance_id == "inst:42"
    assert result.event_time == _t("2026-05-01T08:00:00+00:00")


def test_binary_mode_invalid_percent_encoding():
    headers = binary_headers(ce_source="sp%FF")
    assert rejected(json.dumps(data()).encode(), "dcm.vm", headers).reason == model.INVALID_ENVELOPE


def test_binary_mode_without_content_type_is_json():
    headers = binary_headers(content_type=DROP)
    assert isinstance(decode(json.dumps(data()).encode(), "dcm.vm", headers), StatusUpdate)


def test_binary_mode_data_base64_header_is_meaningless():
    headers = binary_headers(ce_data_base64="eyJhIjoxfQ==")
    assert isinstance(decode(json.dumps(data()).encode(), "dcm.vm", headers), StatusUpdate)


@pytest.mark.parametrize(
    ("headers", "body", "reason"),
    [
        (binary_headers(ce_id=DROP), json.dumps(data()).encode(), model.INVALID_ENVELOPE),
        (binary_headers(ce_id=""), json.dumps(data()).encode(), model.INVALID_ENVELOPE),
        (binary_headers(ce_source=DROP), json.dumps(data()).encode(), model.INVALID_ENVELOPE),
        (binary_headers(ce_type=DROP), json.dumps(data()).encode(), model.INVALID_ENVELOPE),
        (binary_headers(ce_subject=""), json.dumps(data()).encode(), model.INVALID_ENVELOPE),
        (binary_headers(ce_time="yesterday"), json.dumps(data()).encode(), model.INVALID_ENVELOPE),
        (binary_headers(ce_time="2026-05-01T10:00:00"), json.dumps(data()).encode(), model.INVALID_ENVELOPE),
        (binary_headers(ce_specversion="0.3"), json.dumps(data()).encode(), model.UNSUPPORTED_SPECVERSION),
        (binary_headers(ce_specversion=""), json.dumps(data()).encode(), model.INVALID_ENVELOPE),
        (binary_headers(content_type=""), json.dumps(data()).encode(), model.INVALID_ENVELOPE),
        (binary_headers(content_type="text/plain"), b"Running", model.INVALID_DATA),
        (binary_headers(), b"", model.INVALID_DATA),
        (binary_headers(), b"null", model.INVALID_DATA),
        (binary_headers(), b"[1]", model.INVALID_DATA),
        (binary_headers(), b'"RUNNING"', model.INVALID_DATA),
        (binary_headers(), b"{not json", model.MALFORMED_JSON),
        (binary_headers(), b'{"id":"a","status":"RUNNING"} trailing', model.MALFORMED_JSON),
        (binary_headers(), b'{"id":"a","status":"RUNNING","x":"\xc3"}', model.MALFORMED_JSON),
        (binary_headers(), b"[1, 2", model.MALFORMED_JSON),
        (binary_headers(), b'{"status":"RUNNING"}', model.MISSING_INSTANCE_ID),
        (binary_headers(ce_subject="inst-1"), b'{"status":"bogus"}', model.UNKNOWN_STATUS),
    ],
)
def test_binary_mode_rejected(headers, body, reason):
    result = rejected(body, "dcm.vm", headers)
    assert result.reason == reason, result.detail


def test_structured_content_type_wins_over_ce_headers():
    headers = {"content-type": "application/cloudevents+json; charset=utf-8", "ce-specversion": "0.3"}
    assert isinstance(decode(event(), "dcm.vm", headers), StatusUpdate)


def test_other_content_type_without_ce_headers_is_rejected():
    result = rejected(event(), "dcm.vm", {"Content-Type": "application/json"})
    assert result.reason == model.INVALID_ENVELOPE
    assert "ce-specversion" in result.detail


def test_empty_headers_mean_structured():
    assert isinstance(decode(event(), "dcm.vm", {}), StatusUpdate)


# --------------------------------------------------------------------------
# Rejections: one case per reason, and what a rejection carries.

REASON_CASES = [
    (model.MALFORMED_JSON, "dcm.vm", None, b"{nope"),
    (model.INVALID_ENVELOPE, "dcm.vm", None, event(id=DROP)),
    (model.UNSUPPORTED_SPECVERSION, "dcm.vm", None, event(specversion="0.3")),
    (model.INVALID_DATA, "dcm.vm", None, event(data=[1])),
    (model.UNKNOWN_SERVICE_TYPE, "dcm.spaceship", None, event()),
    (model.MISSING_INSTANCE_ID, "dcm.vm", None, event(data(id=DROP), subject=DROP)),
    (model.INVALID_INSTANCE_ID, "dcm.vm", None, event(data(id="a b"))),
    (model.UNKNOWN_STATUS, "dcm.vm", None, event(data(status="Exploded"))),
    (model.TOO_LARGE, "dcm.vm", None, event(data(message="x" * DEFAULT_MAX_EVENT_BYTES))),
]


def test_reason_cases_cover_the_vocabulary():
    assert {case[0] for case in REASON_CASES} == set(model.REJECTION_REASONS)


@pytest.mark.parametrize(("reason", "subject", "headers", "body"), REASON_CASES, ids=[c[0] for c in REASON_CASES])
def test_each_reason(reason, subject, headers, body):
    result = rejected(body, subject, headers)
    assert result.reason == reason
    assert result.detail
    assert result.subject == subject
    assert result.stream_seq == SEQ
    assert result.body == body[:DEAD_LETTER_BODY_BYTES]


def test_rejection_carries_context():
    headers = {"Nats-Msg-Id": "m-1"}
    body = event(data(status="Exploded", message="x" * 10_000))
    result = rejected(body, "dcm.vm", headers)
    assert result.service_type == "vm"
    assert result.instance_id == "vm-1"
    assert result.headers == headers and result.headers is not headers
    assert len(result.body) == DEAD_LETTER_BODY_BYTES
    assert result.body == body[:DEAD_LETTER_BODY_BYTES]


def test_rejection_without_headers():
    assert rejected(b"{nope").headers is None


def test_unknown_service_type_is_not_named_as_a_type():
    # An arbitrary subject token must not become a metric label.
    result = rejected(event(), "dcm.spaceship")
    assert result.service_type is None
    assert "spaceship" in result.detail


def test_service_type_is_the_last_subject_token():
    assert rejected(event(), "dcm.vm.extra").reason == model.UNKNOWN_SERVICE_TYPE
    assert accepted(event(), "vm").service_type == "vm"
    assert rejected(event(), "dcm.VM").reason == model.UNKNOWN_SERVICE_TYPE
    assert rejected(event(), "").reason == model.UNKNOWN_SERVICE_TYPE


def test_too_large_is_decided_before_parsing():
    decoder = Decoder(max_event_bytes=100)
    result = rejected(b"x" * 101, decoder=decoder)
    assert result.reason == model.TOO_LARGE
    assert result.service_type == "vm"
    assert len(result.body) == 101
    assert rejected(b"{" * 100, decoder=decoder).reason == model.MALFORMED_JSON  # at the limit: parsed


def test_max_event_bytes_must_be_positive():
    with pytest.raises(ValueError):
        Decoder(max_event_bytes=0)


# --------------------------------------------------------------------------
# Never raises.


def test_deep_nesting_10k():
    deep_array = b"[" * 10_000 + b"]" * 10_000
    deep_object = b'{"a":' * 10_000 + b"1" + b"}" * 10_000
    cases = [
        (deep_array, None),
        (b"[" * 10_000, None),  # and unterminated
        (deep_object, None),
        (event()[:-1] + b',"ext":' + deep_array + b"}", None),  # in an ignored member
        (event(data=DROP)[:-1] + b',"data":' + deep_object + b"}", None),
        (event()[:-1] + b',"time":' + deep_array + b"}", None),
        (event(data=DROP)[:-1] + b',"data":{"id":"a","status":"RUNNING","output_spec":' + deep_object + b"}}", None),
        (event(data=DROP)[:-1] + b',"data":{"id":' + deep_array + b',"status":"RUNNING"}}', None),
        (deep_object, binary_headers()),
        (deep_array, binary_headers()),
        (event(data=DROP, data_base64=_b64(deep_object)), None),
    ]
    for body, headers in cases:
        result = rejected(body, "dcm.vm", headers)
        # msgspec raises RecursionError near the interpreter's limit; the
        # decoder reports it as a resource limit.
        assert result.reason == model.TOO_LARGE, result


def test_moderate_nesting_in_ignored_members_is_fine():
    nested = b'{"a":' * 50 + b"1" + b"}" * 50
    body = event()[:-1] + b',"ext":' + nested + b"}"
    assert isinstance(decode(body), StatusUpdate)


def test_random_bytes():
    rng = random.Random(20260409)
    for _ in range(3000):
        body = rng.randbytes(rng.randrange(0, 300))
        assert isinstance(decode(body), Rejection)
        assert isinstance(decode(body, "dcm.vm", binary_headers()), Rejection)


def test_mutated_valid_events_never_raise():
    rng = random.Random(7)
    originals = [KUBEVIRT, STORAGE, ACM, OSAC, THREE_TIER, GO_SDK]
    for _ in range(3000):
        body = bytearray(rng.choice(originals))
        for _ in range(rng.randrange(1, 4)):
            body[rng.randrange(len(body))] = rng.randrange(256)
        result = decode(bytes(body), rng.choice(["dcm.vm", "dcm.cluster", "dcm.network"]))
        assert isinstance(result, (StatusUpdate, Rejection))


@pytest.mark.parametrize(
    ("body", "outcome"),
    [
        (event(data(message="x" * 200_000)), StatusUpdate),
        (event(source="s" * 200_000), StatusUpdate),
        (event()[:-1] + b',"n":' + b"9" * 200_000 + b"}", StatusUpdate),  # ignored member
        (event(data(timestamp=-1e300)), StatusUpdate),  # not read: CE time is present
        (event(data(status="R" * 200_000)), Rejection),
        (event(data(id="i" * 200_000)), Rejection),
        (event(time="2" * 200_000), Rejection),
        (event(data=DROP)[:-1] + b',"data":{"id":"a","status":' + b"9" * 5000 + b"}}", Rejection),
        (event(data=DROP)[:-1] + b',"data":{"id":"a","status":1e999999}}', Rejection),
        (event(data=DROP, time=DROP)[:-1] + b',"data":{"id":"a","status":"RUNNING","timestamp":-1e999}}', Rejection),
        (event()[:-1] + b',"id":123456789012345678901234567890}', Rejection),
        (event()[:-1] + b',"id":' + b"1" * 5000 + b"}", Rejection),
        (b'{"specversion":"1.0","id":"\\ud800","source":"s","type":"t","data":{}}', Rejection),
        (b'{"specversion":"1.0\\u0000"}', Rejection),
    ],
)
def test_huge_and_odd_values(body, outcome):
    result = decode(body)
    assert isinstance(result, outcome), result
    if isinstance(result, Rejection):
        assert len(result.detail) < 1000


def test_huge_message_under_the_limit_is_accepted():
    message = "x" * 200_000
    assert accepted(event(data(message=message))).message == message


@pytest.mark.parametrize(
    "headers",
    [
        {"ce-specversion": "1.0", "ce-id": "\udcff", "ce-source": "s", "ce-type": "t"},  # lone surrogate
        {"ce-specversion": b"1.0", "ce-id": b"x", "ce-source": b"s", "ce-type": b"t"},
        {"ce-specversion": 1.0, "ce-id": 1, "ce-source": None, "ce-type": ["t"]},
        {"content-type": None},
        {"content-type": b"application/json"},
        {1: "x", None: "y", ("a",): "z"},
        {"ce-specversion": "1.0", "ce-id": "a", "ce-source": "%", "ce-type": "%zz%"},
        [("ce-specversion", "1.0")],
        "ce-specversion: 1.0",
        42,
    ],
)
def test_odd_headers(headers):
    result = decode(json.dumps(data()).encode(), "dcm.vm", headers)
    assert isinstance(result, (StatusUpdate, Rejection))
    if isinstance(result, Rejection):
        assert result.headers is None or all(
            type(k) is str and type(v) is str for k, v in result.headers.items()
        )


def test_headers_that_fail_to_iterate():
    class Exploding(dict):
        def items(self):
            raise RuntimeError("boom")

    result = decode(event(), "dcm.vm", Exploding(x="1"))
    assert isinstance(result, Rejection)


@pytest.mark.parametrize("body", [bytearray(KUBEVIRT), memoryview(KUBEVIRT)])
def test_bytes_like_bodies(body):
    assert isinstance(decode(body), StatusUpdate)


@pytest.mark.parametrize(
    ("subject", "body", "seq", "time_ns"),
    [
        (None, KUBEVIRT, 1, 0),
        (b"dcm.vm", KUBEVIRT, 1, 0),
        ("dcm.vm", None, 1, 0),
        ("dcm.vm", "a str body", 1, 0),
        ("dcm.vm", event(time=DROP), 1, None),
        ("dcm.vm", event(time=DROP), 1, 10**40),
    ],
)
def test_caller_errors_do_not_raise(subject, body, seq, time_ns):
    assert isinstance(DECODER.decode(subject, None, body, seq, time_ns), Rejection)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
        lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
        max_leaves=20,
    ),
    st.sampled_from(["specversion", "id", "source", "type", "subject", "time", "datacontenttype", "data", "data_base64", "dataschema"]),
)
def test_any_attribute_value_never_raises(value, attribute):
    body = event(**{attribute: value})
    assert isinstance(decode(body), (StatusUpdate, Rejection))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
        lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
        max_leaves=20,
    ),
    st.sampled_from(["id", "status", "message", "timestamp", "output_spec"]),
)
def test_any_data_member_never_raises(value, member):
    body = event(data(**{member: value}), time=DROP)
    result = decode(body)
    assert isinstance(result, (StatusUpdate, Rejection))
    if isinstance(result, StatusUpdate):
        assert "\x00" not in result.message
        assert result.event_time.tzinfo is UTC


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_any_bytes_never_raise(body):
    assert isinstance(decode(body), Rejection)
