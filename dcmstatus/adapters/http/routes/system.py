"""The service's own routes: health, Prometheus metrics, the OpenAPI document."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from importlib.resources import files
from typing import Any

import msgspec
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from dcmstatus.adapters.http.inputs import query_params
from dcmstatus.adapters.http.responses import JSONResponse
from dcmstatus.adapters.http.routing import resource

__all__ = ["HEALTH_PATH", "METRICS_PATH", "OPENAPI_DOCUMENT", "HealthCheck", "SystemRoutes"]

log = logging.getLogger("dcmstatus.adapters.http")

HEALTH_PATH = "/api/v1/health"
METRICS_PATH = "/metrics"
# The OpenAPI 3 document describing every route, kept in the repository and
# served as it is (tests check the live API against it).
OPENAPI_DOCUMENT: bytes = files("dcmstatus.adapters.http").joinpath("openapi.json").read_bytes()

HealthCheck = Callable[[], Awaitable[tuple[bool, dict[str, Any]]]]


class Health(msgspec.Struct):
    status: str  # "ok" | "unavailable"
    role: str  # the replica's --role: which components it reports (docs/operations.md#health)
    components: dict[str, Any]


class SystemRoutes:
    """`health` returns (ok, {component: state}); what "healthy" means is
    the caller's business."""

    def __init__(self, health: HealthCheck, registry: CollectorRegistry, role: str = "all") -> None:
        self._health_check = health
        self._registry = registry
        self._role = role
        self.routes: list[Route] = [resource(HEALTH_PATH, get=self.health), resource(METRICS_PATH, get=self.metrics)]
        if role != "consumer":  # the document of an API this replica serves
            self.routes.append(resource("/api/v1/openapi.json", get=self.openapi))

    async def health(self, request: Request) -> Response:
        query_params(request, ())
        try:
            ok, components = await self._health_check()
        except Exception:
            log.exception("health check failed")
            ok, components = False, {}
        body = Health("ok" if ok else "unavailable", self._role, components)
        return JSONResponse(body, 200 if ok else 503, {"cache-control": "no-store"})

    async def openapi(self, request: Request) -> Response:
        query_params(request, ())
        return Response(OPENAPI_DOCUMENT, media_type="application/json")

    async def metrics(self, request: Request) -> Response:
        return Response(generate_latest(self._registry), media_type=CONTENT_TYPE_LATEST)
