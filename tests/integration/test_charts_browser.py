"""The explorer's SVG bar chart (api/static/common.js `barChart`, used by the audit page) in headless Chromium:
its gridlines are labelled with the values they mark."""

from __future__ import annotations

import pytest

from tests.apisupport import live_server, prepare_database, settings_for
from tests.integration.browser_support import OFFLINE_FLAGS, chromium
from tests.integration.worker_support import wait_for

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(180)]


@pytest.fixture
def page(sqlite_url, redis_url, tmp_path):
    prepare_database(sqlite_url)
    with live_server(settings_for(sqlite_url, redis_url)) as server, \
            chromium(tmp_path / "chrome-profile", *OFFLINE_FLAGS) as driver:
        driver.get(f"{server.url}/ui")  # any explorer page loads common.js
        wait_for(lambda: driver.execute_script("return typeof Selfie === 'object'"), 30, what="common.js")
        yield driver


def gridline_labels(driver, values: list[float]) -> list[str]:
    return driver.execute_script(
        "const svg = Selfie.barChart(arguments[0].map((v, i) => ({key: i, value: v})), {});"
        "return [...svg.querySelectorAll('text[text-anchor=end]')].map(t => t.textContent);", values)


@pytest.mark.parametrize("values, labels", [
    ([3, 1, 2], ["1.5", "3"]),  # was "2" for the middle line, which marks 1.5
    ([1, 0], ["0.5", "1"]),
    ([4, 2], ["2", "4"]),
    ([0, 0], ["0.5", "1"]),  # an empty chart keeps a scale of 1
])
def test_gridline_labels_are_the_values_they_mark(page, values, labels):
    assert gridline_labels(page, values) == labels
