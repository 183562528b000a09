"""Room boards (adapters/board.py) over a fake, rate-limited transport on virtual time.

The service is real (SQLite in a temp dir: bindings are stored there); the transport records what a
room would show and enforces a server-side leaky bucket, so a 429 is the server's answer, not a guess.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from adapters.board import BoardPolicy, RoomBoards, board_plain, board_view
from adapters.discord.board import board_content as discord_board
from adapters.discord.board import board_fits as discord_fits
from adapters.driver import CallKind, Content, ErrorKind, ProgressDriver, classify_error
from adapters.matrix.board import board_content as matrix_board
from adapters.matrix.board import board_fits as matrix_fits
from adapters.matrix.content import edit_content
from adapters.outbox import Outbox, RateLimited
from core.events import JobProgressEvent, next_seq
from core.registry import HandlerRegistry
from core.service import ProgressService, ServiceConfig
from tests.unit.virtual_clock import VirtualClock


class Room:
    """A fake chat platform: messages by id, pins, replies, and a leaky bucket (burst, rate/s)."""

    platform = "fake"
    reactions = 2
    pin_enabled = True
    reply_enabled = True

    def __init__(self, clock: VirtualClock, rate: float, burst: float) -> None:
        self.clock = clock
        self.rate, self.burst = rate, burst
        self.level = 0.0
        self.at = 0.0
        self.hits_429 = 0
        self.messages: dict[str, str] = {}
        self.posted: list[str] = []
        self.edits: dict[str, int] = {}
        self.pins: set[str] = set()
        self.pin_log: list[tuple[str, bool]] = []
        self.replies: list[tuple[str, int, str]] = []
        # The bot's own budget guess: Synapse's default, as the Matrix adapter starts.
        self.box = Outbox(
            "fake", rate=10, burst=burst, start_rate=rate, reserve=1, clock=clock, sleep=clock.sleep
        )

    def _spend(self) -> None:
        now = self.clock()
        self.level = max(0.0, self.level - (now - self.at) * self.rate)
        self.at = now
        if self.level + 1 > self.burst + 1e-9:
            self.hits_429 += 1
            raise RateLimited((self.level + 1 - self.burst) / self.rate)
        self.level += 1

    def outbox(self, room: str, kind: CallKind) -> Outbox:
        return self.box

    def render(self, ev: JobProgressEvent) -> Content:
        text = f"#{ev.id} {ev.status} {ev.current}"
        return Content(text, text)

    async def post(self, room: str, content: Content, reply_to: str | None, tag: str) -> str:
        self._spend()
        mid = f"m{len(self.posted) + 1}"
        self.posted.append(mid)
        self.messages[mid] = content.text
        return mid

    async def edit(self, room: str, message_id: str, content: Content, tag: str) -> None:
        self._spend()
        self.messages[message_id] = content.text
        self.edits[message_id] = self.edits.get(message_id, 0) + 1

    async def pin(self, room: str, message_id: str, pinned: bool) -> bool:
        self._spend()
        self.pin_log.append((message_id, pinned))
        (self.pins.add if pinned else self.pins.discard)(message_id)
        return True

    async def react(self, room: str, message_id: str, index: int, tag: str) -> None:
        self._spend()

    def wants_reply(self, ev: JobProgressEvent) -> bool:
        return ev.owner is not None

    async def reply(self, room: str, message_id: str, ev: JobProgressEvent, tag: str) -> None:
        self._spend()
        self.replies.append((message_id, int(ev.id), ev.status))

    def classify(self, exc: BaseException) -> tuple[ErrorKind, float]:
        return classify_error(exc)

    def board_ids(self) -> list[str]:
        return [m for m in self.posted if self.messages[m].startswith("📋")]


async def _noop(ctx: Any) -> None:
    return None


@pytest.fixture
async def service(tmp_path: Path) -> Any:
    reg = HandlerRegistry()
    reg.register("t.job", _noop)
    svc = ProgressService(
        ServiceConfig(database_url=f"sqlite:///{tmp_path}/b.db", run_worker=False), registry=reg
    )
    await svc.start()
    yield svc
    await svc.stop()


def event(job: int, status: str, current: float | None = None, **kw: Any) -> JobProgressEvent:
    """Job ``job``'s next event (alice's, in room "r"); ``kw`` overrides any other field."""
    base: dict[str, Any] = {"owner": "alice", "room": "r", "name": f"job {job}", "total": 100.0}
    base["timestamp"] = 0.0
    base.update(kw)
    return JobProgressEvent(id=job, type="job", status=status, seq=next_seq(), current=current, **base)


def make(
    service: ProgressService, clock: VirtualClock, *, rate: float = 0.2, burst: float = 10, **policy: Any
) -> tuple[Room, ProgressDriver, RoomBoards]:
    room = Room(clock, rate, burst)
    driver = ProgressDriver(service, room, sleep=clock.sleep)

    def render(view: Any) -> Content:
        text = board_plain(view)
        return Content(text, text)

    boards = RoomBoards(driver, BoardPolicy(**policy), render, lambda c: len(c.text) <= 2000, clock=clock)
    return room, driver, boards


async def run_for(clock: VirtualClock, seconds: float, step: float = 0.25) -> None:
    """Let virtual time pass in small steps, giving the database's threads real time in between."""
    end = clock.now + seconds
    while clock.now < end:
        await asyncio.sleep(0.001)
        await clock.advance(step)


async def run_until(clock: VirtualClock, cond: Any, limit: float = 2000.0) -> None:
    while not cond():
        assert clock.now < limit, f"still not true at virtual t={clock.now}"
        await run_for(clock, 1.0)


async def close(driver: ProgressDriver, room: Room) -> None:
    await driver.aclose(0.5)
    await room.box.aclose()


async def test_a_busy_room_gets_one_pinned_board_every_line_reaches_its_final_state(
    service: ProgressService,
) -> None:
    """12 jobs at Synapse's default budget: the first jobs keep their own messages, the rest report on
    one board; a failure is on the board at once; every job's final state is shown and replied to; the
    board is pinned while active, unpinned at the end; no 429 (the budget is known); afterwards a new
    job gets its own message again."""
    clock = VirtualClock()
    room, driver, boards = make(service, clock)
    ids = list(range(1, 13))
    driver.offer(event(1, "running", 0), "r")
    await run_until(clock, lambda: bool(room.posted))
    for j in ids[1:]:
        driver.offer(event(j, "running", 0), "r")
    assert boards.started == 1
    # At 0.2 events/s next to a board, one message stays fresher than 10 s: job 2 would be a second.
    # Job 1 keeps its own message; job 2's was not posted yet, so it joins the board too.
    own = [j for j in ids if driver.record("job", j) is not None]
    assert own == [1]
    board_jobs = [j for j in ids if boards.room_of(j) == "r"]
    assert board_jobs == ids[1:]
    seen_failed: float | None = None
    failed_at = 0.0
    for t in range(1, 61):  # one progress event per job per second for a minute
        for j in ids:
            if not (j == 7 and t > 20):
                driver.offer(event(j, "running", t), "r")
        if t == 20:
            driver.offer(event(7, "failed", t, error="disk full"), "r")
            failed_at = clock.now
        await run_for(clock, 1.0)
        if t >= 20 and seen_failed is None and "disk full" in room.messages[room.board_ids()[0]]:
            seen_failed = clock.now
        if t == 30:
            board = room.board_ids()[0]
            assert board in room.pins
    board = room.board_ids()[0]
    assert "failed: disk full" in room.messages[board]
    # A status change: the next event the budget allows (one each 5 s) shows it.
    assert seen_failed is not None and seen_failed - failed_at <= 6.0, seen_failed
    for j in ids:
        if j != 7:
            driver.offer(event(j, "completed", 100), "r")
    await run_until(clock, lambda: driver.pending() == 0 and not boards.boards)
    text = room.messages[board]
    assert text.startswith("📋 Jobs (board closed)")
    for j in board_jobs:
        assert f"#{j} job {j}" in text or "done" in text  # a line with its outcome, or the summary
    assert "#7 job 7 — failed: disk full" in text or "failed: #7" in text
    assert board not in room.pins and (board, True) in room.pin_log
    assert sorted(j for _, j, _ in room.replies) == ids  # everyone is told, once
    assert all(mid == board for mid, j, _ in room.replies if j in board_jobs)
    # The outbox's slow start tries twice its first guess once and learns the rate from two 429s
    # (adapters/outbox.py); after that, none.
    assert room.hits_429 <= 2
    assert len(room.board_ids()) == 1

    # The burst is over: a new job gets its own message again.
    driver.offer(event(13, "running", 1), "r")
    await run_until(clock, lambda: driver.pending() == 0)
    assert boards.room_of(13) is None and room.messages[room.posted[-1]] == "#13 running 1"
    await close(driver, room)


async def test_hysteresis_jobs_trickling_in_do_not_flip_modes(service: ProgressService) -> None:
    """Discord-like budget (1 edit/s, 10 messages fresh): jobs arriving around the threshold join the
    board while it is busy; no job gets its own message in between, and only one board is started."""
    clock = VirtualClock()
    room, driver, boards = make(service, clock, rate=1.0, burst=5)
    started: dict[int, float] = {}
    modes: list[str] = []
    job = 0
    for _ in range(60):  # a new job every 2 s, each running 22 s: about 11 active, around capacity 10
        job += 1
        started[job] = clock.now
        driver.offer(event(job, "running", 0), "r")
        modes.append("board" if boards.room_of(job) else "own")
        for j, t0 in started.items():
            if clock.now - t0 >= 22:
                driver.offer(event(j, "completed", 100), "r")
            elif clock.now - t0 < 22:
                driver.offer(event(j, "running", clock.now - t0), "r")
        await run_for(clock, 2.0)
    flips = sum(1 for a, b in itertools.pairwise(modes) if a != b)
    assert "board" in modes and flips <= 2, modes
    assert boards.started == 1
    await close(driver, room)


async def test_never_and_always(service: ProgressService) -> None:
    clock = VirtualClock()
    room, driver, boards = make(service, clock, mode="never")
    for j in range(1, 6):
        driver.offer(event(j, "running", 0), "r")
    assert boards.started == 0 and all(driver.record("job", j) for j in range(1, 6))
    await close(driver, room)
    room, driver, boards = make(service, clock, mode="always")
    driver.offer(event(9, "running", 0), "r")
    assert boards.room_of(9) == "r"
    await close(driver, room)


def always_boards(
    service: ProgressService, room: Room, clock: VirtualClock
) -> tuple[ProgressDriver, RoomBoards]:
    """A driver with ``board = "always"`` on ``room`` (a second one on the same store: a restarted bot)."""
    driver = ProgressDriver(service, room, sleep=clock.sleep)
    boards = RoomBoards(
        driver,
        BoardPolicy(mode="always"),
        lambda v: Content(board_plain(v), board_plain(v)),
        lambda c: True,
        clock=clock,
    )
    return driver, boards


async def board_before_a_restart(
    service: ProgressService, clock: VirtualClock, jobs: int
) -> tuple[Room, list[int], str]:
    """``jobs`` running jobs on a posted board of room "r", then the bot stops: the room, ids and board."""
    ids = [int((await service.submit("t.job", owner="alice", room="r")).id or 0) for _ in range(jobs)]
    room, driver, _boards = make(service, clock, mode="always")
    for j in ids:
        driver.offer(event(j, "running", 10), "r")
    await run_until(clock, lambda: bool(room.board_ids()) and driver.pending() == 0)
    await driver.aclose(0.5)
    return room, ids, room.board_ids()[0]


async def test_restart_mid_board_edits_the_same_board_message(service: ProgressService) -> None:
    """A board survives a restart: the new driver edits the same message, posts no duplicate."""
    clock = VirtualClock()
    room, ids, board = await board_before_a_restart(service, clock, 6)

    driver2, boards2 = always_boards(service, room, clock)
    await driver2.catch_up(lambda r: r)
    assert boards2.room_of(ids[0]) == "r"
    edits_before = room.edits.get(board, 0)
    posts_before = len(room.posted)
    for j in ids:
        driver2.offer(event(j, "completed", 100), "r")
    await run_until(clock, lambda: driver2.pending() == 0 and not boards2.boards)
    assert len(room.posted) == posts_before  # no duplicate board, no own messages
    assert room.edits[board] > edits_before and "board closed" in room.messages[board]
    assert board not in room.pins
    binding = await service.store.get_binding("fake", "board", ids[0])
    assert binding is not None and binding.finished and binding.message_id == board
    await close(driver2, room)


async def test_live_events_before_the_catch_up_still_edit_the_stored_board(service: ProgressService) -> None:
    """After a restart the jobs keep reporting: their events reach the new driver before it has read the
    stored board. The board they start waits, then takes over the stored message: one board, no duplicate,
    and the stored message ends pinned-then-unpinned as usual."""
    clock = VirtualClock()
    jobs = [await service.submit("t.job", owner="alice", room="r") for _ in range(3)]
    ids = [int(j.id or 0) for j in jobs]
    room, driver, _boards = make(service, clock, mode="always")
    driver.offer(event(ids[0], "running", 10), "r")  # the stored board lists only the first job
    await run_until(clock, lambda: bool(room.board_ids()) and driver.pending() == 0)
    board = room.board_ids()[0]
    await driver.aclose(0.5)

    driver2, boards2 = always_boards(service, room, clock)
    driver2.expect_catch_up()
    posts_before = len(room.posted)
    for j in ids:  # live, before the catch-up: a new board starts for the room
        driver2.offer(event(j, "running", 20), "r")
    await run_for(clock, 30)
    assert len(room.posted) == posts_before  # it waits for the catch-up instead of posting
    await driver2.catch_up(lambda r: r)
    for j in ids:
        driver2.offer(event(j, "completed", 100), "r")
    await run_until(clock, lambda: driver2.pending() == 0 and not boards2.boards)
    assert len(room.posted) == posts_before  # no second board, no own messages
    assert room.board_ids() == [board]
    assert "board closed" in room.messages[board]
    assert all(f"#{j}" in room.messages[board] for j in ids), room.messages[board]
    assert board not in room.pins
    binding = await service.store.get_binding("fake", "board", ids[0])
    assert binding is not None and binding.finished and binding.message_id == board
    await close(driver2, room)


async def test_a_live_event_during_the_restore_joins_the_stored_board(service: ProgressService) -> None:
    """A job's live event that arrives while the restart reads the stored board's jobs joins that board:
    no second board is posted."""
    clock = VirtualClock()
    room, ids, board = await board_before_a_restart(service, clock, 2)

    driver2, boards2 = always_boards(service, room, clock)
    driver2.expect_catch_up()
    real_get = service.store.get

    async def get_while_a_job_reports(job_id: int) -> Any:
        driver2.offer(event(ids[1], "running", 30), "r")  # live, in the middle of the restore
        return await real_get(job_id)

    service.store.get = get_while_a_job_reports  # type: ignore[method-assign]
    posts_before = len(room.posted)
    await driver2.catch_up(lambda r: r)
    service.store.get = real_get  # type: ignore[method-assign]
    for j in ids:
        driver2.offer(event(j, "completed", 100), "r")
    await run_until(clock, lambda: driver2.pending() == 0 and not boards2.boards)
    assert len(room.posted) == posts_before and room.board_ids() == [board]
    assert "board closed" in room.messages[board]
    await close(driver2, room)


class AgingRoom(Room):
    """A platform whose messages in ``old`` can no longer be edited (Discord's one-hour rule)."""

    def __init__(self, clock: VirtualClock, rate: float, burst: float) -> None:
        super().__init__(clock, rate, burst)
        self.old: set[str] = set()

    def needs_repost(self, message_id: str) -> bool:
        return message_id in self.old

    async def retire(self, room: str, old_id: str, new_id: str, ev: JobProgressEvent, tag: str) -> None:
        """Past the hour nothing can edit the old message into a pointer."""

    async def edit(self, room: str, message_id: str, content: Content, tag: str) -> None:
        assert message_id not in self.old, "edited a board that was too old"
        await super().edit(room, message_id, content, tag)


async def test_a_board_too_old_to_edit_is_posted_afresh_and_the_old_one_unpinned(
    service: ProgressService,
) -> None:
    clock = VirtualClock()
    jobs = [await service.submit("t.job", owner="alice", room="r") for _ in range(4)]
    ids = [int(j.id or 0) for j in jobs]
    room = AgingRoom(clock, rate=1.0, burst=5)
    driver, boards = always_boards(service, room, clock)
    for j in ids:
        driver.offer(event(j, "running", 10), "r")
    await run_until(clock, lambda: bool(room.board_ids()) and room.board_ids()[0] in room.pins)
    first = room.board_ids()[0]
    room.old.add(first)  # an hour later: the platform refuses edits of it
    for j in ids:
        driver.offer(event(j, "running", 60), "r")
    await run_until(clock, lambda: len(room.board_ids()) == 2 and driver.pending() == 0)
    second = room.board_ids()[1]
    assert room.messages[second].count("░ 60") == len(ids)  # the fresh board shows the newest state
    assert second in room.pins and first not in room.pins  # the fresh board is the pinned one
    binding = await service.store.get_binding("fake", "board", ids[0])
    assert binding is not None and binding.message_id == second
    for j in ids:
        driver.offer(event(j, "completed", 100), "r")
    await run_until(clock, lambda: driver.pending() == 0 and not boards.boards)
    assert len(room.board_ids()) == 2 and "board closed" in room.messages[second]
    assert driver.stats.reposts == 1
    await close(driver, room)


def _two_hundred() -> Any:
    events = [event(j, "running", j % 100, message=f"step {j} @room **bold**") for j in range(1, 181)]
    events += [event(j, "completed", 100) for j in range(181, 196)]
    events += [event(j, "failed", 3, error="boom") for j in range(196, 201)]
    return board_view(events, collapsed_done=12, collapsed_failed=[41])


def test_two_hundred_jobs_fit_discords_limit_with_a_summary_line() -> None:
    from adapters.board import fit

    content = fit(_two_hundred(), discord_board, discord_fits)
    text = content.text
    assert len(text) <= 2000
    lines = text.split("\n")
    assert lines[0].startswith("**📋 Jobs: 180 running")
    assert lines[1].startswith("⏳ **\\#1 job 1**") or lines[1].startswith("⏳ **#1 job 1**")
    assert "+" in lines[-1] and "running" in lines[-1] and "27 done" in lines[-1]
    assert "6 failed: #41, #196" in lines[-1]
    assert "@room" not in text and "\\*\\*bold\\*\\*" in text  # escaped like every other message


def test_two_hundred_jobs_fit_matrix_limit_with_a_summary_line() -> None:
    from adapters.board import fit

    content = fit(_two_hundred(), matrix_board, matrix_fits)
    edit = edit_content("$" + "x" * 60, content.payload)
    assert len(json.dumps(edit).encode()) <= 60_000
    body = content.payload["body"]
    assert body.split("\n")[-1].startswith("… +") and "failed: #41" in body
    html_body = content.payload["formatted_body"]
    assert "<b>#1 job 1</b>" in html_body and "**bold**" in html_body and "<script" not in html_body
    # Running lines come first: no finished line is shown while running ones are summarized.
    assert "✅" not in body.split("\n", 1)[1]


def test_html_is_escaped() -> None:
    view = board_view([event(1, "running", 5, name="<script>x</script>", message="a & b")])
    content = matrix_board(view)
    assert "<script>" not in content.payload["formatted_body"]
    assert "&lt;script&gt;" in content.payload["formatted_body"]


def test_finished_lines_collapse_into_a_summary() -> None:
    view = board_view([], collapsed_done=12, collapsed_failed=[41])
    assert view.summary == "12 done, 1 failed: #41"
    assert dataclasses.replace(view).header.endswith("12 done · 1 failed")
