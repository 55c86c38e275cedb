"""Evaluating erased models with open_clip: pure metrics, an accumulating evaluator, paired runs, reports.

Base and edited models generate from the same prompts and seeds (one generator per image), and every image is
scored with one CLIP model. The metric maths lives in pure functions; :class:`Evaluator` only accumulates
(``update`` / ``compute`` / ``reset``), and :func:`run_evaluation` (``erasure evaluate``) wires generation,
sharding over ``accelerate`` processes and the output files together.

Metrics (per model; ``None`` where a metric has no images to stand on)
------------------------------------------------------------------------
* ``clip_score``: ``100 * max(cos(image, prompt), 0)`` per image, then the mean (Hessel et al. 2021, as
  torchmetrics computes it). Also ``clip_score_<role>`` for each role of :data:`erasure.prompt_sets.ROLES`.
* Zero-shot: each class text is embedded with every template (``{}`` replaced by the class), the normalised
  embeddings averaged and renormalised; ``p = softmax(logit_scale * cos(image, classes))``. ``zero_shot_top1`` is
  the fraction of images whose top class is their concept, ``zero_shot_target_prob`` the mean ``p(concept)``.
* ``efficacy`` = fraction of ``erased`` images *not* classified as their (erased) concept; ``generality`` = the
  same over ``generality`` images (held-out phrasings); ``specificity`` = fraction of ``preserved`` images still
  classified as their own concept; ``harmonic_mean`` = their harmonic mean (over those defined), as MACE reports.
* ``target_vs_anchor``: fraction of ``erased`` images closer (cosine) to their concept than to their anchor
  (ESD-style two-way accuracy; it should fall after erasure).
* ``paired_preservation``: mean cosine between the base and the edited image of the same prompt and seed (1 for
  the base model itself). Also ``paired_preservation_<role>``.
* ``cmmd``: CMMD (Jayasumana et al. 2024) between the model's and the base model's image embeddings: squared MMD
  with a Gaussian RBF kernel of bandwidth ``sigma = 10`` on L2-normalised CLIP embeddings, times 1000. Like the
  reference implementation (google-research ``cmmd/distance.py``) the default is the minimum-variance (biased,
  V-statistic) estimator, which is exactly 0 for identical sets; ``unbiased=True`` gives the U-statistic. The
  paper embeds with CLIP ViT-L/14@336 (``--clip ViT-L-14-336-quickgelu:openai`` here); values from other CLIP
  models are not comparable with published numbers. Also ``cmmd_<role>``.

How zero-shot classes are formed
--------------------------------
A row's true class is its ``concept``; its candidates are its ``classes``, or, when empty, every distinct concept
of the prompt set. Rows built from a concept file (:func:`erasure.prompt_sets.rows_from_request`) get the
concept's name, its ``preserve`` prompts and its anchor (``"a photo"`` for the unconditional anchor and for paired
anchors) as classes: for the toy world, the target against its neighbours. Rows without a concept get no
zero-shot verdict.

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
                  "rows": 10, "images_per_model": 10, "roles": {"erased": 5, "preserved": 5, ...}},
      "models": {"base": {"kind": "base", "source": "CompVis/stable-diffusion-v1-4", "images": "images/base"},
                 "<label>": {"kind": "edit" | "weights" | "images", "source": "...", "images": "images/<label>",
                             "method": "esd", "edit_fingerprint": "<sha256 of the deltas>",
                             "base_fingerprint": "<sha256 of the base tensors>", "weights_sha256": "..."}},
      "metrics": {"base": {<metric>: float | null, ..., "n_images": 10}, "<label>": {...}},
      "reference": "base",                                            # the model paired metrics compare with
      "versions": {"python", "torch", "diffusers", "transformers", "open_clip", "accelerate", "erasure"},
      "num_processes": 1,
      "files": {"per_image": "per_image.csv"}
    }

Metric names: ``n_images``, ``clip_score`` and ``clip_score_<role>``, ``zero_shot_top1``, ``zero_shot_target_prob``,
``efficacy``, ``generality``, ``specificity``, ``harmonic_mean``, ``target_vs_anchor``, ``paired_preservation``
and ``paired_preservation_<role>``, ``cmmd`` and ``cmmd_<role>``, with roles ``erased``, ``generality``,
``preserved``, ``other``.

``per_image.csv``
-----------------
One row per (model, image), models in ``metrics.json`` order, images in prompt-set order. Columns
(:data:`PER_IMAGE_COLUMNS`): ``model, case_number, sample_index, seed, prompt, concept, type, role, image``
(path relative to the output folder, or absolute for scored folders elsewhere), ``clip_score, predicted, correct,
target_prob, target_vs_anchor, paired_cosine`` (empty where undefined; booleans as 0/1), then provenance repeated
on every row: ``clip_model, clip_pretrained, templates`` (``|``-joined), ``steps, guidance`` (the image's own),
``height, width, prompts_sha256, model_source, edit_fingerprint, base_fingerprint, erasure_version, torch_version,
diffusers_version, transformers_version, open_clip_version``.
"""

from __future__ import annotations

import csv
import datetime
import io
import itertools
import json
import logging
import math
import os
import platform
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from erasure import __version__
from erasure.files import to_pil
from erasure.prompt_sets import ROLES, PromptRow, role_of

logger = logging.getLogger(__name__)

__all__ = [
    "CLIP_CHOICES",
    "DEFAULT_CLIP",
    "DEFAULT_TEMPLATES",
    "PER_IMAGE_COLUMNS",
    "SCHEMA_VERSION",
    "TOY_TEMPLATES",
    "ClipLoadError",
    "EvaluationError",
    "Evaluator",
    "ZeroShotResult",
    "clip_score",
    "cmmd",
    "efficacy",
    "generality",
    "harmonic_mean",
    "load_clip",
    "load_unet_weights",
    "package_versions",
    "paired_preservation",
    "parse_clip_spec",
    "run_evaluation",
    "specificity",
    "target_vs_anchor",
    "zero_shot",
]

SCHEMA_VERSION = 1
#: The default CLIP: OpenAI's ViT-L/14 (SD 1.x's text encoder), the usual CLIP-score model in erasure papers.
#: open_clip >= 2.29 builds OpenAI weights correctly only under the ``-quickgelu`` names.
DEFAULT_CLIP = "ViT-L-14-quickgelu:openai"
#: Documented choices for ``--clip`` (any open_clip ``name:tag`` works; see ``open_clip.list_pretrained()``).
CLIP_CHOICES: dict[str, str] = {
    "ViT-L-14-quickgelu:openai": "default; OpenAI CLIP ViT-L/14, the CLIP-score model of most erasure papers",
    "ViT-B-32-quickgelu:openai": "fast; OpenAI CLIP ViT-B/32",
    "ViT-H-14:laion2b_s32b_b79k": "strong; OpenCLIP ViT-H/14 (SD 2.x's text encoder family)",
    "ViT-L-14-336-quickgelu:openai": "CMMD's reference embedding (CLIP ViT-L/14 at 336 px)",
    "local-dir:checkpoints/toyworld-clip": "the shipped toy-world CLIP (or any folder with open_clip_config.json)",
}
#: Zero-shot templates for real images (``{}`` is replaced by the class text).
DEFAULT_TEMPLATES: tuple[str, ...] = ("a photo of {}.", "a painting of {}.", "an image of {}.", "{}")
#: The toy world's caption templates (erasure.toyworld.captions.TEMPLATES), used with the toy CLIP.
TOY_TEMPLATES: tuple[str, ...] = ("{}", "a picture of {}", "an image of {}", "a drawing of {}")
CMMD_SIGMA = 10.0
CMMD_SCALE = 1000.0
#: Guidance of generated images when neither ``guidance`` nor the prompt row's own column gives one.
DEFAULT_GUIDANCE = 7.5
#: Per-row guidance column of the field's prompt files (ESD's ``data/*.csv``, UCE's and MACE's prompt files).
GUIDANCE_COLUMN = "evaluation_guidance"

PER_IMAGE_COLUMNS: tuple[str, ...] = (
    "model", "case_number", "sample_index", "seed", "prompt", "concept", "type", "role", "image",
    "clip_score", "predicted", "correct", "target_prob", "target_vs_anchor", "paired_cosine",
    "clip_model", "clip_pretrained", "templates", "steps", "guidance", "height", "width", "prompts_sha256",
    "model_source", "edit_fingerprint", "base_fingerprint", "erasure_version", "torch_version", "diffusers_version",
    "transformers_version", "open_clip_version",
)  # fmt: skip


class EvaluationError(ValueError):
    """Bad input to an evaluation (the message is one line and says what to do)."""


class ClipLoadError(EvaluationError):
    """A CLIP model could not be loaded (unknown name or tag, bad folder)."""


# --------------------------------------------------------------------------------------------------------------
# Pure metric functions
# --------------------------------------------------------------------------------------------------------------


def _reduce(values: Tensor, reduction: Literal["mean", "none"]) -> Tensor:
    if reduction == "none":
        return values
    if reduction == "mean":
        return values.mean()
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def _rowwise_cosine(a: Tensor, b: Tensor) -> Tensor:
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(
            f"expected two (N, D) feature tensors of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    return (F.normalize(a.double(), dim=-1) * F.normalize(b.double(), dim=-1)).sum(-1)


def clip_score(image_features: Tensor, text_features: Tensor, reduction: Literal["mean", "none"] = "mean") -> Tensor:
    """CLIP score: ``100 * max(cos(image_i, text_i), 0)`` per image, then the mean.

    Args:
        image_features: ``(N, D)`` image embeddings (need not be normalised).
        text_features: ``(N, D)`` embeddings of each image's prompt.
        reduction: ``"mean"`` for the score, ``"none"`` for the per-image scores.

    Returns:
        A 0-dim tensor (float64), or ``(N,)`` per-image scores.
    """
    return _reduce(100.0 * _rowwise_cosine(image_features, text_features).clamp(min=0), reduction)


@dataclass(frozen=True)
class ZeroShotResult:
    """Zero-shot classification of ``N`` images among ``C`` classes.

    Attributes:
        probabilities: ``(N, C)`` softmax probabilities.
        targets: ``(N,)`` true class indices, or ``None``.
    """

    probabilities: Tensor
    targets: Tensor | None = None

    @property
    def predicted(self) -> Tensor:
        """``(N,)`` index of the most probable class."""
        return self.probabilities.argmax(-1)

    @property
    def correct(self) -> Tensor:
        """``(N,)`` bool: the top class is the target."""
        if self.targets is None:
            raise ValueError("no targets were given")
        return self.predicted == self.targets

    @property
    def target_probability(self) -> Tensor:
        """``(N,)`` probability of each image's target class."""
        if self.targets is None:
            raise ValueError("no targets were given")
        return self.probabilities.gather(1, self.targets[:, None]).squeeze(1)

    @property
    def top1(self) -> float:
        """Top-1 accuracy."""
        return float(self.correct.double().mean())

    @property
    def mean_target_probability(self) -> float:
        """Mean probability of the target class."""
        return float(self.target_probability.double().mean())


def zero_shot(
    image_features: Tensor, class_features: Tensor, targets: Tensor | None = None, logit_scale: float = 100.0
) -> ZeroShotResult:
    """Zero-shot classification: ``softmax(logit_scale * cos(image, class))`` over the classes.

    Args:
        image_features: ``(N, D)`` image embeddings.
        class_features: ``(C, D)`` class embeddings (template-averaged: see :meth:`Evaluator.class_features`).
        targets: ``(N,)`` true class indices, for :attr:`ZeroShotResult.top1` and the target probability.
        logit_scale: CLIP's learnt temperature ``exp(logit_scale)`` (100 for OpenAI's models).

    Returns:
        The probabilities, with the targets.
    """
    image = F.normalize(image_features.double(), dim=-1)
    classes = F.normalize(class_features.double(), dim=-1)
    probabilities = (float(logit_scale) * image @ classes.T).softmax(-1)
    if targets is not None:
        targets = torch.as_tensor(targets, dtype=torch.long)
    return ZeroShotResult(probabilities, targets)


def target_vs_anchor(
    image_features: Tensor,
    target_features: Tensor,
    anchor_features: Tensor,
    reduction: Literal["mean", "none"] = "mean",
) -> Tensor:
    """Two-way zero-shot between each image's target and anchor: 1 where the image is closer to the target.

    Args:
        image_features: ``(N, D)``.
        target_features: ``(N, D)`` embedding of each image's target class.
        anchor_features: ``(N, D)`` embedding of each image's anchor class.
        reduction: ``"mean"``: the fraction classified as the target; ``"none"``: per image (0./1.).

    Returns:
        A 0-dim tensor or ``(N,)`` values.
    """
    closer = _rowwise_cosine(image_features, target_features) > _rowwise_cosine(image_features, anchor_features)
    return _reduce(closer.double(), reduction)


def _fraction(flags: Tensor) -> float | None:
    flags = torch.as_tensor(flags)
    return None if flags.numel() == 0 else float(flags.double().mean())


def efficacy(classified_as_target: Tensor) -> float | None:
    """Fraction of erased-concept images *no longer* classified as the concept (``None`` for no images)."""
    fraction = _fraction(classified_as_target)
    return None if fraction is None else 1.0 - fraction


def specificity(classified_correctly: Tensor) -> float | None:
    """Fraction of neighbour (preserved) images still classified as their own concept."""
    return _fraction(classified_correctly)


def generality(classified_as_target: Tensor) -> float | None:
    """Fraction of held-out-phrasing images of an erased concept not classified as the concept."""
    return efficacy(classified_as_target)


def harmonic_mean(values: Sequence[float | None]) -> float | None:
    """Harmonic mean of the values that are not ``None`` (0 if any is 0; ``None`` if none is given).

    With efficacy, specificity and generality this is MACE's ``H = 3 / (1/E + 1/S + 1/G)``.
    """
    present = [float(v) for v in values if v is not None]
    if not present:
        return None
    if any(v <= 0 for v in present):
        return 0.0
    return len(present) / sum(1.0 / v for v in present)


def paired_preservation(
    base_features: Tensor, edited_features: Tensor, reduction: Literal["mean", "none"] = "mean"
) -> Tensor:
    """Cosine similarity between the base and the edited image of the same prompt and seed.

    Args:
        base_features: ``(N, D)`` embeddings of the base model's images.
        edited_features: ``(N, D)`` embeddings of the edited model's images, in the same order.
        reduction: ``"mean"`` or ``"none"``.

    Returns:
        A 0-dim tensor or ``(N,)`` cosines.
    """
    return _reduce(_rowwise_cosine(base_features, edited_features), reduction)


def _rbf_mean(a: Tensor, b: Tensor, gamma: float, skip_diagonal: bool = False, block: int = 2048) -> Tensor:
    """Mean of ``exp(-gamma |a_i - b_j|^2)`` over all pairs (off-diagonal pairs only when ``skip_diagonal``).

    Computed in row blocks, so 30k x 30k embeddings never need the whole kernel matrix in memory.
    """
    b_squared = (b * b).sum(1)[None, :]
    total = torch.zeros((), dtype=a.dtype)
    for start in range(0, len(a), block):
        rows = a[start : start + block]
        squared = (rows * rows).sum(1)[:, None] + b_squared - 2.0 * rows @ b.T
        total = total + torch.exp(-gamma * squared).sum()
    if not skip_diagonal:
        return total / (len(a) * len(b))
    # k(a_i, a_i) = exp(0) = 1 for each of the n diagonal pairs.
    return (total - len(a)) / (len(a) * (len(a) - 1))


def cmmd(x: Tensor, y: Tensor, sigma: float = CMMD_SIGMA, scale: float = CMMD_SCALE, unbiased: bool = False) -> float:
    """CMMD: ``scale * MMD^2(x, y)`` with the Gaussian RBF kernel ``k(a, b) = exp(-|a - b|^2 / (2 sigma^2))``.

    ``MMD^2 = mean k(x, x') + mean k(y, y') - 2 mean k(x, y)``. By default the means run over all pairs,
    diagonal included (the minimum-variance/biased estimator of Gretton et al. 2012, eq. 5, which the reference
    implementation ``google-research/cmmd`` uses); ``unbiased=True`` drops the diagonal terms of the within-set
    means (the U-statistic, eq. 3). Pass L2-normalised CLIP embeddings, as CMMD does.

    Args:
        x: ``(n, D)`` embeddings of one image set.
        y: ``(m, D)`` embeddings of the other.
        sigma: Kernel bandwidth (10 in the paper).
        scale: Output scale (1000 in the paper).
        unbiased: Use the unbiased estimator (needs at least two rows in each set).

    Returns:
        The distance (0 for identical sets with the default estimator).
    """
    x, y = x.double(), y.double()
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or not len(x) or not len(y):
        raise ValueError(
            f"cmmd needs two non-empty (n, D) sets of one width, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if unbiased and (len(x) < 2 or len(y) < 2):
        raise ValueError("the unbiased estimator needs at least two embeddings in each set")
    gamma = 1.0 / (2.0 * sigma**2)
    k_xx = _rbf_mean(x, x, gamma, skip_diagonal=unbiased)
    k_yy = _rbf_mean(y, y, gamma, skip_diagonal=unbiased)
    k_xy = _rbf_mean(x, y, gamma)
    return float(scale * (k_xx + k_yy - 2.0 * k_xy))


# --------------------------------------------------------------------------------------------------------------
# CLIP loading
# --------------------------------------------------------------------------------------------------------------


def parse_clip_spec(spec: str) -> tuple[str, str | None]:
    """Split ``--clip`` into ``(name, pretrained tag)``.

    ``NAME:TAG`` (``ViT-H-14:laion2b_s32b_b79k``) gives both; ``local-dir:PATH``, ``hf-hub:ORG/REPO`` and an existing
    folder give the spec itself with no tag; a bare name gives no tag.
    """
    spec = spec.strip()
    if spec.startswith(("local-dir:", "hf-hub:")) or Path(spec).expanduser().is_dir():
        return spec, None
    name, sep, tag = spec.rpartition(":")
    return (name, tag or None) if sep else (spec, None)


def _local_clip_folder(name: str) -> Path | None:
    if name.startswith("local-dir:"):
        return Path(name[len("local-dir:") :]).expanduser()
    path = Path(name).expanduser()
    if path.is_dir() or name.startswith(("./", "../", "/", "~")):
        return path
    return None


def _names_hint() -> str:
    return (
        'list names with `python -c "import open_clip; print(open_clip.list_models())"` and name:tag pairs with '
        "`open_clip.list_pretrained()`, or pass a folder holding open_clip_config.json and open_clip_model.safetensors"
    )


def is_toy_clip(name: str) -> bool:
    """Whether ``name`` is the toy world's CLIP (``toyworld-clip``, or a folder with its architecture)."""
    from erasure.toyworld.models import CLIP_CONFIG, CLIP_MODEL_NAME

    folder = _local_clip_folder(name)
    if folder is None:
        return name == CLIP_MODEL_NAME
    try:
        config = json.loads((folder / "open_clip_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return (folder / f"{CLIP_MODEL_NAME}.json").is_file()
    return config.get("model_cfg") == CLIP_CONFIG


def default_templates(name: str) -> tuple[str, ...]:
    """Zero-shot templates for a CLIP: the toy world's caption templates for the toy CLIP, else photo templates."""
    return TOY_TEMPLATES if is_toy_clip(name) else DEFAULT_TEMPLATES


def load_clip(
    name: str = "ViT-L-14-quickgelu", pretrained: str | None = "openai", device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, Callable, Callable]:
    """Load an open_clip model for evaluation.

    Args:
        name: An open_clip architecture (``ViT-L-14-quickgelu``, ``ViT-B-32-quickgelu``, ``ViT-H-14``), a folder
            (``checkpoints/toyworld-clip`` or ``local-dir:PATH``) holding ``open_clip_config.json`` and
            ``open_clip_model.safetensors`` (or an architecture ``NAME.json`` plus one ``.safetensors`` file), or
            ``hf-hub:ORG/REPO``. ``toyworld-clip`` names the toy architecture (random weights unless
            ``pretrained`` is a weights file).
        pretrained: An open_clip pretrained tag for ``name`` (``openai``, ``laion2b_s32b_b79k``), a local
            ``.safetensors`` file, or ``None`` for random weights. Ignored for folders and ``hf-hub:`` names.
        device: Where to put the model.

    Returns:
        ``(model, preprocess, tokenizer)``: the model in eval mode, the evaluation transform (PIL image -> tensor)
        and the tokenizer (list of texts -> token ids).

    Raises:
        ClipLoadError: For an unknown name or tag, a tag whose activation does not match the architecture (OpenAI
            weights need ``-quickgelu`` names since open_clip 2.29), or a folder without config or weights.
    """
    import open_clip

    folder = _local_clip_folder(name)
    if folder is not None:
        model, preprocess, tokenizer = _load_clip_folder(folder, device)
    elif name.startswith("hf-hub:"):
        model, _, preprocess = open_clip.create_model_and_transforms(name, device=device)
        tokenizer = open_clip.get_tokenizer(name)
    else:
        from erasure.toyworld.models import CLIP_MODEL_NAME, CLIP_PREPROCESS, register_clip_config

        if name == CLIP_MODEL_NAME:
            register_clip_config()
        if name not in open_clip.list_models():
            raise ClipLoadError(f"Unknown CLIP model '{name}'; {_names_hint()}.")
        kwargs: dict[str, Any] = {}
        if name == CLIP_MODEL_NAME:
            kwargs = {"image_mean": CLIP_PREPROCESS["mean"], "image_std": CLIP_PREPROCESS["std"]}
        if pretrained and not Path(pretrained).is_file():
            _check_pretrained_tag(name, pretrained)
        if pretrained and Path(pretrained).is_file() and Path(pretrained).suffix != ".safetensors":
            raise ClipLoadError(f"Refusing to unpickle {pretrained}: convert the weights to .safetensors first.")
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained or None, device=device, **kwargs
        )
        tokenizer = open_clip.get_tokenizer(name)
    return model.eval(), preprocess, tokenizer


def _check_pretrained_tag(name: str, tag: str) -> None:
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(name)
    if tag not in tags:
        known = ", ".join(tags) if tags else "none (this architecture has no released weights)"
        raise ClipLoadError(f"CLIP '{name}' has no pretrained tag '{tag}'; its tags: {known}.")
    tag_quick_gelu = bool(open_clip.get_pretrained_cfg(name, tag).get("quick_gelu", False))
    model_quick_gelu = bool((open_clip.get_model_config(name) or {}).get("quick_gelu", False))
    if tag_quick_gelu != model_quick_gelu:
        fixed = f"{name}-quickgelu" if tag_quick_gelu else name.removesuffix("-quickgelu")
        raise ClipLoadError(
            f"The '{tag}' weights were trained with {'QuickGELU' if tag_quick_gelu else 'GELU'} but '{name}' uses "
            f"{'QuickGELU' if model_quick_gelu else 'GELU'} (open_clip >= 2.29 no longer switches it): use "
            f"'{fixed}:{tag}'."
        )


def _load_clip_folder(folder: Path, device: str | torch.device) -> tuple[torch.nn.Module, Callable, Callable]:
    import open_clip

    if not folder.is_dir():
        raise ClipLoadError(f"No CLIP folder at {folder}; {_names_hint()}.")
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        pickles = [p.name for p in folder.iterdir() if p.suffix in {".bin", ".pt", ".pth"}]
        advice = f" ({', '.join(pickles)} are pickles: convert them to .safetensors)" if pickles else ""
        raise ClipLoadError(f"{folder} holds no .safetensors weights{advice}.")
    if (folder / "open_clip_config.json").is_file():
        spec = f"local-dir:{folder}"
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(spec, device=device)
            tokenizer = open_clip.get_tokenizer(spec)
        except (ValueError, RuntimeError, KeyError) as error:
            raise ClipLoadError(f"Could not load the CLIP in {folder}: {error}") from error
        return model, preprocess, tokenizer
    configs = [p for p in folder.glob("*.json") if "vision_cfg" in p.read_text(encoding="utf-8", errors="ignore")]
    if len(configs) != 1 or len(weights) != 1:
        raise ClipLoadError(
            f"{folder} has no open_clip_config.json; it then needs exactly one architecture NAME.json and one "
            f".safetensors file (found {len(configs)} and {len(weights)})."
        )
    open_clip.add_model_config(folder)
    name = configs[0].stem
    kwargs: dict[str, Any] = {}
    if is_toy_clip(str(folder)) or name == "toyworld-clip":
        from erasure.toyworld.models import CLIP_PREPROCESS

        kwargs = {"image_mean": CLIP_PREPROCESS["mean"], "image_std": CLIP_PREPROCESS["std"]}
    model, _, preprocess = open_clip.create_model_and_transforms(
        name, pretrained=str(weights[0]), device=device, **kwargs
    )
    return model, preprocess, open_clip.get_tokenizer(name)


# --------------------------------------------------------------------------------------------------------------
# The accumulating evaluator
# --------------------------------------------------------------------------------------------------------------


def _is_features(value: Any) -> bool:
    return isinstance(value, Tensor) and value.ndim == 2 and value.is_floating_point()


@dataclass
class _Rows:
    prompts: list[str] = field(default_factory=list)
    concepts: list[str] = field(default_factory=list)
    classes: list[tuple[str, ...]] = field(default_factory=list)
    roles: list[str] = field(default_factory=list)
    anchors: list[str] = field(default_factory=list)


class Evaluator:
    """Accumulates image embeddings and their prompts, then computes every metric of the module at once.

    The CLIP model is injected (tests pass a tiny one). ``update`` embeds images (or takes embeddings) and stores
    them; ``compute`` runs the pure metric functions on everything stored, so any split into batches gives the
    same numbers as one call.

    Example:
        >>> evaluator = Evaluator(*load_clip())
        >>> evaluator.update(images, prompts, concepts=concepts, roles=roles, reference=base_features)
        >>> evaluator.compute()["clip_score"]
    """

    def __init__(
        self,
        model: torch.nn.Module,
        preprocess: Callable,
        tokenizer: Callable,
        templates: Sequence[str] = DEFAULT_TEMPLATES,
        device: str | torch.device | None = None,
        batch_size: int = 64,
        logit_scale: float | None = None,
    ) -> None:
        """Create an evaluator.

        Args:
            model: An open_clip model (anything with ``encode_image``, ``encode_text`` and ``logit_scale``).
            preprocess: PIL image -> ``(3, H, W)`` tensor.
            tokenizer: List of texts -> token ids.
            templates: Zero-shot templates, each with one ``{}``.
            device: Where to run CLIP (default: the model's device).
            batch_size: Images / texts per CLIP forward.
            logit_scale: Zero-shot temperature; default ``model.logit_scale.exp()``.
        """
        bad = [t for t in templates if t.count("{}") != 1]
        if not templates or bad:
            raise ValueError(f"each template needs exactly one '{{}}' for the class text; got {bad or 'none'}")
        self.model = model.eval()
        self.preprocess, self.tokenizer = preprocess, tokenizer
        self.templates = tuple(templates)
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.batch_size = batch_size
        if logit_scale is None:
            logit_scale = float(model.logit_scale.detach().float().exp()) if hasattr(model, "logit_scale") else 100.0
        self.logit_scale = float(logit_scale)
        self._text_cache: dict[str, Tensor] = {}
        self.reset()

    # -- embedding -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def embed_images(self, images: Any) -> Tensor:
        """L2-normalised ``(N, D)`` float32 CPU embeddings of uint8 ``(N, H, W, 3)`` images or PIL images."""
        images = list(images)
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = torch.stack([self.preprocess(to_pil(im)) for im in images[start : start + self.batch_size]])
            features = self.model.encode_image(batch.to(self.device, self._dtype()))
            out.append(F.normalize(features.float(), dim=-1).cpu())
        if not out:
            return torch.zeros(0, self._width())
        return torch.cat(out)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> Tensor:
        """L2-normalised ``(N, D)`` float32 CPU text embeddings (cached per text)."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._text_cache))
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            features = self.model.encode_text(self.tokenizer(chunk).to(self.device))
            for text, row in zip(chunk, F.normalize(features.float(), dim=-1).cpu(), strict=True):
                self._text_cache[text] = row
        if not texts:
            return torch.zeros(0, self._width())
        return torch.stack([self._text_cache[t] for t in texts])

    def class_features(self, classes: Sequence[str]) -> Tensor:
        """``(C, D)`` class embeddings: each template's normalised embedding, averaged, renormalised."""
        texts = [template.replace("{}", name) for name in classes for template in self.templates]
        features = self.embed_texts(texts).view(len(classes), len(self.templates), -1)
        return F.normalize(features.mean(1), dim=-1)

    def _dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def _width(self) -> int:
        projection = getattr(self.model, "text_projection", None)
        if isinstance(projection, Tensor):
            return projection.shape[-1]
        return int(getattr(self.model, "embed_dim", 0) or self.embed_texts(["a"]).shape[-1])

    def _features(self, value: Any) -> Tensor:
        return F.normalize(value.detach().float().cpu(), dim=-1) if _is_features(value) else self.embed_images(value)

    # -- accumulation --------------------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget every accumulated image (the text-embedding cache is kept)."""
        self._features_list: list[Tensor] = []
        self._reference_list: list[Tensor | None] = []
        self._rows = _Rows()

    def update(
        self,
        images_or_features: Any,
        prompts: Sequence[str],
        *,
        concepts: Sequence[str] | None = None,
        classes: Sequence[Sequence[str]] | None = None,
        roles: Sequence[str] | None = None,
        anchors: Sequence[str] | None = None,
        reference: Any = None,
    ) -> None:
        """Add a batch of images.

        Args:
            images_or_features: uint8 ``(N, H, W, 3)`` images (array or list, or PIL images), or ``(N, D)`` float
                embeddings from :meth:`embed_images`.
            prompts: Each image's prompt.
            concepts: Each image's true class (``""``: none).
            classes: Each image's candidate classes (empty: every distinct concept seen).
            roles: Each image's role (:data:`erasure.prompt_sets.ROLES`, or a ``type`` value such as
                ``"others"``); default ``"other"``.
            anchors: Each image's anchor class for :func:`target_vs_anchor` (``""``: none).
            reference: The base model's images (or embeddings) of the same prompts and seeds, for the paired
                metrics; ``None`` if there are none.
        """
        features = self._features(images_or_features)
        n = len(features)

        def column(values: Sequence[Any] | None, default: Any, name: str) -> list[Any]:
            if values is None:
                return [default] * n
            if len(values) != n:
                raise ValueError(f"got {n} images but {len(values)} {name}")
            return list(values)

        prompts = column(prompts, "", "prompts")
        roles_ = [role if role in ROLES else role_of(role) for role in column(roles, "other", "roles")]
        if reference is not None:
            reference = self._features(reference)
            if reference.shape != features.shape:
                raise ValueError(
                    f"reference has shape {tuple(reference.shape)} but the images {tuple(features.shape)}"
                )
        self._features_list.append(features)
        self._reference_list.append(reference)
        self._rows.prompts += prompts
        self._rows.concepts += [c or "" for c in column(concepts, "", "concepts")]
        self._rows.classes += [tuple(c) for c in column(classes, (), "class lists")]
        self._rows.roles += roles_
        self._rows.anchors += [a or "" for a in column(anchors, "", "anchors")]

    @property
    def features(self) -> Tensor:
        """All accumulated image embeddings ``(N, D)``."""
        if not self._features_list:
            return torch.zeros(0, 0)
        return torch.cat(self._features_list)

    def _reference(self) -> Tensor | None:
        if not self._reference_list or any(r is None for r in self._reference_list):
            return None
        return torch.cat(self._reference_list)  # type: ignore[arg-type]

    # -- computation ---------------------------------------------------------------------------------------------

    def _per_image(self) -> dict[str, Tensor | list[Any]]:
        """Per-image scores of everything accumulated."""
        features, rows = self.features, self._rows
        n = len(rows.prompts)
        nan = torch.full((n,), float("nan"), dtype=torch.float64)
        scores = clip_score(features, self.embed_texts(rows.prompts), reduction="none") if n else nan
        all_concepts = tuple(dict.fromkeys(c for c in rows.concepts if c))
        predicted: list[str] = [""] * n
        correct, target_prob, versus = nan.clone(), nan.clone(), nan.clone()
        groups: dict[tuple[str, ...], list[int]] = {}
        for i, concept in enumerate(rows.concepts):
            if concept:
                candidates = rows.classes[i] or all_concepts
                if concept not in candidates:
                    candidates = (*candidates, concept)
                groups.setdefault(tuple(candidates), []).append(i)
        for candidates, indices in groups.items():
            index = torch.tensor(indices)
            targets = torch.tensor([candidates.index(rows.concepts[i]) for i in indices])
            result = zero_shot(features[index], self.class_features(candidates), targets, self.logit_scale)
            correct[index] = result.correct.double()
            target_prob[index] = result.target_probability
            for i, k in zip(indices, result.predicted.tolist(), strict=True):
                predicted[i] = candidates[k]
        with_anchor = [i for i in range(n) if rows.concepts[i] and rows.anchors[i] and rows.roles[i] == "erased"]
        if with_anchor:
            index = torch.tensor(with_anchor)
            texts = list(
                dict.fromkeys([rows.concepts[i] for i in with_anchor] + [rows.anchors[i] for i in with_anchor])
            )
            table = dict(zip(texts, self.class_features(texts), strict=True))
            target = torch.stack([table[rows.concepts[i]] for i in with_anchor])
            anchor = torch.stack([table[rows.anchors[i]] for i in with_anchor])
            versus[index] = target_vs_anchor(features[index], target, anchor, reduction="none")
        reference = self._reference()
        paired = paired_preservation(reference, features, reduction="none") if reference is not None and n else nan
        return {
            "clip_score": scores,
            "predicted": predicted,
            "correct": correct,
            "target_prob": target_prob,
            "target_vs_anchor": versus,
            "paired_cosine": paired,
        }

    def compute(self) -> dict[str, float | int | None]:
        """Every metric of the module docstring over all accumulated images (``None`` where undefined)."""
        per = self._per_image()
        roles = np.array(self._rows.roles)
        features, reference = self.features, self._reference()
        n = len(roles)

        def mean(values: Tensor, mask: np.ndarray | None = None) -> float | None:
            selected = values if mask is None else values[torch.from_numpy(mask)]
            selected = selected[~torch.isnan(selected)]
            return None if selected.numel() == 0 else float(selected.mean())

        has_concept = np.array([bool(c) for c in self._rows.concepts], dtype=bool)
        correct = per["correct"]
        assert isinstance(correct, Tensor)

        def flags(role: str) -> Tensor:
            mask = torch.from_numpy((roles == role) & has_concept) if n else torch.zeros(0, dtype=torch.bool)
            return correct[mask] if n else correct

        metrics: dict[str, float | int | None] = {"n_images": n}
        metrics["clip_score"] = mean(per["clip_score"]) if n else None  # type: ignore[arg-type]
        for role in ROLES:
            metrics[f"clip_score_{role}"] = mean(per["clip_score"], roles == role) if n else None  # type: ignore[arg-type]
        metrics["zero_shot_top1"] = mean(correct) if n else None
        metrics["zero_shot_target_prob"] = mean(per["target_prob"]) if n else None  # type: ignore[arg-type]
        metrics["efficacy"] = efficacy(flags("erased"))
        metrics["generality"] = generality(flags("generality"))
        metrics["specificity"] = specificity(flags("preserved"))
        metrics["harmonic_mean"] = harmonic_mean([metrics["efficacy"], metrics["specificity"], metrics["generality"]])
        metrics["target_vs_anchor"] = mean(per["target_vs_anchor"]) if n else None  # type: ignore[arg-type]
        metrics["paired_preservation"] = mean(per["paired_cosine"]) if n else None  # type: ignore[arg-type]
        for role in ROLES:
            value = mean(per["paired_cosine"], roles == role) if n else None  # type: ignore[arg-type]
            metrics[f"paired_preservation_{role}"] = value
        metrics["cmmd"] = cmmd(features, reference) if reference is not None and n else None
        for role in ROLES:
            mask = torch.from_numpy(roles == role) if n else None
            defined = reference is not None and mask is not None and bool(mask.any())
            metrics[f"cmmd_{role}"] = cmmd(features[mask], reference[mask]) if defined else None  # type: ignore[index]
        return metrics

    def per_image(self) -> list[dict[str, Any]]:
        """Per-image scores of everything accumulated, one dict per image.

        Keys: ``clip_score, predicted, correct`` (0/1), ``target_prob, target_vs_anchor`` (0/1, erased images),
        ``paired_cosine``; ``None`` where undefined.
        """
        per = self._per_image()

        def value(key: str, i: int) -> Any:
            item = per[key][i]
            if isinstance(item, Tensor):
                item = float(item)
                if math.isnan(item):
                    return None
                return int(item) if key in ("correct", "target_vs_anchor") else item
            return item or None

        return [{key: value(key, i) for key in per} for i in range(len(self._rows.prompts))]


# --------------------------------------------------------------------------------------------------------------
# Weights files (partial UNet state dicts, as the official ESD/UCE scripts save them)
# --------------------------------------------------------------------------------------------------------------


def load_unet_weights(path: str | Path, unet: torch.nn.Module) -> dict[str, Tensor]:
    """Read a partial UNet state dict from ``.safetensors`` and name it in diffusers' terms.

    ESD's and UCE's scripts save the edited UNet tensors with diffusers names (``down_blocks.1.attentions.0...``),
    loaded with ``pipe.unet.load_state_dict(weights, strict=False)``. Keys may also carry a ``unet.`` prefix, or
    be in the original LDM layout under ``model.diffusion_model.`` (CompVis-era ESD checkpoints), which is mapped
    back to diffusers names.

    Args:
        path: The ``.safetensors`` file (pickles are refused).
        unet: The UNet the weights are for (names and shapes are checked against it).

    Returns:
        ``{diffusers parameter name: tensor}``.

    Raises:
        EvaluationError: Not a safetensors file, no UNet keys, an unknown key, or a shape mismatch.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise EvaluationError(
            f"--weights takes a .safetensors file, not {path.name} (pickles can run code when loaded): convert it "
            "with safetensors.torch.save_file(torch.load(f, weights_only=True), 'weights.safetensors')."
        )
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise EvaluationError(f"Could not read {path}: {error}") from error
    if not state:
        raise EvaluationError(f"{path} holds no tensors.")
    own = dict(unet.state_dict())
    ldm_names: dict[str, str] | None = None
    renamed: dict[str, Tensor] = {}
    for key, tensor in state.items():
        name = key
        if name.startswith("unet."):
            name = name[len("unet.") :]
        elif name.startswith("model.diffusion_model."):
            if ldm_names is None:
                ldm_names = _ldm_to_diffusers_names(unet)
            name = ldm_names.get(name[len("model.diffusion_model.") :], name)
        if name not in own:
            raise EvaluationError(
                f"{path.name}: '{key}' is not a UNet parameter of this model; --weights takes a partial UNet state "
                "dict with diffusers names (optionally prefixed 'unet.' or, in the LDM layout, "
                "'model.diffusion_model.'), as ESD's and UCE's scripts save it; check that it was made from this base."
            )
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise EvaluationError(
                f"{path.name}: '{key}' has shape {tuple(tensor.shape)} but the model's {name} has "
                f"{tuple(own[name].shape)}; the weights come from a different base model."
            )
        renamed[name] = tensor
    return renamed


def _ldm_to_diffusers_names(unet: torch.nn.Module) -> dict[str, str]:
    from erasure.convert import unet_to_ldm as _unet_to_ldm

    try:
        ldm = list(_unet_to_ldm(unet))
    except ValueError as error:
        raise EvaluationError(f"LDM-layout weights are not supported for this UNet ({error}).") from error
    return dict(zip(ldm, unet.state_dict(), strict=True))


@contextmanager
def patched_unet(pipe: Any, weights: Mapping[str, Tensor]) -> Iterator[None]:
    """Load ``weights`` (diffusers names) into ``pipe.unet`` for the duration of the block, then restore."""
    parameters = dict(pipe.unet.named_parameters()) | dict(pipe.unet.named_buffers())
    originals = {name: parameters[name].detach().clone() for name in weights}
    with torch.no_grad():
        for name, tensor in weights.items():
            parameters[name].copy_(tensor.to(parameters[name].device, parameters[name].dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            for name, tensor in originals.items():
                parameters[name].copy_(tensor)


# --------------------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------------------


def package_versions() -> dict[str, str]:
    """Versions of Python and the packages that decide the numbers."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version(), "erasure": __version__}
    for key, distribution in (
        ("torch", "torch"),
        ("diffusers", "diffusers"),
        ("transformers", "transformers"),
        ("open_clip", "open_clip_torch"),
        ("accelerate", "accelerate"),
    ):
        try:
            versions[key] = version(distribution)
        except PackageNotFoundError:
            versions[key] = ""
    return versions


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, float):
        return repr(value) if not math.isnan(value) else ""
    return value


def write_per_image_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Write ``per_image.csv`` with :data:`PER_IMAGE_COLUMNS` (missing keys empty)."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(PER_IMAGE_COLUMNS)
    for row in rows:
        writer.writerow([_csv_value(row.get(column)) for column in PER_IMAGE_COLUMNS])
    path.write_text(buffer.getvalue(), encoding="utf-8")


# --------------------------------------------------------------------------------------------------------------
# A full evaluation run (``erasure evaluate``)
# --------------------------------------------------------------------------------------------------------------


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


@dataclass
class ModelEntry:
    """One model of a run: the base, an edit, a weights file, or a folder of given images."""

    label: str
    kind: str  # "base" | "edit" | "weights" | "images"
    source: str
    edit: Any = None
    weights: dict[str, Tensor] | None = None
    records: dict[tuple[int, int], Any] | None = None  # images mode: (case, sample) -> ImageRecord
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class PromptSource:
    """Where the prompts came from (recorded in metrics.json)."""

    kind: str  # "csv" | "concepts" | "manifest"
    path: str
    sha256: str


def _unique_label(label: str, taken: set[str]) -> str:
    label = "".join(c if c.isalnum() or c in "-_." else "_" for c in label) or "model"
    candidate, k = label, 2
    while candidate in taken:
        candidate, k = f"{label}-{k}", k + 1
    taken.add(candidate)
    return candidate


def _state(device: str | None):
    """The process state of ``accelerate`` (CPU processes use gloo when launched with several processes)."""
    from accelerate import PartialState

    cpu = device == "cpu" or (device in (None, "auto") and not torch.cuda.is_available())
    return PartialState(cpu=cpu)


def _shard(state: Any, jobs: list[ImageJob]) -> list[ImageJob]:
    if state.num_processes == 1:
        return jobs
    with state.split_between_processes(jobs) as part:
        return list(part)


def _image_folder_models(folder: Path) -> list[Path]:
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
                type=str(row.get("type", "")),
                classes=tuple(row.get("classes", ())),
                extra={str(k): str(v) for k, v in (row.get("extra") or {}).items()},
            ),
        )
    return [rows[k] for k in sorted(rows)]


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


def run_evaluation(
    out: str | Path,
    *,
    model: str | None = None,
    edits: Sequence[str | Path] = (),
    weights: Sequence[str | Path] = (),
    rows: Sequence[PromptRow] | None = None,
    prompt_source: PromptSource | None = None,
    images: str | Path | None = None,
    clip: str = DEFAULT_CLIP,
    templates: Sequence[str] | None = None,
    steps: int = 25,
    guidance: float | None = None,
    images_per_row: int = 1,
    batch_size: int = 8,
    height: int | None = None,
    width: int | None = None,
    device: str | None = None,
    dtype: str = "auto",
    overwrite: bool = False,
    progress: bool = True,
    base_check: bool = True,
    max_relative_change: float | None = None,
) -> Path | None:
    """Generate (or read) images for every model, score them, and write the results atomically.

    Base and every edited model generate from the same rows and seeds; each ``--edit`` and ``--weights`` is one
    model compared with the base. Under ``accelerate launch`` the images are split between the processes, each
    writes its share, and the main process merges them in prompt-set order and writes the reports, so the
    numbers equal a single-process run (up to float rounding of batched kernels).

    Output folder: ``images/<model>/{case_number}_{i}.png`` (+ ``manifest.json``), ``metrics.json``,
    ``per_image.csv`` (schemas in the module docstring). It is assembled in a temporary folder beside ``out`` and
    renamed into place at the end; bad input fails before anything is written.

    Args:
        out: Output folder.
        model: The base pipeline (hub id, folder or single file); required unless ``images`` is given.
        edits: Edit folders (:class:`erasure.edit.Edit`), each evaluated against the base.
        weights: Partial UNet state dicts (``.safetensors``, see :func:`load_unet_weights`), each one model.
        rows: The prompt rows (required with ``model``; optional with ``images``, which can carry a manifest).
        prompt_source: Where ``rows`` came from.
        images: Instead of generating, score this folder of images (or its subfolders, one per model; a subfolder
            named ``base`` is the reference of the paired metrics).
        clip: ``NAME:TAG`` or a folder (see :func:`load_clip`).
        templates: Zero-shot templates (default: :func:`default_templates` of the CLIP).
        steps: Denoising steps.
        guidance: Classifier-free guidance scale of every image; ``None``: each row's ``evaluation_guidance``
            column where the prompt file has one, else 7.5 (see :func:`image_jobs`).
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

    Returns:
        The output folder on the main process, ``None`` on the others.

    Raises:
        EvaluationError: For bad input (and its subclasses, as ``ClipLoadError``); also the loaders' errors
            (``PipelineLoadError``, ``EditFormatError``, ``FingerprintMismatchError``, ``ImageFolderError``).
    """
    from erasure.files import read_image_folder

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise EvaluationError(f"{out} is a file; choose another --out.")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise EvaluationError(f"{out} exists; choose another --out or pass --overwrite.")
    if model is not None and images is not None:
        raise EvaluationError("Give a model to generate with or a folder of images to score, not both.")
    if model is None and images is None:
        raise EvaluationError("Give a model to generate with (--model) or a folder of images to score (--images).")
    if images is not None and (edits or weights):
        raise EvaluationError("--edit/--weights need a model to generate with; they cannot apply to given images.")
    state = _state(device)
    run_device = torch.device(device) if device not in (None, "auto") else state.device
    clip_name, clip_tag = parse_clip_spec(clip)
    templates = tuple(templates) if templates else default_templates(clip_name)

    # -- validate everything before writing anything ------------------------------------------------------------
    entries: list[ModelEntry] = []
    taken: set[str] = set()
    pipe = None
    generation: dict[str, Any] = {"steps": None, "guidance": None, "height": None, "width": None}
    if images is not None:
        for folder in _image_folder_models(Path(images)):
            records, metadata, (h, w) = read_image_folder(folder)
            if generation["height"] is not None and (generation["height"], generation["width"]) != (h, w):
                raise EvaluationError(
                    f"{folder} holds {w}x{h} images but the other folders {generation['width']}x"
                    f"{generation['height']}; compare images of one size."
                )
            generation.update(height=h, width=w)
            for key in ("steps", "guidance"):
                if metadata.get(key) is not None:
                    generation[key] = metadata[key]
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
            label = _unique_label(folder.name or "images", taken)
            info = {"source": str(folder.resolve()), "model_source": metadata.get("model_source", "")}
            info |= {k: metadata[k] for k in ("edit_fingerprint", "base_fingerprint") if k in metadata}
            entries.append(ModelEntry(label, "images", str(folder), records=by_key, info=info))
    assert rows is not None or images is None
    if not rows:
        raise EvaluationError("No prompts to evaluate: pass --concept FILE or --prompts CSV.")
    if images is not None:
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
                first[(case, sample)].info.get("guidance", generation["guidance"]),
            )
            for i, (case, sample) in enumerate(keys)
        ]
        images_per_row = max(sample for _, sample in keys) + 1
    else:
        jobs = image_jobs(rows, images_per_row, guidance)
        pipe, entries = _load_models(model, edits, weights, run_device, dtype, taken, base_check, max_relative_change)  # type: ignore[arg-type]
        from erasure.pipeline import default_image_size

        size = default_image_size(pipe)
        generation.update(steps=steps, guidance=generation_guidance(jobs), height=height or size, width=width or size)
    evaluator_clip = load_clip(clip_name, clip_tag, device=run_device)

    # -- produce this process's images -----------------------------------------------------------------------------
    work = _make_workdir(out, state)
    try:
        mine = _shard(state, jobs)
        shard: dict[str, Tensor] = {"index": torch.tensor([job.index for job in mine], dtype=torch.long)}
        evaluator = Evaluator(*evaluator_clip, templates=templates, device=run_device, batch_size=batch_size)
        show = progress and state.is_main_process
        for entry in entries:
            produce = _producer(entry, pipe, work, generation, batch_size, show)
            shard[entry.label] = _embed_all(evaluator, produce, mine, batch_size)
        _save_shard(work, state.process_index, shard)
        state.wait_for_everyone()
        if not state.is_main_process:
            return None
        features = _merge_shards(work, state.num_processes, [e.label for e in entries], len(jobs))
        _write_reports(
            work, entries, jobs, features, evaluator, clip_name, clip_tag, templates, generation, images_per_row,
            prompt_source, state.num_processes,
        )  # fmt: skip
        from erasure.files import replace_folder

        replace_folder(work, out)
        return out
    finally:
        if state.is_main_process and work.exists():
            shutil.rmtree(work, ignore_errors=True)


def _load_models(
    model: str,
    edits: Sequence[str | Path],
    weights: Sequence[str | Path],
    device: torch.device,
    dtype: str,
    taken: set[str],
    base_check: bool = True,
    max_relative_change: float | None = None,
) -> tuple[Any, list[ModelEntry]]:
    from erasure.edit import MAX_RELATIVE_CHANGE, Edit, FingerprintMismatchError, fingerprint
    from erasure.pipeline import detect_family, load_pipeline
    from erasure.prompt_sets import file_sha256

    limit = MAX_RELATIVE_CHANGE if max_relative_change is None else float(max_relative_change)
    loaded_edits = []
    for folder in edits:  # cheap checks first: a bad edit folder fails before the model loads
        loaded_edits.append((Path(folder), Edit.load(folder, require_fingerprint=base_check)))
    for path in weights:
        if not Path(path).is_file():
            raise EvaluationError(f"No weights file at {path}.")
    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(dtype)
    if torch_dtype is None:
        if dtype != "auto":
            raise EvaluationError(f"Unknown dtype {dtype!r}; choose auto, float32, float16 or bfloat16.")
        torch_dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipe = load_pipeline(model, device=device, dtype=torch_dtype)
    pipe.set_progress_bar_config(disable=True)
    family = str(detect_family(pipe))
    entries = [ModelEntry(_unique_label("base", taken), "base", str(model), info={"family": family})]
    for folder, edit in loaded_edits:
        try:
            edit.check_base(pipe)
        except FingerprintMismatchError as error:
            raise FingerprintMismatchError(f"--edit {folder}: {error}") from None
        info = {
            "family": family,
            "method": edit.config.get("method", ""),
            "edit_fingerprint": fingerprint(edit.deltas),
            "base_fingerprint": edit.config.get("base_fingerprint") or "",
            "base_model": edit.config.get("base_model", ""),
            "base_check": "done" if edit.config.get("base_fingerprint") or edit.config.get("parts") else "skipped",
            # null: the check is off (strict JSON has no infinity)
            "max_relative_change": limit if math.isfinite(limit) else None,
        }
        entries.append(ModelEntry(_unique_label(folder.name, taken), "edit", str(folder), edit=edit, info=info))
    for path in weights:
        state = load_unet_weights(path, pipe.unet)
        info = {"family": family, "weights_sha256": file_sha256(path), "tensors": len(state)}
        label = _unique_label(Path(path).stem, taken)
        entries.append(ModelEntry(label, "weights", str(path), weights=state, info=info))
    return pipe, entries


def _make_workdir(out: Path, state: Any) -> Path:
    name = [f".{out.name}.tmp-{uuid.uuid4().hex[:12]}"]
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(name)
    work = out.resolve().parent / name[0]
    if state.is_main_process:
        work.mkdir(parents=True)
        (work / ".shards").mkdir()
    state.wait_for_everyone()
    return work


@contextmanager
def _model_applied(entry: ModelEntry, pipe: Any) -> Iterator[None]:
    if entry.kind == "edit":
        limit = entry.info.get("max_relative_change")
        entry.edit.apply_to(pipe, max_relative_change=math.inf if limit is None else limit)
        try:
            yield
        finally:
            entry.edit.revert(pipe)
    elif entry.kind == "weights":
        with patched_unet(pipe, entry.weights or {}):
            yield
    else:
        yield


def _producer(
    entry: ModelEntry, pipe: Any, work: Path, generation: Mapping[str, Any], batch_size: int, show: bool
) -> Callable[[list[ImageJob]], Iterator[tuple[list[ImageJob], np.ndarray]]]:
    """A function yielding ``(jobs, uint8 images)`` batches for a model, writing generated images to ``work``."""
    from tqdm.auto import tqdm

    from erasure.files import load_image, write_image
    from erasure.generate import generate

    def produce(jobs: list[ImageJob]) -> Iterator[tuple[list[ImageJob], np.ndarray]]:
        batches = range(0, len(jobs), batch_size)
        if entry.kind == "images":
            for start in tqdm(batches, desc=f"read {entry.label}", disable=not show or None):
                chunk = jobs[start : start + batch_size]
                assert entry.records is not None
                yield chunk, np.stack([load_image(entry.records[(j.row.case_number, j.sample)].path) for j in chunk])
            return
        folder = work / "images" / entry.label
        folder.mkdir(parents=True, exist_ok=True)
        with _model_applied(entry, pipe):
            for start in tqdm(batches, desc=f"generate {entry.label}", disable=not show or None):
                chunk = jobs[start : start + batch_size]
                parts = []
                for scale, same in itertools.groupby(chunk, key=lambda job: job.guidance):  # one call per scale
                    same = list(same)
                    parts.append(
                        generate(
                            pipe,
                            [job.row.prompt for job in same],
                            [job.seed for job in same],
                            steps=generation["steps"],
                            guidance_scale=scale,
                            batch_size=batch_size,
                            height=generation["height"],
                            width=generation["width"],
                            progress=False,
                        )
                    )
                images = np.concatenate(parts)
                for job, image in zip(chunk, images, strict=True):
                    write_image(folder / job.filename, image)
                yield chunk, images

    return produce


def _embed_all(evaluator: Evaluator, produce: Callable, jobs: list[ImageJob], batch_size: int) -> Tensor:
    parts = [evaluator.embed_images(images) for _, images in produce(jobs)]
    return torch.cat(parts) if parts else torch.zeros(0, evaluator._width())


def _save_shard(work: Path, rank: int, shard: Mapping[str, Tensor]) -> None:
    from safetensors.torch import save_file

    target = work / ".shards" / f"{rank}.safetensors"
    temporary = target.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in shard.items()}, str(temporary))
    os.replace(temporary, target)


def _merge_shards(work: Path, num_processes: int, labels: Sequence[str], count: int) -> dict[str, Tensor]:
    """Every process's features, put back in prompt-set order."""
    from safetensors.torch import load_file

    shards = [load_file(str(work / ".shards" / f"{rank}.safetensors")) for rank in range(num_processes)]
    index = torch.cat([s["index"] for s in shards])
    if sorted(index.tolist()) != list(range(count)):
        raise RuntimeError(f"the shards hold images {sorted(index.tolist())[:5]}..., not each of the {count} once")
    order = torch.argsort(index)
    merged = {}
    for label in labels:
        merged[label] = torch.cat([s[label] for s in shards if len(s[label])])[order]
    shutil.rmtree(work / ".shards")
    return merged


def _write_reports(
    work: Path,
    entries: Sequence[ModelEntry],
    jobs: Sequence[ImageJob],
    features: Mapping[str, Tensor],
    evaluator: Evaluator,
    clip_name: str,
    clip_tag: str | None,
    templates: Sequence[str],
    generation: Mapping[str, Any],
    images_per_row: int,
    prompt_source: PromptSource | None,
    num_processes: int,
) -> None:
    from erasure.files import write_manifest
    from erasure.prompt_sets import rows_as_dicts

    versions = package_versions()
    reference_label = next((e.label for e in entries if e.kind == "base" or e.label == "base"), None)
    reference = features[reference_label] if reference_label is not None else None
    rows = [job.row for job in jobs]
    metrics: dict[str, dict[str, Any]] = {}
    per_image: list[dict[str, Any]] = []
    row_dicts = {row.case_number: d for row, d in zip(rows, rows_as_dicts(rows), strict=True)}
    constant = {
        "clip_model": clip_name,
        "clip_pretrained": clip_tag or "",
        "templates": "|".join(templates),
        "steps": generation.get("steps"),
        "height": generation.get("height"),
        "width": generation.get("width"),
        "prompts_sha256": prompt_source.sha256 if prompt_source else "",
        "erasure_version": versions["erasure"],
        "torch_version": versions["torch"],
        "diffusers_version": versions["diffusers"],
        "transformers_version": versions["transformers"],
        "open_clip_version": versions["open_clip"],
    }
    models: dict[str, dict[str, Any]] = {}
    for entry in entries:
        evaluator.reset()
        evaluator.update(
            features[entry.label],
            [row.prompt for row in rows],
            concepts=[row.concept for row in rows],
            classes=[row.classes for row in rows],
            roles=[row.role for row in rows],
            anchors=[row.anchor for row in rows],
            reference=reference,
        )
        metrics[entry.label] = evaluator.compute()
        if entry.kind == "images":
            folder = Path(entry.source).resolve()
            image_of = {
                job.index: str(entry.records[(job.row.case_number, job.sample)].path.resolve()) for job in jobs
            }  # type: ignore[index]
            models[entry.label] = {"kind": "images", "images": str(folder), **entry.info}
        else:
            image_of = {job.index: f"images/{entry.label}/{job.filename}" for job in jobs}
            models[entry.label] = {
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
            metadata = {**{k: generation.get(k) for k in ("steps", "guidance", "height", "width")}}
            metadata |= {"model": entry.label, "model_source": entry.source, **entry.info}
            write_manifest(work / "images" / entry.label, manifest, metadata)
        provenance = {
            "model_source": entry.info.get("model_source") or entry.source,
            "edit_fingerprint": entry.info.get("edit_fingerprint", ""),
            "base_fingerprint": entry.info.get("base_fingerprint", ""),
        }
        for job, scores in zip(jobs, evaluator.per_image(), strict=True):
            per_image.append(
                {
                    "model": entry.label,
                    "case_number": job.row.case_number,
                    "sample_index": job.sample,
                    "seed": job.seed,
                    "prompt": job.row.prompt,
                    "concept": job.row.concept,
                    "type": job.row.type,
                    "role": job.row.role,
                    "image": image_of[job.index],
                    **scores,
                    **constant,
                    "guidance": job.guidance,
                    **provenance,
                }
            )
    roles: dict[str, int] = {}
    for job in jobs:
        roles[job.row.role] = roles.get(job.row.role, 0) + 1
    document = {
        "schema_version": SCHEMA_VERSION,
        "kind": "erasure-evaluation",
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "clip": {
            "model": clip_name,
            "pretrained": clip_tag,
            "templates": list(templates),
            "logit_scale": evaluator.logit_scale,
        },
        "generation": {
            **{k: generation.get(k) for k in ("steps", "guidance", "height", "width")},
            "seeds_per_prompt": images_per_row,
            "seeds": [job.seed for job in jobs],
        },
        "prompts": {
            "source": prompt_source.path if prompt_source else "",
            "kind": prompt_source.kind if prompt_source else "",
            "sha256": prompt_source.sha256 if prompt_source else "",
            "rows": len({job.row.case_number for job in jobs}),
            "images_per_model": len(jobs),
            "roles": roles,
        },
        "models": models,
        "metrics": metrics,
        "reference": reference_label,
        "versions": versions,
        "num_processes": num_processes,
        "files": {"per_image": "per_image.csv"},
    }
    (work / "metrics.json").write_text(
        json.dumps(strict_json(document), indent=2, allow_nan=False) + "\n", encoding="utf-8"
    )
    write_per_image_csv(work / "per_image.csv", per_image)
