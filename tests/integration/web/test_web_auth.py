"""The web page's HTTP side without a browser: login cookie, Origin checks, CSP, and the submit route."""

from __future__ import annotations

import re
from typing import Any

import aiohttp

from bot.web import COOKIE, CSP
from tests.integration.http_helpers import ApiServer, ServerFactory, wait_for

pytest_plugins = ["tests.integration.http_fixtures"]


async def login(srv: ApiServer, token: str | None = None, **headers: str) -> aiohttp.ClientResponse:
    """POST the login form; returns the (unfollowed) response."""
    async with srv.session.post(
        srv.url + "/login",
        data={"token": token if token is not None else srv.token, "next": "/jobs/1"},
        headers={"Origin": srv.url, **headers},
        allow_redirects=False,
    ) as resp:
        await resp.read()
        return resp


def cookie_of(resp: aiohttp.ClientResponse) -> str:
    return resp.cookies[COOKIE].value


async def call(
    srv: ApiServer, method: str, path: str, cookie: str | None, body: Any = None, **headers: str
) -> tuple[int, Any, aiohttp.ClientResponse]:
    """A request with the session cookie (no bearer), as the page sends it."""
    h = dict(headers)
    if cookie is not None:
        h["Cookie"] = f"{COOKIE}={cookie}"
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as s:
        async with s.request(method, srv.url + path, json=body, headers=h, allow_redirects=False) as resp:
            raw = await resp.read()
            ctype = resp.headers.get("Content-Type", "")
            data: Any = raw.decode()
            if ctype.startswith("application/json") and raw:
                data = await resp.json()
            return resp.status, data, resp


async def test_pages_without_a_session_show_login_and_say_nothing_about_jobs(server: ApiServer) -> None:
    await server.post("/v1/jobs", {"type": "demo.count", "payload": {"steps": 1}, "name": "hush"})
    for path in ("/", "/jobs/1"):
        status, text, resp = await call(server, "GET", path, None)
        assert status == 401 and 'name="token"' in text and "hush" not in text
        assert resp.headers["Content-Security-Policy"] == CSP
    for path in ("/web/state", "/web/jobs/1", "/v1/jobs", "/v1/events"):
        status, _, _ = await call(server, "GET", path, None, Accept="text/event-stream")
        assert status == 401, path
    status, _, _ = await call(server, "GET", "/", "123.forged")
    assert status == 401


async def test_login_sets_an_httponly_samesite_strict_cookie_and_secure_when_configured(
    server: ApiServer,
) -> None:
    bad = await login(server, "wrong")
    assert bad.status == 401 and COOKIE not in bad.cookies
    ok = await login(server)
    assert ok.status == 303 and ok.headers["Location"] == "/jobs/1"
    raw = ok.headers["Set-Cookie"]
    assert "HttpOnly" in raw and "SameSite=Strict" in raw and "Secure" not in raw and "Path=/" in raw
    assert server.token not in raw
    server.api.settings = server.api.settings.model_copy(update={"secure_cookies": True})
    secure = await login(server)
    assert "Secure" in secure.headers["Set-Cookie"]
    # An open redirect is not possible through "next".
    async with server.session.post(
        server.url + "/login",
        data={"token": server.token, "next": "//evil.example/x"},
        headers={"Origin": server.url},
        allow_redirects=False,
    ) as resp:
        assert resp.headers["Location"] == "/"


async def test_login_from_another_origin_is_refused(server: ApiServer) -> None:
    resp = await login(server, Origin="http://evil.example")
    assert resp.status == 403 and COOKIE not in resp.cookies


async def test_the_cookie_authorizes_pages_streams_and_actions_and_state_changes_need_origin(
    server: ApiServer,
) -> None:
    cookie = cookie_of(await login(server))
    status, text, resp = await call(server, "GET", "/", cookie)
    assert status == 200 and 'id="entry-tpl"' in text
    assert resp.headers["Content-Security-Policy"] == CSP
    # Only the page's own files: no inline script or style anywhere in the page.
    assert not re.search(r"<script(?![^>]*\b(src=\"/static/|type=\"application/json\"))", text)
    assert "style=" not in text and "<style" not in text

    job = await server.post("/v1/jobs", {"type": "demo.count", "payload": {"steps": 500, "delay_ms": 50}})
    jid = job["id"]
    await wait_for(lambda: server.service.get(jid), timeout=10)
    status, _, _ = await call(server, "GET", f"/v1/jobs/{jid}", cookie)
    assert status == 200
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as s:
        async with s.get(
            server.url + "/v1/events", headers={"Cookie": f"{COOKIE}={cookie}", "Accept": "text/event-stream"}
        ) as resp:
            assert resp.status == 200
            line = await resp.content.readline()
            assert line.startswith(b"retry:") or line.startswith(b"id:")

    # No Origin, or a foreign one: refused, nothing changes.
    for headers in ({}, {"Origin": "http://evil.example"}, {"Origin": "null"}):
        status, data, _ = await call(server, "POST", f"/v1/jobs/{jid}/pause", cookie, {}, **headers)
        assert status == 403 and "Origin" in data["detail"]
    assert (await server.get(f"/v1/jobs/{jid}"))["control"] == "run"
    status, data, _ = await call(server, "POST", f"/v1/jobs/{jid}/pause", cookie, {}, Origin=server.url)
    assert status == 200 and data["action"] == "pause"
    # The JSON API keeps the bearer header (and needs no Origin).
    assert (await server.post(f"/v1/jobs/{jid}/cancel"))["action"] == "cancel"


async def test_logout_forgets_the_cookie(server: ApiServer) -> None:
    cookie = cookie_of(await login(server))
    status, _, resp = await call(server, "POST", "/logout", cookie, Origin=server.url)
    assert status == 303 and resp.headers["Location"] == "/login"
    assert f'{COOKIE}=""' in resp.headers["Set-Cookie"] or "Max-Age=0" in resp.headers["Set-Cookie"]


async def test_submit_route_reports_errors_per_field_and_stores_nothing(server: ApiServer) -> None:
    cookie = cookie_of(await login(server))
    post = lambda body: call(server, "POST", "/web/submit", cookie, body, Origin=server.url)  # noqa: E731
    cases = [
        ({"type": "demo.count", "args": "steps=0 delay_ms=x"}, {"steps", "delay_ms"}),
        ({"type": "demo.count", "args": "bogus=1"}, {"bogus"}),
        ({"type": "demo.count", "args": "{not json"}, {"payload"}),
        ({"type": "demo.count", "args": "steps"}, {"payload"}),
        ({"type": "nope", "args": ""}, {"type"}),
        ({"type": "", "args": ""}, {"type"}),
        ({"type": "demo.count", "args": "", "name": "x" * 301}, {"name"}),
    ]
    for body, fields in cases:
        status, data, _ = await post(body)
        assert status == 422, body
        assert set(data["fields"]) == fields, (body, data)
    assert (await server.get("/v1/jobs?status=all"))["count"] == 0
    status, data, _ = await post({"type": "demo.count", "args": '{"steps": 2, "delay_ms": 1}', "name": "ok"})
    assert status == 201 and data["event"]["name"] == "ok" and data["event"]["type"] == "job"
    job = await server.get(f"/v1/jobs/{data['id']}")
    assert job["owner"] == "web" and job["payload"]["steps"] == 2


async def test_state_route_gives_current_events_for_a_reconnecting_page(make_server: ServerFactory) -> None:
    srv = await make_server()
    cookie = cookie_of(await login(srv))
    done = await srv.post("/v1/jobs", {"type": "demo.count", "payload": {"steps": 1, "delay_ms": 1}})
    await wait_for(lambda: srv.service.get(done["id"]), timeout=10)

    async def finished() -> bool:
        return (await srv.service.get(done["id"])).status == "completed"

    await wait_for(finished, timeout=20)
    status, data, _ = await call(srv, "GET", f"/web/state?ids={done['id']},abc,999999", cookie)
    assert status == 200
    (ev,) = [e for e in data["events"] if e["id"] == done["id"]]
    assert ev["status"] == "completed" and ev["seq"] > 0 and ev["createdAt"] > 0
