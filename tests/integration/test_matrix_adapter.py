"""The Matrix adapter against a real Synapse, driven the way people use it.

alice (and bob) are second matrix-nio clients: they send commands and reactions and read the room; the
assertions are about what the room shows. The bot's message limit is lifted here (these tests are not
about rate limits; see test_matrix_ratelimit.py for Synapse's default limits).
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from nio import RoomCreateResponse

from tests.integration.matrix_helpers import (
    World,
    content_of,
    current_html,
    current_text,
    edits_of,
    job_message,
    pin_history,
    progress_messages,
    reactions_on,
    replies_to,
    status_word,
    texts_of,
    wait_status,
)

pytest_plugins = ["tests.servers.conftest_plugin", "tests.integration.matrix_fixtures"]

pytestmark = [pytest.mark.matrix, pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

STATUS_RANK = {"pending": 0, "running": 1, "paused": 1, "completed": 2, "failed": 2, "cancelled": 2}


def body(ev: dict[str, Any] | None) -> str:
    """The plain body of an event."""
    return str(content_of(ev or {}).get("body", ""))


def statuses(texts: list[str]) -> list[str | None]:
    """The status word of each text a message showed."""
    return [status_word(t) for t in texts]


def in_order(seq: list[str | None], *wanted: str) -> bool:
    """Whether ``wanted`` occurs in ``seq`` as a subsequence."""
    it = iter(seq)
    return all(any(s == w for s in it) for w in wanted)


async def test_run_count_one_message_pinned_edited_and_replied(world: World, room: str, bots: Any) -> None:
    """``!run demo.count``: one notice, N edits ending in completed, pinned while running, one reply."""
    alice, bot = world.alice, world.bot_id
    # alice has a pin of her own: the bot must keep it.
    mine = await alice.send_text(room, "house rules: be nice")
    await alice.client.room_put_state(room, "m.room.pinned_events", {"pinned": [mine]})
    await bots(world.config(room))

    # The answer to !run is the progress message itself, a reply to the command: no "Started" notice.
    # 3 s of work: reactions are offered while a job is active, in the cosmetic lane, which waits behind
    # posts and edits. At 0.75 s the third one sometimes lost the race on a busy CI machine.
    cmd_reply = await alice.command(room, "!run demo.count steps=10 delay_ms=300")
    assert content_of(cmd_reply)["msgtype"] == "m.notice"
    assert "#1 demo.count" in body(cmd_reply)

    eid = await job_message(world, room, 1)
    assert eid == cmd_reply["event_id"]
    await wait_status(world, room, eid, "completed")
    reply = await alice.wait_for(
        lambda: [r for r in replies_to(alice.room(room), eid) if r["sender"] == bot],
        20,
        "the completion reply",
    )
    await alice.wait_for(lambda: pin_history(alice.room(room))[-1] == [mine], 20, "the unpin")
    events = alice.room(room)

    # Exactly one progress message, posted as an m.notice with HTML and a readable plain body.
    assert len(progress_messages(events, bot)) == 1
    original = next(e for e in events if e["event_id"] == eid)
    c = content_of(original)
    assert c["msgtype"] == "m.notice" and c["format"] == "org.matrix.custom.html"
    assert "#1" in c["body"] and "demo.count" in c["body"]
    assert status_word(c["body"]) in ("pending", "running")
    assert "<b>" in c["formatted_body"] and c["m.mentions"] == {}

    # N edits with m.replace, m.new_content and a "* " fallback, ending in completed.
    edits = edits_of(events, eid)
    assert len(edits) >= 2
    for e in edits:
        ec = content_of(e)
        assert e["sender"] == bot
        assert ec["m.relates_to"] == {"rel_type": "m.replace", "event_id": eid}
        assert ec["body"] == "* " + ec["m.new_content"]["body"]
        assert ec["m.new_content"]["msgtype"] == "m.notice" and ec["m.new_content"]["formatted_body"]
    texts = texts_of(events, eid)
    words = statuses(texts)
    assert words[-1] == "completed" and "completed in" in texts[-1]
    assert words.count("completed") == 1, words
    assert [STATUS_RANK[w or "pending"] for w in words] == sorted(STATUS_RANK[w or "pending"] for w in words)
    assert "running" in words

    # Pinned while running (next to alice's pin), unpinned at the end (alice's pin kept).
    pins = pin_history(events)
    assert [mine, eid] in pins
    pin_at = next(
        i
        for i, e in enumerate(events)
        if e.get("type") == "m.room.pinned_events" and eid in content_of(e).get("pinned", [])
    )
    done_at = next(i for i, e in enumerate(events) if e in edits and "completed" in content_of(e)["body"])
    assert pin_at < done_at
    assert pins[-1] == [mine]

    assert not [e for e in events if e["sender"] == bot and "Started" in body(e)]

    # One completion reply that mentions alice.
    assert len(reply) == 1
    rc = content_of(reply[0])
    assert rc["m.mentions"] == {"user_ids": [alice.user_id]}
    assert alice.user_id in rc["body"] and "completed" in rc["body"]
    assert f'href="https://matrix.to/#/{alice.user_id}"' in rc["formatted_body"]

    # The reactions are offered once.
    assert sorted(reactions_on(events, eid, bot)) == sorted(["⏸️", "▶️", "⏹️"])


async def test_pause_resume_cancel_commands(world: World, room: str, bots: Any) -> None:
    """``!pause``, ``!resume`` and ``!cancel`` in the job's room: its message shows each state and who
    asked, and that is the acknowledgement (no separate reply)."""
    alice = world.alice
    await bots(world.config(room))
    await alice.command(room, "!run demo.count steps=300 delay_ms=100")
    eid = await job_message(world, room, 1)
    await wait_status(world, room, eid, "running")

    commands = [await alice.send_text(room, "!pause 1")]
    paused = await wait_status(world, room, eid, "paused")
    assert "resume with !resume 1" in paused and f"paused by {alice.user_id}" in paused
    commands.append(await alice.send_text(room, "!resume 1"))
    await wait_status(world, room, eid, "running")
    commands.append(await alice.send_text(room, "!cancel 1"))
    final = await wait_status(world, room, eid, "cancelled")
    assert f"cancelled by {alice.user_id}" in final
    assert not [r for c in commands for r in replies_to(alice.room(room), c)]

    words = statuses(texts_of(alice.room(room), eid))
    assert in_order(words, "running", "paused", "running", "cancelled"), words
    reply = await alice.wait_for(lambda: replies_to(alice.room(room), eid), 20, "the cancel reply")
    assert "cancelled" in body(reply[0])
    assert content_of(reply[0])["m.mentions"] == {"user_ids": [alice.user_id]}
    # Every command reply is threaded to its command.
    for e in alice.room(room):
        if e["sender"] == world.bot_id and "m.in_reply_to" in content_of(e).get("m.relates_to", {}):
            target = content_of(e)["m.relates_to"]["m.in_reply_to"]["event_id"]
            assert any(x["event_id"] == target for x in alice.room(room))


async def test_reactions_pause_resume_cancel(world: World, room: str, bots: Any) -> None:
    """⏸ ▶ ⏹ reactions on the progress message act like the commands."""
    alice = world.alice
    await bots(world.config(room))
    await alice.command(room, "!run demo.count steps=300 delay_ms=100")
    eid = await job_message(world, room, 1)
    await wait_status(world, room, eid, "running")

    await alice.react(room, eid, "⏸️")
    await wait_status(world, room, eid, "paused")
    await alice.react(room, eid, "▶")  # without the variation selector, as some clients send it
    await wait_status(world, room, eid, "running")
    await alice.react(room, eid, "⏹️")
    await wait_status(world, room, eid, "cancelled")

    words = statuses(texts_of(alice.room(room), eid))
    assert in_order(words, "running", "paused", "running", "cancelled"), words
    # Successful reactions need no words: the only reply is the completion one.
    replies = await alice.wait_for(lambda: replies_to(alice.room(room), eid), 20, "the completion reply")
    assert len(replies) == 1 and "cancelled" in body(replies[0])


async def test_bob_is_refused_and_nothing_changes(world: World, room: str, bots: Any) -> None:
    """bob may not control alice's job (command or reaction); a moderator power level lets him."""
    alice, bob = world.alice, world.bob
    h = await bots(world.config(room, min_power_level=50))
    await alice.command(room, "!run demo.count steps=300 delay_ms=100")
    eid = await job_message(world, room, 1)
    await wait_status(world, room, eid, "running")

    refusal = await bob.command(room, "!pause 1")
    assert "may not pause job #1" in body(refusal)
    assert content_of(refusal)["m.mentions"] == {"user_ids": [bob.user_id]}
    await bob.react(room, eid, "⏹️")
    refused = await bob.wait_for(
        lambda: [r for r in replies_to(bob.room(room), eid) if "may not cancel" in body(r)], 20, "a refusal"
    )
    assert refused
    job = await h.svc.get(1)
    assert job.status == "running" and job.control == "run"
    assert not {"paused", "cancelled"} & set(statuses(texts_of(alice.room(room), eid)))

    # With power level 50 (matrix.min_power_level = 50) bob is a moderator and may cancel it.
    levels = await alice.client.room_get_state_event(room, "m.room.power_levels")
    content = dict(levels.content)
    content["users"] = {**content["users"], bob.user_id: 50}
    await alice.client.room_put_state(room, "m.room.power_levels", content)
    await bob.wait_for(
        lambda: any(
            e.get("type") == "m.room.power_levels" and bob.user_id in content_of(e).get("users", {})
            for e in bob.room(room)
        ),
        20,
        "the new power levels",
    )
    await bob.send_text(room, "!cancel 1")
    assert f"cancelled by {bob.user_id}" in await wait_status(world, room, eid, "cancelled")


async def test_admin_may_control_any_job(world: World, room: str, bots: Any) -> None:
    """``auth.admins`` may control jobs they do not own."""
    alice, bob = world.alice, world.bob
    await bots(world.config(room), admins=(bob.user_id,))
    await alice.command(room, "!run demo.count steps=300 delay_ms=100")
    eid = await job_message(world, room, 1)
    await wait_status(world, room, eid, "running")
    await bob.send_text(room, "!cancel 1")
    assert f"cancelled by {bob.user_id}" in await wait_status(world, room, eid, "cancelled")


async def test_bad_input_gets_readable_replies(world: World, room: str, bots: Any) -> None:
    """Unknown ids, malformed ids, unknown commands and job types: readable replies, no tracebacks."""
    alice = world.alice
    h = await bots(world.config(room))
    assert body(await alice.command(room, "!status 999")) == "No job #999"
    assert body(await alice.command(room, "!pause abc")).startswith("Usage: !pause <id>")
    assert "Unknown command" in body(await alice.command(room, "!frobnicate 1"))
    assert "nope" in body(await alice.command(room, "!run nope"))
    assert "steps" in body(await alice.command(room, "!run demo.count steps=lots"))
    helptext = body(await alice.command(room, "!help"))
    assert "!jobs" in helptext and "!run <type>" in helptext
    jobs = body(await alice.command(room, "!jobs all"))
    assert jobs.startswith("No jobs")
    for e in alice.room(room):
        assert "Traceback" not in body(e)
    assert not progress_messages(alice.room(room), world.bot_id)
    assert h.bot.stats.refusals >= 4


async def test_names_are_escaped_and_never_ping(world: World, room: str, bots: Any) -> None:
    """A job name with HTML and ``@room`` is escaped in formatted_body and defused in body."""
    alice = world.alice
    h = await bots(world.config(room))
    evil = "<b>bold</b> @room <img src=x onerror=alert(1)>"
    job = await h.svc.submit(
        "demo.count", {"steps": 2, "delay_ms": 50}, name=evil, owner=alice.user_id, room=room
    )
    eid = await job_message(world, room, job.id or 0)
    await wait_status(world, room, eid, "completed")
    reply = await alice.wait_for(lambda: replies_to(alice.room(room), eid), 20, "the completion reply")
    events = alice.room(room)
    for text in [*texts_of(events, eid), body(reply[0])]:
        assert "@room" not in text and "<b>bold</b>" in text.replace("\u2060", "")
    html = current_html(events, eid)
    assert "&lt;b&gt;bold&lt;/b&gt;" in html and "&lt;img" in html
    assert "<b>bold" not in html and "<img" not in html and "@room" not in html
    assert "<img" not in content_of(reply[0])["formatted_body"]
    for e in [next(e for e in events if e["event_id"] == eid), *edits_of(events, eid)]:
        assert content_of(e)["m.mentions"] == {}
    assert content_of(reply[0])["m.mentions"] == {"user_ids": [alice.user_id]}


async def test_routing_default_room_foreign_rooms_and_batches(world: World, room: str, bots: Any) -> None:
    """No room: the first configured room. A foreign room: nothing. A batch: one message for all."""
    alice = world.alice
    h = await bots(world.config(room))
    svc = h.svc
    cli_job = await svc.submit("demo.count", {"steps": 1, "delay_ms": 10}, owner="cli")
    await svc.submit("demo.count", {"steps": 1, "delay_ms": 10}, room="!elsewhere:example.org")
    batch, _jobs = await svc.submit_batch(
        "nightly",
        [{"type": "demo.count", "payload": {"steps": 2, "delay_ms": 50}} for _ in range(3)],
        owner=alice.user_id,
        room=room,
    )
    eid = await job_message(world, room, cli_job.id or 0)
    await wait_status(world, room, eid, "completed")
    beid = await job_message(world, room, batch.id or 0, "batch")
    await wait_status(world, room, beid, "completed")
    reply = await alice.wait_for(lambda: replies_to(alice.room(room), beid), 20, "the batch reply")
    assert f"batch #{batch.id}" in body(reply[0])

    messages = progress_messages(alice.room(room), world.bot_id)
    # The CLI job and the batch: two messages; the foreign job and the batch's jobs have none.
    assert len(messages) == 2, [body(m) for m in messages]
    assert "3/3 done" in current_text(alice.room(room), beid)
    # A job without a Matrix owner gets no completion reply: it would mention nobody (the final
    # state is on its message). The batch's reply came after the CLI job ended, so none is coming.
    assert not replies_to(alice.room(room), eid)


async def test_no_power_to_pin_logs_once_and_carries_on(
    world: World, bots: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Without power level 50 the bot cannot pin: it says so once in the log and works on."""
    alice = world.alice
    room = await world.new_room(bot_power=0)
    h = await bots(world.config(room))
    for _ in range(2):
        # Long enough to be pinned while it runs (a job that ends first is never pinned at all).
        job = await h.svc.submit("demo.count", {"steps": 10, "delay_ms": 100}, owner=alice.user_id, room=room)
        eid = await job_message(world, room, job.id or 0)
        await wait_status(world, room, eid, "completed")
    assert not pin_history(alice.room(room))
    warnings = [r for r in caplog.records if "cannot pin progress messages" in r.getMessage()]
    assert len(warnings) == 1


async def test_rooms_by_alias_invites_accepted_only_for_configured_rooms(world: World, bots: Any) -> None:
    """The bot joins a room by alias, accepts a late invite to a configured room, declines others."""
    alice, bot = world.alice, world.bot_id
    alias_local = f"pb{int(time.time() * 1000)}"
    made = await alice.client.room_create(alias=alias_local, invite=[bot])
    assert isinstance(made, RoomCreateResponse), made
    by_alias = made.room_id
    # A configured room that has not invited the bot yet, and a room that is not configured at all.
    late = (await alice.client.room_create()).room_id
    stranger = (await alice.client.room_create()).room_id
    h = await bots(world.config(late, rooms=[f"#{alias_local}:localhost", late]))
    assert by_alias in h.bot.room_ids()

    # A job without a room goes to the first configured room, given by its alias.
    job = await h.svc.submit("demo.count", {"steps": 1, "delay_ms": 10}, owner=alice.user_id)
    eid = await job_message(world, by_alias, job.id or 0)
    await wait_status(world, by_alias, eid, "completed")

    def bot_membership(room_id: str) -> str | None:
        states = [
            content_of(e).get("membership")
            for e in alice.room(room_id)
            if e.get("type") == "m.room.member" and e.get("state_key") == bot
        ]
        return states[-1] if states else None

    # A command from before the bot was there is history, not a command to run now.
    before = await alice.send_text(late, "!run demo.count steps=1")
    await alice.client.room_invite(stranger, bot)
    await alice.client.room_invite(late, bot)
    await alice.wait_for(lambda: bot_membership(late) == "join", 20, "the bot to accept the invite")
    reply = await alice.command(late, "!status 1")
    assert "completed" in body(reply)
    assert not replies_to(alice.room(late), before)
    await alice.wait_for(lambda: bot_membership(stranger) == "leave", 20, "the bot to decline the invite")
