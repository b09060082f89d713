"""Headless Debian chromium for the dashboard's tests: through selenium and the system chromedriver
(``executable_path`` given, so selenium downloads nothing). ``available()`` says whether both exist."""

from __future__ import annotations

import shutil
import time
from typing import Any

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
MISSING = "no chromium + chromedriver installed (make test installs them with apt when it runs as root)"


def available() -> bool:
    return bool(CHROMIUM and CHROMEDRIVER)


def browser(width: int = 1400, height: int = 1000) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 f"--window-size={width},{height}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)


def wait_for(driver: Any, script: str, what: str, timeout: float = 20.0) -> Any:
    """Run ``script`` (JavaScript returning a value) until it returns something truthy."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = driver.execute_script(script)
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}: {driver.page_source[:2000]}")


def severe_errors(driver: Any) -> list[dict[str, Any]]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
