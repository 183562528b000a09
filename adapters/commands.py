"""Chat commands, shared by every adapter: parsing, authorization and the replies.

Adapters turn a platform message (``!pause 12``) or interaction (``/pause id:12``) into a call here and
send back the :class:`Reply`. Nothing in here raises to the adapter: every failure becomes a readable
reply, and unexpected errors are logged, never shown as a traceback.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from core.errors import IllegalTransition, JobNotFound, PayloadError, ProgressbotError, UnknownJobType
from core.models import Job, JobStatus
from core.service import ProgressService

from .render import clip, defuse_mentions, render_line, render_plain

log = logging.getLogger(__name__)

CONTROL_ACTIONS = ("pause", "resume", "cancel", "retry")
LIST_FILTERS = {
    "active": [JobStatus.PENDING, JobStatus.RUNNING, JobStatus.PAUSED],
    "running": [JobStatus.RUNNING],
    "failed": [JobStatus.FAILED],
    "paused": [JobStatus.PAUSED],
    "pending": [JobStatus.PENDING],
    "completed": [JobStatus.COMPLETED],
    "cancelled": [JobStatus.CANCELLED],
    "all": None,
}
_ID_RE = re.compile(r"^#?(d?\d{1,12})$", re.IGNORECASE)
_BATCH_ID_RE = re.compile(r"^#?b(\d{1,12})$", re.IGNORECASE)
MAX_COMMAND_LENGTH = 8000


@dataclass(slots=True)
class Actor:
    """Who sent a command, and what the platform says they may do."""

    user_id: str
    platform: str
    room: str | None = None
    #: Room moderators (Matrix power level, Discord role or Manage Messages), as the adapter judged it.
    is_moderator: bool = False
    display: str | None = None

    @property
    def mention(self) -> str:
        """How to name this user in text."""
        return self.display or self.user_id


@dataclass(slots=True)
class Reply:
    """What to answer. ``ok`` is False for refusals and errors (Discord makes those ephemeral)."""

    text: str
    ok: bool = True
    job: Job | None = None
    data: dict[str, Any] = field(default_factory=dict)
    #: The job's progress message shows this outcome itself (a started job, a pause by whom): an
    #: adapter showing that message in the asker's room need not answer with words too.
    on_progress: bool = False


def parse_job_id(raw: str) -> int | str | None:
    """``12``, ``#12`` -> 12; ``d3`` -> "d3" (a direct job); anything else -> None."""
    m = _ID_RE.match(raw.strip())
    if not m:
        return None
    val = m.group(1).lower()
    return val if val.startswith("d") else int(val)


def parse_batch_id(raw: str) -> int | None:
    """``b3`` or ``#b3`` -> 3."""
    m = _BATCH_ID_RE.match(raw.strip())
    return int(m.group(1)) if m else None


def parse_run_args(args: list[str], raw_rest: str) -> dict[str, Any]:
    """``key=value ...`` (values parsed as JSON when they can be) or one JSON object."""
    rest = raw_rest.strip()
    if not rest:
        return {}
    if rest.startswith("{"):
        try:
            obj = json.loads(rest)
        except json.JSONDecodeError as exc:
            raise ValueError(f"invalid JSON payload: {exc.msg} at position {exc.pos}") from None
        if not isinstance(obj, dict):
            raise ValueError("the JSON payload must be an object")
        return obj
    out: dict[str, Any] = {}
    for tok in args:
        key, sep, value = tok.partition("=")
        if not sep or not key or not re.match(r"^[A-Za-z_][A-Za-z0-9_.-]*$", key):
            raise ValueError(f"expected key=value, got {tok!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


class CommandRouter:
    """Executes chat commands against the service, with authorization."""

    def __init__(
        self,
        service: ProgressService,
        *,
        admins: Iterable[str] = (),
        runners: Iterable[str] = (),
        prefix: str = "!",
    ) -> None:
        self.service = service
        self.admins = {a.strip() for a in admins}
        self.runners = {r.strip() for r in runners}
        self.prefix = prefix

    # ---------------------------------------------------------------- auth
    def is_admin(self, actor: Actor) -> bool:
        """Whether the actor is listed in ``auth.admins`` (platform-prefixed ids count too)."""
        return actor.user_id in self.admins or f"{actor.platform}:{actor.user_id}" in self.admins

    def may_control(self, actor: Actor, job: Job) -> bool:
        """Admins, room moderators and the job's owner may control a job."""
        return (
            self.is_admin(actor)
            or actor.is_moderator
            or (job.owner is not None and job.owner == actor.user_id)
        )

    def may_run(self, actor: Actor) -> bool:
        """Anyone may run jobs unless ``auth.runners`` lists who may."""
        if not self.runners:
            return True
        return self.is_admin(actor) or actor.is_moderator or actor.user_id in self.runners

    # ---------------------------------------------------------------- text
    def usage(self) -> str:
        """The help text."""
        p = self.prefix
        types = ", ".join(self.service.registry.types()) or "(none)"
        return (
            "Commands:\n"
            f"{p}jobs [running|failed|all] — list jobs (default: active)\n"
            f"{p}status <id> — show one job\n"
            f"{p}pause <id> · {p}resume <id> · {p}cancel <id> · {p}retry <id>\n"
            f"{p}run <type> [key=value ...|{{json}}] — start a job here\n"
            f"{p}help — this text\n"
            f"Job types: {types}\n"
            "Reactions ⏸ ▶ ⏹ on a progress message pause, resume or cancel its job."
        )

    def is_command(self, text: str) -> bool:
        """Whether a message looks like a command for us."""
        t = text.lstrip()
        return t.startswith(self.prefix) and len(t) > len(self.prefix) and t[len(self.prefix)].isalpha()

    async def handle_text(self, text: str, actor: Actor) -> Reply | None:
        """Handle a prefixed message; None when it is not a command for us."""
        if not self.is_command(text):
            return None
        body = text.lstrip()[len(self.prefix) :]
        name, _, rest = body.partition(" ")
        return await self.dispatch(name.lower().strip(), rest.strip(), actor)

    async def dispatch(self, name: str, rest: str, actor: Actor) -> Reply:
        """Run command ``name`` with its argument string. Never raises."""
        try:
            if len(rest) > MAX_COMMAND_LENGTH:
                return Reply(f"That command is too long (over {MAX_COMMAND_LENGTH} characters).", ok=False)
            if name in ("help", "h", "?"):
                return Reply(self.usage())
            if name in ("jobs", "list"):
                return await self.cmd_jobs(rest, actor)
            if name in ("status", "show"):
                return await self.cmd_status(rest, actor)
            if name in CONTROL_ACTIONS:
                return await self.cmd_control(name, rest, actor)
            if name == "run":
                return await self.cmd_run(rest, actor)
            return Reply(f"Unknown command {clip(name, 40)!r}. Try {self.prefix}help", ok=False)
        except ProgressbotError as exc:
            return Reply(str(exc), ok=False)
        except Exception:
            log.exception("command %r from %s failed", name, actor.user_id)
            return Reply("Sorry, that command failed unexpectedly; the error was logged.", ok=False)

    async def cmd_jobs(self, rest: str, actor: Actor) -> Reply:
        """``jobs [filter]``."""
        which = (rest.split() or ["active"])[0].lower()
        if which not in LIST_FILTERS:
            return Reply(f"Usage: {self.prefix}jobs [running|failed|all]", ok=False)
        statuses = LIST_FILTERS[which]
        jobs = await self.service.list_jobs(statuses=statuses, limit=15)
        counts = (await self.service.stats())["counts"]
        summary = ", ".join(f"{counts.get(s, 0)} {s}" for s in ("running", "pending", "paused", "failed"))
        if not jobs:
            return Reply(
                f"No {which if which != 'all' else ''} jobs. ({summary})".replace("No  jobs", "No jobs")
            )
        lines = [render_line(self.service.current_event(j)) for j in jobs]
        return Reply(f"Jobs ({which}; {summary}):\n" + "\n".join(lines), data={"jobs": [j.id for j in jobs]})

    async def cmd_status(self, rest: str, actor: Actor) -> Reply:
        """``status <id>``."""
        args = rest.split()
        if len(args) != 1:
            return Reply(f"Usage: {self.prefix}status <id>", ok=False)
        bid = parse_batch_id(args[0])
        if bid is not None:
            summary = await self.service.batch_summary(bid)
            ev = self.service.monitor.build_batch_event(summary)
            return Reply(render_plain(ev, prefix=self.prefix))
        jid = parse_job_id(args[0])
        if jid is None:
            return Reply(f"Usage: {self.prefix}status <id> — <id> is a job number such as 12", ok=False)
        job = await self.service.get(jid)
        text = render_plain(self.service.current_event(job), prefix=self.prefix) if job.id else ""
        if job.id is not None:
            acts = await self.service.activity(job.id, limit=5)
            if acts:
                text += "\nRecent activity:\n" + "\n".join(
                    f"  {a.at:%H:%M:%S} {a.level}: {clip(a.message, 200)}" for a in acts
                )
        else:
            text = f"#{jid} {job.type} — {job.status}"
        return Reply(defuse_mentions(text), job=job)

    async def cmd_control(self, action: str, rest: str, actor: Actor) -> Reply:
        """``pause|resume|cancel|retry <id>``."""
        args = rest.split()
        usage = f"Usage: {self.prefix}{action} <id> — <id> is a job number such as 12"
        if len(args) != 1:
            return Reply(usage, ok=False)
        bid = parse_batch_id(args[0])
        if bid is not None:
            return await self._control_batch(action, bid, actor)
        jid = parse_job_id(args[0])
        if jid is None:
            return Reply(usage, ok=False)
        return await self.control(action, jid, actor)

    async def control(self, action: str, job_id: int | str, actor: Actor) -> Reply:
        """Apply a control action to a job, after checking the actor may. Used by reactions and buttons."""
        try:
            job = await self.service.get(job_id)
            if not self.may_control(actor, job):
                return Reply(
                    f"Sorry {actor.mention}, you may not {action} job #{job_id}: "
                    "only its owner, a moderator or an admin may.",
                    ok=False,
                )
            res = await self.service.act(job_id, action, actor=actor.user_id)
        except (JobNotFound, IllegalTransition) as exc:
            return Reply(str(exc), ok=False)
        except ProgressbotError as exc:
            return Reply(str(exc), ok=False)
        except Exception:
            log.exception("%s of job %s failed", action, job_id)
            return Reply("Sorry, that failed unexpectedly; the error was logged.", ok=False)
        word = {"pause": "Pausing", "cancel": "Cancelling"}.get(action) if res.requested else None
        if word:
            text = f"{word} #{job_id} at its next checkpoint."
        else:
            past = {"pause": "Paused", "resume": "Resumed", "cancel": "Cancelled", "retry": "Retrying"}[
                action
            ]
            text = f"{past} #{job_id}."
        return Reply(text, job=res.job, on_progress=True)

    async def _control_batch(self, action: str, batch_id: int, actor: Actor) -> Reply:
        batch = await self.service.store.get_batch(batch_id)
        allowed = self.is_admin(actor) or actor.is_moderator or (batch.owner == actor.user_id)
        if not allowed:
            return Reply(
                f"Sorry {actor.mention}, you may not {action} batch #{batch_id}: "
                "only its owner, a moderator or an admin may.",
                ok=False,
            )
        results = await self.service.act_batch(batch_id, action, actor=actor.user_id)
        return Reply(f"{action.capitalize()}: {len(results)} job(s) of batch #{batch_id}.")

    async def cmd_run(self, rest: str, actor: Actor) -> Reply:
        """``run <type> [key=value ...|json]``."""
        usage = f"Usage: {self.prefix}run <type> [key=value ...|{{json}}]"
        if not rest:
            return Reply(
                usage + "\nJob types: " + (", ".join(self.service.registry.types()) or "(none)"), ok=False
            )
        job_type, _, raw_args = rest.partition(" ")
        if not self.may_run(actor):
            return Reply(f"Sorry {actor.mention}, you may not start jobs here.", ok=False)
        try:
            args = shlex.split(raw_args) if raw_args.strip() and not raw_args.strip().startswith("{") else []
            payload = parse_run_args(args, raw_args)
        except ValueError as exc:
            return Reply(f"{exc}\n{usage}", ok=False)
        try:
            job = await self.service.submit(job_type, payload, owner=actor.user_id, room=actor.room)
        except (UnknownJobType, PayloadError) as exc:
            return Reply(f"{exc}\n{usage}", ok=False)
        return Reply(f"Started #{job.id} {job.type}.", job=job, on_progress=True)
