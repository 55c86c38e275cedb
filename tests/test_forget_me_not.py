import numpy as np
import pytest
import torch

from erasure.attention import (
    AttentionProbsProcessor,
    CrossAttentionRecorder,
    cross_attention_modules,
    record_cross_attention,
    swapped_cross_attention,
    token_mask,
)
from erasure.concepts import Concept, EraseRequest
from erasure.diffusion import encode_prompts
from erasure.methods import METHODS, get_method
from erasure.methods.base import select_unet_parameters
from erasure.methods.forget_me_not import ForgetMeNot, ForgetMeNotConfig, concept_token_positions
from erasure.sampling import forward_noise, images_to_latents
from erasure.testing import tiny_pipeline

PIP = Concept(name="pip", kind="character", erase=("a picture of pip", "pip"))
FAST = ForgetMeNot.test_config()


def _unet_output(pipe, x, t, cond):
    with torch.no_grad():
        return pipe.unet(x, t, **cond.unet_kwargs(), return_dict=False)[0]


# --- processor swapping and recording ---------------------------------------------------------------------------


def test_recording_processor_computes_the_same_attention(tiny_pipe):
    cond = encode_prompts(tiny_pipe, ["a picture of pip", "zog"])
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    plain = _unet_output(tiny_pipe, x, 400, cond)
    recorder = CrossAttentionRecorder(keep_probs=True)
    with record_cross_attention(tiny_pipe.unet, recorder):
        recorded = _unet_output(tiny_pipe, x, 400, cond)
    torch.testing.assert_close(recorded, plain, rtol=1e-4, atol=1e-5)
    assert {name for name, _ in recorder.probs} == set(cross_attention_modules(tiny_pipe.unet))
    for _, probs in recorder.probs:
        assert probs.shape[0] == 2 and probs.shape[-1] == cond.prompt_embeds.shape[1]
        torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)))  # softmax over tokens


def test_swap_restores_the_very_same_processors_also_on_errors():
    pipe = tiny_pipeline("sd1")
    before = dict(pipe.unet.attn_processors)
    with swapped_cross_attention(pipe.unet, lambda name, _: AttentionProbsProcessor(lambda *a: None, name)) as new:
        assert set(new) == set(cross_attention_modules(pipe.unet))
        now = pipe.unet.attn_processors
        assert all(isinstance(now[f"{name}.processor"], AttentionProbsProcessor) for name in new)
        assert all(now[k] is v for k, v in before.items() if ".attn1." in k)  # self-attention untouched
    assert all(pipe.unet.attn_processors[k] is v for k, v in before.items())
    with pytest.raises(RuntimeError, match="boom"), record_cross_attention(pipe.unet, CrossAttentionRecorder()):
        raise RuntimeError("boom")
    assert all(pipe.unet.attn_processors[k] is v for k, v in before.items())


def test_recorder_mass_and_squares_match_the_probabilities():
    pipe = tiny_pipeline("sd1")
    cond = encode_prompts(pipe, ["a picture of pip"])
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    positions = [3, 4]
    recorder = CrossAttentionRecorder(token_mask([positions]), keep_probs=True)
    with record_cross_attention(pipe.unet, recorder):
        _unet_output(pipe, x, 300, cond)
    probs = [p for _, p in recorder.probs]
    expected_mass = torch.stack([p[..., positions].sum(-1).mean() for p in probs]).mean()
    expected_squares = sum(p[..., positions].square().sum() for p in probs)
    torch.testing.assert_close(recorder.mass(), expected_mass.reshape(1))
    torch.testing.assert_close(recorder.sum_of_squares(), expected_squares)
    everything = CrossAttentionRecorder(torch.ones(1, 77, dtype=torch.bool))
    with record_cross_attention(pipe.unet, everything):
        _unet_output(pipe, x, 300, cond)
    torch.testing.assert_close(everything.mass(), torch.ones(1))


# --- concept tokens ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd1", "sd2"])  # SD1 pads with end-of-text, SD2 with "!"
def test_only_the_concept_tokens_are_selected_never_padding(family):
    pipe = tiny_pipeline(family)
    tokenizer = pipe.tokenizer
    prompt = "a picture of pip"
    ids = tokenizer(prompt, padding="max_length", max_length=77).input_ids
    positions = concept_token_positions(pipe, prompt, PIP, include_eos=False)
    assert [ids[i] for i in positions] == tokenizer("pip", add_special_tokens=False).input_ids
    assert positions == [4]
    with_eos = concept_token_positions(pipe, prompt, PIP, include_eos=True)
    assert with_eos == [4, 5] and ids[5] == tokenizer.eos_token_id
    assert ids.count(tokenizer.pad_token_id) > 60  # the padding that is never selected
    assert concept_token_positions(pipe, "a picture of zog", PIP, include_eos=True) == []


def test_multi_word_concepts_select_every_word():
    pipe = tiny_pipeline("sdxl")
    concept = Concept(name="Van Gogh", kind="style", erase=("a painting by van gogh",))
    assert concept_token_positions(pipe, "a painting by van gogh", concept, include_eos=False) == [4, 5]


# --- re-steering --------------------------------------------------------------------------------------------------


def _concept_mass(pipe, latents, prompts, positions):
    """Mean attention mass on the concept tokens over fixed noised latents."""
    recorder = CrossAttentionRecorder(token_mask(positions))
    cond = encode_prompts(pipe, prompts)
    x_t, _, t = forward_noise(pipe, latents, torch.tensor([100, 500, 900]), torch.Generator().manual_seed(0))
    with record_cross_attention(pipe.unet, recorder):
        _unet_output(pipe, x_t, t, cond)
    return recorder.mass().mean().item()


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_resteering_lowers_the_concept_attention_mass(family):
    pipe = tiny_pipeline(family)
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    latents = images_to_latents(pipe, images, size=32, sample=False)
    prompts = ["a picture of pip", "pip", "a picture of pip"]
    positions = [concept_token_positions(pipe, p, PIP, include_eos=False) for p in prompts]
    method = get_method("resteer", steps=8, lr=1e-3, resolution=32)
    edit = method.apply(pipe, EraseRequest((PIP,)), images=list(images), progress=False)
    before = _concept_mass(pipe, latents, prompts, positions)
    edit.apply_to(pipe)
    after = _concept_mass(pipe, latents, prompts, positions)
    assert after < 0.8 * before
    stats = edit.config["stats"]
    assert stats["generated_images"] is False and stats["images"] == 3
    assert stats["attention_mass_last"] < stats["attention_mass_first"]
    assert set(edit.deltas) <= set(select_unet_parameters(pipe.unet, "xattn"))


def test_generated_images_and_whole_unet_option():
    pipe = tiny_pipeline("sd2")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    edit = get_method("fmn", **FAST, parameters="unet", lr=1e-4).apply(pipe, EraseRequest((PIP,)), progress=False)
    assert METHODS["fmn"] is METHODS["resteer"] is ForgetMeNot
    assert edit.config["stats"]["generated_images"] is True and edit.config["stats"]["images"] == 2
    assert any(".attn2." not in k for k in edit.deltas)  # layers before a cross-attention move its queries
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())


def test_images_must_name_their_concept_when_several():
    pipe = tiny_pipeline("sd1")
    zog = Concept(name="zog", kind="character", erase=("a picture of zog",))
    images = list(np.zeros((1, 32, 32, 3), dtype=np.uint8))
    request = EraseRequest((PIP, zog))
    with pytest.raises(ValueError, match="dict"):
        get_method("resteer", **FAST).apply(pipe, request, images=images, progress=False)
    edit = get_method("resteer", **FAST).apply(
        pipe, request, images={"pip": images, "zog": images + images}, progress=False
    )
    assert edit.config["stats"]["images"] == 3


def test_prompts_without_the_concept_words_are_refused():
    pipe = tiny_pipeline("sd1")
    hidden = Concept(name="pip", kind="character", erase=("a picture of zog",))
    with pytest.raises(ValueError, match="none of its erase prompts"):
        get_method("resteer", **FAST, expand="off").apply(pipe, EraseRequest((hidden,)), progress=False)


def test_config_validation():
    default = ForgetMeNotConfig()
    assert default.steps == 35 and default.lr == 2e-6 and default.parameters == "xattn"
    assert isinstance(ForgetMeNotConfig(lr="1e-5").lr, float)
    for bad in ({"parameters": "noxattn"}, {"steps": 0}, {"lr": 0.0}, {"resolution": 4}):
        with pytest.raises(ValueError):
            ForgetMeNotConfig(**bad)
