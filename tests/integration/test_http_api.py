"""The HTTP API against a real server on an ephemeral loopback port, over real HTTP."""

from __future__ import annotations

import asyncio
import io
import json
import socket
from typing import Any

import aiohttp
import pytest
from pydantic import SecretStr
from sqlalchemy import event as sa_event

from bot.http_api import HttpApi, HttpConfigError, ReplayLog, negotiate_stream
from bot.settings import HttpSettings
from core.db import Database
from core.events import JobProgressEvent
from core.registry import HandlerRegistry
from core.service import ProgressService, ServiceConfig
from tests.integration.http_helpers import (
    ApiServer,
    ServerFactory,
    read_ndjson,
    sse_frames,
    wait_for,
)

pytest_plugins = ["tests.integration.http_fixtures"]

pytestmark = pytest.mark.asyncio


NDJSON = {"Accept": "application/x-ndjson"}
SSE = {"Accept": "text/event-stream"}


async def total_jobs(srv: ApiServer) -> int:
    return int((await srv.service.stats())["total"])


# ----------------------------------------------------------------------- auth
async def test_healthz_needs_no_token_and_shows_no_job_data(server: ApiServer) -> None:
    await server.post("/v1/jobs", {"name": "secret build"})
    async with server.session.get(server.url + "/healthz") as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body == {"status": "ok"}


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Basic Zm9vOmJhcg=="},
        {"Authorization": "Bearer"},
    ],
    ids=["missing", "wrong", "basic", "empty"],
)
async def test_missing_or_wrong_token_gets_401_without_job_data(
    server: ApiServer, headers: dict[str, str]
) -> None:
    created = await server.post("/v1/jobs", {"name": "top secret build"})
    jid = created["id"]
    for method, path in [
        ("GET", "/v1/jobs"),
        ("GET", f"/v1/jobs/{jid}"),
        ("GET", "/v1/jobs/999"),  # 401, not 404: existence must not leak either
        ("POST", f"/v1/jobs/{jid}/cancel"),
        ("POST", f"/v1/jobs/{jid}/progress"),
        ("GET", f"/v1/events?job={jid}"),
        ("GET", "/v1/stats"),
        ("GET", "/v1/no-such-endpoint"),
    ]:
        async with server.session.request(method, server.url + path, headers=headers) as resp:
            raw = await resp.text()
            assert resp.status == 401, (method, path, raw)
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
            assert json.loads(raw) == {"error": "unauthorized", "detail": "missing or invalid bearer token"}
            assert "secret" not in raw
    job = await server.service.get(jid)
    assert job.status == "running"  # the refused cancel changed nothing


async def test_the_token_also_works_with_a_lowercase_scheme(server: ApiServer) -> None:
    status, _ = await server.call("GET", "/v1/stats", headers={"Authorization": f"bearer {server.token}"})
    assert status == 200


async def test_start_refuses_without_a_token(server: ApiServer) -> None:
    api = HttpApi(server.service, HttpSettings(listen="127.0.0.1:0"))
    with pytest.raises(HttpConfigError, match="PROGRESSBOT_HTTP__TOKEN"):
        await api.start()


async def test_listen_on_a_busy_port_raises_oserror(server: ApiServer) -> None:
    api = HttpApi(
        server.service, HttpSettings(listen=f"127.0.0.1:{server.api.port}", token=SecretStr("x" * 20))
    )
    with pytest.raises(OSError):
        await api.start()


# ---------------------------------------------------------------------- jobs
async def test_submit_queued_job_then_get_it_with_activity(server: ApiServer) -> None:
    status, body = await server.call(
        "POST",
        "/v1/jobs",
        {
            "type": "demo.count",
            "payload": {"steps": 3, "delay_ms": 1},
            "name": "count",
            "owner": "@alice:example.org",
            "room": "!r:example.org",
        },
    )
    assert status == 201, body
    jid = body["id"]
    assert body["kind"] == "queued" and body["job"]["status"] == "pending"
    await server.service.wait_for(jid, timeout=10)
    job = await server.get(f"/v1/jobs/{jid}")
    assert job["status"] == "completed"
    assert job["result"] == {"steps": 3, "executions": 3}
    assert job["progress"]["current"] == 3 and job["progress"]["percentage"] == 100.0
    assert job["owner"] == "@alice:example.org" and job["room"] == "!r:example.org"
    messages = [a["message"] for a in job["activity"]]
    assert messages[0] == "submitted by @alice:example.org" and messages[-1] == "completed"


async def test_submit_defaults_the_owner_to_http(server: ApiServer) -> None:
    body = await server.post("/v1/jobs", {"type": "demo.count", "payload": {"steps": 1, "delay_ms": 0}})
    assert body["job"]["owner"] == "http"


async def test_invalid_submissions_store_nothing(server: ApiServer) -> None:
    cases: list[tuple[Any, int, str]] = [
        ({"type": "demo.count", "payload": {"steps": "many"}}, 422, "invalid_payload"),
        ({"type": "demo.count", "payload": {"stpes": 3}}, 422, "invalid_payload"),
        ({"type": "no.such.type"}, 422, "unknown_job_type"),
        ({"type": "demo.count", "priorty": 3}, 422, "validation_error"),
        ({"type": "demo.count", "max_attempts": 0}, 422, "validation_error"),
        ({"type": "demo.count", "delay": -1}, 422, "validation_error"),
        ({"kind": "tracked"}, 422, "validation_error"),  # a tracked job needs a name
        ({"name": "x", "total": -5}, 422, "validation_error"),
        ({"name": ""}, 422, "validation_error"),
        ({"kind": "other", "name": "x"}, 422, "validation_error"),
        (b"{not json", 400, "invalid_json"),
        (b'{"name": "x", "total": NaN}', 400, "invalid_json"),
        (b"[1, 2]", 400, "invalid_json"),
        (b"\xff\xfe", 400, "invalid_json"),
    ]
    for body, status, error in cases:
        got, reply = await server.call("POST", "/v1/jobs", body)
        assert (got, reply["error"]) == (status, error), (body, reply)
        assert set(reply) == {"error", "detail"} and reply["detail"]
    _, reply = await server.call("POST", "/v1/jobs", {"type": "demo.count", "payload": {"stpes": 3}})
    assert "stpes: unknown field" in reply["detail"]
    _, reply = await server.call("POST", "/v1/jobs", {"type": "demo.count", "priorty": 3})
    assert reply["detail"] == "priorty: unknown field"
    assert await total_jobs(server) == 0


async def test_oversized_bodies_get_413_and_store_nothing(make_server: ServerFactory) -> None:
    srv = await make_server(max_body=2048)
    big = json.dumps({"name": "x", "total": 1, "pad": "y" * 5000}).encode()
    status, reply = await srv.call("POST", "/v1/jobs", big)
    assert status == 413 and reply["error"] == "payload_too_large"
    assert "2048" in reply["detail"]

    async def chunked() -> Any:  # no Content-Length: the limit applies while reading
        for _ in range(10):
            yield b" " * 1000
        yield b'{"name": "x"}'

    status, reply = await srv.call("POST", "/v1/jobs", chunked())
    assert status == 413 and reply["error"] == "payload_too_large"
    jid = (await srv.post("/v1/jobs", {"name": "tracked"}))["id"]
    status, reply = await srv.call(
        "POST", f"/v1/jobs/{jid}/progress", {"message": "m" * 1900, "logs": [{"message": "l" * 1000}]}
    )
    assert status == 413
    assert (await srv.service.get(jid)).progress_message is None
    assert await total_jobs(srv) == 1


async def test_the_default_body_limit_is_one_mib(server: ApiServer) -> None:
    assert server.api.settings.max_body_bytes == 1024 * 1024
    body = io.BytesIO(json.dumps({"name": "x", "pad": "y" * (1024 * 1024)}).encode())
    status, reply = await server.call("POST", "/v1/jobs", body)
    assert status == 413 and reply["error"] == "payload_too_large"


async def test_list_jobs_with_filters(server: ApiServer) -> None:
    a = (await server.post("/v1/jobs", {"type": "demo.count", "payload": {"steps": 1, "delay_ms": 0}}))["id"]
    t1 = (await server.post("/v1/jobs", {"name": "tracked one"}))["id"]
    t2 = (await server.post("/v1/jobs", {"name": "tracked two", "kind": "tracked", "type": "ci.step"}))["id"]
    await server.service.wait_for(a, timeout=10)
    await server.post(f"/v1/jobs/{t2}/pause")

    everything = await server.get("/v1/jobs")
    assert [j["id"] for j in everything["jobs"]] == [t2, t1, a] and everything["count"] == 3
    assert [j["id"] for j in (await server.get("/v1/jobs?status=completed"))["jobs"]] == [a]
    assert [j["id"] for j in (await server.get("/v1/jobs?status=running,paused"))["jobs"]] == [t2, t1]
    assert [j["id"] for j in (await server.get("/v1/jobs?status=running&status=paused"))["jobs"]] == [t2, t1]
    assert [j["id"] for j in (await server.get("/v1/jobs?status=active"))["jobs"]] == [t2, t1]
    assert [j["id"] for j in (await server.get("/v1/jobs?type=ci.step"))["jobs"]] == [t2]
    assert [j["id"] for j in (await server.get("/v1/jobs?type=tracked"))["jobs"]] == [t1]
    assert [j["id"] for j in (await server.get("/v1/jobs?limit=1"))["jobs"]] == [t2]
    assert (await server.get("/v1/jobs?type=nothing"))["jobs"] == []
    for bad in ("status=bogus", "limit=0", "limit=abc", "limit=100000", "batch=x"):
        status, reply = await server.call("GET", f"/v1/jobs?{bad}")
        assert status == 400 and reply["error"] == "bad_request", (bad, reply)


async def test_unknown_ids_endpoints_and_methods(server: ApiServer) -> None:
    for path in ("/v1/jobs/999", "/v1/jobs/abc", "/v1/jobs/d99"):
        status, reply = await server.call("GET", path)
        assert status == 404 and reply["error"] == "not_found", (path, reply)
    assert (await server.call("GET", "/v1/jobs/999"))[1]["detail"] == "No job #999"
    for path in ("/v1/jobs/999/progress", "/v1/jobs/999/complete", "/v1/jobs/999/pause", "/v1/jobs/999/log"):
        status, reply = await server.call("POST", path, {"message": "x"} if path.endswith("log") else {})
        assert status == 404 and reply == {"error": "not_found", "detail": "No job #999"}, (path, reply)
    status, reply = await server.call("GET", "/v1/nothing-here")
    assert status == 404 and reply["error"] == "not_found"
    status, reply = await server.call("GET", "/v1/jobs/1/pause")
    assert status == 405 and reply["error"] == "method_not_allowed"
    status, reply = await server.call("DELETE", "/v1/jobs")
    assert status == 405 and set(reply) == {"error", "detail"}


# ------------------------------------------------------------- tracked jobs
async def test_tracked_job_progress_reply_carries_the_control(server: ApiServer) -> None:
    created = await server.post(
        "/v1/jobs", {"name": "nightly build", "total": 10, "room": "!ops:example.org"}
    )
    jid = created["id"]
    assert created["kind"] == "tracked" and created["job"]["status"] == "running"
    reply = await server.post(
        f"/v1/jobs/{jid}/progress", {"current": 3, "message": "compiling", "stage": "build"}
    )
    assert reply == {"id": jid, "status": "running", "control": "run"}

    paused = await server.post(f"/v1/jobs/{jid}/pause", {"actor": "@alice:example.org"})
    assert paused["status"] == "paused" and paused["control"] == "pause"
    assert (await server.post(f"/v1/jobs/{jid}/progress", {"current": 4}))["control"] == "pause"
    assert (await server.post(f"/v1/jobs/{jid}/progress", {}))[
        "control"
    ] == "pause"  # an empty body just asks

    assert (await server.post(f"/v1/jobs/{jid}/resume"))["status"] == "running"
    assert (await server.post(f"/v1/jobs/{jid}/progress", {"current": 5}))["control"] == "run"

    job = await server.get(f"/v1/jobs/{jid}")
    assert job["progress"]["current"] == 5 and job["progress"]["total"] == 10
    assert job["progress"]["message"] == "compiling" and job["progress"]["stage"]["name"] == "build"
    assert "paused by @alice:example.org" in [a["message"] for a in job["activity"]]

    assert (await server.post(f"/v1/jobs/{jid}/cancel"))["status"] == "cancelled"
    assert (await server.post(f"/v1/jobs/{jid}/progress", {"current": 6}))["control"] == "cancel"
    status, reply = await server.call("POST", f"/v1/jobs/{jid}/complete", {"current": 10})
    assert status == 409 and reply == {
        "error": "conflict",
        "detail": f"Job #{jid} is cancelled; it can't be completed",
    }
    job = await server.service.get(jid)
    assert job.status == "cancelled" and job.progress_current != 10  # the refused request stored nothing


async def test_tracked_job_logs_complete_and_fail(server: ApiServer) -> None:
    a = (await server.post("/v1/jobs", {"name": "a", "total": 4}))["id"]
    await server.post(
        f"/v1/jobs/{a}/progress",
        {
            "current": 1,
            "logs": [{"message": "fetched", "level": "info"}, {"message": "slow", "level": "warning"}],
        },
    )
    await server.post(f"/v1/jobs/{a}/log", {"message": "one more", "level": "debug"})
    done = await server.post(f"/v1/jobs/{a}/complete", {"result": {"artifacts": 3}, "message": "all done"})
    assert done["status"] == "completed" and done["job"]["result"] == {"artifacts": 3}
    assert done["job"]["progress"]["current"] == 4 and done["job"]["progress"]["message"] == "all done"
    acts = [(x["level"], x["message"]) for x in (await server.get(f"/v1/jobs/{a}"))["activity"]]
    assert ("info", "fetched") in acts and ("warning", "slow") in acts and ("debug", "one more") in acts
    assert acts[-1] == ("info", "completed")
    for action in ("complete", "fail"):
        status, reply = await server.call("POST", f"/v1/jobs/{a}/{action}", {})
        assert status == 409 and "is completed" in reply["detail"]

    b = (await server.post("/v1/jobs", {"name": "b"}))["id"]
    failed = await server.post(f"/v1/jobs/{b}/fail", {"error": "disk full", "current": 2})
    assert failed["status"] == "failed" and failed["job"]["error"] == "disk full"
    assert failed["job"]["progress"]["current"] == 2
    status, reply = await server.call("POST", f"/v1/jobs/{b}/complete", {"error": "x"})
    assert status == 422

    status, reply = await server.call("POST", f"/v1/jobs/{b}/log", {"message": "x", "level": "loud"})
    assert status == 422 and "level" in reply["detail"]
    status, reply = await server.call("POST", f"/v1/jobs/{b}/progress", {"current": "lots"})
    assert status == 422 and reply["detail"].startswith("current:")
    status, reply = await server.call("POST", f"/v1/jobs/{b}/progress", {"logs": [{"message": "x"}] * 101})
    assert status == 422


async def test_tracked_progress_is_written_in_batches_not_one_commit_per_report(
    make_server: ServerFactory,
) -> None:
    srv = await make_server(min_interval=0.2)
    jid = (await srv.post("/v1/jobs", {"name": "busy", "total": 100}))["id"]
    commits = 0

    def on_commit(conn: Any) -> None:
        nonlocal commits
        commits += 1

    engine = srv.service.db.engine
    sa_event.listen(engine, "commit", on_commit)
    try:
        for i in range(1, 101):
            await srv.post(f"/v1/jobs/{jid}/progress", {"current": i, "message": f"file {i}"})
        # The API shows the newest state at once, before the monitor wrote it.
        live = await srv.get(f"/v1/jobs/{jid}")
        assert live["progress"]["current"] == 100 and live["progress"]["message"] == "file 100"
    finally:
        sa_event.remove(engine, "commit", on_commit)
    assert commits < 25, commits  # 100 reports, but writes are batched per monitor tick

    async def persisted() -> bool:
        return (await srv.service.store.get(jid)).progress_current == 100

    await wait_for(persisted)
    await srv.post(f"/v1/jobs/{jid}/complete")
    assert srv.service.monitor.live_state(jid) is None  # nothing stays in memory after the end

    other = (await srv.post("/v1/jobs", {"name": "cancelled"}))["id"]
    await srv.post(f"/v1/jobs/{other}/progress", {"current": 1})
    assert srv.service.monitor.live_state(other) is not None
    await srv.post(f"/v1/jobs/{other}/cancel")
    assert (await srv.post(f"/v1/jobs/{other}/progress", {"current": 2}))["control"] == "cancel"
    assert srv.service.monitor.live_state(other) is None


async def test_a_pause_from_another_process_reaches_the_progress_reply(make_server: ServerFactory) -> None:
    srv = await make_server()
    jid = (await srv.post("/v1/jobs", {"name": "cross-process"}))["id"]
    assert (await srv.post(f"/v1/jobs/{jid}/progress", {"current": 1}))["control"] == "run"
    # `progressbot pause 12` works on the database directly, from another process.
    url = srv.service.config.database_url
    other = ProgressService(
        ServiceConfig(database_url=url, run_worker=False), registry=HandlerRegistry(), database=Database(url)
    )
    await other.store.init()
    try:
        await other.act(jid, "pause", actor="cli")
    finally:
        other.db.close()

    async def told_to_pause() -> bool:
        reply = await srv.post(f"/v1/jobs/{jid}/progress", {"current": 2})
        return bool(reply["control"] == "pause" and reply["status"] == "paused")

    await wait_for(told_to_pause, timeout=30, interval=0.05)


async def test_progress_for_a_queued_job_is_refused(server: ApiServer) -> None:
    jid = (await server.post("/v1/jobs", {"type": "demo.count", "payload": {"steps": 1, "delay_ms": 0}}))[
        "id"
    ]
    for path, body in (
        ("progress", {"current": 1}),
        ("complete", {}),
        ("fail", {"error": "x"}),
        ("log", {"message": "x"}),
    ):
        status, reply = await server.call("POST", f"/v1/jobs/{jid}/{path}", body)
        assert status == 409 and "not a tracked job" in reply["detail"], (path, reply)


async def test_illegal_transitions_get_409_with_a_readable_message(server: ApiServer) -> None:
    jid = (await server.post("/v1/jobs", {"type": "demo.count", "payload": {"steps": 1, "delay_ms": 0}}))[
        "id"
    ]
    await server.service.wait_for(jid, timeout=10)
    expected = {
        "pause": f"Job #{jid} is completed; it can't be paused",
        "resume": f"Job #{jid} is completed; it can't be resumed",
        "cancel": f"Job #{jid} is completed; it can't be cancelled",
        "retry": f"Job #{jid} is completed; it can't be retried",
    }
    for action, detail in expected.items():
        status, reply = await server.call("POST", f"/v1/jobs/{jid}/{action}")
        assert (status, reply) == (409, {"error": "conflict", "detail": detail})
    t = (await server.post("/v1/jobs", {"name": "t"}))["id"]
    status, reply = await server.call("POST", f"/v1/jobs/{t}/resume")
    assert status == 409 and reply["detail"] == f"Job #{t} is running; it can't be resumed"


async def test_pause_resume_cancel_retry_of_queued_jobs(server: ApiServer) -> None:
    jid = (await server.post("/v1/jobs", {"type": "demo.count", "payload": {"steps": 200, "delay_ms": 20}}))[
        "id"
    ]
    await wait_for(lambda: _status(server, jid, "running"))
    reply = await server.post(f"/v1/jobs/{jid}/pause")
    assert reply["requested"] is True and reply["control"] == "pause"
    await wait_for(lambda: _status(server, jid, "paused"))
    assert (await server.post(f"/v1/jobs/{jid}/resume"))["status"] == "pending"
    await wait_for(lambda: _status(server, jid, "running"))
    await server.post(f"/v1/jobs/{jid}/cancel", {"actor": "ci"})
    await wait_for(lambda: _status(server, jid, "cancelled"))
    assert (await server.post(f"/v1/jobs/{jid}/retry"))["status"] == "pending"
    status, reply = await server.call("POST", f"/v1/jobs/{jid}/pause", {"actor": 5})
    assert status == 422


async def _status(srv: ApiServer, jid: int, status: str) -> bool:
    return (await srv.service.get(jid)).status == status


async def test_stats(server: ApiServer) -> None:
    await server.post("/v1/jobs", {"name": "t"})
    st = await server.get("/v1/stats")
    assert st["counts"]["running"] == 1 and st["total"] == 1
    assert st["http"]["streams"] == 0 and st["http"]["requests"] >= 2


# ------------------------------------------------------------------- batches
async def test_batches_submit_get_act_and_stream(server: ApiServer) -> None:
    status, reply = await server.call(
        "POST",
        "/v1/batches",
        {
            "name": "import",
            "jobs": [
                {"type": "demo.count", "payload": {"steps": 2, "delay_ms": 1}},
                {"type": "demo.count", "payload": {"steps": "x"}},
            ],
        },
    )
    assert status == 422 and await total_jobs(server) == 0

    created = await server.post(
        "/v1/batches",
        {
            "name": "import",
            "jobs": [
                {"type": "demo.count", "payload": {"steps": 3, "delay_ms": 30}},
                {"type": "demo.count", "payload": {"steps": 2, "delay_ms": 30}},
            ],
        },
    )
    bid = created["id"]
    assert len(created["jobs"]) == 2
    async with server.session.get(
        f"{server.url}/v1/events?batch={bid}", headers={**server.auth, **NDJSON}
    ) as r:
        assert r.status == 200
        events = await asyncio.wait_for(read_ndjson(r), 20)
    batch_events = [e for e in events if e["type"] == "batch"]
    assert batch_events[-1]["status"] == "completed" and events[-1] is batch_events[-1]
    assert batch_events[-1]["batchDetails"]["completedOperations"] == 2
    assert {e["id"] for e in events if e["type"] == "job"} == set(created["jobs"])
    got = await server.get(f"/v1/batches/{bid}")
    assert got["status"] == "completed" and got["jobs"] == created["jobs"] and got["completed"] == 2
    status, reply = await server.call("POST", f"/v1/batches/{bid}/pause")
    assert status == 409 and reply["detail"] == f"Batch #{bid} is completed; it can't be paused"
    status, reply = await server.call("GET", "/v1/batches/99")
    assert status == 404 and reply["detail"] == "No batch #99"


# ------------------------------------------------------------------- streams
async def test_stream_format_negotiation() -> None:
    assert negotiate_stream("") == "ndjson"
    assert negotiate_stream("*/*") == "ndjson"
    assert negotiate_stream("application/x-ndjson") == "ndjson"
    assert negotiate_stream("text/event-stream") == "sse"
    assert negotiate_stream("text/event-stream;q=0.5, application/x-ndjson") == "ndjson"
    assert negotiate_stream("text/event-stream, application/x-ndjson;q=0.9") == "sse"
    assert negotiate_stream("text/html") is None
    assert negotiate_stream("application/x-ndjson;q=0") is None


async def test_stream_request_errors(server: ApiServer) -> None:
    h = {**server.auth}
    for query, status, error in [
        ("job=999", 404, "not_found"),
        ("job=abc", 404, "not_found"),
        ("batch=999", 404, "not_found"),
        ("job=1&batch=1", 400, "bad_request"),
        ("after=abc", 400, "bad_request"),
    ]:
        async with server.session.get(f"{server.url}/v1/events?{query}", headers=h) as resp:
            assert resp.status == status, query
            assert (await resp.json())["error"] == error
    async with server.session.get(f"{server.url}/v1/events", headers={**h, "Accept": "text/html"}) as resp:
        assert resp.status == 406 and (await resp.json())["error"] == "not_acceptable"
    assert server.service.bus.subscriber_count == 0  # refused streams leave no subscription behind


async def test_ndjson_job_stream_is_throttled_and_ends_at_the_terminal_state(
    make_server: ServerFactory,
) -> None:
    srv = await make_server(min_interval=0.2)
    jid = (await srv.post("/v1/jobs", {"name": "upload", "total": 200}))["id"]
    async with srv.session.get(f"{srv.url}/v1/events?job={jid}", headers={**srv.auth, **NDJSON}) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"] == "application/x-ndjson"
        reader = asyncio.create_task(read_ndjson(resp))
        for i in range(1, 201):
            await srv.post(f"/v1/jobs/{jid}/progress", {"current": i, "message": f"part {i}"})
        await srv.post(f"/v1/jobs/{jid}/complete")
        events = await asyncio.wait_for(reader, 10)  # returns at EOF: the server ended the stream
    assert events[0]["status"] == "running"  # the current state comes first
    assert events[-1]["status"] == "completed" and events[-1]["progress"]["current"] == 200
    assert all(e["type"] == "job" and e["id"] == jid for e in events)
    assert len(events) < 100  # 200 reports, throttled to at most one event per 200 ms (+ status changes)
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    currents = [e["progress"]["current"] for e in events if e["progress"] and e["progress"]["current"]]
    assert currents == sorted(currents)
    await wait_for(lambda: not srv.api.streams)
    assert srv.service.bus.subscriber_count == 0


async def test_ndjson_stream_of_a_finished_job_sends_its_final_state_and_ends(server: ApiServer) -> None:
    jid = (await server.post("/v1/jobs", {"name": "done"}))["id"]
    await server.post(f"/v1/jobs/{jid}/fail", {"error": "boom"})
    async with server.session.get(
        f"{server.url}/v1/events?job={jid}", headers={**server.auth, **NDJSON}
    ) as resp:
        events = await asyncio.wait_for(read_ndjson(resp), 5)
    assert [e["status"] for e in events] == ["failed"] and events[0]["error"] == "boom"


async def test_sse_stream_resumes_from_last_event_id(make_server: ServerFactory) -> None:
    srv = await make_server(min_interval=0.05)
    jid = (await srv.post("/v1/jobs", {"name": "render", "total": 10}))["id"]
    url = f"{srv.url}/v1/events?job={jid}"

    async def until_seen(current: int) -> None:
        # Wait for the monitor to have emitted `current`, so the test knows what a client could have seen.
        def seen() -> bool:
            ev = srv.api.replay.latest(("job", jid))
            return ev is not None and ev.current == current

        await wait_for(seen)

    first: list[Any] = []
    async with srv.session.get(url, headers={**srv.auth, **SSE}) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
        frames = sse_frames(resp)
        hello = await frames.__anext__()
        assert hello.retry is not None
        for i in (1, 2, 3):
            await srv.post(f"/v1/jobs/{jid}/progress", {"current": i})
            await until_seen(i)
        async for frame in frames:
            first.append(frame)
            if frame.json()["progress"]["current"] == 3:
                break
    assert all(f.id is not None and int(f.id) == f.json()["seq"] for f in first)
    last_id = int(first[-1].id or 0)

    # Disconnected: the job moves on. A resumed stream starts after last_id and skips nothing new.
    for i in (4, 5, 6):
        await srv.post(f"/v1/jobs/{jid}/progress", {"current": i})
    await until_seen(6)
    resumed: list[Any] = []
    async with srv.session.get(url, headers={**srv.auth, **SSE, "Last-Event-ID": str(last_id)}) as resp:
        frames = sse_frames(resp)
        async for frame in frames:
            if frame.retry is not None or frame.comment:
                continue
            resumed.append(frame)
            if frame.event is None and frame.json()["progress"]["current"] == 6:
                await srv.post(f"/v1/jobs/{jid}/complete")
            if frame.event == "end":
                break
    data = [f for f in resumed if f.event is None]
    assert data[0].json()["progress"]["current"] == 6  # the latest state, not a replay of 4 and 5
    assert all(int(f.id or 0) > last_id for f in data)
    assert data[-1].json()["status"] == "completed"
    assert resumed[-1].event == "end"
    final_id = data[-1].id

    # Resuming after the terminal event: 204, so that EventSource stops reconnecting.
    async with srv.session.get(url, headers={**srv.auth, **SSE, "Last-Event-ID": str(final_id)}) as resp:
        assert resp.status == 204
    # Resuming from before it delivers just the terminal state.
    async with srv.session.get(url, headers={**srv.auth, **SSE, "Last-Event-ID": str(last_id)}) as resp:
        frames_after = [f async for f in sse_frames(resp) if f.data and f.event is None]
    assert [f.json()["status"] for f in frames_after] == ["completed"]


async def test_all_events_stream_resumes_and_sends_keepalives(make_server: ServerFactory) -> None:
    srv = await make_server(keepalive=0.2, min_interval=0.05)
    a = (await srv.post("/v1/jobs", {"name": "a"}))["id"]
    b = (await srv.post("/v1/jobs", {"name": "b"}))["id"]
    keepalives: list[dict[str, Any]] = []
    async with srv.session.get(f"{srv.url}/v1/events", headers={**srv.auth, **NDJSON}) as resp:
        events = await asyncio.wait_for(read_ndjson(resp, limit=2), 5)
        assert {e["id"] for e in events} == {a, b}  # the active jobs first
        # Idle now: keep-alive lines arrive.
        task = asyncio.create_task(read_ndjson(resp, keepalives=keepalives, limit=1))
        await wait_for(lambda: len(keepalives) >= 2)
        await srv.post(f"/v1/jobs/{a}/progress", {"current": 7})
        ev = (await asyncio.wait_for(task, 5))[0]
        assert ev["id"] == a and ev["progress"]["current"] == 7
        last = ev["seq"]
    await srv.post(f"/v1/jobs/{b}/complete")
    await wait_for(lambda: (e := srv.api.replay.latest(("job", b))) is not None and e.terminal)
    async with srv.session.get(f"{srv.url}/v1/events?after={last}", headers={**srv.auth, **NDJSON}) as resp:
        resumed = await asyncio.wait_for(read_ndjson(resp, limit=1), 5)
    assert resumed[0]["id"] == b and resumed[0]["status"] == "completed"  # not a again: it has not changed

    async with srv.session.get(f"{srv.url}/v1/events", headers={**srv.auth, **SSE}) as resp:
        comments: list[str] = []
        async for frame in sse_frames(resp):
            if frame.comment:
                comments.append(frame.comment)
                break
    assert comments == ["keepalive"]


async def test_client_disconnect_is_cleaned_up(server: ApiServer) -> None:
    jid = (await server.post("/v1/jobs", {"name": "x"}))["id"]
    base = server.service.bus.subscriber_count
    for headers in (NDJSON, SSE):
        session = server.new_session()
        resp = await session.get(f"{server.url}/v1/events?job={jid}", headers={**server.auth, **headers})
        await resp.content.readline()
        assert len(server.api.streams) == 1
        resp.close()
        await session.close()
        await wait_for(lambda: not server.api.streams, timeout=5)
        assert server.service.bus.subscriber_count == base
    # The job and the server are unaffected.
    assert (await server.post(f"/v1/jobs/{jid}/progress", {"current": 1}))["control"] == "run"


async def test_stop_ends_open_streams(make_server: ServerFactory) -> None:
    srv = await make_server()
    jid = (await srv.post("/v1/jobs", {"name": "x"}))["id"]
    resp = await srv.session.get(f"{srv.url}/v1/events?job={jid}", headers={**srv.auth, **NDJSON})
    await resp.content.readline()
    await asyncio.wait_for(srv.api.stop(), 5)
    rest = await asyncio.wait_for(resp.content.read(), 5)
    assert rest == b""
    resp.close()
    assert srv.service.bus.subscriber_count == 0


class SlowClient:
    """A raw socket that asks for a stream and never reads it (a tiny receive buffer fills at once)."""

    def __init__(self, url: str, token: str, path: str) -> None:
        self.url, self.token, self.path = url, token, path
        self.sock: socket.socket | None = None

    async def open(self) -> None:
        host, port = self.url.removeprefix("http://").rsplit(":", 1)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
        req = (
            f"GET {self.path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {self.token}\r\n"
            "Accept: application/x-ndjson\r\n\r\n"
        )
        await asyncio.get_running_loop().sock_sendall(sock, req.encode())
        self.sock = sock

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()


@pytest.mark.slow
async def test_200_stream_clients_and_one_slow_client(make_server: ServerFactory) -> None:
    srv = await make_server(min_interval=0.02)
    target = (await srv.post("/v1/jobs", {"name": "watched", "total": 40}))["id"]
    noisy = [(await srv.post("/v1/jobs", {"name": f"noisy {i}"}))["id"] for i in range(20)]

    slow = SlowClient(srv.url, srv.token, "/v1/events")  # everything: the heaviest stream there is
    await slow.open()
    await wait_for(lambda: len(srv.api.streams) == 1)

    session = srv.new_session(connector=aiohttp.TCPConnector(limit=0))
    results: list[list[dict[str, Any]]] = []

    async def fast_client() -> None:
        async with session.get(f"{srv.url}/v1/events?job={target}", headers={**srv.auth, **NDJSON}) as resp:
            assert resp.status == 200
            results.append(await read_ndjson(resp))

    clients = [asyncio.create_task(fast_client()) for _ in range(200)]
    await wait_for(lambda: len(srv.api.streams) == 201, timeout=30)

    peak = {"pending": 0, "buffer": 0}

    def sample() -> None:
        for s in srv.api.stream_stats():
            if s["target"] == "all":
                peak["pending"] = max(peak["pending"], s["pending_events"])
                peak["buffer"] = max(peak["buffer"], s["write_buffer"])

    # Flood the slow client's stream with fat events, then drive the watched job to its end.
    fat = "x" * 1900
    for round_ in range(40):
        await asyncio.gather(
            *(srv.post(f"/v1/jobs/{j}/progress", {"current": round_, "message": fat}) for j in noisy)
        )
        await srv.post(f"/v1/jobs/{target}/progress", {"current": round_ + 1})
        await asyncio.sleep(0.025)  # let the monitor emit (min_interval 20 ms)
        sample()
    await srv.post(f"/v1/jobs/{target}/complete")

    # The 200 others got everything up to the terminal state while the slow client read nothing.
    await asyncio.wait_for(asyncio.gather(*clients), 30)
    assert len(results) == 200
    for events in results:
        assert events[-1]["status"] == "completed" and events[-1]["id"] == target
    sample()

    slow_stats = [s for s in srv.api.stream_stats() if s["target"] == "all"]
    assert len(slow_stats) == 1 and slow_stats[0]["writing"], "the slow client should be blocked in a write"
    # Bounded memory: at most one buffered event per job, and the socket buffer is capped by flow control.
    assert peak["pending"] <= len(noisy) + 1
    assert peak["buffer"] <= 512 * 1024
    assert slow_stats[0]["bytes"] < 2 * 1024 * 1024

    slow.close()
    await wait_for(lambda: not srv.api.streams, timeout=10)
    assert srv.service.bus.subscriber_count == 0


@pytest.mark.slow
async def test_a_client_that_stops_reading_is_dropped_after_the_write_timeout(
    make_server: ServerFactory,
) -> None:
    srv = await make_server(min_interval=0.01)
    srv.api.write_timeout = 0.5
    jobs = [(await srv.post("/v1/jobs", {"name": f"n{i}"}))["id"] for i in range(10)]
    slow = SlowClient(srv.url, srv.token, "/v1/events")
    await slow.open()
    await wait_for(lambda: len(srv.api.streams) == 1)
    fat = "y" * 1900
    try:
        for round_ in range(200):
            if not srv.api.streams:
                break
            await asyncio.gather(
                *(srv.post(f"/v1/jobs/{j}/progress", {"current": round_, "message": fat}) for j in jobs)
            )
            await asyncio.sleep(0.02)
        await wait_for(lambda: not srv.api.streams, timeout=10)
    finally:
        slow.close()
    assert srv.service.bus.subscriber_count == 0


# --------------------------------------------------------------- units
def _ev(key: int, seq: int, status: str = "running") -> JobProgressEvent:
    return JobProgressEvent(id=key, type="job", status=status, seq=seq, timestamp=0.0)


async def test_replay_log_keeps_the_latest_per_key_in_seq_order() -> None:
    log = ReplayLog(max_keys=3)
    for key, seq in [(1, 10), (2, 11), (1, 12), (3, 13)]:
        log.add(_ev(key, seq))
    log.add(_ev(2, 5))  # older than what it has: ignored
    events, complete = log.since(10)
    assert [(e.id, e.seq) for e in events] == [(2, 11), (1, 12), (3, 13)] and complete
    log.add(_ev(4, 14))  # evicts key 2 (seq 11)
    events, complete = log.since(10)
    assert [e.id for e in events] == [1, 3, 4] and not complete
    events, complete = log.since(11)
    assert [e.id for e in events] == [1, 3, 4] and complete
    assert len(log) == 3 and log.latest(("job", 1)) is not None and log.latest(("job", 2)) is None
