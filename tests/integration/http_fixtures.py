"""Fixtures shared by the HTTP API and client tests (loaded with ``pytest_plugins``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.integration.http_helpers import ApiServer, ServerFactory, ServerPool


@pytest.fixture
async def make_server(tmp_path: Path) -> AsyncIterator[ServerFactory]:
    """Start services with the API on an ephemeral loopback port; all are stopped at teardown."""
    pool = ServerPool(tmp_path)
    yield pool.new
    await pool.close()


@pytest.fixture
async def server(make_server: ServerFactory) -> ApiServer:
    """One started service with the API (min_interval 0.1 s)."""
    return await make_server()
