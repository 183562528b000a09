"""What every part of the job store shares: the tables, the database, and one way to write a method.

A store method is written once, as a blocking function that runs in the database thread, and decorated
with :func:`in_db`, which makes it awaitable (it runs in the :class:`~core.db.Database` executor, so the
event loop never blocks). There is no hand-kept sync twin of each async method.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, TypeVar

from sqlalchemy.engine import Row

from .db import Database
from .models import Activity, Batch, Job, JobTable, KeyValue, MessageBinding

jobs_t = JobTable.__table__  # type: ignore[attr-defined]
batches_t = Batch.__table__  # type: ignore[attr-defined]
activity_t = Activity.__table__  # type: ignore[attr-defined]
bindings_t = MessageBinding.__table__  # type: ignore[attr-defined]
kv_t = KeyValue.__table__  # type: ignore[attr-defined]


def row_to_job(row: Row[Any]) -> Job:
    """Build a detached :class:`Job` from a Core result row."""
    return Job(**dict(row._mapping))


class StoreBase:
    """The state the store's parts share (set by :class:`~core.store.JobStore`)."""

    db: Database
    #: Tags every row this store writes, so this process's monitor can skip its own changes when polling.
    origin: str
    #: Activity entries kept per job.
    activity_limit: int


StoreT = TypeVar("StoreT", bound=StoreBase)
P = ParamSpec("P")
T = TypeVar("T")


def in_db(
    fn: Callable[Concatenate[StoreT, P], T],
) -> Callable[Concatenate[StoreT, P], Coroutine[Any, Any, T]]:
    """Make a blocking store method awaitable: it runs in the database executor."""

    @functools.wraps(fn)
    async def call(self: StoreT, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self.db.run(fn, self, *args, **kwargs)

    return call


__all__ = ["StoreBase", "activity_t", "batches_t", "bindings_t", "in_db", "jobs_t", "kv_t", "row_to_job"]
