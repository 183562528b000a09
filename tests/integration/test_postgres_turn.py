"""Wake-one on PostgreSQL: of several idle workers, only the holder of the claim turn answers a NOTIFY.

In-process services (each with its own pool, notifier and turn connection, as separate processes have)
on one real database. Polling, and a waiting worker's own tries for the turn, are set to an hour, so a job
that runs was claimed because of its announcement (or an announced handover), never because some worker
happened to poll.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import psycopg
import pytest

from core import notify
from core.context import JobContext
from core.db import pg_connect_args
from core.notify import ClaimTurn
from core.registry import HandlerRegistry
from core.service import ProgressService, ServiceConfig
from tests.integration.pg_helpers import fresh_db, wait_for
from tests.servers.postgres import PostgresServer

pytestmark = [pytest.mark.postgres, pytest.mark.slow, pytest.mark.asyncio]

NO_POLL = 3600.0


@pytest.fixture
def pg_url(postgres_server: PostgresServer) -> str:
    """A fresh database on the session's PostgreSQL server."""
    return fresh_db(postgres_server)


@pytest.fixture(autouse=True)
def no_turn_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Waiting workers never retry on their own: a turn given up must be announced to be taken up."""
    monkeypatch.setattr(notify, "TURN_RETRY", NO_POLL)


@pytest.fixture
async def services() -> AsyncIterator[list[ProgressService]]:
    """Services started by the test; stopped at teardown."""
    started: list[ProgressService] = []
    yield started
    for svc in reversed(started):
        if svc._started:
            await svc.stop()


class Jobs:
    """Handlers that note which worker ran each job and hold it until released."""

    def __init__(self) -> None:
        self.ran: dict[int, str] = {}
        self.release = asyncio.Event()

    def registry(self, worker: str, types: tuple[str, ...]) -> HandlerRegistry:
        """A registry serving ``types``, each job noting ``worker`` as its runner."""
        reg = HandlerRegistry()

        async def hold(ctx: JobContext, data: dict[str, Any]) -> None:
            self.ran[int(ctx.job_id)] = worker
            await self.release.wait()

        for t in types:
            reg.handler(t)(hold)
        return reg

    def ran_by(self, job_id: int) -> Callable[[], Any]:
        """A wait_for predicate: the worker that ran ``job_id``, once it did."""

        async def check() -> str | None:
            return self.ran.get(job_id)

        return check


async def start_worker(
    url: str, jobs: Jobs, name: str, services: list[ProgressService], *, types: tuple[str, ...] = ("hold",)
) -> ProgressService:
    """A started worker-only service (as ``progressbot worker``) named ``name``."""
    svc = ProgressService(
        ServiceConfig(
            database_url=url, concurrency=8, poll_interval=NO_POLL, min_interval=0.1, watch_others=False
        ),
        registry=jobs.registry(name, types),
    )
    services.append(svc)
    await svc.start()
    return svc


async def start_submitter(url: str, jobs: Jobs, services: list[ProgressService]) -> ProgressService:
    """A started service without a worker (as ``progressbot run`` beside worker processes)."""
    svc = ProgressService(
        ServiceConfig(database_url=url, run_worker=False, poll_interval=NO_POLL, min_interval=0.1),
        registry=jobs.registry("submitter", ("hold", "alpha", "beta")),
    )
    services.append(svc)
    await svc.start()
    return svc


def turn_of(svc: ProgressService) -> ClaimTurn:
    """The worker's claim turn."""
    assert svc.worker is not None and isinstance(svc.worker.turn, ClaimTurn)
    return svc.worker.turn


async def settled(workers: list[ProgressService], waiting: int) -> None:
    """Wait until one worker holds the turn and ``waiting`` others try for it."""

    async def check() -> bool:
        held = sum(turn_of(w).held for w in workers)
        return held == 1 and sum(turn_of(w).waiting for w in workers) == waiting

    await wait_for(check, timeout=30, what=f"one turn holder and {waiting} waiting")


async def settled_workers(
    url: str, jobs: Jobs, services: list[ProgressService], count: int
) -> tuple[list[ProgressService], ProgressService]:
    """``count`` workers named w0, w1... and a submitter, once one worker holds the turn and the rest wait."""
    workers = [await start_worker(url, jobs, f"w{i}", services) for i in range(count)]
    run = await start_submitter(url, jobs, services)
    await settled(workers, waiting=count - 1)
    return workers, run


def sql_on(svc: ProgressService, query: str, params: tuple[Any, ...] = ()) -> Any:
    """Run ``query`` on a connection of its own to the service's database; the first column of its row."""
    args, kwargs = pg_connect_args(svc.db.engine)
    with psycopg.connect(*args, **kwargs, autocommit=True) as conn:
        row = conn.execute(query, params).fetchone()  # type: ignore[arg-type]
    return None if row is None else row[0]


def _snapshots_older_than(svc: ProgressService, since: int) -> int:
    """How many backends (bar this one) hold a snapshot from before transaction ``since``."""
    return int(
        sql_on(
            svc,
            "SELECT count(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid()"
            " AND backend_xmin IS NOT NULL AND age(backend_xmin) >= age(%s::text::xid)",
            (str(since),),
        )
    )


async def test_only_the_turn_holder_claims_and_a_busy_holder_passes_the_turn(
    pg_url: str, services: list[ProgressService]
) -> None:
    jobs = Jobs()
    workers, run = await settled_workers(pg_url, jobs, services, 4)
    [holder] = [w for w in workers if turn_of(w).held]
    others = [w for w in workers if w is not holder]
    claims_before = {id(w): w.worker.claims_sent for w in others if w.worker is not None}

    # Eight jobs, announced one by one: the holder takes each, and its three idle peers never look.
    ids = []
    for _ in range(8):
        job = await run.submit("hold", {})
        ids.append(job.id or 0)
        await wait_for(jobs.ran_by(job.id or 0), timeout=15, what=f"job {job.id} started")
    names = {jobs.ran[i] for i in ids}
    assert len(names) == 1
    assert all(w.worker is not None and w.worker.claims_sent == claims_before[id(w)] for w in others)

    # The holder's eight slots are busy: the next job goes to the next idle worker in line.
    job = await run.submit("hold", {})
    other = await wait_for(jobs.ran_by(job.id or 0), timeout=15, what="a job on the next worker")
    assert other not in names

    jobs.release.set()
    done = await asyncio.gather(*(run.wait_for(i, timeout=30) for i in [*ids, job.id or 0]))
    assert all(j.status == "completed" for j in done)


async def test_workers_of_other_job_types_have_their_own_turn(
    pg_url: str, services: list[ProgressService]
) -> None:
    jobs = Jobs()
    alpha = await start_worker(pg_url, jobs, "alpha-worker", services, types=("alpha",))
    beta = await start_worker(pg_url, jobs, "beta-worker", services, types=("beta",))
    run = await start_submitter(pg_url, jobs, services)
    # Each holds the turn of its own job types: neither waits for the other.
    await wait_for(
        _all(lambda: turn_of(alpha).held and turn_of(beta).held), timeout=30, what="both hold their turn"
    )
    b = await run.submit("beta", {})
    a = await run.submit("alpha", {})
    assert await wait_for(jobs.ran_by(b.id or 0), timeout=15, what="beta job started") == "beta-worker"
    assert await wait_for(jobs.ran_by(a.id or 0), timeout=15, what="alpha job started") == "alpha-worker"
    jobs.release.set()


async def test_work_is_still_claimed_when_the_turn_connections_drop(
    pg_url: str, services: list[ProgressService]
) -> None:
    jobs = Jobs()
    workers, run = await settled_workers(pg_url, jobs, services, 2)
    sql_on(
        run,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE query LIKE 'SELECT pg_%%advisory%%' AND pid <> pg_backend_pid()",
    )
    # Announced while the turns are down or coming back: someone claims it all the same.
    first = await run.submit("hold", {})
    await wait_for(jobs.ran_by(first.id or 0), timeout=15, what="job started while the turn was down")
    # And the turn works again afterwards.
    await settled(workers, waiting=1)
    second = await run.submit("hold", {})
    await wait_for(jobs.ran_by(second.id or 0), timeout=15, what="job started after the reconnect")
    jobs.release.set()


async def test_workers_waiting_for_the_turn_do_not_hold_back_row_cleanup(
    pg_url: str, services: list[ProgressService]
) -> None:
    # A worker waiting for the turn must not keep a snapshot open: it would pin the xmin horizon, so the
    # row versions every claim leaves behind could never be pruned and claims would slow down with each
    # idle worker (a blocked pg_advisory_lock did that: this test fails with it).
    jobs = Jobs()
    workers, run = await settled_workers(pg_url, jobs, services, 3)
    since = int(sql_on(run, "SELECT txid_current()::text")) % 2**32

    async def released() -> bool:
        return await asyncio.to_thread(_snapshots_older_than, run, since) == 0

    await wait_for(released, timeout=15, what="no backend holding a snapshot older than the transaction")
    assert sum(turn_of(w).waiting for w in workers) == 2
    # And the waiting workers still take the turn over when the holder is busy.
    for _ in range(9):
        await run.submit("hold", {})
    await wait_for(ran_on_two_workers(jobs), timeout=15, what="jobs on two workers")
    jobs.release.set()


async def test_a_stopping_holder_hands_the_turn_on(pg_url: str, services: list[ProgressService]) -> None:
    jobs = Jobs()
    workers, run = await settled_workers(pg_url, jobs, services, 2)
    [holder] = [w for w in workers if turn_of(w).held]
    [other] = [w for w in workers if w is not holder]
    await holder.stop()
    # The other worker heard that the turn is free and took it: it answers the next announcement.
    await wait_for(_all(lambda: turn_of(other).held), timeout=15, what="the turn taken over")
    job = await run.submit("hold", {})
    ran_on = await wait_for(jobs.ran_by(job.id or 0), timeout=15, what="job started")
    assert ran_on == f"w{workers.index(other)}"
    jobs.release.set()


def ran_on_two_workers(jobs: Jobs) -> Callable[[], Any]:
    """A wait_for predicate: jobs ran on at least two workers."""

    async def check() -> bool:
        return len(set(jobs.ran.values())) >= 2

    return check


def _all(pred: Callable[[], bool]) -> Callable[[], Any]:
    async def check() -> bool:
        return bool(pred())

    return check
