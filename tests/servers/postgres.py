"""A real, throw-away PostgreSQL server on 127.0.0.1 for the test suite.

Uses the distribution's server binaries (Debian: ``/usr/lib/postgresql/<ver>/bin``; or
``$PG_BINDIR``; or ``initdb`` on ``PATH``), a temp data dir, ``initdb -A trust -U postgres`` and
``pg_ctl start`` on a free port. Typical use::

    ok, why = PostgresServer.available()
    with PostgresServer() as pg:
        engine = sqlalchemy.create_engine(pg.url)         # postgresql+psycopg://...
        other = pg.create_database("test_isolated")

PostgreSQL refuses to run as root, so when the tests run as root the cluster belongs to a
dedicated system user (``progressbot-pg``, created on demand with ``useradd --system``; falling
back to ``nobody``). The data dir is then created in the system temp dir, not in pytest's
``tmp_path`` (``/tmp/pytest-of-root`` is mode 0700, which that user could not enter).

Only the stdlib is needed to start/stop; ``psycopg`` (a project dependency) is used to create
databases.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["PostgresServer", "PostgresStartError", "find_pg_bindir"]

DEFAULT_DATABASE = "progressbot_test"
DEFAULT_OS_USER = "progressbot-pg"
SUPERUSER = "postgres"

_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")

# Every server started in this process; stopped at interpreter exit if teardown never ran.
_LIVE: set[PostgresServer] = set()


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_LIVE):
        try:
            server.close()
        except Exception:  # pragma: no cover - best effort at interpreter exit
            pass


class PostgresStartError(RuntimeError):
    """initdb or the server start failed; the message holds the command output / log tail."""


def _free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free right now (the caller retries if it loses the race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _version_key(path: str) -> tuple[int, ...]:
    """Sort key for ``/usr/lib/postgresql/<ver>/bin/initdb`` by numeric version."""
    ver = Path(path).parent.parent.name
    return tuple(int(p) for p in re.findall(r"\d+", ver)) or (0,)


def find_pg_bindir() -> Path | None:
    """Find a directory containing ``initdb``, ``pg_ctl`` and ``postgres``.

    Order: ``$PG_BINDIR``; ``initdb`` on ``PATH`` (symlinks resolved); the newest
    ``/usr/lib/postgresql/*/bin`` (Debian/Ubuntu keep the server binaries off ``PATH``).
    """
    candidates: list[Path] = []
    if os.environ.get("PG_BINDIR"):
        candidates.append(Path(os.environ["PG_BINDIR"]))
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(os.path.realpath(on_path)).parent)
    for initdb in sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version_key, reverse=True):
        candidates.append(Path(initdb).parent)
    for d in candidates:
        if all(os.access(d / exe, os.X_OK) for exe in ("initdb", "pg_ctl", "postgres")):
            return d
    return None


def _pid_alive(pid: int) -> bool:
    """True if ``pid`` runs and is not a zombie.

    The postmaster is re-parented to PID 1 after ``pg_ctl`` exits; if PID 1 does not reap
    (minimal container inits), a dead postmaster lingers as a zombie that ``kill(pid, 0)``
    still reports as alive.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class PostgresServer:
    """A real PostgreSQL cluster in a temp dir, listening on 127.0.0.1 and a private socket dir.

    Args:
        workdir: parent directory for data dir, socket dir and log. ``None`` (recommended) makes
            a temp dir that :meth:`close` removes. A given dir must be enterable by ``os_user``.
        port: TCP port; ``None`` picks a free one at first start (kept for later restarts).
        database: database created at start; it is what :attr:`url` points to.
        os_user: OS account that owns and runs the cluster when running as root (default
            ``$PG_TEST_USER`` or ``progressbot-pg``, created if missing, else ``nobody``).
            Ignored when not root: the cluster then runs as the current user.
        bindir: directory with ``initdb``/``pg_ctl``/``postgres``; default :func:`find_pg_bindir`.
        ready_timeout: seconds ``pg_ctl start -w`` may wait for the server to accept connections.
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str] | None = None,
        *,
        port: int | None = None,
        database: str = DEFAULT_DATABASE,
        os_user: str | None = None,
        bindir: str | os.PathLike[str] | None = None,
        ready_timeout: float = 60.0,
    ) -> None:
        """Prepare (but do not start) a server; see the class docstring for the arguments."""
        _check_ident(database)
        self.database = database
        self.ready_timeout = ready_timeout
        self._requested_os_user = os_user or os.environ.get("PG_TEST_USER") or None
        self._bindir: Path | None = Path(bindir) if bindir is not None else None
        self._owns_workdir = workdir is None
        self._workdir: Path | None = Path(workdir).resolve() if workdir is not None else None
        self._port_fixed = port is not None
        self._port: int | None = port
        self._os_user: pwd.struct_passwd | None = None
        self._postmaster_pid: int | None = None
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ availability
    @classmethod
    def available(cls) -> tuple[bool, str]:
        """Return ``(True, "")`` if a server can be started here, else ``(False, reason)``."""
        bindir = find_pg_bindir()
        if bindir is None:
            return False, (
                "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found in $PG_BINDIR, "
                "on PATH or in /usr/lib/postgresql/*/bin; install with: "
                "apt-get install -y postgresql"
            )
        try:
            import psycopg  # noqa: F401  (only checking that it is importable)
        except ImportError:
            return False, "psycopg is not installed (pip install 'psycopg[binary]')"
        if os.geteuid() == 0:
            wanted = os.environ.get("PG_TEST_USER") or DEFAULT_OS_USER
            if not (_user_exists(wanted) or shutil.which("useradd") or _user_exists("nobody")):
                return False, f"running as root and no non-root user ({wanted} or nobody) for PostgreSQL"
        return True, ""

    # ------------------------------------------------------------------ properties
    @property
    def host(self) -> str:
        """The TCP address the server listens on."""
        return "127.0.0.1"

    @property
    def port(self) -> int:
        """TCP port (chosen at first :meth:`start` if not given)."""
        if self._port is None:
            raise RuntimeError("PostgresServer has no port yet; call start() first")
        return self._port

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the default database: ``postgresql+psycopg://postgres@127.0.0.1:PORT/DB``."""
        return self.url_for(self.database)

    @property
    def workdir(self) -> Path:
        """Parent directory of ``data/``, ``sock/`` and ``postgres.log``."""
        if self._workdir is None:
            raise RuntimeError("PostgresServer has no workdir yet; call start() first")
        return self._workdir

    @property
    def data_dir(self) -> Path:
        """The cluster's data directory (PGDATA)."""
        return self.workdir / "data"

    @property
    def socket_dir(self) -> Path:
        """Private Unix-socket directory (keeps clear of the system's /var/run/postgresql)."""
        return self.workdir / "sock"

    @property
    def log_path(self) -> Path:
        """Server log written by ``pg_ctl -l``."""
        return self.workdir / "postgres.log"

    @property
    def running(self) -> bool:
        """Whether the postmaster process is alive."""
        return self._postmaster_pid is not None and _pid_alive(self._postmaster_pid)

    def url_for(self, database: str, driver: str = "psycopg") -> str:
        """URL of ``database`` on this server; ``driver=""`` gives a plain libpq URL for psycopg."""
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        return f"{scheme}://{SUPERUSER}@{self.host}:{self.port}/{database}"

    def conninfo(self, database: str | None = None) -> str:
        """libpq URL (``postgresql://...``) usable directly with ``psycopg.connect``."""
        return self.url_for(database or self.database, driver="")

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> PostgresServer:
        """initdb (first time only), start the server, wait for it and create :attr:`database`.

        Raises :class:`PostgresStartError` with the output/log tail on failure; a half-started
        server is stopped again.
        """
        with self._lock:
            if self.running:
                return self
            if self._bindir is None:
                self._bindir = find_pg_bindir()
                if self._bindir is None:
                    raise PostgresStartError(PostgresServer.available()[1])
            self._os_user = self._resolve_os_user()
            self._ensure_workdir()
            if not (self.data_dir / "PG_VERSION").exists():
                self._initdb()
            attempts = 1 if self._port_fixed else 3
            for attempt in range(attempts):
                if self._port is None:
                    self._port = _free_port()
                try:
                    self._pg_ctl_start()
                except PostgresStartError as exc:
                    # Lost the race for a kernel-chosen port: try another one.
                    if attempt + 1 < attempts and "already in use" in str(exc):
                        self._port = None
                        continue
                    raise
                break
            self._port_fixed = True
            try:
                self.create_database(self.database, exist_ok=True)
            except BaseException:
                self.stop()
                raise
            return self

    def stop(self, timeout: float = 10.0) -> None:
        """``pg_ctl stop -m fast``; if that does not work, SIGQUIT and then SIGKILL the postmaster."""
        with self._lock:
            pid = self._postmaster_pid
            if pid is None:
                return
            try:
                if _pid_alive(pid):
                    pg_ctl = [self._exe("pg_ctl"), "stop", "-D", str(self.data_dir), "-m", "fast"]
                    # Errors here just mean "did not stop cleanly": the signals below handle it.
                    with contextlib.suppress(PostgresStartError, subprocess.TimeoutExpired, OSError):
                        self._run([*pg_ctl, "-w", "-t", str(int(timeout))], timeout=timeout + 5)
                # SIGQUIT = PostgreSQL's "immediate shutdown"; SIGKILL as a last resort.
                for sig, wait in ((signal.SIGQUIT, 5.0), (signal.SIGKILL, 5.0)):
                    if not _pid_alive(pid):
                        break
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        break
                    deadline = time.monotonic() + wait
                    while _pid_alive(pid) and time.monotonic() < deadline:
                        time.sleep(0.05)
            finally:
                self._postmaster_pid = None
                _LIVE.discard(self)

    def restart(self) -> PostgresServer:
        """Stop and start again on the same data dir and port (data survives)."""
        with self._lock:
            self.stop()
            return self.start()

    def close(self) -> None:
        """Stop the server and remove the workdir if this object created it."""
        with self._lock:
            self.stop()
            if self._owns_workdir and self._workdir is not None:
                shutil.rmtree(self._workdir, ignore_errors=True)
                self._workdir = None

    def __enter__(self) -> PostgresServer:
        """Start the server (if needed) and return it."""
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the server and remove an owned temp dir."""
        self.close()

    # ------------------------------------------------------------------ databases
    def create_database(self, name: str, *, exist_ok: bool = False, replace: bool = False) -> str:
        """Create database ``name`` and return its SQLAlchemy URL (for per-test isolation).

        ``exist_ok``: an existing database is kept as is. ``replace``: an existing database is
        dropped (with its connections) and created empty. Otherwise an existing one is an error.
        """
        _check_ident(name)
        import psycopg
        from psycopg import sql

        # CREATE/DROP DATABASE cannot run inside a transaction block: autocommit.
        with psycopg.connect(self.conninfo("postgres"), autocommit=True, connect_timeout=10) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
            if exists and replace:
                conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
                exists = None
            if exists and not exist_ok:
                raise ValueError(f"database {name!r} already exists")
            if not exists:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url_for(name)

    def drop_database(self, name: str) -> None:
        """Drop database ``name`` if it exists, terminating its open connections."""
        _check_ident(name)
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.conninfo("postgres"), autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    # ------------------------------------------------------------------ internals
    def _exe(self, name: str) -> str:
        assert self._bindir is not None
        return str(self._bindir / name)

    def _resolve_os_user(self) -> pwd.struct_passwd | None:
        """The account to run PostgreSQL as, or ``None`` to run as the current (non-root) user."""
        if os.geteuid() != 0:
            return None
        wanted = self._requested_os_user or DEFAULT_OS_USER
        if not _user_exists(wanted) and wanted == DEFAULT_OS_USER and shutil.which("useradd"):
            # A dedicated system user keeps the cluster away from anything else `nobody` owns.
            subprocess.run(
                [
                    "useradd",
                    "--system",
                    "--no-create-home",
                    "--user-group",
                    "--shell",
                    "/usr/sbin/nologin",
                    wanted,
                ],
                capture_output=True,
                timeout=30,
            )
        for name in (wanted, "nobody"):
            if _user_exists(name):
                return pwd.getpwnam(name)
        raise PostgresStartError(f"running as root but no usable non-root user ({wanted}, nobody)")

    def _ensure_workdir(self) -> None:
        if self._workdir is None:
            # The system temp dir (not pytest's 0700 basetemp) so the cluster user can enter it;
            # short path, because a Unix socket path must stay below ~107 bytes.
            self._workdir = Path(tempfile.mkdtemp(prefix="progressbot-pg-")).resolve()
        self._workdir.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(exist_ok=True)
        if self._os_user is not None:
            uid, gid = self._os_user.pw_uid, self._os_user.pw_gid
            os.chown(self._workdir, uid, gid)
            os.chown(self.socket_dir, uid, gid)
            if self.log_path.exists():
                os.chown(self.log_path, uid, gid)
        if len(str(self.socket_dir)) > 90:
            raise PostgresStartError(f"socket dir path too long for a Unix socket: {self.socket_dir}")

    def _run(self, argv: Sequence[str], timeout: float) -> subprocess.CompletedProcess[str]:
        """Run a PostgreSQL tool as the cluster's user; raise PostgresStartError on failure."""
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LC_ALL": "C.UTF-8",
            "LANG": "C.UTF-8",
            "TZ": "UTC",
        }
        kwargs: dict[str, Any] = {}
        if self._os_user is not None:
            # subprocess switches uid/gid in the child itself (no preexec_fn, thread-safe) and
            # drops root's supplementary groups.
            kwargs.update(user=self._os_user.pw_uid, group=self._os_user.pw_gid, extra_groups=[])
            env["HOME"] = str(self.workdir)
            env["USER"] = env["LOGNAME"] = self._os_user.pw_name
        proc = subprocess.run(
            list(argv),
            cwd=self.workdir,  # the cluster user must be able to enter the cwd
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            # pg_ctl start leaves the postmaster running: detach it from our terminal/session
            # so a Ctrl-C aimed at pytest does not kill it behind the fixtures' back.
            start_new_session=True,
            **kwargs,
        )
        if proc.returncode != 0:
            raise PostgresStartError(
                f"{shlex.join(argv)} failed with exit code {proc.returncode}\n"
                f"--- output ---\n{proc.stdout}{proc.stderr}"
            )
        return proc

    def _initdb(self) -> None:
        # -A trust: loopback-only, throw-away cluster, so no passwords. --no-locale: locale-
        # independent results. --no-sync: the cluster is disposable, skip fsync of the new files.
        argv = [self._exe("initdb"), "-D", str(self.data_dir), "-A", "trust", "-U", SUPERUSER]
        self._run([*argv, "-E", "UTF8", "--no-locale", "--no-sync"], timeout=120)

    def _pg_ctl_start(self) -> None:
        options = " ".join(
            [
                f"-p {self.port}",
                f"-k {shlex.quote(str(self.socket_dir))}",
                "-c listen_addresses=127.0.0.1",
                # Durability is worthless for a throw-away test cluster; speed is not.
                "-c fsync=off",
                "-c synchronous_commit=off",
                "-c full_page_writes=off",
                "-c max_connections=200",
            ]
        )
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        try:
            self._run(
                [
                    self._exe("pg_ctl"),
                    "start",
                    "-D",
                    str(self.data_dir),
                    "-l",
                    str(self.log_path),
                    "-w",
                    "-t",
                    str(int(self.ready_timeout)),
                    "-o",
                    options,
                ],
                timeout=self.ready_timeout + 15,
            )
        except (PostgresStartError, subprocess.TimeoutExpired) as exc:
            self._postmaster_pid = self._read_postmaster_pid()
            self.stop(timeout=5)
            log = self._log_since(log_offset)
            raise PostgresStartError(f"{exc}\n--- {self.log_path} ---\n{log}") from exc
        self._postmaster_pid = self._read_postmaster_pid()
        if self._postmaster_pid is None:
            raise PostgresStartError(f"pg_ctl started but no postmaster.pid\n{self._log_since(log_offset)}")
        _LIVE.add(self)

    def _read_postmaster_pid(self) -> int | None:
        try:
            first = (self.data_dir / "postmaster.pid").read_text().splitlines()[0]
            return int(first.strip())
        except (OSError, IndexError, ValueError):
            return None

    def _log_since(self, offset: int) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                f.seek(offset)
                return f.read()[-4000:]
        except OSError:
            return "<no log>"


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _check_ident(name: str) -> None:
    """Accept only plain identifiers as database names (they end up in URLs and SQL)."""
    if not _IDENT_RE.match(name):
        raise ValueError(f"invalid database name {name!r}: use [A-Za-z_][A-Za-z0-9_]*, max 63 chars")
