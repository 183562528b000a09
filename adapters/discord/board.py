"""The Discord format of a room board (:mod:`adapters.board`): markdown within 2,000 characters, and
its controls: a select menu of the board's jobs, whose choice offers that job's Pause / Resume /
Cancel buttons.

Every piece of user text goes through :func:`~adapters.discord.content.esc` (markdown escaped,
mentions broken), like every other Discord message. The adapter registers :class:`BoardSelect` with
``Client.add_dynamic_items`` (as it does the job buttons) when it shows boards; the transport posts a
:class:`BoardMessage` with :func:`board_controls` under it (none once the board is closed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import discord

from ..board import BoardMarkup, BoardView, board_text
from ..driver import Content
from ..render import clip
from .content import MAX_CHOICE_NAME, MAX_CONTENT, esc
from .views import make_view

#: Discord markdown: bold labels, italic outcomes, the bar as code (bar characters and digits only:
#: nothing to escape in it).
MARKDOWN_MARKUP = BoardMarkup(
    escape=esc,
    strong=lambda t: f"**{t}**",
    em=lambda t: f"*{t}*",
    bar=lambda t: f"`{t}`",
    newline="\n",
)


def board_markdown(view: BoardView) -> str:
    """The board as Discord markdown."""
    return board_text(view, MARKDOWN_MARKUP)


@dataclass(slots=True, frozen=True)
class BoardMessage:
    """What the transport sends for a board: its markdown, and the view its select menu lists."""

    content: str
    view: BoardView


def board_content(view: BoardView) -> Content:
    """The message content showing ``view`` (the select menu follows the lines, so the text covers it)."""
    text = board_markdown(view)
    return Content(BoardMessage(text, view), text)


def board_fits(content: Content) -> bool:
    """Whether the content is within Discord's message limit."""
    return len(content.text) <= MAX_CONTENT


# ---------------------------------------------------------------------------------------------- controls
#: ``pb:board:<id>``: the select menu of a board (its id is its channel's: one board per channel at a time).
BOARD_SELECT_TEMPLATE = r"pb:board:(?P<board>[0-9]{1,20})"
#: Discord allows at most 25 options in a select menu.
MAX_OPTIONS = 25


class BoardSelect(discord.ui.DynamicItem[discord.ui.Select[Any]], template=BOARD_SELECT_TEMPLATE):
    """The select menu of a board's jobs. Choosing one answers (ephemerally) with that job's Pause /
    Resume / Cancel buttons: the same :class:`~adapters.discord.views.JobButton` as under a job's own
    message, so a click gets the job's authorization and answers, and survives restarts."""

    def __init__(self, board: int, options: list[discord.SelectOption] | None = None) -> None:
        """The menu of board ``board`` offering ``options`` (one per job)."""
        super().__init__(
            discord.ui.Select(
                custom_id=f"pb:board:{board}",
                placeholder="Choose a job to pause, resume or cancel",
                options=options or [discord.SelectOption(label="no job", value="0")],
                min_values=1,
                max_values=1,
            )
        )
        self.board = board

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction[Any], item: discord.ui.Item[Any], match: Any, /
    ) -> BoardSelect:
        """Rebuild the menu from a choice (discord.py calls this for every matching custom_id)."""
        return cls(int(match["board"]))

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        """Offer the chosen job's buttons, only to the person who chose it."""
        data: dict[str, Any] = dict(interaction.data or {})
        values = data.get("values") or []
        target = str(values[0]) if values else ""
        if not target.isdigit() or target == "0":
            await interaction.response.send_message("Choose a job first.", ephemeral=True)
            return
        buttons = (("pause", True), ("resume", True), ("cancel", True))
        await interaction.response.send_message(
            f"Job #{target}:", view=make_view(target, buttons), ephemeral=True
        )


def board_controls(board: int, view: BoardView) -> discord.ui.View | None:
    """The persistent view under a board: a select menu of its jobs (active ones first, at most 25);
    None once the board is closed or shows no job line (nothing left to control)."""
    if view.closed or not view.lines:
        return None
    options = [
        discord.SelectOption(
            label=clip(f"{ln.label}", MAX_CHOICE_NAME), value=str(ln.job_id), emoji=ln.icon or None
        )
        for ln in view.lines[:MAX_OPTIONS]
    ]
    controls = discord.ui.View(timeout=None)
    controls.add_item(BoardSelect(board, options))
    return controls
