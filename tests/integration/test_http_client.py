"""The Python client (sync and async) and the ``watch``/``track`` commands against a real server."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from typer.testing import CliRunner

from bot.cli import app as cli_app
from bot.cli_http import url_from_listen
from bot.client import AsyncProgressClient, JobCancelledError, ProgressApiError, ProgressClient
from core.models import JobStatus
from tests.integration.http_helpers import (
    ApiServer,
    wait_for,
)

pytest_plugins = ["tests.integration.http_fixtures"]

pytestmark = pytest.mark.asyncio


PROGRESS_ROUTE = "/v1/jobs/{id}/progress"
SCRIPT = Path(__file__).with_name("http_client_script.py")
PROJECT_ROOT = str(Path(__file__).resolve().parents[2])


async def tracked_ids(srv: ApiServer) -> list[int]:
    return [j.id or 0 for j in await srv.service.list_jobs(type="tracked")]


# ------------------------------------------------------------- subprocess
@pytest.mark.slow
async def test_a_program_using_the_client_in_a_subprocess_reports_progress_and_honours_pause(
    server: ApiServer,
) -> None:
    svc = server.service
    sub = svc.subscribe()  # every event: the job does not exist yet
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(SCRIPT),
        server.url,
        server.token,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": PROJECT_ROOT},
    )
    assert proc.stdout is not None

    async def line() -> str:
        assert proc.stdout is not None
        return (await asyncio.wait_for(proc.stdout.readline(), 30)).decode().strip()

    try:
        first = await line()
        assert first.startswith("JOB "), first
        jid = int(first.split()[1])

        # Its progress shows up in a subscriber of the service.
        async def progressed() -> bool:
            while (ev := sub.get_nowait()) is not None:
                if ev.id == jid and ev.current and ev.current >= 5:
                    assert ev.message and ev.message.startswith("step ") and ev.total == 1000
                    return True
            return False

        await wait_for(progressed, timeout=20)

        # A pause through the API reaches the program as should_pause.
        reply = await server.post(f"/v1/jobs/{jid}/pause", {"actor": "@alice:example.org"})
        assert reply["status"] == "paused"
        paused_line = await line()
        assert paused_line.startswith("PAUSED at "), paused_line
        paused_at = (await server.get(f"/v1/jobs/{jid}"))["progress"]["current"]
        assert (await svc.get(jid)).status == JobStatus.PAUSED

        await server.post(f"/v1/jobs/{jid}/resume")
        assert await line() == "RESUMED"
        assert await line() == "DONE completed"
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        sub.close()
    job = await svc.get(jid)
    assert job.status == JobStatus.COMPLETED and job.progress_current == 1000
    assert paused_at is not None and paused_at >= 5
    acts = [a.message for a in await svc.activity(jid)]
    assert (
        "paused by @alice:example.org" in acts
        and "finished after a pause" in acts
        and acts[-1] == "completed"
    )


# ------------------------------------------------------------- sync client
async def test_the_client_reports_at_most_every_500_ms_and_sends_the_last_state(server: ApiServer) -> None:
    base = server.api.route_counts[PROGRESS_ROUTE]

    def program() -> tuple[int, float, int]:
        with ProgressClient(server.url, server.token) as client:
            t0 = time.monotonic()
            with client.track("busy loop") as job:
                n = 0
                while time.monotonic() - t0 < 1.6:
                    for _ in range(100):  # as often as it likes
                        job.advance(1, message=f"item {n}")
                        n += 1
                    time.sleep(0.001)
                elapsed = time.monotonic() - t0
            return job.id, elapsed, n

    jid, elapsed, calls = await asyncio.to_thread(program)
    posts = server.api.route_counts[PROGRESS_ROUTE] - base
    assert calls > 1000
    assert 1 <= posts <= elapsed / 0.5 + 1, (posts, elapsed)
    job = await server.service.get(jid)
    # The last state went out with the completion, although it came within 500 ms of the previous report.
    assert job.status == JobStatus.COMPLETED
    assert job.progress_current == calls and job.progress_message == f"item {calls - 1}"


async def test_a_cancel_raises_in_the_program_and_leaves_the_job_cancelled(server: ApiServer) -> None:
    started = threading.Event()
    box: dict[str, Any] = {}

    def program() -> str:
        with ProgressClient(server.url, server.token, min_interval=0.1) as client:
            try:
                with client.track("to be cancelled", total=100) as job:
                    box["id"] = job.id
                    started.set()
                    deadline = time.monotonic() + 30
                    while time.monotonic() < deadline:
                        job.advance(1)
                        time.sleep(0.01)
            except JobCancelledError as exc:
                return f"cancelled {exc.job_id}"
        return "not cancelled"

    task = asyncio.create_task(asyncio.to_thread(program))
    await wait_for(started.is_set)
    await server.post(f"/v1/jobs/{box['id']}/cancel", {"actor": "@bob:example.org"})
    assert await asyncio.wait_for(task, 20) == f"cancelled {box['id']}"
    job = await server.service.get(box["id"])
    assert job.status == JobStatus.CANCELLED and job.error is None


async def test_an_exception_fails_the_job_and_propagates(server: ApiServer) -> None:
    def program() -> int:
        client = ProgressClient(server.url, server.token)
        try:
            with client.track("doomed") as job:
                job.report(3, total=10, message="working", stage="compile")
                job.log("about to fail", level="warning")
                raise ValueError("boom")
        except ValueError:
            return job.id
        finally:
            client.close()

    jid = await asyncio.to_thread(program)
    job = await server.service.get(jid)
    assert job.status == JobStatus.FAILED and job.error == "ValueError: boom"
    assert job.progress_current == 3 and job.progress_total == 10 and job.stage_name == "compile"
    assert "about to fail" in [a.message for a in await server.service.activity(jid)]


async def test_should_pause_and_wait_if_paused_with_raise_on_cancel_off(server: ApiServer) -> None:
    box: dict[str, Any] = {}
    started, saw_pause, saw_resume = threading.Event(), threading.Event(), threading.Event()

    def program() -> list[str]:
        seen: list[str] = []
        deadline = time.monotonic() + 30  # every loop is bounded: a stuck thread would hang the test run
        with ProgressClient(server.url, server.token, min_interval=0.1) as client:
            with client.track("polite", raise_on_cancel=False) as job:
                box["id"] = job.id
                started.set()
                while not job.should_pause and time.monotonic() < deadline:
                    job.advance()
                    time.sleep(0.01)
                seen.append("paused" if job.should_pause else "never paused")
                if job.wait_if_paused(timeout=0.05) is False:  # still paused after a short wait
                    seen.append("still paused")
                saw_pause.set()
                if job.wait_if_paused(timeout=30):
                    seen.append("resumed")
                saw_resume.set()
                while not job.should_cancel and time.monotonic() < deadline:
                    job.advance()  # no exception: raise_on_cancel=False
                    time.sleep(0.01)
                seen.append("cancel seen" if job.should_cancel else "never cancelled")
        return seen

    task = asyncio.create_task(asyncio.to_thread(program))
    await wait_for(started.is_set)
    await server.post(f"/v1/jobs/{box['id']}/pause")
    await wait_for(saw_pause.is_set, timeout=20)
    await server.post(f"/v1/jobs/{box['id']}/resume")
    await wait_for(saw_resume.is_set, timeout=20)
    await server.post(f"/v1/jobs/{box['id']}/cancel")
    seen = await asyncio.wait_for(task, 40)
    assert seen == ["paused", "still paused", "resumed", "cancel seen"], seen
    assert (await server.service.get(box["id"])).status == JobStatus.CANCELLED


async def _status_is(srv: ApiServer, jid: int, status: str) -> bool:
    return (await srv.service.get(jid)).status == status


async def test_sync_events_iterator_follows_a_job_to_its_end(server: ApiServer) -> None:
    jid = (await server.post("/v1/jobs", {"type": "demo.count", "payload": {"steps": 5, "delay_ms": 40}}))[
        "id"
    ]

    def follow() -> list[dict[str, Any]]:
        with ProgressClient(server.url, server.token) as client:
            return list(client.events(jid))

    events = await asyncio.wait_for(asyncio.to_thread(follow), 20)
    assert events[-1]["status"] == "completed" and events[-1]["result"] == {"steps": 5, "executions": 5}
    assert all(e["id"] == jid for e in events)
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs)


async def test_sync_client_calls_and_errors(server: ApiServer) -> None:
    def calls() -> dict[str, Any]:
        out: dict[str, Any] = {}
        with ProgressClient(server.url, server.token) as client:
            out["health"] = client.health()
            jid = client.submit("demo.count", {"steps": 200, "delay_ms": 50}, name="counted")
            out["job"] = client.get(jid)
            out["jobs"] = client.jobs(status="active")
            out["cancel"] = client.cancel(jid)
            try:
                client.get(999)
            except ProgressApiError as exc:
                out["404"] = (exc.status, exc.error, exc.detail)
            try:
                client.resume(jid)
            except ProgressApiError as exc:
                out["409"] = (exc.status, exc.error)
            out["stats"] = client.stats()
        with ProgressClient(server.url, "wrong-token") as bad:
            try:
                bad.stats()
            except ProgressApiError as exc:
                out["401"] = (exc.status, exc.error)
        return out

    out = await asyncio.to_thread(calls)
    assert out["health"] == {"status": "ok"}
    assert out["job"]["name"] == "counted"
    assert [j["id"] for j in out["jobs"]] == [out["job"]["id"]]
    assert out["cancel"]["action"] == "cancel"
    assert out["404"] == (404, "not_found", "No job #999")
    assert out["409"][0] == 409
    assert out["401"] == (401, "unauthorized")
    assert out["stats"]["total"] == 1


async def test_client_without_a_token_says_how_to_set_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROGRESSBOT_HTTP__TOKEN", raising=False)
    with pytest.raises(ValueError, match="PROGRESSBOT_HTTP__TOKEN"):
        ProgressClient("http://127.0.0.1:1")
    monkeypatch.setenv("PROGRESSBOT_HTTP__TOKEN", "t")
    monkeypatch.setenv("PROGRESSBOT_URL", "http://127.0.0.1:4321/")
    assert ProgressClient().url == "http://127.0.0.1:4321"


async def test_reports_survive_an_unreachable_service() -> None:
    # Nothing listens on this port: the program keeps running and the sender keeps its logs for later.
    with ProgressClient("http://127.0.0.1:9", "t") as client:
        with pytest.raises(OSError):
            client.stats()


# ------------------------------------------------------------ async client
async def test_async_client_tracks_pauses_and_streams(server: ApiServer) -> None:
    async with AsyncProgressClient(server.url, server.token, min_interval=0.1) as client:
        async with client.track("async build", total=10, room="!r:example.org") as job:
            events: list[dict[str, Any]] = []

            async def follow() -> None:
                async for ev in client.events(job.id):
                    events.append(ev)

            follower = asyncio.create_task(follow())
            job.advance(3, message="three")
            await wait_for(lambda: job.reports_sent >= 1)
            await server.post(f"/v1/jobs/{job.id}/pause")
            await wait_for(lambda: job.should_pause, timeout=5)
            waiter = asyncio.create_task(job.wait_if_paused())
            await asyncio.sleep(0.05)
            assert not waiter.done()
            await server.post(f"/v1/jobs/{job.id}/resume")
            await asyncio.wait_for(waiter, 5)
            assert job.control == "run"
            job.advance(7, message="ten")
            job.log("async done")
        await asyncio.wait_for(follower, 10)
        assert (await client.get(job.id))["status"] == "completed"
        statuses = [e["status"] for e in events]
        assert "paused" in statuses and statuses[-1] == "completed"
        assert events[-1]["progress"]["current"] == 10

        async with client.track("async cancelled") as job2:
            await server.post(f"/v1/jobs/{job2.id}/cancel")
            with pytest.raises(JobCancelledError):
                for _ in range(500):
                    await job2.checkpoint()
                    job2.advance()
                    await asyncio.sleep(0.01)
        assert (await client.get(job2.id))["status"] == "cancelled"

        with pytest.raises(RuntimeError):
            async with client.track("async failed") as job3:
                raise RuntimeError("nope")
        failed = await client.get(job3.id)
        assert failed["status"] == "failed" and failed["error"] == "RuntimeError: nope"

        with pytest.raises(ProgressApiError) as err:
            await client.act(999, "pause")
        assert err.value.status == 404


# ------------------------------------------------------------------ CLI
runner = CliRunner()


def invoke(args: list[str], env: dict[str, str] | None = None) -> Any:
    return runner.invoke(cli_app, args, env=env, catch_exceptions=False)


async def test_url_from_listen() -> None:
    assert url_from_listen("127.0.0.1:8765") == "http://127.0.0.1:8765"
    assert url_from_listen("0.0.0.0:80") == "http://127.0.0.1:80"
    assert url_from_listen("[::]:80") == "http://[::1]:80"
    assert url_from_listen("[::1]:81") == "http://[::1]:81"


async def test_cli_watch_follows_a_job_and_exits_with_its_outcome(server: ApiServer) -> None:
    ok = (await server.post("/v1/jobs", {"type": "demo.count", "payload": {"steps": 4, "delay_ms": 30}}))[
        "id"
    ]
    res = await asyncio.to_thread(invoke, ["watch", str(ok), "--url", server.url, "--token", server.token])
    assert res.exit_code == 0, res.output
    assert f"#{ok} demo.count: completed" in res.output

    bad = (
        await server.post(
            "/v1/jobs", {"type": "demo.count", "payload": {"steps": 3, "delay_ms": 10, "fail_at": 2}}
        )
    )["id"]
    env = {"PROGRESSBOT_URL": server.url, "PROGRESSBOT_HTTP__TOKEN": server.token}
    res = await asyncio.to_thread(invoke, ["watch", f"#{bad}", "--json"], env)
    assert res.exit_code == 1
    lines = [json.loads(x) for x in res.stdout.splitlines() if x.startswith("{")]
    assert lines[-1]["status"] == "failed" and "failed at step 2" in lines[-1]["error"]

    res = await asyncio.to_thread(invoke, ["watch", "999", "--url", server.url, "--token", server.token])
    assert res.exit_code == 1 and "No job #999" in res.output
    res = await asyncio.to_thread(invoke, ["watch", "1", "--url", server.url, "--token", "nope"])
    assert res.exit_code == 1 and "refused the token" in res.output
    res = await asyncio.to_thread(invoke, ["watch", "x y", "--url", server.url, "--token", "t"])
    assert res.exit_code == 2


async def test_cli_watch_finds_the_service_from_http_listen_in_the_config(
    server: ApiServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PROGRESSBOT_URL", raising=False)
    config = tmp_path / "config.toml"
    config.write_text(f'[http]\nlisten = "0.0.0.0:{server.api.port}"\n')
    jid = (await server.post("/v1/jobs", {"name": "from config"}))["id"]
    await server.post(f"/v1/jobs/{jid}/complete")
    args = ["watch", str(jid), "--config", str(config), "--token", server.token]
    res = await asyncio.to_thread(invoke, args)
    assert res.exit_code == 0, res.output
    assert f"#{jid} from config: completed" in res.output


async def test_cli_watch_a_batch_draws_one_bar_per_job_and_batch(server: ApiServer) -> None:
    created = await server.post(
        "/v1/batches",
        {
            "name": "nightly",
            "jobs": [
                {"type": "demo.count", "payload": {"steps": 2, "delay_ms": 20}, "name": "first"},
                {"type": "demo.count", "payload": {"steps": 2, "delay_ms": 20}, "name": "second"},
            ],
        },
    )
    bid = created["id"]
    res = await asyncio.to_thread(invoke, ["watch", f"b{bid}", "--url", server.url, "--token", server.token])
    assert res.exit_code == 0, res.output
    assert f"batch b{bid} nightly: completed" in res.output
    for jid in created["jobs"]:
        assert f"#{jid} " in res.output


async def test_cli_watch_without_a_token_exits_2(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("PROGRESSBOT_HTTP__TOKEN", raising=False)
    monkeypatch.chdir(tmp_path)
    res = await asyncio.to_thread(invoke, ["watch", "--url", "http://127.0.0.1:1"])
    assert res.exit_code == 2 and "PROGRESSBOT_HTTP__TOKEN" in res.output


async def test_cli_track_runs_a_command_as_a_tracked_job(server: ApiServer) -> None:
    base = ["track", "--url", server.url, "--token", server.token]
    code = "import sys\nfor i in range(5): print(f'line {i}', flush=True)"
    res = await asyncio.to_thread(invoke, [*base, "--name", "five lines", "--", sys.executable, "-c", code])
    assert res.exit_code == 0, res.output
    assert "line 4" in res.stdout  # the output is passed through
    (jid,) = await tracked_ids(server)
    job = await server.service.get(jid)
    assert job.name == "five lines" and job.status == JobStatus.COMPLETED
    assert job.progress_message == "line 4" and job.result == {"exit_code": 0}

    res = await asyncio.to_thread(invoke, [*base, "-n", "failing", "--", "echo half way; exit 3"])
    assert res.exit_code == 3
    failed = await server.service.get(max(await tracked_ids(server)))
    assert failed.status == JobStatus.FAILED and failed.error == "exit code 3: half way"

    res = await asyncio.to_thread(
        invoke, [*base, "-n", "counted", "--total", "3", "-q", "--", "printf 'a\\nb\\nc\\n'"]
    )
    assert res.exit_code == 0 and "a" not in res.stdout.replace("tracking as", "")
    counted = await server.service.get(max(await tracked_ids(server)))
    assert counted.status == JobStatus.COMPLETED and counted.progress_current == 3


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to look at the process state")
async def test_cli_track_pause_stops_the_command_and_cancel_terminates_it(
    server: ApiServer, tmp_path: Path
) -> None:
    pidfile = tmp_path / "pid"
    code = (
        "import os, time\n"
        f"open({str(pidfile)!r}, 'w').write(str(os.getpid()))\n"
        "i = 0\n"
        "while i < 1200:  # at most a minute, should the test fail\n"
        "    i += 1\n"
        "    print(f'tick {i}', flush=True)\n"
        "    time.sleep(0.05)\n"
    )
    args = [
        "track",
        "--url",
        server.url,
        "--token",
        server.token,
        "-n",
        "ticker",
        "-q",
        "--",
        sys.executable,
        "-c",
        code,
    ]
    task = asyncio.create_task(asyncio.to_thread(invoke, args))
    await wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), timeout=20)
    pid = int(pidfile.read_text())
    (jid,) = await tracked_ids(server)

    def state() -> str:
        # /proc/PID/stat: "pid (comm) S ...": the field after the closing parenthesis.
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]

    await server.post(f"/v1/jobs/{jid}/pause")
    await wait_for(lambda: state() == "T", timeout=10)  # stopped by SIGSTOP
    await server.post(f"/v1/jobs/{jid}/resume")
    await wait_for(lambda: state() in ("S", "R"), timeout=10)
    await server.post(f"/v1/jobs/{jid}/cancel", {"actor": "@carol:example.org"})
    res = await asyncio.wait_for(task, 30)
    assert res.exit_code == 128 + 15, res.output  # terminated by SIGTERM
    assert "was cancelled" in res.output
    assert (await server.service.get(jid)).status == JobStatus.CANCELLED


# ------------------------------------------------------------ app wiring
async def test_application_starts_the_http_api_when_configured(tmp_path: Path) -> None:
    import aiohttp

    from bot.app import Application
    from bot.settings import DatabaseSettings, HttpSettings, Settings

    settings = Settings(
        database=DatabaseSettings(url=f"sqlite:///{tmp_path}/app.db"),
        http=HttpSettings(listen="127.0.0.1:0", token=SecretStr("app-token-123")),
    )
    application = Application(settings, with_adapters=False)
    await application.start()
    try:
        url = application.http.url
        async with aiohttp.ClientSession() as s:
            async with s.get(url + "/healthz") as resp:
                assert resp.status == 200
            async with s.post(
                url + "/v1/jobs", json={"name": "x"}, headers={"Authorization": "Bearer app-token-123"}
            ) as resp:
                assert resp.status == 201
    finally:
        await application.stop()
