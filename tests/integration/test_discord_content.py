"""The Discord rendering on its own (no server): limits, escaping, button states, autocomplete labels."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import pytest

from adapters.discord.config import DiscordConfig
from adapters.discord.content import (
    MAX_CHOICE_NAME,
    MAX_CONTENT,
    button_states,
    choice_label,
    completion_text,
    render_content,
)
from adapters.discord.views import CUSTOM_ID_TEMPLATE, custom_id, make_view
from core.events import JobProgressEvent, next_seq

pytestmark = [pytest.mark.discord, pytest.mark.slow]


def event(**kw: Any) -> JobProgressEvent:
    """A job event with sensible defaults."""
    base: dict[str, Any] = {
        "id": 7,
        "type": "job",
        "status": "running",
        "seq": next_seq(),
        "timestamp": time.time(),
    }
    base.update(kw)
    return JobProgressEvent(**base)


def test_content_shows_everything_and_stays_within_2000_characters() -> None:
    """Title with ``#id``, status, bar and percent, count, stage, ETA, last message; huge text is clipped."""
    ev = event(
        name="build",
        current=5,
        total=20,
        percentage=25.0,
        stage_name="render",
        stage_index=1,
        stage_count=3,
        eta_seconds=75,
        message="page 5",
    )
    text = render_content(ev)
    assert text.splitlines()[0] == "⏳ **#7** build — running"
    assert "25%` (5/20)" in text and "stage 2/3 render" in text and "ETA 1m15s" in text and "page 5" in text
    huge = event(
        type="batch",
        name="n" * 5000,
        message="m" * 5000,
        status="failed",
        total_operations=10,
        completed_operations=2,
        failed_operations=8,
        errors=["e" * 3000] * 50,
        current_operation="o" * 5000,
    )
    assert len(render_content(huge)) <= MAX_CONTENT
    assert len(completion_text(huge)) <= MAX_CONTENT


def test_user_text_is_escaped_and_mentions_break() -> None:
    """Markdown and mentions in user text are neutralised; our own markup is kept."""
    ev = event(
        name="*x* @everyone",
        message="<@123456789012345678> __u__",
        status="cancelled",
        control_by="123456789012345678",
    )
    text = render_content(ev)
    assert r"\*x\*" in text and "@everyone" not in text and "<@123456789012345678> " not in text
    assert r"\_\_u\_\_" in text
    assert "cancelled by <@123456789012345678>" in text  # the actor, shown as a (non-pinging) mention
    assert completion_text(event(status="completed", owner="42")).startswith("<@42> ")
    assert not completion_text(event(status="completed", owner="@alice:example.org")).startswith("<@")


@pytest.mark.parametrize(
    ("status", "control", "expected"),
    [
        ("pending", None, {"pause": True, "resume": False, "cancel": True}),
        ("running", None, {"pause": True, "resume": False, "cancel": True}),
        ("running", "pause", {"pause": False, "resume": False, "cancel": True}),
        ("running", "cancel", {"pause": False, "resume": False, "cancel": False}),
        ("paused", None, {"pause": False, "resume": True, "cancel": True}),
        ("completed", None, None),
        ("failed", None, None),
    ],
)
def test_buttons_follow_the_state(status: str, control: str | None, expected: dict[str, bool] | None) -> None:
    """Pause, Resume and Cancel are enabled only when the action is possible; gone at the end."""
    states = button_states(event(status=status, control=control))
    assert (dict(states) if states is not None else None) == expected


def test_custom_ids_carry_the_job_and_match_the_template() -> None:
    """The persistent buttons' custom_ids name action and job, within Discord's 100 characters."""
    import re

    view = make_view("12", (("pause", True), ("resume", False), ("cancel", True)))
    assert view.timeout is None and view.is_persistent()
    ids = [c.custom_id for c in view.children]  # type: ignore[attr-defined]
    assert ids == ["pb:pause:12", "pb:resume:12", "pb:cancel:12"]
    for target in ("12", "d3", "b4", "9" * 20):
        cid = custom_id("cancel", target)
        assert len(cid) <= 100 and re.fullmatch(CUSTOM_ID_TEMPLATE, cid)


def test_choice_labels_fit_discord() -> None:
    """Autocomplete labels: ``#id name — status percent``, at most 100 characters."""
    label = choice_label(event(name="nightly build", percentage=45.2))
    assert label == "#7 nightly build — running 45%"
    assert len(choice_label(event(name="x" * 500))) <= MAX_CHOICE_NAME


def test_config_from_settings_is_duck_typed_and_hides_the_token() -> None:
    """``from_settings`` reads a settings-like object (a SecretStr token) and never prints the token."""

    class Secret:
        def get_secret_value(self) -> str:
            return "s3cret"

    settings = SimpleNamespace(
        token=Secret(),
        guild_ids=["1"],
        channel_ids=[2, 3],
        control_role="ops",
        edit_rate=2.0,
        edit_burst=None,
    )

    cfg = DiscordConfig.from_settings(settings)
    assert cfg.token == "s3cret" and cfg.guild_ids == [1] and cfg.channel_ids == [2, 3]
    assert cfg.edit_rate == 2.0 and cfg.edit_burst == 5 and "s3cret" not in repr(cfg)
