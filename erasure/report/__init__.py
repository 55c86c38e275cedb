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

from erasure.evaluation.sweep import SWEEP_FORMAT, SWEEP_NAME, sweep_point, write_sweep
from erasure.report.evaluations import GRID_NAME, Evaluation, ReportError, evaluation_grid, load_evaluation, load_sweep
from erasure.report.html import METRIC_COLUMNS, render_report, write_report
from erasure.report.svg import scale_svg, tradeoff_svg

__all__ = [
    "GRID_NAME",
    "METRIC_COLUMNS",
    "SWEEP_FORMAT",
    "SWEEP_NAME",
    "Evaluation",
    "ReportError",
    "evaluation_grid",
    "load_evaluation",
    "load_sweep",
    "render_report",
    "scale_svg",
    "sweep_point",
    "tradeoff_svg",
    "write_report",
    "write_sweep",
]
