"""The Discord adapter: slash commands, buttons, and one pinned progress message per job or batch.

* **Progress messages** are the shared :class:`~adapters.driver.ProgressDriver`'s job, as on Matrix:
  :meth:`DiscordAdapter.on_event` only routes an event to its channel and offers it to the driver, which
  posts, edits, pins, re-posts (the 1-hour rule) and replies through
  :class:`~adapters.discord.transport.DiscordTransport`, each call waiting in the outbox of its channel's
  bucket for that route (edits, posts, pins) inside the global one. The message carries Pause / Resume /
  Cancel buttons whose ``custom_id`` (``pb:pause:12``) is matched by a dynamic item, so they work across
  restarts. A periodic check (``age_check_interval``) re-posts idle (paused) messages before they turn an
  hour old.
* **Interactions.** ``/run``'s answer *is* the job's progress message (the interaction is answered with
  it, or deferred and then filled with it; no "Started" notice). A successful pause / resume / cancel
  / retry of a job shown in the same channel is acknowledged by the progress message itself ("paused by
  @alice"); the interaction gets a short ephemeral confirmation, so the channel gets no extra message.
  Refusals and errors are ephemeral. Every interaction is answered within Discord's 3 s (deferred when
  the work may take longer), on the interaction's own route, never behind the edits.
* **Room boards** (``board=``, :mod:`adapters.board`): a channel too busy for one fresh message per job
  reports new jobs on one pinned board message, with a select menu of its jobs whose choice offers that
  job's Pause / Resume / Cancel buttons (:mod:`adapters.discord.board`; the clicks are the same
  :class:`~adapters.discord.views.JobButton` clicks, with the job's authorization). A ``/run`` whose job
  lands on a board is answered by the board's first post, or else by a short private confirmation.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import aiohttp
import discord
from discord import app_commands

from adapters.base import ChatAdapter
from adapters.board import BoardPolicy, RoomBoards
from adapters.commands import LIST_FILTERS, Actor, CommandRouter, Reply
from adapters.driver import ProgressDriver
from core.events import JobProgressEvent
from core.models import JobStatus
from core.service import ProgressService

from .board import BoardSelect, board_content, board_fits
from .config import DiscordConfig
from .content import MAX_CHOICES, choice_label, clip_content, target_ref
from .transport import DiscordTransport, Held
from .views import JobButton

log = logging.getLogger(__name__)

PLATFORM = "discord"
_ACTIVE = [JobStatus.RUNNING, JobStatus.PAUSED, JobStatus.PENDING]
_ACTIVE_ORDER = {"running": 0, "paused": 1, "pending": 2}

__all__ = ["DiscordAdapter"]


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
        board: BoardPolicy | None = None,
    ) -> None:
        """``clock`` (epoch seconds) measures message age for the 1-hour rule; tests pass the fake's."""
        super().__init__(service, router)
        self.config = config
        self.clock = clock
        #: Room boards (``[chat]``; adapters/board.py): None shows every job on its own message.
        self.board = board
        self.client: _Client | None = None
        self._runner: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._accepting = False
        self.transport: DiscordTransport | None = None
        self.driver: ProgressDriver | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Log in, connect to the gateway, sync the commands, adopt stored bindings, start listening."""
        cfg = self.config
        if not cfg.token:
            raise ValueError("discord.token is not set (PROGRESSBOT_DISCORD__TOKEN)")
        trace = aiohttp.TraceConfig()
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
        self.transport = DiscordTransport(client, cfg, prefix=self.router.prefix or "/", clock=self.clock)
        # The rate-limit headers of every response reach the outboxes through this hook.
        trace.on_request_end.append(self.transport.on_response)
        self.driver = ProgressDriver(self.service, self.transport)
        self.driver.expect_catch_up()  # it runs once connected (restart continuity)
        if self.board is not None:
            RoomBoards(self.driver, self.board, board_content, board_fits)
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
        self._accepting = True
        self.listen()
        self._spawn(self._catch_up(), "discord-catch-up")
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
        if self.driver is not None:
            drained = await self.driver.aclose(drain_timeout=self.config.stop_grace)
            if not drained:
                log.warning(
                    "discord: stopped with progress undelivered; open messages catch up at next start"
                )
        if self.transport is not None:
            await self.transport.aclose()
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
        if self.board is not None:
            # The select menu of every board, old ones included; it offers the same JobButtons.
            client.add_dynamic_items(BoardSelect)
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
        """A slash command: run it through the router and answer (refusals and errors ephemeral).

        ``/run`` is answered by the job's progress message itself (see :meth:`DiscordTransport.hold`).
        """
        actor = self._actor(interaction)
        room = str(interaction.channel_id)
        held = None
        if name == "run" and self.transport is not None and self.driver is not None:
            # Registered before the job exists: its first post may race the end of this command.
            held = self.transport.hold(interaction)
            self.driver.expect_origin(room, actor.user_id, str(interaction.id))
        await self._answer(
            interaction, self.router.dispatch(name, rest, actor), room=room, owner=actor.user_id, held=held
        )

    async def on_button(self, interaction: discord.Interaction[Any], action: str, target: str) -> None:
        """A Pause / Resume / Cancel click: the same authorization and replies as the commands.

        The answer is ephemeral either way: the progress message itself shows the new state.
        """
        if not await self._check_place(interaction):
            return
        await self._answer(
            interaction,
            self.router.dispatch(action, target, self._actor(interaction)),
            private=True,
            room=str(interaction.channel_id),
        )

    async def _answer(
        self,
        interaction: discord.Interaction[Any],
        work: Awaitable[Reply],
        *,
        private: bool = False,
        room: str | None = None,
        owner: str | None = None,
        held: Held | None = None,
    ) -> None:
        """Answer within Discord's 3 s: directly when the work is quick, else defer and follow up.

        An outcome the progress message in this channel shows (a started job, a pause by whom) needs
        no words in the channel: ``/run`` is answered by the message itself (``held``), the others with
        a private confirmation.
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        limit = self.config.defer_after
        task = asyncio.ensure_future(work)
        deferred_private = False
        try:
            done, _ = await asyncio.wait({task}, timeout=limit)
            if task not in done:
                if held is not None:
                    await DiscordTransport.defer(held, 0.0)
                else:
                    await interaction.response.defer(thinking=True, ephemeral=private)
                    deferred_private = private
            reply = await task
            shown = room is not None and self._shown_here(reply, room)
            if held is not None:
                held.started(reply.job.id if shown and reply.job is not None else None)
                if shown and not self._on_board(reply, held):
                    # The progress message is the answer; defer if it has not come in time.
                    await DiscordTransport.defer(held, limit - (loop.time() - started))
                    if not self._on_board(reply, held):
                        return
                assert self.transport is not None and self.driver is not None and room and owner
                self.transport.release(str(interaction.id))
                self.driver.drop_origin(room, owner, str(interaction.id))
            await self._respond(
                interaction, reply, private=private or shown, deferred_private=deferred_private
            )
        except discord.HTTPException as exc:
            log.warning("could not answer an interaction: %s", exc)
        except Exception:
            log.exception("interaction handling failed")
        finally:
            if held is not None and not held.known.is_set():
                held.started(None)  # failed: no progress message will answer it
                if self.transport is not None:
                    self.transport.release(str(interaction.id))
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def _respond(
        self, interaction: discord.Interaction[Any], reply: Reply, *, private: bool, deferred_private: bool
    ) -> None:
        """Send the reply's words: the response, or the follow-up filling a deferred placeholder."""
        text = self._reply_text(reply)
        ephemeral = private or not reply.ok
        if not interaction.response.is_done():
            await interaction.response.send_message(text, ephemeral=ephemeral)
        elif ephemeral == deferred_private:
            await interaction.followup.send(text, ephemeral=ephemeral)
        else:
            # The "thinking…" placeholder is public; this answer must not be. Drop it, answer privately.
            with contextlib.suppress(discord.HTTPException):
                await interaction.delete_original_response()
            await interaction.followup.send(text, ephemeral=True)

    def _on_board(self, reply: Reply, held: Held) -> bool:
        """Whether the job ``/run`` started reports on a board that does not answer the command: then it
        gets words (a private confirmation), since no message of its own will answer it."""
        boards = self.driver.boards if self.driver is not None else None
        job = reply.job
        if boards is None or job is None or not isinstance(job.id, int) or held.answered.is_set():
            return False
        room = boards.room_of(job.id)
        board = boards.boards.get(room) if room is not None else None
        if board is None:
            return False
        if board.message_id is None and board.origin == str(held.interaction.id):
            return False  # the board's first post answers it (or fills the deferred placeholder)
        # Still held: the board's first post has not taken it (and now will not).
        assert self.transport is not None
        return self.transport.release(str(held.interaction.id))

    def _shown_here(self, reply: Reply, room: str) -> bool:
        """Whether the reply's outcome shows on a progress message in ``room`` (no words needed)."""
        return self.driver is not None and self.driver.acknowledges(reply, room, self._room_for)

    def _room_for(self, ev: JobProgressEvent) -> str | None:
        cid = self._channel_for(ev)
        return str(cid) if cid is not None else None

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

    # ------------------------------------------------------------------ events -> driver

    def _channel_for(self, ev: JobProgressEvent) -> int | None:
        """The channel that shows a job: its room if that is one of ours, the first channel if it has none."""
        channels = self.config.channel_ids
        if ev.room is None:
            return channels[0] if channels else None
        try:
            cid = int(ev.room)
        except ValueError:
            return None  # a Matrix room or anything else: not ours
        return cid if self._serves(cid) else None

    def _serves(self, cid: int) -> bool:
        if self.config.channel_ids:
            return cid in self.config.channel_ids
        channel = self.client.get_channel(cid) if self.client is not None else None
        guild = getattr(channel, "guild", None)
        return guild is not None and guild.id in self.config.guild_ids

    def on_event(self, ev: JobProgressEvent) -> None:
        """Route the event to its channel and offer it to the driver (never blocks, never does I/O)."""
        if not self._accepting or self.driver is None or not self.wants_message(ev):
            return
        cid = self._channel_for(ev)
        if cid is not None:
            self.driver.offer(ev, str(cid))

    def _room_of(self, room: str) -> str | None:
        """A stored binding's channel, if we still serve it."""
        try:
            return room if self._serves(int(room)) else None
        except ValueError:
            return None

    async def _catch_up(self) -> None:
        """After a start: bring open messages up to date and show active jobs that have none yet."""
        assert self.driver is not None
        await self.driver.catch_up(self._room_of)
        try:
            jobs = await self.service.list_jobs(statuses=_ACTIVE, limit=200)
        except Exception:
            log.exception("could not list the active jobs")
            return
        for job in jobs:
            if job.id is not None and self.driver.record("job", job.id) is None:
                self.on_event(self.service.current_event(job))

    async def _age_loop(self) -> None:
        """Re-post idle active messages before they turn an hour old (busy ones are checked per edit)."""
        while True:
            await asyncio.sleep(self.config.age_check_interval)
            if self.driver is not None:
                self.driver.recheck()

    # ------------------------------------------------------------------ introspection

    def shown_version(self, kind: str, target: int | str) -> int | None:
        """The version (event seq) of the state a message shows now, if it is still tracked."""
        rec = self.driver.record(kind, target) if self.driver is not None else None
        return rec.shown_seq if rec is not None else None

    def message_id(self, kind: str, target: int | str) -> int | None:
        """The id of the tracked progress message of a job or batch, if any."""
        rec = self.driver.record(kind, target) if self.driver is not None else None
        return int(rec.message_id) if rec is not None and rec.message_id else None

    @property
    def counters(self) -> dict[str, int]:
        """Posts, edits, re-posts, pins, unpins, replies and 429s so far."""
        d = self.driver.stats if self.driver is not None else None
        t = self.transport
        return {
            "posts": d.posts if d else 0,
            "edits": d.edits if d else 0,
            "reposts": d.reposts if d else 0,
            "pins": d.pins if d else 0,
            "unpins": d.unpins if d else 0,
            "replies": d.replies if d else 0,
            "answers": t.answers if t else 0,
            "rate_limited": t.rate_limited if t else 0,
        }

    def stats(self) -> dict[str, Any]:
        """Counters for benches and ``/v1/stats``, with each channel's outboxes (one per call kind)."""
        t = self.transport
        return {
            **self.counters,
            "pending": self.driver.pending() if self.driver is not None else 0,
            "channels": {
                c: {k: dataclasses.asdict(b.snapshot()) for k, b in boxes.items()}
                for c, boxes in (t.outboxes() if t else {}).items()
            },
        }

    async def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every pending state is shown (for tests and benches); False on timeout."""
        return await self.driver.flush(timeout) if self.driver is not None else True
