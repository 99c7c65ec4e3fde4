"""What a request raised, as the RFC 7807 problem the client gets.

- `HTTPProblem`, raised by our handlers: their own answer (400, 404, 409, ...);
- Starlette's `HTTPException` from the router: a path nothing serves (404) or
  a method the path does not take (405, with a sorted Allow); in a replica
  that does not serve the API (`--role consumer`), the 404 says so;
- `StoreUnavailable`: 503 with Retry-After, the cause in our log only;
- `ClientDisconnect`: the client left mid-request; nobody to answer;
- anything else: `InternalErrors` answers 500 without naming the cause, and
  logs it once with the method and path.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dcmstatus.adapters.http.responses import ProblemResponse
from dcmstatus.core.errors import StoreUnavailable

__all__ = ["EXCEPTION_HANDLERS", "HTTPProblem", "InternalErrors", "role_handlers"]

log = logging.getLogger("dcmstatus.adapters.http")


class HTTPProblem(Exception):
    """Raised while handling a request; answered as a problem response.
    Private to the HTTP layer: it never leaves a request."""

    def __init__(self, status: int, detail: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers


async def _problem(request: Request, exc: Exception) -> ProblemResponse:
    assert isinstance(exc, HTTPProblem)
    return ProblemResponse(exc.status, exc.detail, exc.headers)


async def _not_routed(request: Request, exc: Exception) -> ProblemResponse:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return ProblemResponse(404, f"no resource at {request.scope['path']}")
    if exc.status_code == 405:
        allow = ", ".join(sorted((exc.headers or {})["Allow"].split(", ")))
        detail = f"{request.method} is not allowed here (allowed: {allow})"
        return ProblemResponse(405, detail, {"allow": allow})
    return ProblemResponse(exc.status_code, exc.detail, exc.headers)


def role_handlers(role: str, served: str) -> dict[Any, Any]:
    """EXCEPTION_HANDLERS for a replica of `role` that serves only `served`:
    a path it does not serve is a 404 that says why and where to go instead."""

    async def not_served(request: Request, exc: Exception) -> ProblemResponse:
        assert isinstance(exc, HTTPException)
        if exc.status_code != 404:
            return await _not_routed(request, exc)
        return ProblemResponse(
            404,
            f"no resource at {request.scope['path']} on this replica: it runs --role {role} and serves only "
            f"{served}; the HTTP API, the watch stream and the dashboard are served by replicas of role api or all",
        )

    return {**EXCEPTION_HANDLERS, HTTPException: not_served}


async def _unavailable(request: Request, exc: Exception) -> ProblemResponse:
    # Connection lost, pool exhausted or closed, server shutting down: the
    # client may retry; the details stay in our log.
    log.warning("%s %s: database unavailable", request.method, request.scope["path"], exc_info=exc)
    return ProblemResponse(503, "the database is unavailable; retry later", {"retry-after": "1"})


async def _client_gone(request: Request, exc: Exception) -> None:
    return None  # Starlette sends nothing when a handler returns None


EXCEPTION_HANDLERS: dict[Any, Any] = {
    HTTPProblem: _problem,
    HTTPException: _not_routed,
    StoreUnavailable: _unavailable,
    ClientDisconnect: _client_gone,
}


class InternalErrors:
    """The last resort, outermost of our middleware: an exception nothing
    handled becomes a 500 problem, and one log record with its traceback.

    Starlette's own ServerErrorMiddleware answers the same but re-raises, so
    hypercorn would log the traceback a second time.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        except Exception:
            if started:
                raise  # too late for a problem: the server logs it and aborts the connection
            log.exception("%s %s failed", scope["method"], scope["path"])
            await ProblemResponse(500, "the server failed to handle the request")(scope, receive, send)
