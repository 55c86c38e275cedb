"""Inline SVG plots of a strength sweep: erasure against preservation, and each metric against the scale."""

from __future__ import annotations

import html
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from erasure.report.evaluations import finite_number

logger = logging.getLogger(__name__)

#: Sweep metrics drawn against the scale, with their colours.
SCALE_METRICS: tuple[tuple[str, str], ...] = (
    ("efficacy", "#d62728"),
    ("generality", "#ff7f0e"),
    ("specificity", "#1f77b4"),
    ("paired_preservation", "#2ca02c"),
    ("harmonic_mean", "#9467bd"),
)
PALETTE = ("#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    if high <= low:
        return [low]
    raw = (high - low) / (count - 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step - 1e-9) * step
    return [round(first + i * step, 10) for i in range(int((high - first) / step + 1e-9) + 1)]


def _line_chart(
    series: Sequence[tuple[str, str, Sequence[tuple[float, float, str]]]],
    x_label: str,
    y_label: str,
    x_range: tuple[float, float],
    y_range: tuple[float, float],
    title: str,
    width: int = 480,
    height: int = 340,
) -> str:
    """An SVG line chart: ``series`` of ``(name, colour, [(x, y, point label), ...])``."""
    left, right, top, bottom = 58, 16 + (130 if len(series) > 1 else 0), 30, 46
    plot_w, plot_h = width - left - right, height - top - bottom
    (x0, x1), (y0, y1) = x_range, y_range
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * plot_w

    def sy(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * plot_h

    esc = html.escape
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{esc(title)}">',
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>',
        f'<text x="{left}" y="18" font-size="13" font-weight="bold">{esc(title)}</text>',
    ]
    for tick in _ticks(x0, x1):
        x = sx(tick)
        out.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + plot_h}" stroke="#e4e4e4"/>')
        out.append(f'<text x="{x:.1f}" y="{top + plot_h + 15}" font-size="11" text-anchor="middle">{tick:g}</text>')
    for tick in _ticks(y0, y1):
        y = sy(tick)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" stroke="#e4e4e4"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">{tick:g}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#444"/>')
    out.append(
        f'<text x="{left + plot_w / 2:.1f}" y="{height - 8}" font-size="12" text-anchor="middle">{esc(x_label)}</text>'
    )
    out.append(
        f'<text x="14" y="{top + plot_h / 2:.1f}" font-size="12" text-anchor="middle" '
        f'transform="rotate(-90 14 {top + plot_h / 2:.1f})">{esc(y_label)}</text>'
    )
    for index, (name, colour, points) in enumerate(series):
        if not points:
            continue
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y, _ in points)
        out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for x, y, label in points:
            out.append(
                f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="4" fill="{colour}">'
                f"<title>{esc(name)}: {esc(label)} ({x:.3g}, {y:.3g})</title></circle>"
            )
            if label:  # to the left of points in the right fifth of the plot, so the text stays inside
                right_side = sx(x) > left + 0.8 * plot_w
                anchor, dx = ("end", -6) if right_side else ("start", 6)
                out.append(
                    f'<text x="{sx(x) + dx:.1f}" y="{sy(y) - 6:.1f}" font-size="10" fill="#333" '
                    f'text-anchor="{anchor}">{esc(label)}</text>'
                )
        if len(series) > 1:
            ly = top + 8 + 18 * index
            lx = width - right + 10
            out.append(f'<rect x="{lx}" y="{ly - 8}" width="14" height="4" fill="{colour}"/>')
            out.append(f'<text x="{lx + 20}" y="{ly - 3}" font-size="11">{esc(name)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def _preservation_key(points: Sequence[Mapping[str, Any]]) -> str:
    for key in ("paired_preservation", "specificity"):
        if any(finite_number(p.get(key)) is not None for p in points):
            return key
    return "paired_preservation"


def _range(values: Iterable[float], low: float = 0.0, high: float = 1.0) -> tuple[float, float]:
    values = list(values)
    return min([low, *values]), max([high, *values])


def tradeoff_svg(points: Sequence[Mapping[str, Any]], title: str = "Erasure vs preservation") -> str:
    """SVG of efficacy (y) against preservation (x), one line per series (``model``) in scale order.

    Preservation is ``paired_preservation`` when the points have it, else ``specificity``. Points missing either
    value are left out.
    """
    x_key = _preservation_key(points)
    series: dict[str, list[tuple[float, float, str]]] = {}
    for point in sorted(points, key=lambda p: float(p["scale"])):
        x, y = finite_number(point.get(x_key)), finite_number(point.get("efficacy"))
        if x is not None and y is not None:
            series.setdefault(str(point.get("model", "edit")), []).append((x, y, f"s={float(point['scale']):g}"))
    values = [v for s in series.values() for v in s]
    chart = [(name, PALETTE[i % len(PALETTE)], pts) for i, (name, pts) in enumerate(series.items())]
    x_name = "preservation (paired cosine)" if x_key == "paired_preservation" else "specificity"
    return _line_chart(
        chart,
        x_name,
        "efficacy",
        _range(v[0] for v in values),
        _range(v[1] for v in values),
        title,
    )


def scale_svg(points: Sequence[Mapping[str, Any]], title: str = "Metrics against edit strength") -> str:
    """SVG of each metric in :data:`SCALE_METRICS` against the scale (first series when there are several)."""
    names = list(dict.fromkeys(str(p.get("model", "edit")) for p in points))
    chosen = [p for p in points if str(p.get("model", "edit")) == names[0]] if names else []
    chosen.sort(key=lambda p: float(p["scale"]))
    chart = []
    for key, colour in SCALE_METRICS:
        pts = [(float(p["scale"]), v, "") for p in chosen if (v := finite_number(p.get(key))) is not None]
        if pts:
            chart.append((key.replace("paired_", ""), colour, pts))
    scales = [float(p["scale"]) for p in chosen]
    values = [v for _, _, pts in chart for _, v, _ in pts]
    suffix = f" ({names[0]})" if len(names) > 1 else ""
    if len(chart) == 1:  # keep a legend, so the one line is named
        chart.append(("", "#ffffff", []))
    return _line_chart(
        chart, "edit scale", "metric", _range(scales, 0.0, 0.0), _range(values), title + suffix, width=560
    )
