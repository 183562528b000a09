"""Browser test fixtures: one real ``progressbot run`` service and one headless Chromium per module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.web_helpers import WebService, make_browser


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebService]:
    """A service with the HTTP API and the page, shared by a module's tests."""
    s = WebService(tmp_path_factory.mktemp("web"))
    s.start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def driver(svc: WebService) -> Iterator[object]:
    """Headless Chromium, shared by a module's tests."""
    d = make_browser()
    yield d
    d.quit()
