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
callback, and publish(reply, b"+ACK") per message.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable
from typing import Any, Final

import nats.protocol.parser

__all__ = [
    "fast_path_problem",
    "install_frame_hook",
    "install_reply_hook",
    "raw_send_problem",
    "send_acks",
    "send_raw",
    "server_info",
    "widen_protocol_parser",
]

# nats.aio.client.Client._process_msg, called by the protocol parser per frame.
_PROCESS_MSG: Final = ["sid", "subject", "reply", "data", "headers"]
_ACK_TAIL: Final = b" 4\r\n+ACK\r\n"  # the rest of "PUB <reply> 4\r\n+ACK\r\n"

# (subject, reply, data, raw header block or None) -> whether to run `after`
FrameHandler = Callable[[bytes, bytes, bytes, "bytes | None"], bool]


def fast_path_problem(nc: Any, sub: Any) -> str | None:
    """Why the fast path cannot be used with this nats-py client and
    subscription, in one sentence, or None when it can."""
    problems = []
    for name, leading in (("_process_msg", _PROCESS_MSG), ("_send_command", ["cmd"]), ("_flush_pending", [])):
        method = getattr(nc, name, None)
        if not inspect.iscoroutinefunction(method):
            problems.append(f"Client.{name} is not a coroutine method")
            continue
        params = list(inspect.signature(method).parameters)
        if params[: len(leading)] != leading or (name == "_process_msg" and params != leading):
            problems.append(f"Client.{name} takes ({', '.join(params)})")
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


def raw_send_problem(nc: Any) -> str | None:
    """Why the change relay's raw publish and reply hook cannot be used with
    this nats-py client, in one sentence, or None when they can."""
    problems = []
    for name, leading in (("_process_msg", _PROCESS_MSG), ("_send_command", ["cmd"]), ("_flush_pending", [])):
        method = getattr(nc, name, None)
        if not inspect.iscoroutinefunction(method):
            problems.append(f"Client.{name} is not a coroutine method")
            continue
        params = list(inspect.signature(method).parameters)
        if params[: len(leading)] != leading or (name == "_process_msg" and params != leading):
            problems.append(f"Client.{name} takes ({', '.join(params)})")
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
    await nc._send_command(b"".join([b"PUB " + t.encode() + _ACK_TAIL for t in tokens]))
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
