"""The Pause / Resume / Cancel buttons under a progress message, as persistent views.

Each button is a :class:`JobButton`, a ``DynamicItem`` whose ``custom_id`` carries the action and the
job id (``pb:pause:12``, ``pb:cancel:b3`` for a batch). The adapter registers the class with
``Client.add_dynamic_items`` when it starts, so a click on any progress message is routed to it even
if the message was posted by an earlier process: the buttons survive restarts. The views holding them
have ``timeout=None`` and, being made only of dynamic items, leave nothing behind in discord.py's view
store per message.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import discord

log = logging.getLogger(__name__)

#: ``pb:<action>:<target>``: the target is a job id (``12``), a direct job (``d3``) or a batch (``b3``).
CUSTOM_ID_TEMPLATE = r"pb:(?P<action>pause|resume|cancel):(?P<target>[bd]?[0-9]{1,20})"

_STYLE = {
    "pause": (discord.ButtonStyle.secondary, "⏸️", "Pause"),
    "resume": (discord.ButtonStyle.primary, "▶️", "Resume"),
    "cancel": (discord.ButtonStyle.danger, "⏹️", "Cancel"),
}

__all__ = ["CUSTOM_ID_TEMPLATE", "ButtonHandler", "JobButton", "custom_id", "make_view"]


class ButtonHandler(Protocol):
    """What a client must offer (as its ``adapter`` attribute) for :class:`JobButton` clicks."""

    async def on_button(self, interaction: discord.Interaction[Any], action: str, target: str) -> None:
        """Handle a click on ``action`` for job or batch ``target``."""


def custom_id(action: str, target: str) -> str:
    """The custom_id of one button (at most 100 characters, as Discord requires)."""
    return f"pb:{action}:{target}"


class JobButton(discord.ui.DynamicItem[discord.ui.Button[Any]], template=CUSTOM_ID_TEMPLATE):
    """One Pause / Resume / Cancel button; its custom_id says which job it controls."""

    def __init__(self, action: str, target: str, *, disabled: bool = False) -> None:
        """A button for ``action`` on ``target`` (a job id, ``d3`` or ``b3``)."""
        style, emoji, label = _STYLE[action]
        super().__init__(
            discord.ui.Button(
                style=style, emoji=emoji, label=label, custom_id=custom_id(action, target), disabled=disabled
            )
        )
        self.action = action
        self.target = target

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction[Any], item: discord.ui.Item[Any], match: Any, /
    ) -> JobButton:
        """Rebuild the button from a click (discord.py calls this for every matching custom_id)."""
        return cls(match["action"], match["target"])

    async def callback(self, interaction: discord.Interaction[Any]) -> None:
        """Hand the click to the adapter that owns the client."""
        handler: ButtonHandler | None = getattr(interaction.client, "adapter", None)
        if handler is None:
            log.warning("button %s clicked but no adapter is attached to the client", self.custom_id)
            return
        await handler.on_button(interaction, self.action, self.target)


def make_view(target: str, buttons: tuple[tuple[str, bool], ...]) -> discord.ui.View:
    """A persistent view (``timeout=None``) with the buttons of one progress message."""
    view = discord.ui.View(timeout=None)
    for action, enabled in buttons:
        view.add_item(JobButton(action, target, disabled=not enabled))
    return view
