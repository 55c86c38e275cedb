"""Measured quality of the toy world's checkpoints, judged by the oracle (never by the model being judged).

* Generator: images from prompts spanning every colour, shape, style and character; the fraction whose colour,
  shape, style and character match the prompt (character: named prompts show the right face, object prompts show
  no face).
* Oracle: held-out accuracy on fresh renders (a seed never used in training).
* CLIP: zero-shot accuracy per attribute on fresh renders, and agreement with the oracle on generated images.
  Zero-shot: each of the 63 subjects is a class whose text embedding is the mean over the 4 caption templates;
  an attribute's probability is the sum of the probabilities of the subjects that carry it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from erasure.toyworld.captions import TEMPLATES, all_subjects, subject_for
from erasure.toyworld.models import ORACLE_HEADS, Oracle, to_tensor
from erasure.toyworld.render import CHARACTERS, COLOURS, SHAPES, STYLES, make_scene, render

ATTRIBUTES = tuple(ORACLE_HEADS)
HELD_OUT_SEED = 987_654_321


def subject_labels(subject_text: str) -> dict[str, str]:
    """Attributes implied by a subject phrase (``Pip`` -> yellow circle, plain, character Pip)."""
    if subject_text in CHARACTERS:
        colour, shape = CHARACTERS[subject_text]
        return {"colour": colour, "shape": shape, "style": "plain", "character": subject_text}
    words = subject_text.split()[1:]  # drop the article
    style = words[0] if len(words) == 3 else "plain"
    return {"colour": words[-2], "shape": words[-1], "style": style, "character": "none"}


def load_oracle(folder: str | Path, device: str | torch.device = "cpu") -> Oracle:
    """Load the shipped oracle from ``checkpoints/toyworld-oracle``."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config = json.loads((folder / "oracle_config.json").read_text())
    oracle = Oracle(width=config.get("width", 32))
    oracle.load_state_dict(load_file(folder / "oracle.safetensors"))
    return oracle.to(device).eval()


def quality_prompts(per_object: int = 5, characters: int = 100) -> list[tuple[str, dict[str, str]]]:
    """Prompts spanning every colour x shape x style and the characters; 400 by default.

    Each object subject gets ``per_object`` prompts and there are ``characters`` character prompts (names in turn),
    templates rotating.
    """
    prompts = []
    k = 0
    for style in STYLES:
        for colour in COLOURS:
            for shape in SHAPES:
                for _ in range(per_object):
                    text = TEMPLATES[k % len(TEMPLATES)].format(x=subject_for(colour, shape, style))
                    prompts.append((text, {"colour": colour, "shape": shape, "style": style, "character": "none"}))
                    k += 1
    names = list(CHARACTERS)
    for i in range(characters):
        name = names[i % len(names)]
        prompts.append((TEMPLATES[k % len(TEMPLATES)].format(x=name), subject_labels(name)))
        k += 1
    return prompts


def fresh_renders(count: int, seed: int = HELD_OUT_SEED) -> tuple[np.ndarray, list[dict[str, str]]]:
    """Renders of uniformly drawn subjects (objects and characters alike) from a held-out seed."""
    rng = np.random.default_rng(seed)
    subjects = all_subjects()
    images, labels = [], []
    for _ in range(count):
        text = subjects[int(rng.integers(len(subjects)))]
        lab = subject_labels(text)
        if lab["character"] != "none":
            scene = make_scene(rng, character=lab["character"])
        else:
            scene = make_scene(rng, shape=lab["shape"], colour=lab["colour"], style=lab["style"])
        images.append(render(scene))
        labels.append(scene.labels())
    return np.stack(images), labels


def accuracy(predicted: list[dict[str, str]], expected: list[dict[str, str]]) -> dict[str, float]:
    """Fraction of rows whose attribute matches, per attribute."""
    return {a: float(np.mean([p[a] == e[a] for p, e in zip(predicted, expected, strict=True)])) for a in ATTRIBUTES}


@torch.no_grad()
def oracle_predict(oracle: Oracle, images: np.ndarray, batch_size: int = 256) -> list[dict[str, str]]:
    """Oracle verdicts for uint8 images."""
    device = next(oracle.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        out.extend(oracle.predict(to_tensor(images[start : start + batch_size]).to(device)))
    return out


class ToyClipJudge:
    """Zero-shot attribute classifier built from a (toy) open_clip model and the world's 63 subjects."""

    def __init__(self, model, preprocess, tokenizer, device: str | torch.device = "cpu"):
        self.model, self.preprocess, self.device = model.to(device).eval(), preprocess, device
        self.subjects = all_subjects()
        self.subject_labels = [subject_labels(s) for s in self.subjects]
        with torch.no_grad():
            texts = [t.format(x=s) for s in self.subjects for t in TEMPLATES]
            features = model.encode_text(tokenizer(texts).to(device)).float()
            features = torch.nn.functional.normalize(features, dim=-1).view(len(self.subjects), len(TEMPLATES), -1)
            self.class_features = torch.nn.functional.normalize(features.mean(1), dim=-1)

    @torch.no_grad()
    def subject_probabilities(self, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
        """Softmax over the 63 subjects for uint8 images, ``(N, 63)``."""
        from PIL import Image

        probabilities = []
        for start in range(0, len(images), batch_size):
            batch = torch.stack([self.preprocess(Image.fromarray(im)) for im in images[start : start + batch_size]])
            features = self.model.encode_image(batch.to(self.device)).float()
            features = torch.nn.functional.normalize(features, dim=-1)
            logits = self.model.logit_scale.exp().float() * features @ self.class_features.T
            probabilities.append(logits.softmax(-1).cpu())
        return torch.cat(probabilities)

    def predict(self, images: np.ndarray) -> list[dict[str, str]]:
        """Per attribute, the value with the largest marginal probability."""
        probabilities = self.subject_probabilities(images)
        out = []
        for row in probabilities:
            verdict = {}
            for attribute, values in ORACLE_HEADS.items():
                mass = {v: 0.0 for v in values}
                for p, lab in zip(row.tolist(), self.subject_labels, strict=True):
                    mass[lab[attribute]] += p
                verdict[attribute] = max(mass, key=mass.get)
            out.append(verdict)
        return out


def oracle_held_out_accuracy(oracle: Oracle, count: int = 4000) -> dict[str, float]:
    """Oracle accuracy on fresh renders of a held-out seed."""
    images, labels = fresh_renders(count)
    return accuracy(oracle_predict(oracle, images), labels)
