"""MACE (arXiv 2403.06135): token alignment, the three stages against their equations, several concepts at once."""

import pytest
import torch
from PIL import Image

from erasure.concepts import Concept, EraseRequest
from erasure.diffusion import encode_prompts
from erasure.edit import pipeline_tensor
from erasure.methods import get_method
from erasure.methods.mace import (
    MACEConfig,
    anchor_version,
    concept_token_mask,
    fuse,
    importance_weights,
    mask_region,
    matching_indices,
)
from erasure.testing import tiny_pipeline

PIP = Concept(name="pip", kind="character", erase=("pip", "a picture of pip"), anchor="a person")
ZOG = Concept(name="zog", kind="character", erase=("zog", "a picture of zog"), anchor="a person")
FAST = {"lora_steps": 2, "training_images": 2, "image_steps": 2, "resolution": 32, "expand": "off", "prior": "none"}


def test_matching_indices_pair_prefix_suffix_and_padding_outside_the_concept_span():
    concept = [0, 5, 6, 7, 9, 1]  # <sot> a picture of pip <eot>
    anchor = [0, 5, 6, 7, 1]  # <sot> a picture of <eot>
    old, new = matching_indices(concept, anchor, 10)
    assert old[:5] == [0, 1, 2, 3, 5] and new[:5] == [0, 1, 2, 3, 4]  # prefix, then end-of-text with end-of-text
    assert len(old) == len(new) and old[-1] == 9 and 4 not in old  # the concept token itself is never a row
    assert [b - a for a, b in zip(old[4:], new[4:], strict=True)] == [-1] * 5  # padding paired after the suffix


def test_anchor_version_replaces_whole_words_in_any_case():
    assert anchor_version("a picture of Pip", PIP, "a person") == "a picture of a person"
    assert anchor_version("Pip and pipes", PIP, "") == "and pipes"


def test_importance_sampling_focuses_on_t_between_200_and_400():
    weights = importance_weights(1000)
    assert 250 <= int(weights.argmax()) <= 350
    assert weights[0] < 1e-3 and weights[999] < 1e-3 and weights[300] > 0.9


def test_fusion_reproduces_each_lora_on_its_own_concept_without_preservation():
    generator = torch.Generator().manual_seed(0)
    d, out = 12, 5
    w_cfr, w0 = torch.randn(out, d, generator=generator, dtype=torch.float64), torch.randn(out, d, dtype=torch.float64)
    inputs = [torch.randn(3, d, generator=generator, dtype=torch.float64) for _ in range(3)]  # 9 rows < 12 dims
    maps = [w_cfr + 0.1 * torch.randn(out, d, generator=generator, dtype=torch.float64) for _ in range(3)]
    fused = fuse(w_cfr, w0, inputs, maps, torch.zeros(0, d, dtype=torch.float64), torch.zeros(0), lam=1e-9)
    for e, w_i in zip(inputs, maps, strict=True):
        assert torch.allclose(e @ fused.T, e @ w_i.T, atol=1e-6)


def test_cfr_moves_the_words_around_the_concept_towards_the_anchor_prompt():
    pipe = tiny_pipeline("sd1")
    edit = get_method("mace", **FAST | {"lora_steps": 0, "lam": 1e-3}).apply(
        pipe, EraseRequest((PIP,)), progress=False
    )
    assert edit.config["stats"]["stages"] == "cfr" and edit.deltas
    length = pipe.tokenizer.model_max_length
    concept_ids = pipe.tokenizer("a picture of pip", truncation=True).input_ids
    anchor_ids = pipe.tokenizer("a picture of a person", truncation=True).input_ids
    old, new = matching_indices(concept_ids, anchor_ids, length)
    e, e_anchor = (
        encode_prompts(pipe, [p]).prompt_embeds[0].double() for p in ("a picture of pip", "a picture of a person")
    )
    key = next(k for k in edit.deltas if k.endswith("to_v.weight"))
    w0 = pipeline_tensor(pipe, key).detach().double()
    w = w0 + edit.deltas[key].double()
    before = (e[old] @ w0.T - e_anchor[new] @ w0.T).norm()
    after = (e[old] @ w.T - e_anchor[new] @ w0.T).norm()
    assert after < 0.5 * before


def test_several_concepts_in_one_request_each_get_a_lora():
    pipe = tiny_pipeline("sd1")
    edit = get_method("mace", **FAST | {"lora_steps": 6, "lr": 1e-2}).apply(
        pipe, EraseRequest((PIP, ZOG)), progress=False
    )
    stats = edit.config["stats"]
    assert stats["stages"] == "cfr+lora+fusion" and set(stats["lora_loss_first"]) == {"pip", "zog"}
    assert all(k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for k in edit.deltas)


def test_the_loss_columns_are_the_concept_words_and_every_end_of_text_position():
    tokenizer = tiny_pipeline("sd1").tokenizer
    mask = concept_token_mask(tokenizer, "a picture of pip", PIP)
    ids = tokenizer("a picture of pip", padding="max_length", max_length=tokenizer.model_max_length).input_ids
    expected = [i == tokenizer.eos_token_id for i in ids]
    expected[ids.index(tokenizer.convert_tokens_to_ids("pip</w>"))] = True
    assert mask.tolist() == expected and sum(expected) > 2  # the word, the end token and the padding after it


def test_lora_defaults_follow_the_official_config_of_each_kind():
    config = MACEConfig()
    assert config.lora_settings("character") == config.lora_settings("style") == (1e-4, 50)
    assert config.lora_settings("object") == config.lora_settings("attribute") == (1e-5, 50)
    assert config.lora_settings("unsafe") == (1e-5, 120)
    assert MACEConfig(lr=3e-4, lora_steps=7).lora_settings("unsafe") == (3e-4, 7)


def test_mask_region_resizes_the_mask_to_the_latent_grid():
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 32))  # the left half is the concept
    region = mask_region(mask, (4, 4))
    assert region.shape == (1, 4, 4) and region[0, :, :2].all() and not region[0, :, 2:].any()


def test_given_images_are_used_and_their_masks_are_the_regions():
    pipe = tiny_pipeline("sd1")
    images = [Image.new("RGB", (32, 32), colour) for colour in ("red", "blue", "green")]
    left = Image.new("L", (32, 32), 0)
    left.paste(255, (0, 0, 16, 32))
    images[0].info["mask"] = left  # as erasure.files.load_training_images attaches it
    method = get_method("mace", **FAST)
    data = method._training_data(pipe, PIP, torch.Generator().manual_seed(0), given=images)
    assert len(data["latents"]) == 3 and data["masks_used"] == 1  # three given images, not training_images = 2
    grid = data["latents"].shape[2:]
    assert torch.equal(data["regions"][0], mask_region(left, grid)[0])
    edit = method.apply(pipe, EraseRequest((PIP,)), images=images, progress=False)
    assert edit.config["stats"]["given_images"] == {"pip": 3} and edit.config["stats"]["masked_images"] == {"pip": 1}
    with pytest.raises(ValueError, match="dict"):
        method.apply(pipe, EraseRequest((PIP, ZOG)), images=images, progress=False)


@pytest.mark.parametrize(("options", "message"), [({"lam": -1}, "lam"), ({"rank": 0}, "rank"), ({"lr": 0}, "lr")])
def test_bad_settings_name_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        MACEConfig(**options)


@pytest.mark.slow  # 40 LoRA steps: ~6 s
def test_the_lora_stage_removes_the_concept_tokens_attention_in_the_region():
    pipe = tiny_pipeline("sd1")
    method = get_method("mace", **FAST | {"lora_steps": 40, "lr": 3e-2, "importance_sampling": False})
    curves = []
    stage = method._lora

    def recording(*args, **kwargs):
        deltas, losses = stage(*args, **kwargs)
        curves.append(losses)
        return deltas, losses

    method._lora = recording
    one_prompt = Concept(name="pip", kind="character", erase=("a picture of pip",), anchor="a person")
    method.apply(pipe, EraseRequest((one_prompt,)), progress=False)  # one prompt: the curve varies with t only
    (losses,) = curves
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])  # sum over layers of ||A[region, concept tokens]||_F falls
