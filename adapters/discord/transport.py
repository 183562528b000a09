"""The Discord transport: the platform half of the progress-message driver, over discord.py's HTTP.

It implements :class:`adapters.driver.Transport` (post, edit, pin, unpin, reply, classify errors) and
:class:`adapters.driver.Reposting` (Discord's 1-hour rule), and holds the outboxes:

* **Scopes.** Discord limits each channel's bucket and, above that, the bot globally. Every channel has
  its own :class:`~adapters.outbox.Outbox` (``edit_rate`` / ``edit_burst``) nested in one global outbox
  (``global_rate``): a call waits for its channel's turn, then the global one. The ``X-RateLimit-*``
  headers of the edit route (seen through an aiohttp trace hook, :meth:`DiscordTransport.on_response`)
  feed :meth:`Outbox.observe`, so the outbox waits *before* a 429 instead of discord.py waiting *after*
  one; a 429 (discord.py waits it out and retries: its handling stays the safety net) pauses the
  channel, or with ``X-RateLimit-Global`` every channel.
* **The answer to** ``/run`` **is the progress message.** The adapter :meth:`holds <hold>` the
  interaction; the driver's first post of that job (``reply_to`` = the interaction id) answers it with
  the progress message itself (or fills the deferred "thinking…" placeholder), so no "Started" notice is
  posted. Interaction responses use the interaction's own route, outside the channel and global
  limits, so they never wait behind edits.
* **The 1-hour rule.** Discord throttles edits of messages older than an hour (error 30046). A message
  ``repost_after_seconds`` old (on Discord's clock: its snowflake) :meth:`needs a re-post
  <needs_repost>`, as does one that was deleted or answered 30046 anyway; the driver posts a fresh one
  and :meth:`retire` edits the old one once into a pointer.
* **Boards.** A room board (:mod:`adapters.board`) arrives as a :class:`~adapters.discord.board.BoardMessage`:
  its markdown with the select menu of its jobs under it (:func:`~adapters.discord.board.board_controls`).
  Its first post answers the ``/run`` it names (``reply_to``), like a job's first progress message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import discord

from core.events import JobProgressEvent

from ..driver import Content, ErrorKind, classify_error
from ..outbox import Outbox
from .board import BoardMessage, board_controls
from .config import DiscordConfig
from .content import Rendered, completion_text, pointer_text, render
from .views import make_view

log = logging.getLogger(__name__)

#: Discord's edit window: edits of older messages hit error 30046.
EDIT_WINDOW_SECONDS = 3600.0
ERR_UNKNOWN_MESSAGE = 10008
ERR_OLD_MESSAGE_EDITS = 30046

_CHANNEL_PATH = re.compile(r"/channels/(\d+)(/messages/\d+)?")

__all__ = ["DiscordTransport", "Held", "MustRepost"]


class MustRepost(Exception):
    """An edit refused because the message is gone or too old: the driver re-posts it (transient)."""


@dataclass(slots=True, eq=False)
class Held:
    """An interaction whose answer is the progress message of the job it starts."""

    interaction: discord.Interaction[Any]
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    answered: asyncio.Event = field(default_factory=asyncio.Event)
    #: The job the command started, once the command returned (None: it started none here).
    job_id: int | str | None = None
    known: asyncio.Event = field(default_factory=asyncio.Event)

    def started(self, job_id: int | str | None) -> None:
        """The command returned: it started ``job_id`` (shown in this channel), or nothing (None)."""
        self.job_id = job_id
        self.known.set()


class DiscordTransport:
    """Discord calls for the driver, through each channel's outbox inside the global one."""

    platform = "discord"
    #: The controls are buttons on the message, not reactions.
    reactions = 0

    def __init__(
        self,
        client: discord.Client,
        config: DiscordConfig,
        *,
        prefix: str = "/",
        clock: Callable[[], float],
    ) -> None:
        """``clock`` (epoch seconds) measures message age for the 1-hour rule; tests pass the fake's."""
        self.client = client
        self.config = config
        self.prefix = prefix
        self.clock = clock
        self.pin_enabled = config.pin
        self.reply_enabled = config.reply_on_finish
        self.global_scope = Outbox(
            "discord:global", rate=config.global_rate, burst=config.global_rate, reserve=0, max_in_flight=50
        )
        self._channels: dict[str, Outbox] = {}
        #: Messages that must be re-posted whatever their age (deleted, or refused with 30046).
        self._stale: set[str] = set()
        self._held: dict[str, Held] = {}
        self._pin_warned: set[str] = set()
        self.rate_limited = 0
        self.answers = 0

    # ------------------------------------------------------------------ scopes
    def outbox(self, room: str) -> Outbox:
        """The outbox of a channel's bucket (created on first use), nested in the global one."""
        box = self._channels.get(room)
        if box is None:
            cfg = self.config
            box = Outbox(
                f"discord:{room}",
                rate=cfg.edit_rate,
                burst=cfg.edit_burst,
                reserve=cfg.answer_reserve,
                parent=self.global_scope,
            )
            self._channels[room] = box
        return box

    def outboxes(self) -> dict[str, Outbox]:
        """Every channel's outbox so far."""
        return dict(self._channels)

    async def aclose(self) -> None:
        """Stop every outbox's worker."""
        for box in [*self._channels.values(), self.global_scope]:
            await box.aclose()

    async def on_response(
        self, session: aiohttp.ClientSession, ctx: Any, params: aiohttp.TraceRequestEndParams
    ) -> None:
        """aiohttp trace hook: feed the edit route's ``X-RateLimit-*`` headers and 429s to the scopes."""
        m = _CHANNEL_PATH.search(params.url.path)
        if m is None:
            return
        headers = params.response.headers
        box = self._channels.get(m.group(1))
        try:
            if params.response.status == 429:
                self.rate_limited += 1
                retry = float(headers.get("Retry-After") or headers.get("X-RateLimit-Reset-After") or 1.0)
                scope = self.global_scope if headers.get("X-RateLimit-Global") == "true" else box
                if scope is not None:
                    scope.observe(0, retry)
            elif params.method == "PATCH" and m.group(2) and box is not None:
                # The edit route's bucket is the one that binds (posts and pins have roomier ones).
                if "X-RateLimit-Remaining" in headers:
                    remaining = int(headers["X-RateLimit-Remaining"])
                    reset = float(headers.get("X-RateLimit-Reset-After") or 0.0)
                    box.observe(remaining, reset, pace=self.config.pace_edits)
        except ValueError:
            return  # a garbled header: the outbox's own model stands

    # ------------------------------------------------------------------ Transport
    def render(self, ev: JobProgressEvent) -> Content:
        """The message content and buttons showing ``ev``; the text compared covers both."""
        state = render(ev, prefix=self.prefix)
        return Content(state, f"{state.content}\n{state.buttons}")

    def _channel(self, room: str) -> Any:
        """A channel we can send to: the cached one, or a partial one (no cache needed)."""
        cid = int(room)
        channel = self.client.get_channel(cid)
        if channel is not None and hasattr(channel, "send"):
            return channel
        guild_id = self.config.guild_ids[0] if self.config.guild_ids else None
        return self.client.get_partial_messageable(cid, guild_id=guild_id)

    @staticmethod
    def _parts(room: str, payload: Rendered | BoardMessage) -> tuple[str, discord.ui.View | None]:
        """The text and the controls of a job's or batch's message, or of a board."""
        if isinstance(payload, BoardMessage):
            return payload.content, board_controls(int(room), payload.view)
        view = make_view(payload.ref, payload.buttons) if payload.buttons else None
        return payload.content, view

    async def post(self, room: str, content: Content, reply_to: str | None, tag: str) -> str:
        """Post a progress message or a board; as the answer to the held ``/run`` ``reply_to`` if any."""
        payload: Rendered | BoardMessage = content.payload
        text, view = self._parts(room, payload)
        held: Held | None = None
        if isinstance(payload, BoardMessage):
            # A board answers the /run it names: that job is on it (the board took the origin).
            held = self._held.pop(reply_to, None) if reply_to is not None else None
        elif reply_to is not None or self._held:
            held = await self._held_for(payload)
        if held is not None:
            answered = await self._answer_with(held, text, view)
            if answered is not None:
                return answered
        kwargs: dict[str, Any] = {"content": text}
        if view is not None:
            kwargs["view"] = view
        posted = await self._channel(room).send(**kwargs)
        return str(posted.id)

    async def edit(self, room: str, message_id: str, content: Content, tag: str) -> None:
        """Edit the message's content and controls; a deleted or too old message needs a re-post."""
        text, view = self._parts(room, content.payload)
        try:
            await self._channel(room).get_partial_message(int(message_id)).edit(content=text, view=view)
        except discord.HTTPException as exc:
            if exc.code in (ERR_UNKNOWN_MESSAGE, ERR_OLD_MESSAGE_EDITS):
                self._stale.add(message_id)
                raise MustRepost(f"message {message_id}: {exc.code} {exc.text}") from exc
            raise

    async def pin(self, room: str, message_id: str, pinned: bool) -> bool:
        """Pin or unpin; False when Discord refuses the pin (no permission, 50 pins): not retried."""
        partial = self._channel(room).get_partial_message(int(message_id))
        try:
            await (partial.pin() if pinned else partial.unpin())
        except discord.NotFound:
            if pinned:
                raise
            return True  # deleted meanwhile: nothing left to unpin
        except (discord.Forbidden, discord.HTTPException) as exc:
            if not pinned or exc.status == 429 or exc.status >= 500:
                raise
            if room not in self._pin_warned:
                self._pin_warned.add(room)
                log.warning(
                    "discord: cannot pin progress messages in channel %s (%s); carrying on without pins",
                    room,
                    exc.text or exc.status,
                )
            return False
        return True

    async def react(self, room: str, message_id: str, index: int, tag: str) -> None:
        """Never called: Discord progress messages carry buttons, not reactions (``reactions = 0``)."""
        raise NotImplementedError("discord progress messages use buttons")

    def wants_reply(self, ev: JobProgressEvent) -> bool:
        """Only when there is a Discord user to mention: a reply that pings nobody is just noise."""
        return bool(ev.owner and ev.owner.isdigit())

    async def reply(self, room: str, message_id: str, ev: JobProgressEvent, tag: str) -> None:
        """The completion reply: the one message that may ping, the requester only, by id."""
        assert ev.owner is not None
        mentions = discord.AllowedMentions(
            everyone=False, roles=False, users=[discord.Object(id=int(ev.owner))], replied_user=False
        )
        ref = discord.MessageReference(
            message_id=int(message_id), channel_id=int(room), fail_if_not_exists=False
        )
        await self._channel(room).send(completion_text(ev), reference=ref, allowed_mentions=mentions)

    def classify(self, exc: BaseException) -> tuple[ErrorKind, float]:
        """429s are rate limits; other 4xx (forbidden, unknown channel, bad form) are permanent."""
        if isinstance(exc, discord.RateLimited):
            return ErrorKind.RATE_LIMITED, exc.retry_after
        if isinstance(exc, discord.HTTPException):
            if exc.status == 429:
                return ErrorKind.RATE_LIMITED, 1.0
            if 400 <= exc.status < 500:
                return ErrorKind.PERMANENT, 0.0
        return classify_error(exc)

    # ------------------------------------------------------------------ Reposting (the 1-hour rule)
    def _age(self, message_id: str) -> float:
        return self.clock() - discord.utils.snowflake_time(int(message_id)).timestamp()

    def needs_repost(self, message_id: str) -> bool:
        """Deleted, refused with 30046, or ``repost_after_seconds`` old: edits would fail."""
        return message_id in self._stale or self._age(message_id) >= self.config.repost_after_seconds

    async def retire(self, room: str, old_id: str, new_id: str, ev: JobProgressEvent, tag: str) -> None:
        """Edit the replaced message into a pointer to the new one (skipped when it is past the hour)."""
        if old_id in self._stale or self._age(old_id) >= EDIT_WINDOW_SECONDS:
            return
        text = pointer_text(ev, render(ev).ref, self.jump_url(room, new_id))
        await self._channel(room).get_partial_message(int(old_id)).edit(content=text, view=None)

    def jump_url(self, room: str, message_id: str) -> str:
        """The link to a message."""
        channel = self.client.get_channel(int(room))
        guild = getattr(channel, "guild", None)
        gid = (
            guild.id if guild is not None else (self.config.guild_ids[0] if self.config.guild_ids else "@me")
        )
        return f"https://discord.com/channels/{gid}/{room}/{message_id}"

    # ------------------------------------------------------------------ /run: the answer is the message
    def hold(self, interaction: discord.Interaction[Any]) -> Held:
        """Keep ``interaction`` for the progress message that will answer it (key: its id)."""
        held = Held(interaction)
        self._held[str(interaction.id)] = held
        return held

    async def _held_for(self, state: Rendered) -> Held | None:
        """The held ``/run`` interaction that this first post answers, taken out of the waiting ones.

        The driver names the oldest ``/run`` of the same person in the channel (``reply_to``, which
        gives the post a person's priority), but an older job of theirs may be posted first: an
        interaction is answered only by the job it started, so this waits (briefly) for the commands
        under way to say which jobs those are.
        """
        if state.kind != "job" or not self._held:
            return None
        unknown = [h.known.wait() for h in self._held.values() if not h.known.is_set()]
        if unknown:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.defer_after):
                    await asyncio.gather(*unknown)
        mine = next((k for k, h in self._held.items() if h.job_id == state.target), None)
        return self._held.pop(mine, None) if mine is not None else None

    def release(self, key: str) -> bool:
        """The held interaction will not be answered by a progress message; True if it still was held."""
        return self._held.pop(key, None) is not None

    @staticmethod
    async def defer(held: Held, within: float) -> None:
        """Wait up to ``within`` s for the progress message to answer ``held``; defer it otherwise
        (a "thinking…" placeholder that the progress message then fills): Discord allows 3 s."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, within)):
                await held.answered.wait()
                return
        async with held.lock:
            if not held.interaction.response.is_done():
                await held.interaction.response.defer(thinking=True)

    async def _answer_with(self, held: Held, text: str, view: discord.ui.View | None) -> str | None:
        """Answer the interaction with the progress message; its id, or None (then post normally)."""
        interaction = held.interaction
        none = discord.AllowedMentions.none()
        try:
            async with held.lock:
                if not interaction.response.is_done():
                    if view is not None:
                        resp = await interaction.response.send_message(text, view=view, allowed_mentions=none)
                    else:
                        resp = await interaction.response.send_message(text, allowed_mentions=none)
                    msg: Any = resp.resource
                    if msg is None:
                        msg = await interaction.original_response()
                else:
                    if view is not None:
                        msg = await interaction.edit_original_response(
                            content=text, view=view, allowed_mentions=none
                        )
                    else:
                        msg = await interaction.edit_original_response(content=text, allowed_mentions=none)
            self.answers += 1
            held.answered.set()
            return str(msg.id)
        except discord.HTTPException as exc:
            # Too late (the 3 s passed unanswered, or the token expired): post it as a plain message.
            log.info("discord: could not answer /run with its progress message (%s); posting it", exc)
            return None
