"""Shared pieces of the browser tests (and bench/web.py): a real ``progressbot run`` process with the HTTP
API, and headless Debian Chromium driven by Selenium.

The service runs as a subprocess so that a test can stop and restart it under a page that stays open,
and so that the synchronous Selenium calls never block its event loop.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
PROGRESSBOT = [sys.executable, "-m", "bot.cli"]
ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")

#: Counts alert/confirm/prompt calls instead of opening dialogs; runs before any page script.
DIALOG_COUNTER = """
window.__dialogs = 0;
for (const name of ['alert', 'confirm', 'prompt']) {
  window[name] = function () { window.__dialogs += 1; return null; };
}
"""


def browser_available() -> bool:
    """Whether Debian's chromium and chromedriver are installed.

    Under CI (``CI=true``) their absence is an error rather than a skip: the test command installs them,
    so a CI run without them would silently test less.
    """
    found = os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)
    if not found and os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        raise RuntimeError(f"CI needs {CHROMIUM} and {CHROMEDRIVER} (Debian's chromium, chromium-driver)")
    return found


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class WebService:
    """``progressbot run`` with ``[http]`` on a fixed loopback port, a fresh SQLite database and a token."""

    def __init__(self, tmp: Path, *, concurrency: int = 8, min_interval_ms: int = 100) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.token = secrets.token_urlsafe(24)
        self.config = tmp / "config.toml"
        self.log = tmp / "service.log"
        self.config.write_text(
            "\n".join(
                [
                    'log_level = "WARNING"',
                    "[database]",
                    f'url = "sqlite:///{tmp}/pb.db"',
                    "[worker]",
                    f"concurrency = {concurrency}",
                    "shutdown_grace_seconds = 5.0",
                    "[progress]",
                    f"min_interval_ms = {min_interval_ms}",
                    "poll_interval_ms = 100",
                    "[console]",
                    "enabled = false",
                    "[http]",
                    f'listen = "127.0.0.1:{self.port}"',
                    "keepalive_seconds = 5.0",
                ]
            )
            + "\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The base URL."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """The environment of the service and of CLI calls."""
        return dict(
            os.environ,
            PROGRESSBOT_CONFIG=str(self.config),
            PROGRESSBOT_HTTP__TOKEN=self.token,
            PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        )

    def start(self) -> None:
        """Start the service and wait until the API answers."""
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(
                [*PROGRESSBOT, "run"],
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=ROOT,
            )
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=2):
                    return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the service exited: {self.log.read_text()[-2000:]}") from None
                if time.monotonic() > deadline:
                    raise RuntimeError("the service did not start") from None
                time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM (graceful: running jobs are requeued from their checkpoints) and wait."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def cli(self, *args: str) -> Any:
        """Run a ``progressbot`` command with ``--json`` and return its decoded output."""
        res = subprocess.run(
            [*PROGRESSBOT, *args, "--json"],
            capture_output=True,
            text=True,
            env=self.env,
            cwd=ROOT,
            timeout=60,
        )
        if res.returncode != 0:
            raise AssertionError(f"progressbot {args} exited {res.returncode}: {res.stderr}")
        return json.loads(res.stdout)

    def submit(self, *args: str) -> int:
        """``progressbot submit ...`` from the CLI; returns the new job's id."""
        return int(self.cli("submit", *args)["id"])

    def api(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None) -> Any:
        """A bearer-authenticated JSON API call; returns ``(status, decoded body)``."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                raw = resp.read()
                return resp.status, (json.loads(raw) if raw else None)
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            return exc.code, (json.loads(raw) if raw else None)

    def job(self, job_id: int) -> dict[str, Any]:
        """``GET /v1/jobs/{id}``."""
        status, data = self.api("GET", f"/v1/jobs/{job_id}")
        assert status == 200, (status, data)
        return dict(data)

    def count_jobs(self) -> int:
        """How many jobs exist."""
        _, data = self.api("GET", "/v1/jobs?status=all&limit=1000")
        return int(data["count"])


def make_browser(width: int = 1280, height: int = 900) -> webdriver.Chrome:
    """Headless Debian Chromium; every new document first gets the dialog counter."""
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",  # needed as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-extensions",
        "--disable-sync",
        "--disable-default-apps",
        "--no-first-run",
        "--mute-audio",
        f"--window-size={width},{height}",
    ):
        opts.add_argument(arg)
    # A real dialog would block the session; ours are counted by DIALOG_COUNTER, and any other is left open
    # for the test to find.
    opts.set_capability("unhandledPromptBehavior", "ignore")
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": DIALOG_COUNTER})
    return driver


def wait(driver: webdriver.Chrome, cond: Callable[[webdriver.Chrome], T], timeout: float = 30.0) -> T:
    """Poll ``cond(driver)`` until it is truthy (Selenium's wait, ignoring stale elements)."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException

    return WebDriverWait(
        driver,
        timeout,
        poll_frequency=0.1,
        ignored_exceptions=(StaleElementReferenceException, NoSuchElementException),
    ).until(cond)


def login(driver: webdriver.Chrome, svc: WebService, path: str = "/") -> None:
    """Open ``path`` and sign in through the login form."""
    driver.get(svc.url + path)
    if driver.find_elements(By.ID, "token"):
        driver.find_element(By.ID, "token").send_keys(svc.token)
        driver.find_element(By.CSS_SELECTOR, "form[action='/login'] button").click()
    wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "table.jobs"))


def row(driver: webdriver.Chrome, key: str) -> Any:
    """The row of job ``j12`` or batch ``b3`` (raises NoSuchElementException when absent)."""
    return driver.find_element(By.CSS_SELECTOR, f"tr[data-key='{key}']")


def row_state(driver: webdriver.Chrome, key: str) -> dict[str, Any]:
    """What a row shows: status, aria-valuenow, and the text of each field."""
    return dict(
        driver.execute_script(
            """
            const r = document.querySelector(`tr[data-key="${arguments[0]}"]`);
            if (!r) return null;
            const f = {};
            for (const el of r.querySelectorAll('[data-f]')) f[el.dataset.f] = el.textContent;
            const bar = r.querySelector('[role=progressbar]');
            const v = bar.getAttribute('aria-valuenow');
            return {status: r.dataset.status, value: v === null ? null : Number(v), fields: f,
                    visible: r.offsetParent !== null,
                    buttons: [...r.querySelectorAll('button[data-act]')].filter(b => !b.hidden)
                               .map(b => b.dataset.act)};
            """,
            key,
        )
        or {}
    )


def dialogs(driver: webdriver.Chrome) -> int:
    """How many alert/confirm/prompt calls the page made."""
    return int(driver.execute_script("return window.__dialogs;"))
