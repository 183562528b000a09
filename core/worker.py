"""The worker: claims queued jobs, runs their handlers with concurrency limits, and records outcomes.

* Claims are batched (up to the free slots at once) and outcomes are written in group commits.
* Pause and cancel are cooperative at ``checkpoint()``. A cancel the handler ignores is enforced by
  cancelling its task after ``cancel_grace`` seconds.
* Control requests reach a job through the DB (the heartbeat reads them every ``poll_interval``, or at
  once after :meth:`Worker.wake_controls`, which LISTEN/NOTIFY calls) or, in this process, at once through
  :meth:`Worker.request_control`.
* A graceful stop asks running jobs to stop at their next checkpoint and requeues them from it.
* Wake-one (PostgreSQL): one NOTIFY would reach every worker, so only the holder of the claim turn
  (:class:`core.notify.ClaimTurn`) hears work announcements; a busy holder passes the turn to the next
  idle worker.
* Leases (PostgreSQL, ``reap_expired``): every claimed job holds a lease the heartbeat renews. The worker
  also keeps a local deadline per job (when the lease it last renewed runs out, by our monotonic clock) and
  stops a job whose deadline passed at its next checkpoint, without a round trip: after a stall (a frozen
  process, a lost network) another worker may already run it. Its writes are fenced in the store anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

from .context import JobContext, SyncJobContext
from .errors import JobCancelled, JobInterrupt, JobPaused, LeaseLost
from .models import Control, Job, JobStatus, Progress
from .monitor import JobProgressMonitor, JobView
from .registry import HandlerRegistry
from .salvage import describe_error, finish_isolating, log_failure
from .store import Handoff, JobStore, Outcome, RecoveryPolicy
from .text import clean_result

log = logging.getLogger(__name__)

#: Backoff after a wake-up whose claim found nothing (see Worker._claim_loop): 1 ms, doubling, at most 32 ms.
LOST_CLAIM_BACKOFF = 0.001
LOST_CLAIM_BACKOFF_MAX = 0.032
#: The holder of the claim turn whose slots are busy while work waits keeps the turn if its jobs typically
#: run shorter than this: a slot frees soon and it claims the work itself (a handover would cost the next
#: worker a claim, and spread the jobs thinner: smaller batches, more transactions per job). With longer
#: jobs it passes the turn at once; before it knows how long its jobs run, after this long.
TURN_PASS_DELAY = 0.05
#: A worker waiting for the claim turn polls this many times less often: the holder answers announcements,
#: and each poll that finds a job or two of the holder's stream spreads the work thinner. Its polls only
#: guard against a holder that stalled (a frozen process keeps its connection, hence the turn).
TURN_WAITER_POLL_FACTOR = 4
#: Weight of the latest run in the worker's typical run time (an exponential moving average).
RUN_TIME_WEIGHT = 0.1


def make_worker_id() -> str:
    """A worker id unique across hosts and processes."""
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class ClaimTurnLike(Protocol):
    """Who hears work announcements among idle workers (:class:`core.notify.ClaimTurn` on PostgreSQL)."""

    #: Whether this worker holds the turn.
    held: bool

    def want(self, yes: bool) -> None:
        """Queue for the turn (the worker has free slots), or pass it on."""
        ...


@dataclass(slots=True)
class RunningJob:
    """A job this worker is running."""

    job: Job
    ctx: JobContext
    #: The view announced when it started (the monitor's, unless a newer record replaced it there).
    view: JobView
    task: asyncio.Task[None] | None = None
    cancel_timer: asyncio.TimerHandle | None = None
    pending_logs: list[tuple[str, str, dict[str, Any] | None]] = field(default_factory=list)
    #: When its lease runs out by our monotonic clock, as far as we know (infinite without leases).
    lease_deadline: float = math.inf
    #: When it started (monotonic), for the worker's typical run time.
    started: float = field(default_factory=time.monotonic)


class _QueuedBackend:
    """Checkpoints and logs of queued jobs: persisted through the store, fenced on the worker id."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    async def checkpoint(self, ctx: JobContext, state: Any, has_state: bool, check: bool = True) -> None:
        # A lost lease stops the job even where it only saves (check=False): it is not ours to run any more.
        w = self.worker
        job_id = int(ctx.job_id)
        rj = w.running.get(job_id)
        if rj is not None and time.monotonic() > rj.lease_deadline:
            # Our lease ran out (we could not renew it): someone else may run this job by now.
            raise LeaseLost()
        if has_state:
            control = await w.store.save_checkpoint(job_id, w.worker_id, state)
            if control is None:
                raise LeaseLost()
            ctx.set_control(control)
        if check:
            raise_for_control(ctx)

    def log(self, ctx: JobContext, level: str, message: str, context: dict[str, Any] | None) -> None:
        self.worker.monitor.log(int(ctx.job_id), level, message, context)


def raise_for_control(ctx: JobContext) -> None:
    """Raise the interrupt matching the context's control request, if any."""
    if ctx.control == Control.CANCEL:
        raise JobCancelled()
    if ctx.control == Control.PAUSE:
        raise JobPaused()
    if ctx.control == Control.SHUTDOWN:
        raise JobInterrupt(Control.SHUTDOWN)


class Worker:
    """Runs queued jobs from the store."""

    def __init__(
        self,
        store: JobStore,
        registry: HandlerRegistry,
        monitor: JobProgressMonitor,
        *,
        concurrency: int = 4,
        worker_id: str | None = None,
        poll_interval: float = 1.0,
        lease_seconds: float = 30.0,
        cancel_grace: float = 5.0,
        shutdown_grace: float = 10.0,
        recovery: RecoveryPolicy = "pause",
        recover_on_start: bool = True,
        reap_expired: bool = False,
        prefetch: int | None = None,
    ) -> None:
        self.store = store
        self.registry = registry
        self.monitor = monitor
        self.concurrency = max(1, concurrency)
        self.worker_id = worker_id or make_worker_id()
        self.poll_interval = poll_interval
        self.lease_seconds = lease_seconds
        self.cancel_grace = cancel_grace
        self.shutdown_grace = shutdown_grace
        self.recovery: RecoveryPolicy = recovery
        self.recover_on_start = recover_on_start
        self.reap_expired = reap_expired
        self.running: dict[int, RunningJob] = {}
        #: Jobs claimed ahead of a free slot (only while the queue is deep); started before claiming again.
        self._ready: list[Job] = []
        self.prefetch = max(0, prefetch if prefetch is not None else min(64, 16 * self.concurrency))
        self._backend = _QueuedBackend(self)
        self._wakeup = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._outcomes: list[tuple[Outcome, RunningJob | None]] = []
        self._outcome_ready = asyncio.Event()
        self._controls_wakeup = asyncio.Event()
        #: Local lease deadlines (monotonic) of claimed jobs, running or claimed ahead; see the module doc.
        self._deadlines: dict[int, float] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._next_due: float | None = None
        self._next_due_check = 0.0
        self._stopping = False
        self._accepting = True
        #: The claim on its way to the store whose answer the claim loop has not taken yet (see :meth:`stop`).
        self._inflight_claim: asyncio.Future[list[Job]] | None = None
        #: Slots offered to jobs being submitted in this process (see :meth:`offer_slot`).
        self._offered = 0
        self.completed_count = 0
        #: The claim turn (PostgreSQL with LISTEN/NOTIFY; set by the service before start): only its holder
        #: hears other processes' work announcements (see :meth:`wake_announced`).
        self.turn: ClaimTurnLike | None = None
        #: Claims sent to the store (for tests and figures).
        self.claims_sent = 0
        self._pass_timer: asyncio.TimerHandle | None = None
        #: Typical seconds a job runs here (None until one ended).
        self._run_time: float | None = None

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> list[Job]:
        """Recover jobs left running by a dead process (per policy), then start claiming. Returns them."""
        recovered: list[Job] = []
        if self.recover_on_start:
            recovered = await self.store.recover(self.recovery, expired_only=self.reap_expired)
            for job in recovered:
                self.monitor.job_changed(job)
            if recovered:
                log.warning("recovered %d interrupted job(s) (policy %s)", len(recovered), self.recovery)
        self._tasks = [
            asyncio.create_task(self._claim_loop(), name="worker-claim"),
            asyncio.create_task(self._finish_loop(), name="worker-finish"),
            asyncio.create_task(self._heartbeat_loop(), name="worker-heartbeat"),
        ]
        return recovered

    async def stop(self, *, grace: float | None = None) -> None:
        """Stop claiming; ask running jobs to stop at their next checkpoint and requeue them from there.

        Jobs still running after ``grace`` seconds are cancelled as tasks and requeued as well.
        """
        self._accepting = False
        self._want_turn(False)
        if self._pass_timer is not None:
            self._pass_timer.cancel()
            self._pass_timer = None
        grace = self.shutdown_grace if grace is None else grace
        # Jobs claimed ahead but never started go straight back to the queue.
        for job in self._ready:
            self._release(job)
        self._ready.clear()
        for rj in list(self.running.values()):
            rj.ctx.set_control(Control.SHUTDOWN)
        tasks = [rj.task for rj in self.running.values() if rj.task is not None]
        if tasks:
            _, still = await asyncio.wait(tasks, timeout=grace)
            for t in still:
                t.cancel()
            if still:
                await asyncio.wait(still, timeout=5)
        self._stopping = True
        self._wakeup.set()
        self._outcome_ready.set()
        for t in self._tasks:
            if t.get_name() != "worker-finish":
                t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()
        # A claim that was on its way when the stop began: the claim loop hands back what it returns, unless
        # it was cancelled before the answer came; then that answer is handed back here. Either way no job
        # stays "running" with nobody running it.
        inflight, self._inflight_claim = self._inflight_claim, None
        if inflight is not None:
            with contextlib.suppress(Exception):
                for job in await inflight:
                    self._release(job)
        await self._flush_outcomes()

    def _release(self, job: Job) -> None:
        """Hand a job this worker claimed but will not start back to the queue (written by the finisher)."""
        self._outcomes.append(
            (Outcome(job_id=job.id or 0, worker_id=self.worker_id, status=JobStatus.PENDING), None)
        )
        self._deadlines.pop(job.id or 0, None)
        self._outcome_ready.set()

    def wake(self, run_at_delay: float | None = None) -> None:
        """Look for work now (called on submit in this process, and when the claim turn comes to this
        worker); ``run_at_delay`` for a delayed job."""
        if run_at_delay is not None and run_at_delay > 0:
            due = time.monotonic() + run_at_delay
            if self._next_due is None or due < self._next_due:
                self._next_due = due
        self._wakeup.set()

    def wake_announced(self) -> None:
        """Another process announced new work (NOTIFY, heard by the holder of the claim turn): look for it.

        A holder without a free slot cannot take the work now: unless its jobs are short (see
        TURN_PASS_DELAY) it passes the turn on, and the next idle worker claims when the turn reaches it.
        """
        self._wakeup.set()
        if self._full():
            self._pass_turn_later()

    def _full(self) -> bool:
        """No free slot, or jobs claimed ahead wait for one."""
        return bool(self._ready) or len(self.running) + self._offered >= self.concurrency

    def _want_turn(self, yes: bool) -> None:
        if self.turn is not None:
            self.turn.want(yes)

    def _pass_turn_later(self) -> None:
        """Work we know of waits while our slots are busy: pass the turn on unless we will claim it soon."""
        if self.turn is None or self._pass_timer is not None:
            return
        if self._run_time is None:
            self._pass_timer = asyncio.get_running_loop().call_later(
                TURN_PASS_DELAY, self._pass_turn, self.claims_sent
            )
        elif self._run_time >= TURN_PASS_DELAY:
            self._want_turn(False)

    def _pass_turn(self, claims_then: int) -> None:
        self._pass_timer = None
        if self.claims_sent == claims_then and self._full():
            self._want_turn(False)

    def offer_slot(self) -> Handoff | None:
        """Offer a free slot to a job this process is submitting (see :class:`~core.store.Handoff`).

        A job submitted while this worker idles would otherwise cost a second transaction (its claim) and
        a wake-up of the claim loop. None when no slot is free or jobs claimed ahead are waiting.
        """
        if not self._tasks or not self._accepting or self._ready:
            return None  # not started, stopping, or jobs claimed ahead wait for a slot
        if len(self.running) + self._offered >= self.concurrency:
            return None
        self._offered += 1
        return Handoff(self.worker_id, self.lease_seconds, functools.partial(self._take, time.monotonic()))

    def _take(self, offered_at: float, inserted: Job | None, claimed: Job | None) -> None:
        """The store's answer to an offer: start the job it claimed for this worker, or free the slot.

        ``offered_at`` (monotonic, before the claim) starts the local lease deadline, like a claim's.
        """
        self._offered -= 1
        if claimed is None or inserted is None:
            self._slot_freed.set()
            return
        # No "pending" event: the row was inserted running, so no reader ever saw it pending (the
        # submitter announces nothing when its job was handed over; the first event says "running").
        if self.reap_expired:
            self._deadlines[claimed.id or 0] = offered_at + self.lease_seconds
        if not self._accepting:
            self._release(claimed)  # stopping meanwhile: back to the queue, like the jobs claimed ahead
            return
        self._start_job(claimed)

    def wake_controls(self) -> None:
        """Read the running jobs' controls now instead of at the next heartbeat (a pause or cancel was
        requested from another process)."""
        self._controls_wakeup.set()

    def request_control(self, job_id: int, control: str) -> bool:
        """Deliver a pause or cancel to a job running in this process at once.

        Returns whether the job runs here.
        """
        rj = self.running.get(job_id)
        if rj is None:
            return False
        self._apply_control(rj, control)
        return True

    def _apply_control(self, rj: RunningJob, control: str) -> None:
        rj.ctx.set_control(control)
        if rj.ctx.control == Control.CANCEL and rj.cancel_timer is None and rj.task is not None:
            task = rj.task
            rj.cancel_timer = asyncio.get_running_loop().call_later(self.cancel_grace, task.cancel)

    # ---------------------------------------------------------------- loops
    async def _claim_loop(self) -> None:
        deep = False  # the last claim came back full: the queue is deep, so claim ahead
        lost = 0  # wake-ups in a row whose claim found nothing: other workers took the work first
        woken = False  # this claim follows a wake-up (not a poll timeout)
        while not self._stopping:
            try:
                if not self._accepting:
                    await asyncio.sleep(3600)
                free = self.concurrency - len(self.running) - self._offered
                if free <= 0:
                    if deep or self._ready:
                        # The queue is deep: unless a slot frees soon, the next idle worker claims its share.
                        self._pass_turn_later()
                    self._slot_freed.clear()
                    await self._slot_freed.wait()
                    continue
                while free > 0 and self._ready:
                    job = self._ready.pop(0)
                    if time.monotonic() > self._deadlines.get(job.id or 0, math.inf):
                        # Claimed ahead, but the lease ran out before a slot freed: it is not ours any more.
                        self._deadlines.pop(job.id or 0, None)
                        continue
                    self._start_job(job)
                    free -= 1
                if free <= 0:
                    continue
                self._want_turn(True)  # free slots: queue for the turn (or keep it)
                types = self.registry.types()
                self._wakeup.clear()
                # Claiming a few jobs ahead turns one claim transaction per job into one per batch.
                want = free + (self.prefetch if deep else 0)
                sent = time.monotonic()
                self.claims_sent += 1
                claim = asyncio.ensure_future(
                    self.store.claim(self.worker_id, want, types=types, lease_seconds=self.lease_seconds)
                )
                self._inflight_claim = claim
                try:
                    # Shielded: a stop that cancels this loop must still learn what the claim took.
                    jobs = await asyncio.shield(claim)
                finally:
                    if claim.done():
                        self._inflight_claim = None
                if not self._accepting:
                    for job in jobs:
                        self._release(job)  # the stop began while the claim was on its way
                    continue
                deep = len(jobs) == want
                lost = 0 if jobs else lost + woken
                if self.reap_expired:
                    # The lease was stamped after we sent the claim: counting from here is conservative.
                    for job in jobs:
                        self._deadlines[job.id or 0] = sent + self.lease_seconds
                for job in jobs:
                    if len(self.running) < self.concurrency:
                        self._start_job(job)
                    else:
                        self._ready.append(job)
                if deep or self._ready:
                    continue
                woken = await self._idle_wait(types)
                if woken and lost:
                    # Our wake-ups keep finding nothing: another worker takes the work first (a poll,
                    # a handover of the claim turn). Wait a little before claiming: empty claims cost
                    # more CPU than no-op work, and the jobs that arrive meanwhile come in one claim.
                    await asyncio.sleep(min(LOST_CLAIM_BACKOFF_MAX, LOST_CLAIM_BACKOFF * 2 ** min(lost, 5)))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log_failure(log, "claim failed; retrying", exc)
                await asyncio.sleep(self.poll_interval)

    async def _idle_wait(self, types: list[str]) -> bool:
        """Wait for a wake-up, the next due job or the poll interval; returns whether woken."""
        timeout = self.poll_interval
        if self.turn is not None and not self.turn.held:
            timeout *= TURN_WAITER_POLL_FACTOR
        now = time.monotonic()
        # Look for delayed jobs at most once per poll interval, not on every idle moment.
        if now >= self._next_due_check:
            self._next_due_check = now + self.poll_interval
            nxt = await self.store.next_run_at(types)
            self._next_due = None if nxt is None else now + (nxt - self.store.now()).total_seconds()
        if self._next_due is not None:
            timeout = max(0.0, min(timeout, self._next_due - now))
            if timeout <= 0:
                self._next_due = None
        if timeout <= 0:
            return False
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for loses a cancel arriving as the event fires.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._wakeup.wait()
                return True
        return False

    async def _heartbeat_loop(self) -> None:
        interval = max(0.05, min(self.poll_interval, self.lease_seconds / 3))
        last_reap = 0.0
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):  # (not wait_for: see _idle_wait)
                    await self._controls_wakeup.wait()
            self._controls_wakeup.clear()
            try:
                if self.running or self._ready:
                    await self._heartbeat_once()
                if self.reap_expired and time.monotonic() - last_reap >= self.lease_seconds / 2:
                    last_reap = time.monotonic()
                    for job in await self.store.recover(self.recovery, expired_only=True):
                        self.monitor.job_changed(job)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log_failure(log, "heartbeat failed", exc)
            if self.reap_expired:
                self._drop_expired()

    async def _heartbeat_once(self) -> None:
        # Only jobs claimed before the heartbeat was sent can be judged by its answer: a claim that commits
        # while the heartbeat's UPDATE runs is ours, yet missing from that answer.
        known = set(self.running) | {j.id or 0 for j in self._ready}
        sent = time.monotonic()
        controls = await self.store.heartbeat(self.worker_id, self.lease_seconds)
        for jid in known:
            control = controls.get(jid)
            rj = self.running.get(jid)
            if control is None:
                # The row is no longer ours (recovered elsewhere, or the lease ran out): stop, write nothing.
                self._deadlines.pop(jid, None)
                if rj is not None:
                    self._lose(rj)
                else:
                    self._ready = [j for j in self._ready if j.id != jid]
                continue
            if self.reap_expired:
                self._deadlines[jid] = sent + self.lease_seconds
                if rj is not None:
                    rj.lease_deadline = self._deadlines[jid]
            if rj is not None and control != Control.RUN:
                self._apply_control(rj, control)

    def _drop_expired(self) -> None:
        """Stop the jobs whose lease ran out by our clock (the heartbeat could not renew it)."""
        now = time.monotonic()
        for rj in list(self.running.values()):
            if now > rj.lease_deadline:
                self._lose(rj)
        if any(now > self._deadlines.get(j.id or 0, math.inf) for j in self._ready):
            self._ready = [j for j in self._ready if now <= self._deadlines.get(j.id or 0, math.inf)]

    def _lose(self, rj: RunningJob) -> None:
        if rj.task is not None and not rj.task.done():
            rj.ctx.set_control(Control.LEASE_LOST)
            rj.task.cancel()

    async def _finish_loop(self) -> None:
        while True:
            await self._outcome_ready.wait()
            self._outcome_ready.clear()
            try:
                await self._flush_outcomes()
            except Exception as exc:
                log_failure(log, "writing job outcomes failed; retrying", exc)
                await asyncio.sleep(0.5)
                self._outcome_ready.set()
            if self._stopping and not self._outcomes:
                return

    async def _flush_outcomes(self) -> None:
        if not self._outcomes:
            return
        batch, self._outcomes = self._outcomes, []
        try:
            # One outcome that cannot be stored must not keep the others (and the ones after) out.
            res = await finish_isolating(self.store, [oc for oc, _ in batch])
        except BaseException:
            self._outcomes[:0] = batch
            raise
        by_id = {j.id: j for j in res.changed}
        for oc, rj in batch:
            if oc.job_id in res.completed_ids and rj is not None:
                # The final view is the one announced at the start, completed, instead of the row read
                # again: nothing else changes it while the job runs (a newer record, such as a pause
                # request, replaces it in the monitor instead), and its progress is the live state's.
                view = rj.view
                view.status = JobStatus.COMPLETED
                view.result = oc.result
                view.error = None
                if res.finished_at is not None:
                    # The row's new stamp: a view announced meanwhile (a pause requested that the
                    # handler never reached) is older, and must not hide the completion as stale.
                    view.updated_at = res.finished_at
                    view.finished_at = res.finished_at.timestamp()
                else:
                    view.finished_at = time.time()
                self.monitor.job_changed(view)
                self.completed_count += 1
            else:
                job = by_id.get(oc.job_id)
                if job is not None:
                    self.monitor.job_changed(job)
            self.monitor.detach(oc.job_id)

    # ----------------------------------------------------------------- runs
    def _start_job(self, job: Job) -> None:
        assert job.id is not None
        view = JobView.from_job(job)  # one view, attached and announced
        state = self.monitor.attach(view)
        ctx = JobContext(
            job_id=job.id,
            job_type=job.type,
            payload=dict(job.payload or {}),
            checkpoint_state=job.checkpoint,
            attempt=job.attempts,
            state=state,
            backend=self._backend,
            owner=job.owner,
            room=job.room,
        )
        rj = RunningJob(job=job, ctx=ctx, view=view, lease_deadline=self._deadlines.get(job.id, math.inf))
        self.running[job.id] = rj
        self.monitor.job_changed(view)
        rj.task = asyncio.create_task(self._run(rj), name=f"job-{job.id}")

    async def _run(self, rj: RunningJob) -> None:
        job, ctx = rj.job, rj.ctx
        assert job.id is not None
        outcome: Outcome | None = None
        try:
            spec = self.registry.get(job.type)
            data = self.registry.parse(spec, dict(job.payload or {}))
            timeout = job.timeout if job.timeout is not None else spec.timeout
            if spec.is_async:
                call = spec.fn(ctx, data)
            else:
                call = asyncio.to_thread(spec.fn, SyncJobContext(ctx, asyncio.get_running_loop()), data)
            if timeout is None:
                result = await call  # (no timeout context to enter and leave for the usual job)
            else:
                async with asyncio.timeout(timeout):
                    result = await call
            outcome = self._outcome(job, JobStatus.COMPLETED, result=clean_result(result))
        except JobPaused:
            outcome = self._outcome(job, JobStatus.PAUSED)
        except JobCancelled:
            outcome = self._outcome(job, JobStatus.CANCELLED)
        except LeaseLost:
            outcome = None
        except JobInterrupt as exc:
            if exc.action == Control.SHUTDOWN:
                outcome = self._outcome(
                    job, JobStatus.PENDING, note="stopped by shutdown; continues from its checkpoint"
                )
            else:
                outcome = None
        except asyncio.CancelledError:
            outcome = self._cancelled_task_outcome(job, ctx)
            stopped = ctx.control in (Control.CANCEL, Control.SHUTDOWN)
            if outcome is None and not self._stopping and not stopped:
                raise
        except TimeoutError:
            outcome = self._outcome(job, JobStatus.FAILED, error=f"timed out after {job.timeout or 0:g}s")
        except Exception as exc:
            outcome = self._outcome(job, JobStatus.FAILED, error=describe_error(exc))
            log.info("job #%s failed: %s", job.id, outcome.error)
        finally:
            if rj.cancel_timer is not None:
                rj.cancel_timer.cancel()
            self.running.pop(job.id, None)
            took = time.monotonic() - rj.started
            avg = self._run_time
            self._run_time = took if avg is None else avg + RUN_TIME_WEIGHT * (took - avg)
            self._deadlines.pop(job.id, None)
            # A full worker claims as soon as a slot frees. An idle one (its last claim found the queue
            # drained) is not woken: new work is announced (wake(), NOTIFY) or found by the poll, and a
            # claim per finished job would mostly come back empty (with several workers, most of them).
            self._slot_freed.set()
            if outcome is not None:
                outcome.progress = self._progress_of(job.id)
                self._outcomes.append((outcome, rj))
                self._outcome_ready.set()
            else:
                self.monitor.detach(job.id)

    def _progress_of(self, job_id: int) -> Progress | None:
        st = self.monitor.live_state(job_id)
        return None if st is None else st.snapshot()

    def _cancelled_task_outcome(self, job: Job, ctx: JobContext) -> Outcome | None:
        if ctx.control == Control.CANCEL:
            return self._outcome(job, JobStatus.CANCELLED)
        if ctx.control == Control.SHUTDOWN or not self._accepting:
            return self._outcome(
                job, JobStatus.PENDING, note="stopped by shutdown; continues from its checkpoint"
            )
        return None

    def _outcome(
        self,
        job: Job,
        status: JobStatus,
        *,
        result: Any = None,
        error: str | None = None,
        note: str | None = None,
    ) -> Outcome:
        return Outcome(
            job_id=job.id or 0,
            worker_id=self.worker_id,
            status=status,
            result=result,
            error=error,
            note=note,
        )


__all__ = ["JobView", "Worker", "make_worker_id"]
