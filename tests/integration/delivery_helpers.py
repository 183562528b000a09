"""What "stale" means, shared by the delivery tests and ``bench/chat_delivery.py``.

:class:`History` listens on the service's bus and records every state each job went through; given
the text a job's message shows now, it tells how long that text has been out of date.
"""

from __future__ import annotations

import re
import time

from core.events import JobProgressEvent
from tests.integration.matrix_helpers import status_word

_COUNT = re.compile(r"\((\d+)/\d+\)")


class History:
    """Every state each job went through (monotonic time, status, step), from the service's bus."""

    def __init__(self) -> None:
        self.states: dict[int, list[tuple[float, str, int | None]]] = {}
        self.terminal: set[int] = set()

    def __call__(self, ev: JobProgressEvent) -> None:
        """The bus listener."""
        if ev.type != "job" or not isinstance(ev.id, int):
            return
        cur = int(ev.current) if ev.current is not None else None
        hist = self.states.setdefault(ev.id, [])
        if not hist or hist[-1][1:] != (ev.status, cur):
            hist.append((time.monotonic(), ev.status, cur))
        if ev.terminal:
            self.terminal.add(ev.id)

    def staleness(self, job: int, shown: str | None, submitted: float, now: float) -> float:
        """How long the shown text has been out of date (0 when it shows the newest state).

        While no message exists (``shown`` is None) the job counts as stale since ``submitted``.
        """
        hist = self.states.get(job) or []
        if shown is None:
            return now - submitted
        m = _COUNT.search(shown)
        key = (status_word(shown), int(m.group(1)) if m else None)
        idx = max((i for i, h in enumerate(hist) if h[1:] == key), default=None)
        if idx is None:
            # Not a state we recorded (e.g. the very first render before the listener saw it).
            return now - (hist[0][0] if hist else submitted)
        if idx == len(hist) - 1:
            return 0.0
        return now - hist[idx + 1][0]
