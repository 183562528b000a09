"""The common base of chat adapters (one connector per platform, as in opsdroid)."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import Any

from core.events import JobProgressEvent
from core.service import ProgressService

from .commands import CommandRouter

log = logging.getLogger(__name__)


def secret_text(value: Any) -> str | None:
    """The plain text of a pydantic ``SecretStr`` (or a str), or None when unset or empty.

    Adapters read secrets from the bot's settings duck-typed, without importing ``bot/``.
    """
    if value is None:
        return None
    getter = getattr(value, "get_secret_value", None)
    text = getter() if callable(getter) else str(value)
    return text or None


class ChatAdapter(ABC):
    """A chat platform connector: shows progress messages and turns chat input into commands.

    Subclasses implement :meth:`start`, :meth:`stop` and :meth:`on_event`. The base registers
    :meth:`on_event` as a bus listener, which must not block (schedule I/O instead).
    """

    #: Short platform name used in bindings and ``auth.admins`` prefixes ("matrix", "discord", "console").
    platform: str = "chat"

    def __init__(self, service: ProgressService, router: CommandRouter) -> None:
        self.service = service
        self.router = router
        self._listening = False

    def listen(self) -> None:
        """Start receiving events from the bus."""
        if not self._listening:
            self.service.bus.add_listener(self._on_event_safe)
            self._listening = True

    def unlisten(self) -> None:
        """Stop receiving events."""
        if self._listening:
            self.service.bus.remove_listener(self._on_event_safe)
            self._listening = False

    def _on_event_safe(self, ev: JobProgressEvent) -> None:
        try:
            self.on_event(ev)
        except Exception:
            log.exception("%s adapter failed on event for %s #%s", self.platform, ev.type, ev.id)

    @staticmethod
    def wants_message(ev: JobProgressEvent) -> bool:
        """Jobs inside a batch get no message of their own: the batch's message shows them."""
        return not (ev.type == "job" and ev.batch_id is not None)

    @abstractmethod
    async def start(self) -> None:
        """Connect and begin showing progress."""

    @abstractmethod
    async def stop(self) -> None:
        """Deliver what is pending (best effort) and disconnect."""

    @abstractmethod
    def on_event(self, ev: JobProgressEvent) -> None:
        """Handle one progress event (called on the event loop; must not block)."""
