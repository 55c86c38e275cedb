"""The files an evaluation writes: ``metrics.json`` (a typed document), ``per_image.csv`` and the image manifests.

``metrics.json`` (schema_version 1)
-----------------------------------
::

    {
      "schema_version": 1, "kind": "erasure-evaluation", "created": "2025-01-01T00:00:00+00:00",
      "clip": {"model": "ViT-L-14-quickgelu", "pretrained": "openai", "templates": ["a photo of {}.", ...],
               "logit_scale": 100.0},
      "generation": {"steps": 25, "guidance": 7.5, "height": 512, "width": 512, "seeds_per_prompt": 1,
                     "seeds": [per image, in image order]},          # values null when scoring given images;
                     # guidance "per-row" when rows' evaluation_guidance differ (per_image.csv has each one)
      "prompts": {"source": "prompts/x.csv", "kind": "csv" | "concepts" | "manifest", "sha256": "...",
                  "rows": 10, "images_per_model": 10, "roles": {"erased": 5, "preserved": 5, ...},
                  "embeddings": [{"embedding": "...", "token": "<concept>", "sha256": "..."}]},  # replayed inversion
      "models": {"base": {"kind": "base", "source": "CompVis/stable-diffusion-v1-4", "images": "images/base"},
                 "<label>": {"kind": "edit" | "weights" | "images", "source": "...", "images": "images/<label>",
                             "method": "esd", "edit_fingerprint": "<sha256 of the deltas>",
                             "base_fingerprint": "<sha256 of the base tensors>", "weights_sha256": "...",
                             "scale": 0.5}},                                  # scale: sweeps only
      "metrics": {"base": {<metric>: float | null, ..., "n_images": 10}, "<label>": {...}},
      "reference": "base",                                            # the model paired metrics compare with
      "versions": {"python", "torch", "diffusers", "transformers", "open_clip", "accelerate", "erasure"},
      "num_processes": 1,
      "files": {"per_image": "per_image.csv"},                        # + "per_image_<judge>" with judges
      "judges": {"<judge>": {<its provenance>}}                       # only with --judge
    }

Metric names: those of :class:`erasure.evaluation.Evaluator` (``n_images``, ``clip_score``, ``efficacy``, ...)
and, with a judge, those of :func:`erasure.evaluation.judges.judge_metrics` (``oracle_target_rate``, ...).

``per_image.csv``
-----------------
One row per (model, image), models in ``metrics.json`` order, images in prompt-set order. Columns
(:data:`PER_IMAGE_COLUMNS`): ``model, case_number, sample_index, seed, prompt, concept, type, role, image``
(path relative to the output folder, or absolute for scored folders elsewhere), ``clip_score, predicted, correct,
target_prob, target_vs_anchor, paired_cosine, degenerate`` (empty where undefined; booleans as 0/1; a degenerate image,
blank or constant, is listed but left out of every metric), then provenance repeated
on every row: ``clip_model, clip_pretrained, templates`` (``|``-joined), ``steps, guidance`` (the image's own),
``height, width, prompts_sha256, model_source, edit_fingerprint, base_fingerprint, erasure_version, torch_version,
diffusers_version, transformers_version, open_clip_version``. A judge's verdicts go to ``per_image_<judge>.csv``
(:data:`JUDGE_COLUMNS`), in the same row order. A sweep's ``sweep.json`` is described in
:mod:`erasure.evaluation.sweep`.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import io
import json
import logging
import math
import platform
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from erasure import __version__

if TYPE_CHECKING:
    from torch import Tensor

    from erasure.evaluation.evaluator import Evaluator
    from erasure.evaluation.jobs import EvaluationPlan
    from erasure.evaluation.judges import Judge, Verdict

__all__ = [
    "JUDGE_COLUMNS",
    "PER_IMAGE_COLUMNS",
    "SCHEMA_VERSION",
    "SWEEP_FORMAT",
    "SWEEP_NAME",
    "ClipRecord",
    "GenerationRecord",
    "MetricsDocument",
    "PromptsRecord",
    "package_versions",
    "strict_json",
    "sweep_points",
    "write_per_image_csv",
    "write_results",
    "write_sweep",
]

SCHEMA_VERSION = 1
SWEEP_NAME = "sweep.json"
SWEEP_FORMAT = "erasure-sweep/1"
PER_IMAGE_COLUMNS: tuple[str, ...] = (
    "model", "case_number", "sample_index", "seed", "prompt", "concept", "type", "role", "image",
    "clip_score", "predicted", "correct", "target_prob", "target_vs_anchor", "paired_cosine", "degenerate",
    "clip_model", "clip_pretrained", "templates", "steps", "guidance", "height", "width", "prompts_sha256",
    "model_source", "edit_fingerprint", "base_fingerprint", "erasure_version", "torch_version", "diffusers_version",
    "transformers_version", "open_clip_version",
)  # fmt: skip
JUDGE_COLUMNS: tuple[str, ...] = (
    "model", "case_number", "sample_index", "seed", "prompt", "role", "verdict", "shows_target", "follows_prompt",
)  # fmt: skip

logger = logging.getLogger(__name__)


def package_versions(extra: Sequence[str] = ()) -> dict[str, str]:
    """Versions of Python and the packages that decide the numbers (plus the ``extra`` distributions named)."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version(), "erasure": __version__}
    for key, distribution in (
        ("torch", "torch"),
        ("diffusers", "diffusers"),
        ("transformers", "transformers"),
        ("open_clip", "open_clip_torch"),
        ("accelerate", "accelerate"),
        *((name, name) for name in extra),
    ):
        try:
            versions[key] = version(distribution)
        except PackageNotFoundError:
            versions[key] = ""
    return versions


def strict_json(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, inf) replaced by ``None``.

    JSON has no NaN, and a metric that cannot be computed is reported as missing, never as a number.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(item) for item in value]
    return value


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, float):
        return repr(value) if not math.isnan(value) else ""
    return value


def write_per_image_csv(
    path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] = PER_IMAGE_COLUMNS
) -> None:
    """Write ``per_image.csv`` with ``columns`` (:data:`PER_IMAGE_COLUMNS`; missing keys empty)."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_csv_value(row.get(column)) for column in columns])
    path.write_text(buffer.getvalue(), encoding="utf-8")


# -- the document ------------------------------------------------------------------------------------------------


@dataclass
class ClipRecord:
    """``clip``: the CLIP every image was scored with."""

    model: str
    pretrained: str | None
    templates: list[str]
    logit_scale: float


@dataclass
class GenerationRecord:
    """``generation``: how the images were made (``None`` where given images do not say)."""

    steps: int | None
    guidance: float | str | None
    height: int | None
    width: int | None
    seeds_per_prompt: int
    seeds: list[int]


@dataclass
class PromptsRecord:
    """``prompts``: the prompt set and how many images each role has."""

    source: str
    kind: str
    sha256: str
    rows: int
    images_per_model: int
    roles: dict[str, int]
    #: Learned tokens loaded for the rows (replayed inversion prompts): ``[{embedding, token, sha256}]``.
    embeddings: list[dict[str, str]] = field(default_factory=list)


@dataclass(kw_only=True)
class MetricsDocument:
    """``metrics.json``, field by field in file order (see the module docstring)."""

    schema_version: int = SCHEMA_VERSION
    kind: str = "erasure-evaluation"
    created: str = field(default_factory=lambda: datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"))
    clip: ClipRecord
    generation: GenerationRecord
    prompts: PromptsRecord
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    reference: str | None = None
    versions: dict[str, str] = field(default_factory=package_versions)
    num_processes: int = 1
    files: dict[str, str] = field(default_factory=lambda: {"per_image": "per_image.csv"})
    judges: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object (``judges`` only when a judge ran), non-finite numbers as ``null``."""
        document = dataclasses.asdict(self)
        if not self.judges:
            del document["judges"]
        return strict_json(document)

    def write(self, path: str | Path) -> Path:
        """Write the document as strict JSON."""
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n", encoding="utf-8")
        return path


# -- the writer --------------------------------------------------------------------------------------------------


def _accumulate(
    evaluator: Evaluator, features: Tensor, rows: Sequence[Any], roles: Sequence[str], reference: Any
) -> None:
    evaluator.reset()
    evaluator.update(
        features,
        [row.prompt for row in rows],
        concepts=[row.concept for row in rows],
        classes=[row.classes for row in rows],
        roles=list(roles),
        anchors=[row.anchor for row in rows],
        reference=reference,
    )


def _scored_metrics(
    evaluator: Evaluator, features: Tensor, rows: Sequence[Any], roles: Sequence[str], reference: Any, keep: list[bool]
) -> dict[str, Any]:
    """The evaluator's metrics over the images in ``keep`` (and their reference images)."""
    if all(keep):
        _accumulate(evaluator, features, rows, roles, reference)
        return dict(evaluator.compute())
    index = [i for i, kept in enumerate(keep) if kept]
    if not index:  # every image degenerate: nothing to score
        _accumulate(evaluator, features[:0], [], [], None if reference is None else reference[:0])
        return {key: (0 if key == "n_images" else None) for key in evaluator.compute()}
    chosen = features[index]
    _accumulate(evaluator, chosen, [rows[i] for i in index], [roles[i] for i in index],
                None if reference is None else reference[index])  # fmt: skip
    return dict(evaluator.compute())


def write_results(
    work: Path,
    plan: EvaluationPlan,
    features: Mapping[str, Tensor],
    evaluator: Evaluator,
    clip: ClipRecord,
    *,
    verdicts: Mapping[str, Mapping[str, Sequence[Verdict]]] | None = None,
    judges: Sequence[Judge] = (),
    num_processes: int = 1,
    degenerate: Mapping[str, Sequence[bool]] | None = None,
) -> MetricsDocument:
    """Score every model's embeddings and write ``metrics.json``, ``per_image.csv`` and the image manifests.

    Args:
        work: The run's folder (generated images are already under ``images/<label>/``).
        plan: The run's plan.
        features: Each model's ``(N, D)`` image embeddings, in job order.
        evaluator: The evaluator (its CLIP embeds the prompts and classes).
        clip: The CLIP's record.
        verdicts: ``{judge name: {label: one verdict per job}}``.
        judges: The judges, for their provenance.
        num_processes: Processes the images were made by.
        degenerate: ``{label: one flag per job}``: blank or constant images
            (:func:`erasure.evaluation.functional.degenerate_images`). They keep their ``per_image.csv`` row
            (``degenerate`` = 1) but are left out of every metric, with the reference's image of the same job for the
            paired metrics; ``n_degenerate`` counts them and a warning names the model.

    Returns:
        The document written.
    """
    from erasure.evaluation.functional import BOOTSTRAP_DRAWS, BOOTSTRAP_SEED
    from erasure.evaluation.judges import judge_metrics
    from erasure.files import write_manifest
    from erasure.prompt_sets import rows_as_dicts

    verdicts = verdicts or {}
    bootstrap = {"draws": BOOTSTRAP_DRAWS, "seed": BOOTSTRAP_SEED, "level": 0.95}
    jobs, generation, source = plan.jobs, plan.generation, plan.prompt_source
    versions = package_versions()
    reference_label = plan.reference
    reference = features[reference_label] if reference_label is not None else None
    rows = [job.row for job in jobs]
    roles_per_image = [row.role for row in rows]
    row_dicts = {row.case_number: d for row, d in zip(rows, rows_as_dicts(rows), strict=True)}
    constant = {
        "clip_model": clip.model,
        "clip_pretrained": clip.pretrained or "",
        "templates": "|".join(clip.templates),
        "steps": generation.steps,
        "height": generation.height,
        "width": generation.width,
        "prompts_sha256": source.sha256 if source else "",
        "erasure_version": versions["erasure"],
        "torch_version": versions["torch"],
        "diffusers_version": versions["diffusers"],
        "transformers_version": versions["transformers"],
        "open_clip_version": versions["open_clip"],
    }
    roles: dict[str, int] = {}
    for job in jobs:
        roles[job.row.role] = roles.get(job.row.role, 0) + 1
    document = MetricsDocument(
        clip=clip,
        generation=GenerationRecord(
            **generation.as_dict(), seeds_per_prompt=plan.images_per_row, seeds=[job.seed for job in jobs]
        ),
        prompts=PromptsRecord(
            source=source.path if source else "",
            kind=source.kind if source else "",
            sha256=source.sha256 if source else "",
            rows=len({job.row.case_number for job in jobs}),
            images_per_model=len(jobs),
            roles=roles,
            embeddings=list(source.embeddings) if source else [],
        ),
        reference=reference_label,
        versions=versions,
        num_processes=num_processes,
    )
    per_image: list[dict[str, Any]] = []
    judged: dict[str, list[dict[str, Any]]] = {name: [] for name in verdicts}
    degenerate = degenerate or {}
    reference_flags = list(degenerate.get(reference_label, [])) if reference_label is not None else []
    for entry in plan.entries:
        flags = list(degenerate.get(entry.label, [False] * len(jobs)))
        keep = [not (flag or (reference_flags and reference_flags[i])) for i, flag in enumerate(flags)]
        document.metrics[entry.label] = _scored_metrics(
            evaluator, features[entry.label], rows, roles_per_image, reference, keep
        )
        document.metrics[entry.label]["n_degenerate"] = sum(flags)
        if any(flags):
            logger.warning(
                "%s: %d of %d images are blank or constant (a broken model draws them); they are flagged in "
                "per_image.csv and left out of every metric.",
                entry.label,
                sum(flags),
                len(flags),
            )
        _accumulate(evaluator, features[entry.label], rows, roles_per_image, reference)
        for name, by_label in verdicts.items():  # the judges do not score degenerate images either
            base = by_label.get(reference_label) if reference_label is not None else None
            kept = [i for i, k in enumerate(keep) if k]
            mine = [by_label[entry.label][i] for i in kept]
            base = None if base is None else [base[i] for i in kept]
            document.metrics[entry.label] |= judge_metrics(name, mine, [roles_per_image[i] for i in kept], base)
        if entry.kind == "images":
            folder = Path(entry.source).resolve()
            records = entry.records or {}
            image_of = {job.index: str(records[(job.row.case_number, job.sample)].path.resolve()) for job in jobs}
            document.models[entry.label] = {"kind": "images", "images": str(folder), **entry.info}
        else:
            image_of = {job.index: f"images/{entry.label}/{job.filename}" for job in jobs}
            document.models[entry.label] = {
                "kind": entry.kind,
                "source": entry.source,
                "images": f"images/{entry.label}",
                **entry.info,
            }
            manifest = [
                {
                    "file": job.filename,
                    "case_number": job.row.case_number,
                    "index": job.sample,
                    "seed": job.seed,
                    "guidance": job.guidance,
                    "prompt": job.row.prompt,
                    "row": row_dicts[job.row.case_number],
                }
                for job in jobs
            ]
            metadata = generation.as_dict() | {"model": entry.label, "model_source": entry.source, **entry.info}
            write_manifest(work / "images" / entry.label, manifest, metadata)
        provenance = {
            "model_source": entry.info.get("model_source") or entry.source,
            "edit_fingerprint": entry.info.get("edit_fingerprint", ""),
            "base_fingerprint": entry.info.get("base_fingerprint", ""),
        }
        for job, scores, flag in zip(jobs, evaluator.per_image(), flags, strict=True):
            per_image.append(
                {
                    "model": entry.label,
                    "case_number": job.row.case_number,
                    "sample_index": job.sample,
                    "seed": job.seed,
                    "prompt": job.row.prompt,
                    "concept": job.row.concept,
                    "type": job.row.row_type,
                    "role": job.row.role,
                    "image": image_of[job.index],
                    **scores,
                    "degenerate": int(flag),
                    **constant,
                    "guidance": job.guidance,
                    **provenance,
                }
            )
        for name, by_label in verdicts.items():
            for job, verdict in zip(jobs, by_label[entry.label], strict=True):
                judged[name].append(
                    {
                        "model": entry.label,
                        "case_number": job.row.case_number,
                        "sample_index": job.sample,
                        "seed": job.seed,
                        "prompt": job.row.prompt,
                        "role": job.row.role,
                        "verdict": verdict.label,
                        "shows_target": verdict.shows_target,
                        "follows_prompt": verdict.follows_prompt,
                    }
                )
    for judge in judges:
        document.judges[judge.name] = {**judge.describe(), "bootstrap": bootstrap}
        document.files[f"per_image_{judge.name}"] = f"per_image_{judge.name}.csv"
        write_per_image_csv(work / f"per_image_{judge.name}.csv", judged[judge.name], JUDGE_COLUMNS)
    document.write(work / "metrics.json")
    write_per_image_csv(work / "per_image.csv", per_image)
    return document


# -- sweep.json (format in erasure.evaluation.sweep) ------------------------------------------------------------


def write_sweep(path: str | Path, points: Iterable[Mapping[str, Any]], **metadata: Any) -> Path:
    """Write ``sweep.json`` (format ``erasure-sweep/1``) atomically; ``metadata`` goes beside the points."""
    from erasure.files import atomic_write_text

    path = Path(path)
    points = [dict(point) for point in points]
    for index, point in enumerate(points):
        if not isinstance(point.get("scale"), int | float):
            raise ValueError(f"sweep point #{index + 1} needs a numeric 'scale'.")
    document = {"format": SWEEP_FORMAT, **metadata, "points": points}
    atomic_write_text(path, json.dumps(document, indent=2, default=str) + "\n")
    return path


def sweep_points(document: MetricsDocument, folder: str | Path) -> list[dict[str, Any]]:
    """The points of a sweep run: each model with a ``scale``, in run order, with all its metrics."""
    return [
        strict_json({"scale": float(info["scale"]), **document.metrics[label], "evaluation": str(folder)})
        for label, info in document.models.items()
        if "scale" in info
    ]
