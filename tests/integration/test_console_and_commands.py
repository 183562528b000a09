"""The platform-neutral chat commands (parsing, authorization, refusals) and the console adapter."""

from __future__ import annotations

import io

import pytest

from adapters.commands import Actor, CommandRouter, parse_job_id, parse_run_args
from adapters.console import ConsoleAdapter
from adapters.render import render_html, render_plain
from core.events import JobProgressEvent
from tests.conftest import ServiceFactory, wait_until

ALICE = Actor(user_id="@alice:localhost", platform="matrix", room="!r:localhost")
BOB = Actor(user_id="@bob:localhost", platform="matrix", room="!r:localhost")
MOD = Actor(user_id="@mod:localhost", platform="matrix", room="!r:localhost", is_moderator=True)


def test_parsing() -> None:
    assert parse_job_id("12") == 12 and parse_job_id("#12") == 12 and parse_job_id("d3") == "d3"
    assert parse_job_id("abc") is None and parse_job_id("-1") is None
    assert parse_run_args(["steps=5", "name=x y", "flag=true"], "steps=5") == {
        "steps": 5,
        "name": "x y",
        "flag": True,
    }
    assert parse_run_args([], '{"steps": 3}') == {"steps": 3}
    with pytest.raises(ValueError, match="key=value"):
        parse_run_args(["oops"], "oops")
    with pytest.raises(ValueError, match="invalid JSON"):
        parse_run_args([], "{bad")


async def test_commands_and_refusals(make_service: ServiceFactory) -> None:
    svc = await make_service(run_worker=False)
    router = CommandRouter(svc, admins=["@admin:localhost"], prefix="!")
    assert await router.handle_text("hello there", ALICE) is None
    assert await router.handle_text("!!!", ALICE) is None

    r = await router.handle_text("!run demo.count steps=3 delay_ms=1", ALICE)
    assert r is not None and r.ok and r.job is not None
    jid = r.job.id
    assert r.text == f"Started #{jid} demo.count."
    assert r.job.owner == ALICE.user_id and r.job.room == ALICE.room

    r = await router.handle_text(f"!pause {jid}", BOB)
    assert r is not None and not r.ok and "may not pause job" in r.text
    assert (await svc.get(jid or 0)).status == "pending"  # nothing changed

    r = await router.handle_text(f"!pause {jid}", MOD)
    assert r is not None and r.ok and r.text == f"Paused #{jid}."
    r = await router.handle_text(f"!pause {jid}", ALICE)
    assert r is not None and not r.ok and r.text == f"Job #{jid} is paused; it can't be paused"
    admin = Actor(user_id="@admin:localhost", platform="matrix")
    r = await router.handle_text(f"!resume {jid}", admin)
    assert r is not None and r.ok

    for text, expected in [
        ("!status 999", "No job #999"),
        ("!pause abc", "Usage: !pause <id>"),
        ("!pause", "Usage: !pause <id>"),
        ("!run", "Usage: !run <type>"),
        ("!run nope.nope", "Unknown job type 'nope.nope'"),
        ("!run demo.count steps=zero", "Invalid payload for 'demo.count': steps"),
        ("!run demo.count {bad json", "invalid JSON"),
        ("!frobnicate", "Unknown command 'frobnicate'"),
        ("!jobs sideways", "Usage: !jobs"),
    ]:
        r = await router.handle_text(text, ALICE)
        assert r is not None and not r.ok and expected in r.text, (text, r.text)
        assert "Traceback" not in r.text
    assert (await svc.stats())["total"] == 1  # the bad runs stored nothing

    r = await router.handle_text("!help", BOB)
    assert r is not None and r.ok and "!pause <id>" in r.text and "demo.count" in r.text
    r = await router.handle_text("!jobs all", BOB)
    assert r is not None and r.ok and f"#{jid}" in r.text
    r = await router.handle_text(f"!status {jid}", BOB)
    assert r is not None and r.ok and "pending" in r.text and "Recent activity" in r.text


def test_rendering_escapes_user_text() -> None:
    ev = JobProgressEvent(
        id=7,
        type="job",
        status="running",
        seq=1,
        timestamp=0.0,
        name="<b>evil</b> @room",
        message="<script>alert(1)</script> @everyone",
        current=3,
        total=10,
        percentage=30.0,
    )
    html = render_html(ev)
    assert "<b>evil</b>" not in html and "&lt;b&gt;evil&lt;/b&gt;" in html
    assert "<script>" not in html
    assert "@room" not in html and "@everyone" not in html
    plain = render_plain(ev)
    assert "#7" in plain and "running" in plain and "30%" in plain
    assert "@room" not in plain and "@everyone" not in plain


async def test_console_adapter_shows_lines_and_takes_commands(make_service: ServiceFactory) -> None:
    svc = await make_service()
    out = io.StringIO()
    router = CommandRouter(svc, prefix="")
    console = ConsoleAdapter(svc, router, stream=out, stdin=io.StringIO(), interactive=False)
    await console.start()
    try:
        reply = await console.handle_line("run demo.count steps=10 delay_ms=40")
        assert reply.startswith("Started #")
        jid = int(reply.split("#")[1].split()[0])
        await svc.wait_for(jid, timeout=10)
        await wait_until(lambda: _contains(out, f"#{jid} demo.count · completed"))
        text = out.getvalue()
        # A free worker slot took the job as it was stored: its first line says it runs (it never waited).
        first = next(line for line in text.splitlines() if f"#{jid} demo.count" in line)
        assert f"#{jid} demo.count · running" in first
        assert "▓" in text  # a progress bar was drawn
        assert "No job #404" in await console.handle_line("pause 404")
        assert "Usage" in await console.handle_line("pause x")
    finally:
        await console.stop()


async def _contains(buf: io.StringIO, text: str) -> bool:
    return text in buf.getvalue()
