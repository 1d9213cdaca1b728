"""Headless Chromium (selenium) for the page tests, with the network optionally cut to this machine only."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")
CHROME_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run")
# An air-gapped machine: every host name except the loopback address fails to resolve, and anything that would
# still leave goes to a proxy on a closed port (port 9, discard, has no listener here).
OFFLINE_FLAGS = ('--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1',
                 "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=127.0.0.1")


@contextmanager
def chromium(profile_dir: Path, *extra_flags: str) -> Iterator[object]:
    """A headless Chromium driver (skips the test when Chromium or selenium is missing)."""
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("headless Chromium is not installed (Debian packages `chromium` and `chromium-driver`)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (the dev extra lists it)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROME_FLAGS + extra_flags:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile_dir}")
    options.add_argument("--window-size=1500,1000")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
