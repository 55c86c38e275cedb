"""The robustness section of the report: what each ``erasure probe`` found, as a table and a recovery chart.

A probe folder (``erasure probe --out DIR``) holds ``summary.json`` and ``verdict.json``. Per folder the section
shows the verdict with its reason and the surfaces that bring the concept back, then one row per attack: its
surface, the target rate under attack with its 95% interval, the gap it closes between the edited and the base
model (``(attacked - edited) / (base - edited)``, with its interval), the attack success rate in UnlearnDiffAtk's
denominator (of prompts the edit had erased) and its cost; and a chart of each attack's attacked rate against the
base and edited rates, so a reader sees at a glance how much of the concept each attack brings back.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from erasure.report.evaluations import ReportError

__all__ = ["Probe", "curve_svg", "is_probe_folder", "load_probe", "recovery_svg", "robustness_section"]

SUMMARY_NAME, VERDICT_NAME = "summary.json", "verdict.json"


@dataclass
class Probe:
    """One probe folder: its summary and verdict."""

    folder: Path
    summary: dict[str, Any]
    verdict: dict[str, Any]


def is_probe_folder(folder: str | Path) -> bool:
    """Whether ``folder`` was written by ``erasure probe`` (it holds ``verdict.json`` and ``summary.json``)."""
    folder = Path(folder)
    return (folder / VERDICT_NAME).is_file() and (folder / SUMMARY_NAME).is_file()


def load_probe(folder: str | Path) -> Probe:
    """Read a probe folder.

    Raises:
        ReportError: If a file is missing or is not the probe's JSON.
    """
    folder = Path(folder)
    documents = []
    for name in (SUMMARY_NAME, VERDICT_NAME):
        try:
            document = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise ReportError(
                f"{folder / name} cannot be read ({error}); is {folder} an erasure probe folder?"
            ) from None
        if not isinstance(document, Mapping):
            raise ReportError(f"{folder / name} does not hold a JSON object; is it an erasure probe folder?")
        documents.append(dict(document))
    summary, verdict = documents
    if not isinstance(summary.get("attacks"), Mapping) or "verdict" not in verdict:
        raise ReportError(f"{folder} has no attacks or no verdict; is it an erasure probe folder?")
    return Probe(folder, summary, verdict)


def _rate(entry: Mapping[str, Any] | None) -> str:
    if not entry or entry.get("rate") is None:
        return "–"
    return f"{entry['rate']:.0%} [{entry['low']:.0%}, {entry['high']:.0%}]"


def _gap(entry: Mapping[str, Any] | None) -> str:
    if not entry or entry.get("value") is None:
        return "–"
    return f"{entry['value']:.2f} [{entry['low']:.2f}, {entry['high']:.2f}]"


def _asr(entry: Mapping[str, Any] | None) -> str:
    """Both denominators: UnlearnDiffAtk's (every prompt) and P4D's (the prompts the edit had erased)."""
    if not entry or entry.get("asr") is None:
        return "–"
    text = f"{entry['asr']:.0%} of {entry.get('prompts', '?')}"
    if entry.get("conditional_asr") is not None:
        text += f" / {entry['conditional_asr']:.0%} of {entry.get('ideal_prompts', '?')}"
    return text


def _cost(entry: Mapping[str, Any] | None) -> str:
    if not entry:
        return "–"
    return f"{entry.get('unet_forward_rows', 0):,} rows, {entry.get('seconds', 0):.0f} s"


def _neighbours(entry: Mapping[str, Any] | None) -> str:
    """The neighbour ratio under the attack's sampling, with its interval (``–`` where not measured)."""
    if not entry or entry.get("ratio") is None:
        return "–"
    low, high = entry.get("ratio_interval") or (None, None)
    return f"{entry['ratio']:.2f}" + (f" [{low:.2f}, {high:.2f}]" if low is not None else "")


def _witness(entry: Mapping[str, Any] | None) -> str:
    """How often the second judge agreed with the judge, and the target rate it saw (``–`` without a witness)."""
    if not entry or not entry.get("images"):
        return "–"
    agreement, seen = entry["agreement"]["rate"], entry["witness_rate"]["rate"]
    return f"agrees on {agreement:.0%} of {entry['images']}; sees the target in {seen:.0%}"


def recovery_svg(probe: Probe, width: int = 520, bar: int = 22) -> str:
    """A horizontal bar per attack (its attacked target rate), with the base and edited rates as lines."""
    attacks = probe.summary["attacks"]
    columns = probe.summary.get("columns", {})
    base = (columns.get("base") or {}).get("rate")
    edited = (columns.get("edited") or {}).get("rate")
    label_width, margin = 130, 10
    plot = width - label_width - 2 * margin
    height = margin * 2 + bar * max(1, len(attacks)) + 24
    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' role='img'>"]
    for i, (name, attack) in enumerate(attacks.items()):
        y = margin + i * bar
        attacked = (attack.get("metrics", {}).get("attacked") or {}).get("rate") or 0.0
        parts.append(f"<text x='{label_width - 6}' y='{y + bar * 0.7:.0f}' text-anchor='end' "
                     f"font-size='12'>{html.escape(name)}</text>")  # fmt: skip
        parts.append(f"<rect x='{label_width}' y='{y + 3}' width='{plot * attacked:.1f}' height='{bar - 6}' "
                     f"fill='#c0504d'><title>{html.escape(name)}: {attacked:.0%}</title></rect>")  # fmt: skip
    bottom = margin + bar * max(1, len(attacks))
    for value, colour, text in ((base, "#4f81bd", "base"), (edited, "#555", "edited")):
        if value is None:
            continue
        x = label_width + plot * value
        parts.append(f"<line x1='{x:.1f}' x2='{x:.1f}' y1='{margin}' y2='{bottom}' stroke='{colour}' "
                     "stroke-dasharray='4 3' stroke-width='2'/>")  # fmt: skip
        parts.append(f"<text x='{x:.1f}' y='{bottom + 16}' text-anchor='middle' font-size='11' "
                     f"fill='{colour}'>{text} {value:.0%}</text>")  # fmt: skip
    parts.append("</svg>")
    return "".join(parts)


def curve_svg(name: str, attack: Mapping[str, Any], width: int = 520, height: int = 180) -> str:
    """Target rate against fine-tuning steps (relearning), the edited model's and the reference's lines.

    Empty for an attack without a curve. The steps axis starts at 0, where the edited model's rate is the plain
    prompts' (not drawn: the curve's first point is the first checkpoint).
    """
    curves = [(attack.get("curve"), "#c0504d", "edited")]
    curves.append((attack.get("reference_curve"), "#4f81bd", "reference (never learned it)"))
    if not curves[0][0]:
        return ""
    left, right, top, bottom = 40, 170, 10, 26
    plot_w, plot_h = width - left - right, height - top - bottom
    last = max(point["steps"] for points, _, _ in curves if points for point in points) or 1
    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' role='img'>",
             f"<title>{html.escape(name)}: target rate against steps</title>",
             f"<line x1='{left}' x2='{left + plot_w}' y1='{top + plot_h}' y2='{top + plot_h}' stroke='#999'/>",
             f"<line x1='{left}' x2='{left}' y1='{top}' y2='{top + plot_h}' stroke='#999'/>",
             f"<text x='{left - 4}' y='{top + 8}' text-anchor='end' font-size='10'>100%</text>",
             f"<text x='{left - 4}' y='{top + plot_h}' text-anchor='end' font-size='10'>0%</text>",
             f"<text x='{left + plot_w / 2:.0f}' y='{height - 6}' text-anchor='middle' font-size='11'>"
             f"{html.escape(name)} steps (last {last})</text>"]  # fmt: skip
    for row, (points, colour, label) in enumerate(curves):
        if not points:
            continue
        xy = [(left + plot_w * point["steps"] / last, top + plot_h * (1 - (point["target_rate"]["rate"] or 0.0)))
              for point in points]  # fmt: skip
        parts.append(f"<polyline fill='none' stroke='{colour}' stroke-width='2' "
                     f"points='{' '.join(f'{x:.1f},{y:.1f}' for x, y in xy)}'/>")  # fmt: skip
        for (x, y), point in zip(xy, points, strict=True):
            parts.append(f"<circle cx='{x:.1f}' cy='{y:.1f}' r='3' fill='{colour}'><title>{html.escape(label)}, "
                         f"{point['steps']} steps: {point['target_rate']['rate']:.0%}</title></circle>")  # fmt: skip
        parts.append(f"<text x='{left + plot_w + 8}' y='{top + 14 + 16 * row}' font-size='11' "
                     f"fill='{colour}'>{html.escape(label)}</text>")  # fmt: skip
    parts.append("</svg>")
    return "".join(parts)


def _likelihood_line(gaps: Mapping[str, Any] | None) -> str:
    """The likelihood gaps in one sentence (empty when the probe did not measure them)."""
    if not gaps:
        return ""
    return (
        f"<p>Likelihood gaps: {html.escape(str(gaps.get('pattern', '')))}; D_uncond {_gap(gaps.get('D_uncond'))}, "
        f"D_cond {_gap(gaps.get('D_cond'))} (edited minus base denoising loss, concept minus neighbours).</p>"
    )


def _skipped_line(skipped: Mapping[str, Any] | None) -> str:
    """Which attacks the probe did not run because the plain prompts had decided (empty when none)."""
    if not skipped:
        return ""
    return f" Not run, since the plain prompts decided: {html.escape(', '.join(skipped.get('attacks') or []))}."


def _probe_section(probe: Probe) -> str:
    verdict, summary = probe.verdict, probe.summary
    models = summary.get("models") or {}
    under_test = models.get("under_test") or {}
    what = models.get("method") or under_test.get("method") or under_test.get("kind") or "model under test"
    concept = summary.get("concept") or ""
    concept = concept.get("name", "") if isinstance(concept, Mapping) else str(concept)
    surfaces = ", ".join(verdict.get("surfaces") or []) or "none"
    suppression = verdict.get("suppression")
    rows = []
    columns = summary.get("columns", {})
    settings = summary.get("settings") or {}
    witnessed = bool(settings.get("witness"))
    upper_bound = "; it also selected: its rates are upper bounds" if settings.get("witness_is_selector") else ""
    witness_header = f"<th>second judge (witness{upper_bound})</th>" if witnessed else ""

    def witness_cell(entry: Mapping[str, Any] | None) -> str:
        return f"<td>{html.escape(_witness(entry))}</td>" if witnessed else ""

    rows.append(
        f"<tr><td>plain prompts</td><td>–</td><td>base {_rate(columns.get('base'))}, edited "
        f"{_rate(columns.get('edited'))}</td><td>–</td><td>–</td><td>–</td>"
        f"{witness_cell((columns.get('witness') or {}).get('edited'))}<td>{_cost(columns.get('cost'))}</td></tr>"
    )
    states = verdict.get("attacks") or {}
    for name, attack in summary["attacks"].items():
        metrics = attack.get("metrics") or {}
        state = (states.get(name) or {}).get("state", "")
        rows.append(
            f"<tr><td>{html.escape(name)}</td><td>{html.escape(str(attack.get('surface', '')))}</td>"
            f"<td>{_rate(metrics.get('attacked'))}</td><td>{_gap(metrics.get('gap_closed'))} "
            f"{html.escape(state)}</td><td>{_asr(metrics.get('asr'))}</td>"
            f"<td>{_neighbours(attack.get('neighbour_cost'))}</td>{witness_cell(attack.get('witness'))}"
            f"<td>{_cost(attack.get('cost'))}</td></tr>"
        )
    return (
        f"<h3>{html.escape(str(probe.folder))}: {html.escape(str(what))}"
        f"{' on ' + html.escape(concept) if concept else ''}</h3>"
        f"<p><b>{html.escape(str(verdict.get('verdict')))}</b>: {html.escape(str(verdict.get('reason', '')))}. "
        f"Surfaces that bring it back: {html.escape(surfaces)}."
        f"{_skipped_line(summary.get('skipped'))}"
        f"{' Generation-time suppression: ' + html.escape(str(suppression)) + '.' if suppression else ''} Judge "
        f"{html.escape(str((verdict.get('judge') or {}).get('kind', '?')))}, selector "
        f"{html.escape(str((verdict.get('selector') or {}).get('kind', '?')))}.</p>"
        + _likelihood_line(summary.get("likelihood"))
        + "<table><tr><th>attack</th><th>surface</th><th>target rate attacked</th><th>gap closed</th>"
        "<th>ASR: of all prompts / of the prompts the edit erased</th><th>neighbour ratio under the attack</th>"
        + witness_header
        + "<th>cost</th></tr>"
        + "".join(rows)
        + "</table>"
        + recovery_svg(probe)
        + "".join(curve_svg(name, attack) for name, attack in summary["attacks"].items())
    )


def robustness_section(probes: Sequence[Probe]) -> str:
    """The report section of the probes, in order (empty without probes)."""
    if not probes:
        return ""
    return (
        "<section id='robustness'><h2>Robustness: erased, or only hidden?</h2>"
        + "".join(_probe_section(probe) for probe in probes)
        + "</section>"
    )
