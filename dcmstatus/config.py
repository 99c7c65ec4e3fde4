"""The options of `dcmstatus serve`: one declaration each, giving the flag,
the DCMSTATUS_* environment variable, the default and the help text, so the
command line, the environment and `--help` never disagree.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


def _opt(default: Any, help: str, *, type: Any = None, secret: bool = False, choices: tuple[str, ...] | None = None) -> Any:
    return field(
        default=default,
        metadata={"help": help, "type": type, "secret": secret, "choices": choices},
    )


@dataclass(frozen=True)
class ServeConfig:
    nats_url: str | None = _opt(None, "NATS server URL; with neither URL given, an embedded nats-server is started", secret=True)
    database_url: str | None = _opt(
        None, "PostgreSQL URL (libpq); with neither URL given, an embedded PostgreSQL is started", secret=True
    )
    data_dir: Path = _opt(Path(".dcmstatus"), "where embedded servers keep their data and runtime.json is written", type=Path)
    http_host: str = _opt("127.0.0.1", "address the HTTP API listens on")
    http_port: int = _opt(8080, "port the HTTP API listens on (0 picks a free one)", type=int)
    nats_port: int = _opt(4222, "preferred port of the embedded nats-server (a free one is used if taken)", type=int)
    stream: str = _opt("dcm-status", "JetStream stream (created when missing, used as it is otherwise)")
    subjects: str = _opt("dcm.*", "subject filter of the stream and the consumer")
    durable: str = _opt("dcmstatus", "durable consumer name, shared by replicas")
    writers: int = _opt(2, "parallel database writers (one connection each)", type=int)
    batch_size: int = _opt(1000, "messages per database transaction at most", type=int)
    batch_delay_ms: float = _opt(20.0, "longest wait for a batch to fill before it is written", type=float)
    max_in_flight: int = _opt(10_000, "messages received but not yet acknowledged, at most", type=int)
    ack_wait: float = _opt(30.0, "seconds before NATS redelivers an unacknowledged message", type=float)
    max_event_bytes: int = _opt(262_144, "larger events are rejected as too_large", type=int)
    dead_letter_limit: int = _opt(10_000, "rejected events kept in the dead-letter table (newest)", type=int)
    grace_period: float = _opt(10.0, "seconds to commit and ack in-flight work on SIGTERM/SIGINT", type=float)
    log_level: str = _opt("INFO", "DEBUG, INFO, WARNING or ERROR", choices=("DEBUG", "INFO", "WARNING", "ERROR"))

    @property
    def embedded(self) -> bool:
        return self.nats_url is None and self.database_url is None

    def validate(self) -> None:
        """Raise ValueError naming the option and what to do."""
        if (self.nats_url is None) != (self.database_url is None):
            given, missing = ("--nats-url", "--database-url") if self.nats_url else ("--database-url", "--nats-url")
            raise ValueError(
                f"{given} is set but {missing} is not: give both to use running servers, "
                "or neither to start the embedded ones"
            )
        for name in ("writers", "batch_size", "max_in_flight", "max_event_bytes", "dead_letter_limit"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_in_flight < self.batch_size:
            raise ValueError("--max-in-flight must be at least --batch-size, or batches never fill")
        if not 0 <= self.http_port <= 65535:
            raise ValueError("--http-port must be between 0 and 65535")
        for name in ("batch_delay_ms", "ack_wait", "grace_period"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")

    def redacted(self) -> dict[str, Any]:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata["secret"] and value:
                value = _redact_url(str(value))
            out[f.name] = str(value) if isinstance(value, Path) else value
        return out


def env_name(option: str) -> str:
    return "DCMSTATUS_" + option.upper()


def add_serve_options(parser: argparse.ArgumentParser, env: dict[str, str] | None = None) -> None:
    """Flags for every ServeConfig field; defaults come from the environment."""
    env = os.environ if env is None else env
    for f in fields(ServeConfig):
        var = env_name(f.name)
        convert = f.metadata["type"] or str
        default = f.default
        if var in env:
            default = _convert(convert, env[var], var)
        shown = "(none)" if f.default is None else f.default
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=convert,
            default=default,
            choices=f.metadata["choices"],
            metavar=f.name.upper() if not f.metadata["choices"] else None,
            help=f"{f.metadata['help']} [env {var}; default {shown}]",
        )


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    return ServeConfig(**{f.name: getattr(args, f.name) for f in fields(ServeConfig)})


def _convert(convert: Any, raw: str, var: str) -> Any:
    try:
        return convert(raw)
    except ValueError:
        raise SystemExit(f"dcmstatus: {var}={raw!r} is not a valid {convert.__name__}; fix or unset it") from None


def _redact_url(url: str) -> str:
    """Hide a password in scheme://user:password@host URLs."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    userinfo, _, host = rest.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in userinfo else url
