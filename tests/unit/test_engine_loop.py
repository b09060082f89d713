"""The engine thread's calls: urgent ones may run inside a step while the device is busy, others never."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any

from pdserve.worker.engine_loop import EngineLoop


def _loop() -> tuple[EngineLoop, Any]:
    engine = SimpleNamespace(device_wait_hook=None)
    return EngineLoop(engine, on_step=lambda output: None), engine  # type: ignore[arg-type]


def test_urgent_calls_run_while_the_device_is_busy_and_others_wait_for_the_step() -> None:
    loop, engine = _loop()
    wanted = {"value": True}
    loop.run_urgent_calls_mid_step(lambda: wanted["value"])
    ran: list[str] = []
    device_done = threading.Event()
    normal = loop.call(lambda e: ran.append("normal"))

    def arrive_mid_step() -> None:  # another thread: a transfer landed while the step runs
        time.sleep(0.02)
        loop.call(lambda e: ran.append("urgent"), urgent=True).result(timeout=5)
        ran.append("urgent answered before the step ended" if not device_done.is_set() else "late")
        device_done.set()

    threading.Thread(target=arrive_mid_step).start()
    engine.device_wait_hook(device_done.is_set)  # what the engine does while it waits for a step
    assert ran == ["urgent", "urgent answered before the step ended"]
    assert not normal.done()  # runs between steps only
    loop._run_calls()
    assert normal.done() and ran[-1] == "normal"


def test_no_polling_when_no_urgent_call_is_wanted() -> None:
    loop, engine = _loop()
    loop.run_urgent_calls_mid_step(lambda: False)
    checks: list[int] = []
    engine.device_wait_hook(lambda: checks.append(1) and False)  # busy, but nothing is expected
    assert len(checks) == 1  # returned after one look (the engine then waits for the device itself)


def test_a_queued_urgent_call_runs_even_when_none_is_wanted_any_more() -> None:
    loop, engine = _loop()
    loop.run_urgent_calls_mid_step(lambda: False)
    future = loop.call(lambda e: "admitted", urgent=True)
    engine.device_wait_hook(lambda: False)
    assert future.result(timeout=0) == "admitted"
