"""HTTP API benchmark: progress POST throughput, and POST -> NDJSON event latency, against an echo floor.

    python bench/http.py [--seconds 5] [--clients 50] [--samples 300]

Two servers run in child processes, so that they do not share a CPU with the load generator's loop:

* ``progressbot``: the real service (SQLite in a temp dir, default 500 ms throttle) with the HTTP API;
* ``echo``: a plain aiohttp app with the same routes, whose progress handler parses the JSON body and
  hands it straight to the NDJSON streams of that job: the floor of aiohttp itself.

Printed for both:
  * progress POSTs/s sustained by ``--clients`` concurrent clients (keep-alive, one tracked job each),
    and the server process's CPU time per POST (Linux);
  * p50/p99 from sending a progress POST to its event arriving on an NDJSON stream. The POSTs of a job
    are spaced beyond the 500 ms throttle window, so this is the pipeline (HTTP, DB write, monitor tick,
    bus, stream), not the deliberate throttling delay.
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file is named http.py: drop its own directory from the path, or it would shadow the standard
# library's http package (which aiohttp and json-over-HTTP need), and add the project root instead.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from typing import Any

import aiohttp
from aiohttp import web

TOKEN = "bench-token-0123456789"
#: Seconds at the start of a throughput run that are not counted.
WARMUP = 1.0
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of values."""
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


# ---------------------------------------------------------------------- servers
async def serve_progressbot(tmp: str) -> None:
    """The real service and API on an ephemeral port; prints the URL, runs until stdin closes."""
    from pydantic import SecretStr

    from bot.http_api import HttpApi
    from bot.settings import HttpSettings
    from core.builtin import register_builtins
    from core.db import Database
    from core.registry import HandlerRegistry
    from core.service import ProgressService, ServiceConfig

    url = f"sqlite:///{tmp}/bench.db"
    reg = HandlerRegistry()
    svc = ProgressService(ServiceConfig(database_url=url), registry=reg, database=Database(url))
    register_builtins(reg, lambda: svc.store)
    await svc.start()
    api = HttpApi(svc, HttpSettings(listen="127.0.0.1:0", token=SecretStr(TOKEN)))
    await api.start()
    await _run_until_stdin_closes(api.url)
    await api.stop()
    await svc.stop()


async def serve_echo() -> None:
    """The floor: the same routes in plain aiohttp; a progress POST goes straight to that job's streams."""
    streams: dict[str, set[asyncio.Queue[bytes]]] = {}
    ids = iter(range(1, 10**9))

    async def create(request: web.Request) -> web.Response:
        await request.json()
        return web.json_response({"id": next(ids)}, status=201)

    async def progress(request: web.Request) -> web.Response:
        body = await request.json()
        jid = request.match_info["id"]
        line = (json.dumps({"id": int(jid), "type": "job", "progress": body}) + "\n").encode()
        for q in streams.get(jid, ()):
            q.put_nowait(line)
        return web.json_response({"id": int(jid), "status": "running", "control": "run"})

    async def events(request: web.Request) -> web.StreamResponse:
        jid = request.query["job"]
        q: asyncio.Queue[bytes] = asyncio.Queue()
        streams.setdefault(jid, set()).add(q)
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        try:
            while line := await q.get():  # b"" ends the stream (at shutdown)
                await resp.write(line)
        except ConnectionResetError:
            pass
        finally:
            streams[jid].discard(q)
        return resp

    app = web.Application()
    app.router.add_post("/v1/jobs", create)
    app.router.add_post("/v1/jobs/{id}/progress", progress)
    app.router.add_get("/v1/events", events)
    runner = web.AppRunner(app)  # aiohttp's defaults, as the API server uses them
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    await _run_until_stdin_closes(f"http://127.0.0.1:{port}")
    for queues in streams.values():
        for q in queues:
            q.put_nowait(b"")
    await runner.cleanup()


async def _run_until_stdin_closes(url: str) -> None:
    print(url, flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)


# ----------------------------------------------------------------- measurements
async def create_job(session: aiohttp.ClientSession, url: str, name: str) -> int:
    """A tracked job; returns its id."""
    async with session.post(url + "/v1/jobs", json={"name": name}, headers=AUTH) as resp:
        assert resp.status == 201, await resp.text()
        return int((await resp.json())["id"])


async def throughput(url: str, clients: int, seconds: float, start_at: float) -> tuple[int, int]:
    """Progress POSTs completed by ``clients`` concurrent keep-alive clients (one tracked job each) within
    the measuring window (from ``start_at``, wall clock, plus a warm-up second, to ``start_at + seconds``),
    and in all."""
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as session:
        ids = [await create_job(session, url, f"load {i}") for i in range(clients)]
        await asyncio.sleep(max(0.0, start_at - time.time()))
        begin, end = start_at + WARMUP, start_at + seconds
        done = every = 0

        async def client(jid: int) -> None:
            nonlocal done, every
            n = 0
            while time.time() < end:
                n += 1
                body = {"current": n, "message": f"item {n}"}
                async with session.post(f"{url}/v1/jobs/{jid}/progress", json=body, headers=AUTH) as resp:
                    await resp.read()
                    assert resp.status == 200, resp.status
                every += 1
                if begin <= time.time() <= end:
                    done += 1

        await asyncio.gather(*(client(j) for j in ids))
        return done, every


def run_load(url: str, clients: int, seconds: float, procs: int) -> tuple[float, int]:
    """POSTs/s from ``clients`` clients spread over ``procs`` load processes (one process could not keep
    a fast server busy: the client's own event loop would be what is measured), and the POSTs in all."""
    start_at = time.time() + 2.0  # time for every process to start and create its jobs
    shares = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
    children = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--load",
                url,
                "--clients",
                str(k),
                "--seconds",
                str(seconds),
                "--start-at",
                repr(start_at),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        for k in shares
        if k
    ]
    total = every = 0
    for child in children:
        out, _ = child.communicate(timeout=seconds + 60)
        if child.returncode != 0:
            raise RuntimeError("a load process failed")
        window, all_posts = (int(x) for x in out.strip().splitlines()[-1].split())
        total += window
        every += all_posts
    return total / (seconds - WARMUP), every


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (Linux /proc; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def latency(url: str, samples: int, spacing: float, jobs: int = 20) -> list[float]:
    """Seconds from sending a progress POST to its event on the job's NDJSON stream."""
    conn = aiohttp.TCPConnector(limit=0)
    out: list[float] = []
    async with aiohttp.ClientSession(connector=conn) as session:
        ids = [await create_job(session, url, f"latency {i}") for i in range(jobs)]
        sent: dict[tuple[int, int], float] = {}
        per_job = max(1, samples // jobs)
        ready = asyncio.Event()
        opened = 0

        async def reader(jid: int) -> None:
            nonlocal opened
            async with session.get(
                f"{url}/v1/events?job={jid}", headers={**AUTH, "Accept": "application/x-ndjson"}
            ) as resp:
                opened += 1
                if opened == jobs:
                    ready.set()
                got = 0
                async for raw in resp.content:
                    now = time.perf_counter()
                    if not raw.strip():
                        continue
                    ev = json.loads(raw)
                    cur = (ev.get("progress") or {}).get("current")
                    t0 = sent.pop((jid, cur), None) if cur is not None else None
                    if t0 is not None:
                        out.append(now - t0)
                        got += 1
                        if got >= per_job:
                            return

        async def writer(jid: int, offset: float) -> None:
            await asyncio.sleep(offset)
            for n in range(1, per_job + 1):
                sent[(jid, n)] = time.perf_counter()
                body = {"current": n}
                async with session.post(f"{url}/v1/jobs/{jid}/progress", json=body, headers=AUTH) as r:
                    await r.read()
                await asyncio.sleep(spacing)

        readers = [asyncio.create_task(reader(j)) for j in ids]
        await asyncio.wait_for(ready.wait(), 30)
        # Let the throttle window of each job's creation event close, so no sample waits on it.
        await asyncio.sleep(spacing)
        await asyncio.gather(*(writer(j, i * spacing / jobs) for i, j in enumerate(ids)))
        await asyncio.wait_for(asyncio.gather(*readers), 30)
    return out


def start_server(kind: str, tmp: str) -> tuple[subprocess.Popen[str], str]:
    """Start a server child process; returns it and its URL."""
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", kind, "--tmp", tmp],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    url = proc.stdout.readline().strip()
    if not url.startswith("http"):
        raise RuntimeError(f"{kind} server did not start")
    return proc, url


def stop_server(proc: subprocess.Popen[str]) -> None:
    """Close the child's stdin (its signal to stop) and wait."""
    assert proc.stdin is not None
    proc.stdin.close()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def main() -> None:
    """Run the benchmark (or, with --serve, one of its servers)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0, help="duration of each throughput run")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--samples", type=int, default=300, help="latency samples per server")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per server")
    ap.add_argument("--spacing", type=float, default=0.6, help="seconds between two POSTs of one job (> 0.5)")
    ap.add_argument("--procs", type=int, default=2, help="load-generating processes for the clients")
    ap.add_argument("--serve", choices=["progressbot", "echo"], help=argparse.SUPPRESS)
    ap.add_argument("--load", metavar="URL", help=argparse.SUPPRESS)
    ap.add_argument("--start-at", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve == "progressbot":
        asyncio.run(serve_progressbot(args.tmp))
        return
    if args.serve == "echo":
        asyncio.run(serve_echo())
        return
    if args.load:
        window, every = asyncio.run(throughput(args.load, args.clients, args.seconds, args.start_at))
        print(window, every)
        return

    print(f"python {platform.python_version()}, aiohttp {aiohttp.__version__}, {os.cpu_count()} CPUs")
    print(
        f"{args.rounds} rounds; {args.clients} concurrent clients in {args.procs} processes for "
        f"{args.seconds:g}s; latency: "
        f"{args.samples} samples, POSTs of a job {args.spacing:g}s apart\n"
    )
    # Rounds alternate the order of the two servers, so that noise from other work on the machine hits
    # both alike; throughput is the median of the rounds, latency percentiles pool all samples.
    rates: dict[str, list[float]] = {"echo": [], "progressbot": []}
    lats: dict[str, list[float]] = {"echo": [], "progressbot": []}
    cpu_per_post: dict[str, list[float]] = {"echo": [], "progressbot": []}
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.rounds):
            order = ("echo", "progressbot") if rnd % 2 == 0 else ("progressbot", "echo")
            per_round = max(20, args.samples // args.rounds)
            for kind in order:
                db_dir = Path(tmp) / str(rnd)  # a fresh database each round
                db_dir.mkdir(exist_ok=True)
                proc, url = start_server(kind, str(db_dir))
                try:
                    cpu0 = cpu_seconds(proc.pid)
                    rate, posts = run_load(url, args.clients, args.seconds, args.procs)
                    cpu1 = cpu_seconds(proc.pid)
                    rates[kind].append(rate)
                    if cpu0 is not None and cpu1 is not None and posts:
                        cpu_per_post[kind].append((cpu1 - cpu0) / posts * 1e6)
                    lats[kind].extend(asyncio.run(latency(url, per_round, args.spacing)))
                finally:
                    stop_server(proc)
    results: dict[str, dict[str, Any]] = {}
    for kind in rates:
        lat = lats[kind]
        results[kind] = {
            "rate": statistics.median(rates[kind]),
            "rates": rates[kind],
            "cpu": statistics.median(cpu_per_post[kind]) if cpu_per_post[kind] else float("nan"),
            "p50": pct(lat, 0.5) * 1000,
            "p99": pct(lat, 0.99) * 1000,
            "mean": statistics.fmean(lat) * 1000,
            "n": len(lat),
        }

    cols = f"{'POSTs/s':>9}{'CPU us/POST':>13}{'p50 ms':>9}{'p99 ms':>9}{'mean ms':>9}{'samples':>9}"
    print(f"{'server':<22}{cols}")
    for kind, label in (("echo", "aiohttp echo (floor)"), ("progressbot", "progressbot")):
        r = results[kind]
        print(
            f"{label:<22}{r['rate']:>9,.0f}{r['cpu']:>13.0f}{r['p50']:>9.1f}{r['p99']:>9.1f}{r['mean']:>9.1f}"
            f"{r['n']:>9}   rounds: {', '.join(f'{x:,.0f}' for x in r['rates'])} POSTs/s"
        )
    pb, echo = results["progressbot"], results["echo"]
    print(
        f"\nprogressbot / floor: throughput {pb['rate'] / echo['rate']:.2f}x, server CPU per POST "
        f"{pb['cpu'] / echo['cpu']:.2f}x, latency p50 +{pb['p50'] - echo['p50']:.1f} ms, "
        f"p99 +{pb['p99'] - echo['p99']:.1f} ms"
    )
    print("POSTs/s is bounded by the machine's cores, shared by the server and the load processes; the")
    print("server's CPU time per POST does not depend on that. progressbot's latency includes the monitor's")
    print("emit tick (min_interval / 10: 50 ms by default).")


if __name__ == "__main__":
    main()
