"""The Matrix adapter: one progress notice per job or batch, pinned while active and edited in place.

How it fits together:

* **Connection.** A :class:`nio.AsyncClient` with a key store for end-to-end encryption
  (:mod:`adapters.matrix.e2e`, called through the hooks marked "E2E hook"). It logs in with a password or an
  access token; the device id and access token are kept in the service's key-value store, so a restart
  reuses the same device. One background task logs in, joins the configured rooms, and runs the /sync
  loop; when the homeserver goes away it reconnects with exponential backoff. The sync token is kept
  too, and the first sync after a start only loads state: commands in the backlog are never executed.
* **Progress messages.** :meth:`MatrixAdapter.on_event` (synchronous, called by the event bus) only hands
  the event to the shared :class:`~adapters.edit_scheduler.EditScheduler`, keyed by ``(kind, id)``. The
  scheduler keeps the latest state per message, runs at most one delivery per message and honours
  ``M_LIMIT_EXCEEDED``. A delivery (:meth:`MatrixAdapter._deliver`) brings the message up to the given
  state step by step: find the binding in the database or post the notice, edit it, pin or unpin it,
  offer the reactions, send the completion reply. Each finished step is remembered, so a delivery that
  is refused half way (a 429) resumes where it stopped and never posts or replies twice. The post goes
  through the same lane, so no edit can overtake it.
* **Commands and reactions** from the sync loop go to the shared :class:`~adapters.commands.CommandRouter`;
  each runs in its own task, and its reply is threaded to the command.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
from nio import (
    AsyncClient,
    AsyncClientConfig,
    ErrorResponse,
    JoinError,
    JoinResponse,
    LoginResponse,
    MegolmEvent,
    ReactionEvent,
    RoomGetStateEventResponse,
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
from ..commands import Actor, CommandRouter, Reply
from ..edit_scheduler import EditScheduler, PermanentEditError, RateLimited
from .config import MatrixConfig
from .content import (
    OFFERED_REACTIONS,
    edit_content,
    finish_reply,
    progress_content,
    reaction_action,
    text_reply,
)
from .e2e import MatrixE2E

log = logging.getLogger(__name__)

PLATFORM = "matrix"
PINNED_EVENTS = "m.room.pinned_events"

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

Key = tuple[str, int | str]
#: How often the sync token is written to the database, at most (seconds).
TOKEN_SAVE_INTERVAL = 5.0
_R = TypeVar("_R")


class MatrixAuthError(ProgressbotError):
    """The homeserver refused the configured credentials (wrong password, revoked token)."""


class MatrixRequestError(Exception):
    """A transient failure of one request (server error, unknown token): retried with backoff."""

    def __init__(self, what: str, errcode: str | None, message: str | None) -> None:
        self.errcode = errcode
        super().__init__(f"{what} failed: {errcode or 'error'} {message or ''}".strip())


#: Failures worth retrying with backoff.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (*NETWORK_ERRORS, MatrixRequestError)


def _errcode(resp: Any) -> str | None:
    return getattr(resp, "status_code", None)


def check(resp: _R, what: str) -> _R:
    """Turn a nio error response into the exception the edit scheduler understands.

    ``M_LIMIT_EXCEEDED`` -> :class:`RateLimited` (with ``retry_after_ms``); codes that can never
    succeed -> :class:`PermanentEditError`; anything else -> :class:`MatrixRequestError` (transient).
    """
    if not isinstance(resp, ErrorResponse):
        return resp
    code = _errcode(resp)
    if code == "M_LIMIT_EXCEEDED":
        retry_ms = getattr(resp, "retry_after_ms", None) or 5000
        raise RateLimited(retry_ms / 1000, f"{what}: M_LIMIT_EXCEEDED")
    if code in PERMANENT_ERRORS:
        raise PermanentEditError(f"{what}: {code} {resp.message or ''}".strip())
    raise MatrixRequestError(what, code, resp.message)


@dataclass(slots=True)
class _Target:
    """What the adapter knows about one job's or batch's progress message (mirrors its binding)."""

    kind: str
    ident: int | str
    room: str
    event_id: str | None = None
    #: The newest event seq shown on the message (in this process).
    delivered_seq: int = 0
    pinned: bool = False
    #: Pinning was refused for this message (no power level); do not try again for it.
    pin_refused: bool = False
    reacted: bool = False
    replied: bool = False
    finished: bool = False
    #: The plain body the message shows now (in this process), to skip edits that change nothing.
    shown: str | None = None

    @property
    def persistent(self) -> bool:
        """Direct jobs (ids such as ``d3``) live in memory only, so they have no stored binding."""
        return isinstance(self.ident, int)

    def extra(self) -> dict[str, Any]:
        """The binding's ``extra`` column."""
        return {"reacted": self.reacted, "replied": self.replied}


@dataclass(slots=True)
class MatrixStats:
    """Counters of what the adapter did (for tests, benches and logs)."""

    posts: int = 0
    edits: int = 0
    pins: int = 0
    unpins: int = 0
    reactions: int = 0
    replies: int = 0
    commands: int = 0
    rate_limited: int = 0
    failed_requests: int = 0
    reconnects: int = 0
    syncs: int = 0
    skipped_backlog: int = 0
    refusals: int = 0
    #: Edits skipped because the message already showed exactly that text.
    unchanged: int = 0


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
    ) -> None:
        super().__init__(service, router)
        if not config.homeserver or not config.user_id:
            raise ValueError("matrix: homeserver and user_id are required")
        if not (config.password or config.access_token):
            raise ValueError("matrix: a password or an access token is required")
        self.config = config
        self._client_factory = client_factory
        self.client: AsyncClient | None = None
        self.scheduler: EditScheduler[str, Key, JobProgressEvent] | None = None
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
        self._early: dict[Key, JobProgressEvent] = {}
        self._targets: dict[Key, _Target] = {}
        self._pin_locks: dict[str, asyncio.Lock] = {}
        self._pin_warned: set[str] = set()
        #: Messages that got a live event since start (the startup catch-up must not overwrite those).
        self._live_keys: set[Key] | None = set()
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
        self._targets.clear()
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
            # We handle 429s (the scheduler decides what to send after retry_after_ms) and network
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
        self.scheduler = EditScheduler(
            self._deliver,
            rate=cfg.edit_rate,
            burst=cfg.edit_burst,
            max_in_flight=max(1, cfg.max_in_flight),
            backoff_base=cfg.reconnect_min,
            backoff_max=cfg.reconnect_max,
        )
        if not cfg.rooms:
            log.warning("matrix: no rooms configured (matrix.rooms); the bot will post and answer nothing")
        self._default_room = None
        self._live_keys = set()
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
        if self.scheduler is not None:
            drained = await self.scheduler.aclose(drain_timeout=self.config.stop_grace)
            if not drained:
                log.warning("matrix: stopped with progress undelivered; open messages catch up at next start")
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()
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

    async def _join_rooms(self) -> None:
        """Join every configured room (ids or aliases) and remember their ids."""
        assert self.client is not None
        for wanted in self.config.rooms:
            resp = await self.client.join(wanted)
            if isinstance(resp, JoinResponse):
                room_id = resp.room_id
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
        """Run one command and answer it in a reply; failures are logged, never shown as tracebacks."""
        self.stats.commands += 1
        try:
            actor = self._actor(room_id, event.sender)
            reply = await self.router.handle_text(event.body, actor)
        except Exception:
            log.exception("matrix: command %r from %s failed", event.body[:80], event.sender)
            reply = Reply("Sorry, that command failed unexpectedly; the error was logged.", ok=False)
        if reply is None:
            return
        if not reply.ok:
            self.stats.refusals += 1
        await self._answer(room_id, event.event_id, event.sender, reply.text, thread_root, event.event_id)

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
                target = next((t for t in self._targets.values() if t.event_id == event.reacts_to), None)
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
        """Send a reply; ``trigger`` (the command or reaction event) makes its transaction id unique."""
        content = text_reply(text, in_reply_to, mention=sender, thread_root=thread_root)
        try:
            await self._send_reliably(room_id, "m.room.message", content, f"{self._salt}-re-{trigger}")
            self.stats.replies += 1
        except Exception as exc:
            log.warning("matrix: could not answer in %s: %s", room_id, exc)

    async def _send_reliably(
        self, room_id: str, event_type: str, content: dict[str, Any], txn_id: str, *, attempts: int = 8
    ) -> str:
        """Send one event outside the edit scheduler (command replies), waiting out 429s.

        The transaction id stays the same across attempts, so the homeserver never stores it twice.
        """
        assert self.client is not None
        backoff = _Backoff(self.config.reconnect_min, self.config.reconnect_max)
        for attempt in range(attempts):
            try:
                # E2E hook: encrypts in encrypted rooms.
                sent = await self.e2e.room_send(self.client, room_id, event_type, content, txn_id)
                resp = check(sent, "send")
                return str(resp.event_id)
            except RateLimited as exc:
                self.stats.rate_limited += 1
                await asyncio.sleep(exc.retry_after)
            except TRANSIENT_ERRORS:
                if attempt + 1 == attempts:
                    raise
                await asyncio.sleep(backoff.next())
        raise MatrixRequestError("send", "M_LIMIT_EXCEEDED", "still rate limited")

    # ------------------------------------------------------------------ progress events
    def on_event(self, ev: JobProgressEvent) -> None:
        """Hand the event to the edit scheduler (never blocks, never does I/O)."""
        if not self.wants_message(ev) or self.scheduler is None or self._closing:
            return
        key: Key = (ev.type, ev.id)
        if not self._joined:
            # Rooms are not resolved yet (just started, or the homeserver is away): keep the newest
            # event per message until they are.
            old = self._early.get(key)
            if old is None or old.seq < ev.seq:
                self._early[key] = ev
            return
        room = self._room_for(ev)
        if room is None:
            return
        if self._live_keys is not None:
            self._live_keys.add(key)
        self.scheduler.submit(room, key, ev, version=ev.seq, final=ev.terminal)

    async def _catch_up(self) -> None:
        """After a start: bring every still-open message up to its job's current state.

        This delivers what happened while the bot was away (a job that finished meanwhile gets its
        final edit, unpin and reply) and never posts a second message for a bound job.
        """
        live = self._live_keys
        try:
            bindings = await self.service.store.open_bindings(PLATFORM)
            for b in bindings:
                key: Key = (b.target_kind, b.target_id)
                try:
                    if b.target_kind == "batch":
                        summary = await self.service.batch_summary(b.target_id)
                        ev = self.service.monitor.build_batch_event(summary)
                    else:
                        ev = self.service.current_event(await self.service.store.get(b.target_id))
                except LookupError:
                    log.info("matrix: %s #%s is gone; closing its message", b.target_kind, b.target_id)
                    await self._close_orphan(b.room, b.message_id, b.pinned, b.target_kind, b.target_id)
                    continue
                if live is not None and key in live:
                    continue  # a live event is newer than this snapshot
                ev.room = b.room
                if self.scheduler is not None and not self._closing:
                    self.scheduler.submit(b.room, key, ev, version=ev.seq, final=ev.terminal)
        except Exception:
            log.exception("matrix: catching up on open messages failed")
        finally:
            self._live_keys = None

    async def _close_orphan(self, room: str, event_id: str, pinned: bool, kind: str, ident: int) -> None:
        if pinned and self.config.pin:
            with contextlib.suppress(Exception):
                await self._set_pinned(room, event_id, False)
        await self.service.store.save_binding(
            PLATFORM, kind, ident, room, event_id, pinned=False, finished=True
        )

    async def _target(self, room: str, key: Key) -> _Target:
        t = self._targets.get(key)
        if t is not None:
            return t
        kind, ident = key
        t = _Target(kind=kind, ident=ident, room=room)
        if t.persistent:
            b = await self.service.store.get_binding(PLATFORM, kind, int(ident))
            if b is not None:
                extra = b.extra or {}
                t.room, t.event_id, t.pinned, t.finished = b.room, b.message_id, b.pinned, b.finished
                t.reacted = bool(extra.get("reacted"))
                t.replied = bool(extra.get("replied"))
        # Another delivery for this key cannot have run meanwhile (the scheduler runs one per message).
        self._targets[key] = t
        return t

    async def _save(self, t: _Target) -> None:
        if t.persistent and t.event_id:
            await self.service.store.save_binding(
                PLATFORM,
                t.kind,
                int(t.ident),
                t.room,
                t.event_id,
                pinned=t.pinned,
                finished=t.finished,
                extra=t.extra(),
            )

    async def _send_step(
        self, t: _Target, event_type: str, content: dict[str, Any], step: str, what: str
    ) -> str:
        """Send one event of a delivery; returns its event id, raises what :func:`check` raises.

        The transaction id is "salt, message, step": a retry of the same step (after a timeout whose
        request did arrive) is deduplicated by the homeserver instead of being stored twice.
        """
        assert self.client is not None
        txn = f"{self._salt}-{t.kind[0]}{t.ident}-{step}"
        # E2E hook: encrypts in encrypted rooms (the notice, its edits, reactions, replies).
        resp = check(await self.e2e.room_send(self.client, t.room, event_type, content, txn), what)
        return str(resp.event_id)

    async def _deliver(self, room: str, key: Key, ev: JobProgressEvent) -> RateLimited | None:
        """The scheduler's send function: bring one message up to ``ev``, resuming where it stopped.

        Raises :class:`RateLimited` (the scheduler pauses the room), :class:`PermanentEditError`
        (dropped), or another exception (transient; retried with backoff).
        """
        assert self.client is not None
        try:
            await self._deliver_steps(room, key, ev)
        except RateLimited:
            self.stats.rate_limited += 1
            raise
        except Exception:
            self.stats.failed_requests += 1
            raise
        return None

    async def _deliver_steps(self, room: str, key: Key, ev: JobProgressEvent) -> None:
        assert self.client is not None
        cfg = self.config
        t = await self._target(room, key)
        room = t.room
        if t.event_id is None:
            content = progress_content(ev, prefix=cfg.command_prefix)
            t.event_id = await self._send_step(t, "m.room.message", content, "post", "post")
            t.delivered_seq = ev.seq
            t.shown = content["body"]
            t.finished = False
            self.stats.posts += 1
            log.debug("matrix: posted %s #%s in %s as %s (%s)", t.kind, t.ident, room, t.event_id, ev.status)
            await self._save(t)
        elif ev.seq > t.delivered_seq:
            new = progress_content(ev, prefix=cfg.command_prefix)
            if new["body"] == t.shown:
                self.stats.unchanged += 1  # e.g. the same state emitted again after a restart
            else:
                content = edit_content(t.event_id, new)
                await self._send_step(t, "m.room.message", content, f"e{ev.seq}", "edit")
                t.shown = new["body"]
                self.stats.edits += 1
                log.debug("matrix: edited %s #%s (seq %d, %s)", t.kind, t.ident, ev.seq, ev.status)
            t.delivered_seq = ev.seq
        if not ev.terminal and t.finished:
            # Retried after its end: the message is live again, and a new end gets a new reply.
            t.finished = t.replied = False
            await self._save(t)
        if cfg.pin:
            want_pin = not ev.terminal
            if want_pin and not t.pinned and not t.pin_refused:
                if await self._set_pinned(room, t.event_id, True):
                    t.pinned = True
                    self.stats.pins += 1
                else:
                    t.pin_refused = True
                await self._save(t)
            elif not want_pin and t.pinned:
                await self._set_pinned(room, t.event_id, False)
                t.pinned = False
                self.stats.unpins += 1
                await self._save(t)
        if cfg.react and not t.reacted and not ev.terminal:
            for i, emoji in enumerate(OFFERED_REACTIONS):
                content = {"m.relates_to": {"rel_type": "m.annotation", "event_id": t.event_id, "key": emoji}}
                try:
                    await self._send_step(t, "m.reaction", content, f"r{i}", "reaction")
                    self.stats.reactions += 1
                except PermanentEditError as exc:
                    # Already there (a retry) or not allowed: either way, nothing more to do.
                    log.debug("matrix: reaction %s not added: %s", emoji, exc)
            t.reacted = True
            await self._save(t)
        if ev.terminal:
            if cfg.reply_on_finish and not t.replied:
                content = finish_reply(ev, t.event_id)
                try:
                    await self._send_step(t, "m.room.message", content, f"done{ev.seq}", "reply")
                    self.stats.replies += 1
                except PermanentEditError as exc:
                    log.warning("matrix: completion reply in %s not sent: %s", room, exc)
                t.replied = True
            t.finished = True
            await self._save(t)
            # The message is complete; forget it (a later retry of the job loads the binding again).
            self._targets.pop(key, None)

    # ------------------------------------------------------------------ pins
    async def _set_pinned(self, room: str, event_id: str, pin: bool) -> bool:
        """Add or remove one of our events in ``m.room.pinned_events``, keeping everyone else's pins.

        Returns False when the bot lacks the power level (logged once per room). Read-modify-write
        is serialized per room, so two of our messages never overwrite each other's pin.
        """
        assert self.client is not None
        client = self.client
        me = client.user_id
        nio_room = client.rooms.get(room)
        if pin and nio_room is not None and not nio_room.power_levels.can_user_send_state(me, PINNED_EVENTS):
            self._warn_pin(room, "its power level is too low")
            return False
        lock = self._pin_locks.setdefault(room, asyncio.Lock())
        async with lock:
            current = await client.room_get_state_event(room, PINNED_EVENTS)
            if isinstance(current, RoomGetStateEventResponse):
                pinned = [p for p in (current.content.get("pinned") or []) if isinstance(p, str)]
            elif _errcode(current) == "M_NOT_FOUND":
                pinned = []  # nothing was ever pinned in this room
            else:
                check(current, "read pins")
                pinned = []
            if (event_id in pinned) == pin:
                return True
            new = [*pinned, event_id] if pin else [p for p in pinned if p != event_id]
            resp = await client.room_put_state(room, PINNED_EVENTS, {"pinned": new})
            if isinstance(resp, ErrorResponse) and _errcode(resp) == "M_FORBIDDEN":
                self._warn_pin(room, "the homeserver refused it (M_FORBIDDEN)")
                return False
            check(resp, "pin" if pin else "unpin")
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
