"""Unit tests of the per-room edit scheduler, on virtual time.

A :class:`VirtualClock` stands in for ``time.monotonic`` and ``asyncio.sleep``: sleeping registers a
wake-up at a virtual instant, and the test moves time forward explicitly, only once every runnable
task has settled. So the tests are deterministic, and a "minute" of rate-limited chat takes
milliseconds. A :class:`FakePlatform` plays the chat server: it records every edit attempt, checks
that one message never has two edits in flight, and answers from a script (ok, transient error,
429 raised or returned, permanent error).
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.edit_scheduler import EditScheduler, PermanentEditError, RateLimited
from tests.unit.virtual_clock import VirtualClock

# ---------------------------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class St:
    """A rendered state; it carries its version so the platform can record what was shown."""

    version: int
    final: bool = False


@dataclass(frozen=True)
class Call:
    """One edit attempt as the platform saw it."""

    start: float
    end: float
    room: str
    key: str
    version: int
    outcome: str  # "ok", "err", "perm", "rl:<s>" (raised) or "rlret:<s>" (returned)
    # Positions of the start and the answer in the platform's event order: at one virtual instant,
    # they tell an edit begun before a 429 was answered from one begun after it.
    start_seq: int = 0
    end_seq: int = 0

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"

    @property
    def retry_after(self) -> float | None:
        return float(self.outcome.split(":")[1]) if self.outcome.startswith("rl") else None


class FakePlatform:
    """Plays the chat server: records edit attempts and answers from a script."""

    def __init__(self, clock: VirtualClock, latency: float = 0.05) -> None:
        self.clock = clock
        self.latency = latency
        self.calls: list[Call] = []
        self.script: deque[str] = deque()  # outcomes for the next attempts, any room; then "ok"
        self.room_script: dict[str, deque[str]] = {}
        self.on_ok: Callable[[str, str, St], None] | None = None
        self._inflight: set[tuple[str, str]] = set()
        self._seq = itertools.count()

    async def send(self, room: str, key: str, state: St) -> RateLimited | None:
        assert (room, key) not in self._inflight, "two edits of one message in flight"
        self._inflight.add((room, key))
        start, start_seq = self.clock.now, next(self._seq)
        try:
            await self.clock.sleep(self.latency)
        finally:
            self._inflight.discard((room, key))
        rs = self.room_script.get(room)
        outcome = rs.popleft() if rs else self.script.popleft() if self.script else "ok"
        self.calls.append(
            Call(start, self.clock.now, room, key, state.version, outcome, start_seq, next(self._seq))
        )
        if outcome == "ok":
            if self.on_ok is not None:
                self.on_ok(room, key, state)
            return None
        if outcome == "err":
            raise ConnectionError("transient")
        if outcome == "perm":
            raise PermanentEditError("message deleted")
        kind, _, secs = outcome.partition(":")
        if kind == "rl":
            raise RateLimited(float(secs))
        assert kind == "rlret", outcome
        return RateLimited(float(secs))

    def delivered(self, room: str, key: str) -> list[int]:
        """Versions the platform accepted for one message, in order."""
        return [c.version for c in self.calls if c.ok and c.room == room and c.key == key]

    def starts(self, room: str) -> list[float]:
        return [c.start for c in self.calls if c.room == room]


Scheduler = EditScheduler[str, str, St]


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock()


@pytest.fixture
def platform(clock: VirtualClock) -> FakePlatform:
    return FakePlatform(clock)


@pytest.fixture
def make(clock: VirtualClock, platform: FakePlatform) -> Iterator[Callable[..., Scheduler]]:
    """Build schedulers on the virtual clock; teardown checks they were closed and left no task."""
    made: list[Scheduler] = []

    def factory(**kw: float) -> Scheduler:
        s: Scheduler = EditScheduler(platform.send, clock=clock, sleep=clock.sleep, **kw)  # type: ignore[arg-type]
        made.append(s)
        return s

    yield factory
    for s in made:
        assert s.closed, "test forgot to close its scheduler"


def other_tasks() -> set[asyncio.Task[object]]:
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}


def strictly_increasing(xs: list[int]) -> bool:
    return all(a < b for a, b in itertools.pairwise(xs))


# ---------------------------------------------------------------------------------------------- tests


async def test_latest_wins_for_a_burst(clock: VirtualClock, platform: FakePlatform, make) -> None:
    s = make()
    for v in range(1, 101):
        assert s.submit("room", "job", St(v, v == 100), version=v, final=v == 100)
    await clock.run_until(lambda: s.pending_count() == 0)
    assert platform.delivered("room", "job") == [100]
    st_ = s.stats("room")
    assert (st_.submitted, st_.sent, st_.skipped) == (100, 1, 99)
    await s.close()


async def test_latest_wins_under_a_slow_budget(clock: VirtualClock, platform: FakePlatform, make) -> None:
    s = make(rate=1.0, burst=1)
    for v in range(1, 101):  # 20 events/s for 5 s against 1 edit/s
        s.submit("room", "job", St(v), version=v, final=v == 100)
        await clock.advance(0.05)
    await clock.run_until(lambda: s.pending_count() == 0)
    sent = platform.delivered("room", "job")
    assert len(sent) <= 7
    assert sent[-1] == 100
    assert strictly_increasing(sent)
    assert s.stats("room").sent + s.stats("room").skipped == 100
    await s.close()


async def test_stale_versions_are_ignored(clock: VirtualClock, platform: FakePlatform, make) -> None:
    s = make()
    assert s.submit("room", "job", St(5), version=5)
    assert not s.submit("room", "job", St(3), version=3)  # older than queued
    assert not s.submit("room", "job", St(5), version=5)  # duplicate
    await clock.run_until(lambda: s.pending_count() == 0)
    assert not s.submit("room", "job", St(4), version=4)  # older than sent
    assert s.submit("room", "job", St(6, True), version=6, final=True)
    await clock.run_until(lambda: s.pending_count() == 0)
    # The message is finished and forgotten, but a late stale state is still recognised.
    assert not s.submit("room", "job", St(2), version=2)
    await clock.settle()
    assert platform.delivered("room", "job") == [5, 6]
    assert s.stats("room").ignored == 4
    await s.close()


async def test_failed_edit_is_not_resent_after_a_newer_state(
    clock: VirtualClock, platform: FakePlatform, make
) -> None:
    platform.latency = 1.0
    platform.script.append("err")
    s = make()
    s.submit("room", "job", St(1), version=1)
    await clock.advance(0.5)  # v1 is in flight
    s.submit("room", "job", St(2), version=2)
    await clock.run_until(lambda: s.pending_count() == 0)
    assert [(c.version, c.outcome) for c in platform.calls] == [(1, "err"), (2, "ok")]
    assert s.stats("room").skipped == 1
    await s.close()


async def test_final_is_delivered_through_errors_and_a_rate_limit(
    clock: VirtualClock, platform: FakePlatform, make
) -> None:
    platform.latency = 0.01
    platform.script.extend(["err", "err", "err", "rl:2.0", "err"])
    s = make(backoff_base=0.5)
    s.submit("room", "job", St(1, True), version=1, final=True)
    await clock.run_until(lambda: s.pending_count() == 0)
    assert platform.delivered("room", "job") == [1]
    assert [c.outcome for c in platform.calls] == ["err", "err", "err", "rl:2.0", "err", "ok"]
    starts = [c.start for c in platform.calls]
    ends = [c.end for c in platform.calls]
    # Exponential backoff after each error (0.5, 1, 2 s); the 429's retry_after; then backoff 4 s
    # (the fourth consecutive error of this message: a 429 neither counts nor resets the streak).
    for i, wait in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 2.0), (5, 4.0)]:
        assert starts[i] >= ends[i - 1] + wait - 1e-9
    st_ = s.stats("room")
    assert (st_.errors, st_.rate_limited, st_.sent, st_.dropped) == (4, 1, 1, 0)
    await s.close()


async def test_non_final_state_is_dropped_after_max_attempts(
    clock: VirtualClock, platform: FakePlatform, make
) -> None:
    platform.script.extend(["err"] * 10)
    s = make(max_attempts=3)
    s.submit("room", "job", St(1), version=1)
    await clock.run_until(lambda: s.pending_count() == 0)
    assert len(platform.calls) == 3
    assert s.stats("room").dropped == 1
    await s.close()


async def test_permanent_error_drops_even_a_final(clock: VirtualClock, platform: FakePlatform, make) -> None:
    platform.script.append("perm")
    s = make()
    s.submit("room", "job", St(1, True), version=1, final=True)
    await clock.run_until(lambda: s.pending_count() == 0)
    assert len(platform.calls) == 1
    assert s.stats("room").dropped == 1
    await s.close()


@pytest.mark.parametrize("how", ["rl", "rlret"])
async def test_retry_after_is_honoured_and_the_newest_state_is_resent(
    clock: VirtualClock, platform: FakePlatform, make, how: str
) -> None:
    platform.latency = 0.01
    platform.script.append(f"{how}:5.0")
    s = make(rate=100.0, burst=100)
    s.submit("room", "a", St(1), version=1)
    await clock.advance(0.02)  # v1 was refused at t=0.01
    refused_at = platform.calls[0].end
    for v in range(2, 11):
        s.submit("room", "a", St(v), version=v)
        s.submit("room", "b", St(v), version=v)
        await clock.advance(0.4)
    await clock.run_until(lambda: s.pending_count() == 0)
    later = platform.calls[1:]
    assert later, "nothing was sent after the pause"
    assert min(c.start for c in later) >= refused_at + 5.0 - 1e-9
    assert platform.delivered("room", "a") == [10]  # the refused v1 is never re-sent
    assert platform.delivered("room", "b") == [10]
    assert s.stats("room").rate_limited == 1
    await s.close()


async def test_rooms_are_independent(clock: VirtualClock, platform: FakePlatform, make) -> None:
    platform.room_script["slow"] = deque(["rl:30"])
    s = make(rate=2.0, burst=2)
    for v in range(1, 21):
        s.submit("slow", "job", St(v), version=v)
        s.submit("fast", "job", St(v), version=v)
        await clock.advance(0.5)
    assert clock.now == pytest.approx(10.0)
    # The fast room kept editing during the slow room's 30 s pause...
    assert len(platform.delivered("fast", "job")) >= 10
    assert platform.starts("slow") == [0.0]
    await clock.run_until(lambda: s.pending_count() == 0)
    # ...and the slow room resumed with its newest state once the pause was over.
    assert platform.delivered("slow", "job") == [20]
    assert platform.starts("slow")[1] >= 30.0
    await s.close()


async def test_fairness_between_busy_messages(clock: VirtualClock, platform: FakePlatform, make) -> None:
    s = make(rate=1.0, burst=1)
    keys = [f"job{i}" for i in range(10)]
    v = 0
    for _ in range(600):  # each of 10 jobs reports every 0.1 s for 60 s, against 1 edit/s
        v += 1
        for k in keys:
            s.submit("room", k, St(v), version=v)
        await clock.advance(0.1)
    for k in keys:
        times = [c.start for c in platform.calls if c.key == k and c.ok]
        assert len(times) >= 5, f"{k} starved"
        assert times[0] <= 10.5
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert max(gaps) <= 10.5, f"{k} waited {max(gaps):.1f}s"
        assert strictly_increasing(platform.delivered("room", k))
    # The budget held: never more than burst + rate * window edits in any 10 s window.
    starts = sorted(c.start for c in platform.calls)
    for i, t in enumerate(starts):
        assert sum(1 for u in starts[i:] if u < t + 10.0) <= 11
    await s.close()


async def test_final_states_jump_the_line(clock: VirtualClock, platform: FakePlatform, make) -> None:
    s = make(rate=1.0, burst=1)
    for i in range(10):
        s.submit("room", f"job{i}", St(1), version=1)
    await clock.advance(2.5)  # job0..job2 have had their edits
    s.submit("room", "job9", St(2, True), version=2, final=True)
    await clock.advance(1.0)
    assert platform.calls[-1].key == "job9"
    assert platform.calls[-1].version == 2
    await clock.run_until(lambda: s.pending_count() == 0)
    await s.close()


async def test_backlog_is_bounded_by_messages(clock: VirtualClock, platform: FakePlatform, make) -> None:
    platform.script.append("rl:1000")  # the room is stuck for a long time
    s = make()
    s.submit("room", "job0", St(0), version=0)
    await clock.advance(0.1)
    for v in range(1, 101):
        for i in range(50):
            s.submit("room", f"job{i}", St(v), version=v)
        await clock.advance(0.5)
        assert s.pending_count() <= 50
        assert s.pending_count("room") == s.pending_count() <= 50
    st_ = s.stats("room")
    # Everything submitted was either sent, or superseded, or is one of <= 50 pending states.
    assert st_.submitted - st_.sent - st_.skipped <= 50
    assert s.pending_count("elsewhere") == 0
    await clock.run_until(lambda: s.pending_count() == 0)
    assert all(platform.delivered("room", f"job{i}") == [100] for i in range(1, 50))
    await s.close()


async def test_update_budget_adapts_before_a_429(clock: VirtualClock, platform: FakePlatform, make) -> None:
    s = make(rate=10.0, burst=5)
    headers = deque([(1, 10.0), (0, 10.0)])  # (remaining, reset_after) as Discord would report

    def on_ok(room: str, key: str, state: St) -> None:
        remaining, reset_after = headers.popleft() if headers else (5, 1.0)
        s.update_budget(room, remaining, reset_after)

    platform.on_ok = on_ok
    for v in range(1, 4):
        s.submit("room", f"job{v}", St(v), version=v)
    await clock.run_until(lambda: s.pending_count() == 0)
    starts = platform.starts("room")
    assert starts[1] < 0.1  # one edit was left in the window: sent at once
    assert starts[2] >= platform.calls[1].end + 10.0 - 1e-9  # then none until the reset
    assert s.stats("room").rate_limited == 0
    await s.close()


async def test_max_in_flight_overlaps_different_messages(
    clock: VirtualClock, platform: FakePlatform, make
) -> None:
    platform.latency = 1.0
    s = make(rate=100.0, burst=100, max_in_flight=2)
    for i in range(4):
        s.submit("room", f"job{i}", St(1), version=1)
    await clock.advance(0.5)
    assert s.pending_count() == 4
    await clock.run_until(lambda: s.pending_count() == 0)
    assert sorted(c.start for c in platform.calls) == [0.0, 0.0, 1.0, 1.0]
    await s.close()


async def test_workers_exit_when_idle_and_close_leaves_no_tasks(
    clock: VirtualClock, platform: FakePlatform, make
) -> None:
    s = make()
    s.submit("room", "job", St(1), version=1)
    await clock.run_until(lambda: s.pending_count() == 0)
    await clock.settle()
    assert not other_tasks(), "an idle scheduler keeps no task"

    platform.room_script["hung"] = deque(["ok"])
    platform.room_script["paused"] = deque(["rl:100"])
    platform.room_script["failing"] = deque(["err"] * 100)
    s.submit("paused", "job", St(1, True), version=1, final=True)
    s.submit("failing", "job", St(1, True), version=1, final=True)
    await clock.advance(1.0)
    platform.latency = 1e9
    s.submit("hung", "job", St(1), version=1)
    await clock.advance(1.0)
    assert other_tasks()
    await s.close()
    assert not other_tasks()
    assert s.closed
    assert not s.submit("room", "job", St(2), version=2)
    assert s.pending_count() == 0
    await s.close()  # idempotent


async def test_aclose_drains_or_gives_up(clock: VirtualClock, platform: FakePlatform, make) -> None:
    s = make()
    s.submit("room", "job", St(1, True), version=1, final=True)
    task = asyncio.ensure_future(s.aclose(drain_timeout=10.0))
    await clock.run_until(task.done)
    assert task.result() is True
    assert platform.delivered("room", "job") == [1]

    platform.script.append("rl:100")
    s2 = make()
    s2.submit("room", "job", St(1, True), version=1, final=True)
    t0 = clock.now
    task = asyncio.ensure_future(s2.aclose(drain_timeout=5.0))
    await clock.run_until(task.done)
    assert task.result() is False
    assert clock.now == pytest.approx(t0 + 5.0)
    assert not other_tasks()


async def test_flush_times_out_on_virtual_time(clock: VirtualClock, platform: FakePlatform, make) -> None:
    platform.script.append("rl:60")
    s = make()
    s.submit("room", "job", St(1), version=1)
    flushed = asyncio.ensure_future(s.flush(timeout=5.0))
    await clock.run_until(flushed.done)
    assert flushed.result() is False
    assert clock.now == pytest.approx(5.0)
    flushed = asyncio.ensure_future(s.flush())
    await clock.run_until(flushed.done)
    assert flushed.result() is True
    assert clock.now >= 60.0
    await s.close()


def test_invalid_configuration_is_refused() -> None:
    async def send(room: str, key: str, state: object) -> None:
        return None

    for kw in ({"rate": 0}, {"burst": 0.5}, {"max_in_flight": 0}, {"backoff_base": 0}, {"max_attempts": 0}):
        with pytest.raises(ValueError):
            EditScheduler(send, **kw)  # type: ignore[arg-type]
    assert RateLimited(float("nan")).retry_after == 0.0
    assert RateLimited(-3).retry_after == 0.0


# ---------------------------------------------------------------------------------------------- property

ROOMS = ["r0", "r1"]
KEYS = ["a", "b", "c"]
_submit = st.tuples(
    st.just("submit"), st.sampled_from(ROOMS), st.sampled_from(KEYS), st.integers(-2, 3), st.booleans()
)
_advance = st.tuples(st.just("advance"), st.floats(0.0, 3.0, allow_nan=False))
_outcome = st.sampled_from(["ok", "ok", "ok", "err", "err", "perm", "rl:0.7", "rl:3", "rlret:1.5"])


async def _scenario(
    ops: list[tuple[object, ...]], outcomes: list[str], max_in_flight: int, latency: float
) -> None:
    clock = VirtualClock()
    platform = FakePlatform(clock, latency=latency)
    platform.script.extend(outcomes)
    s: Scheduler = EditScheduler(
        platform.send, rate=2.0, burst=3, max_in_flight=max_in_flight, clock=clock, sleep=clock.sleep
    )
    maxv: dict[tuple[str, str], int] = {}
    accepted: dict[tuple[str, str], set[int]] = {}
    for op in ops:
        if op[0] == "advance":
            await clock.advance(float(op[1]))  # type: ignore[arg-type]
            continue
        _, room, key, delta, final = op
        assert isinstance(room, str) and isinstance(key, str) and isinstance(delta, int)
        mk = (room, key)
        version = maxv.get(mk, 0) + delta
        expect = mk not in maxv or version > maxv[mk]
        assert s.submit(room, key, St(version, bool(final)), version=version, final=bool(final)) is expect
        if expect:
            maxv[mk] = version
            accepted.setdefault(mk, set()).add(version)
        assert s.pending_count() <= len(maxv)
    finals = {}
    for (room, key), v in maxv.items():
        finals[room, key] = v + 1
        accepted[room, key].add(v + 1)
        assert s.submit(room, key, St(v + 1, True), version=v + 1, final=True)
    await clock.run_until(lambda: s.pending_count() == 0)

    for mk, final_v in finals.items():
        sent = platform.delivered(*mk)
        assert strictly_increasing(sent), (mk, sent)
        assert set(sent) <= accepted[mk]
        # Only a PermanentEditError ("message deleted") may stop a final state from arriving.
        refused_for_good = any(
            c.outcome == "perm" and (c.room, c.key) == mk and c.version == final_v for c in platform.calls
        )
        assert sent[-1:] == [final_v] or refused_for_good, (mk, sent, final_v)
    for c in platform.calls:
        if c.retry_after is not None:  # no edit started in that room during its pause
            pause_end = c.end + c.retry_after - 1e-9
            assert not [
                d
                for d in platform.calls
                if d.room == c.room and d.start_seq > c.end_seq and d.start < pause_end
            ]
    await s.close()
    assert not other_tasks()


# database=None: no .hypothesis/ directory in the work tree (not git-ignored here).
@settings(max_examples=80, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(st.one_of(_submit, _advance), max_size=40),
    outcomes=st.lists(_outcome, max_size=25),
    max_in_flight=st.sampled_from([1, 2]),
    latency=st.sampled_from([0.0, 0.05, 0.8]),
)
def test_property_versions_increase_and_finals_arrive(
    ops: list[tuple[object, ...]], outcomes: list[str], max_in_flight: int, latency: float
) -> None:
    asyncio.run(_scenario(ops, outcomes, max_in_flight, latency))
