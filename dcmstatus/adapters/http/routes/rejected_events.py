"""/api/v1/rejected-events: the dead letters, newest first, in keyset pages."""

from __future__ import annotations

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from dcmstatus.adapters.http.inputs import page_size, query_params
from dcmstatus.adapters.http.page_tokens import PageTokens, RejectedCursor
from dcmstatus.adapters.http.problems import HTTPProblem
from dcmstatus.adapters.http.responses import JSONResponse
from dcmstatus.adapters.http.routing import resource
from dcmstatus.adapters.postgres.instances import InstanceStore, RejectedEvent
from dcmstatus.core.model import REJECTION_REASONS

__all__ = ["RejectedEventRoutes"]


class RejectedEventPage(msgspec.Struct, omit_defaults=True):
    rejected_events: list[RejectedEvent]
    next_page_token: str | None = None


class RejectedEventRoutes:
    def __init__(self, store: InstanceStore, tokens: PageTokens) -> None:
        self._store = store
        self._tokens = tokens
        self.routes: list[Route] = [resource("/api/v1/rejected-events", get=self.page)]

    async def page(self, request: Request) -> Response:
        query = query_params(request, ["reason", "max_page_size", "page_token"])
        size = page_size(query.get("max_page_size"))
        reason = query.get("reason") or None
        if reason is not None and reason not in REJECTION_REASONS:
            raise HTTPProblem(400, f"unknown reason {reason!r} (known: {', '.join(REJECTION_REASONS)})")
        before_id = None
        if token := query.get("page_token"):
            cursor = self._tokens.decode(token)
            if not isinstance(cursor, RejectedCursor) or cursor.reason != reason:
                raise HTTPProblem(400, "page_token belongs to a different query")
            before_id = cursor.before_id
        events, next_before = await self._store.rejected(reason=reason, page_size=size, before_id=before_id)
        next_token = None
        if next_before is not None:
            next_token = self._tokens.encode(RejectedCursor(next_before, reason))
        return JSONResponse(RejectedEventPage(events, next_token))
