"""Queue throughput, end to end (enqueue -> claim -> run -> complete) for no-op jobs.

Prints jobs/s for progressbot, Huey's SqliteHuey (a real consumer, same process run) and a raw-sqlite3
floor doing the same three statements per job with one commit each. Run:

    python bench/queue_throughput.py [--n 5000] [--concurrency 2] [--repeat 3] [--db postgresql://...|auto]

Every measurement is repeated ``--repeat`` times, the contenders taking turns (progressbot, Huey and the
floor one after the other, then again), and the median is printed: a shared 2-core VM changes speed by
a third from one minute to the next, so one figure each would compare machines, not contenders. Each
ratio is taken within a repetition (contenders measured side by side), and its median and range are
printed. The fsync floor, a reference only, runs once.

With ``--db`` it also measures PostgreSQL with 1, 2 and 4 worker processes beside one submitting process
(which runs no worker, as ``progressbot run`` beside ``progressbot worker`` processes), printed beside the
SQLite figures of the same run. ``--db auto`` starts a throw-away PostgreSQL (the test suite's fixture:
fsync off, like SQLite's WAL + synchronous=NORMAL, which does not sync each commit either). On a given
database the bench works in a schema of its own, dropped afterwards. A job counts as done when its
``completed`` row is committed; the run process's monitor must also see every completion as an event,
and how long after the last commit it did is printed as well, with the CPU time each side used.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import median
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


# ----------------------------------------------------------------------------------- PostgreSQL, N processes
PG_WORKER_COUNTS = (1, 2, 4)


def _noop_registry() -> HandlerRegistry:
    reg = HandlerRegistry()

    @reg.handler("noop")
    async def noop(ctx: JobContext, data: dict[str, Any]) -> None:
        return None

    return reg


async def _pg_worker_main(url: str, concurrency: int) -> None:
    """A worker process for the PostgreSQL bench (``--pg-worker URL``): what ``progressbot worker`` runs."""
    import signal

    svc = ProgressService(
        ServiceConfig(
            database_url=url, concurrency=concurrency, poll_interval=0.5, min_interval=0.5, watch_others=False
        ),
        registry=_noop_registry(),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await svc.start()
    print("ready", flush=True)
    await stop.wait()
    await svc.stop()


def _stat(pid: int) -> list[str]:
    """The fields of /proc/<pid>/stat after the command name (empty if the process is gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return []


def _cpu_seconds(pid: int, *, children: bool = False) -> float:
    """utime + stime of a process, from /proc (0 if it is gone); with ``children``, plus its exited
    children's (what the postmaster reaped: backends that closed during a run)."""
    fields = _stat(pid)
    if not fields:
        return 0.0
    ticks = int(fields[11]) + int(fields[12]) + (int(fields[13]) + int(fields[14]) if children else 0)
    return ticks / os.sysconf("SC_CLK_TCK")


def _server_cpu(postmaster: int | None) -> float:
    """CPU seconds of one PostgreSQL server: its postmaster and every backend, live or exited.

    Only that server's processes: other clusters on a shared machine are not ours to count. A backend that
    opens during a run counts from zero; one that closes is counted in the postmaster's children's time.
    """
    if postmaster is None:
        return 0.0
    total = _cpu_seconds(postmaster, children=True)
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and (f := _stat(int(d.name))) and int(f[1]) == postmaster:
            total += _cpu_seconds(int(d.name), children=True)
    return total


def _postmaster_of(backend_pid: int) -> int | None:
    """The postmaster of a backend running on this machine (None for a remote server)."""
    fields = _stat(backend_pid)
    try:
        comm = Path(f"/proc/{backend_pid}/comm").read_text().strip()
    except OSError:
        return None
    return int(fields[1]) if fields and comm in ("postgres", "postmaster") else None


def _with_schema(url: str, schema: str) -> str:
    """``url`` with its search_path on ``schema`` (the bench never touches the database's own tables)."""
    from sqlalchemy.engine import make_url

    u = make_url(url)
    return u.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)


def _pg_admin(url: str, statement: str) -> None:
    """Run one statement on the database of ``url`` (autocommit)."""
    import psycopg

    from core.db import make_engine, pg_connect_args

    engine = make_engine(url)
    try:
        args, kwargs = pg_connect_args(engine)
        with psycopg.connect(*args, **kwargs, autocommit=True) as conn:
            conn.execute(statement)  # type: ignore[arg-type]
    finally:
        engine.dispose()


@dataclass
class PgFigure:
    """One PostgreSQL measurement."""

    workers: int
    mode: str
    jobs_per_s: float
    monitor_lag_ms: float | None
    cpu: dict[str, float]
    n: int


def _start_pg_workers(url: str, concurrency: int, workers: int) -> list[subprocess.Popen[str]]:
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--pg-worker", url, "--concurrency", str(concurrency)],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        for _ in range(workers)
    ]
    for p in procs:
        assert p.stdout is not None
        if p.stdout.readline().strip() != "ready":
            _stop_pg_workers(procs)
            raise RuntimeError("a bench worker did not start")
    return procs


def _stop_pg_workers(procs: list[subprocess.Popen[str]]) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()


async def _create_schema(url: str) -> None:
    svc = ProgressService(ServiceConfig(database_url=url, run_worker=False), registry=_noop_registry())
    try:
        await svc.store.init()
    finally:
        svc.db.close()


async def _pg_run(url: str, n: int, procs: list[subprocess.Popen[str]], mode: str) -> PgFigure:
    """The submitter (a service without a worker, as ``progressbot run``) beside running worker processes."""
    from sqlalchemy import text

    from core.store import NewJob

    svc = ProgressService(
        ServiceConfig(database_url=url, run_worker=False, poll_interval=0.5, min_interval=0.5),
        registry=_noop_registry(),
    )
    try:
        await svc.start()
        seen = [0]
        seen_all = asyncio.Event()
        seen_at = [0.0]

        def on_event(ev: Any) -> None:
            # The run process's monitor: every completion in a worker process must reach it as an event.
            if ev.type == "job" and ev.status == "completed":
                seen[0] += 1
                if seen[0] >= n and not seen_all.is_set():
                    seen_at[0] = time.perf_counter()
                    seen_all.set()

        svc.bus.add_listener(on_event)

        # Done when no job is left pending or running: one index probe per check. (Counting the completed
        # jobs instead reads every completed row's index entry and heap tuple, 100 times a second: that
        # load grew with N and measured the bench as much as the workers.)
        any_active = text("SELECT EXISTS (SELECT 1 FROM jobs WHERE status IN ('pending', 'running'))")
        count_completed = text("SELECT count(*) FROM jobs WHERE status = 'completed'")

        def active() -> bool:
            with svc.db.engine.connect() as conn:
                return bool(conn.execute(any_active).scalar_one())

        def completed() -> int:
            with svc.db.engine.connect() as conn:
                return int(conn.execute(count_completed).scalar_one())

        def backend_pid() -> int:
            with svc.db.engine.connect() as conn:
                return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())

        postmaster = _postmaster_of(await svc.db.run(backend_pid))
        cpu0 = {
            "submitter": _cpu_seconds(os.getpid()),
            "postgres": _server_cpu(postmaster),
            **{f"worker {i}": _cpu_seconds(p.pid) for i, p in enumerate(procs)},
        }
        t0 = time.perf_counter()
        if mode == "bulk":
            for i in range(0, n, 500):
                await svc.store.submit_many([NewJob(type="noop") for _ in range(min(500, n - i))])
        else:
            producers = 16

            async def producer(count: int) -> None:
                for _ in range(count):
                    await svc.submit("noop", {})

            await asyncio.gather(*(producer(n // producers + (i < n % producers)) for i in range(producers)))
        while await svc.db.run(active):  # noqa: ASYNC110 - polling the queue is the measurement
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - t0
        done = await svc.db.run(completed)
        if done != n:
            raise RuntimeError(f"{done} of {n} jobs completed")
        cpu1 = {
            "submitter": _cpu_seconds(os.getpid()),
            "postgres": _server_cpu(postmaster),
            **{f"worker {i}": _cpu_seconds(p.pid) for i, p in enumerate(procs)},
        }
        lag: float | None = None
        try:
            await asyncio.wait_for(seen_all.wait(), 30)
            lag = max(0.0, seen_at[0] - t0 - elapsed) * 1000
        except TimeoutError:
            pass
        return PgFigure(len(procs), mode, n / elapsed, lag, {k: cpu1[k] - cpu0[k] for k in cpu0}, n)
    finally:
        if svc._started:
            await svc.stop()
        else:
            svc.db.close()


def bench_postgres(url: str, n: int, concurrency: int, repeat: int = 1) -> list[PgFigure]:
    """jobs/s on PostgreSQL with 1, 2 and 4 worker processes, each in a schema of its own; ``repeat`` rounds
    of the three, one after the other."""
    from core.db import normalize_url

    url = normalize_url(url)
    figures = []
    rounds = [(mode, w) for mode in ("16 producers", "bulk") for _ in range(repeat) for w in PG_WORKER_COUNTS]
    for mode, workers in rounds:
        schema = f"pb_bench_{os.getpid()}_{workers}_{mode[0]}"
        _pg_admin(url, f"CREATE SCHEMA {schema}")
        try:
            in_schema = _with_schema(url, schema)
            # Create the schema first, so the workers do not wait on each other's create_all at start.
            asyncio.run(_create_schema(in_schema))
            procs = _start_pg_workers(in_schema, concurrency, workers)
            try:
                figures.append(asyncio.run(_pg_run(in_schema, n, procs, mode)))
            finally:
                _stop_pg_workers(procs)
        finally:
            _pg_admin(url, f"DROP SCHEMA {schema} CASCADE")
    return figures


def print_postgres(figures: list[PgFigure], sqlite: dict[str, float], note: str) -> None:
    """The PostgreSQL figures (medians of the repetitions), beside the SQLite ones of the same run."""
    print("PostgreSQL: one submitting process (no worker, as `progressbot run`) + N worker processes;", note)
    for mode in dict.fromkeys(f.mode for f in figures):
        rounds = [[f for f in figures if f.mode == mode and f.workers == w] for w in PG_WORKER_COUNTS]
        for same in rounds:
            f = same[0]
            rate = median([g.jobs_per_s for g in same])
            lags = [g.monitor_lag_ms for g in same if g.monitor_lag_ms is not None]
            lag = "n/a" if not lags else f"{median(lags):.0f} ms"
            label = f"progressbot on PostgreSQL, {f.workers} worker proc ({f.mode})"
            per_k = {k: median([1000 * g.cpu[k] / g.n for g in same]) for k in ("submitter", "postgres")}
            # Worker processes busiest first (which one holds the claim turn changes between rounds).
            ranked = [
                sorted((v for k, v in g.cpu.items() if k.startswith("worker ")), reverse=True) for g in same
            ]
            workers = [median([1000 * r[i] / f.n for r in ranked]) for i in range(f.workers)]
            print(
                f"{label:58s} {rate:9.0f} jobs/s   {rate / sqlite[mode]:4.2f}x SQLite ({mode});"
                f" run-process monitor saw the last completion +{lag};"
                f" CPU s per 1000 jobs: submitter {per_k['submitter']:.2f},"
                f" workers {sum(workers):.2f} ({' + '.join(f'{w:.2f}' for w in workers)}),"
                f" postgres {per_k['postgres']:.2f}"
            )
        most, one = rounds[-1], rounds[0]
        print(
            f"  {mode}: {most[0].workers} worker procs vs 1, per repetition:"
            f" {_ratio_summary([m.jobs_per_s / o.jobs_per_s for m, o in zip(most, one, strict=True)])}"
        )


def _ratio_summary(ratios: list[float]) -> str:
    """ "median 1.05x (0.97x-1.12x)" for a ratio measured once per repetition."""
    if len(ratios) == 1:
        return f"{ratios[0]:.2f}x"
    return f"median {median(ratios):.2f}x ({min(ratios):.2f}x-{max(ratios):.2f}x over {len(ratios)})"


def main() -> None:
    """Run the benches and print a table."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--concurrency", type=int, default=2)
    ap.add_argument(
        "--db",
        default=None,
        help="also measure PostgreSQL with 1, 2 and 4 worker processes: a postgresql:// URL, or 'auto'",
    )
    ap.add_argument(
        "--repeat", type=int, default=3, help="rounds of every measurement, contenders taking turns (medians)"
    )
    ap.add_argument("--pg-worker", default=None, help=argparse.SUPPRESS)  # a worker process of the PG bench
    args = ap.parse_args()
    if args.pg_worker:
        asyncio.run(_pg_worker_main(args.pg_worker, args.concurrency))
        return
    repeat = max(1, args.repeat)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        print(
            f"no-op jobs end to end, N={args.n}, concurrency={args.concurrency}, cpus={os.cpu_count()},"
            f" medians of {repeat} rounds (contenders taking turns)"
        )
        raw_default = bench_raw_sqlite(tmp, args.n, wal=False)
        runs: dict[str, list[float]] = {k: [] for k in ("raw", "huey", "seq", "producers", "bulk")}
        for r in range(repeat):
            fresh = tmp / f"round-{r}"  # every contender starts from an empty database each round
            fresh.mkdir()
            runs["raw"].append(bench_raw_sqlite(fresh, args.n))
            runs["huey"].append(bench_huey(fresh, args.n, args.concurrency))
            runs["seq"].append(bench_progressbot(fresh, args.n, args.concurrency, batched_submit=False))
            runs["producers"].append(
                bench_progressbot(fresh, args.n, args.concurrency, batched_submit=False, producers=16)
            )
            runs["bulk"].append(bench_progressbot(fresh, args.n, args.concurrency, batched_submit=True))
        raw, huey = median(runs["raw"]), median(runs["huey"])
        print(f"{'raw sqlite3 floor, WAL+NORMAL (our pragmas)':44s} {raw:9.0f} jobs/s")
        print(f"{'raw sqlite3 floor, sqlite3 defaults (fsync)':44s} {raw_default:9.0f} jobs/s   (one round)")
        print(f"{'huey SqliteHuey (thread consumer)':44s} {huey:9.0f} jobs/s")
        for key, label in (
            ("seq", "progressbot (submit one by one)"),
            ("producers", "progressbot (16 concurrent producers)"),
            ("bulk", "progressbot (bulk submit)"),
        ):
            ours = runs[key]
            vs_huey = [o / h for o, h in zip(ours, runs["huey"], strict=True)]
            vs_floor = [o / f for o, f in zip(ours, runs["raw"], strict=True)]
            print(
                f"{label:44s} {median(ours):9.0f} jobs/s   {_ratio_summary(vs_huey)} huey,"
                f" {_ratio_summary(vs_floor)} WAL floor, {median(ours) / raw_default:4.2f}x default floor"
            )
        if args.db:
            sqlite = {"16 producers": median(runs["producers"]), "bulk": median(runs["bulk"])}
            if args.db == "auto":
                from tests.servers.postgres import PostgresServer

                with PostgresServer() as server:
                    figures = bench_postgres(server.url, args.n, args.concurrency, repeat)
                note = "a throw-away local server (fsync off)"
            else:
                figures = bench_postgres(args.db, args.n, args.concurrency, repeat)
                note = "the given server"
            print_postgres(figures, sqlite, note + f", concurrency {args.concurrency} per worker process")


if __name__ == "__main__":
    main()
