"""Room boards on Discord (fake Discord at its real 5 edits per 5 s, discord.py's real HTTP and gateway).

A busy channel reports its new jobs on one pinned board message, through the adapter's shared driver:
its lines reach every job's final state, the edits stay within the channel's bucket, the board's select
menu offers a job's Pause / Resume / Cancel buttons (with the job's authorization), and a restart edits
the same board message.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from adapters.board import BoardPolicy
from core.models import JobStatus
from tests.fake_discord import FakeDiscordServer, FakeMessage, FakeUser
from tests.integration.discord_harness import (
    bucket_violations,
    make_adapter,
    make_service,
    organic_429s,
    progress_messages,
    replies_to,
    wait_job,
)

pytest_plugins = ["tests.fake_discord.fixtures"]
pytestmark = [pytest.mark.discord, pytest.mark.slow, pytest.mark.asyncio]

JOBS = 20


def boards_in(server: FakeDiscordServer) -> list[FakeMessage]:
    """The bot's board messages in the default channel."""
    return [
        m
        for m in server.messages_in()
        if m.author.get("id") == server.application_id and m.content.startswith("**📋 Jobs")
    ]


def line_of(text: str, job_id: int) -> str | None:
    """The board line of job ``#id`` (``🔄 **\\#12 demo.count** …``: markdown escapes the ``#``)."""
    return next((ln for ln in text.split("\n") if re.search(rf"\*\*\\?#{job_id}( |\*\*)", ln)), None)


def select_ids(message: FakeMessage) -> list[str]:
    """The custom_ids of the select menus under a message."""
    return [
        c.get("custom_id", "")
        for row in message.components
        for c in row.get("components", [])
        if c.get("type") == 3
    ]


async def choose_and_click(
    server: FakeDiscordServer, board: FakeMessage, user: FakeUser, action: str, job_id: int
) -> Any:
    """Choose a job in the board's select menu, then click ``action`` on the buttons it offers."""
    rec = await server.dispatch_button(
        f"pb:board:{server.channel_id}", board.id, user=user, values=[str(job_id)]
    )
    offer = await server.wait_interaction_response(rec)
    assert offer.ephemeral and f"#{job_id}" in (offer.content or "")
    offered = str(offer.data.get("components"))
    assert all(f"pb:{a}:{job_id}" in offered for a in ("pause", "resume", "cancel"))
    assert offer.message_id is not None
    rec = await server.dispatch_button(f"pb:{action}:{job_id}", offer.message_id, user=user)
    return await server.wait_interaction_response(rec)


@pytest.mark.timeout(300)
async def test_twenty_jobs_report_on_one_pinned_board(
    fake_discord: FakeDiscordServer, tmp_path: Path
) -> None:
    """20 jobs started together in one channel with ``board = "auto"``: a board engages and is pinned;
    its select menu and buttons act on the chosen job, and bob is refused; a ``/run`` meanwhile joins the
    board and is answered within 3 s; every line reaches its final state, with one completion reply
    each; the edits stay within the 5 per 5 s bucket with no 429; the board is unpinned (controls
    removed) at the end; and after the burst a new job gets its own message again."""
    server = fake_discord
    assert (server.edit_limit, server.edit_window) == (5, 5.0)
    alice = server.guild.members[0]
    bob = server.make_user(name="bob")
    service = await make_service(tmp_path, concurrency=JOBS + 2)
    adapter = await make_adapter(server, service, board=BoardPolicy(mode="auto", linger_s=600, quiet_s=3))
    try:
        jobs = [
            await service.submit(
                "demo.count",
                {"steps": 40, "delay_ms": 250},
                owner=alice.id,
                room=server.channel_id,
                name=f"job {i}",
            )
            for i in range(JOBS)
        ]
        ids = [int(j.id or 0) for j in jobs]
        await server.wait_for(lambda: bool(boards_in(server)), 20)
        [board] = boards_in(server)
        await server.wait_for(lambda: any(m.id == board.id for m in server.pinned()), 20)
        assert adapter.driver is not None and adapter.driver.boards is not None
        boards = adapter.driver.boards
        assert boards.started == 1
        on_board = [j for j in ids if boards.room_of(j) == server.channel_id]
        own = [j for j in ids if j not in on_board]
        # At 1 edit/s and 10 s of staleness, at most 5 own messages stay fresh next to a board.
        assert len(own) <= 5 and len(on_board) >= JOBS - 5
        await server.wait_for(lambda: select_ids(server.message(board.id)) != [], 20)
        assert select_ids(server.message(board.id)) == [f"pb:board:{server.channel_id}"]

        # A /run meanwhile (by bob: alice is at her limit of active jobs): its job joins the board, and
        # the command is answered within 3 s, privately (no message of the job's own answers it).
        rec = await server.dispatch_slash_command(
            "run", {"type": "demo.count", "args": "steps=4 delay_ms=100"}, user=bob
        )
        resp = await server.wait_interaction_response(rec, timeout=5)
        assert resp.at - rec.dispatched_at < 3.0
        run_id = JOBS + 1
        await server.wait_for(lambda: boards.room_of(run_id) == server.channel_id, 10)
        await server.wait_for(
            lambda: any(r.ephemeral and f"#{run_id}" in (r.content or "") for r in server.responses_to(rec)),
            10,
        )

        # The select menu offers a job's buttons; bob may not use them on alice's job, alice may.
        target = on_board[-1]
        refused = await choose_and_click(server, board, bob, "pause", target)
        assert refused.ephemeral and f"may not pause job #{target}" in (refused.content or "")
        assert (await service.get(target)).status == JobStatus.RUNNING
        await choose_and_click(server, board, alice, "pause", target)
        await wait_job(service, target, lambda j: j.status == JobStatus.PAUSED)
        # The board shows it at once (a status change); its line may be summarized when 21 don't fit.
        await server.wait_for(lambda: "· 1 paused ·" in server.message(board.id).content.split("\n")[0], 20)
        assert (await service.get(on_board[0])).status == JobStatus.RUNNING  # only the chosen job
        await choose_and_click(server, board, alice, "resume", target)

        for j in [*ids, run_id]:
            assert (await wait_job(service, j, timeout=90)).status == JobStatus.COMPLETED
        await server.wait_for(
            lambda: "board closed" in server.message(board.id).content.split("\n", 1)[0], 60
        )
        text = server.message(board.id).content
        for j in [*on_board, run_id]:
            line = line_of(text, j)
            assert line is not None and line.startswith("✅") and "completed" in line, (j, text)
        for j in own:
            # Own messages share the edit bucket with the board, which may close first.
            [msg] = progress_messages(server, f"#{j}")
            await server.wait_for(lambda mid=msg.id: "completed" in server.message(mid).content, 30)
        assert len(boards_in(server)) == 1 and progress_messages(server, f"#{run_id}") == []

        # Everyone is told: one completion reply per board job, to the board.
        await server.wait_for(lambda: len(replies_to(server, board.id)) == len(on_board) + 1, 30)
        answered = sorted(
            int(m.group(1)) for r in replies_to(server, board.id) if (m := re.search(r"#(\d+)", r.content))
        )
        assert answered == sorted([*on_board, run_id])

        # Unpinned at the end, its controls gone; every edit within the bucket, no 429.
        await server.wait_for(lambda: not server.message(board.id).pinned, 30)
        assert [p.action for p in server.pins_of(board.id)] == ["pin", "unpin"]
        assert server.message(board.id).components == []
        assert organic_429s(server) == []
        assert bucket_violations(server, server.channel_id, 5, 5.0) == 0
        assert adapter.driver.stats.dropped == 0

        # The burst is over: a new job gets its own message again.
        new = await service.submit("demo.count", {"steps": 1}, owner=alice.id, room=server.channel_id)
        await server.wait_for(lambda: len(progress_messages(server, f"#{new.id}")) == 1, 20)
        assert boards.room_of(int(new.id or 0)) is None and len(boards_in(server)) == 1
    finally:
        await adapter.stop()
        await service.stop()


@pytest.mark.timeout(180)
async def test_a_restart_mid_board_edits_the_same_board(
    fake_discord: FakeDiscordServer, tmp_path: Path
) -> None:
    """With ``board = "always"``: the board answers the ``/run`` that starts its first job; stop the bot
    mid-board and start a new one; the same board message is edited to the end, and no second board
    (or message of a job's own) appears."""
    server = fake_discord
    alice = server.guild.members[0]
    service = await make_service(tmp_path, concurrency=4)
    policy = BoardPolicy(mode="always", quiet_s=2)
    adapter = await make_adapter(server, service, board=policy)
    try:
        rec = await server.dispatch_slash_command(
            "run", {"type": "demo.count", "args": "steps=40 delay_ms=150"}, user=alice
        )
        resp = await server.wait_interaction_response(rec, timeout=5)
        assert resp.at - rec.dispatched_at < 3.0 and not resp.ephemeral
        for _ in range(2):
            await service.submit(
                "demo.count", {"steps": 40, "delay_ms": 150}, owner=alice.id, room=server.channel_id
            )
        ids = [1, 2, 3]
        await server.wait_for(lambda: bool(boards_in(server)), 20)
        [board] = boards_in(server)
        assert board.id == resp.message_id  # the board itself answers the /run
        await server.wait_for(lambda: "running" in server.message(board.id).content, 20)
    finally:
        await adapter.stop()
    edits_before = len(server.edits_of(board.id))

    adapter = await make_adapter(server, service, board=policy)
    try:
        await server.wait_for(
            lambda: "board closed" in server.message(board.id).content.split("\n", 1)[0], 60
        )
        assert len(server.edits_of(board.id)) > edits_before
        assert len(boards_in(server)) == 1
        assert all(progress_messages(server, f"#{j}") == [] for j in ids)  # no job got a message of its own
        text = server.message(board.id).content
        assert all((line_of(text, j) or "").startswith("✅") for j in ids), text
        await server.wait_for(lambda: len(replies_to(server, board.id)) == 3, 20)
    finally:
        await adapter.stop()
        await service.stop()
