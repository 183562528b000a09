"""Several worker processes on one PostgreSQL database, next to a ``run`` process (this test process).

Real subprocesses: ``tests/integration/pg_worker.py`` (handlers that record their side effects in a file)
and the real ``progressbot worker`` CLI. The test process plays ``progressbot run``: a service without a
worker that submits, acts and watches events, as the chat adapters would.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from core.builtin import register_builtins
from core.events import JobProgressEvent
from core.models import JobStatus
from core.service import ProgressService, ServiceConfig
from core.store import NewJob
from tests.integration.pg_helpers import (
    WorkerProc,
    fresh_db,
    read_effects,
    spans,
    start_cli_worker,
    start_pg_worker,
    stop_all,
    wait_for,
    write_config,
)
from tests.integration.pg_worker import Effects, build_registry
from tests.servers.postgres import PostgresServer

pytestmark = [pytest.mark.postgres, pytest.mark.slow, pytest.mark.asyncio]


@pytest.fixture
def pg_url(postgres_server: PostgresServer) -> str:
    """A fresh database on the session's PostgreSQL server."""
    return fresh_db(postgres_server)


@pytest.fixture
def workers() -> Any:
    """Worker subprocesses started by the test; killed at teardown if still running."""
    procs: list[WorkerProc] = []
    yield procs
    stop_all(procs)


async def run_process(url: str, tmp_path: Path, **cfg: Any) -> ProgressService:
    """A started service playing ``progressbot run`` with its worker elsewhere."""
    reg = build_registry(Effects(str(tmp_path / "unused-effects")))
    cfg.setdefault("poll_interval", 0.2)
    cfg.setdefault("min_interval", 0.1)
    svc = ProgressService(ServiceConfig(database_url=url, run_worker=False, **cfg), registry=reg)
    register_builtins(reg, lambda: svc.store)
    await svc.start()
    return svc


@pytest.fixture
async def services() -> AsyncIterator[list[ProgressService]]:
    """Services started by the test; stopped at teardown."""
    started: list[ProgressService] = []
    yield started
    for svc in started:
        if svc._started:
            await svc.stop()


async def test_four_workers_run_5000_jobs_exactly_once(
    pg_url: str, tmp_path: Path, workers: list[WorkerProc], services: list[ProgressService]
) -> None:
    effects = tmp_path / "effects"
    for i in range(4):
        workers.append(start_pg_worker(pg_url, effects, tmp_path / f"w{i}.log", "--concurrency", "8"))
    ids = {w.wait_ready() for w in workers}
    assert len(ids) == 4
    svc = await run_process(pg_url, tmp_path)
    services.append(svc)
    # What the chat adapters of the run process would be shown: each job's completion, as an event.
    completed_events: set[int | str] = set()
    svc.bus.add_listener(
        lambda e: completed_events.add(e.id) if e.type == "job" and e.status == "completed" else None
    )

    n = 5000
    submitted: list[int] = []
    for i in range(0, n, 500):
        jobs = await svc.store.submit_many(
            [NewJob(type="count", payload={"i": j}) for j in range(i, i + 500)]
        )
        submitted += [j.id or 0 for j in jobs]

    async def all_done() -> bool:
        return (await svc.store.stats())["counts"]["completed"] == n

    await wait_for(all_done, timeout=240, interval=0.2, what="5000 jobs completed")

    async def all_seen() -> bool:
        return len(completed_events) >= n

    # Not one completion written by a worker process is lost on its way to the run process's monitor.
    await wait_for(all_seen, timeout=30, interval=0.1, what="every completion seen by the run process")
    assert completed_events == set(submitted)

    # The side effects, not only the statuses: each job's handler ran exactly once.
    runs = [f for f in read_effects(effects) if f[0] == "run"]
    per_job = Counter(int(f[1]) for f in runs)
    assert len(runs) == n
    assert set(per_job) == set(submitted)
    assert max(per_job.values()) == 1
    # Every worker process took part: the claims really competed.
    by_pid = Counter(int(f[2]) for f in runs)
    assert set(by_pid) <= {w.pid for w in workers}
    assert len(by_pid) >= 2, by_pid
    # And each job was claimed once (a second claim would count a second attempt).
    rows = await svc.store.list_jobs(limit=10_000)
    assert len(rows) == n
    assert {r.attempts for r in rows} == {1}
    for w in workers:
        assert w.stop() == 0, w.output()


@pytest.mark.parametrize("policy", ["requeue", "pause"])
async def test_kill9_worker_jobs_recovered_after_lease_by_policy(
    pg_url: str, tmp_path: Path, workers: list[WorkerProc], services: list[ProgressService], policy: str
) -> None:
    effects = tmp_path / "effects"
    lease = 2.0
    common = ["--lease", str(lease), "--poll", "0.1", "--recovery", policy, "--concurrency", "3"]
    victim = start_pg_worker(pg_url, effects, tmp_path / "victim.log", *common)
    workers.append(victim)
    victim.wait_ready()
    svc = await run_process(pg_url, tmp_path)
    services.append(svc)
    # The victim is alone at first, so it claims the first three; the survivor starts later.
    jobs = [await svc.submit("slow", {"steps": 10, "step_ms": 150}) for _ in range(6)]
    ids = [j.id or 0 for j in jobs]

    def victim_runs() -> set[int]:
        return {int(f[1]) for f in read_effects(effects) if f[0] == "step" and int(f[2]) == victim.pid}

    async def victim_mid_job() -> set[int]:
        # Mid-job: it has done a few steps of each job it holds.
        steps = Counter(
            int(f[1]) for f in read_effects(effects) if f[0] == "step" and int(f[2]) == victim.pid
        )
        return {j for j, c in steps.items() if c >= 3} if len(steps) >= 3 else set()

    await wait_for(victim_mid_job, timeout=30, what="victim mid-job")
    survivor = start_pg_worker(pg_url, effects, tmp_path / "survivor.log", *common)
    workers.append(survivor)
    survivor.wait_ready()
    os.kill(victim.pid, signal.SIGKILL)
    killed_at = time.monotonic_ns()
    victim.proc.wait(10)
    held = victim_runs()
    ended = {int(f[1]) for f in read_effects(effects) if f[0] == "end" and int(f[2]) == victim.pid}
    interrupted = held - ended
    assert interrupted, "the victim held no job when it was killed"

    if policy == "requeue":

        async def all_completed() -> bool:
            got = await svc.store.get_many(ids)
            return all(j.status == JobStatus.COMPLETED for j in got)

        await wait_for(all_completed, timeout=60, what="all jobs completed")
    else:

        async def interrupted_paused() -> bool:
            got = {j.id: j for j in await svc.store.get_many(list(interrupted))}
            return all(got[i].status == JobStatus.PAUSED for i in interrupted)

        await wait_for(interrupted_paused, timeout=60, what="interrupted jobs paused")
        for jid in interrupted:
            job = await svc.store.get(jid)
            assert job.interrupted and job.worker_id is None
            # Paused, not run again: nobody started it after the kill.
            assert not [
                f
                for f in read_effects(effects)
                if f[0] == "start" and int(f[1]) == jid and int(f[4]) > killed_at
            ]
            await svc.resume(jid, actor="@alice")

        async def all_completed_resuming_claimed_ahead() -> bool:
            # Jobs the victim had claimed ahead of a free slot (never started) were paused by the same
            # policy; they are resumed too, and were never run by the victim.
            for job in await svc.store.get_many(ids):
                if job.status == JobStatus.PAUSED and job.id not in interrupted:
                    assert job.interrupted and job.id not in held
                    await svc.resume(job.id or 0, actor="@alice")
            return await _all_status(svc, ids, JobStatus.COMPLETED)

        await wait_for(all_completed_resuming_claimed_ahead, timeout=60, what="all completed after resume")

    lines = read_effects(effects)
    for jid in interrupted:
        job = await svc.store.get(jid)
        # (``interrupted`` marks a job while it waits; the activity log keeps the story.)
        assert job.status == JobStatus.COMPLETED and job.attempts == 2
        # Continued from its checkpoint, by the survivor: each step's checkpoint is stored before the step
        # is recorded, so the victim's last recorded step (or the one after, whose checkpoint it stored
        # just before the kill). Not "> 0": a job killed in its first step restarts at 0, rightly.
        last_step = max(
            int(f[3]) for f in lines if f[0] == "step" and int(f[1]) == jid and int(f[2]) == victim.pid
        )
        assert job.result is not None and job.result["first"] in (last_step, last_step + 1)
        notes = [a.message for a in await svc.activity(jid, limit=50)]
        assert any("worker lease expired" in m for m in notes), notes
        restarts = [f for f in lines if f[0] == "start" and int(f[1]) == jid and int(f[2]) == survivor.pid]
        assert len(restarts) == 1 and int(restarts[0][4]) > killed_at
    # No job ran in two processes at the same time: per job, its runs' intervals do not overlap.
    runs_by_job: dict[int, list[tuple[int, int]]] = {}
    for jid, _pid, start, end in spans(lines, killed={victim.pid: killed_at}):
        runs_by_job.setdefault(jid, []).append((start, end))
    for jid, runs in runs_by_job.items():
        runs.sort()
        for (_, end_a), (start_b, _) in itertools.pairwise(runs):
            assert start_b >= end_a, f"job {jid} ran twice at once: {runs}"
    # Each job's handler finished exactly once.
    ends = Counter(int(f[1]) for f in lines if f[0] == "end")
    assert ends == Counter(ids)
    assert survivor.stop() == 0, survivor.output()


async def _all_status(svc: ProgressService, ids: list[int], status: JobStatus) -> bool:
    return all(j.status == status for j in await svc.store.get_many(ids))


async def test_stalled_worker_loses_its_lease_and_writes_nothing(
    pg_url: str, tmp_path: Path, workers: list[WorkerProc], services: list[ProgressService]
) -> None:
    """SIGSTOP (a frozen process, a lost network): its job is taken over; after SIGCONT it stops at the next
    checkpoint and none of its writes land."""
    effects = tmp_path / "effects"
    common = ["--lease", "2", "--poll", "0.1", "--recovery", "requeue", "--concurrency", "1"]
    frozen = start_pg_worker(pg_url, effects, tmp_path / "frozen.log", *common)
    workers.append(frozen)
    frozen.wait_ready()
    svc = await run_process(pg_url, tmp_path)
    services.append(svc)
    # 6 s of work: the other worker must start (seconds, on a busy machine) before the job ends, or the
    # frozen worker finishes it before it is frozen (seen once in CI with 1.8 s of work).
    job = await svc.submit("slow", {"steps": 40, "step_ms": 150})
    jid = job.id or 0

    async def frozen_stepping() -> bool:
        return sum(1 for f in read_effects(effects) if f[0] == "step" and int(f[2]) == frozen.pid) >= 2

    await wait_for(frozen_stepping, timeout=30, what="frozen worker mid-job")
    other = start_pg_worker(pg_url, effects, tmp_path / "other.log", *common)
    workers.append(other)
    other.wait_ready()
    os.kill(frozen.pid, signal.SIGSTOP)
    stopped_at = time.monotonic_ns()
    try:

        async def taken_over() -> bool:
            j = await svc.store.get(jid)
            return j.status == JobStatus.RUNNING and j.worker_id == other.worker_id

        await wait_for(taken_over, timeout=30, what="job taken over by the other worker")
    finally:
        os.kill(frozen.pid, signal.SIGCONT)
    resumed_at = time.monotonic_ns()
    done = await svc.wait_for(jid, timeout=30)
    assert done.status == JobStatus.COMPLETED and done.attempts == 2
    assert any("worker lease expired" in a.message for a in await svc.activity(jid, limit=50))
    # Give the thawed worker time to notice (its heartbeat and checkpoints), then check it did nothing.
    await asyncio.sleep(1.0)
    lines = read_effects(effects)
    late = [
        f for f in lines if f[0] in ("step", "end") and int(f[2]) == frozen.pid and int(f[-1]) > stopped_at
    ]
    assert late == [], f"the worker that lost its lease went on after SIGCONT ({resumed_at}): {late}"
    final = await svc.store.get(jid)
    assert final.status == JobStatus.COMPLETED and final.result == done.result
    assert frozen.stop() == 0 and other.stop() == 0


async def test_pause_and_cancel_from_run_reach_a_job_in_a_worker_process(
    pg_url: str, tmp_path: Path, workers: list[WorkerProc], services: list[ProgressService]
) -> None:
    cfg = write_config(tmp_path / "config.toml", pg_url)
    worker = start_cli_worker(cfg, tmp_path / "worker.log")
    workers.append(worker)
    svc = await run_process(pg_url, tmp_path)
    services.append(svc)
    statuses: list[str] = []
    svc.bus.add_listener(lambda e: statuses.append(e.status) if e.type == "job" else None)
    job = await svc.submit("demo.count", {"steps": 200, "delay_ms": 50}, owner="@alice")
    jid = job.id or 0

    async def running_there() -> bool:
        j = await svc.store.get(jid)
        return bool(
            j.worker_id and f":{worker.pid}:" in j.worker_id and (j.checkpoint or {}).get("next", 0) >= 3
        )

    await wait_for(running_there, timeout=30, what="running in the worker process")
    assert svc.worker is None  # nothing runs here: the request can only travel through the database
    res = await svc.pause(jid, actor="@alice")
    assert res.requested and res.job.status == JobStatus.RUNNING
    paused = await svc.wait_for(jid, lambda j: j.status == JobStatus.PAUSED, timeout=15)
    # Paused at a checkpoint, which the worker saved: a resume continues from there.
    assert not paused.interrupted and paused.worker_id is None
    assert paused.checkpoint is not None and 0 < paused.checkpoint["next"] < 200
    msgs = [a.message for a in await svc.activity(jid)]
    assert "pause requested by @alice" in msgs and "paused by @alice" in msgs
    await wait_for(lambda: _has(statuses, "paused"), timeout=10, what="paused event in the run process")

    await svc.resume(jid, actor="@alice")
    await wait_for(running_there, timeout=30, what="running again in the worker process")
    res = await svc.cancel(jid, actor="@bob")
    assert res.requested
    cancelled = await svc.wait_for(jid, timeout=15)
    assert cancelled.status == JobStatus.CANCELLED
    assert "cancelled by @bob" in [a.message for a in await svc.activity(jid)]
    assert worker.stop() == 0, worker.output()


async def _has(items: list[str], value: str) -> bool:
    return value in items


@pytest.mark.parametrize("notify", [True, False], ids=["notify", "polling"])
async def test_progress_from_worker_processes_reaches_a_run_subscriber(
    pg_url: str, tmp_path: Path, workers: list[WorkerProc], services: list[ProgressService], notify: bool
) -> None:
    cfg = write_config(tmp_path / "config.toml", pg_url)
    for i in range(2):
        workers.append(start_cli_worker(cfg, tmp_path / f"worker{i}.log"))
    svc = await run_process(pg_url, tmp_path, notify=notify)
    services.append(svc)
    sub = svc.subscribe()
    steps = 20
    jobs = [await svc.submit("demo.count", {"steps": steps, "delay_ms": 60}) for _ in range(3)]
    ids = {j.id for j in jobs}
    events: dict[int | str, list[JobProgressEvent]] = {i: [] for i in ids if i is not None}

    async def collect() -> None:
        async for ev in sub:
            if ev.type == "job" and ev.id in events:
                events[ev.id].append(ev)
                if all(evs and evs[-1].terminal for evs in events.values()):
                    return

    await asyncio.wait_for(collect(), 60)
    sub.close()
    worker_pids = {str(w.pid) for w in workers}
    for jid, evs in events.items():
        job = await svc.store.get(int(jid))
        assert job.worker_id is not None and job.worker_id.split(":")[-2] in worker_pids
        progress = [e.current for e in evs if e.status == "running" and e.current]
        # Intermediate progress arrived (not only the final state), in order.
        assert len(progress) >= 3, [(e.status, e.current) for e in evs]
        assert progress == sorted(progress)
        assert [e.seq for e in evs] == sorted(e.seq for e in evs)
        last = evs[-1]
        assert last.status == "completed" and last.current == steps and last.total == steps
        assert last.message == f"step {steps}/{steps}"
    if notify:
        assert svc.notifier is not None and svc.notifier.received > 0
    else:
        assert svc.notifier is None
    for w in workers:
        assert w.stop() == 0, w.output()
