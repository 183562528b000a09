"""The MCP server: progressbot's jobs as tools for AI assistants, with streamed progress.

Two transports share one tool set (:class:`ProgressMcp`):

* stdio — ``progressbot mcp`` (see bot/cli.py), a process of its own against the configured database; its
  monitor polls the store, so it follows jobs that another process's service runs;
* streamable HTTP — mounted at ``/mcp`` of the HTTP API (:class:`McpHttpEndpoint`), in the service's own
  process and on its own event bus, behind the API's bearer token.

Every control goes through the chat command router (adapters/commands.py) with the actor ``mcp.actor``, so
MCP follows exactly the chat rules (who may control or run what) and answers with the same texts. Refusals
are tool errors (``isError``), never protocol errors or tracebacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, cast

from aiohttp import web
from pydantic import Field

from adapters.commands import LIST_FILTERS, Actor, CommandRouter, Reply, parse_batch_id, parse_job_id
from adapters.render import render_plain
from core.aio import cancel_and_wait, on_stop_signals
from core.errors import JobNotFound, ProgressbotError
from core.events import JobProgressEvent, Subscription, make_filter
from core.serialize import job_to_dict
from core.service import ProgressService

from .settings import Settings

#: What to tell someone whose installation lacks the optional MCP SDK.
INSTALL_HINT = "the MCP server needs the 'mcp' package: pip install 'progressbot[mcp]'"


class McpNotInstalled(ProgressbotError, ImportError):
    """The ``mcp`` package (the ``[mcp]`` extra) is not installed."""


try:
    from mcp.server.mcpserver import Context, MCPServer
    from mcp.server.mcpserver.exceptions import ResourceNotFoundError, ToolError
    from mcp.server.stdio import stdio_server
    from mcp.server.subscriptions import InMemorySubscriptionBus, ResourceUpdated
except ImportError as _exc:  # pragma: no cover - exercised only without the extra
    raise McpNotInstalled(INSTALL_HINT) from _exc

log = logging.getLogger(__name__)

#: The platform name MCP actors carry (``auth.admins`` may list ``mcp:<actor>``).
PLATFORM = "mcp"
#: Default bound of a streaming ``job_status`` call, under the 60 s after which some clients cut a call.
DEFAULT_MAX_SECONDS = 50.0
RESOURCE_PREFIX = "progressbot://jobs/"
#: The longest store poll of ``progressbot mcp`` over stdio (it follows jobs run by other processes).
STDIO_POLL_MS = 200

JobId = Annotated[
    str | int,
    Field(description="a job id such as 12 (or '#12'), 'b3' for batch 3, or 'd1' for a direct job"),
]


@dataclass(slots=True)
class Target:
    """What a tool's ``id`` names: a stored job, a direct (in-memory) job, or a batch."""

    kind: Literal["job", "batch"]
    ident: int | str

    @property
    def label(self) -> str:
        """The id as users write it: ``12``, ``d1``, ``b3``."""
        return f"b{self.ident}" if self.kind == "batch" else str(self.ident)


def parse_target(raw: str | int) -> Target:
    """Parse a tool's ``id``; an unparseable one reads like an unknown id in chat."""
    text = str(raw).strip()
    bid = parse_batch_id(text)
    if bid is not None:
        return Target("batch", bid)
    jid = parse_job_id(text)
    if jid is None:
        raise JobNotFound(text[:40])
    return Target("job", jid)


def progress_point(ev: JobProgressEvent) -> tuple[float, float | None]:
    """``(progress, total)`` of an MCP progress notification: the percent out of 100 when known, else the
    raw count with no total (indeterminate work)."""
    pct = ev.display_percent
    if pct is not None:
        return float(pct), 100.0
    return float(ev.current or 0), None


def progress_message(ev: JobProgressEvent) -> str:
    """The status, the stage and the job's own message, e.g. ``running · render (1/2) · step 3/10``."""
    out = [ev.status]
    if ev.stage_name:
        stage = ev.stage_name
        if ev.stage_index is not None and ev.stage_count:
            stage += f" ({ev.stage_index + 1}/{ev.stage_count})"
        out.append(stage)
    if ev.message:
        out.append(ev.message)
    if ev.error and ev.status == "failed":
        out.append(ev.error)
    return " · ".join(out)


def state_of(target: Target, ev: JobProgressEvent) -> dict[str, Any]:
    """A tool result for a job's or batch's state: readable ``text`` plus the event's wire shape."""
    d: dict[str, Any] = {
        "id": target.label,
        "kind": target.kind,
        "status": ev.status,
        "terminal": ev.terminal,
        "percent": ev.display_percent,
        "message": progress_message(ev),
        "text": render_plain(ev, prefix=""),
        "state": ev.to_dict(),
    }
    if ev.type == "job" and ev.status == "completed":
        d["result"] = ev.result
    if ev.error:
        d["error"] = ev.error
    return d


class ProgressMcp:
    """The MCP server over one :class:`ProgressService`: tools, the job resource and its update feed."""

    def __init__(self, service: ProgressService, settings: Settings) -> None:
        self.service = service
        self.settings = settings
        auth = settings.auth
        # The chat router: its authorization and its texts are MCP's too (prefix "" as on the console).
        self.router = CommandRouter(service, admins=auth.admins, runners=auth.runners, prefix="")
        self.actor = Actor(user_id=settings.mcp.actor, platform=PLATFORM, room=settings.mcp.room)
        #: Resource update notifications (``subscriptions/listen``) are published here.
        self.updates = InMemorySubscriptionBus()
        self.app: MCPServer[Any] = MCPServer(
            "progressbot",
            instructions=(
                "Run and follow progressbot's background jobs. Start one with run_job, then follow it with "
                "job_status(id, stream=true): progress arrives as notifications and the final state is the "
                "result. A call that returns still_running=true can simply be repeated."
            ),
            subscriptions=self.updates,
            # The SDK configures root logging unless the host application did; keep it quiet then.
            log_level="WARNING",
        )
        self._feed: asyncio.Task[None] | None = None
        self._register()

    # ----------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Start publishing resource updates (status changes of jobs and batches)."""
        if self._feed is None:
            sub = self.service.subscribe(lambda ev: ev.status_changed)
            self._feed = asyncio.create_task(self._publish_updates(sub), name="mcp-resource-updates")

    async def stop(self) -> None:
        """Stop the update feed."""
        if self._feed is not None:
            await cancel_and_wait([self._feed])
            self._feed = None

    async def _publish_updates(self, sub: Subscription) -> None:
        try:
            while True:
                ev = await sub.get()
                if ev is None:
                    return
                ident = f"b{ev.id}" if ev.type == "batch" else str(ev.id)
                try:
                    await self.updates.publish(ResourceUpdated(uri=RESOURCE_PREFIX + ident))
                except Exception:  # one failed delivery must not end the feed
                    log.exception("publishing the update of %s failed", ident)
        finally:
            sub.close()

    # ------------------------------------------------------------------ helpers
    async def _event(self, target: Target) -> JobProgressEvent:
        """The current state of a job or batch (raises JobNotFound)."""
        svc = self.service
        if target.kind == "batch":
            return svc.monitor.build_batch_event(await svc.batch_summary(int(target.ident)))
        if isinstance(target.ident, str):
            run = svc._direct.get(target.ident)
            if run is None:
                raise JobNotFound(target.ident)
            return svc.monitor.current_event(run.view)
        return svc.current_event(await svc.get(target.ident))

    async def _command(self, name: str, rest: str) -> Reply:
        """Run a chat command as the MCP actor; a refusal becomes a tool error with the chat's text."""
        reply = await self.router.dispatch(name, rest, self.actor)
        if not reply.ok:
            raise ToolError(reply.text)
        return reply

    # -------------------------------------------------------------------- tools
    async def list_jobs(
        self,
        status: Annotated[
            Literal["active", "pending", "running", "paused", "completed", "failed", "cancelled", "all"],
            Field(description="which jobs: 'active' (pending, running or paused), one status, or 'all'"),
        ] = "active",
        type: Annotated[str | None, Field(description="only jobs of this job type", max_length=200)] = None,
        limit: Annotated[int, Field(description="at most this many, newest first", ge=1, le=500)] = 20,
    ) -> dict[str, Any]:
        """List jobs, newest first."""
        try:
            jobs = await self.service.list_jobs(statuses=LIST_FILTERS[status], type=type, limit=limit)
        except ProgressbotError as exc:
            raise ToolError(str(exc)) from None
        return {"jobs": [job_to_dict(j) for j in jobs], "count": len(jobs)}

    async def job_status(
        self,
        id: JobId,
        ctx: Context,
        stream: Annotated[
            bool,
            Field(
                description="follow the job or batch: progress notifications (when you pass a progress "
                "token) at most every 500 ms, and its final state as the result"
            ),
        ] = False,
        max_seconds: Annotated[
            float,
            Field(
                description="with stream: stop following after this many seconds and return the latest "
                "state with still_running=true (call again to continue)",
                gt=0,
                le=86_400,
            ),
        ] = DEFAULT_MAX_SECONDS,
    ) -> dict[str, Any]:
        """Show a job's or a batch's state; with stream=true follow it until it ends."""
        try:
            target = parse_target(id)
            if not stream:
                return state_of(target, await self._event(target))
            return await self.follow(target, ctx.report_progress, max_seconds)
        except ProgressbotError as exc:
            raise ToolError(str(exc)) from None

    async def follow(
        self,
        target: Target,
        notify: Callable[[float, float | None, str | None], Awaitable[None]],
        max_seconds: float,
    ) -> dict[str, Any]:
        """Follow a job or batch: ``notify`` its progress, throttled, and return its final (or latest) state.

        At most one notification per ``progress.min_interval_ms`` carries the latest state (status changes
        included: the monitor emits those outside its own throttle, this one holds them to the window too).
        ``progress`` never decreases (MCP asks for growing values; a retry starting over stays at the high
        mark, its message tells). A cancelled call closes the subscription on the way out.
        """
        svc = self.service
        interval = svc.config.min_interval
        if target.kind == "batch":
            flt = make_filter(batch=int(target.ident), include_batch_jobs=False)
        else:
            flt = make_filter(job=target.ident)
        # Subscribe before reading the current state, so that nothing emitted in between is missed.
        sub = svc.subscribe(flt, max_keys=4)
        try:
            latest = await self._event(target)
            deadline = time.monotonic() + max_seconds
            pending: JobProgressEvent | None = None if latest.terminal else latest
            next_at = 0.0
            high = 0.0
            while not latest.terminal:
                now = time.monotonic()
                if pending is not None and now >= next_at:
                    progress, total = progress_point(pending)
                    high = max(high, progress)
                    await notify(high, total, progress_message(pending))
                    pending, next_at = None, time.monotonic() + interval
                    continue
                left = deadline - now
                if left <= 0:
                    break
                wait = left if pending is None else min(left, next_at - now)
                ev = await sub.get(timeout=max(0.0, wait))
                if ev is None:
                    if sub.closed:  # the service is stopping
                        break
                    continue
                if ev.seq > latest.seq:
                    latest = pending = ev
            out = state_of(target, latest)
            out["still_running"] = not latest.terminal
            if not latest.terminal:
                out["hint"] = f"still {latest.status}: call job_status('{target.label}', stream=true) again"
            return out
        finally:
            sub.close()

    async def run_job(
        self,
        type: Annotated[
            str,
            Field(
                description="the job type (see list_job_types)",
                min_length=1,
                max_length=200,
                pattern=r"^\S+$",
            ),
        ],
        payload: Annotated[
            dict[str, Any] | None,
            Field(description="the job's payload, validated against the type's payload schema"),
        ] = None,
    ) -> dict[str, Any]:
        """Start a queued job, owned by the MCP actor; follow it with job_status(id, stream=true)."""
        # The chat's `run` path: the same permission checks and the same validation (the payload model
        # names the offending field).
        reply = await self._command("run", f"{type} {json.dumps(payload or {})}")
        assert reply.job is not None
        return {"id": reply.job.id, "type": reply.job.type, "status": reply.job.status, "text": reply.text}

    async def _control(self, action: str, id: str | int) -> dict[str, Any]:
        reply = await self._command(action, str(id).strip())
        out: dict[str, Any] = {"id": str(id).strip(), "action": action, "text": reply.text}
        if reply.job is not None:
            out["status"] = reply.job.status
        return out

    async def pause_job(self, id: JobId) -> dict[str, Any]:
        """Pause a job (a running one pauses at its next checkpoint), or every job of a batch ('b3')."""
        return await self._control("pause", id)

    async def resume_job(self, id: JobId) -> dict[str, Any]:
        """Resume a paused job from its last checkpoint (or a batch's paused jobs)."""
        return await self._control("resume", id)

    async def cancel_job(self, id: JobId) -> dict[str, Any]:
        """Cancel a job (a running one stops at its next checkpoint), or a batch's unfinished jobs."""
        return await self._control("cancel", id)

    async def retry_job(self, id: JobId) -> dict[str, Any]:
        """Run a failed or cancelled job again, from the start."""
        return await self._control("retry", id)

    async def list_job_types(self) -> dict[str, Any]:
        """The job types run_job accepts, with their descriptions and payload JSON schemas."""
        types = []
        for spec in self.service.registry.specs():
            schema = (
                spec.payload_model.model_json_schema()
                if spec.payload_model is not None
                else {"type": "object", "additionalProperties": True}
            )
            types.append({"type": spec.name, "description": spec.description, "payload_schema": schema})
        return {"types": types}

    async def job_resource(self, id: str) -> str:
        """The state of a job or batch as JSON (``progressbot://jobs/12``, ``progressbot://jobs/b3``)."""
        try:
            target = parse_target(id)
            return json.dumps(state_of(target, await self._event(target)), default=str)
        except ProgressbotError as exc:
            raise ResourceNotFoundError(str(exc)) from None

    def _register(self) -> None:
        app = self.app
        for fn in (
            self.list_jobs,
            self.job_status,
            self.run_job,
            self.pause_job,
            self.resume_job,
            self.cancel_job,
            self.retry_job,
            self.list_job_types,
        ):
            app.add_tool(fn, name=fn.__name__, description=(fn.__doc__ or "").strip())
        app.resource(
            RESOURCE_PREFIX + "{id}",
            name="job",
            description="A job's or batch's current state; subscribe for an update on each status change.",
            mime_type="application/json",
        )(self.job_resource)


# ------------------------------------------------------------------------- stdio
async def serve_stdio(settings: Settings, *, run_worker: bool = False) -> None:
    """``progressbot mcp``: MCP over stdin/stdout against the configured database, until stdin closes.

    Without a worker this process only reads and controls jobs; a ``progressbot run`` or ``worker`` process
    runs them, and the monitor's polling of the store brings their progress here.
    """
    from .app import build_service

    # This process learns of jobs that another process runs by polling the store; a short poll keeps it
    # within a second of that process's emission (whose own write tick is 500 ms).
    poll_ms = min(settings.progress.poll_interval_ms, STDIO_POLL_MS)
    progress = settings.progress.model_copy(update={"poll_interval_ms": poll_ms})
    settings = settings.model_copy(update={"progress": progress})
    service = build_service(settings, run_worker=run_worker)
    await service.start()
    server = ProgressMcp(service, settings)
    await server.start()
    serving = asyncio.create_task(_serve_stdio(server))
    try:
        # SIGINT/SIGTERM end the session like a closed stdin does: stop serving, then shut down gracefully
        # (a worker in this process requeues its running jobs from their checkpoints).
        with on_stop_signals(serving.cancel):
            await asyncio.wait([serving])
        if not serving.cancelled():
            serving.result()  # the session's own error, if any
    finally:
        await cancel_and_wait([serving])
        await server.stop()
        await service.stop()


#: The longest JSON-RPC line taken from stdin; a longer one is answered with a parse error, not a crash.
STDIN_LINE_LIMIT = 16 * 1024 * 1024


class _StdinLines:
    """stdin as text lines read by the event loop itself, so a signal can end the session at once.

    The SDK's default reads stdin in a worker thread, which a cancellation cannot interrupt: the process
    would wait for the client's next line before it could shut down.
    """

    def __init__(self, reader: asyncio.StreamReader) -> None:
        """``reader``: the stream connected to a duplicate of fd 0."""
        self.reader = reader

    def __aiter__(self) -> _StdinLines:
        return self

    async def __anext__(self) -> str:
        try:
            line = await self.reader.readline()
        except ValueError:
            return "\n"  # over STDIN_LINE_LIMIT: the rest was dropped; the SDK answers an invalid message
        if not line:
            raise StopAsyncIteration
        return line.decode("utf-8", errors="replace")


async def _serve_stdio(server: ProgressMcp) -> None:
    """Run the MCP session over stdin/stdout until stdin closes (or the task is cancelled)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=STDIN_LINE_LIMIT)
    pipe = os.fdopen(os.dup(0), "rb", buffering=0)
    try:
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
    except (OSError, ValueError):
        # stdin is a regular file or a terminal the loop cannot watch: the SDK's threaded reader will do.
        pipe.close()
        await server.app.run_stdio_async()
        return
    # What MCPServer.run_stdio_async does, with our stdin: the SDK has no public hook for that.
    low = server.app._lowlevel_server
    try:
        async with stdio_server(stdin=cast(Any, _StdinLines(reader))) as (read_stream, write_stream):
            await low.run(read_stream, write_stream, low.create_initialization_options())
    finally:
        transport.close()


# -------------------------------------------------------------------------- HTTP
class McpHttpEndpoint:
    """The SDK's streamable-HTTP transport, served by the HTTP API's aiohttp server at ``/mcp``.

    The bridge: the SDK's session manager is an ASGI application; :meth:`handle` is an aiohttp handler that
    calls it with an ASGI ``scope`` built from the request, a ``receive`` that yields the request body (then
    ``http.disconnect`` once the client is gone or the response is done), and a ``send`` that writes to an
    aiohttp ``StreamResponse`` chunk by chunk, so an SSE response streams as the SDK writes it. This keeps
    one server, one port, one event loop and one event bus (no second web server, no thread, no extra
    dependency), and the API's middleware runs first, so ``/mcp`` is behind the same bearer token and
    unknown paths stay 404.

    The session manager needs a long-lived anyio task group; it lives in a task of its own (:meth:`lifespan`,
    an aiohttp ``cleanup_ctx``), because a task group must be entered and left in the same task.
    """

    #: How often a waiting ``receive`` checks whether the client went away (aiohttp does not tell).
    disconnect_poll: float = 0.5

    def __init__(self, service: ProgressService, settings: Settings, *, host: str = "127.0.0.1") -> None:
        self.mcp = ProgressMcp(service, settings)
        # Builds the session manager; with a loopback host the SDK also turns on its DNS-rebinding guard.
        self.mcp.app.streamable_http_app(host=host)
        self.manager = self.mcp.app.session_manager
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def lifespan(self, app: web.Application) -> AsyncIterator[None]:
        """aiohttp ``cleanup_ctx``: run the session manager while the application runs."""
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._run(ready), name="mcp-session-manager")
        await asyncio.wait([self._task, ready], return_when=asyncio.FIRST_COMPLETED)
        if self._task.done():
            self._task.result()  # it failed to start: raise why
        await self.mcp.start()
        try:
            yield
        finally:
            await self.shutdown(app)
            await self.mcp.stop()

    async def shutdown(self, app: web.Application) -> None:
        """Stop the session manager (aiohttp ``on_shutdown``: open MCP streams end before the server waits
        for its handlers)."""
        self._stop.set()
        task, self._task = self._task, None
        if task is not None:
            try:
                await task
            except Exception:  # stopping goes on: the API's own shutdown must not fail on MCP's
                log.exception("the MCP session manager failed")

    async def _run(self, ready: asyncio.Future[None]) -> None:
        async with self.manager.run():
            ready.set_result(None)
            await self._stop.wait()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Serve one HTTP request of the MCP transport through the ASGI application."""
        if self._stop.is_set():
            raise web.HTTPServiceUnavailable()
        peer = request.transport.get_extra_info("peername") if request.transport else None
        sock = request.transport.get_extra_info("sockname") if request.transport else None
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": f"{request.version.major}.{request.version.minor}",
            "method": request.method,
            "scheme": request.scheme,
            "path": request.path,
            "raw_path": request.raw_path.split("?", 1)[0].encode(),
            "query_string": request.query_string.encode(),
            "root_path": "",
            "headers": [
                (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in request.headers.items()
            ],
            "client": tuple(peer[:2]) if peer else None,
            "server": tuple(sock[:2]) if sock else None,
        }
        done = asyncio.Event()
        response: web.StreamResponse | None = None
        body_sent = False

        async def receive() -> dict[str, Any]:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": await request.read(), "more_body": False}
            # Nothing more to read: wait until the response is done or the client hangs up.
            while not done.is_set():
                transport = request.transport
                if transport is None or transport.is_closing():
                    break
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.disconnect_poll):
                        await done.wait()
            return {"type": "http.disconnect"}

        async def send(message: MutableMapping[str, Any]) -> None:
            nonlocal response
            if done.is_set():
                return  # the client is gone: like ASGI servers, drop what is still sent
            try:
                if message["type"] == "http.response.start":
                    response = web.StreamResponse(status=message["status"])
                    for k, v in message.get("headers", []):
                        response.headers.add(k.decode("latin-1"), v.decode("latin-1"))
                    await response.prepare(request)
                elif message["type"] == "http.response.body" and response is not None:
                    if message.get("body"):
                        await response.write(message["body"])
                    if not message.get("more_body", False):
                        await response.write_eof()
                        done.set()
            except ConnectionResetError:
                # The client hung up mid-response (it closed a stream it no longer wants). Not an error of
                # the application: receive() now reports the disconnect, and nothing more is written.
                done.set()

        try:
            await self.manager.handle_request(scope, receive, send)
        finally:
            done.set()
        if response is None:
            raise web.HTTPInternalServerError()
        return response


__all__ = [
    "INSTALL_HINT",
    "McpHttpEndpoint",
    "McpNotInstalled",
    "ProgressMcp",
    "Target",
    "parse_target",
    "serve_stdio",
]
