"""The options of `dcmstatus serve`: one declaration each, giving the flag,
the DCMSTATUS_* environment variable, the TOML key, the default and the help
text, so the command line, the environment, the config file and `--help`
never disagree.

Precedence: flag > environment > config file (`--config`) > default. A config
file is TOML with the options as top-level keys (`http_port = 8080`) and,
optionally, `[service_types.<name>]` tables (`statuses`, `aliases`) merged
into the contract's catalog. Unknown keys are an error naming the key.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import ssl
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dcmstatus.core.catalog import Catalog
from dcmstatus.core.changes import subjects_overlap, valid_prefix
from dcmstatus.core.decoding import MAX_CLOCK_SKEW
from dcmstatus.core.errors import ConfigError
from dcmstatus.core.redaction import REDACTED, redact_url

if TYPE_CHECKING:
    from dcmstatus.adapters.nats.connection import NatsSecurity

__all__ = [
    "CONFIG_ENV",
    "NATS_OPTIONS",
    "ConfigError",
    "ServeConfig",
    "add_serve_options",
    "config_from_args",
    "env_name",
    "load_config",
    "render_toml",
]

CONFIG_ENV = "DCMSTATUS_CONFIG"
# A shorter page token secret could be guessed from the tokens a client sees.
MIN_SECRET_CHARS = 16
# The durable consumers of DCM's own components (docs/dcm.md#durables).
DCM_DURABLES = frozenset({"control-plane", "service-provider-manager", "placement-manager"})
# The roles of `dcmstatus serve` (docs/operations.md#roles): which of its two
# halves each runs. "consumer": intake from NATS, the writers, the change relay
# and the outbox's housekeeping; "api": the HTTP API, watch streams and dashboard.
ROLES = ("all", "consumer", "api")
RUN_BY = {"consumer": ("all", "consumer"), "api": ("all", "api")}


def _opt(
    default: Any,
    help: str,
    *,
    type: Any = None,
    secret: bool = False,
    choices: tuple[str, ...] | None = None,
    flag: bool = True,
    file: bool = True,
    role: str | None = None,
) -> Any:
    # `role`: the one serve role that uses the option ("consumer" or "api"),
    # None when every role does (docs/operations.md#roles).
    assert role in (None, *RUN_BY)
    return field(
        default=default,
        metadata={
            "help": help, "type": type, "secret": secret, "choices": choices, "flag": flag, "file": file, "role": role,
        },
    )


def _upper(text: str) -> str:
    return text.upper()


def _lower(text: str) -> str:
    return text.lower()


@dataclass(frozen=True)
class ServeConfig:
    role: str = _opt(
        "all",
        "what this replica runs: all (one process: intake and the HTTP API), consumer (intake from NATS, the "
        "writers and the change relay; HTTP serves only health and /metrics) or api (the HTTP API, watch "
        "streams and dashboard, from PostgreSQL alone; no NATS). Scale each role on its own; consumer and api "
        "need external servers (--nats-url, --database-url)",
        type=_lower,
        choices=ROLES,
    )
    nats_url: str | None = _opt(None, "NATS server URL; with neither URL given, an embedded nats-server is started", secret=True, role="consumer")
    # Credentials and TLS for an external NATS (docs/security.md). Secrets
    # themselves come from files or the environment: never a flag (the
    # process list shows flags to every local user) nor the config file.
    nats_creds: Path | None = _opt(None, "NATS credentials file (user JWT and nkey seed, as nsc writes it)", type=Path, role="consumer")
    nats_nkey_seed: Path | None = _opt(None, "file holding the NATS user's nkey seed (SU...)", type=Path, role="consumer")
    nats_user: str | None = _opt(None, "NATS user name (the password from --nats-password-file or DCMSTATUS_NATS_PASSWORD)", role="consumer")
    nats_password_file: Path | None = _opt(None, "file holding the NATS user's password", type=Path, role="consumer")
    nats_password: str | None = _opt(
        None, "the NATS password itself (environment only)", secret=True, flag=False, file=False,
        role="consumer",
    )
    nats_token_file: Path | None = _opt(None, "file holding the NATS authentication token", type=Path, role="consumer")
    nats_token: str | None = _opt(None, "the NATS token itself (environment only)", secret=True, flag=False, file=False, role="consumer")
    nats_tls_ca: Path | None = _opt(
        None, "CA certificate(s), PEM, that verify the NATS server (else the system's); turns TLS on", type=Path,
        role="consumer",
    )
    nats_tls_cert: Path | None = _opt(None, "client certificate, PEM, for a NATS server that verifies clients; turns TLS on", type=Path, role="consumer")
    nats_tls_key: Path | None = _opt(None, "private key, PEM, of --nats-tls-cert (unless in that file)", type=Path, role="consumer")
    database_url: str | None = _opt(
        None, "PostgreSQL URL (libpq); with neither URL given, an embedded PostgreSQL is started", secret=True
    )
    data_dir: Path = _opt(Path(".dcmstatus"), "where embedded servers keep their data and runtime.json is written", type=Path)
    http_host: str = _opt("127.0.0.1", "address the HTTP API listens on")
    http_port: int = _opt(8080, "port the HTTP API listens on (0 picks a free one)", type=int)
    nats_port: int = _opt(4222, "preferred port of the embedded nats-server (a free one is used if taken)", type=int)
    stream: str = _opt(
        "dcm-status",
        "JetStream stream: a stream that already captures --subjects (whatever its name, e.g. the DCM control "
        "plane's) is used as it is; only when none does is this one created",
        role="consumer",
    )
    stream_max_age: float = _opt(
        7 * 24 * 3600.0, "retention (seconds) of a stream dcmstatus creates itself; 0 = unbounded", type=float,
        role="consumer",
    )
    stream_replicas: int | None = _opt(
        None,
        "replicas (1 to 5) of a stream dcmstatus creates itself; unset: 1 on a single NATS server, 3 when the "
        "server reports a cluster (docs/reliability.md#clustered-servers)",
        type=int,
        role="consumer",
    )
    subjects: str = _opt("dcm.*", "subject filter of the stream and the consumer", role="consumer")
    durable: str = _opt(
        "dcmstatus", "durable consumer name, shared by replicas; never one of DCM's own (control-plane, ...)",
        role="consumer",
    )
    parked_ttl: float = _opt(
        300.0, "seconds an event for a not-yet-existing instance waits for its row (parked events)", type=float,
        role="consumer",
    )
    parked_limit: int = _opt(100_000, "parked events kept at most (the oldest go first)", type=int, role="consumer")
    writers: int = _opt(2, "parallel database writers (one connection each)", type=int, role="consumer")
    batch_size: int = _opt(1000, "messages per database transaction at most", type=int, role="consumer")
    batch_delay_ms: float = _opt(
        5.0, "while every writer is busy, how often the filling batch looks again for a free one", type=float,
        role="consumer",
    )
    max_in_flight: int = _opt(10_000, "messages received but not yet acknowledged, at most", type=int, role="consumer")
    max_in_flight_bytes: int = _opt(
        64 * 1024 * 1024, "bytes of message bodies received but not yet acknowledged, at most", type=int,
        role="consumer",
    )
    ack_wait: float = _opt(30.0, "seconds before NATS redelivers an unacknowledged message", type=float, role="consumer")
    stall_timeout: float = _opt(
        30.0,
        "seconds without a message received or acknowledged, while the server holds a backlog or messages wait "
        "for their commit, before health reports the consumer stalled (503) and intake is started afresh",
        type=float,
        role="consumer",
    )
    no_change_events: bool = _opt(
        False,
        "publish no change events on NATS (the status_changes table is still written, and retention then "
        "prunes old rows whether published or not)",
        type=bool,
        role="consumer",
    )
    changes_subject_prefix: str = _opt(
        "dcmstatus.changes", "change events go to <prefix>.<service type>; never a subject --subjects captures",
        role="consumer",
    )
    changes_stream: str = _opt(
        "dcmstatus-changes",
        "JetStream stream of change events: used as it is when it exists, else created on <prefix>.> with "
        "--changes-retention as its max age",
        role="consumer",
    )
    changes_source: str = _opt("dcmstatus", "the CloudEvent source attribute of change events", role="consumer")
    changes_retention: float = _opt(
        7 * 24 * 3600.0,
        "seconds a status_changes row is kept; while change events are on, only published rows are pruned",
        type=float,
        role="consumer",
    )
    max_event_bytes: int = _opt(262_144, "larger events are rejected as too_large", type=int, role="consumer")
    max_clock_skew: float = _opt(
        300.0,
        "seconds an event time may be ahead of its JetStream message time; a later one is replaced by the "
        "message time (counted and logged), so a provider with a wrong clock cannot pin a status; also the "
        "margin of the predecessor guard (an event older than its row minus this is a no-op)",
        type=float,
        role="consumer",
    )
    dead_letter_limit: int = _opt(10_000, "rejected events kept in the dead-letter table (newest)", type=int, role="consumer")
    grace_period: float = _opt(10.0, "seconds to commit and ack in-flight work on SIGTERM/SIGINT", type=float, role="consumer")
    startup_timeout: float = _opt(
        120.0,
        "seconds to wait at start-up for PostgreSQL and NATS to be reachable, then exit 1 (0 waits forever)",
        type=float,
    )
    log_level: str = _opt("INFO", "DEBUG, INFO, WARNING or ERROR", type=_upper, choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    log_format: str = _opt("text", "text (human) or json (one object per line, event fields as keys)", type=_lower, choices=("text", "json"))
    max_request_bytes: int = _opt(1024 * 1024, "HTTP request bodies larger than this are refused with 413", type=int, role="api")
    max_watch_streams: int = _opt(
        100, "open watch streams (Server-Sent Events of /api/v1/status-changes) at most; beyond, 503", type=int,
        role="api",
    )
    max_waiting_requests: int = _opt(
        256,
        "API requests waiting for their turn at most (a few run at once, the rest wait); beyond, 503 with Retry-After",
        type=int,
    )
    api_token_file: Path | None = _opt(
        None,
        "file holding the API token: every /api/v1 route except health then needs 'Authorization: Bearer <token>'",
        type=Path,
        role="api",
    )
    # No flag on purpose: a token on the command line is visible to every
    # local user in the process list. Environment or config file only.
    api_token: str | None = _opt(
        None, "the API token itself (environment or config file only, never a flag)", secret=True, flag=False,
        role="api",
    )
    page_token_secret_file: Path | None = _opt(
        None,
        "file holding the secret that signs page tokens; replicas behind one URL need the same one "
        "(without it or the secret itself: <data-dir>/page-token.key, created on first start)",
        type=Path,
        role="api",
    )
    page_token_secret: str | None = _opt(
        None, "the page token secret itself (environment or config file only, never a flag)", secret=True, flag=False,
        role="api",
    )
    # `[service_types.<name>]` tables of the config file, merged into the
    # built-in catalog (docs/statuses.md); not a flag or environment variable.
    service_types: Mapping[str, Any] = field(default_factory=dict, metadata={"flag": False, "env": False})

    @property
    def embedded(self) -> bool:
        return self.nats_url is None and self.database_url is None

    def runs(self, half: str) -> bool:
        """Whether this replica runs `half` ("consumer" or "api")."""
        return self.role in RUN_BY[half]

    def unused_options(self, sources: Mapping[str, str]) -> list[str]:
        """The options set (not left to their default) that only the role
        this replica does not run would use, each with where it was set:
        `serve` warns about them and goes on, so that replicas of both roles
        can share one config file or ConfigMap (docs/operations.md#roles)."""
        unused = []
        for name, f in _OPTIONS.items():
            role = f.metadata.get("role")
            source = sources.get(name, "default")
            read_from_file = sources.get(f"{name}_file", "default") != "default"  # that option is named instead
            if role is not None and not self.runs(role) and source != "default" and not read_from_file:
                unused.append(f"{_label(name)} ({source})")
        return unused

    def catalog(self) -> Catalog:
        """The contract's catalog with this configuration's service types merged in."""
        return Catalog.default().merged(self.service_types)

    def nats_security(self) -> NatsSecurity:
        """Credentials and TLS of the NATS connection, as the adapter takes them."""
        from dcmstatus.adapters.nats.connection import NatsSecurity

        return NatsSecurity(
            creds=self.nats_creds,
            nkey_seed=self.nats_nkey_seed,
            user=self.nats_user,
            password=self.nats_password,
            token=self.nats_token,
            tls_ca=self.nats_tls_ca,
            tls_cert=self.nats_tls_cert,
            tls_key=self.nats_tls_key,
            tls_url=(self.nats_url or "").lower().startswith("tls://"),
        )

    def validate_nats(self) -> None:
        """The NATS connection options alone (what `dcmstatus publish` uses)."""
        given = [_label(name) for name in _NATS_SECURITY if getattr(self, name) is not None]
        if given and self.nats_url is None:
            raise ValueError(
                f"{given[0]} is for a NATS server given with --nats-url; "
                "the embedded nats-server uses the token it generates (in runtime.json)"
            )
        if (self.nats_user is None) != (self.nats_password is None):
            raise ValueError(
                "--nats-user needs a password (--nats-password-file or DCMSTATUS_NATS_PASSWORD)"
                if self.nats_user is not None
                else "a NATS password is set but --nats-user is not: give the user name too"
            )
        methods = [
            flag
            for flag, value in (
                ("--nats-creds", self.nats_creds),
                ("--nats-nkey-seed", self.nats_nkey_seed),
                ("--nats-user", self.nats_user),
                ("a NATS token", self.nats_token),
            )
            if value is not None
        ]
        if len(methods) > 1:
            raise ValueError(f"{' and '.join(methods)} are both set: NATS takes one way to authenticate, keep one")
        if self.nats_tls_key is not None and self.nats_tls_cert is None:
            raise ValueError("--nats-tls-key is set but --nats-tls-cert is not: give the client certificate too")

    def validate(self) -> None:
        """Raise ValueError naming the option and what to do."""
        self.validate_nats()
        if self.role != "all":
            # One replica of a role is half a service: the other half runs
            # elsewhere, on the same servers, which embedded ones never are.
            needed = ("--database-url",) if self.role == "api" else ("--nats-url", "--database-url")
            absent = [flag for flag in needed if getattr(self, flag[2:].replace("-", "_")) is None]
            if absent:
                raise ValueError(
                    f"--role {self.role} needs {' and '.join(absent)}: a role runs beside replicas of the "
                    "other role on the same servers, never on embedded ones (--role all runs both halves "
                    "in one process, embedded servers included)"
                )
        elif (self.nats_url is None) != (self.database_url is None):
            given, missing = ("--nats-url", "--database-url") if self.nats_url else ("--database-url", "--nats-url")
            raise ValueError(
                f"{given} is set but {missing} is not: give both to use running servers, "
                "or neither to start the embedded ones"
            )
        for name in (
            "writers", "batch_size", "max_in_flight", "max_in_flight_bytes", "max_event_bytes", "dead_letter_limit",
            "max_request_bytes", "parked_limit", "max_watch_streams", "max_waiting_requests",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_in_flight < self.batch_size:
            raise ValueError("--max-in-flight must be at least --batch-size, or batches never fill")
        for name in ("http_port", "nats_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ValueError(f"--{name.replace('_', '-')} must be between 0 and 65535")
        for name in ("batch_delay_ms", "ack_wait", "grace_period", "parked_ttl", "stall_timeout", "changes_retention"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")
        if not 0 < self.max_clock_skew <= MAX_CLOCK_SKEW:  # also refuses nan
            raise ValueError(
                f"--max-clock-skew must be more than 0 and at most {MAX_CLOCK_SKEW:.0f} seconds (one day); "
                "the default is 300"
            )
        if self.stream_max_age < 0:
            raise ValueError("--stream-max-age must be 0 (unbounded) or positive")
        if self.stream_replicas is not None and not 1 <= self.stream_replicas <= 5:
            raise ValueError("--stream-replicas must be between 1 and 5 (JetStream keeps at most 5 replicas)")
        if self.durable in DCM_DURABLES:
            raise ValueError(
                f"--durable {self.durable!r} is a durable consumer of DCM itself: sharing it would split DCM's "
                "deliveries with dcmstatus, and each would miss events. Use a name of its own, e.g. 'dcmstatus'"
            )
        if self.startup_timeout < 0:
            raise ValueError("--startup-timeout must be 0 (wait forever) or positive")
        if not valid_prefix(self.changes_subject_prefix):
            raise ValueError(
                f"--changes-subject-prefix {self.changes_subject_prefix!r} is not a literal NATS subject "
                "(dot-separated tokens of letters, digits, '_' and '-'), e.g. dcmstatus.changes"
            )
        if subjects_overlap(self.subjects, self.changes_subject_prefix + ".>"):
            raise ValueError(
                f"--subjects {self.subjects!r} captures change events under --changes-subject-prefix "
                f"{self.changes_subject_prefix!r}: dcmstatus would consume its own change events. "
                "Choose a prefix outside the filter, e.g. dcmstatus.changes"
            )
        for name in ("changes_stream", "changes_source"):
            if not getattr(self, name).strip():
                raise ValueError(f"--{name.replace('_', '-')} must not be empty")
        if self.api_token is not None and not self.api_token.strip():
            raise ValueError("the API token is empty: set a non-empty one or none")
        if self.page_token_secret is not None and len(self.page_token_secret.strip()) < MIN_SECRET_CHARS:
            raise ValueError(
                f"the page token secret is shorter than {MIN_SECRET_CHARS} characters: use a long random one, "
                "e.g. python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
            )
        try:
            self.catalog()
        except ValueError as exc:
            raise ValueError(f"service_types.{exc}") from None

    def redacted(self) -> dict[str, Any]:
        """The options as plain values, secrets hidden (for logs and `dcmstatus config`)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "service_types":
                continue
            value = getattr(self, f.name)
            if f.metadata["secret"] and value:
                value = redact_url(str(value)) if f.name.endswith("_url") else REDACTED
            out[f.name] = str(value) if isinstance(value, Path) else value
        return out


_OPTIONS = {f.name: f for f in fields(ServeConfig)}
# The options of the NATS connection besides its URL.
_NATS_SECURITY = tuple(name for name in _OPTIONS if name.startswith("nats_") and name not in ("nats_url", "nats_port"))
# What `dcmstatus publish` takes of the serve options.
NATS_OPTIONS = ("nats_url", *_NATS_SECURITY, "data_dir")


def runtime_value(data_dir: Path, key: str) -> str | None:
    """`key` of the runtime.json a running `serve` wrote in `data_dir`, if there is one."""
    import json

    try:
        return json.loads((data_dir / "runtime.json").read_text())[key]
    except (OSError, ValueError, KeyError):
        return None


def env_name(option: str) -> str:
    return "DCMSTATUS_" + option.upper()


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _label(name: str) -> str:
    """How a user sets the option: its flag, or its variable when it has no flag."""
    return _flag(name) if _OPTIONS[name].metadata.get("flag", True) else env_name(name)


def add_serve_options(
    parser: argparse.ArgumentParser,
    env: Mapping[str, str] | None = None,
    *,
    only: tuple[str, ...] | None = None,
    help: Mapping[str, str] | None = None,
) -> None:
    """Flags for every ServeConfig option (or those in `only`), plus --config.

    Flags not given are absent from the parsed namespace (SUPPRESS), so
    `load_config` can tell "given" from "default" and apply the precedence.
    `help` replaces the help text of some options (another command's view).
    `env` is accepted for compatibility; environment values are read by
    `load_config`.
    """
    del env
    parser.add_argument(
        "--config",
        type=Path,
        default=argparse.SUPPRESS,
        metavar="FILE",
        help=f"TOML file with options as keys and [service_types.<name>] tables [env {CONFIG_ENV}; default none]",
    )
    for f in fields(ServeConfig):
        if not f.metadata.get("flag", True) or (only is not None and f.name not in only):
            continue
        var = env_name(f.name)
        shown = "none" if f.default is None else f.default
        if f.metadata["type"] is bool:
            parser.add_argument(
                _flag(f.name), dest=f.name, action="store_const", const=True, default=argparse.SUPPRESS,
                help=f"{f.metadata['help']} [env {var}=true; default off]",
            )
            continue
        parser.add_argument(
            _flag(f.name),
            dest=f.name,
            type=f.metadata["type"] or str,
            default=argparse.SUPPRESS,
            choices=f.metadata["choices"],
            metavar=f.name.upper() if not f.metadata["choices"] else None,
            help=f"{(help or {}).get(f.name, f.metadata['help'])} [env {var}; default {shown}]",
        )


def load_config(
    args: argparse.Namespace, env: Mapping[str, str] | None = None, *, only: tuple[str, ...] | None = None
) -> tuple[ServeConfig, dict[str, str]]:
    """The effective configuration and where each option came from
    ("flag", "env DCMSTATUS_X", "file PATH", "default").

    With `only` (another command's share of the options, e.g. NATS_OPTIONS)
    the other options keep their defaults and only those are validated.
    Raises ConfigError naming the flag, variable or key that is wrong.
    """
    env = os.environ if env is None else env
    given = vars(args)
    config_path: Path | None = given.get("config")
    if config_path is None and env.get(CONFIG_ENV):
        config_path = Path(env[CONFIG_ENV])
    table = _read_toml(config_path) if config_path is not None else {}

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for f in fields(ServeConfig):
        name = f.name
        var = env_name(name)
        if only is not None and name not in only:
            sources[name] = "default"
        elif name == "service_types":
            overrides = table.get("service_types", {})
            if not isinstance(overrides, dict):
                raise ConfigError(f"config file {config_path}: service_types must be a table of [service_types.<name>] tables")
            values[name] = overrides
            sources[name] = f"file {config_path}" if overrides else "default"
        elif name in given:
            values[name], sources[name] = given[name], "flag"
        elif f.metadata.get("env", True) and var in env:
            values[name], sources[name] = _from_text(f, env[var], f"{var}={env[var]!r}"), f"env {var}"
        elif name in table:
            values[name], sources[name] = _from_toml(f, table[name], f"config file {config_path}: {name}"), f"file {config_path}"
        else:
            sources[name] = "default"
    config = ServeConfig(**values)
    config = _with_secrets_from_files(config, sources)
    config = _with_nats_secrets(config, sources)
    try:
        if only is None:
            config.validate()
        else:
            config.validate_nats()
    except ValueError as exc:
        where = f"config file {config_path}: " if str(exc).startswith("service_types.") else ""
        raise ConfigError(where + str(exc)) from None
    _check_nats_files(config)
    return config, sources


def config_from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> ServeConfig:
    return load_config(args, env)[0]


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as file:
            table = tomllib.load(file)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}; check the path given to --config or {CONFIG_ENV}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    known = [n for n, f in _OPTIONS.items() if f.metadata.get("file", True)]
    for key in table:
        if key in _OPTIONS and not _OPTIONS[key].metadata.get("file", True):
            raise ConfigError(
                f"config file {path}: {key} cannot be kept in a config file; "
                f"use {key}_file or the environment variable {env_name(key)}"
            )
        if key not in _OPTIONS:
            hint = difflib.get_close_matches(key.replace("-", "_"), known, n=1)
            suggestion = f"; did you mean {hint[0]!r}?" if hint else f" (known: {', '.join(known)})"
            raise ConfigError(f"config file {path}: unknown key {key!r}{suggestion}")
    return table


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def _switch(raw: str) -> bool:
    if raw.strip().lower() in _TRUE:
        return True
    if raw.strip().lower() in _FALSE:
        return False
    raise ValueError(raw)


def _from_text(f: Any, raw: str, where: str) -> Any:
    convert = f.metadata["type"] or str
    if convert is bool:
        convert = _switch
    try:
        value = convert(raw)
    except ValueError:
        kind = {int: "an integer", float: "a number", _switch: "true or false"}.get(convert, "valid")
        raise ConfigError(f"{where} is not {kind}; fix or unset it") from None
    return _check_choice(f, value, where)


def _from_toml(f: Any, value: Any, where: str) -> Any:
    convert = f.metadata["type"]
    if convert is bool:
        ok = isinstance(value, bool)
        kind = "true or false"
    elif convert is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        kind = "an integer"
    elif convert is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        kind = "a number"
        value = float(value) if ok else value
    else:
        ok = isinstance(value, str)
        kind = "a string"
    if not ok:
        raise ConfigError(f"{where} must be {kind}, not {json.dumps(value, default=str)}")
    if convert not in (bool, int, float, None):
        value = convert(value)
    return _check_choice(f, value, where)


def _check_choice(f: Any, value: Any, where: str) -> Any:
    choices = f.metadata["choices"]
    if choices and value not in choices:
        raise ConfigError(f"{where} must be one of {', '.join(choices)}")
    return value


# Secrets given as a value or as a file holding it: (option, what the messages call it).
_SECRETS = (("api_token", "API token"), ("page_token_secret", "page token secret"))


def _with_secrets_from_files(config: ServeConfig, sources: dict[str, str]) -> ServeConfig:
    """Each secret read from its file when one is named, and stripped either
    way: a newline from `echo` or a secret mount is no part of a token, and a
    token in the environment must match the same as one in a file."""
    for name, what in _SECRETS:
        value, path = getattr(config, name), getattr(config, f"{name}_file")
        if path is not None:
            if value is not None:
                raise ConfigError(
                    f"both the {what} ({sources[name]}) and {_flag(name)}-file ({sources[f'{name}_file']}) "
                    "are set: keep one"
                )
            try:
                value = Path(path).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"cannot read the {what} file {path}: {getattr(exc, 'strerror', None) or exc}") from None
            if not value.strip():
                raise ConfigError(f"the {what} file {path} is empty: put the {what} in it")
            sources[name] = f"file {path}"
        if value is not None:
            config = replace(config, **{name: value.strip()})
    return config


def _read_secret(path: Path, option: str) -> str:
    try:
        secret = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{option}: cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    if not secret:
        raise ConfigError(f"{option}: {path} is empty: put the secret in it")
    return secret


def _with_nats_secrets(config: ServeConfig, sources: dict[str, str]) -> ServeConfig:
    """The NATS password and token read from their files (file or environment, not both)."""
    for name in ("nats_password", "nats_token"):
        path = getattr(config, f"{name}_file")
        if path is None:
            continue
        option = _flag(f"{name}_file")
        if getattr(config, name) is not None:
            raise ConfigError(f"both {env_name(name)} and {option} ({sources[f'{name}_file']}) are set: keep one")
        secret: dict[str, Any] = {name: _read_secret(path, option)}
        config = replace(config, **secret)
        sources[name] = f"file {path}"
    return config


def _check_nats_files(config: ServeConfig) -> None:
    """Fail at start-up, naming the option, on a credential or TLS file that
    nats-py would otherwise only trip over when connecting."""
    for name, marker in (("nats_creds", "BEGIN NATS USER JWT"), ("nats_nkey_seed", None)):
        path = getattr(config, name)
        if path is None:
            continue
        text = _read_secret(path, _flag(name))
        if marker is not None and (marker not in text or "BEGIN USER NKEY SEED" not in text):
            raise ConfigError(f"{_flag(name)}: {path} is not a NATS credentials file (a user JWT and an nkey seed)")
        if marker is None and not text.startswith("SU"):
            raise ConfigError(f"{_flag(name)}: {path} does not hold a user nkey seed (a line starting with SU)")
    security = config.nats_security()
    for name in ("nats_tls_ca", "nats_tls_cert", "nats_tls_key"):
        path = getattr(config, name)
        if path is not None and not os.access(path, os.R_OK):
            raise ConfigError(f"{_flag(name)}: cannot read {path}; check the path and its permissions")
    try:
        security.ssl_context()
    except (OSError, ssl.SSLError) as exc:
        names = [_flag(n) for n in ("nats_tls_ca", "nats_tls_cert", "nats_tls_key") if getattr(config, n)]
        raise ConfigError(f"{', '.join(names)}: cannot use these TLS files: {exc}") from None


# --- showing the effective configuration ------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items()) + " }"
    return json.dumps(str(value), ensure_ascii=False)  # a TOML basic string


def render_toml(config: ServeConfig, sources: Mapping[str, str]) -> str:
    """The effective configuration as a TOML config file, secrets redacted
    (as comments), each option annotated with where it came from."""
    lines = ["# effective configuration of `dcmstatus serve` (flag > environment > config file > default)"]
    for name, value in config.redacted().items():
        source = sources.get(name, "default")
        if value is None:
            lines.append(f"# {name} is not set ({source})")
        elif _OPTIONS[name].metadata["secret"] and not name.endswith("_url"):
            lines.append(f"# {name} = {REDACTED!r} ({source}; redacted)")
        else:
            lines.append(f"{name} = {_toml_value(value)}  # {source}")
    lines.append("")
    lines.append(f"# service types: the contract's catalog{' merged with the config file' if config.service_types else ''}")
    for st, entry in config.catalog().to_mapping().items():
        lines.append(f"[service_types.{st}]")
        lines.append(f"statuses = {_toml_value(entry['statuses'])}")
        if entry["aliases"]:
            lines.append(f"aliases = {_toml_value(entry['aliases'])}")
    return "\n".join(lines) + "\n"
