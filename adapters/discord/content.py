"""Discord rendering of progress events: message content, button states, replies, pointers.

Everything here is pure (no I/O), so it is cheap to call on every event. Our own markup (bold, code
spans) is written literally; every piece of user-supplied text (job names, messages, errors, stage
names, batch errors) goes through :func:`esc`: ``discord.utils.escape_markdown`` plus mention escaping,
so a job called ``**@everyone**`` shows as typed and pings nobody. ``allowed_mentions`` (set by the
adapter) is the second line of defence.
"""

from __future__ import annotations

from dataclasses import dataclass

import discord

from adapters.render import (
    STATUS_ICON,
    bar,
    clip,
    defuse_mentions,
    fmt_duration,
    fmt_number,
    label,
    outcome_text,
    ref,
)
from core.events import JobProgressEvent

#: Discord's limit on message content.
MAX_CONTENT = 2000
#: Discord's limits on autocomplete choices.
MAX_CHOICE_NAME = 100
MAX_CHOICES = 25

__all__ = [
    "MAX_CHOICES",
    "MAX_CHOICE_NAME",
    "MAX_CONTENT",
    "Rendered",
    "button_states",
    "choice_label",
    "clip_content",
    "completion_text",
    "esc",
    "pointer_text",
    "render",
    "render_content",
    "target_ref",
]


def esc(text: str | None, limit: int = 300) -> str:
    """User text made safe for Discord: one line, clipped, markdown escaped, mentions broken."""
    one = clip(text, limit)
    return defuse_mentions(discord.utils.escape_mentions(discord.utils.escape_markdown(one)))


def clip_content(text: str, limit: int = MAX_CONTENT) -> str:
    """Keep ``text`` within Discord's content limit, cutting at a line boundary when possible."""
    if len(text) <= limit:
        return text
    cut = text[: limit - 1]
    nl = cut.rfind("\n")
    if nl > limit // 2:
        cut = cut[:nl]
    return cut + "…"


def target_ref(ev: JobProgressEvent) -> str:
    """The id the commands and buttons take: ``12``, ``d3`` (direct job) or ``b3`` (batch)."""
    return f"b{ev.id}" if ev.type == "batch" else str(ev.id)


def _title(ev: JobProgressEvent) -> str:
    name = esc(ev.name or ev.job_type or "", 120)
    return f"**{ref(ev)}** {name}".rstrip()


def _outcome(ev: JobProgressEvent) -> str:
    """The status word and what it means, escaped; a Discord user id as actor becomes a mention
    (shown as the user's name; ``allowed_mentions`` keeps it from pinging)."""
    by = ev.control_by
    text = esc(outcome_text(ev), 400)
    if by and by.isdigit() and f"by {by}" in outcome_text(ev):
        text = text.replace(f"by {by}", f"by <@{by}>")
    return text


def render_content(ev: JobProgressEvent, *, prefix: str = "/") -> str:
    """The progress message: title, status, bar and percent, stage, ETA, last message, hint."""
    icon = STATUS_ICON.get(ev.status, "•")
    lines = [f"{icon} {_title(ev)} — {_outcome(ev)}"]
    pct = ev.display_percent
    if ev.type == "batch":
        done = (ev.completed_operations or 0) + (ev.failed_operations or 0)
        pct_txt = f" {pct:.0f}%" if pct is not None else ""
        lines.append(f"`{bar(pct)}{pct_txt}` {done}/{ev.total_operations or 0} done")
    elif pct is not None:
        line = f"`{bar(pct)} {pct:.0f}%`"
        if ev.current is not None and ev.total:
            line += f" ({fmt_number(ev.current)}/{fmt_number(ev.total)})"
        lines.append(line)
    elif ev.indeterminate and not ev.terminal:
        count = f" {fmt_number(ev.current)} done" if ev.current is not None else ""
        lines.append(f"`{bar(None)}`{count}")
    details: list[str] = []
    if ev.stage_name is not None or ev.stage_index is not None:
        idx = (ev.stage_index or 0) + 1
        count = f"/{ev.stage_count}" if ev.stage_count else ""
        details.append(f"stage {idx}{count} {esc(ev.stage_name, 60)}".rstrip())
    if ev.eta_seconds is not None and ev.status == "running":
        details.append(f"ETA {fmt_duration(ev.eta_seconds)}")
    if ev.type == "job" and ev.retry_count and ev.status in ("running", "pending"):
        details.append(f"attempt {ev.retry_count + 1}")
    if ev.type == "batch" and ev.failed_operations:
        details.append(f"{ev.failed_operations} failed")
    if details:
        lines.append(" · ".join(details))
    last = ev.current_operation if ev.type == "batch" else ev.message
    if last:
        lines.append(f"💬 {esc(last)}")
    if ev.type == "batch" and ev.errors:
        lines.append("errors: " + "; ".join(esc(e, 80) for e in ev.errors[-3:]))
    if ev.status == "paused":
        lines.append(f"Resume with `{prefix}resume {target_ref(ev)}` or the Resume button.")
    return clip_content("\n".join(lines))


def button_states(ev: JobProgressEvent) -> tuple[tuple[str, bool], ...] | None:
    """Which buttons are enabled, as ``((action, enabled), ...)``; None (no buttons) once finished."""
    if ev.terminal:
        return None
    st = ev.status
    requested = ev.control if ev.control in ("pause", "cancel") else None
    pause = st in ("pending", "running") and requested is None
    resume = st == "paused"
    cancel = st in ("pending", "running", "paused") and requested != "cancel"
    return (("pause", pause), ("resume", resume), ("cancel", cancel))


def completion_text(ev: JobProgressEvent) -> str:
    """The short reply to a finished progress message; it mentions the requester when we know them."""
    who = f"<@{ev.owner}> " if ev.owner and ev.owner.isdigit() else ""
    icon = STATUS_ICON.get(ev.status, "•")
    return clip_content(f"{who}{icon} {_title(ev)} — {_outcome(ev)}")


def pointer_text(ev: JobProgressEvent | None, ref: str, jump_url: str) -> str:
    """What an old progress message becomes once a fresh one replaces it."""
    title = _title(ev) if ev is not None else f"**#{ref}**"
    return clip_content(f"↪️ {title} continues in a newer message: {jump_url}")


def choice_label(ev: JobProgressEvent) -> str:
    """An autocomplete entry: ``#12 nightly build — running 45%`` (plain text, at most 100 chars)."""
    pct = ev.display_percent
    pct_txt = f" {pct:.0f}%" if pct is not None and not ev.terminal else ""
    return clip(f"{label(ev, 60)} — {ev.status}{pct_txt}", MAX_CHOICE_NAME)


@dataclass(slots=True, frozen=True)
class Rendered:
    """One state of a progress message, as handed to the edit scheduler."""

    kind: str
    target: int | str
    ref: str
    version: int
    status: str
    terminal: bool
    content: str
    buttons: tuple[tuple[str, bool], ...] | None
    event: JobProgressEvent


def render(ev: JobProgressEvent, *, prefix: str = "/") -> Rendered:
    """Everything the adapter needs to show ``ev``."""
    return Rendered(
        kind=ev.type,
        target=ev.id,
        ref=target_ref(ev),
        version=ev.seq,
        status=ev.status,
        terminal=ev.terminal,
        content=render_content(ev, prefix=prefix),
        buttons=button_states(ev),
        event=ev,
    )
