"""The dashboard's first render with 8 workers, in headless chromium: from navigation start to the page
showing all 8 workers and the latency table (the router's page, JSON and telemetry are real; the 8
workers are the test suite's fake gRPC workers, which answer like real ones). Needs chromium +
chromedriver (``make test`` installs them as root).

    python -m benchmarks.dashboard_render [--workers 8] [--loads 10]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading

from benchmarks.common import markdown_table, run_info, write_results
from tests.support import browser
from tests.unit.test_router_fakes import FakeWorker, cluster, generate_request

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
    ready, stop, state = threading.Event(), threading.Event(), {}

    async def serve() -> None:
        half = args.workers // 2
        workers = [FakeWorker(f"p{i}", "prefill") for i in range(half)] + \
                  [FakeWorker(f"d{i}", "decode") for i in range(args.workers - half)]
        async with cluster(workers, mode="disaggregated", http_port=0, ttft_slo_ms=250.0, tpot_slo_ms=50.0) \
                as (router, stub):
            for i in range(200):
                await stub.GenerateUnary(generate_request([1, 2, i % 50], 8))
            state["url"] = f"http://127.0.0.1:{router.http_port}/dashboard"
            ready.set()
            while not stop.is_set():
                await asyncio.sleep(0.05)

    server = threading.Thread(target=lambda: asyncio.run(serve()), daemon=True)
    server.start()
    assert ready.wait(60)
    driver = browser.browser()
    driver.set_script_timeout(30)
    times = []
    try:
        for _ in range(args.loads):
            driver.get("about:blank")
            driver.get(state["url"])
            times.append(driver.execute_async_script(READY, args.workers))
    finally:
        driver.quit()
        stop.set()
        server.join(10)
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
