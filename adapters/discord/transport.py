"""The Discord transport: the platform half of the progress-message driver, over discord.py's HTTP.

It implements :class:`adapters.driver.Transport` (post, edit, pin, unpin, reply, classify errors) and
:class:`adapters.driver.Reposting` (Discord's 1-hour rule), and holds the outboxes:

* **Scopes.** Discord limits each route of a channel in a bucket of its own (edits 5 per 5 s; new
  messages and replies; pins and unpins) and, above those, the bot globally. So every channel has one
  :class:`~adapters.outbox.Outbox` per :class:`~adapters.driver.CallKind`, each nested in one global
  outbox (``global_rate``): a call waits for its bucket's turn, then the global one, and posts, pins and
  replies never spend the edits that show progress. Each route's ``X-RateLimit-*`` headers (seen through
  an aiohttp trace hook, :meth:`DiscordTransport.on_response`) feed its own outbox
  (:meth:`Outbox.observe`; the post and pin buckets also take the announced limit as their rate,
  :meth:`Outbox.announce`), so an outbox waits *before* a 429 instead of discord.py waiting *after* one;
  a 429 (discord.py waits it out and retries: its handling stays the safety net) pauses the bucket it
  came from, or with ``X-RateLimit-Global`` every channel.
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

from ..driver import CallKind, Content, ErrorKind, classify_error
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

_CHANNEL_PATH = re.compile(r"/channels/(\d+)(/[^?]*)?$")
_MESSAGE = re.compile(r"/messages/\d+")


def _route(method: str, path: str) -> tuple[str, CallKind | None] | None:
    """The channel of a REST call and the kind of bucket it is limited in (None: a call the outboxes do
    not make, such as a read); None for calls outside channels (interactions, webhooks)."""
    m = _CHANNEL_PATH.search(path)
    if m is None:
        return None
    rest = m.group(2) or ""
    kind: CallKind | None = None
    if "/pins/" in rest and method in ("PUT", "DELETE"):
        kind = CallKind.PIN
    elif "/reactions/" in rest and method in ("PUT", "DELETE"):
        kind = CallKind.REACT
    elif method == "PATCH" and _MESSAGE.fullmatch(rest):
        kind = CallKind.EDIT
    elif method == "POST" and rest == "/messages":
        kind = CallKind.POST
    return m.group(1), kind


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
    """Discord calls for the driver, through each channel's per-route outboxes inside the global one."""

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
        self._boxes: dict[tuple[str, CallKind], Outbox] = {}
        #: The longest ``X-RateLimit-Reset-After`` seen per bucket: a window's first request sees the
        #: whole window, so this converges on its length (Discord does not send it).
        self._windows: dict[tuple[str, CallKind], float] = {}
        #: Messages that must be re-posted whatever their age (deleted, or refused with 30046).
        self._stale: set[str] = set()
        self._held: dict[str, Held] = {}
        self._pin_warned: set[str] = set()
        self.rate_limited = 0
        self.answers = 0

    # ------------------------------------------------------------------ scopes
    def outbox(self, room: str, kind: CallKind) -> Outbox:
        """The outbox of the channel's bucket for ``kind`` (created on first use), inside the global one.

        Discord limits each route of a channel in a bucket of its own: edits (5 per 5 s), new messages
        (progress messages and replies) and pins each have one, so a post, pin or reply never spends an
        edit. Every bucket starts at ``edit_rate`` / ``edit_burst``; posts and pins then follow the
        limit their route announces (:meth:`on_response`).
        """
        key = (room, kind)
        box = self._boxes.get(key)
        if box is None:
            cfg = self.config
            box = Outbox(
                f"discord:{room}:{kind}",
                rate=cfg.edit_rate,
                burst=cfg.edit_burst,
                reserve=cfg.answer_reserve,
                # One request at a time per bucket: discord.py counts the requests in flight against
                # what the bucket has left and, when that reaches 0, sleeps out the rest of the window
                # although the window still had room. The calls take milliseconds; the rate is per s.
                max_in_flight=1,
                parent=self.global_scope,
            )
            self._boxes[key] = box
        return box

    def outboxes(self) -> dict[str, dict[str, Outbox]]:
        """Every outbox so far: channel -> call kind -> outbox."""
        out: dict[str, dict[str, Outbox]] = {}
        for (room, kind), box in self._boxes.items():
            out.setdefault(room, {})[str(kind)] = box
        return out

    async def aclose(self) -> None:
        """Stop every outbox's worker."""
        for box in [*self._boxes.values(), self.global_scope]:
            await box.aclose()

    async def on_response(
        self, session: aiohttp.ClientSession, ctx: Any, params: aiohttp.TraceRequestEndParams
    ) -> None:
        """aiohttp trace hook: feed each route's ``X-RateLimit-*`` headers and 429s to its bucket's outbox.

        The edit bucket keeps its configured rate (Discord's edit limits are partly unannounced) and is
        paced by what remains; the other buckets follow the limit their route announces.
        """
        route = _route(params.method, params.url.path)
        if route is None:
            return
        room, kind = route
        headers = params.response.headers
        box = self._boxes.get((room, kind)) if kind is not None else None
        try:
            if params.response.status == 429:
                self.rate_limited += 1
                retry = float(headers.get("Retry-After") or headers.get("X-RateLimit-Reset-After") or 1.0)
                # A global 429 pauses every channel; any other only the bucket it came from.
                scope = self.global_scope if headers.get("X-RateLimit-Global") == "true" else box
                if scope is not None:
                    scope.observe(0, retry)
            elif box is not None and kind is not None and "X-RateLimit-Remaining" in headers:
                remaining = int(headers["X-RateLimit-Remaining"])
                reset = float(headers.get("X-RateLimit-Reset-After") or 0.0)
                limit = int(headers.get("X-RateLimit-Limit") or 1)
                if kind is not CallKind.EDIT and "X-RateLimit-Limit" in headers:
                    window = max(self._windows.get((room, kind), 0.0), reset)
                    self._windows[(room, kind)] = window
                    box.announce(limit, window)
                # Discord's window is fixed: at its reset the whole limit is back.
                pace = self.config.pace_edits and kind is CallKind.EDIT
                box.observe(remaining, reset, pace=pace, refill=limit)
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
