"""Discord limits each route of a channel in its own bucket: posts, pins and replies never spend edits.

The fake Discord enforces a per-channel edit bucket (here 5 edits per 1.5 s) and, like Discord, separate
roomier buckets per method, route and channel for new messages and pins. The adapter keeps one outbox
per bucket (adapters/discord/transport.py), so while 20 jobs post, pin, unpin and reply, their progress
edits still get the whole edit bucket.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from adapters.discord import DiscordAdapter
from adapters.driver import CallKind
from core.models import Job, JobStatus
from tests.fake_discord import FakeDiscordServer
from tests.integration.discord_harness import (
    bucket_violations,
    make_adapter,
    make_service,
    progress_messages,
    replies_to,
    wait_job,
)

pytest_plugins = ["tests.fake_discord.fixtures"]
pytestmark = [pytest.mark.discord, pytest.mark.slow, pytest.mark.asyncio]

LIMIT, WINDOW = 5, 1.5


def edit_windows(server: FakeDiscordServer) -> list[tuple[float, float, int]]:
    """The fake's fixed edit windows of the channel, replayed from its REST edits: (start, end, edits).

    A window opens with its first edit and lasts ``WINDOW`` (the fake's ``Bucket``)."""
    windows: list[tuple[float, float, int]] = []
    for at in sorted(e.at for e in server.edits if e.channel_id == server.channel_id and e.via == "rest"):
        if windows and at < windows[-1][1]:
            start, end, n = windows[-1]
            windows[-1] = (start, end, n + 1)
        else:
            windows.append((at, at + WINDOW, 1))
    return windows


@contextlib.asynccontextmanager
async def finished_jobs(
    server: FakeDiscordServer, tmp_path: Path, n: int, steps: int
) -> AsyncIterator[tuple[DiscordAdapter, list[Job]]]:
    """``n`` of alice's ``demo.count`` jobs (``steps`` of 100 ms) in the channel, run to their end and
    all delivered; the adapter stops after the block."""
    alice = server.guild.members[0]
    service = await make_service(tmp_path, concurrency=n)
    adapter = await make_adapter(server, service)
    try:
        jobs = [
            await service.submit(
                "demo.count", {"steps": steps, "delay_ms": 100}, owner=alice.id, room=server.channel_id
            )
            for _ in range(n)
        ]
        for job in jobs:
            assert (await wait_job(service, job.id or 0)).status == JobStatus.COMPLETED
        assert await adapter.flush(60)
        yield adapter, jobs
    finally:
        await adapter.stop()
        await service.stop()


@pytest.mark.parametrize("fake_discord_options", [{"edit_limit": LIMIT, "edit_window": WINDOW}])
async def test_posts_pins_and_replies_do_not_spend_the_edit_bucket(
    fake_discord: FakeDiscordServer, tmp_path: Path, fake_discord_options: dict[str, Any]
) -> None:
    """20 jobs in one channel: every post, pin, unpin and reply goes through its own bucket's outbox,
    the edit outbox grants nothing but edits, and windows in which the bot also posted or pinned still
    carry the edit bucket's full 5 edits. No 429 at all, and every final state is on its message."""
    server = fake_discord
    async with finished_jobs(server, tmp_path, 20, steps=20) as (adapter, jobs):
        # What the people see: every job's final state, one reply each, nothing left pinned.
        for job in jobs:
            (msg,) = progress_messages(server, f"#{job.id}")
            assert "completed" in msg.content and not msg.pinned
            assert len(replies_to(server, msg.id)) == 1
        assert server.rate_limit_hits == []
        assert bucket_violations(server, server.channel_id, LIMIT, WINDOW) == 0

        # Each kind of call went through its own bucket's outbox.
        calls = [r for r in server.requests if f"/channels/{server.channel_id}/" in r.path and r.status < 300]
        edits = [r for r in calls if r.method == "PATCH"]
        posts = [r for r in calls if r.method == "POST" and r.path.endswith("/messages")]
        pins = [r for r in calls if "/pins/" in r.path]
        assert len(posts) == 40 and len(pins) == 40  # 20 progress messages + 20 replies; pin + unpin
        assert adapter.transport is not None
        boxes = adapter.transport.outboxes()[server.channel_id]
        assert boxes[CallKind.EDIT].stats.sent == len(edits)
        assert boxes[CallKind.POST].stats.sent == len(posts)
        assert boxes[CallKind.PIN].stats.sent == len(pins)
        assert set(boxes[CallKind.EDIT].stats.by_priority) <= {"answer", "status", "progress"}

        # Posts, pins and replies happened inside windows whose edits still reached the bucket's 5.
        windows = edit_windows(server)
        others = [r.at for r in posts + pins]
        full_and_shared = [
            (start, n) for start, end, n in windows if n == LIMIT and any(start <= at < end for at in others)
        ]
        assert full_and_shared, f"edit windows: {windows}"
        assert max(n for _, _, n in windows) == LIMIT


@pytest.mark.parametrize("fake_discord_options", [{"edit_limit": LIMIT, "edit_window": WINDOW}])
async def test_a_429_on_pins_pauses_only_the_pin_bucket(
    fake_discord: FakeDiscordServer, tmp_path: Path, fake_discord_options: dict[str, Any]
) -> None:
    """Discord refuses the first pin for 2 s: only the pin bucket waits (discord.py retries the pin
    after it), the progress edits go on meanwhile, and in the end every message is pinned and
    unpinned, with its final state."""
    server = fake_discord
    server.force_429(1, retry_after=2.0, route="PUT /channels/{channel_id}/messages/pins/{message_id}")
    async with finished_jobs(server, tmp_path, 3, steps=30) as (adapter, jobs):
        [hit] = server.rate_limit_hits
        assert hit.forced and "/pins/" in hit.path
        paused = [e for e in server.edits if e.via == "rest" and hit.at < e.at < hit.at + hit.retry_after]
        assert paused, "no progress edit while the pin bucket waited out its 429"
        pins = [r for r in server.requests if "/pins/" in r.path and r.method == "PUT" and r.status < 300]
        assert len(pins) == 3
        for job in jobs:
            (msg,) = progress_messages(server, f"#{job.id}")
            assert "completed" in msg.content and not msg.pinned
        assert adapter.transport is not None and adapter.transport.rate_limited == 1
