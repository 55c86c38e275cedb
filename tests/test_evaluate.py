"""CLIP metrics (against independent reference implementations), the accumulating evaluator, CLIP loading, weights
files and the ``erasure evaluate`` command on a tiny pipeline with a tiny open_clip model."""

import csv
import json
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from erasure.cli import main
from erasure.convert import single_file_state_dict
from erasure.edit import Edit, fingerprint, pipeline_tensor
from erasure.evaluate import (
    PER_IMAGE_COLUMNS,
    ClipLoadError,
    EvaluationError,
    Evaluator,
    clip_score,
    cmmd,
    efficacy,
    harmonic_mean,
    load_clip,
    load_unet_weights,
    paired_preservation,
    parse_clip_spec,
    patched_unet,
    specificity,
    target_vs_anchor,
    zero_shot,
)
from erasure.prompt_sets import PromptRow, save_prompt_csv
from erasure.testing import save_tiny_pipeline, tiny_pipeline

# --------------------------------------------------------------------------------------------------------------
# A tiny real open_clip model (random weights), saved in open_clip's local-dir layout
# --------------------------------------------------------------------------------------------------------------

TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def save_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """Write a tiny random open_clip model as ``open_clip_config.json`` + ``open_clip_model.safetensors``."""
    import open_clip
    from safetensors.torch import save_file

    if "erasure-tiny-clip" not in open_clip.list_models():
        with tempfile.TemporaryDirectory() as configs:
            Path(configs, "erasure-tiny-clip.json").write_text(json.dumps(TINY_CLIP_CONFIG))
            open_clip.add_model_config(configs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model("erasure-tiny-clip", pretrained=None)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    preprocess = {"image_size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": TINY_CLIP_CONFIG, "preprocess_cfg": preprocess})
    )
    return folder


# --------------------------------------------------------------------------------------------------------------
# A stub CLIP with fixed text vectors (images are passed as embeddings)
# --------------------------------------------------------------------------------------------------------------


class StubClip(torch.nn.Module):
    """``encode_text`` looks texts up in a fixed table; ``encode_image`` returns the first D pixel values."""

    def __init__(self, vectors: dict[str, list[float]], logit_scale: float = 100.0):
        super().__init__()
        self.texts = list(vectors)
        self.table = torch.nn.Parameter(torch.tensor([vectors[t] for t in self.texts], dtype=torch.float32))
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(logit_scale)))
        self.embed_dim = self.table.shape[1]

    def encode_text(self, ids):
        return self.table[ids]

    def encode_image(self, pixels):
        return pixels.flatten(1)[:, : self.embed_dim]

    def tokenizer(self, texts):
        return torch.tensor([self.texts.index(t) for t in texts])


def stub_evaluator(vectors, **kwargs):
    stub = StubClip(vectors)
    return Evaluator(stub, lambda image: torch.zeros(3, 2, 2), stub.tokenizer, templates=("{}",), **kwargs)


def unit(*values):
    return F.normalize(torch.tensor(values, dtype=torch.float32), dim=-1).tolist()


# --------------------------------------------------------------------------------------------------------------
# Pure metrics
# --------------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------------
# The evaluator
# --------------------------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------------------------
# CLIP loading
# --------------------------------------------------------------------------------------------------------------


def test_parse_clip_spec(tmp_path):
    assert parse_clip_spec("ViT-H-14:laion2b_s32b_b79k") == ("ViT-H-14", "laion2b_s32b_b79k")
    assert parse_clip_spec("ViT-B-32") == ("ViT-B-32", None)
    assert parse_clip_spec(f"local-dir:{tmp_path}") == (f"local-dir:{tmp_path}", None)
    assert parse_clip_spec(str(tmp_path)) == (str(tmp_path), None)


def test_unknown_clip_name_says_how_to_list_names():
    with pytest.raises(ClipLoadError, match=r"Unknown CLIP model 'ViT-Q-99'.*list_models"):
        load_clip("ViT-Q-99", "openai")


def test_openai_weights_need_the_quickgelu_name():
    with pytest.raises(ClipLoadError, match="use 'ViT-L-14-quickgelu:openai'"):
        load_clip("ViT-L-14", "openai")  # fails before any download


def test_unknown_tag_lists_the_known_ones():
    with pytest.raises(ClipLoadError, match=r"no pretrained tag 'nope'; its tags: .*laion2b_s32b_b79k"):
        load_clip("ViT-H-14", "nope")


def test_clip_folder_needs_safetensors_weights(tmp_path):
    folder = save_tiny_clip(tmp_path / "clip")
    (folder / "open_clip_model.safetensors").rename(folder / "open_clip_pytorch_model.bin")
    with pytest.raises(ClipLoadError, match="no .safetensors weights.*pickles"):
        load_clip(str(folder))


def test_local_dir_spec_loads_the_saved_weights(tmp_path):
    folder = save_tiny_clip(tmp_path / "clip", seed=5)
    model, _, _ = load_clip(f"local-dir:{folder}")
    from safetensors.torch import load_file

    saved = load_file(str(folder / "open_clip_model.safetensors"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())


# --------------------------------------------------------------------------------------------------------------
# Weights files
# --------------------------------------------------------------------------------------------------------------


def attn2_keys(unet):
    return [k for k in unet.state_dict() if ".attn2.to_k." in k or ".attn2.to_v." in k]


def test_unet_weights_in_every_key_form_load_to_diffusers_names(tmp_path):
    from safetensors.torch import save_file

    pipe = tiny_pipeline("sd1")
    keys = attn2_keys(pipe.unet)
    own = pipe.unet.state_dict()
    state = {k: own[k] + 1 for k in keys}
    ldm = single_file_state_dict(pipe)
    ldm_keys = [k for k in ldm if k.startswith("model.diffusion_model.") and ".attn2.to_k." in k]
    forms = {
        "plain": state,
        "prefixed": {f"unet.{k}": v for k, v in state.items()},
        "ldm": {k: ldm[k] + 1 for k in ldm_keys},
    }
    for name, tensors in forms.items():
        save_file(tensors, str(tmp_path / f"{name}.safetensors"))
        loaded = load_unet_weights(tmp_path / f"{name}.safetensors", pipe.unet)
        assert set(loaded) <= set(own) and len(loaded) == len(tensors)
        assert all(torch.equal(loaded[k], own[k] + 1) for k in loaded), name


def test_bad_weights_files_are_refused(tmp_path):
    from safetensors.torch import save_file

    pipe = tiny_pipeline("sd1")
    key = attn2_keys(pipe.unet)[0]
    save_file({"cond_stage_model.x": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(EvaluationError, match="is not a UNet parameter"):
        load_unet_weights(tmp_path / "foreign.safetensors", pipe.unet)
    save_file({key: torch.zeros(3, 3)}, str(tmp_path / "shape.safetensors"))
    with pytest.raises(EvaluationError, match="different base model"):
        load_unet_weights(tmp_path / "shape.safetensors", pipe.unet)
    (tmp_path / "esd.ckpt").write_bytes(b"pickle")
    with pytest.raises(EvaluationError, match="pickles"):
        load_unet_weights(tmp_path / "esd.ckpt", pipe.unet)


def test_patched_unet_restores_exactly():
    pipe = tiny_pipeline("sd1")
    key = attn2_keys(pipe.unet)[0]
    before = pipe.unet.state_dict()[key].clone()
    with patched_unet(pipe, {key: before + 1}):
        assert torch.equal(pipe.unet.state_dict()[key], before + 1)
    assert torch.equal(pipe.unet.state_dict()[key], before)


# --------------------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------------------

ROWS = [
    PromptRow(0, "a drawing of Pip", 11, concept="Pip", type="erased", extra={"anchor": "a photo"}),
    PromptRow(1, "a picture of Pip", 12, concept="Pip", type="erased", extra={"anchor": "a photo"}),
    PromptRow(4, "a drawing of Zog", 13, concept="Zog", type="preserved", extra={"anchor": ""}),
]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    model = save_tiny_pipeline(root / "sd", "sd1")
    clip = save_tiny_clip(root / "clip")
    prompts = save_prompt_csv(ROWS, root / "prompts.csv")
    pipe = tiny_pipeline("sd1")
    key = f"unet.{attn2_keys(pipe.unet)[0]}"
    base = fingerprint({key: pipeline_tensor(pipe, key)})
    noise = torch.randn(pipeline_tensor(pipe, key).shape, generator=torch.Generator().manual_seed(0))
    delta = noise * (3 * pipeline_tensor(pipe, key).norm() / noise.norm())  # 3x the tensor: a strong, valid edit
    edit = Edit({key: delta}, {"method": "uce", "base_fingerprint": base, "base_model": "tiny"}).save(root / "edit")
    other = tiny_pipeline("sd1", seed=1)
    foreign = {"method": "uce", "base_fingerprint": fingerprint({key: pipeline_tensor(other, key)})}
    foreign_edit = Edit({key: delta}, foreign).save(root / "foreign")
    return {"model": model, "clip": clip, "prompts": prompts, "edit": edit, "foreign": foreign_edit, "root": root}


def evaluate_args(assets, out, *extra):
    common = ["--clip", str(assets["clip"]), "--steps", "2", "--height", "32", "--width", "32", "--device", "cpu"]
    return ["evaluate", "--out", str(out), *common, *extra]


@pytest.fixture(scope="module")
def run(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "eval"
    argv = evaluate_args(assets, out, "--model", str(assets["model"]), "--edit", str(assets["edit"]))
    assert main([*argv, "--prompts", str(assets["prompts"]), "--seeds-per-prompt", "2", "--batch-size", "4"]) == 0
    return out


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_evaluate_writes_images_metrics_and_per_image_rows(run, assets):
    document = json.loads((run / "metrics.json").read_text())
    assert document["schema_version"] == 1 and list(document["metrics"]) == ["base", "edit"]
    assert document["clip"]["model"] == str(assets["clip"]) and document["clip"]["templates"]
    assert document["generation"]["seeds"] == [11, 12, 12, 13, 13, 14]  # evaluation_seed + i, row by row
    assert (document["generation"]["steps"], document["generation"]["height"]) == (2, 32)
    assert document["generation"]["guidance"] == 7.5  # no --guidance and no evaluation_guidance column
    assert document["prompts"]["rows"] == 3 and document["prompts"]["images_per_model"] == 6
    assert len(document["prompts"]["sha256"]) == 64
    assert document["models"]["edit"]["edit_fingerprint"] and document["models"]["edit"]["base_fingerprint"]
    assert set(document["versions"]) >= {"torch", "diffusers", "transformers", "open_clip", "erasure"}
    base, edited = document["metrics"]["base"], document["metrics"]["edit"]
    assert base["paired_preservation"] == pytest.approx(1.0) and base["cmmd"] == pytest.approx(0.0, abs=1e-9)
    assert edited["paired_preservation"] < 1.0 and edited["cmmd"] > 0.0
    names = sorted(p.name for p in (run / "images" / "edit").iterdir())
    assert names == ["0_0.png", "0_1.png", "1_0.png", "1_1.png", "4_0.png", "4_1.png", "manifest.json"]
    rows = read_csv(run / "per_image.csv")
    assert tuple(rows[0]) == PER_IMAGE_COLUMNS and len(rows) == 12
    assert [r["model"] for r in rows] == ["base"] * 6 + ["edit"] * 6
    assert all((run / r["image"]).is_file() for r in rows)
    assert {r["clip_model"] for r in rows} == {str(assets["clip"])}
    scores = [float(r["clip_score"]) for r in rows if r["model"] == "edit"]
    assert np.mean(scores) == pytest.approx(edited["clip_score"])
    assert not [p for p in run.parent.iterdir() if p.name.startswith(".")]  # the temporary folder was renamed


def test_evaluate_images_match_direct_generation(run, assets):
    from erasure.files import load_image
    from erasure.generate import generate
    from erasure.pipeline import load_pipeline

    pipe = load_pipeline(assets["model"])
    direct = generate(pipe, ["a drawing of Pip", "a drawing of Zog"], [12, 14], steps=2, height=32, width=32)
    saved = np.stack([load_image(run / "images" / "base" / name) for name in ("0_1.png", "4_1.png")])
    assert np.abs(direct.astype(int) - saved.astype(int)).max() <= 1


def test_rescoring_the_image_folder_gives_the_same_metrics(run, assets, tmp_path):
    out = tmp_path / "rescore"
    assert main(evaluate_args(assets, out, "--images", str(run / "images"))) == 0
    again = json.loads((out / "metrics.json").read_text())
    first = json.loads((run / "metrics.json").read_text())
    assert again["prompts"]["kind"] == "manifest" and again["generation"]["steps"] == 2
    for label in ("base", "edit"):
        for name, value in first["metrics"][label].items():
            expected = value if value is None else pytest.approx(value, rel=1e-5, abs=1e-7)
            assert again["metrics"][label][name] == expected, (label, name)


def test_rows_evaluation_guidance_is_used_unless_guidance_is_given(assets, tmp_path):
    from erasure.files import load_image
    from erasure.generate import generate
    from erasure.pipeline import load_pipeline

    rows = [  # ESD's prompt files carry a per-row guidance scale
        PromptRow(0, "a drawing of Pip", 11, concept="Pip", type="erased", extra={"evaluation_guidance": "2.0"}),
        PromptRow(1, "a drawing of Zog", 12, concept="Zog", type="preserved", extra={"evaluation_guidance": "9"}),
        PromptRow(2, "a picture of Pip", 13, concept="Pip", type="erased", extra={"evaluation_guidance": "2.0"}),
    ]
    prompts = save_prompt_csv(rows, tmp_path / "guided.csv")
    argv = [*evaluate_args(assets, tmp_path / "rows", "--model", str(assets["model"])), "--prompts", str(prompts)]
    assert main([*argv, "--batch-size", "3"]) == 0  # one batch holding two scales: split into one call per scale
    document = json.loads((tmp_path / "rows" / "metrics.json").read_text())
    assert document["generation"]["guidance"] == "per-row"
    per_image = read_csv(tmp_path / "rows" / "per_image.csv")
    assert [float(r["guidance"]) for r in per_image] == [2.0, 9.0, 2.0]
    pipe = load_pipeline(assets["model"])
    saved = np.stack([load_image(tmp_path / "rows" / "images" / "base" / f"{i}_0.png") for i in range(3)])
    for i, (row, scale) in enumerate(zip(rows, (2.0, 9.0, 2.0), strict=True)):
        direct = generate(
            pipe, [row.prompt], [row.evaluation_seed], steps=2, guidance_scale=scale, height=32, width=32
        )
        assert np.abs(direct[0].astype(int) - saved[i].astype(int)).max() <= 1, i
    other = generate(pipe, [rows[1].prompt], [12], steps=2, guidance_scale=2.0, height=32, width=32)
    assert np.abs(other[0].astype(int) - saved[1].astype(int)).max() > 1  # the scale mattered

    assert main([*evaluate_args(assets, tmp_path / "fixed", "--model", str(assets["model"])), "--prompts",
                 str(prompts), "--guidance", "4"]) == 0  # fmt: skip
    fixed = json.loads((tmp_path / "fixed" / "metrics.json").read_text())
    assert fixed["generation"]["guidance"] == 4.0
    assert {float(r["guidance"]) for r in read_csv(tmp_path / "fixed" / "per_image.csv")} == {4.0}


def test_a_bad_evaluation_guidance_is_a_clear_error(assets, tmp_path, capsys):
    bad = [PromptRow(3, "a drawing of Pip", 1, extra={"evaluation_guidance": "strong"})]
    prompts = save_prompt_csv(bad, tmp_path / "bad.csv")
    argv = [*evaluate_args(assets, tmp_path / "out", "--model", str(assets["model"])), "--prompts", str(prompts)]
    assert main(argv) != 0
    assert "row 3: evaluation_guidance is 'strong'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_evaluate_from_a_concept_file_and_a_weights_file(assets, tmp_path):
    from safetensors.torch import save_file

    concept = tmp_path / "pip.toml"
    concept.write_text(
        '[[concept]]\nname = "Pip"\nkind = "character"\nerase = ["Pip"]\npreserve = ["Zog"]\n'
        'evaluate = ["a drawing of Pip", "a yellow circle"]\nevaluate_preserve = ["a drawing of Zog"]\n'
    )
    pipe = tiny_pipeline("sd1")
    key = attn2_keys(pipe.unet)[0]
    save_file({key: pipe.unet.state_dict()[key] * 0}, str(tmp_path / "esd.safetensors"))
    out = tmp_path / "concept"
    argv = evaluate_args(assets, out, "--model", str(assets["model"]), "--weights", str(tmp_path / "esd.safetensors"))
    assert main([*argv, "--concept", str(concept)]) == 0
    document = json.loads((out / "metrics.json").read_text())
    assert document["prompts"]["roles"] == {"erased": 1, "generality": 1, "preserved": 1}
    assert document["models"]["esd"]["kind"] == "weights" and len(document["models"]["esd"]["weights_sha256"]) == 64
    metrics = document["metrics"]["esd"]
    assert metrics["paired_preservation"] < 1.0
    assert all(metrics[name] is not None for name in ("efficacy", "generality", "specificity", "harmonic_mean"))


def no_output(out):
    return not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_bad_inputs_are_one_line_errors_and_write_nothing(assets, tmp_path, capsys):
    model = ["--model", str(assets["model"])]
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("case_number,prompt\n0,a\n")
    (tmp_path / "empty").mkdir()
    mixed = tmp_path / "mixed"
    for name, size in (("base", 32), ("edit", 16)):
        (mixed / name).mkdir(parents=True)
        Image.fromarray(np.zeros((size, size, 3), np.uint8)).save(mixed / name / "0_0.png")
    cases = [
        (["--images", str(tmp_path / "empty")], "holds no images"),
        ([*model, "--prompts", str(bad_csv)], "has no 'evaluation_seed' column"),
        ([*model, "--prompts", str(assets["prompts"]), "--clip", "ViT-Q-99:openai"], "Unknown CLIP model"),
        (["--images", str(mixed), "--prompts", str(assets["prompts"])], "16x16 images but the other folders 32x32"),
        ([*model, "--prompts", str(assets["prompts"]), "--edit", str(assets["foreign"])], "weights differ"),
        ([*model], "Say what to evaluate"),
    ]
    for index, (extra, message) in enumerate(cases):
        out = tmp_path / f"out{index}"
        argv = evaluate_args(assets, out, *extra)
        if "--clip" in extra:
            position = argv.index("--clip")
            del argv[position : position + 2]  # keep only the bad --clip
        assert main(argv) == 1, extra
        error = capsys.readouterr().err
        assert message in error and error.count("\n") == 1, (extra, error)
        assert no_output(out), extra


def test_existing_output_folder_is_refused(assets, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(evaluate_args(assets, out, "--model", str(assets["model"]), "--prompts", str(assets["prompts"]))) == 1
    assert "exists" in capsys.readouterr().err and (out / "keep.txt").read_text() == "mine"


def test_toy_clip_gets_the_toy_caption_templates(tmp_path):
    from erasure.cli import _default_clip
    from erasure.evaluate import DEFAULT_CLIP, DEFAULT_TEMPLATES, TOY_TEMPLATES, default_templates
    from erasure.toyworld.captions import TEMPLATES
    from erasure.toyworld.models import CLIP_CONFIG

    assert TOY_TEMPLATES == tuple(t.replace("{x}", "{}") for t in TEMPLATES)
    toy = tmp_path / "toyworld-clip"
    toy.mkdir()
    (toy / "open_clip_config.json").write_text(json.dumps({"model_cfg": CLIP_CONFIG}))
    assert default_templates(str(toy)) == TOY_TEMPLATES == default_templates(f"local-dir:{toy}")
    assert default_templates("ViT-L-14-quickgelu") == DEFAULT_TEMPLATES
    assert _default_clip(str(tmp_path / "toyworld-sd")) == str(toy)  # the toy CLIP beside the toy model
    assert _default_clip("CompVis/stable-diffusion-v1-4") == DEFAULT_CLIP


def test_overwrite_replaces_a_previous_run(run, assets, tmp_path):
    out = tmp_path / "again"
    shutil.copytree(run, out)
    (out / "stale.txt").write_text("old")
    argv = evaluate_args(assets, out, "--images", str(run / "images" / "base"), "--overwrite")
    assert main(argv) == 0
    assert not (out / "stale.txt").exists()
    assert list(json.loads((out / "metrics.json").read_text())["metrics"]) == ["base"]


def test_strict_json_replaces_non_finite_numbers_with_null():
    from erasure.evaluate import strict_json

    document = {"a": float("nan"), "b": [1.0, float("inf"), {"c": -float("inf")}], "d": "nan", "e": 3}
    assert strict_json(document) == {"a": None, "b": [1.0, None, {"c": None}], "d": "nan", "e": 3}
    json.dumps(strict_json(document), allow_nan=False)  # valid JSON
