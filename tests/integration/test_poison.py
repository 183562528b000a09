"""Poison: handlers and clients hand the engine text and data it cannot store as they are.

A lone surrogate (what ``os.listdir`` gives for a file name that is not UTF-8), NUL, NaN, absurd nesting:
none of it may stop the bookkeeping of other jobs, break listing, detail or streams, or make a stop or a
restart unclean.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from core.context import JobContext
from core.models import JobStatus, Progress
from core.registry import HandlerRegistry
from core.salvage import finish_isolating, write_progress_isolating
from core.store import NewJob, Outcome, ProgressWrite
from tests.conftest import ServiceFactory, wait_until
from tests.integration.http_helpers import ServerFactory

pytest_plugins = ["tests.integration.http_fixtures"]

BAD_NAME = b"data-\xff.csv".decode("utf-8", "surrogateescape")  # "data-\udcff.csv"
TERMINAL = {"completed", "failed", "cancelled"}


async def read_until(resp: Any, done: Any, timeout: float = 15.0) -> list[dict[str, Any]]:
    """NDJSON events of ``resp`` until ``done(events)`` holds (keep-alives skipped)."""
    out: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        async for raw in resp.content:
            if raw.strip():
                ev = json.loads(raw)
                if ev.get("type") != "keepalive":
                    out.append(ev)
                    if done(out):
                        return out
    return out


def nested(depth: int) -> Any:
    value: Any = "bottom"
    for _ in range(depth):
        value = [value]
    return value


def poison_registry() -> HandlerRegistry:
    reg = HandlerRegistry()

    @reg.handler("poison.fail")
    async def fail(ctx: JobContext, data: dict[str, Any]) -> None:
        """Fails like open() on a file name that is not UTF-8."""
        raise FileNotFoundError(BAD_NAME)

    @reg.handler("poison.result")
    async def result(ctx: JobContext, data: dict[str, Any]) -> Any:
        """Returns what JSON and the database cannot hold as it is."""
        return {"file": BAD_NAME, "nul": "a\x00b", "nan": float("nan"), "deep": nested(500), "obj": object()}

    @reg.handler("poison.progress")
    async def progress(ctx: JobContext, data: dict[str, Any]) -> str:
        """Reports and logs surrogate-bearing text, with control characters."""
        ctx.stages([(f"read {BAD_NAME}", 1)])
        ctx.report(float("nan"), 10**30, "numbers no database holds")
        await asyncio.sleep(0.3)  # long enough for a monitor write tick with them
        ctx.report(1, 2, f"reading {BAD_NAME}\x00\x1b[31m")
        ctx.log("warning", f"skipped {BAD_NAME}", path=BAD_NAME)
        await ctx.checkpoint({"last": BAD_NAME})
        await asyncio.sleep(0.3)  # long enough for a monitor write tick with the bad message
        ctx.report(2, 2, "done")
        return "ok"

    return reg


async def test_poisoned_handlers_do_not_stop_other_jobs(make_service: ServiceFactory) -> None:
    reg = poison_registry()
    svc = await make_service(reg, concurrency=8)
    poison = [await svc.submit(t) for t in ("poison.fail", "poison.result", "poison.progress")]
    demos = [await svc.submit("demo.count", {"steps": 3, "delay_ms": 20}) for _ in range(3)]
    ids = [j.id or 0 for j in poison + demos]

    async def all_done() -> bool:
        return all(str(j.status) in TERMINAL for j in await svc.store.get_many(ids))

    await wait_until(all_done, timeout=30)
    for d in demos:
        job = await svc.store.get(d.id or 0)
        assert job.status == JobStatus.COMPLETED and job.result == {"steps": 3, "executions": 3}
        assert job.progress_current == 3

    failed = await svc.store.get(poison[0].id or 0)
    assert failed.status == JobStatus.FAILED
    assert failed.error == "FileNotFoundError: data-\ufffd.csv"

    res = await svc.store.get(poison[1].id or 0)
    assert res.status == JobStatus.COMPLETED
    assert res.result["file"] == "data-\ufffd.csv" and res.result["nul"] == "ab"
    assert res.result["nan"] == "NaN" and res.result["obj"].startswith("<object object")
    assert "nested too deep" in json.dumps(res.result["deep"])

    prog = await svc.store.get(poison[2].id or 0)
    assert prog.status == JobStatus.COMPLETED and prog.checkpoint == {"last": "data-\ufffd.csv"}
    lines = [a.message for a in await svc.activity(prog.id or 0)]
    assert "skipped data-\ufffd.csv" in lines

    # Listing and detail still work, and the graceful stop is clean.
    assert len(await svc.list_jobs(limit=100)) == 6
    await svc.stop()

    # A restart finds nothing interrupted: every outcome reached the database.
    again = await make_service(reg)
    for i in ids:
        job = await again.store.get(i)
        assert str(job.status) in TERMINAL and not job.interrupted


async def test_one_unstorable_row_does_not_take_the_batch_down(make_service: ServiceFactory) -> None:
    """Rows that bypass the boundary cleaning (a bug, an old caller) are isolated, not retried forever."""
    svc = await make_service(run_worker=False)
    store = svc.store
    jobs = await store.submit_many([NewJob(type="demo.count", payload={}) for _ in range(4)])
    claimed = await store.claim("w1", 4, lease_seconds=60)
    assert len(claimed) == 4
    a, b, c, d = (j.id or 0 for j in jobs)

    # Progress: one message the driver cannot encode.
    await write_progress_isolating(
        store,
        [
            ProgressWrite(a, Progress(1, 4, "fine", weighted_percent=25.0), worker_id="w1"),
            ProgressWrite(b, Progress(2, 4, "bad \udcff", weighted_percent=50.0), worker_id="w1"),
            ProgressWrite(c, Progress(float("nan"), 10**30, "odd numbers"), worker_id="w1"),
        ],
    )
    assert (await store.get(a)).progress_message == "fine"
    odd = await store.get(c)  # numbers no database holds are stored as unknown, the rest as given
    assert (odd.progress_current, odd.progress_total, odd.progress_message) == (None, None, "odd numbers")
    got = (await store.get(b)).progress_message or ""
    if svc.db.is_sqlite or "\udcff" not in got:  # PostgreSQL's driver may refuse it too
        assert got.startswith("progress could not be stored: ") or got == "bad \udcff"

    # Outcomes: a completion and a failure with unstorable text, between two good ones.
    res = await finish_isolating(
        store,
        [
            Outcome(a, "w1", JobStatus.COMPLETED, result={"ok": 1}),
            Outcome(b, "w1", JobStatus.FAILED, error="bad \udcff\x00"),
            Outcome(c, "w1", JobStatus.COMPLETED, result={"ok": 3}),
            Outcome(d, "w1", JobStatus.COMPLETED, result={"ok": 4}),
        ],
    )
    assert {a, c, d} <= res.completed_ids
    for jid, n in ((a, 1), (c, 3), (d, 4)):
        job = await store.get(jid)
        assert job.status == JobStatus.COMPLETED and job.result == {"ok": n}
    bad = await store.get(b)
    assert bad.status == JobStatus.FAILED and bad.error is not None
    assert "\udcff" not in bad.error


async def test_surrogates_from_clients_and_in_the_database(make_server: ServerFactory) -> None:
    """A tracked job completed with a surrogate; a result stored with one by an older version."""
    srv = await make_server()
    svc = srv.service
    session = srv.new_session()
    # An open stream of everything, from before the poison.
    stream = await session.get(srv.url + "/v1/events", headers={**srv.auth, "Accept": "application/x-ndjson"})
    assert stream.status == 200

    t1 = (await srv.post("/v1/jobs", {"name": "tracked one"}))["id"]
    before = svc.current_event(await svc.store.get(t1)).seq
    # The JSON escape "\udcff" decodes to a lone surrogate.
    status, data = await srv.call(
        "POST",
        f"/v1/jobs/{t1}/complete",
        b'{"result": {"file": "data-\\udcff.csv", "msg": "\\u0000x"}, "message": "bye \\udcff"}',
        headers={"Content-Type": "application/json"},
    )
    assert status == 200, data
    assert data["job"]["result"] == {"file": "data-\ufffd.csv", "msg": "x"}

    # An older version stored a surrogate as is: it is still served.
    t2 = (await srv.post("/v1/jobs", {"name": "tracked two"}))["id"]
    old = await svc.store.tracked_finish(t2, JobStatus.COMPLETED, result={"file": BAD_NAME})
    svc.monitor.job_changed(old)
    done = await srv.post("/v1/jobs", {"kind": "queued", "type": "demo.count", "payload": {"steps": 1}})

    status, listing = await srv.call("GET", "/v1/jobs?status=all")
    assert status == 200 and listing["count"] == 3
    status, detail = await srv.call("GET", f"/v1/jobs/{t2}")
    assert status == 200 and detail["result"] == {"file": "data-\ufffd.csv"}

    # The open stream delivered the poisoned events and the ones after them.
    def finished(evs: list[dict[str, Any]]) -> bool:
        return {(e.get("id"), e.get("status")) for e in evs} >= {
            (t1, "completed"),
            (t2, "completed"),
            (done["id"], "completed"),
        }

    assert finished(await read_until(stream, finished))
    stream.close()

    # A resume from before the poison replays it.
    async with session.get(
        srv.url + f"/v1/events?after={before}", headers={**srv.auth, "Accept": "application/x-ndjson"}
    ) as resumed:
        assert resumed.status == 200
        evs = await read_until(resumed, lambda evs: {t1, t2} <= {e.get("id") for e in evs})
        assert {t1, t2} <= {e.get("id") for e in evs}
