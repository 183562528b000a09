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

from adapters.commands import parse_run_args
from core.errors import ProgressbotError
from core.lifecycle import Action
from core.packaging import shadowing, shadowing_message
from core.refs import parse_job_id
from core.serialize import job_to_dict

from .settings import ConfigError, Settings, load_settings

T = TypeVar("T")

app = typer.Typer(
    name="progressbot",
    help="Run and track long background jobs, with live progress in chat.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, highlight=False)
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

    try:
        application = Application(settings, demo=demo, exit_when_done=exit_when_done)
        asyncio.run(application.run())
    except ProgressbotError as exc:
        raise fail(f"progressbot: {exc}", 1) from None
    except OSError as exc:
        raise fail(f"progressbot: {exc}", 1) from None


@app.command()
def worker(config: ConfigOpt = None) -> None:
    """Run jobs only: no chat adapters, no HTTP API (start several of these on PostgreSQL)."""
    settings = settings_or_exit(config)
    setup_logging(settings.log_level)
    from .app import Application

    try:
        application = Application(settings, with_adapters=False, with_http=False)
        asyncio.run(application.run())
    except ProgressbotError as exc:
        raise fail(f"progressbot: {exc}", 1) from None


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
    try:
        payload = parse_run_args(list(args or []), payload_json or " ".join(args or []))
    except ValueError as exc:
        raise fail(f"progressbot: {exc}", 2) from None

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


def main() -> None:
    """Entry point of the ``progressbot`` script."""
    shadowed = shadowing()
    if shadowed:
        err.print(shadowing_message(shadowed), markup=False, soft_wrap=True)
        sys.exit(2)
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
