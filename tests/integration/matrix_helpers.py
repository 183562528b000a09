"""Helpers for the Matrix integration tests: a user client that reads rooms, and a bot harness.

* :class:`UserClient` is a person in the room (alice or bob): a matrix-nio client that syncs in the
  background, records every timeline event of every room in order, sends commands and reactions, and
  lets a test wait for a condition on what it has seen (no fixed sleeps).
* The ``*_of`` functions read that record the way a person would: the progress messages, their edits,
  the text each shows now, replies, reactions and pins.
* :class:`BotHarness` is the bot as ``progressbot run`` would assemble it: a service on its own SQLite
  database, a command router, and the Matrix adapter. It can be stopped and started again on the same
  database (a restart).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nio import (
    AsyncClient,
    AsyncClientConfig,
    JoinResponse,
    LoginResponse,
    RoomCreateResponse,
    RoomSendResponse,
    SyncResponse,
)

from adapters.board import BoardPolicy
from adapters.commands import CommandRouter
from adapters.matrix import MatrixAdapter, MatrixConfig
from core.builtin import register_builtins
from core.db import Database
from core.registry import HandlerRegistry
from core.service import ProgressService, ServiceConfig

Event = dict[str, Any]

# A few retries of dropped connections: after a homeserver restart, pooled keep-alive connections are dead.
USER_NIO_CONFIG = AsyncClientConfig(max_limit_exceeded=0, max_timeouts=3, request_timeout=15)
#: A user's sync must never get a "limited" timeline (gaps would hide edits from the assertions).
USER_SYNC_FILTER: dict[str, Any] = {"room": {"timeline": {"limit": 1000}}, "presence": {"not_types": ["*"]}}


class UserClient:
    """A Matrix user who watches rooms: every timeline event is recorded, in order, per room."""

    def __init__(self, base_url: str, user_id: str, password: str) -> None:
        self.user_id = user_id
        self.password = password
        self.client = AsyncClient(base_url, user_id, config=USER_NIO_CONFIG)
        self.events: dict[str, list[Event]] = {}
        #: Monotonic time at which each event id was first seen (for the latency bench).
        self.seen_at: dict[str, float] = {}
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._since: str | None = None
        self.on_event: Callable[[str, Event, float], None] | None = None

    async def login(self) -> None:
        """Log in (once per test module) and start the background sync."""
        resp = await self.client.login(self.password, device_name="progressbot-tests")
        if not isinstance(resp, LoginResponse):
            raise AssertionError(f"login {self.user_id} failed: {resp}")
        first = await self.client.sync(timeout=0, sync_filter=USER_SYNC_FILTER)
        assert isinstance(first, SyncResponse), first
        self._since = first.next_batch
        self._task = asyncio.create_task(self._sync_loop(), name=f"sync-{self.user_id}")

    async def close(self) -> None:
        """Stop syncing and close the HTTP session."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.client.close()

    async def _sync_loop(self) -> None:
        # Survives homeserver restarts: errors only pause the loop briefly.
        while True:
            try:
                resp = await self.client.sync(timeout=5000, since=self._since, sync_filter=USER_SYNC_FILTER)
            except asyncio.CancelledError:
                raise
            except Exception:
                await asyncio.sleep(0.2)
                continue
            if not isinstance(resp, SyncResponse):
                await asyncio.sleep(0.2)
                continue
            now = time.monotonic()
            for room_id, info in resp.rooms.join.items():
                bucket = self.events.setdefault(room_id, [])
                for ev in info.timeline.events:
                    src = dict(ev.source)
                    bucket.append(src)
                    eid = src.get("event_id")
                    if eid and eid not in self.seen_at:
                        self.seen_at[eid] = now
                    if self.on_event is not None:
                        self.on_event(room_id, src, now)
            self._since = resp.next_batch
            self._changed.set()

    def room(self, room_id: str) -> list[Event]:
        """Everything seen in a room so far, in timeline order."""
        return self.events.get(room_id, [])

    async def wait_for(
        self, predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition"
    ) -> Any:
        """Wait until ``predicate()`` returns something truthy (re-checked after each sync)."""
        deadline = time.monotonic() + timeout
        while True:
            self._changed.clear()
            result = predicate()
            if result:
                return result
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{self.user_id}: timed out after {timeout}s waiting for {what}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 1.0))

    async def send_text(self, room_id: str, body: str) -> str:
        """Send an ``m.text`` message; returns its event id."""
        resp = await self.client.room_send(room_id, "m.room.message", {"msgtype": "m.text", "body": body})
        assert isinstance(resp, RoomSendResponse), resp
        return str(resp.event_id)

    async def react(self, room_id: str, event_id: str, key: str) -> str:
        """React to an event with ``key`` (an ``m.annotation``)."""
        content = {"m.relates_to": {"rel_type": "m.annotation", "event_id": event_id, "key": key}}
        resp = await self.client.room_send(room_id, "m.reaction", content)
        assert isinstance(resp, RoomSendResponse), resp
        return str(resp.event_id)

    async def command(self, room_id: str, body: str, timeout: float = 20.0) -> Event:
        """Send a command and wait for the bot's reply threaded to it."""
        eid = await self.send_text(room_id, body)
        return await self.wait_for(
            lambda: first(replies_to(self.room(room_id), eid)), timeout, f"a reply to {body!r}"
        )

    async def create_room(self, *, bot: str, others: list[str], bot_power: int = 50) -> str:
        """Create a private room, invite the bot and ``others``; the bot gets ``bot_power``."""
        resp = await self.client.room_create(
            name="progressbot test",
            invite=[bot, *others],
            power_level_override={"users": {bot: bot_power}},  # the creator has the top level anyway
        )
        assert isinstance(resp, RoomCreateResponse), resp
        return str(resp.room_id)

    async def join(self, room_id: str) -> None:
        """Join a room (after an invite)."""
        resp = await self.client.join(room_id)
        assert isinstance(resp, JoinResponse), resp


# ---------------------------------------------------------------------- reading a room
def first(items: list[Event]) -> Event | None:
    """The first item, or None."""
    return items[0] if items else None


def content_of(ev: Event) -> dict[str, Any]:
    """An event's content (empty dict when missing)."""
    return ev.get("content") or {}


def relates(ev: Event) -> dict[str, Any]:
    """An event's ``m.relates_to``."""
    return content_of(ev).get("m.relates_to") or {}


def progress_messages(events: list[Event], bot: str) -> list[Event]:
    """The bot's progress notices: originals (not edits), and not replies, except to a ``!run``.

    The answer to ``!run`` is the job's progress message, posted as a reply to the command.
    """
    by_id = {e.get("event_id"): e for e in events}

    def answers_run(e: Event) -> bool:
        target = by_id.get((relates(e).get("m.in_reply_to") or {}).get("event_id"))
        if target is None or not str(content_of(target).get("body", "")).lstrip().startswith("!run"):
            return False
        return status_word(str(content_of(e).get("body", ""))) is not None  # not a refusal

    return [
        e
        for e in events
        if e.get("sender") == bot
        and e.get("type") == "m.room.message"
        and content_of(e).get("msgtype") == "m.notice"
        and (not relates(e) or answers_run(e))
    ]


def progress_for(events: list[Event], bot: str, job_id: int | str, kind: str = "job") -> list[Event]:
    """The progress notices showing job ``#id`` (or ``batch #id``)."""
    tag = f"batch #{job_id} " if kind == "batch" else f"#{job_id} "
    return [
        e
        for e in progress_messages(events, bot)
        if tag in content_of(e).get("body", "") + " "
        and (kind == "batch" or "batch #" not in content_of(e).get("body", ""))
    ]


def edits_of(events: list[Event], event_id: str) -> list[Event]:
    """The ``m.replace`` edits of an event, in timeline order."""
    return [
        e
        for e in events
        if relates(e).get("rel_type") == "m.replace" and relates(e).get("event_id") == event_id
    ]


def texts_of(events: list[Event], event_id: str) -> list[str]:
    """Every text a message showed: the original body, then each edit's ``m.new_content`` body."""
    orig = next((e for e in events if e.get("event_id") == event_id), None)
    out = [content_of(orig).get("body", "")] if orig else []
    out.extend(content_of(e)["m.new_content"]["body"] for e in edits_of(events, event_id))
    return out


def current_text(events: list[Event], event_id: str) -> str:
    """The text the message shows now (its newest edit)."""
    texts = texts_of(events, event_id)
    return texts[-1] if texts else ""


def current_html(events: list[Event], event_id: str) -> str:
    """The HTML the message shows now."""
    orig = next((e for e in events if e.get("event_id") == event_id), None)
    edits = edits_of(events, event_id)
    if edits:
        return str(content_of(edits[-1])["m.new_content"].get("formatted_body", ""))
    return str(content_of(orig or {}).get("formatted_body", ""))


def replies_to(events: list[Event], event_id: str) -> list[Event]:
    """Messages that reply (``m.in_reply_to``) to an event."""
    return [e for e in events if (relates(e).get("m.in_reply_to") or {}).get("event_id") == event_id]


def reactions_on(events: list[Event], event_id: str, sender: str | None = None) -> list[str]:
    """Reaction keys on an event (optionally only those by ``sender``)."""
    return [
        relates(e).get("key", "")
        for e in events
        if e.get("type") == "m.reaction"
        and relates(e).get("event_id") == event_id
        and (sender is None or e.get("sender") == sender)
    ]


def pin_history(events: list[Event]) -> list[list[str]]:
    """Each ``m.room.pinned_events`` state the room went through, in order."""
    return [
        list(content_of(e).get("pinned") or []) for e in events if e.get("type") == "m.room.pinned_events"
    ]


def status_word(text: str) -> str | None:
    """The status word of a progress text (the first line's ``— <status>``)."""
    head = text.split("\n", 1)[0]
    if " — " not in head:
        return None
    tail = head.rsplit(" — ", 1)[1]
    return tail.split(" ", 1)[0].strip("():")


# ---------------------------------------------------------------------- the bot
class BotHarness:
    """The service plus the Matrix adapter, on one SQLite file; start/stop/start again = a restart."""

    def __init__(
        self,
        db_path: Path,
        config: MatrixConfig,
        *,
        admins: tuple[str, ...] = (),
        concurrency: int = 4,
        board: BoardPolicy | None = None,
    ) -> None:
        self.board = board
        self.db_url = f"sqlite:///{db_path}"
        self.config = config
        self.admins = admins
        self.concurrency = concurrency
        self.service: ProgressService | None = None
        self.adapter: MatrixAdapter | None = None

    async def start(self, *, ready_timeout: float = 30.0, wait: bool = True) -> MatrixAdapter:
        """Start the service and the adapter; wait until the bot has joined and synced once."""
        reg = HandlerRegistry()
        svc = ProgressService(
            ServiceConfig(
                database_url=self.db_url,
                min_interval=0.1,
                poll_interval=0.1,
                cancel_grace=0.5,
                shutdown_grace=2.0,
                concurrency=self.concurrency,
            ),
            registry=reg,
            database=Database(self.db_url),
        )
        register_builtins(reg, lambda: svc.store)
        await svc.start()
        self.service = svc
        router = CommandRouter(svc, admins=self.admins, prefix=self.config.command_prefix)
        self.adapter = MatrixAdapter(svc, router, self.config, board=self.board)
        await self.adapter.start()
        if wait:
            await self.adapter.wait_ready(ready_timeout)
        return self.adapter

    async def stop(self) -> None:
        """Stop like the application does: the worker first, then the adapter, then the service."""
        svc, adapter = self.service, self.adapter
        self.service = self.adapter = None
        if svc is not None and svc.worker is not None:
            await svc.worker.stop()
        if adapter is not None:
            await adapter.stop()
        if svc is not None:
            await svc.stop()

    @property
    def svc(self) -> ProgressService:
        """The running service."""
        assert self.service is not None
        return self.service

    @property
    def bot(self) -> MatrixAdapter:
        """The running adapter."""
        assert self.adapter is not None
        return self.adapter


class World:
    """What every Matrix test shares within a module: the server, alice and bob (logged in once)."""

    def __init__(self, hs: Any, alice: UserClient, bob: UserClient, bot_token: str) -> None:
        self.hs = hs
        self.alice = alice
        self.bob = bob
        self.bot_id = hs.bot_user_id
        self.bot_token = bot_token

    def config(self, room: str, **overrides: Any) -> MatrixConfig:
        """A bot config for one room, logging in with the session's bot access token by default."""
        values: dict[str, Any] = {
            "homeserver": self.hs.base_url,
            "user_id": self.bot_id,
            "access_token": self.bot_token,
            "rooms": [room],
            # The module lifts the bot's limit (as an admin would), and says so: no slow start.
            "start_rate": 10.0,
            "reconnect_min": 0.2,
            "reconnect_max": 2.0,
            "stop_grace": 5.0,
        }
        values.update(overrides)
        return MatrixConfig(**values)

    async def new_room(self, *, bot: str | None = None, bot_power: int = 50) -> str:
        """A fresh room made by alice, with the bot invited (power level 50) and bob joined."""
        room = await self.alice.create_room(
            bot=bot or self.bot_id, others=[self.bob.user_id], bot_power=bot_power
        )
        await self.bob.join(room)
        return room


# ---------------------------------------------------------------------- waiting on the room
async def job_message(world: World, room: str, job_id: int | str, kind: str = "job") -> str:
    """Wait for the progress message of a job (or batch) and return its event id."""
    ev = await world.alice.wait_for(
        lambda: first(progress_for(world.alice.room(room), world.bot_id, job_id, kind)),
        20,
        f"the progress message of {kind} #{job_id}",
    )
    return str(ev["event_id"])


async def wait_status(world: World, room: str, event_id: str, status: str, timeout: float = 30) -> str:
    """Wait until the message shows ``status``; returns its text."""
    return str(
        await world.alice.wait_for(
            lambda: (t := current_text(world.alice.room(room), event_id)) and status_word(t) == status and t,
            timeout,
            f"{event_id} to show {status}",
        )
    )
