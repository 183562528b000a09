"""A per-room, latest-wins edit scheduler, shared by the Matrix and Discord adapters.

Chat platforms allow far fewer edits than a busy job produces: Synapse's default ``rc_message`` lets
about ten messages through and then one every ~4.5 s, and Discord allows about 5 edits per 5 s per
channel. Sending every rendered state would fall minutes behind, so the adapters hand each new
state to this scheduler instead, and it decides what actually goes out:

* **Latest wins.** Per message only the newest not-yet-sent state is kept, so the backlog is bounded
  by the number of messages, never by the number of events. Superseded states are skipped.
* **Ordering.** At most one edit is in flight per message, and an older state is never sent after a
  newer one (every state carries a ``version``, the event seq, and stale ones are ignored).
* **Terminal states are delivered.** A ``final`` state is retried through rate limits and transient
  errors until it is sent, or until the scheduler is closed.
* **A budget per room.** A token bucket (``rate`` edits/s, ``burst``) keeps the room under the
  platform's limit; a :class:`RateLimited` answer pauses the room for ``retry_after`` and then sends
  the *latest* state of the refused message (not the refused one); :meth:`EditScheduler.update_budget`
  lets the adapter feed in Discord's ``X-RateLimit-Remaining`` / ``-Reset-After`` so it adapts before
  it ever gets a 429.
* **Fairness.** Within a room, messages with pending states are served round-robin (a message that
  just got an edit goes to the back of the line), and final states go first.
* **Independent rooms.** Each room has its own lazily created worker task, which exits when idle;
  one room's 429 never stalls another.

The module is platform neutral on purpose: it imports no chat library and nothing from ``bot/``.
Time is injectable (``clock`` and ``sleep``) so tests can run it on virtual time.

Typical use in an adapter::

    scheduler = EditScheduler(send_edit, rate=0.2, burst=10)      # Synapse's rc_message defaults
    scheduler.submit(room_id, job_id, rendered, version=event.seq, final=event.terminal)
    ...
    await scheduler.aclose(drain_timeout=10)
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

from .outbox import PermanentError, RateLimited

__all__ = [
    "EditScheduler",
    "PermanentEditError",
    "RateLimited",
    "RoomStats",
    "SendFn",
]

log = logging.getLogger(__name__)

RoomT = TypeVar("RoomT", bound=Hashable)
KeyT = TypeVar("KeyT", bound=Hashable)
StateT = TypeVar("StateT")

# Comparisons of virtual or real instants tolerate float rounding: without it a worker that slept
# exactly "until the token is there" could find 0.9999999 tokens and spin on micro-sleeps.
_EPS = 1e-9

# Adaptive rate (AIMD): a 429 halves the room's effective rate (never below rate * _MIN_RATE_FRACTION),
# and each successful edit gives back rate * _RATE_STEP. The configured rate is the ceiling.
_DECREASE = 0.5
_MIN_RATE_FRACTION = 1 / 16
_RATE_STEP = 1 / 16

# How many finished messages per room remember their last version after their final edit went out,
# so a late, stale submit for them is still recognised as stale. Bounded so a long-running service
# does not grow without limit.
_TOMBSTONES_PER_ROOM = 10_000


#: The scheduler and the outbox share one meaning of "rate limited" and "can never succeed".
PermanentEditError = PermanentError


@dataclass(slots=True)
class RoomStats:
    """Counters for one room, for benches, tests and ``/v1/stats``."""

    #: ``submit`` calls for this room.
    submitted: int = 0
    #: Submits ignored because their version was not newer than one already seen for that message.
    ignored: int = 0
    #: Edits the platform accepted.
    sent: int = 0
    #: ``RateLimited`` answers (429 / ``M_LIMIT_EXCEEDED``).
    rate_limited: int = 0
    #: States superseded by a newer one before they could be sent (or re-sent).
    skipped: int = 0
    #: Transient send errors (any other exception).
    errors: int = 0
    #: States given up on: a ``PermanentEditError``, or a non-final state out of retries.
    dropped: int = 0


SendFn = Callable[[RoomT, KeyT, StateT], Awaitable["RateLimited | None"]]
"""``async send(room, message_key, state)``: perform one edit. Return ``None`` (or anything that is not
a :class:`RateLimited`, e.g. the library's response object) on success; raise or return
:class:`RateLimited` on a rate limit; raise :class:`PermanentEditError` if it can never work;
any other exception is a transient error. It must bound its own duration (HTTP timeouts)."""


@dataclass(slots=True)
class _Item(Generic[StateT]):
    """One rendered state waiting for, or in, an edit."""

    state: StateT
    version: int
    final: bool
    #: Must be delivered: it is final, or it superseded a final state (so the message still ends
    #: up showing a state at least as new as the final one).
    must: bool
    #: Failed attempts of this very state (bounds retries of non-final states).
    attempts: int = 0


@dataclass(slots=True)
class _Message(Generic[StateT]):
    """What the scheduler knows about one message."""

    #: Highest version ever accepted; any submit not newer than this is stale.
    last_version: int | None = None
    #: The newest state not yet handed to ``send``.
    pending: _Item[StateT] | None = None
    #: The state whose edit is in flight.
    inflight: _Item[StateT] | None = None
    #: Consecutive transient failures, for the exponential backoff.
    failures: int = 0
    #: No edit for this message before this instant (transient-error backoff).
    not_before: float = 0.0


class _Room(Generic[RoomT, KeyT, StateT]):
    """Per-room state: messages, round-robin line, token bucket, worker."""

    def __init__(self, room: RoomT, rate: float, burst: float, now: float) -> None:
        self.id = room
        self.messages: dict[KeyT, _Message[StateT]] = {}
        # Keys of messages that have a pending state, in serving order. Invariant: key in ``order``
        # if and only if ``messages[key].pending is not None``. It may also hold a key whose
        # previous edit is still in flight; the picker skips those.
        self.order: OrderedDict[KeyT, None] = OrderedDict()
        self.tombstones: OrderedDict[KeyT, int] = OrderedDict()
        self.inflight: dict[KeyT, asyncio.Task[None]] = {}
        self.wake = asyncio.Event()
        self.worker: asyncio.Task[None] | None = None
        self.rate = rate  # effective rate, adapted between rate * _MIN_RATE_FRACTION and rate
        self.tokens = float(burst)
        self.bucket_time = now  # tokens were exact at this instant (may lie in the future, see 429)
        self.paused_until = -math.inf
        # While the worker sleeps for budget, new submits cannot change its decision, so they do
        # not wake it (saves a wake-up per event on busy rooms).
        self.waiting_budget = False
        self.stats = RoomStats()


class EditScheduler(Generic[RoomT, KeyT, StateT]):
    """Per-room, latest-wins, rate-limited scheduler of message edits.

    ``send(room, message_key, state)`` performs one edit (see :data:`SendFn`). ``rate`` (edits/s) and
    ``burst`` size each room's token bucket: Synapse's default ``rc_message`` is ``rate=0.2,
    burst=10``; Discord's observed per-channel edit limit is about ``rate=1, burst=5`` (and the adapter
    should also call :meth:`update_budget` from the response headers). ``max_in_flight`` is how many
    edits of *different* messages may be in flight at once in one room (one per message, always).

    Transient errors back off exponentially per message, from ``backoff_base`` up to
    ``backoff_max`` seconds. Final states are retried until they succeed; a non-final state is
    dropped after ``max_attempts`` failures, or at once when a newer state supersedes it.

    All methods must be called from the event loop the scheduler runs on. ``clock`` (monotonic
    seconds) and ``sleep`` are injectable so tests can use virtual time.
    """

    def __init__(
        self,
        send: SendFn[RoomT, KeyT, StateT],
        *,
        rate: float = 1.0,
        burst: float = 5.0,
        max_in_flight: int = 1,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        max_attempts: int = 5,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """Create an idle scheduler; no task runs until the first :meth:`submit`."""
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError("rate must be a positive, finite number of edits per second")
        if not (burst >= 1 and math.isfinite(burst)):
            raise ValueError("burst must be at least 1")
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        if not (0 < backoff_base <= backoff_max):
            raise ValueError("need 0 < backoff_base <= backoff_max")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self._send = send
        self._rate = float(rate)
        self._burst = float(burst)
        self._max_in_flight = max_in_flight
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max
        self._max_attempts = max_attempts
        self._clock = clock
        self._sleep = sleep
        self._rooms: dict[RoomT, _Room[RoomT, KeyT, StateT]] = {}
        # Set whenever the amount of pending work may have dropped; flush() waits on it.
        self._changed = asyncio.Event()
        self._closed = False

    # ------------------------------------------------------------------ public API

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has been called (submits are then ignored)."""
        return self._closed

    def submit(
        self,
        room: RoomT,
        message_key: KeyT,
        state: StateT,
        *,
        final: bool = False,
        version: int,
    ) -> bool:
        """Offer a newly rendered ``state`` for a message; never blocks.

        ``version`` must grow with every new state of the message (the event seq). A submit whose
        version is not newer than one already accepted for that message is ignored, which is what
        keeps an older state from ever being sent after a newer one. A newer state replaces the
        message's pending one (latest wins). ``final=True`` marks the terminal state: it is always
        delivered (or a newer state that superseded it is).

        Returns whether the state was accepted. Must be called from the running event loop.
        """
        if self._closed:
            log.debug("edit scheduler closed; ignoring state v%s for %r in %r", version, message_key, room)
            return False
        r = self._room(room)
        r.stats.submitted += 1
        msg = r.messages.get(message_key)
        if msg is None:
            floor = r.tombstones.get(message_key)
            if floor is not None and version <= floor:
                r.stats.ignored += 1
                return False
            if floor is not None:
                del r.tombstones[message_key]
            msg = _Message(last_version=floor)
            r.messages[message_key] = msg
        elif msg.last_version is not None and version <= msg.last_version:
            r.stats.ignored += 1
            return False
        msg.last_version = version
        prev = msg.pending
        if prev is not None:
            # Latest wins; the message keeps its place in the line (it has not been served yet).
            r.stats.skipped += 1
        else:
            # A message that was just served (or never waited) joins the back of the line.
            r.order[message_key] = None
        msg.pending = _Item(state, version, final, must=final or (prev is not None and prev.must))
        if not r.waiting_budget:
            r.wake.set()
        self._ensure_worker(r)
        return True

    def update_budget(self, room: RoomT, remaining: int, reset_after: float) -> None:
        """Adapt a room's budget to what the platform reported (Discord's rate-limit headers).

        ``remaining`` edits are left in the platform's current window, which resets in
        ``reset_after`` seconds. The local bucket never holds more than ``remaining`` tokens, and
        with nothing remaining the room pauses until the reset, so the next edit does not draw a 429.
        Meant to be called from inside ``send`` after a response.
        """
        r = self._room(room)
        now = self._clock()
        self._refill(r, now)
        if remaining <= 0:
            wait = float(reset_after) if reset_after > 0 else 0.0
            r.paused_until = max(r.paused_until, now + wait)
            r.tokens = 0.0
        else:
            r.tokens = min(r.tokens, float(remaining))

    def pending_count(self, room: RoomT | None = None) -> int:
        """Messages (in ``room``, or in all rooms) whose newest state is not delivered yet.

        A message counts once whether it has a queued state, an edit in flight, or both; so this
        is at most the number of messages, however many events were submitted.
        """
        if room is not None:
            r = self._rooms.get(room)
            return 0 if r is None else self._room_pending(r)
        return sum(self._room_pending(r) for r in self._rooms.values())

    def stats(self, room: RoomT) -> RoomStats:
        """A snapshot of one room's counters (all zero for a room never seen)."""
        r = self._rooms.get(room)
        return dataclasses.replace(r.stats) if r is not None else RoomStats()

    def all_stats(self) -> dict[RoomT, RoomStats]:
        """Snapshots of every room's counters."""
        return {room: dataclasses.replace(r.stats) for room, r in self._rooms.items()}

    # The timeout runs on the injected clock (virtual time in tests), so asyncio.timeout() cannot do it.
    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until nothing is pending (see :meth:`pending_count`), or ``timeout`` s have passed.

        Returns True when everything was delivered (or dropped), False on timeout. Time is measured
        with the scheduler's ``clock`` and ``sleep``.
        """
        deadline = None if timeout is None else self._clock() + timeout
        while True:
            # Clear before checking: a change between the check and the wait then still wakes us.
            self._changed.clear()
            if self.pending_count() == 0:
                return True
            if deadline is None:
                await self._changed.wait()
                continue
            left = deadline - self._clock()
            if left <= 0:
                return False
            await self._wait_event(self._changed, left)

    async def close(self) -> None:
        """Stop now: cancel and await every worker and in-flight edit; pending states are discarded.

        Idempotent. Further submits are ignored. Use :meth:`aclose` to deliver what is pending first.
        """
        self._closed = True
        tasks: list[asyncio.Task[None]] = []
        for r in self._rooms.values():
            if r.worker is not None:
                tasks.append(r.worker)
            tasks.extend(r.inflight.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        lost = lost_final = 0
        for r in self._rooms.values():
            for msg in r.messages.values():
                for item in (msg.pending, msg.inflight):
                    if item is not None:
                        lost += 1
                        lost_final += item.must
                msg.pending = msg.inflight = None
            r.order.clear()
            r.inflight.clear()
            r.worker = None
        if lost_final:
            log.warning(
                "edit scheduler closed with %d undelivered state(s), %d of them final", lost, lost_final
            )
        elif lost:
            log.debug("edit scheduler closed with %d undelivered non-final state(s)", lost)
        self._changed.set()

    async def aclose(self, drain_timeout: float = 10.0) -> bool:
        """Deliver what is pending for up to ``drain_timeout`` s, then :meth:`close`.

        Returns whether everything was delivered before the timeout.
        """
        drained = True if self._closed else await self.flush(drain_timeout)
        await self.close()
        return drained

    # ------------------------------------------------------------------ internals

    def _room(self, room: RoomT) -> _Room[RoomT, KeyT, StateT]:
        # Rooms are kept for the scheduler's lifetime: they are few (configured ones only), and
        # keeping them preserves the bucket and any pause across idle periods.
        r = self._rooms.get(room)
        if r is None:
            r = self._rooms[room] = _Room(room, self._rate, self._burst, self._clock())
        return r

    @staticmethod
    def _room_pending(r: _Room[RoomT, KeyT, StateT]) -> int:
        # ``order`` holds messages with a queued state; add those with only an edit in flight.
        return len(r.order) + sum(1 for k in r.inflight if k not in r.order)

    def _ensure_worker(self, r: _Room[RoomT, KeyT, StateT], delay: float = 0.0) -> None:
        if r.worker is None and not self._closed:
            r.worker = asyncio.get_running_loop().create_task(
                self._run_room(r, delay), name=f"edit-scheduler:{r.id!r}"
            )

    async def _run_room(self, r: _Room[RoomT, KeyT, StateT], delay: float) -> None:
        """A room's worker: serve until idle; never let an exception escape."""
        crashed = False
        try:
            if delay > 0:
                await self._sleep(delay)
            await self._room_loop(r)
        except asyncio.CancelledError:
            raise
        except Exception:
            # A bug here (or a failing injected sleep) must not silently stall the room forever.
            log.exception("edit scheduler worker for room %r failed; restarting", r.id)
            crashed = True
        finally:
            if r.worker is asyncio.current_task():
                r.worker = None
        if crashed and (r.order or r.inflight):
            self._ensure_worker(r, delay=1.0)

    async def _room_loop(self, r: _Room[RoomT, KeyT, StateT]) -> None:
        while not self._closed:
            # Cleared before deciding: there is no await between here and the wait below, so a
            # wake-up set meanwhile (by a submit or a finished edit) is never lost.
            r.wake.clear()
            if not r.order and not r.inflight:
                return  # idle: exit; the next submit starts a new worker
            if len(r.inflight) >= self._max_in_flight:
                await r.wake.wait()  # a finished edit frees a slot and sets wake
                continue
            now = self._clock()
            key, backoff_until = self._pick(r, now)
            if key is None:
                # Everything pending is in flight or backing off after errors.
                if backoff_until is None:
                    await r.wake.wait()
                else:
                    await self._wait_event(r.wake, backoff_until - now)
                continue
            wait = self._budget_wait(r, now)
            if wait > 0:
                r.waiting_budget = True
                try:
                    await self._sleep(wait)
                finally:
                    r.waiting_budget = False
                continue  # pick again afterwards: a final may have arrived, or a newer state
            self._launch(r, key, now)

    def _pick(self, r: _Room[RoomT, KeyT, StateT], now: float) -> tuple[KeyT | None, float | None]:
        """The next message to edit: the first "must deliver" one in line, else the first in line.

        Skips messages with an edit in flight or in backoff. Also returns the earliest end of a
        backoff, to know how long to wait when nothing is eligible.
        """
        first: KeyT | None = None
        backoff_until: float | None = None
        for key in r.order:
            if key in r.inflight:
                continue
            msg = r.messages[key]
            if msg.not_before > now + _EPS:
                backoff_until = (
                    msg.not_before if backoff_until is None else min(backoff_until, msg.not_before)
                )
                continue
            assert msg.pending is not None  # invariant of r.order
            if msg.pending.must:
                return key, backoff_until
            if first is None:
                first = key
        return first, backoff_until

    def _refill(self, r: _Room[RoomT, KeyT, StateT], now: float) -> None:
        if now > r.bucket_time:
            r.tokens = min(self._burst, r.tokens + (now - r.bucket_time) * r.rate)
            r.bucket_time = now

    def _budget_wait(self, r: _Room[RoomT, KeyT, StateT], now: float) -> float:
        """Seconds until the room may send its next edit (0 when it may send now)."""
        if r.paused_until > now + _EPS:
            return r.paused_until - now
        self._refill(r, now)
        if r.tokens >= 1 - _EPS:
            return 0.0
        if r.bucket_time > now:  # the bucket starts refilling only after a 429 pause
            return r.bucket_time - now
        return (1 - r.tokens) / r.rate

    def _launch(self, r: _Room[RoomT, KeyT, StateT], key: KeyT, now: float) -> None:
        msg = r.messages[key]
        item = msg.pending
        assert item is not None
        msg.pending = None
        msg.inflight = item
        del r.order[key]
        r.tokens -= 1
        r.inflight[key] = asyncio.get_running_loop().create_task(
            self._deliver(r, key, msg, item), name=f"edit:{r.id!r}:{key!r}:v{item.version}"
        )

    async def _deliver(
        self, r: _Room[RoomT, KeyT, StateT], key: KeyT, msg: _Message[StateT], item: _Item[StateT]
    ) -> None:
        """Run one edit and record its outcome; never raises except for our own cancellation."""
        outcome: BaseException | None
        try:
            try:
                result = await self._send(r.id, key, item.state)
                outcome = result if isinstance(result, RateLimited) else None
            except asyncio.CancelledError as exc:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # close() cancelled us
                outcome = exc  # a library cancelled something internally: treat as transient
            except Exception as exc:
                outcome = exc
            try:
                self._settle(r, key, msg, item, outcome)
            except Exception:
                log.exception("edit scheduler: bookkeeping failed for %r in %r", key, r.id)
        finally:
            if r.inflight.get(key) is asyncio.current_task():
                del r.inflight[key]
            r.wake.set()
            self._changed.set()

    def _settle(
        self,
        r: _Room[RoomT, KeyT, StateT],
        key: KeyT,
        msg: _Message[StateT],
        item: _Item[StateT],
        outcome: BaseException | None,
    ) -> None:
        now = self._clock()
        msg.inflight = None
        if outcome is None:
            r.stats.sent += 1
            msg.failures = 0
            msg.not_before = 0.0
            self._refill(r, now)
            r.rate = min(self._rate, r.rate + self._rate * _RATE_STEP)
            if item.final and msg.pending is None:
                self._forget(r, key, msg)
            return
        if isinstance(outcome, RateLimited):
            r.stats.rate_limited += 1
            self._refill(r, now)
            resume = now + outcome.retry_after
            r.paused_until = max(r.paused_until, resume)
            # The platform allows one request once retry_after has passed; the bucket refills from
            # there, at a rate halved because our estimate of the platform's budget was too high.
            r.tokens = 1.0
            r.bucket_time = max(r.bucket_time, r.paused_until)
            r.rate = max(self._rate * _MIN_RATE_FRACTION, r.rate * _DECREASE)
            log.info("edit of %r in %r rate limited; room paused for %.3fs", key, r.id, outcome.retry_after)
            self._requeue(r, key, msg, item)
            return
        if isinstance(outcome, PermanentEditError):
            r.stats.dropped += 1
            log.warning(
                "edit of %r in %r (v%d) cannot succeed, dropped: %s", key, r.id, item.version, outcome
            )
            if item.final and msg.pending is None:
                self._forget(r, key, msg)
            return
        # Any other exception: transient. Back off this message and retry, unless superseded.
        r.stats.errors += 1
        item.attempts += 1
        msg.failures += 1
        # The exponent is capped: a final retried for hours must not overflow the float.
        delay = min(self._backoff_max, self._backoff_base * 2.0 ** min(msg.failures - 1, 60))
        msg.not_before = now + delay
        if item.must:
            # A terminal state that keeps failing deserves a traceback in the log.
            log.warning(
                "final edit of %r in %r (v%d) failed, attempt %d; retrying in %.1fs",
                key,
                r.id,
                item.version,
                item.attempts,
                delay,
                exc_info=outcome,
            )
        else:
            # Non-final states are cheap to lose (a newer one follows); keep the log quiet.
            log.info("edit of %r in %r (v%d) failed: %r", key, r.id, item.version, outcome)
        if msg.pending is None and not item.must and item.attempts >= self._max_attempts:
            r.stats.dropped += 1
            log.warning("giving up on non-final edit of %r in %r (v%d)", key, r.id, item.version)
            return
        self._requeue(r, key, msg, item)

    def _requeue(
        self, r: _Room[RoomT, KeyT, StateT], key: KeyT, msg: _Message[StateT], item: _Item[StateT]
    ) -> None:
        """Put a refused state back, unless a newer one is already waiting (then re-send that one).

        The message goes to the front of the line: it was refused, not served, so it keeps its turn.
        """
        if msg.pending is not None:
            r.stats.skipped += 1
            msg.pending.must = msg.pending.must or item.must
        else:
            msg.pending = item
            r.order[key] = None
        r.order.move_to_end(key, last=False)

    def _forget(self, r: _Room[RoomT, KeyT, StateT], key: KeyT, msg: _Message[StateT]) -> None:
        """Drop a finished message, remembering its last version to recognise late stale submits."""
        r.messages.pop(key, None)
        if msg.last_version is not None:
            r.tombstones[key] = msg.last_version
            r.tombstones.move_to_end(key)
            while len(r.tombstones) > _TOMBSTONES_PER_ROOM:
                r.tombstones.popitem(last=False)

    async def _wait_event(self, event: asyncio.Event, delay: float) -> None:
        """Wait until ``event`` is set or ``delay`` s pass on the injected clock."""
        if event.is_set():
            return
        sleeper = asyncio.ensure_future(self._sleep(max(0.0, delay)))
        waker = asyncio.ensure_future(event.wait())
        try:
            await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            # Leave no helper task behind, whether we woke up or were cancelled.
            for t in (sleeper, waker):
                t.cancel()
            await asyncio.gather(sleeper, waker, return_exceptions=True)
