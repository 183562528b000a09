"""LISTEN/NOTIFY on PostgreSQL: wake idle workers when work arrives, workers when a pause or cancel is asked
for, and monitors when job rows change.

A notification only makes a process look *now* instead of at its next poll: polling stays the mechanism of
record, so a lost notification (a reconnect, a crash between a commit and its NOTIFY) costs latency, never
correctness. That is also why notifications carry no data beyond the sender's origin tag.

Each process opens two dedicated autocommit psycopg connections, outside the engine's pool (a worker a third,
for its claim turn: see below):

* the *listener* runs ``LISTEN`` for the channels this process cares about and reads ``notifies()``. It
  wakes every ``keepalive`` seconds to check the connection, and reconnects with a backoff. After a
  reconnect every subscriber is called once, for what it may have missed meanwhile.
* the *sender* sends ``pg_notify`` for what :meth:`PgNotifier.notify` was told, coalesced per channel:
  the first announcement goes out at once, the ones that follow within ``debounce`` seconds go out together
  in one trailing NOTIFY. Thousands of progress writes a second thus cost a few dozen NOTIFYs.

Deliveries to a subscriber can be spaced by ``min_gap`` (a monitor's poll costs more than a wake-up), again
with a trailing call so the last notification is never dropped. Subscribers may skip the notifications
their own process sent (a monitor already knows its own changes).

A NOTIFY reaches every listener, so work announced to every worker wakes them all for each batch of new jobs,
and all but one of them claim nothing: a herd whose empty claims cost more CPU than no-op jobs do. A worker
therefore hears work announcements through a :class:`ClaimTurn` (a third connection) instead: among the
workers serving the same job types on one schema, only the holder of the turn LISTENs for work. The others try
for the turn (``pg_try_advisory_lock``) when a holder announces it gave the turn up (on :data:`TURN_CHANNEL`,
heard on the listener connection each process has anyway), and every :data:`TURN_RETRY` seconds in case a
holder vanished without a word. (Not a blocked ``pg_advisory_lock``: a statement waiting for a lock holds a
snapshot, so each waiting worker would pin the database's xmin horizon. No row version the claims leave behind
could then be pruned, and every claim's index scan would wade through all of them: measured, 2,250 index
entries read per claim with one waiting worker against 105 without, and 2,116 → 1,679 jobs/s.) A holder keeps
the turn while it can take the work it hears of and passes it on when it cannot; the next worker to try claims
as soon as it gets the turn. New work thus wakes as many workers as it needs, one after the other, and extra
idle workers cost next to nothing. The turn only decides who hears announcements: polling, a worker's own
submits and a deep queue still make any worker claim, and a worker whose turn connection is down finds work by
polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from .aio import cancel_and_wait
from .store import ChangeKind

log = logging.getLogger(__name__)

#: The advisory lock class of the claim turn (ASCII "pbTn"); its object id hashes the schema and job types.
TURN_LOCK_CLASS = 0x7062546E

#: A holder that gives the turn up says so on this channel: the waiting workers try for it at once.
TURN_CHANNEL = "progressbot_turn"

#: Seconds between a waiting worker's tries for the claim turn when it hears nothing on
#: :data:`TURN_CHANNEL`: a holder killed outright releases the lock (its connection closes) unannounced.
#: (See the module doc for why a waiting worker does not block on the lock.) The announcements of such a
#: gap are found by the claim the new holder makes at once.
TURN_RETRY = 1.0

#: The channel of each change kind (channels are per database, like the tables).
CHANNELS: dict[ChangeKind, str] = {
    "work": "progressbot_work",
    "control": "progressbot_control",
    "rows": "progressbot_rows",
}
_KINDS: dict[str, ChangeKind] = {ch: kind for kind, ch in CHANNELS.items()}

ConnectArgs = tuple[list[Any], dict[str, Any]]


@dataclass(slots=True)
class _Subscriber:
    """A callback on one channel, with its delivery spacing."""

    callback: Callable[[], None]
    min_gap: float
    skip_own: bool
    last: float = -math.inf
    timer: asyncio.TimerHandle | None = None


# The turn's lock, keyed by the schema (tables are per schema, locks per database) and the job types served.
_TURN_KEY = "%s, hashtext(coalesce(current_schema(), '') || ':' || %s)"
_TURN_TRY = "SELECT pg_try_advisory_lock(" + _TURN_KEY + ")"
_TURN_FREE = sql.SQL("NOTIFY {}").format(sql.Identifier(TURN_CHANNEL))
_TURN_UNLOCK = "SELECT pg_advisory_unlock(" + _TURN_KEY + ")"


class ClaimTurn:
    """Who answers the next work announcement among idle workers (wake-one; see the module doc).

    Made by :meth:`PgNotifier.claim_turn` and started and stopped with it. The worker says whether it wants
    the turn (:meth:`want`: it has free slots). Only while it holds the turn does its connection LISTEN for
    work, calling ``on_announce()`` per announcement: the workers waiting for the turn hear no work
    announcements. They try for it when a holder gives it up (:meth:`nudge`) and every ``retry`` seconds.
    ``on_grant()`` is called when the turn comes to the worker, which then claims at once: work may have
    been announced to the worker that passed the turn on.
    """

    def __init__(
        self,
        connect: Callable[[], Awaitable[psycopg.AsyncConnection[Any]]],
        types: list[str],
        *,
        on_grant: Callable[[], None],
        on_announce: Callable[[], None],
        reconnect_delay: float,
        max_reconnect_delay: float,
        keepalive: float,
        retry: float,
    ) -> None:
        self._connect = connect
        #: The job types of the workers sharing this turn (workers serving other types have their own).
        self.types = ",".join(sorted(types))
        self.on_grant = on_grant
        self.on_announce = on_announce
        self.reconnect_delay = reconnect_delay
        self.max_reconnect_delay = max_reconnect_delay
        self.keepalive = keepalive
        self.retry = retry
        self._wanted = False
        #: Set when the worker's wish changes or a holder gave the turn up: the turn task looks again.
        self._want_changed: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        #: Whether this worker holds the turn.
        self.held = False
        #: Whether this worker wants the turn and found it taken (it tries again every ``retry`` s).
        self.waiting = False
        #: Counters, for tests and figures: how often the turn came here, announcements heard holding it.
        self.grants = 0
        self.heard = 0

    def want(self, yes: bool) -> None:
        """Queue for the turn (``yes``: this worker has free slots), or pass it on / give up its place."""
        if yes != self._wanted:
            self._wanted = yes
            if self._want_changed is not None:
                self._want_changed.set()

    def nudge(self) -> None:
        """A holder gave the turn up (heard on :data:`TURN_CHANNEL`): try for it now if waiting."""
        if self._want_changed is not None:
            self._want_changed.set()

    def start(self) -> None:
        """Start the task that queues for, holds and passes on the turn."""
        if self._task is None:
            self._want_changed = asyncio.Event()
            self._task = asyncio.create_task(self._loop(), name="claim-turn")

    async def stop(self) -> None:
        """Stop; closing the connection releases the turn (or leaves the queue)."""
        if self._task is not None:
            await cancel_and_wait([self._task])
            self._task = None

    async def _until_wanted(self, wanted: bool) -> None:
        assert self._want_changed is not None
        while self._wanted != wanted:
            self._want_changed.clear()
            await self._want_changed.wait()

    async def _loop(self) -> None:
        delay = self.reconnect_delay
        listen = sql.SQL("LISTEN {}").format(sql.Identifier(CHANNELS["work"]))
        unlisten = sql.SQL("UNLISTEN {}").format(sql.Identifier(CHANNELS["work"]))
        key = [TURN_LOCK_CLASS, self.types]
        while True:
            conn: psycopg.AsyncConnection[Any] | None = None
            try:
                conn = await self._connect()
                delay = self.reconnect_delay
                while True:
                    await self._until_wanted(True)
                    if not await self._take(conn, key):
                        continue
                    # Listen before looking: what is announced from now on is heard, what came before is
                    # found by the claim on_grant() asks for.
                    await conn.execute(listen)
                    self.held = True
                    self.grants += 1
                    if self._wanted:
                        self._call(self.on_grant)
                    await self._hold(conn)
                    self.held = False
                    await conn.execute(unlisten)
                    await conn.execute(_TURN_UNLOCK, key)
                    # The workers waiting for the turn hear it is free (autocommit: sent at once).
                    await conn.execute(_TURN_FREE)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Meanwhile this worker hears no announcements: its polls find the work.
                log.warning("claim-turn connection lost (%s); reconnecting in %.1f s", exc, delay)
            finally:
                self.held = self.waiting = False
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.max_reconnect_delay)

    async def _take(self, conn: psycopg.AsyncConnection[Any], key: list[Any]) -> bool:
        """Try for the turn until it is ours (True) or no longer wanted (False): now, whenever a holder
        announces it gave the turn up (:meth:`nudge`), and every ``retry`` seconds."""
        assert self._want_changed is not None
        try:
            while self._wanted:
                # Cleared before the try: a nudge that comes during it is kept for the wait below.
                self._want_changed.clear()
                row = await (await conn.execute(_TURN_TRY, key)).fetchone()
                if row is not None and row[0]:
                    return True
                self.waiting = True
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.retry):
                        await self._want_changed.wait()
            return False
        finally:
            self.waiting = False

    async def _hold(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Hear work announcements until the worker gives the turn up (or the connection fails)."""
        hearing = asyncio.create_task(self._hear(conn), name="claim-turn-listen")
        giving_up = asyncio.create_task(self._until_wanted(False), name="claim-turn-want")
        try:
            await asyncio.wait([hearing, giving_up], return_when=asyncio.FIRST_COMPLETED)
        finally:
            hearing.cancel()
            giving_up.cancel()
            # asyncio.wait, not cancel_and_wait: a stop() cancelling us meanwhile must not be swallowed.
            await asyncio.wait([hearing, giving_up])
        if not hearing.cancelled() and (exc := hearing.exception()) is not None:
            raise exc

    async def _hear(self, conn: psycopg.AsyncConnection[Any]) -> None:
        while True:
            async for _ in conn.notifies(timeout=self.keepalive):
                self.heard += 1
                self._call(self.on_announce)
            # Quiet for a while: make sure the connection is alive (a dead one lost the lock to the next).
            await conn.execute("SELECT 1")

    @staticmethod
    def _call(callback: Callable[[], None]) -> None:
        try:
            callback()
        except Exception:  # the worker's failure must not stop the turn
            log.exception("claim-turn callback failed")


class PgNotifier:
    """Sends and receives progressbot's notifications over LISTEN/NOTIFY (see the module doc).

    ``connect_args`` are ``psycopg.connect`` arguments (:func:`core.db.pg_connect_args` derives them from
    the engine); ``origin`` is this process's store origin, sent as the payload.
    """

    def __init__(
        self,
        connect_args: ConnectArgs,
        *,
        origin: str,
        debounce: float = 0.02,
        keepalive: float = 30.0,
        reconnect_delay: float = 0.5,
        max_reconnect_delay: float = 10.0,
    ) -> None:
        self.connect_args = connect_args
        self.origin = origin
        self.debounce = debounce
        self.keepalive = keepalive
        self.reconnect_delay = reconnect_delay
        self.max_reconnect_delay = max_reconnect_delay
        self._subs: dict[ChangeKind, list[_Subscriber]] = {}
        self._pending: set[ChangeKind] = set()
        self._send_wakeup: asyncio.Event | None = None
        self._listening: asyncio.Event | None = None
        self._sender: psycopg.AsyncConnection[Any] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._turns: list[ClaimTurn] = []
        self._started = False
        #: Counters, for tests and figures: notifications sent (after coalescing) and received.
        self.sent = 0
        self.received = 0

    # ------------------------------------------------------------------ setup
    def subscribe(
        self, kind: ChangeKind, callback: Callable[[], None], *, min_gap: float = 0.0, skip_own: bool = False
    ) -> None:
        """Call ``callback()`` on the event loop when a process announces ``kind``.

        ``min_gap`` spaces the calls (a trailing call follows a burst); ``skip_own`` ignores this process's
        own announcements. Subscribe before :meth:`start`: the channels are LISTENed to at connect time.
        """
        if self._started:
            raise RuntimeError("subscribe before start()")
        self._subs.setdefault(kind, []).append(_Subscriber(callback, min_gap, skip_own))

    def claim_turn(
        self, types: list[str], *, on_grant: Callable[[], None], on_announce: Callable[[], None]
    ) -> ClaimTurn:
        """A :class:`ClaimTurn` for a worker serving ``types`` (its own connection), run with this notifier.

        The worker hears work announcements through it (``on_announce()``, while it holds the turn) instead
        of subscribing to ``work``; ``on_grant()`` when the turn comes to it. Both run on the event loop.
        Make it before :meth:`start`.
        """
        if self._started:
            raise RuntimeError("claim_turn before start()")
        turn = ClaimTurn(
            self._connect,
            types,
            on_grant=on_grant,
            on_announce=on_announce,
            reconnect_delay=self.reconnect_delay,
            max_reconnect_delay=self.max_reconnect_delay,
            keepalive=self.keepalive,
            retry=TURN_RETRY,
        )
        self._turns.append(turn)
        return turn

    @property
    def listening(self) -> bool:
        """Whether the listener connection is up and LISTENing."""
        return self._listening is not None and self._listening.is_set()

    async def start(self, *, wait: float = 5.0) -> None:
        """Start the sender and (with subscribers) the listener; wait up to ``wait`` s for LISTEN to be on.

        A database that does not answer is not an error here: the listener keeps retrying in the background
        and polling covers the gap.
        """
        if self._started:
            return
        self._started = True
        self._send_wakeup = asyncio.Event()
        self._listening = asyncio.Event()
        self._tasks.append(asyncio.create_task(self._send_loop(), name="notify-send"))
        for turn in self._turns:
            turn.start()
        if self._subs or self._turns:
            self._tasks.append(asyncio.create_task(self._listen_loop(), name="notify-listen"))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._listening.wait()
            if not self.listening:
                log.warning("LISTEN is not up yet; relying on polling until it is")

    async def stop(self, *, flush_timeout: float = 2.0) -> None:
        """Stop both loops, send what is still pending (best effort) and close the connections."""
        if not self._started:
            return
        self._started = False
        # Closing a turn's connection frees the turn: the workers waiting for it should hear so now.
        handover = any(turn.held for turn in self._turns)
        for turn in self._turns:
            await turn.stop()
        await cancel_and_wait(self._tasks)
        self._tasks.clear()
        for subs in self._subs.values():
            for sub in subs:
                if sub.timer is not None:
                    sub.timer.cancel()
                    sub.timer = None
        if self._pending or handover:
            # Typically a shutdown's requeued jobs: other workers should pick them up now.
            kinds, self._pending = self._pending, set()
            try:
                async with asyncio.timeout(flush_timeout):
                    await self._send(kinds, turn_free=handover)
            except Exception as exc:  # best effort: the others' polls find the rows anyway
                log.warning("final NOTIFY failed: %s", exc)
        await self._close_sender()

    # ---------------------------------------------------------------- sending
    def notify(self, kind: ChangeKind) -> None:
        """Announce a committed change of ``kind`` to the listening processes (non-blocking, coalesced)."""
        self._pending.add(kind)
        if self._send_wakeup is not None:
            self._send_wakeup.set()

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        args, kwargs = self.connect_args
        return await psycopg.AsyncConnection.connect(*args, **dict(kwargs, autocommit=True))

    async def _send(self, kinds: set[ChangeKind], *, turn_free: bool = False) -> None:
        if self._sender is None or self._sender.closed:
            self._sender = await self._connect()
        channels = [CHANNELS[kind] for kind in sorted(kinds)] + ([TURN_CHANNEL] if turn_free else [])
        query = "SELECT " + ", ".join("pg_notify(%s, %s)" for _ in channels)
        params: list[str] = []
        for channel in channels:
            params += [channel, self.origin]
        await self._sender.execute(query, params)
        self.sent += len(channels)

    async def _close_sender(self) -> None:
        conn, self._sender = self._sender, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    async def _send_loop(self) -> None:
        assert self._send_wakeup is not None
        delay = self.reconnect_delay
        while True:
            await self._send_wakeup.wait()
            self._send_wakeup.clear()
            if not self._pending:
                continue
            kinds, self._pending = self._pending, set()
            try:
                await self._send(kinds)
            except asyncio.CancelledError:
                self._pending |= kinds  # stop() sends them
                raise
            except Exception as exc:
                self._pending |= kinds
                log.warning("NOTIFY failed (%s); retrying in %.1f s", exc, delay)
                await self._close_sender()
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_reconnect_delay)
                self._send_wakeup.set()
                continue
            delay = self.reconnect_delay
            # Whatever is announced meanwhile goes out together, in one trailing NOTIFY.
            await asyncio.sleep(self.debounce)

    # -------------------------------------------------------------- receiving
    async def _listen_loop(self) -> None:
        assert self._listening is not None
        delay = self.reconnect_delay
        first = True
        while True:
            conn: psycopg.AsyncConnection[Any] | None = None
            try:
                conn = await self._connect()
                channels = [CHANNELS[kind] for kind in self._subs] + ([TURN_CHANNEL] if self._turns else [])
                for channel in channels:
                    await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                self._listening.set()
                delay = self.reconnect_delay
                if not first:
                    # Whatever was announced while we were not listening went unheard: look now.
                    for kind in self._subs:
                        self._dispatch(kind, None)
                    self._nudge_turns()
                first = False
                while True:
                    async for n in conn.notifies(timeout=self.keepalive):
                        self.received += 1
                        heard = _KINDS.get(n.channel)
                        if heard is not None:
                            self._dispatch(heard, n.payload)
                        elif n.channel == TURN_CHANNEL:
                            self._nudge_turns()
                    # Quiet for a while: make sure the connection is still alive (a dead peer is silent).
                    await conn.execute("SELECT 1")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("LISTEN connection lost (%s); reconnecting in %.1f s", exc, delay)
            finally:
                self._listening.clear()
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.max_reconnect_delay)

    def _nudge_turns(self) -> None:
        for turn in self._turns:
            turn.nudge()

    def _dispatch(self, kind: ChangeKind, payload: str | None) -> None:
        for sub in self._subs.get(kind, ()):
            if sub.skip_own and payload == self.origin:
                continue
            self._deliver(sub)

    def _deliver(self, sub: _Subscriber) -> None:
        if sub.timer is not None:
            return  # a trailing call is already due; it covers this notification
        now = time.monotonic()
        wait = sub.min_gap - (now - sub.last)
        if wait <= 0:
            self._call(sub)
        else:
            sub.timer = asyncio.get_running_loop().call_later(wait, self._trailing, sub)

    def _trailing(self, sub: _Subscriber) -> None:
        sub.timer = None
        self._call(sub)

    def _call(self, sub: _Subscriber) -> None:
        sub.last = time.monotonic()
        try:
            sub.callback()
        except Exception:  # a subscriber's failure must not stop the listener
            log.exception("notification subscriber failed")


__all__ = ["CHANNELS", "ClaimTurn", "PgNotifier"]
