"""Pure metric functions: every number of an evaluation is computed here, from embeddings or per-image flags.

Nothing here loads a model or touches a file; :class:`erasure.evaluation.Evaluator` only accumulates inputs and
calls these functions, so each can be tested against an independent reference implementation.

Metrics
-------
* :func:`clip_score`: ``100 * max(cos(image, prompt), 0)`` per image, then the mean (Hessel et al. 2021, as
  torchmetrics computes it).
* :func:`zero_shot`: ``p = softmax(logit_scale * cos(image, classes))`` over template-averaged class embeddings.
* :func:`efficacy` = fraction of ``erased`` images *not* classified as their (erased) concept; :func:`generality`
  the same over ``generality`` images (held-out phrasings); :func:`specificity` = fraction of ``preserved`` images
  still classified as their own concept; :func:`harmonic_mean` of those defined, MACE's
  ``H = 3 / (1/E + 1/S + 1/G)``.
* :func:`target_vs_anchor`: two-way zero-shot between an image's concept and its anchor (ESD-style accuracy).
* :func:`paired_preservation`: cosine between the base and the edited image of the same prompt and seed.
* :func:`cmmd`: CMMD (Jayasumana et al. 2024): ``1000 * MMD^2`` with a Gaussian RBF kernel of bandwidth
  ``sigma = 10`` on L2-normalised CLIP embeddings. As in the reference implementation (google-research
  ``cmmd/distance.py``) the default is the minimum-variance (biased, V-statistic) estimator, exactly 0 for
  identical sets; ``unbiased=True`` gives the U-statistic. The paper embeds with CLIP ViT-L/14@336; values from
  other CLIP models are not comparable with published numbers.
* :func:`paired_bootstrap`: the percentile-bootstrap interval of any statistic of aligned per-image columns (the
  same images judged on several models), image indices drawn once per resample for every column; with it
  :func:`bootstrap_interval` (a rate), :func:`paired_ratio_interval` (edited / base rate) and the probe's gap
  closed. Images are resampled with replacement from a fixed seed, so the same verdicts always give the same
  interval.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "CMMD_SCALE",
    "CMMD_SIGMA",
    "ZeroShotResult",
    "bootstrap_interval",
    "clip_score",
    "cmmd",
    "efficacy",
    "generality",
    "harmonic_mean",
    "paired_preservation",
    "paired_bootstrap",
    "paired_ratio_interval",
    "specificity",
    "target_vs_anchor",
    "zero_shot",
]

CMMD_SIGMA = 10.0
CMMD_SCALE = 1000.0
#: Bootstrap resamples and their seed (fixed: an interval is a deterministic function of the verdicts).
BOOTSTRAP_DRAWS = 2000
BOOTSTRAP_SEED = 0


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


def paired_bootstrap(
    columns: Sequence[Sequence[float]],
    statistic: Callable[..., np.ndarray],
    level: float = 0.95,
    draws: int = BOOTSTRAP_DRAWS,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[float, float] | None:
    """Percentile-bootstrap interval of a statistic of aligned per-image columns.

    Entry ``i`` of every column belongs to the same image (the same prompt and seed, judged on several models), so
    each resample draws image indices once and takes every column's entry of each drawn image: the interval keeps
    the pairing. Resamples where the statistic is not finite (a ratio over a zero rate) are left out.

    Args:
        columns: Equal-length sequences of numbers (flags count as 0/1), one per model or judge.
        statistic: Called with one ``[draws, n]`` array per column; returns ``[draws]`` values.
        level: Coverage of the interval.
        draws: Bootstrap resamples.
        seed: Seed of the resampling (``numpy.random.default_rng``).

    Returns:
        ``(low, high)``, or ``None`` for no images or no finite resample.

    Raises:
        ValueError: If the columns differ in length.
    """
    arrays = [np.asarray(column, dtype=float) for column in columns]
    if len({len(a) for a in arrays}) != 1:
        raise ValueError(f"paired columns need equal lengths, got {[len(a) for a in arrays]}")
    if len(arrays[0]) == 0:
        return None
    rows = np.random.default_rng(seed).integers(len(arrays[0]), size=(draws, len(arrays[0])))
    with np.errstate(divide="ignore", invalid="ignore"):
        values = np.asarray(statistic(*(a[rows] for a in arrays)), dtype=float)
    values = values[np.isfinite(values)]
    if not len(values):
        return None
    low, high = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def bootstrap_interval(
    hits: Sequence[bool], level: float = 0.95, draws: int = BOOTSTRAP_DRAWS, seed: int = BOOTSTRAP_SEED
) -> tuple[float, float] | None:
    """Percentile-bootstrap interval of a rate (:func:`paired_bootstrap` of one column's mean).

    Args:
        hits: One flag per image (the image shows the target, follows its prompt, ...).
        level: Coverage of the interval.
        draws: Bootstrap resamples.
        seed: Seed of the resampling (``numpy.random.default_rng``).

    Returns:
        ``(low, high)``, or ``None`` for no images.
    """
    return paired_bootstrap([hits], lambda values: values.mean(-1), level, draws, seed)


def paired_ratio_interval(
    before: Sequence[bool],
    after: Sequence[bool],
    level: float = 0.95,
    draws: int = BOOTSTRAP_DRAWS,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[float, float] | None:
    """Paired-bootstrap interval of ``mean(after) / mean(before)`` (:func:`paired_bootstrap`).

    Image ``i`` of ``before`` and of ``after`` come from the same prompt and seed; resamples whose ``before`` rate is
    0 are left out.

    Args:
        before: One flag per image of the reference (base) model.
        after: The flags of the same images from the other model, in the same order.
        level: Coverage of the interval.
        draws: Bootstrap resamples.
        seed: Seed of the resampling.

    Returns:
        ``(low, high)``, or ``None`` when no resample has a non-zero ``before`` rate.
    """
    if len(before) != len(after):
        raise ValueError(f"paired flags need equal lengths, got {len(before)} and {len(after)}")
    return paired_bootstrap([before, after], lambda b, a: a.sum(-1) / b.sum(-1), level, draws, seed)


#: An image whose pixel values span at most this many uint8 levels is blank or constant: what a model whose
#: weights hold NaN (decoded to black) or that has collapsed draws. Such an image says nothing about a concept, so
#: it is flagged and left out of every metric instead of being scored as "the concept is gone".
DEGENERATE_RANGE = 2


def degenerate_images(images: Any) -> list[bool]:
    """Whether each uint8 image ``(N, H, W, C)`` is blank or one flat colour.

    Flat: every channel's values span at most ``DEGENERATE_RANGE`` levels.
    """
    array = np.asarray(images)
    if array.ndim != 4 or len(array) == 0:
        return [False] * len(array)
    pixels = array.reshape(len(array), -1, array.shape[-1]).astype(np.int16)
    spread = (pixels.max(axis=1) - pixels.min(axis=1)).max(axis=1)  # the widest channel of each image
    return [bool(x) for x in spread <= DEGENERATE_RANGE]
