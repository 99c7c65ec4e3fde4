"""The HTTP API test harness: the real app served by hypercorn on trio on a
loopback port over a real (migrated) PostgreSQL database, and a plain HTTP
client (http.client in a worker thread, so nothing in the client is
trio-aware). Shared by the API, OpenAPI and CLI tests.
"""

import http.client
import json
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any
from urllib.parse import urlencode, urlsplit

import psycopg
import trio
import trio_asyncio  # noqa: F401  # must precede psycopg: it patches asyncio
from hypercorn.config import Config
from hypercorn.trio import serve
from psycopg_pool import ConnectionPool

from dcmstatus.adapters.http.app import make_app
from dcmstatus.adapters.http.hypercorn_internals import coalesce_response_writes
from dcmstatus.adapters.postgres.changes import ChangeNotifier, ChangeStore
from dcmstatus.adapters.postgres.instances import InstanceStore
from dcmstatus.adapters.postgres.schema import migrate
from dcmstatus.engine.metrics import Metrics

BASE = "/api/v1/service-type-instances"
SERVICE_TYPES = {"vm", "container", "network"}
PAGE_TOKEN_SECRET = b"http-harness page-token secret"

@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class HealthSwitch:
    """A health check the test controls."""

    ok: bool = True
    fail: bool = False
    components: dict[str, str] = field(
        default_factory=lambda: {"database": "ok", "consumer": "subscribed"}
    )

    async def __call__(self) -> tuple[bool, dict[str, str]]:
        if self.fail:
            raise RuntimeError("health check blew up")
        return self.ok, dict(self.components)


@dataclass
class Api:
    host: str
    port: int
    database_url: str
    pool: ConnectionPool
    health: HealthSwitch
    metrics: Metrics
    api_token: str | None = None
    notifier: ChangeNotifier | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def auth(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.api_token}"} if self.api_token else {}

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        *,
        json_body: Any = None,
    ) -> Reply:
        if json_body is not None:
            body = json.dumps(json_body).encode()
        headers = {**self.auth(), **(headers or {})}
        return await trio.to_thread.run_sync(self._request, method, path, body, headers or {})

    def _request(self, method: str, path: str, body: Any, headers: dict[str, str]) -> Reply:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            return Reply(
                response.status,
                {k.lower(): v for k, v in response.getheaders()},
                response.read(),
            )
        finally:
            conn.close()

    async def create(self, id: str | None = None, **fields: Any) -> dict[str, Any]:
        body = {"service_type": "vm", "spec": {}, **fields}
        path = BASE if id is None else f"{BASE}?id={id}"
        reply = await self.request("POST", path, json_body=body)
        assert reply.status == 201, reply.body
        return reply.json()

    async def sql(self, query: str, params: Any = None) -> list[tuple[Any, ...]]:
        def run() -> list[tuple[Any, ...]]:
            with psycopg.connect(self.database_url, autocommit=True) as conn:
                cur = conn.execute(query, params)
                return cur.fetchall() if cur.description else []

        return await trio.to_thread.run_sync(run)

    async def list_ids(self, query: dict[str, Any]) -> tuple[list[str], str | None]:
        reply = await self.request("GET", f"{BASE}?{urlencode(query)}")
        assert reply.status == 200, reply.body
        page = reply.json()
        return [i["id"] for i in page["instances"]], page.get("next_page_token")


@asynccontextmanager
async def serve_api(database_url: str, api_token: str | None = None, **app_options: Any):
    """Serve the API on a loopback port until the block ends, written as
    `dcmstatus serve` writes it (one send per response with a length)."""
    assert coalesce_response_writes() is None
    await trio.to_thread.run_sync(migrate, database_url)
    pool = ConnectionPool(database_url, min_size=1, max_size=4, open=False)
    await trio.to_thread.run_sync(partial(pool.open, wait=True))
    health = HealthSwitch()
    metrics = Metrics()
    app_options.setdefault("page_token_secret", PAGE_TOKEN_SECRET)
    notifier = ChangeNotifier(database_url)
    app_options.setdefault("changes", (ChangeStore(pool), notifier))
    app = make_app(InstanceStore(pool), SERVICE_TYPES, health, metrics.registry, api_token=api_token, **app_options)
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.graceful_timeout = 1
    shutdown = trio.Event()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(notifier.run)
            binds = await nursery.start(partial(serve, app, config, shutdown_trigger=shutdown.wait))
            address = urlsplit(binds[0])
            yield Api(address.hostname, address.port, database_url, pool, health, metrics, api_token, notifier)
            notifier.close()  # ends open watch streams
            shutdown.set()
    finally:
        await trio.to_thread.run_sync(pool.close)


def assert_problem(reply: Reply, status: int) -> dict[str, Any]:
    assert reply.status == status, reply.body
    assert reply.headers["content-type"] == "application/problem+json"
    problem = reply.json()
    assert set(problem) == {"type", "title", "status", "detail"}
    assert problem["status"] == status
    assert problem["detail"]
    return problem


def rfc3339(value: str) -> datetime:
    assert value.endswith("Z"), value
    parsed = datetime.fromisoformat(value)
    assert parsed.tzinfo is not None
    return parsed
