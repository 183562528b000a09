"""The outbox against a Discord-like bucket, on virtual time: fixed windows, announced limits, and the
wait statistics that measure how much of the allowance was used while something waited.

A :class:`FixedWindow` plays one of Discord's buckets: ``limit`` calls per ``window`` seconds, the window
opening with its first call and coming back whole at its reset; it answers every call with what
Discord's ``X-RateLimit-*`` headers say (remaining, reset after), which the test feeds to the outbox as
the Discord transport does.
"""

from __future__ import annotations

import asyncio

from adapters.outbox import Outbox, Priority, RateLimited
from tests.unit.virtual_clock import VirtualClock


class FixedWindow:
    """``limit`` calls per ``window`` s; refuses (429) what does not fit."""

    def __init__(self, clock: VirtualClock, limit: int, window: float) -> None:
        self.clock, self.limit, self.window = clock, limit, window
        self.count = 0
        self.reset_at: float | None = None
        self.accepted: list[float] = []
        self.refused = 0

    def call(self) -> tuple[int, float]:
        """One call: ``(remaining, reset_after)`` as the headers say, or :class:`RateLimited`."""
        now = self.clock.now
        if self.reset_at is not None and now >= self.reset_at - 1e-9:
            self.count, self.reset_at = 0, None
        if self.count >= self.limit:
            self.refused += 1
            assert self.reset_at is not None
            raise RateLimited(self.reset_at - now)
        if self.reset_at is None:
            self.reset_at = now + self.window
        self.count += 1
        self.accepted.append(now)
        return self.limit - self.count, self.reset_at - now


async def caller(box: Outbox, server: FixedWindow, lane: str, *, refill: float) -> None:
    """A lane that always has another progress edit waiting, feeding each answer's headers back."""
    while True:
        try:
            async with box.slot(Priority.PROGRESS, lane):
                remaining, reset = server.call()
            box.observe(remaining, reset, pace=True, refill=refill)
        except RateLimited as exc:
            box.observe(0, exc.retry_after)


async def run_busy(refill: float, seconds: float) -> tuple[FixedWindow, Outbox]:
    clock = VirtualClock()
    server = FixedWindow(clock, 5, 5.0)
    box = Outbox("edits", rate=1.0, burst=5, reserve=1, max_in_flight=1, clock=clock, sleep=clock.sleep)
    lanes = [asyncio.create_task(caller(box, server, f"m{i}", refill=refill)) for i in range(4)]
    await clock.advance(seconds)
    for t in lanes:
        t.cancel()
    await asyncio.gather(*lanes, return_exceptions=True)
    await box.aclose()
    return server, box


async def test_a_fixed_window_comes_back_whole_at_its_reset() -> None:
    """With ``refill`` = the window's limit, every window carries its 5 calls, with no 429; a reset
    that brought back a single token would leave the reserve short and lose a call per window."""
    server, _ = await run_busy(refill=5, seconds=60.0)
    assert server.refused == 0
    assert len(server.accepted) >= 11 * 5  # 12 windows in 60 s (the last may be cut short)
    spaced = [b - a for a, b in zip(server.accepted, server.accepted[1:], strict=False)]
    assert max(spaced) <= 1.5  # paced through the window, not spent in a burst and then frozen

    short, _ = await run_busy(refill=1, seconds=60.0)
    assert short.refused == 0 and len(short.accepted) < len(server.accepted)


async def test_wait_statistics_show_the_allowance_used_while_something_waited() -> None:
    """Always busy: the calls sent are (almost) all the server allowed while something waited."""
    server, box = await run_busy(refill=5, seconds=60.0)
    st = box.stats
    allowed = server.limit + (st.waited + st.idle) * server.limit / server.window
    assert st.waits >= 1 and st.waited > 50.0
    assert 0.9 <= st.sent / allowed <= 1.05


async def test_an_announced_limit_sets_burst_and_rate() -> None:
    """A bucket announced as 50 per second is used as such (Discord's roomy post and pin buckets)."""
    clock = VirtualClock()
    box = Outbox("posts", rate=1.0, burst=5, reserve=1, clock=clock, sleep=clock.sleep)
    box.announce(50, 1.0)
    assert (box.burst, box.max_rate, box.rate) == (50.0, 50.0, 50.0)
    done: list[float] = []

    async def post() -> None:
        async with box.slot(Priority.NEW, "room"):
            done.append(clock.now)

    posts = [asyncio.create_task(post()) for _ in range(40)]
    await clock.advance(5.0)
    await asyncio.gather(*posts)
    await box.aclose()
    assert len(done) == 40 and max(done) <= 1.0  # at the first guess (1/s after 5) it took 35 s
    box.announce(0, 1.0)  # nonsense is ignored
    assert box.rate == 50.0
