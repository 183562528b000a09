"""Engine creation and the thread that runs blocking database work off the event loop.

SQLite gets WAL, a busy timeout and ``BEGIN IMMEDIATE`` transactions (so a read-then-write transaction
never dead-ends on a lock upgrade). All database calls of one process go through :class:`Database`, which
runs them in a dedicated executor: one thread for SQLite (SQLite has one writer anyway, and a single thread
avoids lock contention inside the process), a small pool for PostgreSQL.
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool
from sqlmodel import SQLModel

from . import models  # noqa: F401 - registers the tables on SQLModel.metadata
from .models import utcnow
from .packaging import require_extra

T = TypeVar("T")

DEFAULT_URL = "sqlite:///progressbot.db"

#: Key of the PostgreSQL advisory lock that serialises schema creation across processes ("pbschema").
SCHEMA_LOCK_KEY = 0x7062736368656D61


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


#: PostgreSQL ends a session idle inside a transaction for longer than this (ms), releasing its locks.
IDLE_IN_TRANSACTION_MS = 10_000


def _bind_null(value: None) -> None:
    """sqlite3's adapter for None: None itself, which binds NULL (see :func:`bind_none_quickly`)."""
    return value


def bind_none_quickly() -> None:
    """Let sqlite3 bind None without a failed lookup.

    CPython's sqlite3 (3.11) looks for an adapter for every parameter that is not an int, float or str.
    For None there is none, so it next asks the protocol type for ``__adapt__``, and that failed lookup
    formats an AttributeError message before discarding it: about 0.3 µs per NULL, and a job binds about
    twenty (its unset columns, progress and activity context). With an adapter registered for None the
    lookup ends at the registry, and None binds NULL as before. sqlite3's registry is process-wide; this
    adapter gives every user of it exactly what it gave before.
    """
    if sqlite3.adapters.get((type(None), sqlite3.PrepareProtocol)) is None:
        sqlite3.register_adapter(type(None), _bind_null)


def make_engine(url: str, busy_timeout_ms: int = 10_000, pool_size: int = 8) -> Engine:
    """Create the synchronous SQLAlchemy engine for ``url`` with the pragmas and options we rely on."""
    url = normalize_url(url)
    if is_sqlite_url(url):
        bind_none_quickly()
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
            # Straight to the driver: SQLAlchemy's statement machinery costs more than the BEGIN itself,
            # twice per job on the sequential submit path. sqlite3 commits or rolls it back as usual.
            conn.connection.driver_connection.execute("BEGIN IMMEDIATE")

        return engine
    if url.startswith("postgresql"):
        require_extra("postgres", "A PostgreSQL database")
        # The same "busy" rule as SQLite: a statement that waits longer than the busy timeout for a row
        # or table lock held by another session gives up ("canceling statement due to lock timeout"),
        # which callers map to "the database is busy" (HTTP 503) instead of hanging.
        pg_engine = create_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)

        @event.listens_for(pg_engine, "connect")
        def _pg_on_connect(dbapi_conn: Any, _record: Any) -> None:
            # A session setting, so options given in the URL stay as they are.
            with dbapi_conn.cursor() as cur:
                # lock_timeout = 0 would mean "wait forever"; 0 means "never wait" to SQLite: keep that.
                cur.execute(f"SET lock_timeout = {max(1, int(busy_timeout_ms))}")
                # A process frozen inside a transaction (SIGSTOP, a lost network) would keep its row locks
                # and block the takeover of its jobs forever: the server ends such a session instead. Our
                # transactions are milliseconds long; the floor leaves room for a starved CPU.
                idle_ms = max(IDLE_IN_TRANSACTION_MS, busy_timeout_ms)
                cur.execute(f"SET idle_in_transaction_session_timeout = {idle_ms}")
            dbapi_conn.commit()

        return pg_engine
    return create_engine(url, poolclass=NullPool)


def create_schema(engine: Engine) -> None:
    """Create every table that does not exist yet (idempotent; safe on every start).

    On PostgreSQL several processes (``run`` plus workers on other hosts) may start at once; two concurrent
    ``CREATE TABLE`` of the same name fail on a catalog unique index, so creation is serialised with a
    transaction-scoped advisory lock and the existence checks run under it.
    """
    if engine.dialect.name != "postgresql":
        SQLModel.metadata.create_all(engine)
        return
    with engine.begin() as conn:
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": SCHEMA_LOCK_KEY})
        SQLModel.metadata.create_all(conn)


def pg_connect_args(engine: Engine) -> tuple[list[Any], dict[str, Any]]:
    """``psycopg.connect`` arguments for a PostgreSQL engine's URL (host, port, credentials, options).

    The dialect's own translation is used, so whatever the URL says (query options, a password) applies to
    extra connections opened with psycopg directly, such as the LISTEN connection.
    """
    args, kwargs = engine.dialect.create_connect_args(engine.url)
    # The dialect's adapters map is tied to its sync connections; direct connections use psycopg's own.
    kwargs.pop("context", None)
    return list(args), dict(kwargs)


class _DbThreads:
    """The threads that run blocking database calls: a queue of calls, each answered on its event loop.

    What :class:`concurrent.futures.ThreadPoolExecutor` plus ``run_in_executor`` do, minus the layers a
    database call does not need: no concurrent Future chained to the asyncio one, no context copy (no
    context variable is read in a store method), one ``call_soon_threadsafe`` per answer. A sequential
    ``await submit()`` pays one such round trip per job; this one is 10-25% cheaper than the executor's
    (measured on a 2-core VM, a no-op call: 64-67 vs 71-87 µs of wall time).

    Invariants: a queued call runs unless its caller was cancelled before it started; a call that ran is
    answered (a caller cancelled meanwhile just finds its future done); :meth:`shutdown` runs the queued
    calls first.
    """

    def __init__(self, count: int, name: str) -> None:
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        # A call queued after the stop signs would never run: queueing and stopping exclude each other.
        self._lock = threading.Lock()
        self._stopped = False
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(count)
        ]
        for t in self._threads:
            t.start()

    def submit(self, call: _Call) -> None:
        """Queue a call; a thread runs it and settles its future on its loop. RuntimeError once shut down."""
        with self._lock:
            if self._stopped:
                raise RuntimeError("the database is closed")
            self._calls.put(call)

    def _work(self) -> None:
        while (call := self._calls.get()) is not None:
            call.run()

    def shutdown(self) -> None:
        """Run what is queued, then stop the threads and wait for them."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            for _ in self._threads:
                self._calls.put(None)
        for t in self._threads:
            if t is not threading.current_thread():
                t.join()


class _Call:
    """One database call and the future its caller awaits."""

    __slots__ = ("args", "fn", "future", "kwargs", "loop")

    def __init__(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[Any],
    ) -> None:
        self.fn, self.args, self.kwargs, self.loop, self.future = fn, args, kwargs, loop, future

    def run(self) -> None:
        """Run the call in this (database) thread and hand its outcome to the caller's loop."""
        if self.future.cancelled():
            # Its caller was cancelled before the call started: skip it, as an executor skips a cancelled
            # work item (a claim nobody waits for must not take jobs). A started call always finishes.
            return
        try:
            result = self.fn(*self.args, **self.kwargs)
        except BaseException as exc:  # the caller gets whatever the call raised, as run_in_executor does
            self._answer(None, exc)
        else:
            self._answer(result, None)

    def _answer(self, result: Any, exc: BaseException | None) -> None:
        try:
            self.loop.call_soon_threadsafe(self._settle, result, exc)
        except RuntimeError:
            pass  # the loop is closed: nobody waits any more

    def _settle(self, result: Any, exc: BaseException | None) -> None:
        if self.future.done():  # the awaiting task was cancelled meanwhile
            return
        if exc is not None:
            self.future.set_exception(exc)
        else:
            self.future.set_result(result)


class Database:
    """An engine plus the executor that runs blocking database calls for the event loop."""

    def __init__(
        self, url: str = DEFAULT_URL, *, busy_timeout_ms: int = 10_000, clock: Callable[[], datetime] = utcnow
    ) -> None:
        self.url = normalize_url(url)
        #: Our clock (an aware UTC datetime); tests pass a fake one to move time without sleeping.
        self.clock = clock
        self.is_sqlite = is_sqlite_url(self.url)
        threads = 1 if self.is_sqlite else 4
        self.engine = make_engine(self.url, busy_timeout_ms=busy_timeout_ms, pool_size=threads + 2)
        self._threads = _DbThreads(threads, "progressbot-db")
        self._closed = False
        #: The database server's clock minus ours (PostgreSQL; zero on SQLite). See :meth:`now`.
        self.clock_offset = timedelta(0)
        self._clock_synced_at: float | None = None
        self._clock_lock = threading.Lock()

    def create_schema(self) -> None:
        """Create the schema (blocking; call through :meth:`run` from async code)."""
        create_schema(self.engine)
        self.sync_clock()

    def now(self) -> datetime:
        """The current time on the database's clock (an aware UTC datetime); never blocks.

        Leases, ``updated_at`` stamps and due times are compared across processes and hosts. Stamping them
        with the database server's clock (our clock plus a measured offset) keeps a worker whose host clock
        is off from reaping live jobs early or hiding its changes from other processes' polls.
        """
        return self.clock() + self.clock_offset

    def sync_clock(self, *, max_age: float | None = None) -> None:
        """Measure the offset of the database server's clock (PostgreSQL; blocking, one round trip).

        With ``max_age`` the measurement is skipped if the last one is younger than that many seconds.
        """
        if self.is_sqlite:
            return
        with self._clock_lock:
            mono = time.monotonic()
            if max_age is not None and self._clock_synced_at is not None:
                if mono - self._clock_synced_at < max_age:
                    return
            self._clock_synced_at = mono
        with self.engine.connect() as conn:
            before = self.clock()
            server = conn.execute(text("SELECT clock_timestamp()")).scalar_one()
            after = self.clock()
        # The server read its clock somewhere within the round trip; assume the middle of it.
        self.clock_offset = server - (before + (after - before) / 2)

    async def run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` in a database thread and await its result."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._threads.submit(_Call(fn, args, kwargs, loop, future))
        return await future

    def close(self) -> None:
        """Stop the executor (waiting for running calls) and dispose of the engine."""
        if self._closed:
            return
        self._closed = True
        self._threads.shutdown()
        self.engine.dispose()
