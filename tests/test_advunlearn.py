"""AdvUnlearn (arXiv 2405.15234): the prefixed encoding, the inner attack, and ESD as its attack-free special case."""

import pytest
import torch

from erasure.concepts import Concept, EraseRequest
from erasure.diffusion import encode_prompts
from erasure.embedding_override import EmbeddingOverride, token_embedding
from erasure.export import lora_state_dict
from erasure.methods import get_method
from erasure.methods.advunlearn import AdvUnlearnConfig, encode_with_prefix, prefixed_ids
from erasure.testing import tiny_pipeline

REQUEST = EraseRequest(
    (Concept(name="pip", kind="character", erase=("pip", "a picture of pip"), preserve=("zog", "a red circle")),)
)
SMALL = {"ddim_steps": 4, "trajectories": 2, "resolution": 16, "expand": "off"}


def quick():
    return SMALL | {"iterations": 3, "warmup_iterations": 1, "attack_steps": 2, "lr": 1e-3}


def test_the_plain_encoding_is_the_pipelines_and_the_placeholder_row_reproduces_it():
    pipe = tiny_pipeline("sd1")
    prompts = ["pip", "a picture of pip"]
    plain = pipe.text_encoder(prefixed_ids(pipe.tokenizer, prompts, 0))[0]
    assert torch.equal(plain, encode_prompts(pipe, prompts).prompt_embeds)
    ids = prefixed_ids(pipe.tokenizer, prompts, 2)
    assert ids.shape == (2, pipe.tokenizer.model_max_length)
    assert ids[:, 1:3].eq(pipe.tokenizer.eos_token_id).all()  # the placeholders, right after the start token
    assert torch.equal(ids[:, 3:6], prefixed_ids(pipe.tokenizer, prompts, 0)[:, 1:4])  # the prompt, shifted by 2
    rows = token_embedding(pipe.text_encoder).weight[ids[:, 1:3]].detach()
    with EmbeddingOverride(pipe.text_encoder) as override:
        assert torch.equal(encode_with_prefix(pipe, override, ids, rows), pipe.text_encoder(ids)[0])


def test_without_attacks_or_retain_loss_it_is_esd_on_the_same_states():
    pipe = tiny_pipeline("sd1")
    common = SMALL | {"iterations": 3, "lr": 1e-3}
    adv = get_method("advunlearn", parameters="xattn", attack_steps=0, retain_weight=0.0, **common)
    esd = get_method("esd-x", preset="fast", gradient_checkpointing=False, **common)
    adv_edit, esd_edit = (m.apply(pipe, REQUEST, progress=False) for m in (adv, esd))
    assert adv_edit.deltas.keys() == esd_edit.deltas.keys()
    for key, delta in adv_edit.deltas.items():
        assert torch.allclose(delta, esd_edit.deltas[key], atol=1e-7), key


def test_the_inner_attack_lowers_its_objective_and_the_text_encoder_is_what_changes():
    pipe = tiny_pipeline("sd1")
    method = get_method("advunlearn", attack_steps=15, attack_lr=0.05, **SMALL)
    generator = torch.Generator().manual_seed(0)
    (concept,) = REQUEST.concepts
    bank = method._state_bank(pipe, list(concept.erase), list(concept.erase_anchors), generator)
    one = {key: bank[key][:1] for key in ("x_t", "t", "rows", "prediction")}  # one state: every draw picks it
    row = int(one["rows"][0])
    ids = prefixed_ids(pipe.tokenizer, bank["prompts"][row : row + 1], 1)
    start = token_embedding(pipe.text_encoder).weight.detach()[None, :1] * 0 + 0.01
    with EmbeddingOverride(pipe.text_encoder) as override, torch.no_grad():
        embeds = encode_with_prefix(pipe, override, ids, start)
        before = torch.nn.functional.mse_loss(
            pipe.unet(one["x_t"], one["t"], encoder_hidden_states=embeds)[0], one["prediction"]
        )
    with EmbeddingOverride(pipe.text_encoder) as override:
        _, after = method._attack(pipe, override, ids, one, row, start, generator)
    assert after < float(before)
    edit = get_method("advunlearn", **quick()).apply(pipe, REQUEST, progress=False)
    assert edit.deltas and all(key.startswith("text_encoder.") for key in edit.deltas)
    assert not any(".embeddings." in key for key in edit.deltas)  # layers and final norm, not the tables
    assert any("final_layer_norm" in key for key in edit.deltas)
    stats = edit.config["stats"]
    assert stats["attacked_iterations"] == 2 and stats["retain_prompts"] == 2
    assert stats["cached_retain_states"] == stats["cached_states"] > 0  # the retain prompts' own runs, as many
    before_embeds = encode_prompts(pipe, ["pip"]).prompt_embeds
    with edit.applied(pipe):
        assert not torch.equal(encode_prompts(pipe, ["pip"]).prompt_embeds, before_embeds)
    assert torch.equal(encode_prompts(pipe, ["pip"]).prompt_embeds, before_embeds)
    state, _, skipped = lora_state_dict(edit, 4)
    assert state == {} and sorted(skipped) == sorted(edit.deltas)  # a UNet LoRA cannot carry text-encoder deltas


@pytest.mark.parametrize(
    ("options", "message"),
    [({"parameters": "unet"}, "parameters"), ({"iterations": 0}, "iterations"), ({"retain_weight": -1}, "retain")],
)
def test_bad_settings_name_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        AdvUnlearnConfig(**options)


def test_sdxl_is_refused():
    with pytest.raises(ValueError, match="does not support sdxl"):
        get_method("advunlearn", **quick()).apply(tiny_pipeline("sdxl"), REQUEST, progress=False)
