"""Unit tests of the platform-neutral progress-message driver (adapters/driver.py) over a fake transport.

The service is real (SQLite in a temp dir: the driver stores its bindings there); the transport is a
recording fake, so the tests read the calls a platform would have received, in order.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from adapters.driver import CallKind, Content, ErrorKind, ProgressDriver, classify_error
from adapters.outbox import Outbox, PermanentError
from core.events import JobProgressEvent, next_seq
from core.registry import HandlerRegistry
from core.service import ProgressService, ServiceConfig


class FakeTransport:
    """Records every call; ``fail`` maps a call name to exceptions to raise next."""

    platform = "fake"
    reactions = 2
    pin_enabled = True
    reply_enabled = True

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.fail: dict[str, list[BaseException]] = {}
        self.box = Outbox("fake", rate=1000, burst=1000, reserve=0)
        self._ids = 0

    def outbox(self, room: str, kind: CallKind) -> Outbox:
        return self.box

    def render(self, ev: JobProgressEvent) -> Content:
        text = f"#{ev.id} {ev.status} {ev.current}"
        return Content(text, text)

    def _maybe_fail(self, name: str) -> None:
        pending = self.fail.get(name)
        if pending:
            raise pending.pop(0)

    async def post(self, room: str, content: Content, reply_to: str | None, tag: str) -> str:
        self._maybe_fail("post")
        self._ids += 1
        self.calls.append(("post", (content.text, reply_to)))
        return f"m{self._ids}"

    async def edit(self, room: str, message_id: str, content: Content, tag: str) -> None:
        self._maybe_fail("edit")
        self.calls.append(("edit", content.text))

    async def pin(self, room: str, message_id: str, pinned: bool) -> bool:
        self.calls.append(("pin" if pinned else "unpin", message_id))
        return True

    async def react(self, room: str, message_id: str, index: int, tag: str) -> None:
        self.calls.append(("react", index))

    def wants_reply(self, ev: JobProgressEvent) -> bool:
        return ev.owner is not None

    async def reply(self, room: str, message_id: str, ev: JobProgressEvent, tag: str) -> None:
        self.calls.append(("reply", ev.status))

    def classify(self, exc: BaseException) -> tuple[ErrorKind, float]:
        return classify_error(exc)

    def names(self, name: str) -> list[Any]:
        return [arg for n, arg in self.calls if n == name]

    def shown(self) -> list[str]:
        """Every text the message showed: the post, then each edit (latest wins may skip states)."""
        return [arg[0] if n == "post" else arg for n, arg in self.calls if n in ("post", "edit")]


@pytest.fixture
async def service(tmp_path: Path) -> Any:
    svc = ProgressService(
        ServiceConfig(database_url=f"sqlite:///{tmp_path}/d.db"), registry=HandlerRegistry()
    )
    await svc.start()
    yield svc
    await svc.stop()


def event(
    job: int, status: str, current: float | None = None, owner: str | None = "alice"
) -> JobProgressEvent:
    return JobProgressEvent(
        id=job,
        type="job",
        status=status,
        seq=next_seq(),
        timestamp=0.0,
        current=current,
        owner=owner,
        room="r",
    )


async def test_one_message_newest_state_wins_and_one_reply(service: ProgressService) -> None:
    """Post once, show only newer states, pin, react, and at the end: final edit, unpin, one reply."""
    t = FakeTransport()
    d = ProgressDriver(service, t, sleep=lambda s: _noop())
    first = event(1, "running", 1)
    d.offer(first, "r")
    assert await d.flush(10)  # posted, pinned, reactions offered
    for i in range(2, 30):
        d.offer(event(1, "running", i), "r")
    assert not d.offer(dataclasses.replace(first), "r")  # an old seq again: ignored
    d.offer(event(1, "completed", 30), "r")
    assert await d.flush(10)
    assert len(t.names("post")) == 1
    shown = [t.names("post")[0][0], *t.names("edit")]
    assert shown[-1] == "#1 completed 30"
    currents = [float(s.split()[-1]) for s in shown]
    assert currents == sorted(currents)  # never an older state after a newer one
    assert t.names("reply") == ["completed"]
    assert t.names("unpin") and t.calls.index(("unpin", "m1")) > t.calls.index(("pin", "m1"))
    binding = await service.store.get_binding("fake", "job", 1)
    assert binding is not None and binding.finished and not binding.pinned
    await d.aclose(1)
    await t.box.aclose()


async def test_a_retried_job_reopens_its_message(service: ProgressService) -> None:
    """After its end, a retry edits the same message again and replies again at its new end, even
    when the retry is over before the driver gets to it."""
    t = FakeTransport()
    d = ProgressDriver(service, t, sleep=lambda s: _noop())
    d.offer(event(2, "running", 1), "r")
    d.offer(event(2, "failed", 1), "r")
    assert await d.flush(10)
    d.offer(event(2, "running", 1), "r")
    d.offer(event(2, "completed", 5), "r")
    assert await d.flush(10)
    assert len(t.names("post")) == 1
    assert t.names("reply") == ["failed", "completed"]
    await d.aclose(1)
    await t.box.aclose()


async def test_permanent_post_failure_is_not_retried_and_transient_edit_failure_is(
    service: ProgressService,
) -> None:
    """A post that can never work marks the message dead; a transient edit error is retried."""
    t = FakeTransport()
    d = ProgressDriver(service, t, sleep=lambda s: _noop())
    t.fail["post"] = [PermanentError("forbidden")]
    d.offer(event(3, "running", 1), "r")
    assert await d.flush(10)
    d.offer(event(3, "running", 2), "r")
    assert await d.flush(10)
    assert t.names("post") == [] and d.stats.dropped == 1

    t.fail["edit"] = [ConnectionError("flaky"), ConnectionError("flaky")]
    d.offer(event(4, "running", 1), "r")
    d.offer(event(4, "completed", 2), "r")
    assert await d.flush(10)
    assert t.shown()[-1] == "#4 completed 2"
    await d.aclose(1)
    await t.box.aclose()


async def test_no_reply_when_nobody_can_be_mentioned(service: ProgressService) -> None:
    t = FakeTransport()
    d = ProgressDriver(service, t, sleep=lambda s: _noop())
    d.offer(event(5, "running", 1, owner=None), "r")
    d.offer(event(5, "cancelled", 1, owner=None), "r")
    assert await d.flush(10)
    assert t.names("reply") == [] and t.shown()[-1] == "#5 cancelled 1"
    await d.aclose(1)
    await t.box.aclose()


async def _noop() -> None:
    return None
