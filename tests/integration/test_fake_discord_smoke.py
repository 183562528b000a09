"""Smoke test: real discord.py (``commands.Bot`` + ``app_commands``) against the fake Discord.

It proves the fake speaks enough of Discord for our adapter tests, and that the Discord rules
the adapter must respect are enforced: the per-channel edit limit (429 waited out by discord.py),
the 1-hour edit rule (30046), the 3 s interaction deadline (10062) and the size limits (50035).
The fake clock keeps it to a few seconds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import discord
import pytest
import pytest_asyncio
from discord import app_commands
from discord.ext import commands

from tests.fake_discord import EPHEMERAL, FakeDiscordServer, FakeUser

pytest_plugins = ["tests.fake_discord.fixtures"]
pytestmark = [pytest.mark.discord, pytest.mark.asyncio]

EDIT_ROUTE = "PATCH /channels/{channel_id}/messages/{message_id}"


@pytest.fixture
def fake_discord_options() -> dict[str, Any]:
    """A 1 s edit window (instead of Discord's ~5 s) so waiting out the limit stays quick."""
    return {"edit_limit": 5, "edit_window": 1.0, "token": "fake-bot-token"}


class JobView(discord.ui.View):
    """A persistent progress-message view: no timeout and a fixed custom_id, so it survives restarts."""

    def __init__(self) -> None:
        """No timeout: persistent views must outlive the process that posted them."""
        super().__init__(timeout=None)

    @discord.ui.button(label="Pause", style=discord.ButtonStyle.secondary, custom_id="job:pause")
    async def pause(self, interaction: discord.Interaction, button: discord.ui.Button[JobView]) -> None:
        """Moderators pause the job by editing the message in place; others get an ephemeral refusal."""
        if not interaction.permissions.manage_messages:
            await interaction.response.send_message("Only moderators can pause jobs.", ephemeral=True)
            return
        await interaction.response.edit_message(content="Job 1: paused")


class SmokeBot:
    """A ``commands.Bot`` with the commands the smoke test exercises, plus what it observed."""

    def __init__(self, guild_id: int) -> None:
        """Build the bot; ``guild_ready_timeout`` is tiny because the fake sends GUILD_CREATE at once."""
        self.guild = discord.Object(id=guild_id)
        self.tree_errors: list[app_commands.AppCommandError] = []
        self.late_gate = asyncio.Event()
        self.bot = commands.Bot(
            command_prefix="!",
            intents=discord.Intents.default(),
            guild_ready_timeout=0.05,
        )
        self.bot.setup_hook = self._setup_hook  # type: ignore[method-assign]
        tree = self.bot.tree

        @tree.command(name="status", description="Show a job's status", guild=self.guild)
        @app_commands.describe(job="Job id")
        async def status(interaction: discord.Interaction, job: str) -> None:
            await interaction.response.send_message(f"Job {job}: running", ephemeral=True)

        @status.autocomplete("job")
        async def job_autocomplete(
            interaction: discord.Interaction, current: str
        ) -> list[app_commands.Choice[str]]:
            return [
                app_commands.Choice(name=f"job {j}", value=j)
                for j in ("1", "2", "12")
                if j.startswith(current)
            ]

        @tree.command(name="report", description="Slow report (defers)", guild=self.guild)
        async def report(interaction: discord.Interaction) -> None:
            await interaction.response.defer(ephemeral=True, thinking=True)
            await interaction.followup.send("report ready", ephemeral=True)

        @tree.command(name="late", description="Answers after the 3 s deadline", guild=self.guild)
        async def late(interaction: discord.Interaction) -> None:
            await self.late_gate.wait()
            await interaction.response.send_message("too late")

        @tree.error
        async def on_tree_error(
            interaction: discord.Interaction, error: app_commands.AppCommandError
        ) -> None:
            self.tree_errors.append(error)

    async def _setup_hook(self) -> None:
        # Registering the persistent view at startup is what makes clicks on old messages work.
        self.bot.add_view(JobView())


async def eventually(check: Callable[[], bool], timeout: float = 3.0) -> None:
    """Poll ``check`` (for bot-side state the server cannot signal) until true or fail."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


@pytest_asyncio.fixture
async def smoke_bot(fake_discord: FakeDiscordServer) -> AsyncIterator[SmokeBot]:
    """The bot, logged in and connected to the fake gateway; closed afterwards."""
    sb = SmokeBot(int(fake_discord.guild_id))
    await sb.bot.login("fake-bot-token")
    runner = asyncio.create_task(sb.bot.connect(reconnect=False))
    try:
        await asyncio.wait_for(sb.bot.wait_until_ready(), 5)
        yield sb
    finally:
        await sb.bot.close()
        await asyncio.wait_for(runner, 5)


async def test_fake_discord_smoke(fake_discord: FakeDiscordServer, smoke_bot: SmokeBot) -> None:
    """Login, slash commands, views, edits, pins, rate limits, the 1-hour rule and expiry, end to end."""
    server, bot = fake_discord, smoke_bot.bot
    t0 = time.monotonic()
    alice = server.guild.members[0]
    moderator: FakeUser = server.make_moderator(name="mod")
    assert server.edit_window == 1.0 and server.token == "fake-bot-token"  # module options applied

    # --- login + gateway: READY/GUILD_CREATE built the cache discord.py reads.
    assert bot.user is not None and str(bot.user.id) == server.application_id
    guild = bot.get_guild(int(server.guild_id))
    assert guild is not None and guild.get_channel(int(server.channel_id)) is not None
    channel = bot.get_channel(int(server.channel_id))
    assert isinstance(channel, discord.TextChannel)

    # --- app-command sync to the guild; the fake echoes them back with ids.
    synced = await bot.tree.sync(guild=smoke_bot.guild)
    assert sorted(c.name for c in synced) == ["late", "report", "status"]
    assert all(c.id for c in synced)
    assert {c["name"] for c in server.commands(server.guild_id)} == {"late", "report", "status"}

    # --- slash command answered with an ephemeral message.
    rec = await server.dispatch_slash_command("status", {"job": "7"}, user=alice)
    resp = await server.wait_interaction_response(rec)
    assert resp.type == 4 and resp.flags & EPHEMERAL and resp.content == "Job 7: running"
    assert server.messages_in() == []  # ephemeral replies are not channel messages

    # --- autocomplete (type 4 interaction -> type 8 result).
    rec = await server.dispatch_autocomplete("status", "job", "1", user=alice)
    resp = await server.wait_interaction_response(rec)
    assert resp.type == 8 and [c["value"] for c in resp.choices] == ["1", "12"]

    # --- deferred response + follow-up over the webhook routes.
    rec = await server.dispatch_slash_command("report", user=alice)
    assert (await server.wait_interaction_response(rec)).type == 5
    followups = await server.wait_followup(rec)
    assert followups[0].payload["content"] == "report ready" and followups[0].ephemeral

    # --- progress message with a persistent button: post, edit, pin.
    msg = await channel.send("Job 1: 0%", view=JobView())
    mid = msg.id  # Message.edit() returns a new object: keep the id, not the object.
    stored = server.message(mid)
    assert stored.custom_ids() == {"job:pause": 2}
    progress = channel.get_partial_message(mid)
    await progress.edit(content="Job 1: 10%")
    await progress.pin()
    assert [m.id for m in server.pinned()] == [str(mid)]
    assert [e.content_after for e in server.edits_of(mid)] == ["Job 1: 10%"]

    # --- button clicks: refused for a plain member (ephemeral), honoured for a moderator (type 7).
    rec = await server.dispatch_button("job:pause", mid, user=alice)
    resp = await server.wait_interaction_response(rec)
    assert resp.type == 4 and resp.ephemeral and "moderators" in (resp.content or "")
    rec = await server.dispatch_button("job:pause", mid, user=moderator)
    resp = await server.wait_interaction_response(rec)
    assert resp.type == 7 and server.message(mid).content == "Job 1: paused"
    assert server.edits_of(mid)[-1].via == "interaction"

    # --- edit limit as a hidden sub-limit: 6 fast edits, the 6th gets a real 429, discord.py
    # sleeps retry_after and retries, and every edit lands.
    server.advertise_edit_limit = False
    server.reset_rate_limits()
    before = len(server.edits_of(mid))
    for i in range(1, 7):
        await progress.edit(content=f"Job 1: {i * 10}%")
    hits = [h for h in server.rate_limit_hits if not h.forced]
    # Exactly one 429 and every edit landed: a retry before retry_after would have hit the bucket again.
    assert len(hits) == 1 and hits[0].route == EDIT_ROUTE and hits[0].scope == "user"
    assert [e.content_after for e in server.edits_of(mid)[before:]] == [
        f"Job 1: {i * 10}%" for i in range(1, 7)
    ]

    # --- edit limit advertised in the headers: discord.py paces itself, no 429 at all.
    server.advertise_edit_limit = True
    server.reset_rate_limits()
    n_hits = len(server.rate_limit_hits)
    before = len(server.edits_of(mid))
    for i in range(6):
        await progress.edit(content=f"Job 1: {70 + i}%")
    paced = server.edits_of(mid)[before:]
    assert len(paced) == 6 and len(server.rate_limit_hits) == n_hits
    assert paced[5].at - paced[0].at >= server.edit_window * 0.9

    # --- a forced 429 on the pin route is waited out too.
    second = await channel.send("Job 2: 0%")
    server.force_429(1, retry_after=0.1, route="PUT /channels/{channel_id}/messages/pins/{message_id}")
    await second.pin()
    assert server.rate_limit_hits[-1].forced and {m.id for m in server.pinned()} == {str(mid), str(second.id)}

    # --- size limits: 2001 characters or a 4097-character embed description -> 400 / 50035.
    with pytest.raises(discord.HTTPException) as too_long:
        await channel.send("x" * 2001)
    assert too_long.value.status == 400 and too_long.value.code == 50035
    with pytest.raises(discord.HTTPException) as big_embed:
        await channel.send(embed=discord.Embed(description="y" * 4097))
    assert big_embed.value.code == 50035

    # --- interaction deadline: the bot answers after the (fake) 3 s -> 404 / 10062.
    rec = await server.dispatch_slash_command("late", user=alice)
    server.clock.advance(3.5)  # no real waiting: the handler is parked on late_gate meanwhile
    smoke_bot.late_gate.set()
    await server.wait_for(lambda: bool(server.errors_with_code(10062)))
    await eventually(lambda: bool(smoke_bot.tree_errors))
    err = smoke_bot.tree_errors[-1]
    assert isinstance(err, app_commands.CommandInvokeError) and isinstance(err.original, discord.NotFound)
    assert err.original.code == 10062 and server.responses_to(rec) == []

    # --- the 1-hour rule: past the hour the old message cannot be edited (400 / 30046);
    # a fresh message can, which is the adapter's re-post-and-pin strategy.
    server.clock.advance(3601)
    with pytest.raises(discord.HTTPException) as old:
        await progress.edit(content="Job 1: 99%")
    assert old.value.status == 400 and old.value.code == 30046
    fresh = await channel.send("Job 1: 99% (continued)")
    await channel.get_partial_message(fresh.id).edit(content="Job 1: 100%")
    assert server.message(fresh.id).content == "Job 1: 100%"
    assert server.message(mid).content == "Job 1: 75%"

    # Every route discord.py used is modelled (the catch-all answers 404 with code 0).
    assert [e.route for e in server.errors if e.status == 404 and e.code == 0] == []
    assert time.monotonic() - t0 < 10, "the smoke test should take a few seconds"
