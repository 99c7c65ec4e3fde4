"""A smoke run of the benchmark: every part runs and every result is correct.
Correctness only: timings on shared machines are not asserted."""

import json
import subprocess
import sys


def test_bench_smoke_run_prints_all_parts_and_is_correct(pg_server_url, nats_url):
    out = subprocess.run(
        [sys.executable, "-m", "dcmstatus", "bench", "--json",
         "--events", "3000", "--instances", "300", "--reference-events", "300",
         "--latency-rate", "200", "--latency-seconds", "2", "--memory-events", "3000",
         "--duplicate-events", "1000", "--nats-url", nats_url, "--database-url", pg_server_url],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    names = [p["name"] for p in report["parts"]]
    for expected in ("backlog drain", "consume only", "write only", "reference", "latency", "memory", "duplicate cost"):
        assert any(expected in n for n in names), (expected, names)
    assert all(p["rate"] > 0 for p in report["parts"])
    assert report["summary"]["correct"] is True
    latency = next(p for p in report["parts"] if p["name"].startswith("latency"))
    assert latency["notes"]["missing"] == 0
    assert all(p["notes"]["correct"] for p in report["parts"] if "correct" in p["notes"])
