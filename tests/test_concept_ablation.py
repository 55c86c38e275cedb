"""Concept Ablation (arXiv 2303.13516): the model-based objective falls, its parameter groups, its settings."""

import pytest
import torch

from erasure.concepts import Concept, EraseRequest
from erasure.diffusion import encode_prompts, predict_noise
from erasure.methods import get_method
from erasure.methods.concept_ablation import ConceptAblationConfig, start_token_detached
from erasure.testing import tiny_pipeline

PAIRS = {"a striped red circle": "a red circle", "a striped blue square": "a blue square"}
REQUEST = EraseRequest((Concept(name="striped", kind="style", erase=tuple(PAIRS), anchor=tuple(PAIRS.values())),))
FAST = {"steps": 30, "batch_size": 4, "anchor_images": 4, "image_steps": 2, "resolution": 32, "lr": 3e-3}


def objective(pipe, x_t, t):
    """The model-based objective on fixed noisy latents: || eps(x_t, c*) - eps(x_t, c_a) ||^2 per pair."""
    with torch.no_grad():
        concept = predict_noise(pipe, x_t, t, encode_prompts(pipe, list(PAIRS)))
        anchor = predict_noise(pipe, x_t, t, encode_prompts(pipe, list(PAIRS.values())))
    return float((concept - anchor).pow(2).mean())


def test_the_model_based_objective_falls_and_only_cross_attention_keys_and_values_change():
    pipe = tiny_pipeline("sd1")
    x_t = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    before = objective(pipe, x_t, 500)
    edit = get_method("ca", **FAST).apply(pipe, REQUEST, progress=False)
    assert edit.deltas and all(k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for k in edit.deltas)
    with edit.applied(pipe):
        after = objective(pipe, x_t, 500)
    assert after < 0.7 * before
    stats = edit.config["stats"]
    assert stats["anchor_images"] == 4 and stats["pairs"] == [list(pair) for pair in PAIRS.items()]


def test_no_gradient_flows_through_the_start_tokens_keys_and_values():
    pipe = tiny_pipeline("sd1")
    name, to_k = next((n, m) for n, m in pipe.unet.named_modules() if n.endswith("attn2.to_k"))
    tokens = torch.randn(1, 3, to_k.in_features)
    with start_token_detached(pipe.unet):
        out = to_k(tokens)
        (start,) = torch.autograd.grad(out[:, 0].sum(), to_k.weight, allow_unused=True, materialize_grads=True)
        (rest,) = torch.autograd.grad(to_k(tokens)[:, 1:].sum(), to_k.weight)
    assert not start.any() and rest.any()
    (after,) = torch.autograd.grad(to_k(tokens)[:, 0].sum(), to_k.weight)  # the hooks are gone
    assert after.any(), name


def test_parameter_groups_and_the_noise_objective():
    pipe = tiny_pipeline("sd1")
    attn = get_method("ca", parameters="attn").select_parameters(pipe)
    assert attn and all(any(s in k for s in (".to_q.", ".to_k.", ".to_v.", ".to_out.")) for k in attn)
    assert any(".attn1." in k for k in attn) and any(".attn2." in k for k in attn)
    assert len(get_method("ca", parameters="unet").select_parameters(pipe)) > len(attn)
    edit = get_method("ca", **FAST | {"objective": "noise", "steps": 2}).apply(pipe, REQUEST, progress=False)
    assert edit.deltas


@pytest.mark.parametrize(
    ("options", "message"),
    [({"parameters": "xattn"}, "parameters"), ({"objective": "kl"}, "objective"), ({"steps": 0}, "steps")],
)
def test_bad_settings_name_the_option(options, message):
    with pytest.raises(ValueError, match=message):
        ConceptAblationConfig(**options)


def test_gradient_checkpointing_changes_memory_not_the_edit():
    edits = [
        get_method("ca", steps=2, batch_size=2, anchor_images=2, image_steps=1, gradient_checkpointing=on).apply(
            tiny_pipeline("sd1"), REQUEST
        )
        for on in (True, False)
    ]
    assert edits[0].deltas.keys() == edits[1].deltas.keys()
    for key in edits[0].deltas:
        assert torch.allclose(edits[0].deltas[key], edits[1].deltas[key], atol=1e-7), key
