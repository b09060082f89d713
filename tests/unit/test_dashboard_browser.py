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
        _check_planner_line(driver)
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


def _check_planner_line(driver) -> None:  # noqa: ANN001
    """The sizing panel's planner line names the configurations whose KV cache the planner sees run short
    (the fake cluster's traffic never fills a cache, so the line is rendered from plans given to it)."""
    plan = {"status": "ok", "recommended": "colocated x2", "current": "1P1D", "requests": 300, "apply": None,
            "predictions": [
                {"config": "colocated x2", "goodput_per_gpu": 1.12, "preemptions_per_request": 0.0, "dropped_share": 0.0},
                {"config": "1P1D", "goodput_per_gpu": 0.81, "preemptions_per_request": 7.4, "dropped_share": 0.0},
                {"config": "2P0D", "goodput_per_gpu": 0.0, "preemptions_per_request": 0.5, "dropped_share": 0.125}]}
    text = driver.execute_script("return plannerText(arguments[0])", plan)
    assert text.startswith("Planner recommends colocated x2 (running 1P1D): colocated x2 1.12, 1P1D 0.81, 2P0D 0.00")
    assert text.endswith("KV cache short at the recent rate: 1P1D preempts 7.40 times per request; 2P0D preempts "
                         "0.50 times per request and cannot fit 13% of them.")
    for p in plan["predictions"]:
        p["preemptions_per_request"] = p["dropped_share"] = 0.0
    assert "KV cache short" not in driver.execute_script("return plannerText(arguments[0])", plan)
    plan["predictions"] = [{"config": "1P1D", "goodput_per_gpu": 2.0}]  # a router of before the KV figures
    assert "KV cache short" not in driver.execute_script("return plannerText(arguments[0])", plan)
    assert driver.execute_script("return plannerText(null)").startswith("Planner off")
