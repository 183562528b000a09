"""Property tests (hypothesis) over every POST route, the chat command router and the CLI parser.

Inputs include deep nesting, huge and non-finite numbers, extreme dates, lone surrogates, NUL and control
characters, RTL and zero-width characters, invalid UTF-8, oversized strings and wrong JSON types.
Properties: no 5xx; no traceback in a reply or on stderr; a rejected request changes no job; the service
keeps serving afterwards.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select
from typer.testing import CliRunner

from adapters.commands import Actor, CommandRouter
from bot.cli import app as cli_app
from core.service import ProgressService
from core.store import jobs_t
from tests.conftest import ServiceFactory
from tests.integration.http_helpers import ApiServer, ServerFactory

pytest_plugins = ["tests.integration.http_fixtures"]

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Characters that have broken parsers and stores: surrogates, NUL and C0/C1 controls, RTL and zero-width
# marks, full-width and Arabic-Indic digits, and ordinary text.
NASTY_CHARS = st.sampled_from(
    ["\udcff", "\ud800", "\x00", "\x1b", "\x7f", "\x85", "\u202e", "\u200b", "\ufeff", "１", "٢", "\n", "é"]
)
TEXT = st.one_of(
    st.text(max_size=40),
    st.lists(st.one_of(NASTY_CHARS, st.characters()), max_size=30).map("".join),
    st.integers(min_value=1, max_value=70_000).map(lambda n: "x" * n),  # oversized
)
NUMBERS = st.one_of(
    st.integers(),
    st.integers(min_value=-(10**60), max_value=10**60),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([2**63, -(2**63) - 1, 2**64, 1e308, -1e308, 5e-324, 0, -1]),
)
DATES = st.sampled_from(
    [
        "9999-12-31T23:59:59-14:00",
        "0001-01-01T00:00:00+14:00",
        "9999-12-31T23:59:59Z",
        "2024-02-30T00:00:00Z",
        "1970-01-01",
        "not a date",
        "2024-01-01T00:00:00",
    ]
)
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, TEXT, DATES)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(TEXT, children, max_size=4)),
    max_leaves=12,
)
FIELDS = st.sampled_from(
    [
        "type", "payload", "name", "priority", "delay", "run_at", "max_attempts", "timeout", "owner", "room",
        "kind", "total", "current", "message", "stage", "logs", "result", "error", "actor", "jobs", "level",
    ]
)  # fmt: skip


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    """A request body: mostly JSON objects with known and unknown fields, sometimes anything at all."""
    kind = draw(st.integers(0, 9))
    if kind == 0:
        return draw(st.binary(max_size=200))  # invalid UTF-8, garbage
    if kind == 1:
        depth = draw(st.sampled_from([63, 64, 65, 1000, 100_000]))
        return ('{"type": "demo.count", "payload": {"a": ' + _nested(depth) + "}}").encode()
    if kind == 2:
        return json.dumps(draw(JSON_VALUES)).encode()  # wrong top-level types, NaN as a bare token
    obj = draw(st.dictionaries(FIELDS, JSON_VALUES, max_size=6))
    if draw(st.booleans()):
        obj.setdefault("type", draw(st.sampled_from(["demo.count", "maintenance.cleanup", "nope"])))
    if "payload" in obj and draw(st.booleans()):
        obj["payload"] = {"steps": draw(NUMBERS), "delay_ms": draw(NUMBERS)}
    if "jobs" in obj and draw(st.booleans()):
        obj["jobs"] = [{"type": "demo.count", "payload": draw(JSON_VALUES)}]
    text = json.dumps(obj, allow_nan=True)  # NaN/Infinity tokens, which strict JSON refuses
    return text.encode("utf-8", "surrogatepass") if kind == 3 else text.encode("utf-8", "replace")


def snapshot_sql(svc: ProgressService) -> Any:
    """What a rejected request must not change: every job's identity, state and outcome."""
    cols = [jobs_t.c.id, jobs_t.c.type, jobs_t.c.kind, jobs_t.c.name, jobs_t.c.status, jobs_t.c.result]
    cols += [jobs_t.c.error, jobs_t.c.owner, jobs_t.c.priority, jobs_t.c.control]

    def read() -> list[Any]:
        with svc.db.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(select(*cols).order_by(jobs_t.c.id))]

    return svc.db.run(read)


ROUTES = [
    "/v1/jobs",
    "/v1/jobs/{id}/progress",
    "/v1/jobs/{id}/log",
    "/v1/jobs/{id}/complete",
    "/v1/jobs/{id}/fail",
    "/v1/jobs/{id}/pause",
    "/v1/jobs/{id}/resume",
    "/v1/jobs/{id}/cancel",
    "/v1/jobs/{id}/retry",
    "/v1/batches",
    "/v1/batches/{id}/pause",
    "/v1/batches/{id}/resume",
    "/v1/batches/{id}/cancel",
    "/v1/batches/{id}/retry",
]
IDS = st.one_of(
    st.sampled_from(["1", "2", "3", "b1", "d1", "%C2%B9", "%EF%BC%91", "99999999999999999999", "-1", "0"]),
    st.integers(min_value=0, max_value=2**80).map(str),
)


@pytest.fixture
async def fuzz_server(make_server: ServerFactory, db_url: str) -> ApiServer:
    """A service without a worker (so only requests change state) with a tracked job, a queued job and a
    batch to aim at; on SQLite and on PostgreSQL."""
    srv = await make_server(run_worker=False, url=db_url)
    await srv.post("/v1/jobs", {"name": "tracked"})
    await srv.post("/v1/jobs", {"type": "demo.count"})
    await srv.post("/v1/batches", {"name": "b", "jobs": [{"type": "demo.count"}]})
    return srv


@FUZZ
@given(route=st.sampled_from(ROUTES), job_id=IDS, body=bodies())
async def test_fuzz_every_post_route(
    fuzz_server: ApiServer, caplog: pytest.LogCaptureFixture, route: str, job_id: str, body: bytes
) -> None:
    srv = fuzz_server
    caplog.set_level(logging.ERROR, logger="bot.http_api")
    before = await snapshot_sql(srv.service)
    status, data = await srv.call(
        "POST", route.replace("{id}", job_id), body, headers={"Content-Type": "application/json"}
    )
    assert status < 500, (route, job_id, body[:200], data)
    assert "Traceback" not in json.dumps(data)
    if status >= 400:
        assert set(data) == {"error", "detail"}, data
        assert await snapshot_sql(srv.service) == before, (route, body[:200], data)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    # Still serving: listing and detail of what is there, whatever was sent before.
    assert (await srv.call("GET", "/v1/jobs?status=all&limit=1000"))[0] == 200
    assert (await srv.call("GET", "/v1/jobs/1"))[0] == 200


COMMANDS = st.sampled_from(
    ["run", "jobs", "status", "pause", "resume", "cancel", "retry", "help", "list", "show", "nope", ""]
)


@st.composite
def chat_texts(draw: st.DrawFn) -> str:
    """A chat message: a command with fuzzed arguments, or anything at all."""
    if draw(st.integers(0, 4)) == 0:
        return "!" + draw(TEXT)
    name = draw(COMMANDS)
    args = draw(
        st.one_of(
            TEXT,
            IDS,
            st.sampled_from(["demo.count", "maintenance.cleanup"]).flatmap(
                lambda t: st.lists(
                    st.tuples(st.sampled_from(["steps", "delay_ms", "older_than_days", "x"]), TEXT),
                    max_size=3,
                ).map(lambda kv: t + " " + " ".join(f"{k}={v}" for k, v in kv))
            ),
            JSON_VALUES.map(lambda v: "demo.count " + json.dumps(v)),
            st.sampled_from(["demo.count {" + '"a":' * 3000, "demo.count " + _nested(5000)]),
        )
    )
    return f"!{name} {args}"


@pytest.fixture
async def fuzz_router(make_service: ServiceFactory) -> CommandRouter:
    """A router over a service without a worker, with one job owned by someone else."""
    svc = await make_service(run_worker=False)
    await svc.submit("demo.count", owner="@owner:localhost")
    return CommandRouter(svc, admins=["@admin:localhost"], prefix="!", reply_limit=3000)


MEMBER = Actor(user_id="@member:localhost", platform="matrix", room="!r:localhost")


@FUZZ
@given(text=chat_texts())
async def test_fuzz_chat_command_router(fuzz_router: CommandRouter, text: str) -> None:
    svc = fuzz_router.service
    before = await snapshot_sql(svc)
    reply = await fuzz_router.handle_text(text, MEMBER)
    if reply is None:
        return
    assert len(reply.text) <= 3000
    assert "Traceback" not in reply.text
    assert "failed unexpectedly" not in reply.text, (text[:200], reply.text)
    if not reply.ok:
        assert await snapshot_sql(svc) == before, (text[:200], reply.text)
    # A plain member never touches someone else's job nor starts a cleanup.
    assert (await svc.get(1)).status == "pending"
    assert all(j.type != "maintenance.cleanup" for j in await svc.list_jobs(limit=1000))


CLI_COMMANDS = st.sampled_from(["submit", "jobs", "status", "pause", "resume", "cancel", "retry"])
CLI_OPTIONS = st.sampled_from(
    ["--priority", "--delay", "--max-attempts", "--timeout", "--payload", "--name", "--status", "--limit"]
)
CLI_VALUES = st.one_of(
    TEXT.filter(lambda s: "\x00" not in s).map(lambda s: s.encode("utf-8", "replace").decode()),
    NUMBERS.map(str),
    st.sampled_from(["nan", "inf", "-inf", "1e20", "[1]", "steps=3", "{}", '{"steps": 1e999}', "-0", "１２"]),
)


@pytest.mark.slow
def test_fuzz_cli_parser(tmp_path: Path) -> None:
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[database]\nurl = "sqlite:///{tmp_path}/pb.db"\n')
    runner = CliRunner()
    assert runner.invoke(cli_app, ["submit", "demo.count", "-c", str(cfg)]).exit_code == 0

    @settings(FUZZ, max_examples=100)
    @given(
        command=CLI_COMMANDS,
        positional=st.lists(CLI_VALUES, max_size=3),
        options=st.lists(st.tuples(CLI_OPTIONS, CLI_VALUES), max_size=3),
    )
    def one(command: str, positional: list[str], options: list[tuple[str, str]]) -> None:
        argv = [command, *positional, *[x for pair in options for x in pair], "-c", str(cfg)]
        res = runner.invoke(cli_app, argv)
        assert res.exit_code in (0, 1, 2), (argv, res.exit_code, res.output)
        assert res.exception is None or isinstance(res.exception, SystemExit), (argv, res.exception)
        assert "Traceback" not in res.output and "Traceback" not in (res.stderr or "")

    one()
