"""Evaluating erased models: pure metrics, CLIP loading, an accumulating evaluator, paired runs, sweeps, judges.

Base and edited models generate from the same prompts and seeds (one generator per image), and every image is
scored with one CLIP model (and, optionally, a judge such as the toy world's oracle). The modules, lowest first:

* :mod:`~erasure.evaluation.functional`: the metric maths as pure functions (CLIP score, zero-shot, efficacy /
  specificity / generality, harmonic mean, paired preservation, CMMD, bootstrap intervals);
* :mod:`~erasure.evaluation.clip`: loading a CLIP (open_clip names and tags, ``hf-hub:``, folders that declare
  their own templates and preprocessing in ``erasure_clip.json``);
* :mod:`~erasure.evaluation.evaluator`: :class:`Evaluator`, which only accumulates (``update`` / ``compute`` /
  ``reset``);
* :mod:`~erasure.evaluation.judges`: the judge interface and its metrics;
* :mod:`~erasure.evaluation.jobs` and :mod:`~erasure.evaluation.models`: what a run generates or reads;
* :mod:`~erasure.evaluation.results`: ``metrics.json`` and ``per_image.csv``;
* :mod:`~erasure.evaluation.run`: :func:`run_evaluation` (``erasure evaluate``) and :class:`EvaluationConfig`;
* :mod:`~erasure.evaluation.sweep`: :func:`run_sweep` and ``sweep.json``.

Names are imported from their modules on first use, so ``import erasure.evaluation`` loads neither torch nor
open_clip.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from erasure.evaluation.errors import ClipLoadError, EvaluationError

if TYPE_CHECKING:
    from erasure.evaluation.clip import (
        CLIP_CHOICES,
        DEFAULT_CLIP,
        DEFAULT_TEMPLATES,
        clip_card,
        default_templates,
        load_clip,
        parse_clip_spec,
    )
    from erasure.evaluation.evaluator import Evaluator
    from erasure.evaluation.functional import (
        ZeroShotResult,
        bootstrap_interval,
        clip_score,
        cmmd,
        efficacy,
        generality,
        harmonic_mean,
        paired_preservation,
        paired_ratio_interval,
        specificity,
        target_vs_anchor,
        zero_shot,
    )
    from erasure.evaluation.jobs import (
        DEFAULT_GUIDANCE,
        ImageJob,
        ModelEntry,
        PromptSource,
        generation_guidance,
        image_jobs,
        prompt_rows,
        row_guidance,
        unique_label,
    )
    from erasure.evaluation.judges import JUDGE_CHOICES, JUDGES, Judge, Verdict, judge_metrics, load_judge
    from erasure.evaluation.models import load_unet_weights, weights_edit
    from erasure.evaluation.results import (
        PER_IMAGE_COLUMNS,
        SCHEMA_VERSION,
        MetricsDocument,
        package_versions,
        strict_json,
        write_per_image_csv,
    )
    from erasure.evaluation.run import EvaluationConfig, run_evaluation
    from erasure.evaluation.sweep import SWEEP_FORMAT, SWEEP_NAME, run_sweep, sweep_point, write_sweep

_EXPORTS: dict[str, tuple[str, ...]] = {
    "clip": ("CLIP_CHOICES", "DEFAULT_CLIP", "DEFAULT_TEMPLATES", "clip_card", "default_templates", "load_clip",
             "parse_clip_spec"),
    "evaluator": ("Evaluator",),
    "functional": ("ZeroShotResult", "bootstrap_interval", "clip_score", "cmmd", "efficacy", "generality",
                   "harmonic_mean", "paired_preservation", "paired_ratio_interval", "specificity", "target_vs_anchor",
                   "zero_shot"),
    "jobs": ("DEFAULT_GUIDANCE", "ImageJob", "ModelEntry", "PromptSource", "generation_guidance", "image_jobs",
             "prompt_rows", "row_guidance", "unique_label"),
    "judges": ("JUDGES", "JUDGE_CHOICES", "Judge", "Verdict", "judge_metrics", "load_judge"),
    "models": ("load_unet_weights", "weights_edit"),
    "results": ("PER_IMAGE_COLUMNS", "SCHEMA_VERSION", "MetricsDocument", "package_versions", "strict_json",
                "write_per_image_csv"),
    "run": ("EvaluationConfig", "run_evaluation"),
    "sweep": ("SWEEP_FORMAT", "SWEEP_NAME", "run_sweep", "sweep_point", "write_sweep"),
}  # fmt: skip
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = [
    "CLIP_CHOICES",
    "ClipLoadError",
    "DEFAULT_CLIP",
    "DEFAULT_GUIDANCE",
    "DEFAULT_TEMPLATES",
    "EvaluationConfig",
    "EvaluationError",
    "Evaluator",
    "ImageJob",
    "JUDGES",
    "JUDGE_CHOICES",
    "Judge",
    "MetricsDocument",
    "ModelEntry",
    "PER_IMAGE_COLUMNS",
    "PromptSource",
    "SCHEMA_VERSION",
    "SWEEP_FORMAT",
    "SWEEP_NAME",
    "Verdict",
    "ZeroShotResult",
    "bootstrap_interval",
    "clip_card",
    "clip_score",
    "cmmd",
    "default_templates",
    "efficacy",
    "generality",
    "generation_guidance",
    "harmonic_mean",
    "image_jobs",
    "judge_metrics",
    "load_clip",
    "load_judge",
    "load_unet_weights",
    "package_versions",
    "paired_preservation",
    "paired_ratio_interval",
    "parse_clip_spec",
    "prompt_rows",
    "row_guidance",
    "run_evaluation",
    "run_sweep",
    "specificity",
    "strict_json",
    "sweep_point",
    "target_vs_anchor",
    "unique_label",
    "weights_edit",
    "write_per_image_csv",
    "write_sweep",
    "zero_shot",
]


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'erasure.evaluation' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"erasure.evaluation.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
