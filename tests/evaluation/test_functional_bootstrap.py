"""The one paired bootstrap behind every interval: pairing kept, non-finite resamples left out, bad input refused."""

import numpy as np
import pytest

from erasure.evaluation.functional import bootstrap_interval, paired_bootstrap, paired_ratio_interval


def test_resamples_keep_the_pairing_of_columns():
    before, after = [1, 0, 1, 0, 1, 0], [1, 0, 1, 0, 1, 0]  # identical columns: every paired difference is 0
    assert paired_bootstrap([before, after], lambda a, b: (a - b).mean(-1)) == (0.0, 0.0)
    assert paired_ratio_interval(before, after) == (1.0, 1.0)
    unpaired = np.random.default_rng(1).permutation(after)
    low, high = paired_bootstrap([before, unpaired], lambda a, b: (a - b).mean(-1))
    assert low < 0 < high


def test_non_finite_resamples_are_left_out_and_empty_input_gives_none():
    assert paired_bootstrap([[0, 0, 0], [1, 1, 1]], lambda a, b: b.sum(-1) / a.sum(-1)) is None
    assert bootstrap_interval([]) is None
    low, high = bootstrap_interval([1, 1, 0, 0])
    assert 0.0 <= low <= 0.5 <= high <= 1.0
    with pytest.raises(ValueError, match="equal lengths"):
        paired_bootstrap([[1, 0], [1]], lambda a, b: a.mean(-1))
