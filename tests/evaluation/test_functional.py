"""Pure metrics against independent reference implementations (plain loops, naive estimators)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from erasure.evaluation import (
    bootstrap_interval,
    clip_score,
    cmmd,
    efficacy,
    harmonic_mean,
    paired_preservation,
    paired_ratio_interval,
    specificity,
    target_vs_anchor,
    zero_shot,
)


def test_clip_score_clamps_each_image_before_averaging():
    images = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    texts = torch.tensor([[0.5, math.sqrt(0.75)], [-0.5, math.sqrt(0.75)]])  # cos +0.5 and -0.5
    assert clip_score(images, texts, reduction="none").tolist() == pytest.approx([50.0, 0.0])
    assert float(clip_score(images, texts)) == pytest.approx(25.0)  # not max(mean cos, 0) * 100 = 0
    assert float(clip_score(3 * images, 7 * texts)) == pytest.approx(25.0)  # scale-free


def test_clip_score_matches_a_plain_loop():
    generator = torch.Generator().manual_seed(0)
    images, texts = torch.randn(7, 5, generator=generator), torch.randn(7, 5, generator=generator)
    expected = np.mean(
        [100 * max(float(a @ b) / float(a.norm() * b.norm()), 0.0) for a, b in zip(images, texts, strict=True)]
    )
    assert float(clip_score(images, texts)) == pytest.approx(expected, rel=1e-6)


def naive_mmd(x, y, sigma=10.0, unbiased=False):
    x, y = x.double().numpy(), y.double().numpy()

    def k(a, b):
        return math.exp(-float(((a - b) ** 2).sum()) / (2 * sigma**2))

    def within(s):
        pairs = [(i, j) for i in range(len(s)) for j in range(len(s)) if not (unbiased and i == j)]
        return sum(k(s[i], s[j]) for i, j in pairs) / len(pairs)

    between = sum(k(a, b) for a in x for b in y) / (len(x) * len(y))
    return 1000 * (within(x) + within(y) - 2 * between)


def test_cmmd_matches_the_reference_estimators():
    generator = torch.Generator().manual_seed(1)
    x = F.normalize(torch.randn(6, 4, generator=generator), dim=-1)
    y = F.normalize(torch.randn(5, 4, generator=generator) + 0.5, dim=-1)
    assert cmmd(x, y) == pytest.approx(naive_mmd(x, y), rel=1e-9)
    assert cmmd(x, y, unbiased=True) == pytest.approx(naive_mmd(x, y, unbiased=True), rel=1e-9)
    assert cmmd(x, y) == pytest.approx(cmmd(y, x), rel=1e-12)


def test_cmmd_in_blocks_equals_the_whole_kernel_matrix():
    generator = torch.Generator().manual_seed(4)
    x = F.normalize(torch.randn(2100, 6, generator=generator, dtype=torch.float64), dim=-1)  # more rows than a block
    y = F.normalize(torch.randn(300, 6, generator=generator, dtype=torch.float64) + 0.2, dim=-1)

    def mean_kernel(a, b):
        return torch.exp(-(torch.cdist(a, b) ** 2) / 200).mean()

    expected = 1000 * (mean_kernel(x, x) + mean_kernel(y, y) - 2 * mean_kernel(x, y))
    assert cmmd(x, y) == pytest.approx(float(expected), rel=1e-6)


def test_cmmd_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    generator = torch.Generator().manual_seed(2)
    x = F.normalize(torch.randn(16, 8, generator=generator), dim=-1)
    assert cmmd(x, x) == pytest.approx(0.0, abs=1e-9)
    direction = F.normalize(torch.randn(8, generator=generator), dim=0)
    distances = [cmmd(x, F.normalize(x + shift * direction, dim=-1)) for shift in (0.1, 0.5, 1.0, 3.0)]
    assert all(a < b for a, b in zip(distances, distances[1:], strict=False)) and distances[0] > 0


def test_zero_shot_is_exact_on_fixed_vectors():
    classes = torch.eye(3)
    images = torch.tensor([[1.0, 0.1, 0.0], [0.0, 1.0, 0.2], [0.9, 0.0, 1.0], [0.0, 0.0, 1.0]])
    result = zero_shot(images, classes, targets=torch.tensor([0, 1, 0, 2]), logit_scale=10.0)
    assert result.predicted.tolist() == [0, 1, 2, 2]
    assert result.top1 == pytest.approx(0.75)
    logits = 10.0 * F.normalize(images.double(), dim=-1)
    expected = torch.softmax(logits, dim=-1)[torch.arange(4), torch.tensor([0, 1, 0, 2])]
    assert result.mean_target_probability == pytest.approx(float(expected.mean()), rel=1e-12)


def test_erasure_rates_and_harmonic_mean():
    assert efficacy(torch.tensor([True, False, False, False])) == pytest.approx(0.75)
    assert specificity(torch.tensor([True, True, False, True])) == pytest.approx(0.75)
    assert efficacy(torch.tensor([], dtype=torch.bool)) is None
    assert harmonic_mean([0.5, 1.0, None]) == pytest.approx(2 / (2 + 1))
    assert harmonic_mean([0.5, 0.0]) == 0.0 and harmonic_mean([None]) is None


def test_target_vs_anchor_and_paired_preservation():
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    target = torch.tensor([[1.0, 0.1]] * 3)
    anchor = torch.tensor([[0.1, 1.0]] * 3)
    assert target_vs_anchor(images, target, anchor, reduction="none").tolist() == [1.0, 0.0, 0.0]
    assert float(paired_preservation(images, 2 * images)) == pytest.approx(1.0)
    assert float(paired_preservation(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]))) == pytest.approx(0.0)


def naive_bootstrap(flags_per_draw):
    return [float(np.quantile(flags_per_draw, q)) for q in (0.025, 0.975)]


def test_bootstrap_interval_matches_a_plain_resampling_loop():
    hits = [True] * 7 + [False] * 5
    rng = np.random.default_rng(0)
    means = []
    for _ in range(2000):
        drawn = rng.integers(len(hits), size=len(hits))
        means.append(np.mean([hits[i] for i in drawn]))
    assert bootstrap_interval(hits) == pytest.approx(naive_bootstrap(means), abs=1e-12)
    low, high = bootstrap_interval(hits)
    assert low <= 7 / 12 <= high
    assert bootstrap_interval([True] * 5) == (1.0, 1.0) and bootstrap_interval([]) is None
    assert bootstrap_interval(hits) == bootstrap_interval(hits)  # a fixed seed: the same verdicts, the same interval


def test_paired_ratio_interval_resamples_pairs_together():
    before = [True, True, True, False, True, True, False, True]
    after = [True, False, True, False, True, True, True, True]
    rng = np.random.default_rng(0)
    ratios = []
    for _ in range(2000):
        drawn = rng.integers(len(before), size=len(before))
        total_before = sum(before[i] for i in drawn)
        if total_before:
            ratios.append(sum(after[i] for i in drawn) / total_before)
    assert paired_ratio_interval(before, after) == pytest.approx(naive_bootstrap(ratios), abs=1e-12)
    assert paired_ratio_interval(before, before) == (1.0, 1.0)  # each resample pairs an image with itself
    assert paired_ratio_interval([False, False], [True, True]) is None and paired_ratio_interval([], []) is None
    with pytest.raises(ValueError, match="equal lengths"):
        paired_ratio_interval([True], [True, False])
