"""The Discord adapter: slash commands, buttons, and one pinned progress message per job or batch.

How a progress message lives:

* The first event of a job (or batch) posts its message, with Pause / Resume / Cancel buttons, and pins
  it. The binding (job -> channel, message id, pinned, creation time) is stored, so after a restart the
  same message is edited and nothing is posted twice.
* Every later event is rendered and handed to the per-channel :class:`EditScheduler` (latest wins, one
  edit in flight per message, fair within the channel, final states always delivered). Its budget is
  fed from Discord's ``X-RateLimit-*`` headers (through an aiohttp trace hook), so the scheduler waits
  *before* a 429 instead of discord.py waiting *after* one; discord.py's own 429 handling stays the
  safety net.
* Discord throttles edits of messages older than one hour very hard (error 30046). Before a message is
  ``repost_after_seconds`` old, the adapter re-posts a fresh one and pins it, unpins the old one, edits
  it once into a pointer to the new one, and moves the binding. A periodic check covers idle (paused)
  jobs; the check before each edit covers busy ones.
* The terminal state is the last edit: it removes the buttons; then the message is unpinned and a
  short reply mentions the requester (the only message with a non-empty ``allowed_mentions``).

All Discord I/O of one message runs inside the scheduler's ``send`` for that message, which the
scheduler never runs twice at once: posting, editing, pinning and re-posting cannot race.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import aiohttp
import discord
from discord import app_commands

from adapters.base import ChatAdapter
from adapters.commands import LIST_FILTERS, Actor, CommandRouter, Reply
from adapters.edit_scheduler import EditScheduler, PermanentEditError
from core.errors import JobNotFound, ProgressbotError
from core.events import JobProgressEvent, next_seq
from core.models import JobStatus
from core.service import ProgressService

from .config import DiscordConfig
from .content import (
    MAX_CHOICES,
    Rendered,
    choice_label,
    clip_content,
    completion_text,
    pointer_text,
    render,
    target_ref,
)
from .views import JobButton, make_view

log = logging.getLogger(__name__)

PLATFORM = "discord"
#: Discord's edit window: edits of older messages hit error 30046.
EDIT_WINDOW_SECONDS = 3600.0
ERR_UNKNOWN_CHANNEL = 10003
ERR_UNKNOWN_MESSAGE = 10008
ERR_OLD_MESSAGE_EDITS = 30046

_EDIT_PATH = re.compile(r"/channels/(\d+)/messages/(\d+)$")
_ACTIVE = [JobStatus.RUNNING, JobStatus.PAUSED, JobStatus.PENDING]
_ACTIVE_ORDER = {"running": 0, "paused": 1, "pending": 2}

Key = tuple[str, str]

__all__ = ["DiscordAdapter"]


@dataclass(slots=True)
class _Msg:
    """What the adapter knows about the progress message of one job or batch."""

    kind: str
    target: int | str
    ref: str
    channel_id: int
    message_id: int | None = None
    #: Creation time of the message (epoch seconds on the adapter's clock), for the 1-hour rule.
    created_at: float | None = None
    pinned: bool = False
    finished: bool = False
    replied: bool = False
    #: Whether the stored binding was looked up (so the message is adopted, not posted again).
    loaded: bool = False
    #: Version (event seq) of the state the message shows.
    shown_version: int = 0
    #: The newest rendered state handed to the scheduler.
    latest: Rendered | None = None
    #: An older message replaced by a re-post, still to be unpinned and turned into a pointer.
    prev_message_id: int | None = None
    prev_pinned: bool = False
    rollover_pending: bool = False
    pin_failed: bool = False
    #: The first post (or the binding lookup) is under way; events meanwhile only update ``latest``.
    creating: bool = False
    #: Posting failed for good (no permission, unknown channel): the job is not shown.
    dead: bool = False

    @property
    def persistent(self) -> bool:
        """Whether the binding can be stored (direct jobs, ``d3``, live in memory only)."""
        return isinstance(self.target, int)

    def extra(self) -> dict[str, Any]:
        """The binding's ``extra`` column."""
        return {
            "created_at": self.created_at,
            "replied": self.replied,
            "prev_message_id": str(self.prev_message_id) if self.prev_message_id else None,
            "prev_pinned": self.prev_pinned,
        }


class _Tree(app_commands.CommandTree):
    """The command tree, with the adapter's "right guild and channel?" check in front of every command."""

    async def interaction_check(self, interaction: discord.Interaction[Any], /) -> bool:
        """Refuse (ephemerally) commands from guilds and channels the bot does not serve."""
        adapter: DiscordAdapter | None = getattr(self.client, "adapter", None)
        if adapter is None:
            return False
        return await adapter._check_place(interaction)

    async def on_error(
        self, interaction: discord.Interaction[Any], error: app_commands.AppCommandError, /
    ) -> None:
        """Log the error; tell the user briefly (never a traceback in chat)."""
        log.error("slash command failed: %s", error, exc_info=error)
        with contextlib.suppress(Exception):
            if not interaction.response.is_done():
                await interaction.response.send_message(
                    "Sorry, that failed unexpectedly; the error was logged.", ephemeral=True
                )


class _Client(discord.Client):
    """A discord.py client that knows its adapter (buttons find it through ``interaction.client``)."""

    def __init__(self, adapter: DiscordAdapter, **options: Any) -> None:
        super().__init__(**options)
        self.adapter = adapter
        self.tree = _Tree(self)

    async def setup_hook(self) -> None:
        """After login, before the gateway: register the buttons and the commands, sync the commands."""
        await self.adapter._setup(self)


class DiscordAdapter(ChatAdapter):
    """Shows jobs and batches as pinned, edited-in-place Discord messages; slash commands and buttons."""

    platform = PLATFORM

    def __init__(
        self,
        service: ProgressService,
        router: CommandRouter,
        config: DiscordConfig,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``clock`` (epoch seconds) measures message age for the 1-hour rule; tests pass the fake's."""
        super().__init__(service, router)
        self.config = config
        self.clock = clock
        self.client: _Client | None = None
        self._runner: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._msgs: dict[Key, _Msg] = {}
        self._accepting = False
        self._scheduler: EditScheduler[int, Key, Rendered] = EditScheduler(
            self._send, rate=config.edit_rate, burst=config.edit_burst
        )
        self.counters: dict[str, int] = {
            "posts": 0,
            "edits": 0,
            "reposts": 0,
            "replies": 0,
            "rate_limited": 0,
        }

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Log in, connect to the gateway, sync the commands, adopt stored bindings, start listening."""
        cfg = self.config
        if not cfg.token:
            raise ValueError("discord.token is not set (PROGRESSBOT_DISCORD__TOKEN)")
        trace = aiohttp.TraceConfig()
        trace.on_request_end.append(self._on_http_response)
        intents = discord.Intents.none()
        intents.guilds = True  # the channel cache; no message content or members needed
        client = _Client(
            self,
            intents=intents,
            allowed_mentions=discord.AllowedMentions.none(),
            http_trace=trace,
            guild_ready_timeout=cfg.guild_ready_timeout,
            max_messages=None,
        )
        self.client = client
        try:
            await client.login(cfg.token)
        except BaseException:
            await self._close_client()
            raise
        self._runner = asyncio.get_running_loop().create_task(
            client.connect(reconnect=True), name="discord-gateway"
        )
        ready = asyncio.ensure_future(client.wait_until_ready())
        done, _ = await asyncio.wait(
            {ready, self._runner}, timeout=cfg.ready_timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if ready not in done:
            ready.cancel()
            runner = self._runner
            await self._close_client()
            if runner is not None and runner.done() and not runner.cancelled() and runner.exception():
                raise RuntimeError("could not connect to Discord") from runner.exception()
            raise TimeoutError(f"Discord gateway not ready within {cfg.ready_timeout}s")
        await self._load_bindings()
        self._accepting = True
        self.listen()
        self._spawn(self._resync(), "discord-resync")
        self._spawn(self._age_loop(), "discord-age-check")
        log.info("discord adapter ready as %s in guilds %s", client.user, cfg.guild_ids)

    async def stop(self) -> None:
        """Stop listening, deliver pending states (final ones first) for a while, then disconnect."""
        self._accepting = False
        self.unlisten()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        # gather (not suppress) so that a cancellation of stop() itself still propagates.
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        grace = self.config.stop_grace
        try:
            await asyncio.wait_for(self._scheduler.aclose(drain_timeout=grace), grace + 5.0)
        except Exception:
            log.warning("discord edit scheduler did not close cleanly", exc_info=True)
        await self._close_client()

    async def _close_client(self) -> None:
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.close()
        if self._runner is not None:
            try:
                await asyncio.wait_for(self._runner, 10.0)
            except (Exception, asyncio.CancelledError):
                log.debug("discord gateway task ended with an error", exc_info=True)
            self._runner = None

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Start an owned background task (cancelled and awaited in :meth:`stop`)."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("discord background task %s failed", task.get_name(), exc_info=task.exception())

    # ------------------------------------------------------------------ setup (in setup_hook)

    async def _setup(self, client: _Client) -> None:
        """Register the persistent buttons and the slash commands; sync them to the guilds."""
        # The buttons of every progress message, old ones included: clicks are matched by custom_id.
        client.add_dynamic_items(JobButton)
        guilds = [discord.Object(id=g) for g in self.config.guild_ids]
        for cmd in self._commands():
            if guilds:
                client.tree.add_command(cmd, guilds=guilds)
            else:
                client.tree.add_command(cmd)
        if not self.config.sync_commands:
            return
        targets: list[discord.Object | None] = list(guilds) if guilds else [None]
        for guild in targets:
            where = guild.id if guild is not None else "(global)"
            try:
                synced = await client.tree.sync(guild=guild)
                log.info("synced %d slash commands to guild %s", len(synced), where)
            except discord.HTTPException as exc:
                log.error("could not sync slash commands to guild %s: %s", where, exc)

    def _commands(self) -> list[app_commands.Command[Any, Any, Any]]:
        """The slash commands: thin wrappers around :class:`CommandRouter`."""
        adapter = self

        async def complete_job(
            interaction: discord.Interaction[Any], current: str
        ) -> list[app_commands.Choice[str]]:
            return await adapter._complete_job(current)

        async def complete_type(
            interaction: discord.Interaction[Any], current: str
        ) -> list[app_commands.Choice[str]]:
            cur = current.strip().lower()
            types = [t for t in adapter.service.registry.types() if cur in t.lower()]
            return [app_commands.Choice(name=t, value=t) for t in types[:MAX_CHOICES]]

        @app_commands.command(name="jobs", description="List jobs (default: the active ones)")
        @app_commands.describe(filter="Which jobs to list")
        @app_commands.choices(filter=[app_commands.Choice(name=f, value=f) for f in LIST_FILTERS])
        async def jobs(interaction: discord.Interaction[Any], filter: str | None = None) -> None:
            await adapter._command(interaction, "jobs", filter or "")

        @app_commands.command(name="status", description="Show one job (or b<id> for a batch)")
        @app_commands.describe(id="Job id, e.g. 12")
        async def status(interaction: discord.Interaction[Any], id: str) -> None:
            await adapter._command(interaction, "status", id)

        status.autocomplete("id")(complete_job)

        @app_commands.command(name="run", description="Start a job here")
        @app_commands.describe(type="Job type", args="key=value ... or a JSON object")
        async def run(interaction: discord.Interaction[Any], type: str, args: str | None = None) -> None:
            await adapter._command(interaction, "run", f"{type} {args or ''}".strip())

        run.autocomplete("type")(complete_type)

        def control(action: str, description: str) -> app_commands.Command[Any, Any, Any]:
            @app_commands.command(name=action, description=description)
            @app_commands.describe(id="Job id, e.g. 12 (or b<id> for a batch)")
            async def cmd(interaction: discord.Interaction[Any], id: str) -> None:
                await adapter._command(interaction, action, id)

            cmd.autocomplete("id")(complete_job)
            return cmd

        return [
            jobs,
            status,
            run,
            control("pause", "Pause a job at its next checkpoint"),
            control("resume", "Resume a paused job"),
            control("cancel", "Cancel a job"),
            control("retry", "Run a failed or cancelled job again"),
        ]

    # ------------------------------------------------------------------ interactions

    def _allowed_place(self, interaction: discord.Interaction[Any]) -> bool:
        cfg = self.config
        if cfg.guild_ids and interaction.guild_id not in cfg.guild_ids:
            return False
        return not cfg.channel_ids or interaction.channel_id in cfg.channel_ids

    async def _check_place(self, interaction: discord.Interaction[Any]) -> bool:
        """True when the bot serves this guild and channel; otherwise answer with a refusal."""
        if self._allowed_place(interaction):
            return True
        with contextlib.suppress(discord.HTTPException):
            if interaction.type is discord.InteractionType.autocomplete:
                await interaction.response.autocomplete([])
            else:
                where = ", ".join(f"<#{c}>" for c in self.config.channel_ids) or "its configured servers"
                await interaction.response.send_message(f"progressbot only works in {where}.", ephemeral=True)
        return False

    def _actor(self, interaction: discord.Interaction[Any]) -> Actor:
        """The platform-neutral actor: moderators are Manage Messages holders or the control role."""
        user = interaction.user
        cfg = self.config
        perms = interaction.permissions
        moderator = cfg.allow_manage_messages and (perms.manage_messages or perms.administrator)
        if cfg.control_role and isinstance(user, discord.Member):
            moderator = moderator or any(
                str(role.id) == cfg.control_role or role.name == cfg.control_role for role in user.roles
            )
        return Actor(
            user_id=str(user.id),
            platform=PLATFORM,
            room=str(interaction.channel_id) if interaction.channel_id else None,
            is_moderator=bool(moderator),
            display=f"<@{user.id}>",
        )

    async def _command(self, interaction: discord.Interaction[Any], name: str, rest: str) -> None:
        """A slash command: run it through the router and answer (refusals and errors ephemeral)."""
        await self._answer(interaction, self.router.dispatch(name, rest, self._actor(interaction)))

    async def on_button(self, interaction: discord.Interaction[Any], action: str, target: str) -> None:
        """A Pause / Resume / Cancel click: the same authorization and replies as the commands.

        The answer is ephemeral either way: the progress message itself shows the new state.
        """
        if not await self._check_place(interaction):
            return
        await self._answer(
            interaction, self.router.dispatch(action, target, self._actor(interaction)), private=True
        )

    async def _answer(
        self, interaction: discord.Interaction[Any], work: Awaitable[Reply], *, private: bool = False
    ) -> None:
        """Answer within Discord's 3 s: directly when the work is quick, else defer and follow up."""
        task = asyncio.ensure_future(work)
        try:
            done, _ = await asyncio.wait({task}, timeout=self.config.defer_after)
            if task in done:
                reply = task.result()
                await interaction.response.send_message(
                    self._reply_text(reply), ephemeral=private or not reply.ok
                )
                return
            await interaction.response.defer(thinking=True, ephemeral=private)
            reply = await task
            text = self._reply_text(reply)
            if private or reply.ok:
                await interaction.followup.send(text, ephemeral=private)
            else:
                # The "thinking…" placeholder is public; a refusal must not be. Drop it, answer privately.
                with contextlib.suppress(discord.HTTPException):
                    await interaction.delete_original_response()
                await interaction.followup.send(text, ephemeral=True)
        except discord.HTTPException as exc:
            log.warning("could not answer an interaction: %s", exc)
        except Exception:
            log.exception("interaction handling failed")
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    @staticmethod
    def _reply_text(reply: Reply) -> str:
        # Router replies are plain text that quotes user input (job names, messages): escape markdown.
        return clip_content(discord.utils.escape_markdown(reply.text) or "…")

    async def _complete_job(self, current: str) -> list[app_commands.Choice[str]]:
        """Autocomplete of job ids: active jobs first (running, paused, pending), then recent ones."""
        try:
            cur = current.strip().lstrip("#").lower()
            active = await self.service.list_jobs(statuses=_ACTIVE, limit=50)
            recent = await self.service.list_jobs(limit=25)
            seen: set[int | str] = set()
            events: list[JobProgressEvent] = []
            for job in [*active, *recent]:
                if job.id is not None and job.id not in seen:
                    seen.add(job.id)
                    events.append(self.service.current_event(job))
            snapshot = await self.service.queue_snapshot(limit=1)
            events.extend(ev for ev in snapshot["running"] if isinstance(ev.id, str))  # direct jobs

            def matches(ev: JobProgressEvent) -> bool:
                return not cur or str(ev.id).startswith(cur) or cur in (ev.name or ev.job_type or "").lower()

            def order(ev: JobProgressEvent) -> tuple[int, float]:
                rank = _ACTIVE_ORDER.get(ev.status, 9)
                return (rank, -float(ev.id) if isinstance(ev.id, int) else 0.0)

            chosen = sorted(filter(matches, events), key=order)[:MAX_CHOICES]
            return [app_commands.Choice(name=choice_label(ev), value=target_ref(ev)) for ev in chosen]
        except Exception:
            log.exception("job autocomplete failed")
            return []

    # ------------------------------------------------------------------ events -> scheduler

    def _channel_for(self, ev: JobProgressEvent) -> int | None:
        """The channel that shows a job: its room if that is one of ours, the first channel if it has none."""
        channels = self.config.channel_ids
        if ev.room is None:
            return channels[0] if channels else None
        try:
            cid = int(ev.room)
        except ValueError:
            return None  # a Matrix room or anything else: not ours
        if channels:
            return cid if cid in channels else None
        channel = self.client.get_channel(cid) if self.client is not None else None
        guild = getattr(channel, "guild", None)
        return cid if guild is not None and guild.id in self.config.guild_ids else None

    def on_event(self, ev: JobProgressEvent) -> None:
        """Render the event and offer it to the channel's edit scheduler (never blocks)."""
        if not self._accepting or not self.wants_message(ev):
            return
        key: Key = (ev.type, str(ev.id))
        msg = self._msgs.get(key)
        if msg is None:
            cid = self._channel_for(ev)
            if cid is None:
                return
            msg = _Msg(kind=ev.type, target=ev.id, ref=target_ref(ev), channel_id=cid)
            self._msgs[key] = msg
        if (
            msg.dead
            or ev.seq <= msg.shown_version
            or (msg.latest is not None and ev.seq <= msg.latest.version)
        ):
            return
        rendered = render(ev, prefix=self.router.prefix or "/")
        msg.latest = rendered
        if msg.creating:
            return  # the creation task shows the newest state once the message exists
        if msg.message_id is None and not msg.loaded:
            # Posting is not an edit: Discord counts it in another bucket, so it does not go through the
            # edit scheduler (whose budget is the channel's edits) but through its own task.
            msg.creating = True
            self._spawn(self._create(key, msg), f"discord-post:{key[0]}:{key[1]}")
            return
        self._scheduler.submit(
            msg.channel_id, key, rendered, version=rendered.version, final=rendered.terminal
        )

    async def _create(self, key: Key, msg: _Msg) -> None:
        """Adopt the stored message of a job, or post its first one; then hand over to the scheduler."""
        delay = 0.5
        try:
            while True:
                try:
                    if not msg.loaded:
                        await self._load(msg)
                    state = msg.latest
                    if msg.message_id is None and state is not None:
                        await self._post(msg, state)
                        msg.shown_version = state.version
                        if state.terminal:
                            await self._finish(msg, state)
                    break
                except Exception as exc:
                    if self._permanent(exc):
                        log.error("cannot post the progress message of %s #%s: %s", msg.kind, msg.target, exc)
                        msg.dead = True
                        return
                    log.warning(
                        "posting the progress message of %s #%s failed (%s); retrying in %.1fs",
                        msg.kind,
                        msg.target,
                        exc,
                        delay,
                    )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 30.0)
        finally:
            msg.creating = False
        latest = msg.latest
        if latest is not None and latest.version > msg.shown_version and self._accepting:
            self._scheduler.submit(msg.channel_id, key, latest, version=latest.version, final=latest.terminal)

    @staticmethod
    def _permanent(exc: BaseException) -> bool:
        """Whether a Discord error can never go away by retrying (permissions, unknown channel, bad form)."""
        if isinstance(exc, discord.Forbidden):
            return True
        if isinstance(exc, discord.NotFound):
            return exc.code == ERR_UNKNOWN_CHANNEL
        if isinstance(exc, discord.HTTPException):
            return 400 <= exc.status < 500 and exc.status != 429
        return False

    # ------------------------------------------------------------------ scheduler -> Discord

    async def _send(self, channel_id: int, key: Key, state: Rendered) -> None:
        """Make the message of ``key`` show ``state`` (the scheduler's send function).

        Posting, adopting a stored binding, editing, re-posting an old message, pinning and the final
        reply all happen here, one call at a time per message.
        """
        msg = self._msgs.get(key)
        if msg is None:  # finished and forgotten, then a newer state (a retry) came
            msg = _Msg(kind=state.kind, target=state.target, ref=state.ref, channel_id=channel_id)
            self._msgs[key] = msg
        if state.version <= msg.shown_version:
            return None
        try:
            await self._show(msg, state)
        except discord.HTTPException as exc:
            if self._permanent(exc):
                raise PermanentEditError(f"{exc.status} {exc.code}: {exc.text}") from exc
            raise
        finally:
            msg.rollover_pending = False
        return None

    async def _show(self, msg: _Msg, state: Rendered) -> None:
        if not msg.loaded:
            await self._load(msg)
        if msg.finished and state.terminal:
            # The final state is already shown (e.g. seen again after a restart): no edit, no reply.
            if msg.pinned:
                await self._unpin(msg.channel_id, msg.message_id)
                msg.pinned = False
                await self._save(msg)
            msg.shown_version = state.version
            self._forget(msg, state)
            return
        reopened = msg.finished
        if msg.message_id is None:
            await self._post(msg, state)
        elif self._too_old(msg):
            await self._rollover(msg, state)
        else:
            try:
                await self._edit(msg, state)
            except discord.NotFound as exc:
                if exc.code != ERR_UNKNOWN_MESSAGE:
                    raise
                log.info("progress message of %s #%s was deleted; posting it again", msg.kind, msg.target)
                msg.message_id, msg.pinned = None, False
                await self._post(msg, state)
            except discord.HTTPException as exc:
                if exc.code != ERR_OLD_MESSAGE_EDITS:
                    raise
                log.info("progress message of %s #%s is over an hour old; re-posting", msg.kind, msg.target)
                await self._rollover(msg, state)
        msg.shown_version = state.version
        if msg.prev_message_id is not None:
            # A re-post whose old message was not retired yet (interrupted by an error or a restart).
            await self._retire_previous(msg, state)
        if state.terminal:
            await self._finish(msg, state)
        elif reopened:
            # A finished job runs again (retry): the same message becomes active again.
            msg.finished = msg.replied = False
            await self._pin(msg)
            await self._save(msg)

    def _too_old(self, msg: _Msg) -> bool:
        return (
            msg.created_at is not None and self.clock() - msg.created_at >= self.config.repost_after_seconds
        )

    def _channel(self, channel_id: int) -> Any:
        """A channel we can send to: the cached one, or a partial one (no cache needed)."""
        assert self.client is not None
        channel = self.client.get_channel(channel_id)
        if channel is not None and hasattr(channel, "send"):
            return channel
        guild_id = self.config.guild_ids[0] if self.config.guild_ids else None
        return self.client.get_partial_messageable(channel_id, guild_id=guild_id)

    def _jump_url(self, channel_id: int, message_id: int) -> str:
        channel = self.client.get_channel(channel_id) if self.client is not None else None
        guild = getattr(channel, "guild", None)
        gid = (
            guild.id if guild is not None else (self.config.guild_ids[0] if self.config.guild_ids else "@me")
        )
        return f"https://discord.com/channels/{gid}/{channel_id}/{message_id}"

    async def _post(self, msg: _Msg, state: Rendered) -> None:
        """Post a new progress message showing ``state``, store the binding, pin it."""
        kwargs: dict[str, Any] = {"content": state.content}
        if state.buttons:
            kwargs["view"] = make_view(state.ref, state.buttons)
        posted = await self._channel(msg.channel_id).send(**kwargs)
        self.counters["posts"] += 1
        msg.message_id = posted.id
        msg.created_at = self._created_at(posted.id)
        msg.pinned = msg.finished = msg.replied = False
        await self._save(msg)  # before anything else can fail: a restart must edit this, not post again
        if not state.terminal:
            await self._pin(msg)

    def _created_at(self, message_id: int) -> float:
        """A message's creation time, from its snowflake (Discord's own clock)."""
        return discord.utils.snowflake_time(message_id).timestamp()

    async def _edit(self, msg: _Msg, state: Rendered) -> None:
        assert msg.message_id is not None
        view = make_view(state.ref, state.buttons) if state.buttons else None
        await (
            self._channel(msg.channel_id)
            .get_partial_message(msg.message_id)
            .edit(content=state.content, view=view)
        )
        self.counters["edits"] += 1

    async def _pin(self, msg: _Msg) -> None:
        """Pin the message (once; a missing permission or a full pin list is logged, not retried)."""
        if not self.config.pin or msg.pinned or msg.pin_failed or msg.message_id is None:
            return
        try:
            await self._channel(msg.channel_id).get_partial_message(msg.message_id).pin()
            msg.pinned = True
            await self._save(msg)
        except discord.HTTPException as exc:
            msg.pin_failed = True
            log.warning("could not pin the progress message of %s #%s: %s", msg.kind, msg.target, exc)

    async def _unpin(self, channel_id: int, message_id: int | None) -> None:
        if message_id is None:
            return
        try:
            await self._channel(channel_id).get_partial_message(message_id).unpin()
        except discord.NotFound:
            pass  # deleted meanwhile: nothing left to unpin
        except discord.HTTPException as exc:
            log.warning("could not unpin message %s: %s", message_id, exc)

    async def _rollover(self, msg: _Msg, state: Rendered) -> None:
        """Replace an (almost) hour-old message: post and pin a fresh one; ``_show`` then retires the old."""
        msg.prev_message_id, msg.prev_pinned = msg.message_id, msg.pinned
        msg.message_id, msg.pinned = None, False
        await self._post(msg, state)  # also stores the binding, with the old message as "prev"
        self.counters["reposts"] += 1

    async def _retire_previous(self, msg: _Msg, state: Rendered) -> None:
        """Unpin the replaced message and edit it once into a pointer to the new one."""
        old = msg.prev_message_id
        if old is None:
            return
        if msg.prev_pinned:
            await self._unpin(msg.channel_id, old)
        if msg.message_id is not None and self.clock() - self._created_at(old) < EDIT_WINDOW_SECONDS:
            try:
                text = pointer_text(state.event, state.ref, self._jump_url(msg.channel_id, msg.message_id))
                await self._channel(msg.channel_id).get_partial_message(old).edit(content=text, view=None)
            except discord.HTTPException as exc:
                log.info("could not turn message %s into a pointer: %s", old, exc)
        msg.prev_message_id, msg.prev_pinned = None, False
        await self._save(msg)

    async def _finish(self, msg: _Msg, state: Rendered) -> None:
        """After the final edit: unpin, reply to the requester once, close the binding."""
        if msg.pinned:
            await self._unpin(msg.channel_id, msg.message_id)
            msg.pinned = False
        if self.config.reply_on_finish and not msg.replied and msg.message_id is not None:
            ev = state.event
            mentions = discord.AllowedMentions.none()
            if ev.owner and ev.owner.isdigit():
                # The one message that may ping: the requester, by id (edits notify nobody).
                mentions = discord.AllowedMentions(
                    everyone=False, roles=False, users=[discord.Object(id=int(ev.owner))], replied_user=False
                )
            ref = discord.MessageReference(
                message_id=msg.message_id, channel_id=msg.channel_id, fail_if_not_exists=False
            )
            try:
                await self._channel(msg.channel_id).send(
                    completion_text(ev), reference=ref, allowed_mentions=mentions
                )
                self.counters["replies"] += 1
                msg.replied = True
            except discord.HTTPException as exc:
                log.warning("could not send the completion reply of %s #%s: %s", msg.kind, msg.target, exc)
        msg.finished = True
        await self._save(msg)
        self._forget(msg, state)

    def _forget(self, msg: _Msg, state: Rendered) -> None:
        """Drop a finished message from memory, unless a newer state is already on its way."""
        key: Key = (msg.kind, str(msg.target))
        if self._msgs.get(key) is msg and (msg.latest is None or msg.latest.version <= state.version):
            del self._msgs[key]

    # ------------------------------------------------------------------ bindings

    async def _save(self, msg: _Msg) -> None:
        if not msg.persistent or msg.message_id is None:
            return
        await self.service.store.save_binding(
            PLATFORM,
            msg.kind,
            int(msg.target),
            str(msg.channel_id),
            str(msg.message_id),
            pinned=msg.pinned,
            finished=msg.finished,
            extra=msg.extra(),
        )

    def _adopt(self, msg: _Msg, row: Any) -> None:
        """Take over a stored binding: its message is edited from now on."""
        extra = row.extra or {}
        msg.message_id = int(row.message_id)
        msg.pinned = bool(row.pinned)
        msg.finished = bool(row.finished)
        created = extra.get("created_at")
        msg.created_at = float(created) if created is not None else self._created_at(msg.message_id)
        msg.replied = bool(extra.get("replied", False))
        prev = extra.get("prev_message_id")
        msg.prev_message_id = int(prev) if prev else None
        msg.prev_pinned = bool(extra.get("prev_pinned", False))

    async def _load(self, msg: _Msg) -> None:
        """Look the binding up once, so a known message is edited instead of posted again."""
        msg.loaded = True
        if not msg.persistent:
            return
        row = await self.service.store.get_binding(PLATFORM, msg.kind, int(msg.target))
        if row is None:
            return
        if str(row.room) != str(msg.channel_id):
            log.info(
                "%s #%s was shown in channel %s; showing it in %s now",
                msg.kind,
                msg.target,
                row.room,
                msg.channel_id,
            )
            return
        self._adopt(msg, row)

    async def _load_bindings(self) -> None:
        """Adopt the open bindings of our channels (after a restart)."""
        try:
            rows = await self.service.store.open_bindings(PLATFORM)
        except Exception:
            log.exception("could not load the Discord message bindings")
            return
        for row in rows:
            try:
                cid = int(row.room)
            except ValueError:
                continue
            if self.config.channel_ids and cid not in self.config.channel_ids:
                continue
            key: Key = (row.target_kind, str(row.target_id))
            msg = _Msg(
                kind=row.target_kind,
                target=row.target_id,
                ref=f"b{row.target_id}" if row.target_kind == "batch" else str(row.target_id),
                channel_id=cid,
                loaded=True,
            )
            self._adopt(msg, row)
            self._msgs[key] = msg

    async def _resync(self) -> None:
        """Bring every adopted message, and every active job, up to date (events were missed while down)."""
        for msg in list(self._msgs.values()):
            try:
                ev = await self._current_event(msg.kind, msg.target)
            except (JobNotFound, ProgressbotError, LookupError):
                ev = None
            except Exception:
                log.exception("could not refresh %s #%s", msg.kind, msg.target)
                continue
            if ev is None:
                # The job is gone (cleaned up): stop showing it as active.
                await self._close_orphan(msg)
                continue
            self.on_event(ev)
        try:
            jobs = await self.service.list_jobs(statuses=_ACTIVE, limit=200)
        except Exception:
            log.exception("could not list the active jobs")
            return
        for job in jobs:
            if ("job", str(job.id)) not in self._msgs:
                self.on_event(self.service.current_event(job))

    async def _current_event(self, kind: str, target: int | str) -> JobProgressEvent | None:
        if kind == "batch":
            summary = await self.service.batch_summary(int(target))
            return self.service.monitor.build_batch_event(summary)
        return self.service.current_event(await self.service.get(target))

    async def _close_orphan(self, msg: _Msg) -> None:
        try:
            if msg.pinned:
                await self._unpin(msg.channel_id, msg.message_id)
            msg.pinned, msg.finished = False, True
            await self._save(msg)
        except Exception:
            log.exception("could not close the binding of %s #%s", msg.kind, msg.target)
        self._msgs.pop((msg.kind, str(msg.target)), None)

    # ------------------------------------------------------------------ the 1-hour rule

    async def _age_loop(self) -> None:
        """Re-post active messages before they turn an hour old, even when their job is idle."""
        while True:
            await asyncio.sleep(self.config.age_check_interval)
            try:
                self.check_ages()
            except Exception:
                log.exception("age check failed")

    def check_ages(self) -> int:
        """Queue a re-post for every active message at or past ``repost_after_seconds``; returns how many."""
        queued = 0
        for key, msg in list(self._msgs.items()):
            latest = msg.latest
            if (
                msg.message_id is None
                or msg.finished
                or msg.rollover_pending
                or latest is None
                or latest.terminal
                or not self._too_old(msg)
            ):
                continue
            # The same state under a new version: the scheduler sends it, and _show sees the age.
            again = dataclasses.replace(latest, version=next_seq())
            msg.latest = again
            msg.rollover_pending = True
            if self._scheduler.submit(msg.channel_id, key, again, version=again.version):
                queued += 1
            else:
                msg.rollover_pending = False
        return queued

    # ------------------------------------------------------------------ rate-limit headers

    async def _on_http_response(
        self, session: aiohttp.ClientSession, ctx: Any, params: aiohttp.TraceRequestEndParams
    ) -> None:
        """Feed the edit route's ``X-RateLimit-*`` headers (and 429s) into the channel's budget."""
        if params.method != "PATCH":
            return
        m = _EDIT_PATH.search(params.url.path)
        if m is None:
            return
        headers = params.response.headers
        try:
            if params.response.status == 429:
                self.counters["rate_limited"] += 1
                remaining = 0
                reset = float(headers.get("X-RateLimit-Reset-After") or headers.get("Retry-After") or 1.0)
            elif "X-RateLimit-Remaining" in headers:
                remaining = int(headers["X-RateLimit-Remaining"])
                reset = float(headers.get("X-RateLimit-Reset-After") or 0.0)
            else:
                return
        except ValueError:
            return
        channel_id = int(m.group(1))
        if remaining > 0 and self.config.pace_edits:
            # Discord's window is fixed: spending it in a burst leaves the channel frozen until it resets.
            # Spread what is left evenly instead: the next edit no sooner than reset / (remaining + 1), so
            # the last one lands as the window resets. Same edits per window, far less staleness.
            self._scheduler.update_budget(channel_id, 0, reset / (remaining + 1))
        else:
            self._scheduler.update_budget(channel_id, remaining, reset)

    # ------------------------------------------------------------------ introspection

    def shown_version(self, kind: str, target: int | str) -> int | None:
        """The version (event seq) of the state a message shows now, if it is still tracked."""
        msg = self._msgs.get((kind, str(target)))
        return msg.shown_version if msg is not None else None

    def message_id(self, kind: str, target: int | str) -> int | None:
        """The id of the tracked progress message of a job or batch, if any."""
        msg = self._msgs.get((kind, str(target)))
        return msg.message_id if msg is not None else None

    def stats(self) -> dict[str, Any]:
        """Counters for benches and ``/v1/stats``: posts, edits, re-posts, replies, 429s, per channel."""
        return {
            **self.counters,
            "tracked": len(self._msgs),
            "channels": {str(c): dataclasses.asdict(s) for c, s in self._scheduler.all_stats().items()},
        }

    async def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every pending state is shown (for tests and benches); False on timeout."""
        return await self._scheduler.flush(timeout)
