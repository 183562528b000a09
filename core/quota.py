"""Per-user limits on what chat users may queue (``auth.max_active_per_user``)."""

from __future__ import annotations

from sqlalchemy import func, select

from .models import ACTIVE_STATUSES
from .store import JobStore, jobs_t


async def active_jobs_of(store: JobStore, owner: str) -> int:
    """How many of ``owner``'s jobs are active (pending, running or paused)."""

    def count() -> int:
        with store.db.engine.connect() as conn:
            return int(
                conn.execute(
                    select(func.count())
                    .select_from(jobs_t)
                    .where(jobs_t.c.status.in_([str(s) for s in ACTIVE_STATUSES]), jobs_t.c.owner == owner)
                ).scalar()
                or 0
            )

    return await store.db.run(count)


__all__ = ["active_jobs_of"]
