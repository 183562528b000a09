"""Configuration of the Matrix adapter, built from the bot's settings without importing them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from adapters.base import secret_text as _secret


@dataclass(slots=True)
class MatrixConfig:
    """What the Matrix adapter needs to know.

    ``password`` and ``access_token`` come from the environment through the settings; one of them is
    required. The tuning knobs at the end have defaults suited to a real deployment; tests shorten them.
    """

    homeserver: str
    user_id: str
    password: str | None = None
    access_token: str | None = None
    device_id: str | None = None
    device_name: str = "progressbot"
    rooms: list[str] = field(default_factory=list)
    command_prefix: str = "!"
    #: Room members with at least this power level count as moderators (may control any job).
    min_power_level: int | None = None
    #: Pin progress messages while their job is active (needs power level 50 in the room by default).
    pin: bool = True
    #: Offer ⏸ ▶ ⏹ as reactions on each progress message.
    react: bool = True
    #: Send a reply that mentions the requester when a job or batch finishes.
    reply_on_finish: bool = True
    #: The account's event budget (events per second, every post, edit, pin, reaction and reply) and
    #: its burst: an upper bound. The rate Synapse really allows is learned from its 429s (two of them
    #: bracket the events it accepted), so a default ``rc_message`` (0.2/s) is found without tuning.
    edit_rate: float = 10.0
    edit_burst: int = 10
    #: The first guess of the account's rate: Synapse's default ``rc_message`` (0.2/s). It doubles while
    #: the homeserver takes it (a lifted limit), up to ``edit_rate``.
    start_rate: float = 0.2
    #: Events kept in reserve for answers to people, so a command is answered at once.
    answer_reserve: int = 1
    #: Calls that may be in flight at once for the account (always one per message and lane).
    max_in_flight: int = 4
    #: Long-poll timeout of /sync, in milliseconds.
    sync_timeout_ms: int = 30_000
    #: Timeout of one HTTP request (other than the long poll), in seconds.
    request_timeout: float = 20.0
    #: Reconnect backoff after a lost connection: first delay and cap, in seconds.
    reconnect_min: float = 0.5
    reconnect_max: float = 30.0
    #: How long :meth:`MatrixAdapter.stop` waits for pending edits to go out, in seconds.
    stop_grace: float = 5.0
    # End-to-end encryption (see adapters/matrix/e2e.py for what each setting means).
    #: Work in encrypted rooms (needs matrix-nio[e2e]); off: encrypted rooms get a warning only.
    encryption: bool = True
    #: nio's key store directory; None: next to the database (``bot.db`` -> ``bot.matrix-store/``).
    store_path: str | None = None
    #: Whose devices get the bot's room keys: ``all``, ``tofu`` (default) or ``verified``.
    trust: str = "tofu"
    #: With ``trust = "verified"``: ``"@user:server DEVICEID ED25519KEY"`` entries.
    verified_devices: list[str] = field(default_factory=list)

    @classmethod
    def from_settings(cls, s: Any, **overrides: Any) -> MatrixConfig:
        """Build from a ``MatrixSettings``-like object (duck-typed: adapters do not import ``bot``)."""
        values: dict[str, Any] = {
            "homeserver": str(s.homeserver or ""),
            "user_id": str(s.user_id or ""),
            "password": _secret(getattr(s, "password", None)),
            "access_token": _secret(getattr(s, "access_token", None)),
            "device_id": getattr(s, "device_id", None),
            "device_name": getattr(s, "device_name", "progressbot") or "progressbot",
            "rooms": list(getattr(s, "rooms", None) or []),
            "command_prefix": getattr(s, "command_prefix", "!") or "!",
            "min_power_level": getattr(s, "min_power_level", None),
            "pin": bool(getattr(s, "pin", True)),
            "react": bool(getattr(s, "react", True)),
        }
        for name in ("encryption", "store_path", "trust", "verified_devices"):  # E2E settings
            if getattr(s, name, None) is not None:
                values[name] = getattr(s, name)
        knobs = (
            "edit_rate",
            "edit_burst",
            "start_rate",
            "answer_reserve",
            "reply_on_finish",
            "sync_timeout_ms",
        )
        for name in knobs:
            if getattr(s, name, None) is not None:
                values[name] = getattr(s, name)
        values.update(overrides)
        return cls(**values)

    def __repr__(self) -> str:
        # Never print secrets in logs or tracebacks.
        hidden = {k: "***" if getattr(self, k) else None for k in ("password", "access_token")}
        return (
            f"MatrixConfig(homeserver={self.homeserver!r}, user_id={self.user_id!r}, rooms={self.rooms!r}, "
            f"password={hidden['password']}, access_token={hidden['access_token']})"
        )
