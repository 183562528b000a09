"""The HTTP API (aiohttp): submit and track jobs, control them, and stream their progress.

Every route but ``/healthz`` needs ``Authorization: Bearer <token>`` (the token comes from
``PROGRESSBOT_HTTP__TOKEN``; it is compared in constant time). Errors are JSON ``{"error", "detail"}``
with the matching status code; nothing is stored when a request is refused, and tracebacks only go to
the log.

Routes::

    GET  /healthz                                  liveness (no auth, no job data)
    GET  /v1/stats                                 counts by status, streams, requests
    POST /v1/jobs                                  submit a queued job, or create a tracked one
    GET  /v1/jobs?status=&type=&batch=&room=&limit=
    GET  /v1/jobs/{id}                             one job, with its last activity entries
    POST /v1/jobs/{id}/progress                    tracked jobs: {current,total,message,stage,logs}
    POST /v1/jobs/{id}/log                         tracked jobs: {level, message}
    POST /v1/jobs/{id}/complete | fail             tracked jobs
    POST /v1/jobs/{id}/pause|resume|cancel|retry
    POST /v1/batches                               {name, jobs: [{type, payload, ...}]}
    GET  /v1/batches/{id}
    POST /v1/batches/{id}/pause|resume|cancel|retry
    GET  /v1/events[?job=ID|batch=ID][&after=SEQ]  NDJSON or SSE, by the Accept header
    *    /mcp                                      MCP (streamable HTTP), see bot/mcp_server.py
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import re
import socket
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, TypeVar

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.errors import (
    IllegalTransition,
    JobNotFound,
    NotTracked,
    PayloadError,
    ProgressbotError,
    UnknownJobType,
)
from core.events import EventFilter, JobProgressEvent, make_filter
from core.lifecycle import Action
from core.models import ACTIVE_STATUSES, TERMINAL_STATUSES, Control, Job, JobStatus
from core.monitor import JobView
from core.refs import MAX_ID, parse_batch_id, parse_job_id
from core.salvage import db_trouble
from core.serialize import job_to_dict
from core.service import JobRequest, ProgressService
from core.store import ActionResult, BatchSummary
from core.text import MAX_DEPTH, MAX_MESSAGE, clean_json, clean_text, json_depth_exceeds, safe_json_bytes

from .settings import HttpSettings, Settings
from .web import WEB_AUTH
from .web import install as install_web

#: The action segment of the job and batch action routes: pause|resume|cancel|retry.
_ACTIONS = "|".join(Action)

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: Media types of the two stream formats.
NDJSON = "application/x-ndjson"
SSE = "text/event-stream"

_STATUSES = frozenset(str(s) for s in JobStatus)
_MAX_LIMIT = 1000
#: How many of a job's newest activity entries ``GET /v1/jobs/{id}`` includes.
ACTIVITY_IN_JOB = 20


class HttpConfigError(ProgressbotError):
    """The ``[http]`` section cannot be served as configured (e.g. no token in the environment)."""


class ApiError(Exception):
    """A refusal with a status code, a short machine-readable ``error`` and a readable ``detail``."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail


# ----------------------------------------------------------------- request bodies
class _Body(BaseModel):
    # Unknown fields are refused: a typo ("totl") must not be silently ignored.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class SubmitBody(_Body):
    """``POST /v1/jobs`` for a queued job."""

    kind: Literal["queued"] | None = None
    type: str = Field(min_length=1, max_length=200)
    payload: dict[str, Any] | None = None
    name: str | None = Field(None, max_length=300)
    priority: int = Field(0, ge=-1_000_000, le=1_000_000)
    delay: float | None = Field(None, ge=0, le=366 * 86400)
    run_at: datetime | None = None
    max_attempts: int | None = Field(None, ge=1, le=100)
    timeout: float | None = Field(None, gt=0)
    owner: str | None = Field(None, max_length=300)
    room: str | None = Field(None, max_length=300)


class TrackBody(_Body):
    """``POST /v1/jobs`` for a tracked job (work done by the caller, which reports progress)."""

    kind: Literal["tracked"] | None = None
    type: str = Field("tracked", min_length=1, max_length=200)
    name: str = Field(min_length=1, max_length=300)
    total: float | None = Field(None, ge=0)
    owner: str | None = Field(None, max_length=300)
    room: str | None = Field(None, max_length=300)


class LogBody(_Body):
    """One activity entry."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    message: str = Field(min_length=1, max_length=2000)


class ProgressBody(_Body):
    """``POST /v1/jobs/{id}/progress``: every field is optional; an empty body just asks for the control."""

    current: float | None = Field(None, ge=0)
    total: float | None = Field(None, ge=0)
    message: str | None = Field(None, max_length=2000)
    stage: str | None = Field(None, max_length=200)
    logs: list[LogBody] = Field(default_factory=list, max_length=100)


class FinishBody(ProgressBody):
    """``POST /v1/jobs/{id}/complete|fail``; the final progress may come along, so one request ends a job."""

    result: Any = None
    error: str | None = Field(None, max_length=2000)


class ActionBody(_Body):
    """``POST .../pause|resume|cancel|retry``: who asks (shown in chat, e.g. "cancelled by ci")."""

    actor: str | None = Field(None, min_length=1, max_length=300)


class BatchJobBody(_Body):
    """One job of ``POST /v1/batches``."""

    type: str = Field(min_length=1, max_length=200)
    payload: dict[str, Any] | None = None
    name: str | None = Field(None, max_length=300)
    priority: int = Field(0, ge=-1_000_000, le=1_000_000)
    max_attempts: int | None = Field(None, ge=1, le=100)
    timeout: float | None = Field(None, gt=0)


class BatchBody(_Body):
    """``POST /v1/batches``."""

    name: str = Field(min_length=1, max_length=300)
    jobs: list[BatchJobBody] = Field(min_length=1, max_length=10_000)
    owner: str | None = Field(None, max_length=300)
    room: str | None = Field(None, max_length=300)


#: Seconds a client should wait before retrying when the database is busy or unreachable.
RETRY_AFTER_BUSY = 2
RETRY_AFTER_UNAVAILABLE = 10


# ----------------------------------------------------------------------- helpers
def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """A JSON reply (always encodable: see :func:`core.text.safe_json_bytes`)."""
    return web.Response(
        body=safe_json_bytes(data), status=status, content_type="application/json", headers=headers
    )


def error_response(
    status: int, error: str, detail: str, headers: dict[str, str] | None = None
) -> web.Response:
    """The JSON error shape: ``{"error": code, "detail": text}``."""
    return json_response({"error": error, "detail": detail}, status=status, headers=headers)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _validation_detail(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = ".".join(str(p) for p in err.get("loc", ()))
        msg = err.get("msg", "invalid")
        if err.get("type") == "extra_forbidden":
            msg = "unknown field"
        parts.append(f"{loc or 'body'}: {msg.removeprefix('Value error, ')}")
    return "; ".join(parts[:20])


def negotiate_stream(accept: str) -> str | None:
    """Pick the stream format from an Accept header: ``"ndjson"``, ``"sse"`` or None (nothing acceptable).

    The highest q wins; on a tie the range listed first wins. ``*/*`` (curl's default) and a missing
    header mean NDJSON.
    """
    if not accept.strip():
        return "ndjson"
    best: tuple[float, int, str] | None = None
    for pos, part in enumerate(accept.split(",")):
        media, *params = (p.strip() for p in part.split(";"))
        media = media.lower()
        q = 1.0
        for p in params:
            k, _, v = p.partition("=")
            if k.strip().lower() == "q":
                try:
                    q = float(v)
                except ValueError:
                    q = 0.0
        kind = {
            NDJSON: "ndjson",
            "application/ndjson": "ndjson",
            "application/jsonl": "ndjson",
            "application/*": "ndjson",
            "*/*": "ndjson",
            SSE: "sse",
            "text/*": "sse",
        }.get(media)
        if kind is None or q <= 0:
            continue
        if best is None or q > best[0]:
            best = (q, pos, kind)
    return None if best is None else best[2]


def control_of(job: Job | JobView) -> str:
    """What a tracked program should do now: ``run``, ``pause`` or ``cancel``."""
    if job.status == JobStatus.CANCELLED or job.control == Control.CANCEL:
        return "cancel"
    if job.status == JobStatus.PAUSED or job.control == Control.PAUSE:
        return "pause"
    return "run"


def batch_to_dict(summary: BatchSummary) -> dict[str, Any]:
    """A batch's aggregate state as JSON."""
    b = summary.batch
    return {
        "id": b.id,
        "name": b.name,
        "status": str(summary.status),
        "owner": b.owner,
        "room": b.room,
        "total": summary.total,
        "counts": {str(k): v for k, v in summary.counts.items()},
        "completed": summary.completed,
        "failed": summary.failed,
        "current_operation": summary.current_operation,
        "errors": list(summary.errors),
        "created_at": b.created_at.isoformat() if b.created_at else None,
    }


def _is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_listen(listen: str) -> tuple[str, int]:
    """``"127.0.0.1:8765"`` -> ``("127.0.0.1", 8765)``; ``"[::1]:80"`` -> ``("::1", 80)``."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


# ----------------------------------------------------------------- replay buffer
class ReplayLog:
    """The latest event of each job and batch, in seq order, so a stream can resume from ``Last-Event-ID``.

    Events are latest-state snapshots, so resuming does not need history: the newest event of every key
    emitted after the client's last seq is enough. Memory is bounded by ``max_keys``; when a key is evicted
    the log remembers the highest seq it lost, so a resume from before that point knows it is incomplete.
    """

    def __init__(self, max_keys: int = 10_000) -> None:
        self._events: OrderedDict[tuple[str, int | str], JobProgressEvent] = OrderedDict()
        self._max_keys = max_keys
        #: The highest seq of an evicted event; a resume from below it cannot be complete.
        self.evicted_seq = 0

    def add(self, ev: JobProgressEvent) -> None:
        """Record ``ev`` as the latest of its key (an older seq never replaces a newer one)."""
        old = self._events.get(ev.key)
        if old is not None:
            if old.seq >= ev.seq:
                return
            # Move to the end: the dict stays ordered by seq, since seqs only grow.
            del self._events[ev.key]
        self._events[ev.key] = ev
        while len(self._events) > self._max_keys:
            _, dropped = self._events.popitem(last=False)
            self.evicted_seq = max(self.evicted_seq, dropped.seq)

    def latest(self, key: tuple[str, int | str]) -> JobProgressEvent | None:
        """The newest recorded event of a job or batch."""
        return self._events.get(key)

    def since(self, after: int, flt: EventFilter | None = None) -> tuple[list[JobProgressEvent], bool]:
        """Events with ``seq > after`` (oldest first), and whether that is complete."""
        out: list[JobProgressEvent] = []
        for ev in reversed(self._events.values()):
            if ev.seq <= after:
                break
            if flt is None or flt(ev):
                out.append(ev)
        out.reverse()
        return out, after >= self.evicted_seq

    def __len__(self) -> int:
        return len(self._events)


@dataclass(slots=True)
class StreamInfo:
    """One open event stream (for stats, tests and shutdown)."""

    fmt: str
    target: str
    sub: Any
    response: web.StreamResponse
    started: float = field(default_factory=time.monotonic)
    events: int = 0
    bytes: int = 0
    writing: bool = False

    def write_buffer_size(self) -> int:
        """Bytes waiting in the transport for this client (bounded by aiohttp's flow control)."""
        req = getattr(self.response, "_req", None)
        transport = None if req is None else req.transport
        return 0 if transport is None else transport.get_write_buffer_size()


# --------------------------------------------------------------------- the server
class HttpApi:
    """The aiohttp server of the HTTP API, built on :class:`ProgressService`.

    ``start()`` binds ``settings.listen`` (port 0 picks a free port, see :attr:`port`); ``stop()`` ends the
    open streams and closes the server.
    """

    #: Seconds a stream may stay blocked writing to a client that does not read before it is dropped.
    write_timeout: float = 60.0
    #: At most this many streams at once; more get 503 (each holds a subscription and a socket).
    max_streams: int = 10_000
    #: Per-stream subscription buffer: one slot per job or batch (latest wins), at most this many keys.
    stream_max_keys: int = 10_000
    #: Kernel send buffer of a stream's socket. Without a cap Linux grows it up to 4 MiB per connection for
    #: a client that does not read; with it, a stalled client costs at most about twice this (the kernel
    #: doubles it) plus aiohttp's 64 KiB write buffer. None keeps the system default.
    stream_sndbuf: int | None = 128 * 1024
    #: One write gathers buffered events up to about this many bytes.
    stream_chunk_bytes: int = 64 * 1024

    def __init__(
        self, service: ProgressService, settings: HttpSettings, *, app_settings: Settings | None = None
    ) -> None:
        self.service = service
        self.settings = settings
        #: All settings, for what the API serves beside its own routes (MCP at ``/mcp``).
        self.app_settings = app_settings
        token = settings.token.get_secret_value() if settings.token is not None else ""
        # Comparing digests keeps the comparison constant-time even in the token's length.
        self._token_digest = hashlib.sha256(token.encode()).digest() if token else None
        self.replay = ReplayLog()
        self.streams: dict[int, StreamInfo] = {}
        self.requests = 0
        self.errors = 0
        #: Requests per route pattern (e.g. ``/v1/jobs/{id}/progress``), for stats and tests.
        self.route_counts: Counter[str] = Counter()
        self._runner: web.AppRunner | None = None
        self._host, self._port = split_listen(settings.listen)
        self._stopping = asyncio.Event()

    # ---------------------------------------------------------------- lifecycle
    def build_app(self) -> web.Application:
        """The aiohttp application with every route (exposed for embedding and tests)."""
        app = web.Application(client_max_size=self.settings.max_body_bytes, middlewares=[self._middleware])
        r = app.router
        r.add_get("/healthz", self.healthz)
        r.add_get("/v1/stats", self.stats)
        r.add_post("/v1/jobs", self.create_job)
        r.add_get("/v1/jobs", self.list_jobs)
        r.add_get("/v1/jobs/{id}", self.get_job)
        r.add_post("/v1/jobs/{id}/progress", self.progress)
        r.add_post("/v1/jobs/{id}/log", self.log_entry)
        r.add_post("/v1/jobs/{id}/complete", self.complete)
        r.add_post("/v1/jobs/{id}/fail", self.fail)
        r.add_post(f"/v1/jobs/{{id}}/{{action:{_ACTIONS}}}", self.job_action)
        r.add_post("/v1/batches", self.create_batch)
        r.add_get("/v1/batches/{id}", self.get_batch)
        r.add_post(f"/v1/batches/{{id}}/{{action:{_ACTIONS}}}", self.batch_action)
        r.add_get("/v1/events", self.events)
        if self.app_settings is not None and self.app_settings.mcp.http:
            mount_mcp(app, self.service, self.app_settings, self._host)
        self.web = install_web(app, self)
        return app

    async def start(self) -> None:
        """Bind and serve. Raises :class:`HttpConfigError` when no token is configured."""
        if self._token_digest is None:
            raise HttpConfigError(
                "http.token is not set: export PROGRESSBOT_HTTP__TOKEN=<a long random string> "
                "(the HTTP API does not run without a token)"
            )
        self._stopping.clear()
        self.service.bus.add_listener(self.replay.add)
        # Handlers are not cancelled when a client goes away (aiohttp's default): a half-done submit must
        # still wake the worker. Streams notice a vanished client themselves (see _pump).
        self._runner = web.AppRunner(self.build_app(), handle_signals=False, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        try:
            await site.start()
        except OSError:
            await self._runner.cleanup()
            self._runner = None
            self.service.bus.remove_listener(self.replay.add)
            raise
        addrs = self._runner.addresses
        if addrs:
            self._port = int(addrs[0][1])
        if not _is_loopback(self._host):
            log.warning("the HTTP API listens on %s, not on loopback: keep the token secret", self._host)
        log.info("HTTP API listening on %s", self.url)

    async def stop(self) -> None:
        """End the open streams and close the server."""
        self._stopping.set()
        for info in list(self.streams.values()):
            info.sub.close()  # wakes the stream loop, which then ends its response
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self.service.bus.remove_listener(self.replay.add)

    @property
    def port(self) -> int:
        """The bound port (the real one when ``listen`` asked for port 0)."""
        return self._port

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:8765``."""
        host = self._host
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self._port}"

    # --------------------------------------------------------------- middleware
    def _authorized(self, request: web.Request) -> bool:
        # The web page's session cookie (checked by its middleware), or one of its public pages.
        if request.get(WEB_AUTH):
            return True
        header = request.headers.get("Authorization", "")
        scheme, _, cred = header.partition(" ")
        given = cred.strip() if scheme.lower() == "bearer" else ""
        expected = self._token_digest
        if expected is None:
            return False
        return hmac.compare_digest(hashlib.sha256(given.encode()).digest(), expected)

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.requests += 1
        try:
            # Auth comes before routing, so that without the token not even "does this exist" leaks.
            if request.path != "/healthz" and not self._authorized(request):
                raise ApiError(401, "unauthorized", "missing or invalid bearer token")
            resource = request.match_info.route.resource
            self.route_counts[resource.canonical if resource is not None else "(none)"] += 1
            return await handler(request)
        except ApiError as exc:
            self.errors += 1
            headers = {"WWW-Authenticate": 'Bearer realm="progressbot"'} if exc.status == 401 else None
            return error_response(exc.status, exc.error, exc.detail, headers)
        except JobNotFound as exc:
            self.errors += 1
            return error_response(404, "not_found", str(exc))
        except IllegalTransition as exc:
            self.errors += 1
            return error_response(409, "conflict", str(exc))
        except UnknownJobType as exc:
            self.errors += 1
            return error_response(422, "unknown_job_type", str(exc))
        except PayloadError as exc:
            self.errors += 1
            return error_response(422, "invalid_payload", str(exc))
        except ProgressbotError as exc:
            self.errors += 1
            return error_response(400, "bad_request", str(exc))
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            self.errors += 1
            code = (exc.reason or "error").lower().replace(" ", "_")
            detail = {
                404: "no such endpoint",
                405: f"method {request.method} is not allowed here",
                413: f"the body is larger than {self.settings.max_body_bytes} bytes",
            }.get(exc.status, exc.reason or "error")
            return error_response(exc.status, code, detail)
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception as exc:
            self.errors += 1
            trouble = db_trouble(exc)
            if trouble is not None:
                # Not the client's mistake, and not a bug: the database is locked or away. Try again later.
                log.warning("HTTP %s %s: database %s: %s", request.method, request.path, trouble, exc)
                busy = trouble == "busy"
                return error_response(
                    503,
                    "database_busy" if busy else "database_unavailable",
                    "the database is busy; try again shortly"
                    if busy
                    else "the database is unavailable; try again later",
                    {"Retry-After": str(RETRY_AFTER_BUSY if busy else RETRY_AFTER_UNAVAILABLE)},
                )
            # The traceback goes to the log, never to the client.
            log.exception("HTTP %s %s failed", request.method, request.path)
            return error_response(500, "internal_error", "internal server error; see the service log")

    async def _body(self, request: web.Request, model: type[M]) -> M:
        """Read and validate a JSON object body (empty means ``{}``)."""
        limit = self.settings.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise ApiError(413, "payload_too_large", f"the body is larger than {limit} bytes")
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise ApiError(413, "payload_too_large", f"the body is larger than {limit} bytes") from None
        data: Any = {}
        if raw.strip():
            try:
                data = json.loads(raw, parse_constant=_reject_constant)
            except UnicodeDecodeError:
                raise ApiError(400, "invalid_json", "the body is not UTF-8") from None
            except json.JSONDecodeError as exc:
                raise ApiError(
                    400, "invalid_json", f"malformed JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
                ) from None
            except ValueError as exc:
                raise ApiError(400, "invalid_json", f"malformed JSON: {exc}") from None
            except RecursionError:
                raise ApiError(400, "invalid_json", f"JSON nested deeper than {MAX_DEPTH} levels") from None
        if not isinstance(data, dict):
            raise ApiError(400, "invalid_json", "the body must be a JSON object")
        if json_depth_exceeds(data, MAX_DEPTH):
            raise ApiError(400, "invalid_json", f"JSON nested deeper than {MAX_DEPTH} levels")
        # "\udcff" escapes decode to lone surrogates, "\u0000" to NUL: U+FFFD and nothing, here, once.
        data = clean_json(data)
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise ApiError(422, "validation_error", _validation_detail(exc)) from None

    @staticmethod
    def _job_id(request: web.Request) -> int | str:
        raw = request.match_info["id"]
        jid = parse_job_id(raw)
        if jid is None:
            raise ApiError(404, "not_found", f"No job #{raw[:40]}")
        return jid

    def _tracked_id(self, request: web.Request) -> int:
        jid = self._job_id(request)
        if not isinstance(jid, int):
            raise NotTracked(jid)
        return jid

    @staticmethod
    def _batch_id(request: web.Request) -> int:
        raw = request.match_info["id"]
        bid = _plain_or_batch_id(raw)
        if bid is None:
            raise ApiError(404, "not_found", f"No batch #{raw[:40]}")
        return bid

    # ------------------------------------------------------------------ routes
    async def healthz(self, request: web.Request) -> web.Response:
        """Liveness: no auth, no job data."""
        return json_response({"status": "ok"})

    async def stats(self, request: web.Request) -> web.Response:
        """Counts by status, plus the API's own figures."""
        st = await self.service.stats()
        st["http"] = {
            "streams": len(self.streams),
            "requests": self.requests,
            "errors": self.errors,
            "routes": dict(self.route_counts),
        }
        return json_response(st)

    async def create_job(self, request: web.Request) -> web.Response:
        """Submit a queued job (``type`` + ``payload``) or create a tracked one (``name``, ``total``)."""
        raw = await self._body(request, _AnyBody)
        data = raw.model_dump()
        kind = data.get("kind")
        tracked = kind == "tracked" or (kind is None and "type" not in data)
        if kind not in (None, "queued", "tracked"):
            raise ApiError(422, "validation_error", "kind: must be 'queued' or 'tracked'")
        if tracked:
            tb = _validate(TrackBody, data)
            job = await self.service.track(
                tb.name, total=tb.total, owner=tb.owner or "http", room=tb.room, type=tb.type
            )
        else:
            sb = _validate(SubmitBody, data)
            job = await self.service.submit(
                sb.type,
                sb.payload,
                name=sb.name,
                priority=sb.priority,
                run_at=sb.run_at,
                delay=sb.delay,
                max_attempts=sb.max_attempts,
                timeout=sb.timeout,
                owner=sb.owner or "http",
                room=sb.room,
            )
        return json_response(
            {"id": job.id, "kind": job.kind, "job": job_to_dict(job)},
            status=201,
            headers={"Location": f"/v1/jobs/{job.id}"},
        )

    async def list_jobs(self, request: web.Request) -> web.Response:
        """``?status=running,paused&type=&batch=&room=&limit=``; status may repeat, or be active or all."""
        q = request.query
        statuses: list[str] = []
        for raw in q.getall("status", []):
            for s in raw.split(","):
                s = s.strip().lower()
                if not s or s == "all":
                    continue
                if s == "active":
                    statuses.extend(str(a) for a in ACTIVE_STATUSES)
                elif s in _STATUSES:
                    statuses.append(s)
                else:
                    raise ApiError(
                        400,
                        "bad_request",
                        f"status: unknown status '{s[:40]}'; use one of "
                        f"{', '.join(sorted(_STATUSES))}, active or all",
                    )
        limit = _int_param(q.get("limit"), "limit", 50, 1, _MAX_LIMIT)
        batch = _int_param(q.get("batch"), "batch", None, 1, MAX_ID)
        job_type = q.get("type") or None
        jobs = await self.service.list_jobs(
            statuses=sorted(set(statuses)) or None,
            type=job_type,
            batch_id=batch,
            room=q.get("room") or None,
            limit=limit,
        )
        return json_response({"jobs": [job_to_dict(j) for j in jobs], "count": len(jobs)})

    async def get_job(self, request: web.Request) -> web.Response:
        """One job with its newest activity entries."""
        jid = self._job_id(request)
        job = await self.service.get(jid)
        if isinstance(jid, str):  # a direct job: in memory only, no activity in the database
            d = job_to_dict(job, [])
            d["id"] = jid
        else:
            st = self.service.monitor.live_state(jid)
            if st is not None and job.status not in TERMINAL_STATUSES:
                # Reported progress that the monitor has not written yet is newer than the row.
                job.progress_current, job.progress_total = st.current, st.total
                job.progress_message, job.stage_name = st.message, st.stage_name
                job.weighted_percent = st.weighted_percent()
            d = job_to_dict(job, await self.service.activity(jid, limit=ACTIVITY_IN_JOB))
        return json_response(d)

    async def progress(self, request: web.Request) -> web.Response:
        """Progress of a tracked job; the reply carries ``control`` (run, pause or cancel)."""
        jid = self._tracked_id(request)
        body = await self._body(request, ProgressBody)
        # In memory, like a handler's report(): the monitor throttles the events and batches the writes.
        view = await self.service.tracked_report(
            jid, current=body.current, total=body.total, message=body.message, stage=body.stage
        )
        await self._write_logs(jid, body.logs)
        return json_response({"id": jid, "status": view.status, "control": control_of(view)})

    async def _write_logs(self, jid: int, logs: list[LogBody]) -> None:
        if logs:
            # One transaction for all of a report's entries.
            await self.service.store.log_many(
                [(jid, e.level, clean_text(e.message, MAX_MESSAGE), None) for e in logs]
            )

    async def log_entry(self, request: web.Request) -> web.Response:
        """Append an activity entry to a tracked job."""
        jid = self._tracked_id(request)
        body = await self._body(request, LogBody)
        job = await self.service.get(jid)
        if job.kind != "tracked":
            raise NotTracked(jid)
        await self.service.tracked_log(jid, body.level, body.message)
        return json_response({"id": jid, "status": job.status, "control": control_of(job)})

    async def _finish(self, request: web.Request, ok: bool) -> web.Response:
        jid = self._tracked_id(request)
        body = await self._body(request, FinishBody)
        if ok and body.error is not None:
            raise ApiError(422, "validation_error", "error: only for /fail")
        if not ok and body.result is not None:
            raise ApiError(422, "validation_error", "result: only for /complete")
        current = await self.service.get(jid)
        if current.kind != "tracked":
            raise NotTracked(jid)
        if current.status in TERMINAL_STATUSES:
            # Checked before the final progress is applied, so a refused finish changes nothing.
            raise IllegalTransition(jid, str(current.status), "completed" if ok else "failed")
        if any(v is not None for v in (body.current, body.total, body.message, body.stage)):
            await self.service.tracked_report(
                jid, current=body.current, total=body.total, message=body.message, stage=body.stage
            )
        await self._write_logs(jid, body.logs)
        job = await self.service.tracked_finish(jid, ok=ok, result=body.result, error=body.error)
        return json_response({"id": jid, "status": job.status, "job": job_to_dict(job)})

    async def complete(self, request: web.Request) -> web.Response:
        """Complete a tracked job (``{"result": ...}``, plus optional final progress)."""
        return await self._finish(request, True)

    async def fail(self, request: web.Request) -> web.Response:
        """Fail a tracked job (``{"error": "..."}``, plus optional final progress)."""
        return await self._finish(request, False)

    async def job_action(self, request: web.Request) -> web.Response:
        """Pause, resume, cancel or retry a job; an illegal transition gets 409 with a readable message."""
        jid = self._job_id(request)
        action = request.match_info["action"]
        body = await self._body(request, ActionBody)
        res = await self.service.act(jid, action, actor=body.actor or "http")
        return json_response(_action_dict(jid, res))

    async def create_batch(self, request: web.Request) -> web.Response:
        """Submit a batch of queued jobs (all validated first: one bad job stores nothing)."""
        body = await self._body(request, BatchBody)
        reqs = [
            JobRequest(
                type=j.type,
                payload=j.payload or {},
                name=j.name,
                priority=j.priority,
                max_attempts=j.max_attempts,
                timeout=j.timeout,
            )
            for j in body.jobs
        ]
        batch, jobs = await self.service.submit_batch(
            body.name, reqs, owner=body.owner or "http", room=body.room
        )
        return json_response(
            {"id": batch.id, "jobs": [j.id for j in jobs]},
            status=201,
            headers={"Location": f"/v1/batches/{batch.id}"},
        )

    async def get_batch(self, request: web.Request) -> web.Response:
        """A batch's aggregate state and the ids of its jobs."""
        bid = self._batch_id(request)
        summary = await self.service.batch_summary(bid)
        jobs = await self.service.list_jobs(batch_id=bid, limit=10_000, newest_first=False)
        d = batch_to_dict(summary)
        d["jobs"] = [j.id for j in jobs]
        return json_response(d)

    async def batch_action(self, request: web.Request) -> web.Response:
        """Apply an action to every job of a batch for which it is legal (409 when none qualifies)."""
        bid = self._batch_id(request)
        action = request.match_info["action"]
        body = await self._body(request, ActionBody)
        results = await self.service.act_batch(bid, action, actor=body.actor or "http")
        return json_response(
            {"id": bid, "action": action, "jobs": [_action_dict(r.job.id or 0, r) for r in results]}
        )

    # ------------------------------------------------------------------ events
    async def events(self, request: web.Request) -> web.StreamResponse:
        """Stream events as NDJSON or SSE (by Accept). ``?job=`` and ``?batch=`` streams end at the terminal
        state; ``Last-Event-ID`` (or ``?after=SEQ``) resumes after the given seq."""
        fmt = negotiate_stream(request.headers.get("Accept", ""))
        if fmt is None:
            raise ApiError(406, "not_acceptable", f"accept {NDJSON} or {SSE}")
        q = request.query
        if "job" in q and "batch" in q:
            raise ApiError(400, "bad_request", "use either job= or batch=, not both")
        after_raw = request.headers.get("Last-Event-ID") or q.get("after")
        after = _int_param(after_raw, "Last-Event-ID", None, 0, 2**63 - 1)
        if len(self.streams) >= self.max_streams:
            raise ApiError(503, "too_many_streams", "too many open event streams; try again later")

        job_id: int | str | None = None
        batch_id: int | None = None
        if "job" in q:
            job_id = parse_job_id(q["job"])
            if job_id is None:
                raise ApiError(404, "not_found", f"No job #{q['job'][:40]}")
        elif "batch" in q:
            raw = q["batch"]
            batch_id = _plain_or_batch_id(raw)
            if batch_id is None:
                raise ApiError(404, "not_found", f"No batch #{raw[:40]}")

        flt = make_filter(job=job_id, batch=batch_id)
        # Subscribe before reading the current state, so that nothing emitted in between is missed.
        # The buffer holds one event per job or batch: a job stream needs one slot (a few for safety).
        sub = self.service.subscribe(flt, max_keys=8 if job_id is not None else self.stream_max_keys)
        try:
            initial, done = await self._initial_events(job_id, batch_id, after, flt)
        except BaseException:
            sub.close()
            raise
        if done and not initial and fmt == "sse":
            # The client has already seen the terminal state: 204 tells EventSource to stop reconnecting.
            sub.close()
            return web.Response(status=204)

        resp = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": SSE + "; charset=utf-8" if fmt == "sse" else NDJSON,
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",  # proxies must not buffer a live stream
            },
        )
        target = "all"
        if job_id is not None:
            target = f"job {job_id}"
        elif batch_id is not None:
            target = f"batch {batch_id}"
        info = StreamInfo(fmt=fmt, target=target, sub=sub, response=resp)
        key = id(info)
        self.streams[key] = info
        healthy = False
        try:
            await resp.prepare(request)
            self._cap_sndbuf(request)
            await self._pump(request, info, initial, done, job_id, batch_id, after)
            healthy = True
        except ConnectionResetError:
            # The client went away: nothing to report, just clean up.
            log.debug("event stream (%s) closed by the client", target)
        except TimeoutError:
            log.info(
                "dropping event stream (%s): the client stopped reading for %.0fs", target, self.write_timeout
            )
        finally:
            sub.close()
            self.streams.pop(key, None)
        if healthy:
            with contextlib.suppress(ConnectionResetError, RuntimeError):
                await resp.write_eof()
        elif request.transport is not None:
            # Drop what is still buffered for a dead or stalled client at once.
            request.transport.abort()
        return resp

    def _event_of(self, key: tuple[str, int | str], make: Callable[[], JobProgressEvent]) -> JobProgressEvent:
        # Prefer the event last emitted (its seq is what clients saw); build one only if none is known.
        ev = self.replay.latest(key)
        return ev if ev is not None else make()

    def _job_event(self, job: Job) -> JobProgressEvent:
        return self._event_of(("job", job.id or 0), lambda: self.service.current_event(job))

    def _batch_event(self, summary: BatchSummary) -> JobProgressEvent:
        return self._event_of(
            ("batch", summary.batch.id or 0), lambda: self.service.monitor.build_batch_event(summary)
        )

    async def _initial_events(
        self, job_id: int | str | None, batch_id: int | None, after: int | None, flt: EventFilter | None
    ) -> tuple[list[JobProgressEvent], bool]:
        """The events a new stream starts with, and whether the stream is already finished."""
        svc = self.service
        if job_id is not None:
            if isinstance(job_id, str):
                run = svc._direct.get(job_id)
                if run is None:
                    raise JobNotFound(job_id)
                view = run.view
                ev = self._event_of(("job", job_id), lambda: svc.monitor.current_event(view))
            else:
                ev = self._job_event(await svc.get(job_id))
            fresh = [ev] if after is None or ev.seq > after else []
            return fresh, ev.terminal
        if batch_id is not None:
            summary = await svc.batch_summary(batch_id)
            bev = self._batch_event(summary)
            jobs = await svc.list_jobs(batch_id=batch_id, limit=10_000, newest_first=False)
            evs = [self._job_event(j) for j in jobs]
            evs.append(bev)
            fresh = [e for e in evs if after is None or e.seq > after]
            return fresh, bev.terminal
        # Everything: on resume, what changed since; otherwise (or if the log lost some) the active jobs.
        out: list[JobProgressEvent] = []
        complete = False
        if after is not None:
            out, complete = self.replay.since(after, flt)
        if not complete:
            seen = {e.key for e in out}
            active = await svc.list_jobs(
                statuses=[str(s) for s in ACTIVE_STATUSES], limit=_MAX_LIMIT, newest_first=False
            )
            batch_ids: set[int] = set()
            for j in active:
                if ("job", j.id or 0) not in seen:
                    out.append(self._job_event(j))
                if j.batch_id is not None:
                    batch_ids.add(j.batch_id)
            for bid in sorted(batch_ids):
                if ("batch", bid) in seen:
                    continue
                with contextlib.suppress(JobNotFound):
                    summary = await svc.batch_summary(bid)
                    out.append(self._batch_event(summary))
            for run in list(svc._direct.values()):
                if run.view.status not in TERMINAL_STATUSES and ("job", run.view.id) not in seen:
                    out.append(svc.monitor.current_event(run.view))
            out = [e for e in out if after is None or e.seq > after]
            out.sort(key=lambda e: e.seq)
        return out, False

    def _cap_sndbuf(self, request: web.Request) -> None:
        sock = None if request.transport is None else request.transport.get_extra_info("socket")
        if sock is not None and self.stream_sndbuf:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.stream_sndbuf)

    def _encode(self, fmt: str, ev: JobProgressEvent) -> bytes:
        try:
            data = safe_json_bytes(ev.to_dict())
        except Exception as exc:
            # One broken event must not end the stream nor hide the events after it: send what is sure.
            log.warning("event %s of %s %s could not be serialised: %s", ev.seq, ev.type, ev.id, exc)
            data = safe_json_bytes(
                {
                    "id": ev.id,
                    "type": ev.type,
                    "status": ev.status,
                    "seq": ev.seq,
                    "timestamp": ev.timestamp,
                    "error": "this event could not be serialised; fetch the job for its state",
                }
            )
        if fmt == "sse":
            # No "event:" field: the default type reaches EventSource.onmessage; the JSON has "type".
            return b"id: %d\ndata: %s\n\n" % (ev.seq, data)
        return data + b"\n"

    def _keepalive(self, fmt: str) -> bytes:
        if fmt == "sse":
            return b": keepalive\n\n"
        return safe_json_bytes({"type": "keepalive", "timestamp": time.time()}) + b"\n"

    async def _write(self, info: StreamInfo, data: bytes) -> None:
        # A client that stops reading blocks only its own stream, and only for write_timeout.
        info.writing = True
        try:
            async with asyncio.timeout(self.write_timeout):
                await info.response.write(data)
        finally:
            info.writing = False
        info.bytes += len(data)

    async def _pump(
        self,
        request: web.Request,
        info: StreamInfo,
        initial: list[JobProgressEvent],
        done: bool,
        job_id: int | str | None,
        batch_id: int | None,
        after: int | None,
    ) -> None:
        fmt = info.fmt
        sub = info.sub
        # The seq last sent per key of the initial events, so that the same state is not sent twice when
        # the subscription delivered it too. Keys not in here are new, so this stays as small as `initial`.
        sent: dict[tuple[str, int | str], int] = {ev.key: ev.seq for ev in initial}
        floor = after or 0
        head = b"retry: 2000\n\n" if fmt == "sse" else b""
        chunk = head + b"".join(self._encode(fmt, ev) for ev in initial)
        info.events += len(initial)
        finished = done

        def ends(ev: JobProgressEvent) -> bool:
            if job_id is not None:
                return ev.type == "job" and str(ev.id) == str(job_id) and ev.terminal
            if batch_id is not None:
                return ev.type == "batch" and ev.id == batch_id and ev.terminal
            return False

        if chunk:
            await self._write(info, chunk)
        last_write = time.monotonic()
        keepalive = self.settings.keepalive_seconds
        # Wake at least once a second, so that a vanished client or a shutdown is noticed without a write.
        tick = min(1.0, keepalive)
        while not finished:
            ev = await sub.get(timeout=tick)
            if self._stopping.is_set() or sub.closed:
                break
            transport = request.transport
            if transport is None or transport.is_closing():
                break
            if ev is None:
                if time.monotonic() - last_write >= keepalive:
                    await self._write(info, self._keepalive(fmt))
                    last_write = time.monotonic()
                continue
            batch: list[bytes] = []
            size = 0
            # Send what is already buffered in one write (cheap for busy "all events" streams).
            while ev is not None:
                prev = sent.get(ev.key)
                if ev.seq > floor and (prev is None or ev.seq > prev):
                    if prev is not None:
                        sent[ev.key] = ev.seq
                    data = self._encode(fmt, ev)
                    batch.append(data)
                    size += len(data)
                    if ends(ev):
                        finished = True
                        break
                if size >= self.stream_chunk_bytes:
                    break
                ev = sub.get_nowait()
            if batch:
                info.events += len(batch)
                await self._write(info, b"".join(batch))
                last_write = time.monotonic()
        if finished and fmt == "sse":
            await self._write(info, b'event: end\ndata: {"reason":"terminal"}\n\n')

    # ------------------------------------------------------------------ stats
    def stream_stats(self) -> list[dict[str, Any]]:
        """One entry per open stream: its target, buffered events and bytes waiting for the client."""
        return [
            {
                "format": s.fmt,
                "target": s.target,
                "pending_events": s.sub.pending(),
                "write_buffer": s.write_buffer_size(),
                "events": s.events,
                "bytes": s.bytes,
                "writing": s.writing,
            }
            for s in self.streams.values()
        ]


def mount_mcp(app: web.Application, service: ProgressService, settings: Settings, host: str) -> None:
    """Serve MCP's streamable-HTTP transport at ``/mcp`` (bot/mcp_server.py explains the ASGI bridge).

    It sits behind the API's middleware (the same bearer token) and uses the service's own event bus. Without
    the ``[mcp]`` extra the API runs without it and says so in the log.
    """
    try:
        from .mcp_server import McpHttpEndpoint
    except ImportError as exc:
        log.warning("not serving /mcp: %s", exc)
        return
    endpoint = McpHttpEndpoint(service, settings, host=host)
    app.cleanup_ctx.append(endpoint.lifespan)
    app.on_shutdown.append(endpoint.shutdown)
    app.router.add_route("*", "/mcp", endpoint.handle)


class _AnyBody(BaseModel):
    """Any JSON object (``POST /v1/jobs`` picks the real model from its fields)."""

    model_config = ConfigDict(extra="allow")


def _validate(model: type[M], data: dict[str, Any]) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ApiError(422, "validation_error", _validation_detail(exc)) from None


def _plain_or_batch_id(raw: str) -> int | None:
    """A batch id in a path or query: ``3``, ``b3`` or ``#b3`` (ASCII digits, at most :data:`MAX_ID`)."""
    if _ASCII_INT.fullmatch(raw) and not raw.startswith("-"):
        return int(raw) if int(raw) <= MAX_ID else None
    return parse_batch_id(raw)


#: Integers as clients write them: ASCII digits only (int() would also take "١٢", " 12 " and "1_000").
_ASCII_INT = re.compile(r"-?[0-9]{1,19}", re.ASCII)


def _int_param(raw: str | None, name: str, default: Any, lo: int, hi: int) -> Any:
    if raw is None or raw == "":
        return default
    if not _ASCII_INT.fullmatch(raw):
        raise ApiError(400, "bad_request", f"{name}: must be an integer")
    val = int(raw)
    if not lo <= val <= hi:
        raise ApiError(400, "bad_request", f"{name}: must be between {lo} and {hi}")
    return val


def _action_dict(job_id: int | str, res: ActionResult) -> dict[str, Any]:
    return {
        "id": job_id,
        "action": res.action,
        "status": res.job.status,
        "control": control_of(res.job),
        "requested": res.requested,
    }


__all__ = [
    "NDJSON",
    "SSE",
    "ActionBody",
    "ApiError",
    "HttpApi",
    "HttpConfigError",
    "ProgressBody",
    "ReplayLog",
    "SubmitBody",
    "TrackBody",
    "negotiate_stream",
]
