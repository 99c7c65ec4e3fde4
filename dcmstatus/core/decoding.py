"""Event decoding: one NATS message in, one decision out (CONTRACT §3).

`Decoder.decode()` turns the subject, headers and body of a JetStream message
into a `StatusUpdate` or a `Rejection` carrying one of the contract's reasons.
It is pure (no I/O, no clock, no logging) and never raises: whatever arrives,
hostile or broken, ends as a value the consumer can act on.

What is accepted
----------------
CloudEvents 1.0 in structured mode (the JSON body is the whole event) or
binary mode (attributes in ``ce-*`` NATS headers, body = data), mapped to an
update as in the contract's table. The valid-event path raises no exception
and never re-encodes JSON: msgspec decodes the envelope into a Struct whose
``data`` and ``time`` are kept raw, then decodes ``data`` into a second Struct
whose ``output_spec`` stays raw (those bytes become ``StatusUpdate.outputs``).
Its only regular expression is the instance-id check, measured faster than
the str-method alternatives. Rejections are signalled internally with an
exception: they are the rare path.

Choices where the contract is silent
------------------------------------
- Check order: size (``too_large``, before any parsing), service type from
  the subject (``unknown_service_type``, before parsing too), envelope, data,
  instance id, status, message, output_spec, event time. The first failure
  decides the reason.
- Body that is not parseable JSON (syntax error, trailing garbage, invalid
  UTF-8, empty body, BOM) is ``malformed_json``; a body that is valid JSON but
  not an object (an array / batch, a scalar) is ``invalid_envelope``. In binary
  mode the body is the data: unparseable is ``malformed_json``, valid JSON that
  is not an object is ``invalid_data``. Embedded ``data_base64`` that does not
  decode (base64, UTF-8 or JSON) is ``invalid_data``.
- Deep nesting: msgspec recurses and raises RecursionError (it does not
  crash) once nesting reaches the interpreter's recursion limit (about 1000
  levels, fewer by the caller's own stack depth; on 3.12+ the C recursion
  limit). That is reported as ``too_large``: a resource limit, like size. An
  exact, deterministic depth limit was measured to cost ~1 µs per event (a
  pass over the body) and was left out: no real event nests beyond ~10.
- Structured vs binary (as in the CloudEvents NATS binding): a content type of
  ``application/cloudevents+json`` means structured; otherwise a
  ``ce-specversion`` header means binary; otherwise no content type means
  structured; any other content type is ``invalid_envelope``. In binary mode
  the ``content-type`` header is ``datacontenttype``.
- ``specversion`` missing, null, non-string or empty is ``invalid_envelope``;
  any other string than "1.0" is ``unsupported_specversion``.
- Known optional attributes (subject, time, datacontenttype, dataschema) must
  be non-empty strings when present; extension attributes are ignored.
- ``time`` and ``data.timestamp`` go through msgspec's RFC 3339 parser, which
  is slightly lenient (lower-case ``t``/``z``, a space separator, ``+hhmm``)
  and rounds sub-microsecond digits to the nearest microsecond (monotone, so
  ordering is kept). A time without an offset is rejected. Event times are
  returned in UTC. ``data.timestamp`` is only read (and validated) when the
  CE ``time`` is absent.
- ``data.id`` that is present but invalid (wrong type, empty, too long, bad
  characters) is ``invalid_instance_id``; the CE ``subject`` is only a fallback
  for an absent/null ``data.id``, and is validated the same way. A subject
  like ``dcm.vm`` is then taken as the contract says; it names no instance,
  so the database makes it a no-op.
- ``Rejection.service_type`` is set only for a configured type (an arbitrary
  subject token must not become a metric label); ``instance_id`` once a valid
  one was found.
- ``data.status`` missing or null, or not a string, is ``invalid_data``.
- ``output_spec`` that is not a JSON object (array, string, null…) is ignored
  (outputs = None), since the contract only maps objects.
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

import base64
import binascii
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Final
from urllib.parse import unquote_to_bytes

import msgspec
from msgspec import Raw

from dcmstatus.core.catalog import Catalog
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
    UNSUPPORTED_SPECVERSION,
    Rejection,
    StatusUpdate,
)

__all__ = [
    "DEFAULT_MAX_EVENT_BYTES",
    "MAX_INSTANCE_ID_LENGTH",
    "Decoder",
    "is_json_media_type",
    "valid_instance_id",
]

DEFAULT_MAX_EVENT_BYTES: Final = 256 * 1024
MAX_INSTANCE_ID_LENGTH: Final = 253

_UTC: Final = UTC
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=_UTC)
_ABSENT: Final = Raw()  # default of Raw fields: member not present
_NULL: Final = Raw(b"null")
_INSTANCE_ID_RE: Final = re.compile(r"[A-Za-z0-9._:-]{1,%d}" % MAX_INSTANCE_ID_LENGTH)
_match_instance_id: Final = _INSTANCE_ID_RE.fullmatch


class _Envelope(msgspec.Struct):
    """A structured-mode CloudEvent, attributes as found.

    Attribute types are checked in Python rather than by msgspec so that each
    failure maps to its own reason; `time` and `data` stay raw so they are
    parsed only as far as needed.
    """

    specversion: Any = None
    id: Any = None
    source: Any = None
    type: Any = None
    subject: Any = None
    time: Raw = _ABSENT
    datacontenttype: Any = None
    dataschema: Any = None
    data: Raw = _ABSENT
    data_base64: Any = None


class _Data(msgspec.Struct):
    """The members of `data` the mapping reads (others are ignored)."""

    id: Any = None
    status: Any = None
    message: Any = None
    timestamp: Raw = _ABSENT
    output_spec: Raw = _ABSENT


class _Reject(Exception):
    """Internal: carries a rejection out of the nested checks."""

    __slots__ = ("detail", "instance_id", "reason")

    def __init__(self, reason: str, detail: str, instance_id: str | None = None) -> None:
        self.reason = reason
        self.detail = detail
        self.instance_id = instance_id


class Decoder:
    """Decodes status events against a catalog. Build once and reuse."""

    __slots__ = (
        "_any_decoder",
        "_catalog",
        "_data_decoder",
        "_envelope_decoder",
        "_lookups",
        "_max_event_bytes",
        "_time_decoder",
    )

    def __init__(
        self, catalog: Catalog | None = None, *, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES
    ) -> None:
        if catalog is None:
            catalog = Catalog.default()
        if max_event_bytes <= 0:
            raise ValueError("max_event_bytes must be positive")
        self._catalog = catalog
        lookups: dict[str, dict[str, str]] = {}
        for name in catalog.service_types():
            lookup = catalog.status_lookup(name)
            assert lookup is not None
            lookups[name] = lookup
        self._lookups = lookups
        self._max_event_bytes = max_event_bytes
        self._envelope_decoder = msgspec.json.Decoder(_Envelope)
        self._data_decoder = msgspec.json.Decoder(_Data | None)
        self._time_decoder = msgspec.json.Decoder(datetime | None)
        self._any_decoder = msgspec.json.Decoder()

    @property
    def catalog(self) -> Catalog:
        return self._catalog

    @property
    def max_event_bytes(self) -> int:
        return self._max_event_bytes

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
                raise _Reject(
                    TOO_LARGE,
                    f"body is {len(body)} bytes, over the limit of {self._max_event_bytes}",
                )
            lookup = self._lookups.get(service_type)
            if lookup is None:
                raise _Reject(
                    UNKNOWN_SERVICE_TYPE,
                    f"service type {_show(service_type)} (subject {_show(subject)}) is not configured",
                )
            return self._decode(service_type, lookup, headers, body, stream_seq, stream_time_ns)
        except _Reject as r:
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
        attrs = _binary_attributes(headers) if headers else None
        if attrs is None:
            # Structured mode, the path every known publisher takes: the
            # helpers are inlined here, each call costs ~0.1 µs.
            if not body.isascii():
                _check_utf8(body, MALFORMED_JSON, "body")
            try:
                env = self._envelope_decoder.decode(body)
            except Exception as exc:
                raise self._envelope_error(body, exc) from None
            ce_subject = env.subject
            content_type = env.datacontenttype
            source = env.source
            # One cheap expression for the valid case; _check_context finds
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
                _check_context(
                    env.specversion, env.id, source, env.type, ce_subject, content_type, env.dataschema
                )
            event_time = None
            if env.time:
                try:
                    event_time = self._time_decoder.decode(env.time)
                except msgspec.DecodeError:
                    raise _bad_time("time", env.time, INVALID_ENVELOPE, None) from None
                if event_time is not None and event_time.tzinfo is not _UTC:
                    event_time = _aware_utc(event_time, INVALID_ENVELOPE, "time", None)
            data_raw = env.data
            data_base64 = env.data_base64
            if data_base64 is not None:
                if data_raw and data_raw != _NULL:
                    raise _Reject(INVALID_ENVELOPE, "event has both data and data_base64")
                _check_content_type(content_type)
                data = self._data_from_base64(data_base64)
            else:
                if content_type is not None and content_type != "application/json":
                    _check_content_type(content_type)
                data = None
                if data_raw:
                    try:
                        data = self._data_decoder.decode(data_raw)
                    except Exception as exc:
                        raise _data_error(exc, INVALID_DATA) from None
                if data is None:
                    raise _Reject(INVALID_DATA, "event has no data")
        else:
            ce_subject = attrs.get("subject")
            content_type = attrs.get("datacontenttype")
            source = attrs.get("source")
            _check_context(
                attrs.get("specversion"),
                attrs.get("id"),
                source,
                attrs.get("type"),
                ce_subject,
                content_type,
                attrs.get("dataschema"),
            )
            ce_time = attrs.get("time")
            event_time = self._header_time(ce_time) if ce_time is not None else None
            _check_content_type(content_type)
            data = self._data_from_bytes(body, MALFORMED_JSON)
        if "\x00" in source:  # type: ignore[operator]
            raise _Reject(INVALID_ENVELOPE, "source contains a NUL character")

        # Instance id: data.id, else the CE subject (only when data.id is absent).
        instance_id = data.id
        if instance_id is None:
            if ce_subject is None:
                raise _Reject(MISSING_INSTANCE_ID, "data.id is absent and the event has no subject")
            instance_id = ce_subject
            where = "subject"
        else:
            where = "data.id"
        if type(instance_id) is not str or _match_instance_id(instance_id) is None:
            raise _Reject(
                INVALID_INSTANCE_ID,
                f"{where} {_show(instance_id)} is not an instance id "
                f"(1-{MAX_INSTANCE_ID_LENGTH} characters of A-Z a-z 0-9 . _ : -)",
            )

        status = data.status
        if type(status) is not str:
            what = "absent" if status is None else f"not a string: {_show(status)}"
            raise _Reject(INVALID_DATA, f"data.status is {what}", instance_id)
        canonical = lookup.get(status.strip().lower())
        if canonical is None:
            raise _Reject(
                UNKNOWN_STATUS, f"status {_show(status)} is not a {service_type} status", instance_id
            )

        message = data.message
        if message is None:
            message = ""
        elif type(message) is not str:
            raise _Reject(INVALID_DATA, f"data.message is not a string: {_show(message)}", instance_id)
        elif "\x00" in message:
            raise _Reject(INVALID_DATA, "data.message contains a NUL character", instance_id)

        outputs = self._outputs(data.output_spec, instance_id) if data.output_spec else None

        if event_time is None:
            if data.timestamp:
                event_time = self._timestamp(data.timestamp, instance_id)
            if event_time is None:
                event_time = _EPOCH + timedelta(microseconds=stream_time_ns // 1000)

        return StatusUpdate(
            instance_id, service_type, canonical, message, source, outputs, event_time, stream_seq
        )

    # -- parsing helpers (each raises _Reject with the right reason) -----------

    def _envelope_error(self, body: bytes, exc: Exception) -> _Reject:
        """Classify a failure to decode the structured-mode body."""
        if isinstance(exc, msgspec.ValidationError):
            # msgspec stops at the first type mismatch, before it has seen the
            # whole text: find out whether the body is JSON at all.
            try:
                value = self._any_decoder.decode(body)
            except Exception as exc2:
                if isinstance(exc2, msgspec.ValidationError):
                    return _Reject(INVALID_ENVELOPE, f"body: {exc}")
                return _json_error(exc2, MALFORMED_JSON, "body")
            if isinstance(value, list):
                return _Reject(
                    INVALID_ENVELOPE, "body is a JSON array, not an event (batches are not supported)"
                )
            if not isinstance(value, dict):
                return _Reject(INVALID_ENVELOPE, f"body is a JSON {_json_kind(value)}, not an object")
            return _Reject(INVALID_ENVELOPE, f"body: {exc}")
        return _json_error(exc, MALFORMED_JSON, "body")

    def _data_from_bytes(self, payload: bytes, syntax_reason: str) -> _Data:
        """`data` given as bytes: the binary-mode body or decoded data_base64."""
        if not payload:
            raise _Reject(INVALID_DATA, "event has no data")
        if not payload.isascii():
            _check_utf8(payload, syntax_reason, "data")
        try:
            data = self._data_decoder.decode(payload)
        except Exception as exc:
            if isinstance(exc, msgspec.ValidationError):
                # Distinguish "not an object" from "not JSON at all".
                try:
                    self._any_decoder.decode(payload)
                except Exception as exc2:
                    if not isinstance(exc2, msgspec.ValidationError):
                        raise _json_error(exc2, syntax_reason, "data") from None
            raise _data_error(exc, syntax_reason) from None
        if data is None:
            raise _Reject(INVALID_DATA, "data is null")
        return data

    def _data_from_base64(self, value: object) -> _Data:
        if type(value) is not str:
            raise _Reject(INVALID_ENVELOPE, f"data_base64 is not a string: {_show(value)}")
        try:
            payload = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise _Reject(INVALID_DATA, "data_base64 is not valid base64") from None
        return self._data_from_bytes(payload, INVALID_DATA)

    def _timestamp(self, raw: Raw, instance_id: str) -> datetime | None:
        """`data.timestamp`, read only when the CE time is absent."""
        try:
            value = self._time_decoder.decode(raw)
        except msgspec.DecodeError:
            raise _bad_time("data.timestamp", raw, INVALID_DATA, instance_id) from None
        if value is None or value.tzinfo is _UTC:
            return value
        return _aware_utc(value, INVALID_DATA, "data.timestamp", instance_id)

    def _header_time(self, value: str) -> datetime:
        try:
            parsed = msgspec.convert(value, datetime)
        except msgspec.ValidationError:
            raise _Reject(
                INVALID_ENVELOPE, f"time {_show(value)} is not an RFC 3339 timestamp"
            ) from None
        return _aware_utc(parsed, INVALID_ENVELOPE, "time", None)

    def _outputs(self, raw: Raw, instance_id: str) -> bytes | None:
        text = bytes(raw)  # also detaches it from the (larger) body buffer
        if text[:1] != b"{":
            return None  # only an object is an output spec; anything else is ignored
        # Decode once so that whatever PostgreSQL jsonb would refuse is caught
        # here: unpaired surrogate escapes, numbers out of range, \u0000.
        try:
            value = self._any_decoder.decode(text)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise _Reject(INVALID_DATA, f"data.output_spec cannot be stored: {exc}", instance_id) from None
        except RecursionError:
            raise _Reject(TOO_LARGE, "data.output_spec is nested too deeply", instance_id) from None
        if b"\\u0000" in text and _contains_nul(value):
            raise _Reject(INVALID_DATA, "data.output_spec contains a NUL character", instance_id)
        return text

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
                body=bytes(body[:DEAD_LETTER_BODY_BYTES])  # type: ignore[index]
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


def is_json_media_type(content_type: str) -> bool:
    """True for ``*/json`` and ``*/*+json``, any case, parameters ignored."""
    media_type = content_type.partition(";")[0].strip().lower()
    top, slash, sub = media_type.partition("/")
    if not (top and slash and sub) or "/" in sub or " " in media_type:
        return False
    return sub == "json" or sub.endswith("+json")


def _check_context(
    specversion: object,
    ce_id: object,
    source: object,
    ce_type: object,
    subject: object,
    content_type: object,
    dataschema: object,
) -> None:
    """The CloudEvents attribute rules of CONTRACT §3 (time is parsed apart)."""
    if specversion != "1.0":
        if type(specversion) is str and specversion:
            raise _Reject(
                UNSUPPORTED_SPECVERSION, f"specversion {_show(specversion)} is not supported (only 1.0)"
            )
        raise _Reject(INVALID_ENVELOPE, _attr_error("specversion", specversion))
    for name, value in (("id", ce_id), ("source", source), ("type", ce_type)):
        if type(value) is not str or not value:
            raise _Reject(INVALID_ENVELOPE, _attr_error(name, value))
    for name, value in (
        ("subject", subject),
        ("datacontenttype", content_type),
        ("dataschema", dataschema),
    ):
        if value is not None and (type(value) is not str or not value):
            raise _Reject(INVALID_ENVELOPE, _attr_error(name, value, optional=True))


def _check_content_type(content_type: str | None) -> None:
    if content_type is not None and content_type != "application/json":
        if not is_json_media_type(content_type):
            raise _Reject(
                INVALID_DATA, f"datacontenttype {_show(content_type)} is not JSON; data cannot be read"
            )


def _check_utf8(buf: bytes, reason: str, what: str) -> None:
    """UTF-8 validity, which msgspec does not check in skipped or raw members.

    Callers skip it for ASCII text (`bytes.isascii` is far cheaper).
    """
    try:
        buf.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Reject(reason, f"{what} is not valid UTF-8 (byte {exc.start})") from None


def _json_error(exc: Exception, syntax_reason: str, what: str) -> _Reject:
    """The rejection for an exception from msgspec (not a ValidationError)."""
    if isinstance(exc, RecursionError):
        return _Reject(TOO_LARGE, f"{what} is nested too deeply")
    if isinstance(exc, (msgspec.DecodeError, UnicodeDecodeError)):
        return _Reject(syntax_reason, f"{what} is not JSON: {exc}")
    raise exc  # unexpected: let the last-resort handler in decode() report it


def _bad_time(name: str, raw: Raw, reason: str, instance_id: str | None) -> _Reject:
    shown = _show(bytes(raw).decode("utf-8", "replace"))
    return _Reject(reason, f"{name} {shown} is not an RFC 3339 timestamp", instance_id)


def _binary_attributes(headers: object) -> dict[str, str | None] | None:
    """CE attributes from binary-mode headers, or None for structured mode."""
    if not isinstance(headers, Mapping):
        raise _Reject(INVALID_ENVELOPE, f"headers are not a mapping: {type(headers).__name__}")
    ce: dict[str, object] = {}
    content_type: object = None
    for name, value in headers.items():
        if type(name) is not str:
            continue  # not a header a publisher can set; nothing we read
        lname = name.lower()
        if lname == "content-type":
            content_type = value
        elif lname.startswith("ce-"):
            ce[lname[3:]] = value
    if content_type is not None:
        if type(content_type) is not str:
            raise _Reject(INVALID_ENVELOPE, "content-type header is not text")
        if content_type.partition(";")[0].strip().lower() == "application/cloudevents+json":
            return None
    if "specversion" not in ce:
        if content_type is None:
            return None
        raise _Reject(
            INVALID_ENVELOPE,
            f"content type {_show(content_type)} is not application/cloudevents+json "
            "and there is no ce-specversion header (binary mode)",
        )
    attrs: dict[str, str | None] = {}
    for name, value in ce.items():
        if type(value) is not str:
            raise _Reject(INVALID_ENVELOPE, f"header ce-{name} is not text")
        if "%" in value:
            try:
                value = unquote_to_bytes(value).decode("utf-8")
            except UnicodeDecodeError:
                raise _Reject(
                    INVALID_ENVELOPE, f"header ce-{name} is not valid percent-encoded UTF-8"
                ) from None
        attrs[name] = value
    attrs["datacontenttype"] = content_type  # type: ignore[assignment]
    return attrs


def _aware_utc(value: datetime, reason: str, name: str, instance_id: str | None) -> datetime:
    if value.tzinfo is None:
        raise _Reject(reason, f"{name} {value.isoformat()!r} has no UTC offset", instance_id)
    if value.tzinfo is _UTC:
        return value
    try:
        return value.astimezone(_UTC)
    except OverflowError:
        raise _Reject(reason, f"{name} is out of range", instance_id) from None


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


def _data_error(exc: Exception, syntax_reason: str) -> _Reject:
    """The rejection for a failure to decode `data` into _Data."""
    if not isinstance(exc, msgspec.ValidationError):
        return _json_error(exc, syntax_reason, "data")
    # msgspec says "Expected `object | null`, got `array`" for the top level
    # and appends " - at `$.path`" for anything nested.
    text = str(exc)
    if text.startswith("Expected `object") and " - at " not in text:
        return _Reject(INVALID_DATA, "data is not a JSON object (got " + text.rpartition("got ")[2].strip("`") + ")")
    return _Reject(INVALID_DATA, f"data: {text}")


def _attr_error(name: str, value: object, optional: bool = False) -> str:
    if value is None:
        return f"required attribute {name} is absent"
    kind = "optional attribute" if optional else "attribute"
    return f"{kind} {name} must be a non-empty string, got {_show(value)}"


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _show(value: object) -> str:
    """A short, printable rendering of a value for a rejection detail."""
    if isinstance(value, str):
        # repr escapes control characters and lone surrogates: the detail is
        # always safe to log and to store.
        return repr(value) if len(value) <= 80 else repr(value[:77]) + "..."
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if type(value) is float or (type(value) is int and abs(value) < 10**18):
        return repr(value)
    kind = _json_kind(value)
    return f"a JSON {kind}" if kind in ("number", "array", "object") else f"a {kind}"


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
