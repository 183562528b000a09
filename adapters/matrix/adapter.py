"""The Matrix adapter: login, rooms, the /sync loop, and commands and reactions from people.

How it fits together:

* **Connection.** A :class:`nio.AsyncClient` with a key store for end-to-end encryption
  (:mod:`adapters.matrix.e2e`: login and sync call it through the hooks marked "E2E hook"; sends are
  encrypted in :meth:`~adapters.matrix.transport.MatrixTransport.send`). It logs in with a password or an
  access token; the device id and access token are kept in the service's key-value store, so a restart
  reuses the same device. One background task logs in, joins the configured rooms, and runs the /sync
  loop; when the homeserver goes away it reconnects with exponential backoff. The sync token is kept
  too, and the first sync after a start only loads state: commands in the backlog are never executed.
* **Progress messages** are the shared :class:`~adapters.driver.ProgressDriver`'s job:
  :meth:`MatrixAdapter.on_event` only routes the event to its room and offers it to the driver, which
  posts, edits, pins, reacts and replies through :class:`~adapters.matrix.transport.MatrixTransport`.
  Every event the bot sends, answers to people included, waits in the account's one outbox
  (Synapse limits the account across all its rooms), people first.
* **Commands and reactions** from the sync loop go to the shared :class:`~adapters.commands.CommandRouter`;
  each runs in its own task. ``!run`` is answered by the job's progress message itself (a reply to the
  command), and a successful pause / resume / cancel by the progress message showing who did it; other
  answers, refusals and errors are threaded replies to the command.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from nio import (
    AsyncClient,
    AsyncClientConfig,
    JoinError,
    JoinResponse,
    LoginResponse,
    MegolmEvent,
    ReactionEvent,
    RoomMessageText,
    RoomResolveAliasResponse,
    SyncError,
    SyncResponse,
    WhoamiResponse,
)

from core.errors import ProgressbotError
from core.events import JobProgressEvent
from core.service import ProgressService

from ..base import ChatAdapter
from ..board import BoardPolicy
from ..commands import Actor, CommandRouter, Reply
from ..driver import ProgressDriver
from .board import matrix_boards
from .config import MatrixConfig
from .content import reaction_action, text_reply
from .e2e import MatrixE2E
from .transport import TRANSIENT_ERRORS, MatrixRequestError, MatrixTransport
from .transport import errcode as _errcode

log = logging.getLogger(__name__)

PLATFORM = "matrix"
#: The sync filter: only what the adapter reads (room timelines and state), nothing else.
SYNC_FILTER: dict[str, Any] = {
    "presence": {"not_types": ["*"]},
    "account_data": {"not_types": ["*"]},
    "room": {
        "ephemeral": {"not_types": ["*"]},
        "account_data": {"not_types": ["*"]},
        "timeline": {"limit": 50},
    },
}
#: The first sync after a start loads state only; its timeline (the backlog) is never acted upon.
FIRST_SYNC_FILTER: dict[str, Any] = {**SYNC_FILTER, "room": {**SYNC_FILTER["room"], "timeline": {"limit": 1}}}

#: How often the sync token is written to the database, at most (seconds).
TOKEN_SAVE_INTERVAL = 5.0


class MatrixAuthError(ProgressbotError):
    """The homeserver refused the configured credentials (wrong password, revoked token)."""


@dataclass(slots=True)
class MatrixStats:
    """Counters of the adapter's own work (the driver and the outbox count the progress messages)."""

    commands: int = 0
    reconnects: int = 0
    syncs: int = 0
    skipped_backlog: int = 0
    refusals: int = 0


class _Backoff:
    """Exponential backoff with a cap (no jitter needed: one client per process)."""

    def __init__(self, first: float, cap: float) -> None:
        self.first = first
        self.cap = cap
        self.failures = 0

    def next(self) -> float:
        delay = min(self.cap, self.first * 2**self.failures)
        self.failures += 1
        return delay

    def reset(self) -> None:
        self.failures = 0


class MatrixAdapter(ChatAdapter):
    """Shows jobs and batches in Matrix rooms and takes commands and reactions from them."""

    platform = PLATFORM

    def __init__(
        self,
        service: ProgressService,
        router: CommandRouter,
        config: MatrixConfig,
        *,
        client_factory: Callable[[MatrixConfig, AsyncClientConfig], AsyncClient] | None = None,
        board: BoardPolicy | None = None,
    ) -> None:
        super().__init__(service, router)
        #: Room boards (``[chat]``; adapters/board.py): None shows every job on its own message.
        self.board = board
        if not config.homeserver or not config.user_id:
            raise ValueError("matrix: homeserver and user_id are required")
        if not (config.password or config.access_token):
            raise ValueError("matrix: a password or an access token is required")
        self.config = config
        self._client_factory = client_factory
        self.client: AsyncClient | None = None
        self.transport: MatrixTransport | None = None
        self.driver: ProgressDriver | None = None
        self.stats = MatrixStats()
        self._kv = f"{PLATFORM}:{config.user_id}:"
        self._salt = ""
        self._logged_in = False
        self._joined = False
        self._synced_once = False
        self._connected = False
        self._closing = False
        self._next_batch: str | None = None
        self._token_saved_at = 0.0
        self._runner: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        #: Room ids we act in, and what each configured alias resolved to.
        self._room_ids: set[str] = set()
        #: Rooms joined after the first sync whose next timeline still holds pre-join history.
        self._fresh_rooms: set[str] = set()
        self._aliases: dict[str, str] = {}
        self._default_room: str | None = None
        #: Events that arrived before the rooms were resolved (latest per message).
        self._early: dict[tuple[str, int | str], JobProgressEvent] = {}
        self.ready = asyncio.Event()
        # E2E hook: key store, trust policy, encrypted sends (adapters/matrix/e2e.py).
        self.e2e = MatrixE2E(
            enabled=config.encryption,
            trust=config.trust,
            store_path=config.store_path,
            database_url=getattr(getattr(service, "config", None), "database_url", None),
            verified_devices=config.verified_devices,
        )

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Log in (wrong credentials raise :class:`MatrixAuthError`), then run in the background.

        If the homeserver cannot be reached, the start does not fail: the background task keeps
        trying with backoff, and progress is delivered once it is back.
        """
        cfg = self.config
        self._closing = False
        self.ready = asyncio.Event()
        self._logged_in = self._joined = self._synced_once = self._connected = False
        self._room_ids.clear()
        self._aliases.clear()
        store = self.service.store
        salt = await store.kv_get(f"{PLATFORM}:txn_salt")
        if not salt:
            # Transaction ids are "salt + message + step": stable across retries and restarts (the
            # homeserver deduplicates them), but distinct for a fresh database reusing job ids.
            salt = secrets.token_hex(6)
            await store.kv_set(f"{PLATFORM}:txn_salt", salt)
        self._salt = str(salt)
        self._next_batch = await store.kv_get(self._kv + "sync_token")
        nio_config = AsyncClientConfig(
            # We handle 429s (the outbox decides what to send after retry_after_ms) and network
            # errors (reconnect with backoff) ourselves; nio would otherwise retry them for ever.
            max_limit_exceeded=0,
            max_timeouts=0,
            request_timeout=cfg.request_timeout,
            encryption_enabled=self.e2e.enabled,  # E2E hook
            store_sync_tokens=False,
        )
        if self._client_factory is not None:
            self.client = self._client_factory(cfg, nio_config)
        else:
            self.client = AsyncClient(cfg.homeserver, cfg.user_id, device_id=cfg.device_id, config=nio_config)
        self.e2e.prepare_client(self.client)  # E2E hook: the key store directory
        self.transport = MatrixTransport(self.client, cfg, self._salt, self.e2e)
        self.driver = ProgressDriver(
            self.service, self.transport, backoff_base=cfg.reconnect_min, backoff_max=cfg.reconnect_max
        )
        self.driver.expect_catch_up()  # it runs once connected (restart continuity)
        if self.board is not None:
            matrix_boards(self.driver, self.board)
        if not cfg.rooms:
            log.warning("matrix: no rooms configured (matrix.rooms); the bot will post and answer nothing")
        self._default_room = None
        try:
            await self._login()
        except TRANSIENT_ERRORS as exc:
            log.warning(
                "matrix: homeserver %s unreachable at start (%s); will keep trying", cfg.homeserver, exc
            )
        except BaseException:
            await self._close_client()
            raise
        self.listen()
        self._runner = asyncio.create_task(self._run(), name="matrix-sync")

    async def stop(self) -> None:
        """Stop syncing, deliver pending edits for up to ``stop_grace`` seconds, and disconnect."""
        self._closing = True
        self.unlisten()
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._runner
            self._runner = None
        if self.driver is not None:
            drained = await self.driver.aclose(drain_timeout=self.config.stop_grace)
            if not drained:
                log.warning("matrix: stopped with progress undelivered; open messages catch up at next start")
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()
        if self.transport is not None:
            await self.transport.account.aclose()
        with contextlib.suppress(Exception):
            await self._save_token()
        await self._close_client()

    async def _close_client(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.close()

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until logged in, rooms joined and the first sync done (tests and benches use this)."""
        await asyncio.wait_for(self.ready.wait(), timeout)

    @property
    def connected(self) -> bool:
        """Whether the last sync reached the homeserver."""
        return self._connected

    def room_ids(self) -> set[str]:
        """The room ids the bot acts in."""
        return set(self._room_ids)

    def _spawn(self, coro: Awaitable[Any], name: str) -> None:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ login and rooms
    async def _login(self) -> None:
        """Restore the stored (or configured) access token, or log in with the password.

        The device id of a password login is stored and reused, so restarts do not pile up devices.
        """
        assert self.client is not None
        cfg, store, client = self.config, self.service.store, self.client
        if cfg.access_token:
            await self._restore(cfg.access_token, cfg.device_id or await store.kv_get(self._kv + "device_id"))
            if not self._logged_in:
                raise MatrixAuthError(
                    "matrix: the configured access token was refused (PROGRESSBOT_MATRIX__ACCESS_TOKEN)"
                )
            await self.e2e.after_login(client)  # E2E hook: record the device, publish its keys
            return
        token = await store.kv_get(self._kv + "access_token")
        device = cfg.device_id or await store.kv_get(self._kv + "device_id")
        if not self.e2e.can_resume(cfg.user_id, device):
            # E2E hook: resume only the device whose keys are in the key store; else a fresh device.
            token, device = None, self.e2e.stored_device(cfg.user_id)
        if token:
            await self._restore(str(token), device)
            if self._logged_in:
                await self.e2e.after_login(client)  # E2E hook
                return
            log.info("matrix: the stored access token is no longer valid; logging in again")
        assert cfg.password is not None
        client.device_id = device or ""
        resp = await client.login(cfg.password, device_name=cfg.device_name)
        if not isinstance(resp, LoginResponse):
            code = _errcode(resp)
            if code == "M_LIMIT_EXCEEDED":
                raise MatrixRequestError("login", code, getattr(resp, "message", None))
            if code in ("M_FORBIDDEN", "M_USER_DEACTIVATED", "M_INVALID_USERNAME"):
                raise MatrixAuthError(f"matrix: login as {cfg.user_id} refused: {code} {resp.message}")
            raise MatrixRequestError("login", code, getattr(resp, "message", None))
        await store.kv_set(self._kv + "device_id", resp.device_id)
        await store.kv_set(self._kv + "access_token", resp.access_token)
        self._logged_in = True
        await self.e2e.after_login(client)  # E2E hook
        log.info("matrix: logged in as %s (device %s)", resp.user_id, resp.device_id)

    async def _restore(self, token: str, device_id: str | None) -> None:
        """Use an existing access token; ``_logged_in`` tells whether the homeserver accepted it."""
        assert self.client is not None
        client = self.client
        client.access_token = token
        client.user_id = self.config.user_id
        who = await client.whoami()
        if not isinstance(who, WhoamiResponse):
            if _errcode(who) in ("M_UNKNOWN_TOKEN", "M_MISSING_TOKEN", "M_FORBIDDEN"):
                self._logged_in = False
                client.access_token = ""
                return
            raise MatrixRequestError("whoami", _errcode(who), getattr(who, "message", None))
        if who.user_id != self.config.user_id:
            raise MatrixAuthError(
                f"matrix: the access token belongs to {who.user_id}, not {self.config.user_id}"
            )
        device = who.device_id or device_id or ""
        client.restore_login(self.config.user_id, device, token)
        if device:
            await self.service.store.kv_set(self._kv + "device_id", device)
        self._logged_in = True
        log.info("matrix: resumed session of %s (device %s)", who.user_id, device or "?")

    def _charge_join(self) -> None:
        """A join is a membership event, and Synapse counts it in the account's ``rc_message`` like any
        other event: the account's outbox must know, or its next call runs into a 429. (Joining a room
        the bot is already in may cost nothing: one token too few is harmless, a 429 is not.)"""
        if self.transport is not None:
            self.transport.account.charge()

    async def _join_rooms(self) -> None:
        """Join every configured room (ids or aliases) and remember their ids."""
        assert self.client is not None
        for wanted in self.config.rooms:
            resp = await self.client.join(wanted)
            if isinstance(resp, JoinResponse):
                room_id = resp.room_id
                self._charge_join()
            else:
                if isinstance(resp, JoinError) and _errcode(resp) == "M_LIMIT_EXCEEDED":
                    raise MatrixRequestError(f"join {wanted}", "M_LIMIT_EXCEEDED", resp.message)
                log.warning(
                    "matrix: cannot join %s yet (%s %s); an invite will be accepted",
                    wanted,
                    _errcode(resp),
                    getattr(resp, "message", ""),
                )
                room_id = wanted
                if wanted.startswith("#"):
                    res = await self.client.room_resolve_alias(wanted)
                    if not isinstance(res, RoomResolveAliasResponse):
                        continue
                    room_id = res.room_id
            self._room_ids.add(room_id)
            if wanted.startswith("#"):
                self._aliases[wanted] = room_id
            if self._default_room is None and wanted == self.config.rooms[0]:
                self._default_room = room_id
        self._joined = True
        # Events that came in while the rooms were unknown.
        early, self._early = self._early, {}
        for ev in sorted(early.values(), key=lambda e: e.seq):
            self.on_event(ev)

    def _room_for(self, ev: JobProgressEvent) -> str | None:
        """The room id an event's message belongs in, or None when it is not for us."""
        if ev.room is None:
            return self._default_room
        room = self._aliases.get(ev.room, ev.room)
        return room if room in self._room_ids else None

    # ------------------------------------------------------------------ the sync loop
    async def _run(self) -> None:
        """Log in, join, sync for ever; reconnect with backoff when the homeserver goes away."""
        backoff = _Backoff(self.config.reconnect_min, self.config.reconnect_max)
        outage_since: float | None = None
        while not self._closing:
            try:
                if not self._logged_in:
                    await self._login()
                if not self._joined:
                    await self._join_rooms()
                    self._spawn(self._catch_up(), "matrix-catch-up")
                if not self._synced_once:
                    await self._sync(first=True)
                    self._synced_once = True
                    self.ready.set()
                else:
                    await self._sync(first=False)
                if outage_since is not None:
                    log.info(
                        "matrix: reconnected to %s after %.1fs",
                        self.config.homeserver,
                        time.monotonic() - outage_since,
                    )
                    self.stats.reconnects += 1
                    outage_since = None
                self._connected = True
                backoff.reset()
            except asyncio.CancelledError:
                raise
            except MatrixAuthError as exc:
                self._connected = False
                log.error("%s", exc)
                await asyncio.sleep(self.config.reconnect_max)
            except TRANSIENT_ERRORS as exc:
                self._connected = False
                delay = backoff.next()
                if outage_since is None:
                    outage_since = time.monotonic()
                    log.warning(
                        "matrix: lost the connection to %s (%s); retrying with backoff",
                        self.config.homeserver,
                        exc or type(exc).__name__,
                    )
                else:
                    log.debug("matrix: still disconnected (%s); next try in %.1fs", exc, delay)
                await asyncio.sleep(delay)
            except Exception:
                self._connected = False
                log.exception("matrix: sync loop error")
                await asyncio.sleep(backoff.next())

    async def _sync(self, *, first: bool) -> None:
        assert self.client is not None
        if first:
            # full_state: nio learns every joined room's state (power levels) even when resuming
            # from a stored token; the timeline of this sync is the backlog and is skipped.
            resp = await self.client.sync(
                timeout=0, since=self._next_batch, full_state=True, sync_filter=FIRST_SYNC_FILTER
            )
        else:
            resp = await self.client.sync(
                timeout=self.config.sync_timeout_ms, since=self._next_batch, sync_filter=SYNC_FILTER
            )
        if isinstance(resp, SyncError):
            code = _errcode(resp)
            if code in ("M_UNKNOWN_TOKEN", "M_MISSING_TOKEN"):
                self._logged_in = False
                if self.config.access_token or not self.config.password:
                    raise MatrixAuthError(f"matrix: access token refused during sync: {code}")
            raise MatrixRequestError("sync", code, resp.message)
        assert isinstance(resp, SyncResponse)
        self.stats.syncs += 1
        await self._handle_sync(resp, first=first)
        self._next_batch = resp.next_batch
        # E2E hook: key upload/query/claim, to-device messages, trust policy. After the token moved on:
        # a failure here is retried after the next sync and never replays this one.
        await self.e2e.after_sync(self.client)
        now = time.monotonic()
        if first or now - self._token_saved_at >= TOKEN_SAVE_INTERVAL:
            # Throttled: a busy room syncs many times a second. A slightly old token is harmless,
            # because the first sync after a start skips its backlog anyway.
            await self._save_token()
            self._token_saved_at = now

    async def _save_token(self) -> None:
        if self._next_batch:
            await self.service.store.kv_set(self._kv + "sync_token", self._next_batch)

    async def _handle_sync(self, resp: SyncResponse, *, first: bool) -> None:
        assert self.client is not None
        for room_id, info in resp.rooms.invite.items():
            if self._invite_allowed(room_id, info):
                joined = await self.client.join(room_id)
                if isinstance(joined, JoinResponse):
                    log.info("matrix: accepted the invite to %s", room_id)
                    self._charge_join()
                    self._room_ids.add(room_id)
                    if not first:
                        self._fresh_rooms.add(room_id)
                    for alias in self._invite_aliases(info):
                        if alias in self.config.rooms:
                            self._aliases[alias] = room_id
                            if self._default_room is None and alias == self.config.rooms[0]:
                                self._default_room = room_id
                else:
                    log.warning("matrix: could not join %s: %s", room_id, joined)
            else:
                # The bot acts only in its configured rooms; decline the rest (best effort).
                log.info("matrix: declining an invite to %s (not in matrix.rooms)", room_id)
                with contextlib.suppress(Exception):
                    await self.client.room_leave(room_id)
        for room_id, joined_info in resp.rooms.join.items():
            if room_id not in self._room_ids:
                continue
            room = self.client.rooms.get(room_id)
            if room is not None and room.encrypted and first and not self.e2e.enabled:
                self.e2e.warn_room(room_id)  # E2E hook
            # A room joined just now shows some history before our join: that is backlog too.
            fresh = room_id in self._fresh_rooms
            self._fresh_rooms.discard(room_id)
            for event in joined_info.timeline.events:
                if first or fresh:
                    self.stats.skipped_backlog += 1
                    if fresh and self._is_own_join(event):
                        fresh = False
                    continue
                if getattr(event, "sender", None) == self.client.user_id:
                    continue
                if isinstance(event, MegolmEvent):
                    # E2E hook: still encrypted after nio tried: log once, request keys, never answer.
                    request = self.e2e.on_undecryptable(self.client, room_id, event)
                    if request is not None:
                        self._spawn(request, f"matrix-key-request-{event.event_id}")
                    continue
                if not self.e2e.accepts(event):  # E2E hook: trust policy for decrypted events
                    continue
                if isinstance(event, RoomMessageText):
                    self._on_text(room_id, event)
                elif isinstance(event, ReactionEvent):
                    self._on_reaction(room_id, event)

    def _is_own_join(self, event: Any) -> bool:
        source = getattr(event, "source", None) or {}
        return (
            source.get("type") == "m.room.member"
            and source.get("state_key") == (self.client.user_id if self.client else None)
            and (source.get("content") or {}).get("membership") == "join"
        )

    @staticmethod
    def _invite_aliases(info: Any) -> list[str]:
        out: list[str] = []
        for ev in getattr(info, "invite_state", []) or []:
            source = getattr(ev, "source", None) or {}
            if source.get("type") == "m.room.canonical_alias":
                content = source.get("content") or {}
                out.extend(a for a in [content.get("alias"), *(content.get("alt_aliases") or [])] if a)
        return out

    def _invite_allowed(self, room_id: str, info: Any) -> bool:
        if room_id in self._room_ids or room_id in self.config.rooms:
            return True
        return any(alias in self.config.rooms for alias in self._invite_aliases(info))

    # ------------------------------------------------------------------ commands and reactions
    def _actor(self, room_id: str, sender: str) -> Actor:
        moderator = False
        min_pl = self.config.min_power_level
        room = self.client.rooms.get(room_id) if self.client is not None else None
        if min_pl is not None and room is not None:
            moderator = room.power_levels.get_user_level(sender) >= min_pl
        return Actor(user_id=sender, platform=PLATFORM, room=room_id, is_moderator=moderator)

    def _on_text(self, room_id: str, event: RoomMessageText) -> None:
        content = event.source.get("content") or {}
        relates = content.get("m.relates_to") or {}
        if relates.get("rel_type") == "m.replace":
            return  # an edited command is not run again
        if not self.router.is_command(event.body or ""):
            return
        thread_root = relates.get("event_id") if relates.get("rel_type") == "m.thread" else None
        self._spawn(self._run_command(room_id, event, thread_root), f"matrix-command-{event.event_id}")

    async def _run_command(self, room_id: str, event: RoomMessageText, thread_root: str | None) -> None:
        """Run one command and answer it; failures are logged, never shown as tracebacks.

        ``!run`` is answered by the job's progress message (posted as a reply to the command), and a
        successful pause / resume / cancel / retry by the progress message showing it, when that
        message is in this room. Everything else gets a threaded reply.
        """
        self.stats.commands += 1
        body = event.body or ""
        is_run = body.lstrip()[len(self.router.prefix) :].split(" ", 1)[0].lower() == "run"
        if is_run and self.driver is not None:
            # Registered before the job exists: its first post may race the end of this command.
            self.driver.expect_origin(room_id, event.sender, event.event_id)
        try:
            actor = self._actor(room_id, event.sender)
            reply = await self.router.handle_text(body, actor)
        except Exception:
            log.exception("matrix: command %r from %s failed", body[:80], event.sender)
            reply = Reply("Sorry, that command failed unexpectedly; the error was logged.", ok=False)
        shown = reply is not None and self._shown_here(reply, room_id)
        if is_run and not shown and self.driver is not None:
            self.driver.drop_origin(room_id, event.sender, event.event_id)
        if reply is None or shown:
            return
        if not reply.ok:
            self.stats.refusals += 1
        await self._answer(room_id, event.event_id, event.sender, reply.text, thread_root, event.event_id)

    def _shown_here(self, reply: Reply, room_id: str) -> bool:
        """Whether the reply's outcome shows on a progress message in ``room_id`` (no words needed)."""
        return self.driver is not None and self.driver.acknowledges(reply, room_id, self._room_for)

    def _on_reaction(self, room_id: str, event: ReactionEvent) -> None:
        action = reaction_action(event.key)
        if action is None:
            return
        self._spawn(self._run_reaction(room_id, event, action), f"matrix-reaction-{event.event_id}")

    async def _run_reaction(self, room_id: str, event: ReactionEvent, action: str) -> None:
        """Pause, resume or cancel the job (or batch) whose progress message got the reaction."""
        try:
            binding = await self.service.store.find_binding_by_message(PLATFORM, event.reacts_to)
            if binding is None:
                target = self.driver.find_by_message(event.reacts_to) if self.driver is not None else None
                if target is None:
                    return  # a reaction on some other message
                kind, ident = target.kind, target.ident
            else:
                kind, ident = binding.target_kind, binding.target_id
            actor = self._actor(room_id, event.sender)
            self.stats.commands += 1
            if kind == "batch":
                reply = await self.router.dispatch(action, f"b{ident}", actor)
            else:
                reply = await self.router.control(action, ident, actor)
        except Exception:
            log.exception("matrix: reaction %s from %s failed", event.key, event.sender)
            reply = Reply("Sorry, that failed unexpectedly; the error was logged.", ok=False)
        if not reply.ok:
            self.stats.refusals += 1
            # Success shows on the progress message itself; a refusal or an error needs words.
            await self._answer(room_id, event.reacts_to, event.sender, reply.text, None, event.event_id)

    async def _answer(
        self, room_id: str, in_reply_to: str, sender: str, text: str, thread_root: str | None, trigger: str
    ) -> None:
        """Send a reply, first in the account's outbox; ``trigger`` makes its transaction id unique."""
        if self.transport is None:
            return
        content = text_reply(text, in_reply_to, mention=sender, thread_root=thread_root)
        try:
            await self.transport.answer(room_id, content, f"re-{trigger}")
        except Exception as exc:
            log.warning("matrix: could not answer in %s: %s", room_id, exc)

    # ------------------------------------------------------------------ progress events
    def on_event(self, ev: JobProgressEvent) -> None:
        """Route the event to its room and offer it to the driver (never blocks, never does I/O)."""
        if not self.wants_message(ev) or self.driver is None or self._closing:
            return
        if not self._joined:
            # Rooms are not resolved yet (just started, or the homeserver is away): keep the newest
            # event per message until they are.
            key = (ev.type, ev.id)
            old = self._early.get(key)
            if old is None or old.seq < ev.seq:
                self._early[key] = ev
            return
        room = self._room_for(ev)
        if room is not None:
            self.driver.offer(ev, room)

    async def _catch_up(self) -> None:
        """After a start: bring every open message up to date (see :meth:`ProgressDriver.catch_up`)."""
        if self.driver is not None:
            await self.driver.catch_up(lambda room: room if room in self._room_ids else None)
