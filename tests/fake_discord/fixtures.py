"""pytest fixtures for the fake Discord server.

Use from a test module with ``pytest_plugins = ["tests.fake_discord.fixtures"]`` (or import the
fixture by name). Override the constructor arguments per test module by defining a
``fake_discord_options`` fixture returning a dict.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from tests.fake_discord.server import FakeDiscordServer, running_fake_discord

__all__ = ["fake_discord", "fake_discord_options"]


@pytest.fixture
def fake_discord_options() -> dict[str, Any]:
    """Constructor keyword arguments for :class:`FakeDiscordServer` (override to customise)."""
    return {}


@pytest_asyncio.fixture
async def fake_discord(fake_discord_options: dict[str, Any]) -> AsyncIterator[FakeDiscordServer]:
    """A started fake Discord with discord.py pointed at it; restored and stopped afterwards.

    Close your bot (``await bot.close()``) before the test ends, or it will try to reconnect.
    """
    async with running_fake_discord(**fake_discord_options) as server:
        yield server
