"""The store's batches: groups of jobs submitted together, whose state is derived from their jobs."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, insert, select

from .errors import JobNotFound
from .models import TERMINAL_STATUSES, Batch, JobStatus
from .storebase import StoreBase, batches_t, in_db, jobs_t

S = JobStatus


@dataclass(slots=True)
class BatchSummary:
    """Aggregate state of a batch, derived from its jobs."""

    batch: Batch
    total: int
    counts: dict[str, int]
    current_operation: str | None
    errors: list[str]
    current: float
    status: JobStatus

    @property
    def completed(self) -> int:
        """Jobs that completed."""
        return self.counts.get(S.COMPLETED, 0)

    @property
    def failed(self) -> int:
        """Jobs that failed."""
        return self.counts.get(S.FAILED, 0)


def derive_batch_status(counts: dict[str, int]) -> JobStatus:
    """A batch's status from its jobs' statuses."""
    total = sum(counts.values())
    if total == 0:
        return S.PENDING
    if counts.get(S.RUNNING, 0):
        return S.RUNNING
    if counts.get(S.PENDING, 0):
        # Some done and some waiting: the batch is under way.
        done = sum(counts.get(s, 0) for s in TERMINAL_STATUSES)
        return S.RUNNING if done or counts.get(S.PAUSED, 0) else S.PENDING
    if counts.get(S.PAUSED, 0):
        return S.PAUSED
    if counts.get(S.FAILED, 0):
        return S.FAILED
    if counts.get(S.COMPLETED, 0):
        return S.COMPLETED
    return S.CANCELLED


class BatchStore(StoreBase):
    """Creates batches and sums up their jobs."""

    @in_db
    def create_batch(self, name: str, *, owner: str | None = None, room: str | None = None) -> Batch:
        """Create an empty batch."""
        now = self.db.now()
        with self.db.engine.begin() as conn:
            row = conn.execute(
                insert(batches_t)
                .values(name=name, owner=owner, room=room, created_at=now, updated_at=now)
                .returning(*batches_t.c)
            ).one()
        return Batch(**dict(row._mapping))

    @in_db
    def get_batch(self, batch_id: int) -> Batch:
        """One batch; raises :class:`JobNotFound`."""
        with self.db.engine.connect() as conn:
            row = conn.execute(select(batches_t).where(batches_t.c.id == batch_id)).first()
        if row is None:
            raise JobNotFound(batch_id, "batch")
        return Batch(**dict(row._mapping))

    @in_db
    def batch_job_ids(self, batch_id: int) -> list[int]:
        """The ids of a batch's jobs."""
        with self.db.engine.connect() as conn:
            return [r[0] for r in conn.execute(select(jobs_t.c.id).where(jobs_t.c.batch_id == batch_id))]

    @in_db
    def batch_summary(self, batch_id: int, *, error_limit: int = 5) -> BatchSummary:
        """Aggregate progress of a batch, computed from its jobs; raises :class:`JobNotFound`."""
        with self.db.engine.connect() as conn:
            brow = conn.execute(select(batches_t).where(batches_t.c.id == batch_id)).first()
            if brow is None:
                raise JobNotFound(batch_id, "batch")
            rows = conn.execute(
                select(jobs_t.c.status, func.count())
                .where(jobs_t.c.batch_id == batch_id)
                .group_by(jobs_t.c.status)
            ).all()
            counts = {r[0]: r[1] for r in rows}
            running = conn.execute(
                select(jobs_t.c.id, jobs_t.c.type, jobs_t.c.name, jobs_t.c.progress_message)
                .where(jobs_t.c.batch_id == batch_id, jobs_t.c.status == S.RUNNING)
                .order_by(jobs_t.c.updated_at.desc())
                .limit(1)
            ).first()
            errs = conn.execute(
                select(jobs_t.c.id, jobs_t.c.error)
                .where(jobs_t.c.batch_id == batch_id, jobs_t.c.status == S.FAILED)
                .order_by(jobs_t.c.finished_at.desc())
                .limit(error_limit)
            ).all()
            frac = conn.execute(
                select(func.coalesce(func.sum(jobs_t.c.weighted_percent), 0.0)).where(
                    jobs_t.c.batch_id == batch_id, jobs_t.c.status.in_([S.RUNNING, S.PAUSED])
                )
            ).scalar()
        total = sum(counts.values())
        done = sum(counts.get(s, 0) for s in TERMINAL_STATUSES)
        current_op = None
        if running is not None:
            label = running.name or running.type
            current_op = f"#{running.id} {label}" + (
                f": {running.progress_message}" if running.progress_message else ""
            )
        return BatchSummary(
            batch=Batch(**dict(brow._mapping)),
            total=total,
            counts=counts,
            current_operation=current_op,
            errors=[f"#{r[0]}: {r[1]}" for r in errs],
            current=done + float(frac or 0.0) / 100.0,
            status=derive_batch_status(counts),
        )


__all__ = ["BatchStore", "BatchSummary", "derive_batch_status"]
