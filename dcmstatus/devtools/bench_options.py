"""The options of `dcmstatus bench`, apart from the benchmark itself so that
building the command line (`dcmstatus --help`) imports nothing heavy."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--events", type=int, default=200_000, help="backlog size [default 200000]")
    parser.add_argument("--instances", type=int, default=10_000, help="instances the events spread over [default 10000]")
    parser.add_argument("--duplicate-ratio", type=float, default=0.5, help="share of same-status re-publishes [default 0.5]")
    parser.add_argument("--reference-events", type=int, default=20_000, help="events for the reference design [default 20000]")
    parser.add_argument("--latency-rate", type=int, default=2000, help="offered events/s for the latency part [default 2000]")
    parser.add_argument("--latency-seconds", type=float, default=30, help="duration of the latency part [default 30]")
    parser.add_argument("--memory-events", type=int, default=1_000_000, help="backlog of the memory part [default 1000000]")
    parser.add_argument("--duplicate-events", type=int, default=50_000, help="events of each duplicate-cost drain [default 50000]")
    parser.add_argument("--writers", type=int, default=2, help="the service's --writers [default 2]")
    parser.add_argument("--batch-size", type=int, default=1000, help="the service's --batch-size [default 1000]")
    parser.add_argument("--nats-url", help="use this NATS server (default: start an embedded one)")
    parser.add_argument("--database-url", help="use this PostgreSQL server; the bench creates and drops its own databases")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
