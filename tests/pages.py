"""Helpers of the report and history tests: a small run with every kind of row, and headless
Chromium (Debian's chromium + chromium-driver, driven by selenium).

Selenium is pointed at /usr/bin/chromedriver explicitly, so Selenium Manager never tries to
download a driver; the flags keep Chromium off the network. Tests keep their screenshots in
results/reports/browser-test/ (git-ignored); the committed ones are made with

    python tests/pages.py results/latest/report.html results/reports/report_screenshot.png
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
SCREENSHOTS = Path(__file__).resolve().parents[1] / "results" / "reports" / "browser-test"
BROKEN_SAMPLER = """
import diffbench
from diffbench.registry import Sampler


def sample_broken(denoiser, x, timesteps, *, generator, callback=None):
    raise RuntimeError("deliberately broken sampler")


@diffbench.hookimpl
def register_samplers(register):
    register(Sampler(name="broken", description="always raises", family="gaussian", fn=sample_broken))
"""


def small_run(out: Path, *extra) -> Path:
    """gmm-oracle and mlp × ddim, heun, a broken sampler × 4 and 8 steps on gmm-2d and moons: ok
    cells (two models sharing a sampler), skipped cells (the oracle on moons) and failed cells."""
    from click.testing import CliRunner

    from diffbench.cli import main

    plugin = out.parent / "broken_sampler.py"
    plugin.write_text(BROKEN_SAMPLER)
    result = CliRunner().invoke(main, ["run", "--plugin", str(plugin), "--models", "gmm-oracle,mlp",
                                       "--samplers", "ddim,heun,broken", "--steps", "4,8", "--datasets", "gmm-2d,moons",
                                       "--metrics", "swd,mmd", "--num-samples", "200", "--repeats", "1",
                                       "--out", str(out), "--quiet", *extra])
    assert result.exit_code == 1, result.output  # the broken sampler's cells failed
    return out


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


def save_test_screenshot(driver, name: str) -> Path:
    """Save a test's screenshot under results/reports/browser-test/ (kept out of git by its own .gitignore)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    (SCREENSHOTS / ".gitignore").write_text("*\n")
    full_page_screenshot(driver, SCREENSHOTS / name)
    return SCREENSHOTS / name


if __name__ == "__main__":  # python tests/pages.py PAGE.html SHOT.png [MAX_HEIGHT]
    import sys

    with chromium() as browser:
        open_page(browser, Path(sys.argv[1]))
        problems = broken_images(browser) + console_errors(browser)
        full_page_screenshot(browser, Path(sys.argv[2]), *map(int, sys.argv[3:4]))
    print("\n".join(problems) or f"ok: {sys.argv[2]}")
