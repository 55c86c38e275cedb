"""Likelihood gaps: the difference-in-differences, its pattern, and zero for a suppression that changes no weight."""

import numpy as np
import pytest
from attack_helpers import CONCEPT, brightness_judge, red_selector, tiny, tiny_edit

from erasure.attacks.base import AttackError
from erasure.attacks.context import AttackContext
from erasure.attacks.likelihood import LikelihoodConfig, _did, _pattern, likelihood_gaps
from erasure.attacks.suite import run_probe
from erasure.concepts import Concept

SMALL = LikelihoodConfig(samples=4, images=2)


def test_difference_in_differences_and_its_interval():
    concept, neighbours = np.array([1.0, 1.2, 0.8]), np.array([0.1, 0.1, 0.1])
    gap = _did(concept, neighbours, draws=500, seed=0)
    assert gap["value"] == pytest.approx(0.9) and gap["low"] <= 0.9 <= gap["high"] and gap["low"] > 0


def interval(low, high):
    return {"value": (low + high) / 2, "low": low, "high": high}


@pytest.mark.parametrize(
    ("uncond", "cond", "pattern"),
    [
        (interval(0.1, 0.3), interval(0.2, 0.4), "destruction-like"),
        (interval(-0.1, 0.1), interval(0.2, 0.4), "avoidance-like"),
        (interval(-0.1, 0.1), interval(-0.2, 0.1), "no change"),
        (interval(-0.3, -0.1), interval(-0.2, 0.1), "unclear"),
    ],
)
def test_the_pattern_follows_the_intervals(uncond, cond, pattern):
    assert _pattern({"D_uncond": uncond, "D_cond": cond}).startswith(pattern)


def test_a_suppression_that_changes_no_weight_has_exactly_zero_gaps():
    pipe = tiny()
    ctx = AttackContext(
        pipe, None, brightness_judge, red_selector, steps=2, suppression="negative-prompt", negative_prompt="pip"
    )
    gaps = likelihood_gaps(ctx, CONCEPT, SMALL)
    for key in ("D_uncond", "D_cond"):
        assert gaps[key] == {"value": 0.0, "low": 0.0, "high": 0.0}
    assert gaps["pattern"] == "no change" and gaps["images"] == [2, 2]


def test_an_edit_moves_the_losses_and_the_probe_records_them_beside_the_verdict():
    pipe = tiny()
    edit = tiny_edit(pipe, scale=0.5)
    options = {"trajectory": {"handoffs": (1,)}, "likelihood": {"samples": 3, "images": 100}}
    summary = run_probe(pipe, edit, CONCEPT, brightness_judge, red_selector, attacks=["trajectory"], steps=2,
                        options=options, images_per_prompt=1, base_seed=5)  # fmt: skip
    assert set(summary["verdict"]["likelihood"]) == {"D_uncond", "D_cond", "pattern"}
    gaps = summary["likelihood"]
    rows = len(CONCEPT.evaluate)  # images capped at the probe's own rows; the seed is the images' first seed
    assert gaps["samples"] == 3 and gaps["images"][0] == rows and gaps["seed"] == 5
    assert any(gaps[f"{s}_{c}_loss_change"] != 0 for s in ("concept", "neighbours") for c in ("uncond", "cond"))
    assert summary["likelihood"]["cost"]["unet_forwards"] > 0  # (likelihood=False: tests/test_cli_probe.py)


def test_a_concept_without_neighbour_prompts_is_refused():
    ctx = AttackContext(tiny(), None, brightness_judge, red_selector, steps=2)
    lonely = Concept(name="Pip", kind="character", erase=("pip",), evaluate=("an image of pip",))
    with pytest.raises(AttackError, match="evaluate_preserve"):
        likelihood_gaps(ctx, lonely, SMALL)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"likelihood": {"draws": 3}}, "unknown likelihood option"),
        ({"likelihood": {"samples": 0}}, "samples must be an integer of at least 1"),
        ({"likelihood": {"images": "many"}}, "images must be an integer"),
    ],
)
def test_bad_likelihood_options_are_named_before_any_work(options, message, tmp_path):
    with pytest.raises(AttackError, match=message):
        run_probe(tiny(), None, CONCEPT, brightness_judge, red_selector, attacks=["trajectory"], options=options,
                  out=tmp_path / "probe")  # fmt: skip
    assert not (tmp_path / "probe").exists()
    with pytest.raises(AttackError, match="likelihood gaps are turned off"):
        run_probe(tiny(), None, CONCEPT, brightness_judge, red_selector, attacks=["trajectory"],
                  options={"likelihood": {"samples": 2}}, likelihood=False)  # fmt: skip
