"""The Discord adapter (discord.py): slash commands, persistent buttons, one pinned message per job."""

from .adapter import DiscordAdapter
from .config import DiscordConfig

__all__ = ["DiscordAdapter", "DiscordConfig"]
