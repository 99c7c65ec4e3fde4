"""Every use of hypercorn's private API, in one place, behind a check.

hypercorn's HTTP/1.1 protocol writes a response in three socket sends: the
head when the app sends `http.response.start`, the body, and the end of the
message (nothing at all for a body with a Content-Length, still a trip
through the connection's send lock). On loopback a send is the costliest
step of a small GET (profiled, docs/performance.md#why-it-is-fast): the kernel
runs the receiver's side of TCP inside it. `coalesce_response_writes()` makes
a response with a Content-Length one send: its head waits for the body (or
for the end of a body-less response) and goes out with it, and an empty
write is not made. Streamed (chunked) responses, such as the watch stream's
Server-Sent Events, keep sending their head at once, so an event stream is
open for the client before its first event.

`coalesce_response_writes()` checks that the internals are what this module
was written against and returns why not, in one sentence, when they are not;
the server then writes as hypercorn does, which is correct, only slower.
"""

from __future__ import annotations

import inspect
from typing import Any

import h11
from hypercorn.events import RawData
from hypercorn.protocol.h11 import H11Protocol

__all__ = ["coalesce_response_writes"]

_ORIGINAL = H11Protocol._send_h11_event
_HEAD = "_dcmstatus_pending_head"


def _declares_length(event: h11.Response) -> bool:
    return any(name == b"content-length" for name, _ in event.headers)


async def _send_h11_event(self: Any, event: Any) -> None:
    # As H11Protocol._send_h11_event (hypercorn 0.18), holding back the head
    # of a response with a Content-Length until its body is written.
    try:
        data = self.connection.send(event)
    except h11.LocalProtocolError:
        if self.connection.their_state != h11.ERROR:
            raise
        return
    head = getattr(self, _HEAD, None)
    if type(event) is h11.Response and _declares_length(event):
        setattr(self, _HEAD, data)
        return
    if head is not None:
        setattr(self, _HEAD, None)
        data = head + (data or b"")
    if data:
        await self.send(RawData(data=data))


def _problem() -> str | None:
    try:
        source = inspect.getsource(_ORIGINAL)
    except (OSError, TypeError):
        return "the source of H11Protocol._send_h11_event cannot be read"
    if list(inspect.signature(_ORIGINAL).parameters) != ["self", "event"]:
        return "H11Protocol._send_h11_event takes other parameters"
    for part in ("self.connection.send(event)", "await self.send(RawData(data=data))"):
        if part not in source:
            return f"H11Protocol._send_h11_event no longer does {part!r}"
    if "keep_alive_requests" not in inspect.getsource(H11Protocol.stream_send):
        return "H11Protocol.stream_send is not the one this module was written against"
    return None


def coalesce_response_writes() -> str | None:
    """Make hypercorn write a response with a Content-Length in one send;
    None when done (or already done), else why it cannot."""
    if H11Protocol._send_h11_event is _send_h11_event:
        return None
    problem = _problem()
    if problem is None:
        H11Protocol._send_h11_event = _send_h11_event  # type: ignore[method-assign]
    return problem
