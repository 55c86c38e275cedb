"""The accumulating evaluator: its metrics equal the pure functions', batched accumulation equals one shot."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from evaluation_helpers import save_tiny_clip, stub_evaluator, unit

from erasure.evaluation import Evaluator, clip_score, cmmd, load_clip, paired_preservation

VECTORS = {
    "Pip": unit(1, 0, 0, 0),
    "Zog": unit(0, 1, 0, 0),
    "a photo": unit(0, 0, 1, 0),
    "a drawing of Pip": unit(1, 0, 0, 0.3),
    "a drawing of Zog": unit(0, 1, 0, 0.3),
    "a face": unit(1, 1, 1, 1),
}
CLASSES = ("Pip", "Zog", "a photo")


def batch_inputs():
    """Eight images: four erased (Pip), two generality, two preserved (Zog); with base-model references."""
    generator = torch.Generator().manual_seed(3)
    images = torch.tensor(
        [
            unit(1, 0.1, 0, 0),  # still Pip
            unit(0.1, 0, 1, 0),  # now 'a photo'
            unit(0, 0.2, 1, 0),  # now 'a photo'
            unit(1, 0, 0.5, 0),  # still Pip
            unit(0.2, 0, 1, 0),  # generality, erased
            unit(1, 0, 0, 0.1),  # generality, still Pip
            unit(0, 1, 0.1, 0),  # Zog kept
            unit(0.1, 0, 1, 0),  # Zog lost
        ]
    )
    reference = F.normalize(images + 0.3 * torch.randn(8, 4, generator=generator), dim=-1)
    prompts = ["a drawing of Pip"] * 4 + ["a face"] * 2 + ["a drawing of Zog"] * 2
    concepts = ["Pip"] * 6 + ["Zog"] * 2
    roles = ["erased"] * 4 + ["generality"] * 2 + ["preserved"] * 2
    anchors = ["a photo"] * 4 + ["a photo"] * 2 + [""] * 2
    return images, reference, prompts, concepts, roles, anchors


def test_evaluator_metrics_match_the_pure_functions():
    images, reference, prompts, concepts, roles, anchors = batch_inputs()
    evaluator = stub_evaluator(VECTORS)
    evaluator.update(
        images, prompts, concepts=concepts, classes=[CLASSES] * 8, roles=roles, anchors=anchors, reference=reference
    )
    metrics = evaluator.compute()
    table = {k: torch.tensor(v) for k, v in VECTORS.items()}
    texts = torch.stack([table[p] for p in prompts])
    assert metrics["n_images"] == 8
    assert metrics["clip_score"] == pytest.approx(float(clip_score(images, texts)))
    assert metrics["clip_score_preserved"] == pytest.approx(float(clip_score(images[6:], texts[6:])))
    assert metrics["efficacy"] == pytest.approx(0.5)  # two of the four erased images left Pip
    assert metrics["generality"] == pytest.approx(0.5)
    assert metrics["specificity"] == pytest.approx(0.5)
    assert metrics["harmonic_mean"] == pytest.approx(0.5)
    assert metrics["zero_shot_top1"] == pytest.approx(4 / 8)
    assert metrics["target_vs_anchor"] == pytest.approx(0.5)  # erased rows only
    assert metrics["paired_preservation"] == pytest.approx(float(paired_preservation(reference, images)))
    assert metrics["cmmd"] == pytest.approx(cmmd(images, reference))
    assert metrics["cmmd_erased"] == pytest.approx(cmmd(images[:4], reference[:4]))
    assert metrics["cmmd_other"] is None and metrics["clip_score_other"] is None
    per = evaluator.per_image()
    assert [p["predicted"] for p in per] == ["Pip", "a photo", "a photo", "Pip", "a photo", "Pip", "Zog", "a photo"]
    assert per[0]["correct"] == 1 and per[1]["correct"] == 0 and per[6]["target_vs_anchor"] is None


def test_batched_accumulation_equals_one_shot():
    images, reference, prompts, concepts, roles, anchors = batch_inputs()
    one_shot = stub_evaluator(VECTORS)
    one_shot.update(images, prompts, concepts=concepts, roles=roles, anchors=anchors, reference=reference)
    batched = stub_evaluator(VECTORS)
    for start, stop in [(0, 3), (3, 4), (4, 8)]:
        batched.update(
            images[start:stop],
            prompts[start:stop],
            concepts=concepts[start:stop],
            roles=roles[start:stop],
            anchors=anchors[start:stop],
            reference=reference[start:stop],
        )
    assert batched.compute() == one_shot.compute()
    assert batched.per_image() == one_shot.per_image()
    batched.reset()
    assert batched.compute()["n_images"] == 0 and batched.compute()["clip_score"] is None


def test_classes_default_to_every_concept_of_the_set():
    evaluator = stub_evaluator(VECTORS)
    evaluator.update(torch.tensor([unit(0, 0, 1, 0)]), ["a drawing of Pip"], concepts=["Pip"], roles=["erased"])
    evaluator.update(torch.tensor([unit(0, 1, 0, 0)]), ["a drawing of Zog"], concepts=["Zog"], roles=["preserved"])
    # Candidates are {Pip, Zog}: the first image (pointing at 'a photo') is classified Pip or Zog, never 'a photo'.
    assert {p["predicted"] for p in evaluator.per_image()} <= {"Pip", "Zog"}


def test_evaluator_embeds_images_with_a_real_tiny_clip(tmp_path):
    model, preprocess, tokenizer = load_clip(str(save_tiny_clip(tmp_path / "clip")))
    evaluator = Evaluator(model, preprocess, tokenizer, batch_size=2)
    pictures = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    features = evaluator.embed_images(pictures)
    assert features.shape == (5, 32)
    assert torch.allclose(features.norm(dim=-1), torch.ones(5), atol=1e-5)
    torch.testing.assert_close(evaluator.embed_images(pictures[3:]), features[3:], rtol=1e-5, atol=1e-6)
    evaluator.update(pictures, ["a red circle"] * 5, concepts=["Pip"] * 5, classes=[("Pip", "Zog")] * 5)
    metrics = evaluator.compute()
    assert 0.0 <= metrics["clip_score"] <= 100.0 and 0.0 <= metrics["zero_shot_top1"] <= 1.0
