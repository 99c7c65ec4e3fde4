"""A smoke run of the benchmark at tiny sizes: every part runs, every result
is correct, and the JSON has the structure its readers rely on (every part
present, each CPU figure a number or an explained absence, every target).
Structure and correctness only: timings on shared machines are not asserted."""

import json
import subprocess
import sys

import pytest

from dcmstatus.devtools.bench_options import PARTS

# Every part key the default run reports (docs/performance.md#parts).
PART_KEYS = {
    "drain", "drain_feed_off", "drain_large", "consume_only", "write_only", "reference", "latency", "memory",
    "duplicates_changes", "duplicates_republishes", "api_get", "api_health", "api_drain_quiet", "api_drain_loaded",
}  # fmt: skip
TINY = [
    "--events", "3000", "--instances", "300", "--instances-large", "1000", "--reference-events", "300",
    "--latency-rate", "200", "--latency-seconds", "2", "--memory-events", "3000", "--duplicate-events", "1000",
    "--api-seconds", "1", "--api-clients", "4", "--feed-repeat", "2",
]  # fmt: skip


def _bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dcmstatus", "bench", *args], capture_output=True, text=True, timeout=300
    )


def _check_cpu(part: dict) -> None:
    cpu = part["cpu"]
    assert cpu["per"] in ("event", "request"), part["key"]
    for component in ("service", "nats", "postgres"):
        value = cpu[f"{component}_us"]
        if value is None:
            # An absent figure says why.
            assert cpu["missing"][component], (part["key"], component)
        else:
            assert isinstance(value, (int, float)) and value >= 0, (part["key"], component, value)
    if cpu["per"] == "event" and cpu["nats_us"] and cpu["postgres_us"]:
        assert cpu["zero_cost_limit_per_s"] > 0


def test_bench_smoke_run_reports_every_part_with_its_cpu_split(pg_server_url, nats_url):
    out = _bench("--json", *TINY, "--nats-url", nats_url, "--database-url", pg_server_url)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    parts = {p["key"]: p for p in report["parts"]}
    assert set(parts) == PART_KEYS, sorted(parts)
    for part in parts.values():
        assert part["error"] is None, (part["key"], part["error"])
        assert part["rate"] > 0 and part["events"] > 0, part["key"]
        _check_cpu(part)
        if "correct" in part["notes"]:
            assert part["notes"]["correct"] is True, part["key"]
    # The servers the fixtures started run as this user: their CPU is visible.
    drain = parts["drain"]["cpu"]
    assert drain["nats_us"] is not None and drain["postgres_us"] is not None and drain["service_us"] is not None

    latency = parts["latency"]["notes"]
    for receiver in ("committed", "sse", "nats_change"):
        assert latency[receiver]["missing"] == 0, (receiver, latency[receiver])
        assert latency[receiver]["p99_ms"] is not None
    assert "feed_caught_up_s" in parts["drain"]["notes"] and "outbox_at_drain_end" not in parts["drain_feed_off"]["notes"]
    loaded = parts["api_drain_loaded"]["notes"]
    assert loaded["api"]["requests"] > 0 and loaded["api_timeouts_during_drain"] == 0
    assert parts["api_get"]["notes"]["statuses"] == {"200": parts["api_get"]["events"]}

    pairs = parts["drain_feed_off"]["notes"]["pairs"]  # --feed-repeat 2: two alternating on/off pairs
    assert len(pairs) == 2 and all(isinstance(x["cpu_cost"], float) for x in pairs), pairs

    targets = {t["name"]: t for t in report["targets"]}
    assert len(targets) >= 17
    assert any("median of 2 alternating pairs" in name for name in targets)
    for t in targets.values():
        # Every target has a value from this run (all parts ran), or says why not.
        assert t["value"] is not None or t["why"], t
    summary = report["summary"]
    assert summary["correct"] is True and summary["failed_parts"] == []


def test_bench_table_prints_and_a_part_that_cannot_run_is_a_row_with_its_reason(pg_server_url, nats_url, tmp_path):
    # A --database-url that refuses: every part that needs PostgreSQL fails,
    # yet the table prints, each failed row says why, and the exit code says so.
    bad = pg_server_url.rsplit("/", 1)[0] + "/postgres?connect_timeout=2&user=no_such_user_bench"
    out = _bench(*TINY, "--parts", "drain,ceilings", "--nats-url", nats_url, "--database-url", bad)
    assert out.returncode == 3, (out.returncode, out.stderr[-3000:])
    assert "could not run:" in out.stdout, out.stdout
    assert "ceiling: consume only" in out.stdout  # the part without PostgreSQL still ran
    assert "postgres CPU not measured" in out.stdout
    assert "target (one run)" in out.stdout


@pytest.mark.parametrize("bad", ["nope", "drain,nope", ""])
def test_bench_refuses_an_unknown_part(bad):
    out = _bench("--parts", bad)
    assert out.returncode == 2 and "unknown part" in out.stderr, out.stderr
    assert PARTS[0] in out.stderr


def test_stream_filler_stores_every_event_once_even_when_publishes_are_refused_at_first(nats_url):
    # The bench's backlogs go through StreamFiller. Until the stream exists
    # every publish is refused (no responders); the filler re-sends them, and
    # once the stream is there each event is stored exactly once. The old
    # core-NATS publishing would have "succeeded" with nothing stored.
    import asyncio

    import nats

    from dcmstatus.devtools.bench import StreamFiller

    n = 5000

    async def scenario() -> tuple[int, int, list[bytes]]:
        nc = await nats.connect(nats_url)
        js = nc.jetstream()
        try:
            await js.delete_stream("bench-filler-test")
        except nats.js.errors.NotFoundError:
            pass
        filler = await StreamFiller(nc, window=500).start()

        async def create_stream_late() -> None:
            await asyncio.sleep(0.5)
            await js.add_stream(name="bench-filler-test", subjects=["benchfill.*"])

        creating = asyncio.create_task(create_stream_late())
        for i in range(n):
            await filler.publish("benchfill.x", b"%d" % i)
        await filler.finish(timeout=60)
        await creating
        stored = (await js.stream_info("bench-filler-test")).state.messages
        sub = await js.pull_subscribe("benchfill.x", durable="check", stream="bench-filler-test")
        bodies: list[bytes] = []
        while len(bodies) < stored:
            for m in await sub.fetch(500, timeout=5):
                bodies.append(m.data)
                await m.ack()  # within the consumer's ack-pending limit
        await js.delete_stream("bench-filler-test")
        await nc.close()
        return stored, filler.resent, bodies

    stored, resent, bodies = asyncio.run(scenario())
    assert stored == n
    assert sorted(bodies) == sorted(b"%d" % i for i in range(n))  # each once
    assert resent > 0  # the refusals happened, and were re-sent
