"""Reading one frame of the pull inbox from its raw bytes, trusting nothing:
the subject, the reply subject (the JetStream ack subject, which carries the
stream sequence and time) and the header block.

The source reads the common frame (UTF-8 subject, JetStream ack subject, no
headers) inline; every other frame comes here and ends as a `Frame`, never as
an exception: raised inside nats-py's reader, an exception stops that reader
for good (docs/reliability.md). Pure: no I/O.

What a frame is, decided here:
- a reply subject `$JS.ACK.…` makes it a stream message: it is acknowledged
  whatever else is wrong with it. When something is (a subject or header
  value that is not UTF-8, a broken header block, more than `MAX_HEADERS`
  headers, an ack subject of an unknown form), `problem` says what, and the
  pipeline records it as rejected `invalid_envelope` before the ack;
- no reply subject and an inline status (`NATS/1.0 408 Request Timeout`) is
  the server ending a pull request;
- anything else (no reply, or a reply that is not an ack subject) was not
  sent by JetStream for this consumer and cannot be acknowledged: `ack` is
  None and the source counts and drops it.
"""

from __future__ import annotations

from typing import Final

import msgspec

__all__ = ["MAX_HEADERS", "MAX_HEADER_BYTES", "Frame", "ack_position", "read_frame", "read_headers"]

MAX_HEADERS: Final = 256  # a binary-mode CloudEvent needs about ten
# nats-server stores no larger header block in a stream; checked anyway.
MAX_HEADER_BYTES: Final = 64 * 1024

_VERSION: Final = b"NATS/1.0"
_CRLF: Final = b"\r\n"
_ACK_PREFIX: Final = "$JS.ACK."


class Frame(msgspec.Struct, frozen=True):
    """One frame as read, for the source to act on."""

    subject: str  # as text; bytes that are not UTF-8 shown as \\xNN
    ack: str | None  # the JetStream ack subject; None: not a message we can acknowledge
    stream_seq: int = 0  # 0 when the ack subject does not say
    stream_time_ns: int = 0
    headers: dict[str, str] | None = None
    status: str | None = None  # a server status ending a pull request ("408"), no message
    description: str = ""  # of the status
    problem: str | None = None  # why it cannot be decoded as an event (or, with no ack, why it is dropped)


def ack_position(reply: str) -> tuple[int, int]:
    """(stream sequence, stream time in ns) from a JetStream ack subject.

    ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>``,
    or with domain and account hash after ``ACK`` (11 tokens or more).
    Raises ValueError for anything else. The source's inline path applies
    the same rule (tests/unit/test_frames.py checks they agree).
    """
    tokens = reply.split(".")
    if tokens[0] == "$JS" and tokens[1:2] == ["ACK"]:
        if len(tokens) == 9:
            return int(tokens[5]), int(tokens[7])
        if len(tokens) >= 11:
            return int(tokens[7]), int(tokens[9])
    raise ValueError(f"{reply[:80]!r} is not a JetStream ack subject of a known form")


def read_headers(block: bytes) -> tuple[str | None, str, dict[str, str]]:
    """(inline status or None, its description, headers) of a NATS header block.

    Raises ValueError saying what is wrong: not ``NATS/1.0``, not ended by an
    empty line, a line without ``:``, a name that is not a printable ASCII
    token, a value that is not UTF-8, more than MAX_HEADERS headers or
    MAX_HEADER_BYTES bytes. A repeated name keeps its last value (as nats-py).
    """
    if len(block) > MAX_HEADER_BYTES:
        raise ValueError(f"{len(block)} bytes, more than {MAX_HEADER_BYTES}")
    count = block.count(_CRLF) - 2  # less the version line and the final empty line
    if count > MAX_HEADERS:
        raise ValueError(f"{count} lines, more than {MAX_HEADERS} headers")
    first, sep, rest = block.partition(_CRLF)
    if not first.startswith(_VERSION) or not sep:
        raise ValueError(f"it does not start with a NATS/1.0 line: {block[:24]!r}")
    status, description = None, ""
    tail = first[len(_VERSION) :]
    if tail:
        code, _, text = tail[1:].partition(b" ")
        if tail[:1] != b" " or len(code) != 3 or not code.isdigit():
            raise ValueError(f"its first line is not NATS/1.0 with a status: {first[:24]!r}")
        status, description = code.decode(), text.strip().decode("utf-8", "replace")
    lines = rest.split(_CRLF)
    if len(lines) < 2 or lines[-1] or lines[-2]:
        raise ValueError("it does not end with an empty line")
    headers: dict[str, str] = {}
    for number, line in enumerate(lines[:-2], 2):
        raw_name, colon, raw_value = line.partition(b":")
        if not colon:
            raise ValueError(f"header line {number} has no ':': {line[:40]!r}")
        if not raw_name or not (raw_name.isascii() and raw_name.decode().isprintable()) or b" " in raw_name:
            raise ValueError(f"header line {number} has no valid name: {raw_name[:40]!r}")
        try:
            value = raw_value.strip(b" \t").decode()
        except UnicodeDecodeError:
            raise ValueError(f"the value of header {raw_name.decode()!r} is not UTF-8") from None
        headers[raw_name.decode()] = value
    return status, description, headers


def read_frame(subject: bytes, reply: bytes, header_block: bytes | None) -> Frame:
    """What one frame of the pull inbox is (see the module docstring). Never raises."""
    text = subject.decode("utf-8", "backslashreplace")
    try:
        return _read(subject, text, reply, header_block)
    except Exception as exc:  # none known: a bug here must not stop intake either
        return Frame(text, None, problem=f"the frame could not be read ({type(exc).__name__}: {exc})")


def _read(subject: bytes, text: str, reply: bytes, header_block: bytes | None) -> Frame:
    problems = []
    try:
        subject.decode()
    except UnicodeDecodeError:
        problems.append("the subject is not UTF-8 (stored with \\x escapes)")
    status, description, headers = None, "", None
    if header_block is not None:
        try:
            status, description, headers = read_headers(header_block)
        except ValueError as exc:
            problems.append(f"broken header block: {exc}")
    if not reply:
        if status is not None:
            return Frame(text, None, headers=headers, status=status, description=description)
        return Frame(text, None, problem="; ".join([*problems, "the frame has no reply subject"]))
    try:
        ack = reply.decode()
    except UnicodeDecodeError:
        return Frame(text, None, problem=f"the reply subject {reply[:60]!r} is not UTF-8")
    if not ack.startswith(_ACK_PREFIX):
        return Frame(text, None, problem=f"the reply subject {ack[:60]!r} is not a JetStream ack subject")
    seq = time_ns = 0
    try:
        seq, time_ns = ack_position(ack)
    except ValueError as exc:
        problems.append(str(exc))
    return Frame(text, ack, seq, time_ns, headers, problem="; ".join(problems) if problems else None)
