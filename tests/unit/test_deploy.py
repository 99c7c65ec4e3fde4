"""deploy/ stays true to the service (docs/deploy.md): the Kubernetes
manifests pass the Kubernetes schema and carry the fields that matter (probes,
grace period, labels and selectors, security context, image), every
DCMSTATUS_* name they set is a serve option, the Helm chart says what the
plain manifests say, the quadlet unit uses quadlet's keys, and the alert rules
and the dashboard parse as PromQL. That they name only exported metrics is
checked against a live service in tests/integration/test_deploy_metrics.py."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import promql_parser
import pytest
import yaml
from deploy_refs import (
    EXTERNAL,
    EXTERNAL_GROUP,
    alert_rules,
    dashboard,
    dashboard_queries,
    dashboard_variable_metrics,
    metric_names,
)
from test_docs import _anchors

from dcmstatus.config import ServeConfig, env_name, load_config
from dcmstatus.engine.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PLAIN = DEPLOY / "kubernetes"
CHART = DEPLOY / "helm" / "dcmstatus"
QUADLET = DEPLOY / "podman" / "dcmstatus.container"
QUADLET_ENV = DEPLOY / "podman" / "dcmstatus.env"
HEALTH = "/api/v1/health"
ROLES = ("all", "consumer", "api")  # dcmstatus serve --role
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the
# newest schema kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.25.0", kubernetes_validate.latest_version())

OPTIONS = {f.name: f for f in dataclasses.fields(ServeConfig)}
ENV_OPTIONS = {env_name(name): name for name, f in OPTIONS.items() if f.metadata.get("env", True)}
# --role comes with the serve roles (docs/deploy.md#roles). Until that option
# is in config.py, its variable is the one name allowed that is not an option.
PENDING = set() if "role" in OPTIONS else {"DCMSTATUS_ROLE"}


def _version() -> str:
    return str(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"])


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]


def _plain() -> list[dict[str, Any]]:
    """The objects kustomization.yaml applies, plus the example Secret."""
    out = []
    for path in sorted(PLAIN.glob("*.yaml")):
        out.extend(d for d in _docs(path) if d["kind"] != "Kustomization")
    return out


def _of_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in _plain() if d["kind"] == kind]


def _deployments() -> dict[str, dict[str, Any]]:
    return {d["metadata"]["labels"]["app.kubernetes.io/component"]: d for d in _of_kind("Deployment")}


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _configmap() -> dict[str, str]:
    (configmap,) = _of_kind("ConfigMap")
    return dict(configmap["data"])


def _option_default(name: str) -> Any:
    return OPTIONS[name].default


def _configured(env_var: str) -> float:
    """A numeric option as the ConfigMap sets it, else its default."""
    value = _configmap().get(env_var)
    return float(value) if value is not None else float(_option_default(ENV_OPTIONS[env_var]))


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# ------------------------------------------------------------ the schema


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_plain_manifests_pass_the_kubernetes_schema(version):
    """Strict: a misspelt or misplaced field fails, not only a wrong type."""
    objects = _plain()
    assert {d["kind"] for d in objects} >= {"ConfigMap", "Secret", "Deployment", "Service", "PodDisruptionBudget"}
    for obj in objects:
        kubernetes_validate.validate(obj, version, strict=True)


def test_the_schema_check_can_fail():
    deployment = _deployments()["api"]
    _container(deployment)["readinessProbe"]["httpGet"]["paht"] = HEALTH
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


def test_kustomization_applies_every_manifest_but_the_example_secret():
    (kustomization,) = _docs(PLAIN / "kustomization.yaml")
    files = {p.name for p in PLAIN.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files - {"secret.example.yaml"}


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_kubectl_kustomize_builds_the_manifests():
    out = subprocess.run(["kubectl", "kustomize", str(PLAIN)], capture_output=True, text=True, timeout=60, check=True)
    kinds = sorted(d["kind"] for d in yaml.safe_load_all(out.stdout) if d)
    assert kinds == ["ConfigMap", "Deployment", "Deployment", "PodDisruptionBudget", "PodDisruptionBudget", "Service"]


# ---------------------------------------------------- the fields that matter


def test_one_deployment_per_role_each_running_its_role():
    deployments = _deployments()
    assert set(deployments) == {"api", "consumer"}
    for role, deployment in deployments.items():
        env = {e["name"]: e for e in _container(deployment)["env"]}
        assert env["DCMSTATUS_ROLE"]["value"] == role
        assert deployment["metadata"]["name"] == f"dcmstatus-{role}"
        assert deployment["spec"]["replicas"] >= 2, "one replica of a role is no replica set"


def test_the_selector_matches_the_pod_labels_and_no_other_role():
    deployments = _deployments()
    for role, deployment in deployments.items():
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert _selects(selector, deployment["spec"]["template"]["metadata"]["labels"])
        for other, their in deployments.items():
            if other != role:
                assert not _selects(selector, their["spec"]["template"]["metadata"]["labels"])


def test_each_role_has_a_pod_disruption_budget_selecting_its_pods_only():
    deployments = _deployments()
    budgets = _of_kind("PodDisruptionBudget")
    assert len(budgets) == len(deployments)
    for budget in budgets:
        selector = budget["spec"]["selector"]["matchLabels"]
        matched = [r for r, d in deployments.items() if _selects(selector, d["spec"]["template"]["metadata"]["labels"])]
        assert len(matched) == 1, f"{budget['metadata']['name']} selects {matched}"
        # maxUnavailable 1 (or minAvailable below replicas): a drain can proceed.
        replicas = deployments[matched[0]]["spec"]["replicas"]
        assert budget["spec"].get("maxUnavailable", 0) >= 1 or budget["spec"]["minAvailable"] < replicas


def test_the_service_sends_traffic_to_api_replicas_only():
    (service,) = _of_kind("Service")
    selector = service["spec"]["selector"]
    deployments = _deployments()
    assert _selects(selector, deployments["api"]["spec"]["template"]["metadata"]["labels"])
    assert not _selects(selector, deployments["consumer"]["spec"]["template"]["metadata"]["labels"])
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "http"


def test_probes_ask_health_on_the_port_the_service_listens_on():
    http_port = int(_configmap()["DCMSTATUS_HTTP_PORT"])
    assert _configmap()["DCMSTATUS_HTTP_HOST"] == "0.0.0.0"
    for role, deployment in _deployments().items():
        container = _container(deployment)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"http": http_port}
        for probe in ("readinessProbe", "livenessProbe"):
            get = container[probe]["httpGet"]
            assert (get["path"], get["port"]) == (HEALTH, "http"), f"{role} {probe}"
        # Health answers within about 2 s even while the database does not
        # (docs/operations.md#health): a shorter timeout fails a healthy pod.
        assert container["readinessProbe"]["timeoutSeconds"] >= 3
        assert container["livenessProbe"]["timeoutSeconds"] >= 3
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(http_port)
        assert annotations["prometheus.io/path"] == "/metrics"


def test_liveness_outlasts_start_up_and_the_outages_the_service_rides_out():
    """Health is 503 while start-up waits (up to --startup-timeout) and during
    a NATS or PostgreSQL restart; restarting the pod helps with neither."""
    startup = _configured("DCMSTATUS_STARTUP_TIMEOUT")
    for role, deployment in _deployments().items():
        liveness = _container(deployment)["livenessProbe"]
        patience = liveness["periodSeconds"] * liveness["failureThreshold"] + liveness.get("initialDelaySeconds", 0)
        assert patience > startup + 60, f"{role}: liveness restarts after {patience}s of 503"


def _prestop_seconds(container: dict[str, Any]) -> float:
    prestop = container.get("lifecycle", {}).get("preStop")
    if prestop is None:
        return 0.0
    command = prestop["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, command
    return float(command[1])


def test_the_grace_period_covers_the_prestop_sleep_and_the_drain():
    """Kubernetes counts the preStop hook inside terminationGracePeriodSeconds;
    serve exits within --grace-period plus about 1.5 s (docs/operations.md#shutdown)."""
    grace = _configured("DCMSTATUS_GRACE_PERIOD")
    for role, deployment in _deployments().items():
        spec = deployment["spec"]["template"]["spec"]
        needed = _prestop_seconds(_container(deployment)) + grace + 2
        assert spec["terminationGracePeriodSeconds"] >= needed, role
    assert _prestop_seconds(_container(_deployments()["api"])) > 0, "API pods stop before the endpoints drop them"


def test_the_pods_run_as_the_images_user_on_a_read_only_root():
    uid = int(re.search(r"useradd .*--uid (\d+)", (ROOT / "Dockerfile").read_text()).group(1))
    data_dir = _configmap()["DCMSTATUS_DATA_DIR"]
    for role, deployment in _deployments().items():
        spec = deployment["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] == uid
        container = _container(deployment)
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True
        assert context["allowPrivilegeEscalation"] is False
        assert context["capabilities"]["drop"] == ["ALL"]
        # The one place serve writes (runtime.json, page-token.key) is writable.
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert "emptyDir" in volumes[mounts[data_dir]], role
        assert set(container["resources"]["requests"]) == {"cpu", "memory"}
        assert "memory" in container["resources"]["limits"]
        # Services put <NAME>_PORT=tcp://... into the environment otherwise:
        # a Service named dcmstatus-http would set DCMSTATUS_HTTP_PORT.
        assert spec["enableServiceLinks"] is False
        assert spec["automountServiceAccountToken"] is False


def test_the_image_is_the_release():
    for deployment in _deployments().values():
        image = _container(deployment)["image"]
        assert image.rsplit(":", 1)[1] == _version(), image


def test_the_database_url_comes_from_cloudnativepg_and_the_rest_from_the_configmap_and_secret():
    secret_names = {d["metadata"]["name"] for d in _of_kind("Secret")}
    (configmap,) = _of_kind("ConfigMap")
    for deployment in _deployments().values():
        container = _container(deployment)
        env = {e["name"]: e for e in container["env"]}
        ref = env["DCMSTATUS_DATABASE_URL"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "dcmstatus-db-app", "key": "uri"}  # CloudNativePG's <cluster>-app secret
        sources = container["envFrom"]
        assert {"configMapRef": {"name": configmap["metadata"]["name"]}} in sources
        assert any(s.get("secretRef", {}).get("name") in secret_names for s in sources)


# --------------------------------------------- every name is a serve option


def _plain_env() -> dict[str, str]:
    """The environment a plain-manifest pod of each role gets, merged."""
    env = dict(_configmap())
    (secret,) = _of_kind("Secret")
    env.update({k: v for k, v in secret["stringData"].items() if k.startswith("DCMSTATUS_")})
    for deployment in _deployments().values():
        for entry in _container(deployment)["env"]:
            env[entry["name"]] = entry.get("value", "postgresql://app:secret@dcmstatus-db-rw:5432/app")
    return env


def _quadlet_env() -> dict[str, str]:
    env = dict(line.split("=", 1) for line in QUADLET_ENV.read_text().splitlines() if line and not line.startswith("#"))
    for _, value in _unit(QUADLET).get(("Container", "Environment"), []):
        env.update([value.split("=", 1)])
    return env


def _names_in(text: str) -> set[str]:
    return set(re.findall(r"\bDCMSTATUS_[A-Z0-9_]+\b", text))


def _chart_text() -> str:
    return "\n".join(p.read_text() for p in sorted(CHART.rglob("*")) if p.is_file())


@pytest.mark.parametrize("where", ["kubernetes", "helm", "podman"])
def test_every_dcmstatus_variable_set_is_a_serve_option(where):
    texts = {
        "kubernetes": "\n".join(p.read_text() for p in PLAIN.glob("*.yaml")),
        "helm": _chart_text(),
        "podman": QUADLET.read_text() + QUADLET_ENV.read_text(),
    }
    unknown = sorted(_names_in(texts[where]) - set(ENV_OPTIONS) - PENDING)
    assert not unknown, f"deploy/{where} sets variables no option reads: {unknown}"


@pytest.mark.parametrize("env", [_plain_env, _quadlet_env], ids=["kubernetes", "podman"])
def test_the_configured_values_load(env, tmp_path):
    """What the manifests set is what serve accepts: load_config parses every
    value (types, choices) the way serve does."""
    values = env()
    role = values.pop("DCMSTATUS_ROLE", None)
    if "role" in OPTIONS and role is not None:
        values["DCMSTATUS_ROLE"] = role
    if "DCMSTATUS_NATS_CREDS" in values:  # a file serve opens: a stand-in here
        creds = tmp_path / "nats.creds"
        creds.write_text(
            "-----BEGIN NATS USER JWT-----\nx\n------END NATS USER JWT------\n"
            "-----BEGIN USER NKEY SEED-----\nSUx\n------END USER NKEY SEED------\n"
        )
        values["DCMSTATUS_NATS_CREDS"] = str(creds)
    values.setdefault("DCMSTATUS_DATABASE_URL", "postgresql://app:secret@db:5432/app")
    config, sources = load_config(argparse.Namespace(), values)
    assert config.grace_period == float(values["DCMSTATUS_GRACE_PERIOD"])
    assert sources["nats_url"] == "env DCMSTATUS_NATS_URL"


def test_the_role_values_are_the_roles():
    roles = {e["value"] for d in _deployments().values() for e in _container(d)["env"] if e["name"] == "DCMSTATUS_ROLE"}
    assert roles <= set(ROLES)
    assert _quadlet_env()["DCMSTATUS_ROLE"] in ROLES
    if "role" in OPTIONS:
        assert set(OPTIONS["role"].metadata["choices"]) == set(ROLES)


# ------------------------------------------------- the chart says the same


def _values() -> dict[str, Any]:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def test_the_chart_is_the_release():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["appVersion"] == _version()
    assert _values()["image"]["repository"] == _container(_deployments()["api"])["image"].rsplit(":", 1)[0]


def test_every_value_a_template_reads_is_in_values_yaml():
    values = _values()
    missing = []
    for template in sorted((CHART / "templates").iterdir()):
        for path in re.findall(r"\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)", template.read_text()):
            node: Any = values
            for key in path.strip(".").split("."):
                if not isinstance(node, dict) or key not in node:
                    missing.append(f"{template.name}: .Values{path}")
                    break
                node = node[key]
    assert not missing, missing


def test_the_chart_sets_what_the_plain_manifests_set():
    chart = _chart_text()
    plain = "\n".join(p.read_text() for p in PLAIN.glob("*.yaml"))
    assert _names_in(chart) >= _names_in(plain), sorted(_names_in(plain) - _names_in(chart))
    for needle in (HEALTH, "enableServiceLinks: false", "automountServiceAccountToken: false", "dcmstatus/serves-api",
                   "app.kubernetes.io/component", "kind: PodDisruptionBudget", "terminationGracePeriodSeconds",
                   "preStop", "secretKeyRef", "configMapRef", "secretRef", "containerPort: 8080", "mountPath: /data"):
        assert needle in chart, needle
    values = _values()
    deployments = _deployments()
    assert float(values["gracePeriodSeconds"]) == float(_configmap()["DCMSTATUS_GRACE_PERIOD"])
    for role, deployment in deployments.items():
        spec, container = values["roles"][role], _container(deployment)
        assert spec["enabled"] is True and spec["replicas"] == deployment["spec"]["replicas"]
        assert spec["resources"] == container["resources"]
        assert spec["preStopSleepSeconds"] == _prestop_seconds(container)
        # The chart computes it: preStop + grace period + margin.
        tgps = spec["preStopSleepSeconds"] + values["gracePeriodSeconds"] + values["terminationMarginSeconds"]
        assert tgps == deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        for probe, key in (("readinessProbe", "readiness"), ("livenessProbe", "liveness")):
            assert {k: v for k, v in container[probe].items() if k != "httpGet"} == values["probes"][key]
        assert values["securityContext"] == container["securityContext"]
        assert values["podSecurityContext"] == deployment["spec"]["template"]["spec"]["securityContext"]
        assert values["podAnnotations"] == deployment["spec"]["template"]["metadata"]["annotations"]
    assert values["roles"]["all"]["enabled"] is False
    assert values["database"] == {"existingSecret": "dcmstatus-db-app", "existingSecretKey": "uri", "url": ""}
    assert values["nats"]["url"] == _configmap()["DCMSTATUS_NATS_URL"]
    for name, value in values["config"].items():
        assert _configmap()[name] == value, name


HELM_PYTHON = os.environ.get("DCMSTATUS_TEST_HELM_PYTHON")
# The values that make the chart render what deploy/kubernetes/ holds: the
# API token it requires, and NATS credentials, which the plain manifests mount.
CHART_SETS = ["secret.apiToken=an-api-token-for-the-test", "nats.creds=creds"]


def _helm(values: list[str]) -> subprocess.CompletedProcess[str]:
    """The chart rendered by Helm: `helm template`, or Helm's library through
    scripts/render_chart.py under DCMSTATUS_TEST_HELM_PYTHON."""
    sets = [arg for s in values for arg in ("--set", s)]
    if shutil.which("helm"):
        command = ["helm", "template", "dcmstatus", str(CHART), *sets]
    else:
        command = [str(HELM_PYTHON), str(ROOT / "scripts" / "render_chart.py"), *sets]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def _rendered(values: list[str] = CHART_SETS) -> list[dict[str, Any]]:
    out = _helm(values)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


needs_helm = pytest.mark.skipif(not (shutil.which("helm") or HELM_PYTHON), reason="neither helm nor DCMSTATUS_TEST_HELM_PYTHON")


def _without_helms_own(obj: dict[str, Any]) -> dict[str, Any]:
    """An object without what only Helm adds: its labels, the config checksum."""
    obj = json.loads(json.dumps(obj))
    for key in ("app.kubernetes.io/version", "app.kubernetes.io/managed-by", "helm.sh/chart"):
        obj["metadata"].get("labels", {}).pop(key, None)
    obj["metadata"].pop("namespace", None)
    if obj["kind"] == "Deployment":
        obj["spec"]["template"]["metadata"]["annotations"].pop("checksum/config", None)
    return obj


@needs_helm
def test_the_chart_renders_the_plain_manifests():
    rendered = {(d["kind"], d["metadata"]["name"]): d for d in _rendered()}
    plain = {(d["kind"], d["metadata"]["name"]): d for d in _plain()}
    assert set(rendered) == set(plain)
    for key, obj in rendered.items():
        kubernetes_validate.validate(obj, KUBERNETES_VERSIONS[0], strict=True)
        if key[0] != "Secret":  # the example's values are placeholders
            assert _without_helms_own(obj) == _without_helms_own(plain[key]), key
    (secret,) = (d for d in rendered.values() if d["kind"] == "Secret")
    data = secret.get("stringData") or secret["data"]
    assert set(data) == set(plain[("Secret", "dcmstatus")]["stringData"])


@needs_helm
def test_the_chart_renders_one_all_role_deployment_behind_the_service():
    objects = _rendered([*CHART_SETS, "roles.all.enabled=true", "roles.api.enabled=false", "roles.consumer.enabled=false"])
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES_VERSIONS[0], strict=True)
    (deployment,) = (d for d in objects if d["kind"] == "Deployment")
    (service,) = (d for d in objects if d["kind"] == "Service")
    (budget,) = (d for d in objects if d["kind"] == "PodDisruptionBudget")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["metadata"]["name"] == "dcmstatus-all"
    assert {"name": "DCMSTATUS_ROLE", "value": "all"} in _container(deployment)["env"]
    assert _selects(service["spec"]["selector"], labels) and _selects(budget["spec"]["selector"]["matchLabels"], labels)
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 5 + 10 + 5


@needs_helm
@pytest.mark.parametrize(
    ("values", "message"),
    [
        ([], "set secret.apiToken"),
        ([*CHART_SETS, "roles.all.enabled=true"], "roles.all runs both halves"),
        ([*CHART_SETS, "roles.api.enabled=false", "roles.consumer.enabled=false"], "enable at least one of"),
        ([*CHART_SETS, "database.existingSecret="], "set database.existingSecret"),
    ],
    ids=["no-api-token", "all-beside-api", "no-role", "no-database"],
)
def test_the_chart_refuses_what_cannot_work(values, message):
    out = _helm(values)
    assert out.returncode != 0 and message in out.stderr, out.stderr[-2000:]


# ----------------------------------------------------------- the quadlet


# The keys of podman-systemd.unit(5) this unit may use, per section; [Unit],
# [Service] and [Install] are systemd's own.
QUADLET_KEYS = {
    "Unit": {"Description", "Documentation", "Wants", "After", "Requires", "Before"},
    "Container": {
        "ContainerName", "Image", "EnvironmentFile", "Environment", "Secret", "PublishPort", "User", "Group",
        "ReadOnly", "ReadOnlyTmpfs", "Volume", "Tmpfs", "NoNewPrivileges", "DropCapability", "HealthCmd",
        "HealthInterval", "HealthTimeout", "HealthStartPeriod", "HealthRetries", "HealthOnFailure", "Notify",
        "StopTimeout", "Exec", "Network", "PodmanArgs", "AutoUpdate", "LogDriver", "Label",
    },
    "Service": {"Restart", "RestartSec", "TimeoutStartSec", "TimeoutStopSec"},
    "Install": {"WantedBy", "RequiredBy"},
}


def _unit(path: Path) -> dict[tuple[str, str], list[tuple[str, str]]]:
    """A systemd unit file: (section, key) -> [(key, value), ...], keys repeatable."""
    out: dict[tuple[str, str], list[tuple[str, str]]] = {}
    section = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, sep, value = line.partition("=")
        assert sep and section, f"{path.name}: not a key=value line in a section: {raw!r}"
        out.setdefault((section, key.strip()), []).append((key.strip(), value.strip()))
    return out


def _one(unit: dict[tuple[str, str], list[tuple[str, str]]], section: str, key: str) -> str:
    (entry,) = unit[(section, key)]
    return entry[1]


def test_the_quadlet_uses_only_quadlet_keys():
    unit = _unit(QUADLET)
    unknown = sorted(f"[{s}] {k}" for s, k in unit if k not in QUADLET_KEYS.get(s, set()))
    assert not unknown, unknown
    assert _one(unit, "Container", "Image").rsplit(":", 1)[1] == _version()


def test_the_quadlet_runs_like_the_pods():
    unit = _unit(QUADLET)
    uid = re.search(r"useradd .*--uid (\d+)", (ROOT / "Dockerfile").read_text()).group(1)
    assert _one(unit, "Container", "User") == uid
    assert _one(unit, "Container", "ReadOnly") == "true"
    assert _one(unit, "Container", "NoNewPrivileges") == "true"
    assert _one(unit, "Container", "DropCapability") == "ALL"
    env = _quadlet_env()
    assert any(v.endswith(":" + env["DCMSTATUS_DATA_DIR"]) for _, v in unit[("Container", "Volume")])
    assert HEALTH in _one(unit, "Container", "HealthCmd")
    assert f"127.0.0.1:{env['DCMSTATUS_HTTP_PORT']}" in _one(unit, "Container", "HealthCmd")
    assert _one(unit, "Container", "PublishPort").endswith(":" + env["DCMSTATUS_HTTP_PORT"])
    # podman stop waits StopTimeout after SIGTERM, then kills; systemd must wait longer still.
    grace = float(env["DCMSTATUS_GRACE_PERIOD"])
    stop = float(_one(unit, "Container", "StopTimeout"))
    assert stop >= grace + 2
    assert float(_one(unit, "Service", "TimeoutStopSec")) > stop
    assert float(_one(unit, "Service", "TimeoutStartSec")) > float(env["DCMSTATUS_STARTUP_TIMEOUT"])


def test_the_quadlet_secrets_are_environment_secrets_of_options():
    targets = []
    for _, value in _unit(QUADLET)[("Container", "Secret")]:
        _secret, *options = value.split(",")
        opts = dict(o.split("=", 1) for o in options)
        assert opts["type"] == "env", value
        targets.append(opts["target"])
    assert set(targets) == {"DCMSTATUS_DATABASE_URL", "DCMSTATUS_API_TOKEN", "DCMSTATUS_PAGE_TOKEN_SECRET"}
    assert set(targets) <= set(ENV_OPTIONS)
    secrets = {ENV_OPTIONS[t] for t in targets}
    assert not secrets & set(_quadlet_env()), "a secret is in the plain environment file"


# ------------------------------------------------ the rules and the panels


def test_every_rule_is_complete_and_has_a_runbook_section():
    anchors = _anchors(ROOT / "docs" / "deploy.md")
    names = [rule["alert"] for _, rule in alert_rules()]
    assert len(names) == len(set(names)), "alert names repeat"
    for _, rule in alert_rules():
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        page, _, anchor = rule["annotations"]["runbook"].partition("#")
        assert page == "docs/deploy.md" and anchor == rule["alert"].lower() and anchor in anchors, rule["alert"]


@pytest.mark.parametrize("source", ["alerts", "dashboard"])
def test_every_expression_parses_as_promql(source):
    exprs = [(r["alert"], r["expr"]) for _, r in alert_rules()] if source == "alerts" else dashboard_queries()
    assert exprs
    for where, expr in exprs:
        try:
            promql_parser.parse(expr)
        except Exception as error:  # the parser raises its own untyped errors
            pytest.fail(f"{where}: {expr!r} is not PromQL: {error}")


def _parsed_names(expr: str) -> set[str]:
    names: set[str] = set()

    def visit(node: Any) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            names.add(node.name)
        return True

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def test_the_metric_regex_agrees_with_a_promql_parser():
    exprs = [r["expr"] for _, r in alert_rules()] + [e for _, e in dashboard_queries()]
    exprs += [
        'sum by (reason) (rate(a_total{reason=~"x|y", le="0.5"}[5m] offset 1h)) / on (job) group_left (pod) b',
        "histogram_quantile(0.99, sum without (instance) (rate(h_bucket[1h:1m]))) > bool 1e3 and c unless d or vector(1)",
        "max_over_time(x[10m]) * 2 + scalar(y) - abs(z{a='b,c'})",
    ]
    for expr in exprs:
        assert metric_names(expr) == _parsed_names(expr), expr


def test_the_dashboard_shows_every_metric():
    shown = {name for _, e in dashboard_queries() for name in metric_names(e)}
    shown |= {m for _, m in dashboard_variable_metrics()}
    families = {m.name for m in Metrics().registry.collect()} | {"dcmstatus_watch_streams"}
    missing = sorted(f for f in families if not any(s == f or s.startswith(f + "_") for s in shown))
    assert not missing, f"metrics no panel shows: {missing}"


def test_the_dashboard_is_grafana_json():
    board = dashboard()
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in board["panels"]:
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_the_recommended_alerts_are_all_there():
    """docs/operations.md#alerts recommends them; each of its metrics has a rule."""
    page = (ROOT / "docs" / "operations.md").read_text()
    table = page.split("## Alerts", 1)[1].split("\n## ", 1)[0]
    recommended = set(re.findall(r"\bdcmstatus_[a-z0-9_]+", table))
    ruled = {name for _, r in alert_rules() for name in metric_names(r["expr"])}
    assert recommended, "no metric found in the alerts table"
    assert recommended <= ruled, sorted(recommended - ruled)


def test_only_the_targets_group_uses_metrics_from_elsewhere():
    for group, rule in alert_rules():
        foreign = {n for n in metric_names(rule["expr"]) if not n.startswith("dcmstatus_")}
        if group == EXTERNAL_GROUP:
            assert foreign and foreign <= set(EXTERNAL), rule["alert"]
        else:
            assert not foreign, f"{rule['alert']}: {foreign}"


def test_citations_in_deploy_reach_a_page_and_a_heading():
    """The manifests' comments cite docs/ as the code does (tests/unit/test_docs.py checks the code's)."""
    broken = []
    for path in sorted(p for p in DEPLOY.rglob("*") if p.is_file()):
        for page, anchor in re.findall(r"docs/([a-z][a-z0-9-]*\.md)(?:#([\w-]+))?", path.read_text()):
            target = ROOT / "docs" / page
            if not target.exists() or (anchor and anchor not in _anchors(target)):
                broken.append(f"{path.relative_to(ROOT)}: docs/{page}#{anchor}")
    assert not broken, broken


# ------------------------------------------------- the rules, by promtool

# promtool (Prometheus's rule checker and rule unit tester): on the path, or
# where DCMSTATUS_TEST_PROMTOOL says (.ci/run extracts Debian's).
PROMTOOL = os.environ.get("DCMSTATUS_TEST_PROMTOOL") or shutil.which("promtool")
needs_promtool = pytest.mark.skipif(not PROMTOOL, reason="promtool not installed (DCMSTATUS_TEST_PROMTOOL)")
ALERTS = DEPLOY / "monitoring" / "alerts.yaml"


@needs_promtool
def test_promtool_accepts_the_rules():
    """Durations, label and annotation templates included: what Prometheus loads."""
    out = subprocess.run([str(PROMTOOL), "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def _series(name: str, values: str, **labels: str) -> dict[str, str]:
    label_text = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{label_text}}}", "values": values}


D = {"job": "dcmstatus", "namespace": "dcm"}  # one deployment's labels, as the scrape sets them
# Each case: the series (one sample a minute), then (minute, alerts expected
# then, by their labels besides alertname and severity). An api replica's
# zeros sit beside the consumers' series where the rule aggregates them.
RULE_CASES: dict[str, tuple[list[dict[str, str]], list[tuple[int, list[dict[str, str]]]]]] = {
    "DcmstatusEventsRejected": (
        [_series("dcmstatus_events_rejected_total", "0+5x20", reason="unknown_status", instance="c1", **D),
         _series("dcmstatus_events_rejected_total", "0x20", reason="invalid_data", instance="c1", **D)],
        [(4, []), (10, [{"reason": "unknown_status", **D}])],
    ),
    "DcmstatusRejectedRateHigh": (
        [_series("dcmstatus_events_received_total", "0+100x40", instance="c1", **D),
         _series("dcmstatus_events_rejected_total", "0+10x40", reason="unknown_status", instance="c1", **D),
         _series("dcmstatus_events_received_total", "0x40", instance="a1", **D),
         _series("dcmstatus_events_received_total", "0+100x40", job="dcmstatus", namespace="other", instance="c9"),
         _series("dcmstatus_events_rejected_total", "0+1x40", reason="unknown_status", job="dcmstatus",
                 namespace="other", instance="c9")],
        [(8, []), (25, [D])],
    ),
    "DcmstatusEventLagHigh": (
        [_series("dcmstatus_event_lag_seconds_bucket", "0+1x30", le="30.0", instance="c1", **D),
         _series("dcmstatus_event_lag_seconds_bucket", "0+100x30", le="60.0", instance="c1", **D),
         _series("dcmstatus_event_lag_seconds_bucket", "0+100x30", le="+Inf", instance="c1", **D)],
        [(8, []), (20, [D])],
    ),
    "DcmstatusBacklogGrowing": (
        [_series("dcmstatus_consumer_pending_messages", "0+200x40", instance="c1", **D),
         _series("dcmstatus_consumer_pending_messages", "0x40", instance="a1", **D),
         _series("dcmstatus_consumer_pending_messages", "5000x40", job="dcmstatus", namespace="flat", instance="c9")],
        [(12, []), (30, [D])],
    ),
    "DcmstatusIntakeStalled": (
        [_series("dcmstatus_consumer_stalled", "0 1x10", instance="c1", **D),
         _series("dcmstatus_consumer_stalled", "0x10", instance="c2", **D)],
        [(4, []), (7, [{"instance": "c1", **D}])],
    ),
    "DcmstatusDatabaseErrors": (
        [_series("dcmstatus_db_errors_total", "0 0 0 1 1 1 1 1 1 1 1 1 1", instance="c1", **D)],
        [(2, []), (4, [{"instance": "c1", **D}]), (12, [])],
    ),
    "DcmstatusDatabaseDown": (
        [_series("dcmstatus_db_errors_total", "0+12x20", instance="c1", **D),
         _series("dcmstatus_db_errors_total", "0 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1", instance="c2", **D)],
        [(4, []), (10, [{"instance": "c1", **D}])],
    ),
    "DcmstatusAcksFailing": (
        [_series("dcmstatus_ack_failures_total", "0+1x20", instance="c1", **D)],
        [(4, []), (10, [{"instance": "c1", **D}])],
    ),
    "DcmstatusNatsReconnecting": (
        [_series("dcmstatus_nats_reconnects_total", "0+1x30", instance="c1", **D),
         _series("dcmstatus_nats_reconnects_total", "0 1 2 2 2 2 2 2 2 2 2 2 2 2 2 2 2 2 2 2", instance="c2", **D)],
        [(2, []), (16, [{"instance": "c1", **D}])],
    ),
    "DcmstatusRedeliveries": (
        [_series("dcmstatus_consumer_redelivered_messages", "5x30", instance="c1", **D),
         _series("dcmstatus_consumer_redelivered_messages", "0x30", instance="a1", **D)],
        [(10, []), (20, [D])],
    ),
    "DcmstatusClockSkew": (
        [_series("dcmstatus_events_clock_skew_total", "0 0 3 3 3", instance="c1", **D)],
        [(1, []), (4, [D])],
    ),
    "DcmstatusUnknownInstances": (
        [_series("dcmstatus_events_unknown_instance_total", "0+1x90", instance="c1", **D)],
        [(30, []), (80, [D])],
    ),
    "DcmstatusParkedOverflow": (
        [_series("dcmstatus_parked_dropped_total", "0+1x20", cause="evicted", instance="c1", **D),
         _series("dcmstatus_parked_dropped_total", "0+1x20", cause="expired", instance="c1", job="dcmstatus",
                 namespace="expired-only")],
        [(0, []), (5, [D])],
    ),
    "DcmstatusChangeEventsWaiting": (
        [_series("dcmstatus_changes_oldest_unpublished_age_seconds", "0+60x20", instance="c1", **D),
         _series("dcmstatus_changes_oldest_unpublished_age_seconds", "0x20", instance="a1", **D)],
        [(6, []), (9, [D])],
    ),
    "DcmstatusOutboxDeep": (
        [_series("dcmstatus_changes_outbox_rows", "20000x30", instance="c1", **D),
         _series("dcmstatus_changes_outbox_rows", "20x30", job="dcmstatus", namespace="shallow", instance="c9")],
        [(5, []), (15, [D])],
    ),
    "DcmstatusChangePublishLagHigh": (
        [_series("dcmstatus_changes_publish_lag_seconds_bucket", "0+1x40", le="30.0", instance="c1", **D),
         _series("dcmstatus_changes_publish_lag_seconds_bucket", "0+100x40", le="60.0", instance="c1", **D),
         _series("dcmstatus_changes_publish_lag_seconds_bucket", "0+100x40", le="+Inf", instance="c1", **D)],
        [(8, []), (25, [D])],
    ),
    "DcmstatusChangePublishFailing": (
        [_series("dcmstatus_changes_publish_errors_total", "0+1x30", instance="c1", **D)],
        [(8, []), (16, [D])],
    ),
    "DcmstatusNoRelayLeader": (
        [_series("dcmstatus_changes_relay_leader", "0x10", instance="c1", **D),
         _series("dcmstatus_changes_relay_leader", "0x10", instance="a1", **D),
         _series("dcmstatus_changes_relay_leader", "1x10", job="dcmstatus", namespace="led", instance="c9"),
         _series("dcmstatus_changes_relay_leader", "0x10", job="dcmstatus", namespace="led", instance="a9")],
        [(3, []), (6, [D])],
    ),
    "DcmstatusTargetDown": (
        [_series("up", "1 1 0x10", job="dcmstatus", instance="c1"), _series("up", "1x12", job="dcmstatus", instance="c2")],
        [(4, []), (8, [{"job": "dcmstatus", "instance": "c1"}])],
    ),
    "DcmstatusReplicasUnready": (
        [_series("kube_deployment_status_replicas_available", "1x10", deployment="dcmstatus-consumer", namespace="dcm"),
         _series("kube_deployment_spec_replicas", "2x10", deployment="dcmstatus-consumer", namespace="dcm"),
         _series("kube_deployment_status_replicas_available", "2x10", deployment="dcmstatus-api", namespace="dcm"),
         _series("kube_deployment_spec_replicas", "2x10", deployment="dcmstatus-api", namespace="dcm")],
        [(3, []), (6, [{"deployment": "dcmstatus-consumer", "namespace": "dcm"}])],
    ),
}


def test_every_rule_has_a_firing_case():
    assert set(RULE_CASES) == {rule["alert"] for _, rule in alert_rules()}


@needs_promtool
def test_the_rules_fire_when_they_should_and_not_before(tmp_path):
    """promtool's rule unit tests on synthetic series: each rule stays quiet
    before its condition has held for its `for`, then fires with the labels
    it groups by, and ignores what it should (other deployments, api
    replicas' zeros, other causes)."""
    document = yaml.safe_load(ALERTS.read_text())
    severity = {}
    for group in document["groups"]:
        for rule in group["rules"]:
            severity[rule["alert"]] = rule["labels"]["severity"]
            rule.pop("annotations")  # promtool compares them verbatim; check rules validates their templates
    rules = tmp_path / "alerts.yaml"
    rules.write_text(yaml.safe_dump(document))
    tests = []
    for alert, (series, checks) in RULE_CASES.items():
        tests.append({
            "name": alert,
            "interval": "1m",
            "input_series": series,
            "alert_rule_test": [
                {"eval_time": f"{minute}m", "alertname": alert,
                 "exp_alerts": [{"exp_labels": {**labels, "severity": severity[alert]}} for labels in expected]}
                for minute, expected in checks
            ],
        })
    test_file = tmp_path / "alerts.test.yaml"
    test_file.write_text(yaml.safe_dump({"rule_files": [str(rules)], "evaluation_interval": "1m", "tests": tests}))
    out = subprocess.run([str(PROMTOOL), "test", "rules", str(test_file)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
