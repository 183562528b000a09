"""A small fake Discord (REST + gateway) that discord.py's real, unmodified code can talk to.

It is an aiohttp app on 127.0.0.1 (free port). Point discord.py at it with
:meth:`FakeDiscordServer.patch_discord` (or :func:`point_discord_at`), log a bot in, then drive it
from the test: dispatch slash commands, autocomplete and button clicks, and inspect everything the
bot did (messages, edits, pins, interaction responses, follow-ups, 429s, errors).

What it enforces, because our adapter must survive it on the real Discord:

* a per-channel message-edit bucket (default 5 edits / 5 s), with Discord's ``X-RateLimit-*``
  headers and a well-formed 429 (``Via`` header, JSON ``retry_after``) that discord.py waits out;
* the 1-hour rule: editing a message older than an hour fails with 400 / code 30046;
* the 3 s interaction deadline (404 / 10062 "Unknown interaction") and double acknowledgement
  (400 / 40060);
* size limits (400 / 50035 "Invalid Form Body"), empty messages (400 / 50006), pin limits and the
  pin permission (403 / 50013).

All of those read one injectable :class:`~tests.fake_discord.clock.FakeClock`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import hashlib
import json
import math
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

from tests.fake_discord.clock import FakeClock
from tests.fake_discord.models import (
    ADMINISTRATOR,
    DEFAULT_BOT_PERMISSIONS,
    DISCORD_EPOCH_MS,
    EPHEMERAL,
    MANAGE_MESSAGES,
    PIN_MESSAGES,
    SEND_MESSAGES,
    EditRecord,
    ErrorRecord,
    FakeChannel,
    FakeGuild,
    FakeMessage,
    FakeRole,
    FakeUser,
    FollowupRecord,
    InteractionRecord,
    InteractionResponseRecord,
    PinEvent,
    RateLimitHit,
    iso,
)
from tests.fake_discord.ratelimit import Bucket, Forced429
from tests.fake_discord.validation import (
    FormError,
    form_error_body,
    is_empty_message,
    validate_autocomplete,
    validate_message,
)

__all__ = [
    "API_PREFIX",
    "DEFAULT_APPLICATION_ID",
    "DEFAULT_CHANNEL_ID",
    "DEFAULT_GUILD_ID",
    "MODERATOR_ROLE_ID",
    "SECOND_CHANNEL_ID",
    "ApiError",
    "FakeDiscordServer",
    "RequestRecord",
    "default_guild",
    "point_discord_at",
    "running_fake_discord",
]

API_PREFIX = "/api/v10"
DEFAULT_APPLICATION_ID = "1100000000000000001"
DEFAULT_GUILD_ID = "1200000000000000001"
DEFAULT_CHANNEL_ID = "1300000000000000001"
SECOND_CHANNEL_ID = "1300000000000000002"
MODERATOR_ROLE_ID = "1400000000000000001"
BOT_ROLE_ID = "1400000000000000002"

EDIT_ROUTE = "/channels/{channel_id}/messages/{message_id}"
LOADING = 1 << 7  # message flag 128: the "bot is thinking" placeholder of a deferred response
SUPPRESS_EMBEDS = 1 << 2
INTENT_GUILD_MEMBERS = 1 << 1
INTENT_GUILD_MESSAGES = 1 << 9

# Interaction types and callback types (https://discord.com/developers/docs/interactions).
APPLICATION_COMMAND = 2
MESSAGE_COMPONENT = 3
AUTOCOMPLETE = 4
CB_MESSAGE = 4
CB_DEFERRED_MESSAGE = 5
CB_DEFERRED_UPDATE = 6
CB_UPDATE_MESSAGE = 7
CB_AUTOCOMPLETE = 8

# Slash-command option types, used when a test passes plain Python values.
OPT_STRING, OPT_INTEGER, OPT_BOOLEAN, OPT_USER, OPT_NUMBER = 3, 4, 5, 6, 10


class ApiError(Exception):
    """Raised inside a handler; becomes Discord's JSON error ``{"code", "message"[, "errors"]}``."""

    def __init__(self, status: int, code: int, message: str, errors: dict[str, Any] | None = None) -> None:
        """``status`` is the HTTP status, ``code`` Discord's JSON error code."""
        super().__init__(f"{status} {code} {message}")
        self.status = status
        self.code = code
        self.message = message
        self.errors = errors

    def body(self) -> dict[str, Any]:
        """The JSON body Discord would send."""
        data: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.errors is not None:
            data["errors"] = self.errors
        return data

    @classmethod
    def form(cls, errors: list[FormError]) -> ApiError:
        """A 400 / 50035 "Invalid Form Body" from validation errors."""
        body = form_error_body(errors)
        return cls(400, 50035, body["message"], body["errors"])


@dataclass(frozen=True)
class RequestRecord:
    """Every REST request the fake answered (for debugging failed tests)."""

    at: float
    method: str
    path: str
    route: str
    status: int


@dataclass
class _GatewaySession:
    """One websocket connection and its gateway state."""

    ws: web.WebSocketResponse
    session_id: str = ""
    seq: int = 0
    intents: int = 0
    identified: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def send(self, op: int, d: Any = None, t: str | None = None) -> None:
        """Send one gateway frame as plain JSON text (discord.py accepts it even with zlib-stream)."""
        frame: dict[str, Any] = {"op": op, "d": d, "s": None, "t": t}
        async with self.lock:
            if op == 0:
                self.seq += 1
                frame["s"] = self.seq
            if not self.ws.closed:
                await self.ws.send_str(json.dumps(frame))


def default_guild() -> FakeGuild:
    """The default guild: channels ``#progress`` and ``#general``, roles ``@everyone``,
    ``Moderators`` (Manage Messages) and ``progressbot`` (the bot's role), and member ``alice``."""
    return FakeGuild(
        id=DEFAULT_GUILD_ID,
        name="Fake Guild",
        channels=[
            FakeChannel(DEFAULT_CHANNEL_ID, "progress", position=0),
            FakeChannel(SECOND_CHANNEL_ID, "general", position=1),
        ],
        roles=[
            FakeRole(MODERATOR_ROLE_ID, "Moderators", MANAGE_MESSAGES | PIN_MESSAGES, position=2),
        ],
        members=[FakeUser("1500000000000000001", "alice")],
        owner_id="1500000000000000099",
    )


def _json(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    """A JSON reply whose Content-Type is exactly ``application/json``.

    aiohttp's ``json_response`` appends ``; charset=utf-8`` and discord.py's ``json_or_text`` then
    returns the body as a *string*, which breaks login. So the header is set by hand.
    """
    hdrs = {"Content-Type": "application/json"}
    if headers:
        hdrs.update(headers)
    return web.Response(body=json.dumps(data).encode(), status=status, headers=hdrs)


def _no_content() -> web.Response:
    """204 without a Content-Type: an empty body labelled JSON would fail discord.py's parser."""
    return web.Response(status=204)


def _sid(value: int | str) -> str:
    """Normalise an id to Discord's string form."""
    return str(int(value))


class FakeDiscordServer:
    """The fake Discord: REST under ``/api/v10``, gateway at ``/gateway``, plus a test API.

    Knobs are plain attributes and may be changed while running (e.g. ``server.edit_limit = 3``):

    * ``edit_limit`` / ``edit_window``: the per-channel message-edit bucket (5 per 5.0 s).
    * ``advertise_edit_limit``: if True (default) the edit route's ``X-RateLimit-*`` headers
      describe that bucket, so discord.py paces itself; if False they describe a roomy generic
      bucket and the edit limit only shows up as a 429 (like Discord's undocumented sub-limits).
    * ``default_limit`` / ``default_window``: the generous bucket of every other route.
    * ``interaction_timeout`` (3.0 s), ``interaction_token_ttl`` (900 s).
    * ``old_edit_rule`` (True), ``old_edit_age`` (3600 s), ``old_edit_allowance`` (0 edits allowed
      on an old message before 30046).
    * ``bot_permissions``, ``max_pins`` (250), ``echo_message_events`` (send MESSAGE_CREATE etc.).
    """

    def __init__(
        self,
        *,
        guild: FakeGuild | None = None,
        extra_guilds: Sequence[FakeGuild] = (),
        application_id: str = DEFAULT_APPLICATION_ID,
        bot_name: str = "progressbot",
        token: str | None = None,
        clock: FakeClock | Callable[[], float] | None = None,
        edit_limit: int = 5,
        edit_window: float = 5.0,
        advertise_edit_limit: bool = True,
        default_limit: int = 50,
        default_window: float = 1.0,
        interaction_timeout: float = 3.0,
        interaction_token_ttl: float = 900.0,
        old_edit_rule: bool = True,
        old_edit_age: float = 3600.0,
        old_edit_allowance: int = 0,
        bot_permissions: int = DEFAULT_BOT_PERMISSIONS,
        max_pins: int = 250,
        echo_message_events: bool = True,
        heartbeat_interval_ms: int = 41250,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        """Configure the fake; nothing listens until :meth:`start`.

        ``token``: if set, REST calls must carry ``Authorization: Bot <token>`` (else 401, which
        discord.py turns into ``LoginFailure``); None accepts any token.
        ``clock``: a :class:`FakeClock`, or any ``() -> epoch seconds`` callable to wrap in one.
        """
        if clock is None:
            self.clock = FakeClock()
        elif isinstance(clock, FakeClock):
            self.clock = clock
        else:
            self.clock = FakeClock(base=clock)
        self.guilds: dict[str, FakeGuild] = {}
        for g in [guild or default_guild(), *extra_guilds]:
            self.guilds[g.id] = g
        self.application_id = application_id
        self.bot_user = FakeUser(application_id, bot_name, roles=[BOT_ROLE_ID], bot=True)
        self.token = token
        self.edit_limit = edit_limit
        self.edit_window = edit_window
        self.advertise_edit_limit = advertise_edit_limit
        self.default_limit = default_limit
        self.default_window = default_window
        self.interaction_timeout = interaction_timeout
        self.interaction_token_ttl = interaction_token_ttl
        self.old_edit_rule = old_edit_rule
        self.old_edit_age = old_edit_age
        self.old_edit_allowance = old_edit_allowance
        self.bot_permissions = bot_permissions
        self.max_pins = max_pins
        self.echo_message_events = echo_message_events
        self.heartbeat_interval_ms = heartbeat_interval_ms
        self.host = host
        self._port = port

        # --- recordings (public, append-only lists) ---
        self.messages: dict[str, FakeMessage] = {}
        self.edits: list[EditRecord] = []
        self.pin_events: list[PinEvent] = []
        self.interactions: dict[str, InteractionRecord] = {}
        self.interaction_responses: list[InteractionResponseRecord] = []
        self.followups: list[FollowupRecord] = []
        self.rate_limit_hits: list[RateLimitHit] = []
        self.errors: list[ErrorRecord] = []
        self.requests: list[RequestRecord] = []
        self.identifies: list[dict[str, Any]] = []
        self.deleted_messages: list[str] = []

        # --- internal state ---
        self._commands: dict[str | None, dict[str, dict[str, Any]]] = {}
        self._command_ids: dict[tuple[str | None, str], str] = {}
        self._tokens: dict[str, InteractionRecord] = {}
        self._token_messages: dict[str, list[str]] = {}
        self._old_edits: dict[str, int] = {}
        self._buckets: dict[tuple[str, str, str], Bucket] = {}
        self._edit_buckets: dict[str, Bucket] = {}
        self._forced: list[Forced429] = []
        self._last_snowflake = 0
        self._sessions: list[_GatewaySession] = []
        self._session_seqs: dict[str, int] = {}
        self._changed: asyncio.Condition | None = None
        self._connected: asyncio.Event | None = None
        self._runner: web.AppRunner | None = None
        self.app = self._build_app()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> FakeDiscordServer:
        """Bind 127.0.0.1 on a free port (or the one given) and serve. Returns ``self``."""
        self._changed = asyncio.Condition()
        self._connected = asyncio.Event()
        # A short shutdown timeout: stop() must not hang on a bot that forgot to close its socket.
        self._runner = web.AppRunner(self.app, shutdown_timeout=1.0, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self._port)
        await site.start()
        self._port = int(self._runner.addresses[0][1])
        return self

    async def stop(self) -> None:
        """Close gateway sockets and stop serving. Close the bot first, or it will try to reconnect."""
        for session in list(self._sessions):
            with contextlib.suppress(Exception):
                await session.ws.close(code=1001, message=b"fake discord shutting down")
        self._sessions.clear()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeDiscordServer:
        """``async with FakeDiscordServer() as server:`` starts it (without patching discord.py)."""
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        """Stop the server."""
        await self.stop()

    @property
    def port(self) -> int:
        """The bound port (valid after :meth:`start`)."""
        return self._port

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://{self.host}:{self._port}"

    @property
    def api_base(self) -> str:
        """The value for ``discord.http.Route.BASE``."""
        return f"{self.base_url}{API_PREFIX}"

    @property
    def gateway_url(self) -> str:
        """The value for ``DiscordWebSocket.DEFAULT_GATEWAY``."""
        return f"ws://{self.host}:{self._port}/gateway"

    def patch_discord(self) -> contextlib.AbstractContextManager[None]:
        """Context manager pointing discord.py's REST base and gateway at this server, restoring after."""
        return point_discord_at(self.api_base, self.gateway_url)

    # ------------------------------------------------------------------ guild / users

    @property
    def guild(self) -> FakeGuild:
        """The first (default) guild."""
        return next(iter(self.guilds.values()))

    @property
    def guild_id(self) -> str:
        """Id of the default guild."""
        return self.guild.id

    @property
    def channel_id(self) -> str:
        """Id of the default guild's first channel."""
        return self.guild.channels[0].id

    def make_user(
        self,
        id: int | str | None = None,
        name: str = "user",
        roles: Sequence[int | str] = (),
        permissions: int | None = None,
        *,
        guild_id: int | str | None = None,
        add_to_guild: bool = True,
    ) -> FakeUser:
        """Create a user (a guild member unless ``add_to_guild=False``).

        ``permissions`` forces the permission integer reported in interactions (e.g.
        ``MANAGE_MESSAGES``); otherwise it comes from ``@everyone`` and ``roles``. Members added
        after the bot connected are not announced on the gateway; interactions carry the member
        anyway, which is all discord.py needs.
        """
        user = FakeUser(
            _sid(id) if id is not None else str(self._next_snowflake()),
            name,
            roles=[_sid(r) for r in roles],
            permissions=permissions,
        )
        if add_to_guild:
            guild = self._guild(guild_id)
            guild.members = [m for m in guild.members if m.id != user.id] + [user]
        return user

    def make_moderator(self, id: int | str | None = None, name: str = "moderator") -> FakeUser:
        """A member holding the default ``Moderators`` role (Manage Messages + Pin Messages)."""
        return self.make_user(id, name, roles=[MODERATOR_ROLE_ID])

    def add_role(
        self, id: int | str, name: str, permissions: int = 0, *, guild_id: int | str | None = None
    ) -> FakeRole:
        """Add a role to a guild (before the bot connects, so GUILD_CREATE carries it)."""
        role = FakeRole(_sid(id), name, permissions, position=len(self._guild(guild_id).roles))
        self._guild(guild_id).roles.append(role)
        return role

    # ------------------------------------------------------------------ clock / snowflakes

    def _next_snowflake(self) -> int:
        """A snowflake carrying the fake clock's time, strictly increasing (so ids sort by age)."""
        ms = int(self.clock.now() * 1000)
        value = (ms - DISCORD_EPOCH_MS) << 22
        if value <= self._last_snowflake:
            value = self._last_snowflake + 1
        self._last_snowflake = value
        return value

    # ------------------------------------------------------------------ rate-limit knobs

    def force_429(
        self,
        n: int = 1,
        retry_after: float = 0.2,
        *,
        route: str | None = None,
        method: str | None = None,
        is_global: bool = False,
        scope: str = "user",
    ) -> None:
        """Make the next ``n`` matching REST requests fail with a 429.

        ``route`` is discord.py's route key or template, e.g.
        ``"PATCH /channels/{channel_id}/messages/{message_id}"``; None matches every route.
        """
        self._forced.append(Forced429(n, retry_after, method, route, is_global, scope))

    def reset_rate_limits(self) -> None:
        """Forget all bucket state and pending forced 429s."""
        self._buckets.clear()
        self._edit_buckets.clear()
        self._forced.clear()

    def edit_bucket(self, channel_id: int | str) -> Bucket:
        """The per-channel edit bucket (created on first use with the current knobs)."""
        cid = _sid(channel_id)
        bucket = self._edit_buckets.get(cid)
        if bucket is None:
            bucket = Bucket(_bucket_hash("PATCH", EDIT_ROUTE), self.edit_limit, self.edit_window)
            self._edit_buckets[cid] = bucket
        # Knobs may change between tests/phases; the bucket follows them.
        bucket.limit, bucket.window = self.edit_limit, self.edit_window
        return bucket

    # ------------------------------------------------------------------ query helpers

    def message(self, message_id: int | str) -> FakeMessage:
        """The stored message (deleted/ephemeral ones included). KeyError if unknown."""
        return self.messages[_sid(message_id)]

    def messages_in(
        self,
        channel_id: int | str | None = None,
        *,
        include_deleted: bool = False,
        include_ephemeral: bool = False,
    ) -> list[FakeMessage]:
        """Messages of a channel (default channel if None), oldest first."""
        cid = _sid(channel_id) if channel_id is not None else self.channel_id
        return [
            m
            for m in self.messages.values()
            if m.channel_id == cid
            and (include_deleted or not m.deleted)
            and (include_ephemeral or not m.ephemeral)
        ]

    def edits_of(self, message_id: int | str) -> list[EditRecord]:
        """Successful edits of one message, in order."""
        mid = _sid(message_id)
        return [e for e in self.edits if e.message_id == mid]

    def pinned(self, channel_id: int | str | None = None) -> list[FakeMessage]:
        """Messages pinned now in a channel (default channel if None), oldest pin first."""
        cid = _sid(channel_id) if channel_id is not None else self.channel_id
        pins = [m for m in self.messages.values() if m.channel_id == cid and m.pinned and not m.deleted]
        return sorted(pins, key=lambda m: m.pinned_at or 0.0)

    def pins_of(self, message_id: int | str) -> list[PinEvent]:
        """Pin/unpin events of one message, in order."""
        mid = _sid(message_id)
        return [p for p in self.pin_events if p.message_id == mid]

    def interaction(self, interaction_id: int | str) -> InteractionRecord:
        """A dispatched interaction and its state."""
        return self.interactions[_sid(interaction_id)]

    def responses_to(self, interaction: InteractionRecord | int | str) -> list[InteractionResponseRecord]:
        """Accepted callbacks for an interaction (normally 0 or 1)."""
        iid = self._iid(interaction)
        return [r for r in self.interaction_responses if r.interaction_id == iid]

    def followups_of(self, interaction: InteractionRecord | int | str) -> list[FollowupRecord]:
        """Follow-up / ``@original`` webhook calls made with an interaction's token, in order."""
        iid = self._iid(interaction)
        return [f for f in self.followups if f.interaction_id == iid]

    def errors_with_code(self, code: int) -> list[ErrorRecord]:
        """Recorded error replies with this Discord JSON error code."""
        return [e for e in self.errors if e.code == code]

    def commands(self, guild_id: int | str | None = None) -> list[dict[str, Any]]:
        """Application commands as synced (global if ``guild_id`` is None)."""
        key = _sid(guild_id) if guild_id is not None else None
        return list(self._commands.get(key, {}).values())

    @property
    def connected(self) -> bool:
        """Whether a gateway session has identified."""
        return any(s.identified for s in self._sessions)

    # ------------------------------------------------------------------ waiting helpers
    # These take an explicit ``timeout`` (hence the ASYNC109 waivers): a test waiting on the bot
    # must fail with a clear message, not hang until pytest-timeout kills the whole session.

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Wait (real time) until ``predicate()`` is true; it is re-checked after every recorded event."""
        assert self._changed is not None, "server not started"
        cond = self._changed

        async def _wait() -> None:
            async with cond:
                await cond.wait_for(predicate)

        try:
            await asyncio.wait_for(_wait(), timeout)
        except TimeoutError:
            raise TimeoutError(f"condition not met within {timeout}s") from None

    async def wait_until_connected(self, timeout: float = 5.0) -> None:
        """Wait until a bot has identified and received READY + GUILD_CREATE."""
        assert self._connected is not None, "server not started"
        await asyncio.wait_for(self._connected.wait(), timeout)

    async def wait_interaction_response(
        self,
        interaction: InteractionRecord | int | str,
        timeout: float = 5.0,
    ) -> InteractionResponseRecord:
        """Wait for the bot's callback to an interaction and return it.

        Raises ``TimeoutError`` if none was accepted in time (rejected late answers are in
        :attr:`errors`, code 10062).
        """
        iid = self._iid(interaction)
        try:
            await self.wait_for(lambda: bool(self.responses_to(iid)), timeout)
        except TimeoutError:
            late = [e for e in self.errors if e.code == 10062 and f"/interactions/{iid}/" in e.path]
            hint = " (the bot answered too late: 10062)" if late else ""
            raise TimeoutError(f"no response to interaction {iid} within {timeout}s{hint}") from None
        return self.responses_to(iid)[0]

    async def wait_followup(
        self,
        interaction: InteractionRecord | int | str,
        count: int = 1,
        timeout: float = 5.0,
    ) -> list[FollowupRecord]:
        """Wait until ``count`` follow-up calls were made with the interaction's token."""
        iid = self._iid(interaction)
        await self.wait_for(lambda: len(self.followups_of(iid)) >= count, timeout)
        return self.followups_of(iid)

    async def _notify(self) -> None:
        if self._changed is not None:
            async with self._changed:
                self._changed.notify_all()

    # ------------------------------------------------------------------ gateway dispatch

    async def dispatch_event(self, event: str, data: dict[str, Any]) -> int:
        """Send an op-0 dispatch to every identified session; returns how many received it."""
        sent = 0
        for session in list(self._sessions):
            if session.identified and not session.ws.closed:
                await session.send(0, data, event)
                sent += 1
        return sent

    async def drop_gateway(self, code: int = 4000) -> None:
        """Close every gateway socket from the server side (4000 = "unknown error", resumable).

        discord.py then reconnects to ``resume_gateway_url`` and sends RESUME, which the fake
        answers with RESUMED; use it to test reconnect handling.
        """
        self._connected = asyncio.Event()
        for session in list(self._sessions):
            await session.ws.close(code=code, message=b"fake discord dropped the connection")

    async def dispatch_slash_command(
        self,
        name: str,
        options: Mapping[str, Any] | Sequence[dict[str, Any]] | None = None,
        user: FakeUser | None = None,
        roles: Sequence[int | str] = (),
        channel_id: int | str | None = None,
        guild_id: int | str | None = None,
        *,
        resolved: dict[str, Any] | None = None,
        require_synced: bool = True,
    ) -> InteractionRecord:
        """Dispatch INTERACTION_CREATE type 2 (slash command) and return its record (``.id``, ``.token``).

        ``options``: ``{name: value}`` (types taken from the synced command, else inferred from
        the Python value; a :class:`FakeUser` value becomes a USER option with ``resolved``), or
        raw option dicts (e.g. for subcommands). ``roles`` are added to the user's roles for this
        interaction. The command must have been synced unless ``require_synced=False``.
        """
        guild = self._guild(guild_id)
        command, is_guild_command = self._find_command(name, guild.id, require_synced)
        opts, res = self._build_options(command, options)
        if resolved:
            res = {**res, **resolved}
        data: dict[str, Any] = {"id": command["id"], "name": name, "type": 1, "options": opts}
        if is_guild_command:
            # discord.py looks the command up among guild commands only when data.guild_id is set.
            data["guild_id"] = guild.id
        if res:
            data["resolved"] = res
        return await self._dispatch_interaction(APPLICATION_COMMAND, data, user, roles, channel_id, guild)

    async def dispatch_autocomplete(
        self,
        name: str,
        focused: str,
        value: Any,
        user: FakeUser | None = None,
        options: Mapping[str, Any] | None = None,
        roles: Sequence[int | str] = (),
        channel_id: int | str | None = None,
        guild_id: int | str | None = None,
        *,
        require_synced: bool = True,
    ) -> InteractionRecord:
        """Dispatch INTERACTION_CREATE type 4 (autocomplete) with option ``focused`` being typed.

        ``options`` are the other, already filled options. The bot's answer is a type-8 callback:
        ``(await server.wait_interaction_response(rec)).choices``.
        """
        guild = self._guild(guild_id)
        command, is_guild_command = self._find_command(name, guild.id, require_synced)
        opts, _ = self._build_options(command, options)
        focused_def = self._option_def(command, focused)
        opts.append(
            {
                "name": focused,
                "type": focused_def.get("type", OPT_STRING) if focused_def else OPT_STRING,
                "value": value,
                "focused": True,
            }
        )
        data: dict[str, Any] = {"id": command["id"], "name": name, "type": 1, "options": opts}
        if is_guild_command:
            data["guild_id"] = guild.id
        return await self._dispatch_interaction(AUTOCOMPLETE, data, user, roles, channel_id, guild)

    async def dispatch_button(
        self,
        custom_id: str,
        message_id: int | str,
        user: FakeUser | None = None,
        roles: Sequence[int | str] = (),
        *,
        values: Sequence[str] | None = None,
        check_component: bool = True,
    ) -> InteractionRecord:
        """Dispatch INTERACTION_CREATE type 3 (component) for ``custom_id`` on a stored message.

        The component type comes from the components stored with the message (2 = button; a
        select gets ``values``). With ``check_component`` a custom_id the message does not carry
        raises ``LookupError``: Discord could never send that click.
        """
        msg = self.message(message_id)
        if msg.deleted:
            raise LookupError(f"message {msg.id} was deleted")
        known = msg.custom_ids()
        if check_component and custom_id not in known:
            raise LookupError(f"message {msg.id} has no component {custom_id!r} (has {sorted(known)})")
        ctype = known.get(custom_id, 2)
        data: dict[str, Any] = {"custom_id": custom_id, "component_type": ctype}
        if ctype != 2:
            data["values"] = list(values or [])
        guild = self._guild(msg.guild_id)
        return await self._dispatch_interaction(
            MESSAGE_COMPONENT, data, user, roles, msg.channel_id, guild, message=msg
        )

    async def dispatch_user_message(
        self, content: str, user: FakeUser | None = None, channel_id: int | str | None = None
    ) -> FakeMessage:
        """A user posts a message in a channel: stored and sent as MESSAGE_CREATE (if intents allow)."""
        try:
            guild = self._guild(None) if channel_id is None else self._guild_of_channel(_sid(channel_id))
        except ApiError:
            raise LookupError(f"unknown channel {channel_id}") from None
        cid = _sid(channel_id) if channel_id is not None else self.channel_id
        author = user or guild.members[0]
        msg = FakeMessage(
            id=str(self._next_snowflake()),
            channel_id=cid,
            guild_id=guild.id,
            author=author.user_payload(),
            content=content,
            created_at=self.clock.now(),
        )
        self.messages[msg.id] = msg
        payload = msg.payload()
        payload["member"] = {k: v for k, v in author.member_payload(guild).items() if k != "user"}
        await self._echo("MESSAGE_CREATE", payload)
        await self._notify()
        return msg

    async def _dispatch_interaction(
        self,
        itype: int,
        data: dict[str, Any],
        user: FakeUser | None,
        roles: Sequence[int | str],
        channel_id: int | str | None,
        guild: FakeGuild,
        message: FakeMessage | None = None,
    ) -> InteractionRecord:
        """Build an INTERACTION_CREATE with everything discord.py 2.7 reads, register it, send it."""
        if not self.connected:
            raise RuntimeError("no bot is connected to the fake gateway")
        cid = _sid(channel_id) if channel_id is not None else guild.channels[0].id
        channel = guild.channel(cid)
        if channel is None:
            raise LookupError(f"channel {cid} is not in guild {guild.id}")
        base_user = user or guild.members[0]
        member = FakeUser(
            base_user.id,
            base_user.name,
            roles=list(dict.fromkeys([*base_user.roles, *(_sid(r) for r in roles)])),
            permissions=base_user.permissions,
            bot=base_user.bot,
            global_name=base_user.global_name,
        )
        iid = str(self._next_snowflake())
        # Real tokens are long opaque strings; discord.py only puts them in URL paths.
        token = "aW50ZXJhY3Rpb246" + secrets.token_urlsafe(48)
        payload: dict[str, Any] = {
            "id": iid,
            "application_id": self.application_id,
            "type": itype,
            "data": data,
            "guild_id": guild.id,
            "guild": {"id": guild.id, "locale": "en-US", "features": []},
            "channel_id": cid,
            "channel": channel.payload(guild.id),
            "member": member.member_payload(guild, with_permissions=True),
            "token": token,
            "version": 1,
            "app_permissions": str(self.bot_permissions),
            "locale": "en-US",
            "guild_locale": "en-US",
            "entitlements": [],
            "entitlement_sku_ids": [],
            "authorizing_integration_owners": {"0": guild.id},
            "context": 0,  # GUILD
            "attachment_size_limit": 10 * 1024 * 1024,
        }
        if message is not None:
            payload["message"] = message.payload()
        record = InteractionRecord(
            id=iid,
            token=token,
            type=itype,
            payload=payload,
            dispatched_at=self.clock.now(),
            user_id=member.id,
            channel_id=cid,
        )
        self.interactions[iid] = record
        self._tokens[token] = record
        self._token_messages[token] = []
        await self.dispatch_event("INTERACTION_CREATE", payload)
        return record

    # ------------------------------------------------------------------ helpers

    def _iid(self, interaction: InteractionRecord | int | str) -> str:
        return interaction.id if isinstance(interaction, InteractionRecord) else _sid(interaction)

    def _guild(self, guild_id: int | str | None) -> FakeGuild:
        if guild_id is None:
            return self.guild
        try:
            return self.guilds[_sid(guild_id)]
        except KeyError:
            raise LookupError(f"unknown guild {guild_id}") from None

    def _guild_of_channel(self, channel_id: str) -> FakeGuild:
        for guild in self.guilds.values():
            if guild.channel(channel_id) is not None:
                return guild
        raise ApiError(404, 10003, "Unknown Channel")

    def _find_command(self, name: str, guild_id: str, require_synced: bool) -> tuple[dict[str, Any], bool]:
        guild_cmd = self._commands.get(guild_id, {}).get(name)
        if guild_cmd is not None:
            return guild_cmd, True
        global_cmd = self._commands.get(None, {}).get(name)
        if global_cmd is not None:
            return global_cmd, False
        if require_synced:
            raise LookupError(f"command {name!r} was never synced (call tree.sync first)")
        return {"id": str(self._next_snowflake()), "name": name, "options": []}, False

    @staticmethod
    def _option_def(command: dict[str, Any], name: str) -> dict[str, Any] | None:
        return next((o for o in command.get("options", []) or [] if o.get("name") == name), None)

    def _build_options(
        self, command: dict[str, Any], options: Mapping[str, Any] | Sequence[dict[str, Any]] | None
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Turn ``{name: value}`` into Discord option objects (+ ``resolved`` for users)."""
        if options is None:
            return [], {}
        if not isinstance(options, Mapping):
            return [dict(o) for o in options], {}
        result: list[dict[str, Any]] = []
        resolved: dict[str, Any] = {}
        for name, value in options.items():
            definition = self._option_def(command, name)
            if isinstance(value, FakeUser):
                guild = self.guild
                resolved.setdefault("users", {})[value.id] = value.user_payload()
                member = value.member_payload(guild, with_permissions=True)
                member.pop("user")
                resolved.setdefault("members", {})[value.id] = member
                result.append({"name": name, "type": OPT_USER, "value": value.id})
                continue
            if definition is not None:
                otype = int(definition.get("type", OPT_STRING))
            elif isinstance(value, bool):
                otype = OPT_BOOLEAN
            elif isinstance(value, int):
                otype = OPT_INTEGER
            elif isinstance(value, float):
                otype = OPT_NUMBER
            else:
                otype = OPT_STRING
            if otype == OPT_STRING:
                value = str(value)
            result.append({"name": name, "type": otype, "value": value})
        return result, resolved

    def _check_message_payload(self, payload: dict[str, Any], *, creating: bool, has_files: bool) -> None:
        errors = validate_message(payload)
        if errors:
            raise ApiError.form(errors)
        if creating and is_empty_message(payload, has_files=has_files):
            raise ApiError(400, 50006, "Cannot send an empty message")

    def _live_message(self, channel_id: str, message_id: str) -> FakeMessage:
        msg = self.messages.get(message_id)
        if msg is None or msg.deleted or msg.channel_id != channel_id or msg.ephemeral:
            raise ApiError(404, 10008, "Unknown Message")
        return msg

    def _payload_of(self, msg: FakeMessage) -> dict[str, Any]:
        ref = None
        if msg.message_reference is not None:
            ref = self.messages.get(str(msg.message_reference.get("message_id")))
        return msg.payload(referenced=ref)

    def _apply_edit(self, msg: FakeMessage, payload: dict[str, Any]) -> None:
        """Discord semantics: only the keys present change; ``null`` clears."""
        if "content" in payload:
            msg.content = payload["content"] or ""
        if "embeds" in payload:
            msg.embeds = [_with_embed_type(e) for e in payload["embeds"] or []]
        if "components" in payload:
            msg.components = list(payload["components"] or [])
        if "allowed_mentions" in payload:
            msg.allowed_mentions = payload["allowed_mentions"]
        if "attachments" in payload and payload["attachments"] is not None:
            keep = {str(a.get("id")) for a in payload["attachments"]}
            msg.attachments = [a for a in msg.attachments if a["id"] in keep]
        if "flags" in payload and payload["flags"] is not None:
            # Only SUPPRESS_EMBEDS may be toggled by an edit; ephemeral etc. are immutable.
            msg.flags = (msg.flags & ~SUPPRESS_EMBEDS) | (int(payload["flags"]) & SUPPRESS_EMBEDS)
        msg.edited_at = self.clock.now()

    def _record_edit(self, msg: FakeMessage, payload: dict[str, Any], via: str) -> None:
        self.edits.append(
            EditRecord(
                message_id=msg.id,
                channel_id=msg.channel_id,
                payload=payload,
                at=self.clock.now(),
                via=via,
                content_after=msg.content,
                message_after=self._payload_of(msg),
            )
        )

    def _new_bot_message(
        self,
        channel_id: str,
        payload: dict[str, Any],
        *,
        attachments: list[dict[str, Any]] | None = None,
        flags: int = 0,
        mtype: int = 0,
        interaction_id: str | None = None,
        via_webhook: bool = False,
    ) -> FakeMessage:
        guild = self._guild_of_channel(channel_id)
        msg = FakeMessage(
            id=str(self._next_snowflake()),
            channel_id=channel_id,
            guild_id=guild.id,
            author=self.bot_user.user_payload(),
            content=payload.get("content") or "",
            created_at=self.clock.now(),
            embeds=[_with_embed_type(e) for e in payload.get("embeds") or []],
            components=list(payload.get("components") or []),
            attachments=attachments or [],
            allowed_mentions=payload.get("allowed_mentions"),
            flags=flags,
            type=mtype,
            webhook_id=self.application_id if via_webhook else None,
            application_id=self.application_id if via_webhook else None,
            interaction_id=interaction_id,
        )
        ref = payload.get("message_reference")
        if ref:
            ref_id = str(ref.get("message_id"))
            target = self.messages.get(ref_id)
            if (target is None or target.deleted) and ref.get("fail_if_not_exists", True):
                raise ApiError.form(
                    [(("message_reference",), "MESSAGE_REFERENCE_UNKNOWN_MESSAGE", "Unknown message")]
                )
            msg.message_reference = {
                "type": ref.get("type", 0),
                "message_id": ref_id,
                "channel_id": str(ref.get("channel_id") or channel_id),
                "guild_id": str(ref.get("guild_id") or guild.id),
            }
            msg.type = 19  # REPLY
        self.messages[msg.id] = msg
        return msg

    async def _echo(self, event: str, data: dict[str, Any]) -> None:
        """Send a message event like Discord would, to sessions whose intents ask for it."""
        if not self.echo_message_events:
            return
        for session in list(self._sessions):
            if session.identified and session.intents & INTENT_GUILD_MESSAGES and not session.ws.closed:
                await session.send(0, data, event)

    async def _read_payload(self, request: web.Request) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """JSON body, or multipart (``payload_json`` + ``files[n]``) as discord.py sends with files."""
        if request.content_type.startswith("multipart/"):
            form = await request.post()
            payload = json.loads(str(form.get("payload_json") or "{}"))
            files: list[dict[str, Any]] = []
            for key, value in form.items():
                if key.startswith("files[") and isinstance(value, web.FileField):
                    size = len(value.file.read())
                    aid = str(self._next_snowflake())
                    files.append(
                        {
                            "id": aid,
                            "filename": value.filename,
                            "size": size,
                            "url": f"{self.base_url}/attachments/{aid}/{value.filename}",
                            "proxy_url": f"{self.base_url}/attachments/{aid}/{value.filename}",
                            "content_type": value.content_type,
                        }
                    )
            return payload, files
        if not request.can_read_body:
            return {}, []
        raw = await request.read()
        if not raw:
            return {}, []
        try:
            data = json.loads(raw)
        except ValueError:
            raise ApiError(400, 50109, "The request body contains invalid JSON.") from None
        return (data if isinstance(data, dict) else {"_list": data}), []

    def _has_pin_permission(self) -> bool:
        perms = self.bot_permissions
        return bool(perms & (ADMINISTRATOR | PIN_MESSAGES | MANAGE_MESSAGES))

    # ------------------------------------------------------------------ app / middleware

    def _build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=64 * 1024 * 1024)
        r = app.router
        p = API_PREFIX
        r.add_get("/gateway", self._gateway)
        r.add_get("/gateway/", self._gateway)
        r.add_get(f"{p}/gateway", self._get_gateway)
        r.add_get(f"{p}/gateway/bot", self._get_gateway_bot)
        r.add_get(f"{p}/users/@me", self._get_me)
        r.add_get(f"{p}/oauth2/applications/@me", self._get_application)
        r.add_get(f"{p}/applications/@me", self._get_application)
        for prefix in ("/applications/{application_id}", "/applications/{application_id}/guilds/{guild_id}"):
            r.add_get(f"{p}{prefix}/commands", self._get_commands)
            r.add_put(f"{p}{prefix}/commands", self._put_commands)
            r.add_post(f"{p}{prefix}/commands", self._post_command)
            r.add_delete(f"{p}{prefix}/commands/{{command_id}}", self._delete_command)
        r.add_get(f"{p}/channels/{{channel_id}}", self._get_channel)
        r.add_post(f"{p}/channels/{{channel_id}}/typing", self._typing)
        # Literal segments ("pins", "@original") are registered before the {message_id} routes:
        # aiohttp tries dynamic routes in registration order.
        r.add_get(f"{p}/channels/{{channel_id}}/messages/pins", self._get_pins_new)
        r.add_put(f"{p}/channels/{{channel_id}}/messages/pins/{{message_id}}", self._pin)
        r.add_delete(f"{p}/channels/{{channel_id}}/messages/pins/{{message_id}}", self._unpin)
        r.add_get(f"{p}/channels/{{channel_id}}/pins", self._get_pins_old)
        r.add_put(f"{p}/channels/{{channel_id}}/pins/{{message_id}}", self._pin)
        r.add_delete(f"{p}/channels/{{channel_id}}/pins/{{message_id}}", self._unpin)
        r.add_get(f"{p}/channels/{{channel_id}}/messages", self._get_messages)
        r.add_post(f"{p}/channels/{{channel_id}}/messages", self._create_message)
        r.add_get(f"{p}/channels/{{channel_id}}/messages/{{message_id}}", self._get_message)
        r.add_patch(f"{p}/channels/{{channel_id}}/messages/{{message_id}}", self._edit_message)
        r.add_delete(f"{p}/channels/{{channel_id}}/messages/{{message_id}}", self._delete_message)
        r.add_post(f"{p}/interactions/{{webhook_id}}/{{webhook_token}}/callback", self._callback)
        wh = f"{p}/webhooks/{{webhook_id}}/{{webhook_token}}"
        r.add_get(wh, self._get_webhook)
        r.add_patch(wh, self._get_webhook)
        r.add_post(wh, self._execute_webhook)
        r.add_get(f"{wh}/messages/{{message_id}}", self._webhook_message)
        r.add_patch(f"{wh}/messages/{{message_id}}", self._webhook_message)
        r.add_delete(f"{wh}/messages/{{message_id}}", self._webhook_message)
        r.add_route("*", f"{p}/{{tail:.*}}", self._not_found)
        return app

    @staticmethod
    def _route_of(request: web.Request) -> str:
        """discord.py-style route template of a request, e.g. ``/channels/{channel_id}/messages``."""
        info = request.match_info.route.resource
        canonical = info.canonical if info is not None else request.path
        if "{tail" in canonical:
            canonical = request.path
        return canonical.removeprefix(API_PREFIX)

    @staticmethod
    def _major(request: web.Request) -> str:
        """The major parameter that separates buckets, as in discord.py's ``Route.major_parameters``."""
        m = request.match_info
        if "channel_id" in m:
            return f"channel:{m['channel_id']}"
        if "guild_id" in m:
            return f"guild:{m['guild_id']}"
        if "webhook_id" in m:
            return f"webhook:{m['webhook_id']}:{m.get('webhook_token', '')}"
        return ""

    def _default_bucket(self, method: str, route: str, major: str) -> Bucket:
        key = (method, route, major)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = Bucket(_bucket_hash(method, route), self.default_limit, self.default_window)
            self._buckets[key] = bucket
        bucket.limit, bucket.window = self.default_limit, self.default_window
        return bucket

    @staticmethod
    def _ratelimit_headers(bucket: Bucket, now: float) -> dict[str, str]:
        # Rounded *up* to the millisecond: a client sleeping exactly this long must find the
        # window reset, never arrive a fraction of a millisecond early and collect a 429.
        reset_after = math.ceil(bucket.reset_after(now) * 1000) / 1000
        return {
            "X-RateLimit-Limit": str(bucket.limit),
            "X-RateLimit-Remaining": str(bucket.remaining(now)),
            # Reset is an absolute epoch time. It is computed from *real* time, not the fake clock:
            # clients that use it (discord.py with assume_unsync_clock=False) compare it with their
            # own wall clock, and an advanced fake clock would make them sleep for an hour.
            "X-RateLimit-Reset": f"{time.time() + reset_after:.3f}",
            "X-RateLimit-Reset-After": f"{reset_after:.3f}",
            "X-RateLimit-Bucket": bucket.name,
        }

    def _too_many(
        self,
        request: web.Request,
        route: str,
        bucket: Bucket | None,
        retry_after: float,
        *,
        scope: str,
        forced: bool,
        is_global: bool,
    ) -> web.Response:
        """A 429 shaped like Discord's. ``Via`` matters: without it discord.py assumes a
        Cloudflare ban and raises instead of waiting."""
        now = self.clock.now()
        retry_after = round(max(retry_after, 0.001), 3)
        headers = {
            "Retry-After": str(max(1, math.ceil(retry_after))),
            "Via": "1.1 google",
            "X-RateLimit-Scope": scope,
        }
        if bucket is not None:
            headers.update(self._ratelimit_headers(bucket, now))
            headers["X-RateLimit-Remaining"] = "0"
            headers["X-RateLimit-Reset-After"] = f"{retry_after:.3f}"
        if is_global:
            headers["X-RateLimit-Global"] = "true"
        self.rate_limit_hits.append(
            RateLimitHit(
                at=now,
                method=request.method,
                path=request.path,
                route=f"{request.method} {route}",
                bucket=bucket.name if bucket is not None else "global",
                retry_after=retry_after,
                scope=scope,
                forced=forced,
                is_global=is_global,
            )
        )
        body = {"message": "You are being rate limited.", "retry_after": retry_after, "global": is_global}
        if not is_global:
            body["code"] = 20028  # Discord's "You are being rate limited." code
        return _json(body, status=429, headers=headers)

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Auth, forced 429s, rate-limit buckets, JSON errors and request recording for REST."""
        if not request.path.startswith(API_PREFIX):
            return await handler(request)
        now = self.clock.now()
        method = request.method
        route = self._route_of(request)
        major = self._major(request)

        response: web.StreamResponse
        try:
            response = await self._handle_api(request, handler, method, route, major, now)
        except ApiError as err:
            response = _json(err.body(), status=err.status)
        if response.status >= 400 and response.status != 429:
            body: dict[str, Any] = {}
            if isinstance(response, web.Response) and response.body:
                with contextlib.suppress(ValueError, TypeError):
                    body = json.loads(response.body)  # type: ignore[arg-type]
            self.errors.append(
                ErrorRecord(
                    at=now,
                    method=method,
                    path=request.path,
                    route=f"{method} {route}",
                    status=response.status,
                    code=int(body.get("code", 0)) if isinstance(body, dict) else 0,
                    message=str(body.get("message", "")) if isinstance(body, dict) else "",
                    body=body if isinstance(body, dict) else {},
                )
            )
        self.requests.append(RequestRecord(now, method, request.path, f"{method} {route}", response.status))
        await self._notify()
        return response

    async def _handle_api(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
        method: str,
        route: str,
        major: str,
        now: float,
    ) -> web.StreamResponse:
        # Bot-token auth everywhere except the token-authenticated interaction/webhook routes.
        if not route.startswith(("/webhooks/", "/interactions/")):
            auth = request.headers.get("Authorization", "")
            if not auth.startswith("Bot ") or (self.token is not None and auth != f"Bot {self.token}"):
                raise ApiError(401, 0, "401: Unauthorized")

        for rule in self._forced:
            if rule.remaining > 0 and rule.matches(method, route):
                rule.remaining -= 1
                self._forced = [r for r in self._forced if r.remaining > 0]
                return self._too_many(
                    request,
                    route,
                    self._default_bucket(method, route, major),
                    rule.retry_after,
                    scope="global" if rule.is_global else rule.scope,
                    forced=True,
                    is_global=rule.is_global,
                )

        generic = self._default_bucket(method, route, major)
        enforced = [generic]
        advertised = generic
        if method == "PATCH" and route == EDIT_ROUTE:
            edit = self.edit_bucket(request.match_info["channel_id"])
            enforced.append(edit)
            if self.advertise_edit_limit:
                advertised = edit
        for bucket in enforced:
            if bucket.exhausted(now):
                return self._too_many(
                    request,
                    route,
                    bucket,
                    bucket.reset_after(now),
                    scope="user",
                    forced=False,
                    is_global=False,
                )
        for bucket in enforced:
            bucket.take(now)

        try:
            response = await handler(request)
        except ApiError as err:
            response = _json(err.body(), status=err.status)
        response.headers.update(self._ratelimit_headers(advertised, now))
        return response

    # ------------------------------------------------------------------ gateway

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        """HELLO -> IDENTIFY/RESUME -> READY + GUILD_CREATE; heartbeats answered with op 11."""
        ws = web.WebSocketResponse(max_msg_size=0, autoping=True)
        await ws.prepare(request)
        session = _GatewaySession(ws)
        self._sessions.append(session)
        try:
            await session.send(10, {"heartbeat_interval": self.heartbeat_interval_ms, "_trace": ["fake"]})
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    await self._on_gateway_frame(session, json.loads(msg.data))
                elif msg.type == WSMsgType.BINARY:
                    # discord.py never sends binary (it would only for ETF encoding); refuse it.
                    await ws.close(code=4002, message=b"Error while decoding payload.")
                elif msg.type == WSMsgType.ERROR:
                    break
        finally:
            if session.session_id:
                self._session_seqs[session.session_id] = session.seq
            if session in self._sessions:
                self._sessions.remove(session)
        return ws

    async def _on_gateway_frame(self, session: _GatewaySession, frame: dict[str, Any]) -> None:
        op = frame.get("op")
        d = frame.get("d")
        if op == 1:  # HEARTBEAT
            await session.send(11)
        elif op == 2:  # IDENTIFY
            await self._identify(session, d or {})
        elif op == 6:  # RESUME
            sid = (d or {}).get("session_id")
            if sid in self._session_seqs:
                session.session_id = sid
                session.seq = self._session_seqs[sid]
                session.identified = True
                session.intents = next(
                    (i.get("intents", 0) for i in reversed(self.identifies) if i.get("_session_id") == sid), 0
                )
                await session.send(0, {"_trace": ["fake"]}, "RESUMED")
                if self._connected is not None:
                    self._connected.set()
                await self._notify()
            else:
                await session.send(9, False)  # INVALID_SESSION, not resumable
        elif op == 8:  # REQUEST_GUILD_MEMBERS
            await self._members_chunk(session, d or {})
        # op 3 (presence), op 4 (voice state) and others are accepted and ignored.

    async def _identify(self, session: _GatewaySession, d: dict[str, Any]) -> None:
        token = str(d.get("token", ""))
        if self.token is not None and token.removeprefix("Bot ") != self.token:
            await session.ws.close(code=4004, message=b"Authentication failed.")
            return
        session.session_id = secrets.token_hex(16)
        session.intents = int(d.get("intents", 0))
        self.identifies.append({**d, "token": "<redacted>", "_session_id": session.session_id})
        ready: dict[str, Any] = {
            "v": 10,
            "user": self._me_payload(),
            "guilds": [{"id": gid, "unavailable": True} for gid in self.guilds],
            "session_id": session.session_id,
            "session_type": "normal",
            "resume_gateway_url": self.gateway_url,
            "application": {"id": self.application_id, "flags": 0},
            "private_channels": [],
            "relationships": [],
            "presences": [],
            "guild_join_requests": [],
            "geo_ordered_rtc_regions": [],
            "user_settings": {},
            "_trace": ["fake"],
        }
        if d.get("shard") is not None:
            ready["shard"] = d["shard"]
        await session.send(0, ready, "READY")
        for guild in self.guilds.values():
            bot_member = self.bot_user.member_payload(guild)
            await session.send(0, guild.payload(bot_member=bot_member), "GUILD_CREATE")
        session.identified = True
        if self._connected is not None:
            self._connected.set()
        await self._notify()

    async def _members_chunk(self, session: _GatewaySession, d: dict[str, Any]) -> None:
        gid = str(d.get("guild_id"))
        guild = self.guilds.get(gid)
        if guild is None:
            return
        ids = {str(u) for u in (d.get("user_ids") or [])}
        query = str(d.get("query") or "")
        members = [
            m.member_payload(guild)
            for m in [*guild.members, self.bot_user]
            if (not ids or m.id in ids) and m.name.startswith(query)
        ]
        chunk = {
            "guild_id": gid,
            "members": members,
            "chunk_index": 0,
            "chunk_count": 1,
            "not_found": [],
            "nonce": d.get("nonce"),
        }
        await session.send(0, chunk, "GUILD_MEMBERS_CHUNK")

    # ------------------------------------------------------------------ REST: identity

    def _me_payload(self) -> dict[str, Any]:
        data = self.bot_user.user_payload()
        data.update({"verified": True, "mfa_enabled": False, "flags": 0, "email": None, "locale": "en-US"})
        return data

    async def _get_me(self, request: web.Request) -> web.Response:
        return _json(self._me_payload())

    async def _get_application(self, request: web.Request) -> web.Response:
        owner = FakeUser("1500000000000000099", "owner").user_payload()
        return _json(
            {
                "id": self.application_id,
                "name": self.bot_user.name,
                "description": "fake application",
                "icon": None,
                "bot_public": False,
                "bot_require_code_grant": False,
                "owner": owner,
                "team": None,
                "verify_key": "0" * 64,
                "flags": 0,
                "summary": "",
                "rpc_origins": [],
                "tags": [],
                "bot": self._me_payload(),
                "interactions_endpoint_url": None,
                "redirect_uris": [],
                "approximate_guild_count": len(self.guilds),
            }
        )

    async def _get_gateway(self, request: web.Request) -> web.Response:
        return _json({"url": self.gateway_url})

    async def _get_gateway_bot(self, request: web.Request) -> web.Response:
        return _json(
            {
                "url": self.gateway_url,
                "shards": 1,
                "session_start_limit": {
                    "total": 1000,
                    "remaining": 999,
                    "reset_after": 0,
                    "max_concurrency": 1,
                },
            }
        )

    # ------------------------------------------------------------------ REST: app commands

    def _command_scope(self, request: web.Request) -> str | None:
        if request.match_info["application_id"] != self.application_id:
            raise ApiError(403, 50001, "Missing Access")
        gid = request.match_info.get("guild_id")
        if gid is not None and gid not in self.guilds:
            raise ApiError(403, 50001, "Missing Access")
        return gid

    def _store_command(self, scope: str | None, data: dict[str, Any]) -> dict[str, Any]:
        name = str(data.get("name", ""))
        # Discord keeps a command's id when it is re-synced under the same name.
        cid = self._command_ids.setdefault((scope, name), str(self._next_snowflake()))
        command = {
            "type": 1,
            "options": [],
            "default_member_permissions": None,
            "dm_permission": True,
            "nsfw": False,
            "contexts": None,
            "integration_types": [0],
            "name_localizations": None,
            "description_localizations": None,
            **data,
            "id": cid,
            "application_id": self.application_id,
            "version": str(self._next_snowflake()),
        }
        if scope is not None:
            command["guild_id"] = scope
        self._commands.setdefault(scope, {})[name] = command
        return command

    async def _get_commands(self, request: web.Request) -> web.Response:
        return _json(list(self._commands.get(self._command_scope(request), {}).values()))

    async def _put_commands(self, request: web.Request) -> web.Response:
        scope = self._command_scope(request)
        payload, _ = await self._read_payload(request)
        items = payload.get("_list", [])
        self._commands[scope] = {}
        return _json([self._store_command(scope, item) for item in items])

    async def _post_command(self, request: web.Request) -> web.Response:
        scope = self._command_scope(request)
        payload, _ = await self._read_payload(request)
        return _json(self._store_command(scope, payload), status=201)

    async def _delete_command(self, request: web.Request) -> web.Response:
        scope = self._command_scope(request)
        cid = request.match_info["command_id"]
        commands = self._commands.get(scope, {})
        for name, cmd in list(commands.items()):
            if cmd["id"] == cid:
                del commands[name]
                return _no_content()
        raise ApiError(404, 10063, "Unknown application command")

    # ------------------------------------------------------------------ REST: channels/messages

    async def _get_channel(self, request: web.Request) -> web.Response:
        cid = request.match_info["channel_id"]
        guild = self._guild_of_channel(cid)
        channel = guild.channel(cid)
        assert channel is not None
        return _json(channel.payload(guild.id))

    async def _typing(self, request: web.Request) -> web.Response:
        self._guild_of_channel(request.match_info["channel_id"])
        return _no_content()

    async def _create_message(self, request: web.Request) -> web.Response:
        cid = request.match_info["channel_id"]
        self._guild_of_channel(cid)
        if not self.bot_permissions & (SEND_MESSAGES | ADMINISTRATOR):
            raise ApiError(403, 50013, "Missing Permissions")
        payload, files = await self._read_payload(request)
        self._check_message_payload(payload, creating=True, has_files=bool(files))
        flags = int(payload.get("flags") or 0) & SUPPRESS_EMBEDS
        msg = self._new_bot_message(cid, payload, attachments=files, flags=flags)
        data = self._payload_of(msg)
        await self._echo("MESSAGE_CREATE", data)
        return _json(data)

    async def _get_messages(self, request: web.Request) -> web.Response:
        cid = request.match_info["channel_id"]
        self._guild_of_channel(cid)
        limit = max(1, min(100, int(request.query.get("limit", "50"))))
        msgs = self.messages_in(cid)
        if "before" in request.query:
            msgs = [m for m in msgs if int(m.id) < int(request.query["before"])]
        if "after" in request.query:
            msgs = [m for m in msgs if int(m.id) > int(request.query["after"])]
            msgs = msgs[:limit]
        msgs = sorted(msgs, key=lambda m: int(m.id), reverse=True)[:limit]
        return _json([self._payload_of(m) for m in msgs])

    async def _get_message(self, request: web.Request) -> web.Response:
        msg = self._live_message(request.match_info["channel_id"], request.match_info["message_id"])
        return _json(self._payload_of(msg))

    async def _edit_message(self, request: web.Request) -> web.Response:
        cid, mid = request.match_info["channel_id"], request.match_info["message_id"]
        msg = self._live_message(cid, mid)
        payload, files = await self._read_payload(request)
        if msg.author["id"] != self.bot_user.id and any(
            k in payload for k in ("content", "embeds", "components")
        ):
            raise ApiError(403, 50005, "Cannot edit a message authored by another user")
        now = self.clock.now()
        # Discord's 1-hour rule: messages older than an hour get a tiny, separate edit budget
        # (``old_edit_allowance``, 0 by default = no edits at all) before error 30046.
        is_old = self.old_edit_rule and now - msg.created_at > self.old_edit_age
        used = self._old_edits.get(mid, 0)
        if is_old and used >= self.old_edit_allowance:
            raise ApiError(
                400,
                30046,
                "Maximum number of edits to messages older than 1 hour reached. Try again later.",
            )
        self._check_message_payload(payload, creating=False, has_files=bool(files))
        if is_old:
            self._old_edits[mid] = used + 1
        self._apply_edit(msg, payload)
        msg.attachments.extend(files)
        self._record_edit(msg, payload, "rest")
        data = self._payload_of(msg)
        await self._echo("MESSAGE_UPDATE", data)
        return _json(data)

    async def _delete_message(self, request: web.Request) -> web.Response:
        cid, mid = request.match_info["channel_id"], request.match_info["message_id"]
        msg = self._live_message(cid, mid)
        if msg.author["id"] != self.bot_user.id and not self.bot_permissions & (
            MANAGE_MESSAGES | ADMINISTRATOR
        ):
            raise ApiError(403, 50013, "Missing Permissions")
        self._delete(msg)
        await self._echo(
            "MESSAGE_DELETE", {"id": msg.id, "channel_id": msg.channel_id, "guild_id": msg.guild_id}
        )
        return _no_content()

    def _delete(self, msg: FakeMessage) -> None:
        msg.deleted = True
        if msg.pinned:
            msg.pinned = False
            self.pin_events.append(PinEvent("unpin", msg.channel_id, msg.id, self.clock.now()))
        self.deleted_messages.append(msg.id)

    # ------------------------------------------------------------------ REST: pins

    async def _pin(self, request: web.Request) -> web.Response:
        cid, mid = request.match_info["channel_id"], request.match_info["message_id"]
        msg = self._live_message(cid, mid)
        if not self._has_pin_permission():
            raise ApiError(403, 50013, "Missing Permissions")
        if not msg.pinned:
            if len(self.pinned(cid)) >= self.max_pins:
                raise ApiError(400, 30003, f"Maximum number of pins reached ({self.max_pins})")
            msg.pinned = True
            msg.pinned_at = self.clock.now()
            self.pin_events.append(PinEvent("pin", cid, mid, msg.pinned_at))
            await self._pins_update(cid)
        return _no_content()

    async def _unpin(self, request: web.Request) -> web.Response:
        cid, mid = request.match_info["channel_id"], request.match_info["message_id"]
        msg = self._live_message(cid, mid)
        if not self._has_pin_permission():
            raise ApiError(403, 50013, "Missing Permissions")
        if msg.pinned:
            msg.pinned = False
            msg.pinned_at = None
            self.pin_events.append(PinEvent("unpin", cid, mid, self.clock.now()))
            await self._pins_update(cid)
        return _no_content()

    async def _pins_update(self, channel_id: str) -> None:
        pins = self.pinned(channel_id)
        last = iso(pins[-1].pinned_at) if pins and pins[-1].pinned_at is not None else None
        guild = self._guild_of_channel(channel_id)
        await self.dispatch_event(
            "CHANNEL_PINS_UPDATE",
            {"guild_id": guild.id, "channel_id": channel_id, "last_pin_timestamp": last},
        )

    async def _get_pins_new(self, request: web.Request) -> web.Response:
        """``GET /channels/{id}/messages/pins``: ``{"items": [{"pinned_at", "message"}], "has_more"}``,
        newest pin first, paged by ``before`` (an ISO timestamp) and ``limit``."""
        cid = request.match_info["channel_id"]
        self._guild_of_channel(cid)
        pins = list(reversed(self.pinned(cid)))
        before = request.query.get("before")
        if before:
            cutoff = _dt.datetime.fromisoformat(before.replace("Z", "+00:00")).timestamp()
            pins = [m for m in pins if (m.pinned_at or 0.0) < cutoff]
        limit = max(1, min(50, int(request.query.get("limit", "50"))))
        page = pins[:limit]
        items = [{"pinned_at": iso(m.pinned_at or 0.0), "message": self._payload_of(m)} for m in page]
        return _json({"items": items, "has_more": len(pins) > limit})

    async def _get_pins_old(self, request: web.Request) -> web.Response:
        """Deprecated ``GET /channels/{id}/pins``: a plain list of messages, newest pin first."""
        cid = request.match_info["channel_id"]
        self._guild_of_channel(cid)
        return _json([self._payload_of(m) for m in reversed(self.pinned(cid))])

    # ------------------------------------------------------------------ REST: interactions

    async def _callback(self, request: web.Request) -> web.Response:
        iid, token = request.match_info["webhook_id"], request.match_info["webhook_token"]
        rec = self.interactions.get(iid)
        if rec is None or rec.token != token:
            raise ApiError(404, 10062, "Unknown interaction")
        now = self.clock.now()
        if rec.acknowledged_at is not None:
            raise ApiError(400, 40060, "Interaction has already been acknowledged.")
        if now - rec.dispatched_at > self.interaction_timeout:
            raise ApiError(404, 10062, "Unknown interaction")
        body, files = await self._read_payload(request)
        ctype = int(body.get("type", 0))
        data: dict[str, Any] = body.get("data") or {}
        flags = int(data.get("flags") or 0)
        allowed = {
            APPLICATION_COMMAND: {CB_MESSAGE, CB_DEFERRED_MESSAGE, 9, 10, 12},
            MESSAGE_COMPONENT: {
                CB_MESSAGE,
                CB_DEFERRED_MESSAGE,
                CB_DEFERRED_UPDATE,
                CB_UPDATE_MESSAGE,
                9,
                10,
                12,
            },
            AUTOCOMPLETE: {CB_AUTOCOMPLETE},
        }.get(rec.type, set())
        if ctype not in allowed:
            raise ApiError.form(
                [(("type",), "INTERACTION_RESPONSE_TYPE_INVALID", "Interaction response type is invalid.")]
            )

        message: FakeMessage | None = None
        if ctype == CB_MESSAGE:
            self._check_message_payload(data, creating=True, has_files=bool(files))
            message = self._new_bot_message(
                rec.channel_id,
                data,
                attachments=files,
                flags=flags & (EPHEMERAL | SUPPRESS_EMBEDS),
                mtype=20 if rec.type == APPLICATION_COMMAND else 0,
                interaction_id=iid,
                via_webhook=True,
            )
        elif ctype == CB_DEFERRED_MESSAGE:
            message = self._new_bot_message(
                rec.channel_id,
                {},
                flags=LOADING | (flags & EPHEMERAL),
                mtype=20 if rec.type == APPLICATION_COMMAND else 0,
                interaction_id=iid,
                via_webhook=True,
            )
        elif ctype in (CB_DEFERRED_UPDATE, CB_UPDATE_MESSAGE):
            message = self.messages[str(rec.payload["message"]["id"])]
            if ctype == CB_UPDATE_MESSAGE:
                self._check_message_payload(data, creating=False, has_files=bool(files))
                self._apply_edit(message, data)
                message.attachments.extend(files)
                self._record_edit(message, data, "interaction")
        elif ctype == CB_AUTOCOMPLETE:
            errors = validate_autocomplete(data)
            if errors:
                raise ApiError.form(errors)

        rec.acknowledged_at = now
        rec.response_type = ctype
        rec.ephemeral = bool(message.ephemeral) if message is not None else False
        if message is not None:
            rec.original_message_id = message.id
            self._token_messages[rec.token].append(message.id)
        self.interaction_responses.append(
            InteractionResponseRecord(
                interaction_id=iid,
                type=ctype,
                data=data,
                flags=flags,
                at=now,
                message_id=message.id if message is not None else None,
            )
        )
        if message is not None and not message.ephemeral:
            event = "MESSAGE_UPDATE" if ctype == CB_UPDATE_MESSAGE else "MESSAGE_CREATE"
            if ctype != CB_DEFERRED_UPDATE:
                await self._echo(event, self._payload_of(message))

        if request.query.get("with_response", "").lower() not in ("1", "true"):
            return _no_content()
        result: dict[str, Any] = {
            "interaction": {
                "id": iid,
                "type": rec.type,
                "response_message_loading": ctype == CB_DEFERRED_MESSAGE,
                "response_message_ephemeral": rec.ephemeral,
            }
        }
        if message is not None:
            result["interaction"]["response_message_id"] = message.id
            if ctype != CB_DEFERRED_UPDATE:
                result["resource"] = {"type": ctype, "message": self._payload_of(message)}
        return _json(result)

    def _token_record(self, request: web.Request) -> InteractionRecord:
        """The interaction behind ``/webhooks/{app_id}/{token}``, if the token is still valid."""
        if request.match_info["webhook_id"] != self.application_id:
            raise ApiError(404, 10015, "Unknown Webhook")
        rec = self._tokens.get(request.match_info["webhook_token"])
        if rec is None or self.clock.now() - rec.dispatched_at > self.interaction_token_ttl:
            raise ApiError(401, 50027, "Invalid Webhook Token")
        return rec

    async def _get_webhook(self, request: web.Request) -> web.Response:
        rec = self._token_record(request)
        return _json(
            {
                "id": self.application_id,
                "type": 3,
                "application_id": self.application_id,
                "name": self.bot_user.name,
                "avatar": None,
                "channel_id": rec.channel_id,
                "guild_id": rec.payload.get("guild_id"),
                "token": rec.token,
            }
        )

    async def _execute_webhook(self, request: web.Request) -> web.Response:
        """Follow-up message. After a deferred (type 5) response, the first follow-up fills the
        "thinking" placeholder instead of creating a new message, keeping its ephemerality."""
        rec = self._token_record(request)
        if rec.acknowledged_at is None:
            raise ApiError(404, 10015, "Unknown Webhook")
        payload, files = await self._read_payload(request)
        self._check_message_payload(payload, creating=True, has_files=bool(files))
        flags = int(payload.get("flags") or 0)
        original = self.messages.get(rec.original_message_id or "")
        # A deleted "thinking" placeholder is gone: the follow-up then creates a new message.
        if original is not None and not original.deleted and original.flags & LOADING:
            original.flags &= ~LOADING
            self._apply_edit(original, payload)
            original.edited_at = None
            original.attachments.extend(files)
            msg = original
        else:
            msg = self._new_bot_message(
                rec.channel_id,
                payload,
                attachments=files,
                flags=flags & (EPHEMERAL | SUPPRESS_EMBEDS),
                interaction_id=rec.id,
                via_webhook=True,
            )
            self._token_messages[rec.token].append(msg.id)
        self.followups.append(FollowupRecord(rec.id, "create", msg.id, payload, msg.flags, self.clock.now()))
        data = self._payload_of(msg)
        if not msg.ephemeral:
            await self._echo("MESSAGE_CREATE", data)
        if request.query.get("wait", "").lower() in ("1", "true"):
            return _json(data)
        return _no_content()

    async def _webhook_message(self, request: web.Request) -> web.Response:
        """GET/PATCH/DELETE ``/webhooks/{app_id}/{token}/messages/{id|@original}``."""
        rec = self._token_record(request)
        mid = request.match_info["message_id"]
        if mid == "@original":
            mid = rec.original_message_id or ""
        if mid not in self._token_messages.get(rec.token, []):
            raise ApiError(404, 10008, "Unknown Message")
        msg = self.messages[mid]
        if msg.deleted:
            raise ApiError(404, 10008, "Unknown Message")
        now = self.clock.now()
        if request.method == "GET":
            self.followups.append(FollowupRecord(rec.id, "get", mid, {}, msg.flags, now))
            return _json(self._payload_of(msg))
        if request.method == "DELETE":
            self._delete(msg)
            self.followups.append(FollowupRecord(rec.id, "delete", mid, {}, msg.flags, now))
            if not msg.ephemeral:
                await self._echo(
                    "MESSAGE_DELETE", {"id": msg.id, "channel_id": msg.channel_id, "guild_id": msg.guild_id}
                )
            return _no_content()
        payload, files = await self._read_payload(request)
        self._check_message_payload(payload, creating=False, has_files=bool(files))
        msg.flags &= ~LOADING
        self._apply_edit(msg, payload)
        msg.attachments.extend(files)
        self._record_edit(msg, payload, "webhook")
        self.followups.append(FollowupRecord(rec.id, "edit", mid, payload, msg.flags, now))
        data = self._payload_of(msg)
        if not msg.ephemeral:
            await self._echo("MESSAGE_UPDATE", data)
        return _json(data)

    async def _not_found(self, request: web.Request) -> web.Response:
        """Anything not modelled: Discord's JSON 404 (and an ErrorRecord, so a test can see it)."""
        raise ApiError(404, 0, "404: Not Found")


def _bucket_hash(method: str, route: str) -> str:
    """A stable, opaque bucket id per route, like Discord's ``X-RateLimit-Bucket``."""
    return hashlib.md5(f"{method} {route}".encode()).hexdigest()


def _with_embed_type(embed: dict[str, Any]) -> dict[str, Any]:
    """Discord stores embeds with ``type: "rich"`` when the client did not say."""
    return {"type": "rich", **embed}


@contextlib.contextmanager
def point_discord_at(api_base: str, gateway_url: str) -> Iterator[None]:
    """Set ``discord.http.Route.BASE`` and ``DiscordWebSocket.DEFAULT_GATEWAY``; restore on exit.

    Routes read ``BASE`` when they are built, so this covers REST, interaction callbacks and
    follow-ups; an unsharded client connects to ``DEFAULT_GATEWAY`` without ``GET /gateway/bot``.
    """
    import discord.gateway
    import discord.http
    import yarl

    old_base = discord.http.Route.BASE
    old_gateway = discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY
    discord.http.Route.BASE = api_base
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(gateway_url)
    try:
        yield
    finally:
        discord.http.Route.BASE = old_base
        discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = old_gateway


@contextlib.asynccontextmanager
async def running_fake_discord(**kwargs: Any) -> AsyncIterator[FakeDiscordServer]:
    """Start a :class:`FakeDiscordServer` (``kwargs`` go to its constructor), point discord.py at
    it, and undo both on exit."""
    server = FakeDiscordServer(**kwargs)
    await server.start()
    try:
        with server.patch_discord():
            yield server
    finally:
        await server.stop()
