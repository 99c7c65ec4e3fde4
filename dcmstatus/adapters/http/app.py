"""The HTTP API application: its routes, middleware and exception handlers.

A request passes, outermost first: `SecurityHeaders` (CSP and friends on
every response), `InternalErrors` (500 as a last resort), `Admission` (a few
requests run at once, the rest wait; 503 beyond a bound), `BearerToken`
(when a token is configured), `RoutingPath` (segments as the client split
them), then Starlette's router and the handlers of routes/.
Outcomes become RFC 7807 problems in problems.py. Adding a route is adding a
`resource(...)` to a routes module, or a new module to the list below.
A consumer replica (`--role consumer`) mounts only health and /metrics
(docs/operations.md#roles).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.middleware import Middleware

from dcmstatus.adapters.http.admission import DEFAULT_MAX_RUNNING, DEFAULT_MAX_WAITING, Admission
from dcmstatus.adapters.http.auth import BearerToken
from dcmstatus.adapters.http.inputs import MAX_BODY_BYTES
from dcmstatus.adapters.http.page_tokens import PageTokens
from dcmstatus.adapters.http.problems import EXCEPTION_HANDLERS, InternalErrors, role_handlers
from dcmstatus.adapters.http.routes.dashboard import DashboardRoutes
from dcmstatus.adapters.http.routes.instances import InstanceRoutes
from dcmstatus.adapters.http.routes.rejected_events import RejectedEventRoutes
from dcmstatus.adapters.http.routes.status_changes import DEFAULT_MAX_STREAMS, HEARTBEAT_SECONDS, StatusChangeRoutes
from dcmstatus.adapters.http.routes.system import HEALTH_PATH, METRICS_PATH, OPENAPI_DOCUMENT, HealthCheck, SystemRoutes
from dcmstatus.adapters.http.routing import RoutingPath
from dcmstatus.adapters.http.security_headers import SecurityHeaders
from dcmstatus.adapters.postgres.changes import ChangeNotifier, ChangeStore
from dcmstatus.adapters.postgres.instances import InstanceStore

__all__ = ["MAX_BODY_BYTES", "OPENAPI_DOCUMENT", "make_app"]


def make_app(
    store: InstanceStore,
    catalog_service_types: Callable[[], Iterable[str]] | set[str] | frozenset[str],
    health: HealthCheck,
    metrics_registry: CollectorRegistry,
    *,
    page_token_secret: bytes,
    api_token: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    changes: tuple[ChangeStore, ChangeNotifier],
    max_watch_streams: int = DEFAULT_MAX_STREAMS,
    watch_heartbeat: float = HEARTBEAT_SECONDS,
    max_waiting_requests: int = DEFAULT_MAX_WAITING,
    max_running_requests: int = DEFAULT_MAX_RUNNING,
    intake_busy: Callable[[], bool] = lambda: False,
    role: str = "all",
) -> Starlette:
    """The ASGI application serving /api/v1, /metrics and the dashboard at /.

    `catalog_service_types` is asked on every create, so a catalog reloaded
    at run time is honoured. `health` returns (ok, {component: state}).
    `page_token_secret` keys the page tokens' MAC: replicas that share it
    accept each other's tokens. With `api_token`, every /api/v1 route except
    health requires `Authorization: Bearer <api_token>` (401 otherwise);
    /metrics stays open. Request bodies over `max_body_bytes` get 413.
    `changes` serves /api/v1/status-changes: the store it reads and the
    notifier that wakes its streams (the caller runs the notifier and closes
    it at shutdown, which ends the streams); at most `max_watch_streams`
    streams are open at once. At most `max_running_requests` requests run at
    once (fewer while `intake_busy()`: the pipeline goes first); beyond
    `max_waiting_requests` waiting for their turn, a request gets 503
    (admission.py). With `role` "consumer" only health and /metrics are
    served, and every other path is a 404 naming the role.
    """
    if role == "consumer":
        consumer_app = Starlette(
            routes=SystemRoutes(health, metrics_registry, role).routes,
            middleware=[Middleware(SecurityHeaders), Middleware(InternalErrors), Middleware(RoutingPath)],
            exception_handlers=role_handlers(role, f"{HEALTH_PATH} and {METRICS_PATH}"),
        )
        consumer_app.router.redirect_slashes = False
        return consumer_app
    if callable(catalog_service_types):
        service_types = catalog_service_types
    else:
        fixed = frozenset(catalog_service_types)
        service_types = lambda: fixed  # noqa: E731
    tokens = PageTokens(page_token_secret)
    routes = [
        *InstanceRoutes(store, service_types, tokens, max_body_bytes).routes,
        *RejectedEventRoutes(store, tokens).routes,
        *StatusChangeRoutes(*changes, tokens, metrics_registry, max_watch_streams, watch_heartbeat).routes,
        *SystemRoutes(health, metrics_registry, role).routes,
        *DashboardRoutes(store, service_types, api_token).routes,
    ]
    middleware = [
        Middleware(SecurityHeaders),
        Middleware(InternalErrors),
        Middleware(
            Admission,
            registry=metrics_registry,
            max_running=max_running_requests,
            max_waiting=max_waiting_requests,
            exempt_paths=[HEALTH_PATH, METRICS_PATH],
            intake_busy=intake_busy,
        ),
    ]
    if api_token:
        open_paths = [tuple(HEALTH_PATH.split("/")[1:])]
        middleware.append(Middleware(BearerToken, token=api_token, protected_roots=["api"], open_paths=open_paths))
    middleware.append(Middleware(RoutingPath))
    # No lifespan work: the caller owns the pool and the store. Websockets
    # match no route, so Starlette closes them unaccepted.
    app = Starlette(routes=routes, middleware=middleware, exception_handlers=EXCEPTION_HANDLERS)
    app.router.redirect_slashes = False  # "/x/" is not "/x": a 404, not a redirect
    return app
