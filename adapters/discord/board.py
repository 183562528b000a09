"""The Discord format of a room board (:mod:`adapters.board`): markdown within 2,000 characters.

Every piece of user text goes through :func:`~adapters.discord.content.esc` (markdown escaped,
mentions broken), like every other Discord message.
"""

from __future__ import annotations

from ..board import BoardView
from ..driver import Content
from .content import MAX_CONTENT, esc


def board_markdown(view: BoardView) -> str:
    """The board as Discord markdown: bold labels, italic outcomes, the bar as code."""
    out = [f"**{esc(view.header)}**"]
    for ln in view.lines:
        bits = [f"{ln.icon} **{esc(ln.label)}**"]
        if ln.state:
            bits.append(f"— *{esc(ln.state)}*")
        if ln.bar:
            bits.append(f"`{ln.bar}`")  # bar characters and digits only: nothing to escape
        if ln.detail:
            bits.append(f"· {esc(ln.detail)}")
        out.append(" ".join(bits))
    if view.summary:
        out.append(f"*… {esc(view.summary)}*")
    return "\n".join(out)


def board_content(view: BoardView) -> Content:
    """The message content showing ``view``."""
    text = board_markdown(view)
    return Content(text, text)


def board_fits(content: Content) -> bool:
    """Whether the content is within Discord's message limit."""
    return len(content.text) <= MAX_CONTENT
