"""Settings, read with pydantic-settings from ``config.toml`` and ``PROGRESSBOT_*`` environment variables.

Precedence: environment (``PROGRESSBOT_WORKER__CONCURRENCY=8``, ``__`` for nesting) over the TOML file.
Secrets (tokens, passwords) belong in the environment. Invalid config is reported as ``key: problem``.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from adapters.board import BoardPolicy

DEFAULT_CONFIG_FILE = "config.toml"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DatabaseSettings(_Section):
    """``[database]``"""

    url: str = "sqlite:///progressbot.db"
    busy_timeout_ms: int = Field(10_000, ge=0)

    @field_validator("url")
    @classmethod
    def _known_backend(cls, v: str) -> str:
        if not (v.startswith("sqlite") or v.startswith("postgres")):
            raise ValueError("must start with sqlite:// or postgresql://")
        return v


class WorkerSettings(_Section):
    """``[worker]``"""

    concurrency: int = Field(4, ge=1, le=1000)
    recovery: Literal["pause", "requeue"] = "pause"
    lease_seconds: float = Field(30.0, gt=0)
    cancel_grace_seconds: float = Field(5.0, ge=0)
    shutdown_grace_seconds: float = Field(10.0, ge=0)
    max_attempts: int = Field(1, ge=1, le=100)
    retry_backoff_seconds: float = Field(2.0, ge=0)
    retry_backoff_max_seconds: float = Field(300.0, ge=0)


class ProgressSettings(_Section):
    """``[progress]``"""

    min_interval_ms: int = Field(500, ge=10, le=3_600_000)
    poll_interval_ms: int = Field(1000, ge=10, le=3_600_000)
    activity_limit: int = Field(100, ge=1, le=100_000)


class AuthSettings(_Section):
    """``[auth]``"""

    #: Platform user ids that may control any job: ``@alice:example.org``, ``discord:1234``.
    admins: list[str] = Field(default_factory=list)
    #: Who may ``run`` jobs from chat. Empty: anyone in a configured room.
    runners: list[str] = Field(default_factory=list)
    #: Per job type, who may start it from chat: "anyone", "runners" or "admins" (overrides the handler's
    #: own declaration; maintenance.cleanup declares "admins").
    run_permissions: dict[str, Literal["anyone", "runners", "admins"]] = Field(default_factory=dict)
    #: At most this many active (pending, running, paused) jobs per user started from chat; 0: no cap.
    #: Admins are exempt.
    max_active_per_user: int = Field(5, ge=0, le=100_000)

    def router_options(self) -> dict[str, Any]:
        """The chat command router's authorization options."""
        return {
            "admins": self.admins,
            "runners": self.runners,
            "run_permissions": self.run_permissions,
            "max_active_per_user": self.max_active_per_user,
        }


class MatrixSettings(_Section):
    """``[matrix]``"""

    homeserver: str | None = None
    user_id: str | None = None
    password: SecretStr | None = None
    access_token: SecretStr | None = None
    device_id: str | None = None
    device_name: str = "progressbot"
    rooms: list[str] = Field(default_factory=list)
    command_prefix: str = Field("!", min_length=1, max_length=8)
    min_power_level: int | None = None
    pin: bool = True
    react: bool = True
    #: The account's event budget across all rooms (a ceiling, events/s; the real rate is learned from 429s),
    #: its burst, the first guess of the rate, and the events kept for answers to people.
    edit_rate: float = Field(10.0, gt=0)
    edit_burst: int = Field(10, ge=1)
    start_rate: float = Field(0.2, gt=0)
    answer_reserve: int = Field(1, ge=0)
    # End-to-end encryption (adapters/matrix/e2e.py): key store next to the database unless set.
    encryption: bool = True
    store_path: str | None = None
    trust: Literal["all", "tofu", "verified"] = "tofu"
    #: "@user:server DEVICEID ED25519KEY" per device that may read the bot with trust = "verified".
    verified_devices: list[Annotated[str, Field(pattern=r"^@\S+:\S+ +\S+ +\S+$")]] = Field(
        default_factory=list
    )

    @property
    def enabled(self) -> bool:
        """Whether the Matrix adapter should run."""
        return bool(self.homeserver)

    @model_validator(mode="after")
    def _complete(self) -> MatrixSettings:
        if self.homeserver:
            if not self.user_id:
                raise ValueError("user_id is required when matrix.homeserver is set")
            if not (self.password or self.access_token):
                raise ValueError(
                    "set PROGRESSBOT_MATRIX__PASSWORD or PROGRESSBOT_MATRIX__ACCESS_TOKEN in the environment"
                )
        return self


class ChatSettings(_Section):
    """``[chat]``: what every chat platform shares (room boards)."""

    #: ``auto``: a room too busy for one fresh message per job gets one pinned board; ``always``/``never``.
    board: Literal["auto", "always", "never"] = "auto"
    #: What a job's message may show at most this old (s) before new jobs of that room use a board.
    max_staleness_s: float = Field(10.0, gt=0)
    #: Finished jobs stay on a board this long (s) with their outcome, then join its summary line.
    board_linger_s: float = Field(60.0, ge=0)

    def board_policy(self) -> BoardPolicy:
        """The board policy the chat adapters use."""
        return BoardPolicy(
            mode=self.board, max_staleness_s=self.max_staleness_s, linger_s=self.board_linger_s
        )


class DiscordSettings(_Section):
    """``[discord]``"""

    token: SecretStr | None = None
    guild_ids: list[int] = Field(default_factory=list)
    channel_ids: list[int] = Field(default_factory=list)
    control_role: str | None = None
    allow_manage_messages: bool = True
    pin: bool = True
    edit_rate: float = Field(1.0, gt=0)
    edit_burst: int = Field(5, ge=1)
    #: The bot's global request limit (Discord: 50/s), one outbox above every channel's.
    global_rate: float = Field(50.0, gt=0)
    #: Events of each channel's budget kept for answers to people.
    answer_reserve: int = Field(1, ge=0)
    #: Re-post a progress message before it is this old (Discord throttles edits of messages over 1 h).
    repost_after_seconds: float = Field(3300.0, gt=0)

    @property
    def enabled(self) -> bool:
        """Whether the Discord adapter should run."""
        return self.token is not None

    @model_validator(mode="after")
    def _complete(self) -> DiscordSettings:
        if self.token is not None and not self.guild_ids:
            raise ValueError("guild_ids is required when PROGRESSBOT_DISCORD__TOKEN is set")
        return self


class HttpSettings(_Section):
    """``[http]``: the HTTP API runs when this section exists."""

    listen: str = "127.0.0.1:8765"
    token: SecretStr | None = None
    max_body_bytes: int = Field(1024 * 1024, ge=1024)
    keepalive_seconds: float = Field(15.0, gt=0)
    #: Mark the web page's session cookie Secure even when the request came over plain http (behind a
    #: TLS-terminating proxy). Requests that arrive over https always get it.
    secure_cookies: bool = False

    @field_validator("listen")
    @classmethod
    def _host_port(cls, v: str) -> str:
        _host, sep, port = v.rpartition(":")
        if not sep or not port.isdigit() or not (0 <= int(port) <= 65535):
            raise ValueError("must be host:port, e.g. 127.0.0.1:8765")
        return v


class McpSettings(_Section):
    """``[mcp]``: the MCP server (``progressbot mcp`` over stdio, and ``/mcp`` on the HTTP API)."""

    #: Who MCP clients act as: the owner of the jobs they start, checked like a chat user
    #: (``auth.admins`` may list it, also as ``mcp:<actor>``).
    actor: str = Field("mcp", min_length=1, max_length=300)
    #: The chat room that jobs started over MCP report into (none: not shown in chat).
    room: str | None = Field(None, max_length=300)
    #: Serve MCP's streamable-HTTP transport at ``/mcp`` of the HTTP API (with the ``[mcp]`` extra installed).
    http: bool = True


class ConsoleSettings(_Section):
    """``[console]``: the terminal adapter, used when no chat platform is configured."""

    enabled: bool | None = None
    room: str = "console"


class ScheduleEntrySettings(_Section):
    """One ``[[schedule]]`` entry."""

    job: str
    cron: str
    payload: dict[str, Any] = Field(default_factory=dict)
    room: str | None = None
    name: str | None = None

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str) -> str:
        from core.cron import parse_cron

        parse_cron(v)
        return v


class Settings(BaseSettings):
    """All of progressbot's settings."""

    model_config = SettingsConfigDict(
        env_prefix="PROGRESSBOT_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    #: The TOML file to read (class-level, set by :func:`load_settings`).
    _toml_path: ClassVar[Path | None] = None

    config: str | None = Field(None, description="path of the config file (PROGRESSBOT_CONFIG)")
    log_level: str = "INFO"

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, v: str) -> str:
        levels = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
        if v.strip().upper() not in levels:
            raise ValueError(f"must be one of {', '.join(levels)}")
        return v.strip().upper()
    database: DatabaseSettings = Field(default_factory=lambda: DatabaseSettings())
    worker: WorkerSettings = Field(default_factory=lambda: WorkerSettings())
    progress: ProgressSettings = Field(default_factory=lambda: ProgressSettings())
    auth: AuthSettings = Field(default_factory=lambda: AuthSettings())
    matrix: MatrixSettings = Field(default_factory=lambda: MatrixSettings())
    discord: DiscordSettings = Field(default_factory=lambda: DiscordSettings())
    chat: ChatSettings = Field(default_factory=lambda: ChatSettings())
    http: HttpSettings | None = None
    mcp: McpSettings = Field(default_factory=lambda: McpSettings())
    console: ConsoleSettings = Field(default_factory=lambda: ConsoleSettings())
    schedule: list[ScheduleEntrySettings] = Field(default_factory=list)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Init kwargs, then the environment, then the TOML file."""
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if cls._toml_path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=cls._toml_path))
        return tuple(sources)


class ConfigError(Exception):
    """The configuration is invalid; the message lists ``key: problem`` lines."""


def _format_errors(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()))
        msg = err.get("msg", "invalid")
        if err.get("type") == "extra_forbidden":
            msg = "unknown key"
        msg = msg.removeprefix("Value error, ")
        lines.append(f"{loc or '(root)'}: {msg}")
    return "\n".join(lines)


def load_settings(path: str | os.PathLike[str] | None = None, **overrides: Any) -> Settings:
    """Load settings from ``path`` (or ``$PROGRESSBOT_CONFIG``, or ``./config.toml`` if present).

    Raises :class:`ConfigError` with one ``key: problem`` line per problem.
    """
    explicit = path or os.environ.get("PROGRESSBOT_CONFIG")
    toml_path: Path | None = None
    if explicit:
        toml_path = Path(explicit)
        if not toml_path.is_file():
            raise ConfigError(f"config: file not found: {toml_path}")
    elif Path(DEFAULT_CONFIG_FILE).is_file():
        toml_path = Path(DEFAULT_CONFIG_FILE)

    class _Loaded(Settings):
        _toml_path = toml_path

    try:
        loaded = _Loaded(**overrides)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{toml_path}: invalid TOML: {exc}") from None
    except ValueError as exc:
        raise ConfigError(f"config: {exc}") from None
    return loaded
