"""The main job on the shipped toy world: erase ``Pip`` with UCE, then grid, evaluate and report.

``make demo`` runs :func:`run_demo`. Every step is an ordinary library call, so the demo doubles as a worked
example of the data flow ``concept file -> EraseRequest -> method.apply -> Edit -> generate -> evaluate -> report``:

1. ``samples.png``: a labelled sample grid of the toy world from the base checkpoint.
2. ``edit/``: the UCE edit (``edit.safetensors`` deltas + ``edit_config.json``).
3. ``evaluation/``: base and edited images from the same held-out prompts and seeds, the edit at each strength of
   a sweep (0, 0.5 and 1: the trade-off curve, scale 0 measured like the others), scored with the toy CLIP
   (``metrics.json``, ``per_image.csv``, ``sweep.json``: :func:`erasure.evaluation.run_sweep`).
4. ``grid.png``: base versus edited, erased prompts above preserved ones, same seed per row.
5. ``report.html``: one self-contained page with the grid, the metrics table and the trade-off plot.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

SAMPLE_SUBJECTS = (
    "Pip", "Zog", "Miro", "a red circle", "a green square", "a blue triangle", "a yellow cross", "a purple circle",
    "a striped red square", "a striped blue circle", "an outlined green triangle", "an outlined purple cross",
)  # fmt: skip


def sample_grid(model: str | Path, out: Path, *, steps: int = 25, guidance_scale: float = 7.5, seed: int = 0) -> Path:
    """Generate one image per toy subject (two seeds each) and save a labelled grid as ``out/samples.png``."""
    from erasure.generate import generate
    from erasure.grid import sample_grid as draw_sample_grid
    from erasure.grid import save_grid
    from erasure.pipeline import load_pipeline

    pipe = load_pipeline(str(model))
    prompts = [f"a picture of {subject}" for subject in SAMPLE_SUBJECTS for _ in range(2)]
    seeds = [seed + index for index in range(len(prompts))]
    images = generate(pipe, prompts, seeds, steps=steps, guidance_scale=guidance_scale, batch_size=8)
    labels = [f"{prompt} (seed {s})" for prompt, s in zip(prompts, seeds, strict=True)]
    grid = draw_sample_grid(images, labels, columns=6, title=f"toy world samples: {Path(model).name}")
    manifest = {"model": str(model), "prompts": prompts, "seeds": seeds, "steps": steps, "guidance": guidance_scale}
    return save_grid(grid, out / "samples.png", manifest)


def run_demo(
    out: str | Path,
    *,
    model: str | Path | None = None,
    concept: str | Path | None = None,
    method: str = "uce",
    clip: str | Path | None = None,
    steps: int = 25,
    guidance_scale: float = 7.5,
    seeds_per_prompt: int = 13,
    sweep_scales: tuple[float, ...] = (0.0, 0.5, 1.0),
    overwrite: bool = False,
) -> dict[str, Path]:
    """Erase a concept from the toy checkpoint, then write its grid, evaluation and report under ``out``.

    Args:
        out: Output folder (refused if it exists, unless ``overwrite``).
        model: Base pipeline (default: the shipped ``toyworld-sd``, found by :mod:`erasure.resources`).
        concept: Concept file (TOML) of what to erase (default: the shipped ``toyworld/pip.toml``).
        method: Registered method name.
        clip: CLIP used by the evaluator, folder or ``NAME:TAG`` (default: the shipped ``toyworld-clip``).
        steps: DDIM steps of every generation.
        guidance_scale: Classifier-free guidance of every generation.
        seeds_per_prompt: Seeds per held-out prompt (Pip has 8 held-out prompts: 13 seeds give 104 images per model).
        sweep_scales: Strengths at which the edit is evaluated for the trade-off curve (0 = the base weights, 1.0 =
            the edit as made); every one is generated and measured.
        overwrite: Replace an existing ``out``.

    Returns:
        The paths written: ``samples``, ``edit``, ``evaluation``, ``grid``, ``report``.
    """
    from erasure.concepts import load_concepts
    from erasure.evaluation import PromptSource, run_sweep
    from erasure.grid import comparison_grid, save_grid
    from erasure.methods import get_method
    from erasure.pipeline import load_pipeline
    from erasure.prompt_sets import file_sha256, rows_from_request
    from erasure.report import write_report
    from erasure.resources import checkpoint, prompt_file

    model = model or checkpoint("toyworld-sd")
    concept = concept or prompt_file("toyworld/pip.toml")
    clip = clip or checkpoint("toyworld-clip")
    out = Path(out)
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} exists; pass --overwrite or choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    paths = {"samples": sample_grid(model, out, steps=steps, guidance_scale=guidance_scale)}

    request = load_concepts(concept)
    pipe = load_pipeline(str(model))
    edit = get_method(method).apply(pipe, request, base_model=str(model))
    paths["edit"] = edit.save(out / "edit")
    logger.info("erased %s with %s: %d tensors changed", request.concepts[0].name, method, len(edit.deltas))

    # One sweep: the edit at each strength, scale 0 (the base weights) measured like the others, on the same seeds.
    rows = rows_from_request(request, seeds_per_prompt=seeds_per_prompt, base_seed=0)
    paths["evaluation"] = run_sweep(
        out / "evaluation",
        model=str(model),
        edit=paths["edit"],
        scales=sweep_scales,
        rows=rows,
        metadata={"method": method, "concept": str(concept)},
        prompt_source=PromptSource("concepts", str(concept), file_sha256(concept)),
        clip=str(clip),
        steps=steps,
        guidance=guidance_scale,
        batch_size=16,
    )

    # Grid: base against the full-strength edit, same seed per row; two seeds of every distinct held-out prompt.
    chosen, seen = [], {}
    for group in ("erased", "generality", "preserved"):
        for row in (r for r in rows if r.row_type == group):
            if seen.get(row.prompt, 0) < 2:
                seen[row.prompt] = seen.get(row.prompt, 0) + 1
                chosen.append(row)
    prompts, seeds = [row.prompt for row in chosen], [row.evaluation_seed for row in chosen]
    columns = _evaluated_columns(paths["evaluation"], chosen, {None: "base", 1.0: f"{method} (scale 1)"})
    grid = comparison_grid(columns, prompts, [row.row_type for row in chosen], seeds,
                           title=f"erase {request.concepts[0].name} with {method}")  # fmt: skip
    manifest = {"model": str(model), "edit": str(paths["edit"]), "prompts": prompts, "seeds": seeds,
                "groups": [row.row_type for row in chosen], "steps": steps, "guidance": guidance_scale}  # fmt: skip
    paths["grid"] = save_grid(grid, out / "grid.png", manifest)
    shutil.copy(paths["grid"], paths["evaluation"] / "grid.png")

    title = f"erasure demo: {request.concepts[0].name} with {method}"
    paths["report"] = write_report([paths["evaluation"]], out / "report.html", title=title)
    return paths


def _evaluated_columns(evaluation: Path, rows: list, labels: dict[float | None, str]) -> dict[str, list]:
    """Grid columns read from an evaluation's saved images (no second generation): ``{column label: images}``.

    ``labels`` maps a sweep scale (``None``: the base model) to its column label; each row's first image is used.
    """
    import json

    from erasure.files import image_filename, load_image

    models = json.loads((evaluation / "metrics.json").read_text(encoding="utf-8"))["models"]
    by_scale = {info.get("scale"): label for label, info in models.items() if info.get("kind", "base") != "base"}
    by_scale[None] = next(label for label, info in models.items() if info.get("kind") == "base")
    columns = {}
    for scale, column in labels.items():
        folder = evaluation / "images" / by_scale[scale]
        columns[column] = [load_image(folder / image_filename(row.case_number, 0)) for row in rows]
    return columns


__all__ = ["run_demo", "sample_grid"]
