"""The report page: one self-contained HTML file (images inlined, no external assets) per set of evaluations."""

from __future__ import annotations

import base64
import datetime
import html
import io
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from erasure import __version__
from erasure.files import atomic_write_text
from erasure.report.evaluations import Evaluation, ReportError, evaluation_grid, finite_number, load_evaluation
from erasure.report.robustness import is_probe_folder, load_probe, robustness_section
from erasure.report.svg import scale_svg, tradeoff_svg

logger = logging.getLogger(__name__)

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
    columns = [c for c in METRIC_COLUMNS if any(finite_number(m.get(c[0])) is not None for m in metrics.values())]
    reference = evaluation.document.get("reference")
    head = "".join(f"<th>{html.escape(header)}</th>" for _, header, _ in columns)
    rows = []
    for label, values in metrics.items():
        name = html.escape(label) + (" <span class='meta'>(reference)</span>" if label == reference else "")
        cells = []
        for key, _, pattern in columns:
            value = values.get(key)
            missing = finite_number(value) is None
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
                    info.get("method", "") + (" (generation-time: no weights)" if info.get("generation_time") else ""),
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
    keys = [k for k, _, _ in METRIC_COLUMNS if any(finite_number(p.get(k)) is not None for p in points)]
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
        folders: Evaluation folders (or loaded :class:`Evaluation` objects), in page order, and probe folders
            (``erasure probe --out``), gathered in a robustness section after them.
        title: Page title.
        per_group: Prompts per role in grids drawn from saved images.

    Returns:
        The HTML page.
    """
    evaluations = [
        f if isinstance(f, Evaluation) else load_evaluation(f)
        for f in folders
        if isinstance(f, Evaluation) or not is_probe_folder(f)
    ]
    probes = [load_probe(f) for f in folders if not isinstance(f, Evaluation) and is_probe_folder(f)]
    if not evaluations and not probes:
        raise ReportError("Give at least one evaluation or probe folder to report on.")
    created = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    contents = "".join(
        f"<li><a href='#eval-{i}'>{html.escape(str(e.folder))}</a></li>" for i, e in enumerate(evaluations)
    ) + ("<li><a href='#robustness'>Robustness</a></li>" if probes else "")
    sections = "\n".join(
        _section(e, per_group).replace("<section>", f"<section id='eval-{i}'>", 1) for i, e in enumerate(evaluations)
    ) + robustness_section(probes)
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
