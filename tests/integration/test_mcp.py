"""The MCP server, seen by the SDK's own client: over stdio (``progressbot mcp`` as a subprocess following a
separate worker process) and over streamable HTTP at ``/mcp`` of the HTTP API."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from pydantic import SecretStr

from bot.app import build_service
from bot.http_api import HttpApi
from bot.settings import HttpSettings, Settings
from core.service import ProgressService

from .http_helpers import wait_for
from .mcp_helpers import (
    Progress,
    child_env,
    error_text,
    http_session,
    modern_http_client,
    stdio_session,
    structured,
    write_config,
)

TOOLS = {
    "list_jobs",
    "job_status",
    "run_job",
    "pause_job",
    "resume_job",
    "cancel_job",
    "retry_job",
    "list_job_types",
}


def assert_streamed(progress: Progress) -> None:
    """Progress only grows, and notifications are throttled (≥ ~0.45 s apart, the 500 ms window)."""
    values = progress.values
    assert values == sorted(values), values
    assert all(gap >= 0.45 for gap in progress.gaps), progress.gaps


# ------------------------------------------------------------------------ stdio
@contextlib.asynccontextmanager
async def worker_process(config: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """``progressbot worker``: another process's service that runs the jobs the MCP process starts."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot.cli",
        "worker",
        "--config",
        str(config),
        env=child_env(),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        yield proc
    finally:
        proc.terminate()
        await proc.wait()


@pytest.mark.slow
async def test_stdio_tools_and_streamed_progress_from_another_process(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "config.toml", tmp_path / "pb.db")
    async with worker_process(cfg), stdio_session(cfg) as s:
        listed = {t.name: t for t in (await s.list_tools()).tools}
        assert TOOLS <= set(listed)
        status_schema = listed["job_status"].input_schema
        assert status_schema["required"] == ["id"]
        assert {"id", "stream", "max_seconds"} <= set(status_schema["properties"])
        assert listed["run_job"].input_schema["required"] == ["type"]
        assert "active" in listed["list_jobs"].input_schema["properties"]["status"]["enum"]
        assert all(t.description for t in listed.values())

        types = structured(await s.call_tool("list_job_types", {}))["types"]
        demo = next(t for t in types if t["type"] == "demo.count")
        assert {"steps", "delay_ms"} <= set(demo["payload_schema"]["properties"])

        started = structured(
            await s.call_tool("run_job", {"type": "demo.count", "payload": {"steps": 8, "delay_ms": 300}})
        )
        assert started["status"] == "pending"
        progress = Progress()
        final = structured(
            await s.call_tool("job_status", {"id": started["id"], "stream": True}, progress_callback=progress)
        )
        assert final["status"] == "completed" and final["still_running"] is False
        assert final["result"] == {"steps": 8, "executions": 8}
        # The worker process ran it; its progress reached this process through the store.
        assert len(progress.seen) >= 3, progress.seen
        assert_streamed(progress)
        assert any("step" in m for m in progress.messages())

        listed_jobs = structured(await s.call_tool("list_jobs", {"status": "completed"}))
        assert [j["id"] for j in listed_jobs["jobs"]] == [started["id"]]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_stdio_server_shuts_down_gracefully_on_a_signal(tmp_path: Path, sig: signal.Signals) -> None:
    """``progressbot mcp --worker`` stopped by SIGTERM/SIGINT while its worker runs a job: it exits 0 without
    a traceback, and the job is requeued from its checkpoint (not left "running", not "interrupted")."""
    db = tmp_path / "pb.db"
    cfg = write_config(tmp_path / "config.toml", db)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot.cli",
        "mcp",
        "--worker",
        "--config",
        str(cfg),
        env=child_env(),
        stdin=asyncio.subprocess.PIPE,  # kept open: the session only ends by the signal
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        submit = await asyncio.create_subprocess_exec(
            sys.executable,
            *("-m", "bot.cli", "submit", "demo.count", "steps=200", "delay_ms=100", "--config", str(cfg)),
            env=child_env(),
            stdout=asyncio.subprocess.DEVNULL,
        )
        assert await submit.wait() == 0

        def status() -> str | None:
            with contextlib.closing(sqlite3.connect(db)) as conn:
                row = conn.execute("SELECT status FROM jobs WHERE id = 1").fetchone()
            return str(row[0]) if row else None

        await wait_for(lambda: status() == "running", 30)  # the MCP process's own worker runs it
        proc.send_signal(sig)
        _, stderr = await asyncio.wait_for(proc.communicate(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, stderr.decode()
    assert b"Traceback" not in stderr, stderr.decode()
    assert status() == "pending"


@pytest.mark.slow
async def test_stdio_bad_input_is_a_readable_tool_error(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "config.toml", tmp_path / "pb.db")
    async with stdio_session(cfg) as s:
        assert "No job #999" in error_text(await s.call_tool("pause_job", {"id": 999}))
        assert "No job #nope" in error_text(await s.call_tool("job_status", {"id": "nope"}))
        bad = error_text(await s.call_tool("run_job", {"type": "demo.count", "payload": {"steps": "many"}}))
        assert "steps" in bad and "integer" in bad
        unknown = error_text(await s.call_tool("run_job", {"type": "no.such"}))
        assert "Unknown job type 'no.such'" in unknown
        job = structured(await s.call_tool("run_job", {"type": "demo.count", "payload": {"steps": 1}}))
        # Nobody runs it (no worker): it is pending, and pending jobs can't be resumed.
        illegal = error_text(await s.call_tool("resume_job", {"id": job["id"]}))
        assert f"Job #{job['id']} is pending; it can't be resumed" in illegal
        # The schema is enforced too: a missing id is refused as a tool error, not a protocol error.
        assert "id" in error_text(await s.call_tool("cancel_job", {}))


# ------------------------------------------------------------------------- HTTP
@dataclass
class McpHttp:
    """A service with the HTTP API, and MCP at /mcp."""

    service: ProgressService
    api: HttpApi
    token: str

    @property
    def url(self) -> str:
        """The API's base URL."""
        return self.api.url


@pytest.fixture
async def mcp_http(tmp_path: Path) -> AsyncIterator[McpHttp]:
    settings = Settings(
        database={"url": f"sqlite:///{tmp_path}/http.db"},  # type: ignore[arg-type]
        progress={"min_interval_ms": 500, "poll_interval_ms": 200},  # type: ignore[arg-type]
        worker={"cancel_grace_seconds": 1.0, "shutdown_grace_seconds": 2.0},  # type: ignore[arg-type]
    )
    service = build_service(settings)
    await service.start()
    token = secrets.token_urlsafe(24)
    api = HttpApi(service, HttpSettings(listen="127.0.0.1:0", token=SecretStr(token)), app_settings=settings)
    await api.start()
    try:
        yield McpHttp(service, api, token)
    finally:
        await api.stop()
        await service.stop()


async def test_http_needs_the_bearer_token(mcp_http: McpHttp) -> None:
    hello = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}
    async with aiohttp.ClientSession() as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": mcp_http.token}):
            async with http.post(mcp_http.url + "/mcp", json=hello, headers=headers) as resp:
                assert resp.status == 401
                assert (await resp.json())["error"] == "unauthorized"
    async with http_session(mcp_http.url, mcp_http.token) as s:
        assert TOOLS <= {t.name for t in (await s.list_tools()).tools}


async def test_http_streams_a_batch_to_its_end(mcp_http: McpHttp) -> None:
    # Jobs of different lengths: the batch moves on as each one completes.
    batch, _ = await mcp_http.service.submit_batch(
        "three", [{"type": "demo.count", "payload": {"steps": n, "delay_ms": 300}} for n in (2, 4, 6)]
    )
    async with http_session(mcp_http.url, mcp_http.token) as s:
        progress = Progress()
        final = structured(
            await s.call_tool(
                "job_status", {"id": f"b{batch.id}", "stream": True}, progress_callback=progress
            )
        )
    assert final["kind"] == "batch" and final["status"] == "completed"
    assert final["state"]["batchDetails"]["completedOperations"] == 3
    assert len(progress.seen) >= 2, progress.seen
    assert_streamed(progress)


async def test_http_pause_resume_cancel_while_streaming(mcp_http: McpHttp) -> None:
    async with http_session(mcp_http.url, mcp_http.token) as s:
        job = structured(
            await s.call_tool("run_job", {"type": "demo.count", "payload": {"steps": 400, "delay_ms": 50}})
        )
        progress = Progress()
        stream = asyncio.create_task(
            s.call_tool(
                "job_status",
                {"id": job["id"], "stream": True, "max_seconds": 120},
                progress_callback=progress,
            )
        )
        await wait_for(lambda: any(m.startswith("running · step") for m in progress.messages()))

        paused = structured(await s.call_tool("pause_job", {"id": job["id"]}))
        assert f"#{job['id']}" in paused["text"]
        await wait_for(lambda: progress.messages()[-1].startswith("paused"))
        assert not stream.done()

        structured(await s.call_tool("resume_job", {"id": job["id"]}))
        await wait_for(lambda: progress.messages()[-1].startswith("running · step"))

        structured(await s.call_tool("cancel_job", {"id": job["id"]}))
        final = structured(await asyncio.wait_for(stream, 30))
    assert final["status"] == "cancelled" and final["still_running"] is False
    assert_streamed(progress)
    statuses = [m.split(" ")[0] for m in progress.messages()]
    assert statuses.index("paused") < len(statuses) - 1 - statuses[::-1].index("running")


async def test_http_direct_jobs_and_retry_of_a_failed_job(mcp_http: McpHttp) -> None:
    run = await mcp_http.service.execute("demo.count", {"steps": 3, "delay_ms": 200}, owner="mcp")
    async with http_session(mcp_http.url, mcp_http.token) as s:
        progress = Progress()
        direct = structured(
            await s.call_tool("job_status", {"id": run.view.id, "stream": True}, progress_callback=progress)
        )
        assert direct["id"] == run.view.id and direct["status"] == "completed"
        assert direct["result"] == {"steps": 3, "executions": 3}
        assert_streamed(progress)

        job = structured(
            await s.call_tool("run_job", {"type": "demo.count", "payload": {"steps": 2, "fail_at": 1}})
        )
        failed = structured(await s.call_tool("job_status", {"id": job["id"], "stream": True}))
        assert failed["status"] == "failed" and "failed at step 1" in failed["error"]
        retried = structured(await s.call_tool("retry_job", {"id": f"#{job['id']}"}))
        assert retried["text"] == f"Retrying #{job['id']}."
        rerun = Progress()
        again = structured(
            await s.call_tool("job_status", {"id": job["id"], "stream": True}, progress_callback=rerun)
        )
        # A second run (it failed the same way), seen from its start.
        assert again["status"] == "failed" and again["state"]["seq"] > failed["state"]["seq"]
        assert rerun.messages()[0].split(" ")[0] in ("pending", "running"), rerun.messages()


async def test_http_bounded_stream_returns_still_running(mcp_http: McpHttp) -> None:
    job = await mcp_http.service.submit("demo.count", {"steps": 100, "delay_ms": 100}, owner="mcp")
    async with http_session(mcp_http.url, mcp_http.token) as s:
        out = structured(await s.call_tool("job_status", {"id": job.id, "stream": True, "max_seconds": 1}))
        assert out["still_running"] is True and out["status"] in ("pending", "running")
        assert f"job_status('{job.id}', stream=true)" in out["hint"]
        # The state as a resource, too.
        read = await s.read_resource(f"progressbot://jobs/{job.id}")
        state = json.loads(read.contents[0].text)  # type: ignore[union-attr]
        assert state["id"] == str(job.id) and state["kind"] == "job"
        structured(await s.call_tool("cancel_job", {"id": job.id}))


async def test_http_only_owners_and_admins_control_jobs(mcp_http: McpHttp) -> None:
    theirs = await mcp_http.service.submit("demo.count", {"steps": 50, "delay_ms": 100}, owner="@alice:x")
    async with http_session(mcp_http.url, mcp_http.token) as s:
        refused = error_text(await s.call_tool("cancel_job", {"id": theirs.id}))
        assert f"you may not cancel job #{theirs.id}" in refused
        assert (await mcp_http.service.get(theirs.id)).status != "cancelled"
        mine = structured(await s.call_tool("run_job", {"type": "demo.count", "payload": {"steps": 50}}))
        assert "Cancel" in structured(await s.call_tool("cancel_job", {"id": mine["id"]}))["text"]
    await mcp_http.service.cancel(theirs.id, actor="test")


@pytest.mark.parametrize("protocol", ["handshake", "2026-07-28"])
async def test_http_client_cancel_drops_the_subscription(mcp_http: McpHttp, protocol: str) -> None:
    bus = mcp_http.service.bus
    job = await mcp_http.service.submit("demo.count", {"steps": 200, "delay_ms": 100}, owner="mcp")
    connect = http_session if protocol == "handshake" else modern_http_client
    async with connect(mcp_http.url, mcp_http.token) as s:
        baseline = bus.subscriber_count
        progress = Progress()
        stream = asyncio.create_task(
            s.call_tool("job_status", {"id": job.id, "stream": True}, progress_callback=progress)
        )
        await wait_for(lambda: bus.subscriber_count == baseline + 1 and progress.seen)
        stream.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stream
        # The server stops following and unsubscribes (handshake: notifications/cancelled; 2026-07-28: the
        # client drops the request's HTTP stream).
        await wait_for(lambda: bus.subscriber_count == baseline)
        # The session is still usable.
        assert structured(await s.call_tool("job_status", {"id": job.id}))["status"] == "running"
    await mcp_http.service.cancel(job.id, actor="test")


async def test_http_resource_subscription_tells_of_status_changes(mcp_http: McpHttp) -> None:
    async with modern_http_client(mcp_http.url, mcp_http.token) as c:
        job = structured(
            await c.call_tool("run_job", {"type": "demo.count", "payload": {"steps": 100, "delay_ms": 50}})
        )
        uri = f"progressbot://jobs/{job['id']}"
        updates: list[str] = []
        async with c.listen(resource_subscriptions=[uri]) as sub:
            structured(await c.call_tool("pause_job", {"id": job["id"]}))
            async for event in sub:
                updates.append(event.uri)  # type: ignore[attr-defined]
                state = json.loads((await c.read_resource(uri)).contents[0].text)  # type: ignore[union-attr]
                if state["status"] == "paused":
                    break
        assert updates and set(updates) == {uri}
        structured(await c.call_tool("cancel_job", {"id": job["id"]}))


@pytest.mark.slow
async def test_without_the_extra_the_command_says_what_to_install(tmp_path: Path) -> None:
    # A stand-in `mcp` package that fails to import, as on an installation without progressbot[mcp].
    (tmp_path / "fake" / "mcp").mkdir(parents=True)
    (tmp_path / "fake" / "mcp" / "__init__.py").write_text("raise ImportError('No module named mcp')\n")
    cfg = write_config(tmp_path / "config.toml", tmp_path / "pb.db")
    env = child_env()
    env["PYTHONPATH"] = str(tmp_path / "fake") + os.pathsep + env["PYTHONPATH"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot.cli",
        "mcp",
        "--config",
        str(cfg),
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    said = " ".join(err.decode().split())  # the console wraps long lines
    assert proc.returncode == 2
    assert "the MCP server needs the 'mcp' package: pip install 'progressbot[mcp]'" in said
    assert "Traceback" not in said and out == b""
