"""What every part of the job store shares: the tables, the database, and one way to write a method.

A store method is written once, as a blocking function that runs in the database thread, and decorated
with :func:`in_db`, which makes it awaitable (it runs in the :class:`~core.db.Database` executor, so the
event loop never blocks). There is no hand-kept sync twin of each async method.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, Concatenate, ParamSpec, TypeVar

from sqlalchemy import JSON, Connection, DateTime, Table
from sqlalchemy.engine import Dialect, Row

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


class SqliteTable:
    """Prepared SQL for one table on SQLite's own cursor, with SQLAlchemy's type conversions.

    On the hot paths (a job's insert and completion) SQLAlchemy's statement machinery costs more than
    SQLite's work: about half of the database thread's time per job. These statements go straight to the
    sqlite3 connection of the open transaction instead, converting values with the very processors
    SQLAlchemy uses (JSON, the UTC datetime type, booleans), so rows read the same whoever wrote them.
    """

    def __init__(self, table: Table, dialect: Dialect) -> None:
        self.name = table.name
        self.columns = [c.name for c in table.c]
        self._bind: dict[str, Callable[[Any], Any] | None] = {
            c.name: c.type.dialect_impl(dialect).bind_processor(dialect) for c in table.c
        }
        # A transaction stamps several columns (created, updated, run_at, started, lease) and rows with the
        # same datetime: converting it once, not per column and row, saves most of the binding's time.
        memos: dict[type, Callable[[Any], Any]] = {}
        for c in table.c:
            proc = self._bind[c.name]
            if proc is not None and _is_datetime(c):
                shared = memos.setdefault(type(c.type), _last_value_memo(proc))
                self._bind[c.name] = shared
        # Most JSON values a job writes are constants (no payload, no result, no log context): their
        # text is known, without a trip through the json module for each.
        for c in table.c:
            proc = self._bind[c.name]
            if proc is not None and isinstance(c.type, JSON):
                self._bind[c.name] = _json_constants_out(proc)
        self._read: dict[str, Callable[[Any], Any] | None] = {
            c.name: c.type.dialect_impl(dialect).result_processor(dialect, None) for c in table.c
        }
        for c in table.c:
            proc = self._read[c.name]
            if proc is not None and isinstance(c.type, JSON):
                self._read[c.name] = _json_constants_in(proc)
        # Rows read together mostly share their stamps (jobs inserted, or claimed, in one transaction): each
        # datetime column parses a stored text once while it repeats.
        for c in table.c:
            proc = self._read[c.name]
            if proc is not None and _is_datetime(c):
                self._read[c.name] = _last_value_memo(proc, equal=True)
        # (index, processor) of the columns whose stored value needs converting on the way out.
        self._result = [(i, proc) for i, proc in enumerate(self._read.values()) if proc is not None]

    def insert_sql(self, columns: Sequence[str], *, returning: bool = False) -> str:
        """``INSERT INTO t (columns) VALUES (?, ...)``, optionally ``RETURNING`` every column."""
        sql = f"INSERT INTO {self.name} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
        return sql + (f" RETURNING {', '.join(self.columns)}" if returning else "")

    def bind(self, columns: Sequence[str], values: Mapping[str, Any]) -> tuple[Any, ...]:
        """The parameters for ``columns`` from ``values``, converted as SQLAlchemy would."""
        out = []
        for name in columns:
            value = values[name]
            proc = self._bind[name]
            out.append(value if proc is None else proc(value))
        return tuple(out)

    def value(self, column: str, value: Any) -> Any:
        """One parameter value, converted as SQLAlchemy would for ``column``."""
        proc = self._bind[column]
        return value if proc is None else proc(value)

    def stored(self, column: str, bound: Any) -> Any:
        """What reading back a parameter ``bind`` produced for ``column`` gives (without reading it)."""
        proc = self._read[column]
        return bound if proc is None else proc(bound)

    def load(self, raw: Sequence[Any]) -> dict[str, Any]:
        """A row of every column (in table order, as ``RETURNING`` gives it) as SQLAlchemy would read it."""
        values = list(raw)
        for i, proc in self._result:
            values[i] = proc(values[i])
        return dict(zip(self.columns, values, strict=True))


def _is_datetime(column: Any) -> bool:
    """Whether a column stores datetimes (a TypeDecorator such as SQLModel's UTCDateTime included)."""
    return isinstance(getattr(column.type, "impl_instance", column.type), DateTime)


def _json_constants_out(proc: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``proc`` (a JSON column's bind processor) answering None and an empty dict from what it gave once."""
    none, empty = proc(None), proc({})

    def process(value: Any) -> Any:
        if value is None:
            return none
        if value.__class__ is dict and not value:
            return empty
        return proc(value)

    return process


def _json_constants_in(proc: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """``proc`` (a JSON column's result processor) reading NULL, ``null`` and ``{}`` without parsing; a new
    dict each time, as parsing gives (the caller may change it)."""
    if proc(None) is not None or proc("null") is not None or proc("{}") != {}:
        return proc  # a processor that reads these differently keeps its own way

    def process(raw: Any) -> Any:
        if raw is None or raw == "null":
            return None
        if raw == "{}":
            return {}
        return proc(raw)

    return process


def _last_value_memo(proc: Callable[[Any], Any], *, equal: bool = False) -> Callable[[Any], Any]:
    """``proc`` remembering its last argument (by identity, or ``equal`` value) and answer: immutable
    values only.

    None (an unset stamp, common between two set ones) is answered apart, so it never evicts the value.
    """
    last: list[tuple[Any, Any]] = [(object(), None)]
    none = proc(None)

    def process(value: Any) -> Any:
        if value is None:
            return none
        seen, out = last[0]  # one tuple, replaced whole: a reader never sees a torn pair
        if seen is value or (equal and seen == value):
            return out
        out = proc(value)
        last[0] = (value, out)
        return out

    return process


def driver_connection(conn: Connection | Any) -> Any:
    """The DBAPI connection under ``conn`` (its open transaction included); a DBAPI connection itself."""
    return conn.connection.driver_connection if isinstance(conn, Connection) else conn


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


__all__ = [
    "SqliteTable",
    "StoreBase",
    "activity_t",
    "batches_t",
    "bindings_t",
    "driver_connection",
    "in_db",
    "jobs_t",
    "kv_t",
    "row_to_job",
]
