r"""Render training images of a toy concept with their exact masks: a folder ``erasure erase ... --images`` reads.

The toy renderer knows where every figure is, so it can give a method what a segmentation model (MACE's
Grounded-SAM) estimates on real images: each image ``NNNN.png`` of the concept gets ``NNNN.mask.png``, white on the
figure's pixels (:func:`erasure.toyworld.render.figure_mask`). The images follow the concept's erase prompts in
turn: each prompt's attributes (:func:`erasure.toyworld.judge.prompt_expectation`: "a picture of Pip" -> Pip, "a
red circle" -> red, circle, plain) are fixed and the rest (size, position, and attributes the prompt leaves open)
are drawn from ``--seed``. Renders are the toy world's ground truth, not the generator's images of the concept.

Example::

    python scripts/render_toyworld_images.py --concept pip --count 8 --out runs/images/Pip
    erasure erase mace --model checkpoints/toyworld-sd --concept prompts/toyworld/pip.toml --images runs/images/Pip \
        --out runs/pip-mace
    python scripts/measure_toyworld_erasure.py --methods mace --concepts pip --training-images runs/images
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from erasure.concepts import load_concepts  # noqa: E402
from erasure.files import atomic_path  # noqa: E402
from erasure.toyworld.judge import prompt_expectation  # noqa: E402
from erasure.toyworld.render import figure_mask, make_scene, render  # noqa: E402


def concept_path(name: str) -> Path:
    """``pip`` -> ``prompts/toyworld/pip.toml``; a path is kept."""
    return Path(name) if name.endswith(".toml") else REPO / "prompts" / "toyworld" / f"{name}.toml"


def scene_for(prompt: str, rng: np.random.Generator):
    """A scene showing what ``prompt`` asks for, the rest drawn from ``rng``."""
    wanted = prompt_expectation(prompt)
    character = wanted.get("character")
    if character not in (None, "none"):
        return make_scene(rng, character=character)
    return make_scene(rng, shape=wanted.get("shape"), colour=wanted.get("colour"), style=wanted.get("style"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concept", required=True, help="toy concept name (pip) or a .toml concept file")
    parser.add_argument("--count", type=int, default=8, help="images to render (MACE's official 8 per concept)")
    parser.add_argument("--seed", type=int, default=0, help="seed of sizes, positions and open attributes")
    parser.add_argument("--out", type=Path, required=True, help="output folder (must not exist)")
    args = parser.parse_args(argv)
    from PIL import Image

    if args.count < 1:
        raise SystemExit("--count must be at least 1")
    if args.out.exists():
        raise SystemExit(f"{args.out} exists; choose a new folder")
    (concept,) = load_concepts(concept_path(args.concept)).concepts[:1]
    rng = np.random.default_rng(args.seed)
    with atomic_path(args.out) as temporary:
        temporary.mkdir(parents=True)
        for index in range(args.count):
            scene = scene_for(concept.erase[index % len(concept.erase)], rng)
            Image.fromarray(render(scene)).save(temporary / f"{index:04d}.png")
            Image.fromarray(figure_mask(scene).astype(np.uint8) * 255).save(temporary / f"{index:04d}.mask.png")
    print(f"wrote {args.count} images of {concept.name} with their masks to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
