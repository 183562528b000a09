"""Chat delivery under real rate limits: Synapse at its DEFAULT limits and the fake Discord (5 edits / 5 s).

For 1, 4 and 20 ``demo.count`` jobs reporting into one room (or channel), through the real service and
adapter, it prints per run:

* **reply p50/p95**: a person's command (``!status <id>``, and bob's refused ``!pause <id>`` on Matrix;
  ``/status`` on Discord) until the bot's answer is visible to the person;
* **stale mean/p95/max**: sampled every 0.5 s for every running job, how long what its message shows has
  been out of date (0 when it shows the job's newest state; since the submit while no message exists
  yet, so late first posts count as stale);
* **events/job**: every request the bot made that the platform counts (messages, edits, replies,
  reactions, pins and unpins), divided by the jobs, with the breakdown;
* **429s** the platform returned;
* **allowance used**: events sent / what the platform allowed over the busy span (Synapse: burst 10 +
  0.2/s for the account). Discord: only while something waited, as the channel's edit outbox measured
  it: edits sent / (the bucket's 5 + 5 per 5 s over the seconds when an edit waited for its turn and
  the gaps between, each gap only until the bucket would be full again);
* on Matrix, the events by kind in the first 10 s (where the burst went) and while the jobs ran.

Both platforms run in the same invocation, so the figures sit side by side. Run from the repository root::

    python bench/chat_delivery.py [--platforms matrix,discord] [--jobs 1,4,20] [--matrix-seconds 60]
        [--discord-seconds 20] [--drain 90]

The 20-job Matrix run is bounded by ``--drain``: at 0.2 events/s Synapse cannot even take 20 posts plus
pins and reactions quickly, so it reports how many finals were on their messages when the time was up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import re
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Run as a script, Python puts bench/ first on sys.path, where bench/http.py would shadow the standard
# library's ``http`` that aiohttp imports. Import from the repository root instead.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))

from adapters.board import BoardPolicy, RoomBoards, board_plain
from adapters.commands import CommandRouter
from adapters.discord import DiscordAdapter, DiscordConfig
from adapters.discord.transport import DiscordTransport
from adapters.driver import CallKind, Content, ProgressDriver
from adapters.matrix import MatrixAdapter, MatrixConfig
from adapters.render import STATUS_ICON
from core.aio import cancel_and_wait
from core.builtin import register_builtins
from core.db import Database
from core.registry import HandlerRegistry
from core.service import ProgressService, ServiceConfig
from tests.fake_discord import FakeDiscordServer, running_fake_discord
from tests.integration.delivery_helpers import History
from tests.integration.matrix_helpers import UserClient, content_of, relates, status_word
from tests.servers.synapse import SynapseServer
from tests.unit.test_board import Room, event
from tests.unit.virtual_clock import VirtualClock

SAMPLE_EVERY = 0.5
#: The first seconds of a run, whose events show where the burst went.
EARLY = 10.0
#: Synapse's default rc_message for one account.
SYNAPSE_BURST, SYNAPSE_RATE = 10, 0.2


def pct(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1), nearest rank; 0 for no values."""
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


@dataclass
class Result:
    """The figures of one run."""

    platform: str
    jobs: int
    seconds: float = 0.0
    replies: list[float] = field(default_factory=list)
    unanswered: int = 0
    stale: list[float] = field(default_factory=list)
    events: Counter[str] = field(default_factory=Counter)
    hits_429: int = 0
    allowance_used: float = 0.0
    finals: int = 0
    #: Granted events by class (Matrix: from the account's outbox), or sent by outbox (Discord: per
    #: call kind).
    classes: dict[str, int] = field(default_factory=dict)
    #: Events by kind in the first ``EARLY`` seconds (where the burst went), and while the jobs ran.
    early: Counter[str] = field(default_factory=Counter)
    running: Counter[str] = field(default_factory=Counter)

    def row(self) -> str:
        """One line of the table."""
        # Answers to people's commands are per command, not per job: shown, not counted per job.
        total = sum(v for k, v in self.events.items() if k != "answer")
        kinds = " ".join(f"{k}={v / self.jobs:.1f}" for k, v in sorted(self.events.items()))
        replies = (
            f"{pct(self.replies, 0.5):6.2f}s {pct(self.replies, 0.95):6.2f}s"
            if self.replies
            else f"{'-':>7} {'-':>7}"
        )
        return (
            f"{self.platform:<8}{self.jobs:>4} {self.seconds:>6.0f}s {replies} {len(self.replies):>3}"
            f"{'+' + str(self.unanswered) if self.unanswered else '':<3}"
            f" {statistics.fmean(self.stale or [0]):6.1f}s {pct(self.stale, 0.95):6.1f}s "
            f"{max(self.stale or [0]):6.1f}s {total / self.jobs:6.1f} {self.hits_429:>5} "
            f"{self.allowance_used * 100:>6.0f}% {self.finals:>3}/{self.jobs:<3} {kinds}"
        )


HEADER = (
    f"{'platform':<8}{'jobs':>4} {'span':>7} {'rep p50':>7} {'rep p95':>7} {'n':>3}   "
    f" {'stale':>7} {'p95':>7} {'max':>7} {'ev/job':>6} {'429s':>5} {'allow.':>7} {'finals':>7} breakdown"
)


async def sample_until(
    history: History,
    ids: list[int],
    shown: Callable[[int], str | None],
    submitted: float,
    result: Result,
    deadline: float,
) -> None:
    """Sample staleness of every running job until all jobs ended (or the deadline)."""
    while time.monotonic() < deadline:
        await asyncio.sleep(SAMPLE_EVERY)
        now = time.monotonic()
        for jid in ids:
            if jid not in history.terminal:
                result.stale.append(history.staleness(jid, shown(jid), submitted, now))
        if all(j in history.terminal for j in ids):
            return


def make_service(tmp: str, concurrency: int) -> ProgressService:
    """A service on SQLite whose monitor emits at most every 0.5 s per job (the default-ish setting)."""
    url = f"sqlite:///{tmp}/bench.db"
    reg = HandlerRegistry()
    svc = ProgressService(
        ServiceConfig(database_url=url, min_interval=0.5, poll_interval=0.2, concurrency=concurrency),
        registry=reg,
        database=Database(url),
    )
    register_builtins(reg, lambda: svc.store)
    return svc


def matrix_429s(adapter: MatrixAdapter) -> int:
    """The 429s the adapter got (its transport counts them; before the outbox, its stats did)."""
    transport = getattr(adapter, "transport", None)
    if transport is None:
        return int(getattr(adapter.stats, "rate_limited", 0))
    return int(transport.rate_limited)


# ---------------------------------------------------------------------------------------------- Matrix
async def run_matrix(hs: SynapseServer, n: int, seconds: float, drain: float, run_no: int) -> Result:
    """``n`` jobs of ``seconds`` in one room, a fresh bot account at Synapse's default rc_message."""
    result = Result("matrix", n)
    bot_id = hs.register(f"bench{run_no}", "bench-password")  # no override: the default limit
    alice = UserClient(hs.base_url, hs.user_id("alice"), "alice-password")
    bob = UserClient(hs.base_url, hs.user_id("bob"), "bob-password")
    await alice.login()
    await bob.login()
    room = await alice.create_room(bot=bot_id, others=[bob.user_id])
    await bob.join(room)
    with tempfile.TemporaryDirectory() as tmp:
        svc = make_service(tmp, max(4, n))
        await svc.start()
        cfg = MatrixConfig(homeserver=hs.base_url, user_id=bot_id, password="bench-password", rooms=[room])
        adapter = MatrixAdapter(svc, CommandRouter(svc, prefix="!"), cfg)
        await adapter.start()
        await adapter.wait_ready(60)
        history = History()
        svc.bus.add_listener(history)
        try:
            await _matrix_measure(
                hs, svc, adapter, alice, bob, room, bot_id, n, seconds, drain, history, result
            )
        finally:
            svc.bus.remove_listener(history)
            if svc.worker is not None:
                await svc.worker.stop()
            adapter.config.stop_grace = 1.0
            await adapter.stop()
            await svc.stop()
            await alice.close()
            await bob.close()
    return result


def _matrix_shown(events: list[dict[str, Any]], bot_id: str) -> dict[int, str]:
    """Job id -> the text its progress notice shows now, from what alice's sync delivered."""
    originals: dict[str, int] = {}
    shown: dict[int, str] = {}
    for e in events:
        if e.get("sender") != bot_id or e.get("type") != "m.room.message":
            continue
        c, rel = content_of(e), relates(e)
        if rel.get("rel_type") == "m.replace":
            jid = originals.get(str(rel.get("event_id")))
            if jid is not None:
                shown[jid] = str(c.get("m.new_content", {}).get("body", ""))
            continue
        if c.get("msgtype") != "m.notice" or "m.in_reply_to" in rel:
            continue
        m = re.match(r"\S+ #(\d+) ", str(c.get("body", "")))
        if m and int(m.group(1)) not in shown:
            originals[str(e["event_id"])] = int(m.group(1))
            shown[int(m.group(1))] = str(c.get("body", ""))
    return shown


async def _matrix_measure(
    hs: SynapseServer,
    svc: ProgressService,
    adapter: MatrixAdapter,
    alice: UserClient,
    bob: UserClient,
    room: str,
    bot_id: str,
    n: int,
    seconds: float,
    drain: float,
    history: History,
    result: Result,
) -> None:
    steps = max(1, int(seconds))
    t0 = time.monotonic()
    jobs = [
        await svc.submit("demo.count", {"steps": steps, "delay_ms": 1000}, owner=alice.user_id, room=room)
        for _ in range(n)
    ]
    ids = [int(j.id or 0) for j in jobs]

    def shown(jid: int) -> str | None:
        return _matrix_shown(alice.room(room), bot_id).get(jid)

    async def commands() -> None:
        # A person asks every 15 s; every third ask is bob trying to pause alice's job (a refusal).
        k = 0
        while True:
            await asyncio.sleep(15.0)
            user, cmd = (bob, "pause") if k % 3 == 2 else (alice, "status")
            k += 1
            eid = await user.send_text(room, f"!{cmd} {ids[k % n]}")
            sent = time.monotonic()

            def answered(eid: str = eid) -> bool:
                return any(
                    (relates(e).get("m.in_reply_to") or {}).get("event_id") == eid for e in alice.room(room)
                )

            try:
                await alice.wait_for(answered, 60, "a reply")
                result.replies.append(time.monotonic() - sent)
            except AssertionError:
                result.unanswered += 1

    asker = asyncio.create_task(commands())
    try:
        await sample_until(history, ids, shown, t0, result, t0 + seconds + drain)
    finally:
        await cancel_and_wait([asker])

    # Wait (bounded) for every final state to be on its message.
    def finals() -> int:
        now = _matrix_shown(alice.room(room), bot_id)
        return sum(1 for j in ids if status_word(now.get(j, "")) in ("completed", "failed", "cancelled"))

    with contextlib.suppress(AssertionError):
        await alice.wait_for(
            lambda: finals() == n, max(1.0, t0 + seconds + drain - time.monotonic()), "finals"
        )
    result.finals = finals()
    bot_events = [e for e in alice.room(room) if e.get("sender") == bot_id and "state_key" not in e]
    pins = [
        e for e in alice.room(room) if e.get("sender") == bot_id and e.get("type") == "m.room.pinned_events"
    ]
    ended = t0 + seconds
    for e in bot_events + pins:
        kind = _matrix_kind(e, bot_events, bot_id)
        result.events[kind] += 1
        at = alice.seen_at.get(str(e.get("event_id")), t0)
        if at - t0 <= EARLY:
            result.early[kind] += 1
        if at <= ended:
            result.running[kind] += 1
    seen = [alice.seen_at.get(str(e.get("event_id")), t0) for e in bot_events + pins]
    span = (max(seen) if seen else time.monotonic()) - t0
    result.seconds = span
    allowed = SYNAPSE_BURST + SYNAPSE_RATE * span
    result.allowance_used = sum(result.events.values()) / allowed
    result.hits_429 = matrix_429s(adapter)
    transport = getattr(adapter, "transport", None)
    if transport is not None:
        result.classes = dict(transport.account.stats.by_priority)


def _matrix_kind(e: dict[str, Any], bot_events: list[dict[str, Any]], bot_id: str) -> str:
    """What one of the bot's events is: post, edit, pin, react, reply (completion) or answer (command)."""
    c, rel = content_of(e), relates(e)
    if e.get("type") == "m.room.pinned_events":
        return "pin"
    if e.get("type") == "m.reaction":
        return "react"
    if rel.get("rel_type") == "m.replace":
        return "edit"
    if "m.in_reply_to" in rel:
        # A reply to the bot's own message is a completion reply; to a person's, a command answer.
        target = (rel.get("m.in_reply_to") or {}).get("event_id")
        mine = any(x.get("event_id") == target and x.get("sender") == bot_id for x in bot_events)
        return "reply" if mine else "answer"
    return "post" if c.get("msgtype") == "m.notice" else "other"


# ---------------------------------------------------------------------------------------------- Discord
async def run_discord(n: int, seconds: float, drain: float) -> Result:
    """``n`` jobs of ``seconds`` in one channel of the fake Discord (5 edits per 5 s per channel)."""
    result = Result("discord", n)
    async with running_fake_discord(edit_limit=5, edit_window=5.0) as server:
        with tempfile.TemporaryDirectory() as tmp:
            svc = make_service(tmp, max(4, n))
            await svc.start()
            adapter = DiscordAdapter(
                svc,
                CommandRouter(svc, prefix="/"),
                DiscordConfig(
                    token="bench-token",
                    guild_ids=[int(server.guild_id)],
                    channel_ids=[int(server.channel_id)],
                    guild_ready_timeout=0.05,
                    edit_rate=1.0,
                    edit_burst=5,
                ),
                clock=server.clock.now,
            )
            await adapter.start()
            history = History()
            svc.bus.add_listener(history)
            try:
                await _discord_measure(server, svc, n, seconds, drain, history, result)
                await adapter.flush(drain)
                assert adapter.transport is not None
                _discord_allowance(adapter.transport, server, result)
                result.finals = sum(
                    1
                    for m in (_discord_message(server, j) for j in history.states)
                    if m is not None and "completed" in m.content
                )
            finally:
                svc.bus.remove_listener(history)
                await adapter.stop()
                await svc.stop()
            _discord_count(server, result)
    return result


def _discord_message(server: FakeDiscordServer, jid: int) -> Any:
    for m in server.messages_in():
        if (
            m.author.get("id") == server.application_id
            and m.message_reference is None
            and not m.interaction_id
            and re.search(rf"\*\*#{jid}\*\*", m.content)
        ):
            return m
    return None


async def _discord_measure(
    server: FakeDiscordServer,
    svc: ProgressService,
    n: int,
    seconds: float,
    drain: float,
    history: History,
    result: Result,
) -> None:
    delay_ms = 250
    steps = max(1, int(seconds * 1000 / delay_ms))
    user = server.make_user(name="alice")
    t0 = time.monotonic()
    result.seconds = 0.0
    jobs = [
        await svc.submit(
            "demo.count", {"steps": steps, "delay_ms": delay_ms}, owner=user.id, room=server.channel_id
        )
        for _ in range(n)
    ]
    ids = [int(j.id or 0) for j in jobs]

    def shown(jid: int) -> str | None:
        m = _discord_message(server, jid)
        return m.content if m is not None else None

    async def commands() -> None:
        k = 0
        while True:
            await asyncio.sleep(3.0)
            k += 1
            rec = await server.dispatch_slash_command("status", {"id": str(ids[k % n])}, user=user)
            try:
                resp = await server.wait_interaction_response(rec, timeout=10)
                result.replies.append(resp.at - rec.dispatched_at)
            except TimeoutError:
                result.unanswered += 1

    asker = asyncio.create_task(commands())
    try:
        await sample_until(history, ids, shown, t0, result, t0 + seconds + drain)
    finally:
        await cancel_and_wait([asker])
    result.seconds = time.monotonic() - t0


def _discord_count(server: FakeDiscordServer, result: Result) -> None:
    """Requests that Discord counts against the bot's buckets (not interaction callbacks or reads)."""
    for r in server.requests:
        if r.method == "GET" or "/interactions/" in r.path or "/webhooks/" in r.path or r.status == 429:
            continue
        if "/pins" in r.path:
            result.events["pin"] += 1
        elif r.method == "PATCH" and "/messages/" in r.path:
            result.events["edit"] += 1
        elif r.method == "POST" and r.path.endswith("/messages"):
            result.events["post"] += 1
        elif "/channels/" in r.path:
            result.events["other"] += 1
    replies = sum(
        1
        for m in server.messages_in()
        if m.author.get("id") == server.application_id and m.message_reference is not None
    )
    result.events["post"] -= replies
    result.events["reply"] += replies
    result.hits_429 = len(server.rate_limit_hits)


def _discord_allowance(transport: DiscordTransport, server: FakeDiscordServer, result: Result) -> None:
    """The edit bucket's allowance used while an edit waited, from the channel's edit outbox; and what
    each of the channel's outboxes granted."""
    boxes = transport.outboxes().get(server.channel_id, {})
    edit = boxes.get(str(CallKind.EDIT))
    if edit is not None:
        st = edit.stats
        allowed = server.edit_limit + (st.waited + st.idle) * server.edit_limit / server.edit_window
        result.allowance_used = st.sent / allowed if allowed else 0.0
    result.classes = {kind: box.stats.sent for kind, box in boxes.items()}


# ---------------------------------------------------------------------------------------------- boards
#: Platform budgets for the board comparison: (name, events/s, burst, job length in s).
BOARD_PLATFORMS = (("matrix", SYNAPSE_RATE, SYNAPSE_BURST, 60.0), ("discord", 1.0, 5, 20.0))
_ICON_STATUS = {v: k for k, v in STATUS_ICON.items()}
#: Real seconds given per virtual quarter second: the bindings are stored in a real SQLite database
#: (a few ms per write), and virtual time must not run ahead of it.
REAL_STEP = 0.004


@dataclass
class BoardResult:
    """Staleness of what people see per job (board line or own message) for one board mode."""

    platform: str
    jobs: int
    mode: str
    stale: list[float] = field(default_factory=list)
    #: The same samples split: jobs on the board, jobs on their own message.
    on_board: list[float] = field(default_factory=list)
    on_own: list[float] = field(default_factory=list)
    hits_429: int = 0
    events: int = 0
    boards: int = 0
    finals: int = 0

    def sample(self, on_board: bool, stale: float) -> None:
        """One staleness sample of a job."""
        self.stale.append(stale)
        (self.on_board if on_board else self.on_own).append(stale)

    def row(self) -> str:
        """One line of the board table."""
        return (
            f"{self.platform:<8}{self.jobs:>5} {self.mode:>6} {statistics.fmean(self.stale or [0]):7.1f}s "
            f"{pct(self.stale, 0.95):7.1f}s {max(self.stale or [0]):7.1f}s {self.events / self.jobs:7.1f} "
            f"{self.hits_429:>5} {self.boards:>6} {self.finals:>4}/{self.jobs:<4}"
            f" board {statistics.fmean(self.on_board or [0]):5.1f}s ({len(self.on_board)})"
            f" own {statistics.fmean(self.on_own or [0]):5.1f}s ({len(self.on_own)})"
        )


BOARD_HEADER = (
    f"{'platform':<8}{'jobs':>5} {'board':>6} {'stale':>8} {'p95':>8} {'max':>8} {'ev/job':>7} {'429s':>5} "
    f"{'boards':>6} {'finals':>9}"
)


def _seen(room: Any, boards: RoomBoards, driver: ProgressDriver, jid: int) -> tuple[str | None, float | None]:
    """(status, current) that people see for job ``jid`` now: its board line or its own message."""
    board = boards.boards.get("r")
    mid = None
    if boards.room_of(jid) == "r" and board is not None:
        mid = board.message_id
        text = room.messages.get(mid, "") if mid else ""
        line = next((ln for ln in text.split("\n") if re.search(rf" #{jid} ", ln + " ")), None)
        if line is None:
            return None, None
        m = re.search(r"░+ ([\d.]+)", line)
        return _ICON_STATUS.get(line.split(" ", 1)[0]), float(m.group(1)) if m else None
    rec = driver.record("job", jid)
    mid = rec.message_id if rec is not None else room.own.get(jid)
    if mid is None:
        return None, None
    room.own[jid] = mid
    status, current = room.messages[mid].split(" ")[1:3]
    return status, None if current == "None" else float(current)


async def simulate_board(
    platform: str, rate: float, burst: float, n: int, seconds: float, mode: str
) -> BoardResult:
    """``n`` jobs of ``seconds`` (an event every 0.5 s) in one room, through the real driver, outbox and
    board, over a platform that enforces ``burst`` + ``rate``/s, on virtual time."""
    result = BoardResult(platform, n, mode)
    clock = VirtualClock()
    with tempfile.TemporaryDirectory() as tmp:
        svc = ProgressService(
            ServiceConfig(database_url=f"sqlite:///{tmp}/b.db", run_worker=False), registry=HandlerRegistry()
        )
        await svc.start()
        room = Room(clock, rate, burst)
        room.own = {}
        driver = ProgressDriver(svc, room, sleep=clock.sleep)
        boards = RoomBoards(
            driver,
            BoardPolicy(mode=mode),  # type: ignore[arg-type]
            lambda v: Content(board_plain(v), board_plain(v)),
            lambda c: len(c.text) <= 2000,
            clock=clock,
        )
        history: dict[int, list[tuple[float, str, float | None]]] = {j: [] for j in range(1, n + 1)}

        def emit(jid: int, status: str, current: float | None) -> None:
            history[jid].append((clock.now, status, current))
            driver.offer(event(jid, status, current, timestamp=clock.now, total=None, name=f"j{jid}"), "r")

        steps = int(seconds / 0.5)
        for t in range(steps + 1):
            for j in range(1, n + 1):
                emit(j, "running" if t < steps else "completed", float(t) if t < steps else None)
            for _ in range(2):  # sample twice per step, as the real benches do every 0.5 s
                await clock.advance(0.25)
                await asyncio.sleep(REAL_STEP)
                for j in range(1, n + 1):
                    result.sample(
                        boards.room_of(j) is not None,
                        _stale(history[j], _seen(room, boards, driver, j), clock.now),
                    )
        deadline = clock.now + 600
        while clock.now < deadline:
            seen = [_seen(room, boards, driver, j) for j in range(1, n + 1)]
            if all(s[0] == "completed" for s in seen):
                break
            await clock.advance(0.5)
            await asyncio.sleep(REAL_STEP)
            for j, s in zip(range(1, n + 1), seen, strict=True):
                if s[0] != "completed":
                    result.sample(boards.room_of(j) is not None, _stale(history[j], s, clock.now))
        result.finals = sum(1 for j in range(1, n + 1) if _seen(room, boards, driver, j)[0] == "completed")
        result.hits_429 = room.hits_429
        result.events = int(room.box.stats.sent)
        result.boards = boards.started
        await driver.aclose(0.1)
        await room.box.aclose()
        await svc.stop()
    return result


def _stale(
    hist: list[tuple[float, str, float | None]], seen: tuple[str | None, float | None], now: float
) -> float:
    """How long what people see has been out of date (0: the newest state; since the first event: nothing)."""
    idx = max((i for i, h in enumerate(hist) if (h[1], h[2]) == seen), default=None)
    if idx is None:
        return now - hist[0][0]
    return 0.0 if idx == len(hist) - 1 else now - hist[idx + 1][0]


async def run_boards(counts: list[int]) -> list[BoardResult]:
    """board = never and board = auto, side by side, for every platform budget and job count."""
    print(
        "\nroom boards: the real driver, outbox and board over each platform's budget on virtual time "
        "(Matrix: burst 10 then 0.2/s for the account, 60 s jobs; Discord: 5 per 5 s per channel as a "
        "leaky bucket, 20 s jobs); staleness of what people see per job (board line or own message)",
        flush=True,
    )
    print(BOARD_HEADER, flush=True)
    out = []
    for platform, rate, burst, seconds in BOARD_PLATFORMS:
        for n in counts:
            for mode in ("never", "auto"):
                out.append(await simulate_board(platform, rate, burst, n, seconds, mode))
                print(out[-1].row(), flush=True)
    print("goals at 20 jobs: Matrix (default limits) mean <= 6 s; Discord mean <= 2 s, p95 <= 5 s")
    return out


# ---------------------------------------------------------------------------------------------- main
async def main_async(args: argparse.Namespace) -> None:
    """Run every requested configuration and print the table."""
    counts = [int(x) for x in args.jobs.split(",") if x.strip()]
    platforms = [p.strip() for p in args.platforms.split(",") if p.strip()]
    if "boards" in platforms:
        await run_boards([int(x) for x in args.board_jobs.split(",") if x.strip()])
        if platforms == ["boards"]:
            return
    print(
        f"chat delivery: Synapse DEFAULT rc_message (burst {SYNAPSE_BURST}, {SYNAPSE_RATE}/s) with "
        f"{args.matrix_seconds:g} s jobs; fake Discord 5 edits/5 s with {args.discord_seconds:g} s jobs; "
        f"drain bound {args.drain:g} s",
        flush=True,
    )
    print(HEADER, flush=True)
    results: list[Result] = []
    if "discord" in platforms:
        for n in counts:
            results.append(await run_discord(n, args.discord_seconds, args.drain))
            print(results[-1].row(), flush=True)
    if "matrix" in platforms:
        with tempfile.TemporaryDirectory(prefix="pb-bench-synapse-") as workdir:
            hs = SynapseServer(workdir, ratelimits="lifted", lift_messages=False, log_level="WARNING")
            hs.start()
            try:
                for user in ("alice", "bob"):
                    hs.register(user, f"{user}-password")
                    hs.override_ratelimit(hs.user_id(user), 0, 0)  # people are not the bottleneck here
                for i, n in enumerate(counts):
                    results.append(await run_matrix(hs, n, args.matrix_seconds, args.drain, i))
                    print(results[-1].row(), flush=True)
            finally:
                hs.close()
    print()
    print(HEADER)
    for r in results:
        print(r.row())
    for r in results:
        if r.classes:
            by = "by class" if r.platform == "matrix" else "sent by each of the channel's outboxes"
            print(f"{r.platform} {r.jobs} jobs, events {by}: {r.classes}")
        if r.early:
            early, running = dict(sorted(r.early.items())), dict(sorted(r.running.items()))
            print(
                f"{r.platform} {r.jobs} jobs, events in the first {EARLY:g} s: {early};",
                f"in the run: {running}",
            )
    print(
        "goals: reply p95 <= 5.5 s (Matrix), <= 1 s (Discord); 4 jobs on Matrix stale mean <= 15 s; "
        ">= 80% of the allowance used while anything waits"
    )


def main() -> None:
    """Parse arguments and run."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--platforms", default="discord,matrix,boards")
    ap.add_argument("--board-jobs", default="1,5,20,50", help="jobs per room for the board comparison")
    ap.add_argument("--jobs", default="1,4,20")
    ap.add_argument("--matrix-seconds", type=float, default=60.0, help="length of each Matrix job")
    ap.add_argument("--discord-seconds", type=float, default=20.0, help="length of each Discord job")
    ap.add_argument("--drain", type=float, default=90.0, help="how long after the jobs' end to wait at most")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
