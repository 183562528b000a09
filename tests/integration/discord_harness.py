"""Helpers for the Discord adapter tests: a service on SQLite, the adapter against the fake Discord,
and queries over what the fake recorded (progress messages, replies, edit timing)."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adapters.board import BoardPolicy
from adapters.commands import CommandRouter
from adapters.discord import DiscordAdapter, DiscordConfig
from core.builtin import register_builtins
from core.models import TERMINAL_STATUSES
from core.registry import HandlerRegistry
from core.service import ProgressService, ServiceConfig
from tests.fake_discord import Bucket, FakeDiscordServer, FakeMessage

TOKEN = "fake-bot-token"
EDIT_ROUTE = "PATCH /channels/{channel_id}/messages/{message_id}"
_COUNT = re.compile(r"\((\d+)/(\d+)\)")
#: The bold title of a progress message: ``**#12**``, ``**batch #3**``.
_TITLE = re.compile(r"^\S+ \*\*(batch )?#\w+\*\*")


async def make_service(tmp_path: Path, **overrides: Any) -> ProgressService:
    """A started service on a SQLite file in ``tmp_path`` (the same file across a "restart")."""
    cfg = ServiceConfig(
        database_url=f"sqlite:///{tmp_path}/t.db", min_interval=0.1, poll_interval=0.1, **overrides
    )
    svc = ProgressService(cfg, registry=HandlerRegistry())
    register_builtins(svc.registry, lambda: svc.store)
    await svc.start()
    return svc


async def make_adapter(
    server: FakeDiscordServer,
    service: ProgressService,
    *,
    admins: tuple[str, ...] = (),
    board: BoardPolicy | None = None,
    **overrides: Any,
) -> DiscordAdapter:
    """A started adapter for the fake's default guild and ``#progress`` channel, on the fake's clock
    (``board``: its room-board policy; None, every job on its own message)."""
    values: dict[str, Any] = {
        "token": TOKEN,
        "guild_ids": [int(server.guild_id)],
        "channel_ids": [int(server.channel_id)],
        "guild_ready_timeout": 0.05,
        "ready_timeout": 10.0,
        "age_check_interval": 0.1,
        "stop_grace": 5.0,
        "edit_rate": float(server.edit_limit) / server.edit_window,
        "edit_burst": server.edit_limit,
    }
    values.update(overrides)
    router = CommandRouter(service, admins=admins, prefix="/")
    adapter = DiscordAdapter(service, router, DiscordConfig(**values), clock=server.clock.now, board=board)
    await adapter.start()
    return adapter


async def eventually(check: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``check`` until it is true (for state the fake cannot signal); fail clearly on timeout."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s")
        await asyncio.sleep(0.02)


async def wait_job(
    service: ProgressService,
    job_id: int,
    pred: Callable[[Any], bool] | None = None,
    timeout: float = 20.0,
) -> Any:
    """Wait until a job matches ``pred`` (default: finished)."""
    return await service.wait_for(job_id, pred or (lambda j: j.status in TERMINAL_STATUSES), timeout=timeout)


def progress_messages(server: FakeDiscordServer, job_ref: str | None = None) -> list[FakeMessage]:
    """Progress messages in the default channel: the bot's messages that show a job or batch, posted
    over REST or as the answer to ``/run`` (a public interaction response); not replies.

    ``job_ref`` (``"#3"``) keeps those whose content, or whose first posted content, names the job.
    """
    out = []
    for m in server.messages_in():
        if m.author.get("id") != server.application_id or m.message_reference is not None or m.ephemeral:
            continue
        if (m.interaction_id or m.webhook_id) and not _TITLE.search(m.content):
            continue  # a command's answer in words, not a progress message
        if job_ref is not None:
            edits = server.edits_of(m.id)
            if not any(_names(c, job_ref) for c in [m.content, *(e.content_after for e in edits[:1])]):
                continue
        out.append(m)
    return out


def _names(content: str, job_ref: str) -> bool:
    return re.search(re.escape(f"**{job_ref}**") + r"(\s|$)", content) is not None


def replies_to(server: FakeDiscordServer, message_id: str) -> list[FakeMessage]:
    """Bot replies referencing a message (the completion replies)."""
    return [
        m
        for m in server.messages_in()
        if m.message_reference is not None and m.message_reference.get("message_id") == str(message_id)
    ]


def edit_contents(server: FakeDiscordServer, message_id: str) -> list[str]:
    """Contents of a message after each successful edit, in order."""
    return [e.content_after for e in server.edits_of(message_id)]


def counters(content: str) -> tuple[int, int] | None:
    """``(current, total)`` shown in a progress message, e.g. ``(5/20)``."""
    m = _COUNT.search(content)
    return (int(m.group(1)), int(m.group(2))) if m else None


def bucket_violations(server: FakeDiscordServer, channel_id: str, limit: int, window: float) -> int:
    """Replay the channel's REST edits through the fake's own bucket: how many would have been refused."""
    bucket = Bucket("replay", limit, window)
    refused = 0
    for e in sorted(
        (e for e in server.edits if e.channel_id == channel_id and e.via == "rest"), key=lambda e: e.at
    ):
        if bucket.exhausted(e.at):
            refused += 1
        else:
            bucket.take(e.at)
    return refused


def organic_429s(server: FakeDiscordServer) -> list[Any]:
    """429s the fake returned on its own (not forced by the test)."""
    return [h for h in server.rate_limit_hits if not h.forced]


def button_states(message: FakeMessage) -> dict[str, bool]:
    """``{"pause": enabled, ...}`` from the message's components."""
    states: dict[str, bool] = {}
    for row in message.components:
        for comp in row.get("components", []):
            cid = comp.get("custom_id", "")
            if cid.startswith("pb:"):
                states[cid.split(":")[1]] = not comp.get("disabled", False)
    return states
