"""The pure parts of scripts/measure_toyworld_erasure.py: what each prompt asks for, and the rates."""

from pathlib import Path

import pytest
from conftest import load_script

from erasure.concepts import load_concepts

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "measure_toyworld_erasure.py"
PROMPTS = SCRIPT.parents[1] / "prompts" / "toyworld"


@pytest.fixture(scope="module")
def measure():
    return load_script("measure_toyworld_erasure.py")


def test_prompt_expectations(measure):
    assert measure.prompt_subject("a drawing of a red circle") == "a red circle"
    assert measure.prompt_subject("an image of Zog") == "Zog"
    assert measure.prompt_expectation("an image of Zog") == {"character": "Zog"}
    assert measure.prompt_expectation("a drawing of a yellow circle") == {
        "colour": "yellow", "shape": "circle", "style": "plain", "character": "none"
    }  # fmt: skip
    assert measure.prompt_expectation("an image of an outlined blue cross")["style"] == "outlined"


@pytest.mark.parametrize(
    ("name", "expected"),
    [("pip", ("character", "Pip")), ("striped", ("style", "striped")), ("triangle", ("shape", "triangle")),
     ("red", ("colour", "red"))],
)  # fmt: skip
def test_every_toy_concept_file_has_a_target_and_judgeable_neighbours(measure, name, expected):
    (concept,) = load_concepts(PROMPTS / f"{name}.toml").concepts
    assert measure.target_attribute(concept) == expected
    for prompt in concept.evaluate_preserve:
        wanted = measure.prompt_expectation(prompt)
        assert wanted.get(expected[0]) != expected[1], f"neighbour {prompt!r} asks for the erased {expected}"


def test_rates_are_paired_fractions(measure):
    none = {"colour": "red", "shape": "circle", "style": "plain", "character": "none"}
    pip = {**none, "colour": "yellow", "character": "Pip"}
    zog = {**none, "colour": "green", "shape": "triangle", "character": "Zog"}
    neighbours = ["an image of Zog", "an image of Zog", "an image of a red circle", "an image of a red circle"]
    base = [pip, pip, zog, zog, none, zog]
    edited = [none, pip, zog, none, none, zog]
    r = measure.rates(base, edited, neighbours, ("character", "Pip"))
    assert (r["target_base"], r["target_edited"]) == (1.0, 0.5)
    assert (r["neighbour_base"], r["neighbour_edited"]) == (0.75, 0.5)
    assert r["neighbour_ratio"] == pytest.approx(2 / 3)
    assert r["neighbour_kept"] == pytest.approx(2 / 3)
    assert r["neighbour_by_subject"]["a red circle"] == {"base": 0.5, "edited": 0.5, "n": 2}
    assert r["neighbour_by_attribute"]["character"] == {"base": 0.75, "edited": 0.5}
    assert r["neighbour_by_attribute"]["colour"] == {"base": 0.5, "edited": 0.5}
    assert measure.meets_goals(r) is False
    assert measure.meets_goals({**r, "target_base": 0.0}) is None  # nothing to erase
    low, high = r["neighbour_ratio_ci95"]
    assert 0 <= low <= r["neighbour_ratio"] <= high


def test_overrides_parse_json_values(measure):
    parsed = measure.parse_overrides(
        ["esd-x.lr=1e-5", "esd-x.preset=diffusers", "uce.tokens=all_tokens"], ["esd-x", "uce"]
    )
    assert parsed == {"esd-x": {"lr": 1e-5, "preset": "diffusers"}, "uce": {"tokens": "all_tokens"}}
    with pytest.raises(SystemExit):
        measure.parse_overrides(["fmn.steps=3"], ["uce"])


def test_every_image_has_its_own_seed(measure):
    (concept,) = load_concepts(PROMPTS / "pip.toml").concepts
    args = measure.parse_args(["--images", "8"])
    prompts, seeds, n_target, per_prompt = measure.concept_cases(concept, args)
    assert per_prompt == {"target": 4, "neighbour": 1} and n_target == 8
    assert len(prompts) == len(seeds) == 14 and len(set(seeds)) == 14


def test_together_drops_the_neighbours_that_are_erased_too(measure):
    pip, striped, red = (load_concepts(PROMPTS / f"{name}.toml").concepts[0] for name in ("pip", "striped", "red"))
    report = {}
    kept = [measure.without_erased_neighbours(c, [pip, striped, red], report) for c in (pip, striped, red)]
    assert kept[0].evaluate_preserve == pip.evaluate_preserve  # Pip's neighbours name no other erased concept
    assert report["dropped_neighbours"]["striped"] and all("red" in p for p in report["dropped_neighbours"]["striped"])
    assert not any("red" in p.split() for p in kept[1].evaluate_preserve)
    assert set(kept[1].evaluate_preserve) | set(report["dropped_neighbours"]["striped"]) == set(
        striped.evaluate_preserve
    )
    assert kept[2].evaluate == red.evaluate  # targets untouched
