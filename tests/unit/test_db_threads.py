"""The database threads (core.db.Database.run): answers, errors, cancellation and closing."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.db import Database

pytestmark = pytest.mark.asyncio


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    """A SQLite database (one database thread), closed at teardown."""
    database = Database(f"sqlite:///{tmp_path / 'x.db'}")
    yield database
    database.close()


async def test_a_call_runs_off_the_loop_and_its_answer_or_error_comes_back(db: Database) -> None:
    loop_thread = threading.get_ident()
    assert await db.run(lambda a, b=0: (threading.get_ident() != loop_thread, a + b), 1, b=2) == (True, 3)

    def broken() -> None:
        raise ValueError("no such row")

    with pytest.raises(ValueError, match="no such row"):
        await db.run(broken)


async def test_a_call_whose_caller_was_cancelled_before_it_started_never_runs(db: Database) -> None:
    gate = threading.Event()
    ran: list[str] = []
    blocker = asyncio.ensure_future(db.run(gate.wait, 10))
    queued = asyncio.ensure_future(db.run(ran.append, "claimed"))
    await asyncio.sleep(0.05)
    queued.cancel()
    gate.set()
    assert await blocker is True
    with pytest.raises(asyncio.CancelledError):
        await queued
    await db.run(lambda: None)  # everything queued before it has been handled
    assert ran == []


async def test_a_started_call_finishes_though_its_caller_is_cancelled(db: Database) -> None:
    started, gate = threading.Event(), threading.Event()
    done: list[str] = []

    def work() -> None:
        started.set()
        gate.wait(10)
        done.append("written")

    call = asyncio.ensure_future(db.run(work))
    await asyncio.to_thread(started.wait, 10)
    call.cancel()
    gate.set()
    with pytest.raises(asyncio.CancelledError):
        await call
    await db.run(lambda: None)
    assert done == ["written"]


async def test_close_runs_what_is_queued_and_later_calls_are_refused(tmp_path: Path) -> None:
    database = Database(f"sqlite:///{tmp_path / 'y.db'}")
    ran: list[int] = []
    calls = [asyncio.ensure_future(database.run(ran.append, i)) for i in range(5)]
    await asyncio.sleep(0)  # queued
    await asyncio.to_thread(database.close)
    await asyncio.gather(*calls)
    assert ran == [0, 1, 2, 3, 4]
    with pytest.raises(RuntimeError, match="closed"):
        await database.run(ran.append, 5)
