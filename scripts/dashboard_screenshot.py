"""Take docs/dashboard.png: a `dcmstatus serve` over embedded servers with a
small, realistic fleet, photographed by a headless Chromium.

    PYTHONPATH=$PWD python scripts/dashboard_screenshot.py [--out docs/dashboard.png]

Needs chromium and chromedriver (docs/dashboard.md#tests) and selenium.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import nats
from selenium import webdriver
from selenium.webdriver.chrome.service import Service as DriverService

from dcmstatus.cli.publish import build_event, publish_event
from dcmstatus.devtools.embedded import EmbeddedNats, EmbeddedPostgres, create_database

FLEET = [
    # (id, type, name, final status, message, provider)
    ("web-frontend-1", "vm", "web frontend", "RUNNING", "VM is running", "kubevirt"),
    ("web-frontend-2", "vm", "web frontend", "RUNNING", "VM is running", "kubevirt"),
    ("batch-worker-7", "vm", "nightly batch", "STOPPED", "stopped by schedule", "kubevirt"),
    ("ci-runner-3", "vm", "CI runner", "PROVISIONING", "", "kubevirt"),
    ("legacy-erp", "vm", "ERP", "FAILED", "guest agent not responding after 300s", "vsphere"),
    ("api-gateway", "container", "api gateway", "RUNNING", "3/3 replicas ready", "podman"),
    ("thumbnailer", "container", "thumbnailer", "RUNNING", "2/2 replicas ready", "podman"),
    ("report-job-41", "container", "monthly report", "SUCCEEDED", "exit code 0", "podman"),
    ("orders-db", "database", "orders", "RUNNING", "primary + 1 replica", "cnpg"),
    ("analytics-db", "database", "analytics", "PENDING", "waiting for a volume", "cnpg"),
    ("backups", "storage", "backup bucket", "RUNNING", "1.2 TiB used", "ceph"),
    ("tenant-a-net", "network", "tenant A", "READY", "", "ovn"),
    ("tenant-b-net", "network", "tenant B", "READY", "", "ovn"),
    ("edge-cluster", "cluster", "edge", "DEGRADED", "1 of 3 nodes NotReady", "acm"),
    ("prod-cluster", "cluster", "production", "ACTIVE", "all nodes ready", "acm"),
]


def http(url: str, method: str = "GET", body: object | None = None) -> object:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        raw = response.read()
        return json.loads(raw) if raw else None


def publish(nats_url: str, service_type: str, instance: str, status: str, message: str, provider: str) -> None:
    body = build_event(service_type, instance, status, message=message or None, source=provider)
    asyncio.run(publish_event(nats_url, f"dcm.{service_type}", body))


def publish_junk(nats_url: str) -> None:
    async def go() -> None:
        nc = await nats.connect(nats_url)
        js = nc.jetstream()
        for body in (b"{not json", b"\xff\xfe", b'{"specversion": "1.0"}', b"{also not json"):
            await js.publish("dcm.vm", body)
        await nc.close()

    asyncio.run(go())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/dashboard.png"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dcmstatus-shot-"))  # under /tmp: embedded PostgreSQL runs as another user as root
    os.chmod(work, 0o755)
    pg = EmbeddedPostgres(work / "pg", fsync=False)
    broker = EmbeddedNats(work / "nats")
    proc = None
    driver = None
    try:
        pg.start()
        broker.start()
        database_url = create_database(pg.url, "dashboard_shot")
        data_dir = work / "serve"
        data_dir.mkdir()
        proc = subprocess.Popen(
            [sys.executable, "-m", "dcmstatus", "serve", "--nats-url", broker.url, "--database-url", database_url,
             "--http-port", "0", "--data-dir", str(data_dir)],
            stdout=(work / "serve.log").open("w"), stderr=subprocess.STDOUT,
        )
        while not (data_dir / "runtime.json").exists():
            if proc.poll() is not None:
                raise SystemExit((work / "serve.log").read_text())
            time.sleep(0.1)
        base = json.loads((data_dir / "runtime.json").read_text())["http_url"]
        for id_, type_, name, _, _, provider in FLEET:
            http(f"{base}/api/v1/service-type-instances?id={id_}", "POST",
                 {"service_type": type_, "spec": {"size": "m"}, "name": name, "provider_name": provider})
        publish_junk(broker.url)

        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium") or "chromium"
        for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     f"--user-data-dir={work / 'chromium'}", "--window-size=1360,1180", "--hide-scrollbars"):
            options.add_argument(flag)
        driver = webdriver.Chrome(options=options, service=DriverService(shutil.which("chromedriver") or "chromedriver"))
        driver.get(base + "/")
        # Events trickle in while the page watches, so the chart has a shape.
        rng = random.Random(7)
        steps = [f for f in FLEET if f[3] != "PROVISIONING"]
        for id_, type_, _, status, message, provider in steps:
            publish(broker.url, type_, id_, status, message, provider)
        # Then repeats trickle in at a varying rate (no-ops for the rows),
        # so the intake chart has a shape.
        deadline = time.monotonic() + 60
        round_ = 0
        while time.monotonic() < deadline:
            for id_, type_, _, status, message, provider in rng.sample(steps, k=1 + (round_ * 7) % 9):
                publish(broker.url, type_, id_, status, message, provider)
            round_ += 1
            time.sleep(0.5)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1360, min(max(height + 20, 800), 1800))
        time.sleep(1)
        driver.save_screenshot(str(args.out))
        print(f"wrote {args.out}")
        return 0
    finally:
        if driver is not None:
            driver.quit()
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        broker.stop()
        pg.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
