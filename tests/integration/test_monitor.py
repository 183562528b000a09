"""The monitor and event bus with a running service: throttling, subscribers, batches, other processes."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from core.context import JobContext
from core.db import Database
from core.events import EventBus, JobProgressEvent
from core.models import Progress
from core.monitor import JobProgressMonitor, JobView
from core.registry import HandlerRegistry
from core.store import JobStore, NewJob, ProgressWrite
from tests.conftest import ServiceFactory, wait_until

pytestmark = pytest.mark.asyncio


async def collect(sub: Any, until: Any, timeout: float = 20.0) -> list[JobProgressEvent]:
    out: list[JobProgressEvent] = []

    async def run() -> None:
        async for ev in sub:
            out.append(ev)
            if until(ev):
                return

    await asyncio.wait_for(run(), timeout)
    return out


async def test_ten_thousand_reports_make_few_events(make_service: ServiceFactory) -> None:
    reg = HandlerRegistry()

    @reg.handler("busy")
    async def busy(ctx: JobContext, data: dict[str, Any]) -> None:
        for i in range(10_000):
            ctx.report(i + 1, 10_000, f"item {i + 1}")
            if i % 100 == 99:
                await asyncio.sleep(0.02)  # 10,000 reports over ~2 s

    svc = await make_service(reg, min_interval=0.5)
    sub = svc.subscribe()
    job = await svc.submit("busy", {})
    events = await collect(sub, lambda e: e.id == job.id and e.terminal)
    mine = [e for e in events if e.id == job.id]
    progress = [e for e in mine if not e.status_changed]
    assert len(progress) <= 6  # ~2 s at one per 500 ms
    assert mine[-1].status == "completed" and mine[-1].current == 10_000
    assert mine[-1].message == "item 10000"
    assert [e.seq for e in mine] == sorted(e.seq for e in mine)


async def test_status_changes_are_never_dropped(make_service: ServiceFactory) -> None:
    svc = await make_service(min_interval=5.0)  # a huge window: only status changes can get through
    statuses: list[str] = []
    svc.bus.add_listener(lambda e: statuses.append(e.status) if e.type == "job" else None)
    job = await svc.submit("demo.count", {"steps": 200, "delay_ms": 5})
    jid = job.id or 0
    await svc.wait_for(jid, lambda j: j.status == "running", timeout=10)
    await svc.pause(jid)
    await svc.wait_for(jid, lambda j: j.status == "paused", timeout=10)
    await svc.resume(jid)
    await svc.wait_for(jid, timeout=20)
    dedup = [s for i, s in enumerate(statuses) if i == 0 or statuses[i - 1] != s]
    # A free slot takes the job in its insert's transaction: its row is never pending, so neither is its
    # first event. The resume puts it back to pending, which is seen.
    assert dedup == ["running", "paused", "pending", "running", "completed"]


async def test_slow_subscriber_does_not_block_others() -> None:
    bus = EventBus()
    slow = bus.subscribe()  # never reads
    fast = bus.subscribe()
    got: list[int] = []

    async def reader() -> None:
        while len(got) < 1:
            ev = await fast.get(timeout=5)
            assert ev is not None
            got.append(ev.seq)

    task = asyncio.create_task(reader())
    from core.events import next_seq

    for i in range(100_000):
        bus.publish(
            JobProgressEvent(id=i % 1000, type="job", status="running", seq=next_seq(), timestamp=0.0)
        )
        if i == 50_000:
            await asyncio.sleep(0)  # let the fast reader run while the slow one lags
    await asyncio.wait_for(task, 5)
    assert slow.pending() == 1000  # bounded by the number of jobs, not of events
    assert fast.pending() <= 1000
    # The slow subscriber still sees each job's latest state.
    latest = {}
    while (ev := slow.get_nowait()) is not None:
        latest[ev.id] = ev.seq
    assert len(latest) == 1000
    slow.close()
    fast.close()
    assert bus.subscriber_count == 0


async def test_stream_ends_at_terminal_state(make_service: ServiceFactory) -> None:
    svc = await make_service()
    job = await svc.submit("demo.count", {"steps": 5, "delay_ms": 20})
    seen = [ev async for ev in svc.stream(job.id or 0)]
    assert seen[-1].status == "completed"
    assert all(not e.terminal for e in seen[:-1])
    # A stream of a finished job yields its final state and ends.
    again = [ev async for ev in svc.stream(job.id or 0)]
    assert len(again) == 1 and again[0].status == "completed"
    assert svc.bus.subscriber_count == 0


async def test_batch_events_aggregate_concurrent_jobs(make_service: ServiceFactory) -> None:
    svc = await make_service(concurrency=6)
    sub = svc.subscribe(lambda e: e.type == "batch")
    jobs = [{"type": "demo.count", "payload": {"steps": 4, "delay_ms": 10}} for _ in range(10)]
    jobs += [{"type": "demo.count", "payload": {"steps": 4, "delay_ms": 10, "fail_at": 3}} for _ in range(3)]
    batch, _ = await svc.submit_batch("import", jobs, owner="@alice")
    events = await collect(sub, lambda e: e.terminal)
    final = events[-1]
    assert final.id == batch.id and final.status == "failed"
    assert (final.total_operations, final.completed_operations, final.failed_operations) == (13, 10, 3)
    assert len(final.errors) == 3
    assert [e.seq for e in events] == sorted(e.seq for e in events)
    d = final.to_dict()
    assert d["batchDetails"]["totalOperations"] == 13 and d["batchDetails"]["failedOperations"] == 3


async def test_batch_progress_advances_while_its_jobs_report(make_service: ServiceFactory) -> None:
    """A batch's message moves with its jobs' reports, not only when one of them finishes."""
    reg = HandlerRegistry()
    steps = [asyncio.Event() for _ in range(4)]
    finish = asyncio.Event()

    @reg.handler("gated")
    async def gated(ctx: JobContext, data: dict[str, Any]) -> None:
        for i, gate in enumerate(steps):
            await gate.wait()  # the test moves every job one step at a time
            ctx.report(i + 1, len(steps) + 1, f"step {i + 1}")
        await finish.wait()

    svc = await make_service(reg, concurrency=3, min_interval=0.1)
    sub = svc.subscribe(lambda e: e.type == "batch")
    batch, _ = await svc.submit_batch("gated", [{"type": "gated", "payload": {}} for _ in range(3)])
    seen: list[float] = []
    for i, gate in enumerate(steps):
        gate.set()
        want = 100.0 * (i + 1) / (len(steps) + 1)
        while True:
            ev = await sub.get(timeout=20)
            assert ev is not None, f"no batch event reached {want}%"
            # Still all running: the batch advances on progress alone.
            assert ev.id == batch.id and ev.completed_operations == 0 and not ev.terminal
            if (ev.percentage or 0.0) >= want - 0.01:
                break
        assert ev.status == "running" and (ev.message or "").endswith(f"step {i + 1}")
        seen.append(ev.percentage or 0.0)
    assert seen == sorted(seen) and seen[-1] == pytest.approx(80.0)
    finish.set()
    final = await collect(sub, lambda e: e.terminal)
    assert final[-1].status == "completed" and final[-1].percentage == 100.0


async def test_weighted_stages_and_eta(make_service: ServiceFactory) -> None:
    reg = HandlerRegistry()

    @reg.handler("staged")
    async def staged(ctx: JobContext, data: dict[str, Any]) -> None:
        ctx.stages([("fetch", 1), ("render", 3)])
        async with ctx.stage("fetch", total=2):
            ctx.report(2)
        async with ctx.stage("render", total=10):
            for i in range(10):
                await asyncio.sleep(0.15)
                ctx.report(i + 1, message=f"page {i + 1}")

    svc = await make_service(reg, min_interval=0.2)
    sub = svc.subscribe()
    job = await svc.submit("staged", {})
    events = [e for e in await collect(sub, lambda e: e.id == job.id and e.terminal) if e.id == job.id]
    render = [e for e in events if e.stage_name == "render" and e.status == "running" and e.current]
    assert render, "no progress event in the render stage"
    for e in render:
        assert e.stage_index == 1 and e.stage_count == 2
        expected = 25 + 75 * (e.current or 0) / 10
        assert e.weighted_percent == pytest.approx(expected, abs=0.01)
    etas = [e.eta_seconds for e in render if e.eta_seconds is not None]
    assert all(0 <= x < 60 for x in etas)  # never nonsense
    assert events[-1].weighted_percent == 100.0 and events[-1].eta_seconds is None


async def test_indeterminate_progress(make_service: ServiceFactory) -> None:
    reg = HandlerRegistry()

    @reg.handler("scan")
    async def scan(ctx: JobContext, data: dict[str, Any]) -> None:
        for i in range(5):
            ctx.report(i + 1, message="scanning")
            await asyncio.sleep(0.1)

    svc = await make_service(reg, min_interval=0.1)
    sub = svc.subscribe()
    job = await svc.submit("scan", {})
    events = [e for e in await collect(sub, lambda e: e.id == job.id and e.terminal) if e.id == job.id]
    running = [e for e in events if e.status == "running" and e.current]
    assert running and all(
        e.indeterminate and e.percentage is None and e.eta_seconds is None for e in running
    )


async def test_changes_from_another_process_reach_a_subscriber(
    make_service: ServiceFactory, db_url: str
) -> None:
    svc = await make_service(poll_interval=0.1)
    sub = svc.subscribe()
    script = textwrap.dedent(
        f"""
        import asyncio
        from core.db import Database
        from core.store import JobStore, NewJob
        from core.models import JobKind, JobStatus

        async def main():
            db = Database({db_url!r})
            store = JobStore(db)
            [job] = await store.submit_many([NewJob(type="tracked", kind=JobKind.TRACKED, name="external",
                                                    status=JobStatus.RUNNING, progress_total=10)])
            for i in range(1, 11):
                await store.tracked_update(job.id, current=i, message=f"step {{i}}")
                await asyncio.sleep(0.05)
            await store.tracked_finish(job.id, JobStatus.COMPLETED)
            db.close()
            print(job.id)

        asyncio.run(main())
        """
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    events = await collect(sub, lambda e: e.name == "external" and e.terminal, timeout=30)
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    ext = [e for e in events if e.name == "external"]
    assert ext[0].status == "running"
    assert ext[-1].status == "completed" and ext[-1].current == 10
    assert any(e.status == "running" and e.current and e.current > 0 for e in ext)
    assert str(ext[-1].id) == out.decode().strip()


async def test_a_job_that_finishes_before_its_pause_point_still_shows_completed(
    make_service: ServiceFactory,
) -> None:
    """A pause asked of a job that never reaches a checkpoint again: the job completes, and the completion
    (written after the request) is the last event, not dropped as older than the request."""
    reg = HandlerRegistry()
    release = asyncio.Event()

    @reg.handler("no.checkpoint")
    async def no_checkpoint(ctx: JobContext, data: dict[str, Any]) -> str:
        await release.wait()
        return "done"

    svc = await make_service(reg)
    statuses: list[tuple[str, str | None]] = []
    svc.bus.add_listener(lambda e: statuses.append((e.status, e.control)) if e.type == "job" else None)
    job = await svc.submit("no.checkpoint", {})
    jid = job.id or 0
    await svc.wait_for(jid, lambda j: j.status == "running", timeout=10)
    assert (await svc.pause(jid)).requested
    release.set()
    done = await svc.wait_for(jid, timeout=10)
    assert done.status == "completed" and done.result == "done"

    async def completion_shown() -> bool:
        return bool(statuses) and statuses[-1][0] == "completed"

    await wait_until(completion_shown, timeout=5)


async def test_an_event_holds_one_progress_value_and_reads_flat() -> None:
    """The event carries the reporter's Progress value; readers and the wire shape still see flat fields."""
    progress = Progress(
        current=3, total=12, message="step 3", stage_name="render", stage_index=1, stage_count=3
    )
    ev = JobProgressEvent(id=7, type="job", status="running", seq=1, timestamp=0.0, progress=progress)
    assert ev.progress is progress
    assert (ev.current, ev.total, ev.message, ev.stage_name) == (3, 12, "step 3", "render")
    built_flat = JobProgressEvent(
        id=7,
        type="job",
        status="running",
        seq=1,
        timestamp=0.0,
        current=3,
        total=12,
        message="step 3",
        stage_name="render",
        stage_index=1,
        stage_count=3,
    )
    assert built_flat == ev and dataclasses.replace(ev) == ev
    d = ev.to_dict()
    assert d["progress"] == {"current": 3, "total": 12, "percentage": None} and d["message"] == "step 3"
    assert d["stage"] == {"name": "render", "index": 1, "count": 3} and "current" not in d


async def test_a_job_that_reports_nothing_costs_no_progress_write(tmp_path: Any) -> None:
    """Starting and finishing a job that never reported writes its row twice (claim, outcome), not three
    times: the running event's progress is what the row holds already. A report is written as before."""
    db = Database(f"sqlite:///{tmp_path}/m.db")
    store = JobStore(db)
    await store.init()
    written: list[int] = []
    write = store.write_progress

    async def counted(writes: list[ProgressWrite]) -> None:
        written.extend(w.job_id for w in writes)
        await write(writes)

    store.write_progress = counted  # type: ignore[method-assign]
    try:
        for reports in (False, True):
            monitor = JobProgressMonitor(EventBus(), store, min_interval=0.0)
            await monitor.start()
            await store.submit(NewJob(type="t"))
            [job] = await store.claim("w1", 1)
            state = monitor.attach(job)
            monitor.job_changed(JobView.from_job(job))  # the "running" event
            if reports:
                state.report(1, 4, "one of four")
                monitor.job_changed(JobView.from_job(job), force=True)
            await monitor.stop()  # flushes what is unsaved
            assert written == ([job.id] if reports else []), reports
            if reports:
                assert (await store.get(job.id or 0)).progress_message == "one of four"
    finally:
        db.close()
