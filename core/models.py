"""Database models (SQLModel) for jobs, batches, the activity log and chat message bindings."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from enum import StrEnum
from operator import attrgetter
from typing import Any

from sqlalchemy import JSON, Column, Index, UniqueConstraint, text
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    """The current time as an aware UTC datetime (SQLModel stores and returns datetimes in UTC)."""
    return datetime.now(UTC)


class JobStatus(StrEnum):
    """The lifecycle states of a job."""

    PENDING = "pending"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        """True for the states a job does not leave on its own."""
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED})
ACTIVE_STATUSES = frozenset({JobStatus.PENDING, JobStatus.RUNNING, JobStatus.PAUSED})


class JobKind(StrEnum):
    """How a job runs: queued (a worker runs its handler), tracked (an outside program reports it) or
    direct (run at once in this process, in memory only)."""

    QUEUED = "queued"
    TRACKED = "tracked"
    DIRECT = "direct"


class Control(StrEnum):
    """What has been asked of a running job.

    ``run``, ``pause`` and ``cancel`` are stored in the job's row, so other processes see them. ``shutdown``
    (this process stops gracefully) and ``lease-lost`` (another process may run the job now) are set by the
    worker on the running job's context only, never stored. During a run requests only escalate, in the
    order listed (see :attr:`rank`).
    """

    RUN = "run"
    SHUTDOWN = "shutdown"
    PAUSE = "pause"
    CANCEL = "cancel"
    LEASE_LOST = "lease-lost"

    @property
    def rank(self) -> int:
        """The escalation order: a request never replaces a stronger one during a run."""
        return list(Control).index(self)


#: The job row's column for each :class:`Progress` field.
PROGRESS_COLUMNS: dict[str, str] = {
    "current": "progress_current",
    "total": "progress_total",
    "message": "progress_message",
    "stage_name": "stage_name",
    "stage_index": "stage_index",
    "stage_count": "stage_count",
    "weighted_percent": "weighted_percent",
}

#: Progress messages longer than this are clipped before they are stored.
MAX_PROGRESS_MESSAGE = 2000


def stage_json(name: str | None, index: int | None, count: int | None) -> dict[str, Any] | None:
    """The ``stage`` object of the JSON shapes (events and jobs), or None outside stages."""
    if name is None and index is None:
        return None
    return {"name": name, "index": index, "count": count}


@dataclass(frozen=True, slots=True)
class Progress:
    """A job's progress at one moment, as reported, stored in its row and sent in its events."""

    current: float | None = None
    total: float | None = None
    message: str | None = None
    stage_name: str | None = None
    stage_index: int | None = None
    stage_count: int | None = None
    #: Overall percent, weighting the declared stages.
    weighted_percent: float | None = None

    def percentage(self) -> float | None:
        """``current`` as a percent of ``total`` (0..100), when both are known and ``total`` is positive."""
        if not self.total or self.total <= 0 or self.current is None:
            return None
        return max(0.0, min(100.0, 100.0 * self.current / self.total))

    def columns(self) -> dict[str, Any]:
        """The job row's progress columns with these values."""
        return dict(zip(_COLUMN_NAMES, _progress_values(self), strict=True))

    @classmethod
    def of(cls, row: Any) -> Progress:
        """The progress held in a job row (anything with the row's progress attributes)."""
        values = _row_progress(row)
        # A job that never reported (most rows read by claims) shares the one empty value.
        return NO_PROGRESS if values == _NO_VALUES else cls(*values)


#: No progress reported (Progress is frozen, so one value serves every holder).
NO_PROGRESS = Progress()


class ProgressFields:
    """The fields of a held :class:`Progress` (``self.progress``), readable as the holder's own attributes."""

    __slots__ = ()
    progress: Progress

    @property
    def current(self) -> float | None:
        """:attr:`Progress.current`."""
        return self.progress.current

    @property
    def total(self) -> float | None:
        """:attr:`Progress.total`."""
        return self.progress.total

    @property
    def message(self) -> str | None:
        """:attr:`Progress.message`."""
        return self.progress.message

    @property
    def stage_name(self) -> str | None:
        """:attr:`Progress.stage_name`."""
        return self.progress.stage_name

    @property
    def stage_index(self) -> int | None:
        """:attr:`Progress.stage_index`."""
        return self.progress.stage_index

    @property
    def stage_count(self) -> int | None:
        """:attr:`Progress.stage_count`."""
        return self.progress.stage_count

    @property
    def weighted_percent(self) -> float | None:
        """:attr:`Progress.weighted_percent`."""
        return self.progress.weighted_percent


# Read all seven at once (these run for every job event and write): the fields in declaration order,
# which PROGRESS_COLUMNS follows, and the row's columns in the same order.
_COLUMN_NAMES = tuple(PROGRESS_COLUMNS.values())
_progress_values = attrgetter(*(f.name for f in fields(Progress)))
_row_progress = attrgetter(*_COLUMN_NAMES)
_NO_VALUES = (None,) * len(_COLUMN_NAMES)
if [f.name for f in fields(Progress)] != list(PROGRESS_COLUMNS) or not all(
    isinstance(getattr(ProgressFields, name, None), property) for name in PROGRESS_COLUMNS
):
    raise TypeError("Progress, PROGRESS_COLUMNS and ProgressFields must list the same fields in one order")


class JobTable(SQLModel, table=True):
    """The ``jobs`` table: one unit of work, a queued handler run or a tracked external job.

    The store reads rows into :class:`Job` records (plain dataclasses; building instrumented ORM objects
    costs more than the SQL on the hot path).
    """

    __tablename__ = "jobs"
    __table_args__ = (
        # In claim order (priority descending, then run_at, then id): a claim reads its first rows instead of
        # sorting every pending job. The id is spelled out: PostgreSQL orders equal keys by their place in
        # the table, not by id, and a plan that has to sort by id at all may sort every pending job (see
        # JobStore._migrate). It replaces "ix_jobs_claim" and "ix_jobs_due", which lacked it.
        Index("ix_jobs_claim_order", "status", text("priority DESC"), "run_at", "id"),
        Index("ix_jobs_updated", "updated_at"),
        Index("ix_jobs_batch", "batch_id"),
    )

    id: int | None = Field(default=None, primary_key=True)
    type: str = Field(max_length=200)
    kind: str = Field(default=JobKind.QUEUED, max_length=16)
    name: str | None = Field(default=None, max_length=300)
    payload: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    status: str = Field(default=JobStatus.PENDING, max_length=16)
    control: str = Field(default=Control.RUN, max_length=16)
    control_by: str | None = Field(default=None, max_length=300)
    priority: int = 0
    run_at: datetime = Field(default_factory=utcnow)
    attempts: int = 0
    max_attempts: int = 1
    timeout: float | None = None
    # Progress, written in batches on the monitor's tick.
    progress_current: float | None = None
    progress_total: float | None = None
    progress_message: str | None = None
    stage_name: str | None = None
    stage_index: int | None = None
    stage_count: int | None = None
    weighted_percent: float | None = None
    checkpoint: Any | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    result: Any | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    error: str | None = None
    owner: str | None = Field(default=None, max_length=300)
    room: str | None = Field(default=None, max_length=300)
    batch_id: int | None = Field(default=None, foreign_key="batches.id")
    interrupted: bool = False
    worker_id: str | None = Field(default=None, max_length=100)
    #: Which process last wrote the row (see JobStore.origin).
    origin: str | None = Field(default=None, max_length=32)
    lease_until: datetime | None = None
    created_at: datetime = Field(default_factory=utcnow)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    updated_at: datetime = Field(default_factory=utcnow)


@dataclass(slots=True)
class Job:
    """A job as read from the store (a detached, plain record of a ``jobs`` row)."""

    id: int | None = None
    type: str = ""
    kind: str = JobKind.QUEUED
    name: str | None = None
    payload: dict[str, Any] = field(default_factory=dict)
    status: str = JobStatus.PENDING
    control: str = Control.RUN
    control_by: str | None = None
    priority: int = 0
    run_at: datetime = field(default_factory=utcnow)
    attempts: int = 0
    max_attempts: int = 1
    timeout: float | None = None
    progress_current: float | None = None
    progress_total: float | None = None
    progress_message: str | None = None
    stage_name: str | None = None
    stage_index: int | None = None
    stage_count: int | None = None
    weighted_percent: float | None = None
    checkpoint: Any | None = None
    result: Any | None = None
    error: str | None = None
    owner: str | None = None
    room: str | None = None
    batch_id: int | None = None
    interrupted: bool = False
    worker_id: str | None = None
    origin: str | None = None
    lease_until: datetime | None = None
    created_at: datetime = field(default_factory=utcnow)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    updated_at: datetime = field(default_factory=utcnow)

    def copy(self, **changes: Any) -> Job:
        """A copy with ``changes`` applied: ``dataclasses.replace`` without its per-field checks (a fifth
        of its cost; the submit path copies every job it hands to a worker)."""
        new = Job(*_job_values(self))
        for name, value in changes.items():
            setattr(new, name, value)
        return new


_job_values = attrgetter(*(f.name for f in fields(Job)))


class Batch(SQLModel, table=True):
    """A group of jobs shown as one chat message with aggregate progress."""

    __tablename__ = "batches"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(max_length=300)
    owner: str | None = Field(default=None, max_length=300)
    room: str | None = Field(default=None, max_length=300)
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class Activity(SQLModel, table=True):
    """One entry of a job's activity log (capped per job)."""

    __tablename__ = "activity"
    __table_args__ = (Index("ix_activity_job", "job_id", "id"),)

    id: int | None = Field(default=None, primary_key=True)
    job_id: int = Field(foreign_key="jobs.id")
    at: datetime = Field(default_factory=utcnow)
    level: str = Field(default="info", max_length=16)
    message: str
    context: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))


class MessageBinding(SQLModel, table=True):
    """Which chat message shows a job or batch, so that a restart edits it instead of posting anew."""

    __tablename__ = "message_bindings"
    __table_args__ = (UniqueConstraint("platform", "target_kind", "target_id", "room"),)

    id: int | None = Field(default=None, primary_key=True)
    platform: str = Field(max_length=32)
    target_kind: str = Field(max_length=8)  # "job" or "batch"
    target_id: int
    room: str = Field(max_length=300)
    message_id: str = Field(max_length=300)
    pinned: bool = False
    finished: bool = False
    extra: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class KeyValue(SQLModel, table=True):
    """Small persistent state for adapters: sync tokens, device ids."""

    __tablename__ = "kv"

    key: str = Field(primary_key=True, max_length=200)
    value: Any | None = Field(default=None, sa_column=Column(JSON, nullable=True))
