"""PostgreSQL specifics in one process: lease fencing, concurrent schema creation, clock skew, NOTIFY."""

from __future__ import annotations

import asyncio
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import update

from core.db import Database, pg_connect_args
from core.models import JobStatus, Progress, utcnow
from core.notify import PgNotifier
from core.store import JobStore, NewJob, Outcome, ProgressWrite, jobs_t
from tests.integration.pg_helpers import fresh_db, wait_for
from tests.servers.postgres import PostgresServer

pytestmark = [pytest.mark.postgres, pytest.mark.slow, pytest.mark.asyncio]


@pytest.fixture
def pg_url(postgres_server: PostgresServer) -> str:
    """A fresh database on the session's PostgreSQL server."""
    return fresh_db(postgres_server)


@pytest.fixture
def dbs() -> Any:
    """Databases opened by the test; closed at teardown."""
    opened: list[Database] = []
    yield opened
    for db in opened:
        db.close()


def _expire(db: Database, job_id: int) -> None:
    with db.engine.begin() as conn:
        conn.execute(
            update(jobs_t).where(jobs_t.c.id == job_id).values(lease_until=utcnow() - timedelta(seconds=1))
        )


def _progress(job_id: int, current: float, worker_id: str) -> ProgressWrite:
    return ProgressWrite(job_id, Progress(current, 10, f"at {current}"), worker_id=worker_id)


async def test_a_worker_that_lost_its_lease_writes_nothing(pg_url: str, dbs: list[Database]) -> None:
    a, b = JobStore(Database(pg_url)), JobStore(Database(pg_url))
    dbs += [a.db, b.db]
    await a.init()
    job = await a.submit(NewJob(type="t"))
    jid = job.id or 0
    [claimed] = await a.claim("worker-a", 1, lease_seconds=30)
    assert claimed.worker_id == "worker-a" and claimed.lease_until is not None
    assert await a.heartbeat("worker-a", 30) == {jid: "run"}
    await a.write_progress([_progress(jid, 1, "worker-a")])
    assert (await a.get(jid)).progress_current == 1

    # The lease runs out before anyone reaps it: the worker's writes are refused already.
    await a.db.run(_expire, a.db, jid)
    assert await a.heartbeat("worker-a", 30) == {}  # not renewed: a reaper may be taking it over
    assert await a.save_checkpoint(jid, "worker-a", {"next": 5}) is None
    await a.write_progress([_progress(jid, 2, "worker-a")])
    res = await a.finish_many([Outcome(job_id=jid, worker_id="worker-a", status=JobStatus.COMPLETED)])
    assert not res.completed_ids and not res.changed
    row = await a.get(jid)
    assert row.status == JobStatus.RUNNING and row.progress_current == 1 and row.checkpoint is None

    # Another process reaps it by policy and another worker claims it.
    [recovered] = await b.recover("requeue", expired_only=True)
    assert recovered.id == jid and recovered.status == JobStatus.PENDING and recovered.interrupted
    [again] = await b.claim("worker-b", 1, lease_seconds=30)
    assert again.id == jid and again.attempts == 2
    # The old worker still cannot touch it, whatever it reports.
    for status in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.PAUSED, JobStatus.PENDING):
        res = await a.finish_many([Outcome(job_id=jid, worker_id="worker-a", status=status, error="x")])
        assert not res.completed_ids and not res.changed
    await a.write_progress([_progress(jid, 9, "worker-a")])
    assert await a.save_checkpoint(jid, "worker-a", {"next": 9}) is None
    row = await b.get(jid)
    assert row.status == JobStatus.RUNNING and row.worker_id == "worker-b" and row.progress_current == 1
    # The holder's writes apply.
    await b.write_progress([_progress(jid, 4, "worker-b")])
    res = await b.finish_many([Outcome(job_id=jid, worker_id="worker-b", status=JobStatus.COMPLETED)])
    assert res.completed_ids == {jid}
    assert (await b.get(jid)).status == JobStatus.COMPLETED


async def test_live_leases_are_not_reaped(pg_url: str, dbs: list[Database]) -> None:
    a, b = JobStore(Database(pg_url)), JobStore(Database(pg_url))
    dbs += [a.db, b.db]
    await a.init()
    await a.submit_many([NewJob(type="t") for _ in range(3)])
    claimed = await a.claim("worker-a", 3, lease_seconds=30)
    assert len(claimed) == 3
    assert await b.recover("requeue", expired_only=True) == []
    await a.db.run(_expire, a.db, claimed[0].id or 0)
    [reaped] = await b.recover("pause", expired_only=True)
    assert reaped.id == claimed[0].id and reaped.status == JobStatus.PAUSED and reaped.interrupted


async def test_schema_creation_is_safe_when_processes_start_at_once(pg_url: str, dbs: list[Database]) -> None:
    # Each thread stands for a process starting at the same moment (own engine, own connection).
    many = [Database(pg_url) for _ in range(8)]
    dbs += many
    barrier = threading.Barrier(len(many))
    errors: list[BaseException] = []

    def create(db: Database) -> None:
        barrier.wait()
        try:
            db.create_schema()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=create, args=(db,)) for db in many]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    many[0].create_schema()  # idempotent
    store = JobStore(many[1])
    assert (await store.submit(NewJob(type="t"))).id == 1


async def test_a_host_with_a_skewed_clock_keeps_its_leases(
    pg_url: str, dbs: list[Database]
) -> None:
    normal = JobStore(Database(pg_url))
    dbs.append(normal.db)
    await normal.init()
    await normal.submit(NewJob(type="t"))
    # A worker host whose clock is an hour behind: its lease would look long expired to everyone else.
    skewed = JobStore(Database(pg_url, clock=lambda: utcnow() - timedelta(hours=1)))
    dbs.append(skewed.db)
    await skewed.init()  # measures the offset to the database's clock
    assert skewed.db.clock_offset > timedelta(minutes=59)
    [job] = await skewed.claim("skewed", 1, lease_seconds=30)
    assert job.lease_until is not None and job.lease_until > utcnow()
    assert await normal.recover("requeue", expired_only=True) == []
    assert await skewed.heartbeat("skewed", 30) == {job.id: "run"}


async def test_notifier_coalesces_and_reconnects(pg_url: str, dbs: list[Database]) -> None:
    db = Database(pg_url)
    dbs.append(db)
    await JobStore(db).init()
    args = pg_connect_args(db.engine)
    sender = PgNotifier(args, origin="sender", debounce=0.05)
    listener = PgNotifier(args, origin="listener")
    heard: list[str] = []
    listener.subscribe("work", lambda: heard.append("work"))
    listener.subscribe("rows", lambda: heard.append("rows"), skip_own=True)
    await sender.start()
    await listener.start()
    try:
        assert listener.listening
        for _ in range(1000):
            sender.notify("work")
        await wait_for(lambda: _contains(heard, "work"), timeout=5, what="work heard")
        await asyncio.sleep(0.3)
        # 1,000 announcements: the first at once, the rest in one trailing NOTIFY.
        assert 1 <= sender.sent <= 3 and heard.count("work") <= 3

        # The listener's own announcements are skipped where asked.
        listener.notify("rows")
        listener.notify("work")
        n_work = heard.count("work")
        await wait_for(lambda: _count_above(heard, "work", n_work), timeout=5, what="own work heard")
        assert "rows" not in heard

        # Kill the LISTEN connection: the listener reconnects and calls its subscribers once.
        with psycopg.connect(*args[0], **args[1], autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE query LIKE 'LISTEN%%' OR query LIKE 'SELECT 1%%'"
            )
        heard.clear()
        await wait_for(lambda: _contains(heard, "rows"), timeout=15, what="subscribers called on reconnect")
        await wait_for(_is(lambda: listener.listening), timeout=15, what="listening again")
        heard.clear()
        sender.notify("rows")
        await wait_for(lambda: _contains(heard, "rows"), timeout=5, what="rows heard after reconnect")
    finally:
        await sender.stop()
        await listener.stop()


async def _contains(items: list[str], value: str) -> bool:
    return value in items


async def _count_above(items: list[str], value: str, n: int) -> bool:
    return items.count(value) > n


def _is(pred: Any) -> Any:
    async def check() -> bool:
        return bool(pred())

    return check


async def test_worker_process_mode_hosts_no_schedule_and_watches_nothing(tmp_path: Path) -> None:
    from bot.app import Application
    from bot.settings import load_settings

    cfg = tmp_path / "config.toml"
    cfg.write_text(
        '[database]\nurl = "postgresql://u@127.0.0.1:1/x"\n'
        '[[schedule]]\njob = "demo.count"\ncron = "*/5 * * * *"\n'
    )
    settings = load_settings(str(cfg))
    worker = Application(settings, with_adapters=False, with_http=False)
    assert worker.worker_only and worker.service.worker is not None
    assert not worker.service.config.watch_others and not worker.service.monitor.watch_others
    assert worker.cron.entries == []
    run = Application(settings, with_http=False)
    assert not run.worker_only and run.service.config.watch_others and len(run.cron.entries) == 1
    for app in (worker, run):
        app.service.db.close()
