"""A self-contained HTML report of one or more evaluations: grids, metric tables, provenance and trade-off plots.

``erasure report DIR... --out report.html`` reads each evaluation folder written by ``erasure evaluate``
(:mod:`erasure.evaluation`: ``metrics.json``, ``per_image.csv``, ``images/<model>/``) and writes one HTML page with
everything inlined: images as base64 ``data:`` URIs, plots as inline SVG drawn here, styles in a ``<style>`` tag.
The page loads nothing from anywhere, so it can be mailed or archived as one file.

Per folder the page shows:

* the comparison grid: ``grid.png`` from the folder if there is one (``erasure grid ... --out DIR/grid.png``),
  otherwise one drawn from ``per_image.csv`` and the saved images (a few prompts per role, first seed);
* the metrics of each model (:data:`METRIC_COLUMNS`), and its provenance: CLIP model and tag, templates, steps,
  guidance, image size, seeds, prompt set and its SHA-256, model sources and fingerprints, package versions;
* if the folder has a ``sweep.json``: the trade-off of erasure against preservation as an edit's strength is
  swept, as two plots and a table.

``sweep.json`` (format ``erasure-sweep/1``)
------------------------------------------
Either a JSON list of points, or an object with the points and free metadata::

    {
      "format": "erasure-sweep/1",
      "edit": "runs/uce-van-gogh",          # optional metadata, shown above the plots
      "method": "uce",
      "points": [
        {"scale": 0.0, "efficacy": 0.05, "generality": 0.10, "specificity": 0.95, "harmonic_mean": 0.17,
         "paired_preservation": 1.0, "clip_score": 31.2, "cmmd": 0.0},
        {"scale": 0.5, ...},
        {"scale": 1.0, ...}
      ]
    }

Each point is one evaluation of the edit applied at ``scale`` (``Edit.apply_to(pipe, scale=...)``: 0 is the base
model, 1 the edit as made; values above 1 are allowed). ``scale`` is required; every other key is optional and
named as in ``metrics.json`` (``efficacy``, ``generality``, ``specificity``, ``harmonic_mean``, ``clip_score``,
``clip_score_<role>``, ``paired_preservation``, ``cmmd``, ...; ``preservation`` is accepted as a short name for
``paired_preservation``), with ``null`` for undefined values. A point may name its series with ``"model"`` (for
example the method), so one file can hold several edits' sweeps; points without it form one series. Optional
``"evaluation"`` gives the folder the point was measured in. :func:`erasure.evaluation.run_sweep` measures a
sweep and writes the file; :func:`sweep_point` and :func:`write_sweep` (from :mod:`erasure.evaluation.sweep`) build
one from other evaluations.

The trade-off plot puts preservation on x (``paired_preservation``, else ``specificity``) and ``efficacy`` on y,
one line per series through the points in scale order; the second plot shows each metric against the scale.
"""

from __future__ import annotations

import base64
import csv
import datetime
import html
import io
import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from erasure import __version__
from erasure.evaluation.sweep import SWEEP_FORMAT, SWEEP_NAME, sweep_point, write_sweep
from erasure.files import atomic_write_text

logger = logging.getLogger(__name__)

__all__ = [
    "METRIC_COLUMNS",
    "SWEEP_FORMAT",
    "SWEEP_NAME",
    "Evaluation",
    "ReportError",
    "evaluation_grid",
    "load_evaluation",
    "load_sweep",
    "render_report",
    "sweep_point",
    "tradeoff_svg",
    "scale_svg",
    "write_report",
    "write_sweep",
]

GRID_NAME = "grid.png"

#: Metric table columns: (metrics.json key, header, format). Columns no model has a value for are left out.
METRIC_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("n_images", "images", "{:d}"),
    ("efficacy", "efficacy", "{:.3f}"),
    ("generality", "generality", "{:.3f}"),
    ("specificity", "specificity", "{:.3f}"),
    ("harmonic_mean", "harmonic mean", "{:.3f}"),
    ("clip_score", "CLIP score", "{:.2f}"),
    ("clip_score_erased", "CLIP erased", "{:.2f}"),
    ("clip_score_generality", "CLIP generality", "{:.2f}"),
    ("clip_score_preserved", "CLIP preserved", "{:.2f}"),
    ("paired_preservation", "preservation", "{:.3f}"),
    ("paired_preservation_preserved", "preservation (preserved)", "{:.3f}"),
    ("cmmd", "CMMD", "{:.3f}"),
    ("target_vs_anchor", "target vs anchor", "{:.3f}"),
    ("zero_shot_top1", "zero-shot top-1", "{:.3f}"),
)
#: Sweep metrics drawn against the scale, with their colours.
SCALE_METRICS: tuple[tuple[str, str], ...] = (
    ("efficacy", "#d62728"),
    ("generality", "#ff7f0e"),
    ("specificity", "#1f77b4"),
    ("paired_preservation", "#2ca02c"),
    ("harmonic_mean", "#9467bd"),
)
PALETTE = ("#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")


class ReportError(ValueError):
    """An evaluation folder or sweep file cannot be read; the message names the file and what to do."""


# --------------------------------------------------------------------------------------------------------------
# Reading evaluations and sweeps
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Evaluation:
    """What a report shows of one evaluation folder.

    Attributes:
        folder: The folder.
        document: ``metrics.json`` as a dict.
        per_image: ``per_image.csv`` rows (empty if the file is missing).
        grid: ``grid.png`` in the folder, if any.
        sweep: The sweep points (see the module docstring), if the folder has a ``sweep.json``.
        sweep_meta: The sweep file's metadata (everything but its points).
    """

    folder: Path
    document: dict[str, Any]
    per_image: list[dict[str, str]] = field(default_factory=list)
    grid: Path | None = None
    sweep: list[dict[str, Any]] | None = None
    sweep_meta: dict[str, Any] = field(default_factory=dict)

    @property
    def models(self) -> list[str]:
        """Model labels, in ``metrics.json`` order."""
        return list(self.document.get("metrics", {}))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReportError(f"{path} does not exist.") from None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ReportError(f"{path} is not valid JSON ({error}).") from error


def load_sweep(path: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Read a ``sweep.json`` (a list of points, or ``{"points": [...], ...metadata}``).

    Returns:
        ``(points sorted by series then scale, metadata)``; ``preservation`` keys are renamed
        ``paired_preservation``.

    Raises:
        ReportError: If the file is not JSON, has no points, or a point lacks a numeric ``scale``.
    """
    path = Path(path)
    data = _read_json(path)
    meta: dict[str, Any] = {}
    if isinstance(data, Mapping):
        meta = {k: v for k, v in data.items() if k != "points"}
        data = data.get("points")
    if not isinstance(data, list) or not data:
        raise ReportError(f'{path} holds no sweep points; write a list of {{"scale": ..., "efficacy": ...}}.')
    points = []
    for index, point in enumerate(data):
        if not isinstance(point, Mapping) or not isinstance(point.get("scale"), int | float):
            raise ReportError(f"{path}: point #{index + 1} needs a numeric 'scale' (the edit's strength).")
        point = dict(point)
        if "preservation" in point and "paired_preservation" not in point:
            point["paired_preservation"] = point.pop("preservation")
        points.append(point)
    points.sort(key=lambda p: (str(p.get("model", "")), float(p["scale"])))
    return points, meta


def load_evaluation(folder: str | Path) -> Evaluation:
    """Read an evaluation folder (``metrics.json``; ``per_image.csv``, ``grid.png``, ``sweep.json`` if present).

    Raises:
        ReportError: If the folder or its ``metrics.json`` is missing or unreadable.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ReportError(f"No evaluation folder at {folder}; pass folders written by erasure evaluate.")
    document = _read_json(folder / "metrics.json")
    if not isinstance(document, Mapping) or not isinstance(document.get("metrics"), Mapping):
        raise ReportError(f"{folder / 'metrics.json'} has no 'metrics' table; is it an erasure evaluation?")
    per_image_name = (document.get("files") or {}).get("per_image", "per_image.csv")
    per_image: list[dict[str, str]] = []
    if (folder / per_image_name).is_file():
        with open(folder / per_image_name, encoding="utf-8", newline="") as handle:
            per_image = list(csv.DictReader(handle))
    evaluation = Evaluation(folder, dict(document), per_image)
    if (folder / GRID_NAME).is_file():
        evaluation.grid = folder / GRID_NAME
    if (folder / SWEEP_NAME).is_file():
        evaluation.sweep, evaluation.sweep_meta = load_sweep(folder / SWEEP_NAME)
    return evaluation


# --------------------------------------------------------------------------------------------------------------
# Grid of an evaluation
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _GridRow:
    case: int
    prompt: str
    role: str
    seed: int


def evaluation_grid(evaluation: Evaluation, per_group: int = 4) -> Image.Image | None:
    """A comparison grid drawn from ``per_image.csv`` and the saved images; ``None`` when images are missing.

    Per role, the first ``per_group`` prompt rows (their first image) that every model has an image of.
    """
    from erasure.comparison import select_rows
    from erasure.grid import comparison_grid

    by_model: dict[str, dict[int, dict[str, str]]] = {}
    for row in evaluation.per_image:
        try:
            case, sample = int(row["case_number"]), int(row.get("sample_index") or 0)
        except (KeyError, ValueError):
            continue
        first = by_model.setdefault(row.get("model", ""), {})
        if case not in first or sample < int(first[case].get("sample_index") or 0):
            first[case] = row
    models = [label for label in evaluation.models if label in by_model] or list(by_model)
    if not models:
        return None

    def image_path(row: Mapping[str, str]) -> Path:
        path = Path(row.get("image", ""))
        return path if path.is_absolute() else evaluation.folder / path

    def complete(case: int) -> bool:
        return all(case in by_model[m] and image_path(by_model[m][case]).is_file() for m in models)

    rows = []
    for case, row in by_model[models[0]].items():
        if complete(case):
            seed = int(float(row.get("seed") or 0))
            rows.append(_GridRow(case, row.get("prompt", ""), row.get("role") or "other", seed))
    if not rows:
        return None
    rows = select_rows(rows, per_group)
    columns = {}
    for model in models:
        images = []
        for row in rows:
            with Image.open(image_path(by_model[model][row.case])) as image:
                images.append(image.convert("RGB"))
        columns[model] = images
    prompts_info = evaluation.document.get("prompts", {})
    title = f"{evaluation.folder.name}: {Path(prompts_info.get('source') or 'prompts').name}"
    return comparison_grid(
        columns, [r.prompt for r in rows], [r.role for r in rows], [r.seed for r in rows], title=title
    )


# --------------------------------------------------------------------------------------------------------------
# SVG plots
# --------------------------------------------------------------------------------------------------------------


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


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
        if any(_number(p.get(key)) is not None for p in points):
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
        x, y = _number(point.get(x_key)), _number(point.get("efficacy"))
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
        pts = [(float(p["scale"]), v, "") for p in chosen if (v := _number(p.get(key))) is not None]
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


# --------------------------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------------------------

STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px; color: #1a1a1a;
       background: #ffffff; }
h1 { font-size: 22px; } h2 { font-size: 18px; border-bottom: 2px solid #c9d1e3; padding-bottom: 4px; }
h3 { font-size: 15px; margin-top: 18px; }
table { border-collapse: collapse; margin: 8px 0; font-size: 13px; }
th { background: #dde3f0; text-align: left; }
th, td { border: 1px solid #b8bfcc; padding: 4px 8px; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.missing { color: #999; text-align: center; }
img.grid { max-width: 100%; border: 1px solid #ccc; image-rendering: pixelated; }
.plots { display: flex; flex-wrap: wrap; gap: 16px; }
.meta { color: #555; font-size: 12px; }
code { font-size: 12px; }
"""


def _png_data_uri(image: Image.Image | Path) -> str:
    if isinstance(image, Path):
        data = image.read_bytes()
        if not data.startswith(b"\x89PNG"):
            with Image.open(image) as opened:
                return _png_data_uri(opened.convert("RGB"))
    else:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", optimize=True)
        data = buffer.getvalue()
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _format(value: Any, pattern: str) -> str:
    if value is None or value == "":
        return "-"
    try:
        return pattern.format(int(value) if pattern == "{:d}" else float(value))
    except (TypeError, ValueError):
        return html.escape(str(value))


def _metrics_table(evaluation: Evaluation) -> str:
    metrics = evaluation.document.get("metrics", {})
    columns = [c for c in METRIC_COLUMNS if any(_number(m.get(c[0])) is not None for m in metrics.values())]
    reference = evaluation.document.get("reference")
    head = "".join(f"<th>{html.escape(header)}</th>" for _, header, _ in columns)
    rows = []
    for label, values in metrics.items():
        name = html.escape(label) + (" <span class='meta'>(reference)</span>" if label == reference else "")
        cells = []
        for key, _, pattern in columns:
            value = values.get(key)
            missing = _number(value) is None
            cells.append(f"<td class='{'missing' if missing else 'num'}'>{_format(value, pattern)}</td>")
        rows.append(f"<tr><th>{name}</th>{''.join(cells)}</tr>")
    return f"<table class='metrics'><tr><th>model</th>{head}</tr>{''.join(rows)}</table>"


def _seeds_summary(generation: Mapping[str, Any]) -> str:
    seeds = [s for s in generation.get("seeds") or [] if isinstance(s, int | float)]
    per_prompt = generation.get("seeds_per_prompt")
    text = f"{len(seeds)} images" if seeds else "not recorded"
    if seeds:
        text += f", seeds {int(min(seeds))}-{int(max(seeds))} ({len(set(seeds))} distinct)"
    if per_prompt:
        text += f", {per_prompt} per prompt row"
    return text


def _provenance_table(evaluation: Evaluation) -> str:
    doc = evaluation.document
    clip = doc.get("clip") or {}
    generation = doc.get("generation") or {}
    prompts = doc.get("prompts") or {}
    versions = doc.get("versions") or {}
    size = f"{generation.get('width')}x{generation.get('height')}" if generation.get("width") else "-"
    roles = ", ".join(f"{k}: {v}" for k, v in (prompts.get("roles") or {}).items())
    templates = clip.get("templates") or []
    items = [
        ("CLIP", f"{clip.get('model', '-')} : {clip.get('pretrained') or '(local)'}"),
        ("templates", f"{len(templates)}: " + " | ".join(map(str, templates))),
        ("steps", generation.get("steps")),
        ("guidance", generation.get("guidance")),
        ("image size", size),
        ("seeds", _seeds_summary(generation)),
        ("prompts", f"{prompts.get('source') or '-'} ({prompts.get('kind') or '-'}), {prompts.get('rows', '-')} rows"),
        ("prompt roles", roles or "-"),
        ("prompts sha256", prompts.get("sha256") or "-"),
        ("created", doc.get("created", "-")),
        ("processes", doc.get("num_processes", "-")),
        ("versions", ", ".join(f"{k} {v}" for k, v in versions.items()) or "-"),
    ]
    rows = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v if v is not None else '-'))}</td></tr>" for k, v in items
    )
    models = doc.get("models") or {}
    model_rows = []
    for label, info in models.items():
        fingerprint = str(info.get("edit_fingerprint") or info.get("weights_sha256") or "")
        model_rows.append(
            "<tr>"
            + "".join(
                f"<td>{html.escape(str(v))}</td>"
                for v in (
                    label,
                    info.get("kind", ""),
                    info.get("source", ""),
                    info.get("method", ""),
                    fingerprint[:16],
                )
            )
            + "</tr>"
        )
    model_table = (
        "<table class='models'><tr><th>model</th><th>kind</th><th>source</th><th>method</th>"
        f"<th>fingerprint</th></tr>{''.join(model_rows)}</table>"
        if model_rows
        else ""
    )
    return f"<table class='provenance'>{rows}</table>{model_table}"


def _sweep_section(evaluation: Evaluation) -> str:
    points = evaluation.sweep or []
    meta = ", ".join(f"{k}: {v}" for k, v in evaluation.sweep_meta.items() if k != "format")
    keys = [k for k, _, _ in METRIC_COLUMNS if any(_number(p.get(k)) is not None for p in points)]
    patterns = {k: pattern for k, _, pattern in METRIC_COLUMNS}
    has_series = any("model" in p for p in points)
    headers = {k: header for k, header, _ in METRIC_COLUMNS}
    head = ("<th>series</th>" if has_series else "") + "<th>scale</th>"
    head += "".join(f"<th>{html.escape(headers[k])}</th>" for k in keys)
    body = "".join(
        "<tr>"
        + (f"<td>{html.escape(str(p.get('model', '')))}</td>" if has_series else "")
        + f"<td class='num'>{float(p['scale']):g}</td>"
        + "".join(f"<td class='num'>{_format(p.get(k), patterns[k])}</td>" for k in keys)
        + "</tr>"
        for p in points
    )
    return (
        "<h3>Strength sweep</h3>"
        + (f"<p class='meta'>{html.escape(meta)}</p>" if meta else "")
        + f"<div class='plots'>{tradeoff_svg(points)}{scale_svg(points)}</div>"
        + f"<table class='sweep'><tr>{head}</tr>{body}</table>"
    )


def _section(evaluation: Evaluation, per_group: int) -> str:
    name = html.escape(str(evaluation.folder))
    parts = [f"<section><h2>{name}</h2>"]
    grid: Image.Image | Path | None = evaluation.grid
    if grid is None:
        try:
            grid = evaluation_grid(evaluation, per_group=per_group)
        except (OSError, ValueError) as error:
            logger.warning("No grid for %s: %s", evaluation.folder, error)
    if grid is not None:
        parts.append(f"<img class='grid' alt='comparison grid of {name}' src='{_png_data_uri(grid)}'>")
    else:
        parts.append("<p class='meta'>No grid: the folder has no grid.png and no saved images.</p>")
    parts.append("<h3>Metrics</h3>" + _metrics_table(evaluation))
    if evaluation.sweep:
        parts.append(_sweep_section(evaluation))
    parts.append("<h3>Provenance</h3>" + _provenance_table(evaluation))
    parts.append("</section>")
    return "\n".join(parts)


def render_report(
    folders: Sequence[str | Path | Evaluation], title: str = "Concept erasure report", per_group: int = 4
) -> str:
    """The report as one self-contained HTML string.

    Args:
        folders: Evaluation folders (or loaded :class:`Evaluation` objects), in page order.
        title: Page title.
        per_group: Prompts per role in grids drawn from saved images.

    Returns:
        The HTML page.
    """
    evaluations = [f if isinstance(f, Evaluation) else load_evaluation(f) for f in folders]
    if not evaluations:
        raise ReportError("Give at least one evaluation folder to report on.")
    created = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    contents = "".join(
        f"<li><a href='#eval-{i}'>{html.escape(str(e.folder))}</a></li>" for i, e in enumerate(evaluations)
    )
    sections = "\n".join(
        _section(e, per_group).replace("<section>", f"<section id='eval-{i}'>", 1) for i, e in enumerate(evaluations)
    )
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p class='meta'>erasure {html.escape(__version__)}, written {created}</p>"
        f"<ul>{contents}</ul>{sections}</body></html>\n"
    )


def write_report(
    folders: Sequence[str | Path],
    out: str | Path,
    title: str = "Concept erasure report",
    per_group: int = 4,
    overwrite: bool = False,
) -> Path:
    """Write :func:`render_report` to ``out`` atomically (a temporary file renamed into place).

    Args:
        folders: Evaluation folders, one section each.
        out: The HTML file.
        title: Page title.
        per_group: Prompts per role in grids drawn from saved images.
        overwrite: Replace an existing ``out`` (atomically); otherwise it is refused before any work.

    Returns:
        ``out`` as a ``Path``.

    Raises:
        FileExistsError: If ``out`` exists and ``overwrite`` is false.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another --out, or pass --overwrite to replace it")
    atomic_write_text(out, render_report(folders, title=title, per_group=per_group))
    return out
