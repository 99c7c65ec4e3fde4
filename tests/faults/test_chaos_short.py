"""A short chaos run (scripts/chaos.py) as part of the suite: a workload with
reordering, duplicates and bad events, under random kills and restarts of the
service, nats-server and PostgreSQL; it must end with lost = wrong = 0."""

import io
import re

import chaos


def test_short_chaos_run(tmp_path):
    args = chaos.parse_args([
        "--instances", "100", "--events", "20", "--faults", "5", "--rate", "800",
        "--min-interval", "0.3", "--max-interval", "1.5", "--seed", "20260409",
        "--timeout", "120", "--workdir", str(tmp_path),
    ])  # fmt: skip
    out = io.StringIO()
    code = chaos.run_chaos(args, out=out)
    report = out.getvalue()
    print(report)
    assert code == 0, report
    assert re.search(r"^lost +0$", report, re.M) and re.search(r"^wrong +0$", report, re.M)
    assert re.search(r"^faults injected +5:", report, re.M)
