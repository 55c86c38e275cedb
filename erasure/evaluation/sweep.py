"""Edit-strength sweeps: one edit evaluated at several strengths in one run, on the same prompts and seeds.

The edit at strength ``s`` is ``W0 + s * delta`` (:meth:`erasure.edit.Edit.apply_to` with ``scale=s``): 0 is the
base weights, 1 the edit as made, values above 1 overshoot. Every strength is generated and scored like any other
model, scale 0 included, so the sweep's base point carries measured numbers (its paired preservation against the
base images, its CMMD) rather than the values they should have.

``sweep.json`` (format ``erasure-sweep/1``)
------------------------------------------
Either a JSON list of points, or an object with the points and free metadata::

    {
      "format": "erasure-sweep/1",
      "edit": "runs/uce-van-gogh",          # optional metadata, shown above the plots
      "method": "uce",
      "points": [
        {"scale": 0.0, "efficacy": 0.05, "generality": 0.10, "specificity": 0.95, "harmonic_mean": 0.17,
         "paired_preservation": 1.0, "clip_score": 31.2, "cmmd": 0.0, "evaluation": "runs/sweep"},
        {"scale": 0.5, ...},
        {"scale": 1.0, ...}
      ]
    }

``scale`` is required; every other key is optional and named as in ``metrics.json`` (``preservation`` is accepted
as a short name for ``paired_preservation``), with ``null`` for undefined values. A point may name its series with
``"model"``, so one file can hold several edits' sweeps; points without it form one series. ``"evaluation"`` gives
the folder the point was measured in. :func:`erasure.report.load_sweep` reads the file for the report;
:func:`write_sweep` and :func:`sweep_points` (in :mod:`erasure.evaluation.results`, beside the other files a run
writes) write it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from erasure.evaluation.errors import EvaluationError
from erasure.evaluation.results import SWEEP_FORMAT, SWEEP_NAME, sweep_points, write_sweep

if TYPE_CHECKING:
    from erasure.prompt_sets import PromptRow

__all__ = ["SWEEP_FORMAT", "SWEEP_NAME", "run_sweep", "sweep_point", "sweep_points", "write_sweep"]


def sweep_point(metrics_json: str | Path, scale: float, model: str | None = None) -> dict[str, Any]:
    """One sweep point from an evaluation at one scale.

    Args:
        metrics_json: The evaluation's ``metrics.json`` (or its folder).
        scale: The scale the edit was applied at.
        model: The model label to take; default: the first model that is not the reference (base).

    Returns:
        ``{"scale": scale, <every metric of the model>, "evaluation": folder}``.

    Raises:
        EvaluationError: If the file cannot be read or has no such model.
    """
    path = Path(metrics_json)
    path = path / "metrics.json" if path.is_dir() else path
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise EvaluationError(f"Could not read {path} ({error}).") from error
    metrics = document.get("metrics", {})
    if model is None:
        reference = document.get("reference")
        model = next((label for label in metrics if label != reference), reference)
    if model not in metrics:
        raise EvaluationError(f"{path} has no model '{model}' (models: {', '.join(metrics)}).")
    return {"scale": float(scale), **metrics[model], "evaluation": str(path.parent)}


def run_sweep(
    out: str | Path,
    *,
    model: str,
    edit: str | Path,
    scales: Sequence[float],
    rows: Sequence[PromptRow],
    metadata: Mapping[str, Any] | None = None,
    **settings: Any,
) -> Path | None:
    """Evaluate one edit at each strength in ``scales`` against its base, in one run, and write ``sweep.json``.

    Every strength (0 included) is generated from the same prompts and seeds as the base and scored like any
    model: the output folder is an ordinary evaluation (``metrics.json`` lists ``base`` and ``<edit>-scale-<s>``)
    with ``sweep.json`` beside it, written before the folder is renamed into place.

    Args:
        out: Output folder.
        model: The base pipeline.
        edit: The edit folder.
        scales: Strengths, in the order the points are listed (``0`` measures the base weights).
        rows: The prompt rows.
        metadata: Extra keys of ``sweep.json`` (``{"concept": ...}``); ``edit`` and ``method`` are filled in.
        **settings: Further :class:`erasure.evaluation.EvaluationConfig` fields (``clip``, ``steps``, ...).

    Returns:
        The output folder on the main process, ``None`` on the others.
    """
    from erasure.evaluation.run import EvaluationConfig, execute

    config = EvaluationConfig(model=model, edits=(edit,), scales=tuple(scales), rows=rows, **settings)
    return execute(out, config, sweep_metadata=metadata)
