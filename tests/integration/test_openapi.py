"""The OpenAPI document (dcmstatus/adapters/http/openapi.json) against the live API.

- schemathesis generates valid and invalid requests for every documented
  operation and checks each response against the document (status code,
  content type, headers, body schema, no 5xx, invalid input refused);
- every status code the document lists for an operation is produced by a
  real request, so the document lists nothing the API cannot answer;
- every route the API serves is in the document.

The server runs in the test's trio loop (hypercorn, real PostgreSQL, with an
API token); schemathesis and its HTTP client run in a worker thread.

The event stream of /api/v1/status-changes (its 200 as text/event-stream) is
not fuzzed here: schemathesis asks for JSON, and a stream never ends, so
neither it nor the reaching requests below (which read whole bodies) could
read one. test_watch.py covers the stream; here the server allows no stream
at all (max_watch_streams=0), which is how its 503 is reached.
"""

import json
from importlib.resources import files
from typing import Any

import pytest
import requests
import schemathesis
import trio
import trio_asyncio  # noqa: F401  # must precede psycopg: it patches asyncio
from http_harness import BASE, Api, serve_api
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from dcmstatus.adapters.http.app import MAX_BODY_BYTES

TOKEN = "s3cret-token"
DOCUMENT = json.loads(files("dcmstatus.adapters.http").joinpath("openapi.json").read_text())
OPERATIONS = [
    (path, method)
    for path, item in DOCUMENT["paths"].items()
    for method in item
    if method in ("get", "post", "put", "patch", "delete", "head")
]
DOCUMENTED_CODES = sorted(
    (path, method, int(code))
    for path, method in OPERATIONS
    for code in DOCUMENT["paths"][path][method]["responses"]
    if code != "default"
)
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture
async def api(database_url):
    async with serve_api(database_url, api_token=TOKEN, max_watch_streams=0) as api:
        # Some data, so that reads return rows and generated ids sometimes hit.
        await api.create("vm1", name="one", provider_name="kubevirt")
        await api.create("c1", service_type="container")
        await api.sql(
            "INSERT INTO rejected_events (reason, detail, subject, stream_seq, headers, body)"
            " VALUES ('malformed_json', 'not JSON', 'dcm.vm', 3, '{\"a\": \"b\"}', '\\xff00'),"
            "        ('unknown_status', 'no such status', 'dcm.vm', 4, NULL, 'text')"
        )
        yield api


def _schema() -> Any:
    return schemathesis.openapi.from_dict(DOCUMENT)


def test_document_is_valid_openapi_3():
    assert DOCUMENT["openapi"].startswith("3.")
    operations = [op.ok() for op in _schema().get_all_operations()]
    assert len(operations) == len(OPERATIONS) == 10


async def test_document_is_served_and_equals_the_file(api: Api):
    reply = await api.request("GET", "/api/v1/openapi.json")
    assert reply.status == 200
    assert reply.headers["content-type"] == "application/json"
    assert reply.json() == DOCUMENT


def _fuzz(base_url: str, mode: schemathesis.GenerationMode, examples: int) -> list[str]:
    """Run schemathesis over every operation; return the failure reports."""
    failures: list[str] = []
    checks = CHECKS + ([negative_data_rejection] if mode is schemathesis.GenerationMode.NEGATIVE else [])
    session = requests.Session()
    for result in _schema().get_all_operations():
        operation = result.ok()

        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            derandomize=True,  # the same cases every run: a failure reproduces
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def check(case: Any) -> None:
            case.call_and_validate(
                base_url=base_url,
                session=session,
                headers={"authorization": f"Bearer {TOKEN}"},
                checks=checks,
                timeout=30,
            )

        try:
            check()
        except Unsatisfiable:
            # Negative mode: nothing in this operation can be made invalid
            # (no parameters, no body), so there is nothing to send.
            assert mode is schemathesis.GenerationMode.NEGATIVE, operation.label
        except Exception as exc:  # FailureGroup or AssertionError with the report
            failures.append(f"{operation.label}: {exc}")
    return failures


@pytest.mark.parametrize("mode", ["positive", "negative"])
async def test_live_api_conforms_to_the_document(api: Api, mode: str):
    generation_mode = schemathesis.GenerationMode(mode)
    failures = await trio.to_thread.run_sync(_fuzz, api.url, generation_mode, 60)
    assert not failures, "\n\n".join(failures)
    # The data the fixture made is still readable and the server still serves.
    assert (await api.request("GET", "/api/v1/health")).status == 200


# --- every documented status code is reachable ----------------------------------

_BODY = {"service_type": "vm", "spec": {}}
_NO_TOKEN: dict[str, str] = {"authorization": ""}
CHANGES = "/api/v1/status-changes"

# (path, method, status) -> the request that must produce it:
# (method, path with query, JSON body or raw bytes, extra headers).
# "vm1" exists (created by the fixture); "nope" does not.
REACHING: dict[tuple[str, str, int], tuple[str, str, Any, dict[str, str]]] = {
    (BASE, "get", 200): ("GET", f"{BASE}?service_type=vm&max_page_size=1", None, {}),
    (BASE, "get", 400): ("GET", f"{BASE}?max_page_size=101", None, {}),
    (BASE, "get", 401): ("GET", BASE, None, _NO_TOKEN),
    (BASE, "post", 201): ("POST", f"{BASE}?id=new1", _BODY, {}),
    (BASE, "post", 400): ("POST", BASE, b"{not json", {}),
    (BASE, "post", 401): ("POST", BASE, _BODY, {"authorization": "Bearer wrong"}),
    (BASE, "post", 409): ("POST", f"{BASE}?id=vm1", _BODY, {}),
    (BASE, "post", 413): ("POST", BASE, b" " * (MAX_BODY_BYTES + 1), {}),
    (BASE, "post", 422): ("POST", BASE, {"service_type": "toaster", "spec": {}}, {}),
    (f"{BASE}/{{id}}", "get", 200): ("GET", f"{BASE}/vm1", None, {}),
    (f"{BASE}/{{id}}", "get", 400): ("GET", f"{BASE}/vm1?x=1", None, {}),
    (f"{BASE}/{{id}}", "get", 401): ("GET", f"{BASE}/vm1", None, _NO_TOKEN),
    (f"{BASE}/{{id}}", "get", 404): ("GET", f"{BASE}/nope", None, {}),
    (f"{BASE}/{{id}}", "delete", 204): ("DELETE", f"{BASE}/c1", None, {}),
    (f"{BASE}/{{id}}", "delete", 400): ("DELETE", f"{BASE}/vm1?x=1", None, {}),
    (f"{BASE}/{{id}}", "delete", 401): ("DELETE", f"{BASE}/vm1", None, _NO_TOKEN),
    (f"{BASE}/{{id}}", "delete", 404): ("DELETE", f"{BASE}/nope", None, {}),
    ("/api/v1/rejected-events", "get", 200): ("GET", "/api/v1/rejected-events?reason=malformed_json", None, {}),
    ("/api/v1/rejected-events", "get", 400): ("GET", "/api/v1/rejected-events?reason=nope", None, {}),
    ("/api/v1/rejected-events", "get", 401): ("GET", "/api/v1/rejected-events", None, _NO_TOKEN),
    (CHANGES, "get", 200): ("GET", f"{CHANGES}?service_type=vm&max_page_size=1", None, {}),
    (CHANGES, "get", 400): ("GET", f"{CHANGES}?after=-1", None, {}),
    (CHANGES, "get", 401): ("GET", CHANGES, None, _NO_TOKEN),
    (CHANGES, "get", 503): ("GET", CHANGES, None, {"accept": "text/event-stream"}),  # beyond max_watch_streams=0
    ("/api/v1/dashboard/summary", "get", 200): ("GET", "/api/v1/dashboard/summary", None, {}),
    ("/api/v1/dashboard/summary", "get", 400): ("GET", "/api/v1/dashboard/summary?window=1", None, {}),
    ("/api/v1/dashboard/summary", "get", 401): ("GET", "/api/v1/dashboard/summary", None, _NO_TOKEN),
    ("/api/v1/health", "get", 200): ("GET", "/api/v1/health", None, _NO_TOKEN),
    ("/api/v1/health", "get", 400): ("GET", "/api/v1/health?verbose=1", None, _NO_TOKEN),
    ("/api/v1/health", "get", 503): ("GET", "/api/v1/health", None, _NO_TOKEN),  # health switched off
    ("/api/v1/openapi.json", "get", 200): ("GET", "/api/v1/openapi.json", None, {}),
    ("/api/v1/openapi.json", "get", 400): ("GET", "/api/v1/openapi.json?v=2", None, {}),
    ("/api/v1/openapi.json", "get", 401): ("GET", "/api/v1/openapi.json", None, _NO_TOKEN),
    ("/metrics", "get", 200): ("GET", "/metrics", None, _NO_TOKEN),
}


def test_every_documented_status_code_has_a_reaching_request():
    assert sorted(REACHING) == DOCUMENTED_CODES


@pytest.mark.parametrize(("path", "method", "status"), DOCUMENTED_CODES)
async def test_documented_status_code_is_reachable(api: Api, path: str, method: str, status: int):
    verb, target, body, headers = REACHING[(path, method, status)]
    if status == 503:
        api.health.ok = False
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    headers = {"content-type": "application/json", **headers} if body is not None else headers
    reply = await api.request(verb, target, body, {k: v for k, v in headers.items()})
    assert reply.status == status, reply.body

    # The response matches the document too (schema, content type, headers).
    def validate() -> None:
        operation = _schema()[path][method.upper()]
        response = schemathesis.Response(
            status_code=reply.status,
            headers={k: [v] for k, v in reply.headers.items()},
            content=reply.body,
            request=requests.Request(verb, api.url + target).prepare(),
            elapsed=0.0,
            verify=True,
        )
        operation.validate_response(response)

    await trio.to_thread.run_sync(validate)


async def test_every_served_route_is_documented(api: Api):
    # The API answers 405 (not 404) for a known path with a wrong method: a
    # documented path's other methods must all be 405, and a few undocumented
    # candidates must be 404.
    for path in DOCUMENT["paths"]:
        concrete = path.replace("{id}", "vm1")
        documented = {m.upper() for m in DOCUMENT["paths"][path] if m != "parameters"}
        for verb in ("GET", "POST", "PUT", "PATCH", "DELETE"):
            reply = await api.request(verb, concrete)
            if verb in documented:
                assert reply.status not in (404, 405), (verb, path)
            else:
                assert reply.status == 405, (verb, path, reply.status)
                assert set(reply.headers["allow"].split(", ")) == documented | {"HEAD"}
    for path in ("/api/v1", "/api/v1/instances", "/api/v1/metrics", "/openapi.json", "/health"):
        assert (await api.request("GET", path)).status == 404, path
