"""``pdserve plan --plot``: each configuration's predicted SLO attainment against the offered rate per GPU,
as a standalone SVG (no plotting library: the planner stays dependency-free and torch-free).

The picture is the one the goodput numbers come from: a configuration's goodput is where its curve last
stands at the target attainment (the dashed line); the vertical line is the workload's offered rate per GPU.
Input: a :func:`pdserve.planner.plan.plan` result made with ``curve_points`` (its ``curves``).
"""

from __future__ import annotations

from typing import Any
from xml.sax.saxutils import escape

WIDTH, HEIGHT = 760, 420
LEFT, RIGHT, TOP, BOTTOM = 64, 236, 48, 52  # margins: the legend sits in the right one
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
TARGET = 0.9


def _ticks(top: float, count: int = 5) -> list[float]:
    """Round tick values from 0 to at least ``top`` (> 0; 1 when it is not)."""
    top = top if top > 0 else 1.0
    raw = top / count
    magnitude = 10 ** len(str(int(raw))) / 10 if raw >= 1 else 1.0
    while magnitude > raw:
        magnitude /= 10
    step = next(m * magnitude for m in (1, 2, 2.5, 3, 4, 5, 6, 8, 10) if m * magnitude * count >= top)
    return [round(i * step, 6) for i in range(count + 1)]


def render_svg(result: dict[str, Any]) -> str:
    """The SVG text of ``result``'s curves (raises ``KeyError`` without them)."""
    curves: dict[str, list[list[float]]] = result["curves"]
    offered = result["offered_rate"] / result["num_gpus"]
    x_ticks = _ticks(max([offered] + [rate for curve in curves.values() for rate, _ in curve]))
    x_max = x_ticks[-1]
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(rate: float) -> float:
        return LEFT + plot_w * rate / x_max

    def y(share: float) -> float:
        return TOP + plot_h * (1.0 - share)

    slo = result["slo"]
    title = (f"{result['workload']} on {result['num_gpus']} GPUs: TTFT <= {slo['ttft_ms']:g} ms, "
             f"TPOT <= {slo['tpot_ms']:g} ms")
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
             f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">',
             f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
             f'<text x="{LEFT}" y="{TOP - 20}" font-size="14">{escape(title)}</text>']
    for tick in x_ticks:
        parts.append(f'<line x1="{x(tick):.1f}" y1="{TOP}" x2="{x(tick):.1f}" y2="{TOP + plot_h}" stroke="#eee"/>')
        parts.append(f'<text x="{x(tick):.1f}" y="{TOP + plot_h + 16}" text-anchor="middle">{tick:g}</text>')
    for share in (0.0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f'<line x1="{LEFT}" y1="{y(share):.1f}" x2="{LEFT + plot_w}" y2="{y(share):.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{LEFT - 6}" y="{y(share) + 4:.1f}" text-anchor="end">{share:g}</text>')
    parts += [f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#444"/>',
              f'<line class="target" x1="{LEFT}" y1="{y(TARGET):.1f}" x2="{LEFT + plot_w}" y2="{y(TARGET):.1f}" '
              f'stroke="#444" stroke-dasharray="6 4"/>',
              f'<line class="offered" x1="{x(offered):.1f}" y1="{TOP}" x2="{x(offered):.1f}" y2="{TOP + plot_h}" '
              f'stroke="#888" stroke-dasharray="2 3"/>',
              f'<text x="{x(offered) + 4:.1f}" y="{TOP + 12}" fill="#666">offered</text>',
              f'<text x="{LEFT + plot_w / 2:.1f}" y="{HEIGHT - 12}" text-anchor="middle">offered rate per GPU '
              f'(req/s)</text>',
              f'<text transform="translate(16 {TOP + plot_h / 2:.1f}) rotate(-90)" text-anchor="middle">'
              f'share of requests meeting both SLOs</text>']
    goodputs = {p["config"]: p["goodput_per_gpu"] for p in result["predictions"]}
    for i, (config, curve) in enumerate(curves.items()):
        colour = COLOURS[i % len(COLOURS)]
        points = " ".join(f"{x(rate):.1f},{y(share):.1f}" for rate, share in curve)
        parts.append(f'<polyline class="curve" data-config="{escape(config)}" points="{points}" fill="none" '
                     f'stroke="{colour}" stroke-width="2"/>')
        goodput = goodputs.get(config, 0.0)
        at_goodput = [share for rate, share in curve if rate == round(goodput, 4)]
        if goodput > 0 and at_goodput:
            parts.append(f'<circle cx="{x(goodput):.1f}" cy="{y(at_goodput[0]):.1f}" r="4" fill="{colour}"/>')
        mark = " (recommended)" if config == result["recommended"] else ""
        legend_y = TOP + 16 + 36 * i
        parts += [f'<line x1="{WIDTH - RIGHT + 16}" y1="{legend_y - 4}" x2="{WIDTH - RIGHT + 40}" y2="{legend_y - 4}" '
                  f'stroke="{colour}" stroke-width="2"/>',
                  f'<text x="{WIDTH - RIGHT + 46}" y="{legend_y}">{escape(config)}{mark}</text>',
                  f'<text x="{WIDTH - RIGHT + 46}" y="{legend_y + 15}" fill="#555">goodput {goodput:g} req/s/GPU</text>']
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
