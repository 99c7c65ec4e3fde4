"""How a request finds its handler.

Paths are split the way the client wrote them: on "/", then each segment
percent-decoded as UTF-8, so an id holding %2F stays one segment (ASGI's
`path` is decoded whole, which would split it). `RoutingPath` rewrites
`path` into that form for Starlette's router, and answers 404 for a path that
is not UTF-8. A route declares an id segment as `{name:segment}`.

`resource(path, get=..., post=...)` is one route per path with its handlers
by method; Starlette answers HEAD like GET and other methods with 405.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from urllib.parse import unquote, unquote_to_bytes

from starlette.convertors import Convertor, register_url_convertor
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from dcmstatus.adapters.http.responses import ProblemResponse

__all__ = ["Handler", "RoutingPath", "path_segments", "resource"]

Handler = Callable[[Request], Awaitable[Response]]


def path_segments(scope: Scope) -> list[str] | None:
    """The request path split on "/" and decoded per segment; None when a
    segment is not valid UTF-8."""
    raw = scope.get("raw_path")
    if raw is None:  # optional in ASGI; `path` is decoded already
        path: str = scope["path"]
        return path.split("/")[1:]
    try:
        return [unquote_to_bytes(s).decode("utf-8") for s in raw.split(b"/")[1:]]
    except UnicodeDecodeError:
        return None


def _escape(segment: str) -> str:
    # What keeps a decoded segment one segment in the routing path; the
    # convertor below undoes it.
    return segment.replace("%", "%25").replace("/", "%2F")


class _SegmentConvertor(Convertor[str]):
    regex = "[^/]+"

    def convert(self, value: str) -> str:
        return unquote(value)  # only %25 and %2F can occur

    def to_string(self, value: str) -> str:
        return _escape(value)


register_url_convertor("segment", _SegmentConvertor())


class RoutingPath:
    """Rewrites `scope["path"]` so routes see segments as the client sent them."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            segments = path_segments(scope)
            if segments is None:
                await ProblemResponse(404, "no resource here: the path is not valid UTF-8")(scope, receive, send)
                return
            scope["path"] = "/" + "/".join(_escape(s) for s in segments)
        await self.app(scope, receive, send)


def resource(path: str, **handlers: Handler) -> Route:
    """The route of `path`, served by one handler per method (`get=`, `post=`...)."""
    by_method = {method.upper(): handler for method, handler in handlers.items()}

    async def endpoint(request: Request) -> Response:
        # Starlette let through only the methods given, and HEAD with GET.
        return await by_method["GET" if request.method == "HEAD" else request.method](request)

    return Route(path, endpoint, methods=list(by_method), name=path)
