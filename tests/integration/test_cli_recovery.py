"""The CLI and crash recovery, as real subprocesses: ``progressbot run`` killed with SIGKILL mid-job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

PROGRESSBOT = [sys.executable, "-m", "bot.cli"]


def write_config(tmp_path: Path, **extra: str) -> Path:
    cfg = tmp_path / "config.toml"
    lines = [
        "[database]",
        f'url = "sqlite:///{tmp_path}/pb.db"',
        "[worker]",
        "concurrency = 4",
        "[progress]",
        "min_interval_ms = 100",
        "poll_interval_ms = 100",
    ]
    lines += [f"{k} = {v}" for k, v in extra.items()]
    cfg.write_text("\n".join(lines) + "\n")
    return cfg


def cli(cfg: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PROGRESSBOT_CONFIG=str(cfg))
    res = subprocess.run([*PROGRESSBOT, *args], capture_output=True, text=True, env=env, timeout=60)
    if check and res.returncode != 0:
        raise AssertionError(f"{args} exited {res.returncode}: {res.stderr}")
    return res


def status(cfg: Path, job_id: int) -> dict[str, Any]:
    return json.loads(cli(cfg, "status", str(job_id), "--json").stdout)


def wait_for(pred: Any, timeout: float = 30.0, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        val = pred()
        if val:
            return val
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval)


def start_service(cfg: Path, log: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PROGRESSBOT_CONFIG=str(cfg))
    with open(log, "ab") as fh:
        return subprocess.Popen(
            [*PROGRESSBOT, "run"], stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )


def test_kill9_recovery_pauses_then_resume_completes(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    # Long enough (15 s) that the jobs are still running when the kill comes, however slow each CLI call
    # is on a loaded machine (one `status` call has taken 1.7 s under load).
    steps = 150
    ids = [
        json.loads(cli(cfg, "submit", "demo.count", f"steps={steps}", "delay_ms=100", "--json").stdout)["id"]
        for _ in range(3)
    ]
    proc = start_service(cfg, tmp_path / "run1.log")
    try:
        wait_for(lambda: all((status(cfg, i)["progress"]["current"] or 0) >= 3 for i in ids))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    before = {i: status(cfg, i) for i in ids}
    assert all(d["status"] == "running" for d in before.values())

    proc = start_service(cfg, tmp_path / "run2.log")
    try:
        after = wait_for(
            lambda: (lambda s: s if all(d["status"] == "paused" for d in s.values()) else None)(
                {i: status(cfg, i) for i in ids}
            )
        )
        for d in after.values():
            assert d["interrupted"] is True
            assert any(a["message"] == "interrupted by restart" for a in d["activity"])
            assert d["checkpoint"]["next"] >= 3
        time.sleep(0.5)  # nothing starts again on its own
        assert all(status(cfg, i)["status"] == "paused" for i in ids)
        for i in ids:
            cli(cfg, "resume", str(i))
        done = wait_for(
            lambda: (lambda s: s if all(d["status"] == "completed" for d in s.values()) else None)(
                {i: status(cfg, i) for i in ids}
            ),
            timeout=120,
        )
        for d in done.values():
            # No step lost; at most the one interrupted step ran again.
            assert d["result"]["steps"] == steps
            assert steps <= d["result"]["executions"] <= steps + 1
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0


def test_requeue_policy_restarts_jobs_by_itself(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    cfg.write_text(cfg.read_text().replace("concurrency = 4", 'concurrency = 4\nrecovery = "requeue"'))
    jid = json.loads(cli(cfg, "submit", "demo.count", "steps=20", "delay_ms=100", "--json").stdout)["id"]
    proc = start_service(cfg, tmp_path / "run1.log")
    try:
        wait_for(lambda: (status(cfg, jid)["progress"]["current"] or 0) >= 2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    proc = start_service(cfg, tmp_path / "run2.log")
    try:
        d = wait_for(
            lambda: (lambda s: s if s["status"] == "completed" else None)(status(cfg, jid)), timeout=60
        )
        assert 20 <= d["result"]["executions"] <= 21
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)


def test_sigterm_is_graceful_and_jobs_continue(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    jid = json.loads(cli(cfg, "submit", "demo.count", "steps=100", "delay_ms=50", "--json").stdout)["id"]
    proc = start_service(cfg, tmp_path / "run1.log")
    wait_for(lambda: (status(cfg, jid)["progress"]["current"] or 0) >= 2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    d = status(cfg, jid)
    assert d["status"] == "pending" and not d["interrupted"]
    proc = start_service(cfg, tmp_path / "run2.log")
    try:
        d = wait_for(
            lambda: (lambda s: s if s["status"] == "completed" else None)(status(cfg, jid)), timeout=60
        )
        assert d["result"] == {"steps": 100, "executions": 100}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)


def test_cli_errors_are_readable(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    res = cli(cfg, "status", "999", check=False)
    assert res.returncode == 1 and "No job #999" in res.stderr and "Traceback" not in res.stderr
    res = cli(cfg, "pause", "abc", check=False)
    assert res.returncode == 2 and "not a job id" in res.stderr
    res = cli(cfg, "submit", "demo.count", "steps=lots", check=False)
    assert res.returncode == 1 and "steps" in res.stderr and "Traceback" not in res.stderr
    res = cli(cfg, "submit", "nope.job", check=False)
    assert res.returncode == 1 and "Unknown job type 'nope.job'" in res.stderr
    assert json.loads(cli(cfg, "jobs", "--all", "--json").stdout) == []  # nothing was stored
    jid = json.loads(cli(cfg, "submit", "demo.count", "steps=2", "--json").stdout)["id"]
    cli(cfg, "cancel", str(jid))
    res = cli(cfg, "pause", str(jid), check=False)
    assert res.returncode == 1 and f"Job #{jid} is cancelled; it can't be paused" in res.stderr
    res = cli(cfg, "retry", str(jid), "--json")
    assert json.loads(res.stdout)["status"] == "pending"


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ("[worker]\nconcurrency = 0\n", "worker.concurrency"),
        ('[worker]\nrecovery = "sometimes"\n', "worker.recovery"),
        ('[progress]\nmin_interval_ms = "fast"\n', "progress.min_interval_ms"),
        ("[wrker]\nconcurrency = 2\n", "wrker: unknown key"),
        ('[[schedule]]\njob = "maintenance.cleanup"\ncron = "every day"\n', "schedule.0.cron"),
        ("this is not toml", "invalid TOML"),
    ],
)
def test_invalid_config_exits_2_with_key(tmp_path: Path, toml: str, expected: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(toml)
    res = subprocess.run(
        [*PROGRESSBOT, "jobs", "--config", str(cfg)], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 2, res.stderr
    assert expected in res.stderr and "Traceback" not in res.stderr


def test_env_overrides_config(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    env = dict(os.environ, PROGRESSBOT_CONFIG=str(cfg), PROGRESSBOT_WORKER__CONCURRENCY="0")
    res = subprocess.run([*PROGRESSBOT, "jobs"], capture_output=True, text=True, env=env, timeout=60)
    assert res.returncode == 2 and "worker.concurrency" in res.stderr
