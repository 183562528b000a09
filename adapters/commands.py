"""Chat commands, shared by every adapter: parsing, authorization and the replies.

Adapters turn a platform message (``!pause 12``) or interaction (``/pause id:12``) into a call here and
send back the :class:`Reply`. Nothing in here raises to the adapter: every failure becomes a readable
reply, and unexpected errors are logged, never shown as a traceback.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from core.errors import IllegalTransition, JobNotFound, PayloadError, ProgressbotError, UnknownJobType
from core.lifecycle import Action
from core.models import Job, JobStatus
from core.quota import active_jobs_of
from core.refs import parse_batch_id, parse_job_id
from core.registry import RUN_PERMISSIONS
from core.service import ProgressService
from core.text import clip as clip_marked

from .render import clip, defuse_mentions, render_line, render_plain

log = logging.getLogger(__name__)

CONTROL_ACTIONS = tuple(Action)
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
MAX_COMMAND_LENGTH = 8000
#: The longest reply text the router produces unless its caller asks for less (Matrix' 64 KiB event limit
#: leaves room for far more; this keeps a reply readable and within every platform's limit but Discord's,
#: whose adapter passes 2,000).
DEFAULT_REPLY_LIMIT = 4000
#: How much of a user's own text a reply quotes back (a job type, a bad argument).
ECHO_LIMIT = 80


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


def parse_json_object(text: str) -> dict[str, Any]:
    """A payload given as one JSON object; ValueError with a readable reason for anything else."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON payload: {exc.msg} at position {exc.pos}") from None
    except RecursionError:
        raise ValueError("invalid JSON payload: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer of more than 4,300 digits
        raise ValueError(f"invalid JSON payload: {exc}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"the JSON payload must be an object, not {type(obj).__name__}")
    return obj


def parse_run_args(args: list[str], raw_rest: str) -> dict[str, Any]:
    """``key=value ...`` (values parsed as JSON when they can be) or one JSON object."""
    rest = raw_rest.strip()
    if not rest:
        return {}
    if rest.startswith(("{", "[")):
        return parse_json_object(rest)
    out: dict[str, Any] = {}
    for tok in args:
        key, sep, value = tok.partition("=")
        if not sep or not key or not re.match(r"^[A-Za-z_][A-Za-z0-9_.-]*$", key):
            raise ValueError(f"expected key=value, got {clip_marked(repr(tok), ECHO_LIMIT)}")
        try:
            out[key] = json.loads(value)
        except (ValueError, RecursionError):  # not JSON (or absurd JSON): the plain string it is
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
        run_permissions: Mapping[str, str] | None = None,
        max_active_per_user: int = 5,
        reply_limit: int = DEFAULT_REPLY_LIMIT,
    ) -> None:
        """``run_permissions`` overrides who may start a job type (``auth.run_permissions``);
        ``max_active_per_user`` caps a user's active jobs started from chat (0: no cap); ``reply_limit``
        is the most characters a reply text may have (the caller's platform limit)."""
        self.service = service
        self.admins = {a.strip() for a in admins}
        self.runners = {r.strip() for r in runners}
        self.prefix = prefix
        self.run_permissions = dict(run_permissions or {})
        self.max_active_per_user = max_active_per_user
        self.reply_limit = reply_limit
        # Checking the cap and submitting is one step: concurrent !run commands must not both pass it.
        self._run_lock = asyncio.Lock()

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

    def run_permission(self, job_type: str) -> str:
        """Who may start ``job_type`` from chat: ``anyone``, ``runners`` or ``admins``."""
        configured = self.run_permissions.get(job_type)
        if configured in RUN_PERMISSIONS:
            return configured
        registry = self.service.registry
        return registry.get(job_type).run_by if job_type in registry else "runners"

    def run_refusal(self, actor: Actor, job_type: str) -> str | None:
        """Why ``actor`` may not start ``job_type`` from chat, or None when they may."""
        needed = self.run_permission(job_type)
        if needed == "admins" and not self.is_admin(actor):
            return f"Sorry {actor.mention}, only admins may start {job_type} jobs."
        if needed == "runners" and not self.may_run(actor):
            return f"Sorry {actor.mention}, you may not start jobs here."
        return None

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

    async def handle_text(self, text: str, actor: Actor, *, limit: int | None = None) -> Reply | None:
        """Handle a prefixed message; None when it is not a command for us."""
        if not self.is_command(text):
            return None
        body = text.lstrip()[len(self.prefix) :]
        name, _, rest = body.partition(" ")
        return await self.dispatch(name.lower().strip(), rest.strip(), actor, limit=limit)

    async def dispatch(self, name: str, rest: str, actor: Actor, *, limit: int | None = None) -> Reply:
        """Run command ``name`` with its argument string. Never raises.

        The reply text is at most ``limit`` characters (default: the router's ``reply_limit``), clipped
        with a visible marker; the user's own text is quoted back at most :data:`ECHO_LIMIT` characters.
        """
        reply = await self._dispatch(name, rest, actor)
        reply.text = clip_marked(reply.text, limit or self.reply_limit)
        return reply

    async def _dispatch(self, name: str, rest: str, actor: Actor) -> Reply:
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
        refusal = self.run_refusal(actor, job_type)
        if refusal is not None:
            return Reply(refusal, ok=False)
        try:
            raw = raw_args.strip()
            args = shlex.split(raw_args) if raw and not raw.startswith(("{", "[")) else []
            payload = parse_run_args(args, raw_args)
        except ValueError as exc:
            return Reply(f"{exc}\n{usage}", ok=False)
        try:
            async with self._run_lock:
                cap = self.max_active_per_user
                if cap and not self.is_admin(actor):
                    active = await active_jobs_of(self.service.store, actor.user_id)
                    if active >= cap:
                        return Reply(
                            f"Sorry {actor.mention}, you already have {active} active jobs (the limit is "
                            f"{cap}); wait for one to finish or cancel one first.",
                            ok=False,
                        )
                job = await self.service.submit(job_type, payload, owner=actor.user_id, room=actor.room)
        except (UnknownJobType, PayloadError) as exc:
            return Reply(f"{exc}\n{usage}", ok=False)
        return Reply(f"Started #{job.id} {job.type}.", job=job, on_progress=True)
