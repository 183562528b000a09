"""The ``progressbot`` command line.

``run`` starts the service; ``worker`` runs jobs only (for extra worker processes on PostgreSQL); the
other commands work directly against the configured database. Exit codes: 0 success, 1 a refused or
failed operation (unknown id, illegal transition, bad payload), 2 invalid config or usage.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from adapters.commands import parse_json_object, parse_run_args
from core.errors import ProgressbotError
from core.lifecycle import Action
from core.packaging import shadowing, shadowing_message
from core.refs import parse_job_id
from core.salvage import db_reason, db_trouble
from core.serialize import job_to_dict
from core.service import submit_option_problems

from .settings import ConfigError, Settings, load_settings

T = TypeVar("T")

app = typer.Typer(
    name="progressbot",
    help="Run and track long background jobs, with live progress in chat.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain click usage errors: one unwrapped "Error: Invalid value for '--priority': ..." line, not a box
    # hard-wrapped at 80 columns.
    rich_markup_mode=None,
)
# soft_wrap: an error line is printed whole whatever the terminal's width (rich would otherwise hard-wrap
# it at 80 columns when stderr is not a terminal, splitting paths and key: problem lines).
err = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)

ConfigOpt = Annotated[
    str | None,
    typer.Option("--config", "-c", help="config file (default: $PROGRESSBOT_CONFIG or ./config.toml)"),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print machine-readable JSON")]


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print ``message`` to stderr and return the Exit to raise."""
    err.print(message, markup=False)
    return typer.Exit(code)


def database_failure(exc: BaseException, url: str) -> typer.Exit | None:
    """The readable exit for a database that is busy or cannot be used; None for any other error."""
    trouble = db_trouble(exc)
    if trouble is None:
        return None
    if trouble == "busy":
        return fail("progressbot: the database is busy (another process holds a write lock); try again", 1)
    from sqlalchemy.engine import make_url

    try:
        shown = make_url(url).render_as_string(hide_password=True)
    except Exception:  # an unparsable URL is reported by the error itself
        shown = "(the configured database)"
    return fail(f"progressbot: cannot use the database {shown}: {db_reason(exc)}", 1)


def settings_or_exit(config: str | None) -> Settings:
    """Load settings, or print ``key: problem`` lines and exit 2."""
    try:
        return load_settings(config)
    except ConfigError as exc:
        err.print("Invalid configuration:", markup=False)
        for line in str(exc).splitlines():
            err.print(f"  {line}", markup=False)
        raise typer.Exit(2) from None


def setup_logging(level: str, *, quiet_console: bool = False) -> None:
    """Log to stderr."""
    from rich.logging import RichHandler

    handler = RichHandler(console=err, show_path=False, markup=False, rich_tracebacks=False)
    logging.basicConfig(level=level.upper(), handlers=[handler], format="%(message)s", force=True)
    for noisy in ("apscheduler", "aiohttp.access", "nio", "discord"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_db(settings: Settings, fn: Callable[[Any], Awaitable[T]]) -> T:
    """Run ``fn(service)`` against the database (no worker), mapping engine errors to exit code 1."""
    from .app import build_service

    async def main() -> T:
        svc = build_service(settings, run_worker=False)
        try:
            await svc.store.init()
            return await fn(svc)
        finally:
            svc.db.close()

    try:
        return asyncio.run(main())
    except ProgressbotError as exc:
        raise fail(str(exc), 1) from None
    except Exception as exc:
        failure = database_failure(exc, settings.database.url)
        if failure is None:
            raise
        raise failure from None


def _job_id(raw: str) -> int:
    jid = parse_job_id(raw)
    if not isinstance(jid, int):
        raise fail(f"'{raw}' is not a job id (expected a number such as 12)", 2)
    return jid


@app.command()
def run(
    config: ConfigOpt = None,
    demo: Annotated[int, typer.Option("--demo", help="submit N demo.count jobs on start")] = 0,
    exit_when_done: Annotated[
        bool, typer.Option("--exit-when-done", help="with --demo: stop once the demo jobs finished")
    ] = False,
) -> None:
    """Start the service: worker, monitor, scheduler, chat adapters and HTTP API, as configured."""
    settings = settings_or_exit(config)
    setup_logging(settings.log_level)
    from .app import Application

    serve(settings, lambda: Application(settings, demo=demo, exit_when_done=exit_when_done))


def serve(settings: Settings, make: Callable[[], Any]) -> None:
    """Run an application until it stops; engine, network and database errors end it with a readable line."""
    try:
        application = make()
        asyncio.run(application.run())
    except ProgressbotError as exc:
        raise fail(f"progressbot: {exc}", 1) from None
    except OSError as exc:
        raise fail(f"progressbot: {exc}", 1) from None
    except Exception as exc:
        failure = database_failure(exc, settings.database.url)
        if failure is None:
            raise
        raise failure from None


@app.command()
def worker(config: ConfigOpt = None) -> None:
    """Run jobs only: no chat adapters, no HTTP API (start several of these on PostgreSQL)."""
    settings = settings_or_exit(config)
    setup_logging(settings.log_level)
    from .app import Application

    serve(settings, lambda: Application(settings, with_adapters=False, with_http=False))


@app.command()
def submit(
    job_type: Annotated[str, typer.Argument(metavar="TYPE", help="the job type, e.g. demo.count")],
    args: Annotated[list[str] | None, typer.Argument(metavar="[KEY=VALUE]...", help="payload fields")] = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    payload_json: Annotated[
        str | None, typer.Option("--payload", help="the payload as a JSON object")
    ] = None,
    priority: Annotated[int, typer.Option(help="higher runs first")] = 0,
    delay: Annotated[float | None, typer.Option(help="seconds to wait before running")] = None,
    max_attempts: Annotated[int | None, typer.Option(help="attempts before the job fails for good")] = None,
    timeout: Annotated[float | None, typer.Option(help="seconds before a run times out")] = None,
    name: Annotated[str | None, typer.Option(help="a display name")] = None,
    room: Annotated[str | None, typer.Option(help="the chat room to report into")] = None,
    owner: Annotated[str | None, typer.Option(help="the owner (a chat user id)")] = None,
) -> None:
    """Submit a queued job: ``progressbot submit demo.count steps=5 delay_ms=200``."""
    settings = settings_or_exit(config)
    problems = submit_option_problems(
        priority=priority, delay=delay, max_attempts=max_attempts, timeout=timeout
    )
    if args and payload_json is not None:
        problems.append("payload: give KEY=VALUE arguments or --payload, not both")
    if problems:
        raise fail("\n".join(problems), 2)
    try:
        if payload_json is not None:
            payload = parse_json_object(payload_json)
        else:
            payload = parse_run_args(list(args or []), " ".join(args or []))
    except ValueError as exc:
        raise fail(f"payload: {exc}", 2) from None

    async def go(svc: Any) -> Any:
        return await svc.submit(
            job_type,
            payload,
            priority=priority,
            delay=delay,
            max_attempts=max_attempts,
            timeout=timeout,
            name=name,
            room=room,
            owner=owner,
        )

    job = run_db(settings, go)
    if as_json:
        print(json.dumps({"id": job.id}))
    else:
        out.print(f"Submitted #{job.id} {job.type}", markup=False)


@app.command()
def jobs(
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
    status: Annotated[list[str] | None, typer.Option("--status", "-s", help="filter by status")] = None,
    job_type: Annotated[str | None, typer.Option("--type", "-t", help="filter by type")] = None,
    limit: Annotated[int, typer.Option(help="at most this many")] = 50,
    show_all: Annotated[bool, typer.Option("--all", "-a", help="include finished jobs")] = False,
) -> None:
    """List jobs (active ones unless --all or --status)."""
    settings = settings_or_exit(config)
    statuses = status or (None if show_all else ["pending", "running", "paused"])
    valid = {"pending", "running", "paused", "completed", "failed", "cancelled"}
    bad = [s for s in statuses or [] if s not in valid]
    if bad:
        raise fail(f"progressbot: unknown status {bad[0]!r}; use one of {', '.join(sorted(valid))}", 2)

    async def go(svc: Any) -> Any:
        return await svc.list_jobs(statuses=statuses, type=job_type, limit=limit)

    found = run_db(settings, go)
    if as_json:
        print(json.dumps([job_to_dict(j) for j in found]))
        return
    if not found:
        out.print("No jobs.")
        return
    from rich.table import Table

    table = Table("id", "type", "status", "progress", "message", "owner", box=None)
    for j in found:
        d = job_to_dict(j)
        pct = d["progress"]["weightedPercent"]
        table.add_row(
            str(j.id),
            j.name or j.type,
            str(j.status) + (" (interrupted)" if j.interrupted else ""),
            "" if pct is None else f"{pct:.0f}%",
            (j.error or j.progress_message or "")[:60],
            j.owner or "",
        )
    out.print(table)


@app.command()
def status(
    job_id: Annotated[str, typer.Argument(metavar="ID")], config: ConfigOpt = None, as_json: JsonOpt = False
) -> None:
    """Show one job, with its recent activity."""
    settings = settings_or_exit(config)
    jid = _job_id(job_id)

    async def go(svc: Any) -> Any:
        job = await svc.get(jid)
        return job_to_dict(job, await svc.activity(jid, limit=20))

    d = run_db(settings, go)
    if as_json:
        print(json.dumps(d))
        return
    p = d["progress"]
    pct = p["weightedPercent"]
    out.print(
        f"#{d['id']} {d['name'] or d['type']} — {d['status']}"
        + (" (interrupted)" if d["interrupted"] else ""),
        markup=False,
    )
    if pct is not None or p["current"] is not None:
        out.print(
            f"  progress: {p['current']}/{p['total']}" + (f" ({pct:.0f}%)" if pct is not None else ""),
            markup=False,
        )
    if p["message"]:
        out.print(f"  message: {p['message']}", markup=False)
    out.print(f"  attempts: {d['attempts']}/{d['max_attempts']}", markup=False)
    if d["result"] is not None:
        out.print(f"  result: {json.dumps(d['result'])}", markup=False)
    if d["error"]:
        out.print(f"  error: {d['error']}", markup=False)
    for a in d.get("activity", [])[-10:]:
        out.print(f"  {a['at'][11:19]} {a['level']}: {a['message']}", markup=False)


def _control(action: str) -> Callable[..., None]:
    def command(
        job_id: Annotated[str, typer.Argument(metavar="ID")],
        config: ConfigOpt = None,
        as_json: JsonOpt = False,
    ) -> None:
        settings = settings_or_exit(config)
        jid = _job_id(job_id)

        async def go(svc: Any) -> Any:
            return await svc.act(jid, action, actor="cli")

        res = run_db(settings, go)
        if as_json:
            print(
                json.dumps(
                    {"id": jid, "action": action, "status": res.job.status, "requested": res.requested}
                )
            )
        elif res.requested:
            out.print(
                f"#{jid}: {action} requested; it takes effect at the job's next checkpoint.", markup=False
            )
        else:
            out.print(f"#{jid} is now {res.job.status}.", markup=False)

    command.__doc__ = f"{action.capitalize()} a job."
    return command


for _action in Action:
    app.command(name=_action)(_control(_action))

from . import cli_http  # noqa: E402,F401


def undecodable_argument(argv: list[str]) -> int | None:
    """The position of the first argument that is not valid UTF-8, or None.

    Python decodes such bytes to lone surrogates; refusing them here is clearer than a job type or payload
    that nobody can type again.
    """
    for i, arg in enumerate(argv):
        try:
            arg.encode()
        except UnicodeEncodeError:
            return i
    return None


@app.command()
def mcp(
    config: ConfigOpt = None,
    with_worker: Annotated[
        bool, typer.Option("--worker", help="also run jobs in this process (no separate service needed)")
    ] = False,
) -> None:
    """Serve MCP over stdin/stdout for an AI assistant: progressbot's jobs as tools (see README, MCP)."""
    settings = settings_or_exit(config)
    # stdout carries the protocol: logs go to stderr, quieter than the service's.
    setup_logging("WARNING" if settings.log_level.upper() in ("DEBUG", "INFO") else settings.log_level)
    try:
        from .mcp_server import serve_stdio
    except ImportError as exc:
        raise fail(f"progressbot: {exc}", 2) from None

    class _StdioServer:
        async def run(self) -> None:
            await serve_stdio(settings, run_worker=with_worker)

    serve(settings, _StdioServer)


def main() -> None:
    """Entry point of the ``progressbot`` script."""
    shadowed = shadowing()
    if shadowed:
        err.print(shadowing_message(shadowed), markup=False, soft_wrap=True)
        sys.exit(2)
    bad = undecodable_argument(sys.argv[1:])
    if bad is not None:
        err.print(f"arguments: argument {bad + 1} is not valid UTF-8", markup=False)
        sys.exit(2)
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
