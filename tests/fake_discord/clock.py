"""The fake Discord server's clock: real time by default, but a test can jump it forward.

Every time-dependent rule of the fake (rate-limit windows, the 3 s interaction deadline, the
1-hour edit rule, message timestamps and snowflakes) reads this one clock, so a test can run a job
"past the hour" by calling :meth:`FakeClock.advance` instead of sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["FakeClock"]


class FakeClock:
    """Epoch seconds = ``base()`` (``time.time`` by default) + an offset that only grows.

    Real time keeps flowing underneath on purpose: discord.py sleeps *real* seconds when it waits
    out a rate limit, so the fake's buckets must refill in real time too, or a retried request
    would be rejected forever. ``freeze()`` stops the flow for tests that want exact timestamps.
    """

    def __init__(self, base: Callable[[], float] = time.time, *, start: float | None = None) -> None:
        """Create a clock; ``start`` (epoch seconds) shifts it so that ``now()`` begins there."""
        self._base = base
        self._offset = 0.0 if start is None else start - base()
        self._frozen_at: float | None = None

    def now(self) -> float:
        """Current fake time, in epoch seconds."""
        if self._frozen_at is not None:
            return self._frozen_at
        return self._base() + self._offset

    __call__ = now

    def advance(self, seconds: float) -> float:
        """Jump forward by ``seconds`` (must be >= 0: snowflakes and windows assume monotonic time)."""
        if seconds < 0:
            raise ValueError("FakeClock only moves forward")
        if self._frozen_at is not None:
            self._frozen_at += seconds
        else:
            self._offset += seconds
        return self.now()

    def freeze(self) -> None:
        """Stop the clock at the current instant; only :meth:`advance` moves it afterwards.

        Beware: rate-limit windows then only reset when the test advances the clock, so a bot
        waiting out a 429 in real time would retry into the same full bucket.
        """
        self._frozen_at = self.now()

    def unfreeze(self) -> None:
        """Let real time flow again from the frozen instant (no jump backwards or forwards)."""
        if self._frozen_at is not None:
            self._offset = self._frozen_at - self._base()
            self._frozen_at = None

    @property
    def frozen(self) -> bool:
        """Whether the clock is frozen."""
        return self._frozen_at is not None
