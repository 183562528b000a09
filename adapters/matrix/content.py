"""Event contents the Matrix adapter sends: progress notices, their ``m.replace`` edits and replies.

Pure functions, so the wire shapes can be checked without a homeserver. Every user-supplied piece of
text is escaped for HTML (in :mod:`adapters.render`) and mass mentions are defused; each event carries
``m.mentions`` so that clients supporting intentional mentions ping exactly who we name and no one else.
"""

from __future__ import annotations

import html
import re
from typing import Any
from urllib.parse import quote

from core.events import JobProgressEvent

from ..render import defuse_mentions, label, outcome_text, render_html, render_plain

HTML_FORMAT = "org.matrix.custom.html"
_USER_ID = re.compile(r"^@[a-z0-9._=\-/+]+:[A-Za-z0-9.\-:\[\]]+$", re.IGNORECASE)

#: Reaction keys, without the emoji variation selector (clients send both forms).
REACTIONS: dict[str, str] = {"⏸": "pause", "▶": "resume", "⏹": "cancel"}
OFFERED_REACTIONS = ("⏸️", "▶️", "⏹️")


def reaction_action(key: str) -> str | None:
    """``pause``/``resume``/``cancel`` for ⏸ ▶ ⏹ (with or without U+FE0F), else None."""
    return REACTIONS.get(key.replace("\ufe0f", "").strip())


def is_user_id(text: str | None) -> bool:
    """Whether ``text`` looks like a Matrix user id (``@name:server``)."""
    return bool(text) and bool(_USER_ID.match(str(text)))


def _text_and_html(body: str, formatted: str) -> dict[str, Any]:
    return {"msgtype": "m.notice", "body": body, "format": HTML_FORMAT, "formatted_body": formatted}


def progress_content(ev: JobProgressEvent, *, prefix: str = "!") -> dict[str, Any]:
    """The content of a progress notice: plain ``body`` plus escaped HTML ``formatted_body``.

    ``m.mentions`` is empty: a progress message never pings anyone, whatever its text says.
    """
    content = _text_and_html(render_plain(ev, prefix=prefix), render_html(ev, prefix=prefix))
    content["m.mentions"] = {}
    return content


def edit_content(original_event_id: str, new_content: dict[str, Any]) -> dict[str, Any]:
    """An ``m.replace`` edit of ``original_event_id`` showing ``new_content``, with a ``* `` fallback."""
    content = _text_and_html("* " + new_content["body"], "* " + new_content["formatted_body"])
    content["m.new_content"] = dict(new_content)
    content["m.relates_to"] = {"rel_type": "m.replace", "event_id": original_event_id}
    # The edit itself must not ping anyone either.
    content["m.mentions"] = {}
    return content


def user_pill(user_id: str) -> str:
    """An HTML mention pill for a Matrix user id (escaped)."""
    href = "https://matrix.to/#/" + quote(user_id, safe="@:")
    return f'<a href="{html.escape(href)}">{html.escape(user_id)}</a>'


def text_reply(
    text: str, in_reply_to: str | None, *, mention: str | None = None, thread_root: str | None = None
) -> dict[str, Any]:
    """A notice answering a command or reaction, threaded to ``in_reply_to`` with ``m.in_reply_to``.

    ``text`` may be several lines; it is escaped for HTML and its mass mentions are defused. ``mention``
    (the asker) is the only user ``m.mentions`` names.
    """
    plain = defuse_mentions(text)
    formatted = "<br>".join(html.escape(line) for line in plain.split("\n"))
    content = _text_and_html(plain, formatted)
    if in_reply_to:
        relates: dict[str, Any] = {"m.in_reply_to": {"event_id": in_reply_to}}
        if thread_root:
            # Inside a thread, the reply stays in that thread.
            relates.update({"rel_type": "m.thread", "event_id": thread_root, "is_falling_back": False})
        content["m.relates_to"] = relates
    content["m.mentions"] = {"user_ids": [mention]} if is_user_id(mention) else {}
    return content


def finish_reply(ev: JobProgressEvent, progress_event_id: str) -> dict[str, Any]:
    """The short reply to a progress message when its job or batch ends, mentioning the requester."""
    tail = f"{label(ev)} {outcome_text(ev)}"
    owner = ev.owner if is_user_id(ev.owner) else None
    if owner:
        plain = defuse_mentions(f"{owner}: {tail}")
        formatted = defuse_mentions(f"{user_pill(owner)}: {html.escape(tail)}")
    else:
        plain = defuse_mentions(tail)
        formatted = defuse_mentions(html.escape(tail))
    content = _text_and_html(plain, formatted)
    content["m.relates_to"] = {"m.in_reply_to": {"event_id": progress_event_id}}
    content["m.mentions"] = {"user_ids": [owner]} if owner else {}
    return content
