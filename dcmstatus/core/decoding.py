"""The DCM mapping: one NATS message in, one decision out (docs/events.md).

`Decoder.decode()` turns the subject, headers and body of a JetStream message
into a `StatusUpdate` or a `Rejection` carrying one of the rejection reasons
(docs/events.md#rejections). It is pure (no I/O, no clock, no logging) and
never raises: whatever arrives, hostile or broken, ends as a value the
consumer can act on.

The CloudEvents side (modes, attribute, content-type and time rules) is
`dcmstatus.core.cloudevents`; this module maps an accepted event to an update
(docs/events.md#mapping): subject → service type, data.id (else the CE
subject) → instance id, data.status through the catalog's aliases → status,
data.message, data.output_spec → outputs, CE time (else data.timestamp, else
the stream time) → event time, replaced by the stream time when it is more
than `max_clock_skew` ahead of it (docs/events.md#time).

Speed
-----
The valid-event path raises no exception and never re-encodes JSON: msgspec
decodes the envelope into a Struct whose ``data`` and ``time`` are kept raw,
then decodes ``data`` into a second Struct whose ``output_spec`` stays raw
(those bytes become ``StatusUpdate.outputs``). The structured-mode checks are
inlined in `Decoder._decode` (each helper call costs ~0.1 µs); the
cloudevents functions are called only to find out which rule failed. Its only
regular expression is the instance-id check, measured faster than the
str-method alternatives. Rejections are signalled internally with an
exception (`cloudevents.Invalid`): they are the rare path.

Choices in the mapping (docs/events.md#mapping)
-----------------------------------------------
- Check order: size (``too_large``, before any parsing), service type from
  the subject (``unknown_service_type``, before parsing too), envelope, data,
  instance id, status, message, output_spec, event time. The first failure
  decides the reason.
- In binary mode the body is the data: unparseable is ``malformed_json``,
  valid JSON that is not an object is ``invalid_data``. Embedded
  ``data_base64`` that does not decode (base64, UTF-8 or JSON) is
  ``invalid_data``.
- ``data.timestamp`` is read with the CE time rules, and only (and then
  validated) when the CE ``time`` is absent.
- The clock-skew bound applies to a time the event gave (CE ``time`` or
  ``data.timestamp``), compared at microsecond precision with the stream time
  truncated to microseconds; exactly at the bound is kept. The update keeps
  the replaced time as ``claimed_time`` so the engine can count and log it.
- ``data.id`` that is present but invalid (wrong type, empty, too long, bad
  characters) is ``invalid_instance_id``; the CE ``subject`` is only a fallback
  for an absent/null ``data.id``, and is validated the same way. A subject
  like ``dcm.vm`` is then taken as it is; it names no instance, so the
  database makes it a no-op.
- ``Rejection.service_type`` is set only for a configured type (an arbitrary
  subject token must not become a metric label); ``instance_id`` once a valid
  one was found.
- ``data.status`` missing or null, or not a string, is ``invalid_data``.
- ``output_spec`` that is not a JSON object (array, string, null…) is ignored
  (outputs = None): only objects are outputs.
- Every accepted update is storable in PostgreSQL, so one odd event cannot
  fail a whole database batch later: a NUL character in the provider
  (``source``) or the message is rejected (``invalid_envelope`` /
  ``invalid_data``) because text columns cannot hold it, and ``output_spec`` is
  decoded once (not re-encoded) so that what jsonb would refuse (``\\u0000``,
  numbers beyond double range) is ``invalid_data``. Unpaired surrogate escapes
  (``"\\ud800"``) are refused by msgspec anywhere in a body, even in ignored
  members: ``malformed_json``.
- Any unexpected exception is caught and reported as ``invalid_envelope``
  with the exception in the detail; none is known to occur.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Final, Literal

import msgspec
from msgspec import Raw

from dcmstatus.core.catalog import Catalog
from dcmstatus.core.cloudevents import (
    ABSENT,
    NULL,
    Invalid,
    aware_utc,
    bad_time,
    binary_attributes,
    check_content_type,
    check_context,
    check_utf8,
    decode_base64,
    decode_envelope,
    decode_json,
    decode_time,
    envelope_error,
    header_time,
    json_error,
    show,
)
from dcmstatus.core.model import (
    DEAD_LETTER_BODY_BYTES,
    INVALID_DATA,
    INVALID_ENVELOPE,
    INVALID_INSTANCE_ID,
    MALFORMED_JSON,
    MISSING_INSTANCE_ID,
    TOO_LARGE,
    UNKNOWN_SERVICE_TYPE,
    UNKNOWN_STATUS,
    Rejection,
    StatusUpdate,
)

__all__ = [
    "DEFAULT_MAX_EVENT_BYTES",
    "MAX_CLOCK_SKEW",
    "MAX_INSTANCE_ID_LENGTH",
    "Decoder",
    "valid_instance_id",
]

DEFAULT_MAX_EVENT_BYTES: Final = 256 * 1024
# The largest clock-skew bound accepted, in seconds: a day is far beyond any
# clock error, and keeps the bound's arithmetic inside datetime's range.
MAX_CLOCK_SKEW: Final = 86_400.0
MAX_INSTANCE_ID_LENGTH: Final = 253

_UTC: Final = UTC
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=_UTC)
_INSTANCE_ID_RE: Final = re.compile(rf"[A-Za-z0-9._:-]{{1,{MAX_INSTANCE_ID_LENGTH}}}")
_match_instance_id: Final = _INSTANCE_ID_RE.fullmatch


class _Data(msgspec.Struct):
    """The members of `data` the mapping reads (others are ignored)."""

    id: Any = None
    status: Any = None
    message: Any = None
    timestamp: Raw = ABSENT
    output_spec: Raw = ABSENT


_decode_data: Final = msgspec.json.Decoder(_Data | None).decode

_NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]


class _ValidData(msgspec.Struct, kw_only=True):
    """`data` as every accepted structured event has it (see _ValidEnvelope)."""

    id: str | None = None
    status: str
    message: str | None = None
    timestamp: Raw = ABSENT
    output_spec: Raw = ABSENT


class _ValidEnvelope(msgspec.Struct):
    """A structured-mode event that passes every envelope rule msgspec can
    check: decoded in one pass (the attributes, `time` and `data` together).

    Whatever does not fit it, valid or not, is decoded again the careful way
    (`cloudevents.Envelope`, then `_Data`), which finds out which rule failed;
    what fits it, that way accepts too, with the same values
    (tests/unit/test_decoding_properties.py checks both ways agree).
    """

    specversion: Literal["1.0"]
    id: _NonEmpty
    source: _NonEmpty
    type: _NonEmpty
    data: _ValidData
    subject: _NonEmpty | None = None
    time: datetime | None = None
    datacontenttype: _NonEmpty | None = None
    dataschema: _NonEmpty | None = None
    data_base64: None = None


_decode_valid: Final = msgspec.json.Decoder(_ValidEnvelope).decode


class Decoder:
    """Decodes status events against a catalog. Build once and reuse."""

    __slots__ = ("_catalog", "_lookups", "_max_clock_skew", "_max_event_bytes", "_skew", "_skew_floor")

    def __init__(
        self,
        catalog: Catalog | None = None,
        *,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        max_clock_skew: float | None = None,
    ) -> None:
        """`max_clock_skew`: seconds an event time may be ahead of the stream
        time before the stream time replaces it; None: no bound (the service
        always passes its `--max-clock-skew`)."""
        if catalog is None:
            catalog = Catalog.default()
        if max_event_bytes <= 0:
            raise ValueError("max_event_bytes must be positive")
        if max_clock_skew is not None and not 0 < max_clock_skew <= MAX_CLOCK_SKEW:
            raise ValueError(f"max_clock_skew must be more than 0 and at most {MAX_CLOCK_SKEW} seconds")
        self._max_clock_skew = max_clock_skew
        self._skew = None if max_clock_skew is None else timedelta(seconds=max_clock_skew)
        # (stream second, the bound for the start of that second): see _decode.
        self._skew_floor: tuple[int, datetime] = (-1, _EPOCH)
        self._catalog = catalog
        lookups: dict[str, dict[str, str]] = {}
        for name in catalog.service_types():
            lookup = catalog.status_lookup(name)
            assert lookup is not None
            lookups[name] = lookup
        self._lookups = lookups
        self._max_event_bytes = max_event_bytes

    @property
    def catalog(self) -> Catalog:
        return self._catalog

    @property
    def max_event_bytes(self) -> int:
        return self._max_event_bytes

    @property
    def max_clock_skew(self) -> float | None:
        return self._max_clock_skew

    def decode(
        self,
        subject: str,
        headers: Mapping[str, str] | None,
        body: bytes,
        stream_seq: int,
        stream_time_ns: int,
    ) -> StatusUpdate | Rejection:
        """Decide what one message means. Never raises (for any Exception).

        `subject` is the NATS subject (service type = its last token),
        `headers` the NATS headers or None, `body` the payload, `stream_seq`
        and `stream_time_ns` the JetStream sequence and timestamp (ns since
        the epoch; the event time when the event carries none).
        """
        service_type = None
        try:
            if type(body) is not bytes:
                body = bytes(body)
            service_type = subject.rpartition(".")[2]
            if len(body) > self._max_event_bytes:
                raise Invalid(
                    TOO_LARGE,
                    f"body is {len(body)} bytes, over the limit of {self._max_event_bytes}",
                )
            lookup = self._lookups.get(service_type)
            if lookup is None:
                raise Invalid(
                    UNKNOWN_SERVICE_TYPE,
                    f"service type {show(service_type)} (subject {show(subject)}) is not configured",
                )
            return self._decode(service_type, lookup, headers, body, stream_seq, stream_time_ns)
        except Invalid as r:
            return self._rejection(
                r.reason, r.detail, subject, headers, body, stream_seq, service_type, r.instance_id
            )
        except Exception as exc:
            return self._rejection(
                INVALID_ENVELOPE,
                f"event could not be decoded ({type(exc).__name__}: {_clip(str(exc))})",
                subject,
                headers,
                body,
                stream_seq,
                service_type,
                None,
            )

    # -- the decision ---------------------------------------------------------

    def _decode(
        self,
        service_type: str,
        lookup: dict[str, str],
        headers: Mapping[str, str] | None,
        body: bytes,
        stream_seq: int,
        stream_time_ns: int,
    ) -> StatusUpdate:
        attrs = binary_attributes(headers) if headers else None
        if attrs is None:
            # Structured mode, the path every known publisher takes: the
            # cloudevents rules are inlined here, each call costs ~0.1 µs.
            if not body.isascii():
                check_utf8(body, MALFORMED_JSON, "body")
            try:
                valid = _decode_valid(body)
            except Exception:
                valid = None  # rejected, or a form it does not take (data_base64): the careful way
            if valid is not None:
                # The rules msgspec cannot check, in the careful way's order.
                valid_time = valid.time
                if valid_time is not None and valid_time.tzinfo is not _UTC:
                    valid_time = aware_utc(valid_time, INVALID_ENVELOPE, "time", None)
                if valid.datacontenttype is not None and valid.datacontenttype != "application/json":
                    check_content_type(valid.datacontenttype)
                return self._update(
                    service_type, lookup, valid.data, valid.source, valid.subject, valid_time, stream_seq, stream_time_ns
                )
            try:
                env = decode_envelope(body)
            except Exception as exc:
                raise envelope_error(body, exc) from None
            ce_subject = env.subject
            content_type = env.datacontenttype
            source = env.source
            # One cheap expression for the valid case; check_context finds
            # out which rule failed only when one did.
            if not (
                env.specversion == "1.0"
                and type(env.id) is str
                and env.id
                and type(source) is str
                and source
                and type(env.type) is str
                and env.type
                and (ce_subject is None or (type(ce_subject) is str and ce_subject))
                and (content_type is None or (type(content_type) is str and content_type))
                and (env.dataschema is None or (type(env.dataschema) is str and env.dataschema))
            ):
                check_context(
                    env.specversion, env.id, source, env.type, ce_subject, content_type, env.dataschema
                )
            event_time = None
            if env.time:
                try:
                    event_time = decode_time(env.time)
                except msgspec.DecodeError:
                    raise bad_time("time", env.time, INVALID_ENVELOPE, None) from None
                if event_time is not None and event_time.tzinfo is not _UTC:
                    event_time = aware_utc(event_time, INVALID_ENVELOPE, "time", None)
            data_raw = env.data
            data_base64 = env.data_base64
            if data_base64 is not None:
                if data_raw and data_raw != NULL:
                    raise Invalid(INVALID_ENVELOPE, "event has both data and data_base64")
                check_content_type(content_type)
                data = self._data_from_bytes(decode_base64(data_base64), INVALID_DATA)
            else:
                if content_type is not None and content_type != "application/json":
                    check_content_type(content_type)
                decoded = None
                if data_raw:
                    try:
                        decoded = _decode_data(data_raw)
                    except Exception as exc:
                        raise _data_error(exc, INVALID_DATA) from None
                if decoded is None:
                    raise Invalid(INVALID_DATA, "event has no data")
                data = decoded
        else:
            ce_subject = attrs.get("subject")
            content_type = attrs.get("datacontenttype")
            source = attrs.get("source")
            check_context(
                attrs.get("specversion"),
                attrs.get("id"),
                source,
                attrs.get("type"),
                ce_subject,
                content_type,
                attrs.get("dataschema"),
            )
            ce_time = attrs.get("time")
            event_time = header_time(ce_time) if ce_time is not None else None
            check_content_type(content_type)
            data = self._data_from_bytes(body, MALFORMED_JSON)
        return self._update(service_type, lookup, data, source, ce_subject, event_time, stream_seq, stream_time_ns)

    def _update(
        self,
        service_type: str,
        lookup: dict[str, str],
        data: _Data | _ValidData,
        source: str,
        ce_subject: str | None,
        event_time: datetime | None,
        stream_seq: int,
        stream_time_ns: int,
    ) -> StatusUpdate:
        """The mapping of an event whose envelope passed (docs/events.md#mapping)."""
        if "\x00" in source:
            raise Invalid(INVALID_ENVELOPE, "source contains a NUL character")

        # Instance id: data.id, else the CE subject (only when data.id is absent).
        instance_id = data.id
        if instance_id is None:
            if ce_subject is None:
                raise Invalid(MISSING_INSTANCE_ID, "data.id is absent and the event has no subject")
            instance_id = ce_subject
            where = "subject"
        else:
            where = "data.id"
        if type(instance_id) is not str or _match_instance_id(instance_id) is None:
            raise Invalid(
                INVALID_INSTANCE_ID,
                f"{where} {show(instance_id)} is not an instance id "
                f"(1-{MAX_INSTANCE_ID_LENGTH} characters of A-Z a-z 0-9 . _ : -)",
            )

        status = data.status
        if type(status) is not str:
            what = "absent" if status is None else f"not a string: {show(status)}"
            raise Invalid(INVALID_DATA, f"data.status is {what}", instance_id)
        canonical = lookup.get(status.strip().lower())
        if canonical is None:
            raise Invalid(
                UNKNOWN_STATUS, f"status {show(status)} is not a {service_type} status", instance_id
            )

        message = data.message
        if message is None:
            message = ""
        elif type(message) is not str:
            raise Invalid(INVALID_DATA, f"data.message is not a string: {show(message)}", instance_id)
        elif "\x00" in message:
            raise Invalid(INVALID_DATA, "data.message contains a NUL character", instance_id)

        outputs = _outputs(data.output_spec, instance_id) if data.output_spec else None

        if event_time is None and data.timestamp:
            event_time = _timestamp(data.timestamp, instance_id)
        if event_time is None:
            event_time = _EPOCH + timedelta(microseconds=stream_time_ns // 1000)
        elif self._skew is not None:
            # A provider whose clock runs ahead must not pin a status: an
            # event from "the future" would win the ordering guard against
            # every real one after it (docs/events.md#time). Building the
            # exact bound costs more than the rest of the check, so it is
            # built only for a time past the bound of the stream time's whole
            # second, which consecutive messages share (docs/performance.md).
            second = stream_time_ns // 1_000_000_000
            floor = self._skew_floor
            if floor[0] != second:
                floor = self._skew_floor = (second, _EPOCH + timedelta(seconds=second) + self._skew)
            if event_time > floor[1]:
                stream_time = _EPOCH + timedelta(microseconds=stream_time_ns // 1000)
                if event_time > stream_time + self._skew:
                    return StatusUpdate(
                        instance_id, service_type, canonical, message, source, outputs, stream_time, stream_seq,
                        event_time,
                    )  # fmt: skip

        return StatusUpdate(
            instance_id, service_type, canonical, message, source, outputs, event_time, stream_seq
        )

    # -- parsing helpers (each raises Invalid with the right reason) -----------

    @staticmethod
    def _data_from_bytes(payload: bytes, syntax_reason: str) -> _Data:
        """`data` given as bytes: the binary-mode body or decoded data_base64."""
        if not payload:
            raise Invalid(INVALID_DATA, "event has no data")
        if not payload.isascii():
            check_utf8(payload, syntax_reason, "data")
        try:
            data = _decode_data(payload)
        except Exception as exc:
            if isinstance(exc, msgspec.ValidationError):
                # Distinguish "not an object" from "not JSON at all".
                try:
                    decode_json(payload)
                except Exception as exc2:
                    if not isinstance(exc2, msgspec.ValidationError):
                        raise json_error(exc2, syntax_reason, "data") from None
            raise _data_error(exc, syntax_reason) from None
        if data is None:
            raise Invalid(INVALID_DATA, "data is null")
        return data

    # -- rejections -------------------------------------------------------------

    def _rejection(
        self,
        reason: str,
        detail: str,
        subject: object,
        headers: object,
        body: object,
        stream_seq: object,
        service_type: str | None,
        instance_id: str | None,
    ) -> Rejection:
        # Only configured types are named: an arbitrary subject token must not
        # become a metric label or a dead-letter category.
        if service_type is not None and service_type not in self._lookups:
            service_type = None
        try:
            return Rejection(
                reason=reason,
                detail=detail,
                subject=subject if type(subject) is str else repr(subject),
                stream_seq=stream_seq if type(stream_seq) is int else 0,
                headers=_plain_headers(headers),
                body=bytes(body[:DEAD_LETTER_BODY_BYTES])
                if isinstance(body, (bytes, bytearray, memoryview))
                else b"",
                service_type=service_type,
                instance_id=instance_id,
            )
        except Exception:
            return Rejection(reason, detail, "", 0, None, b"", service_type, instance_id)


# -- module helpers -------------------------------------------------------------


def valid_instance_id(value: object) -> bool:
    """True for a string of 1-253 characters of ``[A-Za-z0-9._:-]``."""
    return type(value) is str and _match_instance_id(value) is not None


def _timestamp(raw: Raw, instance_id: str) -> datetime | None:
    """`data.timestamp`, read only when the CE time is absent."""
    try:
        value = decode_time(raw)
    except msgspec.DecodeError:
        raise bad_time("data.timestamp", raw, INVALID_DATA, instance_id) from None
    if value is None or value.tzinfo is _UTC:
        return value
    return aware_utc(value, INVALID_DATA, "data.timestamp", instance_id)


def _outputs(raw: Raw, instance_id: str) -> bytes | None:
    text = bytes(raw)  # also detaches it from the (larger) body buffer
    if text[:1] != b"{":
        return None  # only an object is an output spec; anything else is ignored
    # Decode once so that whatever PostgreSQL jsonb would refuse is caught
    # here: unpaired surrogate escapes, numbers out of range, \u0000.
    try:
        value = decode_json(text)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise Invalid(INVALID_DATA, f"data.output_spec cannot be stored: {exc}", instance_id) from None
    except RecursionError:
        raise Invalid(TOO_LARGE, "data.output_spec is nested too deeply", instance_id) from None
    if b"\\u0000" in text and _contains_nul(value):
        raise Invalid(INVALID_DATA, "data.output_spec contains a NUL character", instance_id)
    return text


def _data_error(exc: Exception, syntax_reason: str) -> Invalid:
    """The rejection for a failure to decode `data` into _Data."""
    if not isinstance(exc, msgspec.ValidationError):
        return json_error(exc, syntax_reason, "data")
    # msgspec says "Expected `object | null`, got `array`" for the top level
    # and appends " - at `$.path`" for anything nested.
    text = str(exc)
    if text.startswith("Expected `object") and " - at " not in text:
        return Invalid(INVALID_DATA, "data is not a JSON object (got " + text.rpartition("got ")[2].strip("`") + ")")
    return Invalid(INVALID_DATA, f"data: {text}")


def _contains_nul(value: object) -> bool:
    """Whether any string (key or value) in decoded JSON holds U+0000."""
    stack = [value]  # iterative: depth is bounded, but recursion is not needed
    while stack:
        item = stack.pop()
        if type(item) is str:
            if "\x00" in item:
                return True
        elif type(item) is dict:
            stack.extend(item.keys())
            stack.extend(item.values())
        elif type(item) is list:
            stack.extend(item)
    return False


def _plain_headers(headers: object) -> dict[str, str] | None:
    """The headers as a plain str->str dict for the dead-letter record."""
    if headers is None or not isinstance(headers, Mapping):
        return None
    return {_text(k): _text(v) for k, v in headers.items()}


def _text(value: object) -> str:
    if type(value) is str:
        return value
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "backslashreplace")
    return repr(value)


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
