"""The web jobs page in a real browser (headless Debian Chromium via Selenium) against ``progressbot run``.

One service and one browser for the module; each test signs in (or out) as it needs.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from tests.integration.web_helpers import (
    ROOT,
    WebService,
    browser_available,
    dialogs,
    login,
    row,
    row_state,
    wait,
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.browser,
    pytest.mark.skipif(not browser_available(), reason="needs Debian's chromium and chromium-driver"),
]




@pytest.fixture
def page(driver, svc: WebService):  # type: ignore[no-untyped-def]
    """The browser, signed in, on the jobs page."""
    driver.set_window_size(1280, 900)
    login(driver, svc)
    return driver


def test_without_the_cookie_the_page_is_login_and_the_stream_is_401(driver, svc: WebService) -> None:
    svc.submit("demo.count", "steps=2", "delay_ms=10", "--name", "secret-name")
    driver.delete_all_cookies()
    driver.get(svc.url + "/")
    assert driver.find_element(By.ID, "token").get_attribute("type") == "password"
    assert "secret-name" not in driver.page_source
    assert not driver.find_elements(By.CSS_SELECTOR, "table.jobs")
    # The stream, from the page and from outside, without the cookie or a bearer token.
    status = driver.execute_async_script(
        "fetch('/v1/events', {headers: {Accept: 'text/event-stream'}}).then(r => arguments[0](r.status));"
    )
    assert status == 401
    req = urllib.request.Request(svc.url + "/v1/events", headers={"Accept": "text/event-stream"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 401
    # A wrong token is refused readably; the right one signs in with an HttpOnly, SameSite=Strict cookie.
    driver.find_element(By.ID, "token").send_keys("not-the-token")
    driver.find_element(By.CSS_SELECTOR, "form[action='/login'] button").click()
    # The form posts and the answer replaces the page: wait for the new page's error text.
    wait(driver, lambda d: "not valid" in d.find_element(By.ID, "token-error").text)
    login(driver, svc)
    cookie = driver.get_cookie("progressbot_session")
    assert cookie is not None and cookie["httpOnly"] is True and cookie["sameSite"] == "Strict"
    assert cookie["secure"] is False  # plain http, secure_cookies unset
    assert svc.token not in cookie["value"]


def test_a_cli_job_appears_and_its_bar_advances_without_a_reload(page, svc: WebService) -> None:
    page.execute_script("window.__sameDocument = true;")
    jid = svc.submit("demo.count", "steps=40", "delay_ms=150", "--name", "cli job")
    wait(page, lambda d: row_state(d, f"j{jid}").get("value") is not None)
    first = row_state(page, f"j{jid}")
    assert first["fields"]["name"] == "cli job" and first["fields"]["type"] == "demo.count"
    # Updated in place: the same row element, and no rows added to or removed from the table meanwhile.
    page.execute_script(
        """window.__row = document.querySelector(`tr[data-key="${arguments[0]}"]`);
        window.__rowsChanged = 0;
        new MutationObserver((ms) => { for (const m of ms) window.__rowsChanged += m.addedNodes.length
          + m.removedNodes.length; }).observe(document.getElementById('active'), {childList: true});""",
        f"j{jid}",
    )
    wait(page, lambda d: row_state(d, f"j{jid}")["value"] >= first["value"] + 10)
    assert page.execute_script(
        "return document.querySelector(`tr[data-key='j${arguments[0]}']`) === window.__row"
        " && window.__rowsChanged === 0;",
        jid,
    )
    later = row_state(page, f"j{jid}")
    assert later["fields"]["percent"] == f"{later['value']}%"
    assert "/40" in later["fields"]["count"] and later["fields"]["message"].startswith("step ")
    wait(page, lambda d: row_state(d, f"j{jid}")["fields"]["eta"].startswith("ETA "))
    wait(page, lambda d: row_state(d, f"j{jid}")["status"] == "completed", timeout=60)
    assert row_state(page, f"j{jid}")["value"] == 100
    # Moved to the finished table, in place; still the same document.
    assert row(page, f"j{jid}").find_element(By.XPATH, "ancestor::table").get_attribute("id") == "done"
    assert page.execute_script("return window.__sameDocument;") is True


def test_pause_resume_cancel_from_the_page_and_illegal_buttons_are_absent(page, svc: WebService) -> None:
    jid = svc.submit("demo.count", "steps=400", "delay_ms=100", "--name", "controlled")
    key = f"j{jid}"
    wait(page, lambda d: row_state(d, key).get("status") == "running")
    assert row_state(page, key)["buttons"] == ["pause", "cancel"]
    pause = row(page, key).find_element(By.CSS_SELECTOR, "button[data-act=pause]")
    assert pause.get_attribute("aria-label") == f"Pause job #{jid}"

    row(page, key).find_element(By.CSS_SELECTOR, "button[data-act=pause]").click()
    wait(page, lambda d: row_state(d, key)["status"] == "paused")
    assert svc.job(jid)["status"] == "paused"
    assert row_state(page, key)["buttons"] == ["resume", "cancel"]

    row(page, key).find_element(By.CSS_SELECTOR, "button[data-act=resume]").click()
    wait(page, lambda d: row_state(d, key)["status"] == "running")
    assert svc.job(jid)["status"] in ("pending", "running")

    # A refused action is shown readably (forced here: the page never shows this button while running).
    hidden = row(page, key).find_element(By.CSS_SELECTOR, "button[data-act=retry]")
    assert not hidden.is_displayed()
    page.execute_script("arguments[0].click();", hidden)
    toast = wait(page, lambda d: d.find_element(By.CSS_SELECTOR, ".toast.error"))
    assert "can't be retried" in toast.text and f"#{jid}" in toast.text
    assert svc.job(jid)["status"] == "running"

    row(page, key).find_element(By.CSS_SELECTOR, "button[data-act=cancel]").click()
    wait(page, lambda d: row_state(d, key)["status"] == "cancelled")
    assert svc.job(jid)["status"] == "cancelled"
    assert row_state(page, key)["buttons"] == ["retry"]


def test_the_submit_form_shows_field_errors_and_stores_nothing_then_starts_a_job(
    page, svc: WebService
) -> None:
    page.find_element(By.CSS_SELECTOR, "#submit-box summary").click()
    Select(page.find_element(By.ID, "s-type")).select_by_value("demo.count")
    assert "steps=20" in (page.find_element(By.ID, "s-args").get_attribute("placeholder") or "")
    before = svc.count_jobs()
    args = page.find_element(By.ID, "s-args")
    args.clear()
    args.send_keys("steps=lots delay_ms=-5")
    page.find_element(By.ID, "s-go").click()
    wait(page, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#err-payload li")) == 2)
    errors = {
        li.get_attribute("data-field"): li.text
        for li in page.find_elements(By.CSS_SELECTOR, "#err-payload li")
    }
    assert set(errors) == {"steps", "delay_ms"}
    assert errors["steps"].startswith("steps: ") and "integer" in errors["steps"]
    assert args.get_attribute("aria-invalid") == "true"
    assert svc.count_jobs() == before

    args.clear()
    args.send_keys("steps=3 delay_ms=100")
    page.find_element(By.ID, "s-name").send_keys("from the form")
    page.find_element(By.ID, "s-go").click()
    fresh = wait(page, lambda d: d.find_element(By.CSS_SELECTOR, "tr.fresh"))
    key = fresh.get_attribute("data-key")
    assert row_state(page, key)["fields"]["name"] == "from the form"
    assert not page.find_elements(By.CSS_SELECTOR, "#err-payload li")
    assert svc.count_jobs() == before + 1
    wait(page, lambda d: row_state(d, key)["status"] == "completed")
    assert svc.job(int(key[1:]))["owner"] == "web"


def test_reload_mid_job_shows_it_where_it_is_and_keeps_updating(page, svc: WebService) -> None:
    jid = svc.submit("demo.count", "steps=60", "delay_ms=150", "--name", "reloaded")
    key = f"j{jid}"
    wait(page, lambda d: (row_state(d, key).get("value") or 0) >= 10)
    page.refresh()
    # Right after the reload the row is already where the job is, not at zero.
    wait(page, lambda d: row_state(d, key).get("value") is not None, timeout=10)
    shown = row_state(page, key)["value"]
    assert shown >= 10
    wait(page, lambda d: row_state(d, key)["value"] >= shown + 10)


def test_a_job_that_finishes_while_the_page_is_open_shows_a_toast(page, svc: WebService) -> None:
    ok = svc.submit("demo.count", "steps=3", "delay_ms=300", "--name", "toasty")
    bad = svc.submit("demo.count", "steps=5", "delay_ms=200", "fail_at=2", "--name", "doomed")
    toast = wait(
        page,
        lambda d: d.find_element(
            By.XPATH, f"//div[contains(concat(' ', @class, ' '), ' toast ')][contains(., '#{ok}')]"
        ),
    )
    assert "completed" in toast.text and "toasty" in toast.text
    assert toast.find_element(By.TAG_NAME, "a").get_attribute("href").endswith(f"/jobs/{ok}")
    failed = wait(
        page,
        lambda d: d.find_element(
            By.XPATH, f"//div[contains(concat(' ', @class, ' '), ' toast ')][contains(., '#{bad}')]"
        ),
    )
    assert "failed" in failed.text and "error" in (failed.get_attribute("class") or "")


XSS = ["<img src=x onerror=alert(1)>", '"><script>alert(2)</script>', "<svg/onload=alert(3)>"]


def test_xss_names_are_shown_literally_and_run_nothing(page, svc: WebService) -> None:
    ids = [svc.submit("demo.count", "steps=2", "delay_ms=50", "--name", name) for name in XSS]
    _, batch = svc.api(
        "POST", "/v1/batches", {"name": XSS[0], "jobs": [{"type": "demo.count", "payload": {"steps": 1}}]}
    )
    for jid, name in zip(ids, XSS, strict=True):
        wait(page, lambda d, jid=jid: row_state(d, f"j{jid}").get("fields"))
        assert row_state(page, f"j{jid}")["fields"]["name"] == name
    wait(page, lambda d: row_state(d, f"b{batch['id']}").get("fields", {}).get("name") == XSS[0])
    page.refresh()  # the server-side data path, too
    wait(page, lambda d: row_state(d, f"j{ids[1]}").get("fields", {}).get("name") == XSS[1])
    assert not page.find_elements(By.CSS_SELECTOR, "table.jobs img, table.jobs svg, table.jobs script")
    # The job page: title, payload and log.
    page.get(f"{svc.url}/jobs/{ids[0]}")
    assert XSS[0] in page.find_element(By.TAG_NAME, "h1").text
    assert XSS[0] in page.title
    assert dialogs(page) == 0
    with pytest.raises(NoAlertPresentException):
        _ = page.switch_to.alert.text


def test_a_batch_is_one_row_with_its_aggregate_and_expands_to_its_jobs(page, svc: WebService) -> None:
    jobs = [{"type": "demo.count", "payload": {"steps": 6, "delay_ms": 150 + 50 * i}} for i in range(3)]
    status, data = svc.api("POST", "/v1/batches", {"name": "three of a kind", "jobs": jobs})
    assert status == 201
    key = f"b{data['id']}"
    wait(page, lambda d: row_state(d, key).get("fields", {}).get("name") == "three of a kind")
    state = row_state(page, key)
    assert state["fields"]["type"] == "batch · 3 jobs"
    children = [f"j{j}" for j in data["jobs"]]
    assert all(not row_state(page, c)["visible"] for c in children)
    row(page, key).find_element(By.CSS_SELECTOR, "button.expand").click()
    assert all(row_state(page, c)["visible"] for c in children)
    assert (
        row(page, key).find_element(By.CSS_SELECTOR, "button.expand").get_attribute("aria-expanded") == "true"
    )
    wait(page, lambda d: row_state(d, key)["status"] == "completed", timeout=60)
    final = row_state(page, key)
    assert final["value"] == 100 and final["fields"]["count"] == "3/3 done"
    assert all(row_state(page, c)["status"] == "completed" for c in children)


def test_the_job_page_shows_progress_log_payload_error_attempts_and_times(page, svc: WebService) -> None:
    jid = svc.submit("demo.count", "steps=8", "delay_ms=250", "fail_at=6", "--name", "detailed")
    page.get(f"{svc.url}/jobs/{jid}")
    assert '"fail_at": 6' in page.find_element(By.ID, "d-payload").text
    wait(page, lambda d: row_state(d, f"j{jid}")["status"] == "running")
    wait(page, lambda d: row_state(d, f"j{jid}")["status"] == "failed", timeout=60)
    wait(page, lambda d: "failed at step 6" in d.find_element(By.ID, "d-error").text)
    assert page.find_element(By.ID, "d-attempts").text == "1 of 1"
    for field in ("d-created_at", "d-started_at", "d-finished_at"):
        assert page.find_element(By.ID, field).text not in ("", "—")
    wait(page, lambda d: "failed: " in d.find_element(By.ID, "d-activity").text)
    assert "failed at step 6" in page.find_element(By.ID, "d-activity").text
    # Retry from the job page: it runs again and the page follows it.
    page.find_element(By.CSS_SELECTOR, "button[data-act=retry]").click()
    wait(page, lambda d: row_state(d, f"j{jid}")["status"] in ("pending", "running"))
    assert svc.job(jid)["status"] in ("pending", "running")
    wait(page, lambda d: d.find_element(By.ID, "d-error").text == "")


def test_filters_by_status_and_type(page, svc: WebService) -> None:
    run = svc.submit("demo.count", "steps=200", "delay_ms=100", "--name", "filtered")
    wait(page, lambda d: row_state(d, f"j{run}").get("status") == "running")
    Select(page.find_element(By.ID, "f-status")).select_by_value("failed")
    assert not row_state(page, f"j{run}")["visible"]
    assert "status=failed" in page.current_url
    Select(page.find_element(By.ID, "f-status")).select_by_value("running")
    assert row_state(page, f"j{run}")["visible"]
    Select(page.find_element(By.ID, "f-type")).select_by_value("maintenance.cleanup")
    assert not row_state(page, f"j{run}")["visible"]
    Select(page.find_element(By.ID, "f-type")).select_by_value("demo.count")
    assert row_state(page, f"j{run}")["visible"]
    Select(page.find_element(By.ID, "f-status")).select_by_value("")
    svc.api("POST", f"/v1/jobs/{run}/cancel")


def test_phone_width_and_dark_mode(page, svc: WebService) -> None:
    jid = svc.submit(
        "demo.count", "steps=100", "delay_ms=100", "--name", "a job with a rather long name to wrap"
    )
    wait(page, lambda d: row_state(d, f"j{jid}").get("status") == "running")
    page.set_window_size(390, 844)
    wait(page, lambda d: d.execute_script("return innerWidth") <= 400)
    layout = page.execute_script(
        """return {overflow: document.documentElement.scrollWidth - innerWidth,
                   thead: getComputedStyle(document.querySelector('#active thead')).display};"""
    )
    assert layout["thead"] == "none" and layout["overflow"] <= 0
    bar = row(page, f"j{jid}").find_element(By.CSS_SELECTOR, "[role=progressbar]")
    assert bar.size["width"] > 250  # the bar spans the card
    page.execute_cdp_cmd(
        "Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": "dark"}]}
    )
    dark = page.execute_script("return getComputedStyle(document.body).backgroundColor")
    page.execute_cdp_cmd(
        "Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": "light"}]}
    )
    light = page.execute_script("return getComputedStyle(document.body).backgroundColor")
    assert dark == "rgb(17, 20, 24)" and light == "rgb(246, 247, 249)"
    page.execute_cdp_cmd("Emulation.setEmulatedMedia", {"features": []})
    svc.api("POST", f"/v1/jobs/{jid}/cancel")


def test_screenshot_with_three_running_jobs_and_a_batch(page, svc: WebService, tmp_path: Path) -> None:
    for jid in [j["id"] for j in svc.api("GET", "/v1/jobs?status=active&limit=1000")[1]["jobs"]]:
        svc.api("POST", f"/v1/jobs/{jid}/cancel")
    names = ["nightly build", "import customers.csv", "resize images"]
    ids = [
        svc.submit(
            "demo.count",
            f"steps={60 + 20 * i}",
            f"delay_ms={250 + 50 * i}",
            "--name",
            n,
            "--room",
            "#ops",
            "--owner",
            "bob",
        )
        for i, n in enumerate(names)
    ]
    jobs = [{"type": "demo.count", "payload": {"steps": 20 + 10 * i, "delay_ms": 200}} for i in range(4)]
    _, batch = svc.api(
        "POST", "/v1/batches", {"name": "thumbnails", "jobs": jobs, "owner": "alice", "room": "#ops"}
    )
    page.refresh()
    for jid in ids:
        wait(page, lambda d, jid=jid: (row_state(d, f"j{jid}").get("value") or 0) >= 8, timeout=60)
    wait(page, lambda d: (row_state(d, f"b{batch['id']}").get("value") or 0) > 0, timeout=60)
    row(page, f"b{batch['id']}").find_element(By.CSS_SELECTOR, "button.expand").click()
    # The README's picture is refreshed only on request, so a test run leaves the checkout unchanged.
    update = os.environ.get("PROGRESSBOT_UPDATE_SCREENSHOT") == "1"
    out = ROOT / "docs" / "jobs-page.png" if update else tmp_path / "jobs-page.png"
    assert page.save_screenshot(str(out))
    assert Path(out).stat().st_size > 10_000
    for jid in ids:
        svc.api("POST", f"/v1/jobs/{jid}/cancel")
    svc.api("POST", f"/v1/batches/{batch['id']}/cancel")
