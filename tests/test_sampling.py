import numpy as np
import pytest
import torch
from PIL import Image

from erasure.diffusion import encode_prompts
from erasure.pipeline import ModelFamily, detect_family
from erasure.sampling import (
    ddim_scheduler,
    ddim_trajectory,
    forward_noise,
    images_to_latents,
    initial_noise,
    partial_ddim,
)

SIZE = 16  # 8x8 latents with the tiny VAE (downscaling 2)


def test_partial_ddim_is_seeded_and_gradient_free(tiny_pipe):
    cond = encode_prompts(tiny_pipe, ["a picture of pip"])
    with torch.enable_grad():
        x_a, t_a = partial_ddim(tiny_pipe, cond, 2, 5, 3.0, torch.Generator().manual_seed(1), size=SIZE)
    x_b, t_b = partial_ddim(tiny_pipe, cond, 2, 5, 3.0, torch.Generator().manual_seed(1), size=SIZE)
    x_c, _ = partial_ddim(tiny_pipe, cond, 2, 5, 3.0, torch.Generator().manual_seed(2), size=SIZE)
    assert not x_a.requires_grad and x_a.grad_fn is None
    assert x_a.shape == (1, 4, SIZE // 2, SIZE // 2)
    assert torch.equal(x_a, x_b) and int(t_a) == int(t_b)
    assert not torch.allclose(x_a, x_c)
    assert int(t_a) == int(ddim_scheduler(tiny_pipe, 5).timesteps[2])


def test_every_state_of_a_trajectory_is_what_partial_ddim_returns_for_that_step(tiny_pipe):
    """One trajectory serves every step: state k equals a fresh partial run to step k from the same noise."""
    cond = encode_prompts(tiny_pipe, ["a picture of pip", "zog"])
    noise = initial_noise(tiny_pipe, 2, SIZE, torch.Generator().manual_seed(5))
    states = ddim_trajectory(tiny_pipe, cond, 5, 6, 3.0, latents=noise)
    timesteps = ddim_scheduler(tiny_pipe, 6).timesteps
    assert len(states) == 6 and [int(t) for _, t in states] == [int(t) for t in timesteps]
    for k, (latents, t) in enumerate(states):
        expected, expected_t = partial_ddim(tiny_pipe, cond, k, 6, 3.0, latents=noise)
        assert torch.equal(latents, expected) and int(t) == int(expected_t), k
    # seeded through the generator exactly as partial_ddim is
    seeded = ddim_trajectory(tiny_pipe, cond, 3, 6, 3.0, torch.Generator().manual_seed(9))
    assert torch.equal(seeded[3][0], partial_ddim(tiny_pipe, cond, 3, 6, 3.0, torch.Generator().manual_seed(9))[0])
    with pytest.raises(ValueError, match="until_step"):
        ddim_trajectory(tiny_pipe, cond, 6, 6)


def test_partial_ddim_step_zero_is_the_initial_noise(tiny_pipe):
    cond = encode_prompts(tiny_pipe, ["pip", "zog"])
    noise = initial_noise(tiny_pipe, 2, SIZE, torch.Generator().manual_seed(3))
    latents, t = partial_ddim(tiny_pipe, cond, 0, 10, 3.0, latents=noise)
    assert torch.equal(latents, noise)
    assert int(t) == int(ddim_scheduler(tiny_pipe, 10).timesteps[0])
    with pytest.raises(ValueError, match="until_step"):
        partial_ddim(tiny_pipe, cond, 10, 10)


def test_one_generator_per_latent_makes_batching_irrelevant(tiny_pipe):
    both = initial_noise(tiny_pipe, 2, SIZE, [torch.Generator().manual_seed(s) for s in (5, 6)])
    second = initial_noise(tiny_pipe, 1, SIZE, [torch.Generator().manual_seed(6)])
    assert torch.equal(both[1:], second)


def test_partial_ddim_matches_the_diffusers_pipeline(tiny_pipe):
    """Independent reference: diffusers' own denoising loop (DDIM, CFG), stopped after k steps by a callback."""
    steps, k, guidance = 6, 3, 3.0
    noise = initial_noise(tiny_pipe, 1, SIZE, torch.Generator().manual_seed(0))
    captured = {}

    def callback(pipe, i, t, tensors):
        if i == k - 1:
            captured["latents"] = tensors["latents"].clone()
        return tensors

    extra = {}
    if detect_family(tiny_pipe) is ModelFamily.SDXL:  # our conditioning uses the native size's micro-conditioning
        native = tiny_pipe.unet.config.sample_size * tiny_pipe.vae_scale_factor
        extra = {"original_size": (native, native), "target_size": (native, native)}
    tiny_pipe(
        "a picture of pip",
        num_inference_steps=steps,
        guidance_scale=guidance,
        latents=noise.clone(),
        height=SIZE,
        width=SIZE,
        output_type="latent",
        callback_on_step_end=callback,
        **extra,
    )
    cond = encode_prompts(tiny_pipe, ["a picture of pip"])
    ours, t = partial_ddim(tiny_pipe, cond, k, steps, guidance, latents=noise)
    torch.testing.assert_close(ours, captured["latents"], rtol=1e-4, atol=1e-5)
    assert int(t) == int(tiny_pipe.scheduler.timesteps[k])


def test_forward_noise_follows_the_closed_form(tiny_pipe):
    x_0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    noisy, noise, t = forward_noise(tiny_pipe, x_0, torch.tensor([0, 500, 999]), torch.Generator().manual_seed(1))
    config = tiny_pipe.scheduler.config
    assert config.beta_schedule == "scaled_linear"
    betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, config.num_train_timesteps) ** 2
    abar = torch.cumprod(1 - betas.double(), 0)[t].view(-1, 1, 1, 1)
    expected = abar.sqrt() * x_0.double() + (1 - abar).sqrt() * noise.double()
    torch.testing.assert_close(noisy.double(), expected, rtol=1e-5, atol=1e-5)
    again, _, _ = forward_noise(tiny_pipe, x_0, torch.tensor([0, 500, 999]), torch.Generator().manual_seed(1))
    assert torch.equal(noisy, again)
    _, _, drawn = forward_noise(tiny_pipe, x_0, None, torch.Generator().manual_seed(2))
    assert drawn.shape == (3,) and ((0 <= drawn) & (drawn < config.num_train_timesteps)).all()
    with pytest.raises(ValueError, match="timesteps"):
        forward_noise(tiny_pipe, x_0, torch.tensor([1, 2]))


def test_images_to_latents_accepts_pil_and_arrays():
    from erasure.testing import tiny_pipeline

    pipe = tiny_pipeline("sd1")
    array = np.random.default_rng(0).integers(0, 256, (2, 40, 40, 3), dtype=np.uint8)
    from_array = images_to_latents(pipe, array, size=32, sample=False)
    from_pil = images_to_latents(pipe, [Image.fromarray(a) for a in array], size=32, sample=False)
    from_float = images_to_latents(pipe, list(array.astype(np.float32) / 255), size=32, sample=False)
    assert from_array.shape == (2, 4, 16, 16)
    torch.testing.assert_close(from_array, from_pil)
    torch.testing.assert_close(from_array, from_float)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        images_to_latents(pipe, [array[0].astype(np.float32)], size=32)
    with pytest.raises(ValueError, match="non-empty"):
        images_to_latents(pipe, [], size=32)


def test_any_scheduler_gives_an_unclipped_ddim_with_the_same_schedule():
    from diffusers import EulerDiscreteScheduler

    from erasure.testing import tiny_pipeline

    pipe = tiny_pipeline("sdxl")
    pipe.scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    )
    scheduler = ddim_scheduler(pipe, 50)
    assert not scheduler.config.clip_sample  # DDIM's default (True) would clip latents to [-1, 1]
    torch.testing.assert_close(scheduler.alphas_cumprod, pipe.scheduler.alphas_cumprod)
    assert scheduler.timesteps[:2].tolist() == [981, 961]


def test_the_denoising_target_is_the_noise_or_v_as_the_model_predicts():
    from erasure.sampling import ddim_scheduler, denoising_target
    from erasure.testing import tiny_pipeline

    x0, noise, t = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4), torch.tensor([10, 900])
    assert denoising_target(tiny_pipeline("sd1"), x0, noise, t) is noise
    pipe = tiny_pipeline("sd2")  # v-prediction
    abar = ddim_scheduler(pipe).alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(denoising_target(pipe, x0, noise, t), abar.sqrt() * noise - (1 - abar).sqrt() * x0)
