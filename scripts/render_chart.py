"""Render deploy/helm/dcmstatus as `helm template` would, without a helm
binary or a cluster (docs/deploy.md#tests): Helm's own library (the
helm-sdkpy wheel, Python 3.12+) installs the chart into a fake Kubernetes API
server on 127.0.0.1 that only records what it is sent; the objects are
printed as YAML.

    python3.12 -m venv /tmp/helm && /tmp/helm/bin/pip install helm-sdkpy pyyaml
    /tmp/helm/bin/python scripts/render_chart.py --set secret.apiToken=t > rendered.yaml

tests/unit/test_deploy.py compares the result with deploy/kubernetes/ when
DCMSTATUS_TEST_HELM_PYTHON names such an interpreter (or helm is installed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import yaml

CHART = Path(__file__).resolve().parents[1] / "deploy" / "helm" / "dcmstatus"
RELEASE_PREFIX = "sh.helm.release."

# What discovery answers: the kinds the chart uses, and where they live.
RESOURCES = {
    "v1": [("configmaps", "ConfigMap"), ("secrets", "Secret"), ("services", "Service")],
    "apps/v1": [("deployments", "Deployment")],
    "policy/v1": [("poddisruptionbudgets", "PodDisruptionBudget")],
}


class _FakeApi(BaseHTTPRequestHandler):
    """Discovery, empty lists, 404 for every object (nothing exists yet), and
    every created object recorded."""

    created: ClassVar[list[dict[str, Any]]] = []

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        if path == "/version":
            return self._send(200, {"major": "1", "minor": "30", "gitVersion": "v1.30.0", "platform": "linux/amd64"})
        if path == "/api":
            return self._send(200, {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []})
        if path == "/apis":
            groups = [{"name": g, "versions": [{"groupVersion": f"{g}/v1", "version": "v1"}],
                       "preferredVersion": {"groupVersion": f"{g}/v1", "version": "v1"}} for g in ("apps", "policy")]
            return self._send(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
        group_version = "v1" if path == "/api/v1" else path.removeprefix("/apis/")
        if group_version in RESOURCES:
            resources = [{"name": name, "singularName": kind.lower(), "namespaced": True, "kind": kind,
                          "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]}
                         for name, kind in RESOURCES[group_version]]
            return self._send(200, {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version,
                                    "resources": resources})
        if path.endswith("s") and path.count("/") == 5:  # a list: /api/v1/namespaces/<ns>/<resources>
            return self._send(200, {"kind": "List", "apiVersion": "v1", "metadata": {"resourceVersion": "1"}, "items": []})
        return self._send(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404})

    def _read(self) -> dict[str, Any] | None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if "protobuf" in (self.headers.get("Content-Type") or ""):
            return None  # Helm's own release record: not one of the chart's objects
        body: dict[str, Any] = json.loads(raw or b"{}")
        return body

    def do_POST(self) -> None:
        body = self._read()
        if body is None:
            return self._send(201, {"kind": "Secret", "apiVersion": "v1", "metadata": {"name": RELEASE_PREFIX + "x"}})
        if not body.get("metadata", {}).get("name", "").startswith(RELEASE_PREFIX):
            type(self).created.append(_as_templated(body))
        body.setdefault("metadata", {}).update(resourceVersion="1", uid="0")
        return self._send(201, body)

    def do_PUT(self) -> None:
        body = self._read() or {"kind": "Secret", "apiVersion": "v1", "metadata": {"name": RELEASE_PREFIX + "x"}}
        return self._send(200, body)


def _as_templated(obj: dict[str, Any]) -> dict[str, Any]:
    """The object as `helm template` prints it: without the ownership
    annotations an install adds."""
    obj = json.loads(json.dumps(obj))
    annotations = obj.get("metadata", {}).get("annotations", {})
    for key in [k for k in annotations if k.startswith("meta.helm.sh/")]:
        del annotations[key]
    if "annotations" in obj.get("metadata", {}) and not annotations:
        del obj["metadata"]["annotations"]
    return obj


def _values(sets: list[str]) -> dict[str, Any]:
    """--set a.b=c (YAML scalars) as nested values."""
    values: dict[str, Any] = {}
    for item in sets:
        key, _, raw = item.partition("=")
        node = values
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(raw) if raw else ""
    return values


def render(values: dict[str, Any], release: str = "dcmstatus", namespace: str = "default") -> list[dict[str, Any]]:
    import helm_sdkpy  # Python 3.12+, bundles Helm's library

    _FakeApi.created = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            kubeconfig = Path(tmp) / "kubeconfig"
            kubeconfig.write_text(yaml.safe_dump({
                "apiVersion": "v1", "kind": "Config", "current-context": "fake",
                "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{server.server_address[1]}"}}],
                "users": [{"name": "fake", "user": {"token": "fake"}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": namespace}}],
            }))
            config = helm_sdkpy.Configuration(namespace=namespace, kubeconfig=str(kubeconfig))
            asyncio.run(helm_sdkpy.Install(config).run(release, str(CHART), values=values, wait=False, timeout=60))
    finally:
        server.shutdown()
    return list(_FakeApi.created)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a value, as helm's --set")
    parser.add_argument("--release", default="dcmstatus")
    args = parser.parse_args()
    objects = render(_values(args.set), args.release)
    sys.stdout.write(yaml.safe_dump_all(objects, sort_keys=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
