"""Typed errors of the engine. Their ``str()`` is written for a chat user to read."""

from __future__ import annotations

from .models import Control
from .text import clean_text


class ProgressbotError(Exception):
    """Base class of every error the engine raises on purpose; its text is safe to show in chat."""


class JobNotFound(ProgressbotError, LookupError):
    """No job (or batch) has the given id."""

    def __init__(self, job_id: int | str, kind: str = "job") -> None:
        self.job_id = job_id
        self.kind = kind
        super().__init__(f"No {kind} #{job_id}")


class IllegalTransition(ProgressbotError):
    """The requested lifecycle change is not allowed from the job's current status."""

    def __init__(self, job_id: int | str, status: str, action: str, kind: str = "Job") -> None:
        self.job_id = job_id
        self.status = status
        self.action = action
        super().__init__(f"{kind} #{job_id} is {status}; it can't be {action}")


class NotTracked(IllegalTransition):
    """Progress, a log line or a result was sent from outside for a job that is not a tracked one.

    One text for every other kind (queued, running or not; direct), so a caller learns nothing else.
    """

    def __init__(self, job_id: int | str) -> None:
        self.job_id = job_id  # type: ignore[assignment]  # a direct job's id is a string ("d3")
        self.status = "not tracked"
        self.action = "reported from outside"
        ProgressbotError.__init__(
            self, f"Job #{job_id} is not a tracked job; only tracked jobs take reports from outside"
        )


class UnknownJobType(ProgressbotError, LookupError):
    """No handler is registered under the given job type."""

    def __init__(self, job_type: str, known: list[str]) -> None:
        self.job_type = job_type
        hint = f" Known types: {', '.join(sorted(known))}." if known else ""
        # The type is echoed back to whoever typed it: clipped, so an 8,000-character one stays readable.
        super().__init__(f"Unknown job type '{clean_text(job_type, 80, multiline=False)}'.{hint}")


class PayloadError(ProgressbotError, ValueError):
    """The payload does not match the handler's payload model. Nothing was stored."""

    def __init__(self, job_type: str, problems: list[str]) -> None:
        self.job_type = job_type
        self.problems = problems
        super().__init__(f"Invalid payload for '{job_type}': " + "; ".join(problems))


class JobInterrupt(BaseException):
    """Raised inside a handler at ``checkpoint()`` to stop it cooperatively.

    It derives from BaseException so that a handler's ``except Exception`` does not swallow it.
    """

    def __init__(self, action: str) -> None:
        self.action = action
        super().__init__(action)


class JobPaused(JobInterrupt):
    """The job was asked to pause; the worker marks it paused."""

    def __init__(self) -> None:
        super().__init__(Control.PAUSE)


class JobCancelled(JobInterrupt):
    """The job was asked to cancel; the worker marks it cancelled."""

    def __init__(self) -> None:
        super().__init__(Control.CANCEL)


class LeaseLost(JobInterrupt):
    """This worker no longer owns the job (its lease expired and another process recovered it)."""

    def __init__(self) -> None:
        super().__init__(Control.LEASE_LOST)
