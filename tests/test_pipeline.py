import os
import subprocess
import sys
import time

import huggingface_hub
import numpy as np
import pytest
import torch
from huggingface_hub.errors import RepositoryNotFoundError
from safetensors.torch import load_file, save_file

from erasure.diffusion import Conditioning, encode_prompts, predict_noise, unconditional_conditioning
from erasure.export import save_single_file
from erasure.pipeline import (
    CorruptCheckpointError,
    ModelFamily,
    ModelNotFoundError,
    PipelineLoadError,
    UnsafeCheckpointError,
    default_image_size,
    detect_family,
    load_pipeline,
    prediction_type,
)
from erasure.testing import TINY_WORDS, save_tiny_pipeline, tiny_pipeline, tiny_tokenizer

MODULES = ("unet", "vae", "text_encoder", "text_encoder_2")


def assert_same_weights(a, b, names=MODULES):
    for name in names:
        module_a, module_b = getattr(a, name, None), getattr(b, name, None)
        if module_a is None:
            assert module_b is None
            continue
        state_a, state_b = module_a.state_dict(), module_b.state_dict()
        assert state_a.keys() == state_b.keys(), name
        for key in state_a:
            assert torch.equal(state_a[key], state_b[key]), f"{name}.{key}"


def assert_one_line_advice(error, *words):
    message = str(error)
    assert "\n" not in message and message.strip() == message
    assert any(word in message.lower() for word in words), message


# --- tiny pipelines ---------------------------------------------------------------------------------------------


def test_tiny_pipeline_family_and_config(family, tiny_pipe):
    assert detect_family(tiny_pipe) is family
    assert prediction_type(tiny_pipe) == ("v_prediction" if family is ModelFamily.SD2 else "epsilon")
    assert default_image_size(tiny_pipe) == 64
    assert tiny_pipe.device.type == "cpu" and tiny_pipe.unet.dtype == torch.float32
    assert getattr(tiny_pipe, "safety_checker", None) is None


def test_tiny_pipeline_is_seeded_and_fresh():
    state = torch.random.get_rng_state()
    first, second, other = tiny_pipeline("sd1", seed=0), tiny_pipeline("sd1", seed=0), tiny_pipeline("sd1", seed=1)
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is untouched
    assert_same_weights(first, second)
    assert not torch.equal(first.unet.conv_in.weight, other.unet.conv_in.weight)
    with torch.no_grad():
        first.unet.conv_in.weight.zero_()
    assert tiny_pipeline("sd1", seed=0).unet.conv_in.weight.abs().sum() > 0  # copies, not the cached object


def test_tiny_tokenizer_words_are_single_tokens():
    tokenizer = tiny_tokenizer()
    for word in TINY_WORDS:
        ids = tokenizer(word).input_ids
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        assert len(ids) == 3, (word, tokenizer.convert_ids_to_tokens(ids))
    ids = tokenizer("A Xylophone, 42!").input_ids  # unknown text falls back to byte-level pieces
    assert tokenizer.unk_token_id not in ids[1:-1] and len(ids) > 5
    padded = tokenizer("a cat", padding="max_length", max_length=tokenizer.model_max_length).input_ids
    assert len(padded) == 77 and padded[-1] == tokenizer.eos_token_id  # SD 1.x pads with <|endoftext|>
    assert tiny_tokenizer(pad_token="!").pad_token == "!"  # SD 2.x


def test_pipeline_generates_images(family, tiny_pipe):
    def generate():
        return tiny_pipe(
            "a photo of a cat",
            num_inference_steps=2,
            height=32,
            width=32,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
        ).images

    images = generate()
    assert images.shape == (1, 32, 32, 3)
    assert np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    np.testing.assert_array_equal(images, generate())


# --- loading ----------------------------------------------------------------------------------------------------


@pytest.fixture
def saved(family, tmp_path):
    return save_tiny_pipeline(tmp_path / f"tiny-{family}", family)


def test_load_diffusers_folder_round_trip(family, saved):
    pipe = load_pipeline(saved)
    reference = tiny_pipeline(family)
    assert type(pipe) is type(reference)
    assert detect_family(pipe) is family and prediction_type(pipe) == prediction_type(reference)
    assert pipe.device.type == "cpu" and pipe.unet.dtype == torch.float32
    assert getattr(pipe, "safety_checker", None) is None
    assert_same_weights(pipe, reference)
    loaded, expected = encode_prompts(pipe, ["a red circle"]), encode_prompts(reference, ["a red circle"])
    assert torch.equal(loaded.prompt_embeds, expected.prompt_embeds)  # tokenizers survive the round trip


def test_load_without_vae_keeps_the_checkpoints_vae_factor_and_the_uce_edit(family, saved):
    from erasure.concepts import request_from_prompts
    from erasure.methods import get_method

    full, light = load_pipeline(saved), load_pipeline(saved, without_vae=True)
    assert light.vae is None and full.vae is not None
    assert full.vae_scale_factor != 8  # diffusers' guess without a VAE: the test would pass by luck at 8
    assert light.vae_scale_factor == full.vae_scale_factor
    assert_same_weights(light, full, names=[name for name in MODULES if name != "vae"])
    request = request_from_prompts(["a red circle"], name="red circle")
    edits = [get_method("uce").apply(pipe, request, progress=False) for pipe in (full, light)]
    assert edits[0].deltas.keys() == edits[1].deltas.keys() and edits[0].deltas
    assert all(torch.equal(edits[0].deltas[key], edits[1].deltas[key]) for key in edits[0].deltas)


def test_load_casts_dtype(tmp_path):
    pipe = load_pipeline(save_tiny_pipeline(tmp_path / "tiny", "sd1"), device="cpu", dtype=torch.bfloat16)
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.bfloat16


@pytest.mark.filterwarnings("ignore:Cannot enable progress bars")  # the suite's HF_HUB_DISABLE_PROGRESS_BARS
def test_load_without_progress_restores_the_libraries_bar_settings(tmp_path):
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    saved = save_tiny_pipeline(tmp_path / "tiny", "sd1")
    libraries = (diffusers_logging, transformers_logging)
    for enabled in (True, False):
        for library in libraries:
            (library.enable_progress_bar if enabled else library.disable_progress_bar)()
        load_pipeline(saved, progress=False)
        assert [library.is_progress_bar_enabled() for library in libraries] == [enabled, enabled]


@pytest.mark.slow  # a fresh interpreter (the suite's own bars are off): ~10 s
def test_load_without_progress_prints_no_loading_bar(tmp_path):
    saved = save_tiny_pipeline(tmp_path / "tiny", "sd1")
    code = (
        "import sys; from erasure.pipeline import load_pipeline; "
        f"load_pipeline({str(saved)!r}, progress=False); print('--- with bars', file=sys.stderr); "
        f"load_pipeline({str(saved)!r})"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_DISABLE_PROGRESS_BARS", "TQDM_DISABLE")}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    silent, loud = result.stderr.split("--- with bars")
    assert "Loading" not in silent and "Loading pipeline components" in loud


def test_load_single_file_round_trip(family, saved, tmp_path):
    reference = tiny_pipeline(family)
    checkpoint = save_single_file(reference, tmp_path / "model.safetensors")
    keys = load_file(checkpoint).keys()
    assert any(k.startswith("model.diffusion_model.") for k in keys)
    assert any(k.startswith("conditioner.embedders.1.") for k in keys) == (family is ModelFamily.SDXL)

    pipe = load_pipeline(checkpoint, config=saved)
    assert type(pipe) is type(reference)  # SDXL chosen from the conditioner.embedders.1 keys
    assert detect_family(pipe) is family and prediction_type(pipe) == prediction_type(reference)
    assert_same_weights(pipe, reference)


def test_config_is_only_for_single_files(saved):
    with pytest.raises(PipelineLoadError) as info:
        load_pipeline(saved, config=saved)
    assert_one_line_advice(info.value, "drop config=")


def test_single_file_without_config_offline_fails_fast(tmp_path):
    checkpoint = save_single_file(tiny_pipeline("sd1"), tmp_path / "model.safetensors")
    start = time.monotonic()
    with pytest.raises(PipelineLoadError) as info:
        load_pipeline(checkpoint)
    assert time.monotonic() - start < 5
    assert_one_line_advice(info.value, "config=")


# --- load errors: one line, saying what to do --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["missing-folder", "missing.safetensors", "nested/missing/model"])
def test_missing_path(tmp_path, name):
    with pytest.raises(ModelNotFoundError) as info:
        load_pipeline(tmp_path / name)
    assert_one_line_advice(info.value, "check the path")


@pytest.mark.parametrize("source", ["./no-such-model", "~/no-such-model.safetensors", "no-such-model"])
def test_missing_relative_path_or_bad_id(source):
    with pytest.raises(ModelNotFoundError) as info:
        load_pipeline(source)
    assert_one_line_advice(info.value, "check the path", "hub id")


def test_folder_without_model_index(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(PipelineLoadError) as info:
        load_pipeline(tmp_path)
    assert_one_line_advice(info.value, "model_index.json")


@pytest.mark.parametrize("content", [b"not a safetensors file at all", b'\x08\x00\x00\x00\x00\x00\x00\x00{"a":1}'])
def test_corrupt_safetensors(tmp_path, content):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(CorruptCheckpointError) as info:
        load_pipeline(path)
    assert_one_line_advice(info.value, "download or export it again")


def test_truncated_safetensors(tmp_path):
    path = save_single_file(tiny_pipeline("sd1"), tmp_path / "model.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError) as info:
        load_pipeline(path)
    assert_one_line_advice(info.value, "again")


def test_safetensors_that_is_not_a_pipeline(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(PipelineLoadError) as info:
        load_pipeline(path)
    assert_one_line_advice(info.value, "complete single-file checkpoint")


@pytest.mark.parametrize("suffix", [".ckpt", ".pt"])
def test_pickles_are_refused(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"\x80\x04 never unpickled")
    with pytest.raises(UnsafeCheckpointError) as info:
        load_pipeline(path)
    assert_one_line_advice(info.value, "convert it to .safetensors")


def test_unknown_hub_id_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(ModelNotFoundError) as info:
        load_pipeline("nobody-erasure-tests/no-such-model")
    assert time.monotonic() - start < 5
    assert_one_line_advice(info.value, "offline")


def _online_without_network(monkeypatch, error):
    for flag in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE"):
        monkeypatch.delenv(flag, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def model_info(*args, **kwargs):
        raise error

    monkeypatch.setattr(huggingface_hub, "model_info", model_info)


def test_unreachable_hub(monkeypatch):
    _online_without_network(monkeypatch, OSError("Name or service not known"))
    with pytest.raises(ModelNotFoundError) as info:
        load_pipeline("nobody-erasure-tests/no-such-model")
    assert_one_line_advice(info.value, "check your connection")


def test_unknown_hub_id_online(monkeypatch):
    error = RepositoryNotFoundError.__new__(RepositoryNotFoundError)
    Exception.__init__(error, "404 Repository Not Found")
    _online_without_network(monkeypatch, error)
    with pytest.raises(ModelNotFoundError) as info:
        load_pipeline("nobody-erasure-tests/no-such-model")
    assert_one_line_advice(info.value, "check the id")


# --- conditioning and noise prediction ---------------------------------------------------------------------------


def test_encode_prompts_shapes(family, tiny_pipe):
    conditioning = encode_prompts(tiny_pipe, ["a photo of a cat", "a dog"])
    width = 96 if family is ModelFamily.SDXL else 32
    assert conditioning.prompt_embeds.shape == (2, 77, width)
    assert not conditioning.prompt_embeds.requires_grad
    if family is ModelFamily.SDXL:
        assert conditioning.pooled_prompt_embeds.shape == (2, 32)
        expected = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2)  # (h, w), crop (0, 0), (h, w)
        torch.testing.assert_close(conditioning.add_time_ids, expected)
    else:
        assert conditioning.pooled_prompt_embeds is None and conditioning.add_time_ids is None
    assert encode_prompts(tiny_pipe, "a cat", grad=True).prompt_embeds.requires_grad


def test_unconditional_conditioning(family, tiny_pipe):
    uncond = unconditional_conditioning(tiny_pipe, 3)
    assert len(uncond) == 3
    if family is ModelFamily.SDXL:  # force_zeros_for_empty_prompt, as the SDXL pipeline does
        assert uncond.prompt_embeds.abs().sum() == 0 and uncond.pooled_prompt_embeds.abs().sum() == 0
    else:
        torch.testing.assert_close(uncond[0].prompt_embeds, encode_prompts(tiny_pipe, [""]).prompt_embeds)


def test_predict_noise_guidance_is_one_batched_cfg(family, tiny_pipe):
    latents = torch.randn(2, 4, 8, 8)
    cond = encode_prompts(tiny_pipe, ["a red circle", "a dog"])
    uncond = unconditional_conditioning(tiny_pipe, 2)
    with torch.no_grad():
        guided = predict_noise(tiny_pipe, latents, 500, cond, guidance_scale=7.5, unconditional=uncond)
        eps_cond = predict_noise(tiny_pipe, latents, 500, cond)
        eps_uncond = predict_noise(tiny_pipe, latents, 500, uncond)
        default = predict_noise(tiny_pipe, latents, 500, cond, guidance_scale=7.5)
    assert guided.shape == latents.shape
    torch.testing.assert_close(guided, eps_uncond + 7.5 * (eps_cond - eps_uncond), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(default, guided)  # the pipeline's own unconditional by default


def test_predict_noise_timestep_forms():
    pipe = tiny_pipeline("sd1")
    latents = torch.randn(2, 4, 8, 8)
    cond = encode_prompts(pipe, ["a cat"])  # one prompt broadcast to both latents
    with torch.no_grad():
        reference = predict_noise(pipe, latents, 250, cond)
        for t in (torch.tensor(250), torch.tensor([250]), torch.tensor([250, 250])):
            torch.testing.assert_close(predict_noise(pipe, latents, t, cond), reference)
        mixed = predict_noise(pipe, latents, torch.tensor([250, 900]), cond)
        torch.testing.assert_close(mixed[:1], reference[:1])
        assert not torch.allclose(mixed[1:], reference[1:])
        with pytest.raises(ValueError, match="one timestep or one per latent"):
            predict_noise(pipe, latents, torch.tensor([1, 2, 3]), cond)


def test_gradients_flow_through_predict_noise(family, tiny_pipe):
    tiny_pipe.unet.requires_grad_(True)
    latents = torch.randn(1, 4, 8, 8)
    cond = encode_prompts(tiny_pipe, ["a cat"], grad=True)
    loss = predict_noise(tiny_pipe, latents, 500, cond, guidance_scale=3.0).pow(2).mean()
    loss.backward()
    to_k = next(m for n, m in tiny_pipe.unet.named_modules() if n.endswith("attn2.to_k"))
    assert to_k.weight.grad is not None and to_k.weight.grad.abs().sum() > 0
    token_embedding = tiny_pipe.text_encoder.get_input_embeddings().weight
    assert token_embedding.grad is not None and token_embedding.grad.abs().sum() > 0


def test_conditioning_helpers():
    sdxl = Conditioning(torch.randn(3, 77, 8), torch.randn(3, 4), torch.randn(3, 6))
    assert len(sdxl[1]) == 1 and torch.equal(sdxl[1].pooled_prompt_embeds, sdxl.pooled_prompt_embeds[1:2])
    assert len(sdxl[-1]) == 1 and torch.equal(sdxl[-1].add_time_ids, sdxl.add_time_ids[2:])
    joined = Conditioning.cat([sdxl[:1], sdxl[1:]])
    assert all(torch.equal(getattr(joined, f), getattr(sdxl, f)) for f in ("prompt_embeds", "pooled_prompt_embeds"))
    assert len(sdxl[:1].expand(4)) == 4 and sdxl.expand(3) is sdxl
    assert sdxl.to(dtype=torch.float64).add_time_ids.dtype == torch.float64
    assert set(sdxl.unet_kwargs()["added_cond_kwargs"]) == {"text_embeds", "time_ids"}
    plain = Conditioning(torch.randn(2, 77, 8))
    assert set(plain.unet_kwargs()) == {"encoder_hidden_states"}
    with pytest.raises(ValueError, match="mix"):
        Conditioning.cat([plain, sdxl])
    with pytest.raises(ValueError, match="prompts"):
        plain.expand(3)
