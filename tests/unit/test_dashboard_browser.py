"""The dashboard in a real browser (Debian's chromium, headless, through selenium and the system
chromedriver; nothing is downloaded): the page renders the router's workers, latencies and attainment,
and keeps updating over server-sent events. Skipped where no chromium is installed (``make test``
installs it when it can)."""

from __future__ import annotations

import pytest

from tests.support import browser
from tests.unit.test_router_fakes import BackgroundCluster, FakeWorker

pytestmark = pytest.mark.skipif(not browser.available(), reason=browser.MISSING)


def test_dashboard_renders_and_updates_live_in_chromium() -> None:
    workers = [FakeWorker("p0", "prefill"), FakeWorker("d0", "decode")]
    with BackgroundCluster(workers, mode="disaggregated", ttft_slo_ms=250.0, tpot_slo_ms=50.0) as fakes:
        _check_page(fakes)


def _check_page(fakes: BackgroundCluster) -> None:
    url, send = f"{fakes.url}/dashboard", fakes.send
    driver = browser.browser()
    try:
        send(3)
        driver.get(url)
        browser.wait_for(driver, "return document.querySelectorAll('#workers tbody tr').length === 2", "the two workers")
        assert browser.wait_for(driver, "return document.getElementById('connection').textContent === 'live'", "live events")
        rows = driver.execute_script(
            "return [...document.querySelectorAll('#workers tbody tr')].map(r => [...r.cells].map(c => c.textContent))")
        assert {r[0]: (r[1], r[3], r[10]) for r in rows} == {"p0": ("prefill", "healthy", "unavailable"),
                                                             "d0": ("decode", "healthy", "unavailable")}
        ttft = driver.execute_script("return document.querySelector('#latency tbody tr').cells[1].textContent")
        assert ttft != "–" and float(ttft) > 0
        assert driver.execute_script("return document.getElementById('slo').textContent").startswith("TTFT ≤ 250")
        browser.wait_for(driver, "const p = document.getElementById('attainment-line'); return p && p.getAttribute('points')",
              "the attainment line")
        # more requests arrive: the page updates by itself (server-sent events, no reload)
        before = driver.execute_script("return document.getElementById('updated').textContent")
        send(5)
        browser.wait_for(driver, f"return document.getElementById('updated').textContent !== {before!r}", "a pushed update")
        assert not browser.severe_errors(driver)
        # pages left behind close their event streams: more loads than the browser's six connections
        # per host still render at once (they waited a minute for a free connection before)
        driver.set_page_load_timeout(20)  # a load that waits for a free connection is a hang
        for _ in range(8):
            driver.get("about:blank")
            driver.get(url)
            browser.wait_for(driver, "return document.querySelectorAll('#workers tbody tr').length === 2",
                             "the page loaded again", timeout=15)
    finally:
        driver.quit()
