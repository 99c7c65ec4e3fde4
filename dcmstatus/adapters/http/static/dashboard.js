// The dashboard's only script (docs/dashboard.md). Every value shown comes
// from providers and API clients: it reaches the page through textContent
// and never as markup. No dependencies, no build step.
"use strict";

(function () {
  const STREAM = "/api/v1/status-changes";
  const SUMMARY = "/api/v1/dashboard/summary";
  const LIST = "/api/v1/service-type-instances";
  const POLL_MS = 3000;
  const PAGE_SIZE = 25;
  const CHART_POINTS = 60; // two minutes of samples, one per 2 s

  const $ = (id) => document.getElementById(id);
  const main = $("dashboard");
  if (!main) return; // the sign-in page

  const state = {
    lastChangeId: Number(main.dataset.lastChangeId || 0),
    filters: {},
    tokens: [null], // page tokens of the pages seen: index 0 is the first page
    page: 0,
    nextToken: null,
    rows: new Map(), // instance id -> <tr>
    rejectedKey: "",
    mode: "connecting",
  };

  function el(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (className) node.className = className;
    return node;
  }

  async function getJSON(url, okStatuses) {
    const response = await fetch(url, { credentials: "same-origin", headers: { accept: "application/json" } });
    if (response.status === 401) {
      location.assign("/"); // the session ended: sign in again
      throw new Error("signed out");
    }
    if (!response.ok && !(okStatuses || []).includes(response.status)) {
      let detail = response.statusText;
      try { detail = (await response.json()).detail || detail; } catch (e) { /* not a problem body */ }
      const error = new Error(detail);
      error.status = response.status;
      throw error;
    }
    return response.json();
  }

  function setMode(mode, text) {
    state.mode = mode;
    const badge = $("connection");
    badge.textContent = text;
    badge.className = "badge " + mode;
  }

  // ---------------------------------------------------------------- counts

  function renderCounts(summary) {
    const statuses = [...new Set(summary.instances.map((c) => c.status))].sort();
    const types = [...new Set(summary.instances.map((c) => c.service_type))].sort();
    const count = new Map(summary.instances.map((c) => [c.service_type + "\u0000" + c.status, c.count]));
    const box = $("counts-box");
    box.replaceChildren();
    if (!types.length) {
      box.append(el("p", "No instances yet.", "empty"));
      return;
    }
    const table = el("table");
    table.id = "counts";
    const headRow = el("tr");
    for (const name of ["type", ...statuses, "total"]) {
      const th = el("th", name);
      th.scope = "col";
      headRow.append(th);
    }
    table.append(el("thead"));
    table.tHead.append(headRow);
    const body = el("tbody");
    for (const type of types) {
      const row = el("tr");
      const th = el("th", type);
      th.scope = "row";
      row.append(th);
      let total = 0;
      for (const status of statuses) {
        const n = count.get(type + "\u0000" + status) || 0;
        total += n;
        row.append(el("td", n || ""));
      }
      row.append(el("td", total, "total"));
      body.append(row);
    }
    table.append(body);
    box.append(table);
    const list = $("status-list");
    list.replaceChildren(...statuses.map((s) => { const o = el("option"); o.value = s; return o; }));
  }

  function renderRejectedCounts(summary) {
    const list = $("rejected-counts");
    list.replaceChildren();
    if (!summary.rejected.length) list.append(el("li", "none", "none"));
    for (const r of summary.rejected) list.append(el("li", r.reason + " · " + r.count));
    const key = JSON.stringify(summary.rejected);
    if (key !== state.rejectedKey) {
      state.rejectedKey = key;
      refreshRejected();
    }
  }

  let summaryTimer = null;
  function refreshSummarySoon() {
    if (summaryTimer) return;
    summaryTimer = setTimeout(() => { summaryTimer = null; refreshSummary(); }, 500);
  }

  async function refreshSummary() {
    try {
      const summary = await getJSON(SUMMARY);
      renderCounts(summary);
      renderRejectedCounts(summary);
      return summary;
    } catch (e) {
      return null;
    }
  }

  // ------------------------------------------------------------- instances

  function formatTime(value) {
    if (!value) return "";
    const date = new Date(value);
    return isNaN(date) ? String(value) : date.toLocaleString();
  }

  function statusCell(status) {
    const td = el("td");
    const span = el("span", status || "", "status");
    if (status && /^[A-Z0-9_-]+$/.test(status)) span.classList.add(status);
    td.append(span);
    return td;
  }

  function fillRow(tr, inst) {
    const id = el("td", inst.id, "id");
    const time = el("td");
    const t = el("time", formatTime(inst.status_time));
    if (inst.status_time) t.dateTime = inst.status_time;
    time.append(t);
    tr.replaceChildren(
      id, el("td", inst.service_type), el("td", inst.name), el("td", inst.provider_name),
      statusCell(inst.status), el("td", inst.status_message), time,
    );
    tr.dataset.status = inst.status || "";
    tr.dataset.fingerprint = JSON.stringify([inst.status, inst.status_message, inst.provider_name, inst.name]);
  }

  function flash(tr) {
    tr.classList.remove("flash");
    void tr.offsetWidth; // restart the animation
    tr.classList.add("flash");
  }

  function renderInstances(page, highlightChanges) {
    const body = $("instances").tBodies[0];
    const before = new Map([...state.rows].map(([id, tr]) => [id, tr.dataset.fingerprint]));
    state.rows.clear();
    body.replaceChildren();
    if (!page.instances.length) {
      const tr = el("tr");
      const td = el("td", "No instances match.", "empty");
      td.colSpan = 7;
      tr.append(td);
      body.append(tr);
    }
    for (const inst of page.instances) {
      const tr = el("tr");
      fillRow(tr, inst);
      if (highlightChanges && before.get(inst.id) !== tr.dataset.fingerprint) flash(tr);
      state.rows.set(inst.id, tr);
      body.append(tr);
    }
    state.nextToken = page.next_page_token || null;
    $("next-page").disabled = !state.nextToken;
    $("prev-page").disabled = state.page === 0;
    $("page-label").textContent = "page " + (state.page + 1);
  }

  async function loadInstances(highlightChanges) {
    const query = new URLSearchParams({ max_page_size: String(PAGE_SIZE) });
    for (const [name, value] of Object.entries(state.filters)) if (value) query.set(name, value);
    const token = state.tokens[state.page];
    if (token) query.set("page_token", token);
    const error = $("list-error");
    try {
      const page = await getJSON(LIST + "?" + query.toString());
      error.hidden = true;
      renderInstances(page, highlightChanges);
    } catch (e) {
      if (e.status === 400) {
        error.textContent = e.message;
        error.hidden = false;
      }
    }
  }

  function matchesFilters(change) {
    const f = state.filters;
    if (f.service_type && change.service_type !== f.service_type) return false;
    if (f.status && (change.status || "").toUpperCase() !== f.status.toUpperCase()) return false;
    if (f.provider_name && change.provider_name !== f.provider_name) return false;
    if (f.id_prefix && !change.instance_id.startsWith(f.id_prefix)) return false;
    return true;
  }

  function applyChange(change) {
    state.lastChangeId = Math.max(state.lastChangeId, change.change_id);
    const tr = state.rows.get(change.instance_id);
    if (tr && change.kind === "deleted") {
      tr.classList.add("gone");
      flash(tr);
    } else if (tr) {
      const cells = tr.cells;
      cells[3].textContent = change.provider_name;
      cells[4].replaceWith(statusCell(change.status));
      cells[5].textContent = change.status_message;
      const t = el("time", formatTime(change.event_time));
      if (change.event_time) t.dateTime = change.event_time;
      tr.cells[6].replaceChildren(t);
      tr.dataset.status = change.status || "";
      flash(tr);
    } else if (change.kind === "created" && matchesFilters(change)) {
      loadInstances(true); // a new row may belong on this page
    }
    refreshSummarySoon();
  }

  // ------------------------------------------------------- live or polling

  function startPolling() {
    if (state.mode === "polling") return;
    setMode("polling", "polling every " + POLL_MS / 1000 + " s");
    setInterval(async () => {
      const summary = await refreshSummary();
      if (summary && summary.last_change_id !== state.lastChangeId) {
        state.lastChangeId = summary.last_change_id;
        loadInstances(true);
      }
    }, POLL_MS);
  }

  async function startLive() {
    // The stream's JSON twin says whether the route exists at all: an
    // EventSource cannot tell a 404 from a dropped connection.
    try {
      const probe = await fetch(STREAM + "?max_page_size=1", { credentials: "same-origin" });
      if (probe.status === 404 || probe.status === 405) return startPolling();
    } catch (e) {
      return startPolling();
    }
    const source = new EventSource(STREAM + "?after=" + encodeURIComponent(state.lastChangeId));
    source.addEventListener("open", () => setMode("live", "live"));
    source.addEventListener("status-change", (event) => {
      try { applyChange(JSON.parse(event.data)); } catch (e) { /* a malformed event changes nothing */ }
    });
    source.addEventListener("error", () => {
      if (source.readyState === EventSource.CLOSED) startPolling(); // refused for good
      else setMode("down", "reconnecting…");
    });
  }

  // ---------------------------------------------------------------- health

  // This replica's --role (docs/operations.md#roles): an api replica consumes
  // nothing, so its own intake figures would read zero for ever.
  let role = null;

  async function refreshHealth() {
    const badge = $("health-state");
    try {
      const health = await getJSON("/api/v1/health", [503]);
      role = health.role;
      $("intake-elsewhere").hidden = role !== "api";
      badge.textContent = health.status;
      badge.className = "badge " + (health.status === "ok" ? "ok" : "down");
      const list = $("health");
      list.replaceChildren();
      for (const [name, value] of Object.entries(health.components)) {
        list.append(el("dt", name), el("dd", typeof value === "string" ? value : JSON.stringify(value)));
      }
    } catch (e) {
      badge.textContent = "unreachable";
      badge.className = "badge down";
    }
  }

  // -------------------------------------------------------------- rejected

  async function refreshRejected() {
    try {
      const page = await getJSON("/api/v1/rejected-events?max_page_size=8");
      const body = $("rejected").tBodies[0];
      body.replaceChildren();
      if (!page.rejected_events.length) {
        const tr = el("tr");
        const td = el("td", "No rejected events.", "empty");
        td.colSpan = 4;
        tr.append(td);
        body.append(tr);
      }
      for (const r of page.rejected_events) {
        const tr = el("tr");
        tr.append(el("td", formatTime(r.receive_time)), el("td", r.reason), el("td", r.subject), el("td", r.detail));
        body.append(tr);
      }
    } catch (e) { /* shown again on the next change */ }
  }

  // ----------------------------------------------------------------- chart

  const samples = { rate: [], lag: [] };
  let previous = null;

  function metricValue(text, name) {
    for (const line of text.split("\n")) {
      if (line.startsWith(name + " ")) return Number(line.slice(name.length + 1));
    }
    return NaN;
  }

  function draw(svgId, values) {
    const svg = $(svgId);
    const max = Math.max(1e-9, ...values);
    const step = 300 / (CHART_POINTS - 1);
    const offset = CHART_POINTS - values.length;
    const points = values.map((v, i) => ((offset + i) * step).toFixed(1) + "," + (58 - (v / max) * 54).toFixed(1));
    const svgNS = "http://www.w3.org/2000/svg";
    const line = document.createElementNS(svgNS, "polyline");
    line.setAttribute("points", points.join(" "));
    const area = document.createElementNS(svgNS, "polygon");
    if (points.length) {
      area.setAttribute("points", points.join(" ") + " " + points[points.length - 1].split(",")[0] + ",60 " + points[0].split(",")[0] + ",60");
    }
    svg.replaceChildren(area, line);
  }

  function push(list, value) {
    list.push(value);
    if (list.length > CHART_POINTS) list.shift();
  }

  async function refreshMetrics() {
    if (role === "api") return;
    let text;
    try {
      const response = await fetch("/metrics", { credentials: "same-origin" });
      text = await response.text();
    } catch (e) { return; }
    const now = performance.now() / 1000;
    const current = {
      t: now,
      received: metricValue(text, "dcmstatus_events_received_total"),
      lagSum: metricValue(text, "dcmstatus_event_lag_seconds_sum"),
      lagCount: metricValue(text, "dcmstatus_event_lag_seconds_count"),
    };
    if (previous) {
      const dt = current.t - previous.t;
      const rate = Math.max(0, (current.received - previous.received) / dt);
      const n = current.lagCount - previous.lagCount;
      const lag = n > 0 ? (current.lagSum - previous.lagSum) / n : 0;
      push(samples.rate, isFinite(rate) ? rate : 0);
      push(samples.lag, isFinite(lag) ? lag : 0);
      $("rate-now").textContent = rate.toFixed(rate < 10 ? 1 : 0);
      $("lag-now").textContent = n > 0 ? (lag < 1 ? (lag * 1000).toFixed(0) + " ms" : lag.toFixed(1) + " s") : "–";
      draw("rate-chart", samples.rate);
      draw("lag-chart", samples.lag);
    }
    previous = current;
  }

  // --------------------------------------------------------------- filters

  const form = $("filters");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (!form.reportValidity()) return;
    state.filters = Object.fromEntries([...new FormData(form)].map(([k, v]) => [k, String(v).trim()]));
    state.tokens = [null];
    state.page = 0;
    loadInstances(false);
  });
  form.addEventListener("reset", () => {
    setTimeout(() => form.requestSubmit(), 0); // after the fields are cleared
  });
  $("next-page").addEventListener("click", () => {
    if (!state.nextToken) return;
    state.tokens[state.page + 1] = state.nextToken;
    state.page += 1;
    loadInstances(false);
  });
  $("prev-page").addEventListener("click", () => {
    if (state.page === 0) return;
    state.page -= 1;
    loadInstances(false);
  });

  refreshSummary();
  loadInstances(false);
  refreshHealth();
  refreshMetrics();
  setInterval(refreshHealth, 5000);
  setInterval(refreshMetrics, 2000);
  startLive();
})();
