"""The web page survives a restart of the service: it shows "reconnecting…", then catches up with
``Last-Event-ID`` and follows the job to its final state (headless Chromium via Selenium)."""

from __future__ import annotations

import pytest
from selenium.webdriver.common.by import By

from tests.integration.web_helpers import WebService, browser_available, login, row_state, wait

pytestmark = [
    pytest.mark.slow,
    pytest.mark.browser,
    pytest.mark.skipif(not browser_available(), reason="needs Debian's chromium and chromium-driver"),
]




def banner(driver) -> str:  # type: ignore[no-untyped-def]
    el = driver.find_element(By.ID, "banner")
    return "" if not el.is_displayed() else str(el.text)


def test_restart_mid_job_shows_the_banner_then_catches_up_to_the_final_state(driver, svc: WebService) -> None:
    login(driver, svc)
    driver.execute_script("window.__sameDocument = true;")
    jid = svc.submit("demo.count", "steps=40", "delay_ms=200", "--name", "survivor")
    other = svc.submit("demo.count", "steps=3", "delay_ms=100", "--delay", "4", "--name", "while away")
    key = f"j{jid}"
    wait(driver, lambda d: (row_state(d, key).get("value") or 0) >= 10)
    assert banner(driver) == ""

    svc.stop()  # graceful: the job is requeued from its checkpoint
    wait(driver, lambda d: banner(d) == "reconnecting…")
    at_stop = row_state(driver, key)["value"]
    svc.start()

    wait(driver, lambda d: banner(d) == "", timeout=60)
    wait(driver, lambda d: row_state(d, key)["status"] == "completed", timeout=90)
    assert row_state(driver, key)["value"] == 100 >= at_stop
    assert svc.job(jid)["status"] == "completed"
    # A job that started and finished while the page was away is caught up too.
    wait(driver, lambda d: row_state(d, f"j{other}").get("status") == "completed", timeout=60)
    assert driver.execute_script("return window.__sameDocument;") is True
