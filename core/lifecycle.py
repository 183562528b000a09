"""The job lifecycle as data: what each user action does to a job, by kind and status.

:data:`RULES` is the one source of the rules. The store executes the :class:`Effect` that :func:`plan`
picks (see ``JobStore.act``), the service does the same for direct jobs, and :data:`TRANSITIONS` (every
legal status change) is derived from it plus the worker's own changes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from .errors import IllegalTransition
from .models import Control, JobKind, JobStatus

S = JobStatus
K = JobKind


class Action(StrEnum):
    """What a user can ask of a job (chat commands, buttons, reactions, the CLI and the HTTP API)."""

    PAUSE = "pause"
    RESUME = "resume"
    CANCEL = "cancel"
    RETRY = "retry"

    @property
    def word(self) -> str:
        """The past participle used in refusals ("it can't be paused")."""
        return _WORDS[self]


_WORDS = {
    Action.PAUSE: "paused",
    Action.RESUME: "resumed",
    Action.CANCEL: "cancelled",
    Action.RETRY: "retried",
}


@dataclass(frozen=True, slots=True)
class Effect:
    """What a legal action does to a job."""

    #: The new status; None leaves it, and the request goes to whatever runs the job (``control``).
    status: JobStatus | None
    #: The job's control afterwards (a running job acts on it at its next checkpoint).
    control: Control
    #: The activity note (" by <actor>" is appended).
    note: str
    #: Stamps ``finished_at``.
    finishes: bool = False
    #: Due now (``run_at``): back in the queue.
    requeues: bool = False
    #: Attempts, result, error, checkpoint and progress start over (an explicit retry is a fresh run).
    fresh_run: bool = False
    #: Refused while the job's control is already this (a second pause of a pausing job).
    refused_while: Control | None = None

    @property
    def requested(self) -> bool:
        """Whether the action is a request the job's runner carries out later (a running job)."""
        return self.status is None


_PAUSE_REQUEST = Effect(None, Control.PAUSE, "pause requested", refused_while=Control.PAUSE)
_CANCEL_REQUEST = Effect(None, Control.CANCEL, "cancel requested")
_CANCELLED = Effect(S.CANCELLED, Control.CANCEL, "cancelled", finishes=True)
_RETRIED = Effect(S.PENDING, Control.RUN, "retried", requeues=True, fresh_run=True)

#: ``(action, kind, status) -> Effect`` for every legal action; anything else is refused.
#: Queued jobs are run by a worker (requests to running ones), tracked jobs by an outside program that
#: reads the control (their status changes at once), direct jobs by a task in this process.
RULES: Mapping[tuple[Action, JobKind, JobStatus], Effect] = {
    (Action.PAUSE, K.QUEUED, S.PENDING): Effect(S.PAUSED, Control.RUN, "paused"),
    (Action.PAUSE, K.QUEUED, S.RUNNING): _PAUSE_REQUEST,
    (Action.PAUSE, K.TRACKED, S.PENDING): Effect(S.PAUSED, Control.PAUSE, "paused"),
    (Action.PAUSE, K.TRACKED, S.RUNNING): Effect(S.PAUSED, Control.PAUSE, "paused"),
    (Action.PAUSE, K.DIRECT, S.RUNNING): _PAUSE_REQUEST,
    (Action.RESUME, K.QUEUED, S.PAUSED): Effect(S.PENDING, Control.RUN, "resumed", requeues=True),
    (Action.RESUME, K.TRACKED, S.PAUSED): Effect(S.RUNNING, Control.RUN, "resumed"),
    (Action.RESUME, K.DIRECT, S.PAUSED): Effect(None, Control.RUN, "resume requested"),
    (Action.CANCEL, K.QUEUED, S.PENDING): _CANCELLED,
    (Action.CANCEL, K.QUEUED, S.RUNNING): _CANCEL_REQUEST,
    (Action.CANCEL, K.QUEUED, S.PAUSED): _CANCELLED,
    (Action.CANCEL, K.TRACKED, S.PENDING): _CANCELLED,
    (Action.CANCEL, K.TRACKED, S.RUNNING): _CANCELLED,
    (Action.CANCEL, K.TRACKED, S.PAUSED): _CANCELLED,
    (Action.CANCEL, K.DIRECT, S.RUNNING): _CANCEL_REQUEST,
    (Action.CANCEL, K.DIRECT, S.PAUSED): _CANCEL_REQUEST,
    (Action.RETRY, K.QUEUED, S.FAILED): _RETRIED,
    (Action.RETRY, K.QUEUED, S.CANCELLED): _RETRIED,
}

#: Status changes made by whatever runs the job (a worker, a tracked job's program), not by a user action.
WORKER_TRANSITIONS: frozenset[tuple[JobStatus, JobStatus]] = frozenset(
    {
        (S.PENDING, S.RUNNING),  # a claim (or a tracked job's first report)
        (S.RUNNING, S.COMPLETED),
        (S.RUNNING, S.FAILED),
        (S.RUNNING, S.CANCELLED),  # a cancel request carried out
        (S.RUNNING, S.PAUSED),  # a pause request carried out, or recovery = "pause"
        (S.RUNNING, S.PENDING),  # a failure with attempts left, a graceful stop, or recovery = "requeue"
        # A tracked job's program may report its end before any progress, or while paused.
        (S.PENDING, S.COMPLETED),
        (S.PENDING, S.FAILED),
        (S.PAUSED, S.COMPLETED),
        (S.PAUSED, S.FAILED),
    }
)

#: Every legal status change.
TRANSITIONS: frozenset[tuple[JobStatus, JobStatus]] = WORKER_TRANSITIONS | frozenset(
    (status, effect.status) for (_, _, status), effect in RULES.items() if effect.status is not None
)

#: For each action, the statuses it may start from (for some kind of job).
ACTION_FROM: Mapping[Action, frozenset[JobStatus]] = {
    action: frozenset(status for (a, _, status) in RULES if a == action) for action in Action
}


def plan(
    job_id: int | str,
    action: Action | str,
    kind: JobKind | str,
    status: JobStatus | str,
    control: str | None = None,
) -> Effect:
    """The effect of ``action`` on a job; raises :class:`IllegalTransition` (readable text) if refused."""
    act, kind, status = Action(action), JobKind(kind), JobStatus(status)
    effect = RULES.get((act, kind, status))
    if effect is None:
        shown = str(status)
        if kind != K.QUEUED and (act, K.QUEUED, status) in RULES:
            # Legal for a queued job, not for this kind (a retry of a tracked or direct job).
            shown = f"a tracked {status} job" if kind == K.TRACKED else f"a direct job ({status})"
        raise IllegalTransition(job_id, shown, act.word)
    if effect.refused_while is not None and control == effect.refused_while:
        raise IllegalTransition(job_id, "already pausing", f"{act.word} again")
    return effect


def is_legal(current: JobStatus | str, new: JobStatus | str) -> bool:
    """Whether ``current -> new`` is a legal status change."""
    return (S(current), S(new)) in TRANSITIONS


def check_action(job_id: int, status: JobStatus | str, action: str) -> None:
    """Raise :class:`IllegalTransition` unless ``action`` is allowed for a queued job in ``status``."""
    plan(job_id, action, K.QUEUED, status)


__all__ = ["ACTION_FROM", "RULES", "TRANSITIONS", "Action", "Effect", "check_action", "is_legal", "plan"]
