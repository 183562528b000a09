"""The Discord adapter end to end: discord.py's real HTTP and gateway code against the local fake Discord.

Each test starts a service on SQLite, the adapter (a real ``discord.Client``) logged in to the fake,
and drives it through the fake: slash commands, autocomplete and button clicks, as Discord would send
them. Assertions read what the fake recorded: messages, edits, pins, interaction responses, 429s.
Time-dependent Discord rules (edit buckets, the 1-hour edit window) run on the fake's clock.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from core.models import JobStatus
from tests.fake_discord import FakeDiscordServer, FakeUser
from tests.integration.discord_harness import (
    EDIT_ROUTE,
    bucket_violations,
    button_states,
    counters,
    edit_contents,
    make_adapter,
    make_service,
    organic_429s,
    progress_messages,
    replies_to,
    wait_job,
)

pytest_plugins = ["tests.fake_discord.fixtures"]
pytestmark = [pytest.mark.discord, pytest.mark.slow, pytest.mark.asyncio]

NO_MENTIONS: dict[str, Any] = {"parse": []}


def only_progress_message(server: FakeDiscordServer, job_id: int) -> Any:
    """The single progress message of a job (fails if there are none or several)."""
    msgs = progress_messages(server, f"#{job_id}")
    assert len(msgs) == 1, f"expected one progress message for #{job_id}, got {[m.content for m in msgs]}"
    return msgs[0]


async def test_run_demo_count_one_pinned_message(fake_discord: FakeDiscordServer, tmp_path: Path) -> None:
    """``/run demo.count``: the answer to the command IS the progress message (no "Started" notice):
    pinned, edited within the 5/5 s bucket (no 429) until ``completed``, unpinned at the end, buttons
    removed, and one completion reply mentioning the owner. Four events in the channel in all (pin,
    edits, unpin, reply) besides the answer and the edits."""
    server = fake_discord
    assert (server.edit_limit, server.edit_window) == (5, 5.0)  # Discord's observed per-channel edit limit
    service = await make_service(tmp_path)
    adapter = await make_adapter(server, service)
    try:
        alice = server.guild.members[0]
        assert {c["name"] for c in server.commands(server.guild_id)} == {
            "jobs",
            "status",
            "run",
            "pause",
            "resume",
            "cancel",
            "retry",
        }
        rec = await server.dispatch_slash_command(
            "run", {"type": "demo.count", "args": "steps=8 delay_ms=150"}, user=alice
        )
        resp = await server.wait_interaction_response(rec)
        assert resp.type == 4 and not resp.ephemeral and "**#1** demo.count" in (resp.content or "")
        assert resp.at - rec.dispatched_at < 3.0
        job = await wait_job(service, 1)
        assert job.status == JobStatus.COMPLETED and job.owner == alice.id and job.room == server.channel_id

        await server.wait_for(lambda: len(progress_messages(server, "#1")) == 1, 10)
        msg = only_progress_message(server, 1)
        assert msg.id == resp.message_id and msg.interaction_id == rec.id  # the answer is the message
        await server.wait_for(lambda: len(replies_to(server, msg.id)) == 1, 15)

        contents = edit_contents(server, msg.id)
        assert "completed" in msg.content and "#1" in msg.content and contents[-1] == msg.content
        assert all("completed" not in c for c in contents[:-1])  # the final state is the last edit
        shown = [c for c in (counters(x) for x in contents) if c is not None]
        assert shown == sorted(shown) and shown[-1] == (8, 8)  # never an older state after a newer one
        assert await adapter.flush(10)  # the unpin may follow the reply
        assert [p.action for p in server.pins_of(msg.id)] == ["pin", "unpin"] and not msg.pinned
        assert msg.components == []  # buttons removed at the end
        assert msg.allowed_mentions == NO_MENTIONS
        # While it ran, the message carried the three persistent buttons with the job id.
        first = server.edits_of(msg.id)[0].message_after
        ids = {c["custom_id"] for row in first["components"] for c in row["components"]}
        assert ids == {"pb:pause:1", "pb:resume:1", "pb:cancel:1"}

        assert organic_429s(server) == [] and bucket_violations(server, server.channel_id, 5, 5.0) == 0
        (reply,) = replies_to(server, msg.id)
        assert reply.content.startswith(f"<@{alice.id}> ") and "completed" in reply.content
        mentions = reply.allowed_mentions or {}
        assert mentions.get("parse") == [] and [str(u) for u in mentions.get("users", [])] == [alice.id]
        assert len(progress_messages(server)) == 1  # nothing else was posted
        assert [m.id for m in server.messages_in()] == [msg.id, reply.id]  # no "Started" notice
        # Events per job in the channel: the pin, the edits, the unpin and the reply (the post was the
        # answer to /run, on the interaction's own route).
        channel_calls = [r for r in server.requests if "/channels/" in r.path and r.method != "GET"]
        assert len(channel_calls) == 3 + len(server.edits_of(msg.id)), [r.path for r in channel_calls]
    finally:
        await adapter.stop()
        await service.stop()


@pytest.mark.parametrize("fake_discord_options", [{"edit_limit": 5, "edit_window": 1.0}])
async def test_commands_and_buttons_pause_resume_cancel(
    fake_discord: FakeDiscordServer, tmp_path: Path, fake_discord_options: dict[str, Any]
) -> None:
    """Pause, resume and cancel work from slash commands and from the buttons, for the owner, a
    moderator (Manage Messages) and an admin (``discord:<id>`` in ``auth.admins``); the buttons follow
    the job's state and disappear at the end."""
    server = fake_discord
    alice = server.guild.members[0]
    mod = server.make_moderator(name="mod")
    admin = server.make_user(name="admin")
    service = await make_service(tmp_path)
    adapter = await make_adapter(server, service, admins=(f"discord:{admin.id}",))
    try:
        rec = await server.dispatch_slash_command(
            "run", {"type": "demo.count", "args": '{"steps": 400, "delay_ms": 25}'}, user=alice
        )
        assert "**#1**" in ((await server.wait_interaction_response(rec)).content or "")
        await server.wait_for(lambda: len(progress_messages(server, "#1")) == 1)
        msg = only_progress_message(server, 1)
        await server.wait_for(lambda: "running" in server.message(msg.id).content)

        async def shows(word: str, buttons: dict[str, bool]) -> None:
            await server.wait_for(
                lambda: (
                    word in server.message(msg.id).content.split("\n")[0]
                    and button_states(server.message(msg.id)) == buttons
                ),
                10,
            )

        # /pause by the owner in the job's channel: the progress message is the acknowledgement ("paused
        # by @alice"), the command gets a private confirmation, and the channel no extra message.
        in_channel = len(server.messages_in())
        rec = await server.dispatch_slash_command("pause", {"id": "1"}, user=alice)
        resp = await server.wait_interaction_response(rec)
        assert resp.ephemeral and resp.content == "Pausing #1 at its next checkpoint."
        await wait_job(service, 1, lambda j: j.status == JobStatus.PAUSED)
        await shows("paused", {"pause": False, "resume": True, "cancel": True})
        assert f"paused by <@{alice.id}>" in server.message(msg.id).content
        assert len([m for m in server.messages_in() if not m.ephemeral]) == in_channel
        assert "/resume 1" in server.message(msg.id).content  # the hint names the command

        # The Resume button, clicked by the owner: an ephemeral confirmation, the job runs again.
        rec = await server.dispatch_button("pb:resume:1", msg.id, user=alice)
        resp = await server.wait_interaction_response(rec)
        assert resp.ephemeral and resp.content == "Resumed #1."
        await wait_job(service, 1, lambda j: j.status == JobStatus.RUNNING)
        await shows("running", {"pause": True, "resume": False, "cancel": True})

        # The Pause button, clicked by a moderator who does not own the job.
        rec = await server.dispatch_button("pb:pause:1", msg.id, user=mod)
        assert (await server.wait_interaction_response(rec)).ephemeral
        await wait_job(service, 1, lambda j: j.status == JobStatus.PAUSED)
        await shows("paused", {"pause": False, "resume": True, "cancel": True})

        # /resume by an admin listed as discord:<id>.
        rec = await server.dispatch_slash_command("resume", {"id": "1"}, user=admin)
        assert (await server.wait_interaction_response(rec)).content == "Resumed #1."
        await wait_job(service, 1, lambda j: j.status == JobStatus.RUNNING)

        # /cancel by the owner: final state, buttons gone, unpinned, one reply.
        rec = await server.dispatch_slash_command("cancel", {"id": "1"}, user=alice)
        assert (await server.wait_interaction_response(rec)).ephemeral
        job = await wait_job(service, 1)
        assert job.status == JobStatus.CANCELLED
        await server.wait_for(lambda: len(replies_to(server, msg.id)) == 1, 10)
        final = server.message(msg.id)
        assert f"cancelled by <@{alice.id}>" in final.content and final.components == []
        assert await adapter.flush(10)  # the unpin may follow the reply
        assert not final.pinned

        # A second job, cancelled with its button, then retried: the same message comes back to life.
        job2 = await service.submit(
            "demo.count", {"steps": 30, "delay_ms": 25}, owner=alice.id, room=server.channel_id
        )
        await server.wait_for(lambda: len(progress_messages(server, f"#{job2.id}")) == 1)
        msg2 = only_progress_message(server, job2.id or 0)
        await server.wait_for(lambda: bool(button_states(server.message(msg2.id))))
        rec = await server.dispatch_button(f"pb:cancel:{job2.id}", msg2.id, user=alice)
        assert (await server.wait_interaction_response(rec)).ephemeral
        assert (await wait_job(service, job2.id or 0)).status == JobStatus.CANCELLED
        await server.wait_for(lambda: len(replies_to(server, msg2.id)) == 1, 10)
        assert "cancelled" in server.message(msg2.id).content and server.message(msg2.id).components == []

        rec = await server.dispatch_slash_command("retry", {"id": str(job2.id)}, user=alice)
        assert (await server.wait_interaction_response(rec)).content == f"Retrying #{job2.id}."
        assert (
            await wait_job(service, job2.id or 0, lambda j: j.status == JobStatus.COMPLETED)
        ).attempts >= 1
        await server.wait_for(lambda: len(replies_to(server, msg2.id)) == 2, 10)
        assert "completed" in server.message(msg2.id).content
        assert await adapter.flush(10)
        # Pinned while active, unpinned at the end (an unpin still waiting when the retry came is
        # simply not needed: pins are cosmetic, latest wins).
        actions = [p.action for p in server.pins_of(msg2.id)]
        assert actions[-1] == "unpin" and actions == ["pin", "unpin"] * (len(actions) // 2)
        assert not server.message(msg2.id).pinned
        assert len(progress_messages(server, f"#{job2.id}")) == 1
        assert organic_429s(server) == []
    finally:
        await adapter.stop()
        await service.stop()


@pytest.mark.parametrize("fake_discord_options", [{"edit_limit": 5, "edit_window": 1.0}])
async def test_unauthorized_users_get_ephemeral_refusals(
    fake_discord: FakeDiscordServer, tmp_path: Path, fake_discord_options: dict[str, Any]
) -> None:
    """A member who neither owns the job nor moderates is refused, ephemerally, by command and by button;
    the job keeps running. The control role may act. Errors and other channels get ephemeral answers."""
    server = fake_discord
    alice = server.guild.members[0]
    bob = server.make_user(name="bob")
    server.add_role("1400000000000000077", "Job Operators")
    operator = server.make_user(name="operator", roles=["1400000000000000077"])
    service = await make_service(tmp_path)
    adapter = await make_adapter(server, service, control_role="Job Operators")
    try:
        job = await service.submit(
            "demo.count", {"steps": 400, "delay_ms": 25}, owner=alice.id, room=server.channel_id
        )
        await server.wait_for(lambda: len(progress_messages(server, "#1")) == 1)
        msg = only_progress_message(server, job.id or 0)
        await server.wait_for(lambda: bool(button_states(server.message(msg.id))))

        rec = await server.dispatch_slash_command("pause", {"id": "1"}, user=bob)
        resp = await server.wait_interaction_response(rec)
        assert resp.type == 4 and resp.ephemeral and "may not pause job #1" in (resp.content or "")
        rec = await server.dispatch_button("pb:cancel:1", msg.id, user=bob)
        resp = await server.wait_interaction_response(rec)
        assert resp.ephemeral and "may not cancel job #1" in (resp.content or "")
        assert (await service.get(1)).status == JobStatus.RUNNING

        # Unknown ids and bad input: a clear, ephemeral answer.
        rec = await server.dispatch_slash_command("status", {"id": "99"}, user=bob)
        resp = await server.wait_interaction_response(rec)
        assert resp.ephemeral and "No job #99" in (resp.content or "")
        rec = await server.dispatch_slash_command("run", {"type": "no.such.type"}, user=bob)
        assert (await server.wait_interaction_response(rec)).ephemeral
        # Another channel of the guild is not served.
        rec = await server.dispatch_slash_command(
            "status", {"id": "1"}, user=alice, channel_id="1300000000000000002"
        )
        resp = await server.wait_interaction_response(rec)
        assert resp.ephemeral and "only works in" in (resp.content or "")

        # The control role may act on anyone's job.
        rec = await server.dispatch_slash_command("pause", {"id": "1"}, user=operator)
        assert (await server.wait_interaction_response(rec)).content == "Pausing #1 at its next checkpoint."
        await wait_job(service, 1, lambda j: j.status == JobStatus.PAUSED)
        # Nothing leaked into the channel: the refusals were ephemeral.
        assert not [m for m in server.messages_in() if "may not" in m.content]
    finally:
        await adapter.stop()
        await service.stop()


@pytest.mark.parametrize("fake_discord_options", [{"edit_limit": 5, "edit_window": 1.0}])
async def test_slow_answers_are_deferred(
    fake_discord: FakeDiscordServer, tmp_path: Path, fake_discord_options: dict[str, Any]
) -> None:
    """When the work may outlast Discord's 3 s, the adapter defers and follows up; a refusal then
    replaces the public "thinking" placeholder with an ephemeral follow-up."""
    server = fake_discord
    alice = server.guild.members[0]
    bob = server.make_user(name="bob")
    service = await make_service(tmp_path)
    adapter = await make_adapter(server, service, defer_after=0.0)  # defer every time
    try:
        job = await service.submit("demo.count", {"steps": 400, "delay_ms": 25}, owner=alice.id)
        rec = await server.dispatch_slash_command("status", {"id": str(job.id)}, user=alice)
        assert (await server.wait_interaction_response(rec)).type == 5
        (follow,) = await server.wait_followup(rec)
        assert not follow.ephemeral and f"#{job.id} demo.count" in follow.payload["content"]

        rec = await server.dispatch_slash_command("cancel", {"id": str(job.id)}, user=bob)
        resp = await server.wait_interaction_response(rec)
        assert resp.type == 5 and not resp.ephemeral
        await server.wait_followup(rec, count=2)  # delete the placeholder, then the private answer
        actions = [(f.action, f.ephemeral) for f in server.followups_of(rec)]
        assert actions == [("delete", False), ("create", True)]
        assert "may not cancel" in server.followups_of(rec)[-1].payload["content"]

        # /run deferred: the "thinking…" placeholder is filled with the job's progress message itself.
        rec = await server.dispatch_slash_command(
            "run", {"type": "demo.count", "args": "steps=3 delay_ms=50"}, user=alice
        )
        resp = await server.wait_interaction_response(rec)
        assert resp.type == 5 and not resp.ephemeral
        await server.wait_followup(rec)
        assert [f.action for f in server.followups_of(rec)] == ["edit"]
        await server.wait_for(lambda: len(replies_to(server, resp.message_id or "")) == 1, 10)
        (msg,) = progress_messages(server, "#2")
        assert msg.id == resp.message_id and "completed" in server.message(msg.id).content
        # A refused /run after the deferral: the public placeholder goes, the refusal is private.
        rec = await server.dispatch_slash_command("run", {"type": "no.such.type"}, user=bob)
        await server.wait_followup(rec, count=2)
        assert [(f.action, f.ephemeral) for f in server.followups_of(rec)] == [
            ("delete", False),
            ("create", True),
        ]
        assert server.errors_with_code(10062) == []  # every answer was in time
    finally:
        await adapter.stop()
        await service.stop()


@pytest.mark.parametrize("fake_discord_options", [{"edit_limit": 5, "edit_window": 1.0}])
async def test_autocomplete_lists_active_jobs_first(
    fake_discord: FakeDiscordServer, tmp_path: Path, fake_discord_options: dict[str, Any]
) -> None:
    """The job-id option autocompletes: active jobs first (running, paused, pending) with name and
    percent, then finished ones; typing filters by id or name."""
    server = fake_discord
    alice = server.guild.members[0]
    service = await make_service(tmp_path, concurrency=2)
    adapter = await make_adapter(server, service)
    try:
        done = await service.submit("demo.count", {"steps": 1, "delay_ms": 0}, name="quick one")
        await wait_job(service, done.id or 0)
        running = await service.submit("demo.count", {"steps": 400, "delay_ms": 25}, name="nightly build")
        paused = await service.submit("demo.count", {"steps": 400, "delay_ms": 25}, name="backfill")
        await wait_job(service, paused.id or 0, lambda j: j.status == JobStatus.RUNNING)
        await service.pause(paused.id or 0)
        await wait_job(service, paused.id or 0, lambda j: j.status == JobStatus.PAUSED)
        pending = await service.submit("demo.count", {"steps": 5}, name="later", delay=60)
        await wait_job(service, running.id or 0, lambda j: (j.progress_current or 0) >= 2)

        rec = await server.dispatch_autocomplete("pause", "id", "", user=alice)
        resp = await server.wait_interaction_response(rec)
        assert resp.type == 8
        values = [c["value"] for c in resp.choices]
        assert values == [str(running.id), str(paused.id), str(pending.id), str(done.id)]
        names = [c["name"] for c in resp.choices]
        assert names[0].startswith(f"#{running.id} nightly build — running ") and names[0].endswith("%")
        assert names[1].startswith(f"#{paused.id} backfill — paused")
        assert all(len(n) <= 100 for n in names)

        rec = await server.dispatch_autocomplete("status", "id", "night", user=alice)
        assert [c["value"] for c in (await server.wait_interaction_response(rec)).choices] == [
            str(running.id)
        ]
        rec = await server.dispatch_autocomplete("run", "type", "demo", user=alice)
        assert [c["value"] for c in (await server.wait_interaction_response(rec)).choices] == ["demo.count"]
    finally:
        await adapter.stop()
        await service.stop()


@pytest.mark.parametrize("fake_discord_options", [{"edit_limit": 10, "edit_window": 1.0}])
async def test_twenty_fast_jobs_share_the_channel_budget(
    fake_discord: FakeDiscordServer, tmp_path: Path, fake_discord_options: dict[str, Any]
) -> None:
    """20 jobs reporting fast in one channel: the edits stay within the channel's bucket (no 429 of the
    fake's own), every final state is delivered, no older state ever follows a newer one, slash commands
    are answered within the 3 s deadline meanwhile, and a forced 429 is waited out and recovered from.
    (The bucket is scaled to 10 per 1 s to keep the test short.)"""
    server = fake_discord
    alice = server.guild.members[0]
    service = await make_service(tmp_path, concurrency=20)
    adapter = await make_adapter(server, service)
    try:
        jobs = [
            await service.submit(
                "demo.count",
                {"steps": 15, "delay_ms": 60},
                owner=alice.id,
                room=server.channel_id,
                name=f"job {i}",
            )
            for i in range(20)
        ]
        # Mid-run, Discord refuses two edits: discord.py waits them out, the scheduler pauses the channel.
        await server.wait_for(lambda: len(server.edits) >= 10, 10)
        server.force_429(2, retry_after=0.3, route=EDIT_ROUTE)
        # People are answered within the 3 s interaction deadline, whatever the edit backlog.
        for job in jobs[:3]:
            rec = await server.dispatch_slash_command("status", {"id": str(job.id)}, user=alice)
            resp = await server.wait_interaction_response(rec, timeout=5)
            assert resp.at - rec.dispatched_at < 3.0 and f"#{job.id}" in (resp.content or "")
        # /run too: its answer is the new job's progress message, at once or after a deferral. (bob asks:
        # alice's 20 jobs are over the per-user cap of active jobs.)
        rec = await server.dispatch_slash_command(
            "run", {"type": "demo.count", "args": "steps=3 delay_ms=10"}, user=server.make_user(name="bob")
        )
        resp = await server.wait_interaction_response(rec, timeout=5)
        assert resp.at - rec.dispatched_at < 3.0 and not resp.ephemeral
        assert resp.type == 5 or "**#21**" in (resp.content or "")
        for job in jobs:
            assert (await wait_job(service, job.id or 0)).status == JobStatus.COMPLETED
        await server.wait_for(
            lambda: sum(len(replies_to(server, m.id)) for m in progress_messages(server)) == 21, 30
        )
        (run_msg,) = progress_messages(server, "#21")
        assert run_msg.id == resp.message_id and "completed" in server.message(run_msg.id).content
        assert await adapter.flush(30)  # the unpins may follow the replies

        for job in jobs:
            msg = only_progress_message(server, job.id or 0)
            contents = edit_contents(server, msg.id)
            assert "completed" in msg.content and counters(msg.content) == (15, 15)
            assert all("completed" not in c for c in contents[:-1])
            shown = [c for c in (counters(x) for x in contents) if c is not None]
            assert shown == sorted(shown), f"#{job.id} showed an older state after a newer one: {shown}"
            assert not msg.pinned and msg.components == []
            assert len(replies_to(server, msg.id)) == 1
        assert len(progress_messages(server)) == 21
        # Events per job in the channel (post, pin, edits, unpin, reply), all within the bucket.
        calls = [
            r for r in server.requests if "/channels/" in r.path and r.method != "GET" and r.status != 429
        ]
        per_job = len(calls) / 21
        print(f"discord: {per_job:.1f} channel events per job for 21 jobs")
        assert 2 <= per_job <= 4 + 15  # post (or the /run answer), final edit, reply; pins while active
        forced = [h for h in server.rate_limit_hits if h.forced]
        assert len(forced) == 2 and organic_429s(server) == []
        assert bucket_violations(server, server.channel_id, 10, 1.0) == 0
        assert adapter.stats()["rate_limited"] == 2
    finally:
        await adapter.stop()
        await service.stop()


@pytest.mark.parametrize("fake_discord_options", [{"edit_limit": 5, "edit_window": 1.0}])
async def test_restart_keeps_the_message_and_its_buttons(
    fake_discord: FakeDiscordServer, tmp_path: Path, fake_discord_options: dict[str, Any]
) -> None:
    """After a restart (a new service and a new bot on the same database), the old message's buttons
    still work and the same message is edited to the end; nothing is posted twice."""
    server = fake_discord
    alice = server.guild.members[0]
    service = await make_service(tmp_path)
    adapter = await make_adapter(server, service)
    try:
        rec = await server.dispatch_slash_command(
            "run", {"type": "demo.count", "args": "steps=60 delay_ms=25"}, user=alice
        )
        await server.wait_interaction_response(rec)
        await server.wait_for(lambda: len(progress_messages(server, "#1")) == 1)
        msg = only_progress_message(server, 1)
        await server.wait_for(lambda: bool(button_states(server.message(msg.id))))
        rec = await server.dispatch_button("pb:pause:1", msg.id, user=alice)
        await server.wait_interaction_response(rec)
        await wait_job(service, 1, lambda j: j.status == JobStatus.PAUSED)
        await server.wait_for(lambda: button_states(server.message(msg.id)).get("resume") is True, 10)
    finally:
        await adapter.stop()
        await service.stop()
    identifies = len(server.identifies)
    edits_before = len(server.edits_of(msg.id))

    service = await make_service(tmp_path)
    adapter = await make_adapter(server, service)
    try:
        assert len(server.identifies) == identifies + 1  # really a new gateway session
        # The new process adopts the stored binding: the same message is refreshed, none is posted.
        await server.wait_for(lambda: len(server.edits_of(msg.id)) > edits_before, 10)
        assert adapter.message_id("job", 1) == int(msg.id)
        # The old message's Resume button is handled by the new process.
        rec = await server.dispatch_button("pb:resume:1", msg.id, user=alice)
        resp = await server.wait_interaction_response(rec)
        assert resp.ephemeral and resp.content == "Resumed #1."
        job = await wait_job(service, 1)
        assert job.status == JobStatus.COMPLETED and job.result["steps"] == 60
        await server.wait_for(lambda: len(replies_to(server, msg.id)) == 1, 10)
        final = server.message(msg.id)
        assert await adapter.flush(10)  # the unpin may follow the reply
        assert "completed" in final.content and not final.pinned and final.components == []
        assert len(progress_messages(server)) == 1
        binding = await service.store.get_binding("discord", "job", 1)
        assert binding is not None and binding.message_id == msg.id and binding.finished
    finally:
        await adapter.stop()
        await service.stop()


@pytest.mark.parametrize("fake_discord_options", [{"edit_limit": 5, "edit_window": 1.0}])
async def test_long_job_moves_to_a_fresh_message_before_the_hour(
    fake_discord: FakeDiscordServer, tmp_path: Path, fake_discord_options: dict[str, Any]
) -> None:
    """A job that outlives Discord's 1-hour edit window (on the fake's clock): before its message turns
    an hour old, a fresh one is posted and pinned, the old one is unpinned and edited once into a pointer,
    and the binding moves. The fake enforces 30046, and the adapter never runs into it."""
    server = fake_discord
    alice = server.guild.members[0]
    service = await make_service(tmp_path)
    adapter = await make_adapter(server, service)
    try:
        job = await service.submit(
            "demo.count", {"steps": 120, "delay_ms": 25}, owner=alice.id, room=server.channel_id, name="long"
        )
        await server.wait_for(lambda: len(progress_messages(server, "#1")) == 1)
        old = only_progress_message(server, 1)
        await server.wait_for(lambda: server.message(old.id).pinned)
        server.clock.advance(3400)  # 56 minutes later: past repost_after_seconds (55 min), within the hour

        await server.wait_for(lambda: len(progress_messages(server, "#1")) == 2, 10)
        new = progress_messages(server, "#1")[-1]
        await server.wait_for(lambda: server.message(new.id).pinned and not server.message(old.id).pinned, 10)
        await server.wait_for(lambda: "continues in a newer message" in server.message(old.id).content, 10)
        pointer = server.message(old.id)
        assert new.id in pointer.content and pointer.components == []
        binding = await service.store.get_binding("discord", "job", job.id or 0)
        assert binding is not None and binding.message_id == new.id

        assert (await wait_job(service, job.id or 0)).status == JobStatus.COMPLETED
        await server.wait_for(lambda: len(replies_to(server, new.id)) == 1, 10)
        assert await adapter.flush(10)  # the unpin may follow the reply
        assert "completed" in server.message(new.id).content and not server.message(new.id).pinned
        # The old message got exactly one edit after the move: the pointer.
        after = [e for e in server.edits_of(old.id) if e.at >= server.message(new.id).created_at]
        assert [e.content_after for e in after] == [pointer.content]
        assert server.errors_with_code(30046) == [] and replies_to(server, old.id) == []
        assert adapter.stats()["reposts"] == 1
    finally:
        await adapter.stop()
        await service.stop()


@pytest.mark.parametrize("fake_discord_options", [{"edit_limit": 5, "edit_window": 1.0}])
async def test_restart_after_the_hour_reposts_without_errors(
    fake_discord: FakeDiscordServer, tmp_path: Path, fake_discord_options: dict[str, Any]
) -> None:
    """A paused job whose message is over an hour old when the bot comes back: the new process re-posts
    and pins a fresh message and unpins the old one, without attempting a refused edit (30046)."""
    server = fake_discord
    alice = server.guild.members[0]
    service = await make_service(tmp_path)
    adapter = await make_adapter(server, service)
    try:
        job = await service.submit(
            "demo.count", {"steps": 400, "delay_ms": 25}, owner=alice.id, room=server.channel_id
        )
        await wait_job(service, job.id or 0, lambda j: j.status == JobStatus.RUNNING)
        await service.pause(job.id or 0)
        await wait_job(service, job.id or 0, lambda j: j.status == JobStatus.PAUSED)
        await server.wait_for(lambda: any("paused" in m.content for m in progress_messages(server, "#1")))
        old = only_progress_message(server, 1)
    finally:
        await adapter.stop()
        await service.stop()
    server.clock.advance(4000)  # the bot was down for over an hour

    service = await make_service(tmp_path)
    adapter = await make_adapter(server, service)
    try:
        await server.wait_for(lambda: len(progress_messages(server, "#1")) == 2, 10)
        new = progress_messages(server, "#1")[-1]
        await server.wait_for(lambda: server.message(new.id).pinned and not server.message(old.id).pinned, 10)
        assert "paused" in server.message(new.id).content
        assert button_states(server.message(new.id)) == {"pause": False, "resume": True, "cancel": True}
        assert server.errors_with_code(30046) == []
        await asyncio.sleep(0.3)  # a few more age checks: no further re-post
        assert len(progress_messages(server, "#1")) == 2
        binding = await service.store.get_binding("discord", "job", job.id or 0)
        assert binding is not None and binding.message_id == new.id and binding.pinned
    finally:
        await adapter.stop()
        await service.stop()


@pytest.mark.parametrize("fake_discord_options", [{"edit_limit": 5, "edit_window": 1.0}])
async def test_markdown_and_mass_mentions_are_escaped(
    fake_discord: FakeDiscordServer, tmp_path: Path, fake_discord_options: dict[str, Any]
) -> None:
    """Job names and messages with markdown, ``@everyone`` or user mentions show as typed and ping
    nobody: user text is escaped, ``allowed_mentions`` is empty, and the content stays within 2,000."""
    server = fake_discord
    alice: FakeUser = server.guild.members[0]
    service = await make_service(tmp_path)
    adapter = await make_adapter(server, service)
    try:
        name = "**deploy** @everyone _now_ <@1500000000000000001> [x](http://evil) ~~old~~ " + "y" * 200
        job = await service.track(name, total=10, owner=alice.id, room=server.channel_id)
        await service.tracked_progress(job.id or 0, current=3, message="`rm -rf` @here ||spoiler|| # heading")
        await server.wait_for(lambda: any("spoiler" in m.content for m in progress_messages(server)), 10)
        (msg,) = progress_messages(server)
        text = server.message(msg.id).content
        assert len(text) <= 2000 and f"**#{job.id}**" in text  # our own bold title stays bold
        assert r"\*\*deploy\*\*" in text and r"\_now\_" in text and r"\~\~old\~\~" in text
        assert r"\`rm -rf\`" in text and r"\|\|spoiler\|\|" in text and r"\[x](http://evil)" in text
        assert "@everyone" not in text and "@here" not in text and "<@1500000000000000001>" not in text
        assert server.message(msg.id).allowed_mentions == NO_MENTIONS
        for e in server.edits_of(msg.id):
            assert e.payload.get("allowed_mentions", NO_MENTIONS) == NO_MENTIONS

        # Command replies quote user text too: escaped, and they ping nobody.
        rec = await server.dispatch_slash_command("status", {"id": str(job.id)}, user=alice)
        resp = await server.wait_interaction_response(rec)
        assert r"\*\*deploy\*\*" in (resp.content or "") and "@everyone" not in (resp.content or "")
        assert resp.data.get("allowed_mentions") == NO_MENTIONS

        await service.tracked_finish(job.id or 0, ok=False, error="**boom** @everyone")
        await server.wait_for(lambda: len(replies_to(server, msg.id)) == 1, 10)
        final = server.message(msg.id).content
        assert r"failed: \*\*boom\*\*" in final and "@everyone" not in final
        (reply,) = replies_to(server, msg.id)
        assert "@everyone" not in reply.content and len(reply.content) <= 2000
    finally:
        await adapter.stop()
        await service.stop()


@pytest.mark.parametrize("fake_discord_options", [{"edit_limit": 5, "edit_window": 1.0}])
async def test_a_batch_has_one_message_and_its_jobs_none(
    fake_discord: FakeDiscordServer, tmp_path: Path, fake_discord_options: dict[str, Any]
) -> None:
    """A batch gets one progress message with its aggregate progress and batch buttons (``b<id>``)
    that pause and resume the whole batch; the jobs inside it get no messages of their own."""
    server = fake_discord
    alice = server.guild.members[0]
    service = await make_service(tmp_path)
    adapter = await make_adapter(server, service)
    try:
        batch, jobs = await service.submit_batch(
            "nightly",
            [{"type": "demo.count", "payload": {"steps": 60, "delay_ms": 25}}] * 2,
            owner=alice.id,
            room=server.channel_id,
        )
        bid = batch.id
        await server.wait_for(lambda: len(progress_messages(server)) == 1, 10)
        (msg,) = progress_messages(server)
        await server.wait_for(lambda: button_states(server.message(msg.id)).get("pause") is True, 10)
        assert set(server.message(msg.id).custom_ids()) == {
            f"pb:{a}:b{bid}" for a in ("pause", "resume", "cancel")
        }

        rec = await server.dispatch_button(f"pb:pause:b{bid}", msg.id, user=alice)
        resp = await server.wait_interaction_response(rec)
        assert resp.ephemeral and f"batch #{bid}" in (resp.content or "")
        for job in jobs:
            await wait_job(service, job.id or 0, lambda j: j.status == JobStatus.PAUSED)
        await server.wait_for(lambda: "paused" in server.message(msg.id).content.split("\n")[0], 10)
        rec = await server.dispatch_slash_command("resume", {"id": f"b{bid}"}, user=alice)
        assert not (await server.wait_interaction_response(rec)).ephemeral

        for job in jobs:
            assert (await wait_job(service, job.id or 0)).status == JobStatus.COMPLETED
        await server.wait_for(lambda: len(replies_to(server, msg.id)) == 1, 10)
        final = server.message(msg.id)
        assert (
            final.content.startswith(f"✅ **batch #{bid}** nightly — completed")
            and "2/2 done" in final.content
        )
        assert await adapter.flush(10)  # the unpin may follow the reply
        assert len(progress_messages(server)) == 1 and not final.pinned and final.components == []
    finally:
        await adapter.stop()
        await service.stop()


@pytest.mark.parametrize("fake_discord_options", [{"edit_limit": 5, "edit_window": 1.0}])
async def test_rooms_decide_where_jobs_are_shown(
    fake_discord: FakeDiscordServer, tmp_path: Path, fake_discord_options: dict[str, Any]
) -> None:
    """Jobs without a room (CLI, HTTP) and direct jobs go to the first configured channel; jobs of other
    rooms (another channel, a Matrix room) are not shown here."""
    server = fake_discord
    service = await make_service(tmp_path)
    adapter = await make_adapter(server, service)
    try:
        cli = await service.submit("demo.count", {"steps": 2, "delay_ms": 10})
        other = await service.submit("demo.count", {"steps": 2, "delay_ms": 10}, room="1300000000000000002")
        matrix = await service.submit("demo.count", {"steps": 2, "delay_ms": 10}, room="!abc:example.org")
        direct = await service.execute("demo.count", {"steps": 3, "delay_ms": 10})
        await direct.result()
        for job in (cli, other, matrix):
            await wait_job(service, job.id or 0)
        await server.wait_for(
            lambda: sum("completed" in m.content for m in progress_messages(server)) == 2, 10
        )
        shown = progress_messages(server)
        assert len(shown) == 2
        assert (
            len(progress_messages(server, f"#{cli.id}")) == 1 and len(progress_messages(server, "#d1")) == 1
        )
        assert server.messages_in("1300000000000000002") == []
    finally:
        await adapter.stop()
        await service.stop()
