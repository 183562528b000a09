"""Fixed-window rate-limit buckets, shaped like Discord's (limit, remaining, reset, bucket hash)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Bucket", "Forced429"]


class Bucket:
    """``limit`` requests per ``window`` seconds; the window opens with its first request.

    Discord's buckets behave this way: ``X-RateLimit-Reset-After`` counts down from the first
    request in the window, and all tokens come back at once when it expires.
    """

    def __init__(self, name: str, limit: int, window: float) -> None:
        """``name`` is the ``X-RateLimit-Bucket`` hash sent to clients."""
        self.name = name
        self.limit = limit
        self.window = window
        self.count = 0
        self.reset_at: float | None = None

    def _roll(self, now: float) -> None:
        if self.reset_at is not None and now >= self.reset_at:
            self.count = 0
            self.reset_at = None

    def exhausted(self, now: float) -> bool:
        """Whether a request at ``now`` must get a 429."""
        self._roll(now)
        return self.count >= self.limit

    def take(self, now: float) -> None:
        """Spend one token (the caller checked :meth:`exhausted` first)."""
        self._roll(now)
        if self.reset_at is None:
            self.reset_at = now + self.window
        self.count += 1

    def remaining(self, now: float) -> int:
        """Tokens left in the current window."""
        self._roll(now)
        return max(0, self.limit - self.count)

    def reset_after(self, now: float) -> float:
        """Seconds until the window resets (a full window if none is open)."""
        self._roll(now)
        if self.reset_at is None:
            return self.window
        return max(0.0, self.reset_at - now)


@dataclass
class Forced429:
    """A pending :meth:`FakeDiscordServer.force_429` rule: the next ``remaining`` matching requests fail."""

    remaining: int
    retry_after: float
    method: str | None
    route: str | None
    is_global: bool
    scope: str

    def matches(self, method: str, route: str) -> bool:
        """Whether a request with this method and discord.py-style route template matches."""
        if self.method is not None and self.method.upper() != method:
            return False
        if self.route is None:
            return True
        want = self.route
        # Accept "PATCH /channels/{channel_id}/..." as well as the bare template.
        if " " in want:
            want_method, want = want.split(" ", 1)
            if want_method.upper() != method:
                return False
        return want.removeprefix("/api/v10") == route
