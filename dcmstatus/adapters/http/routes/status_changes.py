"""/api/v1/status-changes: the change feed, as pages of JSON or, with
`Accept: text/event-stream`, live as Server-Sent Events (docs/changes.md#watch-stream).

A stream holds no queue of its own. It keeps a position (the last change id
it sent) and, on every wake-up, reads the table after it in pages, sending
each page before it reads the next: a client that reads slowly only makes
its `send` wait (the socket's buffer is the buffer), and when it catches up
it continues from the table. Memory per stream is one page.
"""

from __future__ import annotations

import logging
import re

import msgspec
import trio
from prometheus_client import CollectorRegistry, Gauge
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from dcmstatus.adapters.http.inputs import page_size, query_params
from dcmstatus.adapters.http.page_tokens import ChangeCursor, PageTokens
from dcmstatus.adapters.http.problems import HTTPProblem
from dcmstatus.adapters.http.responses import JSONResponse
from dcmstatus.adapters.http.routing import resource
from dcmstatus.adapters.postgres.changes import ChangeNotifier, ChangeStore, StatusChange
from dcmstatus.core.errors import StoreUnavailable

__all__ = ["DEFAULT_MAX_STREAMS", "HEARTBEAT_SECONDS", "StatusChangeRoutes"]

log = logging.getLogger("dcmstatus.adapters.http")

PATH = "/api/v1/status-changes"
DEFAULT_MAX_STREAMS = 100
HEARTBEAT_SECONDS = 15.0  # at most this long without a byte on an open stream
STREAM_PAGE = 100  # changes read (and held) per query of a stream
_CHANGE_ID_RE = re.compile(r"[0-9]{1,18}")  # below 2**63: a bigserial
_encoder = msgspec.json.Encoder()


class StatusChangePage(msgspec.Struct, omit_defaults=True):
    status_changes: list[StatusChange]
    next_page_token: str | None = None


def _change_id(value: str, name: str) -> int:
    if not _CHANGE_ID_RE.fullmatch(value):
        raise HTTPProblem(400, f"{name} must be a change id: a non-negative integer")
    return int(value)


def _wants_event_stream(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    media = (part.split(";")[0].strip().lower() for part in accept.split(","))
    return request.method == "GET" and "text/event-stream" in media


def _event(change: StatusChange) -> bytes:
    # msgspec's JSON has no raw newlines (they are escaped in strings), so
    # the change is one `data:` line.
    return b"id: %d\nevent: status-change\ndata: %s\n\n" % (change.change_id, _encoder.encode(change))


class StatusChangeRoutes:
    """`max_streams` open event streams at most (503 beyond); a stream sends
    a heartbeat comment after `heartbeat` seconds without anything else."""

    def __init__(
        self,
        store: ChangeStore,
        notifier: ChangeNotifier,
        tokens: PageTokens,
        registry: CollectorRegistry,
        max_streams: int = DEFAULT_MAX_STREAMS,
        heartbeat: float = HEARTBEAT_SECONDS,
    ) -> None:
        self._store = store
        self._notifier = notifier
        self._tokens = tokens
        self._max_streams = max_streams
        self._heartbeat = heartbeat
        self.open_streams = 0
        Gauge(
            "dcmstatus_watch_streams", "open watch streams (Server-Sent Events of /api/v1/status-changes)", registry=registry
        ).set_function(lambda: self.open_streams)
        self.routes: list[Route] = [resource(PATH, get=self.get)]

    async def get(self, request: Request) -> Response:
        if _wants_event_stream(request):
            return await self._stream(request)
        return await self._page(request)

    async def _page(self, request: Request) -> Response:
        query = query_params(request, ["service_type", "instance_id", "after", "max_page_size", "page_token"])
        size = page_size(query.get("max_page_size"))
        service_type, instance_id, after = self._filters(query)
        position = after or 0
        if token := query.get("page_token"):
            cursor = self._tokens.decode(token)
            if not isinstance(cursor, ChangeCursor) or (
                cursor.after,
                cursor.service_type,
                cursor.instance_id,
            ) != (after, service_type, instance_id):
                raise HTTPProblem(400, "page_token belongs to a different query")
            position = cursor.after_change_id
        changes, more = await self._store.page(position, size, service_type, instance_id)
        next_token = None
        if more:
            next_token = self._tokens.encode(ChangeCursor(changes[-1].change_id, after, service_type, instance_id))
        return JSONResponse(StatusChangePage(changes, next_token))

    @staticmethod
    def _filters(query: dict[str, str]) -> tuple[str | None, str | None, int | None]:
        # An empty filter is no filter, as on the other listings; a position
        # is a number or absent.
        after = query.get("after")
        return (
            query.get("service_type") or None,
            query.get("instance_id") or None,
            None if after is None else _change_id(after, "after"),
        )

    async def _stream(self, request: Request) -> Response:
        query = query_params(request, ["service_type", "instance_id", "after"])
        service_type, instance_id, after = self._filters(query)
        # A reconnecting EventSource sends its original URL (with after=) and
        # Last-Event-ID: the latter is where it really is.
        last_event_id = request.headers.get("last-event-id", "").strip()
        position = _change_id(last_event_id, "Last-Event-ID") if last_event_id else after
        if self._notifier.closed:
            raise HTTPProblem(503, "the service is shutting down; reconnect", {"retry-after": "1"})
        if self.open_streams >= self._max_streams:
            raise HTTPProblem(
                503,
                f"too many open watch streams (at most {self._max_streams}); retry later",
                {"retry-after": "5"},
            )
        self.open_streams += 1  # taken here, before any await: the limit holds
        try:
            if position is None:
                position = await self._store.head()  # the present
        except BaseException:
            self.open_streams -= 1
            raise
        return _EventStream(self, position, service_type, instance_id)

    def stream_ended(self) -> None:
        self.open_streams -= 1

    async def follow(self, send: Send, position: int, service_type: str | None, instance_id: str | None) -> None:
        """Send changes after `position` as they are committed, until shutdown."""

        last_write = 0.0

        async def write(data: bytes) -> None:
            nonlocal last_write
            await send({"type": "http.response.body", "body": data, "more_body": True})
            last_write = trio.current_time()

        # The position first, as an id without data: an EventSource dispatches
        # nothing but remembers it, so a reconnect before the first change
        # still resumes here, not at a later present.
        await write(b"id: %d\n\n" % position)
        filtered = service_type is not None or instance_id is not None
        while not self._notifier.closed:
            ticket = self._notifier.ticket()  # before the query: see ChangeNotifier
            # With a filter, rows that do not match are skipped by moving the
            # position to the head, so the next query does not scan them again.
            head = await self._store.head() if filtered else None
            more = True
            while more:
                changes, more = await self._store.page(position, STREAM_PAGE, service_type, instance_id, upto=head)
                if changes:
                    await write(b"".join(_event(change) for change in changes))
                    position = changes[-1].change_id
            if head is not None:
                position = max(position, head)
            with trio.move_on_at(last_write + self._heartbeat):
                await ticket.wait()
            if trio.current_time() >= last_write + self._heartbeat:
                await write(b": heartbeat\n\n")


class _EventStream(Response):
    """The text/event-stream response of one watcher. It ends at shutdown or
    when the database fails (the client reconnects and resumes); a client
    that leaves cancels it at once."""

    def __init__(
        self, routes: StatusChangeRoutes, position: int, service_type: str | None, instance_id: str | None
    ) -> None:
        super().__init__(media_type="text/event-stream")
        self._routes = routes
        self._args = (position, service_type, instance_id)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        disconnected = False

        async def until_disconnect(cancel_scope: trio.CancelScope) -> None:
            nonlocal disconnected
            while (await receive())["type"] != "http.disconnect":
                pass
            disconnected = True
            cancel_scope.cancel()

        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"text/event-stream; charset=utf-8"),
                        (b"cache-control", b"no-store"),
                        (b"x-accel-buffering", b"no"),  # proxies such as nginx: pass events on at once
                    ],
                }
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(until_disconnect, nursery.cancel_scope)
                try:
                    await self._routes.follow(send, *self._args)
                except StoreUnavailable as exc:
                    log.warning("ending a watch stream: %s", exc)
                nursery.cancel_scope.cancel()
            if not disconnected:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self._routes.stream_ended()
