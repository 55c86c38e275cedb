"""Comparison grids as a job: choose the rows, produce one column per model, draw and save with a manifest.

Two sources of columns, one grid:

* generated: the base model and each edit on the same prompts and seeds (:func:`erasure.generate.generate_paired`),
  rows from a concept file's held-out prompts or a prompt CSV (:func:`grid_rows`);
* saved: image folders or evaluation folders (:func:`folder_columns`), matched by prompt row and image index, so a
  grid can be drawn from the images an evaluation scored instead of generating them again.

Rows (:func:`select_rows`): the first row of each distinct prompt, at most ``per_group`` per role, in input order.
Drawing lives in :mod:`erasure.grid`; this module only decides what goes in it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from erasure import __version__
from erasure.files import load_image, read_image_folder, to_pil
from erasure.grid import comparison_grid, comparison_layout, save_grid, to_pil_images
from erasure.prompt_sets import PromptRow, role_of

__all__ = ["GridResult", "folder_columns", "grid_rows", "make_grid", "select_rows", "unique_label"]


def unique_label(label: str, taken: set[str] | dict[str, Any]) -> str:
    """``label``, primed (``'``) until it is not in ``taken``."""
    while label in taken:
        label += "'"
    return label


def select_rows(rows: Sequence[Any], per_group: int | None = 4) -> list[Any]:
    """Rows for a grid: the first row of each distinct prompt, at most ``per_group`` per role, in input order.

    Args:
        rows: :class:`erasure.prompt_sets.PromptRow` objects (anything with ``prompt`` and ``role``).
        per_group: Most prompts per role (``None``: all).

    Returns:
        The chosen rows, in input order.
    """
    chosen, prompts, counts = [], set(), {}
    for row in rows:
        if row.prompt in prompts or (per_group is not None and counts.get(row.role, 0) >= per_group):
            continue
        prompts.add(row.prompt)
        counts[row.role] = counts.get(row.role, 0) + 1
        chosen.append(row)
    return chosen


@dataclass(frozen=True)
class _FolderRow:
    key: tuple[int, int]
    prompt: str
    role: str
    seed: int


def folder_columns(
    folders: Sequence[str | Path], per_group: int | None = 4
) -> tuple[dict[str, list[Image.Image]], list[str], list[str], list[int]]:
    """Grid columns from saved image folders (``erasure evaluate`` output), matched by prompt row and seed.

    Each folder is one column: an image folder with a ``manifest.json`` (:func:`erasure.files.save_images`),
    or an evaluation folder, whose ``images/<model>`` subfolders each become a column (``base`` first). Only
    images present in every column are shown: per prompt row the first image index, at most ``per_group`` rows per
    role.

    Args:
        folders: The folders, in column order.
        per_group: Most prompts per role (``None``: all).

    Returns:
        ``(columns, prompts, groups, seeds)`` for :func:`comparison_grid`.

    Raises:
        ValueError: If a folder has no manifest describing its images, or the folders share no image.
    """
    expanded: list[Path] = []
    for folder in map(Path, folders):
        subfolders = sorted(p for p in (folder / "images").glob("*") if p.is_dir()) if folder.is_dir() else []
        expanded += sorted(subfolders, key=lambda p: p.name != "base") if subfolders else [folder]
    tables: dict[str, dict[tuple[int, int], Any]] = {}
    for folder in expanded:
        records, metadata, _ = read_image_folder(folder)
        if any(record.case_number is None or "prompt" not in record.info for record in records):
            raise ValueError(
                f"{folder} has no manifest.json saying which prompt each image shows; grids need folders written by "
                "erasure evaluate (or erasure.files.save_images)."
            )
        label = str(metadata.get("model") or folder.name)
        while label in tables:
            label += "'"
        tables[label] = {(record.case_number, record.index or 0): record for record in records}
    shared = set.intersection(*(set(table) for table in tables.values())) if tables else set()
    if not shared:
        raise ValueError(f"The folders {', '.join(map(str, expanded))} share no image (case_number, index).")
    first = next(iter(tables.values()))
    keys = sorted(shared)
    best: dict[int, tuple[int, int]] = {}
    for key in keys:
        best.setdefault(key[0], key)

    rows = []
    for key in best.values():
        info = first[key].info
        row_type = str((info.get("row") or {}).get("type") or info.get("type") or "")
        seed = info.get("seed", (info.get("row") or {}).get("evaluation_seed", 0))
        rows.append(_FolderRow(key, str(info["prompt"]), role_of(row_type), int(seed or 0)))
    rows = select_rows(rows, per_group)
    columns = {label: [to_pil(load_image(table[row.key].path)) for row in rows] for label, table in tables.items()}
    return columns, [row.prompt for row in rows], [row.role for row in rows], [row.seed for row in rows]


def grid_rows(concept: str | Path | None = None, prompts: str | Path | None = None) -> list[PromptRow]:
    """Prompt rows of a grid: a concept file's held-out prompts (else its erase/preserve prompts), or a prompt CSV.

    Raises:
        ValueError: Unless exactly one of ``concept`` and ``prompts`` is given.
    """
    from erasure.concepts import load_concepts
    from erasure.prompt_sets import load_prompt_csv, rows_from_request

    if (concept is None) == (prompts is None):
        raise ValueError("give one of --concept FILE or --prompts CSV")
    if prompts is not None:
        return load_prompt_csv(prompts)
    request = load_concepts(concept)
    try:
        return rows_from_request(request)
    except ValueError:  # no held-out prompts: show the prompts the method saw
        listed = [(p, "erased") for p in request.erase_prompts] + [(p, "preserved") for p in request.preserve_prompts]
        return [PromptRow(i, prompt, 0, row_type=kind) for i, (prompt, kind) in enumerate(listed)]


@dataclass(frozen=True)
class GridResult:
    """What :func:`make_grid` wrote: the PNG (its manifest is beside it, ``.json``) and the grid's size."""

    path: Path
    rows: int
    columns: int


def make_grid(
    out: str | Path,
    *,
    model: str | None = None,
    model_config: str | Path | None = None,
    edits: Sequence[str | Path] = (),
    concept: str | Path | None = None,
    prompts: str | Path | None = None,
    image_folders: Sequence[str | Path] = (),
    per_group: int | None = 4,
    seed: int = 0,
    scale: float = 1.0,
    steps: int = 25,
    guidance: float = 7.5,
    batch_size: int = 8,
    cell_size: int | None = None,
    title: str | None = None,
    device: str | None = None,
    base_check: bool = True,
    max_relative_change: float | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> GridResult:
    """Draw a comparison grid, base first then each edit, and save it with a manifest (atomically).

    Either generate (``model``, ``edits``, and ``concept`` or ``prompts``) or draw saved images
    (``image_folders``). ``model_config`` describes a single-file ``model`` (see
    :func:`erasure.pipeline.load_pipeline`). With a concept file, row ``i`` uses seed ``seed + i``; a CSV gives each
    row's seed.

    Returns:
        The :class:`GridResult`.

    Raises:
        FileExistsError: If ``out`` exists and ``overwrite`` is false (checked before any work).
        ValueError: On a contradictory or missing source.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another --out, or pass --overwrite to replace it")
    manifest: dict[str, Any] = {"format": "erasure-grid/1", "erasure_version": __version__}
    if image_folders:
        if model or edits or concept or prompts:
            raise ValueError("--images draws saved images; drop --model, --edit, --concept and --prompts")
        columns, texts, groups, seeds = folder_columns(image_folders, per_group=per_group)
        manifest |= {"source": "images", "folders": [str(f) for f in image_folders]}
    else:
        if not model:
            raise ValueError("--model is required to generate images (or pass --images DIR to draw saved ones)")
        rows = select_rows(grid_rows(concept, prompts), per_group)
        if concept is not None:
            rows = [dataclasses.replace(row, evaluation_seed=seed + i) for i, row in enumerate(rows)]
        columns, records = _generated_columns(
            (model, model_config), edits, rows, scale, steps, guidance, batch_size, device, base_check,
            max_relative_change, progress,
        )  # fmt: skip
        texts, groups, seeds = [r.prompt for r in rows], [r.role for r in rows], [r.evaluation_seed for r in rows]
        manifest |= {"source": str(concept or prompts), "model": model, "edits": records, "scale": scale}
        manifest |= {"steps": steps, "guidance": guidance}
    source = concept or prompts
    title = title or (f"{Path(source).stem}: base vs {len(columns) - 1} edit(s)" if source else None)
    image = comparison_grid(columns, texts, groups, seeds, title=title, cell_size=cell_size)
    size = to_pil_images(next(iter(columns.values()))[:1])[0].size
    layout = comparison_layout(list(columns), groups, size, cell_size=cell_size, title=title)
    manifest |= {
        "columns": list(columns),
        "rows": [{"prompt": p, "group": g, "seed": s} for p, g, s in zip(texts, groups, seeds, strict=True)],
        "layout": layout.to_dict(),
    }
    return GridResult(save_grid(image, out, manifest), len(texts), len(columns))


def _generated_columns(
    model: tuple[str, str | Path | None],
    edit_folders: Sequence[str | Path],
    rows: Sequence[PromptRow],
    scale: float,
    steps: int,
    guidance: float,
    batch_size: int,
    device: str | None,
    base_check: bool,
    max_relative_change: float | None,
    progress: bool,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from erasure.edit import fingerprint
    from erasure.generate import generate_paired
    from erasure.methods import load_edit
    from erasure.pipeline import load_pipeline

    edits, records = {}, []
    for folder in edit_folders:  # cheap checks first: a bad edit fails before the model loads
        edit = load_edit(folder, require_fingerprint=base_check)
        label = unique_label(f"{edit.config.get('method', 'edit')} ({Path(folder).name})", {**edits, "base": None})
        edits[label] = edit
        method = edit.config.get("method")
        records.append(
            {"label": label, "path": str(folder), "method": method, "fingerprint": fingerprint(edit.deltas)}
        )
    pipe = load_pipeline(model[0], device=device, config=model[1])
    pipe.set_progress_bar_config(disable=True)
    columns = generate_paired(
        pipe,
        edits,
        [row.prompt for row in rows],
        [row.evaluation_seed for row in rows],
        scale=scale,
        max_relative_change=max_relative_change,
        steps=steps,
        guidance_scale=guidance,
        batch_size=batch_size,
        progress=progress,
    )
    return columns, records
