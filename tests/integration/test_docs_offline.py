"""/docs and /redoc on an air-gapped machine: headless Chromium with every host but the loopback unreachable loads
them from the API alone, and Swagger UI renders the API's operations from its OpenAPI document."""

from __future__ import annotations

import pytest

from tests.apisupport import live_server, prepare_database, settings_for
from tests.integration.browser_support import OFFLINE_FLAGS, chromium
from tests.integration.worker_support import wait_for

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(180)]


@pytest.fixture
def offline_browser(tmp_path):
    with chromium(tmp_path / "chrome-profile", *OFFLINE_FLAGS) as driver:
        yield driver


@pytest.fixture
def server(sqlite_url, redis_url):
    prepare_database(sqlite_url)
    with live_server(settings_for(sqlite_url, redis_url)) as live:
        yield live


def _foreign_resources(driver, origin: str, *, kinds: tuple[str, ...] | None = None) -> list[str]:
    """What the page asked of hosts other than the API (optionally only of these initiator types)."""
    entries = driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => [e.name, e.initiatorType])")
    return [name for name, kind in entries if not name.startswith(origin) and (kinds is None or kind in kinds)]


def test_the_network_is_really_cut(offline_browser):
    """The flags do what the other tests rely on: a page outside this machine does not load."""
    offline_browser.set_page_load_timeout(20)
    try:
        offline_browser.get("https://cdn.jsdelivr.net/npm/swagger-ui-dist@5/swagger-ui.css")
    except Exception:  # noqa: BLE001 - selenium raises WebDriverException or a timeout: either way, unreachable
        return
    text = offline_browser.execute_script("return document.body ? document.body.innerText : ''")
    assert "swagger" not in text.lower(), "a CDN was reachable: the offline flags do not cut the network"


def test_swagger_ui_renders_the_operations_offline(server, offline_browser):
    from selenium.webdriver.common.by import By

    offline_browser.get(f"{server.url}/docs")
    wait_for(lambda: offline_browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path"), 30,
             what="Swagger UI to render the operations")
    paths = {el.get_attribute("data-path") or el.text.strip()
             for el in offline_browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
    spec_paths = set(server.client().get("/openapi.json").json()["paths"])
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/models"} <= paths
    assert paths == spec_paths
    assert offline_browser.find_element(By.CSS_SELECTOR, ".info .title").text.startswith(
        "SelfIE interpretation service")
    assert _foreign_resources(offline_browser, server.url) == []


def test_redoc_renders_offline(server, offline_browser):
    from selenium.webdriver.common.by import By

    offline_browser.get(f"{server.url}/redoc")
    wait_for(lambda: offline_browser.find_elements(By.CSS_SELECTOR, "h1"), 30, what="ReDoc to render")
    wait_for(lambda: "/v1/jobs" in offline_browser.find_element(By.TAG_NAME, "body").text, 30,
             what="ReDoc to list the operations")
    assert offline_browser.find_element(By.TAG_NAME, "h1").text.startswith("SelfIE interpretation service")
    # ReDoc's own "API docs by Redocly" badge is an <img> from its vendor's site, which the bundle cannot be told
    # to skip; it fails offline without effect. Every script, stylesheet and font comes from the API.
    assert _foreign_resources(offline_browser, server.url, kinds=("script", "link", "css", "fetch",
                                                                   "xmlhttprequest")) == []
