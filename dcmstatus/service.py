"""The supervisor of `dcmstatus serve`: owns the one trio nursery, the start-up
order and the shutdown; the one place that decides when the service stops.

Start-up: page token secret → (embedded servers) → HTTP server → database (migrations) → pipeline
→ NATS stream and consumer → consuming. HTTP comes first so that /health can
say what start-up is waiting for: PostgreSQL and NATS are awaited under one
policy (engine/startup.py: retry with capped back-off until
`--startup-timeout`, then exit 1). The change relay and the outbox's
housekeeping run beside the consumer (docs/changes.md#relay). Each long-running task reports readiness
through `task_status`, so nothing starts before what it depends on.

Shutdown, on SIGTERM/SIGINT, within `grace_period`: stop pulling, flush the
last batch, commit, ack, flush the acks, close NATS; then stop HTTP, close
the database connections and stop the embedded servers. A second signal
stops at once, still stopping the embedded servers. Whatever is not acked is
left to NATS to redeliver, which the ordering guard makes harmless
(docs/operations.md#shutdown).
"""

# trio_asyncio first: it patches asyncio before psycopg binds to it (docs/architecture.md#import-order).
import trio_asyncio  # isort: skip

import errno
import json
import logging
import os
import signal
from collections.abc import Callable
from contextlib import AsyncExitStack
from datetime import timedelta
from functools import partial
from pathlib import Path

import psycopg
import psycopg_pool
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from dcmstatus.adapters.http.app import make_app
from dcmstatus.adapters.http.hypercorn_internals import coalesce_response_writes
from dcmstatus.adapters.http.page_tokens import load_or_create_secret
from dcmstatus.adapters.nats.changes import ChangePublisher, ChangeStreamSettings
from dcmstatus.adapters.nats.source import JetStreamSource, NatsSettings, asyncio_exception_handler, nats_servers
from dcmstatus.adapters.postgres.changes import ChangeNotifier, ChangeStore
from dcmstatus.adapters.postgres.conninfo import check_conninfo, with_defaults
from dcmstatus.adapters.postgres.instances import InstanceStore, check_connection
from dcmstatus.adapters.postgres.outbox import ChangeHousekeeping, ChangeListener, ChangeOutbox
from dcmstatus.adapters.postgres.schema import migrate
from dcmstatus.adapters.postgres.writer import StatusStore
from dcmstatus.config import ServeConfig
from dcmstatus.core.catalog import Catalog
from dcmstatus.core.decoding import Decoder
from dcmstatus.core.errors import ConfigError
from dcmstatus.core.model import Delivery
from dcmstatus.core.redaction import redact_url
from dcmstatus.engine.metrics import Metrics
from dcmstatus.engine.pipeline import Pipeline, PipelineSettings
from dcmstatus.engine.relay import Relay, RelaySettings, keep_outbox
from dcmstatus.engine.startup import Startup

log = logging.getLogger(__name__)

# Health's database reading is kept current by one ping this often, so a
# health request costs no database work however many probes ask.
HEALTH_INTERVAL = 1.0
# A ping unanswered this long reads as "unreachable (no answer within …)".
HEALTH_DEADLINE = 2.0
# A reading older than this (the pinging task starved or stuck) is not
# believed: health says "unknown" and answers 503.
HEALTH_STALE = 5.0
# Where the page token secret is kept when none is configured (docs/security.md).
PAGE_TOKEN_KEY_FILE = "page-token.key"
# No API request holds a database connection (and a worker thread) longer.
_API_STATEMENT_TIMEOUT = "5s"
# At the end, closing database connections waits no longer than this for a
# server that may not answer.
_CLOSE_DEADLINE = 1.0


class Service:
    """One running dcmstatus: its parts, and the health view over them."""

    def __init__(
        self,
        config: ServeConfig,
        nats_url: str | None,
        database_url: str,
        catalog: Catalog,
        page_token_secret: bytes,
    ) -> None:
        self.page_token_secret = page_token_secret
        self.config = config
        self.role = config.role
        self.nats_url = nats_url
        self.database_url = database_url
        self.catalog = catalog
        self.metrics = Metrics()
        self.startup = Startup(config.startup_timeout)
        # The consumer's half; an api replica has none of it (and no NATS).
        self.source: JetStreamSource | None = None
        self.pipeline: Pipeline | None = None
        self.writer_stores: list[StatusStore] = []
        if config.runs("consumer"):
            assert nats_url is not None  # ServeConfig.validate: the consumer role needs --nats-url
            self.source = JetStreamSource(
                NatsSettings(
                    url=nats_url,
                    stream=config.stream,
                    stream_max_age=config.stream_max_age,
                    stream_replicas=config.stream_replicas,
                    subjects=config.subjects,
                    durable=config.durable,
                    ack_wait=config.ack_wait,
                    max_ack_pending=max(config.max_in_flight * 2, 1000),
                    max_in_flight=config.max_in_flight,
                    max_in_flight_bytes=config.max_in_flight_bytes,
                    pull_batch=max(1, min(500, config.max_in_flight // 4)),
                    stall_timeout=config.stall_timeout,
                    security=config.nats_security(),
                ),
                self.metrics,
                self.startup,
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
            decoder = Decoder(catalog, max_event_bytes=config.max_event_bytes, max_clock_skew=config.max_clock_skew)
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
        # The API pool serves the API and, in every role, health's database check.
        # Short timeouts: while the database is down, /health and the API must
        # answer 503 promptly, not hold a worker thread for the pool's default
        # 30 s; keepalives and a statement timeout bound a database that stops
        # answering mid-request.
        # (Our connection parameters are defaults under the URL's: pool
        # kwargs would override what the operator wrote in it.)
        self.api_pool = psycopg_pool.ConnectionPool(
            with_defaults(
                database_url,
                application_name="dcmstatus-api",
                connect_timeout=2,
                keepalives=1,
                keepalives_idle=10,
                keepalives_interval=5,
                keepalives_count=3,
            ),
            min_size=1,
            max_size=4,
            open=False,
            timeout=2.0,
            configure=_configure_api_connection,
            check=check_connection,  # a connection of before a failover is dropped at checkout
        )
        self.instances = InstanceStore(self.api_pool, self.metrics)
        # The watch streams read through a pool of their own, so that many
        # streams waking at once never starve the rest of the API.
        self.watch_pool = psycopg_pool.ConnectionPool(
            with_defaults(database_url, application_name="dcmstatus-watch", connect_timeout=2, keepalives=1),
            min_size=1,
            max_size=2,
            open=False,
            timeout=5.0,
            configure=_configure_api_connection,
            check=check_connection,  # a connection of before a failover is dropped at checkout
        )
        self.changes = ChangeStore(self.watch_pool)
        self.notifier = ChangeNotifier(database_url)
        self.housekeeping = ChangeHousekeeping(database_url)
        self.relay: Relay | None = None
        # The relay's adapters as what they are: the relay sees them through its
        # protocols, which know nothing of closing; the service closes them.
        self._relay_adapters: tuple[ChangeOutbox, ChangeListener, ChangePublisher] | None = None
        # The relay publishes on NATS, so it runs with the consumer (docs/operations.md#roles).
        if config.runs("consumer") and not config.no_change_events:
            assert nats_url is not None
            self._relay_adapters = (
                ChangeOutbox(database_url, source=config.changes_source),
                ChangeListener(database_url),
                ChangePublisher(
                    ChangeStreamSettings(
                        url=nats_url,
                        stream=config.changes_stream,
                        subject_prefix=config.changes_subject_prefix,
                        max_age=config.changes_retention,
                        replicas=config.stream_replicas,
                        security=config.nats_security(),
                    )
                ),
            )
            self.relay = Relay(*self._relay_adapters, self.metrics, RelaySettings())
        self._changes = trio.CancelScope()  # the relay and the housekeeping
        self.http_url = ""
        self.ready = False  # start-up is over: consuming, serving the API, or both
        self._stopped = trio.Event()
        self._stop_now = False
        self._starting: trio.CancelScope | None = None
        self._draining: trio.CancelScope | None = None
        self._consuming: trio.CancelScope | None = None
        self._drained = False
        self._nursery: trio.Nursery | None = None
        # (state, trio time) of the latest database ping; when the one in flight began.
        self._database_reading: tuple[str, float] | None = None
        self._ping_started: float | None = None
        self._pinging = trio.CancelScope()

    async def health(self) -> tuple[bool, dict]:
        components: dict[str, str] = {}
        if not self.ready:
            awaiting = self.startup.awaiting
            components["startup"] = f"waiting for {awaiting}" if awaiting else "starting"
        database = self._database_state()
        components["database"] = database
        ok = self.ready and database == "reachable"
        # Each role reports what it runs, and only that (docs/operations.md#health).
        if self.source is not None and self.pipeline is not None:
            components.update(self.source.health())
            if not self.pipeline.store_healthy:
                components["writes"] = "failing"
            # Informative only: a relay that cannot publish loses nothing (the
            # changes wait in the outbox) and a 503 would not move the leadership
            # (docs/operations.md#health).
            components["changes"] = self.relay.state if self.relay is not None else "off"
            ok = ok and self.source.healthy and self.pipeline.store_healthy
        if self.role == "api":
            # Informative only: without LISTEN the watch streams poll on every heartbeat.
            components["notifications"] = "listening" if self.notifier.listening else "polling"
        return ok, components

    def _database_state(self) -> str:
        """The database as the latest ping saw it, from process state only."""
        now = trio.current_time()
        if self.api_pool.closed or self._database_reading is None:  # opened once the database is reached
            return "not connected yet"
        if self._ping_started is not None and now - self._ping_started >= HEALTH_DEADLINE:
            return f"unreachable (no answer within {HEALTH_DEADLINE:g}s)"
        state, taken = self._database_reading
        if now - taken > HEALTH_STALE:
            return f"unknown (no reading for {now - taken:.0f}s)"
        return state

    async def _watch_database(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Ping the database every HEALTH_INTERVAL, for health to report;
        started once the first reading is in, runs until HTTP stops."""
        with self._pinging:
            while True:
                self._ping_started = trio.current_time()
                # Abandoned at the deadline if the database does not answer (see InstanceStore.ping).
                with trio.move_on_after(HEALTH_DEADLINE) as deadline:
                    try:
                        await self.instances.ping()
                        state = "reachable"
                    except Exception:
                        state = "unreachable"
                if deadline.cancelled_caught:
                    state = f"unreachable (no answer within {HEALTH_DEADLINE:g}s)"
                self._ping_started = None
                first = self._database_reading is None
                self._database_reading = (state, trio.current_time())
                if first:
                    task_status.started()
                await trio.sleep(HEALTH_INTERVAL)

    @property
    def stopping(self) -> bool:
        return self._stopped.is_set()

    def stop(self) -> None:
        """Stop gracefully (the first SIGTERM/SIGINT): give up start-up, or drain."""
        self._stopped.set()
        if self._starting is not None:
            self._starting.cancel()

    def stop_now(self) -> None:
        """Stop at once (a second signal): abandon the drain and what is in flight."""
        self._stop_now = True
        self.stop()
        if self._draining is not None:
            self._draining.cancel()  # _drain says what it left, then run() cancels the rest
        elif self._drained and self._nursery is not None:
            self._nursery.cancel_scope.cancel()  # only HTTP was still stopping

    async def run(self, ready: Callable[[], None] = lambda: None) -> None:
        """Serve HTTP, await the dependencies, call `ready()` once consuming,
        and run until stopped; then drain within the grace period."""
        self.startup.begin()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                http_stop = trio.Event()
                await self._serve_http(nursery, http_stop)
                with trio.CancelScope() as starting:
                    self._starting = starting
                    if not self._stopped.is_set():
                        await self._start_consuming(nursery)
                        self.ready = True
                self._starting = None
                if self.ready:
                    ready()
                    await self._stopped.wait()
                    # Watch streams end now: their clients resume elsewhere (or
                    # after the restart), and the HTTP shutdown need not wait for them.
                    self.notifier.close()
                    if self.source is not None:
                        await self._drain()
                    # Changes went on being published while the consumer drained.
                    self._changes.cancel()
                else:
                    log.info("stopped during start-up")
                self._drained = True
                if self._consuming is not None:
                    self._consuming.cancel()  # what the grace period left: NATS redelivers it
                http_stop.set()
                self._pinging.cancel()
                nursery.cancel_scope.deadline = trio.current_time() + 3
                if self._stop_now:
                    nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            await self._close_connections()

    async def _serve_http(self, nursery: trio.Nursery, http_stop: trio.Event) -> None:
        config = self.config
        app = make_app(
            self.instances,
            set(self.catalog.service_types()),
            self.health,
            self.metrics.registry,
            api_token=config.api_token,
            page_token_secret=self.page_token_secret,
            max_body_bytes=config.max_request_bytes,
            changes=(self.changes, self.notifier),
            max_watch_streams=config.max_watch_streams,
            max_waiting_requests=config.max_waiting_requests,
            # The pipeline goes first while it holds unacknowledged messages
            # (docs/http-api.md#overload); an API-only replica has none.
            intake_busy=lambda: self.source is not None and self.source.unacknowledged > 0,
            role=self.role,
        )
        if (problem := coalesce_response_writes()) is not None:
            log.warning("HTTP responses are written as hypercorn writes them (slower): %s", problem)
        hconfig = HypercornConfig()
        hconfig.bind = [f"{config.http_host}:{config.http_port}"]
        hconfig.accesslog = None
        # Through our logging set-up, not a second handler of hypercorn's own.
        hconfig.errorlog = logging.getLogger("hypercorn.error")
        hconfig.graceful_timeout = 2
        try:
            # type: ignore: hypercorn's ASGIFramework (TypedDict scopes and events) does not
            # accept Starlette's (MutableMapping) __call__, though the two speak the same ASGI.
            binds = await nursery.start(
                partial(hypercorn_serve, app, hconfig, shutdown_trigger=http_stop.wait)  # type: ignore[arg-type]
            )
        except Exception as exc:
            bind_error = _bind_error(exc)
            if bind_error is None:
                raise
            raise ConfigError(
                f"cannot listen on {config.http_host}:{config.http_port} ({bind_error.strerror}): choose another "
                "port with --http-port or address with --http-host (DCMSTATUS_HTTP_PORT, DCMSTATUS_HTTP_HOST), "
                "or stop what uses it"
            ) from None
        self.http_url = binds[0] if binds else f"http://{config.http_host}:{config.http_port}"
        log.info("HTTP API listening at %s", self.http_url)

    async def _start_consuming(self, nursery: trio.Nursery) -> None:
        shown = self.config.redacted()["database_url"] if self.config.database_url else self.database_url
        log.info("applying database migrations")
        applied = await self.startup.reach(
            "PostgreSQL",
            # Abandoned if the service is stopped meanwhile: the migration
            # is one transaction, rolled back when the connection goes.
            partial(trio.to_thread.run_sync, migrate, self.database_url, abandon_on_cancel=True),
            at=shown,
            unreachable=(psycopg.OperationalError,),
        )
        log.info("database schema is current%s", f" (applied {', '.join(applied)})" if applied else "")
        self.api_pool.open(wait=False)  # connects in the background
        await nursery.start(self._watch_database)  # health's database reading
        if self.config.runs("api"):
            self.watch_pool.open(wait=False)
            await nursery.start(self.notifier.run)
        if self.config.runs("consumer"):
            await nursery.start(self._consume)
            await nursery.start(self._run_changes)

    async def _consume(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The pipeline and the source, in a scope of their own: what the
        drain did not finish is cancelled at once, while HTTP stops gracefully."""
        assert self.source is not None and self.pipeline is not None
        send, receive = trio.open_memory_channel[Delivery](float("inf"))
        async with trio.open_nursery() as nursery:
            self._consuming = nursery.cancel_scope
            await nursery.start(self.pipeline.run, receive)
            await nursery.start(self.source.run, send)
            task_status.started()

    async def _run_changes(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The relay (unless --no-change-events) and the outbox's housekeeping, until stopped."""
        with self._changes:
            async with trio.open_nursery() as nursery:
                if self.relay is not None:
                    await nursery.start(self.relay.run)
                await nursery.start(
                    partial(
                        keep_outbox,
                        self.housekeeping,
                        self.metrics,
                        retention=timedelta(seconds=self.config.changes_retention),
                        relay_on=self.relay is not None,
                    )
                )
                task_status.started()

    async def _drain(self) -> None:
        config = self.config
        assert self.source is not None and self.pipeline is not None
        log.info("stopping: finishing in-flight work (grace period %.0fs)", config.grace_period)
        with trio.move_on_after(config.grace_period) as grace:
            self._draining = grace
            if self._stop_now:  # the second signal came before the drain began
                grace.cancel()
            await self.source.stop_intake()
            await self.pipeline.drained.wait()
            await self.source.close()
        self._draining = None
        if self._stop_now:
            log.warning(
                "stopping at once (second signal): %d received messages left unacknowledged; "
                "NATS redelivers them after ack_wait (%gs)", self.source.unacknowledged, config.ack_wait,
            )
            with trio.move_on_after(1):  # the acks already sent still go out
                await self.source.close()
        elif grace.cancelled_caught:
            log.warning(
                "grace period over with work in flight; %d unacknowledged messages will be redelivered",
                self.source.unacknowledged,
            )
        log.info("stopped: %s", " ".join(f"{k}={v}" for k, v in self.metrics.totals().items()))

    async def _close_connections(self) -> None:
        """Close the API pool and the writers' connections, side by side, no
        longer than _CLOSE_DEADLINE: a writer thread abandoned mid-statement
        closes its own connection when the statement ends (StatusStore.close)."""
        self.notifier.close()
        self._changes.cancel()
        closers: list[Callable[[], None]] = [self.housekeeping.close]
        if self._relay_adapters is not None:
            outbox, listener, publisher = self._relay_adapters
            with trio.move_on_after(2):
                await publisher.close()
            # Closing the outbox's connection ends the leadership: a standby takes over.
            closers += [outbox.close, listener.close]
        closers += [partial(self.api_pool.close, timeout=1.0), partial(self.watch_pool.close, timeout=1.0)]
        closers += [partial(store.close, cancel_timeout=_CLOSE_DEADLINE) for store in self.writer_stores]
        with trio.move_on_after(_CLOSE_DEADLINE + 0.5) as scope:
            async with trio.open_nursery() as nursery:
                for close in closers:
                    nursery.start_soon(partial(trio.to_thread.run_sync, close, abandon_on_cancel=True))
        if scope.cancelled_caught:
            log.warning("the database did not answer while its connections were closed; left them to the exit")


def _configure_api_connection(conn: psycopg.Connection) -> None:
    # Autocommit: every API statement stands alone (the summary's three reads
    # see committed rows as a READ COMMITTED transaction would), so a read is
    # one round trip, not BEGIN, SELECT, COMMIT.
    conn.autocommit = True
    conn.execute(f"SET statement_timeout = '{_API_STATEMENT_TIMEOUT}'")


def _bind_error(exc: BaseException) -> OSError | None:
    """The OSError of a failed bind inside (nested) exception groups, if any."""
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            if (found := _bind_error(inner)) is not None:
                return found
        return None
    bind_errors = (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL)
    return exc if isinstance(exc, OSError) and exc.errno in bind_errors else None


async def serve(config: ServeConfig, catalog: Catalog | None = None) -> int:
    """`dcmstatus serve`: returns the exit code."""
    catalog = catalog or Catalog.default()
    if not config.embedded:
        _check_urls(config)
    # Before anything starts: a bad one is a config error. Only the API signs
    # page tokens; a consumer replica neither needs nor creates a secret.
    secret = page_token_secret(config) if config.runs("api") else b""
    # Signals are ours from here to the very end: one arriving while the
    # embedded servers stop cannot interrupt their stop (no orphans).
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio_asyncio.open_loop() as loop:
            loop.set_exception_handler(asyncio_exception_handler)
            async with AsyncExitStack() as stack:
                nats_url: str | None
                if config.embedded:
                    nats_url, database_url = await _start_embedded(config, stack)
                else:
                    # ServeConfig.validate: both URLs given, or neither (embedded);
                    # an api replica needs only the database's.
                    assert config.database_url is not None
                    nats_url, database_url = config.nats_url if config.runs("consumer") else None, config.database_url
                service = Service(config, nats_url, database_url, catalog, secret)
                # runtime.json describes a running service: it goes when we go.
                stack.callback((Path(config.data_dir) / "runtime.json").unlink, missing_ok=True)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_watch_signals, signals, service)
                    await service.run(ready=partial(_announce, config, service))
                    nursery.cancel_scope.cancel()  # the signal watcher
    return 0


def _check_urls(config: ServeConfig) -> None:
    """A malformed URL is a configuration error (exit 2), not something to wait for."""
    redacted = config.redacted()
    for option, check in (("nats_url", nats_servers), ("database_url", check_conninfo)):
        if getattr(config, option) is None:  # an api replica's --nats-url
            continue
        try:
            check(getattr(config, option))
        except ValueError as exc:
            flag = "--" + option.replace("_", "-")
            raise ConfigError(
                f"{flag} {redacted[option]!r} is not valid: {exc} "
                f"(set by the flag, DCMSTATUS_{option.upper()} or the config file)"
            ) from None


async def _watch_signals(signals, service: Service) -> None:
    """The first SIGTERM/SIGINT stops gracefully, a second one at once."""
    async for signum in signals:
        name = signal.Signals(signum).name
        if service.stopping:
            log.warning("received %s again: stopping at once", name)
            service.stop_now()
        else:
            log.info("received %s", name)
            service.stop()


async def _start_embedded(config: ServeConfig, stack: AsyncExitStack) -> tuple[str, str]:
    from dcmstatus.devtools.embedded import EmbeddedNats, EmbeddedPostgres

    data_dir = config.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    log.info("starting embedded nats-server and PostgreSQL under %s", data_dir)
    nats_server = EmbeddedNats(data_dir, port=config.nats_port)
    postgres = EmbeddedPostgres(data_dir)
    # Stop callbacks are registered before start, so a failed start still cleans up.
    stack.push_async_callback(partial(trio.to_thread.run_sync, nats_server.stop))
    stack.push_async_callback(partial(trio.to_thread.run_sync, postgres.stop))
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


def page_token_secret(config: ServeConfig) -> bytes:
    """The configured page token secret, or the one kept in the data
    directory (made on first start, reused after)."""
    if config.page_token_secret is not None:
        return config.page_token_secret.encode("utf-8")
    return load_or_create_secret(Path(config.data_dir) / PAGE_TOKEN_KEY_FILE)


def _announce(config: ServeConfig, service: Service) -> None:
    runtime = {
        "http_url": service.http_url,
        "nats_url": service.nats_url,
        "database_url": service.database_url,
        "role": config.role,
    }
    data_dir = Path(config.data_dir)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        # Written aside and renamed: a reader never sees it half-written.
        # The URLs carry the embedded servers' secrets: the file is the owner's
        # alone (0600), which is what lets the other commands reach them.
        partial = data_dir / f".runtime.json.{os.getpid()}"
        partial.unlink(missing_ok=True)
        with os.fdopen(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as file:
            file.write(json.dumps(runtime, indent=2) + "\n")
        partial.replace(data_dir / "runtime.json")
    except OSError as exc:
        log.warning("could not write %s/runtime.json: %s", data_dir, exc)
    lines = [f"dcmstatus is running (role {config.role})"]
    if config.runs("api"):
        lines.append(f"  HTTP API   {service.http_url}/api/v1/service-type-instances")
    lines.append(f"  health     {service.http_url}/api/v1/health   metrics {service.http_url}/metrics")
    if service.source is not None and service.nats_url is not None:
        lines.append(
            f"  publish to {redact_url(service.nats_url)}  subjects {config.subjects} (stream {service.source.stream})"
        )
    lines += [
        f"  database   {redact_url(service.database_url)}",
        f"  runtime    {data_dir / 'runtime.json'}",
        "Stop with Ctrl-C (SIGINT) or SIGTERM.",
    ]
    print("\n".join(lines), flush=True)
