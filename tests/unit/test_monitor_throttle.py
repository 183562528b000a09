"""The monitor's throttle on a fake clock: leading/trailing edges, status changes, seq; properties."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st

from core.events import EventBus, JobProgressEvent
from core.monitor import JobProgressMonitor, JobView

INTERVAL = 0.5
TICK = 0.05


@dataclass
class FakeClock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


def make(clock: FakeClock) -> tuple[JobProgressMonitor, list[JobProgressEvent]]:
    bus = EventBus()
    events: list[JobProgressEvent] = []
    bus.add_listener(events.append)
    mon = JobProgressMonitor(bus, None, min_interval=INTERVAL, tick_interval=TICK, clock=clock)
    return mon, events


def running_view(job_id: int = 1) -> JobView:
    return JobView(id=job_id, type="t", status="running")


def advance(mon: JobProgressMonitor, clock: FakeClock, seconds: float) -> None:
    """Move time forward in ticks, running the emit loop's body at each tick."""
    end = clock.now + seconds
    while clock.now + TICK <= end + 1e-9:
        clock.now += TICK
        mon._emit_due()
    clock.now = end


def progress_events(events: list[JobProgressEvent]) -> list[JobProgressEvent]:
    return [e for e in events if not e.status_changed]


def test_leading_edge_then_trailing_edge() -> None:
    clock = FakeClock()
    mon, events = make(clock)
    st_ = mon.attach(running_view())
    mon.job_changed(running_view())  # a status event also opens a window
    advance(mon, clock, INTERVAL)
    st_.report(1, 100)
    advance(mon, clock, TICK)
    assert progress_events(events)[-1].current == 1  # leading edge, within one tick
    st_.report(2, 100)
    st_.report(3, 100, "last")
    advance(mon, clock, 0.3)
    assert progress_events(events)[-1].current == 1  # still inside the window
    advance(mon, clock, 0.3)
    last = progress_events(events)[-1]
    assert (last.current, last.message) == (3, "last")  # trailing edge: the state before the silence


def test_status_change_is_immediate_inside_the_window() -> None:
    clock = FakeClock()
    mon, events = make(clock)
    st_ = mon.attach(running_view())
    mon.job_changed(running_view())
    st_.report(5, 10)
    advance(mon, clock, TICK)
    n = len(events)
    clock.now += 0.01
    ev = mon.job_changed(JobView(id=1, type="t", status="paused"))
    assert ev is not None and ev.status == "paused" and ev.status_changed
    assert len(events) == n + 1  # no tick needed
    assert ev.current == 5


def test_seq_grows_and_rate_is_bounded() -> None:
    clock = FakeClock()
    mon, events = make(clock)
    st_ = mon.attach(running_view())
    mon.job_changed(running_view())
    for i in range(10_000):
        st_.report(i + 1, 10_000)
        if i % 50 == 0:
            advance(mon, clock, 0.01)  # 10,000 reports over 2 s
    advance(mon, clock, 1.0)
    prog = progress_events(events)
    assert len(prog) <= 5
    assert prog[-1].current == 10_000
    seqs = [e.seq for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


def test_terminal_event_carries_final_numbers() -> None:
    clock = FakeClock()
    mon, _ = make(clock)
    st_ = mon.attach(running_view())
    st_.report(7, 7, "done")
    ev = mon.job_changed(JobView(id=1, type="t", status="completed"))
    assert ev is not None and ev.terminal and ev.current == 7 and ev.percentage == 100.0


# ----------------------------------------------------------------------------------- properties
actions = st.lists(
    st.tuples(
        st.floats(min_value=0.0, max_value=0.4),  # time before the action
        st.sampled_from(["report", "report", "report", "status"]),
        st.integers(min_value=1, max_value=3),  # which job
    ),
    min_size=1,
    max_size=80,
)


@settings(max_examples=150, deadline=None)
@given(actions)
def test_throttle_properties(seq: list[tuple[float, str, int]]) -> None:
    clock = FakeClock()
    mon, events = make(clock)
    states = {j: mon.attach(running_view(j)) for j in (1, 2, 3)}
    statuses = {j: "running" for j in (1, 2, 3)}
    for j in (1, 2, 3):
        mon.job_changed(running_view(j))
    last_report: dict[int, tuple[float, int]] = {}
    counter = 0
    for dt, action, job in seq:
        advance(mon, clock, dt)
        if action == "report":
            counter += 1
            states[job].report(counter, 1000)
            last_report[job] = (clock.now, counter)
        else:
            statuses[job] = "paused" if statuses[job] == "running" else "running"
            before = len(events)
            mon.job_changed(JobView(id=job, type="t", status=statuses[job]))
            # A status change is emitted at once, and never dropped.
            assert len(events) == before + 1 and events[-1].status == statuses[job]
    advance(mon, clock, INTERVAL + 2 * TICK)
    for job in (1, 2, 3):
        evs = [e for e in events if e.id == job]
        # seq only grows.
        assert [e.seq for e in evs] == sorted(e.seq for e in evs)
        # The last state always goes out (trailing edge).
        if job in last_report:
            assert evs[-1].current == last_report[job][1]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(min_value=0.0, max_value=0.2), min_size=1, max_size=200))
def test_progress_events_are_spaced_by_the_interval(gaps: list[float]) -> None:
    clock = FakeClock()
    mon, events = make(clock)
    emit_times: list[float] = []
    mon.bus.add_listener(lambda e: None if e.status_changed else emit_times.append(clock.now))
    state = mon.attach(running_view())
    mon.job_changed(running_view())
    t_last = clock.now
    for i, gap in enumerate(gaps):
        advance(mon, clock, gap)
        state.report(i + 1, len(gaps))
        t_last = clock.now
    advance(mon, clock, INTERVAL + 2 * TICK)
    for a, b in itertools.pairwise(emit_times):
        assert b - a >= INTERVAL - 1e-9
    # The final report is emitted within the interval (plus one tick) of being made.
    assert emit_times and emit_times[-1] - t_last <= INTERVAL + TICK + 1e-9
    assert events[-1].current == len(gaps)
