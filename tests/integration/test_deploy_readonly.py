"""serve runs as deploy/ runs it (docs/deploy.md#security-context): on a
read-only root file system where only the data dir is writable, configured
by the plain manifests' ConfigMap. The root is made read-only in a private
mount namespace (unshare, as root), so nothing outside the data dir can be
written; a write anywhere else would fail start-up, the API or the drain."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_service import Running, create, publish, status_of, wait_for

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    not (hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("unshare")),
    reason="needs root and unshare(1) to make the root file system read-only",
)


def _configmap_env() -> dict[str, str]:
    (configmap,) = yaml.safe_load_all((ROOT / "deploy" / "kubernetes" / "configmap.yaml").read_text())
    env = dict(configmap["data"])
    # The servers are the test's; the port is a free one.
    for name in ("DCMSTATUS_NATS_URL", "DCMSTATUS_NATS_CREDS", "DCMSTATUS_HTTP_PORT", "DCMSTATUS_DATA_DIR"):
        env.pop(name)
    return env


def test_serve_needs_nothing_writable_but_its_data_dir(tmp_path, nats_url, database_url):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    log_path = tmp_path / "serve.log"
    probe = tmp_path / "outside-the-data-dir"
    serve = [sys.executable, "-m", "dcmstatus", "serve", "--nats-url", nats_url, "--database-url", database_url,
             "--http-port", "0", "--http-host", "127.0.0.1", "--data-dir", str(data_dir)]
    # The data dir becomes a mount of its own, then / is remounted read-only:
    # only the data dir stays writable. The touch proves the rest is not.
    script = (
        f"mount --bind {shlex.quote(str(data_dir))} {shlex.quote(str(data_dir))}"
        " && mount -o remount,bind,ro /"
        f" && ! touch {shlex.quote(str(probe))} 2>/dev/null"
        f" && exec {shlex.join(serve)}"
    )
    env = {**os.environ, **_configmap_env(), "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        stdout=log_path.open("w"), stderr=subprocess.STDOUT, env=env,
    )
    try:
        deadline = time.monotonic() + 60
        while not (data_dir / "runtime.json").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"serve did not start on a read-only root (exit {proc.poll()}):\n{log_path.read_text()}")
            time.sleep(0.05)
        service = Running(proc, data_dir, log_path)
        wait_for(lambda: service.http("GET", "/api/v1/health")[0] == 200, "health 200")
        assert not probe.exists()

        # The API, intake, commit and ack all work without writing elsewhere.
        create(service, "ro1")
        publish(nats_url, "vm", "ro1", "Running")
        wait_for(lambda: status_of(service, "ro1") == "RUNNING", "the event applied")
        assert (data_dir / "page-token.key").exists()  # the one other file serve writes, in the data dir
    finally:
        if proc.poll() is None:
            proc.terminate()
    assert proc.wait(30) == 0, log_path.read_text()
    log = log_path.read_text()
    assert "Read-only file system" not in log, log
    assert "could not write" not in log, log
    assert not (data_dir / "runtime.json").exists(), "runtime.json is removed on exit"
