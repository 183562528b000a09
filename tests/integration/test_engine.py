"""The engine end to end on a real database (SQLite, and PostgreSQL when available)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
from pydantic import BaseModel

from core.context import JobContext, SyncJobContext
from core.db import Database
from core.errors import IllegalTransition, JobNotFound, PayloadError, UnknownJobType
from core.models import Job, JobStatus, utcnow
from core.registry import HandlerRegistry
from core.store import Handoff, JobStore, NewJob
from tests.conftest import ServiceFactory, wait_until

pytestmark = pytest.mark.asyncio


async def status_of(svc: Any, job_id: int) -> str:
    return str((await svc.get(job_id)).status)


async def test_submit_and_complete_demo(make_service: ServiceFactory) -> None:
    svc = await make_service()
    job = await svc.submit("demo.count", {"steps": 3, "delay_ms": 1}, owner="@alice:localhost")
    assert job.status == JobStatus.PENDING and job.id is not None
    done = await svc.wait_for(job.id, timeout=10)
    assert done.status == JobStatus.COMPLETED
    assert done.result == {"steps": 3, "executions": 3}
    assert done.progress_current == 3 and done.progress_total == 3
    acts = [a.message for a in await svc.activity(job.id)]
    assert acts[0] == "submitted by @alice:localhost" and acts[-1] == "completed"


async def test_bad_payload_stores_nothing(make_service: ServiceFactory) -> None:
    svc = await make_service(start=False)
    await svc.store.init()
    with pytest.raises(PayloadError) as exc:
        await svc.submit("demo.count", {"steps": "many"})
    assert "steps" in str(exc.value)
    with pytest.raises(PayloadError) as exc:
        await svc.submit("demo.count", {"stpes": 3})
    assert "stpes: unknown field" in str(exc.value)
    with pytest.raises(PayloadError):
        await svc.submit("demo.count", {"blob": "x" * 100_000})
    with pytest.raises(UnknownJobType) as exc2:
        await svc.submit("no.such.type", {})
    assert "Unknown job type 'no.such.type'" in str(exc2.value)
    assert (await svc.stats())["total"] == 0


async def test_illegal_transitions_are_refused_with_readable_text(make_service: ServiceFactory) -> None:
    svc = await make_service()
    job = await svc.submit("demo.count", {"steps": 1, "delay_ms": 1})
    assert job.id is not None
    await svc.wait_for(job.id, timeout=10)
    with pytest.raises(IllegalTransition) as exc:
        await svc.pause(job.id)
    assert str(exc.value) == f"Job #{job.id} is completed; it can't be paused"
    with pytest.raises(IllegalTransition):
        await svc.resume(job.id)
    with pytest.raises(IllegalTransition):
        await svc.retry(job.id)
    with pytest.raises(JobNotFound) as nf:
        await svc.cancel(99999)
    assert str(nf.value) == "No job #99999"


async def test_pending_pause_resume_cancel_retry(make_service: ServiceFactory) -> None:
    svc = await make_service(run_worker=False)
    job = await svc.submit("demo.count", {"steps": 1})
    jid = job.id
    assert jid is not None
    assert (await svc.pause(jid, actor="@a")).job.status == JobStatus.PAUSED
    assert (await svc.resume(jid, actor="@a")).job.status == JobStatus.PENDING
    res = await svc.cancel(jid, actor="@a")
    assert res.job.status == JobStatus.CANCELLED and not res.requested
    assert (await svc.retry(jid, actor="@a")).job.status == JobStatus.PENDING
    msgs = [a.message for a in await svc.activity(jid)]
    assert msgs[1:] == ["paused by @a", "resumed by @a", "cancelled by @a", "retried by @a"]


async def test_atomic_claim_with_eight_claimers(db_url: str) -> None:
    dbs = [Database(db_url) for _ in range(8)]
    stores = [JobStore(db) for db in dbs]
    try:
        await stores[0].init()
        await stores[0].submit_many([NewJob(type="t", payload={"i": i}) for i in range(400)])

        async def claimer(store: JobStore, wid: str) -> list[int]:
            got: list[int] = []
            while True:
                jobs = await store.claim(wid, 3)
                if not jobs:
                    return got
                got.extend(j.id or 0 for j in jobs)

        results = await asyncio.gather(*(claimer(s, f"w{i}") for i, s in enumerate(stores)))
        all_ids = [i for r in results for i in r]
        assert len(all_ids) == 400
        assert len(set(all_ids)) == 400
        assert sum(1 for r in results if r) >= 2  # the claimers really competed
    finally:
        for db in dbs:
            db.close()


async def test_a_job_handed_to_a_free_slot_never_jumps_the_queue(db_url: str) -> None:
    """A submit offered a worker's free slot is claimed in its own transaction only when no due pending job
    would be claimed before it; otherwise it waits its turn."""
    db = Database(db_url)
    store = JobStore(db)
    answers: list[tuple[int | None, int | None]] = []

    def answer(inserted: Job | None, claimed: Job | None) -> None:
        answers.append((inserted and inserted.id, claimed and claimed.id))

    def offer() -> Handoff:
        return Handoff("w1", 30.0, answer)

    try:
        await store.init()
        [alone] = await store.submit_many([NewJob(type="t", handoff=offer())])
        assert alone.status == JobStatus.PENDING  # the submitter sees the job as inserted
        assert answers == [(alone.id, alone.id)]
        claimed = await store.get(alone.id or 0)
        assert claimed.status == JobStatus.RUNNING and claimed.worker_id == "w1" and claimed.attempts == 1

        [waiting] = await store.submit_many([NewJob(type="t", priority=5)])
        [behind] = await store.submit_many([NewJob(type="t", priority=5, handoff=offer())])
        assert answers[-1] == (behind.id, None)  # same priority, later: the waiting job goes first
        [ahead] = await store.submit_many([NewJob(type="t", priority=9, handoff=offer())])
        assert answers[-1] == (ahead.id, ahead.id)  # a higher priority would be claimed first anyway
        # The one left behind is claimed by the ordinary path, in the ordinary order.
        assert [j.id for j in await store.claim("w2", 5)] == [waiting.id, behind.id]
    finally:
        db.close()


async def test_priority_then_run_at_order(make_service: ServiceFactory) -> None:
    reg = HandlerRegistry()
    order: list[str] = []

    @reg.handler("rec")
    async def rec(ctx: JobContext, data: dict[str, Any]) -> None:
        order.append(data["n"])

    svc = await make_service(reg, start=False, concurrency=1)
    await svc.store.init()
    now = utcnow()
    await svc.submit("rec", {"n": "low-early"}, priority=0, run_at=now - timedelta(seconds=5))
    await svc.submit("rec", {"n": "high-late"}, priority=5, run_at=now - timedelta(seconds=1))
    await svc.submit("rec", {"n": "high-early"}, priority=5, run_at=now - timedelta(seconds=2))
    await svc.submit("rec", {"n": "future"}, priority=9, delay=0.4)
    await svc.start()
    await wait_until(lambda: _len_at_least(order, 4), timeout=10)
    assert order == ["high-early", "high-late", "low-early", "future"]


async def _len_at_least(items: list[Any], n: int) -> bool:
    return len(items) >= n


async def test_run_at_is_honoured(make_service: ServiceFactory) -> None:
    svc = await make_service()
    job = await svc.submit("demo.count", {"steps": 1, "delay_ms": 1}, delay=0.5)
    assert job.id is not None
    done = await svc.wait_for(job.id, timeout=10)
    assert done.started_at is not None and done.started_at >= job.run_at


async def test_retries_with_exponential_backoff(make_service: ServiceFactory) -> None:
    reg = HandlerRegistry()
    calls: list[float] = []

    @reg.handler("flaky")
    async def flaky(ctx: JobContext, data: dict[str, Any]) -> str:
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise ValueError(f"boom {len(calls)}")
        return "ok"

    svc = await make_service(reg, retry_backoff=0.2)
    job = await svc.submit("flaky", {}, max_attempts=3)
    assert job.id is not None
    done = await svc.wait_for(job.id, timeout=15)
    assert done.status == JobStatus.COMPLETED and done.result == "ok" and done.attempts == 3
    # Backoff doubles: ~0.2 s then ~0.4 s (lower bounds only; the machine may be slower, never faster).
    assert calls[1] - calls[0] >= 0.18
    assert calls[2] - calls[1] >= 0.38
    msgs = [a.message for a in await svc.activity(job.id)]
    assert any("failed (attempt 1/3): ValueError: boom 1; retrying in 0.2s" in m for m in msgs)


async def test_failure_without_attempts_left_fails(make_service: ServiceFactory) -> None:
    svc = await make_service()
    job = await svc.submit("demo.count", {"steps": 3, "delay_ms": 1, "fail_at": 2})
    assert job.id is not None
    done = await svc.wait_for(job.id, timeout=10)
    assert done.status == JobStatus.FAILED
    assert done.error == "RuntimeError: failed at step 2 (fail_at=2)"


async def test_timeout_fails_the_job(make_service: ServiceFactory) -> None:
    svc = await make_service()
    job = await svc.submit("demo.count", {"steps": 100, "delay_ms": 100}, timeout=0.3)
    assert job.id is not None
    done = await svc.wait_for(job.id, timeout=10)
    assert done.status == JobStatus.FAILED and done.error == "timed out after 0.3s"


async def test_pause_resume_continues_from_checkpoint(make_service: ServiceFactory) -> None:
    svc = await make_service()
    job = await svc.submit("demo.count", {"steps": 12, "delay_ms": 40}, owner="@alice")
    jid = job.id
    assert jid is not None
    await svc.wait_for(jid, lambda j: (j.progress_current or 0) >= 3 or j.status != "pending", timeout=10)
    await wait_until(lambda: _progress_at_least(svc, jid, 3))
    res = await svc.pause(jid, actor="@alice")
    assert res.requested and res.job.status == JobStatus.RUNNING
    paused = await svc.wait_for(jid, lambda j: j.status == JobStatus.PAUSED, timeout=10)
    step_at_pause = paused.checkpoint["next"]
    assert 3 <= step_at_pause < 12
    await asyncio.sleep(0.3)  # it stays paused
    assert await status_of(svc, jid) == "paused"
    await svc.resume(jid, actor="@alice")
    done = await svc.wait_for(jid, timeout=15)
    assert done.status == JobStatus.COMPLETED
    assert done.result == {"steps": 12, "executions": 12}  # no step ran twice


async def test_pause_and_resume_do_not_use_up_attempts(make_service: ServiceFactory) -> None:
    """pause -> resume -> fail with max_attempts=2: the failure is retried once, as if no pause happened."""
    reg = HandlerRegistry()
    attempts_seen: list[int] = []

    @reg.handler("pause_then_fail")
    async def pause_then_fail(ctx: JobContext, data: dict[str, Any]) -> None:
        attempts_seen.append(ctx.attempt)
        if not (ctx.checkpoint_state or {}).get("paused_once"):
            while True:  # runs until the pause below takes effect at a checkpoint
                await ctx.checkpoint({"paused_once": True})
                await asyncio.sleep(0.01)
        raise RuntimeError("boom")

    svc = await make_service(reg, retry_backoff=0.05)
    job = await svc.submit("pause_then_fail", {}, max_attempts=2)
    jid = job.id
    assert jid is not None
    await wait_until(lambda: _async_true(bool(attempts_seen)))
    await svc.pause(jid, actor="@alice")
    paused = await svc.wait_for(jid, lambda j: j.status == JobStatus.PAUSED, timeout=10)
    assert paused.attempts == 1
    await svc.resume(jid, actor="@alice")
    done = await svc.wait_for(jid, timeout=15)
    assert done.status == JobStatus.FAILED and done.error == "RuntimeError: boom"
    # The run before the pause and the run after it are one attempt; the failure was retried once.
    assert attempts_seen == [1, 1, 2] and done.attempts == 2
    msgs = [a.message for a in await svc.activity(jid, limit=50)]
    assert any(m.startswith("failed (attempt 1/2): RuntimeError: boom; retrying in") for m in msgs), msgs
    assert msgs[-1] == "failed: RuntimeError: boom"


async def test_explicit_retry_starts_a_fresh_run(make_service: ServiceFactory) -> None:
    """A user's retry after a final failure starts again at attempt 1 with all attempts available."""
    svc = await make_service()
    job = await svc.submit("demo.count", {"steps": 2, "delay_ms": 1, "fail_at": 1}, max_attempts=2)
    jid = job.id
    assert jid is not None
    failed = await svc.wait_for(jid, timeout=15)
    assert failed.status == JobStatus.FAILED and failed.attempts == 2
    res = await svc.retry(jid, actor="@alice")
    assert res.job.status == JobStatus.PENDING and res.job.attempts == 0
    again = await svc.wait_for(jid, timeout=15)
    assert again.status == JobStatus.FAILED and again.attempts == 2


async def _async_true(value: bool) -> bool:
    return value


async def _progress_at_least(svc: Any, jid: int, n: int) -> bool:
    st = svc.monitor.live_state(jid)
    return st is not None and (st.current or 0) >= n


async def test_cancel_running_job(make_service: ServiceFactory) -> None:
    svc = await make_service()
    job = await svc.submit("demo.count", {"steps": 50, "delay_ms": 30}, owner="@alice")
    jid = job.id
    assert jid is not None
    await wait_until(lambda: _progress_at_least(svc, jid, 2))
    res = await svc.cancel(jid, actor="@bob")
    assert res.requested
    done = await svc.wait_for(jid, timeout=10)
    assert done.status == JobStatus.CANCELLED
    assert (done.progress_current or 0) < 50
    assert "cancelled by @bob" in [a.message for a in await svc.activity(jid)]


async def test_cancel_ignored_by_handler_is_enforced(make_service: ServiceFactory) -> None:
    reg = HandlerRegistry()
    started = asyncio.Event()

    @reg.handler("stubborn")
    async def stubborn(ctx: JobContext, data: dict[str, Any]) -> None:
        started.set()
        await asyncio.sleep(60)  # never checkpoints

    svc = await make_service(reg, cancel_grace=0.3)
    job = await svc.submit("stubborn", {})
    assert job.id is not None
    await asyncio.wait_for(started.wait(), 10)
    await svc.cancel(job.id)
    done = await svc.wait_for(job.id, timeout=10)
    assert done.status == JobStatus.CANCELLED


class SyncPayload(BaseModel):
    steps: int


async def test_sync_handler_runs_in_thread_and_pauses(make_service: ServiceFactory) -> None:
    reg = HandlerRegistry()
    threads: set[str] = set()
    executed: Counter[int] = Counter()

    def counter(ctx: SyncJobContext, data: SyncPayload) -> int:
        threads.add(threading.current_thread().name)
        start = (ctx.checkpoint_state or {}).get("next", 0)
        for i in range(start, data.steps):
            ctx.checkpoint({"next": i})
            executed[i] += 1
            time.sleep(0.02)
            ctx.report(i + 1, data.steps)
        return data.steps

    reg.register("sync.count", counter, payload=SyncPayload)
    svc = await make_service(reg)
    job = await svc.submit("sync.count", {"steps": 40})
    jid = job.id
    assert jid is not None
    await wait_until(lambda: _progress_at_least(svc, jid, 5))
    await svc.pause(jid)
    await svc.wait_for(jid, lambda j: j.status == JobStatus.PAUSED, timeout=10)
    await svc.resume(jid)
    done = await svc.wait_for(jid, timeout=15)
    assert done.status == JobStatus.COMPLETED and done.result == 40
    assert threading.main_thread().name not in threads
    assert all(executed[i] == 1 for i in range(40))


async def test_direct_execute_is_in_memory_and_concurrent(make_service: ServiceFactory) -> None:
    reg = HandlerRegistry()
    inside = 0
    most_inside = 0
    all_in = asyncio.Event()

    @reg.handler("overlap")
    async def overlap(ctx: JobContext, data: dict[str, Any]) -> int:
        nonlocal inside, most_inside
        inside += 1
        most_inside = max(most_inside, inside)
        if inside == 4:
            all_in.set()
        await asyncio.wait_for(all_in.wait(), 10)  # only returns once all four run at the same time
        inside -= 1
        return int(data["n"])

    svc = await make_service(reg)
    runs = [await svc.execute("overlap", {"n": i}) for i in range(4)]
    results = await asyncio.gather(*(r.result() for r in runs))
    assert results == [0, 1, 2, 3]
    assert most_inside == 4  # they ran concurrently
    assert (await svc.stats())["total"] == 0  # nothing persisted
    assert all(str(r.view.id).startswith("d") for r in runs)


async def test_direct_job_pause_and_cancel(make_service: ServiceFactory) -> None:
    svc = await make_service()
    run = await svc.execute("demo.count", {"steps": 100, "delay_ms": 10})
    jid = str(run.view.id)
    await wait_until(lambda: _progress_at_least(svc, jid, 2))  # type: ignore[arg-type]
    await svc.pause(jid)
    await wait_until(lambda: _direct_status(run, "paused"))
    await svc.resume(jid)
    await wait_until(lambda: _direct_status(run, "running"))
    await svc.cancel(jid)
    with pytest.raises((asyncio.CancelledError, BaseException)):
        await run.result()
    assert run.view.status == "cancelled"


async def _direct_status(run: Any, status: str) -> bool:
    return bool(run.view.status == status)


async def test_tracked_job_progress_and_control(make_service: ServiceFactory) -> None:
    svc = await make_service()
    job = await svc.track("nightly build", total=10, owner="@alice", room="!r:localhost")
    jid = job.id
    assert jid is not None and job.status == JobStatus.RUNNING
    j = await svc.tracked_progress(jid, current=4, message="compiling")
    assert j.control == "run" and j.progress_current == 4
    await svc.pause(jid, actor="@alice")
    j = await svc.tracked_progress(jid, current=5)
    assert j.control == "pause" and j.status == JobStatus.PAUSED
    await svc.resume(jid)
    j = await svc.tracked_progress(jid, current=6)
    assert j.control == "run"
    done = await svc.tracked_finish(jid, ok=True, result={"artifacts": 3})
    assert done.status == JobStatus.COMPLETED and done.progress_current == 10
    with pytest.raises(IllegalTransition):
        await svc.tracked_finish(jid, ok=False, error="late")


async def test_tracked_jobs_are_not_claimed_or_recovered(make_service: ServiceFactory) -> None:
    svc = await make_service()
    job = await svc.track("external", total=3)
    assert job.id is not None
    await asyncio.sleep(0.3)
    assert await status_of(svc, job.id) == "running"
    assert await svc.store.recover("pause") == []


async def test_batch_aggregates(make_service: ServiceFactory) -> None:
    svc = await make_service(concurrency=4)
    jobs = [{"type": "demo.count", "payload": {"steps": 3, "delay_ms": 5}} for _ in range(6)]
    jobs += [{"type": "demo.count", "payload": {"steps": 3, "delay_ms": 5, "fail_at": 2}} for _ in range(2)]
    batch, stored = await svc.submit_batch("nightly", jobs, owner="@alice")
    assert batch.id is not None and len(stored) == 8
    for j in stored:
        await svc.wait_for(j.id or 0, timeout=15)
    s = await svc.batch_summary(batch.id)
    assert (s.total, s.completed, s.failed) == (8, 6, 2)
    assert s.status == JobStatus.FAILED
    assert len(s.errors) == 2 and all("fail_at=2" in e for e in s.errors)


async def test_batch_validation_is_all_or_nothing(make_service: ServiceFactory) -> None:
    svc = await make_service(run_worker=False)
    with pytest.raises(PayloadError):
        await svc.submit_batch(
            "b",
            [
                {"type": "demo.count", "payload": {"steps": 1}},
                {"type": "demo.count", "payload": {"steps": -1}},
            ],
        )
    assert (await svc.stats())["total"] == 0 and (await svc.stats())["batches"] == 0


async def test_batch_pause_resume_cancel(make_service: ServiceFactory) -> None:
    svc = await make_service(run_worker=False)
    batch, _ = await svc.submit_batch("b", [{"type": "demo.count", "payload": {"steps": 1}}] * 3)
    assert batch.id is not None
    assert len(await svc.act_batch(batch.id, "pause")) == 3
    assert (await svc.batch_summary(batch.id)).status == JobStatus.PAUSED
    assert len(await svc.act_batch(batch.id, "resume")) == 3
    assert len(await svc.act_batch(batch.id, "cancel")) == 3
    assert (await svc.batch_summary(batch.id)).status == JobStatus.CANCELLED
    with pytest.raises(IllegalTransition) as exc:
        await svc.act_batch(batch.id, "pause")
    assert str(exc.value) == f"Batch #{batch.id} is cancelled; it can't be paused"


async def test_activity_log_is_capped(make_service: ServiceFactory) -> None:
    reg = HandlerRegistry()

    @reg.handler("chatty")
    async def chatty(ctx: JobContext, data: dict[str, Any]) -> None:
        for i in range(150):
            ctx.log("info", f"line {i}", i=i)

    svc = await make_service(reg, activity_limit=100)
    job = await svc.submit("chatty", {})
    assert job.id is not None
    await svc.wait_for(job.id, timeout=10)
    await wait_until(lambda: _activity_has(svc, job.id or 0, "line 149"))
    acts = await svc.activity(job.id, limit=1000)
    assert len(acts) == 100
    assert acts[-1].message in ("line 149", "completed")


async def _activity_has(svc: Any, jid: int, text: str) -> bool:
    return any(a.message == text for a in await svc.activity(jid, limit=1000))


async def test_cleanup_handler_deletes_old_finished_jobs(make_service: ServiceFactory) -> None:
    svc = await make_service()
    old = await svc.submit("demo.count", {"steps": 1, "delay_ms": 1})
    assert old.id is not None
    await svc.wait_for(old.id, timeout=10)
    keep = await svc.submit("demo.count", {"steps": 1}, delay=3600)
    cleanup = await svc.submit("maintenance.cleanup", {"older_than_days": 0})
    assert cleanup.id is not None
    done = await svc.wait_for(cleanup.id, timeout=10)
    assert done.status == JobStatus.COMPLETED and done.result["deleted"] >= 1
    with pytest.raises(JobNotFound):
        await svc.get(old.id)
    assert (await svc.get(keep.id or 0)).status == JobStatus.PENDING


async def test_recovery_pause_and_requeue(make_service: ServiceFactory, db_url: str) -> None:
    # Simulate a dead process: jobs marked running by a worker that no longer exists.
    svc = await make_service(run_worker=False)
    a = await svc.submit("demo.count", {"steps": 2, "delay_ms": 1})
    b = await svc.submit("demo.count", {"steps": 2, "delay_ms": 1})
    # A short lease, so that PostgreSQL (which only recovers expired leases) recovers them too.
    claimed = await svc.store.claim("dead-worker", 2, lease_seconds=0.01)
    assert {j.id for j in claimed} == {a.id, b.id}
    await asyncio.sleep(0.05)
    rec = await make_service(recovery="pause")
    assert {j.id for j in rec.recovered} == {a.id, b.id}
    for j in (a, b):
        got = await rec.get(j.id or 0)
        assert got.status == JobStatus.PAUSED and got.interrupted
        notes = [x.message for x in await rec.activity(j.id or 0)]
        # SQLite: "interrupted by restart"; PostgreSQL: "interrupted: worker lease expired".
        assert any(n.startswith("interrupted") for n in notes)
    await rec.resume(a.id or 0)
    assert (await rec.wait_for(a.id or 0, timeout=10)).status == JobStatus.COMPLETED


async def test_recovery_requeue_policy(make_service: ServiceFactory) -> None:
    svc = await make_service(run_worker=False)
    a = await svc.submit("demo.count", {"steps": 2, "delay_ms": 1})
    await svc.store.claim("dead-worker", 1, lease_seconds=0.01)
    await asyncio.sleep(0.05)
    rec = await make_service(recovery="requeue")
    assert [j.id for j in rec.recovered] == [a.id]
    assert (await rec.wait_for(a.id or 0, timeout=10)).status == JobStatus.COMPLETED


async def test_graceful_stop_requeues_from_checkpoint(make_service: ServiceFactory) -> None:
    svc = await make_service(shutdown_grace=5)
    job = await svc.submit("demo.count", {"steps": 30, "delay_ms": 30})
    jid = job.id
    assert jid is not None
    await wait_until(lambda: _progress_at_least(svc, jid, 3))
    await svc.stop()
    svc2 = await make_service()
    done = await svc2.wait_for(jid, timeout=15)
    assert done.status == JobStatus.COMPLETED
    assert done.result == {"steps": 30, "executions": 30}


async def test_a_stop_during_a_claim_hands_the_claimed_job_back(make_service: ServiceFactory) -> None:
    """A stop (SIGTERM) that lands while a claim is on its way: the claim commits (the job is "running" in the
    store) but its answer reaches the worker only after the stop began. The job goes back to the queue
    instead of staying "running" with nobody running it, and another process then runs it."""
    svc = await make_service(shutdown_grace=1)
    assert svc.worker is not None
    real_claim = svc.store.claim
    committed, answer = asyncio.Event(), asyncio.Event()

    async def slow_answer(*args: Any, **kwargs: Any) -> list[Job]:
        jobs = await real_claim(*args, **kwargs)
        if jobs:
            committed.set()
            await answer.wait()  # a loaded machine: the answer comes back late
        return jobs

    svc.store.claim = slow_answer  # type: ignore[method-assign]
    writer = await make_service(run_worker=False)  # another process submits (no hand-over to a free slot)
    job = await writer.submit("demo.count", {"steps": 2, "delay_ms": 1})
    svc.worker.wake()
    await asyncio.wait_for(committed.wait(), 10)
    assert (await writer.store.get(job.id or 0)).status == JobStatus.RUNNING
    stopping = asyncio.create_task(svc.stop())
    await asyncio.sleep(0.1)
    answer.set()
    await stopping
    stored = await writer.store.get(job.id or 0)
    assert stored.status == JobStatus.PENDING and stored.worker_id is None
    other = await make_service()
    assert (await other.wait_for(job.id or 0, timeout=15)).status == JobStatus.COMPLETED


async def test_lease_fencing_blocks_a_stale_worker(make_service: ServiceFactory) -> None:
    svc = await make_service(run_worker=False)
    job = await svc.submit("demo.count", {"steps": 1})
    [_claimed] = await svc.store.claim("w-old", 1, lease_seconds=0.01)
    await asyncio.sleep(0.05)
    rec = await svc.store.recover("requeue", expired_only=True)
    assert [j.id for j in rec] == [job.id]
    [again] = await svc.store.claim("w-new", 1)
    assert again.id == job.id
    # The old worker's late writes are fenced out.
    assert await svc.store.save_checkpoint(job.id or 0, "w-old", {"x": 1}) is None
    from core.store import Outcome

    res = await svc.store.finish_many([Outcome(job.id or 0, "w-old", JobStatus.COMPLETED)])
    assert res.completed_ids == set() and res.changed == []
    assert (await svc.get(job.id or 0)).worker_id == "w-new"


async def test_a_job_submitted_before_the_worker_starts_waits_for_it(make_service: ServiceFactory) -> None:
    """Before start() the worker takes nothing; once started it runs what was submitted meanwhile."""
    svc = await make_service(start=False)
    await svc.store.init()
    job = await svc.submit("demo.count", {"steps": 1, "delay_ms": 1})
    stored = await svc.store.get(job.id or 0)
    assert stored.status == JobStatus.PENDING and stored.worker_id is None
    await svc.start()
    done = await svc.wait_for(job.id or 0, timeout=10)
    assert done.status == JobStatus.COMPLETED and done.attempts == 1
