"""Who may run what from chat, the per-user cap, payload maxima, tracked-only external progress, and
replies that stay small whatever a user types."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from adapters.commands import Actor, CommandRouter
from core.models import JobStatus, utcnow
from tests.conftest import ServiceFactory, wait_until
from tests.integration.http_helpers import ServerFactory

pytest_plugins = ["tests.integration.http_fixtures"]

ADMIN = Actor(user_id="@admin:localhost", platform="matrix", room="!r:localhost")
ALICE = Actor(user_id="@alice:localhost", platform="matrix", room="!r:localhost")
BOB = Actor(user_id="@bob:localhost", platform="matrix", room="!r:localhost")


async def test_plain_member_cannot_run_cleanup(make_service: ServiceFactory) -> None:
    svc = await make_service(run_worker=False)
    # Bob's finished job, old enough for "older_than_days=0".
    old = await svc.track("bob's build", owner=BOB.user_id)
    await svc.tracked_finish(old.id or 0, ok=True)
    router = CommandRouter(svc, admins=[ADMIN.user_id], prefix="!")  # default auth: runners = []

    r = await router.handle_text("!run maintenance.cleanup older_than_days=0", ALICE)
    assert r is not None and not r.ok
    assert r.text == "Sorry @alice:localhost, only admins may start maintenance.cleanup jobs."
    assert (await svc.stats())["total"] == 1  # nothing queued, nothing deleted
    assert (await svc.store.get(old.id or 0)).id == old.id

    r = await router.handle_text("!run maintenance.cleanup older_than_days=0", ADMIN)
    assert r is not None and r.ok and r.job is not None and r.job.type == "maintenance.cleanup"


async def test_run_permissions_can_be_configured_per_type(make_service: ServiceFactory) -> None:
    svc = await make_service(run_worker=False)
    router = CommandRouter(
        svc,
        admins=[ADMIN.user_id],
        runners=[ALICE.user_id],
        run_permissions={"demo.count": "anyone", "maintenance.cleanup": "runners"},
    )
    # "anyone" beats the runners list; "runners" lets Alice clean up, not Bob.
    r = await router.dispatch("run", "demo.count steps=1", BOB)
    assert r.ok, r.text
    r = await router.dispatch("run", "maintenance.cleanup", BOB)
    assert not r.ok and r.text == "Sorry @bob:localhost, you may not start jobs here."
    r = await router.dispatch("run", "maintenance.cleanup", ALICE)
    assert r.ok, r.text


async def test_per_user_cap_refuses_the_sixth_active_job(make_service: ServiceFactory) -> None:
    svc = await make_service(run_worker=False)
    router = CommandRouter(svc, admins=[ADMIN.user_id], max_active_per_user=5)
    # Sent all at once: the check and the submit are one step, so no more than five get through.
    replies = await asyncio.gather(*(router.dispatch("run", "demo.count steps=1", ALICE) for _ in range(12)))
    assert sum(r.ok for r in replies) == 5
    refused = [r for r in replies if not r.ok]
    assert refused[0].text == (
        "Sorry @alice:localhost, you already have 5 active jobs (the limit is 5); "
        "wait for one to finish or cancel one first."
    )
    assert (await svc.stats())["total"] == 5
    # Others are not affected; admins are exempt; a finished job frees a slot.
    assert (await router.dispatch("run", "demo.count steps=1", BOB)).ok
    assert (await router.dispatch("run", "demo.count steps=1", ADMIN)).ok
    first = next(r.job for r in replies if r.ok and r.job is not None)
    await svc.cancel(first.id or 0, actor=ALICE.user_id)
    assert (await router.dispatch("run", "demo.count steps=1", ALICE)).ok


async def test_demo_count_has_maxima(make_service: ServiceFactory) -> None:
    svc = await make_service(run_worker=False)
    router = CommandRouter(svc)
    for args, problem in [
        ("steps=1000000", "steps: Input should be less than or equal to 100000"),
        ("delay_ms=3600000", "delay_ms: Input should be less than or equal to 60000"),
        ("steps=100000 delay_ms=60000", "steps × delay_ms must stay within 3600 seconds"),
    ]:
        r = await router.dispatch("run", f"demo.count {args}", ALICE)
        assert not r.ok and problem in r.text, r.text
    assert (await svc.stats())["total"] == 0


async def test_replies_stay_small(make_service: ServiceFactory) -> None:
    svc = await make_service(run_worker=False)
    router = CommandRouter(svc, prefix="!")
    long_type = "x" * 7990
    for text in (
        f"!run {long_type}",
        f"!run demo.count {'y' * 7980}",
        f"!{'z' * 8000}",
        f"!status {'1' * 7990}",
        f'!run demo.count {{"steps": "{"w" * 7970}"}}',
    ):
        r = await router.handle_text(text, ALICE)
        assert r is not None and not r.ok
        assert len(r.text) < 600, (text[:30], len(r.text))
    # The caller's limit wins; a clipped reply says so.
    r = await router.handle_text("!help", ALICE, limit=60)
    assert r is not None and len(r.text) <= 60 and r.text.endswith("characters clipped]")


async def test_only_tracked_jobs_take_external_progress(make_server: ServerFactory) -> None:
    srv = await make_server()
    svc = srv.service
    running = await srv.post(
        "/v1/jobs", {"kind": "queued", "type": "demo.count", "payload": {"steps": 200, "delay_ms": 50}}
    )
    jid = running["id"]

    async def is_running() -> bool:
        return (await svc.get(jid)).status == JobStatus.RUNNING

    await wait_until(is_running)
    pending = await svc.submit("demo.count", {"steps": 1}, run_at=utcnow() + timedelta(hours=1))
    direct = await svc.execute("demo.count", {"steps": 100, "delay_ms": 50})

    for target in (jid, pending.id, direct.view.id):
        status, data = await srv.call(
            "POST", f"/v1/jobs/{target}/progress", {"current": 1, "stage": "hijack"}
        )
        assert status == 409, (target, data)
        assert data == {
            "error": "conflict",
            "detail": f"Job #{target} is not a tracked job; only tracked jobs take reports from outside",
        }
    live = svc.monitor.live_state(jid)
    assert live is not None and live.stage_name != "hijack"
    await svc.cancel(jid)
    await svc.cancel(direct.view.id)
