"""The CloudEvents 1.0 NATS binding, as far as dcmstatus reads it
(docs/events.md#envelope): structured mode (the JSON body is the whole
event) and binary mode (attributes in ``ce-*`` headers, body = data), which
mode a message is in, the context-attribute rules, the content-type rules and
the RFC 3339 time parsing.

It knows nothing of DCM: what an event means (service type, instance id,
status) is `dcmstatus.core.decoding`, whose `Decoder` uses these pieces and,
on its hot path, inlines the structured-mode checks; the functions here stay
the statement of each rule and find out which one failed. A broken rule
raises `Invalid` with one of the rejection reasons of docs/events.md#rejections.

Choices where CloudEvents leaves room (docs/events.md#envelope)
-------------------------------------------------------------------
- Structured vs binary (as in the NATS binding): a content type of
  ``application/cloudevents+json`` means structured; otherwise a
  ``ce-specversion`` header means binary; otherwise no content type means
  structured; any other content type is ``invalid_envelope``. In binary mode
  the ``content-type`` header is ``datacontenttype``. Header names are
  case-insensitive; ``ce-*`` values are percent-decoded as UTF-8.
- A structured body that is not parseable JSON (syntax error, trailing
  garbage, invalid UTF-8, empty body, BOM) is ``malformed_json``; valid JSON
  that is not an object (an array / batch, a scalar) is ``invalid_envelope``.
- ``specversion`` missing, null, non-string or empty is ``invalid_envelope``;
  any other string than "1.0" is ``unsupported_specversion``. ``id``,
  ``source`` and ``type`` must be non-empty strings; the known optional
  attributes (subject, time, datacontenttype, dataschema) non-empty strings
  when present (JSON null is absent); extension attributes are ignored.
- ``data`` is JSON when ``datacontenttype`` is absent or ``*/json`` /
  ``*/*+json`` (any case, parameters ignored); otherwise ``invalid_data``.
  ``data`` and ``data_base64`` together are ``invalid_envelope``; a
  ``data_base64`` that is not base64 is ``invalid_data``.
- ``time`` goes through msgspec's RFC 3339 parser, which is slightly lenient
  (lower-case ``t``/``z``, a space separator, ``+hhmm``) and rounds
  sub-microsecond digits to the nearest microsecond (monotone, so ordering is
  kept). A time without an offset is rejected; times are returned in UTC.
- Deep nesting: msgspec raises RecursionError (it does not crash) once
  nesting reaches the interpreter's recursion limit; that is ``too_large``, a
  resource limit like size. An exact depth limit was measured to cost ~1 µs
  per event and was left out: no real event nests beyond ~10.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import unquote_to_bytes

import msgspec
from msgspec import Raw

from dcmstatus.core.model import (
    INVALID_DATA,
    INVALID_ENVELOPE,
    MALFORMED_JSON,
    TOO_LARGE,
    UNSUPPORTED_SPECVERSION,
)

__all__ = [
    "ABSENT",
    "NULL",
    "Envelope",
    "Invalid",
    "aware_utc",
    "bad_time",
    "binary_attributes",
    "check_content_type",
    "check_context",
    "check_utf8",
    "decode_base64",
    "decode_envelope",
    "decode_json",
    "decode_time",
    "envelope_error",
    "header_time",
    "is_json_media_type",
    "json_error",
    "json_kind",
    "show",
]

ABSENT: Final = Raw()  # the default of Raw fields: member not present
NULL: Final = Raw(b"null")
STRUCTURED_CONTENT_TYPE: Final = "application/cloudevents+json"


class Invalid(Exception):
    """An event that breaks a rule: the rejection reason and one sentence.

    The decoder's internal signal (the rare path); it never leaves
    `Decoder.decode`, which turns it into a `Rejection`.
    """

    __slots__ = ("detail", "instance_id", "reason")

    def __init__(self, reason: str, detail: str, instance_id: str | None = None) -> None:
        self.reason = reason
        self.detail = detail
        self.instance_id = instance_id


class Envelope(msgspec.Struct):
    """A structured-mode CloudEvent, attributes as found.

    Attribute types are checked in Python rather than by msgspec so that each
    failure maps to its own reason; `time` and `data` stay raw so they are
    parsed only as far as needed (and `data` is never re-encoded).
    """

    specversion: Any = None
    id: Any = None
    source: Any = None
    type: Any = None
    subject: Any = None
    time: Raw = ABSENT
    datacontenttype: Any = None
    dataschema: Any = None
    data: Raw = ABSENT
    data_base64: Any = None


decode_envelope: Final = msgspec.json.Decoder(Envelope).decode
decode_time: Final = msgspec.json.Decoder(datetime | None).decode  # a JSON string or null
decode_json: Final = msgspec.json.Decoder().decode  # any JSON value


# -- structured mode ----------------------------------------------------------


def envelope_error(body: bytes, exc: Exception) -> Invalid:
    """Classify a failure of `decode_envelope(body)`."""
    if isinstance(exc, msgspec.ValidationError):
        # msgspec stops at the first type mismatch, before it has seen the
        # whole text: find out whether the body is JSON at all.
        try:
            value = decode_json(body)
        except Exception as exc2:
            if isinstance(exc2, msgspec.ValidationError):
                return Invalid(INVALID_ENVELOPE, f"body: {exc}")
            return json_error(exc2, MALFORMED_JSON, "body")
        if isinstance(value, list):
            return Invalid(INVALID_ENVELOPE, "body is a JSON array, not an event (batches are not supported)")
        if not isinstance(value, dict):
            return Invalid(INVALID_ENVELOPE, f"body is a JSON {json_kind(value)}, not an object")
        return Invalid(INVALID_ENVELOPE, f"body: {exc}")
    return json_error(exc, MALFORMED_JSON, "body")


def decode_base64(value: object) -> bytes:
    """The bytes of a structured-mode ``data_base64``."""
    if type(value) is not str:
        raise Invalid(INVALID_ENVELOPE, f"data_base64 is not a string: {show(value)}")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise Invalid(INVALID_DATA, "data_base64 is not valid base64") from None


# -- binary mode ----------------------------------------------------------------


def binary_attributes(headers: object) -> dict[str, str | None] | None:
    """CE attributes from binary-mode headers, or None for structured mode.

    The attributes are the ``ce-*`` headers without the prefix, percent-decoded,
    plus ``datacontenttype`` from the ``content-type`` header (None if absent).
    """
    if not isinstance(headers, Mapping):
        raise Invalid(INVALID_ENVELOPE, f"headers are not a mapping: {type(headers).__name__}")
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
            raise Invalid(INVALID_ENVELOPE, "content-type header is not text")
        if content_type.partition(";")[0].strip().lower() == STRUCTURED_CONTENT_TYPE:
            return None
    if "specversion" not in ce:
        if content_type is None:
            return None
        raise Invalid(
            INVALID_ENVELOPE,
            f"content type {show(content_type)} is not {STRUCTURED_CONTENT_TYPE} "
            "and there is no ce-specversion header (binary mode)",
        )
    attrs: dict[str, str | None] = {}
    for name, value in ce.items():
        if type(value) is not str:
            raise Invalid(INVALID_ENVELOPE, f"header ce-{name} is not text")
        if "%" in value:
            try:
                value = unquote_to_bytes(value).decode("utf-8")
            except UnicodeDecodeError:
                raise Invalid(INVALID_ENVELOPE, f"header ce-{name} is not valid percent-encoded UTF-8") from None
        attrs[name] = value
    attrs["datacontenttype"] = content_type
    return attrs


# -- context attributes and content type ------------------------------------------


def check_context(
    specversion: object,
    ce_id: object,
    source: object,
    ce_type: object,
    subject: object,
    content_type: object,
    dataschema: object,
) -> None:
    """The context-attribute rules (time is parsed apart)."""
    if specversion != "1.0":
        if type(specversion) is str and specversion:
            raise Invalid(UNSUPPORTED_SPECVERSION, f"specversion {show(specversion)} is not supported (only 1.0)")
        raise Invalid(INVALID_ENVELOPE, _attr_error("specversion", specversion))
    for name, value in (("id", ce_id), ("source", source), ("type", ce_type)):
        if type(value) is not str or not value:
            raise Invalid(INVALID_ENVELOPE, _attr_error(name, value))
    for name, value in (
        ("subject", subject),
        ("datacontenttype", content_type),
        ("dataschema", dataschema),
    ):
        if value is not None and (type(value) is not str or not value):
            raise Invalid(INVALID_ENVELOPE, _attr_error(name, value, optional=True))


def is_json_media_type(content_type: str) -> bool:
    """True for ``*/json`` and ``*/*+json``, any case, parameters ignored."""
    media_type = content_type.partition(";")[0].strip().lower()
    top, slash, sub = media_type.partition("/")
    if not (top and slash and sub) or "/" in sub or " " in media_type:
        return False
    return sub == "json" or sub.endswith("+json")


def check_content_type(content_type: str | None) -> None:
    """`data` can be read only as JSON."""
    if content_type is not None and content_type != "application/json" and not is_json_media_type(content_type):
        raise Invalid(INVALID_DATA, f"datacontenttype {show(content_type)} is not JSON; data cannot be read")


# -- JSON text ----------------------------------------------------------------------


def check_utf8(buf: bytes, reason: str, what: str) -> None:
    """UTF-8 validity, which msgspec does not check in skipped or raw members.

    Callers skip it for ASCII text (`bytes.isascii` is far cheaper).
    """
    try:
        buf.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Invalid(reason, f"{what} is not valid UTF-8 (byte {exc.start})") from None


def json_error(exc: Exception, syntax_reason: str, what: str) -> Invalid:
    """The rejection for an exception from msgspec (not a ValidationError)."""
    if isinstance(exc, RecursionError):
        return Invalid(TOO_LARGE, f"{what} is nested too deeply")
    if isinstance(exc, (msgspec.DecodeError, UnicodeDecodeError)):
        return Invalid(syntax_reason, f"{what} is not JSON: {exc}")
    raise exc  # unexpected: let the decoder's last-resort handler report it


# -- time ---------------------------------------------------------------------------


def bad_time(name: str, raw: Raw, reason: str, instance_id: str | None) -> Invalid:
    shown = show(bytes(raw).decode("utf-8", "replace"))
    return Invalid(reason, f"{name} {shown} is not an RFC 3339 timestamp", instance_id)


def aware_utc(value: datetime, reason: str, name: str, instance_id: str | None) -> datetime:
    """`value` in UTC; a time without an offset breaks the rules."""
    if value.tzinfo is None:
        raise Invalid(reason, f"{name} {value.isoformat()!r} has no UTC offset", instance_id)
    if value.tzinfo is UTC:
        return value
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise Invalid(reason, f"{name} is out of range", instance_id) from None


def header_time(value: str) -> datetime:
    """The binary-mode ``ce-time`` attribute, in UTC."""
    try:
        parsed = msgspec.convert(value, datetime)
    except msgspec.ValidationError:
        raise Invalid(INVALID_ENVELOPE, f"time {show(value)} is not an RFC 3339 timestamp") from None
    return aware_utc(parsed, INVALID_ENVELOPE, "time", None)


# -- rendering values in a rejection detail --------------------------------------------


def _attr_error(name: str, value: object, optional: bool = False) -> str:
    if value is None:
        return f"required attribute {name} is absent"
    kind = "optional attribute" if optional else "attribute"
    return f"{kind} {name} must be a non-empty string, got {show(value)}"


def json_kind(value: object) -> str:
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


def show(value: object) -> str:
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
    kind = json_kind(value)
    return f"a JSON {kind}" if kind in ("number", "array", "object") else f"a {kind}"
