"""The operator dashboard of a serving run, as the operator saw it: renders a snapshot of the router's
``/dashboard/data`` kept by ``python -m benchmarks.serve --dashboard`` (on the GPU host, after every
point) in headless chromium here, and saves a screenshot. The page and the HTTP front are the router's
own (:class:`~pdserve.router.openai_http.OpenAIFront`, ``static/dashboard.html``); only the data comes
from the file. Needs chromium + chromedriver (``make test`` installs them as root).

    python -m benchmarks.dashboard_replay benchmarks/results/serve-dash-h200x2-dashboard.json.gz \\
        --point auto-prefill-heavy-10 --out benchmarks/results/dashboard-h200x2.png
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import threading
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS
from pdserve.router.openai_http import OpenAIFront
from tests.support import browser

#: true once the page rendered its worker table and its latency table from the snapshot
RENDERED = ("return document.querySelectorAll('#workers tbody tr').length > 0 "
            "&& document.querySelector('#latency tbody tr') !== null")


def load_snapshot(path: Path, point: str) -> dict[str, Any]:
    with gzip.open(path, "rt") as f:
        saved = json.load(f)
    for snapshots in saved["snapshots"].values():
        if point in snapshots:
            snapshot = dict(snapshots[point])
            if "error" in snapshot:
                raise SystemExit(f"{path}: the snapshot after {point} failed on the run: {snapshot['error']}")
            return snapshot
    known = sorted(p for snapshots in saved["snapshots"].values() for p in snapshots)
    raise SystemExit(f"{path}: no snapshot after point {point!r}; it has {', '.join(known)}")


def serve(snapshot: dict[str, Any]) -> tuple[int, asyncio.AbstractEventLoop]:
    """The router's HTTP front on a free local port, its dashboard answering with ``snapshot``."""
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    async def data() -> dict[str, Any]:
        return snapshot

    front = OpenAIFront(None, str(snapshot.get("model", "?")), max_model_len=lambda: 0,  # type: ignore[arg-type]
                        serving=lambda: True, dashboard=data)
    port = asyncio.run_coroutine_threadsafe(front.start("127.0.0.1", 0), loop).result(30)
    return port, loop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("snapshots", type=Path, help="a <stem>-dashboard.json.gz written by benchmarks.serve")
    parser.add_argument("--point", required=True, help="the run id of the point, e.g. auto-prefill-heavy-10")
    parser.add_argument("--out", type=Path, default=RESULTS / "dashboard.png")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=1800)
    args = parser.parse_args()
    if not browser.available():
        raise SystemExit(browser.MISSING)
    snapshot = load_snapshot(args.snapshots, args.point)
    port, _ = serve(snapshot)
    driver = browser.browser(args.width, args.height)
    try:
        driver.get(f"http://127.0.0.1:{port}/dashboard")
        browser.wait_for(driver, RENDERED, "the dashboard to render the snapshot")
        errors = browser.severe_errors(driver)
        if errors:
            raise SystemExit(f"the page reported errors: {errors}")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(args.out))
    finally:
        driver.quit()
    print("wrote", args.out)


if __name__ == "__main__":
    main()
