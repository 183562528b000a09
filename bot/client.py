"""A small Python client for progressbot's HTTP API: report progress from any program, and follow events.

Synchronous (standard library only, usable from any script)::

    from bot.client import ProgressClient

    client = ProgressClient("http://127.0.0.1:8765", token)
    with client.track("nightly build", total=len(steps), room="!ops:example.org") as job:
        for step in steps:
            job.checkpoint()        # waits while the job is paused; raises JobCancelledError on cancel
            run(step)
            job.advance(message=f"built {step}")

and asynchronous (aiohttp), with the same shape: ``AsyncProgressClient`` and ``async with client.track(...)``.

Calls such as ``advance()`` only update local state: a background sender posts the latest state at most
once per ``min_interval`` (500 ms), however often the program calls them, and always sends the last state.
Each reply says whether someone asked the job to pause or cancel (``should_pause`` / ``should_cancel``).
On leaving the ``with`` block the job is completed, or failed with the exception that ended the block.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import logging
import os
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterator
from types import TracebackType
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_URL = "http://127.0.0.1:8765"
#: Environment variables read when ``url`` / ``token`` are not given.
URL_ENV = "PROGRESSBOT_URL"
TOKEN_ENV = "PROGRESSBOT_HTTP__TOKEN"
NDJSON = "application/x-ndjson"
#: Pending log entries kept while the service is unreachable (the oldest are dropped beyond this).
MAX_PENDING_LOGS = 1000
#: Log entries sent with one progress report (the server accepts up to 100).
LOGS_PER_REPORT = 100


class ProgressApiError(Exception):
    """The service refused a request: ``status`` is the HTTP status, ``error``/``detail`` its JSON body."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(f"{status} {error}: {detail}")
        self.status = status
        self.error = error
        self.detail = detail


class JobCancelledError(Exception):
    """Someone cancelled the tracked job (from chat or the API); the program should stop its work."""

    def __init__(self, job_id: int) -> None:
        super().__init__(f"job #{job_id} was cancelled")
        self.job_id = job_id


def resolve_url(url: str | None) -> str:
    """``url``, else ``$PROGRESSBOT_URL``, else the default loopback address; without a trailing slash."""
    return (url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")


def resolve_token(token: str | None) -> str:
    """``token``, else ``$PROGRESSBOT_HTTP__TOKEN``; raises ValueError when neither is set."""
    tok = token or os.environ.get(TOKEN_ENV)
    if not tok:
        raise ValueError(f"no API token: pass token= or set {TOKEN_ENV}")
    return tok


def _error_from(status: int, raw: bytes) -> ProgressApiError:
    try:
        body = json.loads(raw)
        return ProgressApiError(status, str(body.get("error", "error")), str(body.get("detail", "")))
    except (ValueError, AttributeError):
        return ProgressApiError(status, "error", raw[:200].decode("utf-8", "replace"))


def _events_query(job_id: int | str | None, batch: int | None, after: int | None) -> str:
    params: dict[str, str] = {}
    if job_id is not None:
        params["job"] = str(job_id)
    if batch is not None:
        params["batch"] = str(batch)
    if after is not None:
        params["after"] = str(after)
    return "/v1/events" + ("?" + urllib.parse.urlencode(params) if params else "")


def _stream_ended(ev: dict[str, Any], job_id: int | str | None, batch: int | None) -> bool:
    """Whether ``ev`` is the terminal event that ends a job or batch stream."""
    if ev.get("status") not in ("completed", "failed", "cancelled"):
        return False
    if job_id is not None:
        return ev.get("type") == "job" and str(ev.get("id")) == str(job_id)
    if batch is not None:
        return ev.get("type") == "batch" and ev.get("id") == batch
    return False


# ------------------------------------------------------------------ shared state
class _TrackState:
    """What the program reported and what the service answered; shared by the sync and async trackers.

    The program's thread updates it; the sender takes snapshots. A lock keeps the two consistent, and
    ``report`` calls stay cheap: no I/O, and a wake-up only when the state turns dirty.
    """

    def __init__(self, job_id: int, total: float | None, min_interval: float, poll_interval: float) -> None:
        self.job_id = job_id
        self.min_interval = min_interval
        self.poll_interval = poll_interval
        self.lock = threading.Lock()
        #: None until the program reports a number (a job may only ever send messages).
        self.current: float | None = None
        self.total = total
        self.message: str | None = None
        self.stage: str | None = None
        self.logs: list[dict[str, str]] = []
        self.dirty = False
        self.control = "run"
        self.status = "running"
        self.gone = False
        #: When the last request for this job started (the create counts).
        self.last_sent = time.monotonic()
        self.sent = 0
        self.notify: Callable[[], None] = lambda: None
        #: Called after each reply was applied (the async tracker wakes ``wait_if_paused`` with it).
        self.on_apply: Callable[[], None] = lambda: None

    def _touch(self) -> None:
        # Called with the lock held. Wake the sender only on the clean -> dirty edge: while dirty it is
        # already waiting for the window to open, so further calls cost no wake-up at all.
        if not self.dirty:
            self.dirty = True
            self.notify()

    def advance(self, n: float, message: str | None) -> None:
        with self.lock:
            self.current = (self.current or 0.0) + n
            if message is not None:
                self.message = message
            self._touch()

    def report(
        self, current: float | None, total: float | None, message: str | None, stage: str | None
    ) -> None:
        with self.lock:
            if current is not None:
                self.current = current
            if total is not None:
                self.total = total
            if message is not None:
                self.message = message
            if stage is not None:
                self.stage = stage
            self._touch()

    def add_log(self, level: str, message: str) -> None:
        with self.lock:
            self.logs.append({"level": level, "message": message[:2000]})
            del self.logs[:-MAX_PENDING_LOGS]
            self._touch()

    def next_send_in(self, now: float) -> float:
        """Seconds until the sender should post (<= 0: now)."""
        with self.lock:
            if self.dirty:
                return self.last_sent + self.min_interval - now
            # Nothing new: still ask now and then, so that a pause or cancel reaches an idle program.
            wait = self.min_interval if self.control == "pause" else self.poll_interval
            return self.last_sent + wait - now

    def take(self) -> dict[str, Any]:
        """The body of the next progress report; marks the state clean."""
        with self.lock:
            body: dict[str, Any] = {} if self.current is None else {"current": self.current}
            if self.total is not None:
                body["total"] = self.total
            if self.message is not None:
                body["message"] = self.message[:2000]
            if self.stage is not None:
                body["stage"] = self.stage[:200]
            if self.logs:
                body["logs"] = self.logs[:LOGS_PER_REPORT]
                del self.logs[:LOGS_PER_REPORT]
            # Logs left over (more than one report's worth) keep the state dirty for the next window.
            self.dirty = bool(self.logs)
            self.last_sent = time.monotonic()
            self.sent += 1
            return body

    def restore(self, body: dict[str, Any]) -> None:
        """A report failed: keep its logs and send the (newer) state again later."""
        with self.lock:
            self.logs[:0] = body.get("logs", [])
            del self.logs[:-MAX_PENDING_LOGS]
            self.dirty = True

    def final_body(self) -> dict[str, Any]:
        """The last state, sent along with complete/fail."""
        with self.lock:
            body: dict[str, Any] = {} if self.current is None else {"current": self.current}
            if self.total is not None:
                body["total"] = self.total
            if self.message is not None:
                body["message"] = self.message[:2000]
            if self.stage is not None:
                body["stage"] = self.stage[:200]
            if self.logs:
                body["logs"] = self.logs[-LOGS_PER_REPORT:]
                self.logs.clear()
            self.dirty = False
            return body

    def apply(self, reply: dict[str, Any]) -> None:
        """Take the control state from a reply."""
        with self.lock:
            self.control = str(reply.get("control", self.control))
            self.status = str(reply.get("status", self.status))
        self.on_apply()


class _TrackerBase:
    """The reporting methods shared by :class:`TrackedJob` and :class:`AsyncTrackedJob`."""

    _state: _TrackState
    raise_on_cancel: bool

    @property
    def id(self) -> int:
        """The job id."""
        return self._state.job_id

    @property
    def control(self) -> str:
        """The last control state the service sent: ``run``, ``pause`` or ``cancel``."""
        return self._state.control

    @property
    def status(self) -> str:
        """The job's status as of the last reply."""
        return self._state.status

    @property
    def should_pause(self) -> bool:
        """Someone asked the job to pause (call ``wait_if_paused()`` or ``checkpoint()`` to honour it)."""
        return self._state.control == "pause"

    @property
    def should_cancel(self) -> bool:
        """Someone cancelled the job; stop the work."""
        return self._state.control == "cancel"

    @property
    def current(self) -> float:
        """The progress reported so far (0 before any)."""
        return self._state.current or 0.0

    @property
    def total(self) -> float | None:
        """The total, if known."""
        return self._state.total

    @property
    def reports_sent(self) -> int:
        """How many progress reports went out (for tests and curiosity)."""
        return self._state.sent

    def check(self) -> None:
        """Raise :class:`JobCancelledError` if the job was cancelled."""
        if self._state.control == "cancel":
            raise JobCancelledError(self._state.job_id)

    def _maybe_raise(self) -> None:
        if self.raise_on_cancel and self._state.control == "cancel":
            raise JobCancelledError(self._state.job_id)

    def advance(self, n: float = 1, *, message: str | None = None) -> None:
        """Add ``n`` to the progress (cheap: no I/O; the sender reports it within 500 ms)."""
        self._maybe_raise()
        self._state.advance(n, message)

    def report(
        self,
        current: float | None = None,
        *,
        total: float | None = None,
        message: str | None = None,
        stage: str | None = None,
    ) -> None:
        """Set the progress, total, message or stage name (cheap: no I/O)."""
        self._maybe_raise()
        self._state.report(current, total, message, stage)

    def log(self, message: str, level: str = "info") -> None:
        """Add an entry to the job's activity log (sent with the next report)."""
        if level not in ("debug", "info", "warning", "error"):
            raise ValueError("level must be debug, info, warning or error")
        self._maybe_raise()
        self._state.add_log(level, message)


# ---------------------------------------------------------------- sync transport
class _SyncHttp:
    """Blocking JSON requests over keep-alive ``http.client`` connections, one per thread."""

    #: Reconnect before reusing a connection idle this long (aiohttp closes idle ones after 75 s).
    MAX_IDLE = 30.0

    def __init__(self, url: str, token: str, timeout: float) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"unsupported URL scheme in {url!r}; use http:// or https://")
        self.scheme = parts.scheme
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.prefix = parts.path.rstrip("/")
        self.timeout = timeout
        self._auth = f"Bearer {token}"
        self._local = threading.local()
        self._all: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def new_connection(self, timeout: float | None) -> http.client.HTTPConnection:
        """A fresh connection (streams get their own)."""
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=timeout)

    def _conn(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        used: float = getattr(self._local, "used", 0.0)
        if conn is not None and time.monotonic() - used > self.MAX_IDLE:
            conn.close()
            conn = None
        if conn is None:
            conn = self.new_connection(self.timeout)
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
        self._local.conn = None

    def headers(self, accept: str = "application/json") -> dict[str, str]:
        """Request headers with the token."""
        return {"Authorization": self._auth, "Accept": accept, "Content-Type": "application/json"}

    def request(self, method: str, path: str, body: Any = None, *, retry: bool = False) -> Any:
        """Send one request; returns the decoded JSON reply or raises :class:`ProgressApiError`/OSError.

        ``retry``: try once more on a fresh connection if the kept-alive one turned out dead (only for
        requests that are safe to repeat).
        """
        data = None if body is None else json.dumps(body).encode()
        for attempt in (0, 1):
            conn = self._conn()
            try:
                conn.request(method, self.prefix + path, body=data, headers=self.headers())
                resp = conn.getresponse()
                raw = resp.read()
            except (
                http.client.RemoteDisconnected,
                ConnectionResetError,
                BrokenPipeError,
                http.client.CannotSendRequest,
                http.client.ResponseNotReady,
            ):
                self._drop()
                if attempt == 0 and retry:
                    continue
                raise
            except (OSError, http.client.HTTPException):
                self._drop()
                raise
            self._local.used = time.monotonic()
            if resp.status >= 400:
                raise _error_from(resp.status, raw)
            return json.loads(raw) if raw else None
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        """Close every connection this client opened."""
        with self._lock:
            conns, self._all = self._all, []
        for c in conns:
            with contextlib.suppress(Exception):
                c.close()


# ------------------------------------------------------------------- sync client
class TrackedJob(_TrackerBase):
    """A tracked job reported from this program (see :meth:`ProgressClient.track`).

    Use it as a context manager: it is created on entry, and completed (or failed with the exception) on
    exit. A background thread sends the latest state at most every ``min_interval`` seconds.
    """

    def __init__(
        self,
        client: ProgressClient,
        name: str,
        *,
        total: float | None,
        room: str | None,
        owner: str | None,
        raise_on_cancel: bool,
    ) -> None:
        self._client = client
        self._name = name
        self._total = total
        self._create: dict[str, Any] = {"name": name, "total": total, "room": room, "owner": owner}
        self.raise_on_cancel = raise_on_cancel
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._finished = False
        self._warned = False

    # --------------------------------------------------------------- lifecycle
    def start(self) -> TrackedJob:
        """Create the job on the service and start the sender (``with`` does this for you)."""
        if self._thread is not None:
            return self
        body = {k: v for k, v in self._create.items() if v is not None}
        body["kind"] = "tracked"
        reply = self._client._http.request("POST", "/v1/jobs", body)
        self._state = _TrackState(
            int(reply["id"]), self._total, self._client.min_interval, self._client.poll_interval
        )
        self._state.notify = self._wake.set
        self._thread = threading.Thread(target=self._run, name=f"progressbot-track-{self.id}", daemon=True)
        self._thread.start()
        return self

    def __enter__(self) -> TrackedJob:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._finished:
            self._stop_sender()
            return
        if exc is None:
            self.complete()
            return
        try:
            if isinstance(exc, JobCancelledError) or self._state.control == "cancel":
                self._stop_sender()  # already cancelled on the service: nothing to finish
            else:
                self.fail(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        except Exception as err:  # never hide the program's own exception behind a reporting error
            log.warning("could not report the end of job #%s: %s", self.id, err)

    def _stop_sender(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self._client.timeout + 1)

    # ------------------------------------------------------------------ sender
    def _run(self) -> None:
        st = self._state
        while not self._stop.is_set():
            self._wake.clear()
            delay = st.next_send_in(time.monotonic())
            if delay > 0:
                self._wake.wait(delay)
                continue
            self._send(st.take())
            if st.gone:
                return

    def _send(self, body: dict[str, Any]) -> None:
        st = self._state
        try:
            reply = self._client._http.request("POST", f"/v1/jobs/{st.job_id}/progress", body, retry=True)
        except ProgressApiError as exc:
            if exc.status == 404:
                st.gone = True
                log.warning("job #%s no longer exists on the service; stopped reporting", st.job_id)
            else:
                log.warning("progress report for job #%s refused: %s", st.job_id, exc)
            return
        except (OSError, http.client.HTTPException) as exc:
            st.restore(body)
            if not self._warned:
                self._warned = True
                log.warning("cannot reach the progressbot service (%s); will keep trying", exc)
            return
        self._warned = False
        st.apply(reply)

    # ---------------------------------------------------------------- control
    def wait_if_paused(self, timeout: float | None = None) -> bool:
        """Block while the job is paused; returns True once it may run. Raises on cancel (if enabled).

        Returns False if ``timeout`` passed while still paused.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._state.control == "pause":
            if deadline is not None and time.monotonic() >= deadline:
                return False
            # The sender polls every min_interval while paused; just look again a little later.
            time.sleep(min(0.1, self._state.min_interval))
        self._maybe_raise()
        return True

    def checkpoint(self) -> None:
        """The pause/cancel point: raises :class:`JobCancelledError` on cancel, waits while paused."""
        self.check()
        self.wait_if_paused()
        self.check()

    def refresh(self) -> str:
        """Ask the service for the control state now (outside the throttle); returns it."""
        reply = self._client._http.request("POST", f"/v1/jobs/{self.id}/progress", {}, retry=True)
        self._state.apply(reply)
        return self._state.control

    # ------------------------------------------------------------------ finish
    def _finish(self, path: str, extra: dict[str, Any]) -> dict[str, Any]:
        self._stop_sender()
        self._finished = True
        body = self._state.final_body()
        body.update(extra)
        reply: dict[str, Any] = self._client._http.request("POST", f"/v1/jobs/{self.id}/{path}", body)
        self._state.status = str(reply.get("status", self._state.status))
        return reply

    def complete(self, result: Any = None) -> dict[str, Any]:
        """Mark the job completed (with an optional JSON ``result``); a cancelled job is left as it is."""
        if self._state.control == "cancel":
            self._stop_sender()
            self._finished = True
            return {"id": self.id, "status": "cancelled"}
        return self._finish("complete", {"result": result} if result is not None else {})

    def fail(self, error: str) -> dict[str, Any]:
        """Mark the job failed with ``error``."""
        return self._finish("fail", {"error": error[:2000]})


class ProgressClient:
    """A synchronous client of the HTTP API (standard library only; thread-safe).

    ``url`` defaults to ``$PROGRESSBOT_URL`` or ``http://127.0.0.1:8765``, ``token`` to
    ``$PROGRESSBOT_HTTP__TOKEN``.
    """

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 10.0,
        min_interval: float = 0.5,
        poll_interval: float = 2.0,
    ) -> None:
        self.url = resolve_url(url)
        self.timeout = timeout
        self.min_interval = min_interval
        self.poll_interval = max(poll_interval, min_interval)
        self._http = _SyncHttp(self.url, resolve_token(token), timeout)

    def __enter__(self) -> ProgressClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections."""
        self._http.close()

    def request(self, method: str, path: str, body: Any = None) -> Any:
        """Any API request; returns the JSON reply, raises :class:`ProgressApiError` on a refusal."""
        return self._http.request(method, path, body, retry=method == "GET")

    # ---------------------------------------------------------------- jobs
    def health(self) -> dict[str, Any]:
        """``GET /healthz``."""
        result: dict[str, Any] = self.request("GET", "/healthz")
        return result

    def stats(self) -> dict[str, Any]:
        """``GET /v1/stats``."""
        result: dict[str, Any] = self.request("GET", "/v1/stats")
        return result

    def submit(self, type: str, payload: dict[str, Any] | None = None, **options: Any) -> int:
        """Submit a queued job; returns its id. ``options``: name, priority, delay, max_attempts, ..."""
        reply = self.request("POST", "/v1/jobs", {"type": type, "payload": payload or {}, **options})
        return int(reply["id"])

    def get(self, job_id: int | str) -> dict[str, Any]:
        """One job, with its recent activity."""
        result: dict[str, Any] = self.request("GET", f"/v1/jobs/{job_id}")
        return result

    def jobs(
        self, *, status: str | None = None, type: str | None = None, limit: int = 50
    ) -> list[dict[str, Any]]:
        """Jobs, newest first (``status`` may be a comma-separated list, ``active`` or ``all``)."""
        q = {k: v for k, v in {"status": status, "type": type, "limit": str(limit)}.items() if v}
        result: list[dict[str, Any]] = self.request("GET", "/v1/jobs?" + urllib.parse.urlencode(q))["jobs"]
        return result

    def act(self, job_id: int | str, action: str, *, actor: str | None = None) -> dict[str, Any]:
        """Pause, resume, cancel or retry a job (raises :class:`ProgressApiError` 409 if not allowed)."""
        body = {"actor": actor} if actor else {}
        result: dict[str, Any] = self.request("POST", f"/v1/jobs/{job_id}/{action}", body)
        return result

    def pause(self, job_id: int | str) -> dict[str, Any]:
        """Pause a job."""
        return self.act(job_id, "pause")

    def resume(self, job_id: int | str) -> dict[str, Any]:
        """Resume a paused job."""
        return self.act(job_id, "resume")

    def cancel(self, job_id: int | str) -> dict[str, Any]:
        """Cancel a job."""
        return self.act(job_id, "cancel")

    def retry(self, job_id: int | str) -> dict[str, Any]:
        """Retry a failed or cancelled job."""
        return self.act(job_id, "retry")

    def track(
        self,
        name: str,
        *,
        total: float | None = None,
        room: str | None = None,
        owner: str | None = None,
        raise_on_cancel: bool = True,
    ) -> TrackedJob:
        """A tracked job for work this program does; use it as a context manager."""
        return TrackedJob(self, name, total=total, room=room, owner=owner, raise_on_cancel=raise_on_cancel)

    # -------------------------------------------------------------- events
    def events(
        self,
        job_id: int | str | None = None,
        *,
        batch: int | None = None,
        after: int | None = None,
        reconnect: bool = True,
        read_timeout: float = 60.0,
        max_retries: int = 5,
    ) -> Iterator[dict[str, Any]]:
        """Iterate over events (dicts, as in the NDJSON stream) of one job, one batch, or all jobs.

        A job or batch stream ends after its terminal event. A dropped connection is resumed after the last
        seq seen (``reconnect``), giving up after ``max_retries`` failures in a row.
        """
        last = after
        failures = 0
        while True:
            conn = self._http.new_connection(read_timeout)
            try:
                conn.request(
                    "GET",
                    self._http.prefix + _events_query(job_id, batch, last),
                    headers=self._http.headers(NDJSON),
                )
                resp = conn.getresponse()
                if resp.status >= 400:
                    raise _error_from(resp.status, resp.read())
                failures = 0
                for raw in resp:
                    line = raw.strip()
                    if not line:
                        continue
                    ev: dict[str, Any] = json.loads(line)
                    if ev.get("type") == "keepalive":
                        continue
                    if isinstance(ev.get("seq"), int):
                        last = ev["seq"]
                    yield ev
                    if _stream_ended(ev, job_id, batch):
                        return
                if job_id is not None or batch is not None:
                    return  # the server ended the stream: the job had already finished
            except (OSError, http.client.HTTPException) as exc:
                failures += 1
                if not reconnect or failures > max_retries:
                    raise
                log.info("event stream interrupted (%s); reconnecting", exc)
                time.sleep(min(10.0, 0.25 * 2**failures))
                continue
            finally:
                conn.close()
            if not reconnect:
                return


# ------------------------------------------------------------------ async client
class AsyncTrackedJob(_TrackerBase):
    """The asyncio variant of :class:`TrackedJob` (``async with client.track(...) as job``)."""

    def __init__(
        self,
        client: AsyncProgressClient,
        name: str,
        *,
        total: float | None,
        room: str | None,
        owner: str | None,
        raise_on_cancel: bool,
    ) -> None:
        self._client = client
        self._total = total
        self._create: dict[str, Any] = {"name": name, "total": total, "room": room, "owner": owner}
        self.raise_on_cancel = raise_on_cancel
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._wake = asyncio.Event()
        self._applied = asyncio.Event()
        self._finished = False
        self._warned = False

    async def start(self) -> AsyncTrackedJob:
        """Create the job on the service and start the sender task."""
        if self._task is not None:
            return self
        body = {k: v for k, v in self._create.items() if v is not None}
        body["kind"] = "tracked"
        reply = await self._client.request("POST", "/v1/jobs", body)
        self._state = _TrackState(
            int(reply["id"]), self._total, self._client.min_interval, self._client.poll_interval
        )
        self._state.notify = self._wake.set
        self._state.on_apply = self._applied.set
        self._task = asyncio.create_task(self._run(), name=f"progressbot-track-{self.id}")
        return self

    async def __aenter__(self) -> AsyncTrackedJob:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._finished:
            await self._stop_sender()
            return
        if exc is None:
            await self.complete()
            return
        try:
            if isinstance(exc, JobCancelledError) or self._state.control == "cancel":
                await self._stop_sender()
            else:
                await self.fail(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
        except Exception as err:
            log.warning("could not report the end of job #%s: %s", self.id, err)

    async def _stop_sender(self) -> None:
        # The flag ends the loop even if a cancellation got lost in a race with a wake-up.
        self._stopping = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        st = self._state
        while not self._stopping:
            self._wake.clear()
            delay = st.next_send_in(time.monotonic())
            if delay > 0:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that races a wake-up.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()
                continue
            body = st.take()
            try:
                reply = await self._client.request("POST", f"/v1/jobs/{st.job_id}/progress", body)
            except ProgressApiError as exc:
                if exc.status == 404:
                    st.gone = True
                    log.warning("job #%s no longer exists on the service; stopped reporting", st.job_id)
                    return
                log.warning("progress report for job #%s refused: %s", st.job_id, exc)
                continue
            except (OSError, TimeoutError) as exc:  # aiohttp's ClientError is an OSError subclass
                st.restore(body)
                if not self._warned:
                    self._warned = True
                    log.warning("cannot reach the progressbot service (%s); will keep trying", exc)
                continue
            except Exception as exc:  # any other client error: keep reporting, never crash the program
                st.restore(body)
                log.warning("progress report for job #%s failed: %s", st.job_id, exc)
                continue
            self._warned = False
            st.apply(reply)

    async def wait_if_paused(self) -> None:
        """Wait while the job is paused (raises on cancel if enabled). Bound it with ``asyncio.timeout``."""
        while self._state.control == "pause":
            self._applied.clear()
            await self._applied.wait()  # the sender polls every min_interval while paused
        self._maybe_raise()

    async def checkpoint(self) -> None:
        """The pause/cancel point: raises :class:`JobCancelledError` on cancel, waits while paused."""
        self.check()
        await self.wait_if_paused()
        self.check()

    async def refresh(self) -> str:
        """Ask the service for the control state now; returns it."""
        reply = await self._client.request("POST", f"/v1/jobs/{self.id}/progress", {})
        self._state.apply(reply)
        return self._state.control

    async def _finish(self, path: str, extra: dict[str, Any]) -> dict[str, Any]:
        await self._stop_sender()
        self._finished = True
        body = self._state.final_body()
        body.update(extra)
        reply: dict[str, Any] = await self._client.request("POST", f"/v1/jobs/{self.id}/{path}", body)
        self._state.status = str(reply.get("status", self._state.status))
        return reply

    async def complete(self, result: Any = None) -> dict[str, Any]:
        """Mark the job completed; a cancelled job is left as it is."""
        if self._state.control == "cancel":
            await self._stop_sender()
            self._finished = True
            return {"id": self.id, "status": "cancelled"}
        return await self._finish("complete", {"result": result} if result is not None else {})

    async def fail(self, error: str) -> dict[str, Any]:
        """Mark the job failed with ``error``."""
        return await self._finish("fail", {"error": error[:2000]})


class AsyncProgressClient:
    """The asyncio client of the HTTP API (aiohttp); close it with ``await client.close()``."""

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 10.0,
        min_interval: float = 0.5,
        poll_interval: float = 2.0,
    ) -> None:
        self.url = resolve_url(url)
        self.timeout = timeout
        self.min_interval = min_interval
        self.poll_interval = max(poll_interval, min_interval)
        self._headers = {"Authorization": f"Bearer {resolve_token(token)}", "Accept": "application/json"}
        self._session: Any = None

    def _sess(self) -> Any:
        import aiohttp

        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(headers=self._headers)
        return self._session

    async def __aenter__(self) -> AsyncProgressClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(self, method: str, path: str, body: Any = None) -> Any:
        """Any API request; returns the JSON reply, raises :class:`ProgressApiError` on a refusal."""
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=self.timeout)
        async with self._sess().request(method, self.url + path, json=body, timeout=timeout) as resp:
            raw = await resp.read()
            if resp.status >= 400:
                raise _error_from(resp.status, raw)
            return json.loads(raw) if raw else None

    async def health(self) -> dict[str, Any]:
        """``GET /healthz``."""
        result: dict[str, Any] = await self.request("GET", "/healthz")
        return result

    async def stats(self) -> dict[str, Any]:
        """``GET /v1/stats``."""
        result: dict[str, Any] = await self.request("GET", "/v1/stats")
        return result

    async def submit(self, type: str, payload: dict[str, Any] | None = None, **options: Any) -> int:
        """Submit a queued job; returns its id."""
        reply = await self.request("POST", "/v1/jobs", {"type": type, "payload": payload or {}, **options})
        return int(reply["id"])

    async def get(self, job_id: int | str) -> dict[str, Any]:
        """One job, with its recent activity."""
        result: dict[str, Any] = await self.request("GET", f"/v1/jobs/{job_id}")
        return result

    async def act(self, job_id: int | str, action: str, *, actor: str | None = None) -> dict[str, Any]:
        """Pause, resume, cancel or retry a job."""
        result: dict[str, Any] = await self.request(
            "POST", f"/v1/jobs/{job_id}/{action}", {"actor": actor} if actor else {}
        )
        return result

    def track(
        self,
        name: str,
        *,
        total: float | None = None,
        room: str | None = None,
        owner: str | None = None,
        raise_on_cancel: bool = True,
    ) -> AsyncTrackedJob:
        """A tracked job; use it with ``async with``."""
        return AsyncTrackedJob(
            self, name, total=total, room=room, owner=owner, raise_on_cancel=raise_on_cancel
        )

    async def events(
        self,
        job_id: int | str | None = None,
        *,
        batch: int | None = None,
        after: int | None = None,
        reconnect: bool = True,
        read_timeout: float = 60.0,
        max_retries: int = 5,
    ) -> AsyncIterator[dict[str, Any]]:
        """Iterate over events of one job, one batch, or all jobs (see :meth:`ProgressClient.events`)."""
        import aiohttp

        last = after
        failures = 0
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout, sock_read=read_timeout)
        while True:
            try:
                async with self._sess().get(
                    self.url + _events_query(job_id, batch, last), headers={"Accept": NDJSON}, timeout=timeout
                ) as resp:
                    if resp.status >= 400:
                        raise _error_from(resp.status, await resp.read())
                    failures = 0
                    async for raw in resp.content:
                        line = raw.strip()
                        if not line:
                            continue
                        ev: dict[str, Any] = json.loads(line)
                        if ev.get("type") == "keepalive":
                            continue
                        if isinstance(ev.get("seq"), int):
                            last = ev["seq"]
                        yield ev
                        if _stream_ended(ev, job_id, batch):
                            return
                    if job_id is not None or batch is not None:
                        return
            except (aiohttp.ClientError, OSError, TimeoutError):
                failures += 1
                if not reconnect or failures > max_retries:
                    raise
                await asyncio.sleep(min(10.0, 0.25 * 2**failures))
                continue
            if not reconnect:
                return


__all__ = [
    "AsyncProgressClient",
    "AsyncTrackedJob",
    "JobCancelledError",
    "ProgressApiError",
    "ProgressClient",
    "TrackedJob",
    "resolve_token",
    "resolve_url",
]
