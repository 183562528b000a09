"""Ten fast jobs in one room with Synapse's DEFAULT message limit (burst ~10, then one per ~5 s).

The bot here is its own account with no rate-limit override, so every 429 is real. What must hold:
no edit fails for good, every job's final state ends up on its message, and no message ever shows an
older state after a newer one. Pins, reactions and completion replies are off in this test: they are
covered elsewhere, and each is one more message through the same tight budget (about five seconds
each), which would only make the suite slower without testing anything new.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.integration.matrix_helpers import (
    World,
    current_text,
    progress_for,
    progress_messages,
    status_word,
    texts_of,
)

pytest_plugins = ["tests.servers.conftest_plugin", "tests.integration.matrix_fixtures"]

pytestmark = [pytest.mark.matrix, pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

JOBS = 10
STEPS = 20
RANK = {"pending": 0, "running": 1, "paused": 1, "completed": 2, "failed": 2, "cancelled": 2}


def progress_key(text: str) -> tuple[int, int]:
    """Order of a progress text: (status rank, step shown). It must never go down along the edits."""
    word = status_word(text) or "pending"
    m = re.search(r"\((\d+)/\d+\)", text)
    return RANK[word], int(m.group(1)) if m else (STEPS if word == "completed" else 0)


@pytest.mark.timeout(400)
async def test_ten_fast_jobs_under_default_rate_limits(world: World, bots: Any) -> None:
    """Every job ends on its message with its final state; no edit is lost for good or out of order."""
    hs = world.hs
    ratebot = hs.register("ratebot", "ratebot-password")  # no override: Synapse's default rc_message
    room = await world.new_room(bot=ratebot.user_id)
    cfg = world.config(
        room,
        user_id=ratebot.user_id,
        access_token=None,
        password=ratebot.password,
        pin=False,
        react=False,
        reply_on_finish=False,
    )
    h = await bots(cfg, concurrency=JOBS)
    alice = world.alice
    jobs = [
        await h.svc.submit("demo.count", {"steps": STEPS, "delay_ms": 100}, owner=alice.user_id, room=room)
        for _ in range(JOBS)
    ]

    def all_final() -> bool:
        events = alice.room(room)
        for job in jobs:
            msgs = progress_for(events, ratebot.user_id, job.id or 0)
            if not msgs or status_word(current_text(events, msgs[0]["event_id"])) != "completed":
                return False
        return True

    await alice.wait_for(all_final, 300, "every job's final state on its message")
    events = alice.room(room)

    # One message per job, and each shows its final state.
    assert len(progress_messages(events, ratebot.user_id)) == JOBS
    for job in jobs:
        [msg] = progress_for(events, ratebot.user_id, job.id or 0)
        texts = texts_of(events, msg["event_id"])
        assert status_word(texts[-1]) == "completed"
        # No stale edit after a newer one: status and step only ever move forward.
        keys = [progress_key(t) for t in texts]
        assert keys == sorted(keys), (job.id, texts)
        assert sum(1 for t in texts if status_word(t) == "completed") == 1

    driver, transport = h.bot.driver, h.bot.transport
    assert driver is not None and transport is not None
    assert driver.stats.dropped == 0  # no edit failed for good
    assert transport.rate_limited > 0  # the test really ran into Synapse's limit
    assert driver.stats.coalesced > 0  # and latest-wins coalesced the states it could not send
    assert driver.stats.failed_requests == 0  # 429s are not failures; nothing else went wrong
    assert driver.stats.posts == JOBS
