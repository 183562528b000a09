"""A room board: when a room is too busy for one message per job, one pinned message lists its jobs.

A platform's budget is physical: Synapse's default ``rc_message`` lets the bot's account send one event
every 5 s, Discord one edit per second per channel. With one message per job, ``n`` jobs in a room get an
edit each every ``n / rate`` seconds. One message listing every job of the room refreshes all of them
with one edit. This module adds that *board* to :class:`~adapters.driver.ProgressDriver`:

* **When it engages** (:meth:`RoomBoards.take`, called by the driver for every event). The outbox of the
  room's edit scope (edits bind progress) knows the rate it has learned; a message fresher than
  ``max_staleness_s`` needs one edit per ``max_staleness_s``; a board takes half the scope's turns, so next
  to one the scope keeps ``rate * max_staleness_s / 2`` own messages fresh (:meth:`RoomBoards.capacity`).
  When a new job would push the scope's active messages (own messages plus boards) above that (and above
  one), the job reports into its room's board instead, and so do the room's jobs whose own message is not
  posted yet (a burst). Jobs that already have their own message keep it.
* **Hysteresis.** Once a room has a board, new jobs keep joining it while it still has active jobs or
  while the scope is above ``low_water`` of its capacity; only then do new jobs get their own messages
  again, so jobs trickling in around the threshold do not flip modes on every job. The board ends (a
  final edit, unpin) when its last job has finished and no job joined for ``quiet_s``.
* **The message** (:func:`board_view`, :func:`fit`): a header with counts, one line per job (icon, id,
  name, bar, percent, stage, last message, or the outcome), running jobs first; finished jobs stay
  ``linger_s`` with their outcome, then collapse into a summary line (``12 done, 1 failed: #41``);
  lines that do not fit the platform's size limit are summarized too. Each platform formats and escapes
  a :class:`BoardView` itself (``adapters/matrix/board.py``, ``adapters/discord/board.py``).
* **Delivery.** One lane per board, through the scope's outbox like every message: the first post is
  :data:`Priority.NEW`, an edit that shows a status change (a failure, a pause) :data:`Priority.STATUS`,
  routine edits :data:`Priority.PROGRESS`, the pin :data:`Priority.COSMETIC`. The board carries no
  control reactions (a reaction cannot say which job it means); a finished job's completion reply,
  mentioning its requester, answers the board message.
* **Restarts.** The board is stored as a binding of kind ``board`` (its id is its first job's id), with
  its jobs in ``extra``; each job's binding points at the board. After a restart the driver's catch-up
  restores the board, and the same message is edited again.

Time is injectable (``clock``; the driver's ``sleep``). Nothing here imports a chat library or ``bot/``.
"""

from __future__ import annotations

import asyncio
import html
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from core.events import JobProgressEvent

from .driver import CallKind, call_kind
from .outbox import Outbox, PermanentError, Priority, RateLimited
from .render import STATUS_ICON, bar, clip, defuse_mentions, label, outcome_text

if TYPE_CHECKING:
    from .driver import Content, ProgressDriver

__all__ = [
    "BoardLine",
    "BoardMarkup",
    "BoardPolicy",
    "BoardView",
    "RoomBoards",
    "board_html",
    "board_plain",
    "board_text",
    "board_view",
    "fit",
    "summary_text",
]

log = logging.getLogger(__name__)

BoardMode = Literal["auto", "always", "never"]
#: The bar of a board line: shorter than a message's, so many lines fit.
LINE_BAR = 10
#: How many failed job ids the summary names before "…".
SUMMARY_IDS = 5


@dataclass(slots=True, frozen=True)
class BoardPolicy:
    """When boards engage and how long lines stay (``[chat]`` in the settings)."""

    mode: BoardMode = "auto"
    #: What a message may show at most this old (s); above that the room gets a board.
    max_staleness_s: float = 10.0
    #: Finished jobs stay on the board this long (s) with their outcome, then collapse into the summary.
    linger_s: float = 60.0
    #: A board whose jobs have all finished ends after this long (s) without a new job; None: max_staleness_s.
    quiet_s: float | None = None
    #: New jobs get their own messages again once the scope is below this share of its capacity.
    low_water: float = 0.5

    def __post_init__(self) -> None:
        if self.mode not in ("auto", "always", "never"):
            raise ValueError('chat.board must be "auto", "always" or "never"')
        if not (self.max_staleness_s > 0 and self.linger_s >= 0 and 0 <= self.low_water <= 1):
            raise ValueError("need max_staleness_s > 0, linger_s >= 0 and 0 <= low_water <= 1")

    @property
    def quiet(self) -> float:
        """How long a finished board waits for a new job before it ends (s)."""
        return self.max_staleness_s if self.quiet_s is None else self.quiet_s


# ---------------------------------------------------------------------------------------------- the view
@dataclass(slots=True, frozen=True)
class BoardLine:
    """One job on the board, as plain (unescaped) pieces; a format escapes them."""

    job_id: int
    icon: str
    label: str
    #: The outcome or the status when it says more than "running" (``paused by @a``, ``failed: boom``).
    state: str | None
    #: ``▓▓▓▓░░░░░░ 40%``, or None before the job reported any progress.
    bar: str | None
    #: ``stage 2/3 load · the last message``.
    detail: str | None
    active: bool


@dataclass(slots=True)
class BoardView:
    """What one board message shows: counts, lines (in order) and the summary of the rest."""

    running: int = 0
    paused: int = 0
    pending: int = 0
    done: int = 0
    failed_ids: list[int] = field(default_factory=list)
    cancelled: int = 0
    lines: list[BoardLine] = field(default_factory=list)
    #: Lines not shown (collapsed or not fitting), by kind: "running", "paused", "pending".
    hidden_active: dict[str, int] = field(default_factory=dict)
    #: Finished jobs summarized instead of shown: done, cancelled, and the failed ids.
    hidden_done: int = 0
    hidden_cancelled: int = 0
    hidden_failed: list[int] = field(default_factory=list)
    closed: bool = False

    @property
    def header(self) -> str:
        """``📋 Jobs: 3 running · 1 paused · 8 done · 1 failed`` (plain text)."""
        counts = [f"{self.running} running"]
        if self.pending:
            counts.append(f"{self.pending} waiting")
        counts += [f"{self.paused} paused", f"{self.done} done"]
        if self.failed_ids:
            counts.append(f"{len(self.failed_ids)} failed")
        if self.cancelled:
            counts.append(f"{self.cancelled} cancelled")
        title = "Jobs (board closed)" if self.closed else "Jobs"
        return f"📋 {title}: " + " · ".join(counts)

    @property
    def summary(self) -> str | None:
        """``+150 running, 12 done, 1 failed: #41`` for what is not shown line by line (plain text)."""
        return summary_text(self.hidden_active, self.hidden_done, self.hidden_cancelled, self.hidden_failed)


def summary_text(active: dict[str, int], done: int, cancelled: int, failed: list[int]) -> str | None:
    """The summary line of jobs not shown: ``+3 running, 12 done, 1 failed: #41`` (None: nothing)."""
    bits = [f"+{n} {kind}" for kind, n in active.items() if n]
    if done:
        bits.append(f"{done} done")
    if cancelled:
        bits.append(f"{cancelled} cancelled")
    if failed:
        ids = ", ".join(f"#{i}" for i in failed[:SUMMARY_IDS])
        more = f" (+{len(failed) - SUMMARY_IDS})" if len(failed) > SUMMARY_IDS else ""
        bits.append(f"{len(failed)} failed: {ids}{more}")
    return ", ".join(bits) or None


def board_line(ev: JobProgressEvent) -> BoardLine:
    """The board line of a job's state."""
    pct = ev.display_percent
    bar_text = None
    if pct is not None and ev.status != "completed":
        bar_text = f"{bar(pct, LINE_BAR)} {pct:.0f}%"
    elif ev.current is not None and ev.status in ("running", "paused"):
        bar_text = f"{bar(None, LINE_BAR)} {ev.current:g}"
    details = []
    if ev.stage_name is not None and not ev.terminal:
        count = f"/{ev.stage_count}" if ev.stage_count else ""
        details.append(f"stage {(ev.stage_index or 0) + 1}{count} {clip(ev.stage_name, 30)}".rstrip())
    if ev.message and ev.status in ("running", "paused", "pending"):
        details.append(clip(ev.message, 60))
    return BoardLine(
        job_id=int(ev.id),
        icon=STATUS_ICON.get(ev.status, "•"),
        label=label(ev, 40),
        state=None if ev.status == "running" and not ev.control else outcome_text(ev),
        bar=bar_text,
        detail=" · ".join(details) or None,
        active=not ev.terminal,
    )


_ORDER = {"running": 0, "pending": 1, "paused": 2, "failed": 3, "cancelled": 4, "completed": 5}


def board_view(
    events: list[JobProgressEvent],
    *,
    collapsed_done: int = 0,
    collapsed_cancelled: int = 0,
    collapsed_failed: list[int] | None = None,
    closed: bool = False,
) -> BoardView:
    """The full view of a board: every job as a line, running first; collapsed jobs in the summary."""
    failed = list(collapsed_failed or [])
    view = BoardView(closed=closed, hidden_done=collapsed_done, hidden_cancelled=collapsed_cancelled)
    view.hidden_failed = list(failed)
    view.done, view.cancelled, view.failed_ids = collapsed_done, collapsed_cancelled, list(failed)
    for ev in sorted(events, key=lambda e: (_ORDER.get(e.status, 9), int(e.id))):
        st = ev.status
        if st == "running":
            view.running += 1
        elif st == "paused":
            view.paused += 1
        elif st == "pending":
            view.pending += 1
        elif st == "completed":
            view.done += 1
        elif st == "failed":
            view.failed_ids.append(int(ev.id))
        elif st == "cancelled":
            view.cancelled += 1
        view.lines.append(board_line(ev))
    return view


def _hide(view: BoardView, keep: int) -> BoardView:
    """The view with only the first ``keep`` lines; the rest counted in the summary."""
    out = BoardView(
        running=view.running,
        paused=view.paused,
        pending=view.pending,
        done=view.done,
        failed_ids=view.failed_ids,
        cancelled=view.cancelled,
        lines=view.lines[:keep],
        hidden_active=dict(view.hidden_active),
        hidden_done=view.hidden_done,
        hidden_cancelled=view.hidden_cancelled,
        hidden_failed=list(view.hidden_failed),
        closed=view.closed,
    )
    for line in view.lines[keep:]:
        if line.active:
            kind = {"⏸️": "paused", "🕓": "waiting"}.get(line.icon, "running")
            out.hidden_active[kind] = out.hidden_active.get(kind, 0) + 1
        elif line.icon == STATUS_ICON["failed"]:
            out.hidden_failed.append(line.job_id)
        elif line.icon == STATUS_ICON["cancelled"]:
            out.hidden_cancelled += 1
        else:
            out.hidden_done += 1
    return out


def fit(view: BoardView, render: Callable[[BoardView], Content], fits: Callable[[Content], bool]) -> Content:
    """The rendering of ``view`` with as many lines as fit (running ones come first); the rest summarized."""
    full = render(view)
    if fits(full):
        return full
    lo, hi = 0, len(view.lines) - 1  # lines kept: lo always fits (checked below), hi+1 does not
    best = render(_hide(view, 0))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        candidate = render(_hide(view, mid))
        if fits(candidate):
            lo, best = mid, candidate
        else:
            hi = mid - 1
    if lo == 0 and not fits(best):
        log.warning("board: even the header and summary exceed the platform's limit")
    return best


# ---------------------------------------------------------------------------------------------- boards
@dataclass(slots=True)
class Board:
    """One room's board message and its jobs."""

    room: str
    #: The board's id: its first job's id (unique and stable, so the binding survives restarts).
    ident: int
    jobs: dict[int, JobProgressEvent] = field(default_factory=dict)
    message_id: str | None = None
    pinned: bool = False
    pin_refused: bool = False
    #: A board message replaced by a re-post (Discord's one-hour edit rule), still pinned: to unpin.
    replaced_pinned: str | None = None
    #: The state version wanted and the one the message shows.
    version: int = 1
    shown_version: int = 0
    shown_text: str | None = None
    #: (status, control) of each job as the message shows it: a change of it is a status change.
    shown_state: dict[int, tuple[str, str | None]] = field(default_factory=dict)
    replied: set[int] = field(default_factory=set)
    ended_at: dict[int, float] = field(default_factory=dict)
    collapsed_done: int = 0
    collapsed_cancelled: int = 0
    collapsed_failed: list[int] = field(default_factory=list)
    last_join: float = 0.0
    closed: bool = False
    finished: bool = False
    origin: str | None = None
    #: What each job's binding stores now (message, finished, replied), to write only changes.
    saved: dict[int, tuple[str, bool, bool]] = field(default_factory=dict)
    #: The lane waits only for a deadline (a line to collapse, the quiet period).
    sleeping: bool = False
    task: asyncio.Task[None] | None = None
    waker: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def shown_any(self) -> bool:
        """Whether the board shows any job (as a line or in the summary)."""
        return bool(self.jobs or self.collapsed_done or self.collapsed_cancelled or self.collapsed_failed)

    @property
    def active(self) -> int:
        """Jobs on the board that have not finished."""
        return sum(1 for ev in self.jobs.values() if not ev.terminal)


@dataclass(slots=True)
class _Step:
    name: str
    priority: Priority
    call: Callable[[], Any] | None


class RoomBoards:
    """The boards of one driver: at most one per room (see the module docstring)."""

    def __init__(
        self,
        driver: ProgressDriver,
        policy: BoardPolicy,
        render: Callable[[BoardView], Content],
        fits: Callable[[Content], bool],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Boards for ``driver``; ``render`` formats (and escapes) a view, ``fits`` checks the size limit."""
        self.driver = driver
        self.policy = policy
        self.render = render
        self.fits = fits
        self._clock = clock
        self.boards: dict[str, Board] = {}
        #: job id -> its board.
        self._job_board: dict[int, Board] = {}
        #: Boards started (a counter for tests and benches).
        self.started = 0
        driver.boards = self

    # ------------------------------------------------------------------ engaging
    def capacity(self, box: Outbox) -> float:
        """How many messages the scope can keep fresher than ``max_staleness_s`` at its learned rate.

        ``k`` messages sharing ``rate`` are each edited every ``k / rate`` s. Once a board runs it takes
        half the turns (its own lane), so the own messages next to it get half the rate: ``k`` may be at
        most ``rate * max_staleness_s / 2``.
        """
        return box.rate * self.policy.max_staleness_s / 2

    def load(self, box: Outbox) -> int:
        """Active messages of the scope: own messages of active jobs plus boards with active jobs."""
        t = self.driver.transport
        own = self.driver.active_in_scope(box)
        boards = sum(1 for b in self.boards.values() if b.active and t.outbox(b.room, CallKind.EDIT) is box)
        return own + boards

    def take(self, ev: JobProgressEvent, room: str, has_own: bool) -> bool:
        """Whether ``ev`` goes to a board (True: the board shows it; the driver does nothing more)."""
        if ev.type != "job" or not isinstance(ev.id, int):
            return False
        board = self._job_board.get(ev.id)
        if board is not None:
            shown = board.jobs.get(ev.id)
            if shown is not None and ev.seq <= shown.seq:
                return True  # latest wins: an older state is ignored
            self._update(board, ev)
            return True
        if has_own or ev.terminal or self.policy.mode == "never":
            return False
        # Progress is bound by the edits: the capacity is that of the room's edit scope.
        box = self.driver.transport.outbox(room, CallKind.EDIT)
        board = self.boards.get(room)
        # A lone job never needs a board: a board of one job is one message too.
        wanted = self.policy.mode == "always" or self.load(box) + 1 > max(1.0, self.capacity(box))
        if board is not None and not board.finished:
            # Hysteresis: an open board keeps taking new jobs while it is busy or the scope is loaded.
            busy = board.active > 0 or self.load(box) + 1 > self.policy.low_water * self.capacity(box)
            if not (busy or wanted):
                return False
            board.closed = False
        elif wanted:
            board = Board(room=room, ident=ev.id, last_join=self._clock())
            self.boards[room] = board
            self.started += 1
            log.info("%s: room %s is busy; new jobs report on a board", self.driver.platform, room)
            # Jobs whose own message is not posted yet (a burst arriving at once) join it too; jobs
            # that already have their own message keep it.
            for other in self.driver.release_unposted(room):
                self._job_board[int(other.id)] = board
                self._update(board, other)
                self._take_origin(board, room, other.owner)
        else:
            return False
        board.last_join = self._clock()
        self._job_board[ev.id] = board
        self._update(board, ev)
        self._take_origin(board, room, ev.owner)
        return True

    def _take_origin(self, board: Board, room: str, owner: str | None) -> None:
        """Answering a person's !run: the board's first post replies to it; later, the board shows it."""
        origin = self.driver.take_origin(room, owner)
        if board.origin is None and board.message_id is None:
            board.origin = origin

    def room_of(self, job_id: int) -> str | None:
        """The room whose board shows ``job_id``, if any."""
        board = self._job_board.get(job_id)
        return board.room if board is not None else None

    def pending(self) -> int:
        """Boards with work left."""
        return sum(
            1 for b in self.boards.values() if b.task is not None and not b.task.done() and not b.sleeping
        )

    def _update(self, board: Board, ev: JobProgressEvent) -> None:
        old = board.jobs.get(int(ev.id))
        board.jobs[int(ev.id)] = ev
        board.version += 1
        if ev.terminal:
            board.ended_at.setdefault(int(ev.id), self._clock())
        else:
            board.ended_at.pop(int(ev.id), None)
            if old is not None and old.terminal:
                board.replied.discard(int(ev.id))  # retried: its new end gets its own reply
        if old is None or (old.status, old.control) != (ev.status, ev.control):
            self.driver.transport.outbox(board.room, CallKind.EDIT).nudge()
        self._kick(board)

    def _kick(self, board: Board) -> None:
        if self.driver.closed:
            return
        board.waker.set()
        if board.task is None or board.task.done():
            board.task = asyncio.get_running_loop().create_task(
                self._run(board), name=f"{self.driver.platform}:board:{board.room}"
            )
            self.driver.busy()

    # ------------------------------------------------------------------ the lane
    async def _run(self, board: Board) -> None:
        failures = 0
        t = self.driver.transport
        try:
            while not self.driver.closed:
                board.waker.clear()
                step = self._next(board)
                if step is None:
                    deadline = self._deadline(board)
                    if deadline is None:
                        return
                    await self._wait(board, deadline - self._clock())
                    continue
                if step.call is None:
                    continue
                if step.name == "post" and not self.driver.restored.is_set():
                    # A restart's stored board of this room may still be adopted (see restore()).
                    await self.driver.restored.wait()
                    continue
                try:
                    # Its own lane: the fair share between lanes gives a board (many jobs) half the
                    # turns of its room, not one turn per message like any single job.
                    bucket = call_kind(step.name)
                    async with t.outbox(board.room, bucket).slot(
                        step.priority, (board.room, "board"), current=lambda: self._priority(board)
                    ) as slot:
                        now = self._next(board)
                        # A step of another kind waits in its own bucket (Discord: per route).
                        if now is None or now.call is None or call_kind(now.name) is not bucket:
                            slot.unused()
                            continue
                        try:
                            await now.call()
                        except (RateLimited, PermanentError):
                            raise
                        except Exception as exc:
                            kind, retry_after = t.classify(exc)
                            if kind.value == "rate_limited":
                                raise RateLimited(retry_after, str(exc)) from exc
                            if kind.value == "permanent":
                                raise PermanentError(str(exc)) from exc
                            raise
                    failures = 0
                except RateLimited:
                    self.driver.stats.rate_limited += 1
                except PermanentError as exc:
                    self.driver.stats.dropped += 1
                    self._give_up(board, step, exc)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self.driver.stats.failed_requests += 1
                    failures += 1
                    delay = self.driver.backoff(failures)
                    log.info(
                        "%s: board %s of %s failed (%s); retry in %.1fs",
                        t.platform,
                        step.name,
                        board.room,
                        exc,
                        delay,
                    )
                    await self.driver.sleep(delay)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s: the board of %s failed", t.platform, board.room)
        finally:
            if board.task is asyncio.current_task():
                board.task = None
            if board.finished and self.boards.get(board.room) is board:
                del self.boards[board.room]
                for jid in board.jobs:
                    if self._job_board.get(jid) is board:
                        del self._job_board[jid]
            self.driver.busy(done=True)

    async def _wait(self, board: Board, delay: float) -> None:
        """Sleep until ``delay`` passed or the board got news."""
        sleeper = asyncio.ensure_future(self.driver.sleep(max(0.0, delay)))
        waker = asyncio.ensure_future(board.waker.wait())
        # Waiting for a line to collapse or for the quiet period is not undelivered work: a flush
        # (and a stop) need not wait for it.
        board.sleeping = True
        self.driver.busy(done=True)
        try:
            await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            board.sleeping = False
            self.driver.busy()
            for task in (sleeper, waker):
                task.cancel()
            await asyncio.gather(sleeper, waker, return_exceptions=True)

    def _deadline(self, board: Board) -> float | None:
        """When the board has something to do without news: a line to collapse, or its end."""
        if board.finished:
            return None
        times = [end + self.policy.linger_s for end in board.ended_at.values()]
        if board.shown_any and board.active == 0 and not board.closed:
            times.append(board.last_join + self.policy.quiet)
        # A deadline already past had nothing to do (its line waits for its reply): not a busy loop.
        now = self._clock()
        future = [t for t in times if t > now]
        return min(future) if future else None

    def _priority(self, board: Board) -> int:
        """The class of the board's next call now (a waiting edit becomes a status change)."""
        if board.message_id is None:
            return Priority.NEW
        if board.version > board.shown_version and self._status_changed(board):
            return Priority.STATUS
        if any(ev.terminal and j not in board.replied for j, ev in board.jobs.items()):
            return Priority.STATUS
        return Priority.PROGRESS

    @staticmethod
    def _status_changed(board: Board) -> bool:
        return (
            any(
                board.shown_state.get(jid) != (ev.status, ev.control)
                and (ev.status != "running" or ev.control)
                for jid, ev in board.jobs.items()
            )
            or board.closed
        )

    def _next(self, board: Board) -> _Step | None:
        """The board's next step (bookkeeping such as collapsing finished lines happens here)."""
        t = self.driver.transport
        if board.finished:
            return None
        now = self._clock()
        self._collapse(board, now)
        if not board.jobs and board.message_id is None:
            return None
        if board.message_id is None:
            return _Step("post", Priority.NEW, lambda: self._post(board))
        changed = board.version > board.shown_version
        if changed and self._status_changed(board):
            return self._edit_step(board, Priority.STATUS)
        for jid, ev in board.jobs.items():
            # The reply follows the outcome on the board (a status change, so that came first).
            shown = board.shown_state.get(jid, ("",))[0] == ev.status
            if ev.terminal and shown and jid not in board.replied:
                if t.reply_enabled and t.wants_reply(ev):
                    return _Step("reply", Priority.STATUS, self._reply_call(board, ev))
                board.replied.add(jid)
        active = board.active > 0 and not board.closed
        if t.pin_enabled and active and not board.pinned and not board.pin_refused:
            # One event per board, in the class of its edits: a board is only found when pinned.
            return _Step("pin", Priority.PROGRESS, lambda: self._pin(board, True))
        if board.replaced_pinned is not None:
            return _Step("unpin-replaced", Priority.COSMETIC, lambda: self._unpin_replaced(board))
        if changed:
            return self._edit_step(board, Priority.PROGRESS)
        quiet = now >= board.last_join + self.policy.quiet
        if not board.closed and board.shown_any and board.active == 0 and quiet:
            # Its last job has finished and nobody joined for a while: the board ends.
            board.closed = True
            board.version += 1
            return _Step("close", Priority.STATUS, None)
        if board.closed and board.pinned:
            return _Step("unpin", Priority.COSMETIC, lambda: self._pin(board, False))
        if board.closed:
            board.finished = True
            self.driver.spawn(self._save(board))
            log.info("%s: the board of %s ended", t.platform, board.room)
        return None

    def _edit_step(self, board: Board, priority: Priority) -> _Step:
        content = self._content(board)
        if content.text == board.shown_text:
            board.shown_version = board.version
            self._mark_shown(board)
            return _Step("unchanged", priority, None)
        if self._too_old(board):
            return _Step("repost", priority, lambda: self._repost(board, content))
        return _Step("edit", priority, lambda: self._edit(board, content))

    def _too_old(self, board: Board) -> bool:
        """Whether the platform no longer lets the board message be edited (a transport that re-posts)."""
        reposting, message_id = self.driver.reposting, board.message_id
        return message_id is not None and reposting is not None and reposting.needs_repost(message_id)

    def _reply_call(self, board: Board, ev: JobProgressEvent) -> Callable[[], Any]:
        return lambda: self._reply(board, ev)

    def _collapse(self, board: Board, now: float) -> None:
        """Finished jobs whose outcome was shown and answered for ``linger_s`` join the summary line."""
        for jid, end in list(board.ended_at.items()):
            if now < end + self.policy.linger_s or jid not in board.replied:
                continue
            if board.shown_state.get(jid, ("",))[0] != board.jobs[jid].status:
                continue  # its outcome was not on the board yet
            ev = board.jobs.pop(jid)
            del board.ended_at[jid]
            board.shown_state.pop(jid, None)
            if ev.status == "failed":
                board.collapsed_failed.append(jid)
            elif ev.status == "cancelled":
                board.collapsed_cancelled += 1
            else:
                board.collapsed_done += 1
            board.version += 1

    def _content(self, board: Board) -> Content:
        view = board_view(
            list(board.jobs.values()),
            collapsed_done=board.collapsed_done,
            collapsed_cancelled=board.collapsed_cancelled,
            collapsed_failed=board.collapsed_failed,
            closed=board.closed,
        )
        return fit(view, self.render, self.fits)

    def _mark_shown(self, board: Board) -> None:
        board.shown_state = {jid: (ev.status, ev.control) for jid, ev in board.jobs.items()}

    # ------------------------------------------------------------------ the calls
    async def _post(self, board: Board) -> None:
        version, content = board.version, self._content(board)
        tag = f"board{board.ident}-post"
        board.message_id = await self.driver.transport.post(board.room, content, board.origin, tag)
        self.driver.stats.posts += 1
        board.shown_version, board.shown_text = version, content.text
        self._mark_shown(board)
        await self._save(board)

    async def _edit(self, board: Board, content: Content) -> None:
        assert board.message_id is not None
        version = board.version
        tag = f"board{board.ident}-e{version}"
        await self.driver.transport.edit(board.room, board.message_id, content, tag)
        self.driver.stats.edits += 1
        board.shown_version, board.shown_text = version, content.text
        self._mark_shown(board)
        if board.closed or any(ev.terminal for ev in board.jobs.values()):
            await self._save(board)

    async def _repost(self, board: Board, content: Content) -> None:
        """Post the board afresh where its message can no longer be edited; the pin step pins the new one
        and the old one is unpinned after it (as the driver does for a job's message)."""
        old, was_pinned = board.message_id, board.pinned
        version = board.version
        tag = f"board{board.ident}-re{version}"
        board.message_id = await self.driver.transport.post(board.room, content, None, tag)
        self.driver.stats.posts += 1
        self.driver.stats.reposts += 1
        board.pinned = False
        board.replaced_pinned = old if was_pinned else None
        board.shown_version, board.shown_text = version, content.text
        self._mark_shown(board)
        await self._save(board)  # the binding moves at once: a restart edits the new message

    async def _unpin_replaced(self, board: Board) -> None:
        assert board.replaced_pinned is not None
        await self.driver.transport.pin(board.room, board.replaced_pinned, False)
        board.replaced_pinned = None
        self.driver.stats.unpins += 1

    async def _reply(self, board: Board, ev: JobProgressEvent) -> None:
        assert board.message_id is not None
        await self.driver.transport.reply(board.room, board.message_id, ev, f"j{ev.id}-done{ev.seq}")
        board.replied.add(int(ev.id))
        self.driver.stats.replies += 1
        await self._save(board)

    async def _pin(self, board: Board, pinned: bool) -> None:
        assert board.message_id is not None
        ok = await self.driver.transport.pin(board.room, board.message_id, pinned)
        if pinned and not ok:
            board.pin_refused = True
        else:
            board.pinned = pinned
            if pinned:
                self.driver.stats.pins += 1
            else:
                self.driver.stats.unpins += 1
        await self._save(board)

    def _give_up(self, board: Board, step: _Step, exc: BaseException) -> None:
        log.warning("%s: board %s in %s cannot succeed: %s", self.driver.platform, step.name, board.room, exc)
        if step.name == "post":
            board.finished = True  # the room cannot take the board: nothing more to do for it
        elif step.name in ("edit", "repost"):
            board.shown_version = board.version
            self._mark_shown(board)
        elif step.name == "unpin-replaced":
            board.replaced_pinned = None
        elif step.name == "pin":
            board.pin_refused = True
        elif step.name == "unpin":
            board.pinned = False
        elif step.name == "reply":
            board.replied.update(j for j, ev in board.jobs.items() if ev.terminal)

    # ------------------------------------------------------------------ bindings
    async def _save(self, board: Board) -> None:
        """Store the board and point every job's binding at it (a restart edits the same message)."""
        if board.message_id is None:
            return
        store, platform = self.driver.service.store, self.driver.platform
        await store.save_binding(
            platform,
            "board",
            board.ident,
            board.room,
            board.message_id,
            pinned=board.pinned,
            finished=board.finished,
            extra={
                "board": True,
                "jobs": sorted(board.jobs),
                "replied": sorted(board.replied),
                "done": board.collapsed_done,
                "cancelled": board.collapsed_cancelled,
                "failed": board.collapsed_failed,
                "shown": board.shown_text,
            },
        )
        for jid, ev in list(board.jobs.items()):
            state = (
                board.message_id,
                board.finished or (ev.terminal and jid in board.replied),
                jid in board.replied,
            )
            if board.saved.get(jid) == state:
                continue  # stored already: a board of many jobs writes only what changed
            board.saved[jid] = state
            await store.save_binding(
                platform,
                "job",
                jid,
                board.room,
                board.message_id,
                pinned=False,
                finished=state[1],
                extra={"board": board.ident, "replied": state[2]},
            )

    async def restore(self, bindings: list[Any], room_of: Callable[[str], str | None]) -> list[Any]:
        """Adopt the stored open boards (after a restart); the other bindings are returned for the driver."""
        rest = []
        for b in bindings:
            if b.target_kind != "board":
                rest.append(b)
                continue
            room = room_of(b.room)
            if room is None:
                continue
            extra = b.extra or {}
            board = self.boards.get(room)
            if board is not None and board.message_id is None:
                # Live events started a board here before this ran; it has not posted (it waits for
                # this): it takes over the stored message and its binding, and no second board appears.
                board.ident, board.message_id, board.pinned = int(b.target_id), b.message_id, b.pinned
            elif board is not None:
                continue
            else:
                board = Board(
                    room=room,
                    ident=int(b.target_id),
                    message_id=b.message_id,
                    pinned=b.pinned,
                    last_join=self._clock(),
                )
            board.shown_text = extra.get("shown")
            board.replied = {int(j) for j in extra.get("replied") or []}
            board.collapsed_done = int(extra.get("done") or 0)
            board.collapsed_cancelled = int(extra.get("cancelled") or 0)
            board.collapsed_failed = [int(j) for j in extra.get("failed") or []]
            # Registered before the reads below: a live event arriving meanwhile joins this board
            # instead of starting a second one.
            self.boards[room] = board
            for jid in extra.get("jobs") or []:
                if int(jid) in board.jobs:
                    continue  # a live event brought a newer state already
                try:
                    ev = self.driver.service.current_event(await self.driver.service.store.get(int(jid)))
                except LookupError:
                    continue
                if int(jid) in board.jobs:
                    continue  # a live event came while the row was read: it is at least as new
                self._job_board[int(jid)] = board
                board.jobs[int(jid)] = ev
                if ev.terminal:
                    board.ended_at[int(jid)] = self._clock()
                    # The shown text tells whether its outcome was there; the reply is not sent twice.
            self._kick(board)
        return rest

    async def aclose(self) -> None:
        """Cancel every board's lane (the driver is closing)."""
        tasks = [b.task for b in self.boards.values() if b.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# ---------------------------------------------------------------------------------------------- formats
@dataclass(frozen=True, slots=True)
class BoardMarkup:
    """How one text format writes the pieces of a board; :func:`board_text` lays them out once for all.

    ``escape`` makes user text safe in the format; ``strong`` and ``em`` wrap escaped text; ``bar`` gets
    the raw progress bar (bar characters and digits) and writes it as the format shows code.
    """

    escape: Callable[[str], str]
    strong: Callable[[str], str]
    em: Callable[[str], str]
    bar: Callable[[str], str]
    newline: str


def _same(text: str) -> str:
    return text


#: Plain text (Matrix ``body``, consoles).
PLAIN_MARKUP = BoardMarkup(escape=_same, strong=_same, em=_same, bar=_same, newline="\n")
#: HTML (Matrix ``formatted_body``).
HTML_MARKUP = BoardMarkup(
    escape=html.escape,
    strong=lambda t: f"<b>{t}</b>",
    em=lambda t: f"<i>{t}</i>",
    bar=lambda t: f"<code>{html.escape(t)}</code>",
    newline="<br>",
)


def board_text(view: BoardView, markup: BoardMarkup) -> str:
    """The board in one format: the header, one line per job (icon, label, state, bar, details), and the
    summary of the rest."""
    e = markup.escape
    out = [markup.strong(e(view.header))]
    for ln in view.lines:
        bits = [f"{ln.icon} {markup.strong(e(ln.label))}"]
        if ln.state:
            bits.append(f"— {markup.em(e(ln.state))}")
        if ln.bar:
            bits.append(markup.bar(ln.bar))
        if ln.detail:
            bits.append(f"· {e(ln.detail)}")
        out.append(" ".join(bits))
    if view.summary:
        out.append(markup.em(f"… {e(view.summary)}"))
    return markup.newline.join(out)


def board_plain(view: BoardView) -> str:
    """The board as plain text (Matrix ``body``, consoles): mass mentions defused."""
    return defuse_mentions(board_text(view, PLAIN_MARKUP))


def board_html(view: BoardView) -> str:
    """The board as HTML (Matrix ``formatted_body``): everything user-supplied escaped."""
    return defuse_mentions(board_text(view, HTML_MARKUP))
