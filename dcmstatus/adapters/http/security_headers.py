"""Headers on every response that keep a browser from turning data into code.

Everything the dashboard shows comes from providers and API clients
(docs/dashboard.md#security): the Content-Security-Policy allows scripts and
styles from this origin only (no inline script, no eval), no frames around
our pages, and requests to this origin only. nosniff stops a JSON or text
response from being run as a script or styled as HTML.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["CONTENT_SECURITY_POLICY", "SecurityHeaders"]

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self';"
    " form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_HEADERS = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),  # frame-ancestors for browsers that predate it
    # Not "no-referrer": with it a browser sends "Origin: null" on form posts,
    # and the sign-in form's CSRF check needs the real origin.
    (b"referrer-policy", b"same-origin"),
]
_NAMES = frozenset(name for name, _ in _HEADERS)


class SecurityHeaders:
    """Pure ASGI middleware: adds the headers above to every HTTP response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in _NAMES]
                message = {**message, "headers": headers + _HEADERS}
            await send(message)

        await self.app(scope, receive, send_with_headers)
