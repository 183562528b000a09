"""Platform-neutral rendering of progress events into message text.

Every piece of user-supplied text (job names, messages, errors, user ids) is escaped for the target
format, and mass-mention tokens (``@room``, ``@everyone``, ``@here``) are defused.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass

from core.events import JobProgressEvent

BAR_WIDTH = 20
MAX_TEXT = 300

STATUS_ICON = {
    "pending": "🕓",
    "running": "⏳",
    "paused": "⏸️",
    "completed": "✅",
    "failed": "❌",
    "cancelled": "⏹️",
}

_MASS_MENTION = re.compile(r"@(room|everyone|here)\b", re.IGNORECASE)


def defuse_mentions(text: str) -> str:
    """Break ``@room``/``@everyone``/``@here`` with a zero-width joiner so no client pings anyone."""
    return _MASS_MENTION.sub(lambda m: "@\u2060" + m.group(1), text)


def clip(text: str | None, limit: int = MAX_TEXT) -> str:
    """Shorten text to ``limit`` characters, on one line."""
    if not text:
        return ""
    one = " ".join(str(text).split())
    return one if len(one) <= limit else one[: limit - 1] + "…"


def bar(percent: float | None, width: int = BAR_WIDTH) -> str:
    """A text progress bar, e.g. ``▓▓▓▓▓░░░░░``; an indeterminate one when ``percent`` is None."""
    if percent is None:
        return "░" * width
    filled = max(0, min(width, round(width * percent / 100)))
    return "▓" * filled + "░" * (width - filled)


def fmt_duration(seconds: float | None) -> str:
    """``3m12s``, ``1h04m``, ``45s``."""
    if seconds is None:
        return "?"
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    if h < 48:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"


def fmt_number(x: float | None) -> str:
    """``12`` for whole numbers, ``12.5`` otherwise."""
    if x is None:
        return "?"
    return str(int(x)) if float(x).is_integer() else f"{x:.4g}"


def ref(ev: JobProgressEvent) -> str:
    """How people read a job's or batch's number, on every platform: ``#12`` or ``batch #3``."""
    return f"batch #{ev.id}" if ev.type == "batch" else f"#{ev.id}"


def label(ev: JobProgressEvent, name_limit: int = 120) -> str:
    """``#12 demo.count`` or ``batch #3 nightly``: the one job label of every message (plain text)."""
    return f"{ref(ev)} {clip(ev.name or ev.job_type or '', name_limit)}".rstrip()


@dataclass(slots=True)
class RenderedParts:
    """The pieces of a progress message, as plain (unescaped) text; formats escape them."""

    icon: str
    title: str
    status_line: str
    bar_line: str | None
    details: list[str]
    last_message: str | None
    hint: str | None


def outcome_text(ev: JobProgressEvent) -> str:
    """The status word plus what it means: ``completed in 3m12s``, ``failed: boom``, ``cancelled by @a``."""
    st = ev.status
    if st == "completed":
        took = None
        if ev.started_at and ev.finished_at:
            took = ev.finished_at - ev.started_at
        return f"completed in {fmt_duration(took)}" if took is not None else "completed"
    if st == "failed":
        if ev.type == "batch":
            return f"failed: {ev.failed_operations} of {ev.total_operations} failed"
        return f"failed: {clip(ev.error, 200) or 'unknown error'}"
    if st == "cancelled":
        return f"cancelled by {ev.control_by}" if ev.control_by else "cancelled"
    if st == "paused":
        if ev.interrupted:
            return "paused (interrupted by restart)"
        return f"paused by {ev.control_by}" if ev.control_by else "paused"
    if st == "running" and ev.control in ("pause", "cancel"):
        # The acknowledgement of a person's command: the message says who asked.
        by = f" by {ev.control_by}" if ev.control_by else ""
        return f"running ({ev.control} requested{by})"
    if st == "pending" and ev.retry_count and ev.error:
        return f"pending (retry {ev.retry_count} after: {clip(ev.error, 120)})"
    return st


def parts(ev: JobProgressEvent, *, prefix: str = "!") -> RenderedParts:
    """Split an event into the pieces every format shows."""
    pct = ev.display_percent
    details: list[str] = []
    bar_line = None
    if ev.type == "batch":
        done = (ev.completed_operations or 0) + (ev.failed_operations or 0)
        details.append(f"{done}/{ev.total_operations or 0} done")
        if ev.failed_operations:
            details.append(f"{ev.failed_operations} failed")
        bar_line = f"{bar(pct)} {pct:.0f}%" if pct is not None else bar(None)
    elif ev.current is None and ev.status in ("pending", "running", "cancelled", "failed"):
        bar_line = None  # nothing reported yet: a bar would only say "0%"
    elif ev.status not in ("completed",) or pct is not None:
        if ev.indeterminate and pct is None:
            bar_line = f"{bar(None)} " + (f"{fmt_number(ev.current)} done" if ev.current is not None else "…")
        elif pct is not None:
            bar_line = f"{bar(pct)} {pct:.0f}%"
            if ev.current is not None and ev.total:
                bar_line += f" ({fmt_number(ev.current)}/{fmt_number(ev.total)})"
    if ev.stage_name is not None or ev.stage_index is not None:
        idx = (ev.stage_index or 0) + 1
        count = f"/{ev.stage_count}" if ev.stage_count else ""
        details.append(f"stage {idx}{count} {clip(ev.stage_name, 60)}".rstrip())
    if ev.eta_seconds is not None and ev.status == "running":
        details.append(f"ETA {fmt_duration(ev.eta_seconds)}")
    if ev.type == "job" and ev.retry_count and ev.status in ("running", "pending"):
        details.append(f"attempt {ev.retry_count + 1}")
    last = ev.current_operation if ev.type == "batch" else ev.message
    hint = None
    if ev.status == "paused":
        hint = f"resume with {prefix}resume {ev.id}" if ev.type == "job" else None
    errors = ev.errors if ev.type == "batch" else []
    if errors:
        details.append("errors: " + "; ".join(clip(e, 80) for e in errors[-3:]))
    return RenderedParts(
        icon=STATUS_ICON.get(ev.status, "•"),
        title=label(ev),
        status_line=outcome_text(ev),
        bar_line=bar_line,
        details=details,
        last_message=clip(last) or None,
        hint=hint,
    )


def render_plain(ev: JobProgressEvent, *, prefix: str = "!") -> str:
    """Plain text: ``⏳ #12 demo.count — running`` then the bar and details. Mentions defused."""
    p = parts(ev, prefix=prefix)
    lines = [f"{p.icon} {p.title} — {p.status_line}"]
    if p.bar_line:
        lines.append(p.bar_line)
    if p.details:
        lines.append(" · ".join(p.details))
    if p.last_message:
        lines.append(p.last_message)
    if p.hint:
        lines.append(p.hint)
    return defuse_mentions("\n".join(lines))


def render_html(ev: JobProgressEvent, *, prefix: str = "!") -> str:
    """HTML for Matrix ``formatted_body``: everything user-supplied is escaped."""
    p = parts(ev, prefix=prefix)
    e = html.escape
    out = [f"{p.icon} <b>{e(p.title)}</b> — <i>{e(p.status_line)}</i>"]
    if p.bar_line:
        out.append(f"<code>{e(p.bar_line)}</code>")
    if p.details:
        out.append(e(" · ".join(p.details)))
    if p.last_message:
        out.append(e(p.last_message))
    if p.hint:
        out.append(f"<i>{e(p.hint)}</i>")
    return defuse_mentions("<br>".join(out))


def render_line(ev: JobProgressEvent) -> str:
    """One short line for terminals and job lists."""
    p = parts(ev)
    bits = [f"{p.icon} {p.title}", p.status_line]
    if p.bar_line and ev.status not in ("completed", "failed", "cancelled"):
        bits.append(p.bar_line)
    bits.extend(p.details)
    if p.last_message and ev.status in ("running", "paused"):
        bits.append(p.last_message)
    return defuse_mentions(" · ".join(bits))
