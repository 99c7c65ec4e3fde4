"""The HTTP API (docs/http-api.md) end to end: the real app served by hypercorn on
trio on a loopback port, a real PostgreSQL, and a plain HTTP client
(http.client in a worker thread, so nothing in the client is trio-aware).
"""

import base64
import http.client
import json
import socket
import uuid
from typing import Any
from urllib.parse import urlencode

import pytest
import trio
import trio_asyncio  # noqa: F401  # must precede psycopg: it patches asyncio
from http_harness import BASE, Api, assert_problem, rfc3339, serve_api

from dcmstatus.adapters.http.app import MAX_BODY_BYTES


@pytest.fixture
async def api(database_url):
    async with serve_api(database_url) as api:
        yield api


# --- create, get, delete -----------------------------------------------------


async def test_create_without_id_generates_a_lowercase_uuid4(api):
    spec = {"cpu": 2, "disks": [{"size": "10Gi"}], "labels": {"team": "ünïcode"}}
    reply = await api.request("POST", BASE, json_body={"service_type": "vm", "spec": spec})
    assert reply.status == 201, reply.body
    assert reply.headers["content-type"] == "application/json"
    instance = reply.json()
    assert uuid.UUID(instance["id"]).version == 4
    assert instance["id"] == instance["id"].lower()
    assert reply.headers["location"] == f"{BASE}/{instance['id']}"
    assert instance == {
        "id": instance["id"],
        "path": f"service-type-instances/{instance['id']}",
        "service_type": "vm",
        "name": "",
        "agent_name": "",
        "provider_name": "",
        "status": "PROVISIONING",
        "status_message": "",
        "outputs": None,
        "spec": spec,
        "status_time": None,
        "create_time": instance["create_time"],
        "update_time": instance["update_time"],
    }
    assert rfc3339(instance["create_time"]) == rfc3339(instance["update_time"])

    got = await api.request("GET", f"{BASE}/{instance['id']}")
    assert got.status == 200
    assert got.json() == instance


async def test_create_with_client_chosen_id_and_optional_fields(api):
    body = {
        "service_type": "container",
        "spec": {"image": "nginx"},
        "name": "web",
        "agent_name": "agent-1",
        "provider_name": "k8s-sp",
    }
    reply = await api.request("POST", f"{BASE}?id=web-1", json_body=body)
    assert reply.status == 201, reply.body
    instance = reply.json()
    assert (instance["id"], instance["path"]) == ("web-1", "service-type-instances/web-1")
    assert reply.headers["location"] == f"{BASE}/web-1"
    assert instance["name"] == "web"
    assert instance["agent_name"] == "agent-1"
    assert instance["provider_name"] == "k8s-sp"
    assert instance["service_type"] == "container"

    # JSON null for an optional field means "absent".
    reply = await api.request(
        "POST", f"{BASE}?id=web-2", json_body={"service_type": "vm", "spec": {}, "name": None}
    )
    assert reply.status == 201 and reply.json()["name"] == ""

    longest = "a" * 63
    reply = await api.request("POST", f"{BASE}?id={longest}", json_body={**body})
    assert reply.status == 201 and reply.json()["id"] == longest


async def test_create_with_taken_id_is_409(api):
    await api.create("taken")
    reply = await api.request(
        "POST", f"{BASE}?id=taken", json_body={"service_type": "network", "spec": {"x": 1}}
    )
    problem = assert_problem(reply, 409)
    assert "taken" in problem["detail"]
    # The original row is untouched.
    assert (await api.request("GET", f"{BASE}/taken")).json()["service_type"] == "vm"


@pytest.mark.parametrize(
    "query",
    [
        "id=Upper",
        "id=-leading",
        "id=trailing-",
        "id=under_score",
        "id=" + "a" * 64,
        "id=",
        "id=a&id=b",
        "id=%FF",
        "unknown=1",
    ],
)
async def test_create_with_bad_query_is_400(api, query):
    reply = await api.request(
        "POST", f"{BASE}?{query}", json_body={"service_type": "vm", "spec": {}}
    )
    assert_problem(reply, 400)


@pytest.mark.parametrize(
    "body",
    [b"", b"{", b'{"service_type": "vm", "spec": {}} trailing', b"\xff\xfe", b"not json"],
)
async def test_create_with_malformed_json_is_400(api, body):
    assert_problem(await api.request("POST", BASE, body), 400)


async def test_create_with_invalid_utf8_inside_spec_is_400(api):
    body = b'{"service_type": "vm", "spec": {"k": "\xff"}}'
    assert_problem(await api.request("POST", BASE, body), 400)


@pytest.mark.parametrize(
    "body",
    [
        {"service_type": "nope", "spec": {}},
        {"service_type": "vm", "spec": []},
        {"service_type": "vm", "spec": "text"},
        {"service_type": "vm", "spec": None},
        {"service_type": "vm"},
        {"spec": {}},
        {"service_type": "vm", "spec": {}, "colour": "blue"},
        {"service_type": "vm", "spec": {}, "name": 5},
        {"service_type": 7, "spec": {}},
        ["vm", {}],
        # PostgreSQL refuses these; the client still gets a 422, not a 500.
        {"service_type": "vm", "spec": {"k": "nul\u0000"}},
        {"service_type": "vm", "spec": {}, "name": "nul\u0000"},
    ],
)
async def test_create_with_invalid_body_is_422(api, body):
    assert_problem(await api.request("POST", BASE, json_body=body), 422)
    assert await api.sql("SELECT count(*) FROM service_type_instances") == [(0,)]


async def test_deeply_nested_spec_round_trips_and_too_deep_is_refused(api):
    deep: Any = {"leaf": True}
    for _ in range(300):
        deep = {"d": [deep]}
    created = await api.create("deep", spec=deep)
    assert created["spec"] == deep
    assert (await api.request("GET", f"{BASE}/deep")).json()["spec"] == deep

    too_deep = b'{"service_type":"vm","spec":' + b'{"d":' * 100_000 + b"1" + b"}" * 100_001
    assert_problem(await api.request("POST", BASE, too_deep), 400)


async def test_get_and_delete_unknown_ids_are_404(api):
    for path in ("missing", "a%2Fb", "%00", "%FF", "x" * 300):
        assert_problem(await api.request("GET", f"{BASE}/{path}"), 404)
        assert_problem(await api.request("DELETE", f"{BASE}/{path}"), 404)


async def test_delete_is_204_then_404(api):
    await api.create("doomed")
    await api.create("kept")
    reply = await api.request("DELETE", f"{BASE}/doomed")
    assert reply.status == 204
    assert reply.body == b""
    assert "content-length" not in reply.headers and "content-type" not in reply.headers
    assert_problem(await api.request("GET", f"{BASE}/doomed"), 404)
    assert_problem(await api.request("DELETE", f"{BASE}/doomed"), 404)
    assert (await api.request("GET", f"{BASE}/kept")).status == 200


async def test_status_fields_reflect_the_row(api):
    await api.create("vm-1", provider_name="kubevirt.localhost")
    await api.sql(
        "UPDATE service_type_instances SET status = 'RUNNING', status_message = 'up',"
        " outputs = '{\"ip\": \"10.0.0.7\"}', status_time = '2026-04-09T15:08:32.123456+02:00',"
        " status_seq = 12 WHERE instance_id = 'vm-1'"
    )
    instance = (await api.request("GET", f"{BASE}/vm-1")).json()
    assert instance["status"] == "RUNNING"
    assert instance["status_message"] == "up"
    assert instance["outputs"] == {"ip": "10.0.0.7"}
    # Always UTC with "Z", whatever the session time zone.
    assert instance["status_time"] == "2026-04-09T13:08:32.123456Z"


# --- list --------------------------------------------------------------------


async def test_list_filters(api):
    await api.create("c-1", service_type="container", provider_name="p1")
    await api.create("v-1", provider_name="p1")
    await api.create("v-2", provider_name="p2")
    await api.create("v-3", provider_name="p1")
    await api.sql(
        "UPDATE service_type_instances SET status = 'RUNNING' WHERE instance_id IN ('v-1', 'c-1')"
    )

    assert await api.list_ids({}) == (["c-1", "v-1", "v-2", "v-3"], None)
    assert await api.list_ids({"service_type": "vm"}) == (["v-1", "v-2", "v-3"], None)
    assert await api.list_ids({"status": "RUNNING"}) == (["c-1", "v-1"], None)
    assert await api.list_ids({"status": "running"}) == (["c-1", "v-1"], None)
    assert await api.list_ids({"provider_name": "p1"}) == (["c-1", "v-1", "v-3"], None)
    assert await api.list_ids({"service_type": "vm", "status": "RUNNING"}) == (["v-1"], None)
    assert await api.list_ids({"service_type": "vm", "provider_name": "p1"}) == (
        ["v-1", "v-3"],
        None,
    )
    assert await api.list_ids({"service_type": "storage"}) == ([], None)
    # An empty value is no filter.
    assert await api.list_ids({"service_type": "", "status": ""}) == (
        ["c-1", "v-1", "v-2", "v-3"],
        None,
    )

    reply = await api.request("GET", f"{BASE}?service_type=vm")
    assert reply.headers["content-type"] == "application/json"
    page = reply.json()
    assert set(page) == {"instances"}  # no next_page_token on the last page
    assert page["instances"][0]["path"] == "service-type-instances/v-1"


async def test_list_pages_stay_correct_while_rows_come_and_go(api):
    for n in range(1, 8):
        await api.create(f"a0{n}")

    ids, token = await api.list_ids({"max_page_size": 3})
    assert ids == ["a01", "a02", "a03"] and token

    # Between pages: a row before the cursor, one after it, delete one ahead
    # and the cursor row itself. Keyset pagination must neither skip nor repeat.
    await api.create("a00")
    await api.create("a035")
    await api.request("DELETE", f"{BASE}/a04")
    await api.request("DELETE", f"{BASE}/a03")

    ids, token = await api.list_ids({"max_page_size": 3, "page_token": token})
    assert ids == ["a035", "a05", "a06"] and token

    await api.create("a99")
    # The page size may change between pages.
    ids, token = await api.list_ids({"max_page_size": 5, "page_token": token})
    assert (ids, token) == (["a07", "a99"], None)


async def test_list_pagination_with_filters(api):
    for n in range(6):
        await api.create(f"v{n}")
        await api.create(f"c{n}", service_type="container")
    seen: list[str] = []
    token = None
    while True:
        query: dict[str, Any] = {"service_type": "container", "max_page_size": 2}
        if token:
            query["page_token"] = token
        ids, token = await api.list_ids(query)
        seen += ids
        if token is None:
            break
        # The token continues this query only.
        assert_problem(await api.request("GET", f"{BASE}?page_token={token}"), 400)
        reply = await api.request("GET", f"{BASE}?service_type=vm&page_token={token}")
        assert_problem(reply, 400)
    # Six rows in pages of two: the third page is full and the last (the
    # one-extra-row probe finds nothing more), so no empty fourth page.
    assert seen == [f"c{n}" for n in range(6)]


async def test_list_page_size_default_and_bounds(api):
    await api.sql(
        "INSERT INTO service_type_instances (instance_id, service_type)"
        " SELECT 'i' || lpad(n::text, 3, '0'), 'vm' FROM generate_series(1, 120) AS n"
    )
    ids, token = await api.list_ids({})
    assert len(ids) == 50 and token
    ids, token = await api.list_ids({"max_page_size": 1})
    assert ids == ["i001"] and token
    ids, token = await api.list_ids({"max_page_size": 100})
    assert len(ids) == 100 and ids[-1] == "i100" and token
    ids, token = await api.list_ids({"max_page_size": 100, "page_token": token})
    assert len(ids) == 20 and token is None

    for bad in ("", "0", "101", "-1", "abc", "1.5", " 5", "+5", "１", "99999999999999999999"):
        reply = await api.request("GET", f"{BASE}?{urlencode({'max_page_size': bad})}")
        assert_problem(reply, 400)


async def test_tampered_or_foreign_page_tokens_are_400(api):
    for n in range(3):
        await api.create(f"t{n}")
    _, token = await api.list_ids({"max_page_size": 1})
    assert token

    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    tampered = []
    for i in range(len(raw)):  # every single-bit change is caught by the MAC
        flipped = bytearray(raw)
        flipped[i] ^= 0x01
        tampered.append(base64.urlsafe_b64encode(flipped).decode().rstrip("="))
    # A well-formed token naming another position, but without a valid MAC.
    forged = base64.urlsafe_b64encode(b'["i","t1",null,null,null]' + b"\0" * 16).decode()
    tampered += [token[:-2], token + "AA", "not a token", "%%%", "A" * 5000, forged]

    for bad in tampered:
        reply = await api.request("GET", f"{BASE}?{urlencode({'page_token': bad})}")
        assert_problem(reply, 400)

    # An instances token is not a rejected-events token.
    reply = await api.request("GET", f"/api/v1/rejected-events?page_token={token}")
    assert_problem(reply, 400)


async def test_list_rejects_unknown_query_parameters(api):
    assert_problem(await api.request("GET", f"{BASE}?servicetype=vm"), 400)
    assert_problem(await api.request("GET", f"{BASE}?status=a&status=b"), 400)
    assert_problem(await api.request("GET", f"{BASE}?status=%00"), 400)


# --- limits, routing, errors -------------------------------------------------


def _body_of_size(size: int) -> bytes:
    head, tail = b'{"service_type":"vm","spec":{"pad":"', b'"}}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


async def test_request_body_limit(api):
    reply = await api.request("POST", f"{BASE}?id=big", _body_of_size(MAX_BODY_BYTES))
    assert reply.status == 201, reply.body

    # A little over the limit, declared or chunked (http.client sends an
    # iterable chunked): read to the end, then refused, on a connection that
    # stays usable.
    def over_the_limit_then_reuse() -> list[int]:
        conn = http.client.HTTPConnection(api.host, api.port, timeout=30)
        try:
            statuses = []
            for body in (_body_of_size(MAX_BODY_BYTES + 1), iter([b"x" * 65536] * 32)):
                conn.request("POST", BASE, body=body)
                response = conn.getresponse()
                assert response.getheader("content-type") == "application/problem+json"
                assert json.loads(response.read())["status"] == 413
                statuses.append(response.status)
            conn.request("GET", "/api/v1/health")
            statuses.append(conn.getresponse().status)
            return statuses
        finally:
            conn.close()

    assert await trio.to_thread.run_sync(over_the_limit_then_reuse) == [413, 413, 200]

    # Far over the limit: refused from the headers alone, before any body.
    def declared_huge() -> bytes:
        with socket.create_connection((api.host, api.port), timeout=30) as sock:
            head = f"POST {BASE} HTTP/1.1\r\nHost: x\r\nContent-Length: {100 * MAX_BODY_BYTES}\r\n"
            sock.sendall(head.encode() + b"\r\n")
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
            return received

    response = await trio.to_thread.run_sync(declared_huge)
    assert response.startswith(b"HTTP/1.1 413 ")
    assert await api.sql("SELECT count(*) FROM service_type_instances") == [(1,)]


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("PUT", BASE, "GET, HEAD, POST"),
        ("PATCH", f"{BASE}/x", "DELETE, GET, HEAD"),
        ("POST", f"{BASE}/x", "DELETE, GET, HEAD"),
        ("DELETE", "/api/v1/health", "GET, HEAD"),
        ("POST", "/metrics", "GET, HEAD"),
        ("DELETE", "/api/v1/rejected-events", "GET, HEAD"),
    ],
)
async def test_wrong_method_is_405_with_allow(api, method, path, allow):
    reply = await api.request(method, path)
    assert_problem(reply, 405)
    assert reply.headers["allow"] == allow


@pytest.mark.parametrize(
    "path", ["/static", "/api", "/api/v1", "/api/v2/service-type-instances", f"{BASE}/", f"{BASE}/a/b"]
)
async def test_unknown_path_is_404_problem(api, path):
    assert_problem(await api.request("GET", path), 404)


async def test_head_is_get_without_body(api):
    await api.create("h1")
    get = await api.request("GET", f"{BASE}/h1")
    head = await api.request("HEAD", f"{BASE}/h1")
    assert head.status == 200
    assert head.body == b""
    assert head.headers["content-length"] == get.headers["content-length"]


async def test_database_errors_are_500_without_details(api, caplog):
    await api.create("x1")
    await api.sql("DROP TABLE service_type_instances")
    reply = await api.request("GET", BASE)
    problem = assert_problem(reply, 500)
    text = reply.body.decode()
    for leak in ("service_type_instances", "relation", "SELECT", "Traceback", "psycopg"):
        assert leak not in text
    assert problem["title"] == "Internal Server Error"
    assert any(r.exc_info and "GET" in r.getMessage() for r in caplog.records)


async def test_database_unavailable_is_503(api):
    await trio.to_thread.run_sync(api.pool.close)
    reply = await api.request("GET", f"{BASE}/x")
    assert_problem(reply, 503)
    assert reply.headers["retry-after"] == "1"


# --- health and metrics ------------------------------------------------------


async def test_health(api):
    reply = await api.request("GET", "/api/v1/health")
    assert reply.status == 200
    assert reply.json() == {
        "status": "ok",
        "role": "all",
        "components": {"database": "ok", "consumer": "subscribed"},
    }

    api.health.ok = False
    api.health.components["consumer"] = "not subscribed"
    reply = await api.request("GET", "/api/v1/health")
    assert reply.status == 503
    assert reply.headers["content-type"] == "application/json"
    assert reply.json() == {
        "status": "unavailable",
        "role": "all",
        "components": {"database": "ok", "consumer": "not subscribed"},
    }

    api.health.fail = True  # a check that raises is a failed check, not a 500
    reply = await api.request("GET", "/api/v1/health")
    assert reply.status == 503
    assert reply.json()["status"] == "unavailable"


async def test_metrics(api):
    api.metrics.events_received.inc(3)
    reply = await api.request("GET", "/metrics")
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/plain")
    text = reply.body.decode()
    assert "dcmstatus_events_received_total 3.0" in text
    assert 'dcmstatus_events_rejected_total{reason="too_large"} 0.0' in text
    # Only at the root.
    assert_problem(await api.request("GET", "/api/v1/metrics"), 404)


# --- rejected events ---------------------------------------------------------


async def _reject(api: Api, reason: str, body: bytes, headers: Any = None) -> int:
    rows = await api.sql(
        "INSERT INTO rejected_events (reason, detail, subject, stream_seq, headers, body)"
        " VALUES (%s, %s, 'dcm.vm', 7, %s, %s) RETURNING id",
        (reason, f"{reason} detail", None if headers is None else json.dumps(headers), body),
    )
    return rows[0][0]


async def test_rejected_events_newest_first_with_text_or_base64_bodies(api):
    first = await _reject(api, "malformed_json", b"{not json", {"Nats-Msg-Id": "m1"})
    second = await _reject(api, "unknown_status", '{"status": "Ünknown"}'.encode())
    binary = await _reject(api, "malformed_json", b"\xff\xfe\x00binary")

    reply = await api.request("GET", "/api/v1/rejected-events")
    assert reply.status == 200, reply.body
    page = reply.json()
    assert set(page) == {"rejected_events"}
    events = page["rejected_events"]
    assert [e["id"] for e in events] == [binary, second, first]

    assert events[0]["body_encoding"] == "base64"
    assert base64.b64decode(events[0]["body"]) == b"\xff\xfe\x00binary"
    assert events[1]["body_encoding"] == "utf-8"
    assert events[1]["body"] == '{"status": "Ünknown"}'
    assert events[2] == {
        "id": first,
        "reason": "malformed_json",
        "detail": "malformed_json detail",
        "subject": "dcm.vm",
        "stream_seq": 7,
        "headers": {"Nats-Msg-Id": "m1"},
        "body": "{not json",
        "body_encoding": "utf-8",
        "service_type": None,
        "instance_id": None,
        "receive_time": events[2]["receive_time"],
    }
    rfc3339(events[2]["receive_time"])

    reply = await api.request("GET", "/api/v1/rejected-events?reason=malformed_json")
    assert [e["id"] for e in reply.json()["rejected_events"]] == [binary, first]
    assert_problem(await api.request("GET", "/api/v1/rejected-events?reason=bogus"), 400)


async def test_rejected_events_pagination(api):
    ids = [await _reject(api, "too_large", b"x") for _ in range(5)]
    await _reject(api, "invalid_data", b"y")  # filtered out below
    seen: list[int] = []
    token = None
    while True:
        query = {"reason": "too_large", "max_page_size": 2}
        if token:
            query["page_token"] = token
        reply = await api.request("GET", f"/api/v1/rejected-events?{urlencode(query)}")
        assert reply.status == 200, reply.body
        page = reply.json()
        seen += [e["id"] for e in page["rejected_events"]]
        token = page.get("next_page_token")
        if token is None:
            break
        # Tied to its reason filter, and not an instances token.
        assert_problem(await api.request("GET", f"/api/v1/rejected-events?page_token={token}"), 400)
        assert_problem(await api.request("GET", f"{BASE}?page_token={token}"), 400)
    assert seen == ids[::-1]

    reply = await api.request("GET", "/api/v1/rejected-events?max_page_size=0")
    assert_problem(reply, 400)


# --- bearer token ------------------------------------------------------------


@pytest.fixture
async def secured(database_url):
    async with serve_api(database_url, api_token="tok-3n") as api:
        yield api


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", BASE),
        ("POST", BASE),
        ("GET", f"{BASE}/x"),
        ("DELETE", f"{BASE}/x"),
        ("GET", "/api/v1/rejected-events"),
        ("GET", "/api/v1/openapi.json"),
        # Without the token, nothing tells which paths or methods exist.
        ("GET", "/api/v1/nothing-here"),
        ("PUT", BASE),
    ],
)
async def test_token_is_required_on_api_routes(secured, method, path):
    for authorization in (None, "", "Bearer", "Bearer tok-3", "Bearer tok-3nX", "Basic dG9rLTNu", "tok-3n"):
        headers = {"authorization": authorization} if authorization is not None else {}
        # The harness sends the right token unless headers override it.
        reply = await secured.request(method, path, headers=headers or {"authorization": ""})
        problem = assert_problem(reply, 401)
        assert "token" in problem["detail"]
        challenge = reply.headers["www-authenticate"]
        assert challenge.startswith('Bearer realm="dcmstatus"')
        assert ('error="invalid_token"' in challenge) == bool(authorization and authorization != "")
    assert await secured.sql("SELECT count(*) FROM service_type_instances") == [(0,)]


async def test_right_token_is_accepted_in_any_scheme_case(secured):
    instance = await secured.create("t1")
    for scheme in ("Bearer", "bearer", "BEARER"):
        reply = await secured.request(
            "GET", f"{BASE}/t1", headers={"authorization": f"{scheme} tok-3n"}
        )
        assert reply.status == 200 and reply.json() == instance


async def test_health_and_metrics_need_no_token(secured):
    for path in ("/api/v1/health", "/metrics"):
        reply = await secured.request("GET", path, headers={"authorization": ""})
        assert reply.status == 200, path
    assert (await secured.request("GET", "/nothing", headers={"authorization": ""})).status == 404


async def test_without_a_configured_token_none_is_asked(api):
    reply = await api.request("GET", BASE, headers={"authorization": "Bearer anything"})
    assert reply.status == 200
    assert "www-authenticate" not in reply.headers


async def test_request_body_limit_is_configurable(database_url):
    async with serve_api(database_url, max_body_bytes=100) as small:
        body = b'{"service_type":"vm","spec":{"pad":"' + b"x" * 60 + b'"}}'
        assert len(body) <= 100
        assert (await small.request("POST", f"{BASE}?id=fits", body)).status == 201
        problem = assert_problem(await small.request("POST", BASE, body + b" " * (101 - len(body))), 413)
        assert "100 bytes" in problem["detail"]
