"""The `dcmstatus` command: argument parsing, logging set-up and turning
failures into one clear line and an exit code. The work lives elsewhere.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from dcmstatus import __version__
from dcmstatus.cli.client import ApiClient
from dcmstatus.cli.tables import footer, instance_details, short, table
from dcmstatus.config import (
    CONFIG_ENV,
    NATS_OPTIONS,
    ConfigError,
    add_serve_options,
    env_name,
    load_config,
    render_toml,
    runtime_value,
)
from dcmstatus.core.errors import ApiError, UsageError
from dcmstatus.core.model import REJECTION_REASONS

_DESCRIPTION = """\
dcmstatus keeps the status of DCM service-type instances in PostgreSQL current
from the CloudEvents that service providers publish on NATS (subjects dcm.*).

Quick start (embedded servers, nothing else to install):
  dcmstatus serve                       # starts nats-server + PostgreSQL under ./.dcmstatus
  curl -X POST localhost:8080/api/v1/service-type-instances?id=vm1 \\
       -H 'content-type: application/json' -d '{"service_type":"vm","spec":{}}'
  dcmstatus publish --service-type vm --instance vm1 --status RUNNING
  curl localhost:8080/api/v1/service-type-instances/vm1

Every serve option can also be set with an environment variable DCMSTATUS_<OPTION>
or in a TOML file given with --config (precedence: flag > environment > file >
default); `dcmstatus config` shows the effective configuration.

Terminal clients of a running service's HTTP API:
  dcmstatus instances list --service-type vm
  dcmstatus instances get vm1
  dcmstatus rejected --reason unknown_status
  dcmstatus watch --service-type vm
"""


_SERVE_ROLES = """\
roles (--role, docs/operations.md#roles):
  all       one process runs both halves (the default; embedded servers work)
  consumer  intake from NATS, the writers and the change relay; HTTP serves only
            /api/v1/health and /metrics (other paths: 404 naming the role)
  api       the HTTP API, watch streams and dashboard, from PostgreSQL and its
            LISTEN/NOTIFY; never connects to NATS (--nats-url not needed)
  Scale each on its own, all on the same servers and durable, e.g.
    dcmstatus serve --role consumer --nats-url nats://n1:4222 --database-url postgresql://db/dcm
    dcmstatus serve --role api --database-url postgresql://db/dcm --http-host 0.0.0.0
  An option only the other role uses is ignored with a warning, so both roles
  can share one config file.
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
    except UsageError as exc:
        print(f"dcmstatus {args.command}: {exc}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dcmstatus", description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"dcmstatus {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    # allow_abbrev=False: "--api-token" must not quietly mean --api-token-file.
    serve = commands.add_parser(
        "serve",
        allow_abbrev=False,
        help="run the service",
        description="Consume status events from NATS JetStream and keep PostgreSQL current; serve the HTTP API.\n"
        "With neither --nats-url nor --database-url it starts embedded servers.",
        epilog=_SERVE_ROLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_serve_options(serve)
    serve.set_defaults(run=_serve)

    config = commands.add_parser(
        "config",
        allow_abbrev=False,
        help="print the effective configuration of serve (secrets redacted)",
        description="Resolve the serve options exactly as `dcmstatus serve` would (flag > environment > "
        f"--config file > default) and print them as TOML, each with where it came from, secrets "
        f"redacted. The output is itself a valid config file. Takes every serve option; {CONFIG_ENV} names "
        "a config file too.",
    )
    add_serve_options(config)
    config.add_argument("--json", action="store_true", help="print JSON instead of TOML")
    config.set_defaults(run=_config)

    instances = commands.add_parser(
        "instances",
        help="list or show service-type instances (talks to the HTTP API)",
        description="Read service-type instances from a running service's HTTP API.",
    )
    instance_commands = instances.add_subparsers(dest="action", metavar="ACTION")
    listing = instance_commands.add_parser(
        "list", help="list instances (default)", description="List instances in id order, following pages."
    )
    listing.add_argument("--service-type", help="only this service type")
    listing.add_argument("--status", help="only this status (case-insensitive)")
    listing.add_argument("--provider", help="only this provider name")
    _add_api_client_options(listing)
    get = instance_commands.add_parser("get", help="show one instance", description="Show one instance.")
    get.add_argument("id", help="instance id")
    _add_api_client_options(get, limit=False)
    _add_api_client_options(instances)
    instances.set_defaults(run=_instances, action=None)

    rejected = commands.add_parser(
        "rejected",
        help="list rejected events, newest first (talks to the HTTP API)",
        description="List dead letters (events that will never be applied, and why), newest first.",
    )
    rejected.add_argument(
        "--reason",
        choices=REJECTION_REASONS,
        metavar="REASON",
        help="only this reason: " + ", ".join(REJECTION_REASONS),
    )
    _add_api_client_options(rejected)
    rejected.set_defaults(run=_rejected)

    watch = commands.add_parser(
        "watch",
        help="follow status changes live (talks to the HTTP API)",
        description="Print each status change as it is committed (the event stream of /api/v1/status-changes): "
        "time, instance, type, previous -> new status, message. Reconnects after a dropped connection and "
        "resumes from the last change received, without gaps or repeats. Ctrl-C stops it.",
    )
    watch.add_argument("--service-type", help="only this service type")
    watch.add_argument("--instance", help="only this instance id")
    watch.add_argument(
        "--after",
        type=_change_id,
        metavar="CHANGE_ID",
        help="start after this change id (0: every retained change) [default: changes from now on]",
    )
    _add_api_client_options(watch, limit=False)
    watch.set_defaults(run=_watch)

    publish = commands.add_parser(
        "publish",
        allow_abbrev=False,
        help="publish one status event, as a service provider does",
        description="Publish one CloudEvent (structured mode) on dcm.<service-type>, like a service provider.",
    )
    publish.add_argument("--service-type", required=True, help="e.g. vm, container, cluster (the subject is dcm.<type>)")
    publish.add_argument("--instance", required=True, help="instance id (sent as data.id)")
    publish.add_argument("--status", required=True, help="e.g. RUNNING; aliases such as Running or READY work")
    publish.add_argument("--message", help="status message (data.message)")
    publish.add_argument("--source", default=None, help="CloudEvent source [default dcm/providers/dcmstatus-cli]")
    publish.add_argument("--time", type=_rfc3339, help="event time, RFC 3339 with offset [default now]")
    # The serve options of the NATS connection, declared once in config.py.
    add_serve_options(
        publish,
        only=NATS_OPTIONS,
        help={
            "nats_url": "NATS URL; with none given, the running embedded server's from <data-dir>/runtime.json",
            "data_dir": "where a running serve wrote runtime.json",
        },
    )
    publish.set_defaults(run=_publish)

    bench = commands.add_parser(
        "bench",
        help="measure throughput, latency and memory against the limits of this machine",
        description="Run the benchmark (see docs/performance.md): backlog drains (change feed on and off, "
        "10k and 100k instances), consume-only and write-only ceilings, the one-UPDATE-per-event reference "
        "design, latency at a fixed rate (committed, SSE, NATS change), peak memory, what a duplicate costs, "
        "and the HTTP API quiet and against a drain, each with the CPU per event of the service, nats-server "
        "and PostgreSQL; prints a table and the targets (or --json). Starts its own servers unless given URLs.",
    )
    from dcmstatus.devtools.bench_options import add_arguments as add_bench_arguments

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


def _setup_logging(level: str, fmt: str = "text") -> None:
    from dcmstatus.engine.logs import setup_logging

    setup_logging(level, fmt)


def _load_config(args: argparse.Namespace, only: tuple[str, ...] | None = None) -> tuple[Any, dict[str, str]]:
    try:
        return load_config(args, only=only)
    except ConfigError as exc:
        raise UsageError(exc) from None


def _serve(args: argparse.Namespace) -> int:
    config, sources = _load_config(args)
    _setup_logging(config.log_level, config.log_format)
    if unused := config.unused_options(sources):
        logging.getLogger("dcmstatus").warning(
            "--role %s does not use %s: ignored (docs/operations.md#roles)", config.role, ", ".join(unused)
        )
    import trio

    from dcmstatus.service import serve

    try:
        return trio.run(serve, config, config.catalog())
    except ConfigError as exc:  # found at start-up (e.g. an unreadable page token secret)
        raise UsageError(exc) from None
    except Exception as exc:  # one readable line; the traceback is in the DEBUG log
        logging.getLogger("dcmstatus").debug("serve failed", exc_info=True)
        leaves = _leaves(exc)
        if all(isinstance(e, ConfigError) for e in leaves):  # found only once serving began
            for e in leaves:
                print(f"dcmstatus serve: {e}", file=sys.stderr)
            return 2
        causes = "; ".join(f"{type(e).__name__}: {e}" for e in leaves)
        print(f"dcmstatus serve: stopped by an error: {causes}\n"
              "Run with --log-level DEBUG for the traceback.", file=sys.stderr)
        return 1


def _leaves(exc: BaseException) -> list[BaseException]:
    """The real errors inside (nested) exception groups."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _publish(args: argparse.Namespace) -> int:
    from dcmstatus.cli.publish import DEFAULT_SOURCE, PublishError, build_event, nats_url_from_runtime, publish

    config, _ = _load_config(args, only=NATS_OPTIONS)
    try:
        url = config.nats_url or nats_url_from_runtime(config.data_dir)
        body = build_event(args.service_type, args.instance, args.status, args.message, args.source or DEFAULT_SOURCE, args.time)
        subject = f"dcm.{args.service_type}"
        seq = publish(url, subject, body, config.nats_security())
    except PublishError as exc:
        raise UsageError(exc) from None
    print(f"published {args.status} for {args.service_type} instance {args.instance} on {subject} (stream sequence {seq})")
    return 0


def _bench(args: argparse.Namespace) -> int:
    _setup_logging("WARNING")
    from dcmstatus.devtools.bench import run

    return run(args)


def _config(args: argparse.Namespace) -> int:
    config, sources = _load_config(args)
    if args.json:
        out = {**config.redacted(), "service_types": config.catalog().to_mapping()}
        print(json.dumps(out, indent=2))
    else:
        print(render_toml(config, sources), end="")
    return 0


# --- terminal clients of the HTTP API -------------------------------------------


def _add_api_client_options(parser: argparse.ArgumentParser, *, limit: bool = True) -> None:
    url_var, token_var, token_file_var = env_name("api_url"), env_name("api_token"), env_name("api_token_file")
    data_var = env_name("data_dir")
    parser.add_argument(
        "--api-url",
        default=argparse.SUPPRESS,
        help=f"base URL of the service, e.g. http://127.0.0.1:8080 [env {url_var}; "
        "default: http_url from <data-dir>/runtime.json of a running serve]",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=argparse.SUPPRESS,
        help=f"where a running serve wrote runtime.json [env {data_var}; default .dcmstatus]",
    )
    parser.add_argument(
        "--api-token-file",
        type=Path,
        default=argparse.SUPPRESS,
        help=f"file holding the API token, when the service has one [env {token_file_var}; "
        f"or the token itself in {token_var}]",
    )
    parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print the API's JSON instead of a table")
    if limit:
        parser.add_argument(
            "--limit",
            type=_positive_int,
            default=argparse.SUPPRESS,
            help="show at most this many rows, following pages [default 100]",
        )


def _change_id(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a change id (a non-negative integer)")
    return int(text)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def _run_client(args: argparse.Namespace, body: Any) -> int:
    try:
        return body(ApiClient(args))
    except ApiError as exc:
        print(f"dcmstatus {args.command}: {exc}", file=sys.stderr)
        return 1


def _instances(args: argparse.Namespace) -> int:
    as_json = getattr(args, "json", False)

    def run(client: ApiClient) -> int:
        from urllib.parse import quote

        if args.action == "get":
            instance = client.get(f"/api/v1/service-type-instances/{quote(args.id, safe='')}")
            print(json.dumps(instance, indent=2) if as_json else instance_details(instance))
            return 0
        query = {
            "service_type": getattr(args, "service_type", None),
            "status": getattr(args, "status", None),
            "provider_name": getattr(args, "provider", None),
        }
        limit = getattr(args, "limit", 100)
        items, more = client.pages("/api/v1/service-type-instances", "instances", query, limit)
        if as_json:
            print(json.dumps(items, indent=2))
            return 0
        rows = [
            (i["id"], i["service_type"], i["status"], i["provider_name"], i["status_time"] or "-", short(i["status_message"]))
            for i in items
        ]
        print(table(("ID", "TYPE", "STATUS", "PROVIDER", "STATUS TIME", "MESSAGE"), rows), end="")
        footer(len(items), more, "instance", "instances")
        return 0

    return _run_client(args, run)


def _rejected(args: argparse.Namespace) -> int:
    as_json = getattr(args, "json", False)

    def run(client: ApiClient) -> int:
        items, more = client.pages(
            "/api/v1/rejected-events", "rejected_events", {"reason": args.reason}, getattr(args, "limit", 100)
        )
        if as_json:
            print(json.dumps(items, indent=2))
            return 0
        rows = [
            (str(e["id"]), e["receive_time"], e["reason"], e["subject"], str(e["stream_seq"]),
             e["instance_id"] or "-", short(e["detail"]))
            for e in items
        ]
        print(table(("ID", "RECEIVED", "REASON", "SUBJECT", "SEQ", "INSTANCE", "DETAIL"), rows), end="")
        footer(len(items), more, "rejected event", "rejected events")
        return 0

    return _run_client(args, run)


def _watch(args: argparse.Namespace) -> int:
    from dcmstatus.cli.watch import follow

    def run(client: ApiClient) -> int:
        query = {"service_type": args.service_type, "instance_id": args.instance}
        try:
            follow(client, query, args.after, as_json=getattr(args, "json", False))
        except KeyboardInterrupt:
            pass  # Ctrl-C is how a watch ends
        return 0

    return _run_client(args, run)


def _migrate(args: argparse.Namespace) -> int:
    _setup_logging("INFO")
    from dcmstatus.adapters.postgres.schema import migrate

    url = args.database_url or runtime_value(args.data_dir, "database_url")
    try:
        if url:
            applied = migrate(url)
        else:
            from dcmstatus.devtools.embedded import EmbeddedPostgres

            args.data_dir.mkdir(parents=True, exist_ok=True)
            with EmbeddedPostgres(args.data_dir.resolve()) as postgres:
                applied = migrate(postgres.url)
    except Exception as exc:
        raise UsageError(f"migration failed: {exc}") from None
    print(f"applied {', '.join(applied)}" if applied else "schema is already current")
    return 0




if __name__ == "__main__":
    sys.exit(main())
