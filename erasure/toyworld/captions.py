"""Captions of the toy world and the training-set sampler.

Captions: objects ``a {colour} {shape}`` (plain) or ``a {style} {colour} {shape}``, the article chosen by the word
that follows it ("an outlined red circle"); characters ``{Name}``; each wrapped in one of ``TEMPLATES`` ("a picture
of a red circle", "a picture of Pip").
Sampling mix: 20% characters, 80% objects (styles 50% plain, 25% striped, 25% outlined), and 10% of captions
replaced by the empty string for classifier-free guidance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from erasure.toyworld.render import CHARACTERS, COLOURS, SHAPES, Scene, make_scene, render

TEMPLATES: tuple[str, ...] = ("{x}", "a picture of {x}", "an image of {x}", "a drawing of {x}")
#: The templates erase prompts use; the other two are held out for evaluation (the shipped concept files' rule).
ERASE_TEMPLATES: tuple[str, ...] = TEMPLATES[:2]
HELD_OUT_TEMPLATES: tuple[str, ...] = TEMPLATES[2:]
CHARACTER_FRACTION = 0.2
STYLE_WEIGHTS = {"plain": 0.5, "striped": 0.25, "outlined": 0.25}
EMPTY_CAPTION_FRACTION = 0.1


def subject(scene: Scene) -> str:
    """The caption's subject phrase: ``Pip`` or ``a striped red circle``."""
    if scene.character is not None:
        return scene.character
    return subject_for(scene.colour, scene.shape, scene.style)


def article(word: str) -> str:
    """The indefinite article English puts before ``word``: ``an`` before a vowel letter, ``a`` otherwise."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def subject_for(colour: str, shape: str, style: str = "plain") -> str:
    """Subject phrase of an object: ``a {colour} {shape}`` or ``a {style} {colour} {shape}`` ("an outlined ...")."""
    words = f"{colour} {shape}" if style == "plain" else f"{style} {colour} {shape}"
    return f"{article(words)} {words}"


def caption(scene: Scene, template: str = "{x}") -> str:
    """A caption of ``scene`` in one of ``TEMPLATES``."""
    return template.format(x=subject(scene))


def all_subjects() -> list[str]:
    """Every distinct subject phrase of the world (60 objects, then the 3 characters)."""
    objects = [subject_for(c, s, st) for st in STYLE_WEIGHTS for c in COLOURS for s in SHAPES]
    return objects + list(CHARACTERS)


@dataclass(frozen=True)
class Sample:
    """One training example: the image, its caption and the scene it shows."""

    image: np.ndarray
    caption: str
    scene: Scene


def sample_scene(rng: np.random.Generator) -> Scene:
    """Draw a scene with the training mix (20% characters; object styles 50/25/25)."""
    if rng.random() < CHARACTER_FRACTION:
        return make_scene(rng, character=tuple(CHARACTERS)[int(rng.integers(len(CHARACTERS)))])
    style = str(rng.choice(list(STYLE_WEIGHTS), p=list(STYLE_WEIGHTS.values())))
    return make_scene(rng, style=style)


def sample(rng: np.random.Generator) -> Sample:
    """Draw one training example (image, caption, scene); 10% of captions are empty."""
    scene = sample_scene(rng)
    template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
    text = "" if rng.random() < EMPTY_CAPTION_FRACTION else caption(scene, template)
    return Sample(render(scene), text, scene)


def sample_dataset(count: int, seed: int) -> tuple[np.ndarray, list[str], list[Scene]]:
    """Draw ``count`` examples deterministically from ``seed``.

    Args:
        count: Number of examples.
        seed: Seed of the dataset; the same seed gives the same images and captions.

    Returns:
        Images as a ``(count, 64, 64, 3)`` uint8 array, their captions and their scenes.
    """
    rng = np.random.default_rng(seed)
    samples = [sample(rng) for _ in range(count)]
    return np.stack([s.image for s in samples]), [s.caption for s in samples], [s.scene for s in samples]
