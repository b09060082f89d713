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


def test_urgent_calls_run_between_the_layers_of_a_step_being_launched() -> None:
    """On a real engine (CPU, where a step's launch is its computation): an urgent call queued while a
    step is launched runs between its layers, before the launch returns; a request it adds there (not
    part of that step) and the requests of the step generate what they generate without it."""
    from pdserve import LLM, SamplingParams

    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    prompts = {"a": [5, 6, 7, 8, 9], "b": [11, 12, 13]}
    reference = LLM(model="tiny-random", num_kv_blocks=64).generate(
        prompt_token_ids=list(prompts.values()), sampling_params=params)
    engine = LLM(model="tiny-random", num_kv_blocks=64).engine
    loop = EngineLoop(engine, on_step=lambda output: None)
    loop.run_urgent_calls_mid_step(lambda: True)
    engine.add_request("a", prompt_token_ids=prompts["a"], params=params)
    layers: list[int] = []
    admitted: list[int] = []

    class QueueAtFirstLayer:  # stands in for a KV transfer landing while the step is launched
        def before_forward(self, plan: Any) -> Any:
            if admitted:
                return None

            def hook(index: int, kv_cache: Any) -> None:
                layers.append(index)
                if index == 0:
                    loop.call(lambda e: (admitted.append(layers[-1]),
                                         e.add_request("b", prompt_token_ids=prompts["b"], params=params)),
                              urgent=True)
            return hook

        def after_forward(self, plan: Any) -> None:
            pass

    engine.step_hooks = QueueAtFirstLayer()
    outputs: dict[str, list[int]] = {"a": [], "b": []}
    while engine.has_unfinished_requests():
        for delta in engine.step():
            outputs[delta.request_id] += delta.new_token_ids
    assert admitted == [0] and len(layers) == engine.spec.num_layers  # ran at layer 0, mid-launch
    assert [outputs["a"], outputs["b"]] == [list(o.token_ids) for o in reference]
