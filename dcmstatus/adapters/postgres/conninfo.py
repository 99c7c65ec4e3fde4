"""Checking a PostgreSQL connection string (URL or key=value form) before
anything connects with it: what libpq cannot parse is a configuration error,
never a reason to retry."""

from __future__ import annotations

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo


def check_conninfo(conninfo: str) -> None:
    """ValueError saying what is wrong when libpq cannot parse `conninfo`,
    or when a port in it is not a port number."""
    try:
        params = conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError as exc:
        raise ValueError(str(exc).strip().splitlines()[0]) from None
    for port in str(params.get("port") or "").split(","):
        if port and not (port.isdigit() and 0 < int(port) <= 65535):
            raise ValueError(f"invalid port {port!r}")


def with_defaults(conninfo: str, **defaults: str | int | None) -> str:
    """`conninfo` with `defaults` for the parameters it does not set.

    psycopg's keyword arguments override the connection string's, so a
    default passed as one (a connect timeout, keepalives, `options`) would
    silently replace what the operator wrote in the URL. Every connection
    dcmstatus opens goes through here instead: the URL's own parameters
    (`sslmode`, `sslrootcert`, `options`, its timeouts, ...) reach libpq
    unchanged, and ours only fill the gaps."""
    given = conninfo_to_dict(conninfo)
    return make_conninfo(conninfo, **{key: value for key, value in defaults.items() if key not in given})
