"""Unit tests of the per-scope outbox (adapters/outbox.py), on virtual time.

A :class:`LeakyServer` plays Synapse's ``rc_message``: a leaky bucket per account that holds ``burst``
events and drains ``rate`` per second, refusing (without cost) what does not fit, with the
``retry_after`` until it would. Callers wait in the outbox, make their one call inside the slot, and
the tests check the invariants written down in the module docstring.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Hashable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.outbox import Outbox, Priority, RateLimited
from tests.unit.virtual_clock import VirtualClock


class LeakyServer:
    """Synapse's rate limiter for one account: burst ``burst``, draining ``rate`` events/s."""

    def __init__(self, clock: VirtualClock, rate: float = 0.2, burst: int = 10) -> None:
        self.clock = clock
        self.rate = rate
        self.burst = burst
        self.level = 0.0
        self.at = 0.0
        self.accepted: list[tuple[float, str]] = []
        self.refused: list[float] = []

    def call(self, what: str) -> None:
        """Accept one event or raise :class:`RateLimited` with the time until it would fit."""
        now = self.clock.now
        self.level = max(0.0, self.level - (now - self.at) * self.rate)
        self.at = now
        if self.level + 1 > self.burst + 1e-9:
            self.refused.append(now)
            raise RateLimited((self.level + 1 - self.burst) / self.rate)
        self.level += 1
        self.accepted.append((now, what))


async def one_call(
    outbox: Outbox, server: LeakyServer, prio: Priority, lane: Hashable, what: str, latency: float = 0.0
) -> float:
    """Wait for a turn and make one call (taking ``latency``), retrying after 429s; returns when accepted."""
    while True:
        try:
            async with outbox.slot(prio, lane):
                if latency:
                    await server.clock.sleep(latency)
                server.call(what)
                return server.clock.now
        except RateLimited:
            continue


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock()


def make(clock: VirtualClock, **kw: float) -> Outbox:
    values: dict[str, float] = {"rate": 0.2, "burst": 10}
    values.update(kw)
    return Outbox("test", clock=clock, sleep=clock.sleep, **values)  # type: ignore[arg-type]


async def busy(
    outbox: Outbox, server: LeakyServer, prio: Priority, lane: Hashable, what: str, latency: float = 0.0
) -> None:
    """A caller that always has another call of ``prio`` waiting (like a busy job's progress edits)."""
    while True:
        await one_call(outbox, server, prio, lane, what, latency)


async def test_every_call_counts_and_the_server_limit_is_never_hit(clock: VirtualClock) -> None:
    """With the server's real budget configured, 0 429s however busy; each call costs one event."""
    server = LeakyServer(clock)
    outbox = make(clock)
    tasks = [asyncio.create_task(busy(outbox, server, Priority.PROGRESS, "room", f"m{i}")) for i in range(4)]
    await clock.advance(300)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await outbox.aclose()
    assert server.refused == []
    # The whole allowance is used: burst + rate * time, less the one event held for people.
    assert len(server.accepted) >= 10 + 0.2 * 300 - 2
    assert outbox.stats.sent == len(server.accepted)


async def test_a_person_is_answered_at_once_while_edits_wait(clock: VirtualClock) -> None:
    """The reserve: with progress edits always waiting, an answer goes out at the instant it asks."""
    server = LeakyServer(clock)
    outbox = make(clock)
    tasks = [asyncio.create_task(busy(outbox, server, Priority.PROGRESS, "room", f"m{i}")) for i in range(4)]
    await clock.advance(120)  # the burst is long spent; edits wait for every token
    waits = []
    for _ in range(5):
        asked = clock.now
        answer = asyncio.create_task(one_call(outbox, server, Priority.ANSWER, "room", "answer"))
        await clock.run_until(answer.done)
        waits.append(answer.result() - asked)
        await clock.advance(7)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await outbox.aclose()
    assert max(waits) <= 1 / 0.2  # at worst the next event the server allows; usually at once
    assert waits.count(0.0) >= 3
    assert server.refused == []


async def test_classes_in_order_when_the_budget_is_spent(clock: VirtualClock) -> None:
    """Status changes before new messages before progress edits before cosmetics."""
    server = LeakyServer(clock, burst=1)
    outbox = make(clock, burst=1, reserve=0, share=1000)
    order: list[str] = []

    async def call(prio: Priority) -> None:
        await one_call(outbox, server, prio, "room", prio.name)
        order.append(prio.name)

    first = asyncio.create_task(call(Priority.PROGRESS))  # spends the only token
    await clock.settle()
    waiting = [asyncio.create_task(call(p)) for p in reversed(list(Priority)[1:])]
    await clock.run_until(lambda: all(t.done() for t in waiting))
    assert first.done()
    assert order == ["PROGRESS", "STATUS", "NEW", "PROGRESS", "COSMETIC"]
    await outbox.aclose()


@pytest.mark.parametrize("pace", [False, True])
async def test_pins_and_reactions_age_up_and_never_starve(clock: VirtualClock, pace: bool) -> None:
    """A cosmetic call gets through although progress edits are always waiting (paced: they starve,
    so the cosmetics' share is halved, but never zero)."""
    server = LeakyServer(clock)
    outbox = make(clock, share=5, pace=pace)
    tasks = [asyncio.create_task(busy(outbox, server, Priority.PROGRESS, "room", f"m{i}")) for i in range(6)]
    await clock.advance(60)
    asked = clock.now
    pin = asyncio.create_task(one_call(outbox, server, Priority.COSMETIC, "room", "pin"))
    await clock.run_until(pin.done)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await outbox.aclose()
    # At most ``share`` turns (one event each, 5 s apart) until the longest waiter's shared turn;
    # paced, while the edits starve, twice as many.
    share = 2 * 5 if pace else 5
    assert pin.result() - asked <= (share + 1) / 0.2


async def test_rooms_share_the_account_fairly(clock: VirtualClock) -> None:
    """Two busy rooms on one account get the same number of events (and the account no 429),
    however many busy messages each has."""
    server = LeakyServer(clock)
    outbox = make(clock)
    tasks = [
        asyncio.create_task(busy(outbox, server, Priority.PROGRESS, room, f"{room}{i}"))
        for room in ("a", "b")
        for i in range(3 if room == "a" else 1)  # room a has three busy messages, room b one
    ]
    await clock.advance(200)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await outbox.aclose()
    # After the burst (during which room a's three messages are in flight at once): turn by turn.
    a = sum(1 for t, w in server.accepted if t > 30 and w.startswith("a"))
    b = sum(1 for t, w in server.accepted if t > 30 and w.startswith("b"))
    assert abs(a - b) <= 1
    assert server.refused == []


async def test_learns_the_server_rate_from_429s_and_does_not_collapse(clock: VirtualClock) -> None:
    """Configured far too high, it learns Synapse's 0.2/s from two 429s, then keeps to it."""
    server = LeakyServer(clock)
    outbox = make(clock, rate=10, burst=10)
    tasks = [asyncio.create_task(busy(outbox, server, Priority.PROGRESS, "room", f"m{i}")) for i in range(4)]
    await clock.advance(60)
    learned_429s = len(server.refused)
    assert 1 <= learned_429s <= 4
    assert outbox.rate == pytest.approx(0.2, rel=0.1)
    before = len(server.accepted)
    await clock.advance(240)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await outbox.aclose()
    assert len(server.refused) == learned_429s  # steady state: no more 429s
    assert len(server.accepted) - before >= 0.9 * 0.2 * 240  # and at least 90% of the allowance


async def test_calls_refused_together_do_not_collapse_the_rate(clock: VirtualClock) -> None:
    """Four calls in flight refused at once are one observation, not a rate of zero."""
    server = LeakyServer(clock)
    outbox = make(clock, rate=10, burst=10)
    tasks = [
        asyncio.create_task(busy(outbox, server, Priority.PROGRESS, "room", f"m{i}", latency=0.2))
        for i in range(8)
    ]
    await clock.advance(300)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await outbox.aclose()
    assert outbox.rate >= 0.9 * 0.2 * 0.97
    assert len(server.accepted) >= 0.85 * (10 + 0.2 * 300)
    late = [t for t in server.refused if t > 60]
    assert late == []


async def test_a_429_pauses_only_its_scope(clock: VirtualClock) -> None:
    """One account rate limited for 30 s; another scope keeps sending meanwhile."""
    limited = LeakyServer(clock, rate=1 / 30, burst=1)
    free = LeakyServer(clock, rate=100, burst=100)
    a = Outbox("a", rate=10, burst=1, reserve=0, clock=clock, sleep=clock.sleep)
    b = Outbox("b", rate=10, burst=10, reserve=0, clock=clock, sleep=clock.sleep)
    ta = asyncio.create_task(busy(a, limited, Priority.PROGRESS, "r", "a"))
    tb = asyncio.create_task(busy(b, free, Priority.PROGRESS, "r", "b"))
    await clock.advance(20)
    for t in (ta, tb):
        t.cancel()
    await asyncio.gather(ta, tb, return_exceptions=True)
    await a.aclose()
    await b.aclose()
    assert len(limited.accepted) == 1 and a.stats.rate_limited >= 1
    assert len(free.accepted) >= 150


async def test_headers_bound_the_bucket(clock: VirtualClock) -> None:
    """``observe(remaining=0, reset_after)`` pauses the scope until the reset."""
    outbox = make(clock, rate=1, burst=5, reserve=0)
    outbox.observe(0, 4.0)
    server = LeakyServer(clock, rate=100, burst=100)
    t = asyncio.create_task(one_call(outbox, server, Priority.PROGRESS, "r", "x"))
    await clock.run_until(t.done)
    assert t.result() == pytest.approx(4.0)
    await outbox.aclose()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    calls=st.lists(
        st.tuples(
            st.floats(min_value=0, max_value=120),  # when the caller arrives
            st.sampled_from(list(Priority)),
            st.sampled_from(["a", "b", "c"]),  # its room
        ),
        min_size=1,
        max_size=40,
    ),
    configured=st.sampled_from([0.2, 1.0, 10.0]),
    pace=st.booleans(),
)
def test_invariants_hold_for_any_traffic(
    calls: list[tuple[float, Priority, str]], configured: float, pace: bool
) -> None:
    """Any arrival pattern, paced or not: every call is made once, answers never wait behind lower
    classes, the rate never falls far below the server's, and with the right rate configured there is
    no 429."""

    async def scenario() -> None:
        clock = VirtualClock()
        server = LeakyServer(clock)
        outbox = Outbox("h", rate=configured, burst=10, pace=pace, clock=clock, sleep=clock.sleep)
        done: list[tuple[Priority, float, float]] = []

        async def caller(at: float, prio: Priority, room: str) -> None:
            await clock.sleep(at)
            start = clock.now
            end = await one_call(outbox, server, prio, room, prio.name)
            done.append((prio, start, end))

        tasks = [asyncio.create_task(caller(*c)) for c in calls]
        await clock.run_until(lambda: all(t.done() for t in tasks), limit=10_000)
        for t in tasks:
            t.result()
        await outbox.aclose()
        assert len(done) == len(calls) == len(server.accepted)
        assert outbox.rate >= 0.9 * 0.2 * 0.97  # never collapsed far below what the server allows
        if configured == 0.2:
            assert server.refused == []
        # An answer never waits longer than one server period plus any 429 pause in progress.
        for prio, start, end in done:
            if prio is Priority.ANSWER:
                assert end - start <= 2 / 0.2 + 1e-6

    asyncio.run(scenario())


async def test_a_waiting_edit_that_becomes_a_status_change_is_served_as_one(clock: VirtualClock) -> None:
    """Latest wins for the class too: a progress edit waiting in line is promoted when the job pauses."""
    server = LeakyServer(clock)
    outbox = make(clock)
    tasks = [asyncio.create_task(busy(outbox, server, Priority.PROGRESS, "room", f"m{i}")) for i in range(6)]
    await clock.advance(60)
    now_class = {"v": int(Priority.PROGRESS)}

    async def paused_job() -> float:
        async with outbox.slot(Priority.PROGRESS, "room", current=lambda: now_class["v"]):
            server.call("pause")
            return clock.now

    waiting = asyncio.create_task(paused_job())
    await clock.advance(1)
    now_class["v"] = int(Priority.STATUS)  # the job paused while its edit waited
    changed = clock.now
    await clock.run_until(waiting.done)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await outbox.aclose()
    assert waiting.result() - changed <= 2 / 0.2  # the next event, not the end of the line (6 x 5 s)


@pytest.mark.parametrize("pace", [False, True])
async def test_slow_start_finds_a_lifted_limit_and_costs_little_on_a_default_one(
    clock: VirtualClock, pace: bool
) -> None:
    """Starting at Synapse's default guess: on a roomier server the rate doubles up to the ceiling
    (paced edits spend the burst a little at a time first, so the doubling starts later); on a
    default server it costs at most two 429s to learn, then none."""
    roomy = LeakyServer(clock, rate=5, burst=10)
    fast = Outbox("roomy", rate=10, burst=10, start_rate=0.2, pace=pace, clock=clock, sleep=clock.sleep)
    tasks = [asyncio.create_task(busy(fast, roomy, Priority.PROGRESS, "r", f"m{i}")) for i in range(4)]
    await clock.advance(200)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await fast.aclose()
    assert fast.rate >= 4.5 * 0.97
    late = sum(1 for t, _ in roomy.accepted if t > 150)
    assert late >= 0.8 * 5 * 50

    default = LeakyServer(clock)
    slow = Outbox("default", rate=10, burst=10, start_rate=0.2, pace=pace, clock=clock, sleep=clock.sleep)
    start = clock.now
    tasks = [asyncio.create_task(busy(slow, default, Priority.PROGRESS, "r", f"m{i}")) for i in range(4)]
    await clock.advance(600)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await slow.aclose()
    assert len([t for t in default.refused if t < start + 300]) <= 2
    # Later, one probe for a lifted limit every ``probe_after`` (300 s) at most.
    assert len(default.refused) <= 2 + 600 // 300
    assert len(default.accepted) >= 0.9 * (10 + 0.2 * (clock.now - start))


async def test_nested_scopes_channel_buckets_inside_a_global_limit(clock: VirtualClock) -> None:
    """Discord's scopes: each channel's outbox inside one global outbox. Every call counts in both, so
    the channels together never exceed the global budget; a channel's 429 pauses only that channel,
    a global 429 pauses them all."""
    glob = Outbox("global", rate=2, burst=2, reserve=0, clock=clock, sleep=clock.sleep)
    a = Outbox("a", rate=10, burst=10, reserve=0, clock=clock, sleep=clock.sleep, parent=glob)
    b = Outbox("b", rate=10, burst=10, reserve=0, clock=clock, sleep=clock.sleep, parent=glob)
    server = LeakyServer(clock, rate=100, burst=100)
    tasks = [
        asyncio.create_task(busy(box, server, Priority.PROGRESS, name, name))
        for box, name in ((a, "a"), (b, "b"))
    ]
    await clock.advance(10)
    made = {w: sum(1 for _, x in server.accepted if x == w) for w in ("a", "b")}
    assert sum(made.values()) <= 2 + 2 * 10 and min(made.values()) >= 8  # the global budget, shared

    # A 429 of channel a's own bucket: a waits 5 s, b carries on at the global rate.
    async def refused(box: Outbox, is_global: bool) -> None:
        with contextlib.suppress(RateLimited):
            async with box.slot(Priority.ANSWER, "x"):
                raise RateLimited(5.0, is_global=is_global)

    t = asyncio.create_task(refused(a, False))
    await clock.run_until(t.done, limit=100)
    before = dict(made)
    await clock.advance(4)
    made = {w: sum(1 for _, x in server.accepted if x == w) for w in ("a", "b")}
    # (at most the one call a had granted already, waiting for its global turn)
    assert made["a"] - before["a"] <= 1 and made["b"] - before["b"] >= 6
    assert glob.stats.rate_limited == 0 and a.stats.rate_limited == 1

    # A global 429: nobody sends for its retry_after.
    await clock.advance(2)
    t = asyncio.create_task(refused(b, True))
    await clock.run_until(t.done, limit=100)
    total = len(server.accepted)
    await clock.advance(4.5)
    assert len(server.accepted) == total and glob.stats.rate_limited == 1 and b.stats.rate_limited == 0
    await clock.advance(2)
    assert len(server.accepted) > total
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for box in (a, b, glob):
        await box.aclose()


async def busy_messages(
    outbox: Outbox, server: LeakyServer, names: list[str], edits: dict[str, list[float]]
) -> list[asyncio.Task[None]]:
    """Busy jobs' messages: each is out of date again right after every edit (its job moves on), and
    its next edit waits in the outbox from that instant; ``edits`` gets the instants each was refreshed."""

    async def message(name: str) -> None:
        while True:
            edits[name].append(await one_call(outbox, server, Priority.PROGRESS, "room", name))

    for name in names:
        edits[name] = [0.0]  # posted at 0
    return [asyncio.create_task(message(n)) for n in names]


def mean_staleness(edits: dict[str, list[float]], start: float, end: float) -> float:
    """What people see, sampled every 0.5 s: how long each message has shown an outdated state."""
    samples = []
    t = start
    while t < end:
        for times in edits.values():
            samples.append(t - max(x for x in times if x <= t))
        t += 0.5
    return sum(samples) / len(samples)


async def four_busy_messages(pace: bool) -> tuple[int, float, dict[str, list[float]], LeakyServer]:
    """Four busy messages just posted, for 300 s: (edits in the first 3 s, mean staleness over the first
    minute, the instants each message was refreshed, the server)."""
    clock = VirtualClock()
    server = LeakyServer(clock)
    outbox = make(clock, pace=pace)
    edits: dict[str, list[float]] = {}
    tasks = await busy_messages(outbox, server, ["a", "b", "c", "d"], edits)
    await clock.advance(3)
    early = len(server.accepted)
    await clock.advance(57)
    first_minute = mean_staleness(edits, 0, 60)
    await clock.advance(240)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await outbox.aclose()
    return early, first_minute, edits, server


async def test_paced_edits_keep_the_burst_and_refresh_the_stalest_first() -> None:
    """Paced, the burst is not spent at once on refreshing messages a moment old (only a full bucket
    is spent at once); it goes, a little at a time, to the stalest message. So what people see is
    fresher over the first minute; later each message is refreshed at about even intervals; and the
    whole allowance is used, without a 429."""
    early, first_minute, _, server = await four_busy_messages(pace=False)
    assert early >= 8 and server.refused == []  # unpaced: the burst is gone at once
    early_paced, paced, edits, server = await four_busy_messages(pace=True)
    assert early_paced <= 2
    assert paced <= first_minute - 2, (paced, first_minute)
    assert server.refused == []
    assert len(server.accepted) >= 10 + 0.2 * 300 - 2
    # Steady state: stalest first, so each message gets one edit per round of four (at 0.2/s: 20 s).
    for name, times in edits.items():
        gaps = [b - a for a, b in itertools.pairwise(times) if a > 120]
        assert gaps and max(gaps) <= 20 + 5 and min(gaps) >= 20 - 5, (name, gaps)


async def test_a_call_refused_with_a_429_keeps_its_place(clock: VirtualClock) -> None:
    """A caller that asks again after a 429 with the instant it first asked goes before later ones."""
    outbox = make(clock, burst=1, reserve=0)
    order: list[str] = []
    refused = {"first": True}

    async def first() -> None:
        since = clock.now
        while True:
            try:
                async with outbox.slot(Priority.PROGRESS, "room", since=since):
                    if refused["first"]:
                        refused["first"] = False
                        await clock.sleep(1.0)  # the others ask meanwhile
                        raise RateLimited(5.0)
                    order.append("first")
                    return
            except RateLimited:
                continue

    async def later(name: str) -> None:
        async with outbox.slot(Priority.PROGRESS, "room"):
            order.append(name)

    a = asyncio.create_task(first())
    await clock.advance(0.5)
    others = [asyncio.create_task(later(n)) for n in ("second", "third")]
    await clock.run_until(lambda: len(order) == 3)
    assert order == ["first", "second", "third"]
    await asyncio.gather(a, *others)
    await outbox.aclose()


async def test_new_messages_get_the_burst_not_their_pins(clock: VirtualClock) -> None:
    """Paced (Matrix): four jobs submitted together, nothing else waiting: the posts go at once, and
    their pins and reactions take the burst only down to its half, which stays for the first edits and
    status changes; the rest of them follow on the refill."""
    server = LeakyServer(clock)
    outbox = make(clock, pace=True)
    posts = [
        asyncio.create_task(one_call(outbox, server, Priority.NEW, "room", f"post{i}")) for i in range(4)
    ]
    await clock.settle()
    cosmetics = [
        asyncio.create_task(one_call(outbox, server, Priority.COSMETIC, "room", f"pin{i}")) for i in range(8)
    ]
    await clock.advance(0.1)
    assert all(p.done() for p in posts)
    assert sum(1 for _, w in server.accepted if w.startswith("pin")) <= 2
    assert outbox.tokens >= 10 / 2 - 1
    await clock.run_until(lambda: all(c.done() for c in cosmetics))
    assert server.refused == []
    await outbox.aclose()


async def test_a_charged_event_is_one_the_next_calls_do_not_have(clock: VirtualClock) -> None:
    """An event the server counted around the outbox (Synapse: the bot's join) is charged, so the
    burst that follows stays within the server's bucket: no 429."""
    server = LeakyServer(clock)
    server.call("join")
    outbox = make(clock, reserve=0)
    outbox.charge()
    tasks = [asyncio.create_task(one_call(outbox, server, Priority.NEW, "room", f"m{i}")) for i in range(12)]
    await clock.run_until(lambda: all(t.done() for t in tasks))
    assert server.refused == []
    await outbox.aclose()
