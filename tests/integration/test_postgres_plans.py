"""PostgreSQL: the claim, the heartbeat and the monitor's poll read what they need through an index, whatever
the table's statistics say.

A table that was never analyzed (a new deployment, the first minute of a burst) makes the planner guess:
it expected one pending job, so each claim sorted every pending job (6.9 ms against 0.9 ms with 16,566
queued) and then matched every pending job against the picked ids (15-25 ms per claim in the bulk bench),
each heartbeat matched every running job against its own (half a second with 20,000 jobs in the table),
and each poll read the whole table. These tests run the statements the store sends, as it
sends them, under EXPLAIN on such a table.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from sqlalchemy import event

from core.db import Database, pg_connect_args
from core.store import JobStore, NewJob
from tests.integration.pg_helpers import fresh_db
from tests.servers.postgres import PostgresServer

pytestmark = [pytest.mark.postgres, pytest.mark.slow, pytest.mark.asyncio]

QUEUED = 3000


@pytest.fixture
def pg_url(postgres_server: PostgresServer) -> str:
    """A fresh database on the session's PostgreSQL server."""
    return fresh_db(postgres_server)


@pytest.fixture
def db(pg_url: str) -> Iterator[Database]:
    database = Database(pg_url)
    yield database
    database.close()


def _connect(db: Database) -> psycopg.Connection[Any]:
    """A plain psycopg connection to the store's database, outside its pool."""
    args, kwargs = pg_connect_args(db.engine)
    return psycopg.connect(*args, **kwargs)


def _plan(db: Database, statements: list[tuple[str, Any]]) -> str:
    """EXPLAIN ANALYZE of the last of ``statements`` (SQL and parameters as sent), after the ones before it,
    in one transaction that is rolled back."""
    *before, (last, params) = statements
    with _connect(db) as conn:
        for sql, p in before:
            conn.execute(sql, p)
        plan = "\n".join(row[0] for row in conn.execute("EXPLAIN ANALYZE " + last, params))
        conn.rollback()
    return plan


async def test_claims_and_polls_use_their_index_on_a_table_never_analyzed(db: Database) -> None:
    store = JobStore(db)
    await store.init()
    for _ in range(QUEUED // 500):
        await store.submit_many([NewJob(type="t") for _ in range(500)])
    for _ in range(10):
        await store.claim("w1", 34, types=["t"])  # claimed rows leave their old entries at the index's front
    sent: list[tuple[str, Any]] = []

    def record(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, many: bool) -> None:
        sent.append((statement, parameters))

    event.listen(db.engine, "before_cursor_execute", record)
    claimed = await store.claim("w2", 34, types=["t"])
    claim = [s for s in sent if "FOR UPDATE SKIP LOCKED" in s[0]]
    sent.clear()
    leases = await store.heartbeat("w2", 30.0)
    heartbeat = [s for s in sent if "lease_until" in s[0]]
    sent.clear()
    changed = await store.changed_since(store.now(), others_only=False)
    event.remove(db.engine, "before_cursor_execute", record)
    assert len(claimed) == 34 and changed == [] and sorted(leases) == sorted(j.id for j in claimed)

    with _connect(db) as conn:
        stats = "SELECT last_analyze, last_autoanalyze FROM pg_stat_user_tables WHERE relname = 'jobs'"
        assert conn.execute(stats).fetchone() == (None, None)  # the planner has no statistics to go by

    claim_plan = _plan(db, claim)
    # The pick reads the claim order's first entries; the update finds the picked rows by their key.
    assert claim_plan.count("ix_jobs_claim_order") == 1 and "Sort" not in claim_plan, claim_plan
    assert "Index Scan using jobs_pkey" in claim_plan, claim_plan
    heartbeat_plan = _plan(db, heartbeat)  # the locked rows are found by their key too
    assert "Index Scan using jobs_pkey" in heartbeat_plan and "Seq Scan" not in heartbeat_plan, heartbeat_plan
    assert heartbeat_plan.count("ix_jobs_claim_order") <= 1, heartbeat_plan
    poll_plan = _plan(db, sent)  # the poll's SET LOCAL, then its SELECT
    assert "ix_jobs_updated" in poll_plan and "Seq Scan" not in poll_plan, poll_plan
