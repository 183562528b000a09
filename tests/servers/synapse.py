"""A real, throw-away Synapse homeserver on 127.0.0.1 for the test suite.

Only the standard library is used here (``subprocess`` + ``urllib``), so the helper works from
plain synchronous pytest fixtures and does not depend on an event loop. Synapse itself only has
to be importable by the Python that runs it: ``sys.executable`` by default, or ``$SYNAPSE_PYTHON``.

Typical use::

    with SynapseServer() as hs:
        alice = hs.register("alice", "alice-pw")
        print(hs.base_url)        # http://127.0.0.1:<port>
        hs.restart()              # same dir, same port, same users

Design notes (measured on the target machine, see the Synapse probe report):

* Synapse is ready about 3 s after launch, almost all of it importing synapse. The signing key is
  written with ``signedjson`` directly because ``--generate-keys`` costs another ~2.5 s.
* The config is plain JSON (which is valid YAML), so no YAML library is needed here.
* Without a ``listeners`` entry Synapse silently listens on nothing; paths are absolute because
  Synapse otherwise writes the key next to the config and ``media_store`` into the cwd.
* Synapse's default login/join/invite/room-creation limits break a suite on its ~3rd test, so
  ``ratelimits="lifted"`` raises them; ``rc_message`` stays at the default unless asked, because
  the edit-scheduler tests need Synapse's real message limit (burst 10, then 0.2/s).
"""

from __future__ import annotations

import atexit
import hashlib
import hmac
import importlib.util
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

__all__ = [
    "SynapseAPIError",
    "SynapseServer",
    "SynapseStartError",
    "free_port",
]

RatelimitMode = Literal["lifted", "default"]

#: per_second / burst_count used for every limiter that "lifted" mode raises.
_HUGE: dict[str, int] = {"per_second": 10_000, "burst_count": 100_000}

#: The limiters raised by ``ratelimits="lifted"`` (``rc_message`` is handled separately).
_LIFTED_RATELIMITS: dict[str, Any] = {
    "rc_login": {"address": _HUGE, "account": _HUGE, "failed_attempts": _HUGE},
    "rc_joins": {"local": _HUGE, "remote": _HUGE},
    "rc_joins_per_room": _HUGE,
    "rc_invites": {"per_room": _HUGE, "per_user": _HUGE, "per_issuer": _HUGE},
    "rc_room_creation": _HUGE,
    "rc_registration": _HUGE,
    "rc_presence": {"per_user": _HUGE},
}

# A urllib opener that ignores http_proxy/https_proxy/no_proxy: a proxy configured in the
# environment (common in CI) must never capture loopback calls to the test server.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

# Every server started in this process, so that an interpreter exit without fixture teardown
# (crash in a fixture, sys.exit, Ctrl-C during collection, ...) never leaves Synapse running.
# A strong set on purpose: a server object that nobody references any more must still be stopped.
_LIVE: set[SynapseServer] = set()


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_LIVE):
        try:
            server.close()
        except Exception:  # pragma: no cover - best effort at interpreter exit
            pass


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that is free right now.

    The kernel picks the port; there is a small window before the server binds it, which is
    why :meth:`SynapseServer.start` retries with a new port if the first bind fails.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _tail(path: Path, max_chars: int = 4000) -> str:
    """Return the last ``max_chars`` characters of a text file, or a note if it is missing."""
    try:
        data = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return data[-max_chars:]


class SynapseStartError(RuntimeError):
    """Synapse did not become ready (process died, or timeout); the message holds the log tails."""


class SynapseAPIError(RuntimeError):
    """A Synapse HTTP call answered with a non-2xx status."""

    def __init__(self, method: str, path: str, status: int, body: dict[str, Any]) -> None:
        """Keep the HTTP status and the decoded JSON body (``errcode``, ``error``...)."""
        self.method = method
        self.path = path
        self.status = status
        self.body = body
        self.errcode: str | None = body.get("errcode") if isinstance(body, dict) else None
        super().__init__(f"{method} {path}: HTTP {status} {body}")


class SynapseServer:
    """A real Synapse homeserver on 127.0.0.1, in its own session, with a temp-dir config.

    Args:
        workdir: directory for config, SQLite DB, key, media and logs. ``None`` creates a temp
            dir that :meth:`close` removes again; a given dir is never deleted.
        port: TCP port for the client listener; ``None`` picks a free one at first start. The
            port is kept for the lifetime of the object, so :meth:`restart` reuses it.
        ratelimits: ``"lifted"`` raises rc_login, rc_joins, rc_joins_per_room, rc_invites,
            rc_room_creation, rc_registration and rc_presence to huge values; ``"default"`` writes
            no ``rc_*`` at all (Synapse's own defaults everywhere).
        lift_messages: with ``"lifted"``, also raise ``rc_message``. Off by default because the
            edit-scheduler tests rely on Synapse's default message limit.
        python: interpreter that has matrix-synapse installed; default ``$SYNAPSE_PYTHON`` or
            ``sys.executable``.
        ready_timeout: seconds to wait for ``GET /_matrix/client/versions`` to answer 200.
        log_level: root log level written to the Synapse log config.

    ``ratelimits`` and ``lift_messages`` are plain attributes; the config is rewritten on every
    :meth:`start`, so changing them and calling :meth:`restart` applies the new limits.
    """

    SERVER_NAME = "localhost"

    def __init__(
        self,
        workdir: str | os.PathLike[str] | None = None,
        *,
        port: int | None = None,
        ratelimits: RatelimitMode = "lifted",
        lift_messages: bool = False,
        python: str | None = None,
        ready_timeout: float = 60.0,
        log_level: str = "INFO",
    ) -> None:
        """Prepare (but do not start) a server; see the class docstring for the arguments."""
        if ratelimits not in ("lifted", "default"):
            raise ValueError(f"ratelimits must be 'lifted' or 'default', not {ratelimits!r}")
        self.ratelimits: RatelimitMode = ratelimits
        self.lift_messages = lift_messages
        self.python = python or os.environ.get("SYNAPSE_PYTHON") or sys.executable
        self.ready_timeout = ready_timeout
        self.log_level = log_level
        self._owns_workdir = workdir is None
        self._workdir: Path | None = Path(workdir).resolve() if workdir is not None else None
        self._port_fixed = port is not None
        self._port: int | None = port
        self._proc: subprocess.Popen[bytes] | None = None
        self._secrets: dict[str, str] | None = None
        self._tokens: dict[str, str] = {}
        self._admin_credentials: tuple[str, str] | None = None
        # start/stop may be called from the atexit hook while a test thread is stopping too.
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ availability
    @classmethod
    def available(cls, python: str | None = None) -> tuple[bool, str]:
        """Return ``(True, "")`` if Synapse can be started, else ``(False, reason)``.

        Checks that the interpreter that would run Synapse can import ``synapse`` and
        ``signedjson`` (without importing them: that alone would take ~2 s).
        """
        py = python or os.environ.get("SYNAPSE_PYTHON") or sys.executable
        if py == sys.executable:
            missing = [m for m in ("synapse", "signedjson") if importlib.util.find_spec(m) is None]
            if missing:
                return False, (
                    f"{', '.join(missing)} not importable by {py}; "
                    "install it with: pip install 'matrix-synapse>=1.100'"
                )
            return True, ""
        if shutil.which(py) is None and not Path(py).is_file():
            return False, f"SYNAPSE_PYTHON={py} does not exist"
        probe = "import importlib.util as u,sys; sys.exit(0 if u.find_spec('synapse') else 1)"
        try:
            rc = subprocess.run([py, "-c", probe], capture_output=True, timeout=30).returncode
        except (OSError, subprocess.TimeoutExpired) as exc:
            return False, f"cannot run {py}: {exc}"
        if rc != 0:
            return False, f"synapse not importable by {py}; pip install matrix-synapse there"
        return True, ""

    # ------------------------------------------------------------------ properties
    @property
    def server_name(self) -> str:
        """The homeserver's server name (the part after ``:`` in user ids)."""
        return self.SERVER_NAME

    @property
    def port(self) -> int:
        """The client listener's TCP port (chosen at first :meth:`start` if not given)."""
        if self._port is None:
            raise RuntimeError("SynapseServer has no port yet; call start() first")
        return self._port

    @property
    def base_url(self) -> str:
        """Client-server API base URL, e.g. ``http://127.0.0.1:8448`` (no trailing slash)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def workdir(self) -> Path:
        """Directory holding config, DB, signing key, media store and logs."""
        if self._workdir is None:
            raise RuntimeError("SynapseServer has no workdir yet; call start() first")
        return self._workdir

    @property
    def config_path(self) -> Path:
        """Path of the generated ``homeserver.yaml``."""
        return self.workdir / "homeserver.yaml"

    @property
    def log_path(self) -> Path:
        """Synapse's own log file (Python logging, via the generated log config)."""
        return self.workdir / "synapse.log"

    @property
    def stdout_path(self) -> Path:
        """Captured stdout/stderr of the Synapse process (tracebacks before logging is set up)."""
        return self.workdir / "startup.out"

    @property
    def pid(self) -> int | None:
        """PID of the running Synapse process, or ``None``."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def running(self) -> bool:
        """Whether the Synapse process is alive."""
        return self.pid is not None

    @property
    def registration_shared_secret(self) -> str:
        """The shared secret for ``/_synapse/admin/v1/register`` (stable across restarts)."""
        return self._load_secrets()["registration_shared_secret"]

    def user_id(self, localpart: str) -> str:
        """Return the full Matrix user id for ``localpart``, e.g. ``@alice:localhost``."""
        if localpart.startswith("@"):
            return localpart
        return f"@{localpart}:{self.server_name}"

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> SynapseServer:
        """Write the config and start Synapse; return once it answers ``/versions`` with 200.

        Raises :class:`SynapseStartError` (with the tail of both logs) if the process dies during
        startup or is not ready within ``ready_timeout``; the process is killed in that case.
        """
        with self._lock:
            if self.running:
                return self
            self._ensure_workdir()
            self._write_signing_key()
            # A kernel-chosen port can be grabbed by someone else before Synapse binds it; retry
            # with a fresh port then. A port given by the caller (or reused by restart()) is kept.
            attempts = 1 if self._port_fixed else 3
            for attempt in range(attempts):
                if self._port is None:
                    self._port = free_port()
                try:
                    self._spawn_and_wait()
                except SynapseStartError as exc:
                    if attempt + 1 < attempts and "Address already in use" in str(exc):
                        self._port = None
                        continue
                    raise
                break
            # From now on restart() must come back on the same port (clients hold the URL).
            self._port_fixed = True
            return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop Synapse: SIGTERM to its process group, wait up to ``timeout`` s, then SIGKILL.

        Safe to call when not running. The workdir (DB, users, logs) is kept for :meth:`start`.
        """
        with self._lock:
            proc = self._proc
            if proc is None:
                return
            try:
                self._signal_group(proc, signal.SIGTERM)
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self._signal_group(proc, signal.SIGKILL)
                    proc.wait(timeout=10)
            finally:
                # Also reap anything else left in the session (Synapse normally forks nothing).
                self._signal_group(proc, signal.SIGKILL)
                self._proc = None
                _LIVE.discard(self)

    def restart(self) -> SynapseServer:
        """Stop and start again on the same workdir and port; users, rooms and tokens survive."""
        with self._lock:
            self.stop()
            return self.start()

    def close(self) -> None:
        """Stop the server and delete the workdir if this object created it."""
        with self._lock:
            self.stop()
            if self._owns_workdir and self._workdir is not None:
                shutil.rmtree(self._workdir, ignore_errors=True)
                self._workdir = None

    def __enter__(self) -> SynapseServer:
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

    # ------------------------------------------------------------------ HTTP API helpers
    def request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        token: str | None = None,
        timeout: float = 15.0,
    ) -> dict[str, Any]:
        """Call the server's HTTP API and return the decoded JSON body.

        ``path`` starts with ``/`` (e.g. ``/_matrix/client/v3/account/whoami``). Raises
        :class:`SynapseAPIError` for a non-2xx answer.
        """
        status, data = self._call(method, path, body, token=token, timeout=timeout)
        if not 200 <= status < 300:
            raise SynapseAPIError(method, path, status, data)
        return data

    def register(self, user: str, password: str, admin: bool = False) -> str:
        """Create a user through the shared-secret admin API and return ``@user:localhost``.

        Idempotent: if the user exists (``M_USER_IN_USE``) this is not an error. Note that the
        existing user keeps its old password and admin flag in that case.
        """
        localpart = user[1:].split(":", 1)[0] if user.startswith("@") else user
        path = "/_synapse/admin/v1/register"
        secret = self.registration_shared_secret
        # Each nonce is single-use, so fetch a fresh one per registration.
        nonce = self.request("GET", path)["nonce"]
        mac = hmac.new(secret.encode(), digestmod=hashlib.sha1)
        mac.update(
            b"\x00".join(
                [nonce.encode(), localpart.encode(), password.encode(), b"admin" if admin else b"notadmin"]
            )
        )
        body = {
            "nonce": nonce,
            "username": localpart,
            "password": password,
            "admin": admin,
            "mac": mac.hexdigest(),
        }
        status, data = self._call("POST", path, body)
        if status == 200:
            return str(data["user_id"])
        if data.get("errcode") == "M_USER_IN_USE":
            return self.user_id(localpart)
        raise SynapseAPIError("POST", path, status, data)

    def login(self, user: str, password: str, device_id: str | None = None) -> dict[str, Any]:
        """Log in with a password; return Synapse's answer (``access_token``, ``user_id``, ...)."""
        body: dict[str, Any] = {
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": self.user_id(user)},
            "password": password,
        }
        if device_id is not None:
            body["device_id"] = device_id
        return self.request("POST", "/_matrix/client/v3/login", body)

    def admin_token(self, user: str | None = None, password: str | None = None) -> str:
        """Return an access token of an admin user (cached per user, valid across restarts).

        With no arguments a dedicated admin ``@progressbot-admin:localhost`` is registered with
        a random password, so tests never depend on another account being an admin. With
        ``user`` and ``password`` that (already admin) account is logged in instead.
        """
        with self._lock:
            if user is None:
                if self._admin_credentials is None:
                    self._admin_credentials = ("progressbot-admin", secrets.token_hex(16))
                user, password = self._admin_credentials
                self.register(user, password, admin=True)
            elif password is None:
                raise ValueError("admin_token(user=...) also needs password=...")
            uid = self.user_id(user)
            if uid not in self._tokens:
                self._tokens[uid] = str(self.login(uid, password)["access_token"])
            return self._tokens[uid]

    def override_ratelimit(
        self,
        user_id: str,
        messages_per_second: int = 0,
        burst_count: int = 0,
        *,
        token: str | None = None,
    ) -> dict[str, Any]:
        """Set a per-user rate-limit override (0/0 = unlimited) via the admin API.

        Takes effect immediately and covers every limiter keyed by that user (messages, room
        creation, invites it sends), but not login. Non-zero values *impose* a limit, which is
        handy to test 429 handling on a server with lifted limits. Values must be ints.
        """
        body = {"messages_per_second": messages_per_second, "burst_count": burst_count}
        return self.request("POST", self._ratelimit_path(user_id), body, token=token or self.admin_token())

    def clear_ratelimit_override(self, user_id: str, *, token: str | None = None) -> None:
        """Remove a per-user rate-limit override again (back to the config's limits)."""
        self.request("DELETE", self._ratelimit_path(user_id), token=token or self.admin_token())

    # ------------------------------------------------------------------ internals
    def _ratelimit_path(self, user_id: str) -> str:
        quoted = urllib.parse.quote(self.user_id(user_id), safe="")
        return f"/_synapse/admin/v1/users/{quoted}/override_ratelimit"

    def _call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        token: str | None = None,
        timeout: float = 15.0,
    ) -> tuple[int, dict[str, Any]]:
        """Do one HTTP request; return ``(status, json)`` for any HTTP status (no raise)."""
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(
            self.base_url + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers=headers,
        )
        try:
            with _OPENER.open(req, timeout=timeout) as resp:
                raw = resp.read()
                status = int(resp.status)
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            status = exc.code
        try:
            data = json.loads(raw) if raw else {}
        except ValueError:
            data = {"raw": raw.decode("utf-8", "replace")}
        return status, data if isinstance(data, dict) else {"value": data}

    def _ensure_workdir(self) -> None:
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="progressbot-synapse-")).resolve()
        self._workdir.mkdir(parents=True, exist_ok=True)
        (self._workdir / "media_store").mkdir(exist_ok=True)

    def _load_secrets(self) -> dict[str, str]:
        """Load (or create once) the per-dir secrets, so a restart keeps tokens and the HMAC key."""
        if self._secrets is None:
            path = self.workdir / "secrets.json"
            if path.exists():
                self._secrets = json.loads(path.read_text())
            else:
                self._secrets = {
                    k: secrets.token_hex(24)
                    for k in ("registration_shared_secret", "macaroon_secret_key", "form_secret")
                }
                path.write_text(json.dumps(self._secrets))
                path.chmod(0o600)
        return self._secrets

    def _write_signing_key(self) -> None:
        """Write the server signing key once, with signedjson (no slow ``--generate-keys``)."""
        key_path = self.workdir / "localhost.signing.key"
        if key_path.exists():
            return
        # signedjson is a Synapse dependency; when Synapse runs in another interpreter
        # (SYNAPSE_PYTHON) it may not be importable here, so use that interpreter instead.
        code = (
            "import sys, signedjson.key as k\n"
            "with open(sys.argv[1], 'w') as f:\n"
            "    k.write_signing_keys(f, [k.generate_signing_key('a_test')])\n"
        )
        if self.python == sys.executable:
            import signedjson.key as sk

            with open(key_path, "w") as f:
                sk.write_signing_keys(f, [sk.generate_signing_key("a_test")])
        else:
            subprocess.run([self.python, "-c", code, str(key_path)], check=True, timeout=60)

    def _config(self) -> dict[str, Any]:
        d = self.workdir
        sec = self._load_secrets()
        cfg: dict[str, Any] = {
            "server_name": self.server_name,
            "public_baseurl": self.base_url + "/",
            "pid_file": str(d / "homeserver.pid"),
            "report_stats": False,
            "signing_key_path": str(d / "localhost.signing.key"),
            "media_store_path": str(d / "media_store"),
            "registration_shared_secret": sec["registration_shared_secret"],
            "macaroon_secret_key": sec["macaroon_secret_key"],
            "form_secret": sec["form_secret"],
            "enable_registration": False,
            # Password hashing in milliseconds instead of ~0.3 s per login (default 12 rounds).
            "bcrypt_rounds": 4,
            # No federation: no key servers, an empty whitelist and no federation listener.
            "trusted_key_servers": [],
            "suppress_key_server_warning": True,
            "federation_domain_whitelist": [],
            "presence": {"enabled": False},
            "url_preview_enabled": False,
            "enable_metrics": False,
            # Run DB background updates without the default 1 s pauses.
            "background_updates": {"sleep_enabled": False},
            "listeners": [
                {
                    "port": self.port,
                    "bind_addresses": ["127.0.0.1"],
                    "type": "http",
                    "tls": False,
                    "x_forwarded": False,
                    # "client" also serves /_synapse/admin; no "federation" resource.
                    "resources": [{"names": ["client"], "compress": False}],
                }
            ],
            "database": {"name": "sqlite3", "args": {"database": str(d / "homeserver.db")}},
            "log_config": str(d / "log.config"),
        }
        if self.ratelimits == "lifted":
            cfg.update(json.loads(json.dumps(_LIFTED_RATELIMITS)))  # deep copy
            if self.lift_messages:
                cfg["rc_message"] = dict(_HUGE)
        return cfg

    def _log_config(self) -> dict[str, Any]:
        return {
            "version": 1,
            "formatters": {
                "precise": {
                    "format": "%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - "
                    "%(request)s - %(message)s"
                }
            },
            "handlers": {
                "file": {
                    "class": "logging.FileHandler",
                    "formatter": "precise",
                    "filename": str(self.log_path),
                    "encoding": "utf8",
                }
            },
            # SQL and access logs at INFO would make the log huge and slow the server down.
            "loggers": {
                "synapse.storage.SQL": {"level": "WARNING"},
                "synapse.access.http": {"level": "WARNING"},
            },
            "root": {"level": self.log_level, "handlers": ["file"]},
            "disable_existing_loggers": False,
        }

    def _spawn_and_wait(self) -> None:
        d = self.workdir
        # Rewritten on every start so port and rate-limit mode can change; JSON is valid YAML.
        self.config_path.write_text(json.dumps(self._config(), indent=2) + "\n")
        (d / "log.config").write_text(json.dumps(self._log_config(), indent=2) + "\n")
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        # Own session: a Ctrl-C in the terminal does not reach it, and stop() can signal the
        # whole process group. Output goes to a file: a pipe nobody reads could block Synapse.
        with open(self.stdout_path, "ab") as out:
            self._proc = subprocess.Popen(
                [self.python, "-m", "synapse.app.homeserver", "-c", str(self.config_path)],
                cwd=d,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        _LIVE.add(self)
        try:
            self._wait_ready(log_offset)
        except BaseException:
            self.stop(timeout=5.0)
            raise

    def _wait_ready(self, log_offset: int) -> None:
        assert self._proc is not None
        url = self.base_url + "/_matrix/client/versions"
        deadline = time.monotonic() + self.ready_timeout
        while True:
            rc = self._proc.poll()
            if rc is not None:
                raise SynapseStartError(
                    f"Synapse exited with code {rc} during startup\n{self._diagnostics(log_offset)}"
                )
            try:
                with _OPENER.open(url, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise SynapseStartError(
                    f"Synapse not ready at {url} after {self.ready_timeout:g}s\n"
                    f"{self._diagnostics(log_offset)}"
                )
            time.sleep(0.05)

    def _diagnostics(self, log_offset: int) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                f.seek(log_offset)
                log = f.read()[-4000:]
        except OSError:
            log = "<no synapse.log>"
        return (
            f"--- {self.stdout_path} (tail) ---\n{_tail(self.stdout_path)}\n"
            f"--- {self.log_path} (tail, this start) ---\n{log}"
        )

    @staticmethod
    def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        # start_new_session=True makes the child a session and group leader: pgid == pid.
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
