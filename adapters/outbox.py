"""One outbox per rate-limit scope: every outgoing chat call waits here for its turn, people first.

A chat platform limits the bot per *scope*: Synapse's ``rc_message`` is one leaky bucket for the bot's
account across all its rooms (burst 10, then 0.2 events/s by default); Discord limits each channel's
bucket and, above that, the bot globally. Every call the bot makes (a post, an edit, a pin or unpin, a
reaction, a reply) costs one event of its scope. The :class:`Outbox` of a scope hands out those events
one call at a time: a caller waits in :meth:`Outbox.slot` with a :class:`Priority` and a *lane* (the
room, for fairness between rooms), makes its one call inside the slot, and the slot records the
outcome.

Invariants (each has a test in ``tests/unit/test_outbox.py``):

* **Budget.** A token bucket (``rate`` events/s, ``burst``) models the server's limit; a call is
  granted only with a whole token, and every granted call spends one, whatever kind it is. A slot that
  is not used (:meth:`Slot.unused`) gives its token back.
* **People first.** The next token goes to the waiter of the highest class (lowest :class:`Priority`
  value). A ``reserve`` of tokens is kept for :data:`Priority.ANSWER`: other classes are granted only
  while more than ``reserve`` tokens are left, so a person's command is answered at once whenever the
  server allows one more event.
* **Cosmetics wait for a full half.** Outside their shared turns, pins and reactions are granted only
  while at least half the burst is left, so they never spend the tokens that the next new messages,
  status changes and edits need. When nothing else waits they may drain the burst, unless edits are
  paced (below): then the half is kept even so (four jobs submitted together: the burst goes to
  their posts and first edits, not to their pins).
* **No starvation.** While lower classes wait, every ``share``-th turn goes to the lower-class caller
  that has waited longest (but never ahead of a person's answer). With paced edits (below), while
  progress edits *starve* (they wait, and the budget is spent: every token goes as soon as it comes)
  that is every ``2 * share``-th turn: at 0.2 events/s each cosmetic costs an edit that people would
  see. Pins and reactions therefore still arrive while progress edits are always waiting, and they
  take at most one turn in ``share`` from the classes above them.
* **Fairness.** Within the same effective class, the lane (room) served longest ago goes first; within
  a lane, the oldest waiter (by ``since``: when the caller first asked, so a call that comes back
  after a 429 keeps its place). A caller that comes back after its call queues behind the others, so
  messages of one room are served round-robin.
* **Paced progress edits** (``pace``; Matrix). A progress edit's ``since`` is when its message went
  out of date. A fresh one may spend only a full bucket; the longer its message has waited, the
  deeper it may dig, down to the reserve's floor once it has waited one *round* (the progress edits
  waiting, divided by the rate: the time to refresh each once at the sustained rate). So the burst is
  not spent on refreshing messages a second old: it is kept for new messages and status changes, and
  spent gradually on the stalest messages, which are refreshed at about even intervals. A full bucket
  is always spent (its refill would be lost), so the whole allowance is still used.
* **One at a time on the refill.** Up to ``max_in_flight`` calls run at once while the burst lasts;
  on the refill (and after a 429 until the rate is measured), one at a time, so a wrong guess of the
  server's budget costs one 429, not several.
* **A 429 pauses only the scope.** :class:`RateLimited` from the call pauses this outbox for
  ``retry_after``; at its end the server allows one more event, and the bucket refills from there.
  Other scopes (other outboxes) never wait for it.
* **Use the whole allowance, learn the real rate.** It starts at ``start_rate`` and doubles after
  each burst's worth of calls that the server took while others waited with the bucket at its
  floor (slow start; paced, that starts once the savings are spent, so a lifted limit is found a
  little later). Two 429s bracket the events the server accepted between them: both mean "the
  server's bucket is full", so
  ``accepted / time between the two resume instants`` is the server's sustained rate. The outbox
  continues at that rate (never above ``rate``, never below ``min_rate``): it does not halve on every
  429, so it cannot collapse far below what the server allows. After ``probe_after`` seconds without
  a 429 it tries 20% more (an admin may have lifted the limit), up to ``rate``.
* **Nested scopes.** An outbox may have a ``parent`` (Discord: each channel's bucket inside the
  bot's global limit): a call granted by the child also waits for a turn of the parent, in the same
  class. A 429 marked ``is_global`` pauses the parent only; any other 429 pauses the child only.
* **Events around the outbox.** :meth:`Outbox.charge` takes from the bucket the events the server
  counted that did not go through a slot (on Synapse, the bot joining a room), so the bucket stays
  what the server has.
* **Headers.** :meth:`Outbox.observe` takes what the platform reported (Discord's
  ``X-RateLimit-Remaining`` / ``-Reset-After``): the bucket never holds more than ``remaining``, and
  with nothing remaining the scope pauses until the reset, which brings back ``refill`` events (one;
  a fixed window such as Discord's, its whole limit). :meth:`Outbox.announce` takes an announced limit
  (``X-RateLimit-Limit`` per window) as the scope's burst and rate.
* **Measured.** ``stats.waited`` is the time during which some caller waited for a turn, and
  ``stats.idle`` the time between such spells, each gap counted only until the bucket would be full
  again: the allowance used while something waited is ``sent / (burst + rate * (waited + idle))``,
  with the server's burst and rate (the benches print it).

Time is injectable (``clock``, ``sleep``) so the tests run on virtual time. Nothing here imports a chat
library or ``bot/``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from dataclasses import dataclass
from enum import IntEnum

__all__ = ["Outbox", "OutboxStats", "PermanentError", "Priority", "RateLimited", "Slot"]

log = logging.getLogger(__name__)

# Comparisons of instants tolerate float rounding, so a worker that slept "until the token is there"
# does not find 0.9999999 tokens and spin on micro-sleeps.
_EPS = 1e-9


class Priority(IntEnum):
    """The classes of outgoing calls, highest first (lower value = served first)."""

    #: An answer to a person: a command reply, a refusal, an interaction response.
    ANSWER = 0
    #: A status change on a progress message (paused, resumed, cancelled, completed, failed) and the
    #: completion reply.
    STATUS = 1
    #: A new progress message.
    NEW = 2
    #: A progress edit (latest wins per message, fair between messages).
    PROGRESS = 3
    #: Reactions, pins and unpins.
    COSMETIC = 4


class RateLimited(Exception):
    """The platform refused a call because of a rate limit; retry no sooner than ``retry_after`` s."""

    def __init__(self, retry_after: float, message: str = "", *, is_global: bool = False) -> None:
        """``retry_after`` in seconds; negative or NaN values are treated as 0. ``is_global``: the
        limit of the enclosing scope (a parent outbox) was hit, not this one's."""
        # A garbled header must not turn into a negative or NaN pause that breaks the arithmetic.
        self.retry_after: float = float(retry_after) if retry_after > 0 else 0.0
        self.is_global = is_global
        super().__init__(message or f"rate limited, retry after {self.retry_after:.3f}s")


class PermanentError(Exception):
    """A call that can never succeed (message deleted, forbidden, too large): do not retry it."""


@dataclass(slots=True)
class OutboxStats:
    """Counters of one scope, for tests, benches and logs."""

    #: Calls granted and made (accepted by the platform or not).
    granted: int = 0
    #: Calls the platform accepted.
    sent: int = 0
    #: Slots given back unused (the work was already done when the turn came).
    unused: int = 0
    #: 429 answers.
    rate_limited: int = 0
    #: Other failures of a granted call.
    failed: int = 0
    #: Granted calls by class.
    by_priority: dict[str, int] = dataclasses.field(default_factory=dict)
    #: Seconds during which at least one caller waited for a turn, and how many such spells.
    waited: float = 0.0
    waits: int = 0
    #: Seconds between two such spells, each counted up to the time the bucket takes to fill
    #: (``burst / rate``): the allowance that built up for the next spell. What the server allowed
    #: while something waited is about ``burst + rate * (waited + idle)``.
    idle: float = 0.0


@dataclass(slots=True, eq=False)
class _Waiter:
    base: int
    lane: Hashable
    since: float
    order: int
    future: asyncio.Future[None]
    #: The caller's class *now*: a waiting progress edit becomes a status change when the job pauses.
    current: Callable[[], int] | None = None

    @property
    def priority(self) -> int:
        """The class this waiter competes in at this moment."""
        if self.current is None:
            return self.base
        try:
            return int(self.current())
        except Exception:
            return self.base


class Slot:
    """One granted event: make exactly one call inside it, or call :meth:`unused`."""

    def __init__(self, outbox: Outbox, priority: int) -> None:
        self._outbox = outbox
        self.priority = priority
        self._unused = False

    def unused(self) -> None:
        """The call is not needed after all: give the token back."""
        self._unused = True


class Outbox:
    """The outbox of one rate-limit scope (see the module docstring for the invariants)."""

    def __init__(
        self,
        name: str,
        *,
        rate: float,
        burst: float,
        start_rate: float | None = None,
        reserve: int = 1,
        share: int = 6,
        max_in_flight: int = 4,
        min_rate: float = 0.02,
        probe_after: float = 300.0,
        pace: bool = False,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        parent: Outbox | None = None,
    ) -> None:
        """A scope allowing at most ``rate`` events/s after a ``burst``; ``reserve`` tokens are kept for
        people. ``start_rate`` (default ``rate``) is the first guess, doubled while the server takes it."""
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError("rate must be a positive, finite number of events per second")
        if not (burst >= 1 and math.isfinite(burst)):
            raise ValueError("burst must be at least 1")
        if max_in_flight < 1 or share < 2 or not 0 < min_rate <= rate or probe_after <= 0:
            raise ValueError("need max_in_flight >= 1, share >= 2, 0 < min_rate <= rate, probe_after > 0")
        self.name = name
        #: The enclosing scope every call of this one also waits for (None: none).
        self.parent = parent
        self.max_rate = float(rate)
        #: The rate in use: ``start_rate``, doubled (slow start) until a 429, then what the server showed.
        self.rate = min(self.max_rate, float(start_rate or rate))
        #: Calls accepted at the current rate while callers were waiting for tokens (slow start).
        self._saturated_ok = 0
        self.burst = float(burst)
        # A reserve of the whole burst would starve everyone but people.
        self.reserve = max(0, min(int(reserve), int(burst) - 1))
        self.share = share
        #: Turns given by strict priority while lower classes waited, since the last shared turn.
        self._strict_turns = 0
        self.max_in_flight = max_in_flight
        self.min_rate = float(min_rate)
        self.probe_after = probe_after
        #: Progress edits spend the tokens above the reserve by how stale their message is (see _pace_need).
        self.pace = pace
        #: Progress edits waiting at the last progress grant, the granted one included (see _round).
        self._last_round = 0
        self._clock = clock
        self._sleep = sleep
        self.tokens = float(burst)
        self._bucket_time = clock()  # tokens were exact at this instant (in the future after a 429)
        self.paused_until = -math.inf
        self._waiters: list[_Waiter] = []
        self._lane_served: dict[Hashable, int] = {}
        self._order = itertools.count()
        self._in_flight = 0
        self._wake = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._closed = False
        # Rate learning: the resume instant of the last 429, and calls accepted since it.
        self._last_full: float | None = None
        self._accepted_since_full = 0
        self._last_probe = -math.inf
        #: A rate was measured: until then, after a first 429, the bucket is a guess (one call at a time).
        self._learned = False
        self.stats = OutboxStats()
        #: Callers waiting for a turn now, and since when one has been (for ``stats.waited``).
        self._callers_waiting = 0
        self._wait_since = 0.0
        self._wait_ended: float | None = None

    # ------------------------------------------------------------------ public API
    @contextlib.asynccontextmanager
    async def slot(
        self,
        priority: Priority | int,
        lane: Hashable = None,
        *,
        current: Callable[[], int] | None = None,
        since: float | None = None,
        nested: bool = False,
    ) -> AsyncIterator[Slot]:
        """Wait for this scope's next event for a call of class ``priority`` in ``lane``.

        ``current`` (optional) tells the caller's class at any moment while it waits, so a waiting
        call whose content became more urgent (latest wins) is served as what it is now.
        ``since`` (optional, on this outbox's clock, see :meth:`now`): when the caller first asked for
        this work, so a call that comes back after a 429 keeps its place, and a progress edit is paced
        by how long its message has been out of date; default: now.
        Inside the ``async with``, make one call. Raising :class:`RateLimited` from it pauses the
        scope (and propagates); any other exception counts as a failure (and propagates).
        ``nested``: this is the parent's turn for a call a child scope granted (only a global 429
        pauses this scope then).
        """
        if self._closed:
            raise RuntimeError(f"outbox {self.name} is closed")
        now = self._clock()
        waiter = _Waiter(
            int(priority),
            lane,
            now if since is None else min(since, now),
            next(self._order),
            asyncio.get_running_loop().create_future(),
            current,
        )
        self._waiters.append(waiter)
        self._ensure_worker()
        self._wake.set()
        self._count_waiting(1)
        try:
            await waiter.future
        except BaseException:
            self._count_waiting(-1)
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            elif waiter.future.done() and not waiter.future.cancelled():
                # Granted just as we were cancelled: give the event back.
                self._in_flight -= 1
                self.tokens += 1
                self._wake.set()
            raise
        self._count_waiting(-1)
        slot = Slot(self, waiter.priority)
        try:
            if self.parent is None:
                yield slot
            else:
                async with self.parent.slot(slot.priority, lane, nested=True) as outer:
                    yield slot
                    if slot._unused:
                        outer.unused()
        except RateLimited as exc:
            # A global 429 pauses the outermost scope; any other, the scope whose bucket it is.
            if exc.is_global if nested else not (exc.is_global and self.parent is not None):
                self._rate_limited(exc.retry_after)
            raise
        except BaseException:
            self.stats.failed += 1
            raise
        else:
            if slot._unused:
                self.stats.unused += 1
                self.tokens = min(self.burst, self.tokens + 1)
            else:
                self.stats.sent += 1
                self._accepted_since_full += 1
                self._slow_start()
        finally:
            self._in_flight -= 1
            self._wake.set()

    def observe(self, remaining: int, reset_after: float, *, pace: bool = False, refill: float = 1.0) -> None:
        """Adapt to what the platform reported for this scope (rate-limit headers of a response).

        The bucket never holds more than ``remaining``; with nothing remaining the scope pauses until
        the reset, when it holds ``refill`` events (a leaky bucket lets one more through; Discord's fixed
        window comes back whole, ``X-RateLimit-Limit``). ``pace`` spreads what remains evenly until the
        reset instead of spending it in a burst (Discord's window is fixed: a burst leaves the channel
        frozen until it resets).
        """
        now = self._clock()
        self._refill(now)
        wait = float(reset_after) if reset_after > 0 else 0.0
        if remaining <= 0:
            self.paused_until = max(self.paused_until, now + wait)
            self.tokens = 0.0
            self._bucket_time = max(self._bucket_time, self.paused_until)
            self.tokens = max(1.0, min(self.burst, float(refill)))
        elif pace:
            self.paused_until = max(self.paused_until, now + wait / (remaining + 1))
            self.tokens = min(self.tokens, float(remaining))
        else:
            self.tokens = min(self.tokens, float(remaining))
        self._wake.set()

    def announce(self, limit: int, window: float) -> None:
        """The platform announced this scope's bucket: ``limit`` events per ``window`` s (Discord's
        ``X-RateLimit-Limit``). That is the burst and the ceiling; the rate in use follows it, unless
        429s showed a lower sustained rate."""
        if limit < 1 or not (window > 0 and math.isfinite(window)):
            return
        rate = limit / window
        self.burst = float(limit)
        self.max_rate = rate
        self.min_rate = min(self.min_rate, rate)
        self.rate = min(self.rate, rate) if self._learned else rate
        self.tokens = min(self.tokens, self.burst)
        self._wake.set()

    def charge(self, events: int = 1) -> None:
        """``events`` the server counted against this scope although they went around the outbox (the
        bot joining a room is an event of its account on Synapse): take them from the bucket, so it
        stays what the server has and the next calls do not run into a 429."""
        self._refill(self._clock())
        self.tokens = max(0.0, self.tokens - events)

    def now(self) -> float:
        """This scope's clock (the time base of ``since`` in :meth:`slot`)."""
        return self._clock()

    def nudge(self) -> None:
        """A waiter's class may have changed (its content did): decide again now."""
        self._wake.set()

    @property
    def waiting(self) -> int:
        """Callers waiting for an event."""
        return len(self._waiters)

    def snapshot(self) -> OutboxStats:
        """A copy of the counters."""
        return dataclasses.replace(self.stats, by_priority=dict(self.stats.by_priority))

    async def aclose(self) -> None:
        """Stop the worker; waiters get ``RuntimeError`` (callers are being cancelled anyway)."""
        self._closed = True
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)
        for w in self._waiters:
            if not w.future.done():
                w.future.set_exception(RuntimeError(f"outbox {self.name} closed"))
        self._waiters.clear()

    # ------------------------------------------------------------------ internals
    def _ensure_worker(self) -> None:
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._run(), name=f"outbox:{self.name}")

    def _count_waiting(self, delta: int) -> None:
        """Keep ``stats.waited``: the time during which at least one caller waited for a turn."""
        now = self._clock()
        if delta > 0 and self._callers_waiting == 0:
            self._wait_since = now
            self.stats.waits += 1
            if self._wait_ended is not None:
                self.stats.idle += min(now - self._wait_ended, self.burst / self.rate)
        self._callers_waiting += delta
        if delta < 0 and self._callers_waiting == 0:
            self.stats.waited += now - self._wait_since
            self._wait_ended = now

    def _refill(self, now: float) -> None:
        if now > self._bucket_time:
            self.tokens = min(self.burst, self.tokens + (now - self._bucket_time) * self.rate)
            self._bucket_time = now

    def _rate_limited(self, retry_after: float) -> None:
        now = self._clock()
        self.stats.rate_limited += 1
        self._refill(now)
        resume = now + retry_after
        # The server's bucket is full now; at ``resume`` it takes exactly one more event.
        # Calls in flight together may all be refused at once: those say nothing new about the rate.
        if (
            self._accepted_since_full
            and self._last_full is not None
            and resume - self._last_full > 1 / self.max_rate
        ):
            # A little under what the server showed: timing jitter must not turn into 429s.
            shown = 0.97 * self._accepted_since_full / (resume - self._last_full)
            new = min(self.max_rate, max(self.min_rate, shown))
            if abs(new - self.rate) > 1e-6:
                log.info("outbox %s: the server allows about %.3f events/s; using that", self.name, new)
            self.rate = new
            self._learned = True
        self._last_full = resume
        self._accepted_since_full = 0
        self.paused_until = max(self.paused_until, resume)
        self.tokens = 1.0
        self._bucket_time = max(self._bucket_time, self.paused_until)
        log.info("outbox %s: rate limited; paused for %.2fs", self.name, retry_after)

    def _slow_start(self) -> None:
        """A burst's worth of calls at the current rate, all accepted while others waited: the server
        allows more than we guessed. Double (until the first 429; from then on, the measured rate)."""
        if self._last_full is not None or self.rate >= self.max_rate:
            return
        if self._waiters and self.tokens < 1 + self.reserve:
            self._saturated_ok += 1
        if self._saturated_ok >= self.burst:
            self._saturated_ok = 0
            self.rate = min(self.max_rate, self.rate * 2)
            log.info("outbox %s: no 429 at this pace; trying %.3f events/s", self.name, self.rate)

    def _maybe_probe(self, now: float) -> None:
        """Busy and no 429 for a long time below the ceiling: the limit may have been lifted, try more."""
        if self.rate >= self.max_rate or self._last_full is None:
            return
        if now - self._last_full > self.probe_after and now - self._last_probe > self.probe_after:
            self._last_probe = now
            self.rate = min(self.max_rate, self.rate * 1.2)
            log.info("outbox %s: no 429 for a while; trying %.3f events/s", self.name, self.rate)

    def _pick(self, now: float) -> tuple[_Waiter, int] | None:
        """The highest class waiting, within it the lane served longest ago; but every ``share``-th
        turn, while lower classes wait too, the lower-class waiter that has waited longest.

        A person's answer is never passed over for the share. Paced progress edits: those due now
        (:meth:`_pace_need`), else the stalest, which is due first. Also returns how to change the
        count of strict turns when this waiter is granted.
        """
        if not self._waiters:
            return None
        prio = {id(w): w.priority for w in self._waiters}
        top = min(prio.values())
        lower = [w for w in self._waiters if prio[id(w)] != top]
        if top != Priority.ANSWER and lower and self._strict_turns >= self._share() - 1:
            # The shared turn (the counter restarts when it is granted).
            return min(lower, key=lambda w: (w.since, w.order)), -self._strict_turns
        pool = [w for w in self._waiters if prio[id(w)] == top]
        if top == Priority.PROGRESS and self.pace:
            self._refill(now)
            n = self._round(len(pool))
            due = [w for w in pool if self._pace_need(now - w.since, n) <= self.tokens + _EPS]
            pool = due or [min(pool, key=lambda w: (w.since, w.order))]
        best = min(pool, key=lambda w: (self._lane_served.get(w.lane, -1), w.since, w.order))
        return best, 1 if lower else 0

    def _share(self) -> int:
        """One turn in this many goes to the lower classes: ``share``, or, paced, twice that while
        progress edits starve (they wait, and the budget is spent: every token goes as it comes)."""
        if not self.pace:
            return self.share
        if self.tokens < 2.0 + self.reserve and any(w.priority == Priority.PROGRESS for w in self._waiters):
            return 2 * self.share
        return self.share

    def _round(self, waiting: int) -> int:
        """The messages one round of paced edits refreshes: those waiting, or as many as waited at the
        last progress grant (the message just served comes back with its next state)."""
        return max(waiting, self._last_round)

    def _pace_need(self, age: float, waiting: int) -> float:
        """The tokens a paced progress edit needs when its message has been out of date for ``age`` s
        and ``waiting`` progress edits wait: all of the burst when the message is fresh, falling
        linearly to the reserve's floor once it has waited one *round* (``waiting / rate``: the time
        it takes to refresh every waiting message once at the sustained rate)."""
        floor = 1.0 + self.reserve
        return max(floor, self.burst - (self.burst - floor) * age * self.rate / max(1, waiting))

    def _wait_for_budget(self, w: _Waiter, now: float, shared: bool = False) -> float:
        """Seconds until ``w`` may be granted (0 = now)."""
        if self.paused_until > now + _EPS:
            return self.paused_until - now
        self._refill(now)
        need = 1.0 if w.priority == Priority.ANSWER else 1.0 + self.reserve
        if w.priority >= Priority.COSMETIC and not shared:
            # Cosmetics do not drain the burst: the second half is kept for the edits to come.
            need = max(need, self.burst / 2)
        start = max(now, self._bucket_time)
        if w.priority == Priority.PROGRESS and self.pace and not shared:
            # The need falls as the message ages while the bucket fills: they meet after ``x`` seconds.
            waiting = self._round(sum(1 for x in self._waiters if x.priority == Priority.PROGRESS))
            # The need falls by ``falls`` tokens a second as the message ages.
            falls = (self.burst - 1.0 - self.reserve) * self.rate / max(1, waiting)
            pace_need = self._pace_need(start - w.since, waiting)
            if self.tokens >= max(need, pace_need) - _EPS:
                return start - now
            meet = (pace_need - self.tokens) / (self.rate + falls)
            return (start - now) + max(0.0, meet, (need - self.tokens) / self.rate)
        if self.tokens >= need - _EPS:
            return 0.0
        return (start - now) + (need - self.tokens) / self.rate

    async def _run(self) -> None:
        while not self._closed:
            self._wake.clear()
            self._waiters = [w for w in self._waiters if not w.future.done()]
            if not self._waiters:
                await self._wake.wait()
                continue
            now = self._clock()
            self._refill(now)
            # Several calls at once only while the burst lasts; on the refill, one at a time. So when
            # the server's bucket is smaller than we think, one call learns it, not max_in_flight calls.
            learning = self._last_full is not None and not self._learned
            limit = self.max_in_flight if self.tokens >= 2 and not learning else 1
            if self._in_flight >= limit:
                await self._wake.wait()
                continue
            picked = self._pick(now)
            assert picked is not None
            w, turns = picked
            # Unpaced, cosmetics may drain the burst when nothing else waits; paced, the burst is kept
            # for the posts and first edits that follow (see the module docstring).
            alone = not self.pace and all(x.priority >= Priority.COSMETIC for x in self._waiters)
            wait = self._wait_for_budget(w, now, shared=turns < 0 or alone)
            if wait > 0:
                # A new waiter (maybe a person) or a finished call may change the decision: wake early.
                await self._wait_or_wake(wait)
                continue
            self._maybe_probe(now)
            self._strict_turns += turns
            self._waiters.remove(w)
            self.tokens -= 1
            self._in_flight += 1
            # A turn number, not a time: several turns at one instant (a burst) still alternate lanes.
            self._lane_served[w.lane] = self.stats.granted
            if w.priority == Priority.PROGRESS:
                self._last_round = 1 + sum(1 for x in self._waiters if x.priority == Priority.PROGRESS)
            self.stats.granted += 1
            name = Priority(min(max(w.priority, 0), 4)).name.lower()
            self.stats.by_priority[name] = self.stats.by_priority.get(name, 0) + 1
            w.future.set_result(None)

    async def _wait_or_wake(self, delay: float) -> None:
        sleeper = asyncio.ensure_future(self._sleep(max(0.0, delay)))
        waker = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (sleeper, waker):
                t.cancel()
            await asyncio.gather(sleeper, waker, return_exceptions=True)
