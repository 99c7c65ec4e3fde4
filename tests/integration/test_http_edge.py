"""The HTTP API's edge (adapters/http: routing.py, auth.py, problems.py,
page_tokens.py): how a path is split, what a path that is not UTF-8 gets,
websockets refused, an unexpected error logged once, and page tokens that
only the deployment's secret makes."""

import logging
import socket

import pytest
import trio
import trio_asyncio  # noqa: F401  # must precede psycopg: it patches asyncio
from http_harness import BASE, assert_problem, serve_api

from dcmstatus.adapters.http.page_tokens import InstanceCursor, PageTokens


@pytest.fixture
async def api(database_url):
    async with serve_api(database_url) as api:
        yield api


@pytest.fixture
async def secured(database_url):
    async with serve_api(database_url, api_token="tok-3n") as api:
        yield api


async def test_percent_encoded_slash_stays_inside_one_segment(api):
    problem = assert_problem(await api.request("GET", f"{BASE}/a%2Fb"), 404)
    assert problem["detail"] == "no instance 'a/b'"  # routed to the instance, not a longer path
    problem = assert_problem(await api.request("DELETE", f"{BASE}/a%252Fb"), 404)
    assert problem["detail"] == "no instance 'a%2Fb'"  # decoded once only
    # Percent-encoded letters name the same route.
    assert (await api.request("GET", "/api/v1/%68ealth")).status == 200
    assert_problem(await api.request("GET", "/api%2Fv1/health"), 404)


@pytest.mark.parametrize("path", [f"{BASE}/%FF", "/api/v1/he%FFalth", "/%C3%28"])
async def test_path_that_is_not_utf8_is_404_and_needs_the_token_first(secured, path):
    problem = assert_problem(await secured.request("GET", path, headers={"authorization": ""}), 401)
    assert "token" in problem["detail"]
    problem = assert_problem(await secured.request("GET", path), 404)
    assert "not valid UTF-8" in problem["detail"]


async def test_websockets_are_refused(api):
    def upgrade() -> bytes:
        with socket.create_connection((api.host, api.port), timeout=30) as sock:
            sock.sendall(
                b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
            return received

    response = await trio.to_thread.run_sync(upgrade)
    assert response.startswith(b"HTTP/1.1 403 "), response


async def test_unexpected_error_is_logged_once_with_method_and_path(api, caplog):
    await api.sql("DROP TABLE rejected_events")
    with caplog.at_level(logging.INFO):
        assert_problem(await api.request("GET", "/api/v1/rejected-events?reason=too_large"), 500)
        # The next request on a new connection: the first one is finished,
        # its log records written.
        assert (await api.request("GET", "/api/v1/health")).status == 200
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == ["GET /api/v1/rejected-events failed"]
    assert errors[0].exc_info is not None


async def test_page_token_from_another_secret_is_refused(database_url):
    async with serve_api(database_url, page_token_secret=b"replica-a secret") as a:
        for n in range(3):
            await a.create(f"p{n}")
        ids, token = await a.list_ids({"max_page_size": 1})
        assert ids == ["p0"] and token
        assert (await a.list_ids({"max_page_size": 1, "page_token": token}))[0] == ["p1"]
    async with serve_api(database_url, page_token_secret=b"replica-a secret") as same:  # a restart, a replica
        assert (await same.list_ids({"max_page_size": 1, "page_token": token}))[0] == ["p1"]
    async with serve_api(database_url, page_token_secret=b"replica-b secret") as other:
        reply = await other.request("GET", f"{BASE}?max_page_size=1&page_token={token}")
        assert "page_token is invalid" in assert_problem(reply, 400)["detail"]


async def test_page_token_forged_with_the_former_public_key_is_refused(database_url):
    async with serve_api(database_url, page_token_secret=b"this deployment's secret") as api:
        for n in range(3):
            await api.create(f"f{n}")
        cursor = InstanceCursor("f1", None, None, None)
        # Made with this deployment's secret, the same cursor is accepted:
        # the refusal below is the key's doing, not the token's shape.
        genuine = PageTokens(b"this deployment's secret").encode(cursor)
        assert (await api.list_ids({"page_token": genuine}))[0] == ["f2"]
        forged = PageTokens(b"dcmstatus/page-token/v1").encode(cursor)
        assert_problem(await api.request("GET", f"{BASE}?page_token={forged}"), 400)


async def test_configured_token_with_surrounding_whitespace_matches(database_url):
    async with serve_api(database_url, api_token=" tok-3n\n") as api:
        reply = await api.request("GET", BASE, headers={"authorization": "Bearer tok-3n"})
        assert reply.status == 200, reply.body
