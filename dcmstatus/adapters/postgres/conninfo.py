"""Checking a PostgreSQL connection string (URL or key=value form) before
anything connects with it: what libpq cannot parse is a configuration error,
never a reason to retry."""

from __future__ import annotations

import psycopg
from psycopg.conninfo import conninfo_to_dict


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
