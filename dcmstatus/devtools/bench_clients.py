"""The benchmark's client processes (docs/performance.md#parts): an HTTP load
loop, and the receivers that timestamp what arrives (committed rows through
PostgreSQL NOTIFY, Server-Sent Events of the watch stream, change events on
NATS).

Each runs in a process of its own, `python -m dcmstatus.devtools.bench_clients
KIND CONFIG-JSON`, so that it neither shares the bench's one Python thread
with the publisher (which would delay both and make the latencies lie) nor
hides its own CPU: every client reports the CPU seconds it spent. Protocol:
the client prints `ready` once it receives (or, for the load, once it is
connected), runs until its standard input closes, then prints one JSON line
with its result; the load also takes a `mark` line, which starts its
measured window afresh.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import threading
import time
from typing import Any


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def _say_ready() -> None:
    print("ready", flush=True)


async def _stdin_closed() -> None:
    """Returns when the bench closes our standard input (its stop signal)."""
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


# -- HTTP load: N keep-alive connections, one request in flight on each --------------


async def _http_load(config: dict[str, Any]) -> dict[str, Any]:
    """Closed-loop load: `clients` connections, each sending its next GET as
    soon as the last answer is in. h11 parses the answers (a well-kept HTTP/1.1
    parser; its own cost is in the cpu_s we report)."""
    import h11

    host, port = config["host"], config["port"]
    paths: list[str] = config["paths"]
    timeout: float = config.get("timeout", 5.0)
    stop = asyncio.Event()
    latencies: list[float] = []
    counts = {"ok": 0, "errors": 0, "timeouts": 0, "connect_failures": 0}
    statuses: dict[int, int] = {}
    started: list[float] = []
    first_connected = asyncio.Event()

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        while not stop.is_set():
            try:
                return await asyncio.open_connection(host, port)
            except OSError:
                if first_connected.is_set():
                    counts["connect_failures"] += 1
                await asyncio.sleep(0.01)
        raise asyncio.CancelledError

    async def client(n: int) -> None:
        rng = random.Random(n)
        reader, writer = await connect()
        if not first_connected.is_set():
            started.append(time.monotonic())
            first_connected.set()
        conn = h11.Connection(h11.CLIENT)
        while not stop.is_set():
            path = paths[rng.randrange(len(paths))]
            request = h11.Request(method="GET", target=path, headers=[("Host", f"{host}:{port}")])
            t0 = time.perf_counter()
            try:
                writer.write(conn.send(request) + conn.send(h11.EndOfMessage()))
                status = 0
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        data = await asyncio.wait_for(reader.read(65536), timeout)
                        conn.receive_data(data)
                        continue
                    if isinstance(event, h11.Response):
                        status = event.status_code
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    elif isinstance(event, h11.ConnectionClosed):
                        raise ConnectionError("closed by the server")
            except TimeoutError:
                counts["timeouts"] += 1
                writer.close()
                reader, writer = await connect()
                conn = h11.Connection(h11.CLIENT)
                continue
            except (OSError, ConnectionError, h11.ProtocolError):
                counts["errors"] += 1
                writer.close()
                reader, writer = await connect()
                conn = h11.Connection(h11.CLIENT)
                continue
            latencies.append(time.perf_counter() - t0)
            statuses[status] = statuses.get(status, 0) + 1
            counts["ok" if status < 400 else "errors"] += 1
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                writer.close()
                reader, writer = await connect()
                conn = h11.Connection(h11.CLIENT)
            else:
                conn.start_next_cycle()
        writer.close()

    tasks = [asyncio.create_task(client(n)) for n in range(config["clients"])]
    await first_connected.wait()
    _say_ready()
    cpu0 = _cpu_seconds()
    loop = asyncio.get_running_loop()
    # A "mark" line starts the measured window afresh (the bench sends it when
    # the drain's clock starts: answers during the service's start-up do not
    # count); end of input stops.
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        if line.strip() == "mark":
            latencies.clear()
            statuses.clear()
            counts.update(dict.fromkeys(counts, 0))
            started[0] = time.monotonic()
            cpu0 = _cpu_seconds()
    stop.set()
    seconds = time.monotonic() - started[0]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    latencies.sort()

    def pct(q: float) -> float | None:
        return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000, 2) if latencies else None

    return {
        "requests": len(latencies), "seconds": round(seconds, 3), "rps": round(len(latencies) / seconds, 1),
        "p50_ms": pct(0.50), "p99_ms": pct(0.99), "max_ms": pct(1.0), **counts,
        "statuses": {str(k): v for k, v in statuses.items()}, "client_cpu_s": round(_cpu_seconds() - cpu0, 3),
    }  # fmt: skip


# -- receivers: timestamp each arrival by the status message "b<n>" the bench sent --------


def _pg_notify(config: dict[str, Any]) -> dict[str, Any]:
    import psycopg

    received: dict[str, float] = {}
    stop = threading.Event()
    with psycopg.connect(config["database_url"], autocommit=True) as conn:
        conn.execute("LISTEN dcmbench")
        _say_ready()

        def wait_for_stop() -> None:
            sys.stdin.read()
            stop.set()

        threading.Thread(target=wait_for_stop, daemon=True).start()
        while not stop.is_set():
            for note in conn.notifies(timeout=0.2):
                received.setdefault(note.payload, time.time())
    return {"received": received, "client_cpu_s": round(_cpu_seconds(), 3)}


async def _sse(config: dict[str, Any]) -> dict[str, Any]:
    """GET /api/v1/status-changes with Accept: text/event-stream, parsed with h11."""
    import h11
    import msgspec

    decode = msgspec.json.Decoder().decode
    received: dict[str, float] = {}
    reader, writer = await asyncio.open_connection(config["host"], config["port"])
    conn = h11.Connection(h11.CLIENT)
    request = h11.Request(
        method="GET", target="/api/v1/status-changes",
        headers=[("Host", f"{config['host']}:{config['port']}"), ("Accept", "text/event-stream")],
    )  # fmt: skip
    writer.write(conn.send(request) + conn.send(h11.EndOfMessage()))
    buffer = b""
    ready = False
    error = None

    async def read() -> None:
        nonlocal buffer, ready, error
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(65536)
                if not data:
                    error = "the stream ended"
                    return
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Response):
                if event.status_code != 200:
                    error = f"HTTP {event.status_code}"
                    return
            elif isinstance(event, h11.Data):
                now = time.time()
                buffer += bytes(event.data)
                *frames, buffer = buffer.split(b"\n\n")
                for frame in frames:
                    if not ready:  # the first frame holds only the position
                        ready = True
                        _say_ready()
                    for line in frame.split(b"\n"):
                        if line.startswith(b"data:"):
                            change = decode(line[5:])
                            received.setdefault(change.get("status_message") or "", now)
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                error = "the stream ended"
                return

    reading = asyncio.create_task(read())
    closed = asyncio.create_task(_stdin_closed())
    await asyncio.wait([reading, closed], return_when=asyncio.FIRST_COMPLETED)
    if not ready:
        _say_ready()  # unblock the bench; the error says why
    reading.cancel()
    writer.close()
    return {"received": received, "error": error, "client_cpu_s": round(_cpu_seconds(), 3)}


async def _nats_changes(config: dict[str, Any]) -> dict[str, Any]:
    """An ordered consumer of the changes stream on `<prefix>.>`, from its start."""
    import msgspec
    import nats
    import nats.js.errors

    decode = msgspec.json.Decoder().decode
    received: dict[str, float] = {}
    nc = await nats.connect(config["nats_url"])

    async def on_message(msg: Any) -> None:
        now = time.time()
        data = decode(msg.data).get("data") or {}
        received.setdefault(data.get("status_message") or "", now)

    js = nc.jetstream()
    deadline = time.monotonic() + 30
    while True:  # the service's relay creates the stream when it starts: wait for it
        try:
            await js.subscribe(f"{config['prefix']}.>", stream=config["stream"], cb=on_message, ordered_consumer=True)
            break
        except nats.js.errors.NotFoundError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)
    _say_ready()
    await _stdin_closed()
    await nc.close()
    return {"received": received, "client_cpu_s": round(_cpu_seconds(), 3)}


def main(argv: list[str]) -> int:
    kind, config = argv[0], json.loads(argv[1])
    if kind == "http-load":
        result = asyncio.run(_http_load(config))
    elif kind == "pg-notify":
        result = _pg_notify(config)
    elif kind == "sse":
        result = asyncio.run(_sse(config))
    elif kind == "nats-changes":
        result = asyncio.run(_nats_changes(config))
    else:
        raise SystemExit(f"unknown client {kind!r}")
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
