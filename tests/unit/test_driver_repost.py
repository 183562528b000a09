"""The driver's "message too old, re-post" capability, and its ordering invariants under any failures.

The transport is the recording fake of ``test_driver.py`` plus the optional :class:`Reposting` methods
(Discord's 1-hour rule): what a message showed, and in which order, is read from the recorded calls.
The property test is the driver's version of the old edit scheduler's: for any events and failures,
no message ever shows an older state after a newer one, and every final state arrives, with one reply.
"""

from __future__ import annotations

import asyncio
import dataclasses
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.driver import ProgressDriver, Reposting
from adapters.outbox import RateLimited
from core.events import JobProgressEvent
from core.registry import HandlerRegistry
from core.service import ProgressService, ServiceConfig
from tests.unit import test_driver as _base
from tests.unit.test_driver import FakeTransport, event

service = _base.service  # the fixture: a started service on SQLite


class AgingTransport(FakeTransport):
    """A fake whose messages in ``old`` can no longer be edited (they must be re-posted)."""

    def __init__(self) -> None:
        super().__init__()
        self.old: set[str] = set()

    def needs_repost(self, message_id: str) -> bool:
        return message_id in self.old

    async def retire(self, room: str, old_id: str, new_id: str, ev: JobProgressEvent, tag: str) -> None:
        self.calls.append(("retire", (old_id, new_id)))

    async def edit(self, room: str, message_id: str, content: Any, tag: str) -> None:
        assert message_id not in self.old, "edited a message that was too old"
        await super().edit(room, message_id, content, tag)


async def _noop() -> None:
    return None


async def test_a_too_old_message_is_replaced_and_retired(service: ProgressService) -> None:
    """The next state goes into a fresh message, pinned; the old one is unpinned and retired once;
    the binding moves; the job's end is replied to under the new message."""
    t = AgingTransport()
    assert isinstance(t, Reposting)
    d = ProgressDriver(service, t, sleep=lambda s: _noop())
    d.offer(event(1, "running", 1), "r")
    assert await d.flush(10)
    t.old.add("m1")
    d.offer(event(1, "running", 2), "r")
    assert await d.flush(10)
    assert t.names("post") == [("#1 running 1", None), ("#1 running 2", None)]
    assert t.names("pin") == ["m1", "m2"] and t.names("unpin") == ["m1"]
    assert t.names("retire") == [("m1", "m2")] and d.stats.reposts == 1
    binding = await service.store.get_binding("fake", "job", 1)
    assert binding is not None and binding.message_id == "m2" and binding.pinned
    assert (binding.extra or {}).get("prev_message_id") is None

    d.offer(event(1, "completed", 3), "r")
    assert await d.flush(10)
    assert t.names("edit")[-1] == "#1 completed 3" and t.names("reply") == ["completed"]
    assert t.names("unpin") == ["m1", "m2"]
    await d.aclose(1)
    await t.box.aclose()


async def test_an_idle_message_is_replaced_on_recheck_and_a_restart_resumes_the_retirement(
    service: ProgressService,
) -> None:
    """A paused job's message grows old with no event: :meth:`recheck` re-posts it. A driver that
    stopped before retiring the old message retires it after a restart (the binding remembers)."""
    job = await service.track("long", total=10, owner="alice", room="r")
    jid = int(job.id or 0)
    t = AgingTransport()
    d = ProgressDriver(service, t, sleep=lambda s: _noop())
    d.offer(dataclasses.replace(event(jid, "paused", 1), id=jid), "r")
    assert await d.flush(10)
    assert d.recheck() == 0
    t.old.add("m1")
    # Stop the driver right after the re-post: the old message is neither unpinned nor retired.
    original = t.pin

    async def refuse_unpin(room: str, message_id: str, pinned: bool) -> bool:
        if not pinned:
            raise ConnectionError("gone away")
        return await original(room, message_id, pinned)

    t.pin = refuse_unpin  # type: ignore[method-assign]
    assert d.recheck() == 1
    await asyncio.sleep(0.05)
    await d.aclose(0.05)
    binding = await service.store.get_binding("fake", "job", jid)
    assert binding is not None and binding.message_id == "m2"
    assert (binding.extra or {}).get("prev_message_id") == "m1"

    t.pin = original  # type: ignore[method-assign]
    d2 = ProgressDriver(service, t, sleep=lambda s: _noop())
    await d2.catch_up(lambda room: room)
    assert await d2.flush(10)
    assert t.names("unpin") == ["m1"] and t.names("retire") == [("m1", "m2")]
    assert len(t.names("post")) == 2  # no third message
    await d2.aclose(1)
    await t.box.aclose()


# ------------------------------------------------------------------ the property
_event = st.tuples(
    st.sampled_from([1, 2, 3]),  # job
    st.sampled_from(["running", "running", "running", "paused"]),
)
_failure = st.sampled_from(["ok", "ok", "transient", "rate_limited"])


@settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    events=st.lists(_event, min_size=1, max_size=30),
    failures=st.lists(_failure, max_size=20),
    aging=st.lists(st.booleans(), max_size=30),
)
def test_property_states_only_move_forward_and_finals_arrive(
    events: list[tuple[int, str]], failures: list[str], aging: list[bool]
) -> None:
    """Any events, transient edit failures and 429s, and messages growing old: a job's messages show
    its states in order, the last thing shown is its final state, and it is replied to exactly once.
    (A permanent error may drop even a final edit: ``test_driver.py`` covers those.)"""
    asyncio.run(_scenario(events, failures, aging))


async def _scenario(events: list[tuple[int, str]], failures: list[str], aging: list[bool]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        svc = ProgressService(
            ServiceConfig(database_url=f"sqlite:///{Path(tmp)}/p.db"), registry=HandlerRegistry()
        )
        await svc.start()
        t = AgingTransport()
        kinds: dict[str, BaseException] = {
            "transient": ConnectionError("flaky"),
            "rate_limited": RateLimited(0.0),
        }
        t.fail["edit"] = [kinds[f] for f in failures if f != "ok"]
        d = ProgressDriver(svc, t, sleep=lambda s: _noop())
        try:
            counter = 0
            for i, (job, status) in enumerate(events):
                counter += 1
                d.offer(event(job, status, counter), "r")
                if i < len(aging) and aging[i]:
                    # The message of that job is now too old to edit.
                    rec = d.record("job", job)
                    if rec is not None and rec.message_id is not None:
                        t.old.add(rec.message_id)
                await asyncio.sleep(0)
            jobs = sorted({j for j, _ in events})
            for job in jobs:
                counter += 1
                d.offer(event(job, "completed", counter), "r")
            assert await d.flush(20)
            for job in jobs:
                # Posts (the first and every re-post) and edits, in the order they were made.
                shown = [
                    str(arg[0] if name == "post" else arg)
                    for name, arg in t.calls
                    if name in ("post", "edit")
                    and str(arg[0] if name == "post" else arg).startswith(f"#{job} ")
                ]
                counters = [float(x.split()[-1]) for x in shown]
                assert counters == sorted(counters), f"#{job} showed an older state after a newer one"
                assert shown[-1].split()[1] == "completed", f"#{job}'s final state is not what it shows"
            assert sorted(t.names("reply")) == ["completed"] * len(jobs)
        finally:
            await d.aclose(1)
            await t.box.aclose()
            await svc.stop()
