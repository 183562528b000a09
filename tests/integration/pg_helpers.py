"""Helpers for the PostgreSQL multi-process tests: worker subprocesses, the effects file, waiting."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tests.servers.postgres import PostgresServer

ROOT = Path(__file__).resolve().parents[2]


def fresh_db(server: PostgresServer) -> str:
    """The URL of a new, empty database on the test server."""
    return server.create_database("t_" + os.urandom(6).hex())


@dataclass
class WorkerProc:
    """A worker subprocess and where its output goes."""

    proc: subprocess.Popen[bytes]
    log: Path
    worker_id: str = ""

    @property
    def pid(self) -> int:
        """The process id."""
        return self.proc.pid

    def output(self) -> str:
        """What it printed so far (stdout and stderr)."""
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def wait_ready(self, timeout: float = 30.0) -> str:
        """Wait for ``ready <worker id>`` (pg_worker prints it once it claims); returns the worker id."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.output().splitlines():
                if line.startswith("ready "):
                    self.worker_id = line.split()[1]
                    return self.worker_id
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.output()}")
            time.sleep(0.05)
        raise AssertionError(f"worker not ready in {timeout}s:\n{self.output()}")

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM (a graceful stop) and wait; SIGKILL if it does not exit. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def start_pg_worker(url: str, effects: Path, log: Path, *args: str) -> WorkerProc:
    """Start ``tests/integration/pg_worker.py`` (see its doc) on ``url``."""
    fh: IO[bytes]
    with open(log, "ab") as fh:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.integration.pg_worker",
                "--url",
                url,
                "--effects",
                str(effects),
                *args,
            ],
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
            env=_env(),
        )
    return WorkerProc(proc, log)


def start_cli_worker(config: Path, log: Path) -> WorkerProc:
    """Start the real ``progressbot worker --config CONFIG``."""
    with open(log, "ab") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bot.cli", "worker", "--config", str(config)],
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
            env=_env(),
        )
    return WorkerProc(proc, log)


def write_config(path: Path, url: str, **worker: Any) -> Path:
    """A TOML config for ``progressbot`` on ``url`` with short intervals for tests."""
    lines = ["[database]", f'url = "{url}"', "[worker]"]
    worker = {"concurrency": 4, "lease_seconds": 5.0, "shutdown_grace_seconds": 2.0, **worker}
    for key, value in worker.items():
        lines.append(f"{key} = {value!r}" if not isinstance(value, str) else f'{key} = "{value}"')
    lines += ["[progress]", "min_interval_ms = 100", "poll_interval_ms = 200"]
    path.write_text("\n".join(lines) + "\n")
    return path


def read_effects(path: Path) -> list[list[str]]:
    """The effects file's lines, split into fields."""
    if not path.exists():
        return []
    return [line.split() for line in path.read_text().splitlines() if line.strip()]


def stop_all(workers: list[WorkerProc]) -> None:
    """Stop every worker still running (test teardown)."""
    for w in workers:
        if w.proc.poll() is None:
            w.proc.kill()
    for w in workers:
        try:
            w.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass


async def wait_for(
    predicate: Callable[[], Awaitable[Any]], timeout: float = 30.0, interval: float = 0.05, what: str = ""
) -> Any:
    """Poll an async predicate until it returns something truthy; fail the test on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s" + (f": {what}" if what else ""))
        await asyncio.sleep(interval)


def spans(
    lines: list[list[str]], killed: dict[int, int] | None = None
) -> Iterator[tuple[int, int, int, int]]:
    """``(job id, pid, start t, end t)`` for each run of ``slow`` in the effects lines.

    A run without an ``end`` (its process was killed, or it stopped at a checkpoint) ends at its last step,
    or at the kill time of its process when ``killed`` (pid -> monotonic ns) says so.
    """
    open_runs: dict[tuple[int, int], tuple[int, int]] = {}
    for f in lines:
        if f[0] == "start":
            key = (int(f[1]), int(f[2]))
            if key in open_runs:
                yield (*key, *open_runs.pop(key))
            open_runs[key] = (int(f[4]), int(f[4]))
        elif f[0] == "step":
            key = (int(f[1]), int(f[2]))
            start, _ = open_runs[key]
            open_runs[key] = (start, int(f[4]))
        elif f[0] == "end":
            key = (int(f[1]), int(f[2]))
            start, _ = open_runs.pop(key)
            yield (*key, start, int(f[3]))
    for (jid, pid), (start, last) in open_runs.items():
        yield jid, pid, start, (killed or {}).get(pid, last)
