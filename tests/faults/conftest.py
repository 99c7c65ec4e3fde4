"""Fault-suite fixtures: the harness lives in scripts/chaos.py (the chaos run
uses the same code), so it is importable here as `chaos`."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import chaos

_FAULTS_DIR = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.is_relative_to(_FAULTS_DIR):
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def serve(tmp_path: Path):
    """serve(nats_url, database_url, *extra, name=...) → a started chaos.Serve;
    every one still running is killed at the end of the test."""
    started: list[chaos.Serve] = []

    def start(nats_url: str, database_url: str, *extra: str, name: str = "svc", wait_healthy: bool = True):
        svc = chaos.Serve(tmp_path, nats_url, database_url, *extra, name=name)
        started.append(svc)
        return svc.start(wait_healthy=wait_healthy)

    yield start
    for svc in started:
        svc.ensure_stopped()


class Publisher:
    """Publishes a workload through JetStream in a background thread (retrying
    what a fault interrupts), so faults can be injected meanwhile."""

    def __init__(self, url: str, events, rate: float) -> None:
        import asyncio
        import threading

        self.progress = [0]
        self.error: BaseException | None = None
        self.retried = 0

        def run():
            try:
                self.retried = asyncio.run(chaos.publish_events(url, events, rate=rate, progress=self.progress))
            except BaseException as exc:
                self.error = exc

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def join(self, timeout: float = 120) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "publisher did not finish"
        if self.error is not None:
            raise self.error


@pytest.fixture
def publisher():
    return Publisher
