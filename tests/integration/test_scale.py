"""scripts/scale.py (docs/performance.md#replicas) pointed at given servers, as
at a cluster: each replica count drains the whole backlog on one durable,
and every row ends correct. (Whether they share it is the figures' business:
with a backlog this small, the replica whose pull requests reach the paused
durable first may take it all.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "scale.py"


def test_scale_drains_with_one_and_two_replicas_on_given_servers(nats_url, pg_server_url):
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--nats-url", nats_url, "--database-url", pg_server_url,
         "--events", "4000", "--instances", "500", "--replicas", "1,2", "--repeat", "1", "--json"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    drains = json.loads(done.stdout)["drains"]
    assert [d["replicas"] for d in drains] == [1, 2]
    for d in drains:
        assert d["correct"] and d["events"] == 4000
        assert len(d["shares"]) == d["replicas"]
        assert sum(d["shares"]) >= 4000, d  # every message received (a redelivery may add some)
        # Given servers are not ours to measure.
        assert d["nats_cpu"] is None and d["own_cores"] is None
