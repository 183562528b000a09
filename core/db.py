"""Engine creation and the thread that runs blocking database work off the event loop.

SQLite gets WAL, a busy timeout and ``BEGIN IMMEDIATE`` transactions (so a read-then-write transaction
never dead-ends on a lock upgrade). All database calls of one process go through :class:`Database`, which
runs them in a dedicated executor: one thread for SQLite (SQLite has one writer anyway, and a single thread
avoids lock contention inside the process), a small pool for PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool
from sqlmodel import SQLModel

from . import models  # noqa: F401 - registers the tables on SQLModel.metadata

T = TypeVar("T")

DEFAULT_URL = "sqlite:///progressbot.db"


def normalize_url(url: str) -> str:
    """Accept ``postgresql://`` and ``postgres://`` as psycopg 3 URLs; leave other URLs as they are."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    if url.startswith("postgresql+asyncpg://"):
        # The engine is synchronous (run in threads); asyncpg is async-only, so use psycopg for it.
        url = "postgresql+psycopg://" + url[len("postgresql+asyncpg://") :]
    return url


def is_sqlite_url(url: str) -> bool:
    """Whether the URL names a SQLite database."""
    return make_url(normalize_url(url)).get_backend_name() == "sqlite"


def make_engine(url: str, busy_timeout_ms: int = 10_000, pool_size: int = 8) -> Engine:
    """Create the synchronous SQLAlchemy engine for ``url`` with the pragmas and options we rely on."""
    url = normalize_url(url)
    if is_sqlite_url(url):
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": busy_timeout_ms / 1000},
            # A fresh connection per checkout would re-run the pragmas; keep a small pool instead.
            pool_size=4,
            max_overflow=4,
        )

        @event.listens_for(engine, "connect")
        def _sqlite_on_connect(dbapi_conn: Any, _record: Any) -> None:
            # Let SQLAlchemy's "begin" event below decide how transactions start.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    if url.startswith("postgresql"):
        return create_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)
    return create_engine(url, poolclass=NullPool)


def create_schema(engine: Engine) -> None:
    """Create every table that does not exist yet (idempotent; safe on every start)."""
    SQLModel.metadata.create_all(engine)


class Database:
    """An engine plus the executor that runs blocking database calls for the event loop."""

    def __init__(self, url: str = DEFAULT_URL, *, busy_timeout_ms: int = 10_000) -> None:
        self.url = normalize_url(url)
        self.is_sqlite = is_sqlite_url(self.url)
        threads = 1 if self.is_sqlite else 4
        self.engine = make_engine(self.url, busy_timeout_ms=busy_timeout_ms, pool_size=threads + 2)
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="progressbot-db")
        self._closed = False

    def create_schema(self) -> None:
        """Create the schema (blocking; call through :meth:`run` from async code)."""
        create_schema(self.engine)

    async def run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` in the database executor and await its result."""
        loop = asyncio.get_running_loop()
        ctx = contextvars.copy_context()
        call = functools.partial(ctx.run, fn, *args, **kwargs)
        return await loop.run_in_executor(self._executor, call)

    def close(self) -> None:
        """Stop the executor (waiting for running calls) and dispose of the engine."""
        if self._closed:
            return
        self._closed = True
        self._executor.shutdown(wait=True)
        self.engine.dispose()
