"""The options of `dcmstatus bench`, apart from the benchmark itself so that
building the command line (`dcmstatus --help`) imports nothing heavy."""

from __future__ import annotations

import argparse

# The parts, in the order they run (docs/performance.md#parts).
PARTS = ("drain", "feed", "scale", "ceilings", "reference", "latency", "memory", "duplicates", "api")


def _parts(text: str) -> tuple[str, ...]:
    names = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [p for p in names if p not in PARTS and p != "all"]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown part(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(PARTS)} or all")
    return PARTS if "all" in names else tuple(p for p in PARTS if p in names)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--parts", type=_parts, default=PARTS, metavar="LIST",
        help=f"comma-separated parts to run: {', '.join(PARTS)} [default all]",
    )  # fmt: skip
    parser.add_argument("--events", type=int, default=200_000, help="backlog of each drain [default 200000]")
    parser.add_argument("--instances", type=int, default=10_000, help="instances the events spread over [default 10000]")
    parser.add_argument(
        "--instances-large", type=int, default=100_000,
        help="instances of the scale drain and of the API parts' table [default 100000]",
    )  # fmt: skip
    parser.add_argument("--duplicate-ratio", type=float, default=0.5, help="share of same-status re-publishes [default 0.5]")
    parser.add_argument("--reference-events", type=int, default=10_000, help="events for the reference design [default 10000]")
    parser.add_argument("--latency-rate", type=int, default=5000, help="offered events/s for the latency part [default 5000]")
    parser.add_argument("--latency-seconds", type=float, default=20, help="duration of the latency part [default 20]")
    parser.add_argument("--memory-events", type=int, default=1_000_000, help="backlog of the memory part [default 1000000]")
    parser.add_argument("--duplicate-events", type=int, default=50_000, help="events of each duplicate-cost drain [default 50000]")
    parser.add_argument(
        "--feed-repeat", type=int, default=1, metavar="N",
        help="run the feed-on/feed-off drains N times, alternating, and report the median feed cost [default 1]",
    )  # fmt: skip
    parser.add_argument("--api-clients", type=int, default=32, help="keep-alive HTTP clients of the API parts [default 32]")
    parser.add_argument("--api-seconds", type=float, default=8, help="duration of each quiet API load [default 8]")
    parser.add_argument(
        "--publish-window", type=int, default=2000,
        help="JetStream publishes awaiting their ack at most while the bench fills a stream [default 2000]",
    )  # fmt: skip
    parser.add_argument("--writers", type=int, default=2, help="the service's --writers [default 2]")
    parser.add_argument("--batch-size", type=int, default=1000, help="the service's --batch-size [default 1000]")
    parser.add_argument("--nats-url", help="use this NATS server (default: start an embedded one)")
    parser.add_argument("--database-url", help="use this PostgreSQL server; the bench creates and drops its own databases")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
