"""Monitor benchmarks: report() cost, monitor CPU under load, event rate, and emission latencies.

    python bench/monitor.py [--seconds 5]

Prints, against the goals of the spec:
  * report() ns per call (median)                      goal <= 2,000 ns
  * CPU seconds per wall second, 200k reports/s, 1,000 running jobs   goal < 1 core
  * progress events/s per job under that load          goal <= 2
  * p99 latency, last report -> its emission            goal <= 550 ms
  * p99 latency, terminal status -> its event (end to end through the worker and DB)   goal <= 50 ms
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# bench/http.py would shadow the standard library's http module: drop this folder from the path.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from core.context import JobContext, ProgressState
from core.db import Database
from core.events import EventBus, JobProgressEvent
from core.monitor import JobProgressMonitor, JobView
from core.registry import HandlerRegistry
from core.service import ProgressService, ServiceConfig
from core.store import JobStore, NewJob


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of values."""
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def bench_report_ns() -> float:
    """Median ns per report() call, over batches of 10,000 calls."""
    dirty: set[tuple[str, int | str]] = set()
    st = ProgressState(1, dirty)
    samples = []
    for _ in range(50):
        t0 = time.perf_counter_ns()
        for i in range(10_000):
            st.report(i, 10_000, "msg")
        samples.append((time.perf_counter_ns() - t0) / 10_000)
    return statistics.median(samples)


async def bench_load(seconds: float, tmp: Path) -> dict[str, float]:
    """1,000 running jobs, 200k reports/s, a real store: CPU per wall second and events per job per second."""
    db = Database(f"sqlite:///{tmp}/mon.db")
    store = JobStore(db)
    await store.init()
    jobs = await store.submit_many([NewJob(type="bench") for _ in range(1000)])
    bus = EventBus()
    counts: dict[Any, int] = {}
    first_last: dict[Any, list[float]] = {}
    sub = bus.subscribe()

    async def consume() -> None:
        async for ev in sub:
            if not ev.status_changed:
                counts[ev.id] = counts.get(ev.id, 0) + 1
                fl = first_last.setdefault(ev.id, [ev.timestamp, ev.timestamp])
                fl[1] = ev.timestamp

    consumer = asyncio.create_task(consume())
    mon = JobProgressMonitor(bus, store, min_interval=0.5, poll_interval=1.0)
    await mon.start()
    states: list[ProgressState] = []
    for j in jobs:
        view = JobView.from_job(j)
        view.status = "running"
        states.append(mon.attach(view))
        mon.job_changed(view)
    await asyncio.sleep(0.6)
    counts.clear()
    first_last.clear()
    # The driver: 2,000 reports every 10 ms = 200k/s, round-robin over the jobs.
    per_tick, tick = 2000, 0.01
    driver_cpu = 0.0
    c0, w0 = time.process_time(), time.perf_counter()
    n = 0
    next_t = w0
    while time.perf_counter() - w0 < seconds:
        d0 = time.process_time()
        for _ in range(per_tick):
            states[n % 1000].report(n, 10**9, "working")
            n += 1
        driver_cpu += time.process_time() - d0
        next_t += tick
        await asyncio.sleep(max(0.0, next_t - time.perf_counter()))
    wall = time.perf_counter() - w0
    cpu = time.process_time() - c0
    await mon.stop()
    sub.close()
    await asyncio.gather(consumer, return_exceptions=True)
    db.close()
    return {
        "reports_per_s": n / wall,
        "cpu_per_wall": cpu / wall,
        "cpu_per_wall_without_driver": (cpu - driver_cpu) / wall,
        # Per job: events between its first and last emission (no fencepost at the window's edges).
        "events_per_s_per_job": statistics.mean(
            (counts[k] - 1) / (fl[1] - fl[0]) for k, fl in first_last.items() if fl[1] > fl[0]
        ),
    }


async def bench_trailing_latency(tmp: Path) -> list[float]:
    """Latency from each job's last report (before it goes quiet) to the event carrying it."""
    bus = EventBus()
    mon = JobProgressMonitor(bus, None, min_interval=0.5)
    await mon.start()
    import random

    rnd = random.Random(7)
    last: dict[int, tuple[float, int]] = {}
    lat: list[float] = []

    def on_event(ev: JobProgressEvent) -> None:
        rec = last.get(ev.id)  # type: ignore[arg-type]
        if rec is not None and ev.current == rec[1]:
            lat.append(time.perf_counter() - rec[0])
            del last[ev.id]  # type: ignore[arg-type]

    bus.add_listener(on_event)
    states = [mon.attach(JobView(id=i, type="b", status="running")) for i in range(1000)]

    async def job(i: int) -> None:
        await asyncio.sleep(rnd.random() * 0.5)
        for k in range(rnd.randint(1, 40)):
            states[i].report(k + 1, 100)
            last[i] = (time.perf_counter(), k + 1)
            await asyncio.sleep(rnd.random() * 0.05)

    await asyncio.gather(*(job(i) for i in range(1000)))
    await asyncio.sleep(0.8)
    await mon.stop()
    return lat


async def bench_status_latency(tmp: Path, n: int = 300) -> list[float]:
    """Latency from a handler returning to its terminal event at a subscriber (worker + DB + monitor)."""
    reg = HandlerRegistry()
    returned: dict[int, float] = {}

    @reg.handler("quick")
    async def quick(ctx: JobContext, data: dict[str, Any]) -> None:
        await asyncio.sleep(0.01)
        returned[int(ctx.job_id)] = time.perf_counter()

    svc = ProgressService(ServiceConfig(database_url=f"sqlite:///{tmp}/lat.db", concurrency=4), registry=reg)
    await svc.start()
    lat: list[float] = []
    done = asyncio.Event()

    def on_event(ev: JobProgressEvent) -> None:
        # Measured at publish time: what a subscriber's buffer receives, before it is read.
        t = returned.get(int(ev.id)) if ev.terminal else None
        if t is not None:
            lat.append(time.perf_counter() - t)
            if len(lat) >= n:
                done.set()

    svc.bus.add_listener(on_event)
    for _ in range(n):
        await svc.submit("quick", {})
    await asyncio.wait_for(done.wait(), 60)
    await svc.stop()
    return lat


def main() -> None:
    """Run all monitor benches and print the figures beside their goals."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        ns = bench_report_ns()
        load = asyncio.run(bench_load(args.seconds, tmp))
        trail = asyncio.run(bench_trailing_latency(tmp))
        status = asyncio.run(bench_status_latency(tmp))
    print(f"report() per call, median                 {ns:8.0f} ns        (goal <= 2000 ns)")
    print(f"load: reports/s achieved                  {load['reports_per_s']:8.0f}")
    print(f"monitor CPU per wall second (whole proc)  {load['cpu_per_wall']:8.2f} core    (goal < 1 core)")
    print(f"  ... without the report() driver         {load['cpu_per_wall_without_driver']:8.2f} core")
    print(
        f"progress events/s per job                 {load['events_per_s_per_job']:8.2f}         (goal <= 2)"
    )
    print(
        f"last report -> emission p50 / p99         {pct(trail, 0.5) * 1000:6.0f} / "
        f"{pct(trail, 0.99) * 1000:4.0f} ms"
        f"  (goal p99 <= 550 ms; n={len(trail)})"
    )
    print(
        f"terminal status -> event p50 / p99        {pct(status, 0.5) * 1000:6.1f} / "
        f"{pct(status, 0.99) * 1000:4.1f} ms"
        f"  (goal p99 <= 50 ms; n={len(status)})"
    )


if __name__ == "__main__":
    main()
