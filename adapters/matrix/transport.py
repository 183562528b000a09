"""The Matrix transport: every event the bot sends goes out through :meth:`MatrixTransport.send`.

It is the platform half of the progress-message driver (:class:`adapters.driver.Transport`): post, edit,
pin, unpin, react and reply, each one Matrix event, plus the answers to people's commands. Synapse's
``rc_message`` limits the bot's *account* across all its rooms, so the transport holds one
:class:`~adapters.outbox.Outbox` for the account and every room shares it (fairly, one lane per room).

The send path is in one place on purpose: :meth:`MatrixTransport.send` clips every event to the
homeserver's size limit and, in an end-to-end encrypted room, encrypts it (:mod:`adapters.matrix.e2e`:
the notice, its ``m.replace`` edits with ``m.new_content`` inside the ciphertext and the relation in
clear, replies, reactions and answers). The room key is shared with the members' trusted devices
before the first send, inside that send's outbox slot: the to-device messages that carry it
(``/sendToDevice``, ``/keys/query``, ``/keys/claim``) are not room events, so they take no event from
the outbox (Synapse's ``rc_message`` does not count them); a 429 on one of them still pauses the
account like any other.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, TypeVar

import aiohttp
from nio import AsyncClient, ErrorResponse, RoomGetStateEventResponse

from core.events import JobProgressEvent

from ..driver import CallKind, Content, ErrorKind, classify_error
from ..outbox import Outbox, PermanentError, Priority, RateLimited
from .config import MatrixConfig
from .content import OFFERED_REACTIONS, edit_content, finish_reply, is_user_id, progress_content
from .e2e import E2EError, MatrixE2E

log = logging.getLogger(__name__)

PINNED_EVENTS = "m.room.pinned_events"
#: Synapse refuses events over 65,536 bytes (the whole event as JSON); leave room for the envelope.
MAX_CONTENT_BYTES = 60_000
#: In an encrypted room the content travels base64-encoded inside the Megolm ciphertext (4/3 the size,
#: plus the room id, type and MAC), so the clear content must stay smaller.
MAX_ENCRYPTED_CONTENT_BYTES = 44_000

#: Error codes after which repeating the same request cannot help.
PERMANENT_ERRORS = frozenset(
    {
        "M_FORBIDDEN",
        "M_NOT_FOUND",
        "M_BAD_JSON",
        "M_NOT_JSON",
        "M_TOO_LARGE",
        "M_INVALID_PARAM",
        "M_DUPLICATE_ANNOTATION",
        "M_UNRECOGNIZED",
        "M_BAD_STATE",
        "M_GUEST_ACCESS_FORBIDDEN",
    }
)
#: Network failures: the homeserver is unreachable or answered nothing useful. Retried with backoff.
NETWORK_ERRORS: tuple[type[BaseException], ...] = (
    aiohttp.ClientError,
    TimeoutError,
    ConnectionError,
    OSError,
)

_R = TypeVar("_R")


class MatrixRequestError(Exception):
    """A transient failure of one request (server error, unknown token): retried with backoff."""

    def __init__(self, what: str, errcode: str | None, message: str | None) -> None:
        self.errcode = errcode
        super().__init__(f"{what} failed: {errcode or 'error'} {message or ''}".strip())


#: Failures worth retrying with backoff (an encrypted send whose keys cannot be shared yet, too).
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (*NETWORK_ERRORS, MatrixRequestError, E2EError)


def errcode(resp: Any) -> str | None:
    """The Matrix error code of a nio response (None for a success)."""
    return getattr(resp, "status_code", None)


def check(resp: _R, what: str) -> _R:
    """Turn a nio error response into the exception the driver and the outbox understand.

    ``M_LIMIT_EXCEEDED`` -> :class:`RateLimited` (with ``retry_after_ms``); codes that can never
    succeed -> :class:`PermanentError`; anything else -> :class:`MatrixRequestError` (transient).
    """
    if not isinstance(resp, ErrorResponse):
        return resp
    code = errcode(resp)
    if code == "M_LIMIT_EXCEEDED":
        retry_ms = getattr(resp, "retry_after_ms", None) or 5000
        raise RateLimited(retry_ms / 1000, f"{what}: M_LIMIT_EXCEEDED")
    if code in PERMANENT_ERRORS:
        raise PermanentError(f"{what}: {code} {resp.message or ''}".strip())
    raise MatrixRequestError(what, code, resp.message)


def clip_content(content: dict[str, Any], limit: int = MAX_CONTENT_BYTES) -> dict[str, Any]:
    """Shorten the texts of an event until its JSON fits ``limit`` bytes (bodies of edits too)."""
    if len(json.dumps(content).encode()) <= limit:
        return content

    def shorten(c: dict[str, Any], keep: int) -> dict[str, Any]:
        out = dict(c)
        for k in ("body", "formatted_body"):
            if isinstance(out.get(k), str) and len(out[k]) > keep:
                text = out[k][:keep]
                if k == "formatted_body":
                    # Never leave half a tag behind.
                    cut = text.rfind("<")
                    if cut > text.rfind(">"):
                        text = text[:cut]
                out[k] = text + "…"
        if isinstance(out.get("m.new_content"), dict):
            out["m.new_content"] = shorten(out["m.new_content"], keep)
        return out

    keep = 16_000
    while keep > 100:
        clipped = shorten(content, keep)
        if len(json.dumps(clipped).encode()) <= limit:
            return clipped
        keep //= 2
    return shorten(content, 100)


class MatrixTransport:
    """Matrix calls for the driver and the command answers, through the account's outbox."""

    platform = "matrix"

    def __init__(self, client: AsyncClient, config: MatrixConfig, salt: str, e2e: MatrixE2E) -> None:
        """``salt`` makes transaction ids distinct across databases (stable across restarts).

        ``e2e`` encrypts in encrypted rooms (and refuses to send into one when encryption is off).
        """
        self.client = client
        self.e2e = e2e
        self.config = config
        self.salt = salt
        self.reactions = len(OFFERED_REACTIONS) if config.react else 0
        self.pin_enabled = config.pin
        self.reply_enabled = config.reply_on_finish
        # Synapse's rc_message is per account: one scope for every room.
        self.account = Outbox(
            f"matrix:{config.user_id}",
            rate=config.edit_rate,
            burst=config.edit_burst,
            start_rate=config.start_rate,
            reserve=config.answer_reserve,
            max_in_flight=max(1, config.max_in_flight),
            # Progress edits keep the burst for what needs it and refresh the stalest message first.
            pace=True,
        )
        self._pin_locks: dict[str, asyncio.Lock] = {}
        self._pin_warned: set[str] = set()
        self.answers = 0
        self.rate_limited = 0

    # ------------------------------------------------------------------ the one send path
    async def send(self, room: str, event_type: str, content: dict[str, Any], txn: str) -> str:
        """Send one event, clipped to the size limit; its event id, or what :func:`check` raises.

        In an encrypted room the event is encrypted (never sent in clear: with encryption off it is a
        :class:`PermanentError`). The transaction id is stable for one step, so a retry after a lost
        answer is stored only once.
        """
        tx_id = f"{self.salt}-{txn}"
        limit = MAX_ENCRYPTED_CONTENT_BYTES if self.e2e.encrypted(self.client, room) else MAX_CONTENT_BYTES
        resp = await self.e2e.room_send(self.client, room, event_type, clip_content(content, limit), tx_id)
        try:
            return str(check(resp, event_type).event_id)
        except RateLimited:
            self.rate_limited += 1
            raise

    # ------------------------------------------------------------------ Transport
    def outbox(self, room: str, kind: CallKind) -> Outbox:
        """The account's outbox, for every room and every kind (Synapse's ``rc_message`` is one bucket)."""
        return self.account

    def render(self, ev: JobProgressEvent) -> Content:
        """A progress notice showing ``ev``."""
        content = progress_content(ev, prefix=self.config.command_prefix)
        return Content(content, content["body"])

    async def post(self, room: str, content: Content, reply_to: str | None, tag: str) -> str:
        """Post a progress notice, as a reply to the command that started the job when there is one."""
        payload = dict(content.payload)
        if reply_to:
            payload["m.relates_to"] = {"m.in_reply_to": {"event_id": reply_to}}
        return await self.send(room, "m.room.message", payload, tag)

    async def edit(self, room: str, message_id: str, content: Content, tag: str) -> None:
        """An ``m.replace`` edit of the notice."""
        await self.send(room, "m.room.message", edit_content(message_id, content.payload), tag)

    async def react(self, room: str, message_id: str, index: int, tag: str) -> None:
        """One of the ⏸ ▶ ⏹ reactions on the notice."""
        key = OFFERED_REACTIONS[index]
        content = {"m.relates_to": {"rel_type": "m.annotation", "event_id": message_id, "key": key}}
        await self.send(room, "m.reaction", content, tag)

    def wants_reply(self, ev: JobProgressEvent) -> bool:
        """Only when there is a Matrix user to mention: a reply that pings nobody is just noise."""
        return is_user_id(ev.owner)

    async def reply(self, room: str, message_id: str, ev: JobProgressEvent, tag: str) -> None:
        """The completion reply mentioning the requester."""
        await self.send(room, "m.room.message", finish_reply(ev, message_id), tag)

    def classify(self, exc: BaseException) -> tuple[ErrorKind, float]:
        """Rate limits and permanent errors are raised as such by :func:`check`; the rest is transient."""
        return classify_error(exc)

    async def pin(self, room: str, message_id: str, pinned: bool) -> bool:
        """Add or remove one of our events in ``m.room.pinned_events``, keeping everyone else's pins.

        Returns False when the bot lacks the power level (logged once per room). Read-modify-write
        is serialized per room, so two of our messages never overwrite each other's pin.
        """
        client = self.client
        me = client.user_id
        nio_room = client.rooms.get(room)
        if (
            pinned
            and nio_room is not None
            and not nio_room.power_levels.can_user_send_state(me, PINNED_EVENTS)
        ):
            self._warn_pin(room, "its power level is too low")
            return False
        lock = self._pin_locks.setdefault(room, asyncio.Lock())
        async with lock:
            current = await client.room_get_state_event(room, PINNED_EVENTS)
            if isinstance(current, RoomGetStateEventResponse):
                pins = [p for p in (current.content.get("pinned") or []) if isinstance(p, str)]
            elif errcode(current) == "M_NOT_FOUND":
                pins = []  # nothing was ever pinned in this room
            else:
                check(current, "read pins")
                pins = []
            if (message_id in pins) == pinned:
                return True
            new = [*pins, message_id] if pinned else [p for p in pins if p != message_id]
            resp = await client.room_put_state(room, PINNED_EVENTS, {"pinned": new})
            if isinstance(resp, ErrorResponse) and errcode(resp) == "M_FORBIDDEN":
                self._warn_pin(room, "the homeserver refused it (M_FORBIDDEN)")
                return False
            try:
                check(resp, "pin" if pinned else "unpin")
            except RateLimited:
                self.rate_limited += 1
                raise
            return True

    def _warn_pin(self, room: str, why: str) -> None:
        if room not in self._pin_warned:
            self._pin_warned.add(room)
            log.warning(
                "matrix: cannot pin progress messages in %s: %s. Give %s power level 50 there "
                "(or set matrix.pin = false); carrying on without pins.",
                room,
                why,
                self.config.user_id,
            )

    # ------------------------------------------------------------------ answers to people
    async def answer(self, room: str, content: dict[str, Any], txn: str, *, attempts: int = 8) -> None:
        """Send an answer to a person first in line (:data:`Priority.ANSWER`), waiting out 429s."""
        delay = self.config.reconnect_min
        for attempt in range(attempts):
            try:
                async with self.account.slot(Priority.ANSWER, room):
                    await self.send(room, "m.room.message", content, txn)
                self.answers += 1
                return
            except RateLimited:
                continue  # the outbox paused the account; our turn comes right after
            except TRANSIENT_ERRORS:
                if attempt + 1 == attempts:
                    raise
                await asyncio.sleep(delay)
                delay = min(self.config.reconnect_max, delay * 2)
        raise MatrixRequestError("send", "M_LIMIT_EXCEEDED", "still rate limited")
