"""Shared pieces of the attack tests: a tiny pipeline, an edit of it, a concept, and cheap judge/selector."""

import numpy as np
import torch

from erasure.concepts import Concept
from erasure.edit import Edit, fingerprint


def tiny():
    from erasure.testing import tiny_pipeline

    return tiny_pipeline("sd1")


def tiny_edit(pipe, scale: float = 0.05) -> Edit:
    """A real edit of the tiny UNet's cross-attention values (seeded)."""
    generator = torch.Generator().manual_seed(1)
    deltas, originals = {}, {}
    for name, parameter in pipe.unet.named_parameters():
        if name.endswith("attn2.to_v.weight"):
            key = f"unet.{name}"
            deltas[key] = torch.randn(parameter.shape, generator=generator) * scale
            originals[key] = parameter
    return Edit(deltas, {"method": "test", "base_fingerprint": fingerprint(originals)})


CONCEPT = Concept(
    name="Pip",
    kind="character",
    erase=("pip", "a picture of pip"),
    preserve=("zog",),
    evaluate=("an image of pip", "a drawing of pip"),
    evaluate_preserve=("a drawing of zog",),
)


def brightness_judge(images: np.ndarray) -> list[bool]:
    return [bool(image.mean() > 127) for image in images]


def red_selector(images: np.ndarray) -> list[float]:
    return [float(image[..., 0].mean()) for image in images]


class NeighbourJudge:
    """brightness_judge, with a neighbour test that records what it saw: every other image gets no verdict."""

    def __init__(self):
        self.seen = []

    def __call__(self, images):
        return brightness_judge(images)

    def follows_prompt(self, images, rows):
        self.seen.append((np.array(images), [r.prompt for r in rows]))
        return [bool(image[..., 0].mean() > image[..., 2].mean()) if i % 2 == 0 else None
                for i, image in enumerate(images)]  # fmt: skip


def unet_fingerprint(pipe) -> str:
    return fingerprint(dict(pipe.unet.named_parameters()))
