"""What an evaluation run generates or reads: prompt rows, one job per image, the models, given image folders.

A run is planned before anything is written (:class:`EvaluationPlan`): the prompt rows and where they came from,
one :class:`ImageJob` per image (row, sample index, seed, guidance), and one :class:`ModelEntry` per model (the
base, each edit, each weights file, each folder of given images). Generated images of every model share the jobs,
so image ``i`` of every model has the same prompt and seed.

Seeds and guidance follow the field's prompt files: image ``i`` of a row has seed ``evaluation_seed + i``, and
the guidance is the run's ``guidance`` when given, else the row's ``evaluation_guidance`` column (ESD's I2P file
carries I2P's own scale per prompt), else :data:`DEFAULT_GUIDANCE`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from erasure.evaluation.errors import EvaluationError
from erasure.prompt_sets import PromptRow

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_GUIDANCE",
    "GUIDANCE_COLUMN",
    "EvaluationPlan",
    "Generation",
    "ImageJob",
    "ModelEntry",
    "ModelKind",
    "PromptSource",
    "generation_guidance",
    "image_jobs",
    "plan_image_folders",
    "prompt_rows",
    "row_guidance",
    "unique_label",
]

#: Guidance of generated images when neither ``guidance`` nor the prompt row's own column gives one.
DEFAULT_GUIDANCE = 7.5
#: Per-row guidance column of the field's prompt files (ESD's ``data/*.csv``, UCE's and MACE's prompt files).
GUIDANCE_COLUMN = "evaluation_guidance"

#: What a model of a run is: the base pipeline, an edit folder, a weights file (applied as an edit), or images.
ModelKind = Literal["base", "edit", "weights", "images"]


@dataclass(frozen=True)
class ImageJob:
    """Image ``sample`` of prompt row ``row``, generated with ``seed`` and guidance ``guidance``.

    ``index`` orders all images of a run; ``guidance`` is ``None`` for given images whose guidance is unknown.
    """

    index: int
    row: PromptRow
    sample: int
    seed: int
    guidance: float | None = None

    @property
    def filename(self) -> str:
        """``{case_number}_{sample}.png``."""
        from erasure.files import image_filename

        return image_filename(self.row.case_number, self.sample)


@dataclass
class ModelEntry:
    """One model of a run.

    Attributes:
        label: Unique, file-name-safe label (``images/<label>/``, the key in ``metrics.json``).
        kind: What the model is (:data:`ModelKind`).
        source: Where it came from (hub id, folder, file).
        edit: The :class:`erasure.edit.Edit` applied to the base for this model (edits and weights files).
        scale: Strength the edit is applied at.
        max_relative_change: Largest accepted ``|delta| / |W0|`` when applied (``math.inf``: unchecked).
        records: Given images: ``(case_number, index) -> erasure.files.ImageRecord``.
        info: Provenance recorded under ``models.<label>`` in ``metrics.json``.
    """

    label: str
    kind: ModelKind
    source: str
    edit: Any = None
    scale: float = 1.0
    max_relative_change: float = math.inf
    records: dict[tuple[int, int], Any] | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class PromptSource:
    """Where the prompts came from (recorded in metrics.json)."""

    kind: str  # "csv" | "concepts" | "manifest"
    path: str
    sha256: str
    #: Learned tokens the rows needed (replayed inversion prompts): ``[{embedding, token, sha256}]``.
    embeddings: list[dict[str, str]] = field(default_factory=list)


@dataclass
class Generation:
    """Generation settings of a run (``None`` where given images do not say)."""

    steps: int | None = None
    guidance: float | str | None = None
    height: int | None = None
    width: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """``{"steps", "guidance", "height", "width"}``, as ``metrics.json`` and the image manifests record them."""
        return {"steps": self.steps, "guidance": self.guidance, "height": self.height, "width": self.width}


@dataclass
class EvaluationPlan:
    """Everything a run will produce, decided before anything is written.

    Attributes:
        entries: The models, in report order (the base first when there is one).
        jobs: One job per image, in prompt-set order.
        generation: The generation settings.
        images_per_row: Images per prompt row.
        prompt_source: Where the rows came from.
    """

    entries: list[ModelEntry]
    jobs: list[ImageJob]
    generation: Generation
    images_per_row: int
    prompt_source: PromptSource | None = None

    @property
    def reference(self) -> str | None:
        """Label of the model the paired metrics compare with: the base (or a folder of images named ``base``)."""
        return next((e.label for e in self.entries if e.kind == "base" or e.label == "base"), None)


def unique_label(label: str, taken: set[str]) -> str:
    """``label`` made file-name safe and distinct from ``taken`` (``edit``, ``edit-2``, ...); adds it to ``taken``."""
    label = "".join(c if c.isalnum() or c in "-_." else "_" for c in label) or "model"
    candidate, k = label, 2
    while candidate in taken:
        candidate, k = f"{label}-{k}", k + 1
    taken.add(candidate)
    return candidate


def prompt_rows(
    concept: str | Path | None = None, prompts: str | Path | None = None, *, seeds_per_prompt: int = 1, seed: int = 0
) -> tuple[list[PromptRow] | None, PromptSource | None, int]:
    """The prompt rows of a concept file or a prompt CSV, where they came from, and images per row.

    A concept file's held-out prompts become rows with ``seeds_per_prompt`` seeds each (``seed + j``, one row per
    seed, so one image per row); a CSV's rows keep their own ``evaluation_seed`` and get ``seeds_per_prompt``
    images each (seeds ``evaluation_seed + i``).

    Returns:
        ``(rows, source, images_per_row)``; ``(None, None, seeds_per_prompt)`` when neither file is given (given
        images may carry their prompts in a manifest).

    Raises:
        EvaluationError: If both files are given, ``seeds_per_prompt`` is below 1, or the concept file has no
            held-out prompts; the loaders' errors (``PromptFileError``, ``ConceptFileError``) for bad files.
    """
    from erasure.prompt_sets import file_sha256, load_prompt_csv, rows_from_request

    if concept and prompts:
        raise EvaluationError("Give --concept or --prompts, not both.")
    if seeds_per_prompt < 1:
        raise EvaluationError(f"--seeds-per-prompt must be at least 1, got {seeds_per_prompt}.")
    if concept:
        from erasure.concepts import load_concepts

        try:
            rows = rows_from_request(load_concepts(concept), seeds_per_prompt, base_seed=seed)
        except ValueError as error:
            raise EvaluationError(f"{concept}: {error}") from error
        return rows, PromptSource("concepts", str(concept), file_sha256(concept)), 1
    if prompts:
        return load_prompt_csv(prompts), PromptSource("csv", str(prompts), file_sha256(prompts)), seeds_per_prompt
    return None, None, seeds_per_prompt


#: Columns of an adversarial prompt whose placeholder token means a learned embedding (the probe's concept
#: inversion): the file, relative to the prompt CSV's folder, and the token it defines.
EMBEDDING_COLUMN, TOKEN_COLUMN = "embedding", "token"


def load_row_embeddings(pipe: Any, rows: Sequence[PromptRow], prompt_file: str | Path) -> list[dict[str, str]]:
    """Teach ``pipe`` the learned tokens its rows name, so replayed inversion prompts mean what they meant.

    A row with an ``embedding`` column (``erasure probe``'s ``prompts.csv``: ``embeddings/inversion.safetensors``,
    relative to the CSV's folder) and a ``token`` column has a placeholder such as ``<concept>`` in its prompt that
    only the learned vector gives a meaning; without it the tokenizer would split the placeholder into ordinary
    sub-words and the replay would silently test another prompt. Each file is loaded once, with diffusers'
    ``load_textual_inversion``, into the one text encoder every model of the run shares (the transfer question:
    does the token learned against one model bring the concept back on another?).

    Returns:
        ``[{embedding, token, sha256}]``, the files loaded (empty when no row names one).

    Raises:
        EvaluationError: If a row names a missing file, names no token, or the pipeline cannot load it.
    """
    from erasure.prompt_sets import file_sha256

    folder = Path(prompt_file).parent
    wanted: dict[tuple[str, str], int] = {}
    for row in rows:
        name = row.extra.get(EMBEDDING_COLUMN, "").strip()
        if name:
            wanted.setdefault((name, row.extra.get(TOKEN_COLUMN, "").strip()), row.case_number)
    loaded = []
    for (name, token), case in wanted.items():
        path = Path(name) if Path(name).is_absolute() else folder / name
        if not token:
            raise EvaluationError(f"{prompt_file}: case {case} names the embedding {name} but no token column.")
        if not path.is_file():
            raise EvaluationError(f"{prompt_file}: case {case} needs the learned embedding {path}, which is missing.")
        try:
            pipe.load_textual_inversion(str(path), token=token)
        except (ValueError, OSError, RuntimeError) as error:
            raise EvaluationError(f"{prompt_file}: cannot load the learned embedding {path}: {error}") from error
        logger.info("Loaded the learned token %s from %s for the rows that use it.", token, path)
        loaded.append({"embedding": str(path), "token": token, "sha256": file_sha256(path)})
    return loaded


def row_guidance(row: PromptRow) -> float | None:
    """The row's own guidance scale (the ``evaluation_guidance`` column of ESD/UCE/MACE prompt files), if any.

    Raises:
        EvaluationError: If the column holds something that is not a non-negative number.
    """
    text = row.extra.get(GUIDANCE_COLUMN, "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value < 0:
        raise EvaluationError(
            f"Prompt row {row.case_number}: {GUIDANCE_COLUMN} is {text!r}; it must be a non-negative number."
        )
    return value


def image_jobs(rows: Sequence[PromptRow], images_per_row: int = 1, guidance: float | None = None) -> list[ImageJob]:
    """Images of a prompt set: row by row, image ``i`` of a row with seed ``evaluation_seed + i``.

    Guidance of each image: ``guidance`` when given; else the row's ``evaluation_guidance`` (ESD's I2P file
    carries I2P's own scale per prompt, and later erasure codebases generate with it); else
    :data:`DEFAULT_GUIDANCE`. ESD's and UCE's own ``generate-images.py`` apply one ``--guidance_scale`` (7.5) to
    every row: pass ``guidance=7.5`` to match them. Their seeding matches image 0 of each row (one generator seeded
    with ``evaluation_seed``); their image ``i > 0`` is the generator's next draw, ours uses ``evaluation_seed + i``.
    """
    if images_per_row < 1:
        raise EvaluationError(f"images per prompt must be at least 1, got {images_per_row}.")
    jobs = []
    for row in rows:
        scale = guidance if guidance is not None else row_guidance(row)
        scale = DEFAULT_GUIDANCE if scale is None else scale
        for sample in range(images_per_row):
            jobs.append(ImageJob(len(jobs), row, sample, row.evaluation_seed + sample, scale))
    return jobs


def generation_guidance(jobs: Sequence[ImageJob]) -> float | str | None:
    """The run's guidance for reports: the one value every image used, ``"per-row"`` when they differ."""
    values = {job.guidance for job in jobs}
    if len(values) > 1:
        return "per-row"
    return next(iter(values), None)


# -- given images --------------------------------------------------------------------------------------------------


def _image_folder_models(folder: Path) -> list[Path]:
    """The folder itself if it holds images, else its subfolders that do (``base`` first, then by name)."""
    from erasure.files import IMAGE_SUFFIXES, MANIFEST_NAME

    def holds_images(path: Path) -> bool:
        return (path / MANIFEST_NAME).is_file() or any(
            p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir() if p.is_file()
        )

    if not folder.is_dir():
        raise EvaluationError(f"No image folder at {folder}.")
    if holds_images(folder):
        return [folder]
    subfolders = sorted((p for p in folder.iterdir() if p.is_dir() and holds_images(p)), key=lambda p: p.name)
    subfolders.sort(key=lambda p: p.name != "base")
    if not subfolders:
        raise EvaluationError(f"{folder} holds no images (and no subfolders of images); nothing to score.")
    return subfolders


def _rows_from_manifest(records: Sequence[Any], folder: Path) -> list[PromptRow]:
    """Prompt rows recorded in an image folder's ``manifest.json`` (one per case number)."""
    rows: dict[int, PromptRow] = {}
    for record in records:
        info = record.info
        if record.case_number is None or "prompt" not in info:
            raise EvaluationError(
                f"{folder} has no manifest.json describing its images; pass --prompts CSV (images named "
                "{case_number}_{i}.png) or --concept FILE to say what they show."
            )
        row = info.get("row") or {}
        rows.setdefault(
            record.case_number,
            PromptRow(
                case_number=record.case_number,
                prompt=str(info["prompt"]),
                evaluation_seed=int(row.get("evaluation_seed", info.get("seed", 0)) or 0),
                concept=str(row.get("concept", "")),
                row_type=str(row.get("type", "")),
                classes=tuple(row.get("classes", ())),
                extra={str(k): str(v) for k, v in (row.get("extra") or {}).items()},
            ),
        )
    return [rows[k] for k in sorted(rows)]


def plan_image_folders(
    images: str | Path, rows: Sequence[PromptRow] | None, prompt_source: PromptSource | None, taken: set[str]
) -> EvaluationPlan:
    """Plan the scoring of given images: one model per folder, one job per image every folder holds.

    Images are matched to rows by ``{case_number}_{index}``; images not in every folder are skipped (with a
    warning). Rows come from ``rows`` or, when ``None``, from the first folder's ``manifest.json``.

    Raises:
        EvaluationError: No images, images of different sizes, an image without a row, or no image common to all.
        ImageFolderError: An unreadable folder or manifest.
    """
    from erasure.files import read_image_folder

    entries: list[ModelEntry] = []
    generation = Generation()
    for folder in _image_folder_models(Path(images)):
        records, metadata, (h, w) = read_image_folder(folder)
        if generation.height is not None and (generation.height, generation.width) != (h, w):
            raise EvaluationError(
                f"{folder} holds {w}x{h} images but the other folders {generation.width}x"
                f"{generation.height}; compare images of one size."
            )
        generation.height, generation.width = h, w
        if metadata.get("steps") is not None:
            generation.steps = metadata["steps"]
        if metadata.get("guidance") is not None:
            generation.guidance = metadata["guidance"]
        if rows is None:
            rows = _rows_from_manifest(records, folder)
            prompt_source = prompt_source or PromptSource("manifest", str(folder / "manifest.json"), "")
        unnamed = [r.path.name for r in records if r.case_number is None]
        if unnamed:
            raise EvaluationError(
                f"{folder}/{unnamed[0]} is not named {{case_number}}_{{i}}.png and there is no manifest.json; "
                "cannot tell which prompt it shows."
            )
        by_key = {(r.case_number, r.index if r.index is not None else 0): r for r in records}
        label = unique_label(folder.name or "images", taken)
        info = {"source": str(folder.resolve()), "model_source": metadata.get("model_source", "")}
        info |= {k: metadata[k] for k in ("edit_fingerprint", "base_fingerprint") if k in metadata}
        entries.append(ModelEntry(label, "images", str(folder), records=by_key, info=info))
    if not rows:
        raise EvaluationError("No prompts to evaluate: pass --concept FILE or --prompts CSV.")
    keys = sorted(set.intersection(*(set(e.records or {}) for e in entries)))
    by_case = {row.case_number: row for row in rows}
    missing = [k for k in keys if k[0] not in by_case]
    if missing:
        raise EvaluationError(
            f"Image {missing[0][0]}_{missing[0][1]}.png has no prompt row (case_number {missing[0][0]})."
        )
    if not keys:
        raise EvaluationError("The image folders share no (case_number, index) image; nothing to compare.")
    for entry in entries:
        extra = set(entry.records or {}) - set(keys)
        if extra:
            logger.warning("%s: %d images not in every folder are skipped.", entry.source, len(extra))
    first = entries[0].records or {}
    jobs = [
        ImageJob(
            i,
            by_case[case],
            sample,
            int(first[(case, sample)].info.get("seed", by_case[case].evaluation_seed + sample)),
            first[(case, sample)].info.get("guidance", generation.guidance),
        )
        for i, (case, sample) in enumerate(keys)
    ]
    images_per_row = max(sample for _, sample in keys) + 1
    return EvaluationPlan(entries, jobs, generation, images_per_row, prompt_source)
