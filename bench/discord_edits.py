"""Discord edit budget and staleness, against the local fake Discord (discord.py's real HTTP code).

For 1, 5 and 20 jobs reporting in one channel, it runs ``demo.count`` jobs through the real service and
the Discord adapter, with the fake enforcing Discord's per-channel edit bucket (5 edits per 5 s), and
prints:

* the message edits per channel per 5 s (mean from the first submit to the last edit, and the most in
  any sliding 5 s), against the budget, plus the 429s the fake returned (0 means the adapter stayed
  within the bucket). Discord's window is fixed and opens with its first edit, so a *sliding* 5 s may
  legitimately hold more than 5 (the end of one window and the start of the next);
* the staleness of what the channel shows: sampled every 100 ms for every running job, how much older
  the state shown in its message is than the newest state of the job (event timestamps; a job whose
  message is not posted yet shows nothing, so it counts from its first event); mean, p95, max.

Run::

    python bench/discord_edits.py [--jobs 1,5,20] [--seconds 20] [--min-interval 0.5]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# Run as a script, Python puts bench/ first on sys.path, where a sibling module could shadow the stdlib
# (bench/http.py shadows ``http``, which aiohttp imports). Import from the repository root instead.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from adapters.commands import CommandRouter
from adapters.discord import DiscordAdapter, DiscordConfig
from core.builtin import register_builtins
from core.events import JobProgressEvent
from core.registry import HandlerRegistry
from core.service import ProgressService, ServiceConfig
from tests.fake_discord import FakeDiscordServer, running_fake_discord


@dataclass
class Result:
    """Figures of one run."""

    jobs: int
    seconds: float
    edits: int
    posts: int
    mean_per_window: float
    max_sliding: int
    budget: int
    hits_429: int
    stale_mean: float
    stale_p95: float
    stale_max: float
    samples: int
    finals_ok: bool


def _max_sliding(times: list[float], window: float) -> int:
    """The most events in any half-open window of ``window`` seconds."""
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while times[lo] <= t - window:
            lo += 1
        best = max(best, hi - lo + 1)
    return best


async def run_one(n: int, seconds: float, min_interval: float, limit: int, window: float) -> Result:
    """Run ``n`` jobs of about ``seconds`` each in one channel and measure."""
    delay_ms = 250
    steps = max(1, int(seconds * 1000 / delay_ms))
    async with running_fake_discord(edit_limit=limit, edit_window=window) as server:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = ServiceConfig(
                database_url=f"sqlite:///{tmp}/bench.db",
                min_interval=min_interval,
                poll_interval=0.5,
                concurrency=max(4, n),
            )
            svc = ProgressService(cfg, registry=HandlerRegistry())
            register_builtins(svc.registry, lambda: svc.store)
            await svc.start()
            adapter = DiscordAdapter(
                svc,
                CommandRouter(svc, prefix="/"),
                DiscordConfig(
                    token="bench-token",
                    guild_ids=[int(server.guild_id)],
                    channel_ids=[int(server.channel_id)],
                    guild_ready_timeout=0.05,
                    edit_rate=limit / window,
                    edit_burst=limit,
                    reply_on_finish=True,
                ),
                clock=server.clock.now,
            )
            await adapter.start()
            try:
                return await _measure(server, svc, adapter, n, steps, delay_ms, limit, window)
            finally:
                await adapter.stop()
                await svc.stop()


async def _measure(
    server: FakeDiscordServer,
    svc: ProgressService,
    adapter: DiscordAdapter,
    n: int,
    steps: int,
    delay_ms: int,
    limit: int,
    window: float,
) -> Result:
    # Every event's timestamp by (job, seq), and the newest event per job: what "shown" is compared to.
    stamps: dict[tuple[int | str, int], float] = {}
    newest: dict[int | str, JobProgressEvent] = {}
    first: dict[int | str, float] = {}

    def record(ev: JobProgressEvent) -> None:
        if ev.type == "job":
            stamps[(ev.id, ev.seq)] = ev.timestamp
            first.setdefault(ev.id, ev.timestamp)
            if ev.id not in newest or ev.seq > newest[ev.id].seq:
                newest[ev.id] = ev

    svc.bus.add_listener(record)
    t0 = time.monotonic()
    t0_fake = server.clock.now()  # the fake stamps edits with its own clock
    jobs = [
        await svc.submit("demo.count", {"steps": steps, "delay_ms": delay_ms}, room=server.channel_id)
        for _ in range(n)
    ]
    ids = [j.id for j in jobs if j.id is not None]
    staleness: list[float] = []
    while True:
        await asyncio.sleep(0.1)
        running = [i for i in ids if i in newest and not newest[i].terminal]
        for jid in running:
            shown = adapter.shown_version("job", jid)
            # Not posted yet: nothing is shown since the job's first event.
            ts = stamps.get((jid, shown)) if shown else first[jid]
            if ts is not None:
                staleness.append(max(0.0, newest[jid].timestamp - ts))
        if all(i in newest and newest[i].terminal for i in ids):
            break
    await adapter.flush(60)
    elapsed = time.monotonic() - t0
    svc.bus.remove_listener(record)

    cid = server.channel_id
    edit_times = sorted(e.at for e in server.edits if e.channel_id == cid and e.via == "rest")
    span = (edit_times[-1] - t0_fake) if edit_times else window
    shown_ids = [_message_of(server, jid) for jid in ids]
    finals_ok = all(mid is not None and "completed" in server.message(mid).content for mid in shown_ids)
    stale_sorted = sorted(staleness) or [0.0]
    return Result(
        jobs=n,
        seconds=elapsed,
        edits=len(edit_times),
        posts=adapter.counters["posts"],
        mean_per_window=len(edit_times) / max(span, window) * window,
        max_sliding=_max_sliding(edit_times, 5.0) if edit_times else 0,
        budget=limit,
        hits_429=len(server.rate_limit_hits),
        stale_mean=statistics.fmean(stale_sorted),
        stale_p95=stale_sorted[int(0.95 * (len(stale_sorted) - 1))],
        stale_max=stale_sorted[-1],
        samples=len(staleness),
        finals_ok=finals_ok,
    )


def _message_of(server: FakeDiscordServer, job_id: int) -> str | None:
    """The progress message of a job (the bot's message whose title is ``**#<id>**``)."""
    for m in server.messages_in():
        if m.message_reference is None and f"**#{job_id}**" in m.content:
            return m.id
    return None


def main() -> None:
    """Parse arguments, run each configuration, print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", default="1,5,20", help="comma-separated job counts (default 1,5,20)")
    ap.add_argument("--seconds", type=float, default=20.0, help="how long each job runs (default 20)")
    ap.add_argument("--min-interval", type=float, default=0.5, help="monitor min_interval (default 0.5)")
    ap.add_argument("--limit", type=int, default=5, help="edits per window per channel (default 5)")
    ap.add_argument("--window", type=float, default=5.0, help="the edit window in seconds (default 5)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    counts = [int(x) for x in args.jobs.split(",") if x.strip()]
    print(
        f"Discord edits against the fake (bucket {args.limit} edits / {args.window:g} s per channel), "
        f"jobs of ~{args.seconds:g} s, monitor min_interval {args.min_interval:g} s"
    )
    header = (
        f"{'jobs':>4} {'run s':>6} {'edits':>6} {'posts':>5} {'edits/5s mean':>13} {'max in 5s':>9} "
        f"{'budget':>6} {'429s':>4} {'stale mean':>10} {'p95':>6} {'max':>6} {'finals':>6}"
    )
    print(header)
    for n in counts:
        r = asyncio.run(run_one(n, args.seconds, args.min_interval, args.limit, args.window))
        scale = 5.0 / args.window
        print(
            f"{r.jobs:>4} {r.seconds:>6.1f} {r.edits:>6} {r.posts:>5} {r.mean_per_window * scale:>13.2f} "
            f"{r.max_sliding:>9} {r.budget * scale:>6g} {r.hits_429:>4} {r.stale_mean:>9.2f}s "
            f"{r.stale_p95:>5.2f}s {r.stale_max:>5.2f}s {'ok' if r.finals_ok else 'LOST':>6}"
        )


if __name__ == "__main__":
    main()
