"""A fake Discord server for offline tests of the Discord adapter with real discord.py.

Quick start::

    from tests.fake_discord import running_fake_discord

    async with running_fake_discord(edit_window=1.0) as server:   # starts + patches discord.py
        bot = commands.Bot(command_prefix="!", intents=discord.Intents.default())
        await bot.login("fake-token")
        ...
        rec = await server.dispatch_slash_command("status", {"job": "42"}, user=server.make_moderator())
        resp = await server.wait_interaction_response(rec)
        assert resp.ephemeral

Or use the ``fake_discord`` fixture from :mod:`tests.fake_discord.fixtures`.
"""

from tests.fake_discord.clock import FakeClock
from tests.fake_discord.models import (
    ADMINISTRATOR,
    DEFAULT_BOT_PERMISSIONS,
    EMBED_LINKS,
    EPHEMERAL,
    MANAGE_MESSAGES,
    PIN_MESSAGES,
    SEND_MESSAGES,
    VIEW_CHANNEL,
    EditRecord,
    ErrorRecord,
    FakeChannel,
    FakeGuild,
    FakeMessage,
    FakeRole,
    FakeUser,
    FollowupRecord,
    InteractionRecord,
    InteractionResponseRecord,
    PinEvent,
    RateLimitHit,
)
from tests.fake_discord.ratelimit import Bucket
from tests.fake_discord.server import (
    DEFAULT_APPLICATION_ID,
    DEFAULT_CHANNEL_ID,
    DEFAULT_GUILD_ID,
    MODERATOR_ROLE_ID,
    SECOND_CHANNEL_ID,
    ApiError,
    FakeDiscordServer,
    RequestRecord,
    default_guild,
    point_discord_at,
    running_fake_discord,
)

__all__ = [
    "ADMINISTRATOR",
    "DEFAULT_APPLICATION_ID",
    "DEFAULT_BOT_PERMISSIONS",
    "DEFAULT_CHANNEL_ID",
    "DEFAULT_GUILD_ID",
    "EMBED_LINKS",
    "EPHEMERAL",
    "MANAGE_MESSAGES",
    "MODERATOR_ROLE_ID",
    "PIN_MESSAGES",
    "SECOND_CHANNEL_ID",
    "SEND_MESSAGES",
    "VIEW_CHANNEL",
    "ApiError",
    "Bucket",
    "EditRecord",
    "ErrorRecord",
    "FakeChannel",
    "FakeClock",
    "FakeDiscordServer",
    "FakeGuild",
    "FakeMessage",
    "FakeRole",
    "FakeUser",
    "FollowupRecord",
    "InteractionRecord",
    "InteractionResponseRecord",
    "PinEvent",
    "RateLimitHit",
    "RequestRecord",
    "default_guild",
    "point_discord_at",
    "running_fake_discord",
]
