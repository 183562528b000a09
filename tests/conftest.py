"""Shared fixtures: a started ProgressService on a temp database, with its own handler registry."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from core.builtin import register_builtins
from core.db import Database
from core.registry import HandlerRegistry
from core.service import ProgressService, ServiceConfig

pytest_plugins = ["tests.servers.conftest_plugin"]

ServiceFactory = Callable[..., Awaitable[ProgressService]]


#: Test files whose Synapse runs get a homeserver of their own under pytest-xdist: the tests that wait out
#: Synapse's default rate limits for minutes, split from the rest so the two halves run side by side.
SLOW_SYNAPSE_FILES = ("test_matrix_delivery.py",)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist (``--dist loadgroup``), keep the tests of one homeserver on one worker, and start
    them first: they are long and mostly wait for Synapse's rate limits, so the other workers run
    everything else meanwhile. One Synapse per group instead of one per worker, and the same order of
    Synapse tests as in a serial run (their rate-limit budgets are per account, so groups don't interfere).
    """
    synapse: list[pytest.Item] = []
    rest: list[pytest.Item] = []
    for item in items:
        if "synapse_server" not in getattr(item, "fixturenames", ()):
            rest.append(item)
            continue
        slow = item.path.name in SLOW_SYNAPSE_FILES
        item.add_marker(pytest.mark.xdist_group("synapse-slow" if slow else "synapse"))
        synapse.append(item)
    items[:] = synapse + rest


def _backend_params() -> list[Any]:
    return ["sqlite", pytest.param("postgres", marks=[pytest.mark.postgres, pytest.mark.slow])]


@pytest.fixture(params=_backend_params())
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh database URL: SQLite in a temp dir, or a fresh database on the test PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/progressbot.db"
    server = request.getfixturevalue("postgres_server")
    name = "t_" + os.urandom(6).hex()
    return str(server.create_database(name))


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A SQLite URL in a temp dir (for tests that are about SQLite specifically)."""
    return f"sqlite:///{tmp_path}/progressbot.db"


@pytest.fixture
async def make_service(db_url: str) -> AsyncIterator[ServiceFactory]:
    """Build and start services on the same database; all are stopped at teardown."""
    started: list[ProgressService] = []

    async def factory(
        registry: HandlerRegistry | None = None, *, start: bool = True, url: str | None = None, **cfg: Any
    ) -> ProgressService:
        cfg.setdefault("min_interval", 0.1)
        cfg.setdefault("poll_interval", 0.1)
        cfg.setdefault("retry_backoff", 0.05)
        cfg.setdefault("cancel_grace", 0.5)
        cfg.setdefault("shutdown_grace", 2.0)
        reg = registry or HandlerRegistry()
        svc = ProgressService(
            ServiceConfig(database_url=url or db_url, **cfg), registry=reg, database=Database(url or db_url)
        )
        register_builtins(reg, lambda: svc.store)
        if start:
            await svc.start()
        started.append(svc)
        return svc

    yield factory
    for svc in reversed(started):
        if svc._started:
            await svc.stop()
        else:
            svc.db.close()


async def wait_until(
    predicate: Callable[[], Awaitable[bool]], timeout: float = 10.0, interval: float = 0.02
) -> None:
    """Poll an async predicate until it holds; fail the test on timeout."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        if await predicate():
            return
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)
