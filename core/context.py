"""What a handler sees while it runs: progress reporting, stages, the activity log and checkpoints.

``report()`` only writes a few attributes in memory and marks the job dirty; the monitor does the rest
(throttled events, batched DB writes) on its tick. It is safe to call from a handler thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Protocol

from .models import MAX_PROGRESS_MESSAGE, NO_PROGRESS, Control, Progress
from .text import MAX_MESSAGE, clean_json, clean_name, clean_text

StageSpec = Sequence[tuple[str, float] | str]


def _rank(control: str) -> int:
    return Control(control).rank if control in Control._value2member_map_ else 0


class ProgressState:
    """The live, in-memory progress of one running job. Written by handlers, read by the monitor."""

    __slots__ = (
        "_dirty",
        "current",
        "job_id",
        "key",
        "message",
        "rate_p0",
        "rate_t0",
        "stage_index",
        "stage_name",
        "stage_names",
        "stage_weights",
        "total",
    )

    def __init__(self, job_id: int | str, dirty: set[tuple[str, int | str]]) -> None:
        self.job_id = job_id
        self.key: tuple[str, int | str] = ("job", job_id)
        self._dirty = dirty
        self.current: float | None = None
        self.total: float | None = None
        self.message: str | None = None
        self.stage_names: list[str] = []
        self.stage_weights: list[float] = []
        self.stage_index: int | None = None
        self.stage_name: str | None = None
        # First (time, percent) sample of this run, for the ETA.
        self.rate_t0: float | None = None
        self.rate_p0: float | None = None

    def report(self, current: float | None, total: float | None = None, message: str | None = None) -> None:
        """Record progress. Cheap and synchronous: no I/O, no allocation beyond the arguments."""
        # This runs up to hundreds of thousands of times a second: a short printable message is taken as it
        # is, anything else goes through core.text. Numbers are made storable where they are written
        # (core.salvage), once per write tick rather than once per report.
        self.current = current
        if total is not None:
            self.total = total
        if message is not None:
            if message.__class__ is not str or len(message) > MAX_MESSAGE or not message.isprintable():
                # Made storable here, once: a lone surrogate or NUL would fail every batched write it joins.
                message = clean_text(message, MAX_MESSAGE)
            self.message = message
        self._dirty.add(self.key)

    def set_stages(self, stages: StageSpec) -> None:
        """Declare the stages and their weights (a bare name weighs 1)."""
        names: list[str] = []
        weights: list[float] = []
        for item in stages:
            if isinstance(item, str):
                names.append(clean_name(item) or "")
                weights.append(1.0)
            else:
                names.append(clean_name(item[0]) or "")
                weights.append(max(0.0, float(item[1])))
        self.stage_names = names
        self.stage_weights = weights
        self._dirty.add(self.key)

    def enter_stage(self, name: str, total: float | None) -> None:
        """Start stage ``name``: its own current/total start over."""
        name = clean_name(name) or ""
        if name not in self.stage_names:
            self.stage_names.append(name)
            self.stage_weights.append(1.0)
        self.stage_index = self.stage_names.index(name)
        self.stage_name = name
        self.current = 0 if total is not None else None
        self.total = total
        self._dirty.add(self.key)

    def leave_stage(self, name: str) -> None:
        """Finish stage ``name``: it counts as fully done in the weighted percent."""
        if self.stage_name == clean_name(name) and self.total is not None:
            self.current = self.total
        self._dirty.add(self.key)

    @property
    def indeterminate(self) -> bool:
        """True when there is no total to measure against."""
        return self.total is None or self.total <= 0

    def percentage(self) -> float | None:
        """Percent of the current total (the current stage's, when in a stage)."""
        if self.indeterminate or self.current is None:
            return None
        assert self.total is not None
        return max(0.0, min(100.0, 100.0 * self.current / self.total))

    def restore(self, progress: Progress) -> None:
        """Start from progress reported before (a resumed job); stages are declared again by the handler."""
        self.current, self.total, self.message = progress.current, progress.total, progress.message
        self.stage_name, self.stage_index = progress.stage_name, progress.stage_index

    def snapshot(self) -> Progress:
        """The progress now, as a value to store or send (the message clipped to what is stored)."""
        message = self.message
        if self.current is None and self.total is None and message is None and self.stage_name is None:
            if not self.stage_names and self.stage_index is None:
                return NO_PROGRESS  # nothing reported (yet): one shared value, no allocation
        if message is not None and len(message) > MAX_PROGRESS_MESSAGE:
            message = message[:MAX_PROGRESS_MESSAGE]
        return Progress(
            current=self.current,
            total=self.total,
            message=message,
            stage_name=self.stage_name,
            stage_index=self.stage_index,
            stage_count=len(self.stage_names) or None,
            weighted_percent=self.weighted_percent(),
        )

    def weighted_percent(self) -> float | None:
        """Overall percent, weighting each declared stage; None when nothing can be said."""
        frac = self.percentage()
        if not self.stage_names or self.stage_index is None:
            return frac
        weights = self.stage_weights
        total_w = sum(weights) or 1.0
        done_w = sum(weights[: self.stage_index])
        cur_w = weights[self.stage_index] * ((frac or 0.0) / 100.0)
        return max(0.0, min(100.0, 100.0 * (done_w + cur_w) / total_w))

    def eta_seconds(self, now: float) -> float | None:
        """Seconds left at the rate observed so far in this run; None while unknown."""
        p = self.weighted_percent()
        if p is None or (self.indeterminate and not self.stage_names):
            return None
        if self.rate_t0 is None or self.rate_p0 is None:
            self.rate_t0, self.rate_p0 = now, p
            return None
        dt = now - self.rate_t0
        dp = p - self.rate_p0
        if dt < 1.0 or dp <= 0.0 or p >= 100.0:
            return None
        eta = (100.0 - p) * dt / dp
        if eta > 90 * 86400:  # a rate this slow says nothing useful
            return None
        return round(eta, 1)


class ContextBackend(Protocol):
    """Where a context's checkpoints and log lines go (the worker, or memory for direct jobs)."""

    async def checkpoint(self, ctx: JobContext, state: Any, has_state: bool, check: bool = True) -> None:
        """Persist ``state`` (if given); with ``check``, raise a JobInterrupt if the job must stop."""

    def log(self, ctx: JobContext, level: str, message: str, context: dict[str, Any] | None) -> None:
        """Append to the activity log without waiting."""


class StageScope:
    """``async with ctx.stage(name, total)`` (or plain ``with`` in a sync handler)."""

    def __init__(self, state: ProgressState, name: str, total: float | None) -> None:
        self._state = state
        self._name = name
        self._total = total

    def __enter__(self) -> StageScope:
        self._state.enter_stage(self._name, self._total)
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        if et is None:
            self._state.leave_stage(self._name)

    async def __aenter__(self) -> StageScope:
        return self.__enter__()

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.__exit__(et, ev, tb)


class JobContext:
    """The handle an async handler gets: ``report``, ``stages``, ``stage``, ``log`` and ``checkpoint``."""

    def __init__(
        self,
        *,
        job_id: int | str,
        job_type: str,
        payload: dict[str, Any],
        checkpoint_state: Any,
        attempt: int,
        state: ProgressState,
        backend: ContextBackend,
        owner: str | None = None,
        room: str | None = None,
    ) -> None:
        self.job_id = job_id
        self.job_type = job_type
        self.payload = payload
        #: The state saved by the last ``checkpoint()`` of an earlier run (None on a first run).
        self.checkpoint_state = checkpoint_state
        self.attempt = attempt
        self.owner = owner
        self.room = room
        self.progress = state
        self._backend = backend
        #: What has been asked of this job (a :class:`~core.models.Control` value). Set by the worker.
        self.control: str = Control.RUN
        #: Set whenever ``control`` changes, so waiters wake up.
        self.control_changed = asyncio.Event()

    # -- progress ------------------------------------------------------------------------------
    def report(self, current: float | None, total: float | None = None, message: str | None = None) -> None:
        """Report progress (sync, no I/O). ``total=None`` keeps the previous total; no total at all is
        indeterminate progress."""
        self.progress.report(current, total, message)

    def advance(self, n: float = 1, message: str | None = None) -> None:
        """Add ``n`` to the current value."""
        self.progress.report((self.progress.current or 0) + n, None, message)

    def stages(self, stages: StageSpec) -> None:
        """Declare weighted stages, e.g. ``[("fetch", 1), ("render", 3)]``."""
        self.progress.set_stages(stages)

    def stage(self, name: str, total: float | None = None) -> StageScope:
        """Enter a stage for the duration of a ``with``/``async with`` block."""
        return StageScope(self.progress, name, total)

    def log(self, level: str, message: str, **context: Any) -> None:
        """Append an entry to the job's activity log (capped; written on the monitor's tick)."""
        self._backend.log(
            self,
            clean_text(level, 64, multiline=False)[:16],  # the column holds 16 (PostgreSQL enforces it)
            clean_text(message, MAX_MESSAGE),
            clean_json(context) if context else None,
        )

    # -- control -------------------------------------------------------------------------------
    @property
    def should_pause(self) -> bool:
        """Whether a pause was requested (the next ``checkpoint()`` will pause the job)."""
        return self.control == Control.PAUSE

    @property
    def should_cancel(self) -> bool:
        """Whether a cancel was requested."""
        return self.control == Control.CANCEL

    def set_control(self, control: str, *, force: bool = False) -> None:
        """Record a control request. During a run requests only escalate (run < shutdown < pause < cancel),
        so a stale "run" read from the DB never undoes a pause or a shutdown; ``force`` allows resuming."""
        if control == self.control:
            return
        if not force and _rank(control) < _rank(self.control):
            return
        self.control = control
        self.control_changed.set()

    async def checkpoint(self, state: Any = ...) -> None:
        """The pause/cancel point. Saves ``state`` durably (when given), then stops here if asked to.

        A resumed job finds the last saved state in :attr:`checkpoint_state`.
        """
        has_state = state is not ...
        if has_state:
            state = clean_json(state)
            self.checkpoint_state = state
        await self._backend.checkpoint(self, state if has_state else None, has_state)

    async def save(self, state: Any) -> None:
        """Save ``state`` durably without stopping here (not a pause or cancel point)."""
        state = clean_json(state)
        self.checkpoint_state = state
        await self._backend.checkpoint(self, state, True, check=False)


class SyncJobContext:
    """The handle a synchronous handler (run in a thread) gets.

    ``checkpoint()`` blocks the thread instead of awaiting.
    """

    def __init__(self, ctx: JobContext, loop: asyncio.AbstractEventLoop) -> None:
        self._ctx = ctx
        self._loop = loop
        self.job_id = ctx.job_id
        self.job_type = ctx.job_type
        self.payload = ctx.payload
        self.attempt = ctx.attempt
        self.owner = ctx.owner
        self.room = ctx.room

    @property
    def checkpoint_state(self) -> Any:
        """The state saved by the last checkpoint."""
        return self._ctx.checkpoint_state

    def report(self, current: float | None, total: float | None = None, message: str | None = None) -> None:
        """See :meth:`JobContext.report`."""
        self._ctx.progress.report(current, total, message)

    def advance(self, n: float = 1, message: str | None = None) -> None:
        """See :meth:`JobContext.advance`."""
        self._ctx.advance(n, message)

    def stages(self, stages: StageSpec) -> None:
        """See :meth:`JobContext.stages`."""
        self._ctx.stages(stages)

    def stage(self, name: str, total: float | None = None) -> StageScope:
        """See :meth:`JobContext.stage` (use it with a plain ``with``)."""
        return self._ctx.stage(name, total)

    def log(self, level: str, message: str, **context: Any) -> None:
        """See :meth:`JobContext.log`."""
        self._loop.call_soon_threadsafe(lambda: self._ctx.log(level, message, **context))

    @property
    def should_pause(self) -> bool:
        """Whether a pause was requested."""
        return self._ctx.should_pause

    @property
    def should_cancel(self) -> bool:
        """Whether a cancel was requested."""
        return self._ctx.should_cancel

    def checkpoint(self, state: Any = ...) -> None:
        """Save ``state`` and raise (JobPaused/JobCancelled) here if the job must stop. Blocks the thread."""
        fut = asyncio.run_coroutine_threadsafe(self._ctx.checkpoint(state), self._loop)
        fut.result()

    def save(self, state: Any) -> None:
        """Save ``state`` durably without stopping here. Blocks the thread."""
        asyncio.run_coroutine_threadsafe(self._ctx.save(state), self._loop).result()


__all__ = ["ContextBackend", "JobContext", "ProgressState", "StageScope", "SyncJobContext"]
