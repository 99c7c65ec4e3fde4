"""The operator's dashboard: the page at `/`, its two static assets, the
summary JSON it polls, and signing in with the API token (docs/dashboard.md).

The page is rendered here with every value escaped; dashboard.js fills and
updates it through the API (textContent only). With an API token, `/` shows
a sign-in form until the browser holds the session cookie (auth.py).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Iterable
from html import escape
from importlib.resources import files
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from dcmstatus.adapters.http.auth import SESSION_COOKIE, has_session, session_value
from dcmstatus.adapters.http.inputs import query_params, read_body
from dcmstatus.adapters.http.problems import HTTPProblem
from dcmstatus.adapters.http.responses import JSONResponse
from dcmstatus.adapters.http.routing import resource
from dcmstatus.adapters.postgres.instances import InstanceStore, Summary

__all__ = ["SUMMARY_PATH", "DashboardRoutes"]

SUMMARY_PATH = "/api/v1/dashboard/summary"
_STATIC = files("dcmstatus.adapters.http").joinpath("static")
_ASSETS = {
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
_LOGIN_BODY_BYTES = 4096
_NO_STORE = {"cache-control": "no-store"}


def _page(title: str, body: str) -> str:
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)}</title>
<link rel="stylesheet" href="/static/dashboard.css">
<script src="/static/dashboard.js" defer></script>
</head>
<body>
{body}
</body>
</html>
"""


def _counts_table(summary: Summary) -> str:
    """Instances per service type (rows) and status (columns)."""
    statuses = sorted({c.status for c in summary.instances})
    types = sorted({c.service_type for c in summary.instances})
    count = {(c.service_type, c.status): c.count for c in summary.instances}
    head = "".join(f'<th scope="col">{escape(s)}</th>' for s in statuses)
    rows = []
    for t in types:
        cells = "".join(f"<td>{count.get((t, s), 0) or ''}</td>" for s in statuses)
        total = sum(count.get((t, s), 0) for s in statuses)
        rows.append(f'<tr><th scope="row">{escape(t)}</th>{cells}<td class="total">{total}</td></tr>')
    if not rows:
        return '<p class="empty" id="counts-empty">No instances yet.</p><table id="counts" hidden></table>'
    return (
        f'<table id="counts"><thead><tr><th scope="col">type</th>{head}<th scope="col">total</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _dashboard(summary: Summary, service_types: Iterable[str], signed_in: bool) -> str:
    options = "".join(f'<option value="{escape(t)}">{escape(t)}</option>' for t in sorted(service_types))
    sign_out = (
        '<form method="post" action="/logout" class="signout"><button type="submit">Sign out</button></form>'
        if signed_in
        else ""
    )
    return f"""<header class="top">
  <h1>dcmstatus</h1>
  <p id="connection" class="badge" role="status" aria-live="polite">connecting…</p>
  {sign_out}
</header>
<main data-last-change-id="{summary.last_change_id}" id="dashboard">
<div class="grid">
  <section aria-labelledby="counts-h" class="card wide">
    <h2 id="counts-h">Instances by status</h2>
    <div id="counts-box">{_counts_table(summary)}</div>
  </section>
  <section aria-labelledby="health-h" class="card">
    <h2 id="health-h">Health <span id="health-state" class="badge">…</span></h2>
    <dl id="health"></dl>
  </section>
  <section aria-labelledby="chart-h" class="card">
    <h2 id="chart-h">Intake</h2>
    <p class="empty" id="intake-elsewhere" hidden>This replica runs <code>--role api</code>: intake runs on the consumer replicas, whose <code>/metrics</code> have its figures.</p>
    <div class="chart-row">
    <figure class="chart">
      <figcaption>events/s <strong id="rate-now">–</strong></figcaption>
      <svg id="rate-chart" viewBox="0 0 300 60" preserveAspectRatio="none" role="img" aria-label="events received per second, last two minutes"></svg>
    </figure>
    <figure class="chart">
      <figcaption>mean lag <strong id="lag-now">–</strong></figcaption>
      <svg id="lag-chart" viewBox="0 0 300 60" preserveAspectRatio="none" role="img" aria-label="mean event lag, last two minutes"></svg>
    </figure>
    </div>
    <p class="note">last two minutes, from <a href="/metrics">/metrics</a></p>
  </section>
</div>
<section aria-labelledby="instances-h" class="card">
  <h2 id="instances-h">Instances</h2>
  <form id="filters" class="filters" role="search">
    <label>type <select name="service_type"><option value="">any</option>{options}</select></label>
    <label>status <input name="status" list="status-list" autocomplete="off" size="12"></label>
    <datalist id="status-list"></datalist>
    <label>provider <input name="provider_name" autocomplete="off" size="14"></label>
    <label>id starts with <input name="id_prefix" autocomplete="off" size="14" pattern="[a-z0-9\\-]{{1,63}}"
      title="lowercase letters, digits or '-'"></label>
    <button type="submit">Apply</button>
    <button type="reset">Clear</button>
  </form>
  <p id="list-error" class="error" role="alert" hidden></p>
  <table id="instances" class="rows">
    <thead><tr><th scope="col">id</th><th scope="col">type</th><th scope="col">name</th><th scope="col">provider</th>
      <th scope="col">status</th><th scope="col">message</th><th scope="col">status time</th></tr></thead>
    <tbody></tbody>
  </table>
  <nav class="pager" aria-label="instance pages">
    <button type="button" id="prev-page" disabled>← Previous</button>
    <span id="page-label">page 1</span>
    <button type="button" id="next-page" disabled>Next →</button>
  </nav>
</section>
<section aria-labelledby="rejected-h" class="card">
  <h2 id="rejected-h">Rejected events</h2>
  <p class="note">Last hour, by reason:</p>
  <ul id="rejected-counts" class="chips"></ul>
  <table id="rejected" class="rows">
    <thead><tr><th scope="col">received</th><th scope="col">reason</th><th scope="col">subject</th>
      <th scope="col">detail</th></tr></thead>
    <tbody></tbody>
  </table>
</section>
</main>"""


def _login(error: str = "") -> str:
    message = f'<p class="error" role="alert">{escape(error)}</p>' if error else ""
    return f"""<main class="login card">
  <h1>dcmstatus</h1>
  <form method="post" action="/login">
    <p>This service needs its API token.</p>
    {message}
    <label for="token">API token</label>
    <input id="token" name="token" type="password" autocomplete="current-password" required autofocus>
    <button type="submit">Sign in</button>
  </form>
</main>"""


class DashboardRoutes:
    """`service_types` is asked on each page view (a reloaded catalog shows)."""

    def __init__(
        self, store: InstanceStore, service_types: Callable[[], Iterable[str]], api_token: str | None
    ) -> None:
        self._store = store
        self._service_types = service_types
        self._token = api_token.strip() if api_token else None
        self._session = session_value(api_token) if api_token else None
        self.routes: list[Route] = [
            resource("/", get=self.page),
            resource("/login", post=self.login),
            resource("/logout", post=self.logout),
            resource("/static/{name:segment}", get=self.asset),
            resource(SUMMARY_PATH, get=self.summary),
        ]

    def _signed_in(self, request: Request) -> bool:
        return self._session is None or has_session(request.scope, self._session)

    async def page(self, request: Request) -> Response:
        query_params(request, ())
        if not self._signed_in(request):
            return HTMLResponse(_page("dcmstatus — sign in", _login()), headers=_NO_STORE)
        summary = await self._store.summary()
        body = _dashboard(summary, self._service_types(), signed_in=self._session is not None)
        return HTMLResponse(_page("dcmstatus", body), headers=_NO_STORE)

    async def summary(self, request: Request) -> Response:
        query_params(request, ())
        return JSONResponse(await self._store.summary(), headers=_NO_STORE)

    async def asset(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in _ASSETS:
            raise HTTPProblem(404, f"no asset {name!r}")
        return Response(_STATIC.joinpath(name).read_bytes(), media_type=_ASSETS[name], headers={"cache-control": "no-cache"})

    def _check_origin(self, request: Request) -> None:
        # CSRF (docs/dashboard.md#signing-in): a form posted from another
        # site carries that site's Origin. Browsers send Origin on every
        # POST; a request without one is not a browser's form, so refused.
        origin = request.headers.get("origin")
        expected = f"{request.url.scheme}://{request.headers.get('host', '')}"
        if origin != expected:
            raise HTTPProblem(403, "this form must be posted from the dashboard's own page; open / and sign in there")

    async def login(self, request: Request) -> Response:
        self._check_origin(request)
        if self._token is None or self._session is None:
            return RedirectResponse("/", 303)
        body = await read_body(request, _LOGIN_BODY_BYTES)
        try:
            fields = dict(parse_qsl(body.decode("utf-8"), errors="strict"))
        except UnicodeDecodeError:
            fields = {}
        given = fields.get("token", "").strip().encode("utf-8")
        if not hmac.compare_digest(given, self._token.encode("utf-8")):
            page = _page("dcmstatus — sign in", _login("That token is not this service's API token."))
            return HTMLResponse(page, 401, headers=_NO_STORE)
        response = RedirectResponse("/", 303)
        response.set_cookie(
            SESSION_COOKIE,
            self._session,
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path="/",
        )
        return response

    async def logout(self, request: Request) -> Response:
        self._check_origin(request)
        response = RedirectResponse("/", 303)
        response.delete_cookie(SESSION_COOKIE, httponly=True, samesite="strict", path="/")
        return response
