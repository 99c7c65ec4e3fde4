"""What deploy/monitoring names: the PromQL expressions of the alert rules
and the Grafana panels, the metric names in them, and the sample names a
`/metrics` scrape exports (docs/deploy.md#monitoring). Shared by
tests/unit/test_deploy.py and tests/integration/test_deploy_metrics.py."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
MONITORING = ROOT / "deploy" / "monitoring"

# Metrics the rules may name that dcmstatus does not export, each with who
# does. Only the group `dcmstatus-targets` may use them.
EXTERNAL = {
    "up": "Prometheus, per scrape target",
    "kube_deployment_status_replicas_available": "kube-state-metrics",
    "kube_deployment_spec_replicas": "kube-state-metrics",
}
EXTERNAL_GROUP = "dcmstatus-targets"

# Grafana's variables, replaced by what they stand for before parsing.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "${datasource}": "prometheus", "$job": ".*"}


def alert_rules() -> list[tuple[str, dict[str, Any]]]:
    """(group name, rule) for every rule of alerts.yaml."""
    document = yaml.safe_load((MONITORING / "alerts.yaml").read_text(encoding="utf-8"))
    return [(group["name"], rule) for group in document["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    return json.loads((MONITORING / "grafana-dashboard.json").read_text(encoding="utf-8"))


def _panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for panel in panels:
        out.append(panel)
        out.extend(_panels(panel.get("panels", [])))  # collapsed rows hold theirs
    return out


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target, Grafana's variables replaced."""
    out = []
    for panel in _panels(dashboard()["panels"]):
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']!r} {target['refId']}", grafana_to_promql(target["expr"])))
    return out


def dashboard_variable_metrics() -> list[tuple[str, str]]:
    """(where, metric) for the template variables' label_values(metric, label) queries."""
    out = []
    for variable in dashboard()["templating"]["list"]:
        query = variable.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query or "")
        for metric in re.findall(r"label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*,", text):
            out.append((f"variable {variable['name']!r}", metric))
    return out


def grafana_to_promql(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


# The metric names of a PromQL expression, by regex. Take away, in order:
#   string literals ("...", '...', `...`): label values and regexes;
#   label matchers {...}: label names (a metric named by {__name__="x"} is
#     not picked: the rules here do not use that form);
#   ranges and subqueries [5m], [1h:1m];
#   grouping lists after by, without, on, ignoring, group_left, group_right;
#   numbers (durations left outside ranges, 1e3, 0x1f);
# then a name is an identifier not followed by "(" (a function or an
# aggregation) and not a keyword (and, or, unless, bool, offset, ...).
# tests/unit/test_deploy.py checks that this agrees with a real PromQL parser
# on every expression of the rules and the dashboard.
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_NUMBERS = re.compile(r"\b(?:0x[0-9a-fA-F]+|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?[a-zA-Z]*)")
_IDENTIFIER = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()")
_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
                       "group_left", "group_right", "inf", "nan", "start", "end", "atan2"})


def metric_names(expr: str) -> set[str]:
    text = _STRINGS.sub(" ", expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGES.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    text = _NUMBERS.sub(" ", text)
    return {name for name in _IDENTIFIER.findall(text) if name.lower() not in _KEYWORDS}


def exported_samples(exposition: str) -> set[str]:
    """Every sample name of a Prometheus text exposition: the names PromQL can
    select. A counter family `x` exports `x_total` (and `x_created`), a
    histogram `h` only `h_bucket`, `h_sum` and `h_count`, never `h` itself."""
    return {sample.name for family in text_string_to_metric_families(exposition) for sample in family.samples}


def references() -> list[tuple[str, str, str]]:
    """(where, group, metric name) for every metric a rule or panel names;
    group is the rule group, or "" for the dashboard."""
    out = []
    for group, rule in alert_rules():
        for name in sorted(metric_names(rule["expr"])):
            out.append((f"alert {rule['alert']}", group, name))
    for where, expr in dashboard_queries():
        for name in sorted(metric_names(expr)):
            out.append((where, "", name))
    for where, name in dashboard_variable_metrics():
        out.append((where, "", name))
    return out


def unexported(exported: set[str]) -> list[str]:
    """The references to a metric not in `exported` (nor, in the external
    group, one of EXTERNAL), as readable lines."""
    bad = []
    for where, group, name in references():
        if name in exported or (group == EXTERNAL_GROUP and name in EXTERNAL):
            continue
        hint = ""
        if f"{name}_total" in exported:
            hint = f" (a counter: {name}_total)"
        elif f"{name}_bucket" in exported:
            hint = f" (a histogram: {name}_bucket, _sum or _count)"
        bad.append(f"{where}: {name}{hint}")
    return bad
