"""End-to-end encrypted rooms against a real Synapse, with alice as an encrypting matrix-nio client.

alice has her own device and key store (:class:`EncryptedUserClient`); what she records is what she can
decrypt, and :meth:`EncryptedUserClient.raw_events` shows what the homeserver holds. The bot logs in with
its password, so each test gets a fresh bot device whose key store sits next to its database. The bot's
message limit is lifted here (these tests are about encryption; test_matrix_ratelimit.py keeps Synapse's
default limits).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import pytest_asyncio

from adapters.matrix import MatrixConfig
from core.errors import JobNotFound
from tests.integration.matrix_e2e_helpers import EncryptedUserClient
from tests.integration.matrix_helpers import (
    Event,
    UserClient,
    World,
    content_of,
    current_text,
    edits_of,
    first,
    job_message,
    pin_history,
    progress_for,
    progress_messages,
    reactions_on,
    relates,
    replies_to,
    status_word,
    texts_of,
    wait_status,
)

if TYPE_CHECKING:
    from tests.servers.conftest_plugin import SynapseFixture

pytest_plugins = ["tests.servers.conftest_plugin", "tests.integration.matrix_fixtures"]

pytestmark = [pytest.mark.matrix, pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

ENCRYPTED = "m.room.encrypted"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def eworld(synapse_server: SynapseFixture, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """alice with an encrypting client (her own key store), bob plain; message limits lifted."""
    hs = synapse_server.server
    for user in (synapse_server.alice, synapse_server.bob, synapse_server.bot):
        hs.override_ratelimit(user.user_id, 0, 0)
    alice = EncryptedUserClient(
        synapse_server.base_url,
        synapse_server.alice_user_id,
        synapse_server.alice_password,
        tmp_path_factory.mktemp("alice-keys"),
    )
    bob = UserClient(synapse_server.base_url, synapse_server.bob_user_id, synapse_server.bob_password)
    await alice.login()
    await bob.login()
    try:
        yield World(synapse_server, alice, bob, bot_token="")
    finally:
        await alice.close()
        await bob.close()


@pytest_asyncio.fixture(loop_scope="module")
async def eroom(eworld: World) -> str:
    """A fresh encrypted room made by alice, with the bot invited (power level 50) and bob joined."""
    alice = eworld.alice
    assert isinstance(alice, EncryptedUserClient)
    room = await alice.create_encrypted_room(bot=eworld.bot_id, others=[eworld.bob.user_id])
    await eworld.bob.join(room)
    return room


def bot_config(world: World, room: str, **overrides: Any) -> MatrixConfig:
    """The bot logging in with its password (a fresh device per database), key store by default."""
    return world.config(room, access_token=None, password=world.hs.bot_password, **overrides)


def body(ev: Event | None) -> str:
    """The plain body of an event."""
    return str(content_of(ev or {}).get("body", ""))


def own_events(events: list[Event], sender: str) -> list[Event]:
    """The timeline (non-state) events a sender created."""
    return [e for e in events if e.get("sender") == sender and "state_key" not in e]


def undecrypted(events: list[Event], sender: str) -> list[Event]:
    """Events of ``sender`` that the reader could not decrypt."""
    return [e for e in own_events(events, sender) if e.get("type") == ENCRYPTED]


async def bot_joined(world: World, room: str) -> None:
    """Wait until alice's client has seen the bot join (so her room key goes to the bot's device)."""
    bot = world.bot_id
    await world.alice.wait_for(
        lambda: any(
            e.get("type") == "m.room.member"
            and e.get("state_key") == bot
            and content_of(e).get("membership") == "join"
            for e in world.alice.room(room)
        ),
        20,
        "the bot to join",
    )


def alice_of(world: World) -> EncryptedUserClient:
    """The module's encrypting alice."""
    assert isinstance(world.alice, EncryptedUserClient)
    return world.alice


def _step(text: str) -> int:
    """The ``k`` of ``(k/N)`` in a progress text (0 when absent)."""
    if "(" not in text or "/" not in text:
        return 0
    head = text.rsplit("(", 1)[1].split(")", 1)[0].split("/", 1)[0]
    return int(head) if head.isdigit() else 0


async def test_encrypted_room_run_is_answered_and_only_ciphertext_is_stored(
    eworld: World, eroom: str, bots: Any
) -> None:
    """``!run demo.count steps=10`` in an encrypted room: answered, and everything the bot sends is encrypted.

    alice decrypts one progress notice (the answer to her command, a reply to it), edits ending in
    ``completed``, the reactions and the completion reply; the homeserver holds only
    ``m.room.encrypted`` events from the bot, each relation in clear.
    """
    alice, bot = alice_of(eworld), eworld.bot_id
    await bots(bot_config(eworld, eroom))
    await bot_joined(eworld, eroom)

    command = await alice.send_text(eroom, "!run demo.count steps=10")
    cmd_reply = await alice.wait_for(
        lambda: first(replies_to(alice.room(eroom), command)), 20, "the answer to !run"
    )
    assert "#1 demo.count" in body(cmd_reply) and content_of(cmd_reply)["msgtype"] == "m.notice"
    eid = await job_message(eworld, eroom, 1)
    assert cmd_reply["event_id"] == eid  # the progress notice itself answers !run
    await wait_status(eworld, eroom, eid, "completed")
    done = await alice.wait_for(
        lambda: [r for r in replies_to(alice.room(eroom), eid) if r["sender"] == bot],
        20,
        "the completion reply",
    )
    await alice.wait_for(lambda: pin_history(alice.room(eroom))[-1:] == [[]], 20, "the unpin")
    await alice.wait_for(
        lambda: len(reactions_on(alice.room(eroom), eid, bot)) == 3, 20, "the bot's three reactions"
    )
    events = alice.room(eroom)

    # What alice reads: one notice, its edits ending in completed, one completion reply.
    assert len(progress_messages(events, bot)) == 1
    texts = texts_of(events, eid)
    assert len(edits_of(events, eid)) >= 1
    assert status_word(texts[-1]) == "completed" and "10/10" in texts[-1]
    assert len(done) == 1 and "#1" in body(done[0])
    assert sorted(reactions_on(events, eid, bot)) == sorted(["⏸️", "▶️", "⏹️"])
    assert not undecrypted(events, bot)

    # What the homeserver holds: ciphertext only; relations readable, text not.
    raw = own_events(await alice.raw_events(eroom), bot)
    assert raw and {e["type"] for e in raw} == {ENCRYPTED}
    for e in raw:
        assert "body" not in content_of(e) and "m.new_content" not in content_of(e)
        assert content_of(e)["algorithm"] == "m.megolm.v1.aes-sha2"
    raw_ids = {e["event_id"] for e in raw}
    assert eid in raw_ids and done[0]["event_id"] in raw_ids
    notice = next(e for e in raw if e["event_id"] == eid)
    assert relates(notice) == {"m.in_reply_to": {"event_id": command}}  # the reply relation in clear
    clear_edits = [e for e in raw if relates(e).get("rel_type") == "m.replace"]
    assert len(clear_edits) == len(edits_of(events, eid))
    assert all(relates(e)["event_id"] == eid for e in clear_edits)
    assert len([e for e in raw if relates(e).get("rel_type") == "m.annotation"]) == 3
    assert (relates(next(e for e in raw if e["event_id"] == done[0]["event_id"]))["m.in_reply_to"]) == {
        "event_id": eid
    }


async def test_pause_and_resume_in_an_encrypted_room(eworld: World, eroom: str, bots: Any) -> None:
    """``!pause`` and ``!resume`` are decrypted and obeyed; the notice shows each state and who asked
    (that is the acknowledgement, as in a plain room), and ``!status`` is answered encrypted."""
    alice, bot = alice_of(eworld), eworld.bot_id
    await bots(bot_config(eworld, eroom))
    await bot_joined(eworld, eroom)
    await alice.command(eroom, "!run demo.count steps=30 delay_ms=100")
    eid = await job_message(eworld, eroom, 1)
    await wait_status(eworld, eroom, eid, "running")
    commands = [await alice.send_text(eroom, "!pause 1")]
    paused = await wait_status(eworld, eroom, eid, "paused")
    assert "resume with !resume 1" in paused and f"paused by {alice.user_id}" in paused
    assert "paused" in body(await alice.command(eroom, "!status 1"))
    commands.append(await alice.send_text(eroom, "!resume 1"))
    await wait_status(eworld, eroom, eid, "completed", 60)
    events = alice.room(eroom)
    assert not [r for c in commands for r in replies_to(events, c)]
    words = [status_word(t) for t in texts_of(events, eid)]
    assert "paused" in words and words[-1] == "completed"
    assert not undecrypted(events, bot)
    assert {e["type"] for e in own_events(await alice.raw_events(eroom), bot)} == {ENCRYPTED}


async def test_encrypted_reactions_pause_and_resume(eworld: World, eroom: str, bots: Any) -> None:
    """Reactions sent encrypted (as Element does in such rooms) are decrypted and control the job."""
    alice, bot = alice_of(eworld), eworld.bot_id
    await bots(bot_config(eworld, eroom))
    await bot_joined(eworld, eroom)
    await alice.command(eroom, "!run demo.count steps=30 delay_ms=100")
    eid = await job_message(eworld, eroom, 1)
    await alice.react_encrypted(eroom, eid, "⏸️")
    await wait_status(eworld, eroom, eid, "paused")
    await alice.react_encrypted(eroom, eid, "▶")
    await wait_status(eworld, eroom, eid, "completed", 60)
    raw = await alice.raw_events(eroom)
    mine = [e for e in raw if e["sender"] == alice.user_id and relates(e).get("rel_type") == "m.annotation"]
    assert len(mine) == 2 and {e["type"] for e in mine} == {ENCRYPTED}
    assert not undecrypted(alice.room(eroom), bot)


async def test_restart_mid_job_keeps_the_device_and_alice_decrypts_every_later_event(
    eworld: World, eroom: str, bots: Any, tmp_path: Path
) -> None:
    """Stop the bot mid-job and start it on the same database and key store.

    Same device id (recorded in the key store), the same notice is edited to the end, and alice
    decrypts every event the restarted bot sends.
    """
    alice, bot = alice_of(eworld), eworld.bot_id
    h = await bots(bot_config(eworld, eroom))
    device = h.bot.client.device_id if h.bot.client else None
    assert device
    store = tmp_path / "bot.matrix-store"  # next to bot.db, the default
    assert json.loads((store / "device.json").read_text())["device_id"] == device
    await bot_joined(eworld, eroom)

    await alice.command(eroom, "!run demo.count steps=40 delay_ms=100")
    eid = await job_message(eworld, eroom, 1)
    await alice.wait_for(lambda: _step(current_text(alice.room(eroom), eid)) >= 3, 20, "some progress")
    await h.stop()
    seen_before = len(alice.room(eroom))

    await h.start()
    assert h.bot.client is not None and h.bot.client.device_id == device
    await alice.wait_for(
        lambda: status_word(current_text(alice.room(eroom), eid)) == "completed",
        60,
        "the same notice to complete",
    )
    await alice.wait_for(lambda: replies_to(alice.room(eroom), eid), 20, "the completion reply")
    status = await alice.command(eroom, "!status 1")
    assert "completed" in body(status)

    events = alice.room(eroom)
    later = own_events(events[seen_before:], bot)
    assert later, "the restarted bot sent nothing alice saw"
    assert not undecrypted(events, bot)
    assert len(progress_messages(events, bot)) == 1
    assert h.bot.driver is not None and h.bot.driver.stats.posts == 0  # the restarted bot found its binding
    steps = [_step(t) for t in texts_of(events, eid)]
    assert steps[-1] == 40
    assert any(relates(e).get("event_id") == eid and relates(e).get("rel_type") == "m.replace" for e in later)
    assert {e["type"] for e in own_events(await alice.raw_events(eroom), bot)} == {ENCRYPTED}


async def test_alices_second_device_decrypts_later_messages(
    eworld: World, eroom: str, bots: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """alice logs in a second device: the bot trusts it on first use (with a warning) and it reads on."""
    alice, bot = alice_of(eworld), eworld.bot_id
    h = await bots(bot_config(eworld, eroom))
    await bot_joined(eworld, eroom)
    await alice.command(eroom, "!run demo.count steps=2")  # the bot now knows alice's first device
    first_msg = await job_message(eworld, eroom, 1)
    await wait_status(eworld, eroom, first_msg, "completed")
    await alice.wait_for(lambda: replies_to(alice.room(eroom), first_msg), 20, "job 1's completion reply")

    second = EncryptedUserClient(eworld.hs.base_url, alice.user_id, alice.password, tmp_path / "alice-2")
    with caplog.at_level(logging.WARNING, logger="adapters.matrix.e2e"):
        await second.login()
        try:
            new = second.device_id
            await alice.wait_for(
                lambda: _trusted(h, alice, new), 30, "the bot to trust alice's second device"
            )
            reply = await alice.command(eroom, "!run demo.count steps=5")  # job 2's notice
            command_id = relates(reply)["m.in_reply_to"]["event_id"]
            msg = await second.wait_for(
                lambda: first(progress_for(second.room(eroom), bot, 2)), 20, "job 2's notice"
            )
            eid = str(msg["event_id"])
            assert eid == reply["event_id"]
            await second.wait_for(
                lambda: status_word(current_text(second.room(eroom), eid)) == "completed", 30, "completed"
            )
            await second.wait_for(lambda: replies_to(second.room(eroom), eid), 20, "the completion reply")
            events = second.room(eroom)
            # Everything the bot sent since alice's command (after it trusted the device) is readable.
            start = next(i for i, e in enumerate(events) if e.get("event_id") == command_id)
            later = own_events(events[start:], bot)
            assert eid in {e["event_id"] for e in later}
            assert len(later) >= 3  # the notice (the command's answer), an edit, the completion reply
            assert not undecrypted(later, bot)
        finally:
            await second.close()
    warnings = [r.getMessage() for r in caplog.records if "has a new device" in r.getMessage()]
    assert any(new in w and alice.user_id in w for w in warnings), warnings


def _trusted(h: Any, alice: EncryptedUserClient, device_id: str) -> bool:
    """Whether the bot has seen ``device_id`` of alice and decided to trust it."""
    client = h.bot.client
    devices = {d.id: d for d in client.device_store.active_user_devices(alice.user_id)}
    return device_id in devices and devices[device_id].verified


async def test_one_account_serves_a_plain_and_an_encrypted_room(eworld: World, eroom: str, bots: Any) -> None:
    """The same bot runs jobs in a plain room (sent in clear) and an encrypted one (ciphertext) at once."""
    alice, bot = alice_of(eworld), eworld.bot_id
    plain = await eworld.new_room()
    await bots(bot_config(eworld, plain, rooms=[plain, eroom]))
    await bot_joined(eworld, eroom)
    assert "#1 demo.count" in body(await alice.command(plain, "!run demo.count steps=4 delay_ms=50"))
    assert "#2 demo.count" in body(await alice.command(eroom, "!run demo.count steps=4 delay_ms=50"))
    plain_msg = await job_message(eworld, plain, 1)
    secret_msg = await job_message(eworld, eroom, 2)
    await wait_status(eworld, plain, plain_msg, "completed")
    await wait_status(eworld, eroom, secret_msg, "completed")
    await alice.wait_for(lambda: replies_to(alice.room(eroom), secret_msg), 20, "the encrypted room's reply")
    await alice.wait_for(lambda: replies_to(alice.room(plain), plain_msg), 20, "the plain room's reply")

    raw_plain = own_events(await alice.raw_events(plain), bot)
    raw_secret = own_events(await alice.raw_events(eroom), bot)
    assert ENCRYPTED not in {e["type"] for e in raw_plain}
    assert "m.room.message" in {e["type"] for e in raw_plain}
    assert {e["type"] for e in raw_secret} == {ENCRYPTED}
    assert not progress_for(alice.room(plain), bot, 2) and not progress_for(alice.room(eroom), bot, 1)


async def test_an_undecryptable_event_gets_no_reply_and_no_crash(
    eworld: World, eroom: str, bots: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Commands sent with a session the bot never got: logged once, keys requested, never run or answered."""
    alice = alice_of(eworld)
    h = await bots(bot_config(eworld, eroom))
    await bot_joined(eworld, eroom)
    with caplog.at_level(logging.INFO, logger="adapters.matrix"):
        bad = await alice.send_unshared(eroom, "!run demo.count steps=1", "!run demo.count steps=2")
        # A command after them is answered: the bot processed the undecryptable ones and lives on.
        answer = await alice.command(eroom, "!jobs all")
    assert "#1" not in body(answer)
    events = alice.room(eroom)
    for eid in bad:
        assert not replies_to(events, eid)
    with pytest.raises(JobNotFound):
        await h.svc.get(1)
    assert h.bot.e2e.stats_undecryptable == 2
    logged = [r for r in caplog.records if "cannot decrypt" in r.getMessage()]
    assert len(logged) == 1 and bad[0] in logged[0].getMessage()  # once per session
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert h.bot.client is not None and h.bot.client.outgoing_key_requests  # the keys were requested
