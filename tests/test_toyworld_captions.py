"""Captions of the toy world and the training mix, against the specification."""

import itertools
import math
import re
from collections import Counter

import numpy as np
import pytest

from erasure.toyworld import captions
from erasure.toyworld.captions import TEMPLATES, all_subjects, caption, sample, sample_dataset, sample_scene
from erasure.toyworld.render import CHARACTERS, COLOURS, SHAPES, STYLES, Scene, make_scene

COLOUR = "|".join(COLOURS)
SHAPE = "|".join(SHAPES)
NAME = "|".join(CHARACTERS)
CAPTION_RE = re.compile(
    rf"^(?:(?P<template>a picture of |an image of |a drawing of ))?"
    rf"(?:(?P<name>{NAME})|(?P<article>an?) (?:(?P<style>striped|outlined) )?(?P<colour>{COLOUR}) (?P<shape>{SHAPE}))$"
)


def parse(text):
    """Labels a caption states (the spec's grammar, written independently of the code)."""
    match = CAPTION_RE.match(text)
    assert match, f"caption {text!r} does not follow the spec's grammar"
    if match["article"]:  # English: "an" before a vowel ("an outlined"), "a" otherwise ("a striped", "a red")
        following = match["style"] or match["colour"]
        assert match["article"] == ("an" if following[0] in "aeiou" else "a"), f"{text!r}: wrong article"
    if match["name"]:
        colour, shape = CHARACTERS[match["name"]]
        return {"character": match["name"], "colour": colour, "shape": shape, "style": "plain"}
    return {
        "character": "none",
        "colour": match["colour"],
        "shape": match["shape"],
        "style": match["style"] or "plain",
    }


def within(observed, expected, n, sigmas=4.5):
    """``observed`` fraction is within ``sigmas`` binomial standard errors of ``expected``."""
    return abs(observed - expected) <= sigmas * math.sqrt(expected * (1 - expected) / n)


def scene(shape="circle", colour="red", style="plain", character=None):
    return Scene(shape, colour, style, character, 30, 10, 10)


# ----------------------------------------------------------------------------------------------------- grammar
def test_templates_are_the_specified_four():
    assert set(TEMPLATES) == {"{x}", "a picture of {x}", "an image of {x}", "a drawing of {x}"}


@pytest.mark.parametrize(
    ("kwargs", "template", "expected"),
    [
        ({"colour": "red", "shape": "circle"}, "{x}", "a red circle"),
        ({"colour": "red", "shape": "circle"}, "a picture of {x}", "a picture of a red circle"),
        ({"colour": "blue", "shape": "cross", "style": "striped"}, "{x}", "a striped blue cross"),
        ({"colour": "purple", "shape": "triangle", "style": "outlined"}, "an image of {x}",
         "an image of an outlined purple triangle"),
        ({"colour": "yellow", "shape": "circle", "character": "Pip"}, "a picture of {x}", "a picture of Pip"),
        ({"colour": "green", "shape": "triangle", "character": "Zog"}, "{x}", "Zog"),
        ({"colour": "blue", "shape": "square", "character": "Miro"}, "a drawing of {x}", "a drawing of Miro"),
    ],
)  # fmt: skip
def test_caption_examples(kwargs, template, expected):
    assert caption(scene(**kwargs), template) == expected


def test_every_subject_in_every_template_follows_the_grammar_and_states_its_scene():
    for style, colour, shape in itertools.product(STYLES, COLOURS, SHAPES):
        for template in TEMPLATES:
            text = caption(scene(shape, colour, style), template)
            assert parse(text) == {"character": "none", "colour": colour, "shape": shape, "style": style}
            assert ("plain" in text.split()) is False, "plain objects carry no style word"
    for name, (colour, shape) in CHARACTERS.items():
        for template in TEMPLATES:
            text = caption(scene(shape, colour, "plain", name), template)
            assert parse(text)["character"] == name
            assert text.endswith(name) and f"a {name}" not in text, "a character's name takes no article"


def test_all_subjects_lists_60_objects_then_3_characters():
    subjects = all_subjects()
    assert len(subjects) == len(set(subjects)) == 63
    assert subjects[-3:] == list(CHARACTERS)
    assert {tuple(parse(s).values()) for s in subjects[:60]} == {
        ("none", c, sh, st) for st in STYLES for c in COLOURS for sh in SHAPES
    }


# ------------------------------------------------------------------------------------------------- the sampler
def test_samples_are_consistent_images_captions_and_scenes():
    from erasure.toyworld.render import render

    rng = np.random.default_rng(0)
    for _ in range(50):
        item = sample(rng)
        assert item.image.shape == (64, 64, 3) and item.image.dtype == np.uint8
        np.testing.assert_array_equal(item.image, render(item.scene))
        if item.caption:
            labels = parse(item.caption)
            assert labels == {k: item.scene.labels()[k] for k in labels}


def test_sample_dataset_shapes_and_determinism():
    images, texts, scenes = sample_dataset(30, seed=3)
    assert images.shape == (30, 64, 64, 3) and images.dtype == np.uint8
    assert len(texts) == len(scenes) == 30
    again = sample_dataset(30, seed=3)
    np.testing.assert_array_equal(images, again[0])
    assert texts == again[1] and scenes == again[2]
    assert sample_dataset(30, seed=4)[1] != texts


@pytest.fixture(scope="module")
def drawn():
    """4000 training examples' scenes and captions (the sampler's own RNG sequence, images not kept)."""
    rng = np.random.default_rng(12345)
    items = [sample(rng) for _ in range(4000)]
    return [item.scene for item in items], [item.caption for item in items]


def test_training_mix_is_20_percent_characters_80_percent_objects(drawn):
    scenes, _ = drawn
    n = len(scenes)
    characters = [s for s in scenes if s.character is not None]
    assert within(len(characters) / n, 0.2, n)
    by_name = Counter(s.character for s in characters)
    assert set(by_name) == set(CHARACTERS)
    for count in by_name.values():
        assert within(count / len(characters), 1 / 3, len(characters))
    assert all(s.style == "plain" for s in characters)


def test_object_styles_are_50_25_25_and_colours_and_shapes_uniform(drawn):
    scenes, _ = drawn
    objects = [s for s in scenes if s.character is None]
    n = len(objects)
    styles = Counter(s.style for s in objects)
    for style, p in {"plain": 0.5, "striped": 0.25, "outlined": 0.25}.items():
        assert within(styles[style] / n, p, n), f"{style}: {styles[style] / n:.3f}, want {p}"
    for values, attribute in ((COLOURS, "colour"), (SHAPES, "shape")):
        counts = Counter(getattr(s, attribute) for s in objects)
        assert set(counts) == set(values)
        for count in counts.values():
            assert within(count / n, 1 / len(values), n)


def test_10_percent_empty_captions_independent_of_the_subject(drawn):
    scenes, texts = drawn
    n = len(texts)
    empty = [not t for t in texts]
    assert within(sum(empty) / n, 0.1, n)
    characters = [e for e, s in zip(empty, scenes, strict=True) if s.character is not None]
    assert within(sum(characters) / len(characters), 0.1, len(characters))


def test_templates_are_used_uniformly_and_captions_match_their_scenes(drawn):
    scenes, texts = drawn
    used = Counter()
    for text, item in zip(texts, scenes, strict=True):
        if not text:
            continue
        labels = parse(text)
        assert labels == {k: item.labels()[k] for k in labels}
        used[CAPTION_RE.match(text)["template"] or ""] += 1
    total = sum(used.values())
    assert set(used) == {"", "a picture of ", "an image of ", "a drawing of "}
    for count in used.values():
        assert within(count / total, 0.25, total)


def test_sampled_scenes_are_placed_within_the_spec_and_characters_stay_plain():
    rng = np.random.default_rng(9)
    for _ in range(200):
        item = sample_scene(rng)
        assert 28 <= item.size <= 44 and item.left >= 3 and item.left + item.size <= 61
    assert captions.CHARACTER_FRACTION == 0.2 and captions.EMPTY_CAPTION_FRACTION == 0.1
    assert make_scene(rng, character="Zog").style == "plain"
