"""The job lifecycle: which status changes are legal, for each user-facing action."""

from __future__ import annotations

from .errors import IllegalTransition
from .models import JobStatus

S = JobStatus

#: For each user action, the statuses it may start from. Everything else is refused.
ACTION_FROM: dict[str, frozenset[JobStatus]] = {
    "pause": frozenset({S.PENDING, S.RUNNING}),
    "resume": frozenset({S.PAUSED}),
    "cancel": frozenset({S.PENDING, S.RUNNING, S.PAUSED}),
    "retry": frozenset({S.FAILED, S.CANCELLED}),
}

#: Past participles used in refusals ("it can't be paused").
ACTION_WORD = {"pause": "paused", "resume": "resumed", "cancel": "cancelled", "retry": "retried"}

#: Every legal status change, including the worker's own (claim, finish, retry with backoff).
TRANSITIONS: frozenset[tuple[JobStatus, JobStatus]] = frozenset(
    {
        (S.PENDING, S.RUNNING),
        (S.PENDING, S.PAUSED),
        (S.PENDING, S.CANCELLED),
        (S.RUNNING, S.COMPLETED),
        (S.RUNNING, S.FAILED),
        (S.RUNNING, S.CANCELLED),
        (S.RUNNING, S.PAUSED),
        (S.RUNNING, S.PENDING),  # a failure with attempts left, or recovery = "requeue"
        (S.PAUSED, S.PENDING),  # resume
        (S.PAUSED, S.CANCELLED),
        (S.FAILED, S.PENDING),  # retry
        (S.CANCELLED, S.PENDING),  # retry
    }
)


def is_legal(current: JobStatus | str, new: JobStatus | str) -> bool:
    """Whether ``current -> new`` is a legal status change."""
    return (S(current), S(new)) in TRANSITIONS


def check_action(job_id: int, status: JobStatus | str, action: str) -> None:
    """Raise :class:`IllegalTransition` unless ``action`` is allowed from ``status``."""
    if S(status) not in ACTION_FROM[action]:
        raise IllegalTransition(job_id, str(S(status)), ACTION_WORD[action])
