"""A short chaos run (scripts/chaos.py) as part of the suite: a workload with
reordering, duplicates and bad events, under random kills and restarts of the
service, nats-server and PostgreSQL; it must end with lost = wrong = 0."""

import io
import re

import chaos
import pytest


def _passing_run(args) -> str:
    """Run chaos with `args`; its report, after checking it passed with
    nothing lost and nothing wrong."""
    out = io.StringIO()
    code = chaos.run_chaos(args, out=out)
    report = out.getvalue()
    print(report)
    assert code == 0, report
    assert re.search(r"^lost +0$", report, re.M) and re.search(r"^wrong +0$", report, re.M)
    return report


def test_short_chaos_run(tmp_path):
    args = chaos.parse_args([
        "--instances", "100", "--events", "20", "--faults", "5", "--rate", "800",
        "--min-interval", "0.3", "--max-interval", "1.5", "--seed", "20260409",
        "--timeout", "120", "--workdir", str(tmp_path),
    ])  # fmt: skip
    report = _passing_run(args)
    assert re.search(r"^faults injected +5:", report, re.M)


@pytest.mark.cluster
def test_short_chaos_run_on_clustered_servers(tmp_path):
    """The same proof on a 3-node NATS cluster (stream R3) and a PostgreSQL
    primary with a synchronous standby, with 3 replicas of the service and
    one fault of every kind, the node kills and the failover included."""
    args = chaos.parse_args([
        "--nats-cluster", "3", "--pg-standby", "--replicas", "3",
        "--instances", "100", "--events", "30", "--faults-per-kind", "1", "--rate", "300",
        "--min-interval", "0.3", "--max-interval", "1.0", "--seed", "20261201",
        "--timeout", "180", "--workdir", str(tmp_path),
    ])  # fmt: skip
    report = _passing_run(args)
    assert re.search(r"^faults injected +8:", report, re.M)
    for kind in chaos.ALL_FAULT_KINDS:
        assert re.search(rf"\b{kind}=1\b", report), kind
    assert "NATS cluster of 3 (stream R3)" in report and "synchronous standby (1 failovers)" in report
