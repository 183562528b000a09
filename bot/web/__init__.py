"""The web jobs page: server-rendered HTML plus a small script, served by the HTTP API.

:func:`install` adds the page's routes and its middleware to the API's aiohttp application. The page uses
the API itself: the jobs list follows ``GET /v1/events`` (SSE) with ``EventSource``, and the buttons post to
``/v1/jobs/{id}/<action>``. A browser authenticates with a session cookie instead of the bearer header: the
login page takes the API token once and sets an HttpOnly, SameSite=Strict cookie signed with a key derived
from the token (so rotating the token signs everyone out, and a service restart signs nobody out).
Cookie-authenticated requests that change state must also carry a same-origin ``Origin`` header.

Everything a job supplies (names, messages, payloads, log lines) is rendered as text: the server escapes
every template value, the script writes only ``textContent``, and the Content-Security-Policy allows only
the page's own script and style.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import json
import shlex
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from string import Template
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from aiohttp import web

from adapters.commands import parse_job_id, parse_run_args
from core.errors import JobNotFound, PayloadError, UnknownJobType
from core.events import next_seq
from core.lifecycle import ACTION_FROM
from core.models import ACTIVE_STATUSES, TERMINAL_STATUSES, Job
from core.serialize import activity_to_dict, job_to_dict
from core.service import ProgressService

if TYPE_CHECKING:
    from bot.http_api import HttpApi

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: The request key the web middleware sets when a session cookie (or a public page) authorizes a request;
#: the API's own bearer check accepts it.
WEB_AUTH: Any = (
    web.RequestKey("progressbot.web_auth", bool) if hasattr(web, "RequestKey") else "progressbot.web_auth"
)
#: The session cookie's name.
COOKIE = "progressbot_session"
#: How long a login lasts.
SESSION_SECONDS = 30 * 86400
#: Finished jobs the page lists below the active ones.
RECENT_FINISHED = 100
#: Activity entries the job page shows.
ACTIVITY_ON_PAGE = 100
#: Ids one ``/web/state`` request may ask about.
MAX_STATE_IDS = 1000

#: Only the page's own script and style; no inline code, no framing, forms post only to us.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
}
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_HERE = Path(__file__).parent
STATIC_DIR = _HERE / "static"
_TEMPLATES = _HERE / "templates"


# ------------------------------------------------------------------ rendering
#: The page's own paths; the rest (``/v1/``, ``/healthz``, ``/mcp``) is the API's, with its bearer token.
WEB_PREFIXES = ("/jobs/", "/web/", "/static/")
WEB_PATHS = frozenset({"/", "/login", "/logout"})


def is_web_path(path: str) -> bool:
    """Whether ``path`` belongs to the web page (session cookie) rather than the API (bearer token)."""
    return path in WEB_PATHS or path.startswith(WEB_PREFIXES)


class Safe(str):
    """Markup that is already escaped (built by :func:`render`); every other value is escaped."""


def _template(name: str) -> Template:
    return Template((_TEMPLATES / name).read_text(encoding="utf-8"))


def render(template: str, /, **values: Any) -> Safe:
    """Fill ``template`` (a file in templates/).

    Values are HTML-escaped unless they are :class:`Safe`; None is empty.
    """
    out = {
        k: v if isinstance(v, Safe) else html.escape("" if v is None else str(v), quote=True)
        for k, v in values.items()
    }
    return Safe(_template(template).substitute(out))


def json_data(data: Any) -> Safe:
    """JSON for a ``<script type="application/json">`` block: ``<``, ``>`` and ``&`` are escaped so no
    value can close the element (the block is data, never executed)."""
    text = json.dumps(data, default=str, separators=(",", ":"), ensure_ascii=False)
    return Safe(text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026"))


def _page(title: str, body: Safe, *, data: Any, status: int = 200) -> web.Response:
    return web.Response(
        text=render("base.html", title=title, body=body, data=json_data(data)),
        status=status,
        content_type="text/html",
        charset="utf-8",
        headers={"Cache-Control": "no-store"},
    )


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda d: json.dumps(d, default=str))


def _redirect(location: str) -> web.Response:
    # 303: the browser follows a form POST with a GET.
    return web.Response(status=303, headers={"Location": location})


def _epoch(dt: datetime | None) -> float | None:
    return None if dt is None else dt.timestamp()


# ----------------------------------------------------------------------- auth
@dataclass(frozen=True, slots=True)
class Sessions:
    """Stateless, signed session cookies: ``<issued>.<hmac>``, keyed on the API token."""

    token: str

    @property
    def _key(self) -> bytes:
        return hashlib.sha256(b"progressbot web session\0" + self.token.encode()).digest()

    def check_token(self, given: str) -> bool:
        """Whether ``given`` is the API token (constant time, also in its length)."""
        a = hashlib.sha256(given.encode()).digest()
        return bool(self.token) and hmac.compare_digest(a, hashlib.sha256(self.token.encode()).digest())

    def issue(self, now: float | None = None) -> str:
        """A new cookie value."""
        issued = str(int(time.time() if now is None else now))
        return f"{issued}.{self._sign(issued)}"

    def valid(self, value: str | None, now: float | None = None) -> bool:
        """Whether ``value`` is a cookie we issued that has not expired."""
        if not value or not self.token:
            return False
        issued, _, sig = value.partition(".")
        if not issued.isdigit() or not hmac.compare_digest(sig, self._sign(issued)):
            return False
        age = (time.time() if now is None else now) - int(issued)
        return -300 <= age <= SESSION_SECONDS

    def _sign(self, issued: str) -> str:
        return hmac.new(self._key, f"web:{issued}".encode(), hashlib.sha256).hexdigest()


def same_origin(request: web.Request) -> bool:
    """Whether the request's ``Origin`` names this server (what a cross-site form or script cannot fake)."""
    origin = request.headers.get("Origin")
    if not origin or origin == "null":
        return False
    return urlsplit(origin).netloc.lower() == request.host.lower()


def _local_path(raw: str | None) -> str:
    # Only redirect to our own pages after login ("//evil.example" is another host).
    if raw and raw.startswith("/") and not raw.startswith("//") and "\\" not in raw:
        return raw
    return "/"


# -------------------------------------------------------------------- the page
class WebUI:
    """The jobs page, the job page, login, and the few JSON routes the script needs beside ``/v1``."""

    def __init__(self, api: HttpApi) -> None:
        self.api = api
        token = api.settings.token
        self.sessions = Sessions(token.get_secret_value() if token is not None else "")

    @property
    def service(self) -> ProgressService:
        """The engine."""
        return self.api.service

    def install(self, app: web.Application) -> None:
        """Add the routes and the session middleware (outermost, so it runs before the bearer check)."""
        app.middlewares.insert(0, self.middleware)
        r = app.router
        r.add_get("/", self.jobs_page)
        r.add_get("/login", self.login_page)
        r.add_post("/login", self.login)
        r.add_post("/logout", self.logout)
        r.add_get("/jobs/{id}", self.job_page)
        r.add_get("/web/state", self.state)
        r.add_get("/web/jobs/{id}", self.job_json)
        r.add_post("/web/submit", self.submit)
        r.add_static("/static/", STATIC_DIR, append_version=False)

    # ------------------------------------------------------------ middleware
    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Authorize by session cookie, check ``Origin`` on state changes, add the security headers."""
        path = request.path
        has_session = self.sessions.valid(request.cookies.get(COOKIE))
        bearer = "Authorization" in request.headers
        web_route = is_web_path(path)
        if web_route:
            if path == "/login" or path.startswith("/static/"):
                request[WEB_AUTH] = True
            elif has_session:
                request[WEB_AUTH] = True
            elif request.method == "GET" and (path == "/" or path.startswith("/jobs/")):
                # Without the cookie the page is the login form (and says nothing about jobs).
                return self._secure(self._login_response(request, status=401, next_path=request.path_qs))
            else:
                return self._secure(_json({"error": "unauthorized", "detail": "log in first"}, 401))
        elif has_session and not bearer:
            request[WEB_AUTH] = True
        cookie_auth = has_session and not bearer
        if request.method not in _SAFE_METHODS and (cookie_auth or path == "/login"):
            if not same_origin(request):
                detail = "this request must come from the progressbot page (Origin mismatch)"
                return self._secure(_json({"error": "forbidden", "detail": detail}, 403))
        resp = await handler(request)
        return self._secure(resp) if web_route else resp

    @staticmethod
    def _secure(resp: web.StreamResponse) -> web.StreamResponse:
        if not resp.prepared:
            for k, v in SECURITY_HEADERS.items():
                resp.headers.setdefault(k, v)
        return resp

    def _secure_cookie(self, request: web.Request) -> bool:
        return request.secure or bool(getattr(self.api.settings, "secure_cookies", False))

    # ----------------------------------------------------------------- login
    def _login_response(
        self, request: web.Request, *, status: int = 200, next_path: str = "/", error: str = ""
    ) -> web.Response:
        body = render("login.html", next=_local_path(next_path), error=error)
        return _page("Log in · progressbot", body, data={"page": "login"}, status=status)

    async def login_page(self, request: web.Request) -> web.Response:
        """The login form."""
        return self._login_response(request, next_path=request.query.get("next", "/"))

    async def login(self, request: web.Request) -> web.Response:
        """Check the token once and set the session cookie."""
        form = await request.post()
        token = str(form.get("token", "")).strip()
        nxt = _local_path(str(form.get("next", "/")))
        if not self.sessions.check_token(token):
            return self._login_response(request, status=401, next_path=nxt, error="That token is not valid.")
        resp = _redirect(nxt)
        resp.set_cookie(
            COOKIE,
            self.sessions.issue(),
            max_age=SESSION_SECONDS,
            path="/",
            httponly=True,
            samesite="Strict",
            secure=self._secure_cookie(request),
        )
        return resp

    async def logout(self, request: web.Request) -> web.Response:
        """Forget the session cookie."""
        resp = _redirect("/login")
        resp.del_cookie(COOKIE, path="/")
        return resp

    # ------------------------------------------------------------------ data
    async def _events_for(self, jobs: Iterable[Job]) -> list[dict[str, Any]]:
        """The stream's event shape for these jobs and their batches (plus ``createdAt`` for the age)."""
        api = self.api
        out: list[dict[str, Any]] = []
        batch_ids: set[int] = set()
        for j in jobs:
            d = api._job_event(j).to_dict()
            d["createdAt"] = _epoch(j.created_at)
            out.append(d)
            if j.batch_id is not None:
                batch_ids.add(j.batch_id)
        for bid in sorted(batch_ids):
            try:
                summary = await self.service.batch_summary(bid)
            except JobNotFound:
                continue
            d = api._batch_event(summary).to_dict()
            d["createdAt"] = _epoch(summary.batch.created_at)
            out.append(d)
        return out

    async def _listed_jobs(self) -> list[Job]:
        svc = self.service
        active = await svc.list_jobs(statuses=[str(s) for s in ACTIVE_STATUSES], limit=1000)
        done = await svc.list_jobs(statuses=[str(s) for s in TERMINAL_STATUSES], limit=RECENT_FINISHED)
        jobs: list[Job] = [*active, *done]
        # A listed batch shows all of its jobs when expanded, finished or not.
        seen = {j.id for j in jobs}
        for bid in sorted({j.batch_id for j in jobs if j.batch_id is not None}):
            for j in await svc.list_jobs(batch_id=bid, limit=10_000):
                if j.id not in seen:
                    seen.add(j.id)
                    jobs.append(j)
        return jobs

    def _common(self) -> dict[str, Any]:
        return {
            "legal": {a: sorted(str(s) for s in froms) for a, froms in ACTION_FROM.items()},
            "terminal": sorted(str(s) for s in TERMINAL_STATUSES),
        }

    # ----------------------------------------------------------------- pages
    async def jobs_page(self, request: web.Request) -> web.Response:
        """The jobs list: the shell and the current state; the script fills it and follows the stream."""
        # A seq taken before reading: the stream resumes after it, so nothing emitted during the reads
        # is missed (the replay log sends the newest state of whatever changed since).
        after = next_seq()
        events = await self._events_for(await self._listed_jobs())
        specs = self.service.registry.specs()
        options = Safe(
            "".join(
                render("option.html", value=s.name, label=f"{s.name} — {s.description}".rstrip(" —"))
                for s in specs
            )
        )
        type_options = Safe("".join(render("option.html", value=s.name, label=s.name) for s in specs))
        hints = {s.name: _payload_hint(s.payload_model) for s in specs}
        body = render(
            "jobs.html",
            type_options=options,
            filter_type_options=type_options,
            thead=render("thead.html"),
            entry=_entry(),
        )
        data = {"page": "jobs", "after": after, "events": events, "hints": hints, **self._common()}
        return _page("Jobs · progressbot", body, data=data)

    async def job_page(self, request: web.Request) -> web.Response:
        """One job: progress, activity log, payload, result or error, attempts and timestamps (live)."""
        jid = parse_job_id(request.match_info["id"])
        if not isinstance(jid, int):
            return self._not_found(request.match_info["id"])
        after = next_seq()
        try:
            job = await self.service.get(jid)
        except JobNotFound:
            return self._not_found(str(jid))
        detail = await self._detail(job)
        (event,) = [e for e in await self._events_for([job]) if e["type"] == "job"]
        body = render(
            "job.html",
            id=job.id,
            name=job.name or job.type,
            type=job.type,
            owner=job.owner or "—",
            room=job.room or "—",
            batch=f"batch #{job.batch_id}" if job.batch_id else "—",
            payload=json.dumps(job.payload, indent=2, ensure_ascii=False, default=str),
            thead=render("thead.html"),
            entry=_entry(),
        )
        data = {"page": "job", "after": after, "event": event, "job": detail, **self._common()}
        return _page(f"#{job.id} {job.name or job.type} · progressbot", body, data=data)

    def _not_found(self, raw: str) -> web.Response:
        body = render("notfound.html", id=raw[:40])
        return _page("Not found · progressbot", body, data={"page": "notfound"}, status=404)

    async def _detail(self, job: Job) -> dict[str, Any]:
        d = job_to_dict(job)
        entries = await self.service.activity(job.id or 0, ACTIVITY_ON_PAGE)
        d["activity"] = [activity_to_dict(a) for a in entries]
        return d

    # ------------------------------------------------------------ JSON routes
    async def state(self, request: web.Request) -> web.Response:
        """Current events of the active jobs and of ``?ids=1,2``: what a reconnecting page reconciles with
        (a restarted service has no replay log yet)."""
        ids: list[int] = []
        for part in request.query.get("ids", "").split(",")[:MAX_STATE_IDS]:
            if part.strip().isdigit():
                ids.append(int(part))
        svc = self.service
        jobs = {j.id: j for j in await svc.list_jobs(statuses=[str(s) for s in ACTIVE_STATUSES], limit=1000)}
        for jid in ids:
            if jid not in jobs:
                try:
                    jobs[jid] = await svc.get(jid)
                except JobNotFound:
                    continue
        return _json({"events": await self._events_for(jobs.values())})

    async def job_json(self, request: web.Request) -> web.Response:
        """A job with its last :data:`ACTIVITY_ON_PAGE` activity entries (the job page refreshes from it)."""
        jid = parse_job_id(request.match_info["id"])
        try:
            if not isinstance(jid, int):
                raise JobNotFound(request.match_info["id"][:40])
            job = await self.service.get(jid)
        except JobNotFound as exc:
            return _json({"error": "not_found", "detail": str(exc)}, 404)
        return _json(await self._detail(job))

    async def submit(self, request: web.Request) -> web.Response:
        """The submit form: ``{type, args, name}``; ``args`` is ``key=value ...`` or a JSON object.

        A refusal is 422 with ``{"fields": {field: message}}`` (payload fields by their own name) and stores
        nothing; success is 201 with the new job's event, so the page lists it at once.
        """
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            return _json({"fields": {"form": "the form could not be read"}}, 400)
        if not isinstance(body, dict):
            return _json({"fields": {"form": "the form could not be read"}}, 400)
        fields: dict[str, str] = {}
        job_type = str(body.get("type") or "").strip()
        raw_args = str(body.get("args") or "")
        name = str(body.get("name") or "").strip() or None
        if not job_type:
            fields["type"] = "choose a job type"
        if name is not None and len(name) > 300:
            fields["name"] = "at most 300 characters"
        payload: dict[str, Any] = {}
        try:
            stripped = raw_args.strip()
            payload = parse_run_args([] if stripped.startswith("{") else shlex.split(raw_args), raw_args)
        except ValueError as exc:
            fields["payload"] = str(exc)
        if fields:
            return _json({"fields": fields}, 422)
        try:
            job = await self.service.submit(job_type, payload, name=name, owner="web")
        except UnknownJobType as exc:
            return _json({"fields": {"type": str(exc)}}, 422)
        except PayloadError as exc:
            return _json({"fields": _payload_fields(exc.problems)}, 422)
        (event,) = [e for e in await self._events_for([job]) if e["type"] == "job"]
        return _json({"id": job.id, "event": event}, 201)


def _payload_fields(problems: list[str]) -> dict[str, str]:
    """``["steps: Input should be ...", ...]`` -> ``{"steps": "Input should be ..."}`` (one per field)."""
    out: dict[str, str] = {}
    for line in problems:
        loc, sep, msg = line.partition(": ")
        key = loc if sep and loc and loc != "payload" else "payload"
        out[key] = f"{out[key]}; {msg or line}" if key in out else (msg or line)
    return out


def _payload_hint(model: Any) -> str:
    """``steps=20 delay_ms=500`` from a payload model's defaults (the submit form's placeholder)."""
    if model is None:
        return "key=value ... or {JSON}"
    parts = []
    for fname, f in model.model_fields.items():
        default = f.get_default(call_default_factory=False)
        parts.append(f"{fname}={json.dumps(default) if default is not None else '…'}")
    return " ".join(parts) or "(no payload)"


def _entry() -> Safe:
    """The ``<template>`` of one list entry; the script clones it for each job or batch."""
    return render("entry.html")


def install(app: web.Application, api: HttpApi) -> WebUI:
    """Serve the web page from ``api``'s application."""
    ui = WebUI(api)
    ui.install(app)
    return ui


__all__ = ["COOKIE", "CSP", "WEB_AUTH", "Safe", "Sessions", "WebUI", "install", "render", "same_origin"]
