"""The dashboard of a live CPU cluster (1P1D on Ray, real workers and KV transfer) in headless chromium:
it loads without console errors, and its figures change as requests flow. A screenshot is kept as an
artifact (``$PDSERVE_ARTIFACTS`` or ``.pytest_cache/pdserve/artifacts``)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from pdserve import SamplingParams
from pdserve.client import Client
from tests.e2e.cluster_support import start_cluster
from tests.support import browser

pytestmark = pytest.mark.skipif(not browser.available(), reason=browser.MISSING)
ARTIFACTS = Path(os.environ.get("PDSERVE_ARTIFACTS") or Path(__file__).resolve().parents[2] / ".pytest_cache" /
                 "pdserve" / "artifacts")


def test_live_cluster_dashboard_in_chromium(ray_session) -> None:
    cluster = start_cluster("disaggregated", router={"grpc_port": 0, "http_port": 0, "request_timeout_s": 60},
                            slo={"ttft_ms": 2000, "tpot_ms": 500})
    stop = threading.Event()

    def traffic(i: int) -> None:
        with Client(cluster.router_address, timeout=60) as client:
            n = 0
            while not stop.is_set():
                client.generate(f"client {i} request {n}: tell me a story " * (1 + n % 4),
                                sampling_params=SamplingParams(max_tokens=16 + 8 * (n % 3), temperature=0.0,
                                                               ignore_eos=True))
                n += 1

    driver = browser.browser()
    threads = [threading.Thread(target=traffic, args=(i,), daemon=True) for i in range(3)]
    try:
        driver.get(f"{cluster.http_url}/dashboard")
        browser.wait_for(driver, "return document.querySelectorAll('#workers tbody tr').length === 2", "the workers")
        idle_rate = driver.execute_script("return document.querySelector('#load tbody tr').cells[1].textContent")
        for t in threads:
            t.start()
        # the page changes by itself as requests flow: a request rate, TTFT percentiles, busy workers
        browser.wait_for(driver, "return parseFloat(document.querySelector('#load tbody tr').cells[1].textContent) > 0",
                         "a request rate", timeout=40)
        browser.wait_for(driver, "return document.querySelector('#latency tbody tr').cells[1].textContent !== '–'",
                         "TTFT percentiles", timeout=40)
        browser.wait_for(driver, "return [...document.querySelectorAll('#workers tbody tr')]"
                                 ".some(r => r.cells[9].textContent.endsWith('%') && r.cells[9].textContent !== '0%')",
                         "a busy worker", timeout=40)
        assert idle_rate in ("0.00", "–")
        assert driver.execute_script("return document.getElementById('connection').textContent") == "live"
        assert not browser.severe_errors(driver)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "dashboard-live-cpu.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
    finally:
        stop.set()
        for t in threads:
            if t.is_alive():
                t.join(30)
        driver.quit()
        cluster.stop()
