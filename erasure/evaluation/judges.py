"""Judges: scorers beside CLIP that say of each image whether it shows the erased target and follows its prompt.

CLIP scores every run; a judge (``erasure evaluate --judge NAME[:ARG]``) adds its own verdicts. A judge answers two
questions per image, each ``True``, ``False`` or ``None`` (it cannot tell, e.g. a prompt outside its world):

* ``shows_target``: does the image show the concept being erased (``row.extra["erased_concept"]`` for rows from a
  concept file, else the row's ``concept``)?
* ``follows_prompt``: does it show everything its prompt asks for?

From these, per model (:func:`judge_metrics`, keys prefixed with the judge's name):

* ``target_rate``: the fraction of ``erased`` and ``generality`` images that show the target, with ``target_n``
  and a 95% percentile-bootstrap interval (``target_rate_ci95_low`` / ``_high``);
* ``neighbour_rate``: the fraction of ``preserved`` images that follow their prompt, with ``neighbour_n`` and its
  interval;
* ``neighbour_ratio``: edited / reference neighbour rate over the same images (paired by prompt and seed), with a
  paired-bootstrap interval: 1 means the neighbours are as well drawn as by the base model.

Judges are registered by name as ``"module:factory"`` strings (:data:`JUDGES`) and imported only when used; the
factory takes ``(argument or None, device=...)``.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from erasure.evaluation.errors import EvaluationError

if TYPE_CHECKING:
    import numpy as np

    from erasure.prompt_sets import PromptRow

__all__ = [
    "JUDGES",
    "JUDGE_CHOICES",
    "NEIGHBOUR_ROLES",
    "TARGET_ROLES",
    "Judge",
    "Verdict",
    "check_judge_spec",
    "judge_metrics",
    "load_judge",
]

#: Registered judges: name -> ``"module:factory"``.
JUDGES: dict[str, str] = {"oracle": "erasure.toyworld.judge:OracleJudge"}
#: ``--judge`` choices, for the command line's help.
JUDGE_CHOICES: dict[str, str] = {
    "oracle": "the toy world's oracle, a CNN trained on renders (oracle:DIR for another oracle folder)",
}
#: Roles whose images should no longer show the target, and roles whose images should follow their prompt.
TARGET_ROLES: tuple[str, ...] = ("erased", "generality")
NEIGHBOUR_ROLES: tuple[str, ...] = ("preserved",)


@dataclass(frozen=True)
class Verdict:
    """A judge's verdict on one image.

    Attributes:
        label: What the judge saw, in its own words (``yellow|circle|plain|Pip``).
        shows_target: The image shows the concept being erased (``None``: cannot tell).
        follows_prompt: The image shows everything its prompt asks for (``None``: cannot tell).
    """

    label: str = ""
    shows_target: bool | None = None
    follows_prompt: bool | None = None


@runtime_checkable
class Judge(Protocol):
    """What a judge provides: a name, its provenance, and verdicts on a batch of images."""

    name: str

    def describe(self) -> dict[str, Any]:
        """Provenance recorded under ``judges.<name>`` in ``metrics.json`` (model folder, version, ...)."""
        ...

    def judge(self, images: np.ndarray, rows: Sequence[PromptRow]) -> list[Verdict]:
        """One verdict per uint8 ``(N, H, W, 3)`` image; ``rows[i]`` is the prompt row of image ``i``."""
        ...


def _parse(spec: str) -> tuple[str, str | None]:
    name, _, argument = spec.strip().partition(":")
    if name not in JUDGES:
        known = ", ".join(sorted(JUDGES))
        raise EvaluationError(f"Unknown judge '{name}'; choose from {known} (CLIP scores every run).")
    return name, argument or None


def check_judge_spec(spec: str) -> str:
    """The judge's name of ``NAME[:ARG]``, or :class:`EvaluationError` for an unknown name (nothing is loaded)."""
    return _parse(spec)[0]


def load_judge(spec: str, device: Any = "cpu") -> Judge:
    """Import and build the judge of ``NAME[:ARG]`` (``oracle``, ``oracle:checkpoints/toyworld-oracle``)."""
    name, argument = _parse(spec)
    module, _, factory = JUDGES[name].partition(":")
    judge = getattr(importlib.import_module(module), factory)(argument, device=device)
    if not isinstance(judge, Judge):
        raise TypeError(f"{JUDGES[name]} did not build a judge (it needs name, describe() and judge()).")
    return judge


def judge_metrics(
    name: str, verdicts: Sequence[Verdict], roles: Sequence[str], reference: Sequence[Verdict] | None = None
) -> dict[str, float | int | None]:
    """A model's target rate, neighbour rate and (with ``reference``) neighbour ratio, with bootstrap intervals.

    Args:
        name: The judge's name (the keys' prefix).
        verdicts: One verdict per image of the model.
        roles: Each image's role (:data:`erasure.prompt_sets.ROLES`).
        reference: The reference model's verdicts on the same prompts and seeds, for the paired ratio.

    Returns:
        ``{name_target_rate, name_target_n, name_target_rate_ci95_low, ..._high, name_neighbour_rate,
        name_neighbour_n, ..., name_neighbour_ratio, name_neighbour_ratio_ci95_low, ..._high}`` (``None`` where
        no image is judged).
    """
    from erasure.evaluation.functional import bootstrap_interval, paired_ratio_interval

    if len(verdicts) != len(roles) or (reference is not None and len(reference) != len(verdicts)):
        raise ValueError("judge_metrics needs one verdict and one role per image (and as many reference verdicts)")
    metrics: dict[str, float | int | None] = {}

    def rate(key: str, hits: list[bool]) -> None:
        interval = bootstrap_interval(hits)
        metrics[f"{name}_{key}_rate"] = sum(hits) / len(hits) if hits else None
        metrics[f"{name}_{key}_n"] = len(hits)
        metrics[f"{name}_{key}_rate_ci95_low"] = interval[0] if interval else None
        metrics[f"{name}_{key}_rate_ci95_high"] = interval[1] if interval else None

    targets = [v.shows_target for v, r in zip(verdicts, roles, strict=True) if r in TARGET_ROLES]
    rate("target", [bool(t) for t in targets if t is not None])
    neighbours = [i for i, (v, r) in enumerate(zip(verdicts, roles, strict=True)) if r in NEIGHBOUR_ROLES]
    rate("neighbour", [bool(verdicts[i].follows_prompt) for i in neighbours if verdicts[i].follows_prompt is not None])
    ratio = interval = None
    if reference is not None:
        pairs = [
            (bool(reference[i].follows_prompt), bool(verdicts[i].follows_prompt))
            for i in neighbours
            if reference[i].follows_prompt is not None and verdicts[i].follows_prompt is not None
        ]
        before, after = [p[0] for p in pairs], [p[1] for p in pairs]
        ratio = sum(after) / sum(before) if sum(before) else None
        interval = paired_ratio_interval(before, after) if pairs else None
    metrics[f"{name}_neighbour_ratio"] = ratio
    metrics[f"{name}_neighbour_ratio_ci95_low"] = interval[0] if interval else None
    metrics[f"{name}_neighbour_ratio_ci95_high"] = interval[1] if interval else None
    return metrics
