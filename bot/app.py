"""Wiring: builds the service, adapters, HTTP API and cron from settings, and runs them until a signal."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from adapters.base import ChatAdapter
from adapters.commands import CommandRouter
from core.aio import cancel_and_wait, on_stop_signals
from core.builtin import register_builtins
from core.cron import CronScheduler, ScheduleEntry
from core.models import TERMINAL_STATUSES
from core.packaging import require_extra
from core.registry import HandlerRegistry, default_registry
from core.service import ProgressService, ServiceConfig

from .settings import Settings

log = logging.getLogger(__name__)


def service_config(
    settings: Settings, *, run_worker: bool = True, watch_others: bool = True
) -> ServiceConfig:
    """Map settings onto the engine's config.

    ``watch_others=False`` is for a worker-only process: it neither polls for nor listens to other
    processes' changes, since it has no adapters or HTTP clients to show them to.
    """
    w, p = settings.worker, settings.progress
    return ServiceConfig(
        database_url=settings.database.url,
        concurrency=w.concurrency,
        recovery=w.recovery,
        min_interval=p.min_interval_ms / 1000,
        poll_interval=p.poll_interval_ms / 1000,
        activity_limit=p.activity_limit,
        lease_seconds=w.lease_seconds,
        cancel_grace=w.cancel_grace_seconds,
        shutdown_grace=w.shutdown_grace_seconds,
        retry_backoff=w.retry_backoff_seconds,
        retry_backoff_max=w.retry_backoff_max_seconds,
        default_max_attempts=w.max_attempts,
        run_worker=run_worker,
        watch_others=watch_others,
    )


def build_service(
    settings: Settings,
    *,
    run_worker: bool = True,
    registry: HandlerRegistry | None = None,
    watch_others: bool = True,
) -> ProgressService:
    """A service for these settings, with the built-in handlers registered."""
    from core.db import Database

    db = Database(settings.database.url, busy_timeout_ms=settings.database.busy_timeout_ms)
    svc = ProgressService(
        service_config(settings, run_worker=run_worker, watch_others=watch_others),
        registry=registry or default_registry,
        database=db,
    )
    register_builtins(svc.registry, lambda: svc.store)
    return svc


def build_adapters(
    settings: Settings, service: ProgressService, *, console_interactive: bool | None = None
) -> list[ChatAdapter]:
    """The chat adapters the settings enable; the console adapter when no chat platform is configured."""
    adapters: list[ChatAdapter] = []
    auth = settings.auth
    if settings.matrix.enabled:
        require_extra("matrix", "The Matrix adapter")
        from adapters.matrix import MatrixAdapter, MatrixConfig

        m = settings.matrix
        router = CommandRouter(service, prefix=m.command_prefix, **auth.router_options())
        adapters.append(
            MatrixAdapter(service, router, MatrixConfig.from_settings(m), board=settings.chat.board_policy())
        )
    if settings.discord.enabled:
        require_extra("discord", "The Discord adapter")
        from adapters.discord import DiscordAdapter, DiscordConfig

        # Discord refuses messages over 2,000 characters.
        router = CommandRouter(service, prefix="/", reply_limit=2000, **auth.router_options())
        config = DiscordConfig.from_settings(settings.discord)
        adapters.append(DiscordAdapter(service, router, config, board=settings.chat.board_policy()))
    console_on = settings.console.enabled
    if console_on is None:
        console_on = not adapters
    if console_on:
        from adapters.console import ConsoleAdapter

        router = CommandRouter(service, prefix="", **auth.router_options())
        adapters.append(ConsoleAdapter(service, router, interactive=console_interactive))
    return adapters


class Application:
    """``progressbot run``: the worker, monitor, scheduler, adapters and HTTP API, as configured.

    Without adapters and without HTTP it is ``progressbot worker``: a process that only runs jobs. On
    PostgreSQL any number of them run beside one ``run`` process, on any hosts. A worker process hosts no
    cron schedule (``run`` does; N workers would submit each scheduled job N times) and does not watch other
    processes' changes. Jobs reach it through the database (claims with ``FOR UPDATE SKIP LOCKED``, woken by
    NOTIFY), and so do pause and cancel requests; its progress reaches ``run`` the same way.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        with_adapters: bool = True,
        with_http: bool = True,
        run_worker: bool = True,
        demo: int = 0,
        exit_when_done: bool = False,
        console_interactive: bool | None = None,
        worker_only: bool | None = None,
    ) -> None:
        self.settings = settings
        #: No adapters and no HTTP API: ``progressbot worker``.
        self.worker_only = (not with_adapters and not with_http) if worker_only is None else worker_only
        self.service = build_service(settings, run_worker=run_worker, watch_others=not self.worker_only)
        self.adapters: list[ChatAdapter] = (
            build_adapters(settings, self.service, console_interactive=console_interactive)
            if with_adapters
            else []
        )
        self.with_http = with_http and settings.http is not None
        self.http: Any = None
        self.cron = CronScheduler(
            self.service,
            [
                ScheduleEntry(job=s.job, cron=s.cron, payload=s.payload, room=s.room, name=s.name)
                for s in settings.schedule
            ]
            if not self.worker_only
            else [],
        )
        self.demo = demo
        self.exit_when_done = exit_when_done
        self._stop = asyncio.Event()
        self._demo_ids: list[int] = []

    def request_stop(self) -> None:
        """Ask :meth:`run` to shut down (what SIGINT and SIGTERM do)."""
        self._stop.set()

    async def start(self) -> None:
        """Start everything, in dependency order."""
        await self.service.start()
        for job in self.service.recovered:
            log.warning("job #%s was running when the service stopped; it is %s", job.id, job.status)
        for adapter in self.adapters:
            await adapter.start()
        if self.with_http:
            from .http_api import HttpApi

            assert self.settings.http is not None
            self.http = HttpApi(self.service, self.settings.http, app_settings=self.settings)
            await self.http.start()
        self.cron.start()
        for i in range(self.demo):
            job = await self.service.submit(
                "demo.count",
                {"steps": 10 + 5 * i, "delay_ms": 300 + 100 * i},
                owner="demo",
                name=f"demo {i + 1}",
            )
            self._demo_ids.append(job.id or 0)

    async def stop(self) -> None:
        """Stop everything, in reverse order; running jobs are requeued from their checkpoints."""
        self.cron.stop()
        if self.http is not None:
            with contextlib.suppress(Exception):
                await self.http.stop()
        # Stop the worker first so the adapters can still show the final states it writes.
        if self.service.worker is not None:
            await self.service.worker.stop()
        for adapter in reversed(self.adapters):
            with contextlib.suppress(Exception):
                await adapter.stop()
        await self.service.stop()

    async def _watch_demo(self) -> None:
        while not self._stop.is_set():
            await asyncio.sleep(0.5)
            jobs = await self.service.store.get_many(self._demo_ids)
            if jobs and all(j.status in TERMINAL_STATUSES for j in jobs):
                await asyncio.sleep(0.2)
                self._stop.set()

    async def run(self) -> None:
        """Start, wait for SIGINT/SIGTERM (or the demo's end), then stop gracefully."""
        watcher: asyncio.Task[None] | None = None
        with on_stop_signals(self.request_stop):
            try:
                await self.start()
                if self.exit_when_done and self._demo_ids:
                    watcher = asyncio.create_task(self._watch_demo())
                await self._stop.wait()
            finally:
                if watcher is not None:
                    await cancel_and_wait([watcher])
                await self.stop()
