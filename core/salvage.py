"""Batched writes that one bad row cannot take down, and database errors told apart by kind.

The worker writes outcomes, and the monitor progress and log lines, many rows per transaction. If one row
cannot be stored (a value the driver cannot encode slipped past :mod:`core.text`, a constraint), the whole
transaction fails — and retrying the same batch fails forever, so every later job's bookkeeping is stuck
behind it. :func:`write_isolating` writes the batch; when that fails for a reason in the data (not because
the database is away or busy), it writes the rows one by one, replaces a row that still fails by a
degraded, readable version ("result could not be stored: …"), and drops it only if even that fails.

A transient database error (locked, connection lost) is re-raised untouched: the caller keeps the batch and
retries it later, as before.
"""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal, TypeVar

from sqlalchemy import exc as sa_exc

from .models import NO_PROGRESS, JobStatus, Progress
from .store import FinishResult, JobStore, Outcome, ProgressWrite
from .text import MAX_ERROR, clean_text, storable_number

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

DbTrouble = Literal["busy", "unavailable"]

_BUSY_MARKERS = ("database is locked", "database is busy", "database table is locked", "lock timeout")


def describe_error(exc: BaseException) -> str:
    """``"TypeName: text"`` of an exception, storable and at most :data:`~core.text.MAX_ERROR` characters."""
    try:
        text = str(exc).strip()
    except Exception:  # a handler's exception whose __str__ raises must still fail the job readably
        text = "(its message could not be read)"
    name = type(exc).__name__
    return clean_text(f"{name}: {text}" if text else name, MAX_ERROR)


def db_trouble(exc: BaseException) -> DbTrouble | None:
    """``"busy"`` (locked past the busy timeout), ``"unavailable"`` (cannot open, connect or write the
    database at all) or None (not a database condition: a bug or bad data)."""
    orig = getattr(exc, "orig", None) or exc
    text = str(orig).lower()
    if isinstance(exc, sa_exc.OperationalError | sqlite3.OperationalError) or isinstance(
        orig, sqlite3.OperationalError
    ):
        if any(m in text for m in _BUSY_MARKERS):
            return "busy"
        return "unavailable"
    if isinstance(exc, sa_exc.InterfaceError | sa_exc.DisconnectionError | sqlite3.DatabaseError):
        return "unavailable"
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return "unavailable"
    if isinstance(orig, sqlite3.DatabaseError) and not isinstance(orig, sqlite3.IntegrityError):
        # "file is not a database", "database disk image is malformed", a read-only file.
        return "unavailable"
    return None


def log_failure(logger: logging.Logger, what: str, exc: BaseException) -> None:
    """Log a failed background step: one readable line for a busy or unavailable database (an operator's
    condition, retried), the traceback for anything else (a bug). Call it from the ``except`` block."""
    trouble = db_trouble(exc)
    if trouble is None:
        logger.exception(what)
    else:
        logger.warning("%s: the database is %s (%s)", what, trouble, db_reason(exc))


def db_reason(exc: BaseException) -> str:
    """The driver's own first line for a database error (``file is not a database``), without SQL."""
    orig = getattr(exc, "orig", None) or exc
    return (str(orig).strip().splitlines() or [type(orig).__name__])[0]


async def write_isolating(
    items: Sequence[T],
    write: Callable[[list[T]], Awaitable[R]],
    degrade: Callable[[T, BaseException], T | None],
    what: str,
) -> list[R]:
    """``write(items)`` in one call; if that fails on the data, each item alone, degrading a failing one.

    ``degrade(item, exc)`` returns a safe replacement to write instead (or None to give the item up); a
    replacement that fails too is given up, with a log line. Transient database errors propagate.
    Returns the results of the ``write`` calls that succeeded.
    """
    try:
        return [await write(list(items))]
    except Exception as exc:
        if db_trouble(exc) is not None:
            raise
        if len(items) > 1:
            log.warning("writing %d %s failed (%s); writing them one by one", len(items), what, exc)
    results: list[R] = []
    for item in items:
        candidate: T | None = item
        for last_try in (False, True):
            if candidate is None:
                break
            try:
                results.append(await write([candidate]))
                break
            except Exception as exc:
                if db_trouble(exc) is not None:
                    raise
                if last_try:
                    log.error("gave up writing one of the %s: %s", what, describe_error(exc))
                    break
                log.warning("one of the %s could not be stored (%s); storing a note instead", what, exc)
                candidate = degrade(candidate, exc)
    return results


def _degrade_outcome(oc: Outcome, exc: BaseException) -> Outcome:
    problem = describe_error(exc)
    if oc.status == JobStatus.COMPLETED:
        # The job did its work: keep it completed, say that its result is lost.
        return dataclasses.replace(oc, result=f"result could not be stored: {problem}", progress=None)
    return dataclasses.replace(
        oc,
        error=None if oc.error is None else f"error could not be stored: {problem}",
        note=None if oc.note is None else clean_text(oc.note),
        progress=None,
        has_checkpoint=False,
        checkpoint=None,
    )


def storable_progress(progress: Progress) -> Progress:
    """``progress`` with NaN, infinities and out-of-range numbers (a handler's ``report()``) made unknown."""
    if progress is NO_PROGRESS:
        return progress
    nums = (progress.current, progress.total, progress.weighted_percent)
    clean = tuple(storable_number(n) for n in nums)
    if all(a is b for a, b in zip(clean, nums, strict=True)):
        return progress  # the usual case: nothing to replace, nothing to copy
    return dataclasses.replace(progress, current=clean[0], total=clean[1], weighted_percent=clean[2])


HoldsProgressT = TypeVar("HoldsProgressT", Outcome, ProgressWrite)


def _with_storable_progress(item: HoldsProgressT) -> HoldsProgressT:
    """``item`` (an outcome or a progress write) with :func:`storable_progress`; itself when that changes
    nothing (the usual case: no copy)."""
    if item.progress is None:
        return item
    progress = storable_progress(item.progress)
    return item if progress is item.progress else dataclasses.replace(item, progress=progress)


async def finish_isolating(store: JobStore, outcomes: list[Outcome]) -> FinishResult:
    """:meth:`JobStore.finish_many`, isolating an outcome that cannot be stored (see the module doc)."""
    outcomes = [_with_storable_progress(oc) for oc in outcomes]
    results = await write_isolating(outcomes, store.finish_many, _degrade_outcome, "job outcomes")
    if len(results) == 1:
        return results[0]
    merged = FinishResult(finished_at=results[0].finished_at if results else None)
    for r in results:
        merged.changed.extend(r.changed)
        merged.completed_ids |= r.completed_ids
    return merged


def _degrade_progress(pw: ProgressWrite, exc: BaseException) -> ProgressWrite:
    message = f"progress could not be stored: {describe_error(exc)}"
    return dataclasses.replace(pw, progress=dataclasses.replace(pw.progress, message=message))


async def write_progress_isolating(store: JobStore, writes: list[ProgressWrite]) -> None:
    """:meth:`JobStore.write_progress`, isolating a row that cannot be stored."""
    writes = [_with_storable_progress(w) for w in writes]
    await write_isolating(writes, store.write_progress, _degrade_progress, "progress writes")


LogEntry = tuple[int, str, str, dict[str, Any] | None]


def _degrade_log(entry: LogEntry, exc: BaseException) -> LogEntry:
    job_id = entry[0]
    return (job_id, "warning", f"log line could not be stored: {describe_error(exc)}", None)


async def log_many_isolating(store: JobStore, entries: list[LogEntry]) -> None:
    """:meth:`JobStore.log_many`, isolating an entry that cannot be stored."""
    await write_isolating(entries, store.log_many, _degrade_log, "log lines")


__all__ = [
    "db_reason",
    "db_trouble",
    "describe_error",
    "finish_isolating",
    "log_failure",
    "log_many_isolating",
    "write_isolating",
    "write_progress_isolating",
]
