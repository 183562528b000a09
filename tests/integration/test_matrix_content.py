"""The Matrix adapter's pure parts (no homeserver): event contents, config, error mapping."""

from __future__ import annotations

import json
import time

import pytest
from nio import RoomSendError, RoomSendResponse
from nio.crypto import OutboundGroupSession

from adapters.matrix import MatrixConfig
from adapters.matrix.content import (
    edit_content,
    finish_reply,
    is_user_id,
    progress_content,
    reaction_action,
    text_reply,
)
from adapters.matrix.transport import (
    MAX_CONTENT_BYTES,
    MAX_ENCRYPTED_CONTENT_BYTES,
    MatrixRequestError,
    check,
    clip_content,
)
from adapters.outbox import PermanentError, RateLimited
from bot.settings import MatrixSettings
from core.events import JobProgressEvent, next_seq


def event(**kw: object) -> JobProgressEvent:
    """A job event with sensible defaults."""
    base: dict[str, object] = {
        "id": 12,
        "type": "job",
        "status": "running",
        "seq": next_seq(),
        "timestamp": time.time(),
        "name": "demo.count",
        "job_type": "demo.count",
        "current": 3,
        "total": 10,
        "percentage": 30.0,
        "owner": "@alice:localhost",
    }
    base.update(kw)
    return JobProgressEvent(**base)  # type: ignore[arg-type]


def test_progress_content_is_a_notice_with_plain_and_html() -> None:
    c = progress_content(event())
    assert c["msgtype"] == "m.notice" and c["format"] == "org.matrix.custom.html"
    assert "#12" in c["body"] and "demo.count" in c["body"] and "running" in c["body"]
    assert c["formatted_body"].startswith("⏳ <b>#12 demo.count</b>")
    assert c["m.mentions"] == {}


@pytest.mark.parametrize("status", ["pending", "running", "paused", "completed", "failed", "cancelled"])
def test_every_status_word_is_in_the_plain_body(status: str) -> None:
    assert status in progress_content(event(status=status, error="boom"))["body"]


def test_names_and_messages_are_escaped_and_defused() -> None:
    ev = event(
        name="<script>x</script> @room", message="<i>hi</i> @everyone", status="failed", error="<b>bad</b>"
    )
    c = progress_content(ev)
    html = c["formatted_body"]
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "<i>hi" not in html and "&lt;b&gt;bad" in html
    assert "@room" not in c["body"] and "@everyone" not in c["body"] and "@room" not in html


def test_edit_content_replaces_with_fallback() -> None:
    new = progress_content(event(status="completed"))
    c = edit_content("$orig", new)
    assert c["m.relates_to"] == {"rel_type": "m.replace", "event_id": "$orig"}
    assert c["m.new_content"] == new
    assert c["body"] == "* " + new["body"] and c["formatted_body"] == "* " + new["formatted_body"]
    assert c["m.mentions"] == {}


def test_finish_reply_mentions_the_owner_only() -> None:
    c = finish_reply(event(status="completed", started_at=100.0, finished_at=192.0), "$p")
    assert c["m.relates_to"] == {"m.in_reply_to": {"event_id": "$p"}}
    assert c["m.mentions"] == {"user_ids": ["@alice:localhost"]}
    assert c["body"] == "@alice:localhost: #12 demo.count completed in 1m32s"
    assert '<a href="https://matrix.to/#/@alice:localhost">@alice:localhost</a>' in c["formatted_body"]
    anon = finish_reply(event(status="failed", error="x", owner="cli"), "$p")
    assert anon["m.mentions"] == {} and anon["body"].startswith("#12 demo.count failed: x")
    batch = finish_reply(event(type="batch", id=3, name="nightly <b>", status="completed"), "$p")
    assert batch["body"].startswith("@alice:localhost: batch #3 nightly <b> completed")
    assert "nightly &lt;b&gt;" in batch["formatted_body"]


def test_text_reply_threads_escapes_and_mentions_the_asker() -> None:
    c = text_reply("No job #9\n<b>x</b> @room", "$cmd", mention="@bob:localhost")
    assert c["m.relates_to"] == {"m.in_reply_to": {"event_id": "$cmd"}}
    assert c["formatted_body"] == "No job #9<br>&lt;b&gt;x&lt;/b&gt; @\u2060room"
    assert c["m.mentions"] == {"user_ids": ["@bob:localhost"]}
    t = text_reply("ok", "$cmd", mention="@bob:localhost", thread_root="$root")
    assert t["m.relates_to"]["rel_type"] == "m.thread" and t["m.relates_to"]["event_id"] == "$root"
    assert t["m.relates_to"]["m.in_reply_to"] == {"event_id": "$cmd"}


def test_reaction_keys() -> None:
    assert reaction_action("⏸️") == "pause" and reaction_action("⏸") == "pause"
    assert reaction_action("▶️") == "resume" and reaction_action("▶") == "resume"
    assert reaction_action("⏹️") == "cancel" and reaction_action("⏹") == "cancel"
    assert reaction_action("👍") is None


def test_user_ids() -> None:
    assert is_user_id("@alice:localhost") and is_user_id("@a.b_c=d/e:example.org:8448")
    assert not is_user_id("alice") and not is_user_id(None) and not is_user_id("@room")


def test_config_from_settings_reads_secrets_and_hides_them() -> None:
    s = MatrixSettings.model_validate(
        {
            "homeserver": "http://hs",
            "user_id": "@bot:hs",
            "password": "hunter2",
            "rooms": ["#ops:hs"],
            "min_power_level": 50,
            "pin": False,
        }
    )
    cfg = MatrixConfig.from_settings(s)
    assert cfg.password == "hunter2" and cfg.access_token is None
    assert cfg.rooms == ["#ops:hs"] and cfg.min_power_level == 50 and cfg.pin is False
    assert cfg.edit_rate == s.edit_rate and cfg.edit_burst == s.edit_burst
    assert "hunter2" not in repr(cfg)


def test_error_mapping_for_the_outbox() -> None:
    ok = RoomSendResponse("$e", "!r")
    assert check(ok, "send") is ok
    with pytest.raises(RateLimited) as rl:
        check(RoomSendError("Too Many Requests", "M_LIMIT_EXCEEDED", retry_after_ms=4466), "edit")
    assert rl.value.retry_after == pytest.approx(4.466)
    with pytest.raises(PermanentError):
        check(RoomSendError("no", "M_FORBIDDEN"), "edit")
    with pytest.raises(MatrixRequestError):
        check(RoomSendError("oops", "M_UNKNOWN"), "edit")


def _encrypted_event_size(content: dict[str, object], room_id: str) -> int:
    """The bytes of the whole ``m.room.encrypted`` event Synapse would store for ``content``."""
    content = dict(content)
    relation = content.pop("m.relates_to", None)  # stays in clear, as the transport sends it
    plaintext = json.dumps({"type": "m.room.message", "content": content, "room_id": room_id})
    session = OutboundGroupSession()
    session.mark_as_shared()  # a local size check: nobody needs the key
    wire = {
        "algorithm": "m.megolm.v1.aes-sha2",
        "sender_key": "k" * 43,
        "ciphertext": session.encrypt(plaintext),
        "session_id": session.id,
        "device_id": "ABCDEFGHIJ",
        "m.relates_to": relation,
    }
    envelope = {
        "type": "m.room.encrypted",
        "content": wire,
        "room_id": room_id,
        "sender": "@progressbot:example.org",
        "event_id": "$" + "e" * 43,
        "origin_server_ts": 1_700_000_000_000,
        "unsigned": {"age": 1234, "transaction_id": "t" * 40},
    }
    return len(json.dumps(envelope).encode())


@pytest.mark.parametrize("size", [14_000, 200_000])
def test_a_huge_edit_still_fits_the_event_limit_once_encrypted(size: int) -> None:
    """In an encrypted room the clipped content grows by the Megolm ciphertext's base64 (4/3): the
    transport clips to a smaller limit there, so even a huge edit stays under Synapse's 65,536 bytes."""
    room = "!" + "r" * 43 + ":example.org"
    huge = {"msgtype": "m.notice", "body": "x" * size, "format": "org.matrix.custom.html"}
    huge["formatted_body"] = "<b>" + "y" * size + "</b>"
    edit = edit_content("$" + "o" * 43, huge)
    assert _encrypted_event_size(clip_content(edit, MAX_ENCRYPTED_CONTENT_BYTES), room) < 65_536
    if size == 14_000:
        # Under the plain limit unclipped, yet too large once encrypted: why the limit is per room.
        assert clip_content(edit, MAX_CONTENT_BYTES) == edit
        assert _encrypted_event_size(clip_content(edit, MAX_CONTENT_BYTES), room) > 65_536
