"""Shared pieces of the MCP tests and bench: SDK client sessions over stdio and over streamable HTTP, and a
progress recorder."""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
from mcp import Client, ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client

REPO = Path(__file__).resolve().parents[2]


def write_config(path: Path, db: Path, *, min_interval_ms: int = 500, poll_interval_ms: int = 200) -> Path:
    """A config file for ``progressbot mcp`` / ``worker`` processes sharing one SQLite database."""
    path.write_text(
        "\n".join(
            [
                "log_level = 'WARNING'",
                "[database]",
                f'url = "sqlite:///{db}"',
                "[progress]",
                f"min_interval_ms = {min_interval_ms}",
                f"poll_interval_ms = {poll_interval_ms}",
                "[worker]",
                "cancel_grace_seconds = 1.0",
                "shutdown_grace_seconds = 2.0",
            ]
        )
        + "\n"
    )
    return path


def child_env() -> dict[str, str]:
    """The environment of a spawned progressbot: this tree's code first."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@contextlib.asynccontextmanager
async def stdio_session(config: Path, *extra: str) -> AsyncIterator[ClientSession]:
    """A client session with ``python -m bot.cli mcp --config CONFIG`` over stdio."""
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "bot.cli", "mcp", "--config", str(config), *extra],
        env=child_env(),
        cwd=str(REPO),
    )
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        yield session


@contextlib.asynccontextmanager
async def http_session(url: str, token: str | None) -> AsyncIterator[ClientSession]:
    """A client session with the HTTP API's ``/mcp`` (streamable HTTP), with the bearer token."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=60) as client,
        streamable_http_client(url + "/mcp", http_client=client) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        yield session


@contextlib.asynccontextmanager
async def modern_http_client(url: str, token: str) -> AsyncIterator[Client]:
    """The SDK's high-level client on ``/mcp``: it negotiates the 2026-07-28 protocol (per-request HTTP,
    ``subscriptions/listen``), where the session above uses the initialize handshake."""
    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=60) as client,
        Client(streamable_http_client(url + "/mcp", http_client=client)) as mcp_client,
    ):
        yield mcp_client


@dataclass
class Progress:
    """Records the progress notifications of one call: ``(monotonic time, progress, total, message)``."""

    seen: list[tuple[float, float, float | None, str | None]] = field(default_factory=list)

    async def __call__(self, progress: float, total: float | None, message: str | None) -> None:
        self.seen.append((time.monotonic(), progress, total, message))

    @property
    def values(self) -> list[float]:
        """The progress values, in order."""
        return [p for _, p, _, _ in self.seen]

    @property
    def gaps(self) -> list[float]:
        """Seconds between successive notifications."""
        times = [t for t, _, _, _ in self.seen]
        return [b - a for a, b in itertools.pairwise(times)]

    def messages(self) -> list[str]:
        """The messages, in order."""
        return [m or "" for _, _, _, m in self.seen]


def structured(result: Any) -> dict[str, Any]:
    """A successful tool result's structured content (fails with the tool's text otherwise)."""
    assert not result.is_error, result.content
    assert isinstance(result.structured_content, dict)
    return result.structured_content


def error_text(result: Any) -> str:
    """The text of a tool error (fails if the call succeeded)."""
    assert result.is_error, result.structured_content
    return " ".join(getattr(c, "text", "") for c in result.content)
