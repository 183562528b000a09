"""Shared pieces of the HTTP API tests: a real service plus the API on an ephemeral loopback port."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from pydantic import SecretStr

from bot.http_api import HttpApi
from bot.settings import HttpSettings
from core.builtin import register_builtins
from core.db import Database
from core.registry import HandlerRegistry
from core.service import ProgressService, ServiceConfig

TERMINAL = ("completed", "failed", "cancelled")


@dataclass
class ApiServer:
    """A started service and HTTP API, plus an authenticated client session."""

    service: ProgressService
    api: HttpApi
    token: str
    session: aiohttp.ClientSession
    extra_sessions: list[aiohttp.ClientSession] = field(default_factory=list)

    @property
    def url(self) -> str:
        """The API's base URL."""
        return self.api.url

    @property
    def auth(self) -> dict[str, str]:
        """The Authorization header."""
        return {"Authorization": f"Bearer {self.token}"}

    async def call(self, method: str, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
        """Send a request; returns (status, decoded JSON or None)."""
        headers = {**self.auth, **kw.pop("headers", {})}
        if isinstance(body, dict | list):
            kw["json"] = body
        elif body is not None:
            kw["data"] = body  # raw bytes, or an async generator for a chunked body
        async with self.session.request(method, self.url + path, headers=headers, **kw) as resp:
            raw = await resp.read()
            return resp.status, (json.loads(raw) if raw else None)

    async def post(self, path: str, body: Any = None) -> Any:
        """POST and expect success; returns the JSON reply."""
        status, data = await self.call("POST", path, body if body is not None else {})
        assert status < 300, (status, data)
        return data

    async def get(self, path: str) -> Any:
        """GET and expect success."""
        status, data = await self.call("GET", path)
        assert status == 200, (status, data)
        return data

    def new_session(self, **kw: Any) -> aiohttp.ClientSession:
        """Another client session, closed at teardown."""
        s = aiohttp.ClientSession(**kw)
        self.extra_sessions.append(s)
        return s


ServerFactory = Callable[..., Awaitable[ApiServer]]


class ServerPool:
    """Starts services with the HTTP API on 127.0.0.1:0 (the test modules wrap it in fixtures)."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[ApiServer] = []

    async def new(
        self, *, keepalive: float = 15.0, max_body: int = 1024 * 1024, url: str | None = None, **cfg: Any
    ) -> ApiServer:
        """A started service (min_interval 0.1 s unless given) and its API, with a fresh database (SQLite
        unless ``url`` names one)."""
        cfg.setdefault("min_interval", 0.1)
        cfg.setdefault("poll_interval", 0.1)
        cfg.setdefault("cancel_grace", 0.5)
        cfg.setdefault("shutdown_grace", 2.0)
        url = url or f"sqlite:///{self.tmp_path}/api{len(self.started)}.db"
        reg = HandlerRegistry()
        svc = ProgressService(ServiceConfig(database_url=url, **cfg), registry=reg, database=Database(url))
        register_builtins(reg, lambda: svc.store)
        await svc.start()
        token = secrets.token_urlsafe(24)
        settings = HttpSettings(
            listen="127.0.0.1:0", token=SecretStr(token), max_body_bytes=max_body, keepalive_seconds=keepalive
        )
        api = HttpApi(svc, settings)
        await api.start()
        srv = ApiServer(svc, api, token, aiohttp.ClientSession())
        self.started.append(srv)
        return srv

    async def close(self) -> None:
        """Stop every server and close the sessions."""
        for srv in reversed(self.started):
            await srv.session.close()
            for s in srv.extra_sessions:
                await s.close()
            await srv.api.stop()
            await srv.service.stop()


async def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02) -> None:
    """Poll ``predicate`` (sync or async) until it is truthy; fail on timeout."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        res = predicate()
        if asyncio.iscoroutine(res):
            res = await res
        if res:
            return
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


async def read_ndjson(
    resp: aiohttp.ClientResponse, *, keepalives: list[dict[str, Any]] | None = None, limit: int | None = None
) -> list[dict[str, Any]]:
    """Read NDJSON events until EOF (or ``limit`` events); keep-alive lines go to ``keepalives``."""
    out: list[dict[str, Any]] = []
    async for raw in resp.content:
        line = raw.strip()
        if not line:
            continue
        obj = json.loads(line)
        if obj.get("type") == "keepalive":
            if keepalives is not None:
                keepalives.append(obj)
            continue
        out.append(obj)
        if limit is not None and len(out) >= limit:
            break
    return out


@dataclass
class SseFrame:
    """One server-sent event (or comment)."""

    id: str | None = None
    event: str | None = None
    data: str = ""
    comment: str | None = None
    retry: int | None = None

    def json(self) -> Any:
        """The data, decoded."""
        return json.loads(self.data)


async def sse_frames(resp: aiohttp.ClientResponse) -> AsyncIterator[SseFrame]:
    """Parse a text/event-stream body into frames (a blank line ends a frame)."""
    frame = SseFrame()
    touched = False
    async for raw in resp.content:
        line = raw.decode().rstrip("\r\n")
        if line == "":
            if touched:
                yield frame
            frame, touched = SseFrame(), False
            continue
        touched = True
        if line.startswith(":"):
            frame.comment = line[1:].strip()
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "id":
            frame.id = value
        elif name == "event":
            frame.event = value
        elif name == "data":
            frame.data = value if not frame.data else frame.data + "\n" + value
        elif name == "retry":
            frame.retry = int(value)
    if touched:
        yield frame
