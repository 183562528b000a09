"""The durable job store: submit, claim, finish, user actions, queries and bindings.

Every public method is ``async`` and runs its SQL in the :class:`~core.db.Database` executor, so the
event loop never blocks. The hot paths (claim, finish, progress writes) use SQLAlchemy Core statements
and handle many jobs per transaction.

Writes made on behalf of a worker are *fenced*: they only apply while the job is still ``running`` under
that worker's id and, on PostgreSQL, while its lease (``lease_until``) has not run out. A worker that lost
its lease can therefore not overwrite a job someone else recovered, nor one that is about to be recovered.
SQLite serves one process, whose jobs nobody else can take over, so there the lease is not part of the fence.

Every write that other processes should know about is announced to the change listeners (see
:meth:`JobStore.add_change_listener`); on PostgreSQL :mod:`core.notify` turns them into ``NOTIFY``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal, TypedDict

from sqlalchemy import (
    JSON,
    Boolean,
    ColumnElement,
    Connection,
    String,
    and_,
    bindparam,
    case,
    delete,
    func,
    insert,
    or_,
    select,
    text,
    update,
)

from .activity_log import ActivityLog
from .adapter_state import AdapterState
from .batches import BatchStore, BatchSummary, derive_batch_status
from .db import SCHEMA_LOCK_KEY, Database
from .errors import IllegalTransition, JobNotFound
from .lifecycle import Action, plan
from .models import (
    ACTIVE_STATUSES,
    NO_PROGRESS,
    PROGRESS_COLUMNS,
    TERMINAL_STATUSES,
    Control,
    Job,
    JobKind,
    JobStatus,
    Progress,
)
from .storebase import (
    SqliteTable,
    activity_t,
    batches_t,
    bindings_t,
    driver_connection,
    in_db,
    jobs_t,
    row_to_job,
)

S = JobStatus

log = logging.getLogger(__name__)

#: What a write changed, for the change listeners: ``work`` (a queued job became pending: idle workers
#: should claim), ``control`` (a running job was asked to pause or cancel: its worker should read controls)
#: and ``rows`` (job rows changed: other processes' monitors should poll).
ChangeKind = Literal["work", "control", "rows"]

#: How often (seconds) a long-lived store re-measures the database clock's offset.
CLOCK_RESYNC_SECONDS = 300.0

# Claim statements, built once: statement construction costs more than SQLite's work on this path.
_CLAIM_PICK = (
    select(jobs_t.c.id)
    .where(
        jobs_t.c.status == JobStatus.PENDING,
        jobs_t.c.run_at <= bindparam("c_now"),
        jobs_t.c.kind == JobKind.QUEUED,
        or_(bindparam("c_all_types"), jobs_t.c.type.in_(bindparam("c_types", expanding=True))),
    )
    .order_by(jobs_t.c.priority.desc(), jobs_t.c.run_at, jobs_t.c.id)
    .limit(bindparam("c_limit"))
)
_CLAIM_VALUES = {
    "status": JobStatus.RUNNING,
    "control": Control.RUN,
    # A claim starts the first try or continues the current one (a resume, a shutdown's requeue); only a
    # try that ended without success (a failure, a timeout, a lost worker) moves to the next attempt.
    "attempts": case((jobs_t.c.attempts < 1, 1), else_=jobs_t.c.attempts),
    "worker_id": bindparam("c_worker"),
    "lease_until": bindparam("c_lease"),
    "started_at": func.coalesce(jobs_t.c.started_at, bindparam("c_now")),
    "interrupted": False,
    "updated_at": bindparam("c_now"),
    "origin": bindparam("c_origin"),
}
# (No second status test outside the pick: BEGIN IMMEDIATE holds off every other writer, and with it SQLite
# would find the rows by scanning all pending jobs, not by their ids.)
_CLAIM_SQLITE = (
    update(jobs_t)
    .where(jobs_t.c.id.in_(_CLAIM_PICK.scalar_subquery()))
    .values(**_CLAIM_VALUES)
    .returning(*jobs_t.c)
)
# PostgreSQL: lock the candidates with SKIP LOCKED (concurrent claimers take different rows, nobody waits)
# and update them, in one statement (one round trip). The CTE is evaluated once. The update finds the rows
# by id alone: they are locked, and were pending when locked (a locked row is checked again in its newest
# version). A second status test here let the planner, when it expected few pending jobs (no statistics
# yet), scan every pending job and match each against the picked ids: 15-25 ms per claim with 16,000
# queued, against well under 1 ms through the primary key.
_CLAIM_PICKED = _CLAIM_PICK.with_for_update(skip_locked=True).cte("picked")
_CLAIM_PG = (
    update(jobs_t)
    .where(jobs_t.c.id == _CLAIM_PICKED.c.id)
    .values(**dict(_CLAIM_VALUES, updated_at=func.clock_timestamp()))  # see JobStore._stamp
    .returning(*jobs_t.c)
)
# PostgreSQL stamps updated_at with the server's clock, like every other write there (see JobStore._stamp).
_INSERT_JOBS_PG = (
    insert(jobs_t)
    .values(updated_at=func.clock_timestamp())
    .returning(*jobs_t.c, sort_by_parameter_order=True)
)
_INSERT_ACTIVITY = insert(activity_t)
#: Claim indexes of earlier builds, replaced by ``ix_jobs_claim_order`` (see JobStore._migrate).
_OLD_CLAIM_INDEXES = ("ix_jobs_claim", "ix_jobs_due")
#: The monitor's poll reads the rows changed in the last seconds: a few, at the end of ``ix_jobs_updated``.
#: PostgreSQL cannot know that before the table is first analyzed (autovacuum analyzes it a minute or so
#: after it fills, never if it is off): without statistics it guesses a third of the rows match and reads the
#: whole table for every poll. Measured on the PostgreSQL bench, 100 to 460 such scans in one run of 20,000
#: jobs, 1 to 8 million rows read. The poll therefore forbids sequential scans in its own transaction.
_POLL_BY_INDEX = text("SET LOCAL enable_seqscan = off")
# The top priority among due pending queued jobs: what a claim would take before a new job (see Handoff).
_DUE_TOP_PRIORITY = select(func.max(jobs_t.c.priority)).where(
    jobs_t.c.status == JobStatus.PENDING,
    jobs_t.c.kind == JobKind.QUEUED,
    jobs_t.c.run_at <= bindparam("d_now"),
)

# The progress columns as executemany parameters ("p_<column>"; see Progress.columns and _progress_params).
_PROGRESS_PARAMS: dict[str, Any] = {column: bindparam(f"p_{column}") for column in PROGRESS_COLUMNS.values()}


def _progress_params(progress: Progress | None) -> dict[str, Any]:
    """Values for _PROGRESS_PARAMS (all None without progress)."""
    return {f"p_{column}": value for column, value in (progress or Progress()).columns().items()}


# The completion of many jobs in one executemany; fenced on the worker id and the running status.
_COMPLETE_STMT = (
    update(jobs_t)
    .where(
        jobs_t.c.id == bindparam("b_id"),
        jobs_t.c.worker_id == bindparam("b_worker"),
        jobs_t.c.status == JobStatus.RUNNING,
    )
    .values(
        status=JobStatus.COMPLETED,
        result=bindparam("b_result", type_=JSON),
        error=None,
        finished_at=bindparam("b_now"),
        updated_at=bindparam("b_now"),
        origin=bindparam("b_origin"),
        lease_until=None,
        **_PROGRESS_PARAMS,
    )
)

# PostgreSQL also fences on the lease: a completion after the lease ran out is refused (see the module doc).
_COMPLETE_STMT_LEASED = _COMPLETE_STMT.where(jobs_t.c.lease_until >= bindparam("b_now")).values(
    updated_at=func.clock_timestamp()  # see JobStore._stamp
)

RecoveryPolicy = Literal["pause", "requeue"]

_ACTIVITY_COLUMNS = ("job_id", "at", "level", "message", "context")


class _SqliteHotPath:
    """The statements of a job's insert and completion, prepared for SQLite's own cursor (see
    :class:`~core.storebase.SqliteTable`): the same SQL the Core statements above compile to."""

    def __init__(self, db: Database) -> None:
        self.jobs = SqliteTable(jobs_t, db.engine.dialect)
        self.activity = SqliteTable(activity_t, db.engine.dialect)
        self.insert_activity = self.activity.insert_sql(_ACTIVITY_COLUMNS)
        #: INSERT per column list (every insert of the store uses the same one).
        self.insert_jobs: dict[tuple[str, ...], str] = {}
        self.due_top_priority = "SELECT max(priority) FROM jobs WHERE status = ? AND kind = ? AND run_at <= ?"
        # Which of the completions just written applied (_complete_many, when some job was taken away).
        self.completed_at = "SELECT id FROM jobs WHERE status = ? AND finished_at = ? AND id IN ({})"
        progress = list(PROGRESS_COLUMNS.values())
        self.progress_columns = progress
        self.complete = (
            "UPDATE jobs SET status = ?, result = ?, error = NULL, finished_at = ?, updated_at = ?,"
            " origin = ?, lease_until = NULL, "
            + ", ".join(f"{c} = ?" for c in progress)
            + " WHERE id = ? AND worker_id = ? AND status = ?"
        )

        # The claim, compiled from _CLAIM_SQLITE itself: its SQL with the type list left to expand, and its
        # parameters in order, the statement's own literals included (see claim_params).
        claim = _CLAIM_SQLITE.compile(dialect=db.engine.dialect)
        if not claim.string.endswith(" RETURNING " + ", ".join(self.jobs.columns)):
            raise RuntimeError("the claim must return every column in table order")  # (load reads it so)
        self._claim_sql = claim.string
        self._claim_names = list(claim.positiontup or [])
        self._claim_literals = claim.construct_params(_check=False)
        self._claim_by_count: dict[int, str] = {}

    def claim_sql(self, types: list[str] | None) -> str:
        """The claim for this many types (an empty list, for all types, is legal SQL in SQLite)."""
        n = len(types or ())
        sql = self._claim_by_count.get(n)
        if sql is None:
            sql = self._claim_sql.replace("__[POSTCOMPILE_c_types]", ", ".join("?" * n))
            self._claim_by_count[n] = sql
        return sql

    def claim_params(self, values: dict[str, Any]) -> list[Any]:
        """The claim's parameters in order (``values`` by name over the literals; c_types expanded)."""
        merged = {**self._claim_literals, **values}
        out: list[Any] = []
        for name in self._claim_names:
            if name == "c_types":
                out.extend(merged[name])
            else:
                out.append(merged[name])
        return out

    def insert_sql(self, columns: tuple[str, ...]) -> str:
        """The job insert for these columns."""
        sql = self.insert_jobs.get(columns)
        if sql is None:
            sql = self.insert_jobs[columns] = self.jobs.insert_sql(columns)
        return sql


@dataclass(slots=True)
class Handoff:
    """A free slot of a worker in the submitting process, offered to a job being submitted.

    The store inserts the job already claimed by that worker (no separate claim, one commit) unless a due
    pending job would be claimed before it; see :meth:`JobStore.submit_many`.
    """

    worker_id: str
    lease_seconds: float
    #: Called once on the event loop after the insert, before the submitter resumes (even if it gave up):
    #: ``deliver(inserted, claimed)``; ``claimed`` is None when the slot was not taken or the insert failed.
    deliver: Callable[[Job | None, Job | None], None]
    #: The job as claimed for the worker, once the transaction that took the offer committed.
    claimed: Job | None = None


@dataclass(slots=True)
class NewJob:
    """Everything needed to insert one job (payload already validated)."""

    type: str
    payload: dict[str, Any] = field(default_factory=dict)
    kind: str = JobKind.QUEUED
    name: str | None = None
    priority: int = 0
    run_at: datetime | None = None
    max_attempts: int = 1
    timeout: float | None = None
    owner: str | None = None
    room: str | None = None
    batch_id: int | None = None
    status: str = JobStatus.PENDING
    progress_total: float | None = None
    #: Insert it claimed by this worker when nothing due is waiting before it (a queued job due now).
    handoff: Handoff | None = None


class JobFilters(TypedDict, total=False):
    """The filters of :meth:`JobStore.list_jobs` (all optional)."""

    statuses: Iterable[str] | None
    type: str | None
    batch_id: int | None
    room: str | None
    limit: int
    newest_first: bool


@dataclass(slots=True)
class ProgressWrite:
    """One job's latest progress, written on the monitor's tick.

    With ``worker_id`` (a queued job run by that worker) the write is fenced like the worker's other writes.
    """

    job_id: int
    progress: Progress
    worker_id: str | None = None


@dataclass(slots=True)
class Outcome:
    """How a run ended, as reported by a worker, to be written in a group commit."""

    job_id: int
    worker_id: str
    status: JobStatus
    result: Any = None
    error: str | None = None
    checkpoint: Any = None
    has_checkpoint: bool = False
    note: str | None = None
    progress: Progress | None = None


@dataclass(slots=True)
class FinishResult:
    """What :meth:`JobStore.finish_many` wrote: completed ids, and the other changed rows."""

    completed_ids: set[int] = field(default_factory=set)
    changed: list[Job] = field(default_factory=list)
    finished_at: datetime | None = None


@dataclass(slots=True)
class ActionResult:
    """The effect of a user action on a job: its new record and whether the change is still on its way."""

    job: Job
    action: str
    #: True when a running job was asked to pause or cancel and will do so at its next checkpoint.
    requested: bool = False


def _settle(fut: asyncio.Future[Any], result: Any = None, *, exc: BaseException | None = None) -> None:
    """Resolve a future unless its caller gave up on it (cancelled)."""
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    """Exponential backoff: ``base * 2**(attempt-1)``, capped."""
    return min(cap, base * math.pow(2, max(0, attempt - 1)))


class JobStore(ActivityLog, BatchStore, AdapterState):
    """Durable storage of jobs and everything around them.

    This class holds the jobs and the queue (submit, claim, finish, actions, queries); its other parts
    live in their own modules: :mod:`core.batches`, :mod:`core.activity_log`, :mod:`core.adapter_state`.
    """

    def __init__(
        self,
        db: Database,
        *,
        activity_limit: int = 100,
        retry_backoff: float = 2.0,
        retry_backoff_max: float = 300.0,
        origin: str | None = None,
    ) -> None:
        self.db = db
        #: Tags every row this store writes, so this process's monitor can skip its own changes when polling.
        self.origin = origin or uuid.uuid4().hex[:16]
        self.activity_limit = activity_limit
        self.retry_backoff = retry_backoff
        self.retry_backoff_max = retry_backoff_max
        self._submit_queue: list[tuple[list[NewJob], str | None, asyncio.Future[list[Job]]]] = []
        #: Outcomes waiting for the next group commit (SQLite; see :meth:`finish_many`).
        self._finish_queue: list[tuple[list[Outcome], asyncio.Future[FinishResult]]] = []
        self._writer: asyncio.Task[None] | None = None
        self._change_listeners: list[Callable[[ChangeKind], None]] = []
        self._sqlite = _SqliteHotPath(db) if db.is_sqlite else None

    # ---------------------------------------------------------------- changes
    def add_change_listener(self, fn: Callable[[ChangeKind], None]) -> None:
        """Call ``fn(kind)`` on the event loop after each committed write of that kind (see ChangeKind)."""
        self._change_listeners.append(fn)

    def remove_change_listener(self, fn: Callable[[ChangeKind], None]) -> None:
        """Stop calling ``fn``."""
        if fn in self._change_listeners:
            self._change_listeners.remove(fn)

    def _changed(self, *kinds: ChangeKind) -> None:
        for fn in list(self._change_listeners):
            for kind in kinds:
                try:
                    fn(kind)
                except Exception:  # a notification is an optimisation; it must never fail a write
                    log.exception("change listener failed")

    def now(self) -> datetime:
        """The current time on the database's clock (see :meth:`Database.now`)."""
        return self.db.now()

    def _stamp(self, now: datetime) -> datetime | Any:
        """The ``updated_at`` of an UPDATE: on PostgreSQL the server's ``clock_timestamp()`` at row time.

        ``now`` is taken before the transaction waits for its row locks, so a write stamped earlier could
        commit after a later-stamped one and look older than the version it replaced; other processes'
        monitors would then drop it as stale (a completion lost behind a progress write). The clock read
        at update time, after the row lock, makes each row's stamps increase. SQLite serialises writers
        before ``now`` matters, and keeps ``now``.
        """
        return now if self.db.is_sqlite else func.clock_timestamp()

    def _fence(self, worker_id: str | Any, now: datetime | Any) -> list[ColumnElement[bool]]:
        """The conditions under which a worker may still write its running job (see the module doc)."""
        cond = [jobs_t.c.worker_id == worker_id, jobs_t.c.status == S.RUNNING]
        if not self.db.is_sqlite:
            cond.append(jobs_t.c.lease_until >= now)
        return cond

    # ----------------------------------------------------------------- schema
    async def init(self) -> None:
        """Create the schema if needed."""
        await self.db.run(self.db.create_schema)
        await self.db.run(self._migrate)

    def _migrate(self) -> None:
        """Bring a database made by an older version up to date (create_schema only adds missing tables).

        The claim order needs an index that gives it whole: priority descending, run_at, id.
        ``ix_jobs_claim`` (status, priority, run_at) made every claim sort all pending jobs. ``ix_jobs_due``
        lacked the id: on PostgreSQL a claim then sorted by id within equal priority and run_at, and without
        table statistics (a new table, or statistics taken while the queue was empty, then a burst of jobs)
        the planner expected one pending row and sorted every pending job on each claim: 6.9 ms per claim
        with 16,566 jobs queued, against 0.9 ms with the id in the index (EXPLAIN ANALYZE, no statistics).
        ``ix_jobs_claim_order`` gives the order whole, so no plan sorts. On PostgreSQL this runs under the
        schema lock, so that processes starting at once do not build the index twice (one process serves a
        SQLite database).
        """
        order = next(ix for ix in jobs_t.indexes if ix.name == "ix_jobs_claim_order")
        with self.db.engine.begin() as conn:
            if not self.db.is_sqlite:
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": SCHEMA_LOCK_KEY})
            order.create(conn, checkfirst=True)
            for old in _OLD_CLAIM_INDEXES:
                conn.exec_driver_sql(f"DROP INDEX IF EXISTS {old}")

    # ----------------------------------------------------------------- submit
    async def submit(self, job: NewJob, *, actor: str | None = None) -> Job:
        """Insert one job and its first activity entry; return the stored job."""
        return (await self.submit_many([job], actor=actor))[0]

    async def submit_many(self, jobs: Sequence[NewJob], *, actor: str | None = None) -> list[Job]:
        """Insert several jobs in one transaction.

        Concurrent calls are group-committed: submissions that arrive while a transaction is in flight
        are written together in the next one, each caller still getting its own jobs back. On SQLite
        the completions waiting at that moment share the transaction as well (see :meth:`finish_many`).
        A caller is answered once the transaction that holds its jobs committed.

        A job with a :class:`Handoff` is inserted claimed by that worker (the row goes to
        ``handoff.claimed``), unless a due pending job has its priority or a higher one: a claim would
        take those first. The caller still gets the job as submitted, pending.
        """
        fut: asyncio.Future[list[Job]] = asyncio.get_running_loop().create_future()
        self._submit_queue.append((list(jobs), actor, fut))
        self._kick_writer()
        return await fut

    def _kick_writer(self) -> None:
        """Make sure the group-commit task runs (it drains the queues, then ends)."""
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._flush_queued(), name="store-writer")

    async def _flush_queued(self) -> None:
        """Write the queued submissions and outcomes, one transaction per round, until none are left.

        What arrives while a transaction is in flight goes into the next one. A sequential submitter's
        next job and the completion of its previous one thus share a commit: one transaction per job.
        """
        while self._submit_queue or self._finish_queue:
            subs, self._submit_queue = self._submit_queue, []
            fins, self._finish_queue = self._finish_queue, []
            try:
                sub_out, fin_out = await self.db.run(
                    self._write_group, [(g[0], g[1]) for g in subs], [f[0] for f in fins]
                )
            except Exception as exc:
                if len(subs) + len(fins) == 1:
                    if subs:
                        self._answer_submit(subs[0][0], subs[0][2], None, exc)
                    else:
                        _settle(fins[0][1], exc=exc)
                    continue
                await self._write_isolated(subs, fins)
                continue
            for (_, ffut), res in zip(fins, fin_out, strict=True):
                _settle(ffut, res)
            for (jobs, _, fut), out in zip(subs, sub_out, strict=True):
                self._answer_submit(jobs, fut, out)

    async def _write_isolated(
        self,
        subs: list[tuple[list[NewJob], str | None, asyncio.Future[list[Job]]]],
        fins: list[tuple[list[Outcome], asyncio.Future[FinishResult]]],
    ) -> None:
        """A group commit failed: write each part in its own transaction, so one bad part fails alone."""
        for ocs, ffut in fins:
            try:
                res = await self.db.run(self._finish_many, ocs)
            except Exception as exc:
                _settle(ffut, exc=exc)
            else:
                _settle(ffut, res)
        for jobs, actor, fut in subs:
            try:
                out = await self.db.run(self._submit_many, jobs, actor)
            except Exception as exc:
                self._answer_submit(jobs, fut, None, exc)
            else:
                self._answer_submit(jobs, fut, out)

    def _write_group(
        self, groups: list[tuple[list[NewJob], str | None]], finishes: list[list[Outcome]]
    ) -> tuple[list[list[Job]], list[FinishResult]]:
        """One transaction: the outcomes first (a job they requeue is due before the new ones), then the
        submissions. Each caller gets its own part of the result."""
        if not finishes:
            return self._submit_groups(groups), []
        now = self.db.now()
        outcomes = [oc for ocs in finishes for oc in ocs]
        with self._transaction(prepared=all(oc.status == S.COMPLETED for oc in outcomes)) as conn:
            res = self._finish_in(conn, outcomes, now)
            flat, actors = self._flatten(groups)
            rows = self._submit_in(conn, flat, now, None, actors) if flat else []
        return self._split(groups, self._after_submit(flat, rows)), self._split_finish(res, finishes)

    def _transaction(self, *, prepared: bool) -> AbstractContextManager[Any]:
        """A write transaction: SQLAlchemy's, or for a body that runs only prepared SQL (``prepared``) on
        SQLite, the sqlite3 connection's own (see _sqlite_transaction)."""
        if prepared and self._sqlite is not None:
            return self._sqlite_transaction()
        return self.db.engine.begin()

    @contextmanager
    def _sqlite_transaction(self) -> Iterator[Any]:
        """A BEGIN IMMEDIATE transaction on a pooled sqlite3 connection, which the body gets as it is.

        For bodies that run prepared SQL only (see _SqliteHotPath): SQLAlchemy's Connection around the
        transaction costs half as much again as the SQL of a sequential submit's group commit.
        """
        fairy = self.db.engine.raw_connection()
        try:
            raw = fairy.driver_connection
            assert raw is not None
            raw.execute("BEGIN IMMEDIATE")
            try:
                yield raw
            except BaseException:
                raw.rollback()
                raise
            raw.commit()
        finally:
            fairy.close()

    @staticmethod
    def _split_finish(res: FinishResult, finishes: list[list[Outcome]]) -> list[FinishResult]:
        if len(finishes) == 1:
            return [res]
        out = []
        for ocs in finishes:
            ids = {oc.job_id for oc in ocs}
            out.append(
                FinishResult(
                    completed_ids=res.completed_ids & ids,
                    changed=[j for j in res.changed if j.id in ids],
                    finished_at=res.finished_at,
                )
            )
        return out

    def _answer_submit(
        self,
        jobs: list[NewJob],
        fut: asyncio.Future[list[Job]],
        out: list[Job] | None,
        exc: BaseException | None = None,
    ) -> None:
        """Hand claimed jobs to their worker first (even if the submitter gave up), then answer it."""
        for i, nj in enumerate(jobs):
            if nj.handoff is not None:
                nj.handoff.deliver(out[i] if out else None, nj.handoff.claimed if out else None)
        if out is not None:
            # A job inserted claimed is no work for other workers.
            claimed = [nj.handoff.claimed if nj.handoff else None for nj in jobs]
            self._announce_submitted([c or j for c, j in zip(claimed, out, strict=True)])
            _settle(fut, out)
        else:
            _settle(fut, exc=exc)

    def _announce_submitted(self, jobs: list[Job]) -> None:
        if not jobs:
            return
        if any(j.kind == JobKind.QUEUED and j.status == S.PENDING for j in jobs):
            self._changed("work", "rows")
        else:
            self._changed("rows")

    @staticmethod
    def _flatten(groups: list[tuple[list[NewJob], str | None]]) -> tuple[list[NewJob], list[str | None]]:
        flat: list[NewJob] = []
        actors: list[str | None] = []
        for jobs, actor in groups:
            flat.extend(jobs)
            actors.extend([actor] * len(jobs))
        return flat, actors

    @staticmethod
    def _split(groups: list[tuple[list[NewJob], str | None]], out: list[Job]) -> list[list[Job]]:
        res, i = [], 0
        for jobs, _ in groups:
            res.append(out[i : i + len(jobs)])
            i += len(jobs)
        return res

    def _submit_groups(self, groups: list[tuple[list[NewJob], str | None]]) -> list[list[Job]]:
        if len(groups) == 1:
            return [self._submit_many(*groups[0])]
        flat, actors = self._flatten(groups)
        return self._split(groups, self._submit_many(flat, None, actors=actors))

    def _submit_many(
        self, jobs: list[NewJob], actor: str | None, *, actors: list[str | None] | None = None
    ) -> list[Job]:
        if not jobs:
            return []
        now = self.db.now()
        with self._transaction(prepared=True) as conn:
            rows = self._submit_in(conn, jobs, now, actor, actors)
        return self._after_submit(jobs, rows)

    def _submit_in(
        self,
        conn: Connection,
        jobs: list[NewJob],
        now: datetime,
        actor: str | None,
        actors: list[str | None] | None,
    ) -> list[tuple[bool, Job]]:
        """Insert the jobs in the caller's transaction; (handed over, row) per job."""
        handed = self._handoffs(conn, jobs, now)
        return list(zip(handed, self._insert_jobs(conn, jobs, now, handed, actor, actors), strict=True))

    @staticmethod
    def _after_submit(jobs: list[NewJob], rows: list[tuple[bool, Job]]) -> list[Job]:
        """After the commit: hand the claimed jobs over; the submitters get their jobs as submitted."""
        out = []
        for nj, (hand, row) in zip(jobs, rows, strict=True):
            if hand and nj.handoff is not None:
                nj.handoff.claimed = row  # committed: the claim is real
                # The submitter sees the job as submitted; its claim happened in the same transaction.
                row = row.copy(
                    status=S.PENDING, attempts=0, worker_id=None, lease_until=None, started_at=None
                )
            out.append(row)
        return out

    def _handoffs(self, conn: Connection, jobs: list[NewJob], now: datetime) -> list[bool]:
        """Which new jobs their offered worker slot takes: those no due pending job would precede."""
        if not any(nj.handoff for nj in jobs):
            return [False] * len(jobs)
        # The claim order is priority, then run_at, then id: a new job due now comes after every due
        # pending job of the same or a higher priority.
        if self._sqlite is not None:
            sq = self._sqlite
            top = (
                driver_connection(conn)
                .execute(sq.due_top_priority, (S.PENDING, JobKind.QUEUED, sq.jobs.value("run_at", now)))
                .fetchone()[0]
            )
        else:
            top = conn.execute(_DUE_TOP_PRIORITY, {"d_now": now}).scalar()
        return [nj.handoff is not None and (top is None or nj.priority > top) for nj in jobs]

    def _insert_jobs(
        self,
        conn: Connection,
        jobs: list[NewJob],
        now: datetime,
        handed: list[bool],
        actor: str | None,
        actors: list[str | None] | None,
    ) -> list[Job]:
        rows = [
            {
                "type": nj.type,
                "kind": nj.kind,
                "name": nj.name,
                "payload": nj.payload,
                "status": nj.status,
                "control": Control.RUN,
                "priority": nj.priority,
                "run_at": nj.run_at or now,
                "attempts": 0,
                "max_attempts": max(1, nj.max_attempts),
                "timeout": nj.timeout,
                "owner": nj.owner,
                "room": nj.room,
                "batch_id": nj.batch_id,
                "progress_total": nj.progress_total,
                "interrupted": False,
                "created_at": now,
                "updated_at": now,
                "origin": self.origin,
                "started_at": now if nj.status == S.RUNNING else None,
                "worker_id": None,
                "lease_until": None,
            }
            for nj in jobs
        ]
        for row, nj, hand in zip(rows, jobs, handed, strict=True):
            if hand and nj.handoff is not None:
                # Inserted as its claim leaves a job (see _CLAIM_VALUES).
                row.update(
                    status=S.RUNNING,
                    attempts=1,
                    worker_id=nj.handoff.worker_id,
                    lease_until=now + timedelta(seconds=nj.handoff.lease_seconds),
                    started_at=now,
                )
        if self._sqlite is not None:
            out = self._insert_sqlite(conn, rows)
        else:
            # One multi-row INSERT ... RETURNING (SQLAlchemy's "insertmanyvalues"), in parameter order.
            for r in rows:
                del r["updated_at"]
            out = [row_to_job(r) for r in conn.execute(_INSERT_JOBS_PG, rows)]
        notes = []
        for idx, (nj, job) in enumerate(zip(jobs, out, strict=True)):
            who = (actors[idx] if actors is not None else actor) or nj.owner
            what = "tracking started" if nj.kind == JobKind.TRACKED else "submitted"
            notes.append(
                {
                    "job_id": job.id,
                    "at": now,
                    "level": "info",
                    "message": what + (f" by {who}" if who else ""),
                    "context": None,
                }
            )
        # No trim here: a new job has one entry; the batched log path enforces the cap.
        self._insert_activity(conn, notes)
        return out

    def _insert_sqlite(self, conn: Connection, rows: list[dict[str, Any]]) -> list[Job]:
        """One prepared INSERT per job on the driver's cursor (see _SqliteHotPath).

        The stored job is built from the values bound, not read back: the columns not inserted are NULL
        (no server defaults), the new id is the row id, and the payload is what reading it would give.
        """
        assert self._sqlite is not None
        t, raw = self._sqlite.jobs, driver_connection(conn)
        columns = tuple(rows[0])
        sql = self._sqlite.insert_sql(columns)
        at = columns.index("payload")
        out = []
        for r in rows:
            params = t.bind(columns, r)
            cur = raw.execute(sql, params)
            out.append(Job(**{**r, "id": cur.lastrowid, "payload": t.stored("payload", params[at])}))
        return out

    def _insert_activity(self, conn: Connection, notes: list[dict[str, Any]]) -> None:
        """Append activity entries (``_ACTIVITY_COLUMNS``) in the caller's transaction, untrimmed."""
        if self._sqlite is not None:
            t = self._sqlite.activity
            driver_connection(conn).executemany(
                self._sqlite.insert_activity, [t.bind(_ACTIVITY_COLUMNS, n) for n in notes]
            )
        else:
            conn.execute(_INSERT_ACTIVITY, notes)

    # ------------------------------------------------------------------ claim
    async def claim(
        self, worker_id: str, limit: int, *, types: Iterable[str] | None = None, lease_seconds: float = 30.0
    ) -> list[Job]:
        """Atomically move up to ``limit`` due pending jobs to running under ``worker_id``.

        Order: highest priority first, then earliest run_at, then id. On PostgreSQL the candidate rows
        are locked with ``FOR UPDATE SKIP LOCKED``; on SQLite the transaction is ``BEGIN IMMEDIATE``.
        """
        if limit <= 0:
            return []
        jobs = await self.db.run(self._claim, worker_id, limit, list(types) if types else None, lease_seconds)
        if jobs:
            self._changed("rows")
        return jobs

    def _claim(self, worker_id: str, limit: int, types: list[str] | None, lease_seconds: float) -> list[Job]:
        now = self.db.now()
        params: dict[str, Any] = {
            "c_now": now,
            "c_limit": limit,
            "c_types": types or [],
            "c_all_types": types is None,
            "c_worker": worker_id,
            "c_lease": now + timedelta(seconds=lease_seconds),
            "c_origin": self.origin,
        }
        # On SQLite, prepared SQL in the driver's own transaction (see _sqlite_transaction).
        with self._transaction(prepared=True) as conn:
            if self._sqlite is not None:
                # BEGIN IMMEDIATE already serialises writers: one UPDATE ... WHERE id IN (SELECT) suffices.
                jobs = self._claim_sqlite(conn, params)
            else:
                jobs = [row_to_job(r) for r in conn.execute(_CLAIM_PG, params).all()]
        jobs.sort(key=lambda j: (-j.priority, j.run_at, j.id or 0))
        return jobs

    def _claim_sqlite(self, conn: Connection, params: dict[str, Any]) -> list[Job]:
        """_CLAIM_SQLITE as prepared SQL on the driver's cursor (see _SqliteHotPath), rows read as
        SQLAlchemy would: the claim returns every column of up to a few dozen rows."""
        assert self._sqlite is not None
        sq, t = self._sqlite, self._sqlite.jobs
        types = params["c_types"] if not params["c_all_types"] else []
        values = dict(params, c_types=types, c_now=t.value("run_at", params["c_now"]))
        values["c_lease"] = t.value("lease_until", params["c_lease"])
        rows = driver_connection(conn).execute(sq.claim_sql(types), sq.claim_params(values)).fetchall()
        return [Job(**t.load(r)) for r in rows]

    @in_db
    def next_run_at(self, types: Iterable[str] | None = None) -> datetime | None:
        """The earliest run_at of a pending queued job (for the worker's idle wait)."""
        types = list(types) if types else None
        cond = [jobs_t.c.status == S.PENDING, jobs_t.c.kind == JobKind.QUEUED]
        if types is not None:
            cond.append(jobs_t.c.type.in_(types))
        with self.db.engine.connect() as conn:
            return conn.execute(select(func.min(jobs_t.c.run_at)).where(*cond)).scalar()

    # ----------------------------------------------------------------- finish
    async def finish_many(self, outcomes: Sequence[Outcome]) -> FinishResult:
        """Record how runs ended, in one transaction.

        Failures with attempts left go back to pending with exponential backoff. Each write is fenced on
        the worker id: a job recovered by someone else is left alone. Completions (the hot path) are
        written with one executemany; the other outcomes return their updated rows.

        On SQLite (one writer, one database thread: nothing runs in parallel anyway) the outcomes join
        the submissions' group commit (see :meth:`submit_many`); on PostgreSQL they keep a transaction
        of their own, which runs beside the submissions in the thread pool.
        """
        if not outcomes:
            return FinishResult()
        if self.db.is_sqlite:
            fut: asyncio.Future[FinishResult] = asyncio.get_running_loop().create_future()
            self._finish_queue.append((list(outcomes), fut))
            self._kick_writer()
            res = await fut
        else:
            res = await self.db.run(self._finish_many, list(outcomes))
        if any(j.status == S.PENDING for j in res.changed):
            self._changed("rows", "work")  # requeued (a retry, a shutdown): another worker may take it
        elif res.completed_ids or res.changed:
            self._changed("rows")
        return res

    def _finish_many(self, outcomes: list[Outcome]) -> FinishResult:
        now = self.db.now()
        with self.db.engine.begin() as conn:
            return self._finish_in(conn, outcomes, now)

    def _finish_in(self, conn: Connection, outcomes: list[Outcome], now: datetime) -> FinishResult:
        """Write the outcomes in the caller's transaction."""
        res = FinishResult(finished_at=now)
        # Rows are locked in ascending id order (see _lock_in_order), hence the sorting.
        done = sorted((oc for oc in outcomes if oc.status == S.COMPLETED), key=lambda oc: oc.job_id)
        rest = sorted((oc for oc in outcomes if oc.status != S.COMPLETED), key=lambda oc: oc.job_id)
        if done and rest:
            # Completions, then the others: lock all of them first so the order stays ascending.
            self._lock_in_order(conn, [oc.job_id for oc in outcomes])
        if done:
            res.completed_ids = self._complete_many(conn, done, now)
        for oc in rest:
            job = self._finish_one(conn, oc, now)
            if job is not None:
                res.changed.append(job)
        return res

    def _complete_many(self, conn: Connection, done: list[Outcome], now: datetime) -> set[int]:
        if self._sqlite is not None:
            rowcount = self._complete_sqlite(conn, done, now)
        else:
            params = [
                {
                    "b_id": oc.job_id,
                    "b_worker": oc.worker_id,
                    "b_result": oc.result,
                    "b_now": now,
                    "b_origin": self.origin,
                    **_progress_params(oc.progress),
                }
                for oc in done
            ]
            rowcount = conn.execute(_COMPLETE_STMT_LEASED, params).rowcount
        ids = [oc.job_id for oc in done]
        if rowcount == len(ids):
            applied = set(ids)  # every fenced update hit its row
        elif self._sqlite is not None:
            # Some job was taken away (recovered meanwhile): find out which updates applied.
            sq = self._sqlite
            sql = sq.completed_at.format(", ".join("?" * len(ids)))
            stamp = sq.jobs.value("finished_at", now)
            applied = {r[0] for r in driver_connection(conn).execute(sql, (S.COMPLETED, stamp, *ids))}
        else:
            # Some job was taken away (lease lost): find out which updates applied.
            applied = {
                r[0]
                for r in conn.execute(
                    select(jobs_t.c.id).where(
                        jobs_t.c.id.in_(ids), jobs_t.c.status == S.COMPLETED, jobs_t.c.finished_at == now
                    )
                )
            }
        if applied:
            self._insert_activity(
                conn,
                [
                    {"job_id": i, "at": now, "level": "info", "message": "completed", "context": None}
                    for i in applied
                ],
            )
        return applied

    def _complete_sqlite(self, conn: Connection, done: list[Outcome], now: datetime) -> int:
        """_COMPLETE_STMT as one executemany on the driver's cursor; returns the rows it changed."""
        assert self._sqlite is not None
        sq = self._sqlite
        t = sq.jobs
        stamp = t.value("finished_at", now)
        completed, running = S.COMPLETED, S.RUNNING
        params = []
        # Jobs that never reported share one Progress value (NO_PROGRESS): bind its columns once.
        last: Progress | None = None
        bound: tuple[Any, ...] = ()
        for oc in done:
            progress = oc.progress or NO_PROGRESS
            if progress is not last:
                columns = progress.columns()
                bound = tuple(t.value(c, columns[c]) for c in sq.progress_columns)
                last = progress
            params.append(
                (
                    completed,
                    t.value("result", oc.result),
                    stamp,
                    stamp,
                    self.origin,
                    *bound,
                    oc.job_id,
                    oc.worker_id,
                    running,
                )
            )
        return int(driver_connection(conn).executemany(sq.complete, params).rowcount)

    def _lock_in_order(self, conn: Connection, job_ids: list[int]) -> None:
        """Lock job rows in ascending id order (PostgreSQL).

        A worker process writes its running rows from several DB threads at once (completions, progress,
        heartbeats, checkpoints). Two transactions that lock overlapping rows in different orders
        deadlock, and PostgreSQL only notices after ``deadlock_timeout`` (1 s). Every multi-row write of
        running jobs therefore takes its locks in ascending id order: sorted executemany parameters, or
        this explicit ``SELECT ... ORDER BY id FOR UPDATE`` first. SQLite has one writer at a time.
        """
        if self.db.is_sqlite or len(job_ids) < 2:
            return
        conn.execute(
            select(jobs_t.c.id)
            .where(jobs_t.c.id.in_(sorted(set(job_ids))))
            .order_by(jobs_t.c.id)
            .with_for_update()
        ).all()

    def _finish_one(self, conn: Connection, oc: Outcome, now: datetime) -> Job | None:
        fence = and_(jobs_t.c.id == oc.job_id, *self._fence(oc.worker_id, now))
        values: dict[str, Any] = {"updated_at": self._stamp(now), "origin": self.origin, "lease_until": None}
        level, note = "info", oc.note
        if oc.status == S.FAILED:
            cur = conn.execute(select(jobs_t.c.attempts, jobs_t.c.max_attempts).where(fence)).first()
            if cur is None:
                return None
            attempts, max_attempts = cur
            level = "error"
            if attempts < max_attempts:
                delay = backoff_delay(attempts, self.retry_backoff, self.retry_backoff_max)
                values.update(
                    status=S.PENDING,
                    error=oc.error,
                    run_at=now + timedelta(seconds=delay),
                    worker_id=None,
                    attempts=attempts + 1,  # the next claim runs the next attempt
                )
                note = f"failed (attempt {attempts}/{max_attempts}): {oc.error}; retrying in {delay:g}s"
            else:
                values.update(status=S.FAILED, error=oc.error, finished_at=now)
                note = f"failed: {oc.error}"
        elif oc.status == S.CANCELLED:
            values.update(status=S.CANCELLED, finished_at=now)
        elif oc.status == S.PAUSED:
            values.update(status=S.PAUSED, control=Control.RUN, worker_id=None)
        elif oc.status == S.PENDING:
            values.update(status=S.PENDING, worker_id=None)
        else:  # pragma: no cover - programming error
            raise ValueError(f"bad outcome status {oc.status}")
        if oc.has_checkpoint:
            values["checkpoint"] = oc.checkpoint
        if oc.progress is not None:
            values.update(oc.progress.columns())
        row = conn.execute(update(jobs_t).where(fence).values(**values).returning(*jobs_t.c)).first()
        if row is None:
            return None
        job = row_to_job(row)
        if note is None and oc.status in (S.CANCELLED, S.PAUSED):
            note = str(oc.status) + (f" by {job.control_by}" if job.control_by else "")
        if note:
            self._log(conn, oc.job_id, level, note, None, now)
        return job

    @in_db
    def save_checkpoint(self, job_id: int, worker_id: str, state: Any) -> str | None:
        """Persist a running job's checkpoint state.

        Returns the job's control value, or None when this worker lost the job (its lease).
        """
        now = self.db.now()
        with self.db.engine.begin() as conn:
            return conn.execute(
                update(jobs_t)
                .where(jobs_t.c.id == job_id, *self._fence(worker_id, now))
                .values(checkpoint=state)
                .returning(jobs_t.c.control)
            ).scalar()

    @in_db
    def heartbeat(self, worker_id: str, lease_seconds: float) -> dict[int, str]:
        """Extend the leases of this worker's running jobs; return each job's control value.

        A job missing from the answer is no longer this worker's: recovered by someone else or, on
        PostgreSQL, its lease ran out (an expired lease is not revived: a reaper may be taking it over).
        """
        # Long-lived workers re-measure the clock offset now and then (clocks drift).
        self.db.sync_clock(max_age=CLOCK_RESYNC_SECONDS)
        now = self.db.now()
        fence = self._fence(worker_id, now)
        if not self.db.is_sqlite:
            # Lock in ascending id order, like every multi-row write of running jobs (see _lock_in_order).
            # The update then finds the locked rows by id alone, as the claim does (see _CLAIM_PG): with the
            # fence repeated here, a planner without statistics matched every running job against the
            # locked ids, half a second per heartbeat with 20,000 jobs in the table.
            fence = [
                jobs_t.c.id.in_(
                    select(jobs_t.c.id)
                    .where(*fence)
                    .order_by(jobs_t.c.id)
                    .with_for_update()
                    .scalar_subquery()
                )
            ]
        with self.db.engine.begin() as conn:
            rows = conn.execute(
                update(jobs_t)
                .where(*fence)
                .values(lease_until=now + timedelta(seconds=lease_seconds))
                .returning(jobs_t.c.id, jobs_t.c.control)
            ).all()
        return {r[0]: r[1] for r in rows}

    @in_db
    def controls(self, job_ids: Sequence[int]) -> dict[int, tuple[str, str]]:
        """``{id: (status, control)}`` for the given jobs."""
        if not job_ids:
            return {}
        with self.db.engine.connect() as conn:
            rows = conn.execute(
                select(jobs_t.c.id, jobs_t.c.status, jobs_t.c.control).where(jobs_t.c.id.in_(job_ids))
            ).all()
        return {r[0]: (r[1], r[2]) for r in rows}

    # --------------------------------------------------------------- recovery
    async def recover(
        self, policy: RecoveryPolicy = "pause", *, expired_only: bool = False, reason: str | None = None
    ) -> list[Job]:
        """Recover queued jobs left ``running`` by a dead process.

        With ``expired_only`` only jobs whose lease has run out are touched (other workers may be alive).
        ``policy="pause"`` marks them paused and interrupted; ``"requeue"`` puts them back to pending.
        """
        jobs = await self.db.run(self._recover, policy, expired_only, reason)
        if jobs and policy == "requeue":
            self._changed("rows", "work")
        elif jobs:
            self._changed("rows")
        return jobs

    def _recover(self, policy: RecoveryPolicy, expired_only: bool, reason: str | None) -> list[Job]:
        if expired_only:
            # The reaper compares leases with "now": keep its clock reading the database's.
            self.db.sync_clock(max_age=CLOCK_RESYNC_SECONDS)
        now = self.db.now()
        cond = [jobs_t.c.status == S.RUNNING, jobs_t.c.kind == JobKind.QUEUED]
        if expired_only:
            cond.append(or_(jobs_t.c.lease_until.is_(None), jobs_t.c.lease_until < now))
        why = reason or (
            "interrupted by restart" if not expired_only else "interrupted: worker lease expired"
        )
        with self.db.engine.begin() as conn:
            ids = [
                r[0] for r in conn.execute(select(jobs_t.c.id).where(*cond).with_for_update(skip_locked=True))
            ]
            if not ids:
                return []
            if policy == "requeue":
                values: dict[str, Any] = {"status": S.PENDING, "interrupted": True, "run_at": now}
                note = f"{why}; requeued"
            else:
                values = {"status": S.PAUSED, "interrupted": True}
                note = why
            rows = conn.execute(
                update(jobs_t)
                .where(jobs_t.c.id.in_(ids), jobs_t.c.status == S.RUNNING)
                .values(
                    control=Control.RUN,
                    worker_id=None,
                    lease_until=None,
                    # The try ended with its worker, without an outcome: what runs next is a new attempt.
                    attempts=jobs_t.c.attempts + 1,
                    updated_at=self._stamp(now),
                    origin=self.origin,
                    **values,
                )
                .returning(*jobs_t.c)
            ).all()
            for r in rows:
                self._log(conn, r.id, "warning", note, None, now)
        return [row_to_job(r) for r in rows]

    # ----------------------------------------------------------- user actions
    async def act(self, job_id: int, action: str, *, actor: str | None = None) -> ActionResult:
        """Apply a user action (``pause``, ``resume``, ``cancel``, ``retry``) with the legal transitions only.

        Raises :class:`JobNotFound` or :class:`IllegalTransition` (whose text a chat user can read).
        A running queued job is asked to pause or cancel through its ``control`` column; the worker
        running it (in any process) acts at the next checkpoint.
        """
        res = await self.db.run(self._act, job_id, action, actor)
        kinds: list[ChangeKind] = ["rows"]
        if res.requested:
            kinds.append("control")
        if res.job.status == S.PENDING:
            kinds.append("work")
        self._changed(*kinds)
        return res

    def _act(self, job_id: int, action: str, actor: str | None) -> ActionResult:
        now = self.db.now()
        with self.db.engine.begin() as conn:
            row = conn.execute(select(jobs_t).where(jobs_t.c.id == job_id).with_for_update()).first()
            if row is None:
                raise JobNotFound(job_id)
            job = row_to_job(row)
            status = S(job.status)
            effect = plan(job_id, action, job.kind, status, job.control)
            values: dict[str, Any] = {
                "updated_at": self._stamp(now),
                "origin": self.origin,
                "control_by": actor,
                "control": effect.control,
            }
            if status != S.RUNNING:
                # The row is no longer a worker's; other processes' monitors must see this change.
                values["worker_id"] = None
            if effect.status is not None:
                values["status"] = effect.status
            if effect.finishes:
                values.update(finished_at=now, worker_id=None)
            if effect.requeues:
                values["run_at"] = now
            if effect.fresh_run:
                values.update(
                    attempts=0,
                    error=None,
                    result=None,
                    finished_at=None,
                    checkpoint=None,
                    progress_current=None,
                    progress_message=None,
                    weighted_percent=None,
                    interrupted=False,
                )
            new = conn.execute(
                update(jobs_t).where(jobs_t.c.id == job_id).values(**values).returning(*jobs_t.c)
            ).one()
            self._log(conn, job_id, "info", effect.note + (f" by {actor}" if actor else ""), None, now)
        return ActionResult(job=row_to_job(new), action=action, requested=effect.requested)

    async def act_batch(self, batch_id: int, action: str, *, actor: str | None = None) -> list[ActionResult]:
        """Apply a user action to every job of a batch for which it is legal. Raises if none qualifies."""
        ids = await self.batch_job_ids(batch_id)
        if not ids:
            raise JobNotFound(batch_id, "batch")
        results: list[ActionResult] = []
        last_error: IllegalTransition | None = None
        for jid in ids:
            try:
                results.append(await self.act(jid, action, actor=actor))
            except IllegalTransition as exc:
                last_error = exc
        if not results and last_error is not None:
            summary = await self.batch_summary(batch_id)
            raise IllegalTransition(batch_id, summary.status, Action(action).word, kind="Batch")
        return results

    # ---------------------------------------------------------- tracked jobs
    async def tracked_update(
        self,
        job_id: int,
        *,
        current: float | None = None,
        total: float | None = None,
        message: str | None = None,
        stage: str | None = None,
    ) -> Job:
        """Record progress reported for a tracked job from outside; returns the job (with its control)."""
        job = await self.db.run(self._tracked_update, job_id, current, total, message, stage)
        self._changed("rows")
        return job

    def _tracked_update(
        self, job_id: int, current: float | None, total: float | None, message: str | None, stage: str | None
    ) -> Job:
        now = self.db.now()
        with self.db.engine.begin() as conn:
            row = conn.execute(select(jobs_t).where(jobs_t.c.id == job_id)).first()
            if row is None:
                raise JobNotFound(job_id)
            job = row_to_job(row)
            if job.kind != JobKind.TRACKED:
                raise IllegalTransition(job_id, "not a tracked job", "sent progress from outside")
            if S(job.status).terminal:
                return job
            values: dict[str, Any] = {"updated_at": self._stamp(now), "origin": self.origin}
            if current is not None:
                values["progress_current"] = current
            if total is not None:
                values["progress_total"] = total
            if message is not None:
                values["progress_message"] = message
            if stage is not None:
                values["stage_name"] = stage
            if job.status == S.PENDING:
                values.update(status=S.RUNNING, started_at=now)
            row = conn.execute(
                update(jobs_t).where(jobs_t.c.id == job_id).values(**values).returning(*jobs_t.c)
            ).one()
        return row_to_job(row)

    async def tracked_finish(
        self, job_id: int, status: JobStatus, *, result: Any = None, error: str | None = None
    ) -> Job:
        """Complete or fail a tracked job (reported from outside)."""
        job = await self.db.run(self._tracked_finish, job_id, status, result, error)
        self._changed("rows")
        return job

    def _tracked_finish(self, job_id: int, status: JobStatus, result: Any, error: str | None) -> Job:
        now = self.db.now()
        with self.db.engine.begin() as conn:
            row = conn.execute(select(jobs_t).where(jobs_t.c.id == job_id).with_for_update()).first()
            if row is None:
                raise JobNotFound(job_id)
            job = row_to_job(row)
            if job.kind != JobKind.TRACKED:
                raise IllegalTransition(job_id, "not a tracked job", "finished from outside")
            if S(job.status).terminal:
                word = "completed" if status == S.COMPLETED else "failed"
                raise IllegalTransition(job_id, str(job.status), word)
            values: dict[str, Any] = {
                "status": status,
                "finished_at": now,
                "updated_at": self._stamp(now),
                "origin": self.origin,
            }
            if status == S.COMPLETED:
                values.update(result=result, error=None)
                if job.progress_total is not None:
                    values["progress_current"] = job.progress_total
            else:
                values["error"] = error or "failed"
            new = conn.execute(
                update(jobs_t).where(jobs_t.c.id == job_id).values(**values).returning(*jobs_t.c)
            ).one()
            note = "completed" if status == S.COMPLETED else f"failed: {values.get('error')}"
            self._log(conn, job_id, "info" if status == S.COMPLETED else "error", note, None, now)
        return row_to_job(new)

    # --------------------------------------------------------------- progress
    async def write_progress(self, writes: Sequence[ProgressWrite]) -> None:
        """Write many jobs' progress in one transaction (the monitor calls this once per tick)."""
        if writes:
            await self.db.run(self._write_progress, list(writes))
            self._changed("rows")

    def _write_progress(self, writes: list[ProgressWrite]) -> None:
        now = self.db.now()
        values: dict[str, Any] = {**_PROGRESS_PARAMS, "updated_at": self._stamp(now), "origin": self.origin}
        stmt = (
            update(jobs_t)
            .where(
                jobs_t.c.id == bindparam("b_id"),
                or_(
                    # A job no worker holds (tracked): any active status. executemany cannot expand IN
                    # lists, hence the explicit ORs.
                    and_(
                        bindparam("b_free", type_=Boolean),
                        or_(
                            jobs_t.c.status == S.RUNNING,
                            jobs_t.c.status == S.PAUSED,
                            jobs_t.c.status == S.PENDING,
                        ),
                    ),
                    # A worker's job: only while that worker holds it (a lost lease writes nothing).
                    and_(*self._fence(bindparam("b_worker", type_=String), now)),
                ),
            )
            .values(**values)
        )
        # One executemany in ascending id order: row locks are taken in that order (see _lock_in_order).
        params = [
            {
                "b_id": w.job_id,
                "b_free": w.worker_id is None,
                "b_worker": w.worker_id,
                **_progress_params(w.progress),
            }
            for w in sorted(writes, key=lambda w: w.job_id)
        ]
        with self.db.engine.begin() as conn:
            conn.execute(stmt, params)

    # ---------------------------------------------------------------- queries
    async def get(self, job_id: int) -> Job:
        """One job; raises :class:`JobNotFound`."""
        job = await self.db.run(self._get, job_id)
        if job is None:
            raise JobNotFound(job_id)
        return job

    def _get(self, job_id: int) -> Job | None:
        with self.db.engine.connect() as conn:
            row = conn.execute(select(jobs_t).where(jobs_t.c.id == job_id)).first()
        return row_to_job(row) if row else None

    @in_db
    def get_many(self, job_ids: Sequence[int]) -> list[Job]:
        """The jobs with the given ids that exist."""
        if not job_ids:
            return []
        with self.db.engine.connect() as conn:
            rows = conn.execute(select(jobs_t).where(jobs_t.c.id.in_(job_ids))).all()
        return [row_to_job(r) for r in rows]

    @in_db
    def list_jobs(
        self,
        *,
        statuses: Iterable[str] | None = None,
        type: str | None = None,
        batch_id: int | None = None,
        room: str | None = None,
        limit: int = 50,
        newest_first: bool = True,
    ) -> list[Job]:
        """Jobs matching the filters."""
        type_ = type
        statuses = list(statuses) if statuses else None
        q = select(jobs_t)
        if statuses:
            q = q.where(jobs_t.c.status.in_(statuses))
        if type_:
            q = q.where(jobs_t.c.type == type_)
        if batch_id is not None:
            q = q.where(jobs_t.c.batch_id == batch_id)
        if room is not None:
            q = q.where(jobs_t.c.room == room)
        q = q.order_by(jobs_t.c.id.desc() if newest_first else jobs_t.c.id).limit(max(1, min(limit, 10_000)))
        with self.db.engine.connect() as conn:
            return [row_to_job(r) for r in conn.execute(q)]

    @in_db
    def changed_since(
        self,
        since: datetime,
        limit: int = 5000,
        *,
        others_only: bool = True,
        after_id: int | None = None,
    ) -> list[Job]:
        """Jobs whose row changed at or after ``since`` (the monitor's cross-process poll), oldest first.

        With ``others_only`` rows last written by this store are skipped: this process knows them already.
        Rows come in ``(updated_at, id)`` order; ``after_id`` continues after the row ``(since, after_id)``
        (keyset paging: a full page is followed by the next one instead of being read again).
        """
        q = select(jobs_t).where(jobs_t.c.updated_at >= since)
        if after_id is not None:
            q = q.where(or_(jobs_t.c.updated_at > since, jobs_t.c.id > after_id))
        if others_only:
            q = q.where(or_(jobs_t.c.origin.is_(None), jobs_t.c.origin != self.origin))
        with self.db.engine.connect() as conn:
            if not self.db.is_sqlite:
                # Only this transaction: see _POLL_BY_INDEX.
                conn.execute(_POLL_BY_INDEX)
            rows = conn.execute(q.order_by(jobs_t.c.updated_at, jobs_t.c.id).limit(limit)).all()
        return [row_to_job(r) for r in rows]

    @in_db
    def stats(self) -> dict[str, Any]:
        """Counts by status, plus totals."""
        with self.db.engine.connect() as conn:
            rows = conn.execute(select(jobs_t.c.status, func.count()).group_by(jobs_t.c.status)).all()
            batches = conn.execute(select(func.count()).select_from(batches_t)).scalar() or 0
        counts = {str(s): 0 for s in S}
        counts.update({r[0]: r[1] for r in rows})
        return {"counts": counts, "total": sum(counts.values()), "batches": batches}

    @in_db
    def cleanup(self, older_than_days: float) -> int:
        """Delete finished jobs (and their activity) that ended more than ``older_than_days`` ago."""
        cutoff = self.db.now() - timedelta(days=older_than_days)
        cond = and_(jobs_t.c.status.in_([str(s) for s in TERMINAL_STATUSES]), jobs_t.c.finished_at < cutoff)
        with self.db.engine.begin() as conn:
            ids = [r[0] for r in conn.execute(select(jobs_t.c.id).where(cond))]
            for i in range(0, len(ids), 500):
                chunk = ids[i : i + 500]
                conn.execute(delete(activity_t).where(activity_t.c.job_id.in_(chunk)))
                conn.execute(
                    delete(bindings_t).where(
                        bindings_t.c.target_kind == "job", bindings_t.c.target_id.in_(chunk)
                    )
                )
                conn.execute(delete(jobs_t).where(jobs_t.c.id.in_(chunk)))
        return len(ids)

    async def vacuum(self) -> None:
        """Reclaim space (SQLite ``VACUUM``; PostgreSQL autovacuums, so nothing to do there)."""
        if self.db.is_sqlite:
            await self.db.run(self._vacuum)

    def _vacuum(self) -> None:
        with self.db.engine.connect() as conn:
            conn.exec_driver_sql("COMMIT") if conn.in_transaction() else None
            raw = conn.connection.dbapi_connection
            assert raw is not None
            raw.execute("VACUUM")


__all__ = [
    "ACTIVE_STATUSES",
    "ActionResult",
    "BatchSummary",
    "Handoff",
    "JobFilters",
    "JobStore",
    "NewJob",
    "Outcome",
    "ProgressWrite",
    "derive_batch_status",
]
