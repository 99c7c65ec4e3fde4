"""Health that cannot lie: the service against a real nats-server and
PostgreSQL, with its inbox subscription dropped on the server's side while the
client still believes in it (nats-py sees nothing, the server delivers
nothing). Health must turn 503 `stalled`, the adapter must start intake
afresh, and the backlog must be applied.

The service runs in this process so the test can reach its NATS connection
to inject the fault: a raw UNSUB of the inbox's subscription id.
"""

import trio_asyncio  # isort: skip

import json
import urllib.error
import urllib.request
from functools import partial

import trio

from dcmstatus.adapters.nats.source import asyncio_exception_handler
from dcmstatus.adapters.postgres.schema import migrate
from dcmstatus.cli.publish import build_event, publish_event
from dcmstatus.config import ServeConfig
from dcmstatus.core.catalog import Catalog
from dcmstatus.service import Service, page_token_secret

INSTANCES = [f"vm-{n}" for n in range(20)]


def http(base: str, method: str, path: str, body: object | None = None) -> tuple[int, object]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read()
    if raw and path == "/metrics":
        return status, raw.decode()
    return status, json.loads(raw) if raw else None


def metric(base: str, name: str) -> float:
    text = http(base, "GET", "/metrics")[1]
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


async def publish_all(url: str, status: str) -> None:
    for instance in INSTANCES:
        await publish_event(url, "dcm.vm", build_event("vm", instance, status))


async def test_a_subscription_lost_on_the_server_turns_health_stalled_and_intake_recovers(nats_url, database_url, tmp_path):
    await trio.to_thread.run_sync(migrate, database_url)
    config = ServeConfig(
        nats_url=nats_url, database_url=database_url, http_port=0, data_dir=tmp_path, stall_timeout=2.0, ack_wait=5.0
    )
    async with trio_asyncio.open_loop() as loop:
        loop.set_exception_handler(asyncio_exception_handler)
        service = Service(config, nats_url, database_url, Catalog.default(), page_token_secret(config))
        consuming = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(service.run, ready=consuming.set))
            await consuming.wait()
            base = service.http_url

            async def call(method: str, path: str, body: object | None = None) -> tuple[int, object]:
                return await trio.to_thread.run_sync(http, base, method, path, body)

            def all_in(status: str):
                async def check() -> bool:
                    got = {(await call("GET", f"/api/v1/service-type-instances/{i}"))[1]["status"] for i in INSTANCES}
                    return got == {status}

                return check

            async def until(predicate, what: str, timeout: float = 60) -> None:
                with trio.fail_after(timeout):
                    while not await predicate():
                        await trio.sleep(0.1)

            for instance in INSTANCES:
                status, body = await call("POST", f"/api/v1/service-type-instances?id={instance}", {"service_type": "vm", "spec": {}})
                assert status == 201, body
            await trio_asyncio.aio_as_trio(publish_all)(nats_url, "RUNNING")
            await until(all_in("RUNNING"), "the first events applied")

            # The server forgets the inbox subscription, and forgets each one
            # the adapter makes next, until the test has seen health say so.
            source = service.source
            nc = source._nc
            subscribe = nc.subscribe
            sabotage = True

            async def subscribe_and_lose(subject, **kwargs):
                sub = await subscribe(subject, **kwargs)
                if sabotage:
                    await nc._send_unsubscribe(sub._id)  # before any pull request is sent on it
                return sub

            nc.subscribe = subscribe_and_lose
            await trio_asyncio.aio_as_trio(nc._send_unsubscribe)(source._sub._id)
            assert (await call("GET", "/api/v1/health"))[0] == 200, "nats-py cannot tell: health still says subscribed"
            await trio_asyncio.aio_as_trio(publish_all)(nats_url, "STOPPED")  # the backlog nothing delivers

            async def stalled() -> bool:
                status, body = await call("GET", "/api/v1/health")
                return status == 503 and body["components"]["consumer"] == "stalled"

            await until(stalled, "health 503 consumer: stalled")
            assert (await call("GET", "/api/v1/health"))[1]["components"]["database"] == "reachable"
            assert await trio.to_thread.run_sync(metric, base, "dcmstatus_consumer_stalled") == 1
            assert await trio.to_thread.run_sync(metric, base, "dcmstatus_consumer_resets_total") >= 1
            assert await all_in("RUNNING")(), "stalled, yet events were applied"

            sabotage = False  # the next reset gets a subscription the server keeps

            async def healthy() -> bool:
                return (await call("GET", "/api/v1/health"))[0] == 200

            await until(healthy, "health 200 again")
            await until(all_in("STOPPED"), "the backlog applied")
            assert await trio.to_thread.run_sync(metric, base, "dcmstatus_consumer_stalled") == 0
            service.stop()
