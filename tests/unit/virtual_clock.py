"""Virtual time for asyncio unit tests: an injectable clock and ``sleep`` that move only when told.

Sleeping registers a wake-up at a virtual instant, and the test moves time forward explicitly, only once
every runnable task has settled. So the tests are deterministic, and a "minute" of rate-limited chat
takes milliseconds.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable


class VirtualClock:
    """Virtual monotonic time plus a matching ``sleep``; time only moves when the test says so."""

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def __call__(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        """Sleep ``delay`` virtual seconds."""
        if delay <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._heap, (self.now + delay, next(self._seq), fut))
        await fut

    async def settle(self) -> None:
        """Yield until no task is runnable any more (only virtual sleeps or events are pending)."""
        loop = asyncio.get_running_loop()
        ready = getattr(loop, "_ready", None)  # CPython's run queue: exact quiescence detection
        for _ in range(100_000 if ready is not None else 200):
            await asyncio.sleep(0)
            if ready is not None and not ready:
                return
        assert ready is None, "the event loop never settled (a busy loop?)"

    def _next_deadline(self) -> float | None:
        while self._heap and self._heap[0][2].done():  # cancelled sleeps
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    async def advance_to(self, target: float) -> None:
        """Run everything due up to virtual instant ``target``, in time order."""
        await self.settle()
        while (deadline := self._next_deadline()) is not None and deadline <= target:
            self.now = max(self.now, deadline)
            while self._heap and self._heap[0][0] <= self.now:
                _, _, fut = heapq.heappop(self._heap)
                if not fut.done():
                    fut.set_result(None)
            await self.settle()
        self.now = max(self.now, target)

    async def advance(self, seconds: float) -> None:
        """Let ``seconds`` of virtual time pass."""
        await self.advance_to(self.now + seconds)

    async def run_until(self, cond: Callable[[], bool], limit: float = 100_000.0) -> None:
        """Advance time from wake-up to wake-up until ``cond()`` holds."""
        await self.settle()
        while not cond():
            deadline = self._next_deadline()
            assert deadline is not None, "stuck: condition false and nothing scheduled"
            assert deadline <= limit, f"condition still false at virtual t={deadline}"
            await self.advance_to(deadline)
