"""Restarts: of the bot (same events edited, no duplicates, no backlog commands) and of the homeserver."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from core.errors import JobNotFound
from tests.integration.matrix_helpers import (
    World,
    content_of,
    current_text,
    edits_of,
    job_message,
    pin_history,
    progress_messages,
    replies_to,
    status_word,
    texts_of,
)

pytest_plugins = ["tests.servers.conftest_plugin", "tests.integration.matrix_fixtures"]

pytestmark = [pytest.mark.matrix, pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]


def _step(text: str) -> int:
    """The ``k`` of ``(k/N)`` in a progress text (0 when absent)."""
    if "(" not in text or "/" not in text:
        return 0
    inner = text.rsplit("(", 1)[1].split(")", 1)[0]
    head = inner.split("/", 1)[0]
    return int(head) if head.isdigit() else 0


async def test_bot_restart_edits_the_same_event_and_skips_the_backlog(
    world: World, room: str, bots: Any
) -> None:
    """Stop the bot mid-job and start it again (password login, same database).

    The same event is edited to the end, no second progress message appears, the device is reused,
    and a command sent while the bot was down is not executed from the backlog.
    """
    alice, bot = world.alice, world.bot_id
    cfg = world.config(room, access_token=None, password=world.hs.bot_password)
    h = await bots(cfg)
    device = h.bot.client.device_id if h.bot.client else None
    assert device

    await alice.command(room, "!run demo.count steps=40 delay_ms=100")
    eid = await job_message(world, room, 1)
    await alice.wait_for(lambda: _step(current_text(alice.room(room), eid)) >= 3, 20, "some progress")
    await h.stop()
    before = _step(current_text(alice.room(room), eid))
    assert before < 40

    # While the bot is down, alice asks for another job: it must not run from the backlog later.
    offline_cmd = await alice.send_text(room, "!run demo.count steps=1")
    await h.start()
    assert h.bot.client is not None and h.bot.client.device_id == device  # no new device
    assert h.bot.stats.skipped_backlog >= 1

    await alice.wait_for(
        lambda: status_word(current_text(alice.room(room), eid)) == "completed",
        60,
        "the same message to complete",
    )
    await alice.wait_for(lambda: replies_to(alice.room(room), eid), 20, "the completion reply")
    # A command sent now is answered; the offline one (earlier in the timeline) never was.
    status = await alice.command(room, "!status 1")
    assert "completed" in content_of(status)["body"]
    events = alice.room(room)
    assert not replies_to(events, offline_cmd)
    with pytest.raises(JobNotFound):
        await h.svc.get(2)

    assert len(progress_messages(events, bot)) == 1
    assert h.bot.driver is not None and h.bot.driver.stats.posts == 0  # the restarted bot found its binding
    steps = [_step(t) for t in texts_of(events, eid)]
    assert max(steps) == 40 and steps[-1] == 40
    assert len(edits_of(events, eid)) >= 3
    assert len([r for r in replies_to(events, eid) if r["sender"] == bot]) == 1
    await alice.wait_for(lambda: pin_history(alice.room(room))[-1] == [], 20, "the unpin")
    token = await h.svc.store.kv_get(f"matrix:{bot}:sync_token")
    assert token


async def test_homeserver_restart_mid_job_delivers_the_final_state(
    world: World, room: str, bots: Any
) -> None:
    """Synapse restarts while a job runs: the worker carries on, and the bot reconnects and finishes."""
    alice, bot = world.alice, world.bot_id
    h = await bots(world.config(room))
    await alice.command(room, "!run demo.count steps=40 delay_ms=100")
    eid = await job_message(world, room, 1)
    await alice.wait_for(lambda: _step(current_text(alice.room(room), eid)) >= 2, 20, "some progress")

    # A blocking stop + start of the server (~5 s), in a thread: the event loop (worker, bot) runs on.
    await asyncio.to_thread(world.hs.server.restart)
    job = await h.svc.get(1)
    assert job.status in ("running", "completed")

    await alice.wait_for(
        lambda: status_word(current_text(alice.room(room), eid)) == "completed",
        90,
        "the final state after the restart",
    )
    await alice.wait_for(lambda: replies_to(alice.room(room), eid), 30, "the completion reply")
    await alice.wait_for(lambda: h.bot.stats.reconnects >= 1, 30, "the bot to reconnect")
    events = alice.room(room)
    assert len(progress_messages(events, bot)) == 1
    assert _step(current_text(events, eid)) == 40
    # The room also shows the bot working normally afterwards.
    assert "completed" in content_of(await alice.command(room, "!status 1"))["body"]


async def test_bot_started_while_the_homeserver_is_down(world: World, room: str, bots: Any) -> None:
    """The bot starts although Synapse is down; a job submitted meanwhile shows up once it is back."""
    alice, bot = world.alice, world.bot_id
    server = world.hs.server
    await asyncio.to_thread(server.stop)
    try:
        h = await bots(world.config(room), start=False)
        await h.start(wait=False)  # does not fail: the adapter keeps trying in the background
        job = await h.svc.submit("demo.count", {"steps": 3, "delay_ms": 50}, owner=alice.user_id, room=room)
        await h.svc.wait_for(job.id or 0, timeout=30)
        assert not h.bot.ready.is_set()
    finally:
        await asyncio.to_thread(server.start)
    await h.bot.wait_ready(60)
    eid = await job_message(world, room, job.id or 0)
    await alice.wait_for(
        lambda: status_word(current_text(alice.room(room), eid)) == "completed",
        60,
        "the final state once the homeserver is back",
    )
    await alice.wait_for(lambda: replies_to(alice.room(room), eid), 30, "the completion reply")
    assert len(progress_messages(alice.room(room), bot)) == 1
