"""The lifecycle table: every legal transition, and every illegal one with its error text."""

from __future__ import annotations

import asyncio
import contextlib
import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.db import Database
from core.errors import IllegalTransition
from core.lifecycle import ACTION_FROM, RULES, TRANSITIONS, Action, check_action, is_legal
from core.models import JobKind
from core.models import JobStatus as S
from core.store import JobStore, NewJob, Outcome

LEGAL = {
    (S.PENDING, S.RUNNING),
    (S.PENDING, S.PAUSED),
    (S.PENDING, S.CANCELLED),
    (S.RUNNING, S.COMPLETED),
    (S.RUNNING, S.FAILED),
    (S.RUNNING, S.CANCELLED),
    (S.RUNNING, S.PAUSED),
    (S.RUNNING, S.PENDING),
    (S.PAUSED, S.PENDING),
    (S.PAUSED, S.RUNNING),  # a tracked job resumes running: its own program runs it, not a queue
    (S.PAUSED, S.CANCELLED),
    (S.FAILED, S.PENDING),
    (S.CANCELLED, S.PENDING),
    # A tracked job's program reports its end from outside, also before any progress or while paused.
    (S.PENDING, S.COMPLETED),
    (S.PENDING, S.FAILED),
    (S.PAUSED, S.COMPLETED),
    (S.PAUSED, S.FAILED),
}


@pytest.mark.parametrize("pair", list(itertools.product(list(S), list(S))))
def test_transition_table(pair: tuple[S, S]) -> None:
    assert is_legal(*pair) == (pair in LEGAL)


def test_table_matches_spec() -> None:
    assert set(TRANSITIONS) == LEGAL


EXPECTED_ACTIONS = {
    "pause": {S.PENDING, S.RUNNING},
    "resume": {S.PAUSED},
    "cancel": {S.PENDING, S.RUNNING, S.PAUSED},
    "retry": {S.FAILED, S.CANCELLED},
}
WORD = {"pause": "paused", "resume": "resumed", "cancel": "cancelled", "retry": "retried"}


@pytest.mark.parametrize(("action", "status"), list(itertools.product(EXPECTED_ACTIONS, list(S))))
def test_actions(action: str, status: S) -> None:
    assert set(ACTION_FROM[action]) == EXPECTED_ACTIONS[action]
    if status in EXPECTED_ACTIONS[action]:
        check_action(12, status, action)
    else:
        with pytest.raises(IllegalTransition) as exc:
            check_action(12, status, action)
        assert str(exc.value) == f"Job #12 is {status}; it can't be {WORD[action]}"


# ------------------------------------------------------------------ the store executes the table
# Steps: the user actions, plus what moves a job on by itself (a worker's claim and outcomes for a queued job;
# the outside program's reports for a tracked one).
USER_STEPS = [str(a) for a in Action]
OWN_STEPS = ["start", "complete", "fail", "stop_paused", "stop_cancelled"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    kind=st.sampled_from([JobKind.QUEUED, JobKind.TRACKED]),
    steps=st.lists(st.sampled_from(USER_STEPS + OWN_STEPS), min_size=1, max_size=14),
)
def test_store_follows_the_table_for_random_action_sequences(
    tmp_path_factory: pytest.TempPathFactory, kind: JobKind, steps: list[str]
) -> None:
    """Whatever the order of actions, the store does exactly what RULES says, refuses what it lacks, and
    every status change it makes is in TRANSITIONS."""
    url = f"sqlite:///{tmp_path_factory.mktemp('lifecycle')}/l.db"
    asyncio.run(_run_steps(url, kind, steps))


async def _run_steps(url: str, kind: JobKind, steps: list[str]) -> None:
    db = Database(url)
    store = JobStore(db)
    try:
        await store.init()
        [job] = await store.submit_many([NewJob(type="t", kind=kind, max_attempts=1)])
        jid = job.id or 0
        for step in steps:
            before = await store.get(jid)
            if step in USER_STEPS:
                expected = RULES.get((Action(step), kind, S(before.status)))
                if expected is not None and expected.refused_while == before.control:
                    expected = None
                if expected is None:
                    with pytest.raises(IllegalTransition):
                        await store.act(jid, step, actor="@u")
                    after = await store.get(jid)
                    assert (after.status, after.control) == (before.status, before.control), step
                    continue
                res = await store.act(jid, step, actor="@u")
                assert res.requested == expected.requested
                assert res.job.status == (expected.status or before.status), (step, before.status)
                assert res.job.control == expected.control
                if expected.fresh_run:
                    assert res.job.attempts == 0 and res.job.error is None
            else:
                await _own_step(store, jid, kind, step)
            after = await store.get(jid)
            if after.status != before.status:
                assert (S(before.status), S(after.status)) in TRANSITIONS, (step, before.status, after.status)
    finally:
        db.close()


async def _own_step(store: JobStore, jid: int, kind: JobKind, step: str) -> None:
    """What the job's runner does: a worker for a queued job, the outside program for a tracked one."""
    if kind == JobKind.TRACKED:
        if step == "start":
            await store.tracked_update(jid, current=1)
        elif step in ("complete", "fail"):
            with contextlib.suppress(IllegalTransition):  # a finished job can't finish again
                await store.tracked_finish(jid, S.COMPLETED if step == "complete" else S.FAILED, error="x")
        return
    if step == "start":
        await store.claim("w", 1)
        return
    status = {
        "complete": S.COMPLETED,
        "fail": S.FAILED,
        "stop_paused": S.PAUSED,
        "stop_cancelled": S.CANCELLED,
    }[step]
    # Fenced: only a job running under this worker changes.
    await store.finish_many([Outcome(job_id=jid, worker_id="w", status=status, error="x")])
