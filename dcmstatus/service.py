"""The supervisor of `dcmstatus serve`: owns the one trio nursery, the start-up
order and the shutdown.

Start-up: page token secret → (embedded servers) → database migrations → HTTP server → NATS
stream and consumer → consuming, with the change relay and the outbox's
housekeeping beside them (docs/changes.md#relay). Each long-running task reports readiness
through `task_status`, so nothing starts before what it depends on.

Shutdown, on SIGTERM/SIGINT, within `grace_period`: stop pulling, flush the
last batch, commit, ack, flush the acks, close NATS; then stop HTTP and the
embedded servers. Whatever is not acked by the deadline is left to NATS to
redeliver, which the ordering guard makes harmless.
"""

# trio_asyncio first: it patches asyncio before psycopg binds to it (field notes).
import trio_asyncio  # isort: skip

import json
import logging
import os
import signal
from contextlib import AsyncExitStack
from datetime import timedelta
from functools import partial
from pathlib import Path

import psycopg_pool
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from dcmstatus.adapters.http.app import make_app
from dcmstatus.adapters.http.page_tokens import load_or_create_secret
from dcmstatus.adapters.nats.changes import ChangePublisher, ChangeStreamSettings
from dcmstatus.adapters.nats.source import JetStreamSource, NatsSettings, asyncio_exception_handler
from dcmstatus.adapters.postgres.changes import ChangeHousekeeping, ChangeListener, ChangeOutbox
from dcmstatus.adapters.postgres.instances import InstanceStore
from dcmstatus.adapters.postgres.schema import migrate
from dcmstatus.adapters.postgres.writer import StatusStore
from dcmstatus.config import ServeConfig
from dcmstatus.core.catalog import Catalog
from dcmstatus.core.decoding import Decoder
from dcmstatus.core.model import Delivery
from dcmstatus.engine.metrics import Metrics
from dcmstatus.engine.pipeline import Pipeline, PipelineSettings
from dcmstatus.engine.relay import Relay, RelaySettings, keep_outbox

log = logging.getLogger(__name__)

# Where the page token secret is kept when none is configured (docs/security.md).
PAGE_TOKEN_KEY_FILE = "page-token.key"


def page_token_secret(config: ServeConfig) -> bytes:
    """The configured page token secret, or the one kept in the data
    directory (made on first start, reused after)."""
    if config.page_token_secret is not None:
        return config.page_token_secret.encode("utf-8")
    return load_or_create_secret(Path(config.data_dir) / PAGE_TOKEN_KEY_FILE)


class Service:
    """One running dcmstatus: its parts, and the health view over them."""

    def __init__(
        self, config: ServeConfig, nats_url: str, database_url: str, catalog: Catalog, page_token_secret: bytes
    ) -> None:
        self.config = config
        self.page_token_secret = page_token_secret
        self.nats_url = nats_url
        self.database_url = database_url
        self.catalog = catalog
        self.metrics = Metrics()
        self.source = JetStreamSource(
            NatsSettings(
                url=nats_url,
                stream=config.stream,
                stream_max_age=config.stream_max_age,
                subjects=config.subjects,
                durable=config.durable,
                ack_wait=config.ack_wait,
                max_ack_pending=max(config.max_in_flight * 2, 1000),
                max_in_flight=config.max_in_flight,
                max_in_flight_bytes=config.max_in_flight_bytes,
                pull_batch=max(1, min(500, config.max_in_flight // 4)),
                stall_timeout=config.stall_timeout,
            ),
            self.metrics,
        )
        self.writer_stores = [
            StatusStore(
                database_url,
                dead_letter_limit=config.dead_letter_limit,
                max_clock_skew=timedelta(seconds=config.max_clock_skew),
                parked_ttl=timedelta(seconds=config.parked_ttl),
                parked_limit=config.parked_limit,
            )
            for _ in range(config.writers)
        ]
        decoder = Decoder(catalog, max_event_bytes=config.max_event_bytes)
        self.pipeline = Pipeline(
            decoder.decode,
            self.source,
            self.writer_stores,
            self.metrics,
            PipelineSettings(
                max_batch=config.batch_size,
                max_delay=config.batch_delay_ms / 1000,
                writers=config.writers,
            ),
        )
        # Short timeouts: while the database is down, /health and the API must
        # answer 503 promptly, not hold a worker thread for the pool's default 30 s.
        self.api_pool = psycopg_pool.ConnectionPool(
            database_url,
            min_size=1,
            max_size=4,
            open=False,
            timeout=2.0,
            kwargs={"application_name": "dcmstatus-api", "connect_timeout": 2},
        )
        self.instances = InstanceStore(self.api_pool, self.metrics)
        self.http_url = ""
        self.housekeeping = ChangeHousekeeping(database_url)
        self.relay: Relay | None = None
        if not config.no_change_events:
            self.relay = Relay(
                ChangeOutbox(database_url, source=config.changes_source),
                ChangeListener(database_url),
                ChangePublisher(
                    ChangeStreamSettings(
                        url=nats_url,
                        stream=config.changes_stream,
                        subject_prefix=config.changes_subject_prefix,
                        max_age=config.changes_retention,
                    )
                ),
                self.metrics,
                RelaySettings(),
            )

    async def health(self) -> tuple[bool, dict]:
        try:
            with trio.fail_after(2):
                await self.instances.ping()
            database = "reachable"
        except Exception:
            database = "unreachable"
        components = {"database": database, **self.source.health()}
        if not self.pipeline.store_healthy:
            components["writes"] = "failing"
        # Informative only: a relay that cannot publish loses nothing (the
        # changes wait in the outbox) and a 503 would not move the leadership
        # (docs/operations.md#health).
        components["changes"] = self.relay.state if self.relay is not None else "off"
        ok = database == "reachable" and self.source.healthy and self.pipeline.store_healthy
        return ok, components

    async def run(self, *, stopped: trio.Event, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run until `stopped` is set, then drain within the grace period."""
        config = self.config
        await trio.to_thread.run_sync(self.api_pool.open)
        try:
            async with trio.open_nursery() as nursery:
                http_stop = trio.Event()
                app = make_app(
                    self.instances,
                    set(self.catalog.service_types()),
                    self.health,
                    self.metrics.registry,
                    page_token_secret=self.page_token_secret,
                    api_token=config.api_token,
                    max_body_bytes=config.max_request_bytes,
                )
                hconfig = HypercornConfig()
                hconfig.bind = [f"{config.http_host}:{config.http_port}"]
                hconfig.accesslog = None
                # Through our logging set-up, not a second handler of hypercorn's own.
                hconfig.errorlog = logging.getLogger("hypercorn.error")
                hconfig.graceful_timeout = 2
                binds = await nursery.start(partial(hypercorn_serve, app, hconfig, shutdown_trigger=http_stop.wait))
                self.http_url = binds[0] if binds else f"http://{config.http_host}:{config.http_port}"

                send, receive = trio.open_memory_channel[Delivery](float("inf"))
                await nursery.start(self.pipeline.run, receive)
                await nursery.start(self.source.run, send)
                # Changes go on being published while the consumer drains;
                # cancelled after it, with the HTTP server.
                changes = trio.CancelScope()
                await nursery.start(self._run_changes, changes)
                task_status.started()

                await stopped.wait()
                log.info("stopping: finishing in-flight work (grace period %.0fs)", config.grace_period)
                with trio.move_on_after(config.grace_period) as grace:
                    await self.source.stop_intake()
                    await self.pipeline.drained.wait()
                    await self.source.close()
                if grace.cancelled_caught:
                    log.warning(
                        "grace period over with work in flight; unacknowledged messages will be redelivered"
                    )
                log.info("stopped: %s", " ".join(f"{k}={v}" for k, v in self.metrics.totals().items()))
                changes.cancel()
                http_stop.set()
                nursery.cancel_scope.deadline = trio.current_time() + 3
        finally:
            await trio.to_thread.run_sync(self.api_pool.close)
            for store in self.writer_stores:
                store.close()
            self.housekeeping.close()
            if self.relay is not None:
                with trio.move_on_after(2):
                    await self.relay.publisher.close()
                self.relay.outbox.close()  # ends the leadership: a standby takes over
                self.relay.listener.close()

    async def _run_changes(self, scope: trio.CancelScope, *, task_status: trio.TaskStatus[None]) -> None:
        """The relay (unless --no-change-events) and the outbox's housekeeping, until `scope` is cancelled."""
        config = self.config
        with scope:
            async with trio.open_nursery() as nursery:
                if self.relay is not None:
                    await nursery.start(self.relay.run)
                await nursery.start(
                    partial(
                        keep_outbox,
                        self.housekeeping,
                        self.metrics,
                        retention=timedelta(seconds=config.changes_retention),
                        relay_on=self.relay is not None,
                    )
                )
                task_status.started()


async def serve(config: ServeConfig, catalog: Catalog | None = None) -> int:
    """`dcmstatus serve`: returns the exit code."""
    catalog = catalog or Catalog.default()
    secret = page_token_secret(config)  # before anything starts: a bad one is a config error
    async with trio_asyncio.open_loop() as loop:
        loop.set_exception_handler(asyncio_exception_handler)
        async with AsyncExitStack() as stack:
            nats_url, database_url = config.nats_url, config.database_url
            if config.embedded:
                nats_url, database_url = await _start_embedded(config, stack)
            log.info("applying database migrations")
            applied = await trio.to_thread.run_sync(migrate, database_url)
            log.info("database schema is current%s", f" (applied {', '.join(applied)})" if applied else "")

            service = Service(config, nats_url, database_url, catalog, secret)
            stopped = trio.Event()
            # runtime.json describes a running service: it goes when we go.
            stack.callback((Path(config.data_dir) / "runtime.json").unlink, missing_ok=True)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_wait_for_signal, stopped)
                await nursery.start(partial(service.run, stopped=stopped))
                _announce(config, service)
                # run() returns after the drain; the signal watcher goes with it.
                await stopped.wait()
    return 0


async def _wait_for_signal(stopped: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("received %s", signal.Signals(signum).name)
            stopped.set()
            return


async def _start_embedded(config: ServeConfig, stack: AsyncExitStack) -> tuple[str, str]:
    from dcmstatus.devtools.embedded import EmbeddedNats, EmbeddedPostgres

    data_dir = config.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    log.info("starting embedded nats-server and PostgreSQL under %s", data_dir)
    nats_server = EmbeddedNats(data_dir, port=config.nats_port)
    postgres = EmbeddedPostgres(data_dir)
    # Stop callbacks are registered before start, so a failed start still cleans up.
    stack.push_async_callback(trio.to_thread.run_sync, nats_server.stop)
    stack.push_async_callback(trio.to_thread.run_sync, postgres.stop)
    nats_url, database_url = await _gather_sync(nats_server.start, postgres.start)
    return nats_url, database_url


async def _gather_sync(*functions):
    """Run blocking start-ups side by side in threads; return their results in order."""
    results = [None] * len(functions)

    async def one(index, function):
        results[index] = await trio.to_thread.run_sync(function)

    async with trio.open_nursery() as nursery:
        for index, function in enumerate(functions):
            nursery.start_soon(one, index, function)
    return results


def _announce(config: ServeConfig, service: Service) -> None:
    runtime = {"http_url": service.http_url, "nats_url": service.nats_url, "database_url": service.database_url}
    data_dir = Path(config.data_dir)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        # Written aside and renamed: a reader never sees it half-written.
        partial = data_dir / f".runtime.json.{os.getpid()}"
        partial.write_text(json.dumps(runtime, indent=2) + "\n")
        partial.replace(data_dir / "runtime.json")
    except OSError as exc:
        log.warning("could not write %s/runtime.json: %s", data_dir, exc)
    print(
        f"dcmstatus is running\n"
        f"  HTTP API   {service.http_url}/api/v1/service-type-instances\n"
        f"  health     {service.http_url}/api/v1/health   metrics {service.http_url}/metrics\n"
        f"  publish to {service.nats_url}  subjects {config.subjects} (stream {service.source.stream})\n"
        f"  database   {config.redacted()['database_url'] if config.database_url else service.database_url}\n"
        f"  runtime    {data_dir / 'runtime.json'}\n"
        f"Stop with Ctrl-C (SIGINT) or SIGTERM.",
        flush=True,
    )
