"""MCP benchmark: progress-notification latency over stdio and HTTP, and the CPU of 50 streaming clients.

    python bench/mcp.py [--samples 20] [--gap 1.6] [--clients 50] [--seconds 10]

Printed, each beside its peer measured in the same run:

* latency from an event's emission (on the event bus of the service that runs the job) to the MCP
  progress notification arriving at the SDK's client, p50/p95:
    - HTTP: ``job_status(stream=true)`` on ``/mcp`` of the service's API; peer: the API's own NDJSON stream
      (``/v1/events?job=``) of the same job, read at the same time;
    - stdio: a ``progressbot mcp`` subprocess on the same SQLite database, following the job through the
      store; its bound (the service's write tick plus the MCP process's store poll) is printed beside it;
  A tracked job's progress is reported once per ``--gap`` seconds (beyond the 500 ms throttle window), so
  this is the pipeline, not the deliberate throttling.
* the CPU time of the service process over ``--seconds`` while ``--clients`` tracked jobs report progress
  ten times a second (in memory, as a handler's ``report()``; the monitor throttles it to 2 events/s per
  job) and a client streams each job: with MCP streams, with NDJSON streams (peer) and with none (the
  jobs alone). The clients run in a child process, so the figure is the server's.
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file is named mcp.py: drop its own directory from the path, or it would shadow the SDK's mcp package
# (and bench/http.py the standard library's http), and add the project root instead.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from mcp import ClientSession
from pydantic import SecretStr

from bot.app import build_service
from bot.http_api import HttpApi
from bot.mcp_server import STDIO_POLL_MS
from bot.settings import HttpSettings, Settings
from core.events import JobProgressEvent
from core.service import ProgressService
from tests.integration.http_helpers import wait_for
from tests.integration.mcp_helpers import REPO, child_env, http_session, stdio_session, write_config

TOKEN = "bench-token-0123456789"


def quantiles(values: list[float]) -> str:
    """``p50 / p95`` in milliseconds."""
    if len(values) < 2:
        return "n/a (too few samples)"
    cuts = statistics.quantiles(values, n=20, method="inclusive")
    return (
        f"p50 {statistics.median(values) * 1000:7.1f} ms   p95 {cuts[18] * 1000:7.1f} ms   (n={len(values)})"
    )


@contextlib.asynccontextmanager
async def running_service(db: Path, concurrency: int = 4) -> AsyncIterator[tuple[ProgressService, HttpApi]]:
    """The service with default progress settings and its HTTP API (with /mcp) on an ephemeral port."""
    settings = Settings(
        database={"url": f"sqlite:///{db}"},  # type: ignore[arg-type]
        worker={"concurrency": concurrency},  # type: ignore[arg-type]
    )
    service = build_service(settings)
    await service.start()
    api = HttpApi(service, HttpSettings(listen="127.0.0.1:0", token=SecretStr(TOKEN)), app_settings=settings)
    await api.start()
    try:
        yield service, api
    finally:
        await api.stop()
        await service.stop()


class Emissions:
    """When each progress message of one job was first emitted on the bus (a bus listener)."""

    def __init__(self, service: ProgressService, job_id: int) -> None:
        self.at: dict[str, float] = {}
        #: When the service committed progress writes (another process can read them from then on).
        self.writes: list[float] = []
        self._job = job_id
        self._service = service
        service.bus.add_listener(self._on_event)
        service.store.add_change_listener(self._on_change)

    def _on_event(self, ev: JobProgressEvent) -> None:
        if ev.type == "job" and ev.id == self._job and ev.message and ev.message not in self.at:
            self.at[ev.message] = time.monotonic()

    def _on_change(self, kind: str) -> None:
        if kind == "rows":
            self.writes.append(time.monotonic())

    def close(self) -> None:
        """Stop listening."""
        self._service.bus.remove_listener(self._on_event)
        self._service.store.remove_change_listener(self._on_change)

    def latencies(self, received: dict[str, float]) -> list[float]:
        """Reception minus emission, per message seen on both sides."""
        return [received[m] - self.at[m] for m in received if m in self.at and m.startswith("sample ")]

    def from_commit(self, received: dict[str, float]) -> list[float]:
        """Reception minus the first progress commit after the emission, per message."""
        out = []
        for m, got in received.items():
            emitted = self.at.get(m)
            if emitted is None or not m.startswith("sample "):
                continue
            commit = next((w for w in self.writes if w >= emitted), None)
            if commit is not None:
                out.append(got - commit)
        return out


async def drive(service: ProgressService, job_id: int, samples: int, gap: float) -> None:
    """Report a tracked job's progress once per ``gap`` seconds, then complete it."""
    for i in range(1, samples + 1):
        await service.tracked_report(job_id, current=i, total=samples + 1, message=f"sample {i}")
        await asyncio.sleep(gap)
    await asyncio.sleep(gap)
    await service.tracked_finish(job_id, ok=True, result={"samples": samples})


def follow_job(session: ClientSession, job_id: int, received: dict[str, float]) -> asyncio.Task[Any]:
    """Start ``job_status(stream=true)`` on a session, noting when each job message arrives."""

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        text = (message or "").rsplit(" · ", 1)[-1]
        received.setdefault(text, time.monotonic())

    return asyncio.create_task(
        session.call_tool(
            "job_status", {"id": job_id, "stream": True, "max_seconds": 3600}, progress_callback=on_progress
        )
    )


async def read_ndjson_stream(url: str, job_id: int, received: dict[str, float]) -> None:
    """The peer: the API's NDJSON stream of the job, noting when each message first arrived."""
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http,
        http.get(f"{url}/v1/events?job={job_id}", timeout=aiohttp.ClientTimeout(total=None)) as resp,
    ):
        async for line in resp.content:
            if line.strip():
                ev = json.loads(line)
                if ev.get("message"):
                    received.setdefault(ev["message"], time.monotonic())


async def latency_http(tmp: Path, samples: int, gap: float) -> None:
    """MCP over HTTP vs the NDJSON stream, on the same job at the same time."""
    async with running_service(tmp / "http.db") as (service, api):
        job = await service.track("latency", total=samples + 1)
        assert job.id is not None
        emitted = Emissions(service, job.id)
        mcp_seen: dict[str, float] = {}
        ndjson_seen: dict[str, float] = {}
        async with http_session(api.url, TOKEN) as session:
            peer = asyncio.create_task(read_ndjson_stream(api.url, job.id, ndjson_seen))
            follow = follow_job(session, job.id, mcp_seen)
            await asyncio.sleep(0.5)
            await drive(service, job.id, samples, gap)
            await asyncio.wait_for(follow, 30)
            await asyncio.wait_for(peer, 30)
        emitted.close()
        print(f"  MCP over HTTP (/mcp)        {quantiles(emitted.latencies(mcp_seen))}")
        print(f"  peer: NDJSON /v1/events     {quantiles(emitted.latencies(ndjson_seen))}")


async def latency_stdio(tmp: Path, samples: int, gap: float) -> None:
    """MCP over stdio: a ``progressbot mcp`` process following the job through the shared database."""
    db = tmp / "stdio.db"
    cfg = write_config(tmp / "stdio.toml", db, min_interval_ms=500, poll_interval_ms=1000)
    async with running_service(db) as (service, _api):
        job = await service.track("latency", total=samples + 1)
        assert job.id is not None
        emitted = Emissions(service, job.id)
        seen: dict[str, float] = {}
        async with stdio_session(cfg) as session:
            follow = follow_job(session, job.id, seen)
            await asyncio.sleep(1.0)
            await drive(service, job.id, samples, gap)
            await asyncio.wait_for(follow, 30)
        emitted.close()
        write_tick = max(0.1, service.config.min_interval)
        print(f"  MCP over stdio (other proc) {quantiles(emitted.latencies(seen))}")
        print(f"    of which from the commit  {quantiles(emitted.from_commit(seen))}")
        print(
            f"  bound: the service's progress write tick {write_tick * 1000:.0f} ms, then the MCP process's "
            f"store poll {STDIO_POLL_MS} ms"
        )


# ------------------------------------------------------------------------- CPU
async def clients_child(url: str, kind: str, ids: list[int], seconds: float) -> None:
    """The load: one client per job, each streaming it for ``seconds`` (MCP sessions or NDJSON streams)."""
    notes = 0

    async def one_mcp(job_id: int) -> None:
        nonlocal notes

        async def count(progress: float, total: float | None, message: str | None) -> None:
            nonlocal notes
            notes += 1

        async with http_session(url, TOKEN) as session:
            await session.call_tool(
                "job_status", {"id": job_id, "stream": True, "max_seconds": seconds}, progress_callback=count
            )

    async def one_ndjson(job_id: int) -> None:
        nonlocal notes
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await read_ndjson_stream(url, job_id, {})
        notes += 1

    run = one_mcp if kind == "mcp" else one_ndjson
    await asyncio.gather(*(run(i) for i in ids))
    print(json.dumps({"notifications": notes}), flush=True)


async def cpu_run(tmp: Path, kind: str | None, clients: int, seconds: float) -> tuple[float, int]:
    """The service process's share of one core over ``seconds`` while ``clients`` tracked jobs report
    progress ten times a second (in memory, as handlers do) and, unless ``kind`` is None, a client in a child
    process streams each of them; and how many notifications (or streams) the clients got."""
    async with running_service(tmp / f"cpu-{kind}.db") as (service, api):
        ids = [(await service.track(f"load {i}", total=10_000)).id or 0 for i in range(clients)]
        stop = asyncio.Event()

        async def report_all() -> None:
            tick = 0
            while not stop.is_set():
                tick += 1
                for jid in ids:
                    await service.tracked_report(jid, current=tick, message=f"tick {tick}")
                await asyncio.sleep(0.1)

        driver = asyncio.create_task(report_all())
        baseline = service.bus.subscriber_count
        proc = None
        if kind is not None:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                __file__,
                "--role",
                "clients",
                "--url",
                api.url,
                "--kind",
                kind,
                "--seconds",
                str(seconds + 120),
                "--ids",
                ",".join(map(str, ids)),
                env=child_env(),
                cwd=str(REPO),
                stdout=asyncio.subprocess.PIPE,
            )
            # Every client is streaming once each has its subscription on the bus.
            await wait_for(lambda: service.bus.subscriber_count >= baseline + clients, timeout=120)
        await asyncio.sleep(1.0)
        before = time.process_time()
        await asyncio.sleep(seconds)
        used = time.process_time() - before
        stop.set()
        await driver
        for jid in ids:
            await service.tracked_finish(jid, ok=True)  # the streams end with their jobs
        got = 0
        if proc is not None:
            out, _ = await proc.communicate()
            if proc.returncode != 0:
                raise SystemExit(f"the {kind} clients failed")
            got = json.loads(out.decode().strip().splitlines()[-1])["notifications"]
        return used / seconds, got


async def main(args: argparse.Namespace) -> None:
    print(f"progressbot MCP bench — Python {platform.python_version()}, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="pb-mcp-bench-") as raw:
        tmp = Path(raw)
        print(
            f"\nNotification latency from the event's emission ({args.samples} samples, one per {args.gap}s):"
        )
        await latency_http(tmp, args.samples, args.gap)
        await latency_stdio(tmp, args.samples, args.gap)
        print(
            f"\nService CPU over {args.seconds:.0f} s, {args.clients} tracked jobs reporting 10 times a "
            "second (events throttled to 2/s per job):"
        )
        for kind in (None, "ndjson", "mcp"):
            share, got = await cpu_run(tmp, kind, args.clients, args.seconds)
            label = {
                None: "no streaming clients (the jobs alone)",
                "ndjson": f"{args.clients} NDJSON /v1/events streams (peer)",
                "mcp": f"{args.clients} MCP job_status(stream=true) clients",
            }[kind]
            extra = {None: "", "ndjson": f"  ({got} streams read)", "mcp": f"  ({got} notifications)"}[kind]
            print(f"  {label:<45} {share * 100:6.1f} % of one core{extra}")


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=20, help="latency samples per transport")
    p.add_argument("--gap", type=float, default=1.6, help="seconds between progress reports")
    p.add_argument("--clients", type=int, default=50, help="concurrent streaming clients")
    p.add_argument("--seconds", type=float, default=10.0, help="length of each CPU measurement")
    p.add_argument("--role", default="main", choices=["main", "clients"], help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--kind", help=argparse.SUPPRESS)
    p.add_argument("--ids", help=argparse.SUPPRESS)
    return p.parse_args()


if __name__ == "__main__":
    options = parse_args()
    if options.role == "clients":
        asyncio.run(
            clients_child(
                options.url, options.kind, [int(i) for i in options.ids.split(",")], options.seconds
            )
        )
    else:
        asyncio.run(main(options))
