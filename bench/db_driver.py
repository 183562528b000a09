"""Which way to keep SQLite off the event loop is faster: a sync engine in a dedicated thread (what
progressbot uses), or SQLAlchemy's async engine over aiosqlite?

Both run the same Core statements for a submit -> claim -> complete cycle, awaited from asyncio, with
the same pragmas. Prints cycles/s for each, sequential and with 16 concurrent callers.

    python bench/db_driver.py [--n 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

# bench/http.py would shadow the standard library's http module: drop this folder from the path.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from sqlalchemy import event, insert, select, update
from sqlalchemy.ext.asyncio import create_async_engine

from core.db import Database
from core.models import JobStatus, utcnow
from core.store import jobs_t

Cycle = Callable[[], Awaitable[None]]


def _values() -> dict[str, Any]:
    now = utcnow()
    return {
        "type": "noop",
        "kind": "queued",
        "payload": {},
        "status": JobStatus.PENDING,
        "control": "run",
        "priority": 0,
        "run_at": now,
        "attempts": 0,
        "max_attempts": 1,
        "interrupted": False,
        "created_at": now,
        "updated_at": now,
    }


def _sync_cycle(db: Database) -> None:
    with db.engine.begin() as conn:
        jid = conn.execute(insert(jobs_t).values(**_values()).returning(jobs_t.c.id)).scalar_one()
    with db.engine.begin() as conn:
        conn.execute(update(jobs_t).where(jobs_t.c.id == jid).values(status=JobStatus.RUNNING))
    with db.engine.begin() as conn:
        conn.execute(update(jobs_t).where(jobs_t.c.id == jid).values(status=JobStatus.COMPLETED))


async def run_threaded(path: Path, n: int, callers: int) -> float:
    """The sync engine in progressbot's single DB thread."""
    db = Database(f"sqlite:///{path}")
    db.create_schema()

    async def cycle() -> None:
        await db.run(_sync_cycle, db)

    rate = await _drive(cycle, n, callers)
    db.close()
    return rate


async def run_aiosqlite(path: Path, n: int, callers: int) -> float:
    """SQLAlchemy's AsyncEngine over aiosqlite."""
    sync_db = Database(f"sqlite:///{path}")
    sync_db.create_schema()
    sync_db.close()
    engine = create_async_engine(f"sqlite+aiosqlite:///{path}", connect_args={"timeout": 10})

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_conn: Any, _rec: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=10000")
        cur.close()

    lock = asyncio.Lock()  # one writer at a time, as SQLite needs (avoids busy-retry storms)

    async def cycle() -> None:
        async with lock, engine.begin() as conn:
            jid = (await conn.execute(insert(jobs_t).values(**_values()).returning(jobs_t.c.id))).scalar_one()
        async with lock, engine.begin() as conn:
            await conn.execute(update(jobs_t).where(jobs_t.c.id == jid).values(status=JobStatus.RUNNING))
        async with lock, engine.begin() as conn:
            await conn.execute(update(jobs_t).where(jobs_t.c.id == jid).values(status=JobStatus.COMPLETED))

    rate = await _drive(cycle, n, callers)
    async with engine.connect() as conn:
        done = (await conn.execute(select(jobs_t.c.id).where(jobs_t.c.status == JobStatus.COMPLETED))).all()
        assert len(done) == n
    await engine.dispose()
    return rate


async def _drive(cycle: Cycle, n: int, callers: int) -> float:
    async def caller(count: int) -> None:
        for _ in range(count):
            await cycle()

    t0 = time.perf_counter()
    await asyncio.gather(*(caller(n // callers + (i < n % callers)) for i in range(callers)))
    return n / (time.perf_counter() - t0)


def main() -> None:
    """Run both drivers, sequential and concurrent, and print cycles/s."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=3000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for callers in (1, 16):
            t = asyncio.run(run_threaded(tmp / f"t{callers}.db", args.n, callers))
            a = asyncio.run(run_aiosqlite(tmp / f"a{callers}.db", args.n, callers))
            print(
                f"{callers:2d} caller(s): sync engine in a DB thread {t:7.0f} cycles/s | "
                f"async engine + aiosqlite {a:7.0f} cycles/s | thread/aiosqlite = {t / a:4.2f}x"
            )


if __name__ == "__main__":
    main()
