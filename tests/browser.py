"""Headless Chromium for the tests of ``helmlm serve``'s page: Debian's ``chromium`` and ``chromium-driver`` driven
by selenium, offline.

``make test`` installs both packages when they are missing (the Makefile's ``browser`` target) and sets
``HELMLM_REQUIRE_BROWSER=1``, so in CI a missing browser fails the test; elsewhere (a user's ``pytest`` on a machine
without them) the browser tests are skipped with the command that installs them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("HELMLM_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("HELMLM_CHROMEDRIVER", "/usr/bin/chromedriver")
INSTALL = "apt-get install chromium chromium-driver (or: make browser)"


def need_chromium() -> None:
    """Skip (or, under ``HELMLM_REQUIRE_BROWSER=1``, fail) when Chromium, its driver or selenium is missing."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip install selenium)")
    if missing:
        message = f"needs {', '.join(missing)}: {INSTALL}"
        if os.environ.get("HELMLM_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)


def wait_for(condition, seconds: float = 30, what: str = "the condition") -> None:
    """Poll ``condition()`` every 50 ms until it is true; ``TimeoutError`` naming ``what`` after ``seconds``."""
    deadline = time.time() + seconds
    while not condition():
        if time.time() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


@contextlib.contextmanager
def chromium(profile: Path, width: int = 1100, height: int = 720):
    """A selenium ``WebDriver`` on headless Chromium with a fresh profile under ``profile``.

    The flags keep Chromium off the network it would otherwise call (updates, sync, field trials): this machine's
    network is closed, and those calls only slow the start. Selenium Manager is bypassed (the driver's path is
    given), so nothing is downloaded."""
    need_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-extensions", f"--window-size={width},{height}",
                 f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
