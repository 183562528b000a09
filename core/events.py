"""Progress events and the event bus that fans them out to subscribers.

Each subscriber has a bounded buffer holding the *latest* event per job or batch, so a slow subscriber
never blocks the monitor or other subscribers, and its memory is bounded by the number of distinct jobs
(and a hard cap) rather than by the number of events.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import InitVar, dataclass, field
from typing import Any

from .models import (
    NO_PROGRESS,
    PROGRESS_COLUMNS,
    TERMINAL_STATUSES,
    JobStatus,
    Progress,
    ProgressFields,
    stage_json,
)

#: Event sequence numbers start at the current time in microseconds, so they keep growing across restarts.
log = logging.getLogger(__name__)

_seq_counter = itertools.count(time.time_ns() // 1000)


def next_seq() -> int:
    """A new sequence number, larger than every one handed out before (also across restarts)."""
    return next(_seq_counter)


@dataclass(slots=True)
class JobProgressEvent(ProgressFields):
    """The state of one job or batch at one moment: what the HTTP stream and the chat adapters receive.

    Its progress is one :class:`~core.models.Progress` value (:attr:`progress`), the one the reporter's
    state and the job's row hold; its fields read as the event's own (``ev.current``, ``ev.message``...),
    and may be given as such when building one (``JobProgressEvent(..., current=3, total=10)``).
    """

    id: int | str
    type: str  # "job" or "batch"
    status: str
    seq: int
    timestamp: float
    #: What is shown: a completed job's is at its total and 100%.
    progress: Progress = NO_PROGRESS
    name: str | None = None
    #: ``current`` of ``total``, rounded (derived from :attr:`progress`, kept for readers).
    percentage: float | None = None
    indeterminate: bool = False
    eta_seconds: float | None = None
    job_type: str | None = None
    priority: int = 0
    retry_count: int = 0
    owner: str | None = None
    room: str | None = None
    batch_id: int | None = None
    error: str | None = None
    result: Any = None
    interrupted: bool = False
    control: str | None = None
    control_by: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    #: batch only
    total_operations: int | None = None
    completed_operations: int | None = None
    failed_operations: int | None = None
    current_operation: str | None = None
    errors: list[str] = field(default_factory=list)
    #: True when the status changed with this event (as opposed to a progress-only update).
    status_changed: bool = False
    # The progress fields, one by one, for building an event (see the class doc); read through properties.
    current: InitVar[float | None] = None
    total: InitVar[float | None] = None
    message: InitVar[str | None] = None
    stage_name: InitVar[str | None] = None
    stage_index: InitVar[int | None] = None
    stage_count: InitVar[int | None] = None
    weighted_percent: InitVar[float | None] = None

    def __post_init__(self, *flat: Any) -> None:
        if flat != _NO_FLAT_PROGRESS:  # (one tuple comparison: every job event passes here)
            self.progress = Progress(*flat)

    @property
    def key(self) -> tuple[str, int | str]:
        """``(type, id)``: what "latest per job" is keyed on."""
        return (self.type, self.id)

    @property
    def terminal(self) -> bool:
        """Whether the job or batch reached a final state."""
        return self.status in TERMINAL_STATUSES

    @property
    def display_percent(self) -> float | None:
        """The percent to show: weighted across stages when known."""
        return self.weighted_percent if self.weighted_percent is not None else self.percentage

    def to_dict(self) -> dict[str, Any]:
        """The wire shape (camelCase keys), as the HTTP API documents it."""
        d: dict[str, Any] = {
            "id": self.id,
            "type": self.type,
            "status": self.status,
            "message": self.message,
            "name": self.name,
            "progress": None
            if self.current is None and self.total is None
            else {"current": self.current, "total": self.total, "percentage": self.percentage},
            "stage": stage_json(self.stage_name, self.stage_index, self.stage_count),
            "weightedPercent": self.weighted_percent,
            "indeterminate": self.indeterminate,
            "etaSeconds": self.eta_seconds,
            "timestamp": self.timestamp,
            "seq": self.seq,
            "owner": self.owner,
            "room": self.room,
            "error": self.error,
            "interrupted": self.interrupted,
            "control": self.control,
        }
        if self.type == "batch":
            d["batchDetails"] = {
                "totalOperations": self.total_operations,
                "completedOperations": self.completed_operations,
                "failedOperations": self.failed_operations,
                "currentOperation": self.current_operation,
                "errors": list(self.errors),
            }
        else:
            d["jobDetails"] = {
                "jobType": self.job_type,
                "priority": self.priority,
                "retryCount": max(0, self.retry_count),
                "batchId": self.batch_id,
            }
            if self.status == JobStatus.COMPLETED:
                d["result"] = self.result
        return d


_NO_FLAT_PROGRESS = (None,) * len(PROGRESS_COLUMNS)

# The InitVars' class defaults would hide ProgressFields' properties; the generated __init__ keeps them.
for _name in PROGRESS_COLUMNS:
    delattr(JobProgressEvent, _name)
if list(JobProgressEvent.__dataclass_fields__)[-len(PROGRESS_COLUMNS) :] != list(PROGRESS_COLUMNS):
    raise TypeError("JobProgressEvent's progress InitVars must come last, in Progress's order")

EventFilter = Callable[[JobProgressEvent], bool]


def make_filter(
    *, job: int | str | None = None, batch: int | None = None, include_batch_jobs: bool = True
) -> EventFilter | None:
    """A filter for one job, one batch (the batch event and its jobs' events), or everything."""
    if job is not None:
        jid = job

        def only_job(ev: JobProgressEvent) -> bool:
            return ev.type == "job" and str(ev.id) == str(jid)

        return only_job
    if batch is not None:
        bid = batch

        def only_batch(ev: JobProgressEvent) -> bool:
            if ev.type == "batch":
                return ev.id == bid
            return include_batch_jobs and ev.batch_id == bid

        return only_batch
    return None


class Subscription:
    """One subscriber's view of the bus: an async iterator over the latest events.

    Its buffer keeps at most one event per job/batch (the newest) and at most ``max_keys`` keys; when full
    the oldest key is dropped (counted in :attr:`dropped`).
    """

    def __init__(self, bus: EventBus, flt: EventFilter | None, max_keys: int) -> None:
        self._bus = bus
        self._filter = flt
        self._max_keys = max_keys
        self._buffer: OrderedDict[tuple[str, int | str], JobProgressEvent] = OrderedDict()
        self._wakeup = asyncio.Event()
        self._closed = False
        self.dropped = 0
        self.delivered = 0

    def _offer(self, ev: JobProgressEvent) -> None:
        if self._closed or (self._filter is not None and not self._filter(ev)):
            return
        key = ev.key
        old = self._buffer.get(key)
        if old is not None:
            if old.seq > ev.seq:
                return  # never replace a newer state with an older one
            if old.status_changed and not ev.status_changed and old.status != ev.status:
                ev.status_changed = True  # keep the "status changed" mark of the event it replaces
            self._buffer[key] = ev  # replace in place: keeps the key's position, so no key starves
        else:
            if len(self._buffer) >= self._max_keys:
                self._buffer.popitem(last=False)
                self.dropped += 1
            self._buffer[key] = ev
        self._wakeup.set()

    def pending(self) -> int:
        """How many events wait in the buffer."""
        return len(self._buffer)

    def get_nowait(self) -> JobProgressEvent | None:
        """The oldest buffered event, or None."""
        if not self._buffer:
            return None
        _, ev = self._buffer.popitem(last=False)
        self.delivered += 1
        return ev

    async def get(self, timeout: float | None = None) -> JobProgressEvent | None:
        """Wait for the next event; None on timeout or when closed."""
        while True:
            ev = self.get_nowait()
            if ev is not None:
                return ev
            if self._closed:
                return None
            self._wakeup.clear()
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation.
                async with asyncio.timeout(timeout):
                    await self._wakeup.wait()
            except TimeoutError:
                return None

    def close(self) -> None:
        """Unsubscribe; a waiting :meth:`get` returns None."""
        if not self._closed:
            self._closed = True
            self._bus._remove(self)
            self._buffer.clear()
            self._wakeup.set()

    @property
    def closed(self) -> bool:
        """Whether the subscription was closed."""
        return self._closed

    def __aiter__(self) -> AsyncIterator[JobProgressEvent]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[JobProgressEvent]:
        try:
            while True:
                ev = await self.get()
                if ev is None:
                    return
                yield ev
        finally:
            self.close()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventBus:
    """Fans events out to subscriptions. ``publish`` never waits: it only updates buffers."""

    def __init__(self, *, default_max_keys: int = 100_000) -> None:
        self._subs: list[Subscription] = []
        self._default_max_keys = default_max_keys
        self.published = 0
        self._listeners: list[Callable[[JobProgressEvent], None]] = []

    def subscribe(self, flt: EventFilter | None = None, *, max_keys: int | None = None) -> Subscription:
        """A new subscription receiving the events that pass ``flt`` (all when None)."""
        sub = Subscription(self, flt, max_keys or self._default_max_keys)
        self._subs.append(sub)
        return sub

    def add_listener(self, fn: Callable[[JobProgressEvent], None]) -> None:
        """Call ``fn(event)`` synchronously on every event (for cheap in-loop consumers such as adapters)."""
        self._listeners.append(fn)

    def remove_listener(self, fn: Callable[[JobProgressEvent], None]) -> None:
        """Undo :meth:`add_listener`."""
        if fn in self._listeners:
            self._listeners.remove(fn)

    def publish(self, ev: JobProgressEvent) -> None:
        """Deliver ``ev`` to every matching subscription and listener."""
        self.published += 1
        for sub in list(self._subs):
            sub._offer(ev)
        for fn in list(self._listeners):
            try:
                fn(ev)
            except Exception:  # a broken consumer must not take the monitor down
                log.exception("event listener %r failed", fn)

    def _remove(self, sub: Subscription) -> None:
        if sub in self._subs:
            self._subs.remove(sub)

    @property
    def subscriber_count(self) -> int:
        """The number of open subscriptions."""
        return len(self._subs)
