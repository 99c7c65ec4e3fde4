"""Admission: how many API requests run at once, how many wait, and the 503
beyond that (docs/http-api.md#overload).

The API and the pipeline share one trio thread. Every running request is a
task the scheduler visits on each of its rounds, so 32 clients hammering the
API would stretch every round the pipeline's writers wait through (a commit's
wake-up, an ack) and the drain would slow to a fraction of its quiet rate.
Admission keeps the number of requests *running* small (`max_running`); the
others wait in arrival order without costing a scheduler visit, and a request
that finds `max_waiting` already waiting is refused at once: 503 with
Retry-After, counted in `dcmstatus_http_requests_rejected_total`.

The pipeline goes first: while `intake_busy()` says it has work in hand
(messages received and not yet acknowledged), only `max_running_busy` (one)
request runs at a time. One request cannot keep the thread busy on its own
(it waits for its database answer and for its socket), so the pipeline gets
the turns it leaves; the API still answers, more slowly, and takes its full
share again once the backlog is drained. (Measured on a 100k-event drain
under 32 keep-alive clients: with 8 running, or 2, the drain kept about
0.5-0.6 of its quiet rate; with one, 0.69-0.9, the API answering ~150-200
requests/s. A pause between turns kept more but left the API at ~60-90/s.)

Exempt, so that probes and scrapes always answer and never queue behind the
API: health and /metrics (both answered from process state), and the watch
streams, which hold their request for as long as they are open and have a
bound of their own (`--max-watch-streams`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection

import trio
from prometheus_client import CollectorRegistry, Counter
from starlette.types import ASGIApp, Receive, Scope, Send

from dcmstatus.adapters.http.responses import ProblemResponse

__all__ = ["DEFAULT_MAX_RUNNING", "DEFAULT_MAX_RUNNING_BUSY", "DEFAULT_MAX_WAITING", "Admission"]

# A few more than the API pool's connections: enough to keep them all busy
# while responses are written, few enough that the pipeline's tasks are never
# far back in the scheduler's queue.
DEFAULT_MAX_RUNNING = 8
DEFAULT_MAX_RUNNING_BUSY = 1
DEFAULT_MAX_WAITING = 256
RETRY_AFTER_SECONDS = 1


def _wants_event_stream(scope: Scope) -> bool:
    return any(name == b"accept" and b"text/event-stream" in value.lower() for name, value in scope["headers"])


class Admission:
    """Pure ASGI middleware: at most `max_running` requests at once
    (`max_running_busy` while `intake_busy()`), at most `max_waiting`
    waiting for a turn, 503 beyond. `exempt_paths` are `scope["path"]`
    values admitted at once (health, /metrics)."""

    def __init__(
        self,
        app: ASGIApp,
        registry: CollectorRegistry,
        max_running: int = DEFAULT_MAX_RUNNING,
        max_waiting: int = DEFAULT_MAX_WAITING,
        exempt_paths: Collection[str] = (),
        intake_busy: Callable[[], bool] = lambda: False,
        max_running_busy: int = DEFAULT_MAX_RUNNING_BUSY,
    ) -> None:
        self.app = app
        self._running = trio.CapacityLimiter(max_running)
        self._max_running = max_running
        self._max_running_busy = min(max_running_busy, max_running)
        self._intake_busy = intake_busy
        self._max_waiting = max_waiting
        self._exempt = frozenset(exempt_paths)
        self._rejected = Counter(
            "dcmstatus_http_requests_rejected",
            "API requests refused with 503 because too many were already waiting (docs/http-api.md#overload)",
            registry=registry,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self._exempt or _wants_event_stream(scope):
            await self.app(scope, receive, send)
            return
        limiter = self._running
        self._set_turns()
        if limiter.available_tokens == 0 and limiter.statistics().tasks_waiting >= self._max_waiting:
            self._rejected.inc()
            problem = ProblemResponse(
                503,
                "too many requests are waiting; retry later",
                {"retry-after": str(RETRY_AFTER_SECONDS)},
            )
            await problem(scope, receive, send)
            return
        # A borrower per request, not per task: hypercorn may run several
        # requests of one connection in one task over its life.
        borrower = object()
        await limiter.acquire_on_behalf_of(borrower)
        try:
            await self.app(scope, receive, send)
        finally:
            self._set_turns()  # before the release, which hands the turn on
            limiter.release_on_behalf_of(borrower)

    def _set_turns(self) -> None:
        # Lowering the tokens below those borrowed only holds back new turns;
        # raising them lets waiting requests in at once.
        turns = self._max_running_busy if self._intake_busy() else self._max_running
        if self._running.total_tokens != turns:
            self._running.total_tokens = turns
