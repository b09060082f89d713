"""The dashboard's first render with 8 workers, in headless chromium: from navigation start to the page
showing all 8 workers and the latency table (the router's page, JSON and telemetry are real; the 8
workers are the test suite's fake gRPC workers, which answer like real ones). Needs chromium +
chromedriver (``make test`` installs them as root).

    python -m benchmarks.dashboard_render [--workers 8] [--loads 10]
"""

from __future__ import annotations

import argparse
import statistics

from benchmarks.common import markdown_table, run_info, write_results
from tests.support import browser
from tests.unit.test_router_fakes import BackgroundCluster, FakeWorker

# checked on every animation frame in the page: resolves with performance.now() once rendered
READY = """
const [workers, done] = arguments;
const check = () => (document.querySelectorAll('#workers tbody tr').length === workers
                     && document.querySelector('#latency tbody tr')) ? done(performance.now())
                                                                    : requestAnimationFrame(check);
check();
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--loads", type=int, default=10)
    args = parser.parse_args()
    if not browser.available():
        raise SystemExit(browser.MISSING)
    half = args.workers // 2
    workers = [FakeWorker(f"p{i}", "prefill") for i in range(half)] + \
              [FakeWorker(f"d{i}", "decode") for i in range(args.workers - half)]
    with BackgroundCluster(workers, mode="disaggregated", ttft_slo_ms=250.0, tpot_slo_ms=50.0) as fakes:
        fakes.send(200, max_tokens=8)
        driver = browser.browser()
        driver.set_script_timeout(30)
        times = []
        try:
            for _ in range(args.loads):
                driver.get("about:blank")
                driver.get(f"{fakes.url}/dashboard")
                times.append(driver.execute_async_script(READY, args.workers))
        finally:
            driver.quit()
    info = run_info()
    row = [args.workers, args.loads, round(min(times), 1), round(statistics.median(times), 1), round(max(times), 1)]
    markdown = "\n".join([f"# Dashboard first render ({args.workers} workers, headless chromium)", "",
                          f"{info.get('device')} · commit {info['commit']} · {info['date']}", "",
                          markdown_table(["workers", "loads", "min ms", "median ms", "max ms"], [row]), "",
                          "From navigation start (performance.now()) to the first animation frame with every "
                          "worker row and the latency table rendered.", ""])
    print(markdown)
    write_results("dashboard_render", info, {"settings": vars(args), "ms": times}, markdown)


if __name__ == "__main__":
    main()
