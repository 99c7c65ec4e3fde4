"""The API token: with one configured, protected paths need
`Authorization: Bearer <token>` (401 otherwise, with a challenge).

Checked before routing, so without the token even a 404 or 405 says nothing
about what exists. Health and /metrics stay open: liveness probes and
Prometheus scrapers carry no credentials, and these show no instance data.

The dashboard's session cookie (docs/dashboard.md#signing-in) stands in for
the header on reads: EventSource cannot send headers. It holds a value
derived from the token, not the token, and it authorises GET and HEAD only,
so a request the browser adds it to can never change anything.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Collection

from starlette.requests import cookie_parser
from starlette.types import ASGIApp, Receive, Scope, Send

from dcmstatus.adapters.http.responses import ProblemResponse
from dcmstatus.adapters.http.routing import path_segments

__all__ = ["SESSION_COOKIE", "BearerToken", "has_session", "session_value"]

_CHALLENGE = 'Bearer realm="dcmstatus"'
SESSION_COOKIE = "dcmstatus_session"
_READS = frozenset({"GET", "HEAD"})


def session_value(token: str) -> str:
    """The session cookie's value for `token`: a MAC of a fixed label, so the
    cookie is not the token (it cannot be replayed as a bearer token for
    writes) and changing the token ends every session."""
    key = token.strip().encode("utf-8")
    return hmac.new(key, b"dcmstatus dashboard session v1", hashlib.sha256).hexdigest()


def has_session(scope: Scope, expected: str) -> bool:
    """True when the request carries the session cookie with value `expected`."""
    header = next((v for k, v in scope["headers"] if k.lower() == b"cookie"), b"")
    value = cookie_parser(header.decode("latin-1")).get(SESSION_COOKIE, "")
    return hmac.compare_digest(value.encode("latin-1", "replace"), expected.encode("ascii"))


class BearerToken:
    """Pure ASGI middleware. `protected_roots`: first path segments under
    which the token is needed (a path that is not UTF-8 counts as protected);
    `open_paths`: segment tuples exempt from it."""

    def __init__(
        self,
        app: ASGIApp,
        token: str,
        protected_roots: Collection[str],
        open_paths: Collection[tuple[str, ...]],
    ) -> None:
        self.app = app
        self._token = token.strip().encode("utf-8")  # as the header is: surrounding blanks never arrive
        self._session = session_value(token)
        self._protected_roots = frozenset(protected_roots)
        self._open_paths = frozenset(open_paths)

    def _needs_token(self, scope: Scope) -> bool:
        segments = path_segments(scope)
        if segments is None:
            return True
        return bool(segments) and segments[0] in self._protected_roots and tuple(segments) not in self._open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._needs_token(scope):
            await self.app(scope, receive, send)
            return
        header = next((v for k, v in scope["headers"] if k.lower() == b"authorization"), b"").strip()
        if not header and scope["method"] in _READS and has_session(scope, self._session):
            await self.app(scope, receive, send)
            return
        scheme, _, credentials = header.partition(b" ")
        # compare_digest on bytes: the time taken says nothing about how much
        # of the token was right.
        if scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(), self._token):
            await self.app(scope, receive, send)
            return
        if not header:
            problem = ProblemResponse(
                401,
                "this API needs a bearer token: send 'Authorization: Bearer <token>'",
                {"www-authenticate": _CHALLENGE},
            )
        else:
            problem = ProblemResponse(
                401, "the bearer token is wrong", {"www-authenticate": _CHALLENGE + ', error="invalid_token"'}
            )
        await problem(scope, receive, send)
