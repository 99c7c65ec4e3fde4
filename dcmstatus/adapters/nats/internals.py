"""Every use of nats-py's private API, in one place, behind a start-up check.

Two steps of the consume path are too slow through the public API (profiled,
docs/performance.md), and one is unsafe:

- receiving: the subscription path builds a Msg, parses headers and passes
  each message through an asyncio.Queue and a task switch before our
  callback, about a quarter of the consume path. It also decodes subject and
  reply itself: a frame whose bytes are not UTF-8 raises inside nats-py's
  reader, which then stops reading for good. The frame hook takes the frames
  of one subscription straight from the protocol parser, as bytes, and
  nothing it is given escapes into nats-py.
- parsing, per message: nats-py's parser matches a regular expression on
  its bytearray, deletes the frame from the front of it twice, copies the
  payload and awaits a coroutine per message: after our own work, the
  largest cost of a drain (profiled, docs/performance.md#why-it-is-fast).
  `install_frame_parser()` reads runs of our subscription's MSG/HMSG frames
  from each chunk read off the socket in one loop, with no coroutine per
  frame, and hands anything else (PING, INFO, -ERR, other subscriptions, a
  line it does not read exactly as the server writes it) to nats-py's own
  parser, unchanged. `frame_parser_problem()` checks it at start-up by
  feeding nats-py's parser class a recorded byte stream, cut at every byte.
- acking: publish() per ack costs about 20% (subject checks, three buffer
  appends); one raw ``PUB <reply> 4\\r\\n+ACK`` buffer write per batch does not.
- the server's INFO: whether the server is part of a cluster, and which
  servers it lists (`server_info()`), is only in nats-py's `_server_info`;
  without it (`{}`) the server is taken for a single one.
- parsing: nats-py's protocol parser splits a MSG line on any ASCII
  whitespace, nats-server only on space and tab; a subject or reply with a
  vertical tab or form feed (which the server accepts and stores) fails the
  parser's pattern, and the connection is reset, again on every redelivery.
  `widen_protocol_parser()` makes the parser split as the server does.

`fast_path_problem()` checks that the internals are what this module was
written against (names, signatures, attributes). When they are not, the
source logs it once and uses the public API instead: the subscription
callback, and publish(reply, b"+ACK") per message. When only the frame
parser's check fails, the frame hook is used without it.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable
from typing import Any, Final

import nats.protocol.parser

__all__ = [
    "fast_path_problem",
    "frame_parser_problem",
    "install_frame_hook",
    "install_frame_parser",
    "install_reply_hook",
    "raw_send_problem",
    "remove_frame_hook",
    "send_acks",
    "send_raw",
    "server_info",
    "widen_protocol_parser",
]

# nats.aio.client.Client._process_msg, called by the protocol parser per frame.
_PROCESS_MSG: Final = ["sid", "subject", "reply", "data", "headers"]
_ACK_END: Final = " 4\r\n+ACK\r\n"  # the rest of "PUB <reply> 4\r\n+ACK\r\n"
_ACK_JOIN: Final = _ACK_END + "PUB "

# (subject, reply, data, raw header block or None) -> whether to run `after`
FrameHandler = Callable[[bytes, bytes, bytes, "bytes | None"], bool]


def _client_method_problems(nc: Any) -> list[str]:
    """What differs from what both fast paths expect of the Client's private
    coroutine methods (_process_msg exactly, the others by their leading
    parameters)."""
    problems = []
    for name, leading in (("_process_msg", _PROCESS_MSG), ("_send_command", ["cmd"]), ("_flush_pending", [])):
        method = getattr(nc, name, None)
        if not inspect.iscoroutinefunction(method):
            problems.append(f"Client.{name} is not a coroutine method")
            continue
        params = list(inspect.signature(method).parameters)
        if params[: len(leading)] != leading or (name == "_process_msg" and params != leading):
            problems.append(f"Client.{name} takes ({', '.join(params)})")
    return problems


def fast_path_problem(nc: Any, sub: Any) -> str | None:
    """Why the fast path cannot be used with this nats-py client and
    subscription, in one sentence, or None when it can."""
    problems = _client_method_problems(nc)
    sid = getattr(sub, "_id", None)
    subs = getattr(nc, "_subs", None)
    if type(sid) is not int or not isinstance(subs, dict) or subs.get(sid) is not sub:
        problems.append("a subscription is not registered in Client._subs under its _id")
    return "; ".join(problems) or None


def install_frame_hook(
    nc: Any,
    sub: Any,
    on_frame: FrameHandler,
    after: Callable[[], Awaitable[None]],
    on_error: Callable[[BaseException], None],
) -> None:
    """Route the frames of `sub` to `on_frame`, straight from nats-py's parser.

    `on_frame(subject, reply, data, header_block)` gets the frame's bytes as
    the server sent them; when it returns True, `after()` is awaited (the
    source sends its next pull request). Frames of other subscriptions go
    on to nats-py. Whatever is raised on the way, by us or by nats-py on a
    frame it cannot read, goes to `on_error` instead of into the parser:
    the reader keeps reading. Check `fast_path_problem()` first.
    """
    original = nc._process_msg
    sid = sub._id

    async def process_msg(msg_sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
        try:
            if msg_sid != sid:
                await original(msg_sid, subject, reply, data, headers)
            elif on_frame(subject, reply, data, headers):
                await after()
        except Exception as exc:
            on_error(exc)

    nc._process_msg = process_msg


def remove_frame_hook(nc: Any) -> None:
    """Undo install_frame_hook and install_frame_parser (nats-py's own
    methods show through again), before hooking a new subscription."""
    vars(nc).pop("_process_msg", None)
    parser = getattr(nc, "_ps", None)
    if parser is not None:
        vars(parser).pop("parse", None)


_MAX_LINE: Final = 4096  # nats-py's MAX_CONTROL_LINE_SIZE: a longer line is not ours to read
# nats.protocol.parser's states and Parser attributes, as written against.
_PARSER_ATTRS: Final = ("buf", "state", "needed", "header_needed", "msg_arg")


def frame_parser_problem(nc: Any) -> str | None:
    """Why install_frame_parser() cannot be used on this client, in one
    sentence, or None when it can: nats-py's Parser is what this was written
    against, and a recorded stream of frames (ours, another subscription's,
    PING, +OK, a status) fed through it cut at every byte gives exactly what
    nats-py's own parser gives."""
    parser = getattr(nc, "_ps", None)
    module = nats.protocol.parser
    if not isinstance(parser, module.Parser):
        return "Client._ps is not a nats.protocol.parser.Parser"
    if getattr(module, "AWAITING_CONTROL_LINE", None) != 1 or getattr(module, "AWAITING_MSG_PAYLOAD", None) != 2:
        return "nats.protocol.parser's states are not the ones expected"
    missing = [name for name in _PARSER_ATTRS if not hasattr(parser, name)]
    if missing or type(parser.buf) is not bytearray:
        return f"nats.protocol.parser.Parser lacks {', '.join(missing) or 'a bytearray buf'}"
    if not inspect.iscoroutinefunction(parser.parse) or list(inspect.signature(parser.parse).parameters) != ["data"]:
        return "nats.protocol.parser.Parser.parse is not a coroutine method taking (data)"
    try:
        return _parser_self_test()
    except Exception as exc:  # whatever it is, the parser is not what we know
        return f"the frame parser's self-test raised {type(exc).__name__}: {exc}"


_TEST_SID: Final = 5


def _msg(subject: bytes, sid: int, reply: bytes, data: bytes, header: bytes = b"", sep: bytes = b" ") -> bytes:
    op, sizes = (b"HMSG", b"%d %d" % (len(header), len(header) + len(data))) if header else (b"MSG", b"%d" % len(data))
    return sep.join([op, subject, b"%d" % sid, *([reply] if reply else []), sizes]) + b"\r\n" + header + data + b"\r\n"


_TEST_STREAM: Final = b"".join([
    _msg(b"_INBOX.a", 5, b"$JS.ACK.s.c.1.1.1.1700000000000000000.2", b"one"),
    b"PING\r\n",
    _msg(b"_INBOX.a", 5, b"$JS.ACK.s.c.1.2.2.1700000000000000001.1", b""),
    b"+OK\r\n",
    _msg(b"_INBOX.b", 6, b"", b"else"),
    _msg(b"_INBOX.a", 5, b"", b"", b"NATS/1.0 408 Request Timeout\r\n\r\n"),
    _msg(b"_INBOX.a", 5, b"$JS.ACK.s.c.1.3.3.1700000000000000002.0", b"three", sep=b" \t"),
    _msg(b"_INBOX.a", 5, b"$JS.ACK.s.c.1.4.4.1700000000000000003.0", b"four", b"NATS/1.0\r\na: b\r\n\r\n"),
    _msg(b"_INBOX.a", 15, b"$JS.ACK.s.c.1.5.5.1700000000000000004.0", b"5 "),
    b"PONG\r\n",
])  # fmt: skip
_TEST_OPERATIONS: Final = 9


def _parser_self_test() -> str | None:
    class Recorder:
        def __init__(self) -> None:
            self.seen: list[tuple[Any, ...]] = []

        async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
            self.seen.append(("msg", sid, bytes(subject), bytes(reply), bytes(data), headers))

        async def _process_ping(self) -> None:
            self.seen.append(("ping",))

        async def _process_pong(self) -> None:
            self.seen.append(("pong",))

    async def feed(cut: int | None) -> list[tuple[Any, ...]]:
        recorder = Recorder()
        parser = nats.protocol.parser.Parser(recorder)
        if cut is not None:
            def on_frame(subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> bool:
                recorder.seen.append(("msg", _TEST_SID, subject, reply, data, headers))
                return False

            async def after() -> None:
                pass

            def on_error(exc: BaseException) -> None:
                raise exc

            _install_parser(parser, _TEST_SID, on_frame, after, on_error)
            for chunk in (_TEST_STREAM[:cut], _TEST_STREAM[cut:]):
                await parser.parse(chunk)
        else:
            await parser.parse(_TEST_STREAM)
        return recorder.seen

    async def check() -> str | None:
        wanted = await feed(None)
        if len(wanted) != _TEST_OPERATIONS:
            return f"nats-py's parser reads the recorded stream as {len(wanted)} operations, not {_TEST_OPERATIONS}"
        for cut in range(len(_TEST_STREAM) + 1):
            if await feed(cut) != wanted:
                return f"the frame parser reads the recorded stream differently from nats-py's when cut at {cut}"
        return None

    # Nothing in it waits, so it runs without an event loop (the service's
    # is trio's, where asyncio's run_until_complete is refused).
    coroutine = check()
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    coroutine.close()
    return "the frame parser's self-test waited for something"


def install_frame_parser(
    nc: Any,
    sub: Any,
    on_frame: FrameHandler,
    after: Callable[[], Awaitable[None]],
    on_error: Callable[[BaseException], None],
) -> None:
    """Read runs of `sub`'s frames straight off each chunk nats-py reads
    (see the module docstring); `on_frame` and `after` as for
    install_frame_hook, but `after()` is awaited at most once per chunk, when
    `on_frame` returned True for one of its frames. Install
    the frame hook too: frames this hands to nats-py's parser reach us
    through it. Check `frame_parser_problem()` first."""
    _install_parser(nc._ps, sub._id, on_frame, after, on_error)


def _install_parser(
    parser: Any,
    sid: int,
    on_frame: FrameHandler,
    after: Callable[[], Awaitable[None]],
    on_error: Callable[[BaseException], None],
) -> None:
    original = parser.parse  # the bound method of nats-py's class
    own = b"%d" % sid
    control_line = nats.protocol.parser.AWAITING_CONTROL_LINE

    async def parse(data: bytes = b"") -> None:
        pending = parser.buf
        if parser.state != control_line:
            await original(data)  # nats-py is in the middle of a frame: it finishes the chunk
            return
        if pending:
            buf = bytes(pending) + data
            pending.clear()
        else:
            buf = bytes(data)
        end = len(buf)
        pos = 0
        due = False
        wait = False  # the rest is the start of one of our frames: wait for the next chunk
        find = buf.find
        while pos < end:
            # MSG <subject> <sid> [<reply>] <size>, or HMSG … <header size> <size>,
            # one space apart as nats-server writes them; anything else (other
            # operations, other subscriptions, other spacing) is nats-py's to read.
            if buf.startswith(b"MSG ", pos):
                start = pos + 4
                headers = False
            elif buf.startswith(b"HMSG ", pos):
                start = pos + 5
                headers = True
            else:
                wait = end - pos < 5 and (b"MSG ".startswith(buf[pos:]) or b"HMSG ".startswith(buf[pos:]))
                break
            eol = find(b"\r\n", start, start + _MAX_LINE)
            if eol < 0:
                wait = end - start < _MAX_LINE
                break
            args = buf[start:eol].split(b" ")
            count = len(args)
            if headers:
                if count == 5:
                    subject, frame_sid, reply, head, size = args
                elif count == 4:
                    subject, frame_sid, head, size = args
                    reply = b""
                else:
                    break
            else:
                head = b"0"
                if count == 4:
                    subject, frame_sid, reply, size = args
                elif count == 3:
                    subject, frame_sid, size = args
                    reply = b""
                else:
                    break
            if frame_sid != own or not (subject and size.isdigit() and head.isdigit()):
                break
            body_at = eol + 2
            frame_end = body_at + int(size)
            header_end = body_at + int(head)
            if header_end > frame_end:
                break
            if frame_end + 2 > end:
                wait = True
                break
            try:
                if headers:
                    due = on_frame(subject, reply, buf[header_end:frame_end], buf[body_at:header_end]) or due
                else:
                    due = on_frame(subject, reply, buf[body_at:frame_end], None) or due
            except Exception as exc:
                on_error(exc)
            pos = frame_end + 2
        if pos < end:
            pending += buf[pos:]
            if not wait:
                await original(b"")  # nats-py reads the rest, as it would have
        if due:
            try:
                await after()
            except Exception as exc:
                on_error(exc)

    parser.parse = parse


def raw_send_problem(nc: Any) -> str | None:
    """Why the change relay's raw publish and reply hook cannot be used with
    this nats-py client, in one sentence, or None when they can."""
    problems = _client_method_problems(nc)
    return "; ".join(problems) or None


def install_reply_hook(nc: Any, sid: int, on_reply: Callable[[bytes, bytes], None]) -> None:
    """Hand header-less frames of subscription `sid` (publish acks) to
    `on_reply(subject, data)` straight from nats-py's parser; frames with
    headers (no responders, status messages) and other subscriptions' frames
    go on to nats-py. Check `raw_send_problem()` first."""
    original = nc._process_msg

    async def process_msg(msg_sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> None:
        if msg_sid != sid or headers:
            await original(msg_sid, subject, reply, data, headers)
            return
        on_reply(subject, data)

    nc._process_msg = process_msg


async def send_raw(nc: Any, commands: bytes) -> None:
    """Write ready protocol lines (a window of HPUBs) in one buffer write,
    then kick nats-py's flusher; during a reconnect they wait in its
    pending buffer, as publish() would leave them."""
    await nc._send_command(commands)
    await nc._flush_pending()


async def send_acks(nc: Any, tokens: list[str]) -> None:
    """Ack JetStream messages by their reply subjects: one buffer write for
    the batch, then a kick of nats-py's flusher. During a reconnect the bytes
    wait in the pending buffer, as publish() would leave them."""
    if tokens:
        # One str join and one encode for the batch, not three bytes operations per ack.
        await nc._send_command(("PUB " + _ACK_JOIN.join(tokens) + _ACK_END).encode())
    await nc._flush_pending()


# nats.protocol.parser's MSG and HMSG patterns as written against (\\s: any
# ASCII whitespace), and the same split on space and tab only, as the server does.
_NARROW: Final = {
    "MSG_RE": b"\\AMSG\\s+([^\\s]+)\\s+([^\\s]+)\\s+(([^\\s]+)[^\\S\r\n]+)?(\\d+)\r\n",
    "HMSG_RE": b"\\AHMSG\\s+([^\\s]+)\\s+([^\\s]+)\\s+(([^\\s]+)[^\\S\r\n]+)?([\\d]+)\\s+(\\d+)\r\n",
}
_ARG: Final = rb"([^ \t\r\n]+)"
_WIDE: Final = {
    "MSG_RE": re.compile(rb"\AMSG[ \t]+" + _ARG + rb"[ \t]+" + _ARG + rb"[ \t]+(" + _ARG + rb"[ \t]+)?(\d+)\r\n"),
    "HMSG_RE": re.compile(
        rb"\AHMSG[ \t]+" + _ARG + rb"[ \t]+" + _ARG + rb"[ \t]+(" + _ARG + rb"[ \t]+)?(\d+)[ \t]+(\d+)\r\n"
    ),
}


def widen_protocol_parser() -> str | None:
    """Make nats-py's parser split MSG/HMSG lines on space and tab only (for
    every client of this process). Returns why it could not, or None."""
    parser = nats.protocol.parser
    for name, pattern in _NARROW.items():
        current = getattr(parser, name, None)
        if current is not _WIDE[name] and getattr(current, "pattern", None) != pattern:
            return f"nats.protocol.parser.{name} is not the pattern expected"
    for name, wide in _WIDE.items():
        setattr(parser, name, wide)
    return None


def server_info(nc: Any) -> dict[str, Any]:
    """The INFO the connected server sent (its `cluster` name and
    `connect_urls` when it is clustered); {} when nats-py keeps it elsewhere."""
    info = getattr(nc, "_server_info", None)
    return info if isinstance(info, dict) else {}
