"""A board's controls on Discord (fake Discord, discord.py's real HTTP and gateway code).

The Discord adapter is not on the shared progress driver yet, so it does not post boards by itself;
this test posts a board the way the driver will (the Discord format and its controls, through the
adapter's own client) and drives its select menu and buttons as Discord would send them: choosing a job
offers that job's Pause / Resume / Cancel buttons, a click acts on the chosen job with the job's
authorization, and someone else is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from adapters.board import board_view, fit
from adapters.discord.board import BoardSelect, board_content, board_controls, board_fits
from core.models import JobStatus
from tests.fake_discord import FakeDiscordServer
from tests.integration.discord_harness import make_adapter, make_service, wait_job

pytest_plugins = ["tests.fake_discord.fixtures"]
pytestmark = [pytest.mark.discord, pytest.mark.slow, pytest.mark.asyncio]


async def test_board_select_and_buttons_act_on_the_chosen_job(
    fake_discord: FakeDiscordServer, tmp_path: Path
) -> None:
    server = fake_discord
    alice = server.guild.members[0]
    bob = server.make_user(name="bob")
    service = await make_service(tmp_path)
    adapter = await make_adapter(server, service)
    try:
        assert adapter.client is not None
        adapter.client.add_dynamic_items(BoardSelect)
        jobs = [
            await service.submit(
                "demo.count", {"steps": 400, "delay_ms": 25}, owner=alice.id, room=server.channel_id
            )
            for _ in range(3)
        ]
        for job in jobs:
            await wait_job(service, job.id or 0, lambda j: j.status == JobStatus.RUNNING)
        events = [service.current_event(await service.get(j.id or 0)) for j in jobs]
        view = board_view(events)
        channel: Any = adapter.client.get_channel(int(server.channel_id))
        content = fit(view, board_content, board_fits)
        sent = await channel.send(content.text, view=board_controls(int(jobs[0].id or 0), view))
        board = server.message(sent.id)
        assert board.content.startswith("**📋 Jobs: 3 running")
        target = str(jobs[1].id)

        # Bob chooses alice's job: he is offered its buttons (only he sees them), but may not use them.
        rec = await server.dispatch_button(f"pb:board:{jobs[0].id}", board.id, user=bob, values=[target])
        resp = await server.wait_interaction_response(rec)
        assert resp.ephemeral and f"#{target}" in (resp.content or "")
        offered = str(resp.data.get("components"))
        assert f"pb:pause:{target}" in offered and f"pb:cancel:{target}" in offered
        assert resp.message_id is not None
        rec = await server.dispatch_button(f"pb:pause:{target}", resp.message_id, user=bob)
        resp = await server.wait_interaction_response(rec)
        assert resp.ephemeral and f"may not pause job #{target}" in (resp.content or "")
        assert (await service.get(int(target))).status == JobStatus.RUNNING

        # Alice, the job's owner, pauses it from the board; the other jobs keep running.
        rec = await server.dispatch_button(f"pb:board:{jobs[0].id}", board.id, user=alice, values=[target])
        offer = await server.wait_interaction_response(rec)
        assert offer.message_id is not None
        rec = await server.dispatch_button(f"pb:pause:{target}", offer.message_id, user=alice)
        await server.wait_interaction_response(rec)
        await wait_job(service, int(target), lambda j: j.status == JobStatus.PAUSED)
        assert (await service.get(jobs[0].id or 0)).status == JobStatus.RUNNING
        for job in jobs:
            await service.cancel(job.id or 0, actor=alice.id)
    finally:
        await adapter.stop()
        await service.stop()
