"""The JobProgressMonitor: turns reports and status changes into throttled events, and persists progress.

* In-process reports mark a job dirty. On each tick, a dirty job whose window is open (no event in the
  last ``min_interval``) gets one event with its latest state. A job that stays dirty is emitted as soon as
  its window opens, so the trailing state always goes out.
* Status changes are emitted at once, outside the throttle, and are never dropped.
* Progress of in-process jobs is written to the DB in one transaction per write tick.
* Every ``poll_interval`` the store is polled for rows other processes changed (tracked jobs, other
  workers, CLI actions), which feed the same paths. :meth:`JobProgressMonitor.wake_poll` (LISTEN/NOTIFY on
  PostgreSQL) polls at once in between, reading only rows newer than the newest seen; the periodic poll
  also re-reads the last ``POLL_OVERLAP`` seconds, for rows whose transaction committed late.
* Batches get their own throttled events with aggregates computed from their jobs' rows: a batch is
  refreshed after its jobs' status changes (at once) and after their progress is written (at most once
  per ``min_interval``, the latest state, trailing included).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from .aio import cancel_and_wait
from .context import ProgressState
from .events import EventBus, JobProgressEvent, next_seq
from .models import TERMINAL_STATUSES, Job, JobStatus, Progress, utcnow
from .salvage import log_failure, log_many_isolating, write_progress_isolating
from .store import BatchSummary, JobStore, ProgressWrite

log = logging.getLogger(__name__)

Key = tuple[str, int | str]

#: Seconds the periodic poll reads back before the newest change it saw: a row is stamped before its
#: transaction commits, so a slow transaction can become visible after a later stamp was already read.
POLL_OVERLAP = 2.0


def _ts(dt: datetime | None) -> float | None:
    return None if dt is None else dt.timestamp()


def _older(a: datetime | None, b: datetime | None) -> bool:
    """Whether record time ``a`` is strictly before ``b`` (naive times are UTC; unknown is never older)."""
    if a is None or b is None:
        return False
    if a.tzinfo is None:
        a = a.replace(tzinfo=UTC)
    if b.tzinfo is None:
        b = b.replace(tzinfo=UTC)
    return a < b


@dataclass(slots=True)
class JobView:
    """What the monitor knows of a job's record (status, identity, persisted progress)."""

    id: int | str
    type: str
    status: str
    name: str | None = None
    priority: int = 0
    attempts: int = 0
    owner: str | None = None
    room: str | None = None
    batch_id: int | None = None
    error: str | None = None
    result: Any = None
    interrupted: bool = False
    control: str | None = None
    control_by: str | None = None
    #: The persisted progress (for a job running here, the live state is newer; see job_changed).
    progress: Progress = field(default_factory=Progress)
    started_at: float | None = None
    finished_at: float | None = None
    updated_at: datetime | None = None
    persisted: bool = True
    #: The worker holding the job (queued jobs); progress writes are fenced on it.
    worker_id: str | None = None

    @classmethod
    def from_job(cls, job: Job, *, progress: Progress | None = None) -> JobView:
        """Build a view from a stored job (with ``progress`` known newer than its row's, if given)."""
        return cls(
            id=job.id or 0,
            type=job.type,
            status=str(job.status),
            name=job.name,
            priority=job.priority,
            attempts=job.attempts,
            owner=job.owner,
            room=job.room,
            batch_id=job.batch_id,
            error=job.error,
            result=job.result,
            interrupted=bool(job.interrupted),
            control=job.control,
            control_by=job.control_by,
            progress=Progress.of(job) if progress is None else progress,
            started_at=_ts(job.started_at),
            finished_at=_ts(job.finished_at),
            updated_at=job.updated_at,
            worker_id=job.worker_id,
        )


class JobProgressMonitor:
    """Throttles progress into events, emits status changes at once, and persists progress in batches."""

    def __init__(
        self,
        bus: EventBus,
        store: JobStore | None = None,
        *,
        min_interval: float = 0.5,
        poll_interval: float = 1.0,
        tick_interval: float | None = None,
        write_interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        batch_error_limit: int = 5,
        watch_others: bool = True,
    ) -> None:
        self.bus = bus
        self.store = store
        self.min_interval = min_interval
        self.poll_interval = poll_interval
        self.tick_interval = (
            tick_interval if tick_interval is not None else max(0.005, min(0.05, min_interval / 10))
        )
        self.write_interval = write_interval if write_interval is not None else max(0.1, min_interval)
        self.clock = clock
        self.batch_error_limit = batch_error_limit
        #: Poll for other processes' changes (off in a worker-only process: nobody there watches events).
        self.watch_others = watch_others
        #: Rows read per poll query; a full page is followed by the next one.
        self.poll_page = 5000
        self._views: dict[Key, JobView] = {}
        self._live: dict[int | str, ProgressState] = {}
        self._dirty: set[Key] = set()
        self._unsaved: set[int] = set()
        #: The progress each live job's row holds, as far as this monitor knows (read at attach, then as
        #: written): an event whose progress equals it needs no write (a job that started and reported none).
        self._saved: dict[int | str, Progress] = {}
        self._last_emit: dict[Key, float] = {}
        self._last_status: dict[Key, str] = {}
        self._batch_dirty: set[int] = set()
        self._batch_urgent: set[int] = set()
        self._batch_last: dict[int, BatchSummary] = {}
        self._pending_logs: list[tuple[int, str, str, dict[str, Any] | None]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._poll_since: datetime = utcnow() - timedelta(seconds=POLL_OVERLAP)
        self._poll_since_id = 0
        self._poll_wakeup = asyncio.Event()
        self._stopping = False
        self.events_emitted = 0

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Start the emit loop and (with a store) the write/poll loop."""
        self._stopping = False
        if self.store is not None:
            # Row stamps come from the database's clock (see Database.now); start the polls from it.
            self._poll_since = self.store.now() - timedelta(seconds=POLL_OVERLAP)
            self._poll_since_id = 0
        self._tasks.append(asyncio.create_task(self._emit_loop(), name="monitor-emit"))
        if self.store is not None:
            self._tasks.append(asyncio.create_task(self._io_loop(), name="monitor-io"))

    async def stop(self) -> None:
        """Flush what is pending (events, progress, logs) and stop the loops."""
        self._stopping = True
        await cancel_and_wait(self._tasks)
        self._tasks.clear()
        self._emit_due(force=True)
        if self.store is not None:
            with contextlib.suppress(Exception):
                await self._flush_writes()

    def wake_poll(self) -> None:
        """Poll the store now for rows newer than the newest seen (LISTEN/NOTIFY calls this).

        The periodic poll keeps its schedule, so frequent wake-ups never starve its overlap re-read.
        """
        self._poll_wakeup.set()

    # ------------------------------------------------------------ job sources
    def attach(self, job: Job | JobView) -> ProgressState:
        """Register a job that runs in this process; returns the state its context reports into."""
        view = job if isinstance(job, JobView) else JobView.from_job(job)
        key: Key = ("job", view.id)
        st = self._live.get(view.id)
        if st is None:
            st = ProgressState(view.id, self._dirty)
            # A resumed job starts from what it had reported before.
            st.restore(view.progress)
            self._live[view.id] = st
            self._saved[view.id] = st.snapshot()
        self._views[key] = view
        return st

    def detach(self, job_id: int | str) -> None:
        """Forget the live state of a job that stopped running here (after its final event)."""
        st = self._live.pop(job_id, None)
        self._saved.pop(job_id, None)
        if st is not None and isinstance(job_id, int):
            self._unsaved.discard(job_id)

    def live_state(self, job_id: int | str) -> ProgressState | None:
        """The in-process progress state of a running job, if it runs here."""
        return self._live.get(job_id)

    def view(self, job_id: int | str) -> JobView | None:
        """What the monitor knows of a job's record (status and control included), if anything."""
        return self._views.get(("job", job_id))

    def job_changed(self, job: Job | JobView, *, force: bool = False) -> JobProgressEvent | None:
        """A job's record changed in this process. A new status is emitted at once."""
        view = job if isinstance(job, JobView) else JobView.from_job(job)
        key: Key = ("job", view.id)
        old = self._views.get(key)
        if old is not None and old is not view and _older(view.updated_at, old.updated_at):
            # A stale record must not turn a newer state back: e.g. submit()'s "pending" row that
            # arrives after the worker already claimed the job and announced it as running.
            return None
        st = self._live.get(view.id)
        if st is not None:
            # The live state is newer than the row's progress columns.
            view.progress = st.snapshot()
        self._views[key] = view
        if view.batch_id is not None:
            self._batch_dirty.add(view.batch_id)
        if force or self._last_status.get(key) != view.status:
            if view.batch_id is not None:
                self._batch_urgent.add(view.batch_id)
            return self._emit_job(key, status_changed=True, fresh=True)
        if old is None or old.progress != view.progress or old.control != view.control:
            self._dirty.add(key)
        return None

    def log(self, job_id: int, level: str, message: str, context: dict[str, Any] | None = None) -> None:
        """Queue an activity entry; written with the next write tick."""
        self._pending_logs.append((job_id, level, message, context))

    # --------------------------------------------------------------- emitting
    def _emit_job(self, key: Key, *, status_changed: bool, fresh: bool = False) -> JobProgressEvent | None:
        """Publish a job's event; ``fresh`` when its view's progress is its live state's already."""
        view = self._views.get(key)
        if view is None:
            return None
        st = self._live.get(view.id)
        if st is not None and not fresh:
            view.progress = st.snapshot()
        ev = self._job_event(view, st, status_changed)
        self._dirty.discard(key)
        self._last_emit[key] = self.clock()
        self._last_status[key] = view.status
        if (
            st is not None
            and view.persisted
            and isinstance(view.id, int)
            and view.progress != self._saved.get(view.id)
        ):
            self._unsaved.add(view.id)
        self.events_emitted += 1
        self.bus.publish(ev)
        if ev.terminal:
            self._last_emit.pop(key, None)
        return ev

    def build_job_event(self, view: JobView, *, status_changed: bool = False) -> JobProgressEvent:
        """An event for a job from its view and (when it runs here) its live progress."""
        st = self._live.get(view.id)
        if st is not None:
            view = replace(view, progress=st.snapshot())  # (the caller's view stays as it was)
        return self._job_event(view, st, status_changed)

    def _job_event(self, view: JobView, st: ProgressState | None, status_changed: bool) -> JobProgressEvent:
        """The event of ``view``, whose progress is current (the live state's, for a job running here)."""
        p = view.progress
        status = view.status
        current, total = p.current, p.total
        pct = p.percentage()
        if st is not None:
            wpct = p.weighted_percent  # the live state's weighted percent (see ProgressState.snapshot)
            indeterminate = st.indeterminate and not st.stage_names
            eta = st.eta_seconds(self.clock()) if status == JobStatus.RUNNING else None
        else:
            wpct = p.weighted_percent if p.weighted_percent is not None else pct
            indeterminate = not total
            eta = None
        if status == JobStatus.COMPLETED:
            # A completed job is at 100%, whatever it last reported.
            if total:
                current = total
            pct = 100.0
            wpct = 100.0
            indeterminate = False
        if status in TERMINAL_STATUSES:
            eta = None
        if wpct is not None:
            wpct = round(wpct, 2)
        if current is not p.current or wpct != p.weighted_percent:
            p = replace(p, current=current, weighted_percent=wpct)  # what is shown differs from the report
        return JobProgressEvent(
            id=view.id,
            type="job",
            status=status,
            seq=next_seq(),
            timestamp=time.time(),
            progress=p,
            name=view.name or view.type,
            percentage=None if pct is None else round(pct, 2),
            indeterminate=indeterminate,
            eta_seconds=eta,
            job_type=view.type,
            priority=view.priority,
            retry_count=max(0, view.attempts - 1),
            owner=view.owner,
            room=view.room,
            batch_id=view.batch_id,
            error=view.error,
            result=view.result,
            interrupted=view.interrupted,
            control=view.control,
            control_by=view.control_by,
            started_at=view.started_at,
            finished_at=view.finished_at,
            status_changed=status_changed,
        )

    def _emit_due(self, *, force: bool = False) -> None:
        if not self._dirty:
            return
        now = self.clock()
        window = self.min_interval
        for key in list(self._dirty):
            last = self._last_emit.get(key)
            if force or last is None or now - last >= window:
                if key[0] == "job":
                    self._emit_job(key, status_changed=False)
                else:
                    self._dirty.discard(key)

    async def _emit_loop(self) -> None:
        while True:
            await asyncio.sleep(self.tick_interval)
            try:
                self._emit_due()
            except Exception:  # never let one bad event stop all emissions
                log.exception("monitor emit tick failed")

    # ------------------------------------------------------------- DB + polls
    async def _io_loop(self) -> None:
        next_write = self.clock()
        next_poll = self.clock() + self.poll_interval
        while True:
            now = self.clock()
            try:
                if now >= next_write:
                    next_write = now + self.write_interval
                    await self._flush_writes()
                if now >= next_poll:
                    self._poll_wakeup.clear()
                    next_poll = now + self.poll_interval
                    if self.watch_others:
                        await self.poll_once()
                elif self._poll_wakeup.is_set():
                    self._poll_wakeup.clear()
                    if self.watch_others:
                        await self.poll_once(overlap=False)
                await self._refresh_batches()
                self._evict()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log_failure(log, "monitor I/O tick failed; will retry", exc)
            timeout = max(0.0, min(next_write, next_poll) - self.clock())
            timeout = min(timeout, self.tick_interval * 2)
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for loses a cancel that arrives as the event
            # fires (wake_poll() from NOTIFY makes that likely), and stop() would then wait forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._poll_wakeup.wait()

    async def _flush_writes(self) -> None:
        assert self.store is not None
        writes: list[ProgressWrite] = []
        for jid in list(self._unsaved):
            st = self._live.get(jid)
            if st is None:
                continue
            view = self._views.get(("job", jid))
            writes.append(
                ProgressWrite(jid, st.snapshot(), worker_id=view.worker_id if view is not None else None)
            )
        self._unsaved.clear()
        if writes:
            try:
                await write_progress_isolating(self.store, writes)
            except Exception:
                # Not lost: written with the next tick (unless newer progress is written first).
                self._unsaved.update(w.job_id for w in writes)
                raise
            for w in writes:
                if w.job_id in self._live:  # (not detached meanwhile)
                    self._saved[w.job_id] = w.progress
            # The batches of these jobs aggregate the progress just written: refresh them (throttled by
            # _refresh_batches like every batch event), so a batch moves while its jobs report, not only
            # when one of them changes status.
            for w in writes:
                view = self._views.get(("job", w.job_id))
                if view is not None and view.batch_id is not None:
                    self._batch_dirty.add(view.batch_id)
        if self._pending_logs:
            logs, self._pending_logs = self._pending_logs, []
            await log_many_isolating(self.store, logs)

    async def poll_once(self, *, overlap: bool = True) -> int:
        """Read rows changed since the last poll and emit what other processes changed. Returns the count.

        With ``overlap`` the last ``POLL_OVERLAP`` seconds before the newest change seen are read again;
        without, only rows after it (a poll woken by a notification, which follows the commit).
        """
        if self.store is None:
            return 0
        after: int | None
        if overlap:
            since, after = self._poll_since - timedelta(seconds=POLL_OVERLAP), None
        else:
            since, after = self._poll_since, self._poll_since_id
        changed = 0
        while True:
            rows = await self.store.changed_since(since, self.poll_page, after_id=after)
            changed += self._apply_polled(rows)
            if len(rows) < self.poll_page:
                return changed
            # A full page: continue after its last row rather than reading the same window again.
            since, after = rows[-1].updated_at, rows[-1].id

    def _apply_polled(self, rows: list[Job]) -> int:
        changed = 0
        for job in rows:
            if job.updated_at is not None and (job.updated_at, job.id or 0) > (
                self._poll_since,
                self._poll_since_id,
            ):
                self._poll_since, self._poll_since_id = job.updated_at, job.id or 0
            old = self._views.get(("job", job.id or 0))
            if old is not None and old.updated_at == job.updated_at and old.status == job.status:
                continue  # this version of the row was seen already (the overlap re-reads it)
            view = JobView.from_job(job)
            key: Key = ("job", view.id)
            if view.id in self._live:
                # Running here: our own events are authoritative, unless another process took the job away.
                if old is not None and old.status == view.status:
                    if old.control != view.control:
                        old.control, old.control_by = view.control, view.control_by
                    continue
            if old is not None and old.updated_at is not None and view.updated_at is not None:
                if view.updated_at < old.updated_at:
                    continue
            if old is None or old.status != view.status or self._last_status.get(key) != view.status:
                self.job_changed(view)
                changed += 1
            elif old.progress != view.progress or old.control != view.control:
                self._views[key] = view
                self._dirty.add(key)
                if view.batch_id is not None:
                    self._batch_dirty.add(view.batch_id)
                changed += 1
            else:
                old.updated_at = view.updated_at
        return changed

    async def _refresh_batches(self) -> None:
        if self.store is None or not (self._batch_dirty or self._batch_urgent):
            return
        now = self.clock()
        todo = set(self._batch_urgent)
        for bid in self._batch_dirty:
            last = self._last_emit.get(("batch", bid))
            if last is None or now - last >= self.min_interval:
                todo.add(bid)
        for bid in todo:
            self._batch_dirty.discard(bid)
            self._batch_urgent.discard(bid)
            try:
                summary = await self.store.batch_summary(bid, error_limit=self.batch_error_limit)
            except LookupError:
                continue
            self.emit_batch(summary)

    def emit_batch(self, summary: BatchSummary) -> JobProgressEvent:
        """Emit a batch event from its aggregate summary."""
        bid = summary.batch.id or 0
        key: Key = ("batch", bid)
        ev = self.build_batch_event(summary)
        ev.status_changed = self._last_status.get(key) != ev.status
        self._last_status[key] = ev.status
        self._last_emit[key] = self.clock()
        self._batch_last[bid] = summary
        self.events_emitted += 1
        self.bus.publish(ev)
        return ev

    def build_batch_event(self, summary: BatchSummary) -> JobProgressEvent:
        """An event for a batch from its aggregate summary."""
        b = summary.batch
        total = summary.total
        pct = round(100.0 * summary.current / total, 2) if total else None
        done = summary.completed + summary.failed + summary.counts.get(JobStatus.CANCELLED, 0)
        parts = [f"{summary.completed}/{total} completed"]
        if summary.failed:
            parts.append(f"{summary.failed} failed")
        return JobProgressEvent(
            id=b.id or 0,
            type="batch",
            status=str(summary.status),
            seq=next_seq(),
            timestamp=time.time(),
            progress=Progress(
                current=done,
                total=total,
                message=summary.current_operation or ", ".join(parts),
                weighted_percent=pct,
            ),
            name=b.name,
            percentage=pct,
            indeterminate=total == 0,
            owner=b.owner,
            room=b.room,
            total_operations=total,
            completed_operations=summary.completed,
            failed_operations=summary.failed,
            current_operation=summary.current_operation,
            errors=list(summary.errors),
        )

    def _evict(self) -> None:
        # Keep memory bounded: forget finished jobs we no longer need to compare against.
        if len(self._views) <= 20_000:
            return
        for key, view in list(self._views.items()):
            if view.status in TERMINAL_STATUSES and view.id not in self._live:
                del self._views[key]
                self._last_status.pop(key, None)
                self._last_emit.pop(key, None)
            if len(self._views) <= 10_000:
                break

    # --------------------------------------------------------------- queries
    def current_event(self, job: Job | JobView) -> JobProgressEvent:
        """An event with the job's current state (for snapshots and stream starts); not published."""
        view = job if isinstance(job, JobView) else JobView.from_job(job)
        known = self._views.get(("job", view.id))
        if known is not None and view.id in self._live:
            view = known
        return self.build_job_event(view)
