"""Headless Chromium for the report tests (Debian's chromium + chromium-driver, driven by selenium).

Selenium is pointed at /usr/bin/chromedriver explicitly, so Selenium Manager never tries to
download a driver; the flags keep Chromium off the network.
"""
from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1500,1100", "--hide-scrollbars")
REPORTS = Path(__file__).resolve().parents[1] / "results" / "reports"


def require_chromium() -> None:
    """Skip (with the reason) where Chromium, its driver or selenium is missing."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).exists():
            pytest.skip(f"{path} not installed (apt-get install chromium chromium-driver; .ci/run does it)")
    pytest.importorskip("selenium", reason="selenium not installed (pip install -e '.[test]')")


@contextmanager
def chromium():
    """A headless Chromium WebDriver with a fresh profile and browser console logging on."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    require_chromium()
    profile = tempfile.mkdtemp(prefix="diffbench-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS + (f"--user-data-dir={profile}",):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def open_page(driver, path: Path) -> None:
    driver.get(path.resolve().as_uri())
    driver.execute_script("return document.readyState")


def broken_images(driver) -> list[str]:
    """Alt texts of images that did not load (naturalWidth 0), after every image finished."""
    return driver.execute_script(
        "return Array.from(document.images).filter(i => i.getAttribute('src')).filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt || i.src.slice(0, 60));")


def console_errors(driver) -> list[str]:
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def full_page_screenshot(driver, path: Path, max_height: int = 6000) -> None:
    """Resize the window to the page's height (capped) and save a PNG screenshot."""
    height = min(driver.execute_script("return document.documentElement.scrollHeight"), max_height)
    driver.set_window_size(1500, height)
    path.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(path))
