"""Room boards on a real Synapse: a busy room reports on one pinned board message.

The first test's bot is its own account at Synapse's DEFAULT message limit (burst ~10, then one event
per ~5 s), so every budget decision is the real one. Reactions are off (a board offers none anyway, and
each reaction on the two own messages would cost 5 s of budget).
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from adapters.board import BoardPolicy
from tests.integration.matrix_helpers import (
    World,
    content_of,
    current_text,
    pin_history,
    progress_for,
    progress_messages,
    relates,
    replies_to,
    status_word,
    texts_of,
)

pytest_plugins = ["tests.servers.conftest_plugin", "tests.integration.matrix_fixtures"]

pytestmark = [pytest.mark.matrix, pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

JOBS = 12


def boards_in(events: list[Any], bot: str) -> list[Any]:
    """The bot's board messages (originals)."""
    return [e for e in progress_messages(events, bot) if content_of(e).get("body", "").startswith("📋")]


def line_of(text: str, job_id: int) -> str | None:
    """The board line of job ``#id``."""
    return next((ln for ln in text.split("\n") if re.search(rf" #{job_id} ", ln + " ")), None)


@pytest.mark.timeout(600)
async def test_twelve_jobs_at_default_limits_report_on_one_pinned_board(world: World, bots: Any) -> None:
    """A board engages; every line reaches its final state; commands by id act on a board job and bob
    is refused; everyone gets a completion reply; the board is pinned while active and unpinned at
    the end; few 429s; after the burst a new job gets its own message again."""
    hs, alice, bob = world.hs, world.alice, world.bob
    boardbot = hs.register("boardbot", "boardbot-password")  # no override: Synapse's default rc_message
    room = await world.new_room(bot=boardbot.user_id)
    cfg = world.config(
        room, user_id=boardbot.user_id, access_token=None, password=boardbot.password, react=False
    )
    cfg.start_rate = 0.2  # the adapter's default first guess (the module's config lifts it)
    h = await bots(cfg, concurrency=JOBS + 1, board=BoardPolicy(linger_s=600))
    bot = boardbot.user_id
    jobs = [
        await h.svc.submit("demo.count", {"steps": 30, "delay_ms": 1000}, owner=alice.user_id, room=room)
        for _ in range(JOBS)
    ]
    ids = [int(j.id or 0) for j in jobs]
    first = await alice.wait_for(lambda: (b := boards_in(alice.room(room), bot)) and b[0], 60, "a board")
    board = str(first["event_id"])
    await alice.wait_for(
        lambda: any(board in pins for pins in pin_history(alice.room(room))), 90, "the board pinned"
    )
    boards = h.bot.driver.boards if h.bot.driver is not None else None
    assert boards is not None and boards.started == 1
    on_board = [j for j in ids if boards.room_of(j) == room]
    own = [j for j in ids if j not in on_board]
    assert len(on_board) >= JOBS - 3 and len(own) <= 3  # at 0.2 events/s, two messages stay fresh

    # Commands work by id on a board job: bob may not pause alice's job; alice may.
    target = on_board[-1]
    refusal = await bob.command(room, f"!pause {target}", timeout=60)
    assert f"may not pause job #{target}" in content_of(refusal)["body"]
    await alice.send_text(room, f"!pause {target}")
    await alice.wait_for(
        lambda: "paused" in (line_of(current_text(alice.room(room), board), target) or ""),
        60,
        "the paused job on the board",
    )
    assert h.svc.store is not None and (await h.svc.get(target)).status == "paused"
    await alice.send_text(room, f"!resume {target}")

    def board_done() -> bool:
        text = current_text(alice.room(room), board)
        return "board closed" in text.split("\n", 1)[0]

    await alice.wait_for(board_done, 420, "the board's final edit")
    events = alice.room(room)
    text = current_text(events, board)
    for j in on_board:
        line = line_of(text, j)
        assert line is not None and line.startswith("✅") and "completed" in line, (j, text)
    for j in own:
        [msg] = progress_for(events, bot, j)
        assert status_word(current_text(events, msg["event_id"])) == "completed"
    assert len(boards_in(events, bot)) == 1  # one board, never a second one

    # Everyone is told: one completion reply per board job, to the board, mentioning alice.
    answers = [r for r in replies_to(events, board) if relates(r).get("rel_type") != "m.replace"]
    assert sorted(
        int(m.group(1)) for r in answers if (m := re.search(r"#(\d+)", content_of(r)["body"]))
    ) == sorted(on_board)
    assert all(content_of(r)["m.mentions"] == {"user_ids": [alice.user_id]} for r in answers)

    # Unpinned at the end.
    await alice.wait_for(lambda: board not in pin_history(alice.room(room))[-1], 120, "the board unpinned")
    texts = texts_of(events, board)
    assert any("running" in t for t in texts)  # it really showed the jobs as they ran

    driver, transport = h.bot.driver, h.bot.transport
    assert driver is not None and transport is not None
    assert driver.stats.dropped == 0
    assert transport.rate_limited <= 3  # the outbox learns the rate from its first two 429s

    # The burst is over: a new job gets its own message again.
    new = await h.svc.submit("demo.count", {"steps": 1}, owner=alice.user_id, room=room)
    msg = await alice.wait_for(
        lambda: [e for e in progress_for(alice.room(room), bot, new.id or 0) if e["event_id"] != board],
        90,
        "the new job's own message",
    )
    assert msg and not content_of(msg[0])["body"].startswith("📋")


@pytest.mark.timeout(300)
async def test_a_restart_mid_board_edits_the_same_board(world: World, room: str, bots: Any) -> None:
    """With ``board = "always"``: stop the bot mid-board and start it again; the same board message is
    edited to the end, and no second board (or own message) appears."""
    alice = world.alice
    cfg = world.config(room, access_token=None, password=world.hs.bot_password, react=False)
    h = await bots(cfg, concurrency=4, board=BoardPolicy(mode="always"))
    for _ in range(3):
        await h.svc.submit("demo.count", {"steps": 40, "delay_ms": 150}, owner=alice.user_id, room=room)
    first = await alice.wait_for(
        lambda: (b := boards_in(alice.room(room), world.bot_id)) and b[0], 30, "a board"
    )
    board = str(first["event_id"])
    await alice.wait_for(
        lambda: "running" in current_text(alice.room(room), board), 30, "the jobs running on the board"
    )
    await h.stop()
    edits_before = len(texts_of(alice.room(room), board))
    await h.start()
    await alice.wait_for(
        lambda: "board closed" in current_text(alice.room(room), board), 120, "the same board to end"
    )
    events = alice.room(room)
    assert len(texts_of(events, board)) > edits_before
    assert len(boards_in(events, world.bot_id)) == 1
    assert len(progress_messages(events, world.bot_id)) == 1  # no job got a message of its own
    text = current_text(events, board)
    assert all((line_of(text, j) or "").startswith("✅") for j in (1, 2, 3)), text
