"""Queue throughput, end to end (enqueue -> claim -> run -> complete) for no-op jobs.

Prints jobs/s for progressbot, Huey's SqliteHuey (a real consumer, same process run) and a raw-sqlite3
floor doing the same three statements per job with one commit each. Run:

    python bench/queue_throughput.py [--n 5000] [--concurrency 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.context import JobContext
from core.registry import HandlerRegistry
from core.service import ProgressService, ServiceConfig


async def _progressbot(
    url: str, n: int, concurrency: int, *, batched_submit: bool, producers: int = 1
) -> float:
    reg = HandlerRegistry()

    @reg.handler("noop")
    async def noop(ctx: JobContext, data: dict[str, Any]) -> None:
        return None

    svc = ProgressService(
        ServiceConfig(database_url=url, concurrency=concurrency, poll_interval=0.5, min_interval=0.5),
        registry=reg,
    )
    await svc.start()
    worker = svc.worker
    assert worker is not None
    t0 = time.perf_counter()
    if batched_submit:
        from core.service import JobRequest

        for i in range(0, n, 500):
            # A batch-less bulk insert: submit_many via the store keeps one transaction per 500 jobs.
            from core.store import NewJob

            await svc.store.submit_many([NewJob(type="noop") for _ in range(min(500, n - i))])
            worker.wake()
        del JobRequest
    elif producers > 1:

        async def producer(count: int) -> None:
            for _ in range(count):
                await svc.submit("noop", {})

        await asyncio.gather(*(producer(n // producers + (i < n % producers)) for i in range(producers)))
    else:
        for _ in range(n):
            await svc.submit("noop", {})
    while worker.completed_count < n:  # noqa: ASYNC110 - polling a counter is the measurement
        await asyncio.sleep(0.005)
    elapsed = time.perf_counter() - t0
    await svc.stop()
    return n / elapsed


def bench_progressbot(
    tmp: Path, n: int, concurrency: int, *, batched_submit: bool, db: str | None = None, producers: int = 1
) -> float:
    """jobs/s for progressbot on SQLite (or the given URL)."""
    url = db or f"sqlite:///{tmp}/pb-{'b' if batched_submit else 's'}{producers}.db"
    return asyncio.run(_progressbot(url, n, concurrency, batched_submit=batched_submit, producers=producers))


def bench_huey(tmp: Path, n: int, concurrency: int) -> float:
    """jobs/s for Huey's SqliteHuey with a real thread consumer."""
    from huey import SqliteHuey
    from huey.signals import SIGNAL_COMPLETE

    huey = SqliteHuey(filename=str(tmp / "huey.db"), results=True)
    done = threading.Event()
    count = [0]
    lock = threading.Lock()

    @huey.task()
    def noop() -> None:
        return None

    @huey.signal(SIGNAL_COMPLETE)
    def on_complete(signal: Any, task: Any, *args: Any, **kwargs: Any) -> None:
        with lock:
            count[0] += 1
            if count[0] >= n:
                done.set()

    consumer = huey.create_consumer(
        workers=concurrency,
        worker_type="thread",
        periodic=False,
        initial_delay=0.001,
        max_delay=0.01,
        check_worker_health=False,
    )
    import logging

    logging.getLogger("huey").setLevel(logging.ERROR)
    t0 = time.perf_counter()
    consumer_thread = threading.Thread(target=consumer.run, daemon=True)
    # consumer.run installs signal handlers, which only works on the main thread; start() does not.
    consumer.start()
    for _ in range(n):
        noop()
    done.wait(600)
    elapsed = time.perf_counter() - t0
    consumer.stop(graceful=True)
    del consumer_thread
    return n / elapsed


def bench_raw_sqlite(tmp: Path, n: int, *, wal: bool = True) -> float:
    """The floor: INSERT, claim UPDATE, complete UPDATE per job, one commit each, raw sqlite3.

    ``wal`` uses our pragmas (WAL, synchronous=NORMAL); otherwise sqlite3's defaults (rollback journal,
    synchronous=FULL: an fsync per commit).
    """
    conn = sqlite3.connect(str(tmp / f"raw-{wal}.db"), isolation_level=None)
    if wal:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(
        "CREATE TABLE jobs (id INTEGER PRIMARY KEY, type TEXT, payload TEXT, status TEXT,"
        " priority INT, run_at REAL)"
    )
    conn.execute("CREATE INDEX ix ON jobs(status, priority, run_at)")
    t0 = time.perf_counter()
    for _ in range(n):
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "INSERT INTO jobs(type, payload, status, priority, run_at)"
            " VALUES ('noop', '{}', 'pending', 0, ?)",
            (time.time(),),
        )
        conn.execute("COMMIT")
        conn.execute("BEGIN IMMEDIATE")
        row = conn.execute(
            "UPDATE jobs SET status='running' WHERE id = (SELECT id FROM jobs WHERE status='pending' "
            "ORDER BY priority DESC, run_at LIMIT 1) RETURNING id"
        ).fetchone()
        conn.execute("COMMIT")
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("UPDATE jobs SET status='completed' WHERE id=?", (row[0],))
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - t0
    conn.close()
    return n / elapsed


def main() -> None:
    """Run the benches and print a table."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument("--db", default=None, help="also run progressbot against this database URL")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        print(f"no-op jobs end to end, N={args.n}, concurrency={args.concurrency}, cpus={os.cpu_count()}")
        raw = bench_raw_sqlite(tmp, args.n)
        raw_default = bench_raw_sqlite(tmp, args.n, wal=False)
        huey = bench_huey(tmp, args.n, args.concurrency)
        pb = bench_progressbot(tmp, args.n, args.concurrency, batched_submit=False)
        pb_c = bench_progressbot(tmp, args.n, args.concurrency, batched_submit=False, producers=16)
        pb_b = bench_progressbot(tmp, args.n, args.concurrency, batched_submit=True)
        print(f"{'raw sqlite3 floor, WAL+NORMAL (our pragmas)':44s} {raw:9.0f} jobs/s")
        print(f"{'raw sqlite3 floor, sqlite3 defaults (fsync)':44s} {raw_default:9.0f} jobs/s")
        print(f"{'huey SqliteHuey (thread consumer)':44s} {huey:9.0f} jobs/s")
        print(
            f"{'progressbot (submit one by one)':44s} {pb:9.0f} jobs/s"
            f"   {pb / huey:4.2f}x huey, {pb / raw:4.2f}x WAL floor,"
            f" {pb / raw_default:4.2f}x default floor"
        )
        print(
            f"{'progressbot (16 concurrent producers)':44s} {pb_c:9.0f} jobs/s"
            f"   {pb_c / huey:4.2f}x huey, {pb_c / raw:4.2f}x WAL floor,"
            f" {pb_c / raw_default:4.2f}x default floor"
        )
        print(
            f"{'progressbot (bulk submit)':44s} {pb_b:9.0f} jobs/s"
            f"   {pb_b / huey:4.2f}x huey, {pb_b / raw:4.2f}x WAL floor,"
            f" {pb_b / raw_default:4.2f}x default floor"
        )
        if args.db:
            other = bench_progressbot(tmp, args.n, args.concurrency, batched_submit=False, db=args.db)
            print(f"{'progressbot on ' + args.db.split('://')[0]:44s} {other:9.0f} jobs/s")


if __name__ == "__main__":
    main()
