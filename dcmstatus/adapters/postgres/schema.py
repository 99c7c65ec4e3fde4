"""Schema migrations: forward-only SQL files in migrations/ beside this
module, applied in name order, each once, under an advisory lock so replicas
starting together never race. Used at start-up by `serve` and by
`dcmstatus migrate` (docs/database.md#migrations).
"""

from __future__ import annotations

import logging
from importlib import resources

import psycopg

from dcmstatus.adapters.postgres.conninfo import with_defaults

log = logging.getLogger(__name__)

# Any constant works; it only has to be the same in every replica.
_MIGRATION_LOCK = 0x6463_6D73  # "dcms"


def migration_files() -> list[tuple[str, str]]:
    """(version, sql) for every migration shipped with the package, in order."""
    folder = resources.files(__package__) / "migrations"
    files = sorted((f for f in folder.iterdir() if f.name.endswith(".sql")), key=lambda f: f.name)
    return [(f.name.removesuffix(".sql"), f.read_text(encoding="utf-8")) for f in files]


def migrate(conninfo: str) -> list[str]:
    """Apply the missing migrations; return the versions applied now."""
    applied_now: list[str] = []
    # connect_timeout: an unreachable server is an error to retry, not a hang.
    with psycopg.connect(with_defaults(conninfo, connect_timeout=10), autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_MIGRATION_LOCK,))
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS dcmstatus_migrations ("
                " version text PRIMARY KEY,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {row[0] for row in conn.execute("SELECT version FROM dcmstatus_migrations")}
            for version, sql in migration_files():
                if version in done:
                    continue
                with conn.transaction():
                    conn.execute(sql)
                    conn.execute("INSERT INTO dcmstatus_migrations (version) VALUES (%s)", (version,))
                log.info("applied migration %s", version)
                applied_now.append(version)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_MIGRATION_LOCK,))
    return applied_now
