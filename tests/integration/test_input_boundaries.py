"""Every input boundary refuses what it cannot represent with a 4xx or a ``key: problem`` line and exit 2,
and database trouble is a readable condition (HTTP 503 + Retry-After, a CLI line), never a traceback."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pydantic import SecretStr

from bot.http_api import HttpApi
from bot.settings import HttpSettings
from core.builtin import register_builtins
from core.db import Database
from core.registry import HandlerRegistry
from core.service import ProgressService, ServiceConfig
from tests.integration.http_helpers import ApiServer, ServerFactory

pytest_plugins = ["tests.integration.http_fixtures"]

PROGRESSBOT = [sys.executable, "-m", "bot.cli"]
REPO = str(Path(__file__).resolve().parents[2])


async def total(srv: ApiServer) -> int:
    return int((await srv.service.stats())["total"])


def deep(depth: int) -> bytes:
    return b'{"type": "demo.count", "payload": {"a": ' + b"[" * depth + b"]" * depth + b"}}"


async def test_http_refuses_what_it_cannot_represent(make_server: ServerFactory) -> None:
    srv = await make_server()
    json_ct = {"Content-Type": "application/json"}
    cases: list[tuple[str, str, Any, int, str]] = [
        ("POST", "/v1/jobs", deep(1000), 400, "nested deeper than 64 levels"),
        ("POST", "/v1/jobs", deep(200_000), 400, "nested deeper than 64 levels"),
        ("POST", "/v1/jobs", deep(70), 400, "nested deeper than 64 levels"),
        (
            "POST",
            "/v1/jobs",
            {"type": "demo.count", "run_at": "9999-12-31T23:59:59-14:00"},
            422,
            "run_at: out of range",
        ),
        ("POST", "/v1/jobs", {"type": "demo.count", "priority": 10**30}, 422, "priority"),
        ("POST", "/v1/jobs", {"type": "demo.count", "timeout": 1e300}, 422, "timeout"),
        ("POST", "/v1/jobs", b'{"type": "demo.count", "delay": 1e999}', 422, "delay"),
        ("POST", "/v1/jobs", b'{"type": "demo.count", "priority": ' + b"9" * 5000 + b"}", 400, "JSON"),
        ("POST", "/v1/jobs", {"name": "t", "total": 10**400}, 422, "total"),
        ("GET", "/v1/batches/" + str(2**70), None, 404, "No batch"),
        ("POST", "/v1/batches/" + str(2**70) + "/cancel", None, 404, "No batch"),
        ("GET", "/v1/jobs/" + str(2**70), None, 404, "No job"),
        ("GET", "/v1/jobs/2147483648", None, 404, "No job"),  # past PostgreSQL's 32-bit id column
        ("GET", "/v1/batches/b2147483648", None, 404, "No batch"),
        ("GET", "/v1/jobs/１２", None, 404, "No job"),
        ("GET", "/v1/jobs/١٢", None, 404, "No job"),
        ("GET", "/v1/jobs?batch=١٢", None, 400, "batch: must be an integer"),
        ("GET", "/v1/jobs?limit=1_0", None, 400, "limit: must be an integer"),
        ("GET", "/v1/jobs?batch=" + "9" * 30, None, 400, "batch"),
        ("GET", "/v1/events?batch=" + str(2**70), None, 404, "No batch"),
        ("GET", "/v1/events?after=1e5", None, 400, "Last-Event-ID: must be an integer"),
    ]
    for method, path, body, status, detail in cases:
        got, data = await srv.call(method, path, body, headers=json_ct if isinstance(body, bytes) else {})
        assert got == status, (path, body if not isinstance(body, bytes) else body[:60], got, data)
        assert detail in data["detail"], (path, data)
    assert await total(srv) == 0
    assert (await srv.call("GET", "/healthz"))[0] == 200


@pytest.fixture
def locked_db(tmp_path: Path) -> Iterator[tuple[str, sqlite3.Connection]]:
    """A SQLite database with the schema, and a connection that can hold its write lock."""
    path = tmp_path / "locked.db"
    db = Database(f"sqlite:///{path}")
    db.create_schema()
    db.close()
    conn = sqlite3.connect(path, isolation_level=None, timeout=10)
    yield f"sqlite:///{path}", conn
    conn.close()


async def busy_service(url: str, *, busy_timeout_ms: int, run_worker: bool = True) -> ProgressService:
    """A started service on ``url`` that gives up on a lock after ``busy_timeout_ms``."""
    reg = HandlerRegistry()
    svc = ProgressService(
        ServiceConfig(database_url=url, min_interval=0.1, poll_interval=0.1, run_worker=run_worker),
        registry=reg,
        database=Database(url, busy_timeout_ms=busy_timeout_ms),
    )
    register_builtins(reg, lambda: svc.store)
    await svc.start()
    return svc


async def test_http_answers_503_while_the_database_is_locked(
    locked_db: tuple[str, sqlite3.Connection], caplog: pytest.LogCaptureFixture
) -> None:
    url, holder = locked_db
    svc = await busy_service(url, busy_timeout_ms=200)
    api = HttpApi(svc, HttpSettings(listen="127.0.0.1:0", token=SecretStr("t" * 32)))
    await api.start()
    try:
        async with aiohttp.ClientSession(headers={"Authorization": "Bearer " + "t" * 32}) as s:
            holder.execute("BEGIN IMMEDIATE")  # another process's long write transaction
            await asyncio.sleep(0.5)  # the service's own loops meet the lock too
            async with s.post(api.url + "/v1/jobs", json={"type": "demo.count"}) as resp:
                assert resp.status == 503
                assert resp.headers["Retry-After"] == "2"
                assert await resp.json() == {
                    "error": "database_busy",
                    "detail": "the database is busy; try again shortly",
                }
            holder.execute("ROLLBACK")
            async with s.post(
                api.url + "/v1/jobs", json={"type": "demo.count", "payload": {"steps": 1}}
            ) as r:
                assert r.status == 201
    finally:
        await api.stop()
        await svc.stop()
    assert holder.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert holder.execute("SELECT count(*) FROM jobs").fetchone() == (1,)
    # A locked database is an operator's condition: readable log lines, no tracebacks.
    assert not [r for r in caplog.records if r.exc_info], caplog.text
    assert "claim failed; retrying: the database is busy (database is locked)" in caplog.text


@pytest.mark.postgres
@pytest.mark.slow
async def test_http_answers_503_while_a_postgres_row_is_locked(
    postgres_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """PostgreSQL has row locks instead of one write lock: a pause that waits longer than the busy timeout
    for another session's lock on the job gets the same 503 + Retry-After, and works once it is released."""
    import psycopg

    name = "t_" + os.urandom(6).hex()
    url = postgres_server.create_database(name)
    svc = await busy_service(url, busy_timeout_ms=300)
    api = HttpApi(svc, HttpSettings(listen="127.0.0.1:0", token=SecretStr("t" * 32)))
    await api.start()
    holder = await psycopg.AsyncConnection.connect(postgres_server.conninfo(name))
    try:
        async with aiohttp.ClientSession(headers={"Authorization": "Bearer " + "t" * 32}) as s:
            # A job that waits (run_at in an hour), so only the lock decides what the pause meets.
            body = {"type": "demo.count", "payload": {"steps": 1}, "delay": 3600}
            async with s.post(api.url + "/v1/jobs", json=body) as r:
                assert r.status == 201, await r.text()
                job_id = (await r.json())["id"]
            # Another session (an operator's psql, a long report) holds the job's row lock.
            await holder.execute("SELECT id FROM jobs WHERE id = %s FOR UPDATE", (job_id,))
            async with s.post(f"{api.url}/v1/jobs/{job_id}/pause") as resp:
                assert resp.status == 503, await resp.text()
                assert resp.headers["Retry-After"] == "2"
                assert (await resp.json())["error"] == "database_busy"
            await holder.rollback()
            async with s.post(f"{api.url}/v1/jobs/{job_id}/pause") as resp:
                assert resp.status == 200, await resp.text()
            async with s.get(f"{api.url}/v1/jobs/{job_id}") as resp:
                assert (await resp.json())["status"] == "paused"
    finally:
        await holder.close()
        await api.stop()
        await svc.stop()
    assert not [r for r in caplog.records if r.exc_info], caplog.text


FROZEN_HOLDER = """
import os, signal, sys
from sqlalchemy import text
from core.db import Database
db = Database(sys.argv[1])
with db.engine.connect() as conn:
    conn.execute(text("BEGIN"))
    conn.execute(text("SELECT id FROM jobs WHERE id = :i FOR UPDATE"), {"i": int(sys.argv[2])})
    print("locked", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)  # frozen inside the transaction, holding the row lock
"""


@pytest.mark.postgres
@pytest.mark.slow
async def test_a_process_frozen_in_a_transaction_does_not_block_its_rows_forever(
    postgres_server: Any, tmp_path: Path
) -> None:
    """A progressbot process stopped (SIGSTOP) inside a transaction: PostgreSQL ends its session after
    ``IDLE_IN_TRANSACTION_MS``, so the job it locked can be paused again instead of 503 forever."""
    from core.db import IDLE_IN_TRANSACTION_MS

    name = "t_" + os.urandom(6).hex()
    url = postgres_server.create_database(name)
    svc = await busy_service(url, busy_timeout_ms=300, run_worker=False)
    job = await svc.submit("demo.count", {"steps": 1})
    frozen = await asyncio.create_subprocess_exec(
        *(sys.executable, "-c", FROZEN_HOLDER, url, str(job.id)),
        stdout=asyncio.subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=REPO),
    )
    try:
        assert frozen.stdout is not None
        assert (await frozen.stdout.readline()).strip() == b"locked"
        with pytest.raises(Exception) as busy:
            await svc.pause(job.id or 0)
        assert "lock timeout" in str(busy.value)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + IDLE_IN_TRANSACTION_MS / 1000 + 20
        while True:
            try:
                result = await svc.pause(job.id or 0)
                break
            except Exception as exc:
                assert "lock timeout" in str(exc), exc
                assert loop.time() < deadline, "the frozen session kept its lock"
                await asyncio.sleep(0.5)
        assert result.job.status == "paused"
    finally:
        frozen.kill()
        await frozen.wait()
        await svc.stop()


def cli(
    *args: str | bytes, cfg: Path | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("PROGRESSBOT_CONFIG", None)
    if cfg is not None:
        env["PROGRESSBOT_CONFIG"] = str(cfg)
    env["COLUMNS"] = "80"
    return subprocess.run(
        [*PROGRESSBOT, *args], capture_output=True, text=True, env=env, timeout=60, cwd=cwd, errors="replace"
    )


def config(tmp_path: Path, url: str, name: str = "config.toml", extra: str = "") -> Path:
    cfg = tmp_path / name
    cfg.write_text(f'{extra}[database]\nurl = "{url}"\nbusy_timeout_ms = 200\n')
    return cfg


def assert_readable(res: subprocess.CompletedProcess[str], code: int, line: str) -> None:
    assert res.returncode == code, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout
    assert line in res.stderr.splitlines(), res.stderr


@pytest.mark.slow
def test_cli_refuses_bad_options_readably(tmp_path: Path) -> None:
    cfg = config(tmp_path, f"sqlite:///{tmp_path}/pb.db")
    for args, line in [
        (["--delay", "nan"], "delay: must be between 0 and 31622400 seconds"),
        (["--delay", "inf"], "delay: must be between 0 and 31622400 seconds"),
        (["--priority", "100000000000000000000"], "priority: must be between -1000000 and 1000000"),
        (["--max-attempts", "0"], "max_attempts: must be between 1 and 100"),
        (["--timeout", "nan"], "timeout: must be more than 0 and at most 31622400 seconds"),
        (["--payload", "[1]"], "payload: the JSON payload must be an object, not list"),
        (["--payload", "steps=3"], "payload: invalid JSON payload: Expecting value at position 0"),
        (["--payload", "[" * 100_000], "payload: invalid JSON payload: nested too deeply"),
        (
            ["--payload", '{"steps": 3}', "steps=4"],
            "payload: give KEY=VALUE arguments or --payload, not both",
        ),
    ]:
        assert_readable(cli("submit", "demo.count", *args, cfg=cfg), 2, line)
    res = cli("submit", "demo.count", "--priority", "1e20", cfg=cfg)
    assert res.returncode == 2 and "Error: Invalid value for '--priority'" in res.stderr
    assert "Traceback" not in res.stderr
    # A non-UTF-8 argument (bytes the OS gives as they are).
    res = subprocess.run(
        [*PROGRESSBOT, "submit", b"demo.\xff", "steps=1"],
        capture_output=True,
        env=dict(os.environ, PROGRESSBOT_CONFIG=str(cfg)),
        timeout=60,
    )
    assert res.returncode == 2 and res.stderr.decode() == "arguments: argument 2 is not valid UTF-8\n"
    # Ids: full-width digits are not a job number.
    assert_readable(
        cli("status", "１２", cfg=cfg), 2, "'１２' is not a job id (expected a number such as 12)"
    )
    # Nothing was submitted by any of it.
    res = cli("jobs", "--all", "--json", cfg=cfg)
    assert res.returncode == 0 and res.stdout.strip() == "[]"


@pytest.mark.slow
def test_cli_reports_database_trouble_readably(
    tmp_path: Path, locked_db: tuple[str, sqlite3.Connection]
) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database, " * 100)
    good = tmp_path / "good.db"
    assert cli("jobs", cfg=config(tmp_path, f"sqlite:///{good}", "good.toml")).returncode == 0
    cases = [
        (f"sqlite:///{tmp_path}/no/such/dir/pb.db", "unable to open database file"),
        (f"sqlite:///{garbage}", "file is not a database"),
        (f"sqlite:///file:{good}?mode=ro&uri=true", "attempt to write a readonly database"),
    ]
    for i, (url, reason) in enumerate(cases):
        res = cli("submit", "demo.count", cfg=config(tmp_path, url, f"c{i}.toml"))
        assert res.returncode == 1, res.stderr
        assert "Traceback" not in res.stderr
        assert res.stderr.startswith("progressbot: cannot use the database sqlite:///"), res.stderr
        assert res.stderr.rstrip().endswith(reason), res.stderr
    # An unreachable PostgreSQL (nothing listens on port 1): the password is not shown.
    res = cli("jobs", cfg=config(tmp_path, "postgresql://pb:s3cret@127.0.0.1:1/pb", "pg.toml"))
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.startswith("progressbot: cannot use the database postgresql"), res.stderr
    assert "s3cret" not in res.stderr and len(res.stderr.splitlines()) == 1
    # The service itself says so too, and exits non-zero.
    res = cli("run", cfg=config(tmp_path, f"sqlite:///{garbage}", "run.toml"))
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "progressbot: cannot use the database" in res.stderr and "file is not a database" in res.stderr

    url, holder = locked_db
    cfg = config(tmp_path, url, "locked.toml")
    holder.execute("BEGIN IMMEDIATE")
    try:
        res = cli("submit", "demo.count", "steps=1", cfg=cfg)
    finally:
        holder.execute("ROLLBACK")
    assert_readable(
        res, 1, "progressbot: the database is busy (another process holds a write lock); try again"
    )
    assert holder.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert holder.execute("SELECT count(*) FROM jobs").fetchone() == (0,)


@pytest.mark.slow
def test_config_errors_are_whole_lines(tmp_path: Path) -> None:
    deep_dir = tmp_path / ("a-rather-long-directory-name-" * 6)
    deep_dir.mkdir()
    bad = deep_dir / "config.toml"
    bad.write_text("[database\nurl = 1\n")
    assert len(str(bad)) > 200
    res = cli("jobs", cfg=bad)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    lines = res.stderr.splitlines()
    assert lines[0] == "Invalid configuration:"
    assert lines[1].startswith(f"  {bad}: invalid TOML: "), lines  # the whole path on one line

    loud = tmp_path / "loud.toml"
    loud.write_text('log_level = "LOUD"\n')
    res = cli("run", cfg=loud)
    assert_readable(res, 2, "  log_level: must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
