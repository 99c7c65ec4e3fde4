"""Admission (adapters/http/admission.py, docs/http-api.md#overload): a few
requests run at once, a bounded number wait, and beyond that a request gets
503 with Retry-After at once, counted; health and /metrics never wait. And
hypercorn writes a response with a Content-Length in one send
(hypercorn_internals.py), streamed responses still head first."""

import socket

import psycopg
import pytest
import trio
import trio_asyncio  # noqa: F401  # must precede psycopg: it patches asyncio
from http_harness import BASE, assert_problem, serve_api

RUNNING, WAITING = 2, 3


@pytest.fixture
async def api(database_url):
    async with serve_api(database_url, max_running_requests=RUNNING, max_waiting_requests=WAITING) as api:
        yield api


def _rejected(api) -> float:
    return api.metrics.registry.get_sample_value("dcmstatus_http_requests_rejected_total") or 0.0


async def test_beyond_the_waiting_bound_a_request_gets_503_with_retry_after(api):
    await api.create(id="held")
    replies = []

    async def get() -> None:
        replies.append(await api.request("GET", f"{BASE}/held"))

    # A table lock holds every read of the instances: RUNNING requests take
    # their turn and block in the database, WAITING more wait for a turn.
    locker = await trio.to_thread.run_sync(psycopg.connect, api.database_url)
    try:
        await trio.to_thread.run_sync(locker.execute, "LOCK TABLE service_type_instances IN ACCESS EXCLUSIVE MODE")
        async with trio.open_nursery() as nursery:
            for _ in range(RUNNING + WAITING):
                nursery.start_soon(get)

            def blocked() -> bool:
                with psycopg.connect(api.database_url, autocommit=True) as conn:
                    row = conn.execute(
                        "SELECT count(*) FROM pg_locks"
                        " WHERE NOT granted AND relation = 'service_type_instances'::regclass"
                    ).fetchone()
                return row is not None and row[0] == RUNNING

            with trio.fail_after(10):
                while not await trio.to_thread.run_sync(blocked):
                    await trio.sleep(0.02)
            await trio.sleep(0.2)  # the WAITING requests reach the admission queue
            assert replies == [] and _rejected(api) == 0

            # One more: refused at once, a problem document with Retry-After.
            with trio.fail_after(5):
                refused = await api.request("GET", f"{BASE}/held")
            problem = assert_problem(refused, 503)
            assert refused.headers["retry-after"] == "1"
            assert "waiting" in problem["detail"]
            assert refused.headers["x-content-type-options"] == "nosniff"  # the edge's headers, as on any answer
            assert _rejected(api) == 1
            # Health and /metrics never wait behind the API.
            with trio.fail_after(5):
                assert (await api.request("GET", "/api/v1/health")).status == 200
                metrics = await api.request("GET", "/metrics")
            assert b"dcmstatus_http_requests_rejected_total 1.0" in metrics.body

            await trio.to_thread.run_sync(locker.rollback)  # the lock goes: every held request is answered
    finally:
        await trio.to_thread.run_sync(locker.close)
    assert sorted(r.status for r in replies) == [200] * (RUNNING + WAITING)
    assert _rejected(api) == 1


async def test_requests_within_the_bounds_all_get_their_answer(api):
    await api.create(id="many")
    replies = []

    async def get() -> None:
        replies.append(await api.request("GET", f"{BASE}/many"))

    async with trio.open_nursery() as nursery:
        for _ in range(RUNNING + WAITING):
            nursery.start_soon(get)
    assert [r.status for r in replies] == [200] * (RUNNING + WAITING)
    assert _rejected(api) == 0


def _raw_exchange(host: str, port: int, request: bytes, until: bytes) -> list[bytes]:
    """The chunks recv() returned up to `until` (with TCP_NODELAY on the
    server, each send arrives as its own segment on loopback)."""
    chunks: list[bytes] = []
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(request)
        data = b""
        while until not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            data += chunk
    return chunks


async def test_a_response_with_a_length_is_one_write_and_a_stream_sends_its_head_first(api):
    await api.create(id="one-write")
    request = f"GET {BASE}/one-write HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    chunks = await trio.to_thread.run_sync(_raw_exchange, api.host, api.port, request, b'"one-write"}')
    # Head and body in the first segment (before: the head alone, then the body).
    assert chunks[0].startswith(b"HTTP/1.1 200") and chunks[0].rstrip().endswith(b"}"), chunks
    head = f"HEAD {BASE}/one-write HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    chunks = await trio.to_thread.run_sync(_raw_exchange, api.host, api.port, head, b"\r\n\r\n")
    assert b"".join(chunks).startswith(b"HTTP/1.1 200") and b"content-length" in b"".join(chunks).lower()
    # An event stream's head goes out before any event: the client sees it open.
    stream = b"GET /api/v1/status-changes HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n"
    with trio.fail_after(5):
        chunks = await trio.to_thread.run_sync(_raw_exchange, api.host, api.port, stream, b"\r\n\r\n")
    assert b"".join(chunks).startswith(b"HTTP/1.1 200") and b"text/event-stream" in b"".join(chunks)


async def test_while_intake_is_busy_fewer_requests_run(database_url):
    busy = True
    async with serve_api(database_url, max_running_requests=4, intake_busy=lambda: busy) as api:
        await api.create(id="turns")
        replies = []

        async def get() -> None:
            replies.append(await api.request("GET", f"{BASE}/turns"))

        def blocked() -> int:
            with psycopg.connect(api.database_url, autocommit=True) as conn:
                row = conn.execute(
                    "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'service_type_instances'::regclass"
                ).fetchone()
            return row[0] if row else 0

        async def settle(expected: int) -> None:
            with trio.fail_after(10):
                while await trio.to_thread.run_sync(blocked) < expected:
                    await trio.sleep(0.02)
            await trio.sleep(0.3)  # and no more than that come
            assert await trio.to_thread.run_sync(blocked) == expected

        locker = await trio.to_thread.run_sync(psycopg.connect, api.database_url)
        try:
            await trio.to_thread.run_sync(locker.execute, "LOCK TABLE service_type_instances IN ACCESS EXCLUSIVE MODE")
            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(get)
                await settle(1)  # the pipeline has work: one turn, the others wait
                busy = False
                nursery.start_soon(get)  # the next arrival gives all four turns back
                await settle(4)
                await trio.to_thread.run_sync(locker.rollback)
        finally:
            await trio.to_thread.run_sync(locker.close)
        assert [r.status for r in replies] == [200] * 5
