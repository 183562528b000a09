"""Cron schedules (APScheduler) and the queue-state snapshot."""

from __future__ import annotations

import pytest

from core.cron import CronScheduler, ScheduleEntry, parse_cron
from core.errors import PayloadError, UnknownJobType
from tests.conftest import ServiceFactory


def test_parse_cron_accepts_crontab_and_rejects_nonsense() -> None:
    assert parse_cron("0 3 * * *") is not None
    with pytest.raises(ValueError, match="invalid cron expression"):
        parse_cron("every night")


async def test_schedule_submits_its_job(make_service: ServiceFactory) -> None:
    svc = await make_service(run_worker=False)
    entry = ScheduleEntry(job="maintenance.cleanup", cron="0 3 * * *", payload={"older_than_days": 7})
    cron = CronScheduler(svc, [entry])
    cron.start()
    try:
        [aps_job] = cron._scheduler.get_jobs()
        nxt = aps_job.next_run_time
        assert (nxt.hour, nxt.minute) == (3, 0)
        await cron._fire(entry)  # what APScheduler calls at 03:00
    finally:
        cron.stop()
    [job] = await svc.list_jobs()
    assert job.type == "maintenance.cleanup" and job.owner == "schedule"
    assert job.payload["older_than_days"] == 7


async def test_bad_schedule_fails_at_start(make_service: ServiceFactory) -> None:
    svc = await make_service(run_worker=False)
    with pytest.raises(PayloadError):
        CronScheduler(svc, [ScheduleEntry(job="demo.count", cron="* * * * *", payload={"steps": 0})]).start()
    with pytest.raises(UnknownJobType):
        CronScheduler(svc, [ScheduleEntry(job="nope", cron="* * * * *")]).start()


async def test_queue_snapshot(make_service: ServiceFactory) -> None:
    svc = await make_service(concurrency=2)
    a = await svc.submit("demo.count", {"steps": 50, "delay_ms": 50}, name="long one")
    await svc.submit("demo.count", {"steps": 50, "delay_ms": 50})
    await svc.submit("demo.count", {"steps": 1}, delay=3600)
    await svc.wait_for(a.id or 0, lambda j: j.status == "running", timeout=10)
    snap = await svc.queue_snapshot()
    assert snap["counts"]["pending"] >= 1 and snap["total"] == 3
    assert {e.id for e in snap["running"]} >= {a.id}
    assert all(e.status == "running" for e in snap["running"])
