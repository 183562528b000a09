"""Web page benchmark: headless Chromium on the jobs page with 500 jobs listed and 50 of them reporting.

    python bench/web.py [--jobs 500] [--reporting 50] [--interval 0.1] [--seconds 20] [--pages 5]

A real ``progressbot run`` (SQLite in a temp dir, the default 500 ms throttle per job) serves the page.
``--jobs`` tracked jobs are created through the HTTP API and ``--reporting`` of them post progress every
``--interval`` seconds, so the page receives about reporting / 0.5 s events per second. Printed:

* event -> DOM latency, p50/p95: measured in the page (``/?metrics``), from the event's ``timestamp`` (set
  when the monitor emits it) to the moment its row was updated;
* the page's JS time per second (Chromium's ``ScriptDuration``; ``TaskDuration`` is all main-thread work);
* the server's CPU with 0, 1 and ``--pages`` pages connected, and the marginal CPU per page (the
  reporters' POSTs are subtracted at the cost per POST measured with no page); since a page costs the
  server less than this noise, also ``--streams`` plain clients reading the page's stream.

Beside it, in the same run, the peer approach: Flower, rq-dashboard and Bull Board need a Celery broker,
Redis or Node, which are not available here, so the bench measures what their list views do instead, a
page polling the JSON list every second (``GET /v1/jobs?status=running``, the same data): its detection
latency (from the row's ``updated_at`` to the poll that saw the change) and its server CPU.
Goal: p95 <= 100 ms beyond the event's emission.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Running bench/web.py puts bench/ first on sys.path, where bench/http.py would shadow the standard
# library's http package: drop it, and add the project root instead.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

import argparse
import asyncio
import contextlib
import importlib.util
import platform
import signal
import tempfile
import threading
import time
from typing import Any

import aiohttp
from selenium.webdriver.common.by import By

from tests.integration.web_helpers import WebService, browser_available, login, make_browser, wait


def _bench_http() -> Any:
    # cpu_seconds and pct live in bench/http.py (not importable by name: it would be the stdlib's http).
    spec = importlib.util.spec_from_file_location("bench_http", _HERE / "http.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_bh = _bench_http()
cpu_seconds, pct = _bh.cpu_seconds, _bh.pct

#: The peer's poll loop: every second, list the running jobs and time each change it sees.
POLL_PEER = """
const done = arguments[arguments.length - 1];
const seen = new Map();
window.pollLat = [];
window.pollStop = false;
async function tick() {
  if (window.pollStop) return;
  const t0 = Date.now();
  try {
    const r = await fetch('/v1/jobs?status=running&limit=1000', {credentials: 'same-origin'});
    const data = await r.json();
    const now = Date.now();
    for (const j of data.jobs) {
      const cur = j.progress.current;
      if (seen.has(j.id) && seen.get(j.id) !== cur) window.pollLat.push(now - Date.parse(j.updated_at));
      seen.set(j.id, cur);
    }
  } catch (e) {}
  setTimeout(tick, Math.max(0, 1000 - (Date.now() - t0)));
}
tick();
done(true);
"""


async def create_jobs(svc: WebService, n: int) -> list[int]:
    """``n`` tracked jobs (running, reported from outside)."""
    auth = {"Authorization": f"Bearer {svc.token}"}
    sem = asyncio.Semaphore(20)
    async with aiohttp.ClientSession(headers=auth) as s:

        async def one(i: int) -> int:
            async with sem, s.post(svc.url + "/v1/jobs", json={"name": f"job {i:03d}", "total": 1000}) as r:
                return int((await r.json())["id"])

        return list(await asyncio.gather(*(one(i) for i in range(n))))


#: Progress POSTs sent so far (read by the CPU windows: the reporters slow down when the browser is busy).
POSTS = [0]


async def report(svc: WebService, ids: list[int], interval: float, stop: threading.Event) -> None:
    """Post progress for ``ids`` every ``interval`` seconds until ``stop`` (counted in :data:`POSTS`)."""
    auth = {"Authorization": f"Bearer {svc.token}"}
    async with aiohttp.ClientSession(headers=auth) as s:

        async def loop(jid: int, offset: float) -> None:
            await asyncio.sleep(offset)
            cur = 0
            while not stop.is_set():
                cur += 1
                body = {"current": cur, "message": f"item {cur}"}
                async with s.post(f"{svc.url}/v1/jobs/{jid}/progress", json=body) as r:
                    await r.read()
                POSTS[0] += 1
                await asyncio.sleep(interval)

        await asyncio.gather(*(loop(j, i * interval / len(ids)) for i, j in enumerate(ids)))


async def sse_readers(svc: WebService, n: int, stop: threading.Event, connected: list[int]) -> None:
    """``n`` clients reading the page's stream (all events, SSE) and discarding it, until ``stop``."""
    auth = {"Authorization": f"Bearer {svc.token}", "Accept": "text/event-stream"}
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(headers=auth, timeout=timeout) as s:

        async def one() -> None:
            async with s.get(svc.url + "/v1/events") as r:
                connected[0] += 1
                while not stop.is_set():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(r.content.readany(), 1.0)

        await asyncio.gather(*(one() for _ in range(n)))


def server_cpu(svc: WebService, seconds: float) -> tuple[float, float]:
    """The service's CPU use (cores) over ``seconds``, and the progress POSTs per second meanwhile."""
    assert svc.proc is not None
    c0, p0, t0 = cpu_seconds(svc.proc.pid) or 0.0, POSTS[0], time.monotonic()
    time.sleep(seconds)
    dt = time.monotonic() - t0
    return ((cpu_seconds(svc.proc.pid) or 0.0) - c0) / dt, (POSTS[0] - p0) / dt


def perf(driver: Any) -> dict[str, float]:
    """Chromium's cumulative Performance metrics of the current tab."""
    return {m["name"]: m["value"] for m in driver.execute_cdp_cmd("Performance.getMetrics", {})["metrics"]}


def main() -> None:
    """Run the bench and print the figures."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=500)
    ap.add_argument("--reporting", type=int, default=50)
    ap.add_argument("--interval", type=float, default=0.1)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--pages", type=int, default=5)
    ap.add_argument("--streams", type=int, default=50)
    args = ap.parse_args()
    # SIGTERM unwinds like Ctrl-C, so the browser and the service are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if not browser_available():
        sys.exit("needs /usr/bin/chromium and /usr/bin/chromedriver (Debian: chromium chromium-driver)")

    with tempfile.TemporaryDirectory() as tmp:
        svc = WebService(Path(tmp), min_interval_ms=500)
        svc.start()
        driver = None
        stop = threading.Event()
        reporter: threading.Thread | None = None
        try:
            ids = asyncio.run(create_jobs(svc, args.jobs))
            reporter = threading.Thread(
                target=lambda: asyncio.run(report(svc, ids[: args.reporting], args.interval, stop)),
                daemon=True,
            )
            reporter.start()
            time.sleep(2)
            cpu0 = server_cpu(svc, args.seconds)

            driver = make_browser()
            login(driver, svc, "/?metrics")
            wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "tr.row")) >= args.jobs, timeout=60)
            rows = len(driver.find_elements(By.CSS_SELECTOR, "tr.row"))
            time.sleep(3)  # warm-up
            driver.execute_cdp_cmd("Performance.enable", {"timeDomain": "timeTicks"})
            driver.execute_script("window.pbMetrics.lat = []; window.pbMetrics.events = 0;")
            p0, t0 = perf(driver), time.monotonic()
            cpu1 = server_cpu(svc, args.seconds)
            p1, wall = perf(driver), time.monotonic() - t0
            lat = [float(x) for x in driver.execute_script("return window.pbMetrics.lat;")]
            events = int(driver.execute_script("return window.pbMetrics.events;"))
            moved = driver.execute_script(
                "return [...document.querySelectorAll('tr.row [role=progressbar]')]"
                ".filter(b => Number(b.getAttribute('aria-valuenow')) > 0).length;"
            )

            main_tab = driver.current_window_handle
            for _ in range(args.pages - 1):
                driver.switch_to.new_window("tab")
                driver.get(svc.url + "/")
                wait(
                    driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "tr.row")) >= args.jobs, timeout=60
                )
            time.sleep(2)
            cpun = server_cpu(svc, args.seconds)
            for handle in driver.window_handles:
                if handle != main_tab:
                    driver.switch_to.window(handle)
                    driver.close()
            driver.switch_to.window(main_tab)
            driver.get("about:blank")
            time.sleep(2)
            cpu0b = server_cpu(svc, args.seconds)  # no page again

            # Many pages' worth of streams without many browsers (which would saturate this machine's CPU):
            # plain clients reading the same stream, for a per-stream cost above the measurement noise.
            readers_stop, connected = threading.Event(), [0]
            readers = threading.Thread(
                target=lambda: asyncio.run(sse_readers(svc, args.streams, readers_stop, connected)),
                daemon=True,
            )
            readers.start()
            wait(driver, lambda d: connected[0] >= args.streams, timeout=60)
            time.sleep(2)
            cpus = server_cpu(svc, args.seconds)
            readers_stop.set()
            readers.join(timeout=30)

            # The peer approach: a page that polls the list every second (and no stream).
            driver.get(svc.url + "/login")
            driver.execute_async_script(POLL_PEER)
            time.sleep(2)
            driver.execute_script("window.pollLat = [];")
            cpu_poll = server_cpu(svc, args.seconds)
            poll_lat = [float(x) for x in driver.execute_script("return window.pollLat;")]
            driver.execute_script("window.pollStop = true;")
        finally:
            stop.set()
            if reporter is not None:
                reporter.join(timeout=30)
            if driver is not None:
                driver.quit()
            svc.stop()

    # The reporters' POSTs cost the server CPU too, and their rate drops while the browser is busy (two
    # cores shared): subtract the cost of the POSTs made in each window, measured with no page open.
    per_post = (cpu0[0] + cpu0b[0]) / (cpu0[1] + cpu0b[1])

    def page_cost(window: tuple[float, float]) -> float:
        return window[0] - per_post * window[1]

    script = (p1["ScriptDuration"] - p0["ScriptDuration"]) / wall
    task = (p1["TaskDuration"] - p0["TaskDuration"]) / wall
    py = f"{platform.python_implementation()} {platform.python_version()}"
    print(f"# bench/web.py on {platform.node()} ({py})")
    print(
        f"jobs listed: {rows} rows ({args.jobs} jobs), reporting: {args.reporting} every {args.interval}s, "
        f"throttle 500 ms; {events} events in {wall:.1f}s ({events / wall:.0f}/s), {moved} bars moved"
    )
    print()
    print(f"{'':38}{'p50 ms':>9}{'p95 ms':>9}{'max ms':>9}{'n':>7}")
    if lat:
        print(
            f"{'progressbot page, event -> DOM':38}{pct(lat, 0.5):9.1f}{pct(lat, 0.95):9.1f}"
            f"{max(lat):9.1f}{len(lat):7}"
        )
    if poll_lat:
        print(
            f"{'peer: poll list 1/s, change -> seen':38}{pct(poll_lat, 0.5):9.1f}{pct(poll_lat, 0.95):9.1f}"
            f"{max(poll_lat):9.1f}{len(poll_lat):7}"
        )
    met = "met" if lat and pct(lat, 0.95) <= 100 else "NOT met"
    print(f"goal: p95 <= 100 ms beyond the event's emission -> {met}")
    print()
    print(f"page JS time: {script * 1000:.1f} ms/s scripting, {task * 1000:.1f} ms/s all main-thread tasks")
    print(
        f"server CPU: {cpu0[0] * 100:.1f}% / {cpu0b[0] * 100:.1f}% with no page (before / after; "
        f"{per_post * 1e6:.0f} us per progress POST), {cpu1[0] * 100:.1f}% with 1 page, "
        f"{cpun[0] * 100:.1f}% with {args.pages} pages ({cpu0[1]:.0f}, {cpu1[1]:.0f}, {cpun[1]:.0f} POST/s)"
    )
    print(
        f"server CPU per connected page (beyond the POSTs): {page_cost(cpu1) * 100:.2f}% of a core "
        "with 1 page, "
        f"{page_cost(cpun) / args.pages * 100:.2f}% each with {args.pages}; "
        f"peer polling 1/s: {page_cost(cpu_poll) * 100:.2f}%"
    )
    print(
        f"server CPU per page's stream, {args.streams} SSE clients: {cpus[0] * 100:.1f}% -> "
        f"{page_cost(cpus) / args.streams * 100:.3f}% of a core per stream"
    )


if __name__ == "__main__":
    main()
