"""The dashboard's HTTP side without a browser: security headers, assets,
the summary, the id_prefix filter, signing in (CSRF check, cookie
attributes) and what the session cookie may and may not do."""

import re

import pytest
from http_harness import BASE, Api, assert_problem, serve_api

from dcmstatus.adapters.http.security_headers import CONTENT_SECURITY_POLICY

TOKEN = "dash-token"
NO_BEARER = {"authorization": ""}


@pytest.fixture
async def api(database_url):
    async with serve_api(database_url) as api:
        yield api


@pytest.fixture
async def token_api(database_url):
    async with serve_api(database_url, api_token=TOKEN) as api:
        yield api


def origin(api: Api) -> dict[str, str]:
    return {"origin": api.url, "content-type": "application/x-www-form-urlencoded"}


async def sign_in(api: Api) -> str:
    reply = await api.request("POST", "/login", f"token={TOKEN}".encode(), {**NO_BEARER, **origin(api)})
    assert reply.status == 303, reply.body
    return reply.headers["set-cookie"].split(";")[0]


async def test_every_response_carries_the_security_headers(api: Api):
    for path in ("/", "/static/dashboard.js", BASE, "/api/v1/nope", "/metrics"):
        reply = await api.request("GET", path)
        assert reply.headers["content-security-policy"] == CONTENT_SECURITY_POLICY, path
        assert reply.headers["x-content-type-options"] == "nosniff", path
    assert "script-src 'self';" in CONTENT_SECURITY_POLICY
    assert "frame-ancestors 'none'" in CONTENT_SECURITY_POLICY
    assert "unsafe-inline" not in CONTENT_SECURITY_POLICY


async def test_the_page_has_no_inline_script_and_loads_its_two_assets(api: Api):
    reply = await api.request("GET", "/")
    assert reply.status == 200
    assert reply.headers["content-type"] == "text/html; charset=utf-8"
    page = reply.body.decode()
    assert re.findall(r"<script[^>]*>", page) == ['<script src="/static/dashboard.js" defer>']
    assert not re.search(r"<[^>]*\son[a-z]+\s*=", page)  # no onclick= and friends
    js = await api.request("GET", "/static/dashboard.js")
    css = await api.request("GET", "/static/dashboard.css")
    assert (js.status, js.headers["content-type"]) == (200, "text/javascript; charset=utf-8")
    assert (css.status, css.headers["content-type"]) == (200, "text/css; charset=utf-8")
    assert b"innerHTML" not in js.body
    assert_problem(await api.request("GET", "/static/../openapi.json"), 404)
    assert_problem(await api.request("GET", "/static/app.js"), 404)


async def test_the_page_escapes_what_it_renders(api: Api):
    # Rows written by other software (or an older catalog) reach the counts
    # as they are stored.
    await api.sql(
        "INSERT INTO service_type_instances (instance_id, service_type, spec, status)"
        " VALUES ('x1', '<img src=x onerror=alert(1)>', '{}', '\"><script>alert(2)</script>')"
    )
    page = (await api.request("GET", "/")).body.decode()
    assert "<img src=x" not in page and "<script>alert" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "&quot;&gt;&lt;script&gt;alert(2)&lt;/script&gt;" in page


async def test_summary_counts_instances_rejections_and_the_newest_change(api: Api):
    assert (await api.request("GET", "/api/v1/dashboard/summary")).json() == {
        "instances": [], "rejected": [], "rejected_window_seconds": 3600, "last_change_id": 0,
    }
    await api.create("vm1")
    await api.create("vm2")
    await api.create("c1", service_type="container")
    await api.sql("UPDATE service_type_instances SET status = 'RUNNING' WHERE instance_id = 'vm2'")
    await api.sql(
        "INSERT INTO rejected_events (reason, detail, subject, stream_seq, body, received_at) VALUES"
        " ('malformed_json', '', 'dcm.vm', 1, '', now()), ('malformed_json', '', 'dcm.vm', 2, '', now()),"
        " ('unknown_status', '', 'dcm.vm', 3, '', now()), ('too_large', '', 'dcm.vm', 4, '', now() - interval '2 hours')"
    )
    (last,) = (await api.sql("SELECT max(change_id) FROM status_changes"))[0]
    summary = (await api.request("GET", "/api/v1/dashboard/summary")).json()
    assert summary["instances"] == [
        {"service_type": "container", "status": "PROVISIONING", "count": 1},
        {"service_type": "vm", "status": "PROVISIONING", "count": 1},
        {"service_type": "vm", "status": "RUNNING", "count": 1},
    ]
    assert summary["rejected"] == [
        {"reason": "malformed_json", "count": 2},
        {"reason": "unknown_status", "count": 1},
    ]
    assert summary["last_change_id"] == last == 4
    assert_problem(await api.request("GET", "/api/v1/dashboard/summary?window=1"), 400)


async def test_id_prefix_filters_strictly_and_binds_the_page_token(api: Api):
    for id_ in ("web-1", "web-2", "web-3", "db-1"):
        await api.create(id_)
    assert await api.list_ids({"id_prefix": "web-"}) == (["web-1", "web-2", "web-3"], None)
    assert await api.list_ids({"id_prefix": "db"}) == (["db-1"], None)
    assert await api.list_ids({"id_prefix": ""}) == (["db-1", "web-1", "web-2", "web-3"], None)
    ids, token = await api.list_ids({"id_prefix": "web", "max_page_size": 2})
    assert (ids, bool(token)) == (["web-1", "web-2"], True)
    assert await api.list_ids({"id_prefix": "web", "max_page_size": 2, "page_token": token}) == (["web-3"], None)
    for other in ({"id_prefix": "we"}, {}):
        reply = await api.request("GET", f"{BASE}?page_token={token}&" + "&".join(f"{k}={v}" for k, v in other.items()))
        assert "different query" in assert_problem(reply, 400)["detail"]
    for bad in ("Web", "web_1", "x" * 64, "w%25", "%2F"):
        assert "id_prefix" in assert_problem(await api.request("GET", f"{BASE}?id_prefix={bad}"), 400)["detail"]


async def test_without_a_token_the_page_is_open_and_sign_in_is_a_no_op(api: Api):
    await api.create("vm1")
    page = await api.request("GET", "/")
    assert b'id="dashboard"' in page.body and b"Sign out" not in page.body
    reply = await api.request("POST", "/login", b"token=x", origin(api))
    assert (reply.status, reply.headers["location"], "set-cookie" in reply.headers) == (303, "/", False)


async def test_with_a_token_the_page_asks_for_it_and_shows_no_data(token_api: Api):
    await token_api.create("secret-instance")
    page = await token_api.request("GET", "/", headers=NO_BEARER)
    assert page.status == 200
    assert b'<form method="post" action="/login">' in page.body
    assert b"secret-instance" not in page.body and b'id="dashboard"' not in page.body
    assert_problem(await token_api.request("GET", "/api/v1/dashboard/summary", headers=NO_BEARER), 401)


async def test_sign_in_sets_an_httponly_strict_cookie_that_is_not_the_token(token_api: Api):
    reply = await token_api.request("POST", "/login", f"token={TOKEN}".encode(), {**NO_BEARER, **origin(token_api)})
    assert (reply.status, reply.headers["location"]) == (303, "/")
    attributes = [part.strip().lower() for part in reply.headers["set-cookie"].split(";")]
    name, value = reply.headers["set-cookie"].split(";")[0].split("=", 1)
    assert name == "dcmstatus_session"
    assert TOKEN not in value and len(value) == 64
    assert {"httponly", "samesite=strict", "path=/"} <= set(attributes)
    assert "secure" not in attributes  # plain http; set when the request came over https


async def test_sign_in_refuses_other_origins_and_wrong_tokens(token_api: Api):
    body = f"token={TOKEN}".encode()
    form = {**NO_BEARER, "content-type": "application/x-www-form-urlencoded"}
    for headers in ({}, {"origin": "https://evil.example"}, {"origin": "null"}, {"origin": token_api.url + ".evil"}):
        reply = await token_api.request("POST", "/login", body, {**form, **headers})
        assert_problem(reply, 403)
        assert "set-cookie" not in reply.headers
    wrong = await token_api.request("POST", "/login", b"token=nope", {**NO_BEARER, **origin(token_api)})
    assert wrong.status == 401 and "set-cookie" not in wrong.headers
    assert b"not this service" in wrong.body
    assert_problem(await token_api.request("GET", "/login", headers=NO_BEARER), 405)


async def test_the_session_cookie_authorises_reads_only(token_api: Api):
    await token_api.create("vm1")
    cookie = {**NO_BEARER, "cookie": await sign_in(token_api)}
    assert (await token_api.request("GET", BASE, headers=cookie)).status == 200
    assert (await token_api.request("GET", "/api/v1/dashboard/summary", headers=cookie)).status == 200
    page = await token_api.request("GET", "/", headers=cookie)
    assert b'id="dashboard"' in page.body and b"Sign out" in page.body
    # Writes need the bearer token itself: a request a browser adds the
    # cookie to can never change anything.
    body = b'{"service_type": "vm", "spec": {}}'
    assert_problem(await token_api.request("POST", BASE, body, {**cookie, "content-type": "application/json"}), 401)
    assert_problem(await token_api.request("DELETE", f"{BASE}/vm1", headers=cookie), 401)
    forged = {**NO_BEARER, "cookie": "dcmstatus_session=" + "0" * 64}
    assert_problem(await token_api.request("GET", BASE, headers=forged), 401)
    # The cookie's value is no bearer token.
    value = cookie["cookie"].split("=", 1)[1]
    assert_problem(await token_api.request("GET", BASE, headers={"authorization": f"Bearer {value}"}), 401)


async def test_sign_out_clears_the_cookie(token_api: Api):
    reply = await token_api.request("POST", "/logout", b"", {**NO_BEARER, **origin(token_api)})
    assert reply.status == 303
    assert reply.headers["set-cookie"].startswith('dcmstatus_session=""; ')
    assert_problem(await token_api.request("POST", "/logout", b"", NO_BEARER), 403)
