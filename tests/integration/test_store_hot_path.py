"""The submit and completion hot path: what the store answers is what a later read of the row shows.

On SQLite these writes bypass SQLAlchemy's statements (prepared SQL on the driver's cursor, the stored job
built from the bound values) and share one group commit; the other paths read the rows back through
SQLAlchemy, so both must agree on every column, whichever backend runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import inspect

from core.db import Database
from core.models import Job, JobStatus, Progress
from core.store import Handoff, JobStore, NewJob, Outcome

pytestmark = pytest.mark.asyncio

PAYLOAD: dict[str, Any] = {"name": "Zoë ✓", "n": 3, "ratio": 0.25, "tags": ["a", "b"], "deep": {"x": None}}


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[JobStore]:
    db = Database(db_url)
    s = JobStore(db)
    await s.init()
    yield s
    db.close()


def _handoff(taken: list[tuple[Job | None, Job | None]]) -> Handoff:
    return Handoff("w1", 30.0, lambda inserted, claimed: taken.append((inserted, claimed)))


async def test_a_submitted_job_reads_back_as_the_store_answered(store: JobStore) -> None:
    job = await store.submit(NewJob(type="t", payload=PAYLOAD, name="import", priority=2, owner="@a"))
    again = await store.get(job.id or 0)
    assert job == again
    assert again.payload == PAYLOAD and again.status == JobStatus.PENDING and again.created_at.tzinfo
    assert [a.message for a in await store.activity(job.id or 0)] == ["submitted by @a"]


async def test_a_handed_over_job_is_claimed_in_its_insert_and_completes(store: JobStore) -> None:
    taken: list[tuple[Job | None, Job | None]] = []
    nj = NewJob(type="t", payload=PAYLOAD, handoff=_handoff(taken))
    job = await store.submit(nj)
    assert job.status == JobStatus.PENDING  # the submitter sees what it submitted
    claimed = nj.handoff.claimed if nj.handoff else None
    assert claimed is not None and taken == [(job, claimed)]
    assert claimed == await store.get(job.id or 0)
    assert (claimed.status, claimed.worker_id, claimed.attempts) == (JobStatus.RUNNING, "w1", 1)

    progress = Progress(current=4, total=4, message="done ✓", weighted_percent=100.0)
    res = await store.finish_many(
        [Outcome(job.id or 0, "w1", JobStatus.COMPLETED, result={"rows": [1, 2]}, progress=progress)]
    )
    assert res.completed_ids == {job.id}
    done = await store.get(job.id or 0)
    assert done.status == JobStatus.COMPLETED and done.result == {"rows": [1, 2]}
    assert (done.progress_current, done.progress_message, done.weighted_percent) == (4, "done ✓", 100.0)
    assert done.finished_at == res.finished_at and done.worker_id == "w1" and done.lease_until is None
    assert [a.message for a in await store.activity(job.id or 0)] == ["submitted", "completed"]


async def test_a_completion_by_a_worker_that_lost_the_job_changes_nothing(store: JobStore) -> None:
    taken: list[tuple[Job | None, Job | None]] = []
    job = await store.submit(NewJob(type="t", handoff=_handoff(taken)))
    res = await store.finish_many([Outcome(job.id or 0, "someone-else", JobStatus.COMPLETED)])
    assert res.completed_ids == set()
    assert (await store.get(job.id or 0)).status == JobStatus.RUNNING


async def test_submits_and_completions_at_once_each_get_their_own_answer(store: JobStore) -> None:
    taken: list[tuple[Job | None, Job | None]] = []
    first = [await store.submit(NewJob(type="t", handoff=_handoff(taken))) for _ in range(3)]
    outcomes = [Outcome(j.id or 0, "w1", JobStatus.COMPLETED, result=i) for i, j in enumerate(first)]
    # Issued together: on SQLite they share group commits; every caller still gets its own result.
    answers = await asyncio.gather(
        store.finish_many(outcomes[:2]),
        store.submit(NewJob(type="t", payload={"k": 1})),
        store.finish_many(outcomes[2:]),
        store.submit_many([NewJob(type="t"), NewJob(type="u")], actor="@b"),
    )
    assert answers[0].completed_ids == {first[0].id, first[1].id}
    assert answers[2].completed_ids == {first[2].id}
    assert answers[1].payload == {"k": 1} and [j.type for j in answers[3]] == ["t", "u"]
    for i, j in enumerate(first):
        stored = await store.get(j.id or 0)
        assert stored.status == JobStatus.COMPLETED and stored.result == i
    for j in [answers[1], *answers[3]]:
        assert await store.get(j.id or 0) == j


async def test_a_claimed_job_reads_back_as_the_claim_answered(store: JobStore) -> None:
    first = await store.submit(NewJob(type="t", payload=PAYLOAD, priority=1, max_attempts=3))
    other = await store.submit(NewJob(type="u", name="other"))
    assert await store.claim("w1", 5, types=["v"]) == []  # no job of that type
    [claimed] = await store.claim("w1", 5, types=["t", "v"])
    assert claimed.id == first.id and claimed == await store.get(first.id or 0)
    assert (claimed.status, claimed.worker_id, claimed.attempts) == (JobStatus.RUNNING, "w1", 1)
    assert claimed.payload == PAYLOAD and claimed.started_at and claimed.lease_until
    [rest] = await store.claim("w2", 5)  # every type
    assert rest.id == other.id and rest == await store.get(other.id or 0) and rest.worker_id == "w2"


async def test_claims_follow_priority_then_age_and_old_claim_indexes_are_replaced(db_url: str) -> None:
    """Claims take the highest priority first, then the oldest, then the lowest id; a database made before
    the claim-order index gets it at start (and loses the older ones, which only cost writes)."""
    db = Database(db_url)
    try:
        db.create_schema()
        with db.engine.begin() as conn:  # the schema as older versions left it
            conn.exec_driver_sql("DROP INDEX ix_jobs_claim_order")
            conn.exec_driver_sql("CREATE INDEX ix_jobs_claim ON jobs (status, priority, run_at)")
            conn.exec_driver_sql("CREATE INDEX ix_jobs_due ON jobs (status, priority DESC, run_at)")
        store = JobStore(db)
        await store.init()
        names = {ix["name"] for ix in inspect(db.engine).get_indexes("jobs")}
        assert "ix_jobs_claim_order" in names and not names & {"ix_jobs_due", "ix_jobs_claim"}
        now = store.now()
        specs = [(0, 0), (5, 2), (5, 1), (9, 3), (0, -1), (5, 1)]  # (priority, seconds before now)
        ids = [
            (await store.submit(NewJob(type="t", priority=p, run_at=now - timedelta(seconds=s)))).id
            for p, s in specs
        ]
        order = [j.id for j in await store.claim("w1", 2)] + [j.id for j in await store.claim("w1", 10)]
        # priority 9; then priority 5, oldest first (ties by id); then priority 0 (the one due in 1 s waits).
        assert order == [ids[3], ids[1], ids[2], ids[5], ids[0]]
    finally:
        db.close()
