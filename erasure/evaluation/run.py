"""A full evaluation run (``erasure evaluate``): plan, generate or read, embed and judge, gather, write.

:func:`run_evaluation` takes its settings as an :class:`EvaluationConfig` (or the same names as keywords) and runs
five steps, each a function below:

1. :meth:`EvaluationConfig.__post_init__` refuses inconsistent settings before anything is read;
2. :func:`_plan`: the models and one job per image (given folders are read, the base and its edits loaded);
3. :func:`_score_shard`: this process's share of the jobs (``accelerate`` splits them), generated through
   :func:`erasure.generate.iter_generate_paired` (the base, then each edit applied alone and reverted) or read,
   then embedded by CLIP and judged;
4. :func:`_gather`: every process's embeddings and verdicts, gathered with ``accelerate.utils.gather_object`` and
   put back in prompt-set order. Objects are pickled whole, so the merged numbers equal a one-process run's
   bit for bit when the images are (same batch size; batched kernels may differ in float rounding otherwise);
5. :func:`erasure.evaluation.results.write_results`: the main process writes the reports (and a sweep's
   ``sweep.json``) into a temporary folder beside ``out``, which is then renamed into place, so bad input or a
   crash never leaves half a folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from erasure.evaluation.clip import DEFAULT_CLIP, default_templates, parse_clip_spec
from erasure.evaluation.errors import EvaluationError
from erasure.evaluation.jobs import EvaluationPlan, Generation, ImageJob, ModelEntry, PromptSource
from erasure.prompt_sets import PromptRow

if TYPE_CHECKING:
    import numpy as np
    import torch

    from erasure.evaluation.evaluator import Evaluator
    from erasure.evaluation.judges import Judge
    from erasure.evaluation.results import ClipRecord, MetricsDocument

logger = logging.getLogger(__name__)

__all__ = ["EvaluationConfig", "execute", "run_evaluation"]

#: Gathered beside the judges' verdicts: whether each image is blank or constant (not scored).
DEGENERATE = "_degenerate"


@dataclass(kw_only=True)
class EvaluationConfig:
    """The settings of one evaluation run; validated when made, so bad input fails before anything is read.

    Attributes:
        model: The base pipeline (hub id, folder or single file); required unless ``images`` is given.
        model_config: For a single-file ``model``: a diffusers folder (or hub id) of the same architecture whose
            configs describe it (:func:`erasure.pipeline.load_pipeline`'s ``config``).
        edits: Edit folders (:class:`erasure.edit.Edit`), each evaluated against the base.
        weights: Partial UNet state dicts (``.safetensors``, see :func:`erasure.evaluation.load_unet_weights`),
            each applied as an edit of the base.
        rows: The prompt rows (required with ``model``; optional with ``images``, which can carry a manifest);
            :func:`erasure.evaluation.prompt_rows` reads them from a concept file or a CSV.
        prompt_source: Where ``rows`` came from.
        images: Instead of generating, score this folder of images (or its subfolders, one per model; a subfolder
            named ``base`` is the reference of the paired metrics).
        clip: ``NAME:TAG`` or a folder (see :func:`erasure.evaluation.load_clip`).
        templates: Zero-shot templates (default: those the CLIP folder declares, else photo templates).
        judges: Judges beside CLIP (``oracle`` or ``oracle:DIR``; see :mod:`erasure.evaluation.judges`).
        scales: Sweep the single edit over these strengths (0 is the base weights, measured like any point); the
            run then also writes ``sweep.json``.
        steps: Denoising steps.
        guidance: Classifier-free guidance scale of every image; ``None``: each row's ``evaluation_guidance``
            column where the prompt file has one, else 7.5 (see :func:`erasure.evaluation.image_jobs`).
        images_per_row: Images per prompt row (seeds ``evaluation_seed + i``).
        batch_size: Images per pipeline call and per CLIP forward.
        height: Image height (default: the pipeline's native size).
        width: Image width (default: the pipeline's native size).
        device: ``cpu``, ``cuda``, ... (default: the accelerate process's device).
        dtype: ``auto`` (float16 on CUDA, else float32), ``float32``, ``float16`` or ``bfloat16``.
        overwrite: Replace an existing output folder.
        progress: Show progress bars (main process only).
        base_check: Refuse edits without a base fingerprint (``False`` accepts them and records
            ``"base_check": "skipped"`` for them in ``metrics.json``).
        max_relative_change: Largest accepted ``|delta| / |W0|`` per tensor when an edit is applied
            (:data:`erasure.edit.MAX_RELATIVE_CHANGE` by default; ``math.inf`` turns the check off).

    Raises:
        EvaluationError: For settings that contradict each other or are out of range.
    """

    model: str | None = None
    model_config: str | Path | None = None
    edits: Sequence[str | Path] = ()
    weights: Sequence[str | Path] = ()
    rows: Sequence[PromptRow] | None = None
    prompt_source: PromptSource | None = None
    images: str | Path | None = None
    clip: str = DEFAULT_CLIP
    templates: Sequence[str] | None = None
    judges: Sequence[str] = ()
    scales: Sequence[float] | None = None
    steps: int = 25
    guidance: float | None = None
    images_per_row: int = 1
    batch_size: int = 8
    height: int | None = None
    width: int | None = None
    device: str | None = None
    dtype: str = "auto"
    overwrite: bool = False
    progress: bool = True
    base_check: bool = True
    max_relative_change: float | None = None

    def __post_init__(self) -> None:
        from erasure.evaluation.judges import check_judge_spec
        from erasure.evaluation.models import DTYPES

        self.edits, self.weights, self.judges = tuple(self.edits), tuple(self.weights), tuple(self.judges)
        self.scales = None if self.scales is None else tuple(float(s) for s in self.scales)
        if self.images is None and not self.rows:
            raise EvaluationError("Say what to evaluate: --concept FILE, --prompts CSV or --images DIR.")
        if self.model is not None and self.images is not None:
            raise EvaluationError("--images scores given images; drop --model (or drop --images to generate).")
        if self.model is None and self.images is None:
            raise EvaluationError("--model is required to generate images (or pass --images DIR to score a folder).")
        if self.images is not None and (self.edits or self.weights):
            raise EvaluationError("--edit/--weights need a model to generate with; they cannot apply to given images.")
        for name in ("steps", "batch_size", "images_per_row", "height", "width"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise EvaluationError(f"{name} must be a whole number of at least 1, got {value!r}.")
        if self.guidance is not None and not (math.isfinite(self.guidance) and self.guidance >= 0):
            raise EvaluationError(f"--guidance must be a finite number >= 0, got {self.guidance}.")
        if self.dtype not in DTYPES:
            raise EvaluationError(f"Unknown dtype {self.dtype!r}; choose auto, float32, float16 or bfloat16.")
        bad = [t for t in self.templates or () if t.count("{}") != 1]
        if bad:
            raise EvaluationError(f"Each --template needs exactly one '{{}}' for the class text; got {bad[0]!r}.")
        if self.max_relative_change is not None and not self.max_relative_change > 0:
            raise EvaluationError(f"max_relative_change must be positive, got {self.max_relative_change}.")
        for spec in self.judges:
            check_judge_spec(spec)
        if self.scales is not None:
            if len(self.edits) != 1 or self.weights:
                raise EvaluationError("--scales sweeps one edit: give exactly one --edit (and no --weights).")
            if not self.scales or not all(math.isfinite(s) for s in self.scales):
                raise EvaluationError(f"--scales needs finite strengths, got {list(self.scales)}.")
            if len(set(self.scales)) != len(self.scales):
                raise EvaluationError(f"--scales repeats a strength: {list(self.scales)}.")


def run_evaluation(out: str | Path, *, config: EvaluationConfig | None = None, **settings: Any) -> Path | None:
    """Generate (or read) images for every model, score them, and write the results atomically.

    Base and every edited model generate from the same rows and seeds; each edit and weights file is one model
    compared with the base (with ``scales``, the one edit at each strength, and ``sweep.json`` beside). Under
    ``accelerate launch`` the images are split between the processes and gathered in prompt-set order, so the
    numbers equal a single-process run's (up to float rounding of batched kernels).

    Output folder: ``images/<model>/{case_number}_{i}.png`` (+ ``manifest.json``), ``metrics.json``,
    ``per_image.csv`` (schemas in :mod:`erasure.evaluation.results`).

    Args:
        out: Output folder.
        config: The settings.
        **settings: Instead of ``config``, its fields as keywords (``model=..., rows=..., clip=...``).

    Returns:
        The output folder on the main process, ``None`` on the others.

    Raises:
        EvaluationError: For bad input (and its subclasses, as ``ClipLoadError``); also the loaders' errors
            (``PipelineLoadError``, ``EditFormatError``, ``FingerprintMismatchError``, ``ImageFolderError``).
    """
    return execute(out, _config(config, settings))


def _config(config: EvaluationConfig | None, settings: dict[str, Any]) -> EvaluationConfig:
    if config is None:
        return EvaluationConfig(**settings)
    return dataclasses.replace(config, **settings) if settings else config


def execute(out: str | Path, config: EvaluationConfig, sweep_metadata: Mapping[str, Any] | None = None) -> Path | None:
    """Run the evaluation of ``config`` into ``out`` (``sweep_metadata``: extra keys of a sweep's ``sweep.json``)."""
    from erasure.evaluation.clip import load_clip
    from erasure.evaluation.evaluator import Evaluator
    from erasure.evaluation.judges import load_judge
    from erasure.evaluation.results import ClipRecord
    from erasure.files import output_lock

    out = Path(out)
    _check_out(out, config.overwrite)
    state = _state(config.device)
    device = _device(config.device, state)
    clip_name, clip_tag = parse_clip_spec(config.clip)
    templates = tuple(config.templates) if config.templates else default_templates(clip_name)
    clip_model = load_clip(clip_name, clip_tag, device=device)  # before the pipeline: a missing CLIP fails fast
    pipe, plan = _plan(config, device)
    evaluator = Evaluator(*clip_model, templates=templates, device=device, batch_size=config.batch_size)
    judges = [load_judge(spec, device=device) for spec in config.judges]
    clip = ClipRecord(clip_name, clip_tag, list(templates), evaluator.logit_scale)
    lock = output_lock(out) if state.is_main_process else contextlib.nullcontext()  # one writer per output
    with lock:
        work = _make_workdir(out, state)
        try:
            return _score_and_write(out, config, sweep_metadata, state, pipe, plan, evaluator, judges, work, clip)
        finally:
            if state.is_main_process and work.exists():
                shutil.rmtree(work, ignore_errors=True)


def _score_and_write(
    out: Path,
    config: EvaluationConfig,
    sweep_metadata: Mapping[str, Any] | None,
    state: Any,
    pipe: Any,
    plan: EvaluationPlan,
    evaluator: Evaluator,
    judges: Sequence[Judge],
    work: Path,
    clip: ClipRecord,
) -> Path | None:
    """Score this process's share, gather, and (main process) write the results and rename ``work`` to ``out``."""
    from erasure.evaluation.results import write_results
    from erasure.files import replace_folder

    mine = _shard(state, plan.jobs)
    show = config.progress and state.is_main_process
    local = _score_shard(plan, pipe, mine, evaluator, judges, work, config.batch_size, show)
    features, verdicts = _gather(state, local, plan)
    degenerate = verdicts.pop(DEGENERATE)
    if not state.is_main_process:
        return None
    document = write_results(
        work,
        plan,
        features,
        evaluator,
        clip,
        verdicts=verdicts,
        judges=judges,
        num_processes=state.num_processes,
        degenerate=degenerate,
    )
    if config.scales is not None:
        _write_sweep(work, out, document, sweep_metadata)
    replace_folder(work, out)
    return out


# -- 1. where ------------------------------------------------------------------------------------------------------


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise EvaluationError(f"{out} is a file; choose another --out.")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise EvaluationError(f"{out} exists; choose another --out or pass --overwrite.")


def _state(device: str | None) -> Any:
    """The process state of ``accelerate`` (CPU processes use gloo when launched with several processes)."""
    import torch
    from accelerate import PartialState

    cpu = device == "cpu" or (device in (None, "auto") and not torch.cuda.is_available())
    return PartialState(cpu=cpu)


def _device(device: str | None, state: Any) -> torch.device:
    import torch

    return torch.device(device) if device not in (None, "auto") else state.device


def _make_workdir(out: Path, state: Any) -> Path:
    """A fresh folder beside ``out``, named by the main process and shared with the others."""
    from erasure.files import remove_stale_temporaries

    if state.is_main_process:
        remove_stale_temporaries(out)  # what a killed run left beside out
    name = [f".{out.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp"]  # erasure.files' naming: pid, then .tmp
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(name)
    work = out.resolve().parent / name[0]
    if state.is_main_process:
        work.mkdir(parents=True)
    state.wait_for_everyone()
    return work


# -- 2. what -------------------------------------------------------------------------------------------------------


def _plan(config: EvaluationConfig, device: torch.device) -> tuple[Any, EvaluationPlan]:
    """The pipeline (``None`` for given images) and the run's plan."""
    from erasure.evaluation.jobs import generation_guidance, image_jobs, load_row_embeddings, plan_image_folders

    taken: set[str] = set()
    if config.images is not None:
        return None, plan_image_folders(config.images, config.rows, config.prompt_source, taken)
    from erasure.evaluation.models import load_models
    from erasure.pipeline import default_image_size

    assert config.model is not None and config.rows  # checked by EvaluationConfig
    jobs = image_jobs(config.rows, config.images_per_row, config.guidance)
    pipe, entries = load_models(
        config.model, config.edits, config.weights, device, config.dtype, taken,
        base_check=config.base_check, max_relative_change=config.max_relative_change, scales=config.scales,
        model_config=config.model_config,
    )  # fmt: skip
    if config.prompt_source is not None and config.prompt_source.kind == "csv":  # replayed inversion prompts
        config.prompt_source.embeddings = load_row_embeddings(pipe, config.rows, config.prompt_source.path)
    size = default_image_size(pipe)
    generation = Generation(config.steps, generation_guidance(jobs), config.height or size, config.width or size)
    return pipe, EvaluationPlan(entries, jobs, generation, config.images_per_row, config.prompt_source)


def _shard(state: Any, jobs: list[ImageJob]) -> list[ImageJob]:
    if state.num_processes == 1:
        return jobs
    with state.split_between_processes(jobs) as part:
        return list(part)


# -- 3. this process's images --------------------------------------------------------------------------------------


def _batches(
    entry: ModelEntry,
    pipe: Any,
    jobs: list[ImageJob],
    generation: Generation,
    work: Path,
    batch_size: int,
    show: bool,
    base_label: str | None = None,
) -> Iterator[tuple[list[ImageJob], np.ndarray]]:
    """``(jobs, uint8 images)`` batches of one model: read from its folder, or generated and saved to ``work``.

    An edit at scale 0 has exactly the base weights (``W + 0 * delta == W`` in floating point for a finite delta,
    which :meth:`erasure.edit.Edit.apply_to` guarantees), so its images are the base model's, bit for bit: they are
    read back from the base's folder (``base_label``, generated first) instead of generated again, and scored like
    any other model's.
    """
    import shutil

    import numpy as np
    from tqdm.auto import tqdm

    from erasure.files import load_image, write_image
    from erasure.generate import iter_generate_paired

    if entry.kind == "images":
        records = entry.records or {}
        for start in tqdm(range(0, len(jobs), batch_size), desc=f"read {entry.label}", disable=not show or None):
            chunk = jobs[start : start + batch_size]
            yield chunk, np.stack([load_image(records[(j.row.case_number, j.sample)].path) for j in chunk])
        return
    folder = work / "images" / entry.label
    folder.mkdir(parents=True, exist_ok=True)
    if entry.edit is not None and entry.scale == 0 and base_label is not None:
        base_folder = work / "images" / base_label
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start : start + batch_size]
            for job in chunk:
                shutil.copyfile(base_folder / job.filename, folder / job.filename)
            yield chunk, np.stack([load_image(folder / job.filename) for job in chunk])
        return
    edits = {entry.label: entry.edit} if entry.edit is not None else {}
    stream = iter_generate_paired(
        pipe, edits, [job.row.prompt for job in jobs], [job.seed for job in jobs],
        base_label=None if entry.edit is not None else entry.label, scale=entry.scale,
        max_relative_change=entry.max_relative_change, batch_size=batch_size, progress=show, steps=generation.steps,
        guidance_scale=[job.guidance for job in jobs], height=generation.height, width=generation.width,
    )  # fmt: skip
    with contextlib.closing(stream):  # a failure downstream still reverts the edit
        for _, start, images in stream:
            chunk = jobs[start : start + len(images)]
            for job, image in zip(chunk, images, strict=True):
                write_image(folder / job.filename, image)
            yield chunk, images


def _score_shard(
    plan: EvaluationPlan,
    pipe: Any,
    jobs: list[ImageJob],
    evaluator: Evaluator,
    judges: Sequence[Judge],
    work: Path,
    batch_size: int,
    show: bool,
) -> dict[str, Any]:
    """Embed (and judge) this process's images of every model: ``{"index", "features", "verdicts"}``."""
    import torch

    from erasure.evaluation.functional import degenerate_images

    local: dict[str, Any] = {"index": [job.index for job in jobs], "features": {}, "verdicts": {}}
    local["verdicts"][DEGENERATE] = {}
    for judge in judges:
        local["verdicts"][judge.name] = {}
    base_label = next((entry.label for entry in plan.entries if entry.kind == "base"), None)
    for entry in plan.entries:
        parts = []
        verdicts: dict[str, list[Any]] = {judge.name: [] for judge in judges} | {DEGENERATE: []}
        batches = _batches(entry, pipe, jobs, plan.generation, work, batch_size, show, base_label)
        for chunk, images in batches:
            parts.append(evaluator.embed_images(images))
            for judge in judges:
                verdicts[judge.name] += judge.judge(images, [job.row for job in chunk])
            verdicts[DEGENERATE] += degenerate_images(images)
        local["features"][entry.label] = torch.cat(parts) if parts else torch.zeros(0, evaluator._width())
        for name, values in verdicts.items():
            local["verdicts"][name][entry.label] = values
    return local


# -- 4. every process's images, in prompt-set order ----------------------------------------------------------------


def _gather(
    state: Any, local: dict[str, Any], plan: EvaluationPlan
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, list[Any]]]]:
    """Every process's embeddings and verdicts (``accelerate.utils.gather_object``), in job order."""
    import torch

    if state.num_processes > 1:
        from accelerate.utils import gather_object

        parts = gather_object([local])
    else:
        parts = [local]
    index = [i for part in parts for i in part["index"]]
    if sorted(index) != list(range(len(plan.jobs))):
        raise RuntimeError(f"the processes hold images {sorted(index)[:5]}..., not each of the {len(plan.jobs)} once")
    order = torch.tensor(sorted(range(len(index)), key=index.__getitem__), dtype=torch.long)
    features = {}
    for entry in plan.entries:
        chunks = [part["features"][entry.label] for part in parts if len(part["features"][entry.label])]
        features[entry.label] = torch.cat(chunks)[order]
    verdicts = {}
    for name in local["verdicts"]:
        verdicts[name] = {}
        for entry in plan.entries:
            flat = [v for part in parts for v in part["verdicts"][name][entry.label]]
            verdicts[name][entry.label] = [flat[i] for i in order.tolist()]
    return features, verdicts


# -- 5. a sweep's points -------------------------------------------------------------------------------------------


def _write_sweep(work: Path, out: Path, document: MetricsDocument, metadata: Mapping[str, Any] | None) -> None:
    """``sweep.json`` of a sweep run: the swept edit's folder and method, ``metadata``, one point per scale."""
    from erasure.evaluation.results import SWEEP_NAME, sweep_points, write_sweep

    swept = next(info for info in document.models.values() if "scale" in info)
    defaults = {"edit": swept["source"], "method": swept.get("method", "")}
    write_sweep(work / SWEEP_NAME, sweep_points(document, out), **(defaults | dict(metadata or {})))
