"""The store against a clock the test moves: leases, backoff and cleanup without sleeping."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from core.db import Database
from core.models import JobStatus, utcnow
from core.store import JobStore, NewJob, Outcome


class Clock:
    """A wall clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = utcnow()

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def store(tmp_path: Path, clock: Clock) -> AsyncIterator[JobStore]:
    db = Database(f"sqlite:///{tmp_path}/clock.db", clock=clock)
    s = JobStore(db, retry_backoff=10.0, retry_backoff_max=60.0)
    await s.init()
    yield s
    db.close()


async def test_a_lease_expires_only_when_its_time_has_passed(store: JobStore, clock: Clock) -> None:
    [job] = await store.submit_many([NewJob(type="t")])
    jid = job.id or 0
    [claimed] = await store.claim("w1", 1, lease_seconds=30)
    assert claimed.id == jid
    clock.advance(29)
    assert await store.recover("requeue", expired_only=True) == []  # still within the lease
    assert await store.heartbeat("w1", 30) == {jid: "run"}  # renewed: 30 s from now
    clock.advance(29)
    assert await store.recover("requeue", expired_only=True) == []
    clock.advance(2)  # 31 s after the last renewal
    [recovered] = await store.recover("requeue", expired_only=True)
    assert recovered.id == jid and recovered.status == JobStatus.PENDING and recovered.interrupted
    # The run that lost its worker ended: the next one is a new attempt, by another worker.
    [again] = await store.claim("w2", 1, lease_seconds=30)
    assert again.id == jid and again.worker_id == "w2" and again.attempts == 2
    # The first worker's late outcome is fenced out.
    late = await store.finish_many([Outcome(job_id=jid, worker_id="w1", status=JobStatus.COMPLETED)])
    assert not late.completed_ids and (await store.get(jid)).worker_id == "w2"


async def test_a_failed_attempt_waits_its_backoff_before_it_can_be_claimed(
    store: JobStore, clock: Clock
) -> None:
    [job] = await store.submit_many([NewJob(type="t", max_attempts=3)])
    jid = job.id or 0
    await store.claim("w", 1)
    await store.finish_many([Outcome(job_id=jid, worker_id="w", status=JobStatus.FAILED, error="boom")])
    retried = await store.get(jid)
    assert retried.status == JobStatus.PENDING and retried.attempts == 2
    clock.advance(9.9)  # the first backoff is 10 s
    assert await store.claim("w", 1) == []
    clock.advance(0.2)
    [again] = await store.claim("w", 1)
    assert again.id == jid and again.attempts == 2
    await store.finish_many([Outcome(job_id=jid, worker_id="w", status=JobStatus.FAILED, error="boom")])
    clock.advance(19.9)  # doubled: 20 s
    assert await store.claim("w", 1) == []
    clock.advance(0.2)
    assert [j.id for j in await store.claim("w", 1)] == [jid]


async def test_cleanup_deletes_only_jobs_finished_long_enough_ago(store: JobStore, clock: Clock) -> None:
    old, recent = await store.submit_many([NewJob(type="t"), NewJob(type="t")])
    await store.claim("w", 1)
    await store.finish_many([Outcome(job_id=old.id or 0, worker_id="w", status=JobStatus.COMPLETED)])
    clock.advance(2 * 86400)
    await store.claim("w", 1)
    await store.finish_many([Outcome(job_id=recent.id or 0, worker_id="w", status=JobStatus.COMPLETED)])
    clock.advance(3600)
    assert await store.cleanup(older_than_days=1) == 1
    assert [j.id for j in await store.get_many([old.id or 0, recent.id or 0])] == [recent.id]
