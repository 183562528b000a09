"""Configuration of the Discord adapter, built from the bot's settings without importing them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from adapters.base import secret_text as _secret


@dataclass(slots=True)
class DiscordConfig:
    """What the Discord adapter needs to know.

    ``token`` comes from the environment (``PROGRESSBOT_DISCORD__TOKEN``) through the settings. The bot
    acts only in ``guild_ids`` and, when the list is not empty, only in ``channel_ids``; jobs that name no
    room are shown in the first of ``channel_ids``. The knobs at the end have defaults suited to the real
    Discord; tests shorten them.
    """

    token: str | None
    guild_ids: list[int] = field(default_factory=list)
    channel_ids: list[int] = field(default_factory=list)
    #: A role (id or name) whose members may control any job.
    control_role: str | None = None
    #: Members with the Manage Messages permission in the channel may control any job.
    allow_manage_messages: bool = True
    #: Pin progress messages while their job is active.
    pin: bool = True
    #: Each channel's edit outbox: ``edit_rate`` edits/s sustained after a burst of ``edit_burst``
    #: (Discord's edit bucket is 5 per 5 s); the edit route's ``X-RateLimit-*`` headers pace it as
    #: Discord reports. Posts (with replies) and pins have outboxes of their own (Discord's buckets are
    #: per route), which start at the same guess and then follow the limit their route announces.
    edit_rate: float = 1.0
    edit_burst: int = 5
    #: The bot's global limit (requests/s, Discord allows 50): one outbox above every channel's.
    global_rate: float = 50.0
    #: Events of each channel kept for answers to people (the first post of ``/run``).
    answer_reserve: int = 1
    #: Spread the edits Discord's window has left evenly over the time to its reset, instead of spending
    #: them in a burst and then freezing the channel until the reset (lower worst-case staleness).
    pace_edits: bool = True
    #: Re-post a progress message before it is this old: Discord throttles edits of messages over 1 h.
    repost_after_seconds: float = 3300.0
    #: How often active messages are checked for age (so an idle, paused job is re-posted in time too).
    age_check_interval: float = 30.0
    #: Send a reply mentioning the requester when a job or batch finishes (edits notify nobody).
    reply_on_finish: bool = True
    #: Answer an interaction directly if the work takes less than this; defer it otherwise
    #: (Discord allows 3 s for the first response).
    defer_after: float = 2.0
    #: Sync the slash commands to the guilds on start.
    sync_commands: bool = True
    #: How long :meth:`DiscordAdapter.start` waits for the gateway to be ready, in seconds.
    ready_timeout: float = 60.0
    #: discord.py's wait for further GUILD_CREATE events before it reports ready.
    guild_ready_timeout: float = 2.0
    #: How long :meth:`DiscordAdapter.stop` waits for pending edits (final states) to go out.
    stop_grace: float = 5.0

    @classmethod
    def from_settings(cls, s: Any, **overrides: Any) -> DiscordConfig:
        """Build from a ``DiscordSettings``-like object (duck-typed: adapters do not import ``bot``)."""
        values: dict[str, Any] = {
            "token": _secret(getattr(s, "token", None)),
            "guild_ids": [int(g) for g in (getattr(s, "guild_ids", None) or [])],
            "channel_ids": [int(c) for c in (getattr(s, "channel_ids", None) or [])],
            "control_role": getattr(s, "control_role", None) or None,
        }
        for name in (
            "allow_manage_messages",
            "pin",
            "edit_rate",
            "edit_burst",
            "global_rate",
            "answer_reserve",
            "pace_edits",
            "repost_after_seconds",
            "age_check_interval",
            "reply_on_finish",
            "defer_after",
            "sync_commands",
            "ready_timeout",
            "guild_ready_timeout",
            "stop_grace",
        ):
            if getattr(s, name, None) is not None:
                values[name] = getattr(s, name)
        values.update(overrides)
        return cls(**values)

    def __repr__(self) -> str:
        # Never print the token in logs or tracebacks.
        return (
            f"DiscordConfig(token={'***' if self.token else None}, guild_ids={self.guild_ids!r}, "
            f"channel_ids={self.channel_ids!r}, control_role={self.control_role!r}, pin={self.pin})"
        )
