"""The platform-neutral progress-message driver: one message per job or batch, over a thin transport.

Every chat adapter shows a job (or batch) the same way: it posts one progress message, edits it as the
job moves, pins it while the job is active, offers reactions on it, and when the job ends it shows the
final state, unpins it and replies once to mention the requester; a job that is retried reopens the same
message. This module owns that lifecycle once, for every platform; a platform supplies only a
:class:`Transport` (post, edit, pin, unpin, react, reply, and how to classify its errors) and the outbox
of the rate-limit scope a room belongs to.

How it works:

* :meth:`ProgressDriver.offer` (synchronous, called from the event bus) records the newest event of a
  message (latest wins: an event not newer than the one recorded is ignored) and makes sure the
  message's two *lanes* run:

  - the **content lane** posts the message, then edits it to the newest state, then sends the completion
    reply, one call at a time;
  - the **cosmetic lane** pins, unpins and adds reactions.

  Each lane waits for its turn in the :class:`~adapters.outbox.Outbox` of the scope that limits its
  next call's :class:`CallKind` (Discord limits edits, posts and pins of a channel separately), with
  the class of that call (a status change is :data:`Priority.STATUS`, a new message :data:`Priority.NEW`, a
  routine edit :data:`Priority.PROGRESS`, pins and reactions :data:`Priority.COSMETIC`) and the
  instant it first asked (for an edit: when its message went out of date, which the outbox uses to
  refresh the stalest message first; after a 429 the call keeps its place), and decides what to send
  only once its turn has come, so what goes out is always the newest state.
* **Ordering.** One call per lane at a time, and every edit shows a state newer than the one shown
  before: an older state is never sent after a newer one. Each finished step is remembered (and
  stored in the binding), so a step refused half way (a 429) resumes where it stopped, and nothing is
  posted or replied twice.
* **Errors.** A 429 pauses the scope (the outbox does that) and the lane tries again with the newest
  state; a permanent error gives up that one step (a deleted message, a missing power level); any other
  error backs the lane off exponentially and tries again. Final states are retried until delivered.
* **Bindings and restarts.** The message of every job or batch (room, message id, pinned, finished,
  replied, reactions) is stored through the service's store. After a restart, :meth:`catch_up` brings
  every open message up to its job's current state, and closes the messages of jobs that are gone.

Time (for backoff) is injectable; nothing here imports a chat library or ``bot/``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from core.events import JobProgressEvent
from core.service import ProgressService

from .commands import Reply
from .outbox import Outbox, PermanentError, Priority, RateLimited, Slot

if TYPE_CHECKING:
    from .board import RoomBoards

__all__ = [
    "CallKind",
    "Content",
    "DriverStats",
    "ErrorKind",
    "ProgressDriver",
    "Reposting",
    "Transport",
]

log = logging.getLogger(__name__)

Key = tuple[str, int | str]
#: How many finished messages remember their last event seq, to recognise late stale events.
_TOMBSTONES = 10_000


class ErrorKind(enum.Enum):
    """What a failed call means for retrying it."""

    RATE_LIMITED = "rate_limited"
    PERMANENT = "permanent"
    TRANSIENT = "transient"


def classify_error(exc: BaseException) -> tuple[ErrorKind, float]:
    """The shared part of every transport's ``classify``: the outbox's own :class:`RateLimited` (with its
    ``retry_after``) and :class:`PermanentError`; anything else is transient."""
    if isinstance(exc, RateLimited):
        return ErrorKind.RATE_LIMITED, exc.retry_after
    if isinstance(exc, PermanentError):
        return ErrorKind.PERMANENT, 0.0
    return ErrorKind.TRANSIENT, 0.0


class CallKind(enum.StrEnum):
    """The kinds of calls a platform may limit in separate buckets (Discord: one per route and channel).

    A transport gives the outbox of the scope that limits each kind (:meth:`Transport.outbox`); on a
    platform with one bucket for everything (Synapse's ``rc_message``) every kind shares one outbox.
    """

    #: Edits of a message (progress, status changes, a retired message's pointer).
    EDIT = "edit"
    #: New messages: progress messages, re-posts, completion replies.
    POST = "post"
    #: Pins and unpins.
    PIN = "pin"
    #: Reactions.
    REACT = "react"


def call_kind(step: str) -> CallKind:
    """The kind of call a driver or board step makes, by its name (``post``, ``unpin-prev``...)."""
    if step in ("post", "repost", "reply"):
        return CallKind.POST
    if step.startswith(("pin", "unpin")):
        return CallKind.PIN
    if step == "react":
        return CallKind.REACT
    return CallKind.EDIT


@dataclass(slots=True, frozen=True)
class Content:
    """One rendered state of a progress message: the platform's payload and its text (to compare)."""

    payload: Any
    text: str


class Transport(Protocol):
    """What a platform must provide to the driver. Every method makes exactly one counted call.

    ``tag`` is stable for one step of one message (``j12-post``, ``j12-e345``, ``j12-r0``): a platform
    with idempotency keys (Matrix transaction ids) uses it so a retried step is stored only once.
    """

    platform: str
    #: How many reactions :meth:`react` offers on each message (0: none).
    reactions: int
    #: Whether to pin active messages and to reply once when a job ends.
    pin_enabled: bool
    reply_enabled: bool

    def outbox(self, room: str, kind: CallKind) -> Outbox:
        """The outbox of the rate-limit scope that limits calls of ``kind`` in ``room``."""

    def render(self, ev: JobProgressEvent) -> Content:
        """The content of a progress message showing ``ev`` (clipped to the platform's limit)."""

    async def post(self, room: str, content: Content, reply_to: str | None, tag: str) -> str:
        """Post a progress message (as a reply to ``reply_to`` when given); return its message id."""

    async def edit(self, room: str, message_id: str, content: Content, tag: str) -> None:
        """Make an existing message show ``content``."""

    async def pin(self, room: str, message_id: str, pinned: bool) -> bool:
        """Pin or unpin; False when the platform does not allow it (do not try again for this message)."""

    async def react(self, room: str, message_id: str, index: int, tag: str) -> None:
        """Add the ``index``-th offered reaction."""

    def wants_reply(self, ev: JobProgressEvent) -> bool:
        """Whether the end of ``ev`` deserves a reply (there is someone to mention)."""

    async def reply(self, room: str, message_id: str, ev: JobProgressEvent, tag: str) -> None:
        """Reply to the message that ``ev``'s job or batch ended, mentioning the requester."""

    def classify(self, exc: BaseException) -> tuple[ErrorKind, float]:
        """What an exception from a call means, and the ``retry_after`` (s) of a rate limit."""


@runtime_checkable
class Reposting(Protocol):
    """A transport whose messages may become impossible to edit (Discord throttles edits of messages
    older than an hour). Optional: the driver uses it only when the transport has both methods.

    When :meth:`needs_repost` says so, the driver posts a fresh message showing the newest state,
    pins it (active jobs), moves the binding to it, unpins the old one and hands it to :meth:`retire`.
    """

    def needs_repost(self, message_id: str) -> bool:
        """Whether ``message_id`` must be replaced by a fresh message before it is edited again."""

    async def retire(self, room: str, old_id: str, new_id: str, ev: JobProgressEvent, tag: str) -> None:
        """Turn the replaced message ``old_id`` into a pointer to ``new_id`` (at most one call)."""


@dataclass(slots=True)
class DriverStats:
    """Counters of what the driver did (tests, benches and ``/v1/stats``)."""

    posts: int = 0
    edits: int = 0
    pins: int = 0
    unpins: int = 0
    reactions: int = 0
    replies: int = 0
    #: Messages replaced by a fresh one (:class:`Reposting` transports).
    reposts: int = 0
    rate_limited: int = 0
    failed_requests: int = 0
    dropped: int = 0
    #: States superseded before they were shown (latest wins).
    coalesced: int = 0
    #: Edits skipped because the message already showed exactly that text.
    unchanged: int = 0


@dataclass(slots=True)
class Record:
    """What the driver knows about one progress message (mirrors its binding)."""

    kind: str
    ident: int | str
    room: str
    desired: JobProgressEvent
    message_id: str | None = None
    shown_seq: int = 0
    shown_text: str | None = None
    #: (status, control) shown now: a change of it is a status change (served before routine edits).
    shown_state: tuple[str, str | None] | None = None
    pinned: bool = False
    pin_refused: bool = False
    reacted: int = 0
    replied: bool = False
    finished: bool = False
    loaded: bool = False
    #: The event (a person's command) the first post answers, as a reply.
    origin: str | None = None
    #: Posting failed for good: the job is not shown.
    dead: bool = False
    #: A message replaced by a re-post, still to be unpinned (``prev_pinned``) and retired.
    prev_message_id: str | None = None
    prev_pinned: bool = False
    lanes: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    #: When each lane first asked for a turn for its pending work (outbox clock): a call refused with a
    #: 429 keeps its place, and a progress edit is paced by how long its message has been out of date.
    asked: dict[str, float] = field(default_factory=dict)

    @property
    def key(self) -> Key:
        """``(kind, id)``."""
        return (self.kind, self.ident)

    @property
    def persistent(self) -> bool:
        """Direct jobs (ids such as ``d3``) live in memory only, so they have no stored binding."""
        return isinstance(self.ident, int)

    @property
    def tag(self) -> str:
        """``j12`` or ``b3``: the message's part of every step tag."""
        return f"{self.kind[0]}{self.ident}"


@dataclass(slots=True)
class _Step:
    name: str
    priority: Priority
    call: Callable[[], Awaitable[None]] | None  # None: bookkeeping only, no call


class ProgressDriver:
    """Drives the progress messages of one platform (see the module docstring)."""

    def __init__(
        self,
        service: ProgressService,
        transport: Transport,
        *,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """A driver for ``transport``'s platform, storing bindings in ``service``'s store."""
        self.service = service
        self.transport = transport
        self.platform = transport.platform
        self.stats = DriverStats()
        self._reposting: Reposting | None = transport if isinstance(transport, Reposting) else None
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max
        self._sleep = sleep
        self._records: dict[Key, Record] = {}
        self._tombstones: OrderedDict[Key, int] = OrderedDict()
        #: (room, owner) -> command events whose answer is the next progress message of that owner there.
        self._origins: dict[tuple[str, str], list[str]] = {}
        #: Keys that got a live event since start (the catch-up must not overwrite those).
        self._live: set[Key] | None = set()
        #: Set once the stored messages are adopted (:meth:`catch_up`), or at once when none will be: a
        #: room's new board waits for it, so a restart edits the stored board instead of posting a second.
        self.restored = asyncio.Event()
        self.restored.set()
        self._closed = False
        self._idle = asyncio.Event()
        self._idle.set()
        #: Room boards (adapters/board.py), when the platform has them: they set this.
        self.boards: RoomBoards | None = None
        self._spawned: set[asyncio.Future[None]] = set()

    # ------------------------------------------------------------------ input
    def offer(self, ev: JobProgressEvent, room: str) -> bool:
        """Show ``ev`` on its message in ``room`` (never blocks). Returns whether it was taken.

        An event not newer than the newest one recorded for that message is ignored (latest wins).
        """
        if self._closed:
            return False
        key: Key = (ev.type, ev.id)
        if self._live is not None:
            self._live.add(key)
        return self._offer(key, ev, room)

    def _offer(self, key: Key, ev: JobProgressEvent, room: str) -> bool:
        # Board hook: a job on a room's board (or joining one) is shown there, not on its own message.
        if self.boards is not None and self.boards.take(ev, room, key in self._records):
            return True
        rec = self._records.get(key)
        if rec is None:
            floor = self._tombstones.get(key)
            if floor is not None and ev.seq <= floor:
                return False
            rec = Record(kind=ev.type, ident=ev.id, room=room, desired=ev)
            self._records[key] = rec
        elif ev.seq <= rec.desired.seq:
            return False
        else:
            if rec.desired.seq > rec.shown_seq:
                self.stats.coalesced += 1
            changed = (ev.status, ev.control) != (rec.desired.status, rec.desired.control)
            rec.desired = ev
            if changed:
                # A waiting edit may have just become a status change: let the outbox decide again.
                self.transport.outbox(rec.room, CallKind.EDIT).nudge()
        self._kick(rec)
        return True

    def expect_origin(self, room: str, owner: str, event_id: str) -> None:
        """The next new progress message of ``owner``'s job in ``room`` answers command ``event_id``."""
        self._origins.setdefault((room, owner), []).append(event_id)

    def drop_origin(self, room: str, owner: str, event_id: str) -> None:
        """The command ``event_id`` started no job (refused, failed): forget it."""
        waiting = self._origins.get((room, owner))
        if waiting and event_id in waiting:
            waiting.remove(event_id)
            if not waiting:
                del self._origins[(room, owner)]

    def _take_origin(self, rec: Record) -> str | None:
        owner = rec.desired.owner
        if rec.kind != "job" or owner is None:
            return None
        return self.take_origin(rec.room, owner)

    # ------------------------------------------------------------------ queries
    def record(self, kind: str, ident: int | str) -> Record | None:
        """The tracked record of a job's or batch's message, if it is active."""
        return self._records.get((kind, ident))

    def message_room(self, kind: str, ident: int | str) -> str | None:
        """The room that shows a job or batch now, if the driver tracks it."""
        rec = self._records.get((kind, ident))
        if rec is None and self.boards is not None and kind == "job" and isinstance(ident, int):
            return self.boards.room_of(ident)  # board hook
        return rec.room if rec is not None else None

    def acknowledges(
        self, reply: Reply, room: str, room_of: Callable[[JobProgressEvent], str | None]
    ) -> bool:
        """Whether a command's outcome shows on a progress message in ``room``, so the command needs
        no words there (a started job, a pause by whom). ``room_of`` says where an untracked job's
        message would be."""
        job = reply.job
        if not (reply.ok and reply.on_progress and job is not None and job.id is not None):
            return False
        if job.batch_id is not None:
            return False  # jobs inside a batch have no message of their own
        shown_in = self.message_room("job", job.id)
        if shown_in is None:
            shown_in = room_of(self.service.current_event(job))
        return shown_in == room

    def find_by_message(self, message_id: str) -> Record | None:
        """The tracked record whose message is ``message_id``."""
        return next((r for r in self._records.values() if r.message_id == message_id), None)

    @property
    def reposting(self) -> Reposting | None:
        """The transport, when it replaces messages too old to edit (Discord's hour); else None."""
        return self._reposting

    def recheck(self) -> int:
        """Look again at every idle open message whose transport wants it re-posted (a paused job's
        message growing too old to edit); returns how many were started."""
        rp = self._reposting
        started = 0
        for rec in list(self._records.values()):
            if (
                rp is not None
                and rec.message_id is not None
                and not rec.dead
                and not rec.lanes
                and not rec.desired.terminal
                and rp.needs_repost(rec.message_id)
            ):
                self._kick(rec)
                started += 1
        return started

    def pending(self) -> int:
        """Messages with work left (a state not shown yet, a pin, a reaction or a reply to send)."""
        boards = self.boards.pending() if self.boards is not None else 0  # board hook
        return boards + sum(1 for r in self._records.values() if r.lanes)

    async def flush(self, timeout: float) -> bool:
        """Wait until no message has work left, or ``timeout`` s (real time); False on timeout."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while self.pending():
                    self._idle.clear()
                    await self._idle.wait()
                return True
        return self.pending() == 0

    async def aclose(self, drain_timeout: float) -> bool:
        """Deliver what is pending for up to ``drain_timeout`` s, then cancel every lane."""
        drained = await self.flush(drain_timeout)
        self._closed = True
        tasks = [t for r in self._records.values() for t in r.lanes.values()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.boards is not None:
            await self.boards.aclose()  # board hook
        return drained

    # ------------------------------------------------------------------ for the boards (adapters/board.py)
    @property
    def closed(self) -> bool:
        """Whether the driver is closing (no new work starts)."""
        return self._closed

    def active_in_scope(self, box: Outbox) -> int:
        """Own messages of active jobs and batches whose room belongs to the scope of ``box``."""
        t = self.transport
        return sum(
            1
            for r in self._records.values()
            if not r.desired.terminal and not r.dead and t.outbox(r.room, CallKind.EDIT) is box
        )

    def release_unposted(self, room: str) -> list[JobProgressEvent]:
        """Give up the jobs of ``room`` whose own message is not posted yet (a board shows them now).

        Their lanes find nothing to do at their turn and end; returns their newest events.
        """
        out = []
        for key, rec in list(self._records.items()):
            if rec.room == room and rec.kind == "job" and rec.message_id is None and not rec.dead:
                rec.dead = True
                del self._records[key]
                out.append(rec.desired)
        return out

    def take_origin(self, room: str, owner: str | None) -> str | None:
        """The oldest command of ``owner`` in ``room`` waiting for its progress message (now answered)."""
        waiting = self._origins.get((room, owner or ""))
        if not waiting:
            return None
        origin = waiting.pop(0)
        if not waiting:
            del self._origins[(room, owner or "")]
        return origin

    def backoff(self, failures: int) -> float:
        """The delay before retrying after ``failures`` failures in a row."""
        return min(self._backoff_max, self._backoff_base * 2.0 ** min(failures - 1, 30))

    async def sleep(self, seconds: float) -> None:
        """The driver's (injectable) sleep."""
        await self._sleep(seconds)

    def busy(self, *, done: bool = False) -> None:
        """Work started (``done``: a piece of work ended) outside the records: keeps :meth:`flush` right."""
        if not done:
            self._idle.clear()
        elif not self.pending():
            self._idle.set()

    def spawn(self, coro: Awaitable[None]) -> None:
        """Run ``coro`` (a binding save) in the background, logging its failure."""
        task = asyncio.ensure_future(coro)
        self._spawned.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._spawned.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.error("%s: a background save failed", self.platform, exc_info=t.exception())

        task.add_done_callback(done)

    # ------------------------------------------------------------------ restart catch-up
    def expect_catch_up(self) -> None:
        """The adapter will call :meth:`catch_up` once connected: new boards wait for it to post."""
        self.restored.clear()

    async def catch_up(self, room_of: Callable[[str], str | None]) -> None:
        """After a start: bring every open message up to its job's current state; close orphans.

        ``room_of(stored_room)`` maps a binding's room to one we serve (None: not ours any more).
        Messages that got a live event meanwhile are left alone (the live event is newer).
        """
        live = self._live
        try:
            bindings = await self.service.store.open_bindings(self.platform)
            if self.boards is not None:
                bindings = await self.boards.restore(bindings, room_of)  # board hook
            for b in bindings:
                room = room_of(b.room)
                if room is None:
                    continue
                key: Key = (b.target_kind, b.target_id)
                try:
                    if b.target_kind == "batch":
                        summary = await self.service.batch_summary(b.target_id)
                        ev = self.service.monitor.build_batch_event(summary)
                    else:
                        ev = self.service.current_event(await self.service.store.get(b.target_id))
                except LookupError:
                    log.info(
                        "%s: %s #%s is gone; closing its message", self.platform, b.target_kind, b.target_id
                    )
                    await self._close_orphan(b)
                    continue
                if live is not None and key in live:
                    continue
                ev.room = b.room
                self._offer(key, ev, room)
        except Exception:
            log.exception("%s: catching up on open messages failed", self.platform)
        finally:
            self._live = None
            self.restored.set()

    async def _close_orphan(self, b: Any) -> None:
        """Unpin the message of a job that no longer exists and close its binding."""
        if b.pinned and self.transport.pin_enabled:
            with contextlib.suppress(Exception):
                async with self.transport.outbox(b.room, CallKind.PIN).slot(Priority.COSMETIC, b.room):
                    await self.transport.pin(b.room, b.message_id, False)
        await self.service.store.save_binding(
            self.platform, b.target_kind, b.target_id, b.room, b.message_id, pinned=False, finished=True
        )

    # ------------------------------------------------------------------ lanes
    def _kick(self, rec: Record) -> None:
        if self._closed:
            return
        for lane in ("content", "cosmetic"):
            task = rec.lanes.get(lane)
            if task is None or task.done():
                rec.lanes[lane] = asyncio.get_running_loop().create_task(
                    self._run_lane(rec, lane), name=f"{self.platform}:{lane}:{rec.tag}"
                )
        self._idle.clear()

    async def _run_lane(self, rec: Record, lane: str) -> None:
        """Run one lane of a message until it has nothing left to do."""
        failures = 0
        try:
            if not rec.loaded:
                if lane != "content":
                    return  # the content lane loads the binding first, then starts this lane again
                await self._load(rec)
                self._kick(rec)
            while not self._closed:
                step = self._next(rec, lane)
                if step is None:
                    return
                if step.call is None:
                    continue  # bookkeeping done inside _next; look again
                try:
                    done = await self._attempt(rec, lane, step)
                except RateLimited:
                    self.stats.rate_limited += 1
                    continue  # the outbox paused the scope; the next turn sends the newest state
                except PermanentError as exc:
                    self._give_up(rec, step, exc)
                    await self._save(rec)
                    continue
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self.stats.failed_requests += 1
                    failures += 1
                    delay = self.backoff(failures)
                    level = logging.WARNING if rec.desired.terminal else logging.INFO
                    log.log(
                        level,
                        "%s: %s of %s failed (%s); retrying in %.1fs",
                        self.platform,
                        step.name,
                        rec.tag,
                        exc,
                        delay,
                    )
                    await self._sleep(delay)
                    continue
                if done:
                    failures = 0
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s: the %s lane of %s failed", self.platform, lane, rec.tag)
        finally:
            if rec.lanes.get(lane) is asyncio.current_task():
                del rec.lanes[lane]
            self._maybe_forget(rec)
            if not self.pending():
                self._idle.set()

    async def _attempt(self, rec: Record, lane: str, step: _Step) -> bool:
        """Wait for the scope's turn, decide again (newest state), make the call. True if one was made."""
        current = (lambda: self._content_priority(rec, step.priority)) if lane == "content" else None
        bucket = call_kind(step.name)
        async with self._turn(rec, lane, step.priority, current, bucket) as slot:
            now = self._next(rec, lane)
            # A step of another kind (an edit that turned into a re-post) waits in its own bucket.
            if now is None or now.call is None or call_kind(now.name) is not bucket:
                slot.unused()
                return False
            log.debug("%s: %s %s (%s)", self.platform, now.name, rec.tag, Priority(slot.priority).name)
            try:
                await now.call()
            except (RateLimited, PermanentError):
                raise
            except Exception as exc:
                kind, retry_after = self.transport.classify(exc)
                if kind is ErrorKind.RATE_LIMITED:
                    raise RateLimited(retry_after, str(exc)) from exc
                if kind is ErrorKind.PERMANENT:
                    raise PermanentError(str(exc)) from exc
                raise
        return True

    @contextlib.asynccontextmanager
    async def _turn(
        self, rec: Record, lane: str, priority: Priority, current: Callable[[], int] | None, kind: CallKind
    ) -> AsyncIterator[Slot]:
        """The turn of the scope limiting ``kind`` for the next call of ``rec``'s ``lane``. The outbox learns
        since when the lane has been asking: the outbox paces progress edits by how long their message has
        been out of date, and a call refused with a 429 asks again with the same instant, so it keeps its
        place."""
        box = self.transport.outbox(rec.room, kind)
        since = rec.asked.setdefault(lane, box.now())
        try:
            async with box.slot(priority, rec.room, current=current, since=since) as slot:
                yield slot
        except RateLimited:
            raise
        except BaseException:
            rec.asked.pop(lane, None)
            raise
        rec.asked.pop(lane, None)

    def _content_priority(self, rec: Record, default: Priority) -> int:
        """The class of the content lane's next call now (pure: no bookkeeping, unlike ``_next``)."""
        ev = rec.desired
        if rec.message_id is None:
            # The answer to a person's ``!run`` is this post.
            return Priority.ANSWER if self._origins.get((rec.room, ev.owner or "")) else Priority.NEW
        if ev.seq > rec.shown_seq:
            return self._edit_priority(rec, ev)
        return default

    @staticmethod
    def _edit_priority(rec: Record, ev: JobProgressEvent) -> Priority:
        """A person's pause / resume / cancel is acknowledged by this edit: it answers them.

        Other status changes (and the final state) come next; routine progress after that.
        """
        shown = rec.shown_state or ("", None)
        if (ev.status, ev.control) == shown and not ev.terminal:
            return Priority.PROGRESS
        # Only the outcome answers the person ("paused by alice"); "pause requested" is a status change
        # that the outcome usually overtakes while it waits (latest wins), saving an event.
        acted = ev.status != shown[0] and (ev.status in ("paused", "cancelled") or shown[0] == "paused")
        if acted and ev.control_by:
            return Priority.ANSWER
        # Paused, resumed, a control requested, and the end are status changes; pending -> running is
        # routine progress (it must not delay the first post of another job).
        if ev.terminal or "paused" in (ev.status, shown[0]) or ev.control != shown[1]:
            return Priority.STATUS
        return Priority.PROGRESS

    def _next(self, rec: Record, lane: str) -> _Step | None:
        return self._content_step(rec) if lane == "content" else self._cosmetic_step(rec)

    def _content_step(self, rec: Record) -> _Step | None:
        ev = rec.desired
        t = self.transport
        if rec.dead:
            return None
        if rec.message_id is None:
            return _Step(
                "post", Priority(self._content_priority(rec, Priority.NEW)), lambda: self._post(rec, ev)
            )
        rp = self._reposting
        if (
            rp is not None
            and rec.prev_message_id is None
            and (ev.seq > rec.shown_seq or not ev.terminal)
            and rp.needs_repost(rec.message_id)
        ):
            prio = self._edit_priority(rec, ev) if ev.seq > rec.shown_seq else Priority.PROGRESS
            return _Step("repost", prio, lambda: self._repost(rec, ev))
        if ev.seq > rec.shown_seq:
            content = t.render(ev)
            if content.text == rec.shown_text:
                self.stats.unchanged += 1
                rec.shown_seq = ev.seq
                return _Step("unchanged", Priority.PROGRESS, None)
            return _Step("edit", self._edit_priority(rec, ev), lambda: self._edit(rec, ev, content))
        if not ev.terminal and rec.finished:
            # Retried after its end: the message is live again, and a new end gets a new reply.
            rec.finished = rec.replied = False
            self._spawn_save(rec)
            return _Step("reopen", Priority.STATUS, None)
        if ev.terminal and not rec.replied:
            if t.reply_enabled and t.wants_reply(ev):
                return _Step("reply", Priority.STATUS, lambda: self._reply(rec, ev))
            rec.replied = True
        if ev.terminal and not rec.finished:
            rec.finished = True
            self._spawn_save(rec)
        return None

    def _cosmetic_step(self, rec: Record) -> _Step | None:
        t = self.transport
        if rec.message_id is None or rec.dead:
            return None
        mid = rec.message_id
        active = not rec.desired.terminal
        if t.pin_enabled:
            if active and not rec.pinned and not rec.pin_refused:
                return _Step("pin", Priority.COSMETIC, lambda: self._pin(rec, mid, True))
            if not active and rec.pinned:
                return _Step("unpin", Priority.COSMETIC, lambda: self._pin(rec, mid, False))
        prev = rec.prev_message_id
        if prev is not None:
            if rec.prev_pinned:
                return _Step("unpin-prev", Priority.COSMETIC, lambda: self._unpin_prev(rec, prev))
            return _Step("retire", Priority.COSMETIC, lambda: self._retire(rec, prev, mid))
        if active and rec.reacted < t.reactions:
            i = rec.reacted
            return _Step("react", Priority.COSMETIC, lambda: self._react(rec, mid, i))
        return None

    # ------------------------------------------------------------------ the calls
    async def _post(self, rec: Record, ev: JobProgressEvent) -> None:
        content = self.transport.render(ev)
        if rec.origin is None:
            rec.origin = self._take_origin(rec)
        rec.message_id = await self.transport.post(rec.room, content, rec.origin, f"{rec.tag}-post")
        self.stats.posts += 1
        self._shown(rec, ev, content)
        rec.finished = rec.replied = rec.pinned = False
        rec.reacted = 0
        await self._save(rec)  # before anything else can fail: a restart must edit this, not post again
        # The cosmetic lane may have ended while there was no message yet.
        self._kick(rec)

    async def _repost(self, rec: Record, ev: JobProgressEvent) -> None:
        """Replace a message that can no longer be edited by a fresh one; the old one is retired later."""
        assert rec.message_id is not None
        content = self.transport.render(ev)
        new_id = await self.transport.post(rec.room, content, None, f"{rec.tag}-re{ev.seq}")
        rec.prev_message_id, rec.prev_pinned = rec.message_id, rec.pinned
        rec.message_id, rec.pinned, rec.reacted = new_id, False, 0
        self.stats.reposts += 1
        self._shown(rec, ev, content)
        await self._save(rec)  # the binding moves at once: a restart edits the new message
        self._kick(rec)

    async def _unpin_prev(self, rec: Record, message_id: str) -> None:
        await self.transport.pin(rec.room, message_id, False)
        rec.prev_pinned = False
        self.stats.unpins += 1
        await self._save(rec)

    async def _retire(self, rec: Record, old_id: str, new_id: str) -> None:
        assert self._reposting is not None
        await self._reposting.retire(rec.room, old_id, new_id, rec.desired, f"{rec.tag}-ptr")
        rec.prev_message_id = None
        await self._save(rec)

    async def _edit(self, rec: Record, ev: JobProgressEvent, content: Content) -> None:
        assert rec.message_id is not None
        await self.transport.edit(rec.room, rec.message_id, content, f"{rec.tag}-e{ev.seq}")
        self.stats.edits += 1
        self._shown(rec, ev, content)

    @staticmethod
    def _shown(rec: Record, ev: JobProgressEvent, content: Content) -> None:
        rec.shown_seq = ev.seq
        rec.shown_text = content.text
        rec.shown_state = (ev.status, ev.control)

    async def _pin(self, rec: Record, message_id: str, pinned: bool) -> None:
        ok = await self.transport.pin(rec.room, message_id, pinned)
        if pinned:
            if ok:
                rec.pinned = True
                self.stats.pins += 1
            else:
                rec.pin_refused = True
        else:
            rec.pinned = False
            self.stats.unpins += 1
        await self._save(rec)

    async def _react(self, rec: Record, message_id: str, index: int) -> None:
        await self.transport.react(rec.room, message_id, index, f"{rec.tag}-r{index}")
        rec.reacted = index + 1
        self.stats.reactions += 1
        await self._save(rec)

    async def _reply(self, rec: Record, ev: JobProgressEvent) -> None:
        assert rec.message_id is not None
        await self.transport.reply(rec.room, rec.message_id, ev, f"{rec.tag}-done{ev.seq}")
        rec.replied = True
        self.stats.replies += 1
        await self._save(rec)

    def _give_up(self, rec: Record, step: _Step, exc: BaseException) -> None:
        """A permanent error: this step can never succeed; record it as done (or the message dead)."""
        self.stats.dropped += 1
        if step.name == "post":
            log.error("%s: cannot post the progress message of %s: %s", self.platform, rec.tag, exc)
            rec.dead = True
        elif step.name == "edit":
            log.warning("%s: edit of %s cannot succeed, skipped: %s", self.platform, rec.tag, exc)
            rec.shown_seq = rec.desired.seq
        elif step.name == "pin":
            rec.pin_refused = True
        elif step.name == "unpin":
            rec.pinned = False
        elif step.name == "unpin-prev":
            rec.prev_pinned = False
        elif step.name == "retire":
            rec.prev_message_id = None
        elif step.name == "repost":
            # The old message cannot be edited and no new one can be posted: the job is not shown.
            log.error("%s: cannot re-post the message of %s: %s", self.platform, rec.tag, exc)
            rec.dead = True
        elif step.name == "react":
            rec.reacted += 1  # already there (a retry) or not allowed: nothing more to do
        elif step.name == "reply":
            log.warning("%s: completion reply of %s not sent: %s", self.platform, rec.tag, exc)
            rec.replied = True

    # ------------------------------------------------------------------ bindings
    async def _load(self, rec: Record) -> None:
        """Adopt the stored binding of a message, so a known message is edited, not posted again."""
        rec.loaded = True
        if not rec.persistent:
            return
        b = await self.service.store.get_binding(self.platform, rec.kind, int(rec.ident))
        if b is None or rec.message_id is not None:
            return
        if (b.extra or {}).get("board") is not None:
            return  # board hook: the job was on a board; its own message is a new one
        extra = b.extra or {}
        rec.room, rec.message_id, rec.pinned, rec.finished = b.room, b.message_id, b.pinned, b.finished
        rec.replied = bool(extra.get("replied"))
        reacted = extra.get("reacted")
        # Older bindings stored "reacted" as a flag for "all of them".
        rec.reacted = self.transport.reactions if reacted is True else int(reacted or 0)
        rec.shown_text = extra.get("shown")
        prev = extra.get("prev_message_id")
        rec.prev_message_id = str(prev) if prev else None
        rec.prev_pinned = bool(extra.get("prev_pinned"))
        if rec.finished and self.transport.render(rec.desired).text != rec.shown_text:
            # A finished message gets a state it does not show: the job runs again (a retry), maybe
            # already to its new end. The message reopens, and that end gets its own reply.
            rec.finished = rec.replied = False

    async def _save(self, rec: Record) -> None:
        if rec.persistent and rec.message_id:
            await self.service.store.save_binding(
                self.platform,
                rec.kind,
                int(rec.ident),
                rec.room,
                rec.message_id,
                pinned=rec.pinned,
                finished=rec.finished,
                extra={
                    "reacted": rec.reacted,
                    "replied": rec.replied,
                    "shown": rec.shown_text,
                    "prev_message_id": rec.prev_message_id,
                    "prev_pinned": rec.prev_pinned,
                },
            )

    def _spawn_save(self, rec: Record) -> None:
        # Called from the synchronous step decision; the lane awaits nothing for it, but the save is
        # ordered after any earlier one (the store serializes writes).
        task = asyncio.get_running_loop().create_task(self._save(rec), name=f"{self.platform}:save:{rec.tag}")
        rec.lanes.setdefault("save", task)
        task.add_done_callback(lambda t: self._save_done(rec, t))

    def _save_done(self, rec: Record, task: asyncio.Task[None]) -> None:
        if rec.lanes.get("save") is task:
            del rec.lanes["save"]
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "%s: saving the binding of %s failed", self.platform, rec.tag, exc_info=task.exception()
            )
        self._maybe_forget(rec)
        if not self.pending():
            self._idle.set()

    def _maybe_forget(self, rec: Record) -> None:
        """Drop a finished message from memory once nothing is left to do for it."""
        if rec.lanes or self._records.get(rec.key) is not rec:
            return
        # A dead message stays (so later events do not try to post it again and again).
        if (
            rec.finished
            and rec.desired.terminal
            and rec.shown_seq >= rec.desired.seq
            and not rec.pinned
            and rec.prev_message_id is None
        ):
            del self._records[rec.key]
            self._tombstones[rec.key] = rec.desired.seq
            self._tombstones.move_to_end(rec.key)
            while len(self._tombstones) > _TOMBSTONES:
                self._tombstones.popitem(last=False)
