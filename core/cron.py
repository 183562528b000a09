"""Cron schedules: APScheduler submits configured jobs on their cron expressions."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger

from .errors import ProgressbotError
from .service import ProgressService

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ScheduleEntry:
    """One ``[[schedule]]`` entry: submit ``job`` with ``payload`` on ``cron``."""

    job: str
    cron: str
    payload: dict[str, Any] = field(default_factory=dict)
    room: str | None = None
    name: str | None = None


def parse_cron(expr: str, timezone: str = "UTC") -> CronTrigger:
    """A trigger from a 5-field crontab expression; raises ValueError with a readable message."""
    try:
        return CronTrigger.from_crontab(expr, timezone=timezone)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"invalid cron expression {expr!r}: {exc}") from None


class CronScheduler:
    """Runs the configured schedules on the service's event loop."""

    def __init__(
        self, service: ProgressService, entries: list[ScheduleEntry], *, timezone: str = "UTC"
    ) -> None:
        self.service = service
        self.entries = entries
        self.timezone = timezone
        self._scheduler = AsyncIOScheduler(timezone=timezone)

    def start(self) -> None:
        """Validate every entry and start the scheduler."""
        for i, entry in enumerate(self.entries):
            # Validate the payload now, so a bad schedule fails at start and not at 3 am.
            self.service.registry.validate(entry.job, entry.payload)
            self._scheduler.add_job(
                self._fire,
                parse_cron(entry.cron, self.timezone),
                args=[entry],
                id=f"schedule-{i}",
                coalesce=True,
                max_instances=1,
                misfire_grace_time=300,
            )
        if self.entries:
            self._scheduler.start()

    async def _fire(self, entry: ScheduleEntry) -> None:
        try:
            job = await self.service.submit(
                entry.job, entry.payload, owner="schedule", room=entry.room, name=entry.name
            )
            log.info("schedule %r submitted job #%s", entry.cron, job.id)
        except ProgressbotError as exc:
            log.error("schedule %r could not submit %s: %s", entry.cron, entry.job, exc)

    def stop(self) -> None:
        """Stop the scheduler (does not wait for submissions in flight)."""
        if self._scheduler.running:
            self._scheduler.shutdown(wait=False)
