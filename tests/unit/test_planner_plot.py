"""`pdserve plan --plot`: the attainment curves behind the goodput numbers, and their SVG."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from pdserve.engine.step_time import StepTimeModel
from pdserve.planner.plan import Profile, Workload, curve_rates, plan
from pdserve.planner.plot import BOTTOM, HEIGHT, TARGET, TOP, render_svg

SYNTHETIC = StepTimeModel(base_s=0.005, per_token_s=2e-5, free_tokens=256)
SVG = "{http://www.w3.org/2000/svg}"


def test_curve_rates_cover_the_offered_rate_and_every_goodput() -> None:
    rates = curve_rates(2.0, [3.5, 0.0], points=4)
    assert rates == sorted(rates) and rates[0] == 0.2 and 3.5 in rates and 0.0 not in rates
    assert rates[-1] == max(4.0, 1.25 * 3.5) and len(rates) == 6


def test_each_curve_stands_at_the_target_at_its_goodput_and_falls_past_it() -> None:
    """The curves come from the simulation the goodput was bisected on: at each configuration's goodput the
    curve meets the target, light load meets the SLOs, and well past the goodput it does not."""
    workload = Workload.poisson(4.0, 2048, 64, n=80)
    result = plan(Profile(SYNTHETIC), workload, 2, ttft_slo_s=1.0, tpot_slo_s=0.012, curve_points=4)
    assert set(result["curves"]) == {p["config"] for p in result["predictions"]}
    for prediction in result["predictions"]:
        curve = dict(result["curves"][prediction["config"]])
        goodput = round(prediction["goodput_per_gpu"], 4)
        assert curve[goodput] >= TARGET
        assert curve[min(curve)] >= TARGET
        assert curve[max(curve)] < TARGET  # 1.25x the best goodput or more
    assert "curves" not in plan(Profile(SYNTHETIC), Workload.poisson(4.0, 256, 8, n=20), 2, ttft_slo_s=1.0,
                                tpot_slo_s=0.012)


def test_the_svg_draws_one_curve_per_configuration_and_the_target_line() -> None:
    result = {"workload": "poisson <4>/s", "offered_rate": 4.0, "num_gpus": 2, "slo": {"ttft_ms": 250, "tpot_ms": 15},
              "recommended": "1P1D",
              "predictions": [{"config": "colocated x2", "goodput_per_gpu": 3.0},
                              {"config": "1P1D", "goodput_per_gpu": 4.5}],
              "curves": {"colocated x2": [[0.2, 1.0], [3.0, 0.92], [6.0, 0.1]],
                         "1P1D": [[0.2, 1.0], [4.5, 0.9], [6.0, 0.5]]}}
    root = ET.fromstring(render_svg(result))  # well-formed, names escaped
    curves = root.findall(f"{SVG}polyline")
    assert [c.get("data-config") for c in curves] == ["colocated x2", "1P1D"]
    assert all(len(c.get("points", "").split()) == 3 for c in curves)
    target = next(line for line in root.findall(f"{SVG}line") if line.get("class") == "target")
    plot_h = HEIGHT - TOP - BOTTOM
    assert float(target.get("y1", "0")) == round(TOP + plot_h * (1 - TARGET), 1)
    texts = [t.text or "" for t in root.iter(f"{SVG}text")]
    assert "1P1D (recommended)" in texts and "poisson <4>/s on 2 GPUs: TTFT <= 250 ms, TPOT <= 15 ms" in texts
    assert len(root.findall(f"{SVG}circle")) == 2  # each goodput marked on its curve


def test_axis_ticks_are_round_and_cover_the_range_without_waste() -> None:
    from pdserve.planner.plot import _ticks

    for top in (1e-3, 0.05, 0.7, 4.2, 21, 99, 130, 1234.5):
        ticks = _ticks(top)
        steps = {round(b - a, 9) for a, b in zip(ticks, ticks[1:])}
        assert ticks[0] == 0 and len(steps) == 1 and top <= ticks[-1] <= 2 * top
    assert _ticks(0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
