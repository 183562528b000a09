"""The service facade: one object that wires the store, worker, monitor and bus, and is the public API
adapters and the HTTP layer use (submit, execute, track, user actions, queries, subscriptions)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Unpack

from .context import JobContext, SyncJobContext
from .db import Database, pg_connect_args
from .errors import IllegalTransition, JobCancelled, JobInterrupt, JobNotFound, NotTracked, PayloadError
from .events import EventBus, EventFilter, JobProgressEvent, Subscription, make_filter
from .heap import freeze_startup_heap
from .lifecycle import Action, plan
from .models import TERMINAL_STATUSES, Activity, Batch, Control, Job, JobKind, JobStatus, utcnow
from .monitor import JobProgressMonitor, JobView
from .registry import HandlerRegistry, default_registry
from .salvage import describe_error
from .store import ActionResult, BatchSummary, JobFilters, JobStore, NewJob, RecoveryPolicy
from .text import MAX_ERROR, MAX_MESSAGE, clean_name, clean_optional, clean_result, clean_text
from .worker import Worker, make_worker_id

if TYPE_CHECKING:
    from .notify import PgNotifier

log = logging.getLogger(__name__)


#: Bounds of the submit options, the same for every entry point (HTTP, CLI, chat, Python).
PRIORITY_RANGE = (-1_000_000, 1_000_000)
MAX_DELAY_SECONDS = 366 * 86400
MAX_TIMEOUT_SECONDS = 366 * 86400
MAX_ATTEMPTS_RANGE = (1, 100)


def submit_option_problems(
    *,
    priority: int = 0,
    delay: float | None = None,
    max_attempts: int | None = None,
    timeout: float | None = None,
) -> list[str]:
    """``key: problem`` lines for submit options out of range (empty when they are all fine).

    Checked before anything is stored, so NaN, infinities and numbers the database cannot hold never
    reach it. The CLI calls this too, to refuse with exit code 2 before opening the database.
    """
    problems = []
    lo, hi = PRIORITY_RANGE
    if not lo <= priority <= hi:
        problems.append(f"priority: must be between {lo} and {hi}")
    if delay is not None and not 0 <= delay <= MAX_DELAY_SECONDS:  # NaN fails every comparison
        problems.append(f"delay: must be between 0 and {MAX_DELAY_SECONDS} seconds")
    lo, hi = MAX_ATTEMPTS_RANGE
    if max_attempts is not None and not lo <= max_attempts <= hi:
        problems.append(f"max_attempts: must be between {lo} and {hi}")
    if timeout is not None and not 0 < timeout <= MAX_TIMEOUT_SECONDS:
        problems.append(f"timeout: must be more than 0 and at most {MAX_TIMEOUT_SECONDS} seconds")
    return problems


@dataclass(slots=True)
class ServiceConfig:
    """Engine settings (the bot's settings map onto these)."""

    database_url: str = "sqlite:///progressbot.db"
    concurrency: int = 4
    recovery: RecoveryPolicy = "pause"
    min_interval: float = 0.5
    poll_interval: float = 1.0
    activity_limit: int = 100
    lease_seconds: float = 30.0
    cancel_grace: float = 5.0
    shutdown_grace: float = 10.0
    retry_backoff: float = 2.0
    retry_backoff_max: float = 300.0
    default_max_attempts: int = 1
    run_worker: bool = True
    worker_id: str | None = None
    #: PostgreSQL: announce changes with NOTIFY and LISTEN for other processes' (polling stays the fallback).
    notify: bool = True
    #: Poll for (and listen to) other processes' changes; a worker-only process has no one to show them to.
    watch_others: bool = True
    #: Once the first service of the process has started, keep the garbage collector off the objects alive
    #: then (see :mod:`core.heap`): full collections stop walking the libraries' start-up heap.
    freeze_startup_heap: bool = True


#: Seconds between progress writes on PostgreSQL. Other processes (the ``run`` process hosting the chat
#: adapters) see a worker's progress only once it is written, so it is written on the next I/O tick rather
#: than on SQLite's 500 ms batching tick.
PG_PROGRESS_WRITE_INTERVAL = 0.05


@dataclass(slots=True)
class JobRequest:
    """One job of a batch (or a submit call): a type and its payload, plus options."""

    type: str
    payload: dict[str, Any] = field(default_factory=dict)
    name: str | None = None
    priority: int = 0
    max_attempts: int | None = None
    timeout: float | None = None


class _DirectBackend:
    """Checkpoints of direct (in-memory) jobs: state stays in memory; a pause waits at the checkpoint."""

    def __init__(self, service: ProgressService) -> None:
        self.service = service

    async def checkpoint(self, ctx: JobContext, state: Any, has_state: bool, check: bool = True) -> None:
        run = self.service._direct.get(str(ctx.job_id))
        while check:
            if ctx.control == Control.CANCEL:
                raise JobCancelled()
            if ctx.control != Control.PAUSE or run is None:
                return
            if run.view.status != JobStatus.PAUSED:
                run.view.status = JobStatus.PAUSED
                self.service.monitor.job_changed(run.view)
            ctx.control_changed.clear()
            await ctx.control_changed.wait()
            if ctx.control == Control.RUN:
                run.view.status = JobStatus.RUNNING
                self.service.monitor.job_changed(run.view)

    def log(self, ctx: JobContext, level: str, message: str, context: dict[str, Any] | None) -> None:
        run = self.service._direct.get(str(ctx.job_id))
        if run is not None:
            run.activity.append((utcnow(), level, message))
            del run.activity[: -self.service.config.activity_limit]


@dataclass(slots=True)
class DirectRun:
    """A job run by :meth:`ProgressService.execute`: in memory, not persisted."""

    view: JobView
    ctx: JobContext
    task: asyncio.Task[Any] | None = None
    activity: list[tuple[datetime, str, str]] = field(default_factory=list)

    async def result(self) -> Any:
        """Wait for the handler's return value (raises what it raised, or CancelledError on cancel)."""
        assert self.task is not None
        return await self.task


class ProgressService:
    """The engine, assembled. Start it, use it, stop it."""

    def __init__(
        self,
        config: ServiceConfig | None = None,
        *,
        registry: HandlerRegistry | None = None,
        database: Database | None = None,
    ) -> None:
        self.config = config or ServiceConfig()
        cfg = self.config
        self.registry = registry or default_registry
        self.db = database or Database(cfg.database_url)
        self.store = JobStore(
            self.db,
            activity_limit=cfg.activity_limit,
            retry_backoff=cfg.retry_backoff,
            retry_backoff_max=cfg.retry_backoff_max,
        )
        self.bus = EventBus()
        self.monitor = JobProgressMonitor(
            self.bus,
            self.store,
            min_interval=cfg.min_interval,
            poll_interval=cfg.poll_interval,
            write_interval=None if self.db.is_sqlite else PG_PROGRESS_WRITE_INTERVAL,
            watch_others=cfg.watch_others,
        )
        self.worker: Worker | None = None
        if cfg.run_worker:
            self.worker = Worker(
                self.store,
                self.registry,
                self.monitor,
                concurrency=cfg.concurrency,
                worker_id=cfg.worker_id or make_worker_id(),
                poll_interval=cfg.poll_interval,
                lease_seconds=cfg.lease_seconds,
                cancel_grace=cfg.cancel_grace,
                shutdown_grace=cfg.shutdown_grace,
                recovery=cfg.recovery,
                reap_expired=not self.db.is_sqlite,
            )
        self._direct: dict[str, DirectRun] = {}
        self._direct_ids = itertools.count(1)
        self._direct_backend = _DirectBackend(self)
        self._started = False
        self.recovered: list[Job] = []
        #: LISTEN/NOTIFY (PostgreSQL with ``config.notify``), created by :meth:`start`.
        self.notifier: PgNotifier | None = None

    # ------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Create the schema, start the monitor, recover interrupted jobs and start the worker."""
        await self.store.init()
        if self.config.notify and not self.db.is_sqlite:
            await self._start_notifier()
        await self.monitor.start()
        if self.worker is not None:
            self.recovered = await self.worker.start()
        if self.config.freeze_startup_heap:
            freeze_startup_heap()
        self._started = True

    async def stop(self) -> None:
        """Stop gracefully: running jobs stop at a checkpoint and are requeued; pending writes are flushed."""
        if self.worker is not None:
            await self.worker.stop()
        for run in list(self._direct.values()):
            if run.task is not None and not run.task.done():
                run.task.cancel()
        for run in list(self._direct.values()):
            if run.task is not None:
                with contextlib.suppress(BaseException):
                    await run.task
        await self.monitor.stop()
        if self.notifier is not None:
            # After the worker and monitor: their last writes (requeued jobs, progress) are announced too.
            self.store.remove_change_listener(self.notifier.notify)
            await self.notifier.stop()
            self.notifier = None
        self.db.close()
        self._started = False

    async def _start_notifier(self) -> None:
        from .notify import PgNotifier

        notifier = PgNotifier(pg_connect_args(self.db.engine), origin=self.store.origin)
        worker = self.worker
        if worker is not None:
            # Due work is claimed at once; delayed work from elsewhere is found by the worker's periodic
            # next_run_at check (re-reading it on every NOTIFY would cost a query per wake-up).
            # Wake-one: work announcements reach only the holder of the claim turn (see core.notify).
            worker.turn = notifier.claim_turn(
                worker.registry.types(), on_grant=worker.wake, on_announce=worker.wake_announced
            )
            notifier.subscribe("control", worker.wake_controls)
        if self.config.watch_others:
            # A poll costs more than a wake-up: at most one per monitor tick; our own changes are known here.
            gap = self.monitor.tick_interval
            notifier.subscribe("rows", self.monitor.wake_poll, min_gap=gap, skip_own=True)
        self.store.add_change_listener(notifier.notify)
        self.notifier = notifier
        await notifier.start()

    async def __aenter__(self) -> ProgressService:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _wake(self, run_at_delay: float | None = None) -> None:
        if self.worker is not None:
            self.worker.wake(run_at_delay)

    # ---------------------------------------------------------------- submit
    def _new_job(
        self,
        type: str,
        payload: dict[str, Any] | None,
        *,
        name: str | None,
        priority: int,
        run_at: datetime | None,
        delay: float | None,
        max_attempts: int | None,
        timeout: float | None,
        owner: str | None,
        room: str | None,
        batch_id: int | None = None,
    ) -> NewJob:
        clean = self.registry.validate(type, payload)
        spec = self.registry.get(type)
        problems = submit_option_problems(
            priority=priority, delay=delay, max_attempts=max_attempts, timeout=timeout
        )
        if problems:
            raise PayloadError(type, problems)
        if delay:
            run_at = utcnow() + timedelta(seconds=delay)
        if run_at is not None:
            try:
                run_at = _to_utc(run_at)
            except OverflowError:  # 9999-12-31T23:59:59-14:00 is past the end of the calendar in UTC
                raise PayloadError(type, ["run_at: out of range once converted to UTC"]) from None
        # "is None", not "or": max_attempts=0 is a mistake to refuse, not a request for the default.
        attempts = max_attempts if max_attempts is not None else spec.max_attempts
        attempts = attempts if attempts is not None else self.config.default_max_attempts
        return NewJob(
            type=type,
            payload=clean,
            name=clean_name(name),
            priority=priority,
            run_at=run_at,
            max_attempts=attempts,
            timeout=timeout if timeout is not None else spec.timeout,
            owner=clean_name(owner),
            room=clean_name(room),
            batch_id=batch_id,
        )

    async def submit(
        self,
        type: str,
        payload: dict[str, Any] | None = None,
        *,
        name: str | None = None,
        priority: int = 0,
        run_at: datetime | None = None,
        delay: float | None = None,
        max_attempts: int | None = None,
        timeout: float | None = None,
        owner: str | None = None,
        room: str | None = None,
    ) -> Job:
        """Validate and store a queued job; the worker picks it up. Raises on a bad type or payload."""
        nj = self._new_job(
            type,
            payload,
            name=name,
            priority=priority,
            run_at=run_at,
            delay=delay,
            max_attempts=max_attempts,
            timeout=timeout,
            owner=owner,
            room=room,
        )
        if self.worker is not None and nj.run_at is None:
            # Due now: a free slot of our worker claims it in the insert's transaction (see Handoff).
            nj.handoff = self.worker.offer_slot()
        job = await self.store.submit(nj, actor=owner)
        if nj.handoff is None or nj.handoff.claimed is None:  # (a handed-over job was announced already)
            self.monitor.job_changed(job)
            self._wake((job.run_at - utcnow()).total_seconds())
        return job

    async def submit_batch(
        self,
        name: str,
        jobs: Sequence[JobRequest | dict[str, Any]],
        *,
        owner: str | None = None,
        room: str | None = None,
    ) -> tuple[Batch, list[Job]]:
        """Validate every job first (nothing is stored if one is bad), then store the batch and its jobs."""
        reqs = [j if isinstance(j, JobRequest) else JobRequest(**j) for j in jobs]
        if not reqs:
            raise PayloadError("batch", ["jobs: a batch needs at least one job"])
        prepared = [
            self._new_job(
                r.type,
                r.payload,
                name=r.name,
                priority=r.priority,
                run_at=None,
                delay=None,
                max_attempts=r.max_attempts,
                timeout=r.timeout,
                owner=owner,
                room=room,
            )
            for r in reqs
        ]
        batch = await self.store.create_batch(
            clean_name(name) or "batch", owner=clean_name(owner), room=clean_name(room)
        )
        for nj in prepared:
            nj.batch_id = batch.id
        stored = await self.store.submit_many(prepared, actor=owner)
        for job in stored:
            self.monitor.job_changed(job)
        summary = await self.store.batch_summary(batch.id or 0)
        self.monitor.emit_batch(summary)
        self._wake()
        return batch, stored

    # ---------------------------------------------------------------- direct
    async def execute(
        self,
        type: str,
        payload: dict[str, Any] | None = None,
        *,
        name: str | None = None,
        owner: str | None = None,
        room: str | None = None,
    ) -> DirectRun:
        """Run a handler now, in memory and concurrently (not persisted). Await ``.result()`` for its value.

        Direct jobs have ids like ``d1``; they report progress and get events like any other job.
        """
        clean = self.registry.validate(type, payload)
        spec = self.registry.get(type)
        jid = f"d{next(self._direct_ids)}"
        now = time.time()
        view = JobView(
            id=jid,
            type=type,
            status=JobStatus.RUNNING,
            name=name,
            owner=owner,
            room=room,
            attempts=1,
            started_at=now,
            persisted=False,
        )
        state = self.monitor.attach(view)
        ctx = JobContext(
            job_id=jid,
            job_type=type,
            payload=clean,
            checkpoint_state=None,
            attempt=1,
            state=state,
            backend=self._direct_backend,
            owner=owner,
            room=room,
        )
        run = DirectRun(view=view, ctx=ctx)
        self._direct[jid] = run
        self.monitor.job_changed(view)
        data = self.registry.parse(spec, clean)

        async def _go() -> Any:
            try:
                if spec.is_async:
                    result = await spec.fn(ctx, data)
                else:
                    result = await asyncio.to_thread(
                        spec.fn, SyncJobContext(ctx, asyncio.get_running_loop()), data
                    )
            except (JobCancelled, asyncio.CancelledError):
                view.status = JobStatus.CANCELLED
                raise
            except JobInterrupt:
                view.status = JobStatus.CANCELLED
                raise
            except Exception as exc:
                view.status = JobStatus.FAILED
                view.error = describe_error(exc)
                raise
            else:
                view.status = JobStatus.COMPLETED
                view.result = clean_result(result)
                return result
            finally:
                view.finished_at = time.time()
                self.monitor.job_changed(view)
                self.monitor.detach(jid)
                self._forget_finished_direct()

        run.task = asyncio.create_task(_go(), name=f"direct-{jid}")
        return run

    def _forget_finished_direct(self, keep: int = 1000) -> None:
        # Keep memory bounded: only the newest finished direct runs stay queryable.
        finished = [k for k, r in self._direct.items() if r.view.status in TERMINAL_STATUSES]
        for k in finished[: max(0, len(finished) - keep)]:
            del self._direct[k]

    # --------------------------------------------------------------- tracked
    async def track(
        self,
        name: str,
        *,
        total: float | None = None,
        owner: str | None = None,
        room: str | None = None,
        type: str = "tracked",
    ) -> Job:
        """Create a tracked job for work done elsewhere; feed it with :meth:`tracked_progress`."""
        if not name or len(name) > 300:
            raise PayloadError(type, ["name: must be 1 to 300 characters"])
        job = await self.store.submit(
            NewJob(
                type=clean_text(type, 200, multiline=False),
                kind=JobKind.TRACKED,
                name=clean_name(name),
                owner=clean_name(owner),
                room=clean_name(room),
                status=JobStatus.RUNNING,
                progress_total=total,
            ),
            actor=owner,
        )
        self.monitor.job_changed(job)
        return job

    async def tracked_progress(
        self,
        job_id: int,
        *,
        current: float | None = None,
        total: float | None = None,
        message: str | None = None,
        stage: str | None = None,
    ) -> Job:
        """Record progress of a tracked job. The returned job's ``control`` says run, pause or cancel."""
        job = await self.store.tracked_update(
            job_id,
            current=current,
            total=total,
            message=clean_optional(message, MAX_MESSAGE),
            stage=clean_name(stage),
        )
        self.monitor.job_changed(job)
        return job

    async def tracked_log(self, job_id: int, level: str, message: str) -> None:
        """Append an activity entry to a tracked job."""
        job = await self.store.get(job_id)
        if job.kind != JobKind.TRACKED:
            raise NotTracked(job_id)
        await self.store.log(job_id, level, clean_text(message, MAX_MESSAGE))

    async def tracked_report(
        self,
        job_id: int,
        *,
        current: float | None = None,
        total: float | None = None,
        message: str | None = None,
        stage: str | None = None,
    ) -> JobView:
        """Record progress of a tracked job in memory, as a handler's ``report()`` does.

        The monitor emits it (throttled) and persists it with its batched writes, so a program reporting
        many times a second costs no commit per report (unlike :meth:`tracked_progress`). The returned
        view's ``status`` and ``control`` say whether to run, pause or cancel. Raises JobNotFound, or
        IllegalTransition for a job that is not tracked.
        """
        if self.worker is not None and job_id in self.worker.running:
            # A queued job running here has live progress too, but only its handler reports it.
            raise NotTracked(job_id)
        st = self.monitor.live_state(job_id)
        view = self.monitor.view(job_id)
        # A live state held by a worker is a queued job running here: the row decides (it is not tracked).
        if st is None or view is None or view.worker_id is not None:
            job = await self.store.get(job_id)
            if job.kind != JobKind.TRACKED:
                raise NotTracked(job_id)
            if JobStatus(job.status).terminal:
                return JobView.from_job(job)
            # Another request may have attached it while this one read the row.
            st = self.monitor.live_state(job_id) or self.monitor.attach(job)
            view = self.monitor.view(job_id)
            assert view is not None
        if view.status in TERMINAL_STATUSES:
            # Cancelled from chat or the API: nothing more to record; forget the live state.
            self.monitor.detach(job_id)
            return view
        if stage is not None:
            st.stage_name = clean_name(stage)
        if current is not None or total is not None or message is not None or stage is not None:
            st.report(st.current if current is None else current, total, message)
        return view

    async def tracked_finish(
        self, job_id: int, *, ok: bool, result: Any = None, error: str | None = None
    ) -> Job:
        """Complete (``ok``) or fail a tracked job."""
        result = clean_result(result)
        error = clean_optional(error, MAX_ERROR)
        st = self.monitor.live_state(job_id)
        if st is not None:
            # Progress given to tracked_report() may not be written yet: store it before the final state.
            await self.store.tracked_update(
                job_id, current=st.current, total=st.total, message=st.message, stage=st.stage_name
            )
        try:
            job = await self.store.tracked_finish(
                job_id, JobStatus.COMPLETED if ok else JobStatus.FAILED, result=result, error=error
            )
        except IllegalTransition:
            view = self.monitor.view(job_id)
            if st is not None and view is not None and view.status in TERMINAL_STATUSES:
                self.monitor.detach(job_id)  # already finished (e.g. cancelled): nothing live to keep
            raise
        self.monitor.job_changed(job)
        self.monitor.detach(job_id)
        return job

    # ---------------------------------------------------------- user actions
    async def act(self, job_id: int | str, action: str, *, actor: str | None = None) -> ActionResult:
        """Pause, resume, cancel or retry a job. Raises JobNotFound / IllegalTransition with readable text."""
        try:
            action = Action(action)
        except ValueError:
            raise ValueError(f"unknown action {action!r}") from None
        if isinstance(job_id, str) and job_id.startswith("d"):
            return self._act_direct(job_id, action, actor)
        jid = int(job_id)
        res = await self.store.act(jid, action, actor=actor)
        if res.requested and self.worker is not None:
            self.worker.request_control(jid, str(res.job.control))
        self.monitor.job_changed(res.job, force=not res.requested)
        if res.job.status == JobStatus.PENDING:
            self._wake()
        return res

    async def pause(self, job_id: int | str, *, actor: str | None = None) -> ActionResult:
        """Pause a job (a running one pauses at its next checkpoint)."""
        return await self.act(job_id, Action.PAUSE, actor=actor)

    async def resume(self, job_id: int | str, *, actor: str | None = None) -> ActionResult:
        """Resume a paused job from its last checkpoint."""
        return await self.act(job_id, Action.RESUME, actor=actor)

    async def cancel(self, job_id: int | str, *, actor: str | None = None) -> ActionResult:
        """Cancel a job (a running one stops at its next checkpoint, or is forced after a grace period)."""
        return await self.act(job_id, Action.CANCEL, actor=actor)

    async def retry(self, job_id: int | str, *, actor: str | None = None) -> ActionResult:
        """Run a failed or cancelled job again, from the start."""
        return await self.act(job_id, Action.RETRY, actor=actor)

    async def act_batch(self, batch_id: int, action: str, *, actor: str | None = None) -> list[ActionResult]:
        """Apply an action to every job of a batch for which it is legal."""
        results = await self.store.act_batch(batch_id, action, actor=actor)
        for res in results:
            if res.requested and self.worker is not None:
                self.worker.request_control(res.job.id or 0, str(res.job.control))
            self.monitor.job_changed(res.job, force=not res.requested)
        self._wake()
        return results

    def _act_direct(self, job_id: str, action: str, actor: str | None) -> ActionResult:
        run = self._direct.get(job_id)
        if run is None:
            raise JobNotFound(job_id)
        view = run.view
        effect = plan(job_id, action, JobKind.DIRECT, view.status, str(run.ctx.control))
        view.control_by = actor
        run.ctx.set_control(effect.control, force=True)
        if effect.control == Control.CANCEL and run.task is not None:
            asyncio.get_running_loop().call_later(self.config.cancel_grace, run.task.cancel)
        job = Job(
            id=None, type=view.type, status=view.status, name=view.name, owner=view.owner, room=view.room
        )
        return ActionResult(job=job, action=action, requested=True)

    # --------------------------------------------------------------- queries
    async def get(self, job_id: int | str) -> Job:
        """One job (direct jobs are returned as unsaved records)."""
        if isinstance(job_id, str) and job_id.startswith("d"):
            run = self._direct.get(job_id)
            if run is None:
                raise JobNotFound(job_id)
            v = run.view
            st = run.ctx.progress
            return Job(
                id=None,
                type=v.type,
                name=v.name,
                status=v.status,
                owner=v.owner,
                room=v.room,
                progress_current=st.current,
                progress_total=st.total,
                progress_message=st.message,
                result=v.result,
                error=v.error,
                kind=JobKind.DIRECT,
            )
        return await self.store.get(int(job_id))

    async def list_jobs(self, **filters: Unpack[JobFilters]) -> list[Job]:
        """Jobs matching the filters (see :meth:`JobStore.list_jobs`)."""
        return await self.store.list_jobs(**filters)

    async def activity(self, job_id: int, limit: int = 20) -> list[Activity]:
        """The newest activity entries of a job."""
        return await self.store.activity(job_id, limit)

    async def stats(self) -> dict[str, Any]:
        """Counts by status, plus what runs in this process."""
        st = await self.store.stats()
        st["running_here"] = len(self.worker.running) if self.worker else 0
        st["direct"] = sum(1 for r in self._direct.values() if r.view.status not in TERMINAL_STATUSES)
        st["subscribers"] = self.bus.subscriber_count
        return st

    async def batch_summary(self, batch_id: int) -> BatchSummary:
        """Aggregate progress of a batch."""
        return await self.store.batch_summary(batch_id)

    async def queue_snapshot(self, *, limit: int = 20) -> dict[str, Any]:
        """Counts by status and the running jobs with their current progress (for "jobs" views)."""
        stats = await self.store.stats()
        running = await self.store.list_jobs(statuses=[JobStatus.RUNNING], limit=limit)
        events = [self.current_event(j) for j in running]
        for run in self._direct.values():
            if run.view.status not in TERMINAL_STATUSES:
                events.append(self.monitor.current_event(run.view))
        return {"counts": stats["counts"], "total": stats["total"], "running": events}

    def current_event(self, job: Job) -> JobProgressEvent:
        """An event showing the job's current state (not published)."""
        return self.monitor.current_event(job)

    # ---------------------------------------------------------------- events
    def subscribe(
        self,
        flt: EventFilter | None = None,
        *,
        job: int | str | None = None,
        batch: int | None = None,
        max_keys: int | None = None,
    ) -> Subscription:
        """Subscribe to events (all, one job's, or one batch's)."""
        return self.bus.subscribe(flt or make_filter(job=job, batch=batch), max_keys=max_keys)

    async def stream(
        self, job_id: int | str, *, after_seq: int | None = None, idle_timeout: float | None = None
    ) -> AsyncIterator[JobProgressEvent]:
        """Events of one job, starting with its current state, ending at its terminal state."""
        sub = self.subscribe(job=job_id)
        try:
            if isinstance(job_id, str) and job_id.startswith("d"):
                run = self._direct.get(job_id)
                if run is None:
                    raise JobNotFound(job_id)
                first = self.monitor.current_event(run.view)
            else:
                first = self.current_event(await self.store.get(int(job_id)))
            last_seq = after_seq or 0
            if first.seq > last_seq:
                last_seq = first.seq
                yield first
            if first.terminal:
                return
            while True:
                ev = await sub.get(timeout=idle_timeout)
                if ev is None:
                    if sub.closed:
                        return
                    continue
                if ev.seq <= last_seq:
                    continue
                last_seq = ev.seq
                yield ev
                if ev.terminal:
                    return
        finally:
            sub.close()

    async def wait_for(
        self, job_id: int, predicate: Callable[[Job], bool] | None = None, *, timeout: float = 30.0
    ) -> Job:
        """Wait until a job matches ``predicate`` (default: a terminal status); raises TimeoutError."""
        pred = predicate or (lambda j: j.status in TERMINAL_STATUSES)
        deadline = time.monotonic() + timeout
        sub = self.subscribe(job=job_id)
        try:
            while True:
                job = await self.store.get(job_id)
                if pred(job):
                    return job
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"job #{job_id} did not reach the expected state in {timeout}s")
                await sub.get(timeout=min(left, 0.25))
        finally:
            sub.close()


def _to_utc(dt: datetime) -> datetime:
    """An aware UTC datetime; a naive one is taken to be UTC already."""
    if dt.tzinfo is None:
        return dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC)


__all__ = ["DirectRun", "JobRequest", "ProgressService", "ServiceConfig"]
