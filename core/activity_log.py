"""The store's activity log: per-job entries ("submitted by @alice", "failed: ..."), capped per job."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, delete, insert, select

from .models import Activity
from .storebase import StoreBase, activity_t, in_db

#: One entry to append: ``(job_id, level, message, context)``.
Entry = tuple[int, str, str, dict[str, Any] | None]


class ActivityLog(StoreBase):
    """Appends and reads jobs' activity entries, keeping the newest ``activity_limit`` per job."""

    async def log(self, job_id: int, level: str, message: str, context: dict[str, Any] | None = None) -> None:
        """Append to a job's activity log, dropping the oldest entries beyond the cap."""
        await self._append([(job_id, level, message, context)])

    async def log_many(self, entries: Sequence[Entry]) -> None:
        """Append several activity entries in one transaction."""
        if entries:
            await self._append(list(entries))

    @in_db
    def _append(self, entries: list[Entry]) -> None:
        now = self.db.now()
        with self.db.engine.begin() as conn:
            for job_id, level, message, context in entries:
                self._log(conn, job_id, level, message, context, now, trim=False)
            for job_id in {e[0] for e in entries}:
                self._trim(conn, job_id)

    def _log(
        self,
        conn: Connection,
        job_id: int,
        level: str,
        message: str,
        context: dict[str, Any] | None,
        at: datetime,
        *,
        trim: bool = True,
    ) -> None:
        """Append one entry inside the caller's transaction (every job write notes what it did)."""
        conn.execute(
            insert(activity_t).values(
                job_id=job_id, at=at, level=level, message=message[:2000], context=context
            )
        )
        if trim:
            self._trim(conn, job_id)

    def _trim(self, conn: Connection, job_id: int) -> None:
        cutoff = conn.execute(
            select(activity_t.c.id)
            .where(activity_t.c.job_id == job_id)
            .order_by(activity_t.c.id.desc())
            .offset(self.activity_limit)
            .limit(1)
        ).scalar()
        if cutoff is not None:
            conn.execute(delete(activity_t).where(activity_t.c.job_id == job_id, activity_t.c.id <= cutoff))

    @in_db
    def activity(self, job_id: int, limit: int = 20) -> list[Activity]:
        """The newest ``limit`` activity entries of a job, oldest first."""
        with self.db.engine.connect() as conn:
            rows = conn.execute(
                select(activity_t)
                .where(activity_t.c.job_id == job_id)
                .order_by(activity_t.c.id.desc())
                .limit(limit)
            ).all()
        return [Activity(**dict(r._mapping)) for r in reversed(rows)]


__all__ = ["ActivityLog", "Entry"]
