"""Matrix latency bench: from an emitted progress event to the edit seen by another client's /sync.

It starts a throw-away local Synapse (the test suite's helper), lifts the bot's message rate limit
through the admin API (``override_ratelimit``, as a real admin would for a bot account), and measures
in the same run, interleaved round by round so that drift affects both alike:

* **floor**: a bare matrix-nio ``room_send`` of an ``m.replace`` edit -> seen in alice's /sync;
* **adapter**: ``JobProgressEvent`` emitted by the service's monitor -> the adapter's edit seen in
  alice's /sync (through the driver, the account's outbox, rendering, nio and Synapse);
* **encrypted**: the same through an end-to-end encrypted room: the edit is Megolm-encrypted by the bot
  and decrypted by alice's encrypting client (a second device of hers) before it counts as seen;
* **throughput**: the edits per second the adapter sustains when several jobs in one room report
  far faster than Synapse can take edits (latest-wins coalescing does the rest).

Run from the repository root: ``python bench/matrix_latency.py [--samples 200]``. It prints figures;
it asserts nothing. The goal (SPEC): adapter p50 <= 1.5x the floor p50 (the floor is ~55 ms here).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# Run as a script, Python puts bench/ first on sys.path, where a sibling module (bench/http.py) would
# shadow the standard library's ``http`` that aiohttp imports. Import from the repository root instead.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from nio import AsyncClient, AsyncClientConfig, LoginResponse, RoomSendResponse

from adapters.commands import CommandRouter
from adapters.matrix import MatrixAdapter, MatrixConfig
from core.builtin import register_builtins
from core.db import Database
from core.events import JobProgressEvent
from core.registry import HandlerRegistry
from core.service import ProgressService, ServiceConfig
from tests.integration.matrix_e2e_helpers import EncryptedUserClient
from tests.integration.matrix_helpers import UserClient
from tests.servers.synapse import SynapseServer


def pct(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, nearest-rank."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def summary(name: str, values: list[float]) -> str:
    """``name: n=.., p50=.. ms, p99=.. ms, mean=.. ms``."""
    ms = [v * 1000 for v in values]
    return (
        f"{name}: n={len(ms)}  p50={pct(ms, 0.5):.1f} ms  p99={pct(ms, 0.99):.1f} ms  "
        f"mean={statistics.fmean(ms):.1f} ms  max={max(ms):.1f} ms"
    )


class Watcher:
    """Marks when alice's sync delivers an edit whose new text contains a marker."""

    def __init__(self, alice: UserClient) -> None:
        self.seen: dict[str, float] = {}
        self.waiters: dict[str, asyncio.Future[float]] = {}
        alice.on_event = self._on_event

    def _on_event(self, room_id: str, ev: dict[str, Any], now: float) -> None:
        content = ev.get("content") or {}
        new = content.get("m.new_content") or content
        body = str(new.get("body", ""))
        for marker in [w for w in self.waiters if w in body]:
            fut = self.waiters.pop(marker)
            if not fut.done():
                fut.set_result(now)

    def expect(self, marker: str) -> asyncio.Future[float]:
        """A future resolved with the monotonic time the marker is seen."""
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.waiters[marker] = fut
        return fut


async def run(args: argparse.Namespace) -> None:
    """Start Synapse, measure, print."""
    workdir = Path(tempfile.mkdtemp(prefix="pb-bench-synapse-"))
    hs = SynapseServer(workdir, ratelimits="lifted", lift_messages=False, log_level="WARNING")
    print("starting Synapse ...", flush=True)
    hs.start()
    try:
        bot_id = hs.register("bot", "bot-password", admin=False)
        alice_id = hs.register("alice", "alice-password")
        # What a real admin does for a bot account: lift its message limit (0/0 = unlimited).
        hs.override_ratelimit(bot_id, 0, 0)
        hs.override_ratelimit(alice_id, 0, 0)
        await measure(args, hs, bot_id, alice_id, workdir)
    finally:
        hs.close()


async def measure(
    args: argparse.Namespace, hs: SynapseServer, bot_id: str, alice_id: str, workdir: Path
) -> None:
    """The three measurements, on one room."""
    alice = UserClient(hs.base_url, alice_id, "alice-password")
    await alice.login()
    room = await alice.create_room(bot=bot_id, others=[])
    watcher = Watcher(alice)
    # The same person on an encrypting device, in an encrypted room the same bot serves.
    ealice = EncryptedUserClient(hs.base_url, alice_id, "alice-password", workdir / "alice-keys")
    await ealice.login()
    eroom = await ealice.create_encrypted_room(bot=bot_id, others=[])
    ewatcher = Watcher(ealice)

    # The floor: a bare nio client of the same bot account (its own device), no scheduler, no rendering.
    nio_cfg = AsyncClientConfig(max_limit_exceeded=0, request_timeout=15)
    bare = AsyncClient(hs.base_url, bot_id, config=nio_cfg)
    assert isinstance(await bare.login("bot-password", device_name="bench-bare"), LoginResponse)
    await bare.join(room)
    first = await bare.room_send(room, "m.room.message", {"msgtype": "m.notice", "body": "floor 0"})
    assert isinstance(first, RoomSendResponse)

    # The adapter, on a service whose monitor emits at most every 50 ms per job.
    db_url = f"sqlite:///{workdir}/bench.db"
    reg = HandlerRegistry()
    svc = ProgressService(
        ServiceConfig(database_url=db_url, min_interval=0.05, poll_interval=1.0),
        registry=reg,
        database=Database(db_url),
    )
    register_builtins(reg, lambda: svc.store)
    await svc.start()
    cfg = MatrixConfig(
        homeserver=hs.base_url,
        user_id=bot_id,
        password="bot-password",
        rooms=[room, eroom],
        pin=False,
        react=False,
        reply_on_finish=False,
        edit_rate=1000,
        start_rate=1000,
        edit_burst=1000,
        max_in_flight=args.in_flight,
    )
    adapter = MatrixAdapter(svc, CommandRouter(svc, prefix="!"), cfg)
    await adapter.start()
    await adapter.wait_ready(60)
    job = await svc.track("latency probe", total=args.samples, owner=alice_id, room=room)
    ejob = await svc.track("latency probe (encrypted)", total=args.samples, owner=alice_id, room=eroom)
    emitted: dict[str, float] = {}

    def on_emit(ev: JobProgressEvent) -> None:
        if ev.message:
            emitted.setdefault(ev.message, time.monotonic())

    svc.bus.add_listener(on_emit)
    # The first event posts the message (with a DB lookup and insert); measure edits after that.
    warm = watcher.expect("adapter warmup")
    await svc.tracked_progress(job.id or 0, current=0, message="adapter warmup")
    await asyncio.wait_for(warm, 30)
    # The first encrypted send also shares the room key with alice's devices.
    warm = ewatcher.expect("encrypted warmup")
    await svc.tracked_progress(ejob.id or 0, current=0, message="encrypted warmup")
    await asyncio.wait_for(warm, 30)

    floor: list[float] = []
    through_adapter: list[float] = []
    encrypted: list[float] = []
    gap = args.gap_ms / 1000
    rounds = max(1, args.samples // args.round)
    for r in range(rounds):
        for i in range(args.round):
            marker = f"floor r{r}i{i}."
            fut = watcher.expect(marker)
            t0 = time.monotonic()
            resp = await bare.room_send(
                room,
                "m.room.message",
                {
                    "msgtype": "m.notice",
                    "body": "* " + marker,
                    "m.new_content": {"msgtype": "m.notice", "body": marker},
                    "m.relates_to": {"rel_type": "m.replace", "event_id": first.event_id},
                },
            )
            assert isinstance(resp, RoomSendResponse), resp
            floor.append(await asyncio.wait_for(fut, 30) - t0)
            await asyncio.sleep(gap)
        # The same bot, one plain and one encrypted room, interleaved with the floor.
        for path, w, job_id, sink in (
            ("adapter", watcher, job.id or 0, through_adapter),
            ("encrypted", ewatcher, ejob.id or 0, encrypted),
        ):
            for i in range(args.round):
                marker = f"{path} r{r}i{i}."
                fut = w.expect(marker)
                await svc.tracked_progress(job_id, current=r * args.round + i + 1, message=marker)
                seen = await asyncio.wait_for(fut, 30)
                sink.append(seen - emitted[marker])
                await asyncio.sleep(gap)

    print()
    print(summary("floor   (bare nio room_send -> alice's sync)     ", floor))
    print(summary("adapter (event emitted -> edit in alice's sync)  ", through_adapter))
    print(summary("e2e     (event emitted -> edit decrypted by alice)", encrypted))
    ratio = pct(through_adapter, 0.5) / pct(floor, 0.5)
    print(f"p50 ratio adapter/floor: {ratio:.2f}x  (goal <= 1.5x)")
    print(f"p50 ratio e2e/floor: {pct(encrypted, 0.5) / pct(floor, 0.5):.2f}x")

    # Throughput: many jobs in one room, reporting far faster than Synapse can take edits.
    jobs = [await svc.track(f"load {k}", total=10_000, room=room) for k in range(args.messages)]
    for j in jobs:
        await svc.tracked_progress(j.id or 0, current=0, message="start")
    await asyncio.sleep(1.0)  # let the posts go out; count edits only
    assert adapter.driver is not None and adapter.transport is not None
    before = adapter.driver.stats.edits
    t0 = time.monotonic()
    n = 0
    while time.monotonic() - t0 < args.seconds:
        n += 1
        for j in jobs:
            # Not awaited one by one in a real service either: report() is in-memory; here each
            # call is a small DB write, which caps the offered rate well above what Synapse takes.
            await svc.tracked_progress(j.id or 0, current=n, message=f"load {n}")
        await asyncio.sleep(0.005)
    elapsed = time.monotonic() - t0
    edits = adapter.driver.stats.edits - before
    offered = n * len(jobs)
    print(
        f"adapter sustained: {edits / elapsed:.1f} edits/s over {elapsed:.1f} s "
        f"({len(jobs)} messages in one room, max_in_flight={args.in_flight}; "
        f"{offered / elapsed:.0f} progress reports/s offered, latest wins)"
    )
    d, box = adapter.driver.stats, adapter.transport.account.stats
    print(
        f"driver: edits={d.edits} coalesced={d.coalesced} rate_limited={box.rate_limited} "
        f"errors={d.failed_requests} dropped={d.dropped}"
    )

    svc.bus.remove_listener(on_emit)
    await adapter.stop()
    await svc.stop()
    await bare.close()
    await alice.close()
    await ealice.close()


def main() -> None:
    """Parse arguments and run."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=200, help="edits measured per path (default 200)")
    p.add_argument("--round", type=int, default=20, help="edits per path per interleaved round")
    p.add_argument("--gap-ms", type=float, default=30, help="pause between measured edits")
    p.add_argument("--messages", type=int, default=8, help="messages (jobs) in the throughput test")
    p.add_argument("--seconds", type=float, default=10, help="duration of the throughput test")
    p.add_argument("--in-flight", type=int, default=4, help="the adapter's max_in_flight per room")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
