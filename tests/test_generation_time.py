"""Generation-time methods (negative prompt, SLD): no weight changes, their own sampling maths, files, refusals."""

import numpy as np
import pytest
import torch

from erasure.concepts import Concept, EraseRequest
from erasure.diffusion import encode_prompts, predict_noise, unconditional_conditioning
from erasure.edit import Edit, EditFormatError
from erasure.export import export_edit
from erasure.generate import generate
from erasure.methods import METHODS, generation_time_names, get_method, load_edit
from erasure.methods.negative_prompt import NegativePromptEdit
from erasure.methods.sld import PRESETS, SLDConfig, SLDEdit, safety_guidance
from erasure.suppression import GenerationEditError, active_generation_edit
from erasure.testing import tiny_pipeline

REQUEST = EraseRequest(
    (
        Concept(
            name="pip", kind="character", erase=("pip", "a picture of pip"), preserve=("zog",),
            evaluate=("a drawing of pip",), evaluate_preserve=("a drawing of zog",),
        ),
    )
)  # fmt: skip
PROMPTS, SEEDS = ["a picture of pip", "zog"], [1, 2]


def images(pipe, **kwargs):
    return generate(pipe, PROMPTS, SEEDS, steps=3, progress=False, **kwargs)


def state(pipe):
    return {k: v.clone() for m in ("unet", "text_encoder") for k, v in getattr(pipe, m).state_dict().items()}


def test_the_registry_marks_the_generation_time_methods():
    assert {"negative-prompt", "sld"} <= set(generation_time_names())
    assert not any(METHODS[name].generation_time for name in ("uce", "rece", "esd-x"))


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("name", ["negative-prompt", "sld"])
def test_apply_changes_no_weight_and_records_what_sampling_will_do(name, family):
    pipe = tiny_pipeline(family)
    before = state(pipe)
    edit = get_method(name).apply(pipe, REQUEST, progress=False, base_model="tiny")
    assert all(torch.equal(before[key], value) for key, value in state(pipe).items())
    assert dict(edit.deltas) == {} and edit.config["generation_time"] is True
    assert edit.config["method"] == name and edit.config["family"] == family
    text = edit.config["suppression"].get("negative_prompt") or edit.config["suppression"]["safety_concept"]
    assert text == "pip"  # the concept's words; never its held-out prompts
    assert "drawing" not in str(edit.config["suppression"])


def test_negative_prompt_edit_is_the_pipelines_own_negative_prompt():
    pipe = tiny_pipeline("sd1")
    edit = get_method("negative-prompt").apply(pipe, REQUEST, progress=False)
    plain = images(pipe)
    with edit.applied(pipe):
        assert active_generation_edit(pipe) == (edit, 1.0)
        suppressed = images(pipe)
    assert active_generation_edit(pipe) is None
    side = pipe.unet.config.sample_size
    shape = (pipe.unet.config.in_channels, side, side)
    latents = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in SEEDS])
    size = side * pipe.vae_scale_factor
    direct = pipe(
        PROMPTS, negative_prompt=["pip", "pip"], num_inference_steps=3, latents=latents, height=size, width=size,
        output_type="np",
    ).images  # fmt: skip
    assert np.array_equal(suppressed, (np.clip(direct, 0, 1) * 255).round().astype(np.uint8))
    assert not np.array_equal(suppressed, plain)
    with edit.applied(pipe, scale=0.0):
        assert np.array_equal(images(pipe), plain)
    with pytest.raises(GenerationEditError, match="no strength 0.5"):
        with edit.applied(pipe, scale=0.5):
            pass


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_sld_with_a_zero_safety_scale_equals_plain_generation_bit_for_bit(family):
    pipe = tiny_pipeline(family)
    plain = images(pipe)
    off = get_method("sld", safety_scale=0.0, warmup_steps=0, momentum_scale=0.5).apply(pipe, REQUEST, progress=False)
    with off.applied(pipe):
        assert np.array_equal(images(pipe), plain)
    on = get_method("sld", warmup_steps=0).apply(pipe, REQUEST, progress=False)
    with on.applied(pipe):
        assert not np.array_equal(images(pipe), plain)
    with on.applied(pipe, scale=0.0):
        assert np.array_equal(images(pipe), plain)


def test_safety_guidance_follows_the_papers_equations():
    eps_u = torch.tensor([0.0, 0.0, 0.0, 0.0])
    eps_p = torch.tensor([0.5, 0.001, -0.2, 0.3])
    eps_s = torch.tensor([0.4, 0.0, 0.1, 0.6])
    momentum = torch.tensor([0.1, 0.1, 0.1, 0.1])
    settings = {"safety_scale": 5.0, "threshold": 0.01, "momentum_scale": 0.5, "momentum_beta": 0.4}
    gamma, new_momentum = safety_guidance(eps_u, eps_p, eps_s, momentum, settings)
    # mu = clamp(|p - s| * 5, max 1), zero where p - s >= 0.01: [0 (0.1 >= 0.01), 0.005, 1 (clamped 1.5), 1 (1.5)]
    mu = torch.tensor([0.0, 0.005, 1.0, 1.0])
    expected = mu * (eps_s - eps_u) + 0.5 * momentum
    assert torch.allclose(gamma, expected)
    assert torch.allclose(new_momentum, 0.4 * momentum + 0.6 * expected)


def test_the_hook_turns_the_pipelines_guidance_step_into_equation_3_after_the_warm_up():
    pipe = tiny_pipeline("sd1")
    edit = get_method("sld", warmup_steps=1, safety_scale=50.0, threshold=0.0).apply(pipe, REQUEST, progress=False)
    settings = edit.config["suppression"]["settings"]
    x = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    cond = encode_prompts(pipe, PROMPTS)
    g = 5.0
    with torch.no_grad():
        u = predict_noise(pipe, x, 500, unconditional_conditioning(pipe))
        p = predict_noise(pipe, x, 500, cond)
        s = predict_noise(pipe, x, 500, encode_prompts(pipe, ["pip"]))
        gamma_0, momentum = safety_guidance(u, p, s, torch.zeros_like(p), settings)
        gamma_1, _ = safety_guidance(u, p, s, momentum, settings)  # the momentum carries over from the warm-up
        with edit.guidance(pipe, g, 1.0):
            warm_up = predict_noise(pipe, x, 500, cond, g)
            guided = predict_noise(pipe, x, 500, cond, g)
    assert torch.allclose(warm_up, u + g * (p - u), atol=1e-5)  # step 0 < warm-up 1: plain CFG
    assert torch.allclose(guided, u + g * ((p - u) - gamma_1), atol=1e-5)
    assert gamma_0.abs().sum() > 0


def test_sld_presets_and_settings():
    names = ("warmup_steps", "safety_scale", "threshold", "momentum_scale", "momentum_beta")
    assert SLDConfig().settings() == dict(zip(names, PRESETS["medium"], strict=True))
    assert SLDConfig(preset="max", threshold=0.5).settings()["threshold"] == 0.5
    with pytest.raises(ValueError, match="Unknown SLD preset"):
        SLDConfig(preset="extreme")
    with pytest.raises(ValueError, match="momentum_beta"):
        SLDConfig(momentum_beta=2.0)
    pipe = tiny_pipeline("sd1")
    edit = get_method("sld", safety_concept="i2p").apply(pipe, REQUEST, progress=False)
    assert edit.config["suppression"]["safety_concept"].startswith("an image showing hate")
    with pytest.raises(GenerationEditError, match="classifier-free guidance"):
        with edit.applied(pipe):
            images(pipe, guidance_scale=1.0)


def test_files_round_trip_and_weight_paths_refuse_them(tmp_path):
    pipe = tiny_pipeline("sd1")
    edit = get_method("sld", preset="strong").apply(pipe, REQUEST, progress=False, base_model="tiny")
    folder = edit.save(tmp_path / "sld")
    assert sorted(p.name for p in folder.iterdir()) == ["edit_config.json"]  # no weights file
    loaded = load_edit(folder)
    assert isinstance(loaded, SLDEdit) and loaded.config == edit.config
    with pytest.raises(EditFormatError, match="generation-time edit"):
        Edit.load(folder)
    with pytest.raises(EditFormatError, match="already holds an edit"):
        edit.save(folder)
    edit.save(folder, overwrite=True)
    with pytest.raises(GenerationEditError, match="changes no weights"):
        loaded.apply_to(pipe)
    with pytest.raises(ValueError, match="nothing to export"):
        export_edit(loaded, tmp_path / "out", "diffusers")
    assert not (tmp_path / "out").exists()
    negative = get_method("negative-prompt").apply(pipe, REQUEST, progress=False)
    with negative.applied(pipe):
        with pytest.raises(GenerationEditError, match="already applied"):
            with loaded.applied(pipe):
                pass


def test_a_generation_time_edit_naming_a_weight_method_is_refused(tmp_path):
    pipe = tiny_pipeline("sd1")
    edit = get_method("negative-prompt").apply(pipe, REQUEST, progress=False)
    edit.config["method"] = "uce"
    folder = edit.save(tmp_path / "fake")
    with pytest.raises(EditFormatError, match="not a generation-time method"):
        load_edit(folder)
    assert isinstance(NegativePromptEdit(edit.config | {"method": "negative-prompt"}), NegativePromptEdit)
