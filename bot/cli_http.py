"""``progressbot watch`` and ``progressbot track``: commands that talk to a running service over HTTP.

``watch [ID]`` draws live progress bars from the event stream (one bar per job and per batch).
``track --name N -- CMD ...`` runs a command as a tracked job: its output lines become progress messages,
a chat ``!pause`` stops it (SIGSTOP) and ``!resume`` continues it (SIGCONT), ``!cancel`` terminates it, and a
non-zero exit fails the job. Both find the service with ``--url`` (``$PROGRESSBOT_URL``, else ``http.listen``
of the config) and authenticate with ``--token`` (``$PROGRESSBOT_HTTP__TOKEN``).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TaskID, TaskProgressColumn, TextColumn
from rich.text import Text

from core.refs import parse_batch_id, parse_job_id

from .cli import ConfigOpt, JsonOpt, app, err, fail, settings_or_exit
from .client import DEFAULT_URL, TOKEN_ENV, URL_ENV, JobCancelledError, ProgressApiError, ProgressClient

UrlOpt = Annotated[
    str | None,
    typer.Option("--url", envvar=URL_ENV, help="the service URL (default: from http.listen in the config)"),
]
TokenOpt = Annotated[
    str | None,
    typer.Option("--token", envvar=TOKEN_ENV, help="the API token", show_default=False, show_envvar=True),
]

#: Finished bars kept on screen by ``watch`` without an ID; older ones are removed.
KEEP_FINISHED = 20
#: Seconds between SIGTERM and SIGKILL when a tracked command is cancelled.
KILL_GRACE = 5.0


def url_from_listen(listen: str) -> str:
    """The URL a client uses for a ``host:port`` listen address (wildcards become loopback)."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def connect(url: str | None, token: str | None, config: str | None) -> ProgressClient:
    """A client for the running service; exits 2 when no token is known."""
    if url is None or token is None:
        settings = settings_or_exit(config)
        if url is None:
            url = url_from_listen(settings.http.listen) if settings.http is not None else DEFAULT_URL
        if token is None and settings.http is not None and settings.http.token is not None:
            token = settings.http.token.get_secret_value()
    if not token:
        raise fail(f"progressbot: no API token; pass --token or set {TOKEN_ENV}", 2)
    try:
        return ProgressClient(url, token)
    except ValueError as exc:
        raise fail(f"progressbot: {exc}", 2) from None


def api_failure(exc: Exception, url: str) -> typer.Exit:
    """Map a client error to a message and exit code 1."""
    if isinstance(exc, ProgressApiError):
        if exc.status == 401:
            return fail("progressbot: the service refused the token (401)", 1)
        return fail(f"progressbot: {exc.detail}", 1)
    return fail(f"progressbot: cannot reach the service at {url}: {exc}", 1)


# ------------------------------------------------------------------------- watch
def _percent(ev: dict[str, Any]) -> float | None:
    pct = ev.get("weightedPercent")
    if pct is None and ev.get("progress"):
        pct = ev["progress"].get("percentage")
    return None if pct is None else float(pct)


def _num(x: Any) -> str:
    return f"{x:g}" if isinstance(x, float | int) else str(x)


def describe(ev: dict[str, Any]) -> str:
    """The label of a bar: ``#12 nightly build`` or ``batch b3 import``."""
    name = ev.get("name") or ""
    if ev.get("type") == "batch":
        return f"batch b{ev.get('id')} {name}".strip()
    return f"#{ev.get('id')} {name}".strip()


def detail(ev: dict[str, Any]) -> str:
    """Status, counts, stage, ETA and the last message of an event, in one line."""
    status = str(ev.get("status", ""))
    parts = [status + (" (interrupted)" if ev.get("interrupted") else "")]
    prog = ev.get("progress") or {}
    if ev.get("type") == "batch":
        bd = ev.get("batchDetails") or {}
        parts.append(f"{bd.get('completedOperations', 0)}/{bd.get('totalOperations', 0)} done")
        if bd.get("failedOperations"):
            parts.append(f"{bd['failedOperations']} failed")
    elif prog.get("current") is not None:
        total = prog.get("total")
        parts.append(_num(prog["current"]) + (f"/{_num(total)}" if total is not None else ""))
    stage = ev.get("stage")
    if stage and stage.get("name"):
        idx, cnt = stage.get("index"), stage.get("count")
        parts.append(f"stage {idx + 1}/{cnt} {stage['name']}" if idx is not None and cnt else stage["name"])
    eta = ev.get("etaSeconds")
    if eta is not None and status == "running":
        parts.append(f"eta {int(eta) // 60}m{int(eta) % 60:02d}s")
    if ev.get("type") == "batch":
        # A batch's message repeats its counts; only its current operation adds something.
        text = (ev.get("batchDetails") or {}).get("currentOperation")
    else:
        text = ev.get("error") if status == "failed" and ev.get("error") else ev.get("message")
    if text:
        text = str(text).replace("\n", " ")
        parts.append(text if len(text) <= 60 else text[:59] + "…")
    return " · ".join(parts)


class Bars:
    """One rich progress bar per job and per batch, fed with events."""

    def __init__(self, progress: Progress, keep_finished: int | None = KEEP_FINISHED) -> None:
        self.progress = progress
        self.tasks: dict[tuple[str, Any], TaskID] = {}
        self.finished: list[TaskID] = []
        self.keep_finished = keep_finished
        self.last: dict[tuple[str, Any], dict[str, Any]] = {}

    def update(self, ev: dict[str, Any]) -> None:
        """Show ``ev`` on its bar (adding the bar on first sight, ending it at a terminal state)."""
        key = (str(ev.get("type")), ev.get("id"))
        old = self.last.get(key)
        if old is not None and isinstance(old.get("seq"), int) and ev.get("seq", 0) <= old["seq"]:
            return  # an older state after a newer one: drop it
        self.last[key] = ev
        status = ev.get("status")
        terminal = status in ("completed", "failed", "cancelled")
        pct = _percent(ev)
        if status == "completed":
            pct = 100.0
        indeterminate = pct is None and not terminal
        style = {"completed": "green", "failed": "red", "cancelled": "yellow", "paused": "yellow"}.get(
            str(status), ""
        )
        text = Text(detail(ev), style=style)
        # Per mille, so that the bar keeps a tenth of a percent (rich counts in whole steps).
        total = None if indeterminate else 1000
        done = round((pct or 0.0) * 10)
        task = self.tasks.get(key)
        if task is None:
            task = self.progress.add_task(describe(ev), total=total, completed=done, detail=text)
            self.tasks[key] = task
        else:
            self.progress.update(task, description=describe(ev), total=total, completed=done, detail=text)
        if terminal:
            self.progress.stop_task(task)
            if task not in self.finished:
                self.finished.append(task)
            self._trim()

    def _trim(self) -> None:
        if self.keep_finished is None:
            return
        while len(self.finished) > self.keep_finished:
            task = self.finished.pop(0)
            self.progress.remove_task(task)
            for k, t in list(self.tasks.items()):
                if t == task:
                    del self.tasks[k]
                    self.last.pop(k, None)


def make_progress() -> Progress:
    """The bar layout of ``watch``."""
    return Progress(
        TextColumn("{task.description}", style="bold"),
        BarColumn(bar_width=30),
        TaskProgressColumn(),
        TextColumn("{task.fields[detail]}"),
        console=err if not sys.stdout.isatty() and sys.stderr.isatty() else None,
        transient=False,
        auto_refresh=True,
        refresh_per_second=8,
    )


@app.command()
def watch(
    target: Annotated[
        str | None, typer.Argument(metavar="[ID]", help="a job id (12, d3) or a batch (b5); default: all")
    ] = None,
    batch: Annotated[int | None, typer.Option("--batch", "-b", help="watch this batch")] = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Live progress bars from the running service's event stream (one bar per job and batch).

    With an ID it ends when that job (or batch) ends: exit code 0 if it completed, 1 otherwise.
    """
    job_id: int | str | None = None
    if target is not None:
        bid = parse_batch_id(target)
        if bid is not None:
            batch = bid
        else:
            job_id = parse_job_id(target)
            if job_id is None:
                raise fail(f"'{target}' is not a job id (expected 12, d3 or b5 for a batch)", 2)
    if job_id is not None and batch is not None:
        raise fail("progressbot: give a job ID or --batch, not both", 2)
    client = connect(url, token, config)
    final: dict[str, Any] | None = None
    try:
        events = client.events(job_id, batch=batch)
        if as_json:
            for ev in events:
                print(json.dumps(ev), flush=True)
                final = ev
        else:
            with make_progress() as progress:
                single = job_id is not None or batch is not None
                bars = Bars(progress, keep_finished=None if single else KEEP_FINISHED)
                for ev in events:
                    bars.update(ev)
                    final = ev
    except (ProgressApiError, OSError, http.client.HTTPException) as exc:
        raise api_failure(exc, client.url) from None
    finally:
        client.close()
    if job_id is None and batch is None:
        return
    key_type = "batch" if batch is not None else "job"
    last = final if final is not None and final.get("type") == key_type else None
    status = str(last.get("status")) if last else "unknown"
    if not as_json and last is not None:
        line = f"{describe(last)}: {status}"
        if status == "failed" and last.get("error"):
            line += f": {last['error']}"
        err.print(line, markup=False)
    if status != "completed":
        raise typer.Exit(1)


# ------------------------------------------------------------------------- track
def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    # The command runs in its own process group, so that a signal reaches what it started (make -> cc).
    try:
        if hasattr(os, "killpg"):
            os.killpg(proc.pid, sig)
        else:  # pragma: no cover - Windows
            proc.send_signal(sig)
    except (ProcessLookupError, PermissionError):
        pass


class _Controller(threading.Thread):
    """Applies the job's control to the command: pause -> SIGSTOP, run -> SIGCONT, cancel -> TERM, KILL."""

    def __init__(self, job: Any, proc: subprocess.Popen[bytes]) -> None:
        super().__init__(name="progressbot-track-control", daemon=True)
        self.job = job
        self.proc = proc
        self.stopped = False
        self.cancelled = False
        self._cancel_at = 0.0
        self._done = threading.Event()

    def run(self) -> None:
        can_stop = hasattr(signal, "SIGSTOP")
        while not self._done.wait(0.1) and self.proc.poll() is None:
            control = self.job.control
            if control == "cancel":
                if not self.cancelled:
                    self.cancelled = True
                    self._cancel_at = time.monotonic()
                    if self.stopped:
                        _signal_group(self.proc, signal.SIGCONT)
                    _signal_group(self.proc, signal.SIGTERM)
                elif time.monotonic() - self._cancel_at > KILL_GRACE:
                    _signal_group(self.proc, getattr(signal, "SIGKILL", signal.SIGTERM))
            elif control == "pause" and not self.stopped and can_stop:
                self.stopped = True
                _signal_group(self.proc, signal.SIGSTOP)
                err.print(f"progressbot: job #{self.job.id} paused (SIGSTOP)", markup=False)
            elif control == "run" and self.stopped:
                self.stopped = False
                _signal_group(self.proc, signal.SIGCONT)
                err.print(f"progressbot: job #{self.job.id} resumed (SIGCONT)", markup=False)

    def finish(self) -> None:
        """Stop watching the control state."""
        self._done.set()
        self.join(timeout=1.0)


def _exit_code(rc: int) -> int:
    # A command killed by a signal exits like a shell reports it: 128 + the signal number.
    return 128 - rc if rc < 0 else rc


@app.command(context_settings={"allow_interspersed_args": False})
def track(
    command: Annotated[list[str], typer.Argument(metavar="-- CMD [ARG]...", help="the command to run")],
    name: Annotated[
        str | None, typer.Option("--name", "-n", help="the job's name (default: the command)")
    ] = None,
    total: Annotated[
        float | None,
        typer.Option(help="the expected total; each output line counts one, unless --progress-regex matches"),
    ] = None,
    progress_regex: Annotated[
        str | None,
        typer.Option(
            "--progress-regex",
            help="a regex over output lines with groups 'current' (and optionally 'total'), e.g. "
            r"'(?P<current>\d+)/(?P<total>\d+)'",
        ),
    ] = None,
    room: Annotated[str | None, typer.Option(help="the chat room to report into")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="do not echo the command's output")] = False,
    url: UrlOpt = None,
    token: TokenOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Run a command as a tracked job: output lines become progress messages; a non-zero exit fails it.

    A single CMD argument is run by the shell (``track -n build -- "make && make test"``); several are
    run as they are. Pause and resume from chat stop and continue the command; cancel terminates it.
    The exit code is the command's.
    """
    if not command:
        raise fail("progressbot: no command given; use: progressbot track --name N -- CMD ...", 2)
    pattern: re.Pattern[str] | None = None
    if progress_regex:
        try:
            pattern = re.compile(progress_regex)
        except re.error as exc:
            raise fail(f"progressbot: --progress-regex: {exc}", 2) from None
    shell = len(command) == 1
    label = name or " ".join(command)[:300]
    client = connect(url, token, config)
    try:
        job = client.track(label, total=total, room=room, raise_on_cancel=False).start()
    except (ProgressApiError, OSError, http.client.HTTPException) as exc:
        client.close()
        raise api_failure(exc, client.url) from None
    err.print(f"progressbot: tracking as job #{job.id}", markup=False)
    try:
        proc = subprocess.Popen(
            command[0] if shell else command,
            shell=shell,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            process_group=0 if hasattr(os, "killpg") else None,
        )
    except OSError as exc:
        job.fail(f"could not start the command: {exc}")
        client.close()
        raise fail(f"progressbot: could not start {command[0]!r}: {exc}", 127) from None
    controller = _Controller(job, proc)
    controller.start()
    last_line = ""
    interrupted = False
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            if not quiet:
                sys.stdout.write(raw.decode("utf-8", "replace"))
                sys.stdout.flush()
            line = raw.decode("utf-8", "replace").strip()
            if not line:
                continue
            last_line = line
            m = pattern.search(line) if pattern else None
            if m is not None:
                groups = m.groupdict()
                cur = groups.get("current", m.group(1) if m.groups() else None)
                tot = groups.get("total")
                try:
                    job.report(
                        float(cur) if cur is not None else None,
                        total=float(tot) if tot is not None else None,
                        message=line,
                    )
                except ValueError:
                    job.report(message=line)
            elif total is not None and pattern is None:
                job.advance(1, message=line)
            else:
                job.report(message=line)
        rc = proc.wait()
    except KeyboardInterrupt:
        # The command runs in its own process group, so the terminal's Ctrl-C has to be passed on.
        interrupted = True
        _signal_group(proc, signal.SIGINT)
        try:
            rc = proc.wait(timeout=KILL_GRACE)
        except subprocess.TimeoutExpired:
            _signal_group(proc, getattr(signal, "SIGKILL", signal.SIGTERM))
            rc = proc.wait()
    finally:
        controller.finish()
    code = _exit_code(rc)
    try:
        if controller.cancelled or job.should_cancel:
            job.complete()  # leaves the cancelled job as it is and stops the sender
            err.print(f"progressbot: job #{job.id} was cancelled", markup=False)
            code = code or 1
        elif interrupted:
            job.fail("interrupted (Ctrl-C)")
            code = 130
        elif rc != 0:
            job.fail(f"exit code {code}" + (f": {last_line[:300]}" if last_line else ""))
        else:
            job.complete({"exit_code": 0})
    except JobCancelledError:
        code = code or 1
    except (ProgressApiError, OSError, http.client.HTTPException) as exc:
        err.print(f"progressbot: could not report the end of job #{job.id}: {exc}", markup=False)
    finally:
        client.close()
    if code:
        raise typer.Exit(code)
