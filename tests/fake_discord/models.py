"""Data the fake Discord server holds and records: users, guild layout, messages, and event logs.

Ids are kept as strings everywhere because that is how Discord's JSON carries snowflakes; the
query helpers on the server accept ``int`` too and normalise.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ADMINISTRATOR",
    "ALL_PERMISSIONS",
    "ATTACH_FILES",
    "DEFAULT_BOT_PERMISSIONS",
    "DEFAULT_EVERYONE_PERMISSIONS",
    "DISCORD_EPOCH_MS",
    "EMBED_LINKS",
    "EPHEMERAL",
    "MANAGE_GUILD",
    "MANAGE_MESSAGES",
    "PIN_MESSAGES",
    "READ_MESSAGE_HISTORY",
    "SEND_MESSAGES",
    "USE_APPLICATION_COMMANDS",
    "VIEW_CHANNEL",
    "EditRecord",
    "ErrorRecord",
    "FakeChannel",
    "FakeGuild",
    "FakeMessage",
    "FakeRole",
    "FakeUser",
    "FollowupRecord",
    "InteractionRecord",
    "InteractionResponseRecord",
    "PinEvent",
    "RateLimitHit",
    "iso",
    "snowflake_time",
]

# Permission bits (https://discord.com/developers/docs/topics/permissions). Plain ints so the
# fake does not depend on discord.py; ``discord.Permissions(...).value`` works just as well.
ADMINISTRATOR = 1 << 3
MANAGE_GUILD = 1 << 5
VIEW_CHANNEL = 1 << 10
SEND_MESSAGES = 1 << 11
MANAGE_MESSAGES = 1 << 13
EMBED_LINKS = 1 << 14
ATTACH_FILES = 1 << 15
READ_MESSAGE_HISTORY = 1 << 16
USE_APPLICATION_COMMANDS = 1 << 31
PIN_MESSAGES = 1 << 51
ALL_PERMISSIONS = (1 << 53) - 1

DEFAULT_EVERYONE_PERMISSIONS = VIEW_CHANNEL | SEND_MESSAGES | READ_MESSAGE_HISTORY | USE_APPLICATION_COMMANDS
DEFAULT_BOT_PERMISSIONS = (
    DEFAULT_EVERYONE_PERMISSIONS | EMBED_LINKS | ATTACH_FILES | MANAGE_MESSAGES | PIN_MESSAGES
)

EPHEMERAL = 1 << 6  # message flag 64
DISCORD_EPOCH_MS = 1420070400000


def iso(ts: float) -> str:
    """Discord's ISO-8601 timestamp format for epoch seconds ``ts``."""
    return _dt.datetime.fromtimestamp(ts, _dt.UTC).isoformat()


def snowflake_time(snowflake: int | str) -> float:
    """Epoch seconds encoded in a snowflake (as discord.py's ``Message.created_at`` reads it)."""
    return ((int(snowflake) >> 22) + DISCORD_EPOCH_MS) / 1000.0


@dataclass
class FakeRole:
    """A guild role. The role whose id equals the guild id is ``@everyone``."""

    id: str
    name: str
    permissions: int = 0
    position: int = 0

    def payload(self) -> dict[str, Any]:
        """The role object as sent in GUILD_CREATE."""
        return {
            "id": self.id,
            "name": self.name,
            "permissions": str(self.permissions),
            "position": self.position,
            "color": 0,
            "colors": {"primary_color": 0, "secondary_color": None, "tertiary_color": None},
            "hoist": False,
            "icon": None,
            "unicode_emoji": None,
            "managed": False,
            "mentionable": False,
            "flags": 0,
        }


@dataclass
class FakeUser:
    """A Discord user who may be a guild member.

    ``roles`` are role ids. ``permissions``, if given, is the exact permission integer Discord
    would report for this member in the channel (``member.permissions`` of an interaction);
    otherwise it is computed from ``@everyone`` and the member's roles.
    """

    id: str
    name: str
    roles: list[str] = field(default_factory=list)
    permissions: int | None = None
    bot: bool = False
    global_name: str | None = None

    def user_payload(self) -> dict[str, Any]:
        """The user object (``author``, ``member.user``, ``user``)."""
        return {
            "id": self.id,
            "username": self.name,
            "global_name": self.global_name,
            "discriminator": "0",
            "avatar": None,
            "bot": self.bot,
            "public_flags": 0,
        }

    def member_payload(self, guild: FakeGuild, *, with_permissions: bool = False) -> dict[str, Any]:
        """The guild member object; interactions carry ``permissions`` too."""
        data: dict[str, Any] = {
            "user": self.user_payload(),
            "roles": list(self.roles),
            "nick": None,
            "avatar": None,
            "joined_at": iso(guild.created_at),
            "premium_since": None,
            "deaf": False,
            "mute": False,
            "pending": False,
            "flags": 0,
            "communication_disabled_until": None,
        }
        if with_permissions:
            data["permissions"] = str(guild.permissions_of(self))
        return data


@dataclass
class FakeChannel:
    """A guild text channel (type 0) by default."""

    id: str
    name: str
    type: int = 0
    position: int = 0
    topic: str | None = None

    def payload(self, guild_id: str) -> dict[str, Any]:
        """The channel object as in GUILD_CREATE and in an interaction's ``channel``."""
        return {
            "id": self.id,
            "type": self.type,
            "guild_id": guild_id,
            "name": self.name,
            "position": self.position,
            "topic": self.topic,
            "nsfw": False,
            "parent_id": None,
            "last_message_id": None,
            "rate_limit_per_user": 0,
            "permission_overwrites": [],
            "flags": 0,
        }


@dataclass
class FakeGuild:
    """A guild: channels, roles (``@everyone`` included automatically) and members."""

    id: str
    name: str = "Fake Guild"
    channels: list[FakeChannel] = field(default_factory=list)
    roles: list[FakeRole] = field(default_factory=list)
    members: list[FakeUser] = field(default_factory=list)
    owner_id: str = "1"
    created_at: float = 1_600_000_000.0
    everyone_permissions: int = DEFAULT_EVERYONE_PERMISSIONS

    def __post_init__(self) -> None:
        """Make sure ``@everyone`` exists: discord.py's permission maths needs ``guild.default_role``."""
        if not any(r.id == self.id for r in self.roles):
            self.roles.insert(0, FakeRole(self.id, "@everyone", self.everyone_permissions, 0))

    def channel(self, channel_id: str) -> FakeChannel | None:
        """The channel with this id, if it is in the guild."""
        return next((c for c in self.channels if c.id == channel_id), None)

    def role(self, role_id: str) -> FakeRole | None:
        """The role with this id, if any."""
        return next((r for r in self.roles if r.id == role_id), None)

    def member(self, user_id: str) -> FakeUser | None:
        """The member with this user id, if any."""
        return next((m for m in self.members if m.id == user_id), None)

    def permissions_of(self, user: FakeUser) -> int:
        """Guild-level permissions (no channel overwrites): explicit, or @everyone | roles."""
        if user.permissions is not None:
            return user.permissions
        if user.id == self.owner_id:
            return ALL_PERMISSIONS
        everyone = self.role(self.id)
        perms = everyone.permissions if everyone is not None else 0
        for rid in user.roles:
            role = self.role(rid)
            if role is not None:
                perms |= role.permissions
        # Discord reports every bit for administrators, and discord.py trusts the number it gets.
        return ALL_PERMISSIONS if perms & ADMINISTRATOR else perms

    def payload(self, *, bot_member: dict[str, Any] | None = None) -> dict[str, Any]:
        """The GUILD_CREATE payload; ``member_count`` equals the members sent so that discord.py
        considers the guild chunked and does not wait for member chunks at startup."""
        members = [m.member_payload(self) for m in self.members]
        if bot_member is not None:
            members.append(bot_member)
        return {
            "id": self.id,
            "name": self.name,
            "icon": None,
            "splash": None,
            "discovery_splash": None,
            "banner": None,
            "description": None,
            "owner_id": self.owner_id,
            "region": None,
            "afk_channel_id": None,
            "afk_timeout": 300,
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "mfa_level": 0,
            "nsfw_level": 0,
            "premium_tier": 0,
            "premium_subscription_count": 0,
            "premium_progress_bar_enabled": False,
            "preferred_locale": "en-US",
            "system_channel_id": None,
            "system_channel_flags": 0,
            "rules_channel_id": None,
            "public_updates_channel_id": None,
            "safety_alerts_channel_id": None,
            "features": [],
            "emojis": [],
            "stickers": [],
            "roles": [r.payload() for r in self.roles],
            "channels": [c.payload(self.id) for c in self.channels],
            "threads": [],
            "members": members,
            "member_count": len(members),
            "presences": [],
            "voice_states": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
            "soundboard_sounds": [],
            "large": False,
            "unavailable": False,
            "joined_at": iso(self.created_at),
            "application_id": None,
            "max_members": 500000,
            "vanity_url_code": None,
            "widget_enabled": False,
        }


@dataclass
class FakeMessage:
    """A message the fake stores. ``components`` are kept as posted, so buttons can be clicked."""

    id: str
    channel_id: str
    guild_id: str | None
    author: dict[str, Any]
    content: str
    created_at: float
    embeds: list[dict[str, Any]] = field(default_factory=list)
    components: list[dict[str, Any]] = field(default_factory=list)
    attachments: list[dict[str, Any]] = field(default_factory=list)
    allowed_mentions: dict[str, Any] | None = None
    message_reference: dict[str, Any] | None = None
    flags: int = 0
    type: int = 0
    pinned: bool = False
    pinned_at: float | None = None
    edited_at: float | None = None
    deleted: bool = False
    webhook_id: str | None = None
    application_id: str | None = None
    interaction_id: str | None = None

    @property
    def ephemeral(self) -> bool:
        """Whether only the invoking user can see it (flag 64)."""
        return bool(self.flags & EPHEMERAL)

    def custom_ids(self) -> dict[str, int]:
        """``custom_id -> component type`` for every interactive component on the message."""
        found: dict[str, int] = {}

        def walk(items: list[dict[str, Any]]) -> None:
            for comp in items:
                if "custom_id" in comp and comp.get("type") != 1:
                    found[comp["custom_id"]] = int(comp.get("type", 2))
                walk(comp.get("components", []) or [])
                if isinstance(comp.get("accessory"), dict):
                    walk([comp["accessory"]])

        walk(self.components)
        return found

    def payload(self, referenced: FakeMessage | None = None) -> dict[str, Any]:
        """The message object as Discord returns it."""
        data: dict[str, Any] = {
            "id": self.id,
            "channel_id": self.channel_id,
            "author": self.author,
            "content": self.content,
            "timestamp": iso(self.created_at),
            "edited_timestamp": iso(self.edited_at) if self.edited_at is not None else None,
            "tts": False,
            "mention_everyone": False,
            "mentions": [],
            "mention_roles": [],
            "mention_channels": [],
            "attachments": list(self.attachments),
            "embeds": list(self.embeds),
            "components": list(self.components),
            "pinned": self.pinned,
            "type": self.type,
            "flags": self.flags,
        }
        if self.guild_id is not None:
            data["guild_id"] = self.guild_id
        if self.webhook_id is not None:
            data["webhook_id"] = self.webhook_id
        if self.application_id is not None:
            data["application_id"] = self.application_id
        if self.message_reference is not None:
            data["message_reference"] = self.message_reference
            data["referenced_message"] = referenced.payload() if referenced is not None else None
        return data


@dataclass(frozen=True)
class EditRecord:
    """One successful edit: the JSON as sent, the fake-clock time and the message afterwards.

    ``via`` is ``"rest"`` (PATCH /channels/.../messages/...), ``"interaction"`` (callback type 7)
    or ``"webhook"`` (interaction follow-up / ``@original`` edit).
    """

    message_id: str
    channel_id: str
    payload: dict[str, Any]
    at: float
    via: str
    content_after: str
    message_after: dict[str, Any]


@dataclass(frozen=True)
class PinEvent:
    """A pin (``action="pin"``) or unpin (``"unpin"``) at fake-clock time ``at``."""

    action: str
    channel_id: str
    message_id: str
    at: float


@dataclass(frozen=True)
class RateLimitHit:
    """A 429 the fake returned. ``forced`` if it came from :meth:`FakeDiscordServer.force_429`."""

    at: float
    method: str
    path: str
    route: str
    bucket: str
    retry_after: float
    scope: str
    forced: bool
    is_global: bool = False


@dataclass(frozen=True)
class ErrorRecord:
    """Any non-2xx, non-429 reply (e.g. 400/30046, 400/50035, 404/10062)."""

    at: float
    method: str
    path: str
    route: str
    status: int
    code: int
    message: str
    body: dict[str, Any]


@dataclass
class InteractionRecord:
    """An interaction the test dispatched, and what became of it."""

    id: str
    token: str
    type: int
    payload: dict[str, Any]
    dispatched_at: float
    user_id: str
    channel_id: str
    acknowledged_at: float | None = None
    response_type: int | None = None
    original_message_id: str | None = None
    ephemeral: bool = False


@dataclass(frozen=True)
class InteractionResponseRecord:
    """An accepted ``POST /interactions/{id}/{token}/callback``.

    ``type``: 4 message, 5 deferred message, 6 deferred update, 7 update message, 8 autocomplete
    result, 9 modal. ``flags & 64`` means ephemeral. ``choices`` is filled for type 8.
    """

    interaction_id: str
    type: int
    data: dict[str, Any]
    flags: int
    at: float
    message_id: str | None

    @property
    def ephemeral(self) -> bool:
        """Whether the response message is ephemeral (flags & 64)."""
        return bool(self.flags & EPHEMERAL)

    @property
    def content(self) -> str | None:
        """Shortcut for ``data.get("content")``."""
        return self.data.get("content")

    @property
    def choices(self) -> list[dict[str, Any]]:
        """Autocomplete choices (type 8)."""
        return list(self.data.get("choices", []))


@dataclass(frozen=True)
class FollowupRecord:
    """A call on ``/webhooks/{app_id}/{token}...`` made with an interaction token.

    ``action`` is ``create`` | ``edit`` | ``delete`` | ``get``; ``message_id`` is the concrete id
    (``@original`` resolved). ``flags & 64`` means ephemeral.
    """

    interaction_id: str
    action: str
    message_id: str | None
    payload: dict[str, Any]
    flags: int
    at: float

    @property
    def ephemeral(self) -> bool:
        """Whether the message is ephemeral (flags & 64)."""
        return bool(self.flags & EPHEMERAL)
