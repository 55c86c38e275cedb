"""Reading what a report shows: evaluation folders, their sweeps, and a grid drawn from their saved images."""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from erasure.evaluation.sweep import SWEEP_NAME

logger = logging.getLogger(__name__)

GRID_NAME = "grid.png"


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


def finite_number(value: Any) -> float | None:
    """``value`` as a float when it is a finite number (not a bool), else ``None``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None
