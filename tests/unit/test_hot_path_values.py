"""Values the per-job hot path shares or skips, and what a user still sees through them."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

from sqlalchemy.dialects import sqlite

from core.context import ProgressState
from core.db import Database, make_engine
from core.models import NO_PROGRESS, PROGRESS_COLUMNS, Progress
from core.store import JobStore, NewJob
from core.storebase import SqliteTable, jobs_t
from core.text import clean_result

REPO = Path(__file__).resolve().parents[2]


def test_a_job_that_reported_nothing_shares_the_empty_progress_and_a_report_gets_its_own() -> None:
    state = ProgressState(7, set())
    assert state.snapshot() is NO_PROGRESS
    assert Progress.of(SimpleNamespace(**dict.fromkeys(PROGRESS_COLUMNS.values()))) is NO_PROGRESS

    state.report(3, 10, "rows")
    shown = state.snapshot()
    assert shown == Progress(current=3, total=10, message="rows", weighted_percent=30.0)
    assert NO_PROGRESS == Progress()  # the shared value was not changed by anyone

    stages = ProgressState(8, set())
    stages.set_stages(["fetch", "load"])
    assert stages.snapshot() is not NO_PROGRESS and stages.snapshot().stage_count == 2


def test_a_result_of_none_stays_none_and_others_are_still_cleaned() -> None:
    assert clean_result(None) is None
    assert clean_result({"bad": float("nan")}) == {"bad": "NaN"}  # JSON has no NaN: said in words


def test_none_binds_as_sql_null_through_the_quick_adapter(tmp_path: Path) -> None:
    make_engine(f"sqlite:///{tmp_path}/a.db").dispose()
    assert (type(None), sqlite3.PrepareProtocol) in sqlite3.adapters
    conn = sqlite3.connect(":memory:")
    assert conn.execute("SELECT typeof(?), ? IS NULL", (None, None)).fetchone() == ("null", 1)
    conn.close()


def test_rows_written_on_the_hot_path_keep_sql_nulls(tmp_path: Path) -> None:
    """The store's unset columns are real NULLs (what other readers and SQL filters rely on)."""
    async def submit() -> int:
        db = Database(f"sqlite:///{tmp_path}/b.db")
        store = JobStore(db)
        await store.init()
        job = await store.submit(NewJob(type="t"))
        db.close()
        return job.id or 0

    job_id = asyncio.run(submit())
    conn = sqlite3.connect(tmp_path / "b.db")
    kinds = conn.execute(
        "SELECT typeof(name), typeof(owner), typeof(timeout), typeof(progress_total) FROM jobs WHERE id = ?",
        (job_id,),
    ).fetchone()
    conn.close()
    assert kinds == ("null", "null", "null", "null")


def _freezes_after_two_starts(tmp_path: Path, freeze: bool) -> tuple[int, int]:
    """(calls of gc.freeze, objects frozen after the first start) in a fresh process starting two services."""
    script = textwrap.dedent(
        f"""
        import asyncio, gc
        calls = []
        real_freeze = gc.freeze
        gc.freeze = lambda: calls.append(1) or real_freeze()
        from core.service import ProgressService, ServiceConfig

        async def main():
            url = "sqlite:///{tmp_path}/f{int(freeze)}.db"
            cfg = ServiceConfig(database_url=url, freeze_startup_heap={freeze})
            for i in range(2):
                svc = ProgressService(cfg)
                await svc.start()
                if i == 0:
                    frozen = gc.get_freeze_count()
                await svc.stop()
            print(len(calls), frozen)

        asyncio.run(main())
        """
    )
    run = [sys.executable, "-c", script]
    out = subprocess.run(run, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    calls, frozen = out.stdout.split()[-2:]
    return int(calls), int(frozen)


def test_the_first_service_of_a_process_freezes_the_start_up_heap_once(tmp_path: Path) -> None:
    calls, frozen = _freezes_after_two_starts(tmp_path, True)
    assert calls == 1 and frozen > 10_000  # the libraries' modules, classes and caches
    assert _freezes_after_two_starts(tmp_path, False) == (0, 0)


def test_constant_json_values_are_written_and_read_as_the_json_module_would() -> None:
    table = SqliteTable(jobs_t, sqlite.dialect())
    for value in (None, {}, {"a": [1, None]}, [], 0, "x"):
        assert json.loads(table.value("payload", value)) == value
    first, second = table.stored("payload", "{}"), table.stored("payload", "{}")
    assert first == {} and first is not second  # each reader gets its own dict to change
    assert table.stored("result", "null") is None and table.stored("result", None) is None
    assert table.stored("result", '{"rows": [1, 2]}') == {"rows": [1, 2]}
